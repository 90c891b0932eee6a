"""The one-token decode loop every decoder but speculative decoding runs on: plain sampling
(decode/generate.py) and every step-level search (decode/search_lib.py and its methods).

A `Rows` holds R independent continuations of a batch of prompts: the LM's cache (leading axis R),
the logits for each row's next token, its position, the tokens it generated after its prompt and
whether it ended. `sample_until` extends every active row until it emits a stop token, a
per-call token cap, or fills its buffer, inside one `lax.while_loop`; `take` gathers rows by
index (the t5x `gather_beams` pattern: reselecting beams gathers their caches).

A token is `draw(fold_in(key, i), logits_RV)` at loop iteration i (counted from `first_iter`, so
a loop split over several calls draws what one call would). The searches draw by Gumbel-max on
the tempered logits (`gumbel_draw(τ)`: argmax(logits / τ + g), τ = 0: argmax), so a reference
implementation fed the same key reproduces every draw; plain sampling draws from the processed
distribution of decode/sampling.py. With `score=True` a row also sums the log-probability of its
tokens under the *untempered* model (log_softmax(logits)): the model's own confidence,
independent of the exploration temperature.

The LM protocol (`ModelLM` for a Transformer; the tests' mock LMs): `lm.prefill(prompts_BT,
lengths_B, max_new)` -> (logits_BV, cache) and `lm(tok_R, pos_R, cache)` -> (logits_RV, cache,
row_stats {name: [R] int}, layer_stats {name: [L] float}). Per call `sample_until` returns per-row
`n_tok` (real tokens generated), the row stats summed over the steps a row was live (e.g. Spark
decode overflow), the layer stats summed over iterations, and `forward_tokens` (R × iterations,
padding included — what the wall clock pays).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from spark import cache as kv_cache


@flax.struct.dataclass
class Rows:
    cache: Any  # the LM's cache pytree, leading axis R
    logits_RV: jax.Array  # float32: logits for each row's next token
    pos_R: jax.Array  # int32: position of the next token (prompt length + generated)
    gen_RL: jax.Array  # int32 [R, L]: generated tokens, pad_id past n_gen
    n_gen_R: jax.Array  # int32
    done_R: jax.Array  # bool: emitted EOS


def prefill_cache(model, prompts_BT, prompt_lengths_B, *, max_new_tokens: int, widths=None, slack: int = 8,
                  scan: bool = False):
    """The prompts' K/V in a fresh cache with room for max_new_tokens (+ slack) ->
    (logits_BV at each row's last prompt token, cache with lengths = prompt lengths). `scan`: the
    layers as one lax.scan (compile time independent of depth)."""
    b, t = prompts_BT.shape
    cache = kv_cache.init(model.cfg, b, t + max_new_tokens, slack)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    lengths = prompt_lengths_B.astype(jnp.int32)
    logits, cache = model(prompts_BT, positions, cache=cache, widths=widths, logits_at_B=lengths - 1, scan=scan)
    return logits[:, 0], cache.replace(lengths=lengths)


class ModelLM:
    """The cache interface of docs/ARCHITECTURE.md as a decode LM: prefill once, then one token per row.
    Spark decode stats come back split: per-row overflow counts (summed over layers) and per-layer
    means (FFN density, keys per query)."""

    def __init__(self, model, widths=None, sparse: bool = True, scan_prefill: bool = False):
        self.model, self.widths, self.sparse, self.scan_prefill = model, widths, sparse, scan_prefill

    def prefill(self, prompts_BT, lengths_B, max_new: int):
        return prefill_cache(self.model, prompts_BT, lengths_B, max_new_tokens=max_new, widths=self.widths,
                             scan=self.scan_prefill)

    def __call__(self, tok_R, pos_R, cache):
        logits, cache, aux = self.model(tok_R[:, None], pos_R[:, None], cache=cache, widths=self.widths,
                                        sparse=self.sparse, return_aux=True)
        rows = {k: jnp.sum(v, axis=0) for k, v in aux.items() if v.ndim == 2}  # [L, R] -> [R]
        layers = {k: v for k, v in aux.items() if v.ndim == 1}
        return logits[:, 0], cache, rows, layers


def start(lm, prompts_BT, lengths_B, max_gen: int, pad_id: int = 0) -> Rows:
    """One row per prompt, with room for `max_gen` generated tokens."""
    logits, cache = lm.prefill(prompts_BT, lengths_B, max_gen)
    b = prompts_BT.shape[0]
    return Rows(cache=cache, logits_RV=logits.astype(jnp.float32), pos_R=lengths_B.astype(jnp.int32),
                gen_RL=jnp.full((b, max_gen), pad_id, jnp.int32), n_gen_R=jnp.zeros((b,), jnp.int32),
                done_R=jnp.zeros((b,), bool))


def take(rows: Rows, idx) -> Rows:
    """Rows gathered by index (any int array; the result has its flattened size)."""
    idx = jnp.asarray(idx).reshape(-1)
    return jax.tree.map(lambda x: x[idx], rows)


def gumbel_tokens(key, logits_RV, tau):
    """The searches' sampling rule (shared with the reference implementation)."""
    if tau == 0:
        return jnp.argmax(logits_RV, axis=-1).astype(jnp.int32)
    g = jax.random.gumbel(key, logits_RV.shape, jnp.float32)
    return jnp.argmax(logits_RV / jnp.float32(tau) + g, axis=-1).astype(jnp.int32)


def gumbel_draw(tau: float):
    return functools.partial(gumbel_tokens, tau=tau)


def zero_stats(lm, rows: Rows):
    """Zero accumulators shaped like the LM's per-row and per-layer step stats."""
    r = rows.pos_R.shape[0]
    shapes = jax.eval_shape(lambda c: lm(jnp.zeros((r,), jnp.int32), rows.pos_R, c)[2:], rows.cache)
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)


