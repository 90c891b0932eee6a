"""CPU decode kernels (XLA FFI, `cpu_kernels.cc`) behind pure-jnp references, dispatched per backend.

    y_NF = gemv_rows(x_ND, w_FD)                     x · wᵀ    (projections stored one row per output)
    y_ND = gemv_cols(h_NF, w_FD)                     h · w     (down / output projections)
    y_ND, dropped_N = ffn_gather(x2_NE, act_NF, k2_FE, v_FD)
                                                     Σ_{f: act ≠ 0} act·(x2 · K2[f])·V[f] (the Spark FFN decode)
    y_ND, kept_N, dropped_N = ffn_decode(x_ND, k1_FR, k2_FE, v_FD, default, width=, k_frac=)
                                                     the whole Spark FFN decode: predictor, statistical
                                                     top-k, GELU and the gather in one call
    out, kept, dropped = attention(q, keys, values, valid, z, default, ...)
                                                     decode attention over a KV cache, dense or Spark
                                                     (attention_ref: the formulas)
    x_ND = take_rows(table_VD, ids_N)                table[clip(ids)] as float32 (an embedding lookup;
                                                     any N)

w may be float32 or bfloat16 (accumulation is float32 either way; inputs are cast to float32,
outputs are float32). On CPU, for decode-sized blocks (N ≤ MAX_TOKENS), the compiled kernel runs:
it reads every weight row once (the gather reads the union of the tokens' rows), on XLA's
intra-op thread pool, with AVX-512 and AVX2 + FMA paths chosen by the CPU. Elsewhere — GPU/TPU
(`lax.platform_dependent` picks per backend, so ahead-of-time TPU lowering never sees the CPU
target), larger blocks, the extension not built, or SPARK_CPU_KERNELS=0 — the jnp reference runs.

Environment, read when a function is traced:
  SPARK_CPU_KERNELS=0            the jnp path everywhere
  SPARK_CPU_KERNELS_ISA=portable|avx2|avx512
                                 the most capable path to use (default: the best this CPU has;
                                 the tests run every path the CPU has)
and when the extension loads:
  SPARK_CPU_KERNELS_SPIN_US=100  how long a kernel's helper task stays awake, spinning, for the next
                                 call's chunks (0: it returns to XLA's pool at once); `set_spin_us`
                                 changes it at run time

The extension is built by `pip install -e .` (setup.py, an optional extension: a failed compile
leaves a working install and this module falls back to jnp; `status()` says which).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from spark import sparsity

MAX_TOKENS = 16  # the kernels' token block (cpu_kernels.cc kMaxTokens)
SPIN_US = 100  # the default helper spin (µs): 100 and 1000 measured alike on the 26-layer decodes (README, session 44)
NAMES = ("spark_gemv_rows", "spark_gemv_cols", "spark_ffn_gather", "spark_ffn_decode", "spark_attention",
         "spark_take_rows")

_STATE: dict = {}


def _load():
    """The extension module with its FFI targets registered for the CPU, or None (and why)."""
    if "module" not in _STATE:
        try:
            from spark.kernels import _cpu
        except ImportError as e:
            _STATE.update(module=None, reason=f"extension not built ({e})")
        else:
            for name, capsule in _cpu.registrations().items():
                jax.ffi.register_ffi_target(name, capsule, platform="cpu")
            _STATE.update(module=_cpu, reason="built")
            set_spin_us()
    return _STATE["module"]


def set_spin_us(us: int | None = None) -> None:
    """How long (µs) the pool task that helped a kernel call stays awake for the next call's chunks
    (0: never; None: SPARK_CPU_KERNELS_SPIN_US, else SPIN_US). Waking a sleeping pool thread costs
    ~30 µs a call on a 2-core VM, against calls of 0.1–1 ms; the spinning task holds one of XLA's
    pool threads while it waits."""
    if us is None:
        us = int(os.environ.get("SPARK_CPU_KERNELS_SPIN_US", SPIN_US))
    if us < 0:
        raise ValueError(f"spin must be ≥ 0 µs, got {us}")
    if (m := _load()) is not None:
        m.set_spin_us(int(us))


def relayed_chunks() -> int:
    """How many kernel chunks so far ran on a helper task that was awake, spinning, when called."""
    m = _load()
    return m.relayed_chunks() if m is not None else 0


def enabled() -> bool:
    """Whether CPU lowerings use the kernels (extension built and not switched off)."""
    return os.environ.get("SPARK_CPU_KERNELS", "1") != "0" and _load() is not None


ISAS = {"portable": 0, "avx2": 1, "avx512": 2}  # cpu_kernels.cc Isa: a larger one is preferred


def cpu_isa() -> str:
    """The best path this CPU runs: "avx512" (avx512f/bw/vl), "avx2" (AVX2 + FMA) or "portable"."""
    m = _load()
    level = m.cpu_isa() if m is not None else 0
    return next(name for name, v in ISAS.items() if v == level)


def isa() -> int:
    """The path the kernels run (ISAS): SPARK_CPU_KERNELS_ISA (portable, avx2, avx512; default: the
    best this CPU has), lowered to one this CPU has; the kernel checks the CPU again."""
    want = os.environ.get("SPARK_CPU_KERNELS_ISA", "") or cpu_isa()
    if want not in ISAS:
        raise ValueError(f"SPARK_CPU_KERNELS_ISA must be one of {sorted(ISAS)}, got {want!r}")
    return min(ISAS[want], ISAS[cpu_isa()])


def status() -> str:
    _load()
    if _STATE["module"] is None:
        return f"jnp fallback: {_STATE['reason']}"
    path = {0: "portable", 1: "AVX2", 2: "AVX-512"}[isa()] + (" (off: SPARK_CPU_KERNELS=0)" if not enabled() else "")
    return f"CPU kernels built, {path} path"


# ---------------------------------------------------------------- references (any backend)

def gemv_rows_ref(x_ND, w_FD):
    return jnp.einsum("ND,FD->NF", x_ND.astype(jnp.float32), w_FD, preferred_element_type=jnp.float32)


def gemv_cols_ref(h_NF, w_FD):
    return jnp.einsum("NF,FD->ND", h_NF.astype(jnp.float32), w_FD, preferred_element_type=jnp.float32)


def ffn_gather_ref(x2_NE, act_NF, k2_FE, v_FD):
    """`ffn_gather`'s formula, reading every row: Σ_f act[n, f]·(x2[n]·K2[f])·V[f], float32."""
    up = gemv_rows_ref(x2_NE, k2_FE)
    return gemv_cols_ref(act_NF.astype(jnp.float32) * up, v_FD)


