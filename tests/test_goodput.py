"""Goodput-chosen speculation (decode/goodput.py): the choice == the argmax of SmartSpec's formula
by a NumPy reference, its two limits worked by hand, and end to end through the real `lax.switch`
loop: greedy == plain greedy and the sampled output law unchanged (chi-square) while γ changes
from round to round. The acceptance estimate: test_goodput_estimate.py."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optimized_jit
import pytest
import scipy.stats
from flax import nnx
from test_speculative import (
    ALPHA,
    GREEDY,
    LENGTH,
    PROMPT,
    PROMPTS,
    SMALL,
    TOY,
    TOY_SAMPLER,
    TRIALS,
    _batch,
    _fresh_next_logits,
    _pvalue,
    _toy,
)

from decode import generate as plain
from decode import goodput as gp
from decode import goodput_costs
from decode import speculative as spec
from decode.sampling import SamplerConfig
from spark.errors import ConfigError
from spark.model import Transformer


def change(g, current, switch):
    return switch if current >= 0 and g != current else 0.0


def reference_choice(alpha, live, costs, switch=0.0, current=-1, memory=1.0):
    """argmax_γ Σ_live (1 − α^{γ+1}) / (1 − α) / (cost(γ) + switch / memory if γ ≠ current) (α = 1: γ + 1),
    float64, first on ties."""
    best, arg = -1.0, 0
    for g, c in enumerate(costs):
        e = [(g + 1.0) if a == 1.0 else (1.0 - a ** (g + 1)) / (1.0 - a) for a, ok in zip(alpha, live, strict=True)
             if ok]
        rate = sum(e) / (c + change(g, current, switch) / memory)
        if rate > best * (1 + 1e-6):
            best, arg = rate, g
    return arg


def reference_moments(a, r, g):
    """Mean and variance of the rounds for r tokens at γ drafts, float64, by the recursion over
    the first round: R(r) = 1 + R(r − X), R(≤ 0) = 0, P(X = k) = α^{k-1} (1 − α) (k <= γ), α^γ (k = γ + 1)."""
    p = [a ** (k - 1) * (1 - a) for k in range(1, g + 1)] + [a ** g]
    m, q = [0.0] * (r + 1), [0.0] * (r + 1)
    for j in range(1, r + 1):
        m[j] = 1 + sum(pk * m[max(j - k, 0)] for k, pk in enumerate(p, 1))
        q[j] = 1 + sum(pk * (2 * m[max(j - k, 0)] + q[max(j - k, 0)]) for k, pk in enumerate(p, 1))
    return m[r], q[r] - m[r] ** 2


def reference_rounds(alpha, remaining, live, gmax):
    """The batch's projected rounds to finish per γ: max over live rows of mean + κ_n sd, a running minimum."""
    out, n = [], sum(live)
    kappa = 0.0 if n <= 1 else float(scipy.stats.norm.ppf((n - 0.375) / (n + 0.25)))
    for g in range(gmax + 1):
        worst = 0.0
        for a, r, ok in zip(alpha, remaining, live, strict=True):
            if ok:
                m, var = reference_moments(a, int(r), g)
                worst = max(worst, m + kappa * math.sqrt(max(var, 0.0)))
        out.append(worst if not out else min(worst, out[-1]))
    return out


def reference_finish_times(alpha, remaining, live, costs, switch=0.0, current=-1):
    rounds = reference_rounds(alpha, remaining, live, len(costs) - 1)
    return [c * r + change(g, current, switch) for g, (c, r) in enumerate(zip(costs, rounds, strict=True))]


def reference_finish_choice(alpha, remaining, live, costs, switch=0.0, current=-1):
    """argmin_γ cost(γ) · projected rounds (+ switch if γ ≠ current), the largest on ties (within
    1e-9 relative); 0 if none is live."""
    if not any(live):
        return 0
    t = reference_finish_times(alpha, remaining, live, costs, switch, current)
    return max(g for g, x in enumerate(t) if x <= min(t) * (1 + 1e-9))


