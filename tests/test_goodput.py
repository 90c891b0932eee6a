"""Goodput-chosen speculation (decode/goodput.py): the choice == the argmax of SmartSpec's formula
by a NumPy reference, its two limits worked by hand, the moving acceptance counts by hand, and end
to end through the real `lax.switch` loop: greedy == plain greedy and the sampled output law
unchanged (chi-square) while γ changes from round to round."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


def reference_choice(alpha, live, costs):
    """argmax_γ Σ_live (1 − α^{γ+1}) / (1 − α) / cost(γ) (α = 1: γ + 1), float64, first on ties."""
    best, arg = -1.0, 0
    for g, c in enumerate(costs):
        e = [(g + 1.0) if a == 1.0 else (1.0 - a ** (g + 1)) / (1.0 - a) for a, ok in zip(alpha, live, strict=True)
             if ok]
        if sum(e) / c > best + 1e-9:
            best, arg = sum(e) / c, g
    return arg


def test_choice_equals_numpy_reference():
    rng = np.random.default_rng(0)
    for _ in range(300):  # three shapes: one compile each
        b, gmax = 5, rng.choice([1, 3, 6])
        alpha = rng.choice([0.0, 1.0, *rng.uniform(0, 1, 4)], size=b)
        live = rng.uniform(size=b) < 0.8
        costs = np.cumsum(rng.uniform(0.05, 1.0, gmax + 1))  # a round with more drafts costs more
        got = int(gp.choose_gamma(jnp.asarray(alpha, jnp.float32), jnp.asarray(live), jnp.asarray(costs, jnp.float32)))
        assert got == reference_choice(alpha, live, costs), (alpha, live, costs)


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.9, 1.0])  # α^γmax must register in float32 against 1
def test_limits_by_hand(alpha):
    """Free drafts and a verify whose cost does not depend on γ: γ_max for any α > 0. A verify of
    γ + 1 tokens costing γ + 1 plain steps and drafts that cost anything: 0 for any α (a round
    emits at most γ + 1 tokens for (γ + 1)·c + γ·d > (γ + 1)·c seconds)."""
    a, live = jnp.full((3,), alpha, jnp.float32), jnp.ones((3,), bool)
    assert int(gp.choose_gamma(a, live, jnp.ones((6,)))) == 5
    g = jnp.arange(6, dtype=jnp.float32)
    assert int(gp.choose_gamma(a, live, (g + 1) * 1.0 + g * 0.01)) == 0


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


def test_measure_costs_arithmetic(monkeypatch):
    """With a fake clock and decoder — a call costs 5 s, its first round 3 s more, every later round
    c_γ, and a whole decode of γ runs R_γ rounds — the costs come out exactly c_γ: the one-round
    call cancels the call and the first round, and the rounds between are R_γ − 1 (dividing by
    R_γ, or not subtracting the one-round call, would not give c_γ)."""
    cost, whole = [2.0, 3.5, 4.0], [19, 10, 7]
    clock = [0.0]

    def fake_decoder(graphdef, params, prompts, lengths, key, costs_G, max_rounds, **kw):
        g = int(np.argmin(np.asarray(costs_G)))
        r = min(int(max_rounds), whole[g])
        clock[0] += 5.0 + 3.0 + r * cost[g]
        return None, None, {"loop_rounds": jnp.int32(r)}

    monkeypatch.setattr(goodput_costs, "goodput_generate", fake_decoder)
    monkeypatch.setattr(goodput_costs.time, "perf_counter", lambda: clock[0])
    sc = spec.SpecConfig(gamma=2, goodput=gp.GoodputConfig((1.0,) * 3))
    got = goodput_costs.measure_costs(None, None, None, None, spec=sc, sampler=None, max_new_tokens=20, repeats=3)
    np.testing.assert_allclose(got, cost, rtol=1e-9)


def test_measurement_and_decode_share_one_compile():
    """sample.py --gamma auto: measure_costs compiles the goodput decoder, and the decode with the
    measured costs (any other cost vector too) reuses that executable."""
    graphdef, params = nnx.split(Transformer(SMALL, nnx.Rngs(0)))
    arr, lengths = _batch(PROMPTS)
    sc = spec.SpecConfig(draft_widths=SMALL.granularity_widths(8), gamma=2, goodput=gp.GoodputConfig((1.0,) * 3))
    kw = dict(max_new_tokens=10, sampler=GREEDY, eos_id=-1, pad_id=0)
    before = spec.goodput_generate._cache_size()
    costs = goodput_costs.measure_costs(graphdef, params, arr, lengths, spec=sc, repeats=1, **kw)
    assert len(costs) == 3 and all(c > 0 for c in costs)
    key = jax.random.key(0)
    out, _, _ = spec.generate(graphdef, params, arr, lengths, key, spec=goodput_costs.with_costs(sc, costs), **kw)
    spec.generate(graphdef, params, arr, lengths, key, spec=goodput_costs.with_costs(sc, (1, 9, 9)), **kw)
    _, num, st = spec.goodput_generate(graphdef, params, arr, lengths, key, jnp.asarray(costs), jnp.int32(1),
                                       spec=spec.goodput_static(sc), widths=None, sparse=True, **kw)
    assert int(st["loop_rounds"]) == 1 and (np.asarray(num) <= 1 + 3).all()  # the round limit: one round of γ <= 2
    assert spec.goodput_generate._cache_size() == before + 1
    ref, _, _ = plain.generate(graphdef, params, arr, lengths, key, **kw)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


VARYING = (1.0, 1.45, 1.8)  # near the break-even of γ = 0 / 1 / 2 at the toy's acceptance: γ moves


def test_greedy_equals_plain_greedy_while_gamma_varies():
    graphdef, params = nnx.split(Transformer(SMALL, nnx.Rngs(0)))
    prompts = [[5, 9, 2, 44, 17, 3, 8], [11, 4, 30], [7, 7, 1, 60, 2]]
    arr, lengths = _batch(prompts)
    kw = dict(max_new_tokens=20, sampler=GREEDY, eos_id=-1, pad_id=0)
    ref, _, _ = plain.generate(graphdef, params, arr, lengths, jax.random.key(0), **kw)
    sc = spec.SpecConfig(draft_widths=SMALL.granularity_widths(8), gamma=2,  # 3 branches: compile time
                         goodput=gp.GoodputConfig((1.0, 1.95, 2.85), prior=0.95, decay=0.5))
    out, num, st = spec.generate(graphdef, params, arr, lengths, jax.random.key(1), spec=sc, **kw)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    assert np.asarray(num).tolist() == [20] * 3  # every branch stops a row at max_new_tokens
    chosen = np.asarray(st["gamma_chosen"])
    c = chosen.tolist()  # stretches of plain rounds between speculative ones
    assert any(c[i:i + 3] == [2, 0, 0] for i in range(len(c))) and c.index(2, c.index(0)) > 0, c


def test_sampled_law_unchanged_while_gamma_varies():
    graphdef, params = _toy()
    sc = spec.SpecConfig(draft_widths=TOY.granularity_widths(8), gamma=2,
                         goodput=gp.GoodputConfig(VARYING, prior=0.6))
    run = jax.jit(functools.partial(spec.goodput_generate.__wrapped__, graphdef, max_new_tokens=LENGTH,
                                    sampler=TOY_SAMPLER, eos_id=-1, pad_id=0, spec=spec.goodput_static(sc),
                                    widths=None, sparse=True))
    out, num, st = run(params, jnp.asarray(np.tile(PROMPT, (TRIALS, 1)), jnp.int32),
                       jnp.full((TRIALS,), len(PROMPT), jnp.int32), jax.random.key(0), jnp.asarray(VARYING),
                       jnp.int32(LENGTH))
    chosen = np.asarray(st["gamma_chosen"])
    assert len(set(chosen[chosen >= 0].tolist())) >= 2, chosen
    assert (np.asarray(num) == LENGTH).all()
    assert _pvalue([tuple(r) for r in np.asarray(out).tolist()]) > ALPHA


def test_plain_stretch_equals_a_switch_per_round():
    """Each γ runs its rounds in an inner loop while the choice stays: the same decisions, draws
    and tokens as choosing anew each round (the reference: the same decoder whose stretch is cut
    to one round). Sampled (T = 1), so a draw taken with another key would show."""
    graphdef, params = nnx.split(Transformer(SMALL, nnx.Rngs(0)))
    arr, lengths = _batch(PROMPTS)
    cfg = gp.GoodputConfig((1.0, 1.9, 2.5), decay=0.5)  # the prior 1 ends stretches
    sc = spec.SpecConfig(draft_widths=SMALL.granularity_widths(8), gamma=2, goodput=cfg)
    n, key, sampler = 40, jax.random.key(3), SamplerConfig(temperature=1.0)
    out, num, st = spec.generate(graphdef, params, arr, lengths, key, max_new_tokens=n, sampler=sampler, eos_id=-1,
                                 pad_id=0, spec=sc)

    @jax.jit
    def per_round(params):
        model, drafter, s_cfg, widths = spec.models(graphdef, params, sc, None)
        kw = dict(sampler=sampler, eos_id=-1, pad_id=0, widths=widths)
        s = spec.spec_prefill(model, arr, lengths, key, max_new_tokens=n, spec=s_cfg, drafter=drafter, **kw)
        step = functools.partial(gp.goodput_round, spec.branches(model, drafter, s_cfg, sparse=True, **kw), cfg=cfg,
                                 more=lambda s: False)  # a stretch of one round
        s = jax.lax.while_loop(lambda s: (s.rounds < n) & ~jnp.all(s.done_B), step, spec.with_goodput_stats(s, cfg, n))
        next_logits = model(s.pending_B[:, None], s.cache.lengths[:, None], cache=s.cache, widths=widths)[0][:, -1]
        return s.tokens_BN[:, :n], s.num_B, s.stats["gamma_chosen"], next_logits, s.cache.lengths

    ref_out, ref_num, ref_chosen, next_logits, cached = per_round(params)
    chosen = np.asarray(st["gamma_chosen"])
    c = chosen.tolist()
    assert any(c[i:i + 3] == [0, 0, 2] for i in range(len(c))), c  # a stretch of two plain rounds ended
    assert any(c[i:i + 2] == [2, 2] for i in range(len(c))), c  # and one of two γ = 2 rounds
    np.testing.assert_array_equal(chosen, np.asarray(ref_chosen))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
    np.testing.assert_array_equal(np.asarray(num), np.asarray(ref_num))
    # the cache the plain and speculative rounds left == a fresh forward over the emitted tokens
    seqs = [p + np.asarray(ref_out[b, : ref_num[b]]).tolist() for b, p in enumerate(PROMPTS)]
    assert [len(x) for x in seqs] == (np.asarray(cached) + 1).tolist()
    np.testing.assert_allclose(np.asarray(next_logits), _fresh_next_logits(graphdef, params, seqs), atol=1e-4,
                               rtol=1e-4)
