"""The benchmark model of the speculative decoders: a Spark + MatFormer byte-level LM on the
embedded corpus whose batch-1 decode step on a CPU is bound by weight bytes (106 MB of float32
weights, 3× the 32 MiB L3 of the CI machine), unlike the 0.8M-parameter demo, whose step is
dispatch overhead. Most bytes are FFN (F = 6144 Spark neurons per layer, 4 layers; attention with
one KV head), so an F/8 MatFormer draft step reads 17% of the bytes of a full step (18 of 106 MB).

    python train.py --config configs/bench_lm.py --workdir runs/bench_lm      (resumable)
    python bench/bench_lm.py            (is its step weight-bound? bandwidth fraction, F/8 : F)
"""

from spark.config import Config, MatFormerConfig, ModelConfig, SparkConfig, TrainConfig


def get_config() -> Config:
    model = ModelConfig(vocab_size=259, d_model=512, num_layers=4, num_heads=4, num_kv_heads=1, head_dim=64,
                        ffn_dim=4096, sliding_window=256, max_seq_len=512, ffn_kind="spark", attn_kind="spark",
                        matformer=MatFormerConfig((8, 4, 2, 1)), spark=SparkConfig(ffn_k_frac=0.08, attn_k=64))
    train = TrainConfig(steps=600, batch_size=16, seq_len=256, lr=2e-3, warmup_steps=100, log_every=25,
                        eval_every=200, eval_batches=8, ckpt_every=100, matformer_mode="sample")
    return Config(model=model, train=train)