@pytest.mark.parametrize("objective", ["tokens", "finish"])
def test_choice_equals_numpy_reference(objective):
    """Random estimates, rows, costs; half the draws with a switch cost and a γ just run."""
    rng = np.random.default_rng(0)
    checked, choose = 0, jax.jit(gp.choose_gamma, static_argnames=("objective", "max_remaining", "memory"))
    for i in range(300):  # three shapes: one compile each
        b, gmax = 5, rng.choice([1, 3, 6])
        alpha = rng.choice([0.0, 1.0, *rng.uniform(0, 1, 4)], size=b)
        live = rng.uniform(size=b) < 0.8
        left = rng.integers(1, 200, size=b)
        costs = np.cumsum(rng.uniform(0.05, 1.0, gmax + 1))  # a round with more drafts costs more
        switch, current = (rng.uniform(0, 2.0), int(rng.integers(-1, gmax + 1))) if i % 2 else (0.0, -1)
        got = int(choose(jnp.asarray(alpha, jnp.float32), jnp.asarray(live), jnp.asarray(left),
                         jnp.asarray(costs, jnp.float32), objective=objective, max_remaining=200,
                         switch_s=jnp.float32(switch), current=jnp.int32(current), memory=4.0))
        if objective == "tokens":
            want = reference_choice(alpha, live, costs, switch, current, 4.0)
        else:
            t = sorted(reference_finish_times(alpha, left, live, costs, switch, current))
            if any(live) and t[1] < t[0] * (1 + 1e-4):  # float32 cannot tell these apart
                continue
            want = reference_finish_choice(alpha, left, live, costs, switch, current)
        checked += 1
        assert got == want, (alpha, live, left, costs, switch, current)
    assert checked > 250


def test_switch_cost_by_hand():
    """B = 1, α = 0.9, 20 tokens left, round costs 1.29, 2.156, 3.023, 3.808 (runs/bench_lm, B = 1, ms).
    Finish: the rounds at γ = 0…3 are 20, 10.745, 7.726, 6.165 (the recursion R(r) = 1 + Σ_k p_k R(r − k)),
    so the times are 25.8, 23.167, 23.356, 23.477: γ = 1. After a γ = 3 round a change costing 0.5
    makes them 26.3, 23.667, 23.856, 23.477: γ = 3 stays; a change of 0.2 does not (23.367 < 23.477);
    with no γ run yet nothing is charged. Tokens (per token 1.29, 1.135, 1.116, 1.107 with E = 1,
    1.9, 2.71, 3.439: γ = 3) after a γ = 1 round, over a memory of 20 rounds: a change of 2.0 adds
    0.1 to every other round, (3.808 + 0.1) / 3.439 = 1.136 > 1.135: γ = 1 stays; 1.5 adds 0.075:
    1.129 < 1.135, γ = 3."""
    costs = jnp.asarray([1.29, 2.156, 3.023, 3.808])
    a, live, left = jnp.asarray([0.9]), jnp.asarray([True]), jnp.asarray([20])

    def pick(objective, switch, current):
        return int(gp.choose_gamma(a, live, left, costs, objective, 64, jnp.float32(switch), jnp.int32(current), 20.0))
    assert pick("finish", 0.0, 3) == 1 and pick("finish", 0.5, 3) == 3 and pick("finish", 0.2, 3) == 1
    assert pick("finish", 0.5, -1) == 1
    assert pick("tokens", 0.0, 1) == 3 and pick("tokens", 2.0, 1) == 1 and pick("tokens", 1.5, 1) == 3


