"""Grouped-query attention (Gemma-2: local/global layers, logit softcap) and Spark attention.

Both read and write the KV cache of spark/cache.py the same way: the block's K/V are written at
its per-row positions, then every query attends over the slots s with s ≤ its position (and
position − s < window on local layers). Without a cache the block attends over itself, masked
by positions (and by segment ids when sequences are packed).

Spark attention (arXiv 2506.06644 §3), per head, with r = attn_rank:
  predictor scores s1 = q[:r]·k[:r] / sqrt(r);
  value-gate scores s2 = q[r:]·k[r:] / sqrt(H − r);
  keep ≈ k keys by statistical top-k of the *raw* s1 over the visible keys only (all when ≤ k are
  visible; the row max is always kept, so never zero keys);
  w = softmax over kept softcap(s1) × softplus(s2); output = Σ w·v (no renormalisation after softplus).
Choices where the paper is silent: each half is scaled by its own width; the logit softcap applies
to the predictor's softmax only, after the keys are chosen: it is monotone, so it would not change
an exact top-k, but it bends the tail the statistical threshold's mean and std are taken from
(cap 50, k = 256 of 1024 Gaussian scores of std 3: the kept set changes in 49% of the rows), so the
keys are chosen on the raw scores (tests/test_model.py checks it against the paper's formulas);
RoPE rotates each half on its own by default (`spark.attn_rope='split'`) so both scores depend on
relative position only, or the whole head before splitting ('full').

Sparse-gather decoding (`sparse=True` with a cache): s1 reads only the first r dims of every
cached key (the Spark cache keeps them apart, spark/cache.py); the value-gate half of the selected
keys and their values, one cache row per key, are gathered — at most
ceil(k + c·√k) positions per query (k = attn_k, c = spark.decode_capacity_sigmas; overflow keeps
the top by s1, counted in aux['attn_overflow']). Same function as the masked path, whose aux
reports `attn_overflow_rate`: the share of queries that would overflow that capacity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from spark import cache as kv_cache
from spark import flash, kernels, sparsity
from spark.layers import NEG, apply_rope, linear_cols, normal_init, softcap, visible_mask
from spark.sharding import constrain


def _rope_qk(q, k, positions_BT, theta, split_at: int | None):
    if split_at is None:
        return apply_rope(q, positions_BT, theta), apply_rope(k, positions_BT, theta)
    r = split_at

    def rot(x):
        return jnp.concatenate([apply_rope(x[..., :r], positions_BT, theta),
                                apply_rope(x[..., r:], positions_BT, theta)], axis=-1)

    return rot(q), rot(k)


def _project(x_BTD, w_DNH):
    """x·W as a 2-D matmul over [D, N·H] (the 2-D form is never slower on XLA:CPU; see w_o)."""
    n = w_DNH.shape[1]
    y = linear_cols(x_BTD, rearrange(w_DNH, "D N H -> D (N H)"))
    return rearrange(y, "B T (N H) -> B T N H", N=n)


def _scores(q_BTKGH, k_BKSH, scale):
    s = jnp.einsum("BTKGH,BKSH->BKGTS", q_BTKGH, k_BKSH, preferred_element_type=jnp.float32)
    return s * scale


class Attention(nnx.Module):
    def __init__(self, cfg, layer: int, rngs: nnx.Rngs):
        d, n, kh, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd = jnp.dtype(cfg.param_dtype)
        self.w_q = nnx.Param(normal_init(rngs, (d, n, h), d, pd))
        self.w_k = nnx.Param(normal_init(rngs, (d, kh, h), d, pd))
        self.w_v = nnx.Param(normal_init(rngs, (d, kh, h), d, pd))
        self.w_o = nnx.Param(normal_init(rngs, (n, h, d), n * h, pd))
        self.cfg = cfg
        self.window = cfg.sliding_window if cfg.layer_kind(layer) == "local" else None

    def __call__(self, x_BTD, positions_BT, kv=None, segment_ids_BT=None, sparse: bool = False, tree=None):
        """Returns (out_BTD, (k, v) cache buffers or None, aux). `kv` is this layer's cache buffers;
        `sparse` selects the sparse-gather Spark path (decode with a cache only); `tree` (with kv):
        the block is draft-tree nodes (spark/cache.py: Tree), masked by ancestry."""
        dt = x_BTD.dtype
        q, k, v = self.qkv(x_BTD, positions_BT)

        if kv is None:
            keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
            v_t = False
            k_pos_BS, k_seg_BS = positions_BT, segment_ids_BT
            new_kv = None
        elif tree is not None:  # scratch slots base + node; ancestry decides what each node sees
            v_t = kv_cache.values_transposed(self.cfg)
            slots_BT = tree.base_B[:, None] + tree.node_BT
            k_rows, v_rows = kv_cache.cache_rows(self.cfg, k, v)
            keys = kv_cache.write_slots(kv[0], k_rows, slots_BT)
            values = kv_cache.write_slots(kv[1], v_rows, slots_BT, transposed=v_t)
            k_pos_BS, structural_BTS = kv_cache.tree_key_mask(tree, keys.shape[2])
            k_seg_BS = segment_ids_BT = None
            new_kv = (keys, values)
        else:
            start_B = positions_BT[:, 0]
            v_t = kv_cache.values_transposed(self.cfg)
            k_rows, v_rows = kv_cache.cache_rows(self.cfg, k, v)
            keys = kv_cache.write_block(kv[0], k_rows, start_B)
            values = kv_cache.write_block(kv[1], v_rows, start_B, transposed=v_t)
            b, s = keys.shape[0], keys.shape[2]
            k_pos_BS = jnp.broadcast_to(jnp.arange(s, dtype=positions_BT.dtype), (b, s))
            k_seg_BS = segment_ids_BT = None  # a cache holds one sequence per row
            new_kv = (keys, values)

        def whole_kv():  # [B, K, S, H] keys and values, for the paths that read them whole
            return kv_cache.full_kv(self.cfg, keys, values) if kv is not None else (keys, values)

        q = rearrange(q, "B T (K G) H -> B T K G H", K=keys.shape[1])  # query heads grouped by KV head
        # training (no cache) and long prefills: blocked flash attention; short blocks (decode, verify): scores
        long_block = q.shape[1] >= self.cfg.attn_block and not sparse and tree is None
        if self.cfg.attn_block and (kv is None or long_block):
            keys_BKSH, values_BKSH = whole_kv()
            return self._out(*self._blocked(q, keys_BKSH.astype(dt), values_BKSH.astype(dt), positions_BT, k_pos_BS,
                                            segment_ids_BT, k_seg_BS), new_kv, dt)
        valid_BTS = visible_mask(positions_BT, k_pos_BS, self.window, segment_ids_BT, k_seg_BS)
        if tree is not None:
            valid_BTS &= structural_BTS
        if self.cfg.attn_kind == "spark" and sparse and kv is not None:
            out, aux = self._spark_sparse(q, keys, values, valid_BTS)
        elif self.cfg.attn_kind == "spark":
            keys_BKSH, values_BKSH = whole_kv()
            out, aux = self._spark(q, keys_BKSH.astype(dt), values_BKSH.astype(dt), valid_BTS[:, None, None])
        else:
            out, aux = self._dense(q, keys, values, valid_BTS, v_t)
        return self._out(out, aux, new_kv, dt)

    def _out(self, out_BTKGH, aux, new_kv, dt):
        out = rearrange(out_BTKGH, "B T K G H -> B T (K G H)").astype(dt)
        w_o = rearrange(self.w_o[...], "N H D -> (N H) D")  # 2-D: the 3-D einsum is 2x slower at T=1
        return linear_cols(out, w_o), new_kv, aux

    def qkv(self, x_BTD, positions_BT):
        """Projected q [B,T,N,H], k and v [B,T,K,H], with RoPE applied to q and k."""
        cfg = self.cfg
        q, k, v = (_project(x_BTD, w[...]) for w in (self.w_q, self.w_k, self.w_v))
        split = cfg.attn_rank if cfg.attn_kind == "spark" and cfg.spark.attn_rope == "split" else None
        q, k = _rope_qk(q, k, positions_BT, cfg.rope_theta, split)
        return (constrain(q, "batch", None, "heads", None), constrain(k, "batch", None, "kv_heads", None),
                constrain(v, "batch", None, "kv_heads", None))

    def _dense(self, q, keys, values, valid_BTS, values_transposed: bool):
        """Dense attention: the CPU kernel for decode-sized blocks (spark/kernels), else jnp."""
        cfg, dt = self.cfg, q.dtype
        scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5

        def default(q, keys, values, valid_BTS, _):
            s = softcap(_scores(q, keys.astype(dt), scale), cfg.attn_logit_softcap)
            p = jax.nn.softmax(jnp.where(valid_BTS[:, None, None], s, NEG), axis=-1)
            spec = "BKGTS,BKHS->BTKGH" if values_transposed else "BKGTS,BKSH->BTKGH"
            out = jnp.einsum(spec, p.astype(dt), values.astype(dt))
            kept = jnp.broadcast_to(jnp.sum(valid_BTS, -1, dtype=jnp.int32)[:, None, None], s.shape[:-1])
            return out, kept, jnp.zeros(q.shape[:1], jnp.int32)
        out, _, _ = kernels.attention(q, keys, values, valid_BTS, jnp.zeros(valid_BTS.shape[:2]), default,
                                      rank=cfg.head_dim, scale=scale, softcap=cfg.attn_logit_softcap,
                                      v_t=values_transposed)
        return out, {}

    def _spark(self, q, keys, values, valid):
        s1, s2 = spark_scores(q, keys, self.cfg)
        keep = sparsity.keep_k_of_valid(s1, jnp.broadcast_to(valid, s1.shape), self.cfg.spark.attn_k)
        p = jax.nn.softmax(jnp.where(keep, softcap(s1, self.cfg.attn_logit_softcap), NEG), axis=-1)
        w = p * jnp.where(keep, jax.nn.softplus(s2), 0.0)
        out = jnp.einsum("BKGTS,BKSH->BTKGH", w.astype(values.dtype), values)
        return out, self._spark_stats(jnp.sum(keep, axis=-1))

    def _spark_stats(self, kept):
        """The masked paths' Spark stats from the kept-key counts per query."""
        rate = sparsity.overflow_rate(kept, self.cfg.spark.attn_k, self.cfg.spark.decode_capacity_sigmas)
        return {"keys_per_query": jnp.mean(kept.astype(jnp.float32)), "attn_overflow_rate": rate}

    def _blocked(self, q, keys, values, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS):
        """Blocked flash attention (spark/flash.py): no [T, S] scores."""
        cfg = self.cfg
        if cfg.attn_kind == "spark":
            r = cfg.attn_rank
            spec = flash.Spec(self.window, cfg.attn_logit_softcap, r**-0.5, cfg.attn_block, rank=r,
                              gate_scale=(cfg.head_dim - r) ** -0.5, k=cfg.spark.attn_k)
        else:
            spec = flash.Spec(self.window, cfg.attn_logit_softcap,
                              (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5, cfg.attn_block)
        out, kept = flash.attend(spec, q, keys, values, q_pos_BT, k_pos_BS, q_seg_BT, k_seg_BS)
        return out, ({} if cfg.attn_kind == "dense" else self._spark_stats(kept))

    def _spark_sparse(self, q, keys_BKSR, gv_BKSX, valid_BTS):
        """Sparse-gather Spark attention over the Spark cache (spark/cache.py: the keys' first r dims,
        and each slot's gate half and value side by side): the CPU kernel (no capacity limit) for
        decode-sized blocks, else the capacity-slot gathers below (static shapes for GPU/TPU)."""
        cfg, dt = self.cfg, q.dtype
        r, h = cfg.attn_rank, cfg.head_dim

        def default(q, keys_BKSR, gv_BKSX, valid_BTS, _):
            s1 = _scores(q[..., :r], keys_BKSR.astype(dt), r**-0.5)  # raw: keys are chosen uncapped
            keep = sparsity.keep_k_of_valid(s1, jnp.broadcast_to(valid_BTS[:, None, None], s1.shape), cfg.spark.attn_k)
            cap = sparsity.capacity(cfg.spark.attn_k, s1.shape[-1], cfg.spark.decode_capacity_sigmas)
            idx, ok, dropped = sparsity.capacity_indices(s1, keep, cap)  # [B,K,G,T,C]
            b, kh = idx.shape[:2]
            bi = jnp.arange(b)[:, None, None, None, None]
            ki = jnp.arange(kh)[None, :, None, None, None]
            gather = dict(mode="promise_in_bounds")
            k2 = gv_BKSX.at[bi, ki, idx, : h - r].get(**gather).astype(dt)  # [B,K,G,T,C,H-r]
            v = gv_BKSX.at[bi, ki, idx, h - r :].get(**gather).astype(dt)  # [B,K,G,T,C,H]
            s2 = jnp.einsum("BTKGE,BKGTCE->BKGTC", q[..., r:], k2, preferred_element_type=jnp.float32)
            s2 = s2 * (h - r) ** -0.5
            s1c = jnp.where(ok, softcap(jnp.take_along_axis(s1, idx, axis=-1), cfg.attn_logit_softcap), NEG)
            w = jax.nn.softmax(s1c, axis=-1) * jnp.where(ok, jax.nn.softplus(s2), 0.0)
            out = jnp.einsum("BKGTC,BKGTCH->BTKGH", w.astype(dt), v)
            return out, jnp.sum(ok, axis=-1, dtype=jnp.int32), jnp.sum(dropped, axis=(1, 2, 3))

        z_BT = kernels.spark_z(valid_BTS, cfg.spark.attn_k)
        out, kept, dropped = kernels.attention(q, keys_BKSR, gv_BKSX, valid_BTS, z_BT, default, rank=r,
                                               scale=r**-0.5, gate_scale=(h - r) ** -0.5,
                                               softcap=cfg.attn_logit_softcap, spark=True)
        return out, {"keys_per_query": jnp.mean(kept.astype(jnp.float32)), "attn_overflow": dropped}


def spark_scores(q_BTKGH, k_BKSH, cfg):
    """Spark attention's raw predictor scores s1 (the softcap comes later, on the softmax only) and
    value-gate scores s2, [B,K,G,T,S]."""
    r, h = cfg.attn_rank, cfg.head_dim
    s1 = _scores(q_BTKGH[..., :r], k_BKSH[..., :r], r**-0.5)
    s2 = _scores(q_BTKGH[..., r:], k_BKSH[..., r:], (h - r) ** -0.5)
    return s1, s2
