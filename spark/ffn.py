"""Feed-forward blocks: GeGLU (optionally Gemma-3n gate sparsity) and the Spark FFN, both nested
MatFormer-style (a width m uses the first m neurons of every matrix).

Layout: every matrix is stored neuron-major, [F, ·], so a MatFormer prefix is a contiguous
leading-axis slice and the rows a sparse decode gathers are contiguous in memory.

GeGLU:     out = (gelu(x·Wgᵀ) ⊙ x·Wuᵀ) · Wd                 Wg, Wu, Wd: [F, D]
Spark FFN: out = (gelu(TopK(x[:r]·K1ᵀ)) ⊙ x[r:]·K2ᵀ) · V     K1: [F, r], K2: [F, D−r], V: [F, D]
TopK is the soft statistical top-k over the width in use, keeping spark.ffn_k_frac of it.

Sparse-gather decoding (`sparse=True`, for decode steps of a few tokens): the predictor runs
densely, the threshold picks the active neurons, and only their rows of K2 and V are read — on
CPU in one kernel call (spark/kernels ffn_decode: every active row, the union over the block's
tokens); elsewhere a static buffer of ceil(k + c·√k) rows per token, c = spark.decode_capacity_sigmas
(sparsity.capacity_indices: ascending indices, overflow keeps the top by activation — the
predictor's order — and is counted in aux['ffn_overflow']).
Neuron-major rows make every gathered row contiguous. K2 and V are two matrices: XLA's gathers (the
path off CPU) read them 11.5× faster than one fused [F, 2D−r] matrix whose rows must be split again
(`python bench/decode_layouts.py`); the CPU kernel would read the fused rows 1.03× faster (README,
session 43), not worth a change of the parameters and checkpoints so far.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from spark import kernels, sparsity
from spark.layers import gelu, linear_cols, linear_rows, normal_init


def _density(h_BTF):
    return jnp.mean((h_BTF != 0).astype(jnp.float32))


class GeGLU(nnx.Module):
    def __init__(self, cfg, layer: int, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.ffn_width(layer)
        pd = jnp.dtype(cfg.param_dtype)
        self.w_gate = nnx.Param(normal_init(rngs, (f, d), d, pd))
        self.w_up = nnx.Param(normal_init(rngs, (f, d), d, pd))
        self.w_down = nnx.Param(normal_init(rngs, (f, d), f, pd))
        self.sparsity = 0.0 if cfg.gate_sparsity is None else float(cfg.gate_sparsity[layer])

    def __call__(self, x_BTD, width: int, sparse: bool = False):
        del sparse  # GeGLU has no sparse-gather path; gate sparsity stays a mask
        gate = linear_rows(x_BTD, self.w_gate[:width])
        up = linear_rows(x_BTD, self.w_up[:width])
        if self.sparsity > 0.0:
            gate = sparsity.soft_topk(gate, 1.0 - self.sparsity)
        h = gelu(gate) * up
        out = linear_cols(h, self.w_down[:width])
        aux = {"ffn_density": _density(gate > 0) if self.sparsity > 0.0 else jnp.float32(1.0)}
        return out, aux


class SparkFFN(nnx.Module):
    def __init__(self, cfg, layer: int, rngs: nnx.Rngs):
        d, f, r = cfg.d_model, cfg.ffn_width(layer), cfg.ffn_rank
        pd = jnp.dtype(cfg.param_dtype)
        self.w_pred = nnx.Param(normal_init(rngs, (f, r), r, pd))
        self.w_up = nnx.Param(normal_init(rngs, (f, d - r), d - r, pd))
        self.w_down = nnx.Param(normal_init(rngs, (f, d), f, pd))
        self.rank = r
        self.k_frac = cfg.spark.ffn_k_frac
        self.stop_grad = cfg.spark.stop_grad_threshold
        self.capacity_sigmas = cfg.spark.decode_capacity_sigmas

    def predictor(self, x_BTD, width: int):
        """Pre-activation predictor scores x[:r]·K1ᵀ over the first `width` neurons."""
        return linear_rows(x_BTD[..., : self.rank], self.w_pred[:width])

    def __call__(self, x_BTD, width: int, sparse: bool = False):
        if sparse:
            return self.sparse_decode(x_BTD, width)
        act = gelu(sparsity.soft_topk(self.predictor(x_BTD, width), self.k_frac,
                                      stop_gradient=self.stop_grad))
        up = linear_rows(x_BTD[..., self.rank :], self.w_up[:width])
        out = linear_cols(act * up, self.w_down[:width])
        kept = jnp.sum(act > 0, axis=-1)  # gelu(relu(x − θ)) > 0 exactly where x > θ, as sparse_decode keeps
        rate = sparsity.overflow_rate(kept, self.k_frac * width, self.capacity_sigmas)
        return out, {"ffn_density": jnp.mean(kept.astype(jnp.float32)) / width, "ffn_overflow_rate": rate}

    def sparse_decode(self, x_BTD, width: int):
        """Same function as __call__ (forward only), reading only the active rows of K2 and V: on CPU
        one kernel call (kernels.ffn_decode: predictor, threshold, GELU, every active row), elsewhere
        the predictor, then a static capacity of rows per token."""
        dt = x_BTD.dtype
        b, t, d = x_BTD.shape
        f_all = self.w_up.shape[0]
        cap = sparsity.capacity(self.k_frac * width, width, self.capacity_sigmas)

        def capacity_path(x, k1, k2, v):  # ascending indices; overflow keeps the top by activation
            pred = linear_rows(x[None, :, : self.rank], k1[:width])[0]
            act = gelu(jax.nn.relu(pred.astype(jnp.float32) - sparsity.threshold(pred, self.k_frac)))  # 0: inactive
            act = jnp.pad(act, ((0, 0), (0, f_all - width)))  # full matrices: no slice copy
            idx, ok, dropped = sparsity.capacity_indices(act, act > 0, cap)
            a = jnp.where(ok, jnp.take_along_axis(act, idx, axis=-1), 0.0)
            out = kernels.capacity_gather(x[:, self.rank :], idx, a, k2, v, dt).astype(dt)
            return out, jnp.sum(act > 0, axis=-1), dropped

        out, kept, dropped = kernels.ffn_decode(x_BTD.reshape(b * t, d), self.w_pred[...], self.w_up[...],
                                                self.w_down[...], capacity_path, width=width, k_frac=self.k_frac,
                                                out_dtype=dt)
        active = kept - dropped
        return out.reshape(b, t, -1), {"ffn_density": jnp.mean(active.astype(jnp.float32)) / width,
                                       "ffn_overflow": jnp.sum(dropped.reshape(b, t), axis=1)}


def make_ffn(cfg, layer: int, rngs: nnx.Rngs):
    return SparkFFN(cfg, layer, rngs) if cfg.ffn_kind == "spark" else GeGLU(cfg, layer, rngs)