@pytest.mark.parametrize("objective", ["tokens", "finish"])
@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.9, 1.0])  # α^γmax must register in float32 against 1
def test_limits_by_hand(alpha, objective):
    """Free drafts and a verify whose cost does not depend on γ: γ_max for any α > 0. A verify of
    γ + 1 tokens costing γ + 1 plain steps and drafts that cost anything: 0 for any α (a round
    emits at most γ + 1 tokens for (γ + 1)·c + γ·d > (γ + 1)·c seconds; the projected rounds are at
    least r / (γ + 1) where γ = 0 needs exactly r). Rows with 1, 30 and 64 tokens left;
    0 when no row is live."""
    a, live, left = jnp.full((3,), alpha, jnp.float32), jnp.ones((3,), bool), jnp.asarray([1, 30, 64])
    assert int(gp.choose_gamma(a, live, left, jnp.ones((6,)), objective, 64)) == 5
    g = jnp.arange(6, dtype=jnp.float32)
    assert int(gp.choose_gamma(a, live, left, (g + 1) * 1.0 + g * 0.01, objective, 64)) == 0
    assert int(gp.choose_gamma(a, ~live, left, jnp.ones((6,)), objective, 64)) == 0  # no row live


def test_projected_rounds_by_hand():
    """One row, α = 1/2, γ = 1 (a round emits 1 or 2 tokens, each w.p. 1/2). 2 tokens left: one
    round w.p. 1/2, else two: mean 3/2, variance 1/4. 3 left: the first round leaves 2 (then 1 or 2
    more) or 1 (then 1 more): R = 2 w.p. 3/4, 3 w.p. 1/4 — mean 9/4, variance 3/16. γ = 0: exactly r.
    1 token left: one round whatever γ. Four rows, α = 0.9, γ = 3, 64 left: the recursion's mean and
    variance with Blom's κ_4 = Φ⁻¹(3.625 / 4.25) = 1.0491."""
    one = jnp.ones((1,), bool)
    mean, var = gp.rounds_moments(jnp.asarray([0.5, 0.5]), jnp.asarray([2, 3]), 1, 3)
    np.testing.assert_allclose(mean, [[2.0, 1.5], [3.0, 2.25]], rtol=1e-6)
    np.testing.assert_allclose(var, [[0.0, 0.25], [0.0, 0.1875]], atol=1e-6)
    np.testing.assert_allclose(gp.projected_rounds(jnp.asarray([0.9]), jnp.asarray([1]), one, 3, 1), [1.0] * 4)
    r = gp.projected_rounds(jnp.full((4,), 0.9), jnp.full((4,), 64), jnp.ones((4,), bool), 3, 64)
    m, v = reference_moments(0.9, 64, 3)
    np.testing.assert_allclose(r[3], m + 1.0491 * math.sqrt(v), rtol=2e-4)
    # finished rows neither count nor widen the maximum: 2 live of 4 == those 2 alone (κ_2, not κ_4)
    a, left = jnp.asarray([0.9, 0.5, 0.8, 0.7]), jnp.asarray([64, 64, 40, 0])
    np.testing.assert_allclose(gp.projected_rounds(a, left, jnp.asarray([True, False, True, False]), 3, 64),
                               gp.projected_rounds(a[::2], left[::2], jnp.ones((2,), bool), 3, 64), rtol=1e-6)


def test_rounds_moments_equal_the_recursion():
    """The matrix powers == the float64 recursion for every r up to 300 (9 bits) and α from 0 to 1."""
    alphas, gmax = np.asarray([0.0, 0.3, 0.75, 0.94, 1.0]), 3
    r = np.arange(1, 301)
    mean, var = gp.rounds_moments(jnp.asarray(np.repeat(alphas, len(r))), jnp.asarray(np.tile(r, len(alphas))),
                                  gmax, 300)
    want = np.asarray([[reference_moments(a, int(x), g) for g in range(gmax + 1)] for a in alphas for x in r])
    np.testing.assert_allclose(mean, want[..., 0], rtol=1e-5)
    np.testing.assert_allclose(np.sqrt(var), np.sqrt(want[..., 1]), rtol=1e-3, atol=2e-2)


