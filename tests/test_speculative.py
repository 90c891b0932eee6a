"""Speculative decoding is lossless: the accept/reject kernel and the whole on-device loop emit
exactly the target's distribution (chi-square), broken variants are caught (power checks), greedy
output equals plain greedy decoding, rollback leaves a cache equal to a fresh forward."""

import dataclasses
import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optimized_jit
import pytest
from flax import nnx
from scipy import stats

from decode import generate as plain
from decode import speculative as spec
from decode.sampling import SamplerConfig, processed_logprobs, sample
from spark.config import ModelConfig, SparkConfig
from spark.errors import ConfigError
from spark.model import Transformer

ALPHA = 1e-4  # a correct sampler passes at p > ALPHA (fixed seeds: deterministic)
POWER = 1e-6  # a broken one must fail at p < POWER


def chisquare_pvalue(observed, expected_probs, n):
    """Chi-square goodness of fit, bins with expected count < 5 merged into one. An outcome of
    probability zero observed is impossible under the null: p-value 0."""
    observed, expected = np.asarray(observed, float), np.asarray(expected_probs, float) * n
    if observed[expected_probs == 0].sum() > 0:
        return 0.0
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue


# ---------------------------------------------------------------- the kernel, one position

V = 8
P_LOGITS = np.log(np.array([0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.05, 1e-9]))


def _one_position(p, q, n=60_000, seed=0):
    """Draft d ~ q, verify once (γ = 1): -> (first emitted token [n], accepted [n], drafts [n])."""
    k_d, k_a = jax.random.split(jax.random.key(seed))
    logq = jnp.broadcast_to(jnp.log(jnp.asarray(q, jnp.float32)), (n, 1, V))
    logp = jnp.broadcast_to(jnp.log(jnp.asarray(p, jnp.float32)), (n, 2, V))
    d = jax.random.categorical(k_d, logq[:, 0])[:, None].astype(jnp.int32)
    acc_n, t = spec.accept(k_a, logp, logq, d, jnp.ones((n, 1), bool))
    first = np.where(np.asarray(acc_n) == 1, np.asarray(d[:, 0]), np.asarray(t))
    return first, np.asarray(acc_n), np.asarray(d[:, 0])


def _probs(logits, **sampler):
    return np.exp(np.asarray(processed_logprobs(jnp.asarray(logits, jnp.float32)[None], SamplerConfig(**sampler))[0]))


KERNEL_CASES = {
    "generic": (_probs(P_LOGITS), _probs(P_LOGITS[::-1] * 0.5)),
    "q_equals_p": (_probs(P_LOGITS), _probs(P_LOGITS)),
    "one_hot_q": (_probs(P_LOGITS), np.eye(V)[2]),
    "disjoint": (np.array([0.5, 0.3, 0.2, 0, 0, 0, 0, 0]), np.array([0, 0, 0, 0, 0.4, 0.4, 0.2, 0])),
    "draft_outside_top_p": (_probs(P_LOGITS, top_p=0.7), _probs(P_LOGITS * 0.2)),
}


@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_accept_kernel_emits_p(case):
    p, q = KERNEL_CASES[case]
    n = 60_000
    first, accepted, drafts = _one_position(p, q, n)
    assert chisquare_pvalue(np.bincount(first, minlength=V), p, n) > ALPHA
    beta = np.minimum(p, q).sum()  # acceptance probability Σ min(p, q)
    assert stats.binomtest(int(accepted.sum()), n, min(beta, 1.0)).pvalue > ALPHA
    if case == "q_equals_p":
        assert accepted.all()
    if case == "disjoint":
        assert not accepted.any()
    if case == "draft_outside_top_p":
        outside = p[drafts] == 0
        assert outside.sum() > 1000 and not accepted[outside].any()


