"""The round costs goodput decides by (decode/goodput.py), measured on this machine for a model,
batch size and prompt length through the goodput decoder itself (speculative.goodput_generate,
whose cost vector is an argument: the measurement and the decode share one compile).

    spec = SpecConfig(draft_widths=..., gamma=4, goodput=GoodputConfig((1.0,) * 5))   # costs: any
    measured = measure_costs(graphdef, params, prompts_BT, lengths_B, spec=spec, sampler=..., max_new_tokens=N)
    spec = with_costs(spec, *measured)   # measured.costs [γ_max + 1], measured.switch
    speculative.generate(graphdef, params, prompts_BT, lengths_B, key, spec=spec, sampler=..., max_new_tokens=N)
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp

from decode.spec_config import SpecConfig
from decode.speculative import goodput_generate, goodput_static
from spark.errors import ConfigError

REPEATS = 40  # timings of every γ per measurement (sample.py --cost_repeats)


def min_new_tokens(gamma_max: int) -> int:
    """The shortest decode measure_costs can time: 2 rounds of γ_max + 1 tokens, and the first token."""
    return 2 * gamma_max + 4


class RoundCosts(NamedTuple):
    costs: tuple[float, ...]  # seconds per round of γ = 0 … γ_max
    switch: float  # seconds a change of γ and back adds to the rounds (GoodputConfig.switch_cost)


def with_costs(spec: SpecConfig, costs, switch_cost: float = 0.0) -> SpecConfig:
    return dataclasses.replace(spec, goodput=dataclasses.replace(spec.goodput, costs=tuple(costs),
                                                                 switch_cost=float(switch_cost)))


def measure_costs(graphdef, params, prompts_BT, prompt_lengths_B, *, spec: SpecConfig, sampler, max_new_tokens: int,
                  eos_id: int = -1, pad_id: int = 0, widths=None, sparse: bool = True,
                  repeats: int = REPEATS, budget_s: float = 60.0) -> RoundCosts:
    """Seconds per round of each γ = 0 … γ_max (spec.gamma) at this batch size and prompt length,
    and the seconds a change of γ and back costs, timed through the decoder that will use them —
    the same compiled function, called with a cost vector that forces γ — so with what it pays
    around a branch (the switch, the bookkeeping; a branch timed on its own under-stated a γ ≥ 1
    round by ~25% at B = 4 on runs/bench_lm). A round's cost is the difference of a whole decode of
    `max_new_tokens` and a call that stops after one round, divided by the rounds between them: the
    prefill, the first round and the call itself cancel, and the rounds are those of the real
    decode, at its positions (rounds 2-15 alone, at B = 1 on runs/bench_lm, put a plain round at
    1.30 ms against 1.21 over the whole decode — the early rounds cost more — and every γ ≥ 1 round
    at 7-10% fewer plain rounds than the whole decodes paid; with the whole decodes the costs predict
    each forced γ's speed).
    The switch: γ forced to alternate between 0 and γ_max (their costs 1, the others' huge, and a
    negative switch cost: each round then changes γ); every round after the first is a change, so
    a round costs (c_0 + c_γmax) / 2 plus half a change and back (at B = 1 on runs/bench_lm 0.06-0.12 ms
    per change, where a plain round costs 1.2 ms: leaving one γ's loop and entering another's).
    This machine's speed drifts and only the ratios between the costs decide γ, so each repeat
    times every γ and the alternation back to back, each repeat with its own sampling key (one
    key's decode has its own rounds and active rows: at B = 1 on runs/bench_lm key 0 put γ = 3 /
    γ = 2 at 1.27, keys 1-3 at 1.22-1.25), and the result is the median γ = 0 cost times the
    central ratio (`central_ratio`) over repeats of each γ's cost to it (the switch: times the median
    of its ratios, which may be negative), in a random order per repeat (no call always timed after
    another). One repeat's ratio scatters by ~4% (c1 / c3 at B = 1 on runs/bench_lm: sd 0.025 around
    0.58), so 40 repeats (38 s at B = 1 with the compile) put it within ~1%; with 15, measurements in one process
    were 3% apart, and one bench run's first measurement put c1 / c3 at 0.53 — enough to turn
    γ = 3's real 5% lead over γ = 1 into a modelled tie. Repeats stop early (after at least 3) once
    `budget_s` is spent: a repeat at B = 64 took ~20 s without the alternation."""
    if spec.goodput is None:
        raise ConfigError("measure_costs needs a SpecConfig with goodput (its costs are not read)")
    gamma_max = spec.gamma
    if max_new_tokens < min_new_tokens(gamma_max):
        raise ConfigError(f"measuring round costs needs max_new_tokens >= {min_new_tokens(gamma_max)}, "
                          f"got {max_new_tokens}")
    kw = dict(max_new_tokens=max_new_tokens, sampler=sampler, eos_id=eos_id, pad_id=pad_id, spec=goodput_static(spec),
              widths=widths, sparse=sparse)

    def only(gs, switch_s=0.0):  # (cost vector, switch cost) under which the decoder runs only the γ in gs
        return (jnp.where(jnp.isin(jnp.arange(gamma_max + 1), jnp.asarray(gs)), 1.0, 1e30).astype(jnp.float32),
                jnp.float32(switch_s))

    forcing = [only([g]) for g in range(gamma_max + 1)] + [only([0, gamma_max], -1e6)]  # the last: alternate
    alternate = gamma_max + 1

    def seconds(force, rounds, key):
        costs_G, switch_s = force
        t0 = time.perf_counter()
        out = jax.block_until_ready(goodput_generate(graphdef, params, prompts_BT, prompt_lengths_B, key, costs_G,
                                                     jnp.int32(rounds), switch_s, **kw))
        return time.perf_counter() - t0, int(out[2]["loop_rounds"])

    seconds(forcing[0], 1, jax.random.key(0))  # compile

    def per_round(force, key):
        (t_all, ran), (t_1, _) = seconds(force, max_new_tokens, key), seconds(force, 1, key)
        return max(t_all - t_1, 1e-9) / max(ran - 1, 1), ran

    rounds, changes, t0 = [], [], time.perf_counter()
    while len(rounds) < repeats and not (len(rounds) >= 3 and time.perf_counter() - t0 > budget_s):
        key = jax.random.key(len(rounds))  # each repeat its own draws, the same for every γ
        order = random.Random(len(rounds)).sample(range(alternate + 1), alternate + 1)
        timed = {g: per_round(forcing[g], key) for g in order}
        c = [timed[g][0] for g in range(gamma_max + 1)]
        rounds.append(c)
        after = timed[alternate][1] - 1  # rounds after the first (γ_max): γ = 0, γ_max, 0, …
        mixed = ((after + 1) // 2 * c[0] + after // 2 * c[gamma_max]) / max(after, 1)
        changes.append(2 * (timed[alternate][0] - mixed) / c[0])  # a change and back, over c_0
    plain = statistics.median(r[0] for r in rounds)
    costs = tuple(plain * central_ratio([r[g] / r[0] for r in rounds]) for g in range(gamma_max + 1))
    return RoundCosts(costs, max(plain * statistics.median(changes), 0.0))


def central_ratio(ratios) -> float:
    """The geometric mean of the middle half of the ratios (of all, when fewer than 4): robust to a repeat
    caught in a slow phase like a median, and centred when the ratios cluster in lumps — a drift
    within a repeat puts each γ's ratio at one of a few levels, one per order of the γ, and a
    median then picks one level, not their centre."""
    logs = sorted(math.log(x) for x in ratios)
    cut = len(logs) // 4
    middle = logs[cut:len(logs) - cut]
    return math.exp(sum(middle) / len(middle))
