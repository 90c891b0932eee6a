"""Model library: causality by gradient, prefill == forward, parameter counts, Spark attention
semantics, MatFormer extraction."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spark import cache as kv_cache
from spark import matformer
from spark.attention import Attention, spark_scores, visible_mask
from spark.config import MatFormerConfig, ModelConfig, SparkConfig
from spark.ffn import GeGLU, SparkFFN
from spark.model import Transformer

TINY = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, ffn_dim=64, sliding_window=5)
SPARK = dataclasses.replace(TINY, ffn_kind="spark", attn_kind="spark",
                            spark=SparkConfig(ffn_k_frac=0.25, attn_k=4))
VARIANTS = {
    "dense": (TINY, None),
    "spark_ffn": (dataclasses.replace(TINY, ffn_kind="spark"), None),
    "spark_attn": (dataclasses.replace(TINY, attn_kind="spark", spark=SparkConfig(attn_k=4)), None),
    "spark_mixnmatch": (SPARK, (12, 48)),
}


def _inputs(b=2, t=16, vocab=61, seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)
    return tokens, jnp.broadcast_to(jnp.arange(t), (b, t))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causality_by_gradient(name):
    cfg, widths = VARIANTS[name]
    model = Transformer(cfg, nnx.Rngs(0))
    tokens, pos = _inputs(t=12)
    x = model.embed_tokens(tokens)
    t0 = 6

    def loss(x):
        h, _, _ = model.apply_layers(x, pos, widths=widths)
        logits = model.logits(h)
        return jnp.sum(logits[:, t0] ** 2)

    g = jax.jit(jax.grad(loss))(x)
    per_pos = np.asarray(jnp.abs(g).sum(axis=(0, 2)))
    assert np.all(per_pos[t0 + 1:] == 0.0), per_pos
    assert np.all(per_pos[: t0 + 1] > 0.0), per_pos  # the test has power: the past does matter


@pytest.mark.parametrize("name", list(VARIANTS))
def test_prefill_into_empty_cache_equals_forward(name):
    cfg, widths = VARIANTS[name]
    model = Transformer(cfg, nnx.Rngs(0))
    tokens, pos = _inputs(t=14)  # longer than the sliding window (5)
    full, _ = model(tokens, pos, widths=widths)
    cache = kv_cache.init(cfg, batch=2, max_len=20)
    pre, cache = model(tokens, pos, cache=cache, widths=widths)
    np.testing.assert_allclose(np.asarray(pre), np.asarray(full), atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [14, 14]
    # the cache holds the block's keys at their positions and nothing past them
    assert float(jnp.abs(cache.k[0][:, :, :14]).sum()) > 0 and float(jnp.abs(cache.k[0][:, :, 14:]).sum()) == 0


def test_spark_ffn_param_count_equals_geglu_at_gemma2_2b():
    cfg = ModelConfig(vocab_size=256, d_model=2304, num_layers=1, num_heads=8, num_kv_heads=4,
                      head_dim=256, ffn_dim=9216)
    spark = dataclasses.replace(cfg, ffn_kind="spark")
    assert spark.ffn_width(0) == 13824 and spark.ffn_rank == 1152

    def count(module_fn):
        state = nnx.state(nnx.eval_shape(module_fn), nnx.Param)
        return sum(int(x.size) for x in jax.tree.leaves(state))

    n_geglu = count(lambda: GeGLU(cfg, 0, nnx.Rngs(0)))
    n_spark = count(lambda: SparkFFN(spark, 0, nnx.Rngs(0)))
    assert n_geglu == n_spark == 63_700_992


def _attn_inputs(cfg, t, seed=1):
    attn = Attention(cfg, layer=1, rngs=nnx.Rngs(seed))  # layer 1 is global
    x = jax.random.normal(jax.random.key(seed), (2, t, cfg.d_model))
    pos = jnp.broadcast_to(jnp.arange(t), (2, t))
    return attn, x, pos


def test_spark_attention_with_few_keys_equals_dense_softplus_formula():
    cfg = dataclasses.replace(TINY, attn_kind="spark", spark=SparkConfig(attn_k=256))
    attn, x, pos = _attn_inputs(cfg, 12)
    out, _, aux = attn(x, pos)
    q, k, v = (np.asarray(a, np.float64) for a in attn.qkv(x, pos))
    r, h, g = cfg.attn_rank, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    ref = np.zeros_like(q)
    causal = np.tril(np.ones((12, 12), bool))
    for n in range(cfg.num_heads):
        kk, vv = k[:, :, n // g], v[:, :, n // g]
        s1 = np.einsum("btr,bsr->bts", q[..., n, :r], kk[..., :r]) / np.sqrt(r)
        s1 = 50.0 * np.tanh(s1 / 50.0)
        s2 = np.einsum("btr,bsr->bts", q[..., n, r:], kk[..., r:]) / np.sqrt(h - r)
        e = np.where(causal, np.exp(s1 - s1.max(-1, keepdims=True)), 0.0)
        w = e / e.sum(-1, keepdims=True) * np.log1p(np.exp(s2)) * causal
        ref[:, :, n] = np.einsum("bts,bsh->bth", w, vv)
    ref_out = np.einsum("btnh,nhd->btd", ref, np.asarray(attn.w_o[...], np.float64))
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-5, rtol=1e-4)
    assert float(aux["keys_per_query"]) == pytest.approx(6.5)  # mean of 1..12: every visible key


def test_spark_attention_keeps_about_k_keys_and_never_zero():
    k = 64
    cfg = dataclasses.replace(TINY, attn_kind="spark", spark=SparkConfig(attn_k=k))
    attn, x, pos = _attn_inputs(cfg, 768)
    q, keys, _ = attn.qkv(x, pos)
    b, t, n, h = q.shape
    q = q.reshape(b, t, cfg.num_kv_heads, n // cfg.num_kv_heads, h)
    s1, _ = spark_scores(q, keys.transpose(0, 2, 1, 3), cfg)
    valid = jnp.broadcast_to(visible_mask(pos, pos, None)[:, None, None], s1.shape)
    from spark.sparsity import keep_k_of_valid

    kept = np.asarray(keep_k_of_valid(s1, valid, k).sum(-1))  # [B, K, G, T]
    n_visible = np.arange(1, t + 1)
    assert np.all(kept >= 1)
    assert np.all(kept[..., :k] == n_visible[:k])  # ≤ k visible: all kept
    many = kept[..., 4 * k:]
    assert abs(many.mean() - k) / k < 0.05, many.mean()


def _numpy_keep(s_TS, visible_TS, k):
    """Statistical top-k over the visible keys of each query row, by the paper's formula: all when
    at most k are visible, else s >= mean + std·Φ⁻¹(1 − k/n) (population std), the row max always."""
    from scipy.special import ndtri

    keep = np.zeros_like(visible_TS)
    for t in range(s_TS.shape[0]):
        vis = visible_TS[t]
        x, n = s_TS[t][vis], vis.sum()
        row = np.ones(n, bool) if n <= k else (x >= x.mean() + x.std() * ndtri(1 - k / n)) | (x == x.max())
        keep[t, np.flatnonzero(vis)] = row
    return keep


def test_spark_attention_thresholds_raw_scores_and_caps_only_the_softmax():
    """The softcap is monotone but not affine, so it changes which keys the *statistical*
    threshold keeps (exact top-k would not change). Keys are chosen on the raw predictor scores;
    the cap applies to the softmax weights only. Numbers by the paper's formulas in float64."""
    cfg = dataclasses.replace(TINY, attn_kind="spark", attn_logit_softcap=3.0, spark=SparkConfig(attn_k=8))
    attn, x, pos = _attn_inputs(cfg, 48)
    x = 3.0 * x  # wide score spread: the cap bends the tail
    out, _, _ = attn(x, pos)
    q, k, v = (np.asarray(a, np.float64) for a in attn.qkv(x, pos))
    r, h, g = cfg.attn_rank, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    causal = np.tril(np.ones((48, 48), bool))
    ref, changed = np.zeros_like(q), 0
    for b in range(2):
        for n in range(cfg.num_heads):
            kk, vv = k[b, :, n // g], v[b, :, n // g]
            s1 = q[b, :, n, :r] @ kk[:, :r].T / np.sqrt(r)
            s2 = q[b, :, n, r:] @ kk[:, r:].T / np.sqrt(h - r)
            capped = 3.0 * np.tanh(s1 / 3.0)
            keep = _numpy_keep(s1, causal, 8)
            changed += int((keep != _numpy_keep(capped, causal, 8)).any(-1).sum())
            e = np.where(keep, np.exp(capped - capped.max(-1, keepdims=True)), 0.0)
            w = e / e.sum(-1, keepdims=True) * np.log1p(np.exp(s2))
            ref[b, :, n] = w @ vv
    assert changed > 10  # thresholding the capped scores would keep other keys in these rows
    ref_out = np.einsum("btnh,nhd->btd", ref, np.asarray(attn.w_o[...], np.float64))
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=2e-4, rtol=1e-3)


