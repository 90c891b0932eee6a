"""BiLD (decode/bild.py) against a NumPy reference of its two policies, written from the paper and
the official code (kssteven418/BigLittleDecoder), on a small random model whose little model is its
F/8 MatFormer prefix: with the little model's own cache every token, fallback and rollback is
checked against full forwards of the two models; the limits α_FB = 1 (the big model's greedy
output, shared and separate caches) and α_FB = 0 with no rollback (the little model's greedy
output after the big model's first token); the sampled variant at α_FB = 1 emits the big model's
law (chi-square), and at α_FB = 0 it does not (power)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optimized_jit
import pytest
from flax import nnx
from test_speculative import (
    ALPHA,
    GREEDY,
    LENGTH,
    POWER,
    PROMPT,
    SMALL,
    TOY,
    TOY_SAMPLER,
    TRIALS,
    _batch,
    _pvalue,
    _toy,
)

from decode import bild
from decode import generate as plain
from spark.errors import ConfigError
from spark.model import Transformer

PROMPTS = [[5, 9, 2, 44, 17, 3, 8], [11, 4, 30], [7, 7, 1, 60, 2]]
N_NEW, PAD_TO = 16, 32


@functools.lru_cache(maxsize=1)
def _small():
    return nnx.split(Transformer(SMALL, nnx.Rngs(0)))


@functools.lru_cache(maxsize=2)
def _forward(widths):
    graphdef, params = _small()
    return jax.jit(lambda a: nnx.merge(graphdef, params)(a, jnp.arange(PAD_TO)[None], widths=widths)[0][0])


def next_logp(seq, widths=None):
    """log softmax (T = 1) of the next-token logits after `seq`, from a full forward, no cache."""
    x = np.zeros((1, PAD_TO), np.int32)
    x[0, : len(seq)] = seq
    logits = np.asarray(_forward(widths)(jnp.asarray(x)), np.float64)[len(seq) - 1]
    return logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())


def reference(prompt, fallback, rollback, max_little, n_new, eos=-1):
    """Greedy BiLD, one row, from full forwards: -> (tokens, who emitted each: 'B' | 'L', per-round
    (fallback?, rollback?) flags, the smallest margin of any threshold test)."""
    little_w = SMALL.granularity_widths(8)
    first = int(np.argmax(next_logp(prompt)))
    out, who, rounds, margin = [first], ["B"], [], np.inf
    while len(out) < n_new and out[-1] != eos:
        seq, kept, fell = list(prompt) + out, [], False
        while len(kept) < max_little:  # little steps: keep while confident
            lp = next_logp(seq + kept, little_w)
            conf = np.exp(lp.max())
            margin = min(margin, abs(conf - fallback))
            if conf < fallback:
                fell = True
                break
            kept.append(int(np.argmax(lp)))
        n = 0  # big step: the first little token with -log p_big > α_RB is rolled back, with the rest
        while n < len(kept):
            nll = -next_logp(seq + kept[:n])[kept[n]]
            margin = min(margin, abs(nll - rollback))
            if nll > rollback:
                break
            n += 1
        window = kept[:n] + [int(np.argmax(next_logp(seq + kept[:n])))]
        rounds.append((fell, n < len(kept)))
        for j, t in enumerate(window[: n_new - len(out)]):
            out.append(t)
            who.append("L" if j < n else "B")
            if t == eos:
                break
    return out, who, rounds, margin


def _run(bcfg, prompts=PROMPTS, n_new=N_NEW, eos=-1, sampler=GREEDY, thresholds=None):
    """`thresholds` (α_FB, α_RB): traced, overriding bcfg's (one compile serves several)."""
    graphdef, params = _small()
    arr, lengths = _batch(prompts)
    traced = () if thresholds is None else (jnp.asarray(thresholds, jnp.float32),)
    out, num, st = bild.generate(graphdef, params, arr, lengths, jax.random.key(0), *traced, max_new_tokens=n_new,
                                 sampler=sampler, eos_id=eos, pad_id=0, bild=bcfg)
    return np.asarray(out), np.asarray(num), jax.device_get(st)


