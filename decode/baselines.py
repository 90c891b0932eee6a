"""Search baselines on the machinery of decode/search_lib.py.

- method "sample": N independent completions per problem at τ_final (N = 1, τ = 0: greedy;
  `choice_quality` = best-of-N by mean log-prob; `choice_vote` = self-consistency, majority@N);
- method "beam": step-level beam search — every beam expands into N one-step candidates, the M
  best by cumulative log-prob of the whole solution are kept (finished beams compete with their
  final score), until every beam is finished or T_max steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from decode import rollout, search_lib


def sample_n(lm, rows: rollout.Rows, key, cfg: search_lib.SearchConfig, task: search_lib.TaskTokens, stats):
    b = rows.n_gen_R.shape[0]
    n = cfg.samples
    rows = rollout.take(rows, jnp.repeat(jnp.arange(b), n))
    rows, out = rollout.sample_until(lm, rows, jax.random.fold_in(key, 1 << 20), jnp.ones((b * n,), bool),
                                     draw=rollout.gumbel_draw(cfg.tau_final), stop_ids=(), eos_id=task.eos_id,
                                     max_tokens=cfg.max_gen, pad_id=task.pad_id)
    stats = search_lib.add_call(stats, out, b, "final")
    quality = search_lib.solution_quality(out["sum_logp"], rows).reshape(b, n)
    return search_lib.outputs(rows, quality, jnp.ones((b, n), bool), task, stats)


def beam_step(lm, s: search_lib.State, cfg: search_lib.SearchConfig, task: search_lib.TaskTokens) -> search_lib.State:
    b, m = s.beams.valid_BM.shape
    cand, c, out = search_lib.expand(lm, s.beams, jax.random.fold_in(jax.random.fold_in(s.key, s.t), 0), cfg, task,
                                     s.stopped_B)
    stats = search_lib.add_call(s.stats, out, b, "expand")
    vals, src = jax.lax.top_k(jnp.where(c["valid"], c["cum"], -jnp.inf), m)
    ok = vals > -jnp.inf
    pick = lambda x: jnp.take_along_axis(x, src, axis=1)  # noqa: E731
    new = search_lib.gather_beams(cand, c, src, ok, pick(c["F"]))
    live = ~s.stopped_B
    stop_now = live & ~jnp.any(new.valid_BM & ~new.fin_BM, axis=1)
    stats = stats | {"steps": stats["steps"] + live.astype(jnp.int32)}
    trace = search_lib.record(s.trace, s.t, search_lib.candidate_record(live, cand, c, src, ok, stop_now))
    return s.replace(t=s.t + 1, beams=search_lib.keep_where(live, new, s.beams), stopped_B=s.stopped_B | stop_now,
                     stop_step_B=jnp.where(stop_now, s.t, s.stop_step_B), stats=stats, trace=trace)
