"""The round costs goodput decides by (decode/goodput_costs.py): the measurement's arithmetic with a
fake clock and decoder, its random order against a drifting machine, and one compile shared by the
measurement and the decode (a negative switch cost alternating γ in the real decoder)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from test_generate import cache_copies
from test_speculative import GREEDY, PROMPTS, SMALL, _batch

from decode import generate as plain
from decode import goodput as gp
from decode import goodput_costs
from decode import speculative as spec
from spark.model import Transformer


def fake_rounds(costs_G, switch_s, max_rounds, whole, cost, change):
    """(rounds, seconds of them) of a fake goodput decode: forced γ (one finite cost) runs whole[γ]
    rounds of cost[γ]; alternation (two finite costs, a negative switch) starts at the larger γ, runs
    8 rounds and pays half a change and back after each but the first."""
    finite = np.flatnonzero(np.asarray(costs_G) < 1e29)
    if float(switch_s) >= 0:
        r = min(int(max_rounds), whole[finite[0]])
        return r, r * cost[finite[0]]
    r = min(int(max_rounds), 8)  # 7 rounds after the first: four of γ = 0, three of the other
    seq = [finite[-1] if i % 2 == 0 else finite[0] for i in range(r)]
    return r, sum(cost[g] for g in seq) + (r - 1) * change / 2


def test_measure_costs_arithmetic(monkeypatch):
    """With a fake clock and decoder — a call costs 5 s, its first round 3 s more, every later round
    c_γ, and a whole decode of γ runs R_γ rounds; forced to alternate between γ = 0 and 2 it runs
    8 rounds (2, 0, 2, …) and each change of γ costs 0.35 s more — the costs come out exactly c_γ
    and the change and back 0.7 s: the one-round call cancels the call and the first round, and the
    rounds between are R_γ − 1 (dividing by R_γ, or not subtracting the one-round call, would not
    give c_γ; counting the alternation's 7 timed rounds as half γ = 0, half γ = 2 would put the change
    and back 2 (c_2 − c_0) / 14 = 0.29 s too low). Each repeat decodes with its own key, the same
    for every call of it."""
    cost, whole = [2.0, 3.5, 4.0], [19, 10, 7]
    clock, keys = [0.0], []

    def fake_decoder(graphdef, params, prompts, lengths, key, costs_G, max_rounds, switch_s, **kw):
        keys.append(int(jax.random.key_data(key).sum()))
        r, t = fake_rounds(costs_G, switch_s, max_rounds, whole, cost, 0.7)
        clock[0] += 5.0 + 3.0 + t
        return None, None, {"loop_rounds": jnp.int32(r)}

    monkeypatch.setattr(goodput_costs, "goodput_generate", fake_decoder)
    monkeypatch.setattr(goodput_costs.time, "perf_counter", lambda: clock[0])
    sc = spec.SpecConfig(gamma=2, goodput=gp.GoodputConfig((1.0,) * 3))
    got = goodput_costs.measure_costs(None, None, None, None, spec=sc, sampler=None, max_new_tokens=20, repeats=3)
    np.testing.assert_allclose(got.costs, cost, rtol=1e-9)
    np.testing.assert_allclose(got.switch, 0.7, rtol=1e-9)
    per_repeat = [set(keys[1 + 8 * i: 9 + 8 * i]) for i in range(3)]  # after the compile call: 4 forcings × 2 calls
    assert [len(k) for k in per_repeat] == [1, 1, 1] and len(set.union(*per_repeat)) == 3, keys


def test_measure_costs_order_is_random_per_repeat(monkeypatch):
    """A machine that slows within a repeat (the call timed second 10% slower, the third 20%, the
    fourth 30%, reset per repeat, and 3% noise on every call) biases everything timed late in a
    fixed order: with γ = 0, 1, 2 always in that order the costs of γ = 1, 2 relative to γ = 0 come
    out 10% and 20% too high. measure_costs draws the order per repeat, so the drift lands on every
    γ alike, and averages the middle half of the log ratios (`central_ratio`): the ratios then sit
    at a few levels, one per order, and a median picks one level where the central mean stays
    within 5%."""
    cost, whole = [2.0, 3.5, 4.0], [19, 10, 7]
    clock, calls, noise = [0.0], [0], np.random.default_rng(1)

    def drifting_decoder(graphdef, params, prompts, lengths, key, costs_G, max_rounds, switch_s, **kw):
        r, t = fake_rounds(costs_G, switch_s, max_rounds, whole, cost, 0.7)
        slow = 1.0 + 0.1 * (((calls[0] - 1) % 8) // 2) if calls[0] else 1.0  # 4 forcings × 2 calls a repeat
        calls[0] += 1
        clock[0] += slow * noise.lognormal(0.0, 0.03) * (5.0 + t)
        return None, None, {"loop_rounds": jnp.int32(r)}

    monkeypatch.setattr(goodput_costs, "goodput_generate", drifting_decoder)
    monkeypatch.setattr(goodput_costs.time, "perf_counter", lambda: clock[0])
    sc = spec.SpecConfig(gamma=2, goodput=gp.GoodputConfig((1.0,) * 3))
    got = goodput_costs.measure_costs(None, None, None, None, spec=sc, sampler=None, max_new_tokens=20, repeats=40,
                                      budget_s=1e9)
    np.testing.assert_allclose(np.asarray(got.costs) / got.costs[0], np.asarray(cost) / cost[0], rtol=0.05)


def test_measurement_and_decode_share_one_compile():
    """sample.py --gamma auto: measure_costs compiles the goodput decoder, and the decode with the
    measured costs (any other cost vector too) reuses that executable."""
    graphdef, params = nnx.split(Transformer(SMALL, nnx.Rngs(0)))
    arr, lengths = _batch(PROMPTS)
    sc = spec.SpecConfig(draft_widths=SMALL.granularity_widths(8), gamma=2, goodput=gp.GoodputConfig((1.0,) * 3))
    kw = dict(max_new_tokens=10, sampler=GREEDY, eos_id=-1, pad_id=0)
    before = spec.goodput_generate._cache_size()
    costs, switch = goodput_costs.measure_costs(graphdef, params, arr, lengths, spec=sc, repeats=1, **kw)
    assert len(costs) == 3 and all(c > 0 for c in costs) and switch >= 0
    key = jax.random.key(0)
    out, _, _ = spec.generate(graphdef, params, arr, lengths, key, spec=goodput_costs.with_costs(sc, costs, switch),
                              **kw)
    spec.generate(graphdef, params, arr, lengths, key, spec=goodput_costs.with_costs(sc, (1, 9, 9)), **kw)
    _, num, st = spec.goodput_generate(graphdef, params, arr, lengths, key, jnp.asarray(costs), jnp.int32(1),
                                       jnp.float32(switch), spec=spec.goodput_static(sc), widths=None, sparse=True,
                                       **kw)
    assert int(st["loop_rounds"]) == 1 and (np.asarray(num) <= 1 + 3).all()  # the round limit: one round of γ <= 2
    both = jnp.asarray([1.0, 1e30, 1.0])  # γ = 0 and 2 left: a negative switch cost alternates them (the
    for switch_s, want in ((-1e6, [2, 0, 2, 0, 2]), (0.0, [2])):  # measurement of a change), 0 does not
        _, _, st = spec.goodput_generate(graphdef, params, arr, lengths, key, both, jnp.int32(5), jnp.float32(switch_s),
                                         spec=spec.goodput_static(sc), widths=None, sparse=True, **kw)
        chosen = np.asarray(st["gamma_chosen"])
        assert (chosen[chosen >= 0].tolist() if switch_s else sorted(set(chosen[chosen >= 0]))) == want, chosen
    assert spec.goodput_generate._cache_size() == before + 1
    ref, _, _ = plain.generate(graphdef, params, arr, lengths, key, **kw)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_goodput_loop_does_not_copy_the_cache():
    """A change of γ leaves one γ's loop and enters another's without copying the KV cache: the
    optimized program holds no copy of a whole cache buffer. The loops in the branches of a
    `lax.switch` held two per change (into the conditional and into the branch's loop): at B = 4 with
    400-token prompts on runs/bench_lm's shapes a decode alternating γ ran 1-4% slower (README)."""
    cfg = dataclasses.replace(SMALL, num_layers=1)
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    arr, lengths = _batch(PROMPTS)
    sc = spec.goodput_static(spec.SpecConfig(draft_widths=cfg.granularity_widths(8), gamma=1,
                                             goodput=gp.GoodputConfig((1.0,) * 2)))
    kw = dict(max_new_tokens=6, sampler=GREEDY, eos_id=-1, pad_id=0, spec=sc, widths=None)
    cache = jax.eval_shape(lambda p: spec.prefilled(graphdef, p, arr, lengths, jax.random.key(0), **kw)[4].cache,
                           params)
    hlo = spec.goodput_generate.lower(graphdef, params, arr, lengths, jax.random.key(0), jnp.ones(2), jnp.int32(6),
                                      jnp.float32(0.0), sparse=True, **kw).compile().as_text()
    copies = cache_copies(hlo, cache, in_entry=False)
    assert not copies, copies[:3]
