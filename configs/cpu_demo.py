"""The embedded default: a Spark + MatFormer model trained on the Python standard library.

    python train.py --config configs/cpu_demo.py --workdir runs/demo      (make demo)

Byte-level, 4 layers, d_model 128, Spark FFN (8% of 576 neurons) and Spark attention (≤ 32 keys
per query), MatFormer granularities F/8..F trained jointly (sum of losses). Same parameter count
as configs/dense_demo.py. Expected: about 6 minutes on 2 CPU cores; see README for measured losses.
"""

from spark.config import Config, ModelConfig, SparkConfig, TrainConfig


def model_config(**kw) -> ModelConfig:
    base = dict(vocab_size=259, d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                ffn_dim=384, sliding_window=64, ffn_kind="spark", attn_kind="spark",
                spark=SparkConfig(ffn_k_frac=0.08, attn_k=32))
    return ModelConfig(**{**base, **kw})


def get_config() -> Config:
    train = TrainConfig(steps=400, batch_size=16, seq_len=128, lr=3e-3, warmup_steps=40, log_every=25,
                        eval_every=200, eval_batches=8, ckpt_every=200)
    return Config(model=model_config(), train=train)
