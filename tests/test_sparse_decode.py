"""Sparse-gather Spark decoding computes the masked dense function, and overflow is counted."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spark import cache as kv_cache
from spark import kernels, sparsity
from spark.attention import Attention, spark_scores, visible_mask
from spark.config import ModelConfig, SparkConfig
from spark.ffn import SparkFFN
from spark.layers import gelu
from spark.model import Transformer

FFN_CFG = ModelConfig(vocab_size=61, d_model=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                      ffn_dim=512, ffn_kind="spark", spark_ffn_dim=512, spark=SparkConfig(ffn_k_frac=0.08))


def _ffn(capacity):
    cfg = dataclasses.replace(FFN_CFG, spark=dataclasses.replace(FFN_CFG.spark, decode_capacity_sigmas=capacity))
    return SparkFFN(cfg, 0, nnx.Rngs(3))


def test_capacity_indices_sorted_padded_and_top_on_overflow():
    scores = jnp.array([[5.0, 1.0, 4.0, 3.0, 2.0, 0.0], [0.0, 9.0, 0.0, 0.0, 0.0, 8.0]])
    keep = jnp.array([[1, 1, 1, 1, 0, 0], [0, 1, 0, 0, 0, 1]], bool)
    idx, ok, dropped = sparsity.capacity_indices(scores, keep, 3)
    assert idx.tolist() == [[0, 2, 3], [1, 5, 5]]  # row 0 drops its lowest kept score (index 1)
    assert ok.tolist() == [[True, True, True], [True, True, False]]
    assert dropped.tolist() == [1, 0]


@pytest.mark.parametrize("width", [512, 256, 64])
def test_sparse_ffn_equals_masked_dense(width):
    ffn = _ffn(capacity=100.0)
    x = jax.random.normal(jax.random.key(0), (2, 3, 64))
    dense, _ = ffn(x, width)
    sparse, aux = ffn(x, width, sparse=True)
    assert aux["ffn_overflow"].tolist() == [0, 0]
    assert 0.04 < float(aux["ffn_density"]) < 0.14
    np.testing.assert_allclose(np.asarray(sparse), np.asarray(dense), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["jnp", "kernel"])
def test_sparse_ffn_overflow_is_counted_and_keeps_top_by_predictor(path, monkeypatch):
    """The capacity path (GPU/TPU, or SPARK_CPU_KERNELS=0) keeps the top `capacity` neurons by
    predictor score and counts the rest; the CPU kernel reads every active row, drops nothing."""
    if path == "jnp":
        monkeypatch.setenv("SPARK_CPU_KERNELS", "0")
    elif not kernels.enabled():
        pytest.skip(kernels.status())
    ffn = _ffn(capacity=0.0)
    x = jax.random.normal(jax.random.key(1), (2, 4, 64))
    out, aux = ffn(x, 512, sparse=True)
    pred = np.asarray(ffn.predictor(x, 512), np.float64)
    theta = np.asarray(sparsity.threshold(jnp.asarray(pred, jnp.float32), 0.08), np.float64)
    cap = sparsity.capacity(0.08 * 512, 512, 0.0)
    up = np.einsum("BTE,FE->BTF", np.asarray(x[..., ffn.rank:]), np.asarray(ffn.w_up[...]))
    expect_out = np.zeros(out.shape)
    expect_dropped, overflowing, read = np.zeros(2, int), 0, []
    for b in range(2):
        for t in range(4):
            kept = np.flatnonzero(pred[b, t] > theta[b, t, 0])
            expect_dropped[b] += max(len(kept) - cap, 0)
            overflowing += len(kept) > cap
            kept = kept[np.argsort(-pred[b, t, kept])[:cap if path == "jnp" else None]]
            read.append(len(kept))
            act = np.asarray(gelu(jnp.asarray(pred[b, t, kept] - theta[b, t, 0])))
            expect_out[b, t] = (act * up[b, t, kept]) @ np.asarray(ffn.w_down[...])[kept]
    assert expect_dropped.sum() > 0, "the test needs an overflow to have power"
    assert aux["ffn_overflow"].tolist() == (expect_dropped.tolist() if path == "jnp" else [0, 0])
    assert float(aux["ffn_density"]) == pytest.approx(np.mean(read) / 512)  # the rows each token read
    np.testing.assert_allclose(np.asarray(out), expect_out, atol=1e-5, rtol=1e-4)
    _, masked_aux = ffn(x, 512)  # the masked path reports the share of tokens that would overflow
    assert float(masked_aux["ffn_overflow_rate"]) == pytest.approx(overflowing / 8)


def test_capacity_is_k_plus_sigmas_root_k():
    """By hand: the demo's F (576 neurons, k = 46.08) and F/8 (72, k = 5.76) at c = 4, and the caps."""
    assert sparsity.capacity(46.08, 576, 4.0) == 74  # ceil(46.08 + 4·6.788) = ceil(73.23)
    assert sparsity.capacity(5.76, 72, 4.0) == 16  # ceil(5.76 + 4·2.4) = ceil(15.36)
    assert sparsity.capacity(256, 200, 4.0) == 200  # never more than the slots there are
    assert sparsity.capacity(0.5, 10, 0.0) == 1  # at least one
    assert float(sparsity.overflow_rate(jnp.asarray([15, 16, 17, 40]), 5.76, 4.0)) == 0.5


ATTN_CFG = ModelConfig(vocab_size=61, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                       ffn_dim=64, attn_kind="spark", spark=SparkConfig(attn_k=4, decode_capacity_sigmas=0.0))