def test_kernel_power_residual_p_fails():
    """The same chi-square catches the classic bug (correction drawn from p, not max(p − q, 0))."""
    p, q = KERNEL_CASES["generic"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(spec, "residual", lambda p, q: p)
        first, _, _ = _one_position(p, q, 60_000)
    assert chisquare_pvalue(np.bincount(first, minlength=V), p, 60_000) < POWER


def test_residual_falls_back_to_p_when_p_equals_q():
    p = jnp.asarray([[0.5, 0.5, 0.0]])
    np.testing.assert_allclose(spec.residual(p, p), p)


# ---------------------------------------------------------------- end to end, every continuation

TOY = ModelConfig(vocab_size=4, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, ffn_dim=32,
                  sliding_window=16)
TOY_SAMPLER = SamplerConfig(temperature=0.8, top_k=3)
TOP2 = SamplerConfig(temperature=0.8, top_k=2)  # truncation-sensitive: at most 2^5 = 32 outcomes, high power
TYPICAL = SamplerConfig(temperature=1.0, typical_p=0.5)  # drops the most and the least likely tokens by turns
TOY_EOS = 2
GAMMA, LENGTH, TRIALS = 2, 5, 60_000  # LENGTH ≥ γ + 2: a round boundary and a bonus token inside
PROMPT = [1, 3]


@functools.lru_cache(maxsize=1)
def _toy():
    model = Transformer(TOY, nnx.Rngs(3))
    graphdef, params = nnx.split(model)
    return graphdef, params


@functools.lru_cache(maxsize=4)
def _exact_outcome_probs(sampler, eos_id):
    """P(outcome | prompt) for every outcome: the V^L continuations from teacher-forced target
    forwards, each cut after its first EOS (the probability of a cut outcome is the sum over its
    continuations, i.e. the probability of the prefix)."""
    graphdef, params = _toy()
    conts = np.array(list(itertools.product(range(TOY.vocab_size), repeat=LENGTH)), np.int32)
    seqs = jnp.asarray(np.concatenate([np.tile(PROMPT, (len(conts), 1)), conts], 1))
    pos = jnp.broadcast_to(jnp.arange(seqs.shape[1]), seqs.shape)
    logits, _ = nnx.merge(graphdef, params)(seqs, pos)
    p = len(PROMPT)
    logp = processed_logprobs(logits[:, p - 1 : -1].reshape(-1, TOY.vocab_size), sampler)
    logp = logp.reshape(len(conts), LENGTH, -1)
    chosen = jnp.take_along_axis(logp, jnp.asarray(conts)[..., None], -1)[..., 0]
    probs = np.exp(np.asarray(jnp.sum(chosen, 1), np.float64))
    out = {}
    for c, pr in zip(conts.tolist(), probs, strict=True):
        key = tuple(c[: c.index(eos_id) + 1] if eos_id in c else c)
        out[key] = out.get(key, 0.0) + pr
    return out


def _spec_continuations(seed=0, sampler=TOY_SAMPLER, eos_id=-1, **kw):
    """TRIALS independent rows of the real jitted loop (a fresh trace, so monkeypatches apply)
    -> the emitted outcomes (each row cut at its num_new) and the stats."""
    graphdef, params = _toy()
    run = optimized_jit.jit(functools.partial(
        spec.fixed_generate.__wrapped__, graphdef, max_new_tokens=LENGTH, sampler=sampler, eos_id=eos_id, pad_id=0,
        widths=None, sparse=True,
        spec=spec.SpecConfig(draft_widths=TOY.granularity_widths(8), gamma=GAMMA, **kw)))
    prompts = jnp.asarray(np.tile(PROMPT, (TRIALS, 1)), jnp.int32)
    out, num, st = run(params, prompts, jnp.full((TRIALS,), len(PROMPT), jnp.int32), jax.random.key(seed))
    out, num = np.asarray(out), np.asarray(num)
    if eos_id < 0:
        assert (num == LENGTH).all()
    assert (out[np.arange(LENGTH)[None] >= num[:, None]] == 0).all()  # padded after the end
    return [tuple(r[:n]) for r, n in zip(out.tolist(), num.tolist(), strict=True)], st


def _pvalue(outcomes, sampler=TOY_SAMPLER, eos_id=-1):
    """Chi-square of the sampled outcomes against the exact law; an impossible outcome gives 0."""
    probs = _exact_outcome_probs(sampler, eos_id)
    keys = list(probs)
    index = {k: i for i, k in enumerate(keys)}
    if any(o not in index for o in outcomes):
        return 0.0
    observed = np.bincount([index[o] for o in outcomes], minlength=len(keys))
    return chisquare_pvalue(observed, np.asarray([probs[k] for k in keys]), len(outcomes))


E2E_MODES = {  # name: (SpecConfig changes, sampler, eos)
    "shared-eos-top2": (dict(draft_cache="shared"), TOP2, TOY_EOS),
    "separate": (dict(draft_cache="separate"), TOY_SAMPLER, -1),
    "adaptive": (dict(draft_cache="shared", adaptive_threshold=0.2), TOY_SAMPLER, -1),
    "typical": (dict(draft_cache="shared"), TYPICAL, -1),
}


@pytest.mark.parametrize("mode", list(E2E_MODES))
def test_end_to_end_matches_target_distribution(mode):
    kw, sampler, eos = E2E_MODES[mode]
    outcomes, st = _spec_continuations(sampler=sampler, eos_id=eos, **kw)
    assert _pvalue(outcomes, sampler, eos) > ALPHA
    if mode == "typical":  # it truncates: some continuations are impossible
        assert sum(p == 0 for p in _exact_outcome_probs(sampler, eos).values()) > 100
    rate = float(st["acceptance_rate"])
    assert 0.2 < rate < 0.98, rate  # both branches (accept, reject) exercised
    drafted, rounds = int(np.sum(st["drafted"])), int(np.sum(st["rounds"]))
    if mode == "adaptive":  # stopped early in some rounds, not in all
        assert rounds < drafted < GAMMA * rounds
    else:
        assert drafted == GAMMA * rounds
    if eos >= 0:  # EOS ended rows early, inside accepted blocks too (not only as a window's last token)
        ends = [o for o in outcomes if len(o) < LENGTH]
        assert len(ends) > TRIALS // 20 and all(o[-1] == eos for o in ends)
        assert sum(len(o) in (2, 3) for o in ends) > 1000  # γ = 2: the 1st round emits tokens 2..4: EOS inside it


def _broken_bonus(p_BTV, q_BTV, n_B):
    """Bonus token drawn from p_γ (one position early) instead of p_{γ+1}."""
    g = p_BTV.shape[1] - 1
    idx = jnp.where(n_B == g, g - 1, n_B)
    p = jnp.take_along_axis(p_BTV, idx[:, None, None], 1)[:, 0]
    q = jnp.where((n_B == g)[:, None], 0.0, jnp.take_along_axis(q_BTV, idx[:, None, None], 1)[:, 0])
    return spec.residual(p, q)


def _sample_q_untruncated(key, logits_BV, sampler):
    """Drafts drawn with top-k / typical, but the log-q kept for acceptance computed without it."""
    tok, _ = sample(key, logits_BV, sampler)
    return tok, processed_logprobs(logits_BV, dataclasses.replace(sampler, top_k=0, top_p=1.0, typical_p=1.0))


def _eos_only_at_window_end(drafts_BG, n_B, t_B, room_B, eos_id, pad_id):
    """EOS stops a row only when it is the last token of the round's window."""
    w, count, _ = REAL_EMIT(drafts_BG, n_B, t_B, room_B, -12345, pad_id)
    last = jnp.take_along_axis(w, jnp.maximum(count - 1, 0)[:, None], 1)[:, 0]
    return w, count, last == eos_id


REAL_EMIT = spec.emit_window
PLAIN = (dict(draft_cache="shared"), TOY_SAMPLER, -1)
BROKEN = {  # name: (module attribute, replacement, mode)
    "residual_is_p": ("residual", lambda p, q: p, PLAIN),
    "bonus_wrong_position": ("correction_dist", _broken_bonus, PLAIN),
    "stale_length_after_rollback": ("committed_lengths", lambda lengths, count: lengths + GAMMA + 1, PLAIN),
    "q_used_is_not_q_sampled": ("sample", _sample_q_untruncated, E2E_MODES["shared-eos-top2"]),
    "q_used_is_not_typical": ("sample", _sample_q_untruncated, E2E_MODES["typical"]),
    "eos_only_at_window_end": ("emit_window", _eos_only_at_window_end, E2E_MODES["shared-eos-top2"]),
}


@pytest.mark.parametrize("bug", list(BROKEN))
def test_end_to_end_power_broken_variants_fail(bug, monkeypatch):
    name, fn, (kw, sampler, eos) = BROKEN[bug]
    if bug == "bonus_wrong_position":
        monkeypatch.setattr(spec, "residual", spec.residual)  # _broken_bonus calls the real one
    monkeypatch.setattr(spec, name, fn)
    outcomes, _ = _spec_continuations(sampler=sampler, eos_id=eos, **kw)
    assert _pvalue(outcomes, sampler, eos) < POWER


# ---------------------------------------------------------------- greedy, ragged, rollback

SMALL = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, ffn_dim=64,
                    sliding_window=5)
