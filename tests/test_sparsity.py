"""Statistical top-k: kept count, exact zeros, traced k, dtype robustness, masked statistics."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import norm

from spark import sparsity


def _gauss(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_kept_count_matches_target_on_gaussian_rows():
    x = _gauss((64, 13824)) * 3.0 + 1.5
    y = sparsity.soft_topk(x, 0.08)
    kept = np.asarray((y > 0).sum(-1))
    target = 0.08 * 13824
    assert abs(kept.mean() - target) / target < 0.02
    # exact zeros elsewhere, kept values are x - θ
    theta = np.asarray(sparsity.threshold(x, 0.08))
    xn, yn = np.asarray(x), np.asarray(y)
    above = xn > theta
    assert np.all(yn[~above] == 0.0)
    np.testing.assert_allclose(yn[above], (xn - theta)[above], rtol=1e-6, atol=1e-6)
    # θ is the formula: population mean + std · Φ⁻¹(0.92)
    ref = xn.mean(-1, keepdims=True) + xn.std(-1, keepdims=True) * norm.ppf(0.92)
    np.testing.assert_allclose(theta, ref, rtol=1e-5)


def test_k_may_be_traced_under_jit():
    x = _gauss((8, 4096))
    f = jax.jit(lambda x, k: (sparsity.soft_topk(x, k) > 0).sum(-1).mean())
    counts = [float(f(x, jnp.float32(k))) for k in (0.02, 0.08, 0.3)]
    for k, c in zip((0.02, 0.08, 0.3), counts, strict=True):
        assert abs(c - k * 4096) / (k * 4096) < 0.05
    assert counts[0] < counts[1] < counts[2]


def test_bf16_keeps_the_same_set_as_float32():
    x16 = _gauss((16, 9216)).astype(jnp.bfloat16)
    m16 = sparsity.keep_mask(x16, 0.08)
    m32 = sparsity.keep_mask(x16.astype(jnp.float32), 0.08)
    assert bool(jnp.all(m16 == m32))
    assert sparsity.threshold(x16, 0.08).dtype == jnp.float32
    assert sparsity.soft_topk(x16, 0.08).dtype == jnp.bfloat16


def test_masked_statistics_use_valid_entries_only():
    x = _gauss((4, 100))
    mask = jnp.arange(100)[None, :] < jnp.array([[10], [50], [100], [1]])
    theta = sparsity.threshold(x, 0.2, mask)
    for i, n in enumerate((10, 50, 100, 1)):
        xi = np.asarray(x[i, :n])
        ref = xi.mean() + xi.std() * norm.ppf(0.8)
        np.testing.assert_allclose(float(theta[i, 0]), ref, rtol=1e-5, atol=1e-6)
    assert not bool(jnp.any(sparsity.keep_mask(x, 0.2, mask) & ~mask))
    assert bool(jnp.all(jnp.isneginf(sparsity.hard_topk(x, 0.2, mask)[~mask])))


def test_hard_form_keeps_values_and_k_frac_one_keeps_all():
    x = _gauss((3, 50))
    h = sparsity.hard_topk(x, 0.1)
    kept = jnp.isfinite(h)
    assert bool(jnp.all(jnp.where(kept, h == x, True)))
    assert bool(jnp.all(sparsity.keep_mask(x, 1.0)))


def test_keep_k_of_valid_never_empty_and_keeps_all_when_few():
    # a skewed row where every entry but one sits below θ: the max must still be kept
    row = jnp.concatenate([jnp.ones(63), jnp.array([-1000.0])])[None]
    keep = sparsity.keep_k_of_valid(row, jnp.ones_like(row, bool), 4)
    assert int(keep.sum()) >= 1
    valid = jnp.arange(64)[None] < 5
    keep = sparsity.keep_k_of_valid(_gauss((1, 64)), valid, 8)
    assert bool(jnp.all(keep == valid))


def test_stop_gradient_option_changes_gradient_only():
    x = _gauss((2, 256))
    loss = lambda x, sg: jnp.sum(sparsity.soft_topk(x, 0.1, stop_gradient=sg) ** 2)  # noqa: E731
    g0, g1 = jax.grad(loss)(x, False), jax.grad(loss)(x, True)
    assert float(loss(x, False)) == float(loss(x, True))
    # without stop-gradient every entry receives gradient through θ; with it only kept ones do
    assert float(jnp.mean(g0 != 0)) > 0.99
    assert float(jnp.mean(g1 != 0)) < 0.2
    assert bool(jnp.all(jnp.isfinite(g0)))
