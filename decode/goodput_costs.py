"""The round costs goodput decides by (decode/goodput.py), measured on this machine for a model,
batch size and prompt length through the goodput decoder itself (speculative.goodput_generate,
whose cost vector is an argument: the measurement and the decode share one compile).

    spec = SpecConfig(draft_widths=..., gamma=4, goodput=GoodputConfig((1.0,) * 5))   # costs: any
    costs = measure_costs(graphdef, params, prompts_BT, lengths_B, spec=spec, sampler=..., max_new_tokens=N)
    spec = with_costs(spec, costs)
    speculative.generate(graphdef, params, prompts_BT, lengths_B, key, spec=spec, sampler=..., max_new_tokens=N)
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time

import jax
import jax.numpy as jnp

from decode.spec_config import SpecConfig
from decode.speculative import goodput_generate, goodput_static
from spark.errors import ConfigError

REPEATS = 40  # timings of every γ per measurement (sample.py --cost_repeats)


def min_new_tokens(gamma_max: int) -> int:
    """The shortest decode measure_costs can time: 2 rounds of γ_max + 1 tokens, and the first token."""
    return 2 * gamma_max + 4


def with_costs(spec: SpecConfig, costs) -> SpecConfig:
    return dataclasses.replace(spec, goodput=dataclasses.replace(spec.goodput, costs=tuple(costs)))


def measure_costs(graphdef, params, prompts_BT, prompt_lengths_B, *, spec: SpecConfig, sampler, max_new_tokens: int,
                  eos_id: int = -1, pad_id: int = 0, widths=None, sparse: bool = True,
                  repeats: int = REPEATS, budget_s: float = 60.0) -> tuple[float, ...]:
    """Seconds per round of each γ = 0 … γ_max (spec.gamma) at this batch size and prompt length,
    timed through the decoder that will use them — the same compiled function, called with a cost
    vector that forces γ — so with what it pays around a branch (the switch, the bookkeeping; a
    branch timed on its own under-stated a γ ≥ 1 round by ~25% at B = 4 on runs/bench_lm). A
    round's cost is the difference of a whole decode of `max_new_tokens` and a call that stops
    after one round, divided by the rounds between them: the prefill, the first round and the call
    itself cancel, and the rounds are those of the real decode, at its positions (rounds 2-15
    alone, at B = 1 on runs/bench_lm, put a plain round at 1.30 ms against 1.21 over the whole
    decode — the early rounds cost more — and every γ ≥ 1 round at 7-10% fewer plain rounds than
    the whole decodes paid; with the whole decodes the costs predict each forced γ's speed).
    This machine's speed drifts and only the ratios between the costs decide γ, so each repeat
    times every γ back to back, each repeat with its own sampling key (one key's decode has its own
    rounds and active rows: at B = 1 on runs/bench_lm key 0 put γ = 3 / γ = 2 at 1.27, keys 1-3 at
    1.22-1.25), and the result is the median γ = 0 cost times the central ratio (`central_ratio`)
    over repeats of each γ's cost to it, the γ in a random order per repeat (no γ always timed
    after another). One repeat's ratio scatters by ~4% (c1 / c3 at B = 1 on runs/bench_lm: sd 0.025
    around 0.58), so 40 repeats (~15 s at B = 1) put it within ~1%; with 15, measurements in one
    process were 3% apart, and one bench run's first measurement put c1 / c3 at 0.53 — enough to
    turn γ = 3's real 5% lead over γ = 1 into a modelled tie. Repeats stop early
    (after at least 3) once `budget_s` is spent: a repeat at B = 64 takes ~20 s."""
    if spec.goodput is None:
        raise ConfigError("measure_costs needs a SpecConfig with goodput (its costs are not read)")
    gamma_max = spec.gamma
    if max_new_tokens < min_new_tokens(gamma_max):
        raise ConfigError(f"measuring round costs needs max_new_tokens >= {min_new_tokens(gamma_max)}, "
                          f"got {max_new_tokens}")
    kw = dict(max_new_tokens=max_new_tokens, sampler=sampler, eos_id=eos_id, pad_id=pad_id, spec=goodput_static(spec),
              widths=widths, sparse=sparse)
    force = [jnp.where(jnp.arange(gamma_max + 1) == g, 1.0, 1e30).astype(jnp.float32) for g in range(gamma_max + 1)]

    def seconds(costs_G, rounds, key):
        t0 = time.perf_counter()
        out = jax.block_until_ready(goodput_generate(graphdef, params, prompts_BT, prompt_lengths_B, key, costs_G,
                                                     jnp.int32(rounds), **kw))
        return time.perf_counter() - t0, int(out[2]["loop_rounds"])

    seconds(force[0], 1, jax.random.key(0))  # compile

    def per_round(costs_G, key):
        (t_all, ran), (t_1, _) = seconds(costs_G, max_new_tokens, key), seconds(costs_G, 1, key)
        return max(t_all - t_1, 1e-9) / max(ran - 1, 1)

    rounds, t0 = [], time.perf_counter()
    while len(rounds) < repeats and not (len(rounds) >= 3 and time.perf_counter() - t0 > budget_s):
        key = jax.random.key(len(rounds))  # each repeat its own draws, the same for every γ
        order = random.Random(len(rounds)).sample(range(gamma_max + 1), gamma_max + 1)
        timed = {g: per_round(force[g], key) for g in order}
        rounds.append([timed[g] for g in range(gamma_max + 1)])
    plain = statistics.median(r[0] for r in rounds)
    return tuple(plain * central_ratio([r[g] / r[0] for r in rounds]) for g in range(gamma_max + 1))


def central_ratio(ratios) -> float:
    """The geometric mean of the middle half of the ratios (of all, when fewer than 4): robust to a repeat
    caught in a slow phase like a median, and centred when the ratios cluster in lumps — a drift
    within a repeat puts each γ's ratio at one of a few levels, one per order of the γ, and a
    median then picks one level, not their centre."""
    logs = sorted(math.log(x) for x in ratios)
    cut = len(logs) // 4
    middle = logs[cut:len(logs) - cut]
    return math.exp(sum(middle) / len(middle))