def simulated_rounds(alpha, remaining, batch, gamma, trials=4000, seed=0):
    """Monte Carlo: rounds until every row of the batch emitted `remaining` tokens, each round
    emitting 1 + the accepted prefix of γ drafts, each accepted with probability α."""
    rng = np.random.default_rng(seed)
    emitted, rounds = np.zeros((trials, batch)), np.zeros(trials)
    while (emitted < remaining).any():
        live = (emitted < remaining).any(1)
        accepted = np.cumprod(rng.uniform(size=(trials, batch, gamma)) < alpha, axis=2).sum(2)
        emitted += 1 + accepted
        rounds += live
    return rounds.mean()


@pytest.mark.parametrize("alpha", [0.6, 0.9])
def test_projected_rounds_match_simulation(alpha):
    """The projection == the mean of simulated static batches within 2% (B = 1, 4, 16; γ = 1, 3;
    64 tokens): what makes the straggler effect real — at α = 0.9, γ = 3 a batch of 4 needs 9%
    more rounds than 64 / E X, a batch of 16 needs 15% more."""
    for b in (1, 4, 16):
        proj = gp.projected_rounds(jnp.full((b,), alpha), jnp.full((b,), 64), jnp.ones((b,), bool), 3, 64)
        for g in (1, 3):
            np.testing.assert_allclose(float(proj[g]), simulated_rounds(alpha, 64, b, g), rtol=0.02,
                                       err_msg=f"B={b} γ={g}")


def test_finish_objective_on_a_static_batch_of_four():
    """The costs measured at B = 4 on runs/bench_lm (1.93, 3.76, 5.44, 6.95 ms) and α = 0.94:
    SmartSpec's summed tokens rate γ = 3 above plain decoding (4 · 3.65 / 6.95 > 4 / 1.93), the
    batch's finish time does not (γ = 3 needs 18.9 rounds of 6.95 ms against 63 of 1.93 ms) —
    and forced γ = 3 ran 0.91× forced γ = 0 there; one row alone keeps speculating."""
    costs, a = jnp.asarray([1.93, 3.76, 5.44, 6.95]), jnp.full((4,), 0.94)
    live, left = jnp.ones((4,), bool), jnp.full((4,), 63)
    assert int(gp.choose_gamma(a, live, left, costs, "tokens", 63)) == 3
    assert int(gp.choose_gamma(a, live, left, costs, "finish", 63)) == 0
    one = jnp.ones((1,), bool)
    assert int(gp.choose_gamma(a[:1], one, left[:1], jnp.asarray([1.2, 2.1, 2.7, 3.5]), "finish", 63)) >= 2


def _round_then(g, r, t, alpha, costs):
    """E seconds of a round with γ = g drafts, r tokens left, plus t[tokens left after it]: the
    round emits k + 1 tokens with the geometric law, α^k (1 − α) for k < γ, α^γ for k = γ."""
    return costs[g] + sum(alpha**k * (1 - alpha if k < g else 1) * t[max(r - k - 1, 0)] for k in range(g + 1))


def _expected_time(policy, alpha, costs, n):
    """E seconds to emit n tokens at B = 1 when the round with r tokens left has γ = policy(r, t)
    drafts (t: the expected times of fewer tokens left)."""
    t = np.zeros(n + 1)
    for r in range(1, n + 1):
        t[r] = _round_then(policy(r, t), r, t, alpha, costs)
    return t[n]