def ffn_decode_ref(x_ND, k1_FR, k2_FE, v_FD, *, width: int, k_frac: float, out_dtype=jnp.float32):
    """`ffn_decode`'s formula, reading every row of K2 and V: (y, kept, dropped) as it returns."""
    r = k1_FR.shape[1]
    pred = gemv_rows_ref(x_ND[:, :r], k1_FR[:width]).astype(out_dtype)
    act = jax.nn.gelu(jax.nn.relu(pred.astype(jnp.float32) - sparsity.threshold(pred, k_frac)), approximate=True)
    y = ffn_gather_ref(x_ND[:, r:], act, k2_FE[:width], v_FD[:width]).astype(out_dtype)
    return y, jnp.sum(act > 0, axis=-1, dtype=jnp.int32), jnp.zeros((x_ND.shape[0],), jnp.int32)


def capacity_gather(x2_NE, idx_NC, act_NC, k2_FE, v_FD, dtype=jnp.float32):
    """XLA gathers of the rows idx (a static capacity of C per token), then two einsums, computed in
    `dtype` (the Spark FFN's decode off CPU, spark/ffn.py)."""
    gather = dict(mode="promise_in_bounds", indices_are_sorted=True)
    up = jnp.einsum("NE,NCE->NC", x2_NE.astype(dtype), k2_FE.at[idx_NC].get(**gather).astype(dtype),
                    preferred_element_type=dtype)
    return jnp.einsum("NC,NCD->ND", act_NC.astype(dtype) * up, v_FD.at[idx_NC].get(**gather).astype(dtype),
                      preferred_element_type=dtype)


