"""Prefill + autoregressive sampling in one jitted call: the decode loop is a `lax.while_loop`
(`rollout.sample_until`, the one-token loop the search decoders run on too).

    tokens_BN, num_new_B, stats = generate(graphdef, params, prompts_BT, prompt_lengths_B, key,
                                           max_new_tokens=N, sampler=SamplerConfig(...), eos_id=…, pad_id=…)

Prompts are right-padded to a common length with per-row `prompt_lengths`; the prefill writes the
whole padded block, and each row's decode steps then overwrite its slots from its own length on
(the attention mask only reads slots ≤ the query position, so padding is never attended).

The same pieces are exposed for callers that keep a state between calls (benchmarks, chat):
`start` (jitted prefill -> DecodeState) and `decode` (jitted loop, the state and its cache are
donated, so the cache is updated in place); a generation split over several `decode` calls draws
exactly the tokens of one `generate` call.

Spark models decode with the sparse-gather path (`sparse=True`, the default); the stats report per
row how many selected FFN neurons / attention keys did not fit the static capacity (`*_overflow`),
and per layer the mean realised FFN density and keys per query over the decode steps.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from decode import rollout
from decode.sampling import SamplerConfig, sample


@flax.struct.dataclass
class DecodeState:
    step: jax.Array  # int32 []: decode steps taken (loop iterations over all rows)
    rows: rollout.Rows  # gen_RL: the generated tokens, pad_id after EOS
    key: jax.Array
    stats: dict  # per-row sums [B] and per-layer sums [L] over decode steps


def _draw(sampler: SamplerConfig):
    return lambda key, logits_RV: sample(key, logits_RV, sampler)[0]


def prefill(lm, prompts_BT, prompt_lengths_B, key, *, max_new_tokens: int, pad_id: int) -> DecodeState:
    rows = rollout.start(lm, prompts_BT, prompt_lengths_B, max_new_tokens, pad_id=pad_id)
    row_stats, layer_stats = rollout.zero_stats(lm, rows)
    return DecodeState(step=jnp.int32(0), rows=rows, key=key, stats=row_stats | layer_stats)


def _loop(lm, state: DecodeState, max_steps, *, sampler, eos_id, pad_id) -> DecodeState:
    r = state.rows.n_gen_R.shape[0]
    rows, out = rollout.sample_until(lm, state.rows, state.key, jnp.ones((r,), bool), draw=_draw(sampler),
                                     stop_ids=(), eos_id=eos_id, max_tokens=max_steps, pad_id=pad_id, score=False,
                                     first_iter=state.step)
    new = out["row_stats"] | out["layer_stats"]
    return state.replace(step=state.step + out["iterations"], rows=rows,
                         stats={k: v + new[k] for k, v in state.stats.items()})


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "pad_id", "widths", "sparse",
                                             "scan_prefill"))
def start(graphdef, params, prompts_BT, prompt_lengths_B, key, *, max_new_tokens: int, pad_id: int = 0,
          widths=None, sparse: bool = True, scan_prefill: bool = False) -> DecodeState:
    """Jitted prefill: a DecodeState ready for `decode`."""
    lm = rollout.ModelLM(nnx.merge(graphdef, params), widths, sparse, scan_prefill)
    return prefill(lm, prompts_BT, prompt_lengths_B, key, max_new_tokens=max_new_tokens, pad_id=pad_id)


_STEP_ARGS = ("sampler", "eos_id", "pad_id", "widths", "sparse")


@functools.partial(jax.jit, static_argnames=("graphdef", "max_steps", *_STEP_ARGS), donate_argnames=("state",))
def decode(graphdef, params, state: DecodeState, *, max_steps: int, sampler: SamplerConfig, eos_id: int,
           pad_id: int, widths=None, sparse: bool = True) -> DecodeState:
    """Up to `max_steps` more decode steps (fewer when every row is done or the buffer is full)."""
    lm = rollout.ModelLM(nnx.merge(graphdef, params), widths, sparse)
    return _loop(lm, state, max_steps, sampler=sampler, eos_id=eos_id, pad_id=pad_id)


def summarize(state: DecodeState) -> dict:
    """Per-row overflow counts [B] and per-layer means [L] over the decode steps taken."""
    steps = jnp.maximum(state.step, 1).astype(jnp.float32)
    return {k: v if v.dtype == jnp.int32 else v / steps for k, v in state.stats.items()} | {"steps": state.step}


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "scan_prefill", *_STEP_ARGS))
def generate(graphdef, params, prompts_BT, prompt_lengths_B, key, *, max_new_tokens: int,
             sampler: SamplerConfig, eos_id: int, pad_id: int, widths=None, sparse: bool = True,
             scan_prefill: bool = False):
    """Returns (new_tokens [B, max_new_tokens] padded with pad_id after EOS, num_new [B], stats).
    `scan_prefill` runs the prefill's layers as one lax.scan (the decode loop stays unrolled)."""
    lm = rollout.ModelLM(nnx.merge(graphdef, params), widths, sparse, scan_prefill)
    state = prefill(lm, prompts_BT, prompt_lengths_B, key, max_new_tokens=max_new_tokens, pad_id=pad_id)
    state = _loop(lm, state, max_new_tokens, sampler=sampler, eos_id=eos_id, pad_id=pad_id)
    return state.rows.gen_RL, state.rows.n_gen_R, summarize(state)
