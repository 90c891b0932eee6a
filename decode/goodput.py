"""Goodput-chosen speculation (SmartSpec, Liu et al. 2024): per round, one γ ∈ {0, …, γ_max}
for the whole batch, the one that emits the batch's tokens fastest. Two objectives
(`GoodputConfig.objective`):

- "tokens", SmartSpec's goodput — expected emitted tokens per second summed over the rows,

      γ* = argmax_γ  Σ_{live rows b} E_b(γ) / cost(γ),   E_b(γ) = 1 + α_b + … + α_b^γ;

  right for continuous batching, where a finished row is replaced at once;
- "finish" (the default): the projected time to finish this static batch if every round from now
  on had γ drafts, γ* = argmin_γ cost(γ) · E max_b R_b(γ), R_b the rounds row b needs for the
  tokens it has left (`projected_rounds`: each row's rounds exactly, their maximum approximated).
  A static batch ends with its slowest row, and speculation makes the rows' progress uneven: at
  α = 0.9, γ = 3 and 64 tokens, a batch of 4 needs 9% more rounds than 64 / E X, a batch of 16
  15% more (simulated, tests/test_goodput.py). On runs/bench_lm at B = 4 the summed tokens rated
  γ = 3 3% above plain decoding where forced γ = 3 ran 0.91× forced γ = 0. It also stops
  speculating near the end of a decode, where a round's extra tokens overshoot. Both keep the
  formula's limits: free drafts with a γ-independent verify -> γ_max; a verify of γ + 1 tokens
  costing γ + 1 plain steps plus any draft cost -> 0.

α_b is the row's estimated per-position acceptance and cost(γ) the measured seconds of a round
with γ drafts at this batch size (γ = 0: a plain one-token target step, no draft, sampled straight
from the target's logits). γ_max + 1 round bodies are compiled, so a small γ really costs less:
each γ runs its rounds in its own loop for as long as the choice stays (`goodput_round`; the loops
follow each other, rather than sit in a `lax.switch` over the bodies, whose branches copied the
whole cache on each change of γ), so a batch that stopped speculating decodes at plain decoding's
speed and one that keeps a γ at that fixed γ's (a switch per round cost ~8% of a plain step at
B = 16). The costs are timed through this decoder itself (`goodput_costs.measure_costs`), with what
it pays around a change.

A change of γ costs more than its rounds (leaving one γ's loop, entering another's: ~0.08 ms
per change at B = 1 on runs/bench_lm, where a plain round costs 1.2 ms, from a regression of 132
timed decodes on their rounds per γ and changes), and near the break-even of two γ — at B = 1 the
projected times of γ = 1, 2, 3 are within 1% of each other for α ≈ 0.9 — the estimate's noise turns
γ back and forth. So the choice charges `switch_cost`, the seconds of a change and back (measured
by measure_costs), to every γ but the one just run: the finish objective once, the tokens objective
spread over the estimate's memory, 1 / (1 − decay) rounds. A change and back, because a change made
on noise is undone. Replaying the cost model on the decoder's own choices (runs/bench_lm, B = 1, 24
keys × 5 prompts) the charge moved goodput from 0.988-0.999 to 0.989-1.006 of fixed γ = 3 (the
best fixed γ there); charging twice as much was worse.

The acceptance is estimated per row, not over the batch: rows differ (prompt, content, how far
they are), E is convex in α so an averaged α misjudges the summed E, and a row that finished
stops counting; but the choice reads each row's estimate shrunk toward the batch's pooled one by as
much as the rows' spread is sampling noise (`shrunk_estimate`, `shrink=True`), since the finish
objective's slowest row is otherwise the row with the unluckiest estimate. The estimate is a
ratio of exponential moving counts, acc / tried, where a round
with n of γ drafts accepted adds n accepted and n + [n < γ] tested positions (the rejected one
counts; the ratio is the maximum-likelihood α of a geometric run), after both counts are multiplied by
`decay`. Rounds without drafts (γ* = 0) carry no evidence; they pull the counts toward the prior
(α₀, weight w) instead, so a batch that stopped speculating tries again once the evidence that
stopped it has faded. The prior is optimistic (α₀ = 1) by default: with α₀ = 0.6 on
`runs/bench_lm` goodput chose γ = 0 from the first round and never saw that the F/8 draft is
accepted ~90% of the time (fixed γ = 3 ran 1.21× plain, goodput 0.98×). `decay` 0.95 by default (a
memory of ~20 rounds): at 0.8 the per-row estimate at B = 1 swung enough to pick γ = 2 in a third
of the rounds where γ = 3 was better, and at B = 4 the evidence against speculating faded within ~10
plain rounds, so goodput kept retrying γ = 3 (runs/bench_lm, 64 tokens, one process, 12-15
interleaved rounds: goodput / best fixed γ 0.961 / 0.963 / 0.977 at B = 1 and 0.987 / 1.006 / 1.006
at B = 4 for decay 0.8 / 0.9 / 0.95).

    spec = SpecConfig(draft_widths=..., gamma=4, goodput=GoodputConfig((1.0,) * 5))
    costs = goodput_costs.measure_costs(graphdef, params, prompts_BT, lengths_B, spec=spec, sampler=...,
                                        max_new_tokens=N)
    speculative.generate(..., spec=goodput_costs.with_costs(spec, costs))   # stats["gamma_chosen"]: γ of
                                                                            # every round (−1 past the end)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from spark.errors import ConfigError

OBJECTIVES = ("finish", "tokens")


@dataclasses.dataclass(frozen=True)
class GoodputConfig:
    """costs: seconds (any unit) of a round with γ = 0, 1, …, γ_max drafts at the batch size in use;
    decay: the weight of the past per round; prior α₀ and its weight w in tested positions."""

    costs: tuple[float, ...]
    objective: str = "finish"  # "finish": the batch's projected finish time; "tokens": SmartSpec's sum
    decay: float = 0.95
    prior: float = 1.0  # optimistic: speculate first, then let the evidence decide (a pessimistic
    prior_weight: float = 2.0  # prior never speculates, so it never learns that speculation pays)
    switch_cost: float = 0.0  # seconds a change of γ and back costs beyond their rounds (measure_costs)
    shrink: bool = True  # choose by the rows' estimates shrunk toward the batch's pooled α (`shrunk_estimate`)

    def __post_init__(self):
        object.__setattr__(self, "costs", tuple(float(c) for c in self.costs))
        if len(self.costs) < 2 or any(not c > 0 for c in self.costs):
            raise ConfigError(f"goodput costs need γ_max + 1 >= 2 positive values (γ = 0 … γ_max), got {self.costs}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"goodput objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"goodput decay must be in [0, 1), got {self.decay}")
        if not self.switch_cost >= 0.0:
            raise ConfigError(f"goodput switch_cost must be >= 0 seconds, got {self.switch_cost}")
        if not 0.0 <= self.prior <= 1.0 or not self.prior_weight > 0:
            raise ConfigError(f"goodput prior must be in [0, 1] with a positive weight, got {self.prior}, "
                              f"{self.prior_weight}")

    @property
    def gamma_max(self) -> int:
        return len(self.costs) - 1


def expected_tokens(alpha_B, gamma_max: int):
    """[B, γ_max + 1]: tokens a round with γ drafts emits in expectation, 1 + α + … + α^γ."""
    g = jnp.arange(gamma_max + 1, dtype=jnp.float32)
    return jnp.cumsum(alpha_B[:, None].astype(jnp.float32) ** g, axis=1)


def tokens_law(alpha_B, gamma_max: int):
    """[B, γ_max + 1 (γ), γ_max + 1 (k)]: P(a round with γ drafts emits k + 1 tokens) for a geometric
    acceptance α: α^k (1 − α) for k < γ, α^γ for k = γ, 0 beyond."""
    a = alpha_B.astype(jnp.float32)[:, None, None]
    g = jnp.arange(gamma_max + 1)[None, :, None]
    k = jnp.arange(gamma_max + 1)[None, None, :]
    return jnp.where(k < g, a**k * (1 - a), jnp.where(k == g, a**g, 0.0))


def rounds_moments(alpha_B, remaining_B, gamma_max: int, max_remaining: int):
    """([B, γ_max + 1], [B, γ_max + 1]): mean and variance of R_b(γ), the rounds row b needs for
    its r_b remaining tokens if every round has γ drafts — exactly, from the recurrences
    E R(r) = 1 + Σ_k p_k E R(r − k) and E R(r)² = 1 + Σ_k p_k (2 E R(r − k) + E R(r − k)²), R(≤ 0) = 0
    (p_k = P(k tokens), `tokens_law`): linear in a window of the last γ_max + 1 values of both, so
    R(r) = A^r v(0), evaluated by squaring A bit by bit of r (≤ `max_remaining`, static)."""
    n = gamma_max + 1
    d = 2 * n + 1  # the windows of E R and E R², and a constant 1
    p = tokens_law(alpha_B, gamma_max)  # [B, γ, k]
    batch = p.shape[:2]
    shift = jnp.eye(n, k=-1)  # row i + 1 takes the value of row i: the window moves on
    a = jnp.zeros((*batch, d, d), jnp.float32)
    a = a.at[..., :n, :n].set(shift).at[..., n:2 * n, n:2 * n].set(shift)
    a = a.at[..., 0, :n].set(p).at[..., n, :n].set(2 * p).at[..., n, n:2 * n].set(p)
    a = a.at[..., (0, n, d - 1), d - 1].set(1.0)
    v = jnp.zeros((*batch, d), jnp.float32).at[..., d - 1].set(1.0)
    r = remaining_B.astype(jnp.int32)[:, None, None]
    for bit in range(max(int(max_remaining).bit_length(), 1)):
        v = jnp.where((r >> bit) & 1 == 1, jnp.einsum("bgij,bgj->bgi", a, v), v)
        a = a @ a
    mean = v[..., 0]
    return mean, jnp.maximum(v[..., n] - mean**2, 0.0)


def expected_max_normal(n):
    """E max of n independent standard normals (Blom's approximation, 0 for n <= 1; at n = 2, 4,
    16: 0.59, 1.05, 1.78 where the exact values are 0.56, 1.03, 1.77)."""
    n = jnp.maximum(jnp.asarray(n, jnp.float32), 1.0)
    return jnp.maximum(jax.scipy.special.ndtri((n - 0.375) / (n + 0.25)), 0.0)


def projected_rounds(alpha_B, remaining_B, live_B, gamma_max: int, max_remaining: int):
    """[γ_max + 1]: the rounds the batch needs to finish if every round from now on has γ drafts —
    E max over live rows of R_b(γ) (`rounds_moments`, exact per row), approximated as
    max_b (E R_b + κ_n sd R_b) with κ_n the expected maximum of n standard normals, n the live
    rows. A round with more drafts emits at least as many tokens row by row (coupled acceptances),
    so the projection is made non-increasing in γ (a running minimum). 0 when no row is live."""
    mean, var = rounds_moments(alpha_B, remaining_B, gamma_max, max_remaining)
    rounds_BG = mean + expected_max_normal(jnp.sum(live_B)) * jnp.sqrt(var)
    return jax.lax.cummin(jnp.max(jnp.where(live_B[:, None], rounds_BG, 0.0), axis=0))


def choose_gamma(alpha_B, live_B, remaining_B, costs_G, objective: str, max_remaining: int, switch_s=0.0,
                 current=-1, memory: float = 1.0):
    """The γ to run next; 0 when no row is live.
    "tokens" (SmartSpec): argmin (cost(γ) + switch) / Σ_live E_b(γ) — the seconds per token, i.e. the
    argmax of SmartSpec's goodput when switch = 0 — the smallest on ties.
    "finish": argmin cost(γ) · projected_rounds(γ) + switch — the batch's projected time to finish
    with γ (`remaining_B`: the tokens each row has left, at most `max_remaining`, static) — the
    largest on ties.
    switch: `switch_s` for a γ other than `current` (the γ just run; −1: none yet), else 0 — the
    finish objective pays it once, the tokens objective over `memory` rounds. A negative `switch_s`
    (with a cost vector that leaves two γ) forces γ to alternate: measure_costs times a switch so."""
    gamma_max = costs_G.shape[0] - 1
    change_G = jnp.where((jnp.arange(gamma_max + 1) != current) & (current >= 0), switch_s, 0.0)
    if objective == "tokens":
        total_G = jnp.sum(jnp.where(live_B[:, None], expected_tokens(alpha_B, gamma_max), 0.0), 0)
        per_token_G = jnp.where(total_G > 0, (costs_G + change_G / memory) / total_G, jnp.inf)
        return jnp.argmin(per_token_G).astype(jnp.int32)
    time_G = costs_G * projected_rounds(alpha_B, remaining_B, live_B, gamma_max, max_remaining) + change_G
    largest = gamma_max - jnp.argmin(time_G[::-1])
    return jnp.where(jnp.any(live_B), largest, 0).astype(jnp.int32)


def init_counts(cfg: GoodputConfig, batch: int) -> dict:
    """The per-row moving counts (the prior), and the γ chosen per round."""
    return {"goodput_accepted": jnp.full((batch,), cfg.prior * cfg.prior_weight, jnp.float32),
            "goodput_tested": jnp.full((batch,), cfg.prior_weight, jnp.float32)}


def estimate(stats) -> jax.Array:
    return stats["goodput_accepted"] / stats["goodput_tested"]


def shrunk_estimate(stats, live_B, decay: float) -> jax.Array:
    """[B]: each row's α shrunk toward the live rows' pooled α, by how much of the rows' spread is
    noise (empirical Bayes, the method of moments):

        ᾱ = Σ acc / Σ tried,  v_b = ᾱ (1 − ᾱ) / (tried_b (1 + decay)),
        τ² = max(Σ (α_b − ᾱ)² / (n − 1) − mean v_b, 0),  α̃_b = ᾱ + τ² / (τ² + v_b) · (α_b − ᾱ)

    over the n live rows; v_b is the sampling variance of a ratio of exponential moving counts (a
    position of age k rounds weighs decay^k, so at a steady count per round the counts are worth
    (Σ w)² / Σ w² = tried (1 + decay) independent positions), τ² the variance of the rows' true α.
    With fewer than two live rows the estimate is the row's own. Why: the finish objective is ruled
    by the slowest row, and a row's estimate holds ~40 (γ = 1) to ~110 (γ = 3) positions' worth at
    α = 0.9 and decay 0.95, an sd of 0.05-0.03: per row, it judged a batch of equal rows by the
    unluckiest one's α, and at B = 4 on runs/bench_lm kept to plain decoding where γ = 1 was faster."""
    acc, tried = stats["goodput_accepted"], stats["goodput_tested"]
    alpha_B = acc / tried
    n = jnp.sum(live_B)
    pool = jnp.sum(jnp.where(live_B, acc, 0.0)) / jnp.maximum(jnp.sum(jnp.where(live_B, tried, 0.0)), 1e-30)
    noise_B = pool * (1 - pool) / (tried * (1 + decay))
    spread = jnp.sum(jnp.where(live_B, (alpha_B - pool) ** 2, 0.0)) / jnp.maximum(n - 1, 1)
    between = jnp.maximum(spread - jnp.sum(jnp.where(live_B, noise_B, 0.0)) / jnp.maximum(n, 1), 0.0)
    weight_B = jnp.where(between + noise_B > 0, between / jnp.maximum(between + noise_B, 1e-30), 0.0)
    return jnp.where(n >= 2, pool + weight_B * (alpha_B - pool), alpha_B)


