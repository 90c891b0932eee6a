"""Prefill + autoregressive sampling in one jitted call: the decode loop is a `lax.while_loop`.

Prompts are right-padded to a common length with per-row `prompt_lengths`; the prefill writes the
whole padded block, and each row's decode steps then overwrite its slots from its own length on
(the attention mask only reads slots ≤ the query position, so padding is never attended).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from decode import cache as kv_cache
from decode.sampling import SamplerConfig, sample


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampler", "eos_id", "pad_id",
                                             "widths"))
def generate(graphdef, params, prompts_BT, prompt_lengths_B, key, *, max_new_tokens: int,
             sampler: SamplerConfig, eos_id: int, pad_id: int, widths=None):
    """Returns (new_tokens [B, max_new_tokens] padded with pad_id after EOS, num_new [B])."""
    model = nnx.merge(graphdef, params)
    b, t = prompts_BT.shape
    cache = kv_cache.init(model.cfg, b, t + max_new_tokens)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, cache = model(prompts_BT, positions, cache=cache, widths=widths)
    last = jnp.take_along_axis(logits, (prompt_lengths_B - 1)[:, None, None], axis=1)[:, 0]

    def cond(s):
        step, _, _, done, _, _, _ = s
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(s):
        step, out, pos, done, logits_BV, cache, key = s
        key, sub = jax.random.split(key)
        tok, _ = sample(sub, logits_BV, sampler)
        tok = jnp.where(done, pad_id, tok)
        out = out.at[:, step].set(tok)
        done = done | (tok == eos_id)
        logits, cache = model(tok[:, None], pos[:, None], cache=cache, widths=widths)
        return step + 1, out, pos + 1, done, logits[:, 0], cache, key

    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    init = (jnp.int32(0), out, prompt_lengths_B.astype(jnp.int32), jnp.zeros((b,), bool), last, cache, key)
    _, out, pos, _, _, _, _ = jax.lax.while_loop(cond, body, init)
    return out, pos - prompt_lengths_B