CASES = {"mixed": (0.1, 2.5, 3), "rollback-heavy": (0.0, 2.2, 4), "every third is big": (0.0, np.inf, 2)}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_numpy_reference_of_both_policies(case):
    """Every token, and per row the rounds, fallbacks, rollbacks and kept little tokens; rows of
    different prompt lengths in one batch each equal the reference of that row alone. "mixed" runs
    its thresholds traced, over a config whose static ones differ (the bench's one compile for a
    grid: ignoring the traced values would fail the reference)."""
    fb, rb, steps = CASES[case]
    if case == "mixed":
        out, num, st = _run(bild.BiLDConfig(SMALL.granularity_widths(8), 0.9, 9.0, steps, "separate"),
                            thresholds=[fb, rb])
    else:
        out, num, st = _run(bild.BiLDConfig(SMALL.granularity_widths(8), fb, rb, steps, "separate"))
    fallbacks = rollbacks = 0
    for i, prompt in enumerate(PROMPTS):
        want, who, rounds, margin = reference(prompt, fb, rb, steps, N_NEW)
        assert margin > 1e-5, "a threshold test too close to call in float32: pick other thresholds"
        assert out[i, : num[i]].tolist() == want, (i, who)
        assert st["rounds"][i] == len(rounds) and st["little_tokens"][i] == who.count("L")
        assert st["fallbacks"][i] == sum(f for f, _ in rounds) and st["rollbacks"][i] == sum(r for _, r in rounds)
        fallbacks, rollbacks = fallbacks + st["fallbacks"][i], rollbacks + st["rollbacks"][i]
        if case == "every third is big":  # max_little_steps = n: tokens 0, n+1, 2(n+1), ... are the big model's
            assert "".join(who) == ("B" + "L" * steps) * (N_NEW // (steps + 1)) + "B" * (N_NEW % (steps + 1) > 0)
    if case == "mixed":  # both policies fired
        assert fallbacks > 0 and rollbacks > 0


@pytest.mark.parametrize("cache", ["shared", "separate"])
def test_limits_big_greedy_and_little_greedy(cache):
    """α_FB = 1: every round is a big step -> the big model's greedy output. α_FB = 0, α_RB = inf,
    max_little_steps ≥ N: after the big model's first token the little model decodes alone (with
    its own cache that is exactly its greedy output)."""
    graphdef, params = _small()
    arr, lengths = _batch(PROMPTS)
    kw = dict(max_new_tokens=N_NEW, sampler=GREEDY, eos_id=-1, pad_id=0)
    big, _, _ = plain.generate(graphdef, params, arr, lengths, jax.random.key(0), **kw)
    steps = N_NEW if cache == "separate" else 4  # separate: one compile for both limits (traced thresholds)
    bcfg = bild.BiLDConfig(SMALL.granularity_widths(8), 0.5, 5.0, steps, cache)
    out, _, st = _run(bcfg, thresholds=[1.0, 5.0])
    np.testing.assert_array_equal(out, np.asarray(big))
    assert st["little_tokens"].sum() == 0 and (st["fallbacks"] == N_NEW - 1).all()
    if cache == "separate":
        out, _, st = _run(bcfg, thresholds=[0.0, np.inf])
        assert (st["rounds"] == 1).all() and (st["little_tokens"] == N_NEW - 1).all()
        prompts = [p + [int(t)] for p, t in zip(PROMPTS, out[:, 0], strict=True)]
        arr2, lengths2 = _batch(prompts)
        little, _, _ = plain.generate(graphdef, params, arr2, lengths2, jax.random.key(0),
                                      widths=SMALL.granularity_widths(8), **kw | dict(max_new_tokens=N_NEW - 1))
        np.testing.assert_array_equal(out[:, 1:], np.asarray(little))


def test_eos_ends_rows_inside_little_runs():
    """An EOS among the kept little tokens ends the row there (the reference cuts the same way)."""
    fb, rb, steps = CASES["mixed"]
    bcfg = bild.BiLDConfig(SMALL.granularity_widths(8), 0.9, 9.0, steps, "separate")  # the "mixed" case's compile
    out0, num0, _ = _run(bcfg, thresholds=[fb, rb])
    eos = int(out0[2, 5])  # a token the third row emits mid-way
    out, num, _ = _run(bcfg, eos=eos, thresholds=[fb, rb])
    for i, prompt in enumerate(PROMPTS):
        want, _, _, _ = reference(prompt, fb, rb, steps, N_NEW, eos=eos)
        assert out[i, : num[i]].tolist() == want and (out[i, num[i]:] == 0).all()
    assert num[2] <= 6


@functools.lru_cache(maxsize=1)
def _toy_bild():
    graphdef, _ = _toy()
    return optimized_jit.jit(functools.partial(
        bild.generate.__wrapped__, graphdef, max_new_tokens=LENGTH, sampler=TOY_SAMPLER, eos_id=-1, pad_id=0,
        bild=bild.BiLDConfig(TOY.granularity_widths(8), max_little_steps=2)))


def _toy_outcomes(fallback, seed=0):
    """TRIALS / 3 rows (3^5 outcomes under top-k 3: plenty), no rollback; one compile for both α_FB."""
    n = TRIALS // 3
    out, _, st = _toy_bild()(_toy()[1], jnp.asarray(np.tile(PROMPT, (n, 1)), jnp.int32),
                             jnp.full((n,), len(PROMPT), jnp.int32), jax.random.key(seed),
                             jnp.asarray([fallback, np.inf], jnp.float32))
    return [tuple(r) for r in np.asarray(out).tolist()], st


def test_sampled_always_fallback_is_the_big_models_law_and_never_fallback_is_not():
    outcomes, st = _toy_outcomes(1.0)
    assert int(np.sum(st["little_tokens"])) == 0 and _pvalue(outcomes) > ALPHA
    outcomes, st = _toy_outcomes(0.0)  # power: the little model's tokens, never checked (α_RB = inf)
    assert float(st["little_share"]) > 0.6 and _pvalue(outcomes) < POWER


def test_bad_configs_are_errors():
    for kw, msg in [(dict(fallback=1.5), "fallback"), (dict(rollback=0.0), "rollback"),
                    (dict(max_little_steps=0), "max_little_steps"), (dict(draft_cache="x"), "draft_cache")]:
        with pytest.raises(ConfigError, match=msg):
            bild.BiLDConfig(**kw)


def test_policies_bench_quality_of_greedy_is_a_full_match():
    """bench/policies.py's quality measure: the big model's own greedy continuation matches its
    argmax at every position (match 1.0, log-likelihood = the mean top log-prob); one changed
    last token lowers the match by 1/n (an earlier one would change the prefix the later ones are
    judged on)."""
    from bench.policies import quality

    graphdef, params = _small()
    arr, lengths = _batch(PROMPTS[:1])
    out, _, _ = plain.generate(graphdef, params, arr, lengths, jax.random.key(0), max_new_tokens=8, sampler=GREEDY,
                               eos_id=-1, pad_id=0)
    ids = np.asarray(out)[0].tolist()
    match, loglik = quality(graphdef, params, PROMPTS[0], ids)
    top = np.mean([next_logp(PROMPTS[0] + ids[:i]).max() for i in range(8)])
    assert match == 1.0 and loglik == pytest.approx(top, abs=1e-4)
    ids[7] = (ids[7] + 1) % SMALL.vocab_size
    assert quality(graphdef, params, PROMPTS[0], ids)[0] == pytest.approx(7 / 8)