def sample_until(lm, rows: Rows, key, active_R, *, draw, stop_ids, eos_id: int, max_tokens: int, pad_id: int = 0,
                 score: bool = True, first_iter=0):
    """Extend each active row until it emits one of `stop_ids` (EOS always stops and marks it
    done), `max_tokens` tokens, or a full buffer. -> (rows, out) where out holds per-row n_tok,
    sum_logp (untempered; zeros unless `score`), row_stats, the layer_stats sums, the iterations
    run and the scalar forward_tokens."""
    r, cap = rows.gen_RL.shape
    stops = jnp.asarray(sorted({*stop_ids, eos_id}), jnp.int32)
    live0 = active_R & ~rows.done_R & (rows.n_gen_R < cap)
    i0 = jnp.asarray(first_iter, jnp.int32)
    row_stats, layer_stats = zero_stats(lm, rows)
    init = (i0, rows, live0, jnp.zeros((r,), jnp.int32), jnp.zeros((r,), jnp.float32), row_stats, layer_stats)

    def body(c):
        i, rw, live, n_tok, sum_lp, row_st, layer_st = c
        tok = jnp.where(live, draw(jax.random.fold_in(key, i), rw.logits_RV), pad_id)
        if score:
            lp = jnp.take_along_axis(jax.nn.log_softmax(rw.logits_RV), tok[:, None], axis=1)[:, 0]
            sum_lp = sum_lp + jnp.where(live, lp, 0.0)
        logits, cache, st_rows, st_layers = lm(tok, rw.pos_R, rw.cache)
        step = live.astype(jnp.int32)
        gen = rw.gen_RL.at[jnp.arange(r), jnp.where(live, rw.n_gen_R, cap)].set(tok, mode="drop")
        rw = Rows(cache=cache, logits_RV=jnp.where(live[:, None], logits.astype(jnp.float32), rw.logits_RV),
                  pos_R=rw.pos_R + step, gen_RL=gen, n_gen_R=rw.n_gen_R + step,
                  done_R=rw.done_R | (live & (tok == eos_id)))
        row_st = {k: v + jnp.where(live, st_rows[k], 0).astype(v.dtype) for k, v in row_st.items()}
        layer_st = {k: v + st_layers[k] for k, v in layer_st.items()}
        ended = jnp.isin(tok, stops) | (rw.n_gen_R >= cap)
        return i + 1, rw, live & ~ended, n_tok + step, sum_lp, row_st, layer_st

    def cond(c):
        return (c[0] < i0 + max_tokens) & jnp.any(c[2])

    i, rows, _, n_tok, sum_lp, row_stats, layer_stats = jax.lax.while_loop(cond, body, init)
    return rows, {"n_tok": n_tok, "sum_logp": sum_lp, "row_stats": row_stats, "layer_stats": layer_stats,
                  "iterations": i - i0, "forward_tokens": (i - i0) * r}


def mean_logp(out, empty_value):
    """Length-normalised log-prob of each row's new tokens; `empty_value` where none."""
    n = out["n_tok"]
    return jnp.where(n > 0, out["sum_logp"] / jnp.maximum(n, 1), empty_value)


ANSWER_SPANS = ("all", "last_step")


def answer_keys(rows: Rows, delim_id: int, eos_id: int, span: str):
    """A hash of each row's answer: its generated tokens (`span="all"`) or those after the last
    step delimiter (`"last_step"`), a trailing delimiter and EOS excluded. Equal answers <->
    equal keys (up to collisions of a 32-bit polynomial hash)."""
    gen, cap = rows.gen_RL, rows.gen_RL.shape[1]
    j = jnp.arange(cap)[None]
    end = rows.n_gen_R - (rows.done_R & (rows.n_gen_R > 0))  # EOS excluded
    last = jnp.take_along_axis(gen, jnp.maximum(end - 1, 0)[:, None], axis=1)[:, 0]
    end = end - ((end > 0) & (last == delim_id))  # a trailing delimiter excluded
    inside = j < end[:, None]
    if span == "last_step":
        start = jnp.max(jnp.where(inside & (gen == delim_id), j + 1, 0), axis=1)
        inside &= j >= start[:, None]
    elif span not in ANSWER_SPANS:
        raise ValueError(f"answer span must be one of {ANSWER_SPANS}, got {span!r}")
    else:
        start = jnp.zeros_like(end)
    tok = jnp.where(inside, gen + 1, 0).astype(jnp.uint32)
    powers = jnp.cumprod(jnp.full((cap,), 1_000_003, jnp.uint32))[jnp.maximum(j - start[:, None], 0)]
    return jnp.sum(tok * powers, axis=1, dtype=jnp.uint32).astype(jnp.int32)
