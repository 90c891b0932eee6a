"""Feed-forward blocks: GeGLU (optionally Gemma-3n gate sparsity) and the Spark FFN, both nested
MatFormer-style (a width m uses the first m neurons of every matrix).

Layout: every matrix is stored neuron-major, [F, ·], so a MatFormer prefix is a contiguous
leading-axis slice and the rows a sparse decode gathers are contiguous in memory.

GeGLU:     out = (gelu(x·Wgᵀ) ⊙ x·Wuᵀ) · Wd                 Wg, Wu, Wd: [F, D]
Spark FFN: out = (gelu(TopK(x[:r]·K1ᵀ)) ⊙ x[r:]·K2ᵀ) · V     K1: [F, r], K2: [F, D−r], V: [F, D]
TopK is the soft statistical top-k over the width in use, keeping spark.ffn_k_frac of it.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from spark import sparsity
from spark.layers import gelu, normal_init


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

    def __call__(self, x_BTD, width: int):
        dt = x_BTD.dtype
        gate = jnp.einsum("BTD,FD->BTF", x_BTD, self.w_gate[:width].astype(dt))
        up = jnp.einsum("BTD,FD->BTF", x_BTD, self.w_up[:width].astype(dt))
        if self.sparsity > 0.0:
            gate = sparsity.soft_topk(gate, 1.0 - self.sparsity)
        h = gelu(gate) * up
        out = jnp.einsum("BTF,FD->BTD", h, self.w_down[:width].astype(dt))
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

    def predictor(self, x_BTD, width: int):
        """Pre-activation predictor scores x[:r]·K1ᵀ over the first `width` neurons."""
        w = self.w_pred[:width].astype(x_BTD.dtype)
        return jnp.einsum("BTR,FR->BTF", x_BTD[..., : self.rank], w)

    def __call__(self, x_BTD, width: int):
        dt = x_BTD.dtype
        act = gelu(sparsity.soft_topk(self.predictor(x_BTD, width), self.k_frac,
                                      stop_gradient=self.stop_grad))
        up = jnp.einsum("BTE,FE->BTF", x_BTD[..., self.rank :], self.w_up[:width].astype(dt))
        out = jnp.einsum("BTF,FD->BTD", act * up, self.w_down[:width].astype(dt))
        return out, {"ffn_density": _density(act)}


def make_ffn(cfg, layer: int, rngs: nnx.Rngs):
    return SparkFFN(cfg, layer, rngs) if cfg.ffn_kind == "spark" else GeGLU(cfg, layer, rngs)
