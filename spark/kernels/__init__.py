"""CPU decode kernels (XLA FFI, `cpu_kernels.cc`) behind pure-jnp references, dispatched per backend.

    y_NF = gemv_rows(x_ND, w_FD)                     x · wᵀ    (projections stored one row per output)
    y_ND = gemv_cols(h_NF, w_FD)                     h · w     (down / output projections)
    y_ND = ffn_gather(x2_NE, idx_NC, act_NC, k2_FE, v_FD)
                                                     Σ_c act·(x2 · K2[idx])·V[idx] (the Spark FFN decode)

w may be float32 or bfloat16 (accumulation is float32 either way; inputs are cast to float32,
outputs are float32). On CPU, for decode-sized blocks (N ≤ MAX_TOKENS), the compiled kernel runs:
it reads every weight row once (the gather reads the union of the tokens' rows), on XLA's
intra-op thread pool, with an AVX-512 path where the CPU has it. Elsewhere — GPU/TPU
(`lax.platform_dependent` picks per backend, so ahead-of-time TPU lowering never sees the CPU
target), larger blocks, the extension not built, or SPARK_CPU_KERNELS=0 — the jnp reference runs.

Environment, read when a function is traced:
  SPARK_CPU_KERNELS=0            the jnp path everywhere
  SPARK_CPU_KERNELS_PORTABLE=1   the portable C++ path even on an AVX-512 CPU (the tests run both)

The extension is built by `pip install -e .` (setup.py, an optional extension: a failed compile
leaves a working install and this module falls back to jnp; `status()` says which).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

MAX_TOKENS = 16  # the kernels' token block (cpu_kernels.cc kMaxTokens)
NAMES = ("spark_gemv_rows", "spark_gemv_cols", "spark_ffn_gather")

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
    return _STATE["module"]


def enabled() -> bool:
    """Whether CPU lowerings use the kernels (extension built and not switched off)."""
    return os.environ.get("SPARK_CPU_KERNELS", "1") != "0" and _load() is not None


def isa() -> int:
    """1: the AVX-512 path (when the CPU has it; the kernel checks again), 0: portable C++."""
    m = _load()
    portable = os.environ.get("SPARK_CPU_KERNELS_PORTABLE", "0") == "1"
    return int(m is not None and not portable and m.has_avx512())


def status() -> str:
    _load()
    if _STATE["module"] is None:
        return f"jnp fallback: {_STATE['reason']}"
    path = ("AVX-512" if isa() else "portable") + (" (off: SPARK_CPU_KERNELS=0)" if not enabled() else "")
    return f"CPU kernels built, {path} path"


# ---------------------------------------------------------------- references (any backend)

def gemv_rows_ref(x_ND, w_FD):
    return jnp.einsum("ND,FD->NF", x_ND.astype(jnp.float32), w_FD, preferred_element_type=jnp.float32)


def gemv_cols_ref(h_NF, w_FD):
    return jnp.einsum("NF,FD->ND", h_NF.astype(jnp.float32), w_FD, preferred_element_type=jnp.float32)


def ffn_gather_ref(x2_NE, idx_NC, act_NC, k2_FE, v_FD, dtype=jnp.float32):
    """XLA gathers of the rows, then two einsums, computed in `dtype` (the model's path off CPU)."""
    gather = dict(mode="promise_in_bounds", indices_are_sorted=True)
    up = jnp.einsum("NE,NCE->NC", x2_NE.astype(dtype), k2_FE.at[idx_NC].get(**gather).astype(dtype),
                    preferred_element_type=dtype)
    return jnp.einsum("NC,NCD->ND", act_NC.astype(dtype) * up, v_FD.at[idx_NC].get(**gather).astype(dtype),
                      preferred_element_type=dtype)


# ---------------------------------------------------------------- dispatch

def _ffi(name, out_shape, *args):
    return jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method="sequential")(
        *args, isa=np.int32(isa()))


def _dispatch(kernel, default, n_tokens: int, args):
    """`kernel` when lowering for CPU (lax.platform_dependent), `default` on other backends and
    wherever the kernel cannot run (too many tokens, not built, switched off)."""
    if not 0 < n_tokens <= MAX_TOKENS or not enabled():
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


def ffn_gather(x2_NE, idx_NC, act_NC, k2_FE, v_FD, out_dtype=jnp.float32, default=None):
    """Σ_c act[n, c] · (x2[n] · k2[idx[n, c]]) · v[idx[n, c]] -> [N, D] in out_dtype. Slots with
    act = 0 read nothing (capacity left empty); every idx must be in [0, F); k2 and v share a dtype."""
    default = default or (lambda *a: ffn_gather_ref(*a).astype(out_dtype))
    out = (x2_NE.shape[0], v_FD.shape[1])

    def kernel(x2, idx, act, k2, v):
        return _ffi("spark_ffn_gather", out, x2.astype(jnp.float32), idx.astype(jnp.int32), act.astype(jnp.float32),
                    k2, v).astype(out_dtype)
    return _dispatch(kernel, default, x2_NE.shape[0], (x2_NE, idx_NC, act_NC, k2_FE, v_FD))
