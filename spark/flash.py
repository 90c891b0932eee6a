"""Blocked (flash-style) attention for training: online softmax over key blocks, never [T, S] scores.

    out_BTKGH, kept_BKGT = attend(spec, q_BTKGH, k_BKSH, v_BKSH, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS)

The same function as spark/attention.py's materialised paths (tests/test_flash.py compares them,
values and gradients), in one form for both kinds: per query t,
    out_t = Σ_s softmax_s(c_ts over kept s) · g_ts · v_s
dense: c = softcap(q·k / √scalar), g = 1, kept = visible (causal, window, segment);
Spark: c = softcap(s1), g = softplus(s2), kept = visible & s1 ≥ θ_t, with s1, s2 the predictor and
value-gate scores and θ_t the statistical top-k threshold of the visible raw s1 (or −inf when ≤ k
keys are visible), lowered to the row maximum so it is always kept.

Spark needs θ before the softmax, so it runs two extra passes over the key blocks first, on the
predictor's r dims only and without gradient (selection is not differentiated, as in the
materialised path): pass 1 counts, sums and takes the max of the visible s1; pass 2 sums their
squared deviations from the mean (the two-pass variance of `sparsity.masked_moments`).

The output pass is a `lax.scan` over key blocks carrying the running max m, normaliser l and
accumulator [B, K, G, T, H] in float32. Its backward is a custom VJP that recomputes each block's
scores from q, k, v and the saved log-sum-exp (FlashAttention-2's backward), so the residuals are
q, k, v, out and lse: memory is O(T·block) per step, not O(T·S), in the forward and the backward.
Queries are not blocked (a [B, K, G, T, block] float32 score block is the largest temporary).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from spark import sparsity
from spark.layers import NEG, softcap, visible_mask


@dataclasses.dataclass(frozen=True)
class Spec:
    """Static settings. rank None = dense (scale on q·k); rank r = Spark (scale on the first r dims'
    scores, gate_scale on the rest's); k = Spark's keys per query; block = keys per block."""
    window: int | None
    cap: float | None
    scale: float
    block: int
    rank: int | None = None
    gate_scale: float = 1.0
    k: int = 0


def _blocks(spec: Spec, k_BKSH, v_BKSH, k_pos_BS, k_seg_BS):
    """Keys, values, positions, segments split into [n, ...] blocks; padding keys get position −1
    (never visible) and zero values."""
    s = k_BKSH.shape[2]
    pad = -s % spec.block
    if pad:
        k_BKSH = jnp.pad(k_BKSH, ((0, 0), (0, 0), (0, pad), (0, 0)))
        v_BKSH = jnp.pad(v_BKSH, ((0, 0), (0, 0), (0, pad), (0, 0)))
        k_pos_BS = jnp.pad(k_pos_BS, ((0, 0), (0, pad)), constant_values=-1)
        k_seg_BS = None if k_seg_BS is None else jnp.pad(k_seg_BS, ((0, 0), (0, pad)))
    n = (s + pad) // spec.block
    kv = lambda x: jnp.moveaxis(x.reshape(*x.shape[:2], n, spec.block, x.shape[-1]), 2, 0)  # noqa: E731
    pos = lambda x: None if x is None else jnp.moveaxis(x.reshape(x.shape[0], n, spec.block), 1, 0)  # noqa: E731
    return kv(k_BKSH), kv(v_BKSH), pos(k_pos_BS), pos(k_seg_BS)


def _scores(q_BKGTH, k_BKbH, scale):
    return jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKbH, preferred_element_type=jnp.float32) * scale


def _terms(spec: Spec, q, k_j, vis, thr):
    """One key block: logits c (NEG where not kept), gate g (None for dense), kept mask, raw scores."""
    if spec.rank is None:
        s1, s2, keep = _scores(q, k_j, spec.scale), None, vis
        g = None
    else:
        r = spec.rank
        s1 = _scores(q[..., :r], k_j[..., :r], spec.scale)
        s2 = _scores(q[..., r:], k_j[..., r:], spec.gate_scale)
        keep = vis & (s1 >= thr[..., None])
        g = jnp.where(keep, jax.nn.softplus(s2), 0.0)
    return jnp.where(keep, softcap(s1, spec.cap), NEG), g, keep, s1, s2


def _vis(spec: Spec, q_pos, q_seg, kp, ks):
    return visible_mask(q_pos, kp, spec.window, q_seg, ks)[:, None, None]  # [B, 1, 1, T, block]


def spark_threshold(spec: Spec, q_BKGTH, blocks, q_pos, q_seg):
    """θ_t [B, K, G, T] of Spark attention from two passes over the key blocks (no gradient)."""
    q = jax.lax.stop_gradient(q_BKGTH[..., :spec.rank])
    k_blocks, _, kp_blocks, ks_blocks = blocks
    k_blocks = jax.lax.stop_gradient(k_blocks[..., :spec.rank])
    lead = q.shape[:-1]

    def s1_vis(k_j, kp, ks):
        return _scores(q, k_j, spec.scale), jnp.broadcast_to(_vis(spec, q_pos, q_seg, kp, ks), (*lead, k_j.shape[2]))

    def moments(carry, xs):
        n, total, top = carry
        s1, vis = s1_vis(*xs)
        return (n + jnp.sum(vis, -1, dtype=jnp.float32), total + jnp.sum(jnp.where(vis, s1, 0.0), -1),
                jnp.maximum(top, jnp.max(jnp.where(vis, s1, -jnp.inf), -1))), None

    zero = jnp.zeros(lead, jnp.float32)
    xs = (k_blocks, kp_blocks, ks_blocks)
    (n, total, top), _ = jax.lax.scan(moments, (zero, zero, jnp.full(lead, -jnp.inf)), xs)
    mean = total / jnp.maximum(n, 1.0)

    def deviations(ssd, xs):
        s1, vis = s1_vis(*xs)
        return ssd + jnp.sum(jnp.where(vis, jnp.square(s1 - mean[..., None]), 0.0), -1), None

    ssd, _ = jax.lax.scan(deviations, zero, xs)
    std = jnp.sqrt(ssd / jnp.maximum(n, 1.0))
    theta = sparsity.threshold_from_moments(mean, std, sparsity.attn_k_frac(n, spec.k))
    return jnp.minimum(theta, top)


def _forward(spec: Spec, q, blocks, q_pos, q_seg, thr):
    """-> out [B, K, G, T, H] float32, lse [B, K, G, T], kept count [B, K, G, T]."""
    lead = q.shape[:-1]
    hv = blocks[1].shape[-1]

    def body(carry, xs):
        m, l, acc, kept = carry
        k_j, v_j, kp, ks = xs
        c, g, keep, _, _ = _terms(spec, q, k_j, _vis(spec, q_pos, q_seg, kp, ks), thr)
        m_new = jnp.maximum(m, jnp.max(c, -1))
        alpha = jnp.exp(m - m_new)
        e = jnp.exp(c - m_new[..., None])
        w = e if g is None else e * g
        acc = acc * alpha[..., None] + jnp.einsum("BKGTS,BKSH->BKGTH", w.astype(v_j.dtype), v_j,
                                                  preferred_element_type=jnp.float32)
        kept = kept + jnp.sum(jnp.broadcast_to(keep, c.shape), -1, dtype=jnp.int32)
        return (m_new, l * alpha + jnp.sum(e, -1), acc, kept), None

    init = (jnp.full(lead, NEG, jnp.float32), jnp.zeros(lead, jnp.float32),
            jnp.zeros((*lead, hv), jnp.float32), jnp.zeros(lead, jnp.int32))
    (m, l, acc, kept), _ = jax.lax.scan(body, init, blocks)
    return acc / l[..., None], m + jnp.log(l), kept


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(spec: Spec, q, blocks, q_pos, q_seg, thr):
    out, _, kept = _forward(spec, q, blocks, q_pos, q_seg, thr)
    return out, kept


def _attend_fwd(spec, q, blocks, q_pos, q_seg, thr):
    out, lse, kept = _forward(spec, q, blocks, q_pos, q_seg, thr)
    return (out, kept), (q, blocks, q_pos, q_seg, thr, out, lse)


def _attend_bwd(spec, res, cts):
    q, blocks, q_pos, q_seg, thr, out, lse = res
    d_out = cts[0].astype(jnp.float32)
    delta = jnp.sum(d_out * out, -1)  # Σ_s p·g·(do·v_s) = do·out: the softmax backward's row term
    r = spec.rank

    def body(dq, xs):
        k_j, v_j, kp, ks = xs
        c, g, keep, s1, s2 = _terms(spec, q, k_j, _vis(spec, q_pos, q_seg, kp, ks), thr)
        p = jnp.exp(c - lse[..., None])
        w = p if g is None else p * g
        dv = jnp.einsum("BKGTS,BKGTH->BKSH", w, d_out)
        dw = jnp.einsum("BKGTH,BKSH->BKGTS", d_out, v_j.astype(jnp.float32))
        dc = p * ((dw if g is None else dw * g) - delta[..., None])
        ds1 = jnp.where(keep, dc if spec.cap is None else dc * (1.0 - jnp.square(jnp.tanh(s1 / spec.cap))), 0.0)
        k32, q32 = k_j.astype(jnp.float32), q.astype(jnp.float32)
        if r is None:
            dq_j = jnp.einsum("BKGTS,BKSH->BKGTH", ds1, k32) * spec.scale
            dk = jnp.einsum("BKGTS,BKGTH->BKSH", ds1, q32) * spec.scale
        else:
            ds2 = jnp.where(keep, dw * p * jax.nn.sigmoid(s2), 0.0)
            dq_j = jnp.concatenate([jnp.einsum("BKGTS,BKSH->BKGTH", ds1, k32[..., :r]) * spec.scale,
                                    jnp.einsum("BKGTS,BKSH->BKGTH", ds2, k32[..., r:]) * spec.gate_scale], -1)
            dk = jnp.concatenate([jnp.einsum("BKGTS,BKGTH->BKSH", ds1, q32[..., :r]) * spec.scale,
                                  jnp.einsum("BKGTS,BKGTH->BKSH", ds2, q32[..., r:]) * spec.gate_scale], -1)
        return dq + dq_j, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), blocks)
    k_blocks, v_blocks = blocks[0], blocks[1]
    d_blocks = (dk.astype(k_blocks.dtype), dv.astype(v_blocks.dtype), None, None)
    return dq.astype(q.dtype), d_blocks, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def attend(spec: Spec, q_BTKGH, k_BKSH, v_BKSH, q_pos_BT, k_pos_BS, q_seg_BT=None, k_seg_BS=None):
    """Blocked attention: (out [B, T, K, G, H] in q's dtype, kept keys per query [B, K, G, T])."""
    blocks = _blocks(spec, k_BKSH, v_BKSH, k_pos_BS, k_seg_BS)
    q = jnp.einsum("BTKGH->BKGTH", q_BTKGH)
    thr = spark_threshold(spec, q, blocks, q_pos_BT, q_seg_BT) if spec.rank is not None else None
    out, kept = _attend(spec, q, blocks, q_pos_BT, q_seg_BT, thr)
    return jnp.einsum("BKGTH->BTKGH", out).astype(q_BTKGH.dtype), kept
