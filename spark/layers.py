"""Small building blocks shared by attention, FFN and the model: RMSNorm, RoPE, softcap, GELU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from spark import kernels


class RMSNorm(nnx.Module):
    """Gemma RMSNorm: x · rsqrt(mean(x²) + eps) · (1 + w), computed in float32, w initialised to 0."""

    def __init__(self, dim: int, eps: float, param_dtype):
        self.scale = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def softcap(x, cap: float | None):
    """cap · tanh(x / cap); identity when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def gelu(x):
    """GELU with the tanh approximation (Gemma's `gelu_pytorch_tanh`)."""
    return jax.nn.gelu(x, approximate=True)


def apply_rope(x_BTNH, positions_BT, theta: float):
    """Rotary embedding in the half-split layout (dims i and i + H/2 rotate together), as in
    Gemma/HF. Computed in float32, returned in x's dtype."""
    h = x_BTNH.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    angle_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.cos(angle_BTh)[:, :, None, :]
    sin = jnp.sin(angle_BTh)[:, :, None, :]
    xf = x_BTNH.astype(jnp.float32)
    x1, x2 = xf[..., : h // 2], xf[..., h // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


def normal_init(rngs: nnx.Rngs, shape, fan_in: int, dtype):
    """Truncation-free normal with std 1/sqrt(fan_in)."""
    return jax.random.normal(rngs.params(), shape, dtype) * (fan_in**-0.5)


DECODE_TOKENS = 16  # blocks of at most this many tokens use the row-major product below


def rows_matmul(x_BTD, w_FD, out_dtype=None):
    """x · wᵀ -> [B, T, F] for a weight stored one row per output (FFN neurons, vocabulary).

    For decode-sized blocks (≤ DECODE_TOKENS tokens: a decode step, a speculative verify) the
    product is formed output-major, [F, B·T], and transposed after a barrier: otherwise XLA:CPU
    fuses the transpose into the dot and picks a kernel 1.4-2.2× slower for 2-7 tokens
    (`python bench/decode_layouts.py`, head/* and rows/*). Larger blocks (training, prefill) use the
    plain token-major einsum."""
    b, t, d = x_BTD.shape
    if b * t > DECODE_TOKENS:
        return jnp.einsum("BTD,FD->BTF", x_BTD, w_FD, preferred_element_type=out_dtype)
    y_FN = jnp.einsum("FD,ND->FN", w_FD, x_BTD.reshape(b * t, d), preferred_element_type=out_dtype)
    return jax.lax.optimization_barrier(y_FN).T.reshape(b, t, -1)


def linear_rows(x_BTD, w_FD, out_dtype=None):
    """x · wᵀ -> [B, T, F] in out_dtype (default x's) for w stored one row per output, passed in its
    stored dtype: on CPU a decode-sized block runs `kernels.gemv_rows`, which reads bf16 weights as
    they are (float32 accumulation); other backends and blocks cast w to x's dtype (rows_matmul)."""
    b, t, d = x_BTD.shape
    od = out_dtype or x_BTD.dtype

    def default(x_ND, w):
        return rows_matmul(x_ND.reshape(b, t, d), w.astype(x_ND.dtype), out_dtype).reshape(b * t, -1).astype(od)
    return kernels.gemv_rows(x_BTD.reshape(b * t, d), w_FD, od, default).reshape(b, t, -1)


def linear_cols(h_BTF, w_FD, out_dtype=None):
    """h · w -> [B, T, D] for w stored one row per input (down and output projections), in its stored
    dtype: `kernels.gemv_cols` on CPU for decode-sized blocks, else an einsum in h's dtype."""
    b, t, f = h_BTF.shape
    od = out_dtype or h_BTF.dtype

    def default(h_NF, w):
        return jnp.einsum("NF,FD->ND", h_NF, w.astype(h_NF.dtype), preferred_element_type=out_dtype).astype(od)
    return kernels.gemv_cols(h_BTF.reshape(b * t, f), w_FD, od, default).reshape(b, t, -1)


NEG = -1e30  # finite "minus infinity": an all-masked row gives uniform weights, never NaN


def visible_mask(q_pos_BT, k_pos_BS, window: int | None, q_seg_BT=None, k_seg_BS=None):
    """[B, T, S] True where key s is visible to query t: causal, inside the window, same segment."""
    q = q_pos_BT[:, :, None]
    k = k_pos_BS[:, None, :]
    valid = (k <= q) & (k >= 0)
    if window is not None:
        valid &= (q - k) < window
    if q_seg_BT is not None:
        valid &= q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
    return valid