def update_counts(stats, n_B, gamma, live_B, cfg: GoodputConfig) -> dict:
    """After a round with γ drafts and n_B accepted: the moving counts (module docstring)."""
    d = cfg.decay
    tested = (n_B + (n_B < gamma)).astype(jnp.float32)
    acc = jnp.where(gamma > 0, d * stats["goodput_accepted"] + n_B,
                    d * stats["goodput_accepted"] + (1 - d) * cfg.prior * cfg.prior_weight)
    tried = jnp.where(gamma > 0, d * stats["goodput_tested"] + tested,
                      d * stats["goodput_tested"] + (1 - d) * cfg.prior_weight)
    return stats | {"goodput_accepted": jnp.where(live_B, acc, stats["goodput_accepted"]),
                    "goodput_tested": jnp.where(live_B, tried, stats["goodput_tested"])}


def chooser(cfg: GoodputConfig, max_new_tokens: int, costs_G=None, switch_s=None):
    """s -> the γ to run next (`choose_gamma` from the state's per-row estimates — shrunk toward the
    batch's pool with cfg.shrink — tokens left and the
    γ just run). `costs_G`, `switch_s`: traced values instead of cfg.costs and cfg.switch_cost
    (measure_costs forces γ with them)."""
    costs_G = jnp.asarray(cfg.costs, jnp.float32) if costs_G is None else costs_G
    switch_s = jnp.float32(cfg.switch_cost) if switch_s is None else switch_s
    def alpha_B(s):
        return shrunk_estimate(s.stats, ~s.done_B, cfg.decay) if cfg.shrink else estimate(s.stats)

    return lambda s: choose_gamma(alpha_B(s), ~s.done_B, max_new_tokens - s.num_B, costs_G, cfg.objective,
                                  max_new_tokens, switch_s, s.stats.get("goodput_next", -1), 1 / (1 - cfg.decay))