SPARK = dataclasses.replace(SMALL, ffn_kind="spark", attn_kind="spark",
                            spark=SparkConfig(ffn_k_frac=0.25, attn_k=4, decode_capacity_sigmas=100.0))
GREEDY = SamplerConfig(temperature=0.0)


def _batch(prompts):
    arr = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    for i, x in enumerate(prompts):
        arr[i, : len(x)] = x
    return jnp.asarray(arr), jnp.asarray([len(x) for x in prompts], jnp.int32)


def _fresh_next_logits(graphdef, params, seqs, widths=None):
    """Each sequence's next-token logits from one full forward, no cache: [B, V] (rows padded at
    the end, which a causal model does not see)."""
    arr, lengths = _batch(seqs)
    logits = jax.jit(lambda a: nnx.merge(graphdef, params)(a, jnp.arange(a.shape[1])[None], widths=widths)[0])(arr)
    return np.asarray(logits)[np.arange(len(seqs)), np.asarray(lengths) - 1]


PROMPTS = [[5, 9, 2, 44, 17, 3, 8], [11, 4, 30], [7, 7, 1, 60, 2]]


GREEDY_CASES = {"dense-shared": (SMALL, "shared", [(1, None), (8, None), (8, 0.999)]),
                "dense-separate": (SMALL, "separate", [(1, None), (8, None)]),
                "spark-shared": (SPARK, "shared", [(8, None)])}


