"""Goodput's acceptance estimate (decode/goodput.py): the per-row moving counts by hand, and the
estimates shrunk toward the batch's pool — by hand, == a NumPy reference, the noise model against
simulated rows, the slowest-row bias it removes, and the chooser reading it."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode import goodput as gp


def test_moving_counts_by_hand():
    """prior 0.6 with weight 2 -> (1.2, 2). γ = 4, 2 accepted (the 3rd rejected), decay 0.8:
    (0.96 + 2, 1.6 + 3) = (2.96, 4.6). γ = 0: toward the prior, (0.8·2.96 + 0.2·1.2, 0.8·4.6 + 0.2·2)
    = (2.608, 4.08). γ = 3, all 3 accepted (no rejected position): (2.0864 + 3, 3.264 + 3)."""
    cfg = gp.GoodputConfig((1.0, 2.0), decay=0.8, prior=0.6, prior_weight=2.0)
    st = gp.init_counts(cfg, 1)
    live = jnp.ones((1,), bool)
    want = [(4, 2, 2.96, 4.6), (0, 0, 2.608, 4.08), (3, 3, 5.0864, 6.264)]
    for gamma, n, acc, tested in want:
        st = gp.update_counts(st, jnp.asarray([n]), jnp.int32(gamma), live, cfg)
        np.testing.assert_allclose([st["goodput_accepted"][0], st["goodput_tested"][0]], [acc, tested], rtol=1e-6)
    frozen = gp.update_counts(st, jnp.asarray([1]), jnp.int32(2), ~live, cfg)  # a finished row keeps its counts
    assert float(frozen["goodput_tested"][0]) == float(st["goodput_tested"][0])


def reference_shrunk(acc, tried, live, decay):
    """Empirical Bayes by the method of moments, float64: pool ᾱ, noise ᾱ(1 − ᾱ) / (tried (1 + d)),
    between-row variance = sample variance − mean noise (≥ 0), α̃ = ᾱ + τ² / (τ² + v) (α − ᾱ)."""
    acc, tried, live = (np.asarray(x, np.float64) for x in (acc, tried, live))
    alpha = acc / tried
    idx = np.flatnonzero(live)
    if len(idx) < 2:
        return alpha
    pool = acc[idx].sum() / tried[idx].sum()
    noise = pool * (1 - pool) / (tried * (1 + decay))
    between = max(np.var(alpha[idx] - pool, mean=0.0) * len(idx) / (len(idx) - 1) - noise[idx].mean(), 0.0)
    w = np.where(between + noise > 0, between / np.maximum(between + noise, 1e-300), 0.0)
    return pool + w * (alpha - pool)


def test_shrunk_estimate_by_hand_and_reference():
    """Two rows, 9 / 10 and 7 / 10 accepted, decay 0: ᾱ = 0.8, v = 0.8 · 0.2 / 10 = 0.016, spread
    0.1² + 0.1² = 0.02, τ² = 0.004, weight 0.2: 0.82 and 0.78. Decay 0.95: v = 0.016 / 1.95, weight
    0.5898: 0.8590 and 0.7410. One live row, or rows that agree: their own estimates. And == the
    NumPy reference on random counts with finished rows."""
    st = {"goodput_accepted": jnp.asarray([9.0, 7.0, 1.0]), "goodput_tested": jnp.asarray([10.0, 10.0, 10.0])}
    live = jnp.asarray([True, True, False])
    np.testing.assert_allclose(gp.shrunk_estimate(st, live, 0.0)[:2], [0.82, 0.78], rtol=1e-5)
    np.testing.assert_allclose(gp.shrunk_estimate(st, live, 0.95)[:2], [0.85897, 0.74103], rtol=1e-4)
    np.testing.assert_allclose(gp.shrunk_estimate(st, jnp.asarray([True, False, False]), 0.95), [0.9, 0.7, 0.1])
    same = {"goodput_accepted": jnp.asarray([9.0, 9.0]), "goodput_tested": jnp.asarray([10.0, 10.0])}
    np.testing.assert_allclose(gp.shrunk_estimate(same, jnp.ones((2,), bool), 0.9), [0.9, 0.9], rtol=1e-6)
    rng = np.random.default_rng(0)
    for _ in range(20):
        b = int(rng.integers(1, 9))
        tried = rng.uniform(2, 60, b)
        acc = tried * rng.uniform(0.3, 1.0, b)
        live = rng.random(b) < 0.8
        got = gp.shrunk_estimate({"goodput_accepted": jnp.asarray(acc, jnp.float32),
                                  "goodput_tested": jnp.asarray(tried, jnp.float32)}, jnp.asarray(live), 0.9)
        np.testing.assert_allclose(got, reference_shrunk(acc, tried, live, 0.9), rtol=1e-4, atol=1e-5)


def _simulated_counts(alpha_R, gamma, rounds, decay, key):
    """The moving counts of rows with true acceptance alpha_R after `rounds` rounds of γ drafts."""
    cfg = gp.GoodputConfig((1.0,) * (gamma + 1), decay=decay)
    live = jnp.ones(alpha_R.shape, bool)

    def body(st, k):
        ok = jax.random.uniform(k, (gamma, *alpha_R.shape)) < alpha_R
        n = jnp.sum(jnp.cumprod(ok, axis=0), axis=0)  # accepted: the run of successes
        return gp.update_counts(st, n, jnp.int32(gamma), live, cfg), None
    st, _ = jax.lax.scan(body, gp.init_counts(cfg, alpha_R.shape[0]), jax.random.split(key, rounds))
    return st


@pytest.mark.parametrize("gamma", [1, 3])
def test_shrink_noise_model_matches_simulation(gamma):
    """The sampling variance the shrinkage assumes, α(1 − α) / (tried (1 + decay)), == the spread of
    simulated rows' estimates within 12% (α = 0.9, decay 0.95, 4096 rows after 200 rounds); without
    the (1 + decay) it would be 1.95× too large."""
    st = _simulated_counts(jnp.full((4096,), 0.9), gamma, 200, 0.95, jax.random.key(gamma))
    est = np.asarray(gp.estimate(st))
    model = np.mean(0.9 * 0.1 / (np.asarray(st["goodput_tested"]) * 1.95))
    np.testing.assert_allclose(np.var(est), model, rtol=0.12)


def test_shrink_removes_the_slowest_row_bias():
    """Batches of 4 rows (γ = 1, decay 0.95, 200 rounds): equal rows at α = 0.9 — the lowest raw
    estimate is 0.05 below the truth on average, the lowest shrunk one 0.01; rows that really
    differ (0.6, 0.75, 0.9, 0.95, noise variance 0.002 against 0.018 between them) are pulled ~12%
    of the way to the pool, keeping ~90% of their spread."""
    shrink = jax.vmap(lambda a, t: gp.shrunk_estimate({"goodput_accepted": a, "goodput_tested": t},
                                                      jnp.ones((4,), bool), 0.95))
    for truth, key in (([0.9] * 4, 0), ([0.6, 0.75, 0.9, 0.95], 1)):
        st = _simulated_counts(jnp.tile(jnp.asarray(truth), 1024), 1, 200, 0.95, jax.random.key(key))
        acc, tried = (st[k].reshape(1024, 4) for k in ("goodput_accepted", "goodput_tested"))
        raw, shrunk = np.asarray(acc / tried), np.asarray(shrink(acc, tried))
        if len(set(truth)) == 1:
            assert 0.04 < 0.9 - raw.min(1).mean() and abs(0.9 - shrunk.min(1).mean()) < 0.02
        else:
            np.testing.assert_allclose(shrunk.mean(0), truth, atol=0.04)
            assert np.ptp(shrunk.mean(0)) > 0.8 * np.ptp(truth)


def test_chooser_reads_the_shrunk_estimates():
    """The round costs measured at B = 4 on runs/bench_lm (5.8, 10.6, 15.8, 21.5 ms), 64 tokens left,
    rows at 0.93 / 0.9 / 0.9 / 0.87 from 20 tested positions each (decay 0.95): their spread is
    less than the sampling noise, so all four are 0.9 shrunk, and γ = 1 is the faster finish; by
    the raw estimates the 0.87 row rules the finish time and the choice is plain decoding."""
    stats = {"goodput_accepted": jnp.asarray([0.93, 0.9, 0.9, 0.87]) * 20, "goodput_tested": jnp.full((4,), 20.0)}
    s = types.SimpleNamespace(stats=stats, done_B=jnp.zeros((4,), bool), num_B=jnp.zeros((4,), jnp.int32))
    np.testing.assert_allclose(gp.shrunk_estimate(stats, ~s.done_B, 0.95), [0.9] * 4, rtol=1e-6)
    costs = (5.8, 10.6, 15.8, 21.5)
    assert int(gp.chooser(gp.GoodputConfig(costs), 64)(s)) == 1
    assert int(gp.chooser(gp.GoodputConfig(costs, shrink=False), 64)(s)) == 0