@pytest.mark.parametrize("alpha", [0.9, 0.95])
def test_finish_choices_are_near_the_optimal_policy(alpha):
    """At B = 1 the finish objective projects one γ for every remaining round, so near the end its
    choice follows the lattice of round sizes (0, 1, 2, 1, 0, … for 1, 2, 3, … tokens left at
    α = 0.93): the expected time of those choices is within 1% of the optimal policy's (a dynamic
    program over the tokens left), and strictly better than the best fixed γ — with the round costs
    measured at B = 1 on runs/bench_lm."""
    costs, n = np.array([1.3, 2.3, 3.2, 4.1]), 64
    left = jnp.arange(1, n + 1)
    choose = jax.vmap(lambda r: gp.choose_gamma(jnp.full((1,), alpha), jnp.ones((1,), bool), r[None],
                                                jnp.asarray(costs, jnp.float32), "finish", n))
    picks = np.asarray(choose(left))

    def best_now(r, t):  # the optimal policy: the γ whose round plus the optimal rest is shortest
        return int(np.argmin([_round_then(g, r, t, alpha, costs) for g in range(4)]))
    optimal = _expected_time(best_now, alpha, costs, n)
    finish = _expected_time(lambda r, t: int(picks[r - 1]), alpha, costs, n)
    fixed = min(_expected_time(lambda r, t, g=g: g, alpha, costs, n) for g in range(4))
    assert optimal - 1e-9 <= finish <= optimal / 0.99 and finish < fixed, (optimal, finish, fixed)


def test_bad_configs():
    with pytest.raises(ConfigError, match="γ_max"):
        spec.SpecConfig(gamma=3, goodput=gp.GoodputConfig((1.0, 2.0)))
    with pytest.raises(ConfigError, match="shared draft cache"):
        spec.SpecConfig(gamma=1, draft_cache="separate", goodput=gp.GoodputConfig((1.0, 2.0)))
    with pytest.raises(ConfigError, match="positive"):
        gp.GoodputConfig((1.0, 0.0))
    sc = spec.SpecConfig(gamma=3, goodput=gp.GoodputConfig((1.0,) * 4))
    with pytest.raises(ConfigError, match="max_new_tokens >= 10"):  # 2 rounds of γ_max + 1 tokens, and the first
        goodput_costs.measure_costs(None, None, None, None, spec=sc, sampler=None, max_new_tokens=9)
    with pytest.raises(ConfigError, match="needs a SpecConfig with goodput"):
        goodput_costs.measure_costs(None, None, None, None, spec=spec.SpecConfig(), sampler=None, max_new_tokens=20)


VARYING = (1.0, 1.45, 1.8)  # near the break-even of γ = 0 / 1 / 2 at the toy's acceptance: γ moves (by the
# summed tokens: by the finish time, a batch of TRIALS rows always waits for its slowest row, so it never speculates)


def test_greedy_equals_plain_greedy_while_gamma_varies():
    graphdef, params = nnx.split(Transformer(SMALL, nnx.Rngs(0)))
    prompts = [[5, 9, 2, 44, 17, 3, 8], [11, 4, 30], [7, 7, 1, 60, 2]]
    arr, lengths = _batch(prompts)
    kw = dict(max_new_tokens=20, sampler=GREEDY, eos_id=-1, pad_id=0)
    ref, _, _ = plain.generate(graphdef, params, arr, lengths, jax.random.key(0), **kw)
    sc = spec.SpecConfig(draft_widths=SMALL.granularity_widths(8), gamma=2,  # 3 branches: compile time
                         goodput=gp.GoodputConfig((1.0, 1.5, 2.0), prior=0.95, decay=0.5,
                                                  shrink=False))  # the γ sequence below: rows' own estimates
    out, num, st = spec.generate(graphdef, params, arr, lengths, jax.random.key(1), spec=sc, **kw)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    assert np.asarray(num).tolist() == [20] * 3  # every branch stops a row at max_new_tokens
    chosen = np.asarray(st["gamma_chosen"])
    c = chosen.tolist()  # stretches of plain rounds between speculative ones
    assert any(c[i:i + 3] == [2, 0, 0] for i in range(len(c))) and c.index(2, c.index(0)) > 0, c


