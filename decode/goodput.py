"""Goodput-chosen speculation length (SmartSpec, Liu et al. 2024): per round, one γ ∈ {0, …, γ_max}
for the whole batch, the one that maximises goodput — expected emitted tokens per second,

    γ* = argmax_γ  Σ_{live rows b} E_b(γ) / cost(γ),   E_b(γ) = 1 + α_b + … + α_b^γ = (1 − α_b^{γ+1}) / (1 − α_b),

with α_b the row's estimated per-position acceptance and cost(γ) the measured seconds of a round
with γ drafts at this batch size (γ = 0: a plain one-token target step, no draft, sampled straight
from the target's logits). The round runs as `lax.switch` over γ_max + 1 compiled round bodies, so a
small γ really costs less; each γ runs its rounds in an inner loop for as long as the choice stays
(`goodput_round`), so a batch that stopped speculating decodes at plain decoding's speed and one that
keeps a γ at that fixed γ's (a switch per round cost ~8% of a plain step at B = 16). The costs are
timed through this decoder itself (`goodput_costs.measure_costs`), with what it pays around a branch.

The acceptance is estimated per row, not over the batch: rows differ (prompt, content, how far
they are), E is convex in α so an averaged α misjudges the summed E, and a row that finished
stops counting. The estimate is a ratio of exponential moving counts, acc / tried, where a round
with n of γ drafts accepted adds n accepted and n + [n < γ] tested positions (the rejected one
counts; the ratio is the maximum-likelihood α of a geometric run), after both counts are multiplied by
`decay`. Rounds without drafts (γ* = 0) carry no evidence; they pull the counts toward the prior
(α₀, weight w) instead, so a batch that stopped speculating tries again once the evidence that
stopped it has faded. The prior is optimistic (α₀ = 1) by default: with α₀ = 0.6 on
`runs/bench_lm` goodput chose γ = 0 from the first round and never saw that the F/8 draft is
accepted ~90% of the time (fixed γ = 3 ran 1.21× plain, goodput 0.98×).

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


@dataclasses.dataclass(frozen=True)
class GoodputConfig:
    """costs: seconds (any unit) of a round with γ = 0, 1, …, γ_max drafts at the batch size in use;
    decay: the weight of the past per round; prior α₀ and its weight w in tested positions."""

    costs: tuple[float, ...]
    decay: float = 0.8
    prior: float = 1.0  # optimistic: speculate first, then let the evidence decide (a pessimistic
    prior_weight: float = 2.0  # prior never speculates, so it never learns that speculation pays)

    def __post_init__(self):
        object.__setattr__(self, "costs", tuple(float(c) for c in self.costs))
        if len(self.costs) < 2 or any(not c > 0 for c in self.costs):
            raise ConfigError(f"goodput costs need γ_max + 1 >= 2 positive values (γ = 0 … γ_max), got {self.costs}")
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"goodput decay must be in [0, 1), got {self.decay}")
        if not 0.0 <= self.prior <= 1.0 or not self.prior_weight > 0:
            raise ConfigError(f"goodput prior must be in [0, 1] with a positive weight, got {self.prior}, "
                              f"{self.prior_weight}")

    @property
    def gamma_max(self) -> int:
        return len(self.costs) - 1


def expected_tokens(alpha_B, gamma_max: int):
    """[B, γ_max + 1]: tokens a round with γ drafts emits in expectation, 1 + α + … + α^γ."""
    g = jnp.arange(gamma_max + 1, dtype=jnp.float32)
    powers = alpha_B[:, None].astype(jnp.float32) ** g  # α^0 … α^γmax
    return jnp.cumsum(powers, axis=1)


def choose_gamma(alpha_B, live_B, costs_G):
    """The γ maximising Σ_live E_b(γ) / cost(γ) (the smallest on ties); 0 when no row is live."""
    total_G = jnp.sum(jnp.where(live_B[:, None], expected_tokens(alpha_B, costs_G.shape[0] - 1), 0.0), 0)
    return jnp.argmax(total_G / costs_G).astype(jnp.int32)


def init_counts(cfg: GoodputConfig, batch: int) -> dict:
    """The per-row moving counts (the prior), and the γ chosen per round."""
    return {"goodput_accepted": jnp.full((batch,), cfg.prior * cfg.prior_weight, jnp.float32),
            "goodput_tested": jnp.full((batch,), cfg.prior_weight, jnp.float32)}


def estimate(stats) -> jax.Array:
    return stats["goodput_accepted"] / stats["goodput_tested"]


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


def goodput_round(branches, s, cfg: GoodputConfig, more, costs_G=None):
    """Choose γ and run it (branches[γ]: the round with γ drafts), updating the estimates after
    each round. Each γ runs its rounds in an inner loop for as long as the choice stays γ and
    `more(s)` (the decode loop's own condition) holds: the decisions the loop would take round by
    round — during γ = 0 the counts only move toward the prior — without a switch per round (a
    switch per plain round cost ~8% of a plain step at B = 16 on runs/bench_lm; at B = 1 the goodput
    decoder forced to γ = 2 ran 1.178× plain against 1.209× for fixed γ = 2 with a switch per round,
    1.179× against 1.179× with its own loop). `costs_G`: a traced cost vector instead
    of cfg.costs (measure_costs forces γ with it)."""
    costs_G = jnp.asarray(cfg.costs, jnp.float32) if costs_G is None else costs_G
    choose = lambda s: choose_gamma(estimate(s.stats), ~s.done_B, costs_G)  # noqa: E731

    def counted(branch, gamma):
        def run(s):
            out = branch(s)
            stats = update_counts(out.stats, out.stats["accepted"] - s.stats["accepted"], gamma, ~s.done_B, cfg)
            chosen = stats["gamma_chosen"]
            return out.replace(stats=stats | {"gamma_chosen": chosen.at[jnp.minimum(s.rounds, chosen.shape[0] - 1)]
                                              .set(gamma)})
        return run

    def stretch(g):
        body = counted(branches[g], g)
        return lambda s: jax.lax.while_loop(lambda s: more(s) & (choose(s) == g), body, body(s))

    return jax.lax.switch(choose(s), [stretch(g) for g in range(len(branches))], s)
