"""Gemma-2 2B (dense baseline) for TPU pods: 26 layers, d_model 2304, GeGLU 9216, 8 heads / 4 KV
heads of 256, local window 4096 alternating with global layers, softcaps 50 / 30.

    python train.py --config configs/gemma2_2b.py --workdir gs://BUCKET/gemma2_2b --distributed \
        --config.data.name=c4/en --config.data.spm_model=gs://BUCKET/gemma/tokenizer.model

Pod memory (`python bench/aot_compile.py --config configs/gemma2_2b.py --topology v5p:4x4x4`): layers
as one scan, blocks rematerialised, blocked attention (512 keys a block), cross-entropy 1024 tokens
at a time; the README's Pods table has the per-chip figures.

Data: the Gemma SentencePiece tokenizer (256000 pieces) and a tfds dataset you name, prepared in
array_record format. Neither has a default: building the pipeline without them stops with one line
naming the flag. The tokenizer defaults to WORKDIR/tokenizer.model, which `python -m spark.convert
--config configs/gemma2_2b.py` writes next to the imported weights (continue training from them).
Builds here only with jax.eval_shape (2.6B parameters incl. the 256k embedding).
"""

from spark.config import Config, DataConfig, MatFormerConfig, MeshConfig, ModelConfig, TrainConfig


def model_config(**kw) -> ModelConfig:
    base = dict(vocab_size=256_000, d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4,
                head_dim=256, ffn_dim=9216, sliding_window=4096, attn_logit_softcap=50.0,
                final_logit_softcap=30.0, query_pre_attn_scalar=256.0, dtype="bfloat16",
                matformer=MatFormerConfig((1,)), attn_block=512)
    return ModelConfig(**{**base, **kw})


def get_config() -> Config:
    train = TrainConfig(steps=500_000, batch_size=256, seq_len=8192, lr=2e-4, warmup_steps=2000,
                        matformer_mode="off", log_every=100, eval_every=5000, ckpt_every=2000, grad_accum=1,
                        scan_layers=True, remat="full", loss_chunk=1024)
    data = DataConfig(name=None, tokenizer="sentencepiece", spm_train=False)
    return Config(model=model_config(), data=data, train=train, mesh=MeshConfig(data=1, fsdp=-1, tensor=1))