@pytest.mark.parametrize("case", list(GREEDY_CASES))
def test_greedy_equals_plain_greedy(case):
    """Draft = full width (every round fully accepted: bonus path), F/8 (rejections, rollback),
    F/8 adaptive; the Spark model drafts and verifies on its sparse-gather path."""
    cfg, draft_cache, drafts = GREEDY_CASES[case]
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    prompts, lengths = _batch(PROMPTS)
    kw = dict(max_new_tokens=20, sampler=GREEDY, eos_id=-1, pad_id=0)
    ref, _, _ = plain.generate(graphdef, params, prompts, lengths, jax.random.key(0), **kw)
    for divisor, adaptive in drafts:
        sc = spec.SpecConfig(draft_widths=cfg.granularity_widths(divisor), gamma=3, draft_cache=draft_cache,
                             adaptive_threshold=adaptive)
        out, num, st = spec.generate(graphdef, params, prompts, lengths, jax.random.key(1), spec=sc, **kw)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref), err_msg=f"F/{divisor} {adaptive}")
        assert np.asarray(num).tolist() == [20] * 3
        rate = float(st["acceptance_rate"])
        assert rate == 1.0 if divisor == 1 else rate < 1.0


def test_ragged_batch_rows_equal_alone_and_eos():
    graphdef, params = nnx.split(Transformer(SMALL, nnx.Rngs(0)))
    kw = dict(max_new_tokens=12, sampler=GREEDY, pad_id=0,
              spec=spec.SpecConfig(draft_widths=SMALL.granularity_widths(8), gamma=4))
    prompts, lengths = _batch(PROMPTS)
    out, num, st = spec.generate(graphdef, params, prompts, lengths, jax.random.key(0), eos_id=-1, **kw)
    assert len(set(np.asarray(st["accepted"]).tolist())) > 1  # rows really accepted different counts
    for i in range(len(PROMPTS)):  # batch of one (same padded shape: one compile)
        alone, _, _ = spec.generate(graphdef, params, prompts[i : i + 1], lengths[i : i + 1], jax.random.key(0),
                                    eos_id=-1, **kw)
        np.testing.assert_array_equal(np.asarray(out[i]), np.asarray(alone[0]))
    # EOS: stop each row at its first occurrence of a token it emits, pad after it
    eos = int(out[0, 5])
    out_e, num_e, _ = spec.generate(graphdef, params, prompts, lengths, jax.random.key(0), eos_id=eos, **kw)
    for row, ref, n in zip(np.asarray(out_e), np.asarray(out), np.asarray(num_e), strict=True):
        hits = np.flatnonzero(ref == eos)
        expect = hits[0] + 1 if len(hits) else 12
        assert n == expect
        np.testing.assert_array_equal(row[:n], ref[:n])
        assert (row[n:] == 0).all()


