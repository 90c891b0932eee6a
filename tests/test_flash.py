"""Blocked flash attention (spark/flash.py) == the materialised attention it replaces in training,
values and gradients: dense and Spark, logit softcap, a window shorter than the sequence, packed
segments, key blocks that do not divide the sequence; and a hand-worked case."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spark import flash
from spark.attention import Attention
from spark.config import ModelConfig, SparkConfig

BASE = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   ffn_dim=64, sliding_window=7, attn_logit_softcap=5.0)
CASES = {
    "dense-global": (BASE, 1),
    "dense-local": (BASE, 0),
    "dense-nocap": (dataclasses.replace(BASE, attn_logit_softcap=None), 0),
    "spark-global": (dataclasses.replace(BASE, attn_kind="spark", spark=SparkConfig(attn_k=5)), 1),
    "spark-local": (dataclasses.replace(BASE, attn_kind="spark", spark=SparkConfig(attn_k=3)), 0),
}
T = 29  # not a multiple of the block (8): the last block is padded


def _inputs(seed=0):
    x = jax.random.normal(jax.random.key(seed), (2, T, BASE.d_model)) * 2.0  # large scores: softcap bites
    pos = np.tile(np.arange(T), (2, 1))
    seg = np.ones((2, T), np.int32)
    pos[1, 11:] -= 11  # row 1 packs two documents: positions restart, segment ids split them
    seg[1, 11:] = 2
    return x, jnp.asarray(pos), jnp.asarray(seg)


def _attn_fn(cfg, layer):
    graphdef, params = nnx.split(Attention(cfg, layer, nnx.Rngs(3)))

    def f(params, x, pos, seg):
        out, _, aux = nnx.merge(graphdef, params)(x, pos, None, seg)
        return out, aux

    return f, params


@pytest.mark.parametrize("name", list(CASES))
def test_blocked_equals_materialised_values_and_gradients(name):
    cfg, layer = CASES[name]
    x, pos, seg = _inputs()
    ref, params = _attn_fn(cfg, layer)
    blk, _ = _attn_fn(dataclasses.replace(cfg, attn_block=8), layer)
    ct = jax.random.normal(jax.random.key(9), (2, T, cfg.d_model))

    def loss(fn):
        return lambda p, x: jnp.sum(fn(p, x, pos, seg)[0] * ct)

    (out_r, aux_r), (out_b, aux_b) = jax.jit(ref)(params, x, pos, seg), jax.jit(blk)(params, x, pos, seg)
    np.testing.assert_allclose(out_b, out_r, rtol=1e-5, atol=1e-5)
    for key in aux_r:
        np.testing.assert_allclose(aux_b[key], aux_r[key], rtol=1e-6)
    g_r = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(params, x)
    g_b = jax.jit(jax.grad(loss(blk), argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(g_r), jax.tree.leaves(g_b), strict=True):
        scale = float(jnp.max(jnp.abs(a)))
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * scale)


def test_spark_threshold_keeps_what_the_materialised_rule_keeps():
    """The kept-key counts per query of the blocked two-pass threshold equal the materialised
    selection's (window and packing make the visible sets differ per query)."""
    cfg, layer = CASES["spark-local"]
    x, pos, seg = _inputs(seed=1)
    ref, params = _attn_fn(dataclasses.replace(cfg, spark=SparkConfig(attn_k=2)), layer)
    blk, _ = _attn_fn(dataclasses.replace(cfg, spark=SparkConfig(attn_k=2), attn_block=4), layer)
    kept = [float(jax.jit(f)(params, x, pos, seg)[1]["keys_per_query"]) for f in (ref, blk)]
    assert kept[0] == kept[1]


def test_hand_worked_two_keys():
    """One query, two visible keys with scores 0 and ln 3 (no cap): weights 1/4 and 3/4, so the
    output is v0/4 + 3·v1/4; with a cap c the scores become c·tanh(s/c)."""
    ln3 = float(np.log(3.0))
    q = jnp.asarray([[[[[1.0, 0.0]]]]])  # [B=1, T=1, K=1, G=1, H=2]
    k = jnp.asarray([[[[0.0, 0.0], [ln3, 0.0], [9.0, 0.0]]]])  # key 2 is in the future
    v = jnp.asarray([[[[4.0, 0.0], [0.0, 8.0], [100.0, 100.0]]]])
    q_pos, k_pos = jnp.asarray([[1]]), jnp.asarray([[0, 1, 2]])
    out, kept = flash.attend(flash.Spec(None, None, 1.0, 2), q, k, v, q_pos, k_pos)
    np.testing.assert_allclose(out[0, 0, 0, 0], [1.0, 6.0], rtol=1e-6)
    assert int(kept[0, 0, 0, 0]) == 2
    cap = 1.0
    p1 = 1.0 / (1.0 + np.exp(-np.tanh(ln3)))  # softmax of (0, tanh(ln 3))
    out, _ = flash.attend(flash.Spec(None, cap, 1.0, 2), q, k, v, q_pos, k_pos)
    np.testing.assert_allclose(out[0, 0, 0, 0], [4.0 * (1 - p1), 8.0 * p1], rtol=1e-6)


@pytest.mark.parametrize("kind", ["dense", "spark"])
def test_blocked_prefill_equals_materialised_prefill(kind):
    """A long prefill into the cache runs blocked (the dense cache keeps V transposed); the logits,
    the cache and the next decode step's logits equal the materialised path's."""
    from spark import cache as kv_cache
    from spark.model import Transformer

    cfg = CASES[f"{kind}-local"][0]
    tokens = jax.random.randint(jax.random.key(5), (2, 21), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(21), (2, 21))
    @nnx.jit
    def run(model):
        logits, cache = model(tokens[:, :20], pos[:, :20], cache=kv_cache.init(model.cfg, 2, 24))
        step, _ = model(tokens[:, 20:], pos[:, 20:], cache=cache)
        return logits, cache.k, cache.v, step

    outs = [run(Transformer(dataclasses.replace(cfg, attn_block=block), nnx.Rngs(0))) for block in (0, 8)]
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
