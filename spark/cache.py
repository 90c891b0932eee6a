"""The KV cache every decoder runs on: a plain pytree passed into the model and returned.

k[i]: layer i's keys, [B, K, S, H] (after RoPE). v[i]: its values, [B, K, S, H] — or [B, K, H, S]
  for dense attention (`values_transposed`), whose p·V product then reads V in the matrix-vector
  form XLA:CPU runs fastest. (One query over S = 4160 slots, K = 4, H = 256 on the CI CPU:
  [B, S, K, H] is 10.9× slower than K [B, K, S, H] + V [B, K, H, S]; `python bench/decode_layouts.py`.)
  Spark attention (`cache_rows`) keeps what its decode reads together: k[i] holds the keys' first
  r dims, [B, K, S, r], which every query scores against (read whole, contiguous), and v[i] each
  slot's gate half and value side by side, [B, K, S, (H − r) + H], gathered for the kept keys only
  (one row each). With the whole keys in k[i] the scores read every key's row to use its first half:
  at 1024 keys the attention kernel's score pass cost as much as dense attention's whole-key pass
  (README, session 45). `full_kv` rebuilds [B, K, S, H] keys and values for the masked paths.
lengths: [B] int32, the number of committed positions per row.
Under a mesh (`jax.set_mesh`) the buffers are sharded by batch row and KV head, like the activations.

The forward writes a block's K/V at its per-row positions and then attends over cache slots
s ≤ query position, so slots past a row's length are never read: rolling back rejected
speculative tokens is just setting `lengths`. `jax.lax.dynamic_update_slice` clamps a start index
that would run off the end (it silently shifts the write), so allocate `slack` extra slots beyond
the longest sequence you will decode; `init` adds them.

Draft trees (multi-draft speculative decoding, decode/multidraft.py): a block may be a set of tree
nodes (`Tree`) instead of a run of positions. Node n's K/V go to the scratch slot lengths + n; a
node attends to the committed slots (s < lengths, inside the window) and to the scratch slots of
its ancestors and itself (`Tree.anc_BTN`); siblings share a position (lengths + depth). A tree
block leaves `lengths` alone: `commit` then moves the accepted path's K/V from its scratch slots to
lengths, lengths + 1, … and advances `lengths`. Allocate slack ≥ the tree's node count + 1.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from spark.sharding import constrain


@flax.struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array  # [B] int32
    v_transposed: bool = flax.struct.field(pytree_node=False, default=False)  # v is [B, K, H, S]


@flax.struct.dataclass
class Tree:
    """The tree nodes of one block. Token t of the block is node `node_BT[t]` (its K/V go to slot
    lengths + node); `anc_BTN[t, m]`: it attends to node m (its ancestors and itself); `pos_BN[m]`:
    node m's position (lengths + its depth; siblings share one), for the sliding window."""

    node_BT: jax.Array  # int32
    anc_BTN: jax.Array  # bool
    pos_BN: jax.Array  # int32
    base_B: jax.Array | None = None  # the scratch's first slot: set by the model to cache.lengths


def values_transposed(cfg) -> bool:
    return cfg.attn_kind == "dense"


def cache_rows(cfg, k_BTKH, v_BTKH):
    """What a block writes to k[i] and v[i]: the keys and values, or (Spark) the keys' first r dims
    and [gate half | value] per token."""
    if cfg.attn_kind != "spark":
        return k_BTKH, v_BTKH
    r = cfg.attn_rank
    return k_BTKH[..., :r], jnp.concatenate([k_BTKH[..., r:], v_BTKH.astype(k_BTKH.dtype)], axis=-1)


def full_kv(cfg, keys, values):
    """A layer's cache buffers as whole keys and values, both [B, K, S, H]."""
    if cfg.attn_kind != "spark":
        return keys, values.swapaxes(2, 3) if values_transposed(cfg) else values
    e = cfg.head_dim - cfg.attn_rank
    return jnp.concatenate([keys, values[..., :e]], axis=-1), values[..., e:]


