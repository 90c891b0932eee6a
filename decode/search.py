"""Step-level search on device: one jitted call per batch of problems.

    out = search.run(graphdef, params, prompts_BT, lengths_B, key, cfg=SearchConfig(method="mfs"),
                     task=TaskTokens(delim_id=…, eos_id=…, answer_span="all"))

Methods: "mfs" (martingale foresight sampling) and "phi" (φ-Decoding) in decode/foresight.py;
"beam" (step-level beam search on cumulative log-prob) and the flat samplers "sample" (N
independent completions: greedy at τ = 0, best-of-N, self-consistency) in decode/baselines.py.
All of them run on the machinery of decode/search_lib.py (beams, expand, foresight, finalize,
answer rules, accounting); this module only dispatches, so imports run one way:
search -> foresight, baselines -> search_lib -> rollout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from decode import baselines, foresight, rollout
from decode.search_lib import SearchConfig, State, TaskTokens, add_call, empty_trace, finalize, initial_beams, outputs

__all__ = ["SearchConfig", "TaskTokens", "run", "run_search"]

STEPS = {"mfs": foresight.mfs_step, "phi": foresight.phi_step, "beam": baselines.beam_step}
STAT_KEYS = ("gen_tokens", "forward_tokens", "expand_tokens", "foresight_tokens", "final_tokens",
             "prefill_tokens", "foresight_overflow", "steps", "ffn_overflow", "attn_overflow")


def run_search(lm, prompts_BT, lengths_B, key, cfg: SearchConfig, task: TaskTokens):
    """The whole search for a batch of problems (call inside jit) -> output dict."""
    b = prompts_BT.shape[0]
    rows = rollout.start(lm, prompts_BT, lengths_B, cfg.max_gen, pad_id=task.pad_id)
    stats = {k: jnp.zeros((b,), jnp.int32) for k in STAT_KEYS}
    stats["prefill_tokens"] = lengths_B.astype(jnp.int32)
    stats["forward_tokens"] = jnp.full((b,), prompts_BT.shape[1], jnp.int32)
    if cfg.method == "sample":
        return baselines.sample_n(lm, rows, key, cfg, task, stats)
    state = State(t=jnp.int32(0), beams=initial_beams(rows, cfg.beams), stopped_B=jnp.zeros((b,), bool),
                  stop_step_B=jnp.full((b,), -1, jnp.int32), reverted_B=jnp.zeros((b,), bool), key=key,
                  stats=stats, trace=empty_trace(cfg, b))
    step = STEPS[cfg.method]
    state = jax.lax.while_loop(lambda s: (s.t < cfg.max_steps) & ~jnp.all(s.stopped_B),
                               lambda s: step(lm, s, cfg, task), state)
    rows, quality, out = finalize(lm, state.beams, jax.random.fold_in(key, 1 << 20), cfg, task)
    stats = add_call(state.stats, out, b, "final")
    return outputs(rows, quality, state.beams.valid_BM, task, stats, state)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "task", "widths", "sparse"))
def run(graphdef, params, prompts_BT, lengths_B, key, *, cfg: SearchConfig, task: TaskTokens, widths=None,
        sparse: bool = True):
    """Search with a model (nnx graphdef + params) for a batch of right-padded prompts."""
    lm = rollout.ModelLM(nnx.merge(graphdef, params), widths=widths, sparse=sparse)
    return run_search(lm, prompts_BT, lengths_B, key, cfg, task)