def test_sampled_law_unchanged_while_gamma_varies():
    graphdef, params = _toy()
    sc = spec.SpecConfig(draft_widths=TOY.granularity_widths(8), gamma=2,
                         goodput=gp.GoodputConfig(VARYING, objective="tokens", prior=0.6))
    run = optimized_jit.jit(functools.partial(spec.goodput_generate.__wrapped__, graphdef, max_new_tokens=LENGTH,
                                              sampler=TOY_SAMPLER, eos_id=-1, pad_id=0, spec=spec.goodput_static(sc),
                                              widths=None, sparse=True))
    out, num, st = run(params, jnp.asarray(np.tile(PROMPT, (TRIALS, 1)), jnp.int32),
                       jnp.full((TRIALS,), len(PROMPT), jnp.int32), jax.random.key(0), jnp.asarray(VARYING),
                       jnp.int32(LENGTH), jnp.float32(0.0))
    chosen = np.asarray(st["gamma_chosen"])
    assert len(set(chosen[chosen >= 0].tolist())) >= 2, chosen
    assert (np.asarray(num) == LENGTH).all()
    assert _pvalue([tuple(r) for r in np.asarray(out).tolist()]) > ALPHA


def test_plain_stretch_equals_a_switch_per_round():
    """Each γ runs its rounds in an inner loop while the choice stays: the same decisions, draws
    and tokens as choosing anew each round (the reference: the same decoder with a switch per round,
    `stretch=False`). Sampled (T = 1), so a draw taken with another key would show."""
    graphdef, params = nnx.split(Transformer(SMALL, nnx.Rngs(0)))
    arr, lengths = _batch(PROMPTS)
    cfg = gp.GoodputConfig((1.0, 1.7, 2.3), decay=0.5, shrink=False)  # the prior 1 ends stretches (rows' own α)
    sc = spec.SpecConfig(draft_widths=SMALL.granularity_widths(8), gamma=2, goodput=cfg)
    n, key, sampler = 40, jax.random.key(0), SamplerConfig(temperature=1.0)  # a key whose run has both stretches
    out, num, st = spec.generate(graphdef, params, arr, lengths, key, max_new_tokens=n, sampler=sampler, eos_id=-1,
                                 pad_id=0, spec=sc)

    @jax.jit
    def per_round(params):
        model, drafter, s_cfg, widths = spec.models(graphdef, params, sc, None)
        kw = dict(sampler=sampler, eos_id=-1, pad_id=0, widths=widths)
        s = spec.spec_prefill(model, arr, lengths, key, max_new_tokens=n, spec=s_cfg, drafter=drafter, **kw)
        choose = gp.chooser(cfg, n)
        step = functools.partial(gp.goodput_round, spec.branches(model, drafter, s_cfg, sparse=True, **kw), cfg=cfg,
                                 more=None, choose=choose, stretch=False)  # a switch per round
        s = jax.lax.while_loop(lambda s: (s.rounds < n) & ~jnp.all(s.done_B), step,
                               spec.with_goodput_stats(s, cfg, n, choose))
        next_logits = model(s.pending_B[:, None], s.cache.lengths[:, None], cache=s.cache, widths=widths)[0][:, -1]
        return s.tokens_BN[:, :n], s.num_B, s.stats["gamma_chosen"], next_logits, s.cache.lengths

    ref_out, ref_num, ref_chosen, next_logits, cached = per_round(params)
    chosen = np.asarray(st["gamma_chosen"])
    c = chosen.tolist()
    assert any(c[i:i + 3] == [0, 0, 2] for i in range(len(c))), c  # a stretch of two plain rounds ended
    assert any(c[i] == c[i + 1] > 0 for i in range(len(c) - 1)), c  # and one of two γ >= 1 rounds
    np.testing.assert_array_equal(chosen, np.asarray(ref_chosen))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
    np.testing.assert_array_equal(np.asarray(num), np.asarray(ref_num))
    # the cache the plain and speculative rounds left == a fresh forward over the emitted tokens
    seqs = [p + np.asarray(ref_out[b, : ref_num[b]]).tolist() for b, p in enumerate(PROMPTS)]
    assert [len(x) for x in seqs] == (np.asarray(cached) + 1).tolist()
    np.testing.assert_allclose(np.asarray(next_logits), _fresh_next_logits(graphdef, params, seqs), atol=1e-4,
                               rtol=1e-4)