def attention_ref(q_BTKGH, keys_BKSH, values, valid_BTS, z_BT, *, rank, scale, gate_scale, softcap, spark, v_t):
    """The attention kernel's formulas in float32: (out [B,T,K,G,H], kept [B,K,G,T] int32).

    Scores over the first `rank` dims (×scale) of the keys visible to each query (valid [B,T,S]).
    Dense (rank = H): softmax of softcap(s) over the visible keys, Σ p·v (v [B,K,H,S] when v_t).
    Spark, on the Spark cache layout (spark/cache.py): keys [B,K,S,r] (the first r dims), values
    [B,K,S,(H − r) + H] (each slot's gate half, then its value): keep s ≥ mean + std·z[b,t] (moments
    over the visible; z = −inf keeps all) or the row max; Σ softmax_kept(softcap(s)) ·
    softplus(q[r:]·k[r:]·gate_scale) · v. No capacity limit: the masked Spark attention exactly
    (spark/attention.py), with z from `spark_z`."""
    f32 = jnp.float32
    q, k, v = q_BTKGH.astype(f32), keys_BKSH.astype(f32), values.astype(f32)
    r, e = rank, q.shape[-1] - rank
    if spark:
        k, v = jnp.concatenate([k, v[..., :e]], axis=-1), v[..., e:]
    s = jnp.einsum("BTKGH,BKSH->BKGTS", q[..., :r], k[..., :r], precision="highest") * scale
    valid = jnp.broadcast_to(valid_BTS[:, None, None], s.shape)
    keep = valid
    if spark:
        mean, std = sparsity.masked_moments(s, valid)
        z = z_BT[:, None, None, :, None]
        theta = jnp.where(jnp.isneginf(z), -jnp.inf, mean + std * z)
        row_max = jnp.max(jnp.where(valid, s, -jnp.inf), axis=-1, keepdims=True)
        keep = valid & ((s >= theta) | (s >= row_max))
    logits = jnp.where(keep, s if softcap is None else softcap * jnp.tanh(s / softcap), -jnp.inf)
    top = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.where(keep, jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    p = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(f32).tiny)
    if spark:
        g = jnp.einsum("BTKGE,BKSE->BKGTS", q[..., r:], k[..., r:], precision="highest") * gate_scale
        p = p * jnp.where(keep, jax.nn.softplus(g), 0.0)
    out = jnp.einsum("BKGTS,BKHS->BTKGH" if v_t else "BKGTS,BKSH->BTKGH", p, v, precision="highest")
    return out, jnp.sum(keep, axis=-1, dtype=jnp.int32)


def spark_z(valid_BTS, k: int):
    """Φ⁻¹(1 − k/n) per query for n visible keys, −inf where n ≤ k (keep all): the z of `attention`."""
    n = jnp.sum(valid_BTS, axis=-1).astype(jnp.float32)
    return sparsity.threshold_from_moments(0.0, 1.0, sparsity.attn_k_frac(n, k))


# ---------------------------------------------------------------- dispatch

def _ffi(name, out_shape, *args):
    return jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method="sequential")(
        *args, isa=np.int32(isa()))


def _dispatch(kernel, default, n_tokens: int, args, any_n: bool = False):
    """`kernel` when lowering for CPU (lax.platform_dependent), `default` on other backends and
    wherever the kernel cannot run (more than MAX_TOKENS unless `any_n`, not built, switched off)."""
    if n_tokens < 1 or (n_tokens > MAX_TOKENS and not any_n) or not enabled():
        return default(*args)

    @jax.custom_vjp  # the kernels have no derivative: gradients are the default path's
    def f(*a):
        return jax.lax.platform_dependent(*a, cpu=kernel, default=default)

    f.defvjp(lambda *a: (f(*a), a), lambda a, g: jax.vjp(default, *a)[1](g))
    return f(*args)