@pytest.mark.parametrize("draft_cache", spec.DRAFT_CACHES)
def test_rollback_cache_equals_fresh_forward(draft_cache):
    """After a round with a rejection, the next-token logits from the rolled-back cache equal a
    fresh forward over the committed tokens (target; and the separate draft's cache too)."""
    cfg = SMALL
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    prompts, lengths = _batch(PROMPTS)
    dw, widths = cfg.granularity_widths(8), cfg.check_widths(None)
    kw = dict(spec=spec.SpecConfig(draft_widths=dw, gamma=4, draft_cache=draft_cache), sampler=SamplerConfig(1.0),
              eos_id=-1, pad_id=0, widths=widths)

    @jax.jit
    def one_round(params):  # the round and the next-token logits from its caches, in one program
        model = nnx.merge(graphdef, params)
        s = spec.spec_prefill(model, prompts, lengths, jax.random.key(2), max_new_tokens=16, **kw)
        s = spec.spec_round(model, s, sparse=True, **kw)
        pos_B = s.cache.lengths
        got = {"target": model(s.pending_B[:, None], pos_B[:, None], cache=s.cache, widths=widths)[0][:, -1]}
        if s.draft_cache is not None:  # the draft re-reads [last, pending]: fills the slot of a full acceptance
            got["draft"] = model(jnp.stack([s.last_B, s.pending_B], 1), pos_B[:, None] + jnp.arange(-1, 1),
                                 cache=s.draft_cache, widths=dw)[0][:, -1]
        return s, got

    s, got = one_round(params)
    accepted = np.asarray(s.stats["accepted"])
    assert (accepted < 4).any()  # a rejection happened
    assert (s.draft_cache is not None) == (draft_cache == "separate")
    seqs = [list(PROMPTS[b]) + np.asarray(s.tokens_BN[b, : s.num_B[b]]).tolist() for b in range(len(PROMPTS))]
    assert [len(x) for x in seqs] == (np.asarray(s.cache.lengths) + 1).tolist()
    for name, w in [("target", widths), ("draft", dw)][: len(got)]:
        np.testing.assert_allclose(np.asarray(got[name]), _fresh_next_logits(graphdef, params, seqs, w), atol=1e-4,
                                   rtol=1e-4, err_msg=name)


def test_bad_arguments():
    for bad, msg in [(dict(gamma=0), "gamma"), (dict(gamma=2, draft_cache="x"), "draft_cache"),
                     (dict(gamma=2, adaptive_threshold=1.5), "adaptive_threshold")]:
        with pytest.raises(ConfigError, match=msg):
            spec.SpecConfig(**bad)
    graphdef, params = nnx.split(Transformer(SMALL, nnx.Rngs(0)))
    prompts, lengths = _batch(PROMPTS)
    kw = dict(max_new_tokens=4, sampler=GREEDY, eos_id=-1, pad_id=0)
    with pytest.raises(ConfigError, match="widths"):
        spec.generate(graphdef, params, prompts, lengths, jax.random.key(0),
                      spec=spec.SpecConfig(draft_widths=(8,), gamma=2), **kw)


def test_compiled_round_does_not_copy_the_cache():
    """A speculative round writes the draft's and the verify block's K/V into the cache in place: the
    optimized program holds no copy of a whole cache buffer (with one KV head, reshaping the cache
    for the CPU attention kernel made XLA compute each write twice, on copies of every K and V
    buffer: 9 per buffer per γ = 3 round on runs/bench_lm, 14 copies here)."""
    cfg = dataclasses.replace(SPARK, num_kv_heads=1, num_layers=1)
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    arr, lengths = _batch(PROMPTS[:1])  # batch 1: the reshape of [1, 1, S, H] was a bitcast XLA fused the write into
    sc = spec.SpecConfig(draft_widths=cfg.granularity_widths(8), gamma=2)
    hlo = spec.fixed_generate.lower(graphdef, params, arr, lengths, jax.random.key(0), max_new_tokens=8,
                                    sampler=SamplerConfig(0.8), eos_id=-1, pad_id=0, spec=sc, widths=None,
                                    sparse=True).compile().as_text()
    body = hlo[: hlo.index("\nENTRY")]  # every computation but the entry (which copies its inputs once)
    copies = [line for line in body.splitlines() if " copy(" in line
              and re.search(rf"= f32\[1,1,\d+,{cfg.head_dim}\]", line)]  # the [B, K, S, H] K/V buffers
    assert not copies, copies[:3]