def with_choice(s, choose):
    """The state with its next γ (stats["goodput_next"]), chosen once per round and read by the switch
    and the stretch's loop alike: a second evaluation of the choice, compiled apart, could round a
    near-tie the other way and stop a stretch before its first round."""
    return s.replace(stats=s.stats | {"goodput_next": choose(s)})


def goodput_round(branches, s, cfg: GoodputConfig, more, choose, stretch: bool = True):
    """Run the chosen γ (branches[γ]: the round with γ drafts; `s` from `with_choice`), updating the
    estimates and choosing the next γ after each round. With `stretch`, every γ in turn runs its
    rounds in its own loop for as long as the choice is γ and `more(s)` — the decode loop's own
    condition — holds, so the loop of the chosen γ runs at least one round and the others none: the
    decisions a switch per round (`stretch=False`, `lax.switch` over the branches) would take,
    without paying for it (a switch per plain round cost ~8% of a plain step at B = 16 on
    runs/bench_lm; at B = 1 the goodput decoder forced to γ = 2 ran 1.178× plain against 1.209× for
    fixed γ = 2 with a switch per round, 1.179× against 1.179× with its own loop). The loops follow
    each other in one computation rather than sit in the branches of a `lax.switch`: XLA:CPU copied
    the whole state, every layer's K and V included, into and out of a conditional's branch on each
    change of γ (two copies of the cache a change; none in sequence: tests/test_goodput_costs.py
    counts them). During γ = 0 the counts only move toward the prior."""

    def counted(branch, gamma):
        def run(s):
            out = branch(s)
            stats = update_counts(out.stats, out.stats["accepted"] - s.stats["accepted"], gamma, ~s.done_B, cfg)
            chosen = stats["gamma_chosen"]
            out = out.replace(stats=stats | {"gamma_chosen": chosen.at[jnp.minimum(s.rounds, chosen.shape[0] - 1)]
                                             .set(gamma)})
            return with_choice(out, choose)
        return run

    if not stretch:
        return jax.lax.switch(s.stats["goodput_next"], [counted(b, g) for g, b in enumerate(branches)], s)
    for g, branch in enumerate(branches):  # no first round peeled off a loop: that doubled the code, ~1% at B = 1
        s = jax.lax.while_loop(lambda s, g=g: more(s) & (s.stats["goodput_next"] == g), counted(branch, g), s)
    return s
