"""The attention kernel's exp, tanh and softplus (spark/kernels/simd_math.inc on the SIMD paths,
std:: on the portable one), one key weight at a time: with value rows v[s] = e_s the output is the
weight vector itself, so each weight is compared with float64 on its own, the small ones included
(the whole-output bound of tests/test_kernels.py would not see an error in a weight 1e-6 of the
largest)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark import kernels

needs_kernels = pytest.mark.skipif(not kernels.enabled(), reason=f"spark.kernels: {kernels.status()}")

S, H, R = 240, 256, 8


def _case(s1, s2, spark):
    """q, k, v such that the kernel's scores are s1 (and, Spark, gate scores s2) exactly as given
    (float32), v = the first S rows of the identity."""
    scale, gate_scale = (R**-0.5, (H - R) ** -0.5) if spark else (H**-0.5, 1.0)
    q = np.zeros((1, 1, 1, 1, H), np.float32)
    q[..., 0] = 1.0 / np.float32(scale)  # the wrapper multiplies by scale again: q·scale = 1 (to an ulp)
    k = np.zeros((1, 1, S, H), np.float32)
    k[0, 0, :, 0] = s1
    if spark:
        q[..., R] = 1.0 / np.float32(gate_scale)
        k[0, 0, :, R] = s2
    v = np.eye(S, H, dtype=np.float32)[None, None]
    if spark:  # the Spark cache's layout (spark/cache.py): k[..., :r], [k[..., r:] | v]
        k, v = k[..., :R], np.concatenate([k[..., R:], v], axis=-1)
    qs = (q[0, 0, 0, 0] * np.float32(scale)).astype(np.float32)  # what the kernel multiplies in
    s1_seen = (qs[0] * np.float32(s1)).astype(np.float64)
    s2_seen = ((q[0, 0, 0, 0, R] * np.float32(gate_scale)).astype(np.float32) * np.float32(s2)).astype(np.float64)
    kw = dict(rank=R if spark else H, scale=scale, gate_scale=gate_scale, spark=spark, v_t=False)
    return (q, k, v), kw, s1_seen, s2_seen


@needs_kernels
@pytest.mark.parametrize("cap,span", [(50.0, 60.0), (5.0, 60.0), (None, 60.0), (None, 3.0)])
def test_attention_weights_one_by_one_equal_float64(isa, cap, span):
    """Scores in ±span over both branches of tanh (|s/cap| below and above 0.625, saturated at cap
    5; span 3: small logits, where float32 carries them to ~1e-7 and the bound is tightest) and
    gate scores over softplus's range (−40 .. 40: e^x tiny, x > 20); every key kept."""
    rng = np.random.default_rng(0)
    s1 = rng.permutation(np.linspace(-span, span, S)).astype(np.float32)
    s2 = rng.permutation(np.concatenate([np.linspace(-40.0, 40.0, S - 8), [0, 1e-3, -1e-3, 0.5, -0.5, 20, 21, -20]]))
    valid = jnp.ones((1, 1, S), bool)
    z = kernels.spark_z(valid, S)  # −inf: every key kept
    for spark in (False, True):
        args, kw, a, g = _case(s1, s2.astype(np.float32), spark)
        run = jax.jit(functools.partial(kernels.attention, default=None, softcap=cap, **kw))  # traced per ISA
        out, kept, _ = run(*args, valid, z)
        assert "spark_attention" in run.lower(*args, valid, z).as_text()
        assert int(kept.min()) == S
        logit = a if cap is None else cap * np.tanh(a / cap)
        w = np.exp(logit - logit.max())
        w /= w.sum()
        if spark:
            w *= np.logaddexp(0.0, g)
        got = np.asarray(out, np.float64).reshape(H)[:S]
        tiny = w < 1e-36  # below float32's normal range: exp may flush or clamp those
        # float32 carries logit and logit − max to half an ulp each: e^x is off by that much more
        ulps = 2.0 ** -23 * (np.abs(logit) + np.abs(logit - logit.max()))
        err = np.abs(got - w) / w
        assert np.all(err[~tiny] <= 4e-7 + 1.5 * ulps[~tiny]), (spark, np.max(err[~tiny] / (4e-7 + ulps[~tiny])))
        assert np.all(np.abs(got[tiny]) < 1e-35)
        assert np.sum(~tiny) > S // 2
