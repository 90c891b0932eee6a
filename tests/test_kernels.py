"""The CPU decode kernels (spark/kernels, XLA FFI) == float64 references on both ISA paths, under jit,
inside a while_loop with donated buffers; the model decodes with them as without them; without the
extension (or switched off) the jnp path runs; a failed compile leaves a working install."""

import functools
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decode import generate as gen
from decode.rollout import prefill_cache
from decode.sampling import SamplerConfig
from spark import kernels
from spark.config import ModelConfig, SparkConfig
from spark.model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILT = kernels.enabled()
needs_kernels = pytest.mark.skipif(not BUILT, reason=f"spark.kernels: {kernels.status()}")


def test_extension_builds_where_a_compiler_exists():
    if shutil.which("c++") or shutil.which("g++"):
        assert BUILT, kernels.status()


def _fresh_jit(fn):
    """A new jit wrapper: the ISA and on/off switches are read when a function is traced."""
    return jax.jit(lambda *a: fn(*a))


def _rel(a, ref):
    return float(np.max(np.abs(np.asarray(a, np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _weights(rng, shape, dtype):
    w = jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
    return w, np.asarray(w.astype(jnp.float32), np.float64)  # the exact values the kernel reads


SHAPES = [(1, 37, 45), (2, 300, 129), (5, 64, 2304), (8, 1000, 16), (16, 129, 333), (3, 17, 1),
          (1, 300, 1024), (1, 33, 1029), (1, 20, 2304)]  # one token: rows < 4 KB one after another


@needs_kernels
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemv_rows_and_cols_equal_float64(isa, dtype):
    rng = np.random.default_rng(0)
    rows, cols = _fresh_jit(kernels.gemv_rows), _fresh_jit(kernels.gemv_cols)
    for n, f, d in SHAPES:  # tails of every width: D not a multiple of 16 or 32
        w, w64 = _weights(rng, (f, d), dtype)
        x = rng.standard_normal((n, d), np.float32)
        h = rng.standard_normal((n, f), np.float32) * (rng.random((n, f)) > 0.3)  # zeros: rows skipped
        assert _rel(rows(x, w), x.astype(np.float64) @ w64.T) < 1e-5, (n, f, d)
        assert _rel(cols(h, w), h.astype(np.float64) @ w64) < 1e-5, (n, f, d)
    assert "spark_gemv_rows" in rows.lower(x, w).as_text()  # the kernel ran, not the reference


def _gather_case(rng, n, f, c, e, d, dtype, fill: float):
    """Sorted index sets per token (as sparsity.capacity_indices: unused slots point at F − 1 with
    act 0), `fill` of the slots active, tokens overlapping -> the kernel's arguments (act dense
    [N, F]), the capacity form (idx, act [N, C]) and the float64 result."""
    idx = np.stack([np.sort(rng.choice(f, c, replace=False)) for _ in range(n)]).astype(np.int32)
    act = rng.standard_normal((n, c)).astype(np.float32)
    used = np.arange(c)[None, :] < np.ceil(fill * c)
    idx, act = np.where(used, idx, f - 1), np.where(used, act, 0.0).astype(np.float32)
    k2, k64 = _weights(rng, (f, e), dtype)
    v, v64 = _weights(rng, (f, d), dtype)
    x2 = rng.standard_normal((n, e), np.float32)
    up = np.einsum("ne,nce->nc", x2.astype(np.float64), k64[idx])
    ref = np.einsum("nc,ncd->nd", act * up, v64[idx])
    act_NF = np.zeros((n, f), np.float32)
    np.add.at(act_NF, (np.arange(n)[:, None], idx), act)  # unused slots add 0 at F − 1
    return (x2, act_NF, k2, v), (x2, idx, act, k2, v), ref


@needs_kernels
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ffn_gather_equals_float64(isa, dtype):
    rng = np.random.default_rng(1)
    run = _fresh_jit(kernels.ffn_gather)
    for n, f, c, e, d, fill in [(1, 200, 24, 33, 70, 1.0), (3, 200, 24, 33, 70, 0.5), (8, 64, 60, 16, 129, 1.0),
                                (5, 1000, 90, 1280, 2304, 0.8), (2, 50, 50, 7, 5, 1.0)]:
        args, _, ref = _gather_case(rng, n, f, c, e, d, dtype, fill)
        out, dropped = run(*args)
        assert _rel(out, ref) < 1e-5, (n, f, c, fill)
        assert not np.any(np.asarray(dropped))
    # every slot empty: nothing read, zeros out
    args, _, _ = _gather_case(rng, 2, 40, 8, 5, 6, dtype, 0.0)
    assert not np.any(np.asarray(run(*args)[0]))


def _ffn_decode_float64(x, k1, k2, v, width, k_frac, round_bf16=False):
    """The Spark FFN (arXiv 2506.06644 §3) in float64: pred = x[:r]·K1ᵀ over the first `width`
    neurons, θ = mean + std·Φ⁻¹(1 − k_frac) (population std), act = gelu_tanh(max(pred − θ, 0)),
    y = Σ act·(x[r:]·K2[f])·V[f] -> (y, #{pred > θ} per token)."""
    from statistics import NormalDist
    r = k1.shape[1]
    pred = x[:, :r].astype(np.float64) @ k1[:width].T
    if round_bf16:  # the predictor's output in a bf16 model
        pred = np.asarray(jnp.asarray(pred, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    theta = pred.mean(-1, keepdims=True) + pred.std(-1, keepdims=True) * NormalDist().inv_cdf(1 - k_frac)
    u = np.maximum(pred - theta, 0.0)
    act = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))
    return (act * (x[:, r:].astype(np.float64) @ k2[:width].T)) @ v[:width], np.sum(pred > theta, axis=-1)


@needs_kernels
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ffn_decode_equals_float64(isa, dtype):
    """The fused Spark FFN decode (predictor, statistical top-k, GELU, gather): MatFormer prefix
    widths, 1-16 tokens, tails of every width; a bf16 model rounds the predictor's output first."""
    rng = np.random.default_rng(11)
    for n, f, width, r, d, k_frac in [(1, 200, 200, 16, 48, 0.08), (3, 300, 150, 33, 70, 0.1),
                                      (8, 1000, 1000, 1024, 2304, 0.08), (16, 64, 40, 5, 9, 0.3),
                                      (2, 500, 437, 100, 129, 0.02)]:
        k1, p64 = _weights(rng, (f, r), dtype)
        k2, k64 = _weights(rng, (f, d - r), dtype)
        v, v64 = _weights(rng, (f, d), dtype)
        x = rng.standard_normal((n, d), np.float32)
        for out_dtype in ["float32"] + (["bfloat16"] if dtype == "bfloat16" else []):
            run = _fresh_jit(functools.partial(kernels.ffn_decode, default=None, width=width, k_frac=k_frac,
                                               out_dtype=jnp.dtype(out_dtype)))
            y, kept, dropped = run(x, k1, k2, v)
            ref, kept64 = _ffn_decode_float64(x, p64, k64, v64, width, k_frac, out_dtype == "bfloat16")
            assert _rel(y, ref) < (1e-5 if out_dtype == "float32" else 8e-3), (n, f, width, out_dtype)
            np.testing.assert_array_equal(kept, kept64)
            assert not np.any(np.asarray(dropped))
    assert "spark_ffn_decode" in run.lower(x, k1, k2, v).as_text()


@needs_kernels
def test_ffn_decode_by_hand():
    """One token, worked by hand: r = 1, x = [1, 2, 0.5], K1 = [3, 1, −1, −3]ᵀ, so pred = [3, 1, −1, −3],
    mean 0, std √5, θ = √5·Φ⁻¹(0.75) = 2.2361·0.6745 = 1.5082 at k_frac 0.25: only neuron 0 is
    active, act = gelu(1.4918) = 1.3903; up = x[1:]·K2[0] = 2 + 0.5 = 2.5; y = 3.4758·V[0]."""
    k1 = jnp.asarray([[3.0], [1.0], [-1.0], [-3.0]])
    k2 = jnp.asarray([[1.0, 1.0], [5.0, 5.0], [7.0, 7.0], [9.0, 9.0]])
    v = jnp.asarray([[1.0, 0.0, 2.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [3.0, 3.0, 3.0]])
    y, kept, _ = kernels.ffn_decode(jnp.asarray([[1.0, 2.0, 0.5]]), k1, k2, v, None, width=4, k_frac=0.25)
    np.testing.assert_allclose(np.asarray(y), [[3.4758, 0.0, 6.9516]], rtol=1e-4)
    assert int(kept[0]) == 1


def _attn_case(rng, b, t, kh, g, h, s, dtype, v_t, window=None):
    """Random q/K/V, each row's block of t tokens at its own start (ragged; the first row's block
    ends at the last key), visible keys causal
    (and inside `window`); K/V as the kernel reads them (dtype) and in float64."""
    q = rng.standard_normal((b, t, kh, g, h)).astype(np.float32)
    k, k64 = _weights(rng, (b, kh, s, h), dtype)
    v, v64 = _weights(rng, (b, kh, h, s) if v_t else (b, kh, s, h), dtype)
    start = rng.integers(0, s - t + 1, (b, 1))
    start[0] = s - t  # the first row sees the whole cache
    pos = start + np.arange(t)  # [B, T]
    valid = np.arange(s)[None, None, :] <= pos[:, :, None]
    if window is not None:
        valid &= pos[:, :, None] - np.arange(s)[None, None, :] < window
    return q, (k, k64), (v, v64), valid


def _spark_cache(k, v, rank):
    """Whole keys and values [B, K, S, H] in the Spark cache's layout (spark/cache.py): the keys'
    first r dims, and [gate half | value] per slot."""
    return k[..., :rank], jnp.concatenate([jnp.asarray(k)[..., rank:], jnp.asarray(v)], axis=-1)


def _attn_float64(q, k64, v64, valid, attn_k, rank, cap, spark, v_t):
    """The paper's formulas per query in float64: dense softmax(softcap(q·k/√H)); Spark (arXiv
    2506.06644 §3) keeps the visible keys with s1 = q[:r]·k[:r]/√r ≥ mean + std·Φ⁻¹(1 − k/n) (all
    when n ≤ k; the row max always), weights softmax(softcap(s1)) · softplus(q[r:]·k[r:]/√(H − r))."""
    from statistics import NormalDist
    b, t, kh, g, h = q.shape
    v64 = v64.swapaxes(-1, -2) if v_t else v64  # [B, K, S, H]
    out, kept = np.zeros(q.shape), np.zeros((b, kh, g, t), np.int64)
    for bi, ki, gi, ti in np.ndindex(b, kh, g, t):
        qq, vis = q[bi, ti, ki, gi].astype(np.float64), np.flatnonzero(valid[bi, ti])
        s1 = k64[bi, ki, vis, :rank] @ qq[:rank] / np.sqrt(rank)
        keep = np.ones(len(vis), bool)
        if spark and len(vis) > attn_k:
            theta = s1.mean() + s1.std() * NormalDist().inv_cdf(1 - attn_k / len(vis))
            keep = (s1 >= theta) | (s1 == s1.max())
        logit = s1[keep] if cap is None else cap * np.tanh(s1[keep] / cap)
        w = np.exp(logit - logit.max())
        w /= w.sum()
        if spark:
            w *= np.logaddexp(0.0, k64[bi, ki, vis[keep], rank:] @ qq[rank:] / np.sqrt(h - rank))
        out[bi, ti, ki, gi] = w @ v64[bi, ki, vis[keep]]
        kept[bi, ki, gi, ti] = keep.sum()
    return out, kept


ATTN_CASES = [  # b, t, kh, g, h, s, rank (0: dense), window, v_t, k
    (1, 1, 4, 2, 256, 300, 128, None, False, 32),  # 2B shapes, Spark
    (2, 3, 2, 2, 64, 50, 16, None, False, 8),  # a verify block of 3, ragged rows
    (3, 2, 1, 2, 48, 40, 0, 7, False, 8),  # dense, a window, widths with tails
    (2, 2, 2, 2, 256, 1100, 0, None, True, 8),  # dense with V [H, S], a row that ends early
    (2, 8, 1, 2, 40, 24, 8, None, False, 1),  # 16 queries (the largest block); rows with every key below θ
]


@needs_kernels
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_equals_float64(isa, dtype):
    rng = np.random.default_rng(6)
    for b, t, kh, g, h, s, rank, window, v_t, attn_k in ATTN_CASES:
        q, (k, k64), (v, v64), valid = _attn_case(rng, b, t, kh, g, h, s, dtype, v_t, window)
        spark = rank > 0
        r = rank or h
        kw = dict(rank=r, scale=r**-0.5, gate_scale=(h - r) ** -0.5 if spark else 1.0, softcap=20.0, spark=spark,
                  v_t=v_t)
        z = kernels.spark_z(jnp.asarray(valid), attn_k)
        run = _fresh_jit(functools.partial(kernels.attention, default=None, **kw))
        k, v = _spark_cache(k, v, rank) if spark else (k, v)
        out, kept, dropped = run(q, k, v, jnp.asarray(valid), z)
        ref, ref_kept = _attn_float64(q, k64, v64, valid, attn_k, r, 20.0, spark, v_t)
        case = (b, t, kh, g, h, s, rank)
        np.testing.assert_array_equal(np.asarray(kept), ref_kept, err_msg=str(case))
        assert spark == bool(np.any(ref_kept < valid.sum(-1)[:, None, None, :])), case  # the selection ran
        assert _rel(out, ref) < 1e-5, case
        assert not np.any(np.asarray(dropped))
        if isa == "portable":  # the jnp formulas (the kernel's reference off CPU) agree too
            jref, jkept = jax.jit(functools.partial(kernels.attention_ref, **kw))(q, k, v, jnp.asarray(valid), z)
            np.testing.assert_array_equal(np.asarray(jkept), ref_kept)
            assert _rel(jref, ref) < 1e-5, case
    assert "spark_attention" in run.lower(q, k, v, jnp.asarray(valid), z).as_text()


@needs_kernels
def test_reference_functions_equal_float64():
    """The jnp references the kernels are swapped for compute the same function (they run off CPU)."""
    rng = np.random.default_rng(2)
    args, capacity_args, ref = _gather_case(rng, 3, 200, 24, 33, 70, "float32", 0.7)
    assert _rel(kernels.ffn_gather_ref(*args), ref) < 1e-5
    assert _rel(kernels.capacity_gather(*capacity_args), ref) < 1e-5
    w, w64 = _weights(rng, (40, 9), "bfloat16")
    x = rng.standard_normal((2, 9), np.float32)
    assert _rel(kernels.gemv_rows_ref(x, w), x.astype(np.float64) @ w64.T) < 1e-5


@needs_kernels
def test_inside_while_loop_with_donated_buffers(isa):
    """A jitted while_loop that feeds each kernel's output to the next, its carry donated."""
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((96, 40), np.float32) / 8)
    (_, act_NF, _, _), (_, idx, act, _, _), _ = _gather_case(rng, 2, 96, 12, 40, 40, "float32", 1.0)

    kv = jnp.asarray(rng.standard_normal((1, 1, 30, 40), np.float32))  # one KV head, 30 keys, head 40
    valid = jnp.arange(30)[None, None] < 20
    z = kernels.spark_z(valid, 8)

    def body(i, y):
        h = jnp.tanh(kernels.gemv_rows(y, w))  # [2, 96]
        z2 = kernels.gemv_cols(h, w)  # [2, 40]
        a = kernels.attention(y.reshape(1, 1, 1, 2, 40), *_spark_cache(kv, kv, 8), valid, z, None, rank=8, scale=0.3,
                              gate_scale=0.2, softcap=None, spark=True)[0]
        emb = kernels.take_rows(w, (jnp.arange(2) * 7 + i) % 96)
        fused = kernels.ffn_decode(y, w[:, :16], w[:, 16:], w, None, width=80, k_frac=0.25)[0]
        return (y + 0.1 * kernels.ffn_gather(z2, act_NF, w, w)[0] + 0.1 * a.reshape(2, 40) + 0.1 * emb
                + 0.1 * fused)

    step = jax.jit(lambda y: jax.lax.fori_loop(0, 5, body, y), donate_argnums=0)
    y0 = rng.standard_normal((2, 40)).astype(np.float32)
    out = np.asarray(step(jnp.asarray(y0)))
    hlo = jax.jit(lambda y: jax.lax.fori_loop(0, 5, body, y)).lower(jnp.asarray(y0)).as_text()
    assert all(k in hlo for k in kernels.NAMES)
    y = y0.astype(np.float64)
    w64 = np.asarray(w, np.float64)
    kv64 = np.asarray(kv, np.float64)
    for i in range(5):
        z2 = np.tanh(y @ w64.T) @ w64
        q = (y * np.r_[np.full(8, 0.3 * 8**0.5), np.full(32, 0.2 * 32**0.5)]).reshape(1, 1, 1, 2, 40)
        a = _attn_float64(q, kv64, kv64, np.asarray(valid), 8, 8, None, True, False)[0]
        gathered = np.einsum("nc,ncd->nd", act * np.einsum("ne,nce->nc", z2, w64[idx]), w64[idx])
        fused = _ffn_decode_float64(y, w64[:, :16], w64[:, 16:], w64, 80, 0.25)[0]
        y = y + 0.1 * gathered + 0.1 * a.reshape(2, 40) + 0.1 * w64[(np.arange(2) * 7 + i) % 96] + 0.1 * fused
    assert _rel(out, y) < 1e-5


@needs_kernels
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_take_rows_equals_indexing_and_keeps_its_gradient(dtype):
    """Any number of ids (past MAX_TOKENS too), out-of-range ids clipped to the table; the gradient
    is jnp.take's (the cotangent added into the rows, repeats summed)."""
    rng = np.random.default_rng(7)
    table, t64 = _weights(rng, (50, 33), dtype)
    ids = np.r_[rng.integers(0, 50, 40), -3, 50, 99, 7, 7].astype(np.int32)
    run = _fresh_jit(kernels.take_rows)
    assert "spark_take_rows" in run.lower(table, ids).as_text()
    np.testing.assert_array_equal(np.asarray(run(table, ids)), t64[np.clip(ids, 0, 49)])
    loss = lambda take: lambda t: jnp.sum(jnp.sin(take(t).astype(jnp.float32)))  # noqa: E731
    g = jax.grad(loss(lambda t: kernels.take_rows(t, ids)))(table)
    g_ref = jax.grad(loss(lambda t: jnp.take(t, ids, axis=0, mode="clip")))(table)
    assert g.dtype == table.dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), rtol=1e-2)


@needs_kernels
def test_decode_loop_never_casts_the_bf16_embedding_table():
    """XLA:CPU computes a bf16 gather by casting the whole table to f32 and hoists that cast out of
    the decode loop (at 2B shapes 2.4 GB written per call); the embedding lookup is the take_rows
    kernel, so no f32 [vocab, d_model] array exists in the compiled decode program."""
    cfg = ModelConfig(vocab_size=1000, d_model=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32,
                      ffn_dim=128, param_dtype="bfloat16")
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    state = gen.start(graphdef, params, jnp.ones((1, 4), jnp.int32), jnp.array([4]), jax.random.key(0),
                      max_new_tokens=4)
    hlo = gen.decode.lower(graphdef, params, state, max_steps=4, sampler=SamplerConfig(1.0), eos_id=-1,
                           pad_id=0).compile().as_text()
    assert "bf16[1000,64]" in hlo and "f32[1000,64]" not in hlo


SPARK = ModelConfig(vocab_size=97, d_model=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
                    ffn_dim=512, ffn_kind="spark", attn_kind="spark", spark_ffn_dim=512,
                    spark=SparkConfig(ffn_k_frac=0.08, attn_k=8, decode_capacity_sigmas=4.0))


@needs_kernels
def test_sparse_decode_with_kernels_equals_masked_forward():
    """Prefill, then decode one token at a time on the sparse-gather path (kernels: the FFN gather,
    the attention, every projection and the head) == the masked full forward over the whole
    sequence (no token overflows the FFN capacity here; the attention kernel has none;
    tests/test_sparse_decode.py checks an overflow on both paths)."""
    model = Transformer(SPARK, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 97)
    full = model(tokens, jnp.broadcast_to(jnp.arange(12), (2, 12)))[0]
    graphdef, params = nnx.split(model)
    step = jax.jit(lambda p, tok, pos, cache: nnx.merge(graphdef, p)(tok, pos, cache=cache, sparse=True,
                                                                      return_aux=True))
    _, cache = prefill_cache(model, tokens[:, :4], jnp.array([4, 4]), max_new_tokens=8)
    hlo = step.lower(params, tokens[:, 4:5], jnp.full((2, 1), 4), cache).as_text()
    assert "spark_ffn_decode" in hlo and "spark_attention" in hlo
    for t in range(4, 12):
        logits, cache, stats = step(params, tokens[:, t:t + 1], jnp.full((2, 1), t), cache)
        assert not np.any(np.asarray(stats["ffn_overflow"]))
        np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(full[:, t]), rtol=1e-4, atol=1e-4)


def _greedy(graphdef, params, prompts, lengths):
    run = jax.jit(functools.partial(gen.generate.__wrapped__, graphdef, max_new_tokens=24,
                                    sampler=SamplerConfig(0.0), eos_id=-1, pad_id=0))
    return np.asarray(run(params, prompts, lengths, jax.random.key(0))[0]), run


@needs_kernels
@pytest.mark.parametrize("kind", ["dense", "spark"])
def test_greedy_generation_with_kernels_equals_without(kind, monkeypatch):
    cfg = SPARK if kind == "spark" else ModelConfig(vocab_size=97, d_model=64, num_layers=2, num_heads=2,
                                                    num_kv_heads=1, head_dim=32, ffn_dim=256)
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(4)))
    prompts = jnp.asarray([[5, 9, 2, 44, 17], [11, 4, 30, 0, 0]], jnp.int32)
    lengths = jnp.asarray([5, 3], jnp.int32)
    with_kernels, run = _greedy(graphdef, params, prompts, lengths)
    hlo = run.lower(params, prompts, lengths, jax.random.key(0)).as_text()
    assert "spark_gemv_rows" in hlo and "spark_attention" in hlo
    monkeypatch.setenv("SPARK_CPU_KERNELS", "0")
    without, run = _greedy(graphdef, params, prompts, lengths)
    assert "custom_call" not in run.lower(params, prompts, lengths, jax.random.key(0)).as_text()
    np.testing.assert_array_equal(with_kernels, without)


