"""The KV cache every decoder runs on: a plain pytree passed into the model and returned.

k[i], v[i]: layer i's keys/values, [B, S, K, H] (keys stored after RoPE).
lengths: [B] int32, the number of committed positions per row.

The forward writes a block's K/V at its per-row positions and then attends over cache slots
s ≤ query position, so slots past a row's length are never read: rolling back rejected
speculative tokens is just setting `lengths`. `jax.lax.dynamic_update_slice` clamps a start index
that would run off the end (it silently shifts the write), so allocate `slack` extra slots beyond
the longest sequence you will decode; `init` adds them.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array  # [B] int32


def init(cfg, batch: int, max_len: int, slack: int = 8, dtype=None) -> KVCache:
    """An empty cache for `max_len` positions plus `slack` slots (speculative blocks need γ+2)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, max_len + slack, cfg.num_kv_heads, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   lengths=jnp.zeros((batch,), jnp.int32))


def write_block(buf_BSKH, new_BTKH, start_B):
    """Write each row's block at its own start slot (the block is contiguous in positions)."""

    def one(buf_SKH, new_TKH, start):
        return jax.lax.dynamic_update_slice(buf_SKH, new_TKH.astype(buf_SKH.dtype), (start, 0, 0))

    return jax.vmap(one)(buf_BSKH, new_BTKH, start_B)
