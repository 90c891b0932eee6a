"""The dense and Spark Gemma-2-2B-shape models the decode benchmarks share (bench/decode.py,
decode_variants.py, speculative.py, bench_lm.py): their configs, parameters built directly in their dtype,
the bytes a decode token must read, and one timed decode from a prefilled state."""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from decode import generate as gen
from decode.sampling import SamplerConfig
from spark.cli import load_config_file
from spark.kernels import hugepages
from spark.model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL_LAYERS = 26
MODELS = (("dense", "gemma2_2b"), ("spark", "spark_gemma2_2b"))
SAMPLER = SamplerConfig(temperature=1.0)


def model_configs(layers: int, dtype: str, param_dtype: str | None = None, models=("dense", "spark")):
    """The dense and Spark 2B model configs (configs/gemma2_2b.py, spark_gemma2_2b.py), `layers` deep."""
    kw = dict(num_layers=layers, dtype=dtype, param_dtype=param_dtype or dtype)
    return {name: dataclasses.replace(load_config_file(os.path.join(ROOT, "configs", f"{file}.py")).model, **kw)
            for name, file in MODELS if name in models}


def build(cfgs, seed: int):
    """Parameters created directly in their dtype (nnx init under the config's param_dtype)."""
    models = {name: Transformer(cfg, nnx.Rngs(seed + i)) for i, (name, cfg) in enumerate(cfgs.items())}
    if len(models) == 2:  # one shared 256k x 2304 table: same head, half the memory
        models["spark"].embed = models["dense"].embed
    return {name: nnx.split(m) for name, m in models.items()}


def param_bytes(params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def huge_pages(split) -> dict:
    """Moves every model's parameters into 2 MB pages (hugepages.collapse): GB moved, GB, seconds."""
    t0 = time.perf_counter()
    moved = sum(hugepages.collapse(p) for _, p in split.values())
    total = sum(param_bytes(p) for _, p in split.values())
    r = {"GB": moved / 1e9, "of_GB": total / 1e9, "seconds": time.perf_counter() - t0}
    print(f"huge pages: {r['GB']:.2f} of {r['of_GB']:.2f} GB of weights in {r['seconds']:.1f} s", file=sys.stderr)
    return r


def prefill(graphdef, params, prompt_1T, new_tokens: int, sparse: bool):
    """The decode state after prefilling one prompt (generate.start), ready."""
    t = prompt_1T.shape[1]
    return jax.block_until_ready(gen.start(graphdef, params, prompt_1T, jnp.array([t]), jax.random.key(0),
                                           max_new_tokens=new_tokens, sparse=sparse))


def decode_from(graphdef, params, state, new_tokens: int, sparse: bool):
    """`new_tokens` sampled tokens (the jitted while_loop, generate.decode) from a copy of `state`
    (decode donates it); -> generate.decode's output."""
    return gen.decode(graphdef, params, jax.tree.map(jnp.copy, state), max_steps=new_tokens, sampler=SAMPLER,
                      eos_id=-1, pad_id=0, sparse=sparse)


def bytes_per_token(cfg, params, visible: float, ffn_density: float | None, keys_per_query: float | None):
    """Bytes one decode token must read: weights (the embedding once, as the logit head), KV cache."""
    item, kv_item = jnp.dtype(cfg.param_dtype).itemsize, jnp.dtype(cfg.dtype).itemsize  # the cache: cfg.dtype
    total = param_bytes(params)
    l, d, h, kh, n = cfg.num_layers, cfg.d_model, cfg.head_dim, cfg.num_kv_heads, cfg.num_heads
    if cfg.ffn_kind == "spark":  # K2 and V: only the active rows
        f, r = cfg.ffn_width(0), cfg.ffn_rank
        total -= l * f * ((d - r) + d) * item * (1.0 - ffn_density)
    if cfg.attn_kind == "spark":  # first r dims of every visible key + gate half and value of the kept keys
        r = cfg.attn_rank
        kv = l * (visible * kh * r + keys_per_query * n * ((h - r) + h)) * kv_item
    else:
        kv = l * visible * kh * 2 * h * kv_item
    return total + kv


def ffn_bytes(cfg, density: float | None) -> float:
    """Weight bytes one token's FFN reads per layer (Spark: the predictor and the active K2/V rows)."""
    item = jnp.dtype(cfg.param_dtype).itemsize
    d, f = cfg.d_model, cfg.ffn_width(0)
    if cfg.ffn_kind == "spark":
        r = cfg.ffn_rank
        return (f * r + density * f * ((d - r) + d)) * item
    return 3 * f * d * item
