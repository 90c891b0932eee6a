"""`processed_logprobs` — the oracle of every speculative-decoding test — against an independent
NumPy implementation written from the definitions (temperature; top-k keeps every token tied with
the k-th largest; top-p keeps the smallest prefix of the sorted distribution whose mass is ≥ p,
ties in sort order broken by the lower token id), on hundreds of random rows with many ties."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from decode.sampling import SamplerConfig, processed_logprobs


def reference_logprobs(logits, temperature: float, top_k: int, top_p: float):
    """One row, float64, loops and sorts only."""
    x = np.asarray(logits, np.float64)
    v = len(x)
    if temperature == 0:
        out = np.full(v, -np.inf)
        out[int(np.argmax(x))] = 0.0  # first maximum
        return out
    x = x / temperature
    keep = np.ones(v, bool)
    if 0 < top_k < v:
        kth = sorted(x, reverse=True)[top_k - 1]
        keep = x >= kth
    if top_p < 1.0:
        z = np.where(keep, x, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        order = sorted(range(v), key=lambda i: (-z[i], i))
        mass, prefix = 0.0, []
        for i in order:  # the smallest prefix whose mass reaches top_p
            prefix.append(i)
            mass += p[i]
            if mass >= top_p:
                break
        keep = np.zeros(v, bool)
        keep[prefix] = True
    z = np.where(keep, x, -np.inf)
    return z - z.max() - np.log(np.sum(np.exp(z[keep] - z.max())))


CONFIGS = [SamplerConfig(t, k, p)
           for t, k, p in itertools.product((0.0, 0.7, 1.0, 1.6), (0, 1, 3, 7), (1.0, 0.3, 0.6, 0.95))
           if not (t == 0.0 and (k or p < 1.0))]


def _rows(seed, n=40, v=9):
    """Random logits, half of the rows drawn from a few integer levels (ties at the top-k and
    top-p boundaries), a few rows with one dominant token."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, v)) * 2.0
    x[: n // 2] = rng.integers(0, 4, size=(n // 2, v)).astype(float)
    x[-3:, 0] = 12.0
    return x.astype(np.float32)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"t{c.temperature}-k{c.top_k}-p{c.top_p}")
def test_processed_logprobs_equals_numpy_reference(cfg):
    x = _rows(hash((cfg.temperature, cfg.top_k, cfg.top_p)) % 2**31)
    got = np.asarray(processed_logprobs(jnp.asarray(x), cfg), np.float64)
    for row, g in zip(x, got, strict=True):
        want = reference_logprobs(row, cfg.temperature, cfg.top_k, cfg.top_p)
        assert (np.isfinite(g) == np.isfinite(want)).all(), (row, g, want)
        np.testing.assert_allclose(g[np.isfinite(g)], want[np.isfinite(want)], atol=2e-5)


def test_reference_hand_cases():
    """Worked by hand: p = [0.5, 0.25, 0.125, 0.125] (logits log p, T = 1)."""
    lp = np.log([0.5, 0.25, 0.125, 0.125])
    # top-p 0.6: 0.5 < 0.6, 0.5 + 0.25 = 0.75 >= 0.6 -> {0, 1}, renormalised 2/3, 1/3
    np.testing.assert_allclose(np.exp(reference_logprobs(lp, 1.0, 0, 0.6)), [2 / 3, 1 / 3, 0, 0])
    # top-p 0.75 exactly reached by {0, 1}: the crossing token is kept, nothing after it
    np.testing.assert_allclose(np.exp(reference_logprobs(lp, 1.0, 0, 0.75)), [2 / 3, 1 / 3, 0, 0])
    # top-k 3 with a tie at the 3rd place keeps both tied tokens
    np.testing.assert_allclose(np.exp(reference_logprobs(lp, 1.0, 3, 1.0)), [0.5, 0.25, 0.125, 0.125])
    # top-k 2 then top-p 0.5: {0, 1} renormalised to 2/3, 1/3; 2/3 >= 0.5 -> {0}
    np.testing.assert_allclose(np.exp(reference_logprobs(lp, 1.0, 2, 0.5)), [1, 0, 0, 0])
    # T = 2 halves the logits: p ∝ sqrt(p) = [0.707, 0.5, 0.354, 0.354] / 1.914
    np.testing.assert_allclose(np.exp(reference_logprobs(lp, 2.0, 0, 1.0)),
                               np.sqrt([0.5, 0.25, 0.125, 0.125]) / np.sqrt([0.5, 0.25, 0.125, 0.125]).sum())
    for cfg, want in [(SamplerConfig(1.0, 0, 0.6), [2 / 3, 1 / 3, 0, 0]), (SamplerConfig(1.0, 3, 1.0), np.exp(lp))]:
        np.testing.assert_allclose(np.exp(np.asarray(processed_logprobs(jnp.asarray([lp], jnp.float32), cfg)[0])),
                                   want, atol=1e-6)
