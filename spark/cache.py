"""The KV cache every decoder runs on: a plain pytree passed into the model and returned.

k[i]: layer i's keys, [B, K, S, H] (after RoPE). v[i]: its values, [B, K, S, H] — or [B, K, H, S]
  for dense attention (`values_transposed`), whose p·V product then reads V in the matrix-vector
  form XLA:CPU runs fastest; Spark attention gathers value rows, so it keeps [B, K, S, H].
  (One query over S = 4160 slots, K = 4, H = 256 on the CI CPU: [B, S, K, H] is 10.9× slower
  than K [B, K, S, H] + V [B, K, H, S]; `python bench/decode_layouts.py`.)
lengths: [B] int32, the number of committed positions per row.
Under a mesh (`jax.set_mesh`) the buffers are sharded by batch row and KV head, like the activations.

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

from spark.sharding import constrain


@flax.struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array  # [B] int32


def values_transposed(cfg) -> bool:
    return cfg.attn_kind == "dense"


def init(cfg, batch: int, max_len: int, slack: int = 8, dtype=None) -> KVCache:
    """An empty cache for `max_len` positions plus `slack` slots (speculative blocks need γ+2)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    s, kh, h = max_len + slack, cfg.num_kv_heads, cfg.head_dim
    v_shape = (batch, kh, h, s) if values_transposed(cfg) else (batch, kh, s, h)
    buf = lambda shape: constrain(jnp.zeros(shape, dtype), "batch", "kv_heads", None, None)  # noqa: E731
    return KVCache(k=tuple(buf((batch, kh, s, h)) for _ in range(cfg.num_layers)),
                   v=tuple(buf(v_shape) for _ in range(cfg.num_layers)),
                   lengths=jnp.zeros((batch,), jnp.int32))


def write_block(buf, new_BTKH, start_B, transposed: bool = False):
    """Write each row's block at its own start slot (the block is contiguous in positions).

    buf is [B, K, S, H], or [B, K, H, S] when `transposed`."""
    new = new_BTKH.astype(buf.dtype).transpose((0, 2, 3, 1) if transposed else (0, 2, 1, 3))

    def one(buf_row, new_row, start):
        idx = (0, 0, start) if transposed else (0, start, 0)
        return jax.lax.dynamic_update_slice(buf_row, new_row, idx)

    return jax.vmap(one)(buf, new, start_B)
