"""`processed_logprobs` — the oracle of every speculative-decoding test — against an independent
NumPy implementation written from the definitions (temperature; top-k keeps every token tied with
the k-th largest; top-p keeps the smallest prefix of the sorted distribution whose mass is ≥ p,
ties in sort order broken by the lower token id), on hundreds of random rows with many ties."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode import sampling
from decode.sampling import SamplerConfig, processed_logprobs
from tests.test_speculative import ALPHA, POWER, chisquare_pvalue


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


# ---------------------------------------------------------------- typical_p against Hugging Face

TYPICAL = [SamplerConfig(t, k, p, typical_p=tau, min_tokens_to_keep=m)
           for t, k, p, tau, m in [(1.0, 0, 1.0, 0.2, 1), (1.0, 0, 1.0, 0.5, 1), (0.7, 0, 1.0, 0.9, 1),
                                   (1.3, 0, 1.0, 0.95, 1), (1.0, 0, 1.0, 0.3, 3), (0.8, 4, 1.0, 0.6, 1),
                                   (1.0, 0, 0.8, 0.5, 1), (1.0, 5, 0.7, 0.4, 2), (1.0, 2, 0.5, 0.9, 3)]]


def hf_logprobs(logits, cfg: SamplerConfig):
    """transformers' warpers in generate()'s order: temperature, top-k, top-p, typical."""
    import torch
    from transformers.generation import logits_process as lp

    x = torch.tensor(np.asarray(logits, np.float32))
    warpers = [lp.TemperatureLogitsWarper(cfg.temperature)]
    m = cfg.min_tokens_to_keep
    if cfg.top_k:
        warpers.append(lp.TopKLogitsWarper(cfg.top_k, min_tokens_to_keep=m))
    if cfg.top_p < 1.0:
        warpers.append(lp.TopPLogitsWarper(cfg.top_p, min_tokens_to_keep=m))
    if cfg.typical_p < 1.0:
        warpers.append(lp.TypicalLogitsWarper(cfg.typical_p, min_tokens_to_keep=m))
    for w in warpers:
        x = w(None, x)
    return torch.log_softmax(x, -1).numpy()


def _typical_rows(seed, n=60, v=11):
    """Random rows, a few nearly flat, a few peaked, and rows of integer levels: ties at the
    threshold (equal probabilities), and pairs tied in |−log p − H| with different probabilities
    (the order of such a pair decides nothing: the cut is by value)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, v)) * rng.choice([0.05, 1.0, 3.0], size=(n, 1))
    x[: n // 3] = rng.integers(0, 3, size=(n // 3, v))
    x[-4:, 0] = 9.0
    return x.astype(np.float32)


@pytest.mark.parametrize("cfg", TYPICAL, ids=lambda c: f"t{c.temperature}-k{c.top_k}-p{c.top_p}-tau{c.typical_p}"
                         f"-m{c.min_tokens_to_keep}")
def test_typical_p_equals_transformers(cfg):
    x = _typical_rows(int(cfg.typical_p * 100) + cfg.top_k + cfg.min_tokens_to_keep)
    got = np.asarray(processed_logprobs(jnp.asarray(x), cfg))
    want = hf_logprobs(x, cfg)
    for row, g, w in zip(x, got, want, strict=True):
        if (cfg.min_tokens_to_keep > 1 or cfg.top_p < 1.0) and len(set(row.tolist())) < len(row):
            continue  # which of the tied tokens top-p's or the floor's cut keeps depends on the sort order
        assert (np.isfinite(g) == np.isfinite(w)).all(), (row, g, w)
        np.testing.assert_allclose(g[np.isfinite(g)], w[np.isfinite(w)], atol=2e-5)
    assert (~np.isfinite(got)).any(axis=1).mean() > 0.3  # it truncates


def test_typical_p_by_hand():
    """p = [0.5, 0.25, 0.125, 0.125]: H = 1.2130 nats; |−log p − H| = [0.520, 0.173, 0.866, 0.866].
    Order 1, 0, {2, 3}; cumulative mass 0.25, 0.75, 1.0. tau = 0.2: token 1 crosses -> {1};
    tau = 0.5: token 0 crosses -> {0, 1} (2/3, 1/3); tau = 0.75 is reached exactly by token 0:
    still {0, 1}; tau = 0.8: the tied pair crosses -> all."""
    lp = np.log([[0.5, 0.25, 0.125, 0.125]]).astype(np.float32)
    for tau, want in [(0.2, [0, 1, 0, 0]), (0.5, [2 / 3, 1 / 3, 0, 0]), (0.75, [2 / 3, 1 / 3, 0, 0]),
                      (0.8, [0.5, 0.25, 0.125, 0.125])]:
        got = np.exp(np.asarray(processed_logprobs(jnp.asarray(lp), SamplerConfig(1.0, typical_p=tau))[0]))
        np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(Exception, match="typical_p must be in"):
        SamplerConfig(typical_p=0.0)


# ---------------------------------------------------------------- the categorical draw

def test_invert_by_hand():
    """Weights [0, 1, 0, 3, 0]: cumulative [0, 1, 1, 4, 4]; u·4 below 1 -> token 1, from 1 -> token 3;
    u = 1 (float rounding's worst case) and u = 0 stay on positive weights."""
    w = jnp.asarray([[0.0, 1.0, 0.0, 3.0, 0.0]] * 5)
    u = jnp.asarray([0.0, 0.2499, 0.25, 0.999, 1.0])
    np.testing.assert_array_equal(np.asarray(sampling._invert(w, u)), [1, 1, 3, 3, 3])


def test_categorical_draws_the_distribution(monkeypatch):
    """Blocks of 4 over 11 tokens (a last partial block, a block of zero mass, −inf tokens): the
    draws fit softmax(logp) by chi-square, never a zero-probability token; the same number of draws
    from a distribution with token 0 at 1.15x its probability fails the test (power)."""
    monkeypatch.setattr(sampling, "BLOCK", 4)
    p = np.array([0.2, 0.0, 0.05, 0.1, 0.0, 0.0, 0.0, 0.0, 0.3, 0.05, 0.3])
    logp = jnp.log(jnp.asarray(p, jnp.float32))[None]
    draw = jax.jit(jax.vmap(lambda k, lp: sampling.categorical(k, lp)[0], in_axes=(0, None)))
    keys = jax.random.split(jax.random.key(0), 40_000)
    counts = np.bincount(np.asarray(draw(keys, logp)), minlength=11)
    assert counts[p == 0].sum() == 0
    assert chisquare_pvalue(counts, p, len(keys)) > ALPHA
    q = p.copy()
    q[0] *= 1.15
    q /= q.sum()
    counts = np.bincount(np.asarray(draw(keys, jnp.log(jnp.asarray(q, jnp.float32))[None])), minlength=11)
    assert chisquare_pvalue(counts, p, len(keys)) < POWER


def test_categorical_keeps_leading_axes():
    """logp [2, 3, V] with one token of support per row (V = 1000: a partial last block): each row
    draws its own token, in place."""
    support = np.array([[0, 511, 512], [999, 7, 600]])
    logp = jnp.where(jax.nn.one_hot(support, 1000, dtype=bool), 0.0, -jnp.inf)
    np.testing.assert_array_equal(np.asarray(sampling.categorical(jax.random.key(1), logp)), support)