def init(cfg, batch: int, max_len: int, slack: int = 8, dtype=None) -> KVCache:
    """An empty cache for `max_len` positions plus `slack` slots (speculative blocks need γ+2)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    s, kh, h = max_len + slack, cfg.num_kv_heads, cfg.head_dim
    k_shape, v_shape = (batch, kh, s, h), (batch, kh, h, s) if values_transposed(cfg) else (batch, kh, s, h)
    if cfg.attn_kind == "spark":
        k_shape, v_shape = (batch, kh, s, cfg.attn_rank), (batch, kh, s, 2 * h - cfg.attn_rank)
    buf = lambda shape: constrain(jnp.zeros(shape, dtype), "batch", "kv_heads", None, None)  # noqa: E731
    return KVCache(k=tuple(buf(k_shape) for _ in range(cfg.num_layers)),
                   v=tuple(buf(v_shape) for _ in range(cfg.num_layers)),
                   lengths=jnp.zeros((batch,), jnp.int32), v_transposed=values_transposed(cfg))


def write_block(buf, new_BTKH, start_B, transposed: bool = False):
    """Write each row's block at its own start slot (the block is contiguous in positions).

    buf is [B, K, S, H], or [B, K, H, S] when `transposed`; slots past the end are dropped."""
    return write_slots(buf, new_BTKH, start_B[:, None] + jnp.arange(new_BTKH.shape[1], dtype=start_B.dtype),
                       transposed)


def write_slots(buf, new_BTKH, slots_BT, transposed: bool = False):
    """Write row b's block token t at slot slots_BT[b, t] (distinct within a row; a tree block's
    scratch, or a contiguous block); slots outside the buffer are dropped.

    One scatter with explicit [B, K(, H), T] indices, not a vmap over rows: XLA:CPU lowered the
    vmapped dynamic_update_slice to a scatter that it computed twice (once for the returned cache,
    once fused into the attention reading it), each on its own copy of the whole buffer — 8 full
    copies of a layer's K and V per decode step (8 layers of 2B shapes at prompt 1024: 84 ms, with
    this form 17 ms; tests/test_generate.py counts the copies in a compiled decode step)."""
    b, k = buf.shape[:2]
    new = new_BTKH.astype(buf.dtype)
    bi, ki = jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None]
    put = dict(mode="drop", unique_indices=True)
    if transposed:  # [B, K, H, T] into [B, K, H, S]
        hi = jnp.arange(buf.shape[2])[None, None, :, None]
        at = buf.at[bi[..., None], ki[..., None], hi, slots_BT[:, None, None, :]]
        return at.set(new.transpose(0, 2, 3, 1), **put)
    return buf.at[bi, ki, slots_BT[:, None, :]].set(new.transpose(0, 2, 1, 3), **put)


def tree_key_mask(tree: Tree, num_slots: int):
    """(k_pos_BS, structural_BTS): each slot's position (-1: never visible) and whether block
    token t may see slot s by the tree (committed slots: yes; scratch: its ancestors and itself).
    The caller adds causality and the window (spark/layers.py: visible_mask)."""
    s = jnp.arange(num_slots, dtype=jnp.int32)[None, :]
    n = tree.pos_BN.shape[1]
    node_BS = s - tree.base_B[:, None]  # scratch node of each slot
    scratch_BS = (node_BS >= 0) & (node_BS < n)
    node_pos = jnp.take_along_axis(tree.pos_BN, jnp.clip(node_BS, 0, n - 1), axis=1)
    k_pos_BS = jnp.where(node_BS < 0, s, jnp.where(scratch_BS, node_pos, -1))
    anc_BTS = jnp.take_along_axis(tree.anc_BTN, jnp.clip(node_BS, 0, n - 1)[:, None, :], axis=2)
    structural = (node_BS < 0)[:, None, :] | (scratch_BS[:, None, :] & anc_BTS)
    return k_pos_BS, structural


def commit(cache: KVCache, kept_slots_BT, n_kept_B) -> KVCache:
    """Move the accepted path into place: slot kept_slots_BT[t] -> lengths + t (t < n_kept; the
    rest of the row's T slots get garbage past the new length, never read), lengths += n_kept."""
    def move(buf, transposed):
        axis = 3 if transposed else 2
        idx = kept_slots_BT[:, None, None, :] if transposed else kept_slots_BT[:, None, :, None]
        path = jnp.take_along_axis(buf, idx, axis=axis, mode="promise_in_bounds")  # [B,K,T,H] | [B,K,H,T]
        return write_block(buf, path.transpose(0, 3, 1, 2) if transposed else path.transpose(0, 2, 1, 3),
                           cache.lengths, transposed)

    return cache.replace(k=tuple(move(k, False) for k in cache.k),
                         v=tuple(move(v, cache.v_transposed) for v in cache.v),
                         lengths=cache.lengths + n_kept_B.astype(jnp.int32))
