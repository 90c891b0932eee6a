"""Statistical top-k (Spark Transformer, arXiv 2506.06644): pure functions, no parameters.

θ = mean(x) + std(x) · Φ⁻¹(1 − k/d) over the last axis (population std), or over the entries
where `mask` is True. For roughly Gaussian rows about k entries lie above θ; finding them costs two
linear passes instead of a sort. Statistics are always float32 whatever the input dtype; `k_frac`
may be a traced value under jit (it only enters through Φ⁻¹).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri


def masked_moments(x, mask=None):
    """Population mean and std over the last axis (float32, keepdims), restricted to `mask` if given
    (the statistical top-k threshold; the search decoders' prune rules)."""
    xf = x.astype(jnp.float32)
    if mask is None:
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        return mean, jnp.sqrt(var)
    m = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0)
    mean = jnp.sum(jnp.where(mask, xf, 0.0), axis=-1, keepdims=True) / n
    var = jnp.sum(jnp.where(mask, jnp.square(xf - mean), 0.0), axis=-1, keepdims=True) / n
    return mean, jnp.sqrt(var)


def threshold(x, k_frac, mask=None, stop_gradient: bool = False):
    """θ = mean + std·Φ⁻¹(1 − k_frac), float32, shape x.shape[:-1] + (1,).

    `k_frac` is a scalar or broadcasts against x.shape[:-1] + (1,); values are clipped to
    (0, 1] so k_frac >= 1 gives θ = -inf (keep everything).
    """
    theta = threshold_from_moments(*masked_moments(x, mask), k_frac)
    return jax.lax.stop_gradient(theta) if stop_gradient else theta


def threshold_from_moments(mean, std, k_frac):
    """θ = mean + std·Φ⁻¹(1 − k_frac); −inf where k_frac ≥ 1 (keep everything). The one formula:
    `threshold` takes the moments of a whole row, blocked attention (spark/flash.py) accumulates
    them over key blocks."""
    k_frac = jnp.asarray(k_frac, jnp.float32)
    z = ndtri(1.0 - jnp.clip(k_frac, 1e-7, 1.0 - 1e-7))  # finite, so gradients stay finite
    return jnp.where(k_frac >= 1.0, -jnp.inf, mean + std * z)


def soft_topk(x, k_frac, mask=None, stop_gradient: bool = False):
    """ReLU(x − θ): the Spark FFN form. Entries below θ are exactly 0; kept ones are x − θ.

    The subtraction is done in float32 and cast back to x.dtype."""
    theta = threshold(x, k_frac, mask, stop_gradient)
    out = jax.nn.relu(x.astype(jnp.float32) - theta)
    if mask is not None:
        out = jnp.where(mask, out, 0.0)
    return out.astype(x.dtype)


def keep_mask(x, k_frac, mask=None):
    """Boolean mask of the entries at or above θ (inside `mask` if given)."""
    keep = x.astype(jnp.float32) >= threshold(x, k_frac, mask)
    return keep if mask is None else keep & mask


def hard_topk(x, k_frac, mask=None):
    """x where x ≥ θ, −inf elsewhere (and outside `mask`): the attention form."""
    return jnp.where(keep_mask(x, k_frac, mask), x, -jnp.inf)


def keep_k_of_valid(scores, valid, k: int):
    """Spark attention key selection: per row, keep about `k` of the `valid` entries.

    With n = #valid: if n ≤ k every valid entry is kept; otherwise θ is computed from the valid
    entries' statistics with fraction k/n. The row maximum is always kept, so a row with at least
    one valid entry never keeps zero (a skewed row can put every entry below θ).
    """
    n = jnp.sum(valid, axis=-1, keepdims=True).astype(jnp.float32)
    keep = keep_mask(scores, attn_k_frac(n, k), valid)
    sf = scores.astype(jnp.float32)
    row_max = jnp.max(jnp.where(valid, sf, -jnp.inf), axis=-1, keepdims=True)
    return keep | (valid & (sf >= row_max))


def attn_k_frac(n, k: int):
    """The kept fraction of n visible keys: k/n, or 1 (all) when n ≤ k."""
    return jnp.where(n > k, k / jnp.maximum(n, 1.0), 1.0)


def capacity_indices(scores, keep, capacity: int):
    """Indices of the kept entries of each row, in a static buffer of `capacity` slots.

    scores, keep: [..., n]. Returns (idx [..., capacity] int32 ascending, slot_ok [..., capacity]
    bool, dropped [...] int32). Unused slots point at entry n − 1 (a valid row to read, masked by
    slot_ok). A row that keeps more than `capacity` entries keeps the `capacity` with the highest
    scores (the top_k runs only when some row overflows) and reports the excess in `dropped`.
    """
    n = keep.shape[-1]
    lead = keep.shape[:-1]
    keep2 = keep.reshape(-1, n)
    count = jnp.sum(keep2, axis=-1, dtype=jnp.int32)

    def trim(k2):
        s = jnp.where(k2, scores.reshape(-1, n).astype(jnp.float32), -jnp.inf)
        _, top = jax.lax.top_k(s, capacity)
        rows = jnp.arange(k2.shape[0])[:, None]
        return k2 & jnp.zeros_like(k2).at[rows, top].set(True)

    keep2 = jax.lax.cond(jnp.any(count > capacity), trim, lambda k2: k2, keep2)
    idx = jax.vmap(lambda m: jnp.nonzero(m, size=capacity, fill_value=n - 1)[0])(keep2).astype(jnp.int32)
    # Materialise the indices: fused into a gather, XLA:CPU recomputes them for every gathered element.
    idx = jax.lax.optimization_barrier(idx)
    slot_ok = jnp.arange(capacity) < jnp.minimum(count, capacity)[:, None]
    dropped = jnp.maximum(count - capacity, 0)
    return idx.reshape(*lead, capacity), slot_ok.reshape(*lead, capacity), dropped.reshape(lead)


def capacity(k: float, n: int, sigmas: float) -> int:
    """Static slot count for sparse-gather decoding: ceil(k + sigmas·√k), at most n.

    The kept count of a statistical top-k is about k with a spread that grows like √k (binomial
    for Gaussian scores; heavier-tailed predictor scores spread more), so a margin in units of √k
    overflows about equally rarely at every width: a fixed factor (1.25·k) is generous at 2B widths
    and overflows a few % of tokens at small ones. `python bench/decode_capacity.py` measures it."""
    return int(min(n, max(1, math.ceil(k + sigmas * math.sqrt(k)))))


def overflow_rate(kept, k: float, sigmas: float):
    """Fraction of selections (rows of `kept` counts) that would not fit the decode capacity."""
    return jnp.mean((kept > capacity(k, math.inf, sigmas)).astype(jnp.float32))
