"""Prefill + autoregressive sampling in one jitted call: the decode loop is a `lax.while_loop`.

    tokens_BN, num_new_B, stats = generate(graphdef, params, prompts_BT, prompt_lengths_B, key,
                                           max_new_tokens=N, sampler=SamplerConfig(...), eos_id=…, pad_id=…)

Prompts are right-padded to a common length with per-row `prompt_lengths`; the prefill writes the
whole padded block, and each row's decode steps then overwrite its slots from its own length on
(the attention mask only reads slots ≤ the query position, so padding is never attended).

The same pieces are exposed for callers that keep a state between calls (benchmarks, chat):
`start` (jitted prefill -> DecodeState) and `decode` (jitted loop, the state and its cache are
donated, so the cache is updated in place).

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

from decode import cache as kv_cache
from decode.cache import KVCache
from decode.sampling import SamplerConfig, sample


@flax.struct.dataclass
class DecodeState:
    step: jax.Array  # int32 []: decode steps taken
    tokens_BN: jax.Array  # int32 [B, max_new_tokens]: generated tokens, pad_id after EOS
    positions_B: jax.Array  # int32 [B]: position of each row's next token
    done_B: jax.Array  # bool [B]
    logits_BV: jax.Array  # float32 [B, V]: logits for the next token
    cache: KVCache
    key: jax.Array
    stats: dict  # per-row sums [B] and per-layer sums [L] over decode steps


def _stat_sums(model, cache, widths, sparse):
    """Zero accumulators shaped like the model's decode stats ([L, B] -> [B] per row; [L] kept)."""
    b = cache.lengths.shape[0]
    tok = jnp.zeros((b, 1), jnp.int32)
    aux = jax.eval_shape(lambda c: model(tok, tok, cache=c, widths=widths, sparse=sparse, return_aux=True)[2],
                         cache)
    return {k: jnp.zeros(v.shape[1:] if v.ndim == 2 else v.shape, v.dtype) for k, v in aux.items()}


def prefill_cache(model, prompts_BT, prompt_lengths_B, *, max_new_tokens: int, widths=None, slack: int = 8):
    """The prompts' K/V in a fresh cache with room for max_new_tokens (+ slack) ->
    (logits_BV at each row's last prompt token, cache with lengths = prompt lengths)."""
    b, t = prompts_BT.shape
    cache = kv_cache.init(model.cfg, b, t + max_new_tokens, slack)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    lengths = prompt_lengths_B.astype(jnp.int32)
    logits, cache = model(prompts_BT, positions, cache=cache, widths=widths, logits_at_B=lengths - 1)
    return logits[:, 0], cache.replace(lengths=lengths)


def prefill(model, prompts_BT, prompt_lengths_B, key, *, max_new_tokens: int, widths=None, sparse=True):
    b = prompts_BT.shape[0]
    logits_BV, cache = prefill_cache(model, prompts_BT, prompt_lengths_B, max_new_tokens=max_new_tokens,
                                     widths=widths)
    return DecodeState(step=jnp.int32(0), tokens_BN=jnp.zeros((b, max_new_tokens), jnp.int32),
                       positions_B=cache.lengths, done_B=jnp.zeros((b,), bool), logits_BV=logits_BV, cache=cache,
                       key=key, stats=_stat_sums(model, cache, widths, sparse))


def decode_step(model, s: DecodeState, *, sampler, eos_id, pad_id, widths, sparse) -> DecodeState:
    key, sub = jax.random.split(s.key)
    tok, _ = sample(sub, s.logits_BV, sampler)
    tok = jnp.where(s.done_B, pad_id, tok)
    tokens = s.tokens_BN.at[:, s.step].set(tok)
    logits, cache, aux = model(tok[:, None], s.positions_B[:, None], cache=s.cache, widths=widths,
                               sparse=sparse, return_aux=True)
    live = ~s.done_B
    stats = {k: acc + (jnp.sum(jnp.where(live, aux[k], 0), axis=0) if aux[k].ndim == 2 else aux[k])
             for k, acc in s.stats.items()}
    return DecodeState(step=s.step + 1, tokens_BN=tokens, positions_B=s.positions_B + live.astype(jnp.int32),
                       done_B=s.done_B | (tok == eos_id), logits_BV=logits[:, 0], cache=cache, key=key, stats=stats)


def _loop(model, state, max_steps, **kw):
    n = state.tokens_BN.shape[1]
    limit = jnp.minimum(n, state.step + max_steps)
    cond = lambda s: (s.step < limit) & ~jnp.all(s.done_B)  # noqa: E731
    return jax.lax.while_loop(cond, lambda s: decode_step(model, s, **kw), state)


_STEP_ARGS = ("sampler", "eos_id", "pad_id", "widths", "sparse")


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "widths", "sparse"))
def start(graphdef, params, prompts_BT, prompt_lengths_B, key, *, max_new_tokens: int, widths=None,
          sparse: bool = True) -> DecodeState:
    """Jitted prefill: a DecodeState ready for `decode`."""
    model = nnx.merge(graphdef, params)
    return prefill(model, prompts_BT, prompt_lengths_B, key, max_new_tokens=max_new_tokens, widths=widths,
                   sparse=sparse)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_steps", *_STEP_ARGS), donate_argnames=("state",))
def decode(graphdef, params, state: DecodeState, *, max_steps: int, sampler: SamplerConfig, eos_id: int,
           pad_id: int, widths=None, sparse: bool = True) -> DecodeState:
    """Up to `max_steps` more decode steps (fewer when every row is done or the buffer is full)."""
    model = nnx.merge(graphdef, params)
    return _loop(model, state, max_steps, sampler=sampler, eos_id=eos_id, pad_id=pad_id, widths=widths,
                 sparse=sparse)


def summarize(state: DecodeState) -> dict:
    """Per-row overflow counts [B] and per-layer means [L] over the decode steps taken."""
    steps = jnp.maximum(state.step, 1).astype(jnp.float32)
    return {k: v if v.dtype == jnp.int32 else v / steps for k, v in state.stats.items()} | {"steps": state.step}


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", *_STEP_ARGS))
def generate(graphdef, params, prompts_BT, prompt_lengths_B, key, *, max_new_tokens: int,
             sampler: SamplerConfig, eos_id: int, pad_id: int, widths=None, sparse: bool = True):
    """Returns (new_tokens [B, max_new_tokens] padded with pad_id after EOS, num_new [B], stats)."""
    model = nnx.merge(graphdef, params)
    state = prefill(model, prompts_BT, prompt_lengths_B, key, max_new_tokens=max_new_tokens, widths=widths,
                    sparse=sparse)
    state = _loop(model, state, max_new_tokens, sampler=sampler, eos_id=eos_id, pad_id=pad_id, widths=widths,
                  sparse=sparse)
    return state.tokens_BN, state.positions_B - prompt_lengths_B, summarize(state)