def gemv_rows(x_ND, w_FD, out_dtype=jnp.float32, default=None):
    """x · wᵀ -> [N, F] in out_dtype; `default(x_ND, w_FD)` (same result type) off CPU."""
    default = default or (lambda x, w: gemv_rows_ref(x, w).astype(out_dtype))
    out = (x_ND.shape[0], w_FD.shape[0])
    kernel = lambda x, w: _ffi("spark_gemv_rows", out, x.astype(jnp.float32), w).astype(out_dtype)  # noqa: E731
    return _dispatch(kernel, default, x_ND.shape[0], (x_ND, w_FD))


def gemv_cols(h_NF, w_FD, out_dtype=jnp.float32, default=None):
    """h · w -> [N, D] in out_dtype; `default(h_NF, w_FD)` off CPU."""
    default = default or (lambda h, w: gemv_cols_ref(h, w).astype(out_dtype))
    out = (h_NF.shape[0], w_FD.shape[1])
    kernel = lambda h, w: _ffi("spark_gemv_cols", out, h.astype(jnp.float32), w).astype(out_dtype)  # noqa: E731
    return _dispatch(kernel, default, h_NF.shape[0], (h_NF, w_FD))


def ffn_gather(x2_NE, act_NF, k2_FE, v_FD, out_dtype=jnp.float32, default=None):
    """Σ_f act[n, f] · (x2[n] · k2[f]) · v[f] -> (y [N, D] in out_dtype, dropped [N] int32): the
    kernel reads the rows of K2 and V some token's act is nonzero for, each once, and drops nothing;
    `default(x2, act, k2, v)` returns the same off CPU (None: `ffn_gather_ref`, every row). k2 and
    v share a dtype."""
    n = x2_NE.shape[0]

    def reference(x2, act, k2, v):
        return ffn_gather_ref(x2, act, k2, v).astype(out_dtype), jnp.zeros((n,), jnp.int32)

    def kernel(x2, act, k2, v):
        y = _ffi("spark_ffn_gather", (n, v_FD.shape[1]), x2.astype(jnp.float32), act.astype(jnp.float32), k2, v)
        return y.astype(out_dtype), jnp.zeros((n,), jnp.int32)
    return _dispatch(kernel, default or reference, n, (x2_NE, act_NF, k2_FE, v_FD))


def ffn_decode(x_ND, k1_FR, k2_FE, v_FD, default, *, width: int, k_frac: float, out_dtype=jnp.float32):
    """The Spark FFN of a decode step (spark/ffn.py SparkFFN.sparse_decode) -> (y [N, D] in out_dtype,
    kept [N] int32: the active neurons, dropped [N] int32). With r = k1's width and pred = x[:, :r] ·
    K1[:width]ᵀ (in out_dtype), θ = mean + std·Φ⁻¹(1 − k_frac) per token (sparsity.threshold),
    act = gelu(relu(pred − θ)): y = Σ_{f < width} act·(x[:, r:] · K2[f])·V[f]. On CPU one kernel call
    does it all, reading K1[:width] and the active rows of K2 and V; `default(x, k1, k2, v)` returns
    the same elsewhere (None: `ffn_decode_ref`, every row). K1, K2 and V share a dtype."""
    n, r = x_ND.shape[0], k1_FR.shape[1]
    default = default or (lambda *a: ffn_decode_ref(*a, width=width, k_frac=k_frac, out_dtype=out_dtype))
    with jax.ensure_compile_time_eval():  # the jnp path's float32 Φ⁻¹, as a constant
        z = float(sparsity.threshold_from_moments(0.0, 1.0, k_frac))

    def kernel(x, k1, k2, v):
        shapes = (jax.ShapeDtypeStruct((n, v_FD.shape[1]), jnp.float32), jax.ShapeDtypeStruct((n,), jnp.int32))
        y, kept = jax.ffi.ffi_call("spark_ffn_decode", shapes, vmap_method="sequential")(
            x.astype(jnp.float32), k1, k2, v, isa=np.int32(isa()), width=np.int32(width), z=np.float32(z),
            round=np.int32(jnp.dtype(out_dtype) == jnp.bfloat16))
        return y.astype(out_dtype), kept, jnp.zeros((n,), jnp.int32)
    if (not k1_FR.dtype == k2_FE.dtype == v_FD.dtype or k2_FE.dtype not in (jnp.float32, jnp.bfloat16)
            or k2_FE.shape[1] + r != x_ND.shape[1]):
        return default(x_ND, k1_FR, k2_FE, v_FD)
    return _dispatch(kernel, default, n, (x_ND, k1_FR, k2_FE, v_FD))