@pytest.mark.parametrize("path", ["jnp", "kernel"])
def test_sparse_attention_overflow_is_counted(path, monkeypatch):
    """The capacity path (jnp: GPU/TPU, or SPARK_CPU_KERNELS=0) keeps the top `capacity` keys and
    counts the rest; the CPU kernel has no capacity: nothing dropped, the masked output exactly."""
    if path == "jnp":
        monkeypatch.setenv("SPARK_CPU_KERNELS", "0")
    elif not kernels.enabled():
        pytest.skip(kernels.status())
    attn = Attention(ATTN_CFG, 0, nnx.Rngs(0))
    b, s = 2, 16
    x = jax.random.normal(jax.random.key(2), (b, s + 1, 32))
    pos = jnp.broadcast_to(jnp.arange(s + 1), (b, s + 1))
    run = nnx.jit(lambda m, x, p, kv, sparse: m(x, p, kv=kv, sparse=sparse), static_argnums=4)
    empty = kv_cache.init(ATTN_CFG, b, 24, slack=0)  # the Spark cache's layout
    _, kv, _ = run(attn, x[:, :s], pos[:, :s], (empty.k[0], empty.v[0]), False)
    masked, _, _ = run(attn, x[:, s:], pos[:, s:], kv, False)
    out, _, aux = run(attn, x[:, s:], pos[:, s:], kv, True)
    # independent count: keys the statistical selection keeps beyond the capacity of 4
    q, k, _ = attn.qkv(x, pos)
    s1, _ = spark_scores(q[:, s:].reshape(b, 1, 2, 2, 16), k.transpose(0, 2, 1, 3), ATTN_CFG)
    valid = visible_mask(pos[:, s:], pos, None)[:, None, None]
    keep = sparsity.keep_k_of_valid(s1, jnp.broadcast_to(valid, s1.shape), 4)
    expect = np.maximum(np.asarray(keep.sum(-1)) - 4, 0).sum(axis=(1, 2, 3))
    assert expect.sum() > 0, "the test needs an overflow to have power"
    if path == "kernel":
        assert not np.any(np.asarray(aux["attn_overflow"]))
        assert float(aux["keys_per_query"]) == pytest.approx(np.asarray(keep.sum(-1)).mean())
        np.testing.assert_allclose(np.asarray(out), np.asarray(masked), atol=1e-5, rtol=1e-5)
        return
    assert aux["attn_overflow"].tolist() == expect.tolist()
    assert float(aux["keys_per_query"]) == pytest.approx(np.minimum(np.asarray(keep.sum(-1)), 4).mean())
    assert not np.allclose(np.asarray(out), np.asarray(masked), atol=1e-4)  # dropping keys changes the output


SPARK = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                    ffn_dim=64, sliding_window=5, ffn_kind="spark", attn_kind="spark",
                    spark=SparkConfig(ffn_k_frac=0.25, attn_k=4, decode_capacity_sigmas=100.0))


@pytest.mark.parametrize("widths", [None, (12, 48)], ids=["full", "mixnmatch"])
def test_sparse_decode_equals_full_forward(widths):
    model = Transformer(SPARK, nnx.Rngs(0))
    b, t, p = 2, 14, 5  # past the window (5) and past attn_k (4) visible keys
    tokens = jax.random.randint(jax.random.key(1), (b, t), 0, SPARK.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda params, tok, pos, cache: nnx.merge(graphdef, params)(tok, pos, cache=cache, widths=widths))
    full, _ = forward(params, tokens, pos, None)

    @jax.jit
    def step(params, tok, pos, cache):
        return nnx.merge(graphdef, params)(tok, pos, cache=cache, widths=widths, sparse=True, return_aux=True)

    cache = kv_cache.init(SPARK, b, t)
    logits, cache = forward(params, tokens[:, :p], pos[:, :p], cache)
    steps, overflow = [logits], 0
    for i in range(p, t):
        logits, cache, stats = step(params, tokens[:, i:i + 1], pos[:, i:i + 1], cache)
        steps.append(logits)
        overflow += int(stats["ffn_overflow"].sum() + stats["attn_overflow"].sum())
    assert overflow == 0
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), atol=1e-4, rtol=1e-4)


def test_search_decoders_report_decode_overflow(monkeypatch):
    """A tight capacity overflows; greedy through the search machinery (method "sample", N = 1,
    τ = 0) decodes the same tokens as plain greedy generation and reports the same per-row
    overflow counts (ModelLM passes the model's decode stats on instead of dropping them). The
    jnp path: the CPU attention kernel has no capacity to overflow."""
    monkeypatch.setenv("SPARK_CPU_KERNELS", "0")
    from decode import search
    from decode.generate import generate
    from decode.sampling import SamplerConfig

    tight = dataclasses.replace(SPARK, num_layers=2, spark=dataclasses.replace(SPARK.spark, decode_capacity_sigmas=0.0))
    graphdef, params = nnx.split(Transformer(tight, nnx.Rngs(5)))
    prompts = jnp.asarray([[5, 9, 3, 7, 1, 2], [11, 12, 13, 0, 0, 0]], jnp.int32)
    lengths = jnp.asarray([6, 3], jnp.int32)
    toks, num, stats = generate(graphdef, params, prompts, lengths, jax.random.key(0), max_new_tokens=8,
                                sampler=SamplerConfig(0.0), eos_id=-1, pad_id=0)
    cfg = search.SearchConfig(method="sample", samples=1, tau_final=0.0, step_tokens=8, max_gen=8)
    out = search.run(graphdef, params, prompts, lengths, jax.random.key(0), cfg=cfg,
                     task=search.TaskTokens(delim_id=60, eos_id=-1))
    assert out["tokens"][:, 0].tolist() == np.asarray(toks).tolist()
    for k in ("ffn_overflow", "attn_overflow"):
        assert int(stats[k].sum()) > 0, k
        assert out["stats"][k].tolist() == np.asarray(stats[k]).tolist(), k