def test_no_nan_at_position_zero_or_with_padding():
    model = Transformer(SPARK, nnx.Rngs(0))
    tokens, _ = _inputs(t=10)
    pos = jnp.array([[-1, -1, -1, 0, 1, 2, 3, 4, 5, 6], list(range(10))])  # row 0 left-padded

    graphdef, params = nnx.split(model)

    def loss(params):
        logits, _ = nnx.merge(graphdef, params)(tokens, pos)
        return jnp.sum(logits ** 2), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_matformer_extracted_model_equals_nested_forward():
    model = Transformer(SPARK, nnx.Rngs(3))
    tokens, pos = _inputs(t=10)
    for widths in [(12, 48), (96, 12)]:
        nested, _ = model(tokens, pos, widths=widths)
        small = matformer.extract(model, widths)
        assert small.cfg.layer_ffn_dims == widths
        assert small.layers[0].ffn.w_down[...].shape == (widths[0], SPARK.d_model)
        out, _ = small(tokens, pos)
        np.testing.assert_allclose(np.asarray(out), np.asarray(nested), atol=1e-5, rtol=1e-5)
    # nested and full-width models differ (so the comparison above has power)
    full, _ = model(tokens, pos)
    assert float(jnp.abs(full - nested).max()) > 1e-3


def test_matformer_full_width_equals_non_nested_model():
    plain_cfg = dataclasses.replace(SPARK, matformer=MatFormerConfig((1,)))
    nested = Transformer(SPARK, nnx.Rngs(5))
    plain = Transformer(plain_cfg, nnx.Rngs(5))
    nnx.update(plain, nnx.state(nested, nnx.Param))
    tokens, pos = _inputs(t=10)
    a, _ = nested(tokens, pos, widths=SPARK.granularity_widths(1))
    b, _ = plain(tokens, pos)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
