"""Tiny Spark + MatFormer config for tests: trains a few steps in seconds.

    python train.py --config configs/tiny.py --workdir /tmp/tiny --config.train.steps=4
"""

from spark.config import Config, ModelConfig, SparkConfig, TrainConfig


def get_config() -> Config:
    model = ModelConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1,
                        head_dim=16, ffn_dim=64, sliding_window=16, ffn_kind="spark",
                        attn_kind="spark", spark=SparkConfig(ffn_k_frac=0.25, attn_k=8))
    train = TrainConfig(steps=8, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=2, log_every=2,
                        eval_every=4, eval_batches=2, ckpt_every=4)
    return Config(model=model, train=train)
