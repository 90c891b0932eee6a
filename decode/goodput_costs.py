"""The round costs goodput decides by (decode/goodput.py), measured on this machine for a model,
batch size and prompt length through the goodput decoder of decode/speculative.py itself.

    costs = measure_costs(graphdef, params, prompts_BT, lengths_B, gamma_max=4, draft_widths=...,
                          sampler=..., max_new_tokens=N)
    spec = SpecConfig(draft_widths=..., gamma=4, goodput=GoodputConfig(costs))
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp

from decode import goodput as gp
from decode.goodput import GoodputConfig
from decode.speculative import SpecConfig, branches, models, spec_prefill, with_goodput_stats
from spark.errors import ConfigError

REPEATS = 15  # timings of every γ per measurement (sample.py --cost_repeats)


def measure_costs(graphdef, params, prompts_BT, prompt_lengths_B, *, gamma_max: int, draft_widths, sampler,
                  max_new_tokens: int, widths=None, sparse: bool = True, repeats: int = REPEATS) -> tuple[float, ...]:
    """Seconds per round of each γ = 0 … γ_max at this batch size and prompt length, timed through
    the goodput decoder itself, with what it pays around a branch (the switch, the bookkeeping; a
    branch timed on its own under-stated a γ ≥ 1 round by ~25% at B = 4 on runs/bench_lm): its
    loop, after a prefill, run for `reps` and for 2·`reps` rounds with a cost vector that forces γ
    (an argument: one compile serves every γ); the difference / reps is the round's cost (the
    first rounds of a call cost more than the later ones — ~10 ms at B = 1 — so the prefill alone is
    not the baseline). The cache and buffers are those of a decode of `max_new_tokens` (timed with
    a cache twice as long, a γ = 3 round cost 4.25 plain rounds at B = 1, where the decode pays
    ~3), so reps = (max_new_tokens − 2) // (2·(γ_max + 1)) rounds keep every row decoding.
    This machine's speed drifts and only the ratios between the costs decide γ,
    so each repeat times every γ back to back, and the result is the median γ = 0 cost times the
    median over repeats of each γ's ratio to it: the cost model `goodput.GoodputConfig.costs` takes."""
    cfg = GoodputConfig((1.0,) * (gamma_max + 1))
    spec = SpecConfig(draft_widths=draft_widths, gamma=gamma_max, goodput=cfg)
    reps = (max_new_tokens - 2) // (2 * (gamma_max + 1))
    if reps < 1:
        raise ConfigError(f"measuring round costs needs max_new_tokens >= {2 * gamma_max + 4}, got {max_new_tokens}")

    @jax.jit
    def run(params, key, costs_G, n):
        model, drafter, spec_r, widths_r = models(graphdef, params, spec, widths)
        kw = dict(sampler=sampler, eos_id=-1, pad_id=0, widths=widths_r)
        s = spec_prefill(model, prompts_BT, prompt_lengths_B, key, max_new_tokens=max_new_tokens, spec=spec_r,
                         drafter=drafter, **kw)
        more = lambda s: s.rounds < n  # noqa: E731
        step = functools.partial(gp.goodput_round, branches(model, drafter, spec_r, sparse=sparse, **kw),
                                 cfg=cfg, more=more, costs_G=costs_G)
        # the whole state: nothing of the prefill is dropped from the baseline
        return jax.lax.while_loop(more, step, with_goodput_stats(s, cfg, max_new_tokens))

    force = [jnp.where(jnp.arange(gamma_max + 1) == g, 1.0, 1e30).astype(jnp.float32) for g in range(gamma_max + 1)]
    key = jax.random.key(0)

    def seconds(costs_G, n):
        t0 = time.perf_counter()
        jax.block_until_ready(run(params, key, costs_G, jnp.int32(n)))
        return time.perf_counter() - t0

    seconds(force[0], 1)  # compile
    per_round = [[max(seconds(c, 2 * reps) - seconds(c, reps), 1e-9) / reps for c in force] for _ in range(repeats)]
    plain = statistics.median(r[0] for r in per_round)
    return tuple(plain * statistics.median(r[g] / r[0] for r in per_round) for g in range(gamma_max + 1))