def take_rows(table_VD, ids_N):
    """table[clip(ids)] -> [N, D] float32. On CPU the kernel copies only those rows: XLA:CPU gathers
    from a bf16 table by casting all of it to float32 first, and hoists that cast out of a decode
    loop (2.4 GB written per call for the 2B embedding)."""
    n, d = ids_N.shape[0], table_VD.shape[1]

    def default(t, ids):
        return jnp.take(t, ids, axis=0, mode="clip").astype(jnp.float32)

    def kernel(t, ids):
        return jax.ffi.ffi_call("spark_take_rows", jax.ShapeDtypeStruct((n, d), jnp.float32))(t, ids)
    args = (table_VD, ids_N.astype(jnp.int32))
    if table_VD.dtype not in (jnp.float32, jnp.bfloat16):
        return default(*args)
    return _dispatch(kernel, default, n, args, any_n=True)


def attention(q_BTKGH, keys_BKSH, values, valid_BTS, z_BT, default, *, rank, scale, gate_scale=1.0, softcap=None,
              spark=False, v_t=False):
    """Decode attention over a KV cache (formulas: `attention_ref`) -> (out [B,T,K,G,H] in q's dtype,
    kept [B,K,G,T] int32, dropped [B] int32). `default(q, keys, values, valid, z)` returns the same
    off CPU (None: `attention_ref`); the kernel (CPU, G·T ≤ MAX_TOKENS, f32 or bf16 cache) drops nothing. It reads each
    visible key's first `rank` dims once, and — Spark — the gate half and value of the keys some
    query keeps. Dense: keys and values [B,K,S,H], values [B,K,H,S] when v_t; Spark: the Spark
    cache's keys [B,K,S,r] and [gate half | value] rows [B,K,S,(H − r) + H]."""
    b, t, kh, g, h = q_BTKGH.shape
    kw = dict(rank=rank, scale=scale, gate_scale=gate_scale, softcap=softcap, spark=spark, v_t=v_t)

    def reference(q, k, v, valid, z):
        out, kept = attention_ref(q, k, v, valid, z, **kw)
        return out.astype(q.dtype), kept, jnp.zeros((b,), jnp.int32)
    default = default or reference
    if keys_BKSH.dtype not in (jnp.float32, jnp.bfloat16) or values.dtype != keys_BKSH.dtype:
        return default(q_BTKGH, keys_BKSH, values, valid_BTS, z_BT)

    def kernel(q, k, v, valid, z):
        qs = jnp.concatenate([q[..., :rank] * scale, q[..., rank:] * gate_scale], axis=-1).astype(jnp.float32)
        qm = qs.transpose(0, 2, 3, 1, 4).reshape(b * kh, g * t, h)  # n = g·T + t
        m, n = b * kh, g * t
        shapes = (jax.ShapeDtypeStruct((m, n, h), jnp.float32), jax.ShapeDtypeStruct((m, n), jnp.int32))
        out, kept = jax.ffi.ffi_call("spark_attention", shapes, vmap_method="sequential")(
            qm, k, v, valid, z.astype(jnp.float32),  # k, v as cached, [B, K, ...]: a reshape cost a cache copy
            isa=np.int32(isa()), mode=np.int32(int(spark) | 2 * int(v_t)), rank=np.int32(rank),
            softcap=np.float32(softcap or 0.0))
        out = out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).astype(q.dtype)
        return out, kept.reshape(b, kh, g, t), jnp.zeros((b,), jnp.int32)
    return _dispatch(kernel, default, g * t, (q_BTKGH, keys_BKSH, values, valid_BTS, z_BT))