def test_fallback_without_the_extension(monkeypatch):
    """No extension: every function is its jnp reference (no custom call in the program) and correct."""
    monkeypatch.setattr(kernels, "_STATE", {"module": None, "reason": "extension not built (test)"})
    assert not kernels.enabled() and kernels.status().startswith("jnp fallback")
    rng = np.random.default_rng(5)
    args, _, ref = _gather_case(rng, 2, 50, 10, 7, 9, "float32", 0.8)
    run = _fresh_jit(lambda *a: kernels.ffn_gather(*a)[0])
    assert "custom_call" not in run.lower(*args).as_text()
    assert _rel(run(*args), ref) < 1e-5
    w, w64 = _weights(rng, (30, 9), "bfloat16")
    x = rng.standard_normal((2, 9), np.float32)
    assert _rel(_fresh_jit(kernels.gemv_rows)(x, w), x.astype(np.float64) @ w64.T) < 1e-5
    x, (k1, p64), (k2, k64) = rng.standard_normal((3, 20), np.float32), _weights(rng, (60, 8), "float32"), \
        _weights(rng, (60, 12), "float32")
    (v, v64) = _weights(rng, (60, 20), "float32")
    run = _fresh_jit(functools.partial(kernels.ffn_decode, default=None, width=50, k_frac=0.1))
    assert "custom_call" not in run.lower(x, k1, k2, v).as_text()
    y, kept, _ = run(x, k1, k2, v)
    ref, kept64 = _ffn_decode_float64(x, p64, k64, v64, 50, 0.1)
    assert _rel(y, ref) < 1e-5
    np.testing.assert_array_equal(kept, kept64)
    q, (k, k64), (v, v64), valid = _attn_case(rng, 2, 2, 1, 2, 40, 24, "float32", False)
    kw = dict(rank=8, scale=8**-0.5, gate_scale=32**-0.5, softcap=20.0, spark=True, v_t=False)
    run = _fresh_jit(functools.partial(kernels.attention, default=None, **kw))
    args = (q, *_spark_cache(k, v, 8), jnp.asarray(valid), kernels.spark_z(jnp.asarray(valid), 4))
    assert "custom_call" not in run.lower(*args).as_text()
    assert _rel(run(*args)[0], _attn_float64(q, k64, v64, valid, 4, 8, 20.0, True, False)[0]) < 1e-5


def test_failed_compile_leaves_a_working_install(tmp_path):
    """setup.py's extension is optional: with a compiler that fails, the build succeeds, says so in
    one warning, and produces no module (spark.kernels then falls back, as tested above)."""
    env = os.environ | {"CC": "false", "CXX": "false"}
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
                        "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    warnings = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and 'extension "spark.kernels._cpu" failed' in warnings[0], r.stdout + r.stderr
    assert not list(tmp_path.rglob("_cpu*.so"))
