"""Multi-draft speculative decoding (decode/multidraft.py) is lossless end to end: SpecTr (fixed
and adaptive), RSD-C and RSD-S through the real while_loop emit the target's law over every
continuation (chi-square), four broken variants fail; greedy output equals plain greedy for dense
and Spark targets; ragged batches equal rows alone."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optimized_jit
import pytest
from flax import nnx
from test_speculative import (
    ALPHA,
    LENGTH,
    POWER,
    PROMPT,
    PROMPTS,
    SMALL,
    SPARK,
    TOP2,
    TOY,
    TOY_EOS,
    TOY_SAMPLER,
    _batch,
    _fresh_next_logits,
    _pvalue,
    _toy,
)

from decode import generate as plain
from decode import multidraft as md_lib
from decode import verify
from decode.multidraft import MultiDraftConfig
from decode.sampling import SamplerConfig
from spark.errors import ConfigError
from spark.model import Transformer

TRIALS = 20_000
SPECTR = MultiDraftConfig("spectr", drafts=3, length=2)
RSD_C = MultiDraftConfig("rsd_c", branching=(3, 2))
RSD_S = MultiDraftConfig("rsd_s", beam=3, depth=2)
E2E = {  # name: (config, sampler, eos)
    "spectr-eos-top2": (SPECTR, TOP2, TOY_EOS),
    "spectr-adaptive": (MultiDraftConfig("spectr", drafts=2, length=3, adaptive_threshold=0.3), TOY_SAMPLER, -1),
    "rsd_c": (RSD_C, TOY_SAMPLER, -1),
    "rsd_s": (RSD_S, TOY_SAMPLER, -1),
}


def _continuations(md, sampler, eos_id, seed=0):
    """TRIALS rows of the real jitted loop (a fresh trace: monkeypatches apply) -> outcomes, stats."""
    graphdef, params = _toy()
    md = md.resolve(TOY) if md.draft_widths is None else md
    run = optimized_jit.jit(functools.partial(md_lib.generate.__wrapped__, graphdef, max_new_tokens=LENGTH,
                                              sampler=sampler, eos_id=eos_id, pad_id=0, md=md))
    prompts = jnp.asarray(np.tile(PROMPT, (TRIALS, 1)), jnp.int32)
    out, num, st = run(params, prompts, jnp.full((TRIALS,), len(PROMPT), jnp.int32), jax.random.key(seed))
    out, num = np.asarray(out), np.asarray(num)
    assert (out[np.arange(LENGTH)[None] >= num[:, None]] == 0).all()
    return [tuple(r[:n]) for r, n in zip(out.tolist(), num.tolist(), strict=True)], st


@pytest.mark.parametrize("mode", list(E2E))
def test_end_to_end_matches_target_distribution(mode):
    md, sampler, eos = E2E[mode]
    outcomes, st = _continuations(md, sampler, eos)
    assert _pvalue(outcomes, sampler, eos) > ALPHA
    accepted, rounds = int(np.sum(st["accepted"])), int(np.sum(st["rounds"]))
    depth = len(md.levels) - 1
    assert rounds < accepted < depth * rounds  # accepted paths of several lengths, some full (bonus)
    if mode == "spectr-adaptive":  # rows stopped early in some rounds, not in all
        drafted = int(np.sum(st["drafted"]))
        assert rounds * md.drafts < drafted < rounds * md.drafts * depth
    if eos >= 0:
        ends = [o for o in outcomes if len(o) < LENGTH]
        assert len(ends) > TRIALS // 20 and all(o[-1] == eos for o in ends)


def _without_replacement_rows(key, logq_BKV, greedy):
    """SpecTr rows whose first tokens are distinct (Gumbel-top-k): not the i.i.d. drafts K-SEQ needs."""
    g = jax.random.gumbel(key, logq_BKV.shape[:1] + logq_BKV.shape[2:])
    top = jax.lax.top_k(logq_BKV[:, 0] + g, logq_BKV.shape[1])[1]
    iid = jax.random.categorical(key, logq_BKV, -1)
    return jnp.where(jnp.all(logq_BKV == logq_BKV[:, :1], axis=(1, 2))[:, None], top, iid).astype(jnp.int32)


def _q_sorted_children(key, logq_BV, logits_BV, b, greedy):
    """Gumbel-top-b children, but tested in order of q instead of the sampling order."""
    tok, ok = REAL_TOP(key, logq_BV, logits_BV, b, greedy)
    order = jnp.argsort(-jnp.take_along_axis(logq_BV, tok, 1), axis=1)
    return jnp.take_along_axis(tok, order, 1), jnp.take_along_axis(ok, order, 1)


def _q_not_updated(md, greedy):
    return lambda p, q, x, ok: verify.recursive(p, q, x, ok, without_replacement=False)


REAL_TOP = md_lib._top_children
BROKEN = {  # name: (module attribute, replacement, config)
    "kseq_fed_distinct_drafts": ("_row_draws", _without_replacement_rows, MultiDraftConfig("spectr", drafts=3,
                                                                                             length=2)),
    "rsd_q_keeps_rejected_token": ("_verifier", _q_not_updated, RSD_C),
    "rsd_children_in_q_order": ("_top_children", _q_sorted_children, RSD_C),
    "stale_tree_slot_after_commit": ("commit", lambda c, kept, n: c.replace(lengths=c.lengths + n), RSD_C),
}


@pytest.mark.parametrize("bug", list(BROKEN))
def test_end_to_end_power_broken_variants_fail(bug, monkeypatch):
    name, fn, md = BROKEN[bug]
    monkeypatch.setattr(md_lib, name, fn)
    outcomes, _ = _continuations(md, TOY_SAMPLER, -1)
    assert _pvalue(outcomes, TOY_SAMPLER, -1) < POWER


GREEDY = SamplerConfig(temperature=0.0)
GREEDY_MDS = [MultiDraftConfig("spectr", drafts=2, length=3), MultiDraftConfig("rsd_c", branching=(3, 2)),
              MultiDraftConfig("rsd_s", beam=2, depth=2)]  # depth 2 where 3 adds only compile time


@pytest.mark.parametrize("cfg", [SMALL, SPARK], ids=["dense", "spark"])
def test_greedy_equals_plain_greedy_and_ragged_rows_equal_alone(cfg):
    """SpecTr and RSD-S on the dense target; RSD-C (tree attention on the sparse-gather path) on Spark.
    A ragged row alone is run on the dense target only: on Spark, batch == plain batch here and plain
    batch == plain alone (test_generate) already imply it, and a B = 1 program is another compile."""
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    prompts, lengths = _batch(PROMPTS)
    kw = dict(max_new_tokens=16, sampler=GREEDY, eos_id=-1, pad_id=0)
    ref, _, _ = plain.generate(graphdef, params, prompts, lengths, jax.random.key(0), **kw)
    for md in [GREEDY_MDS[0], GREEDY_MDS[2]] if cfg is SMALL else GREEDY_MDS[1:2]:
        md = md.resolve(cfg)
        out, num, st = md_lib.generate(graphdef, params, prompts, lengths, jax.random.key(1), md=md, **kw)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(ref), err_msg=md.method)
        assert 0 < int(np.sum(st["accepted"])) and float(st["tokens_per_round"]) > 1.0
    if cfg is SPARK:
        return
    alone, _, _ = md_lib.generate(graphdef, params, prompts[1:2], lengths[1:2], jax.random.key(1), md=md, **kw)
    np.testing.assert_array_equal(np.asarray(alone[0]), np.asarray(out[1]))


def test_rsd_s_tree_is_a_beam_with_ordered_children():
    """One RSD-S draft: each depth holds `beam` valid nodes whose parents are at the depth above,
    siblings distinct; ancestors follow the parents."""
    graphdef, params = _toy()
    md = MultiDraftConfig("rsd_s", beam=3, depth=2).resolve(TOY)
    prompts = jnp.asarray([PROMPT], jnp.int32)
    from decode.speculative import SpecConfig, spec_prefill

    @jax.jit
    def draft(params):
        model = nnx.merge(graphdef, params)
        s = spec_prefill(model, prompts, jnp.asarray([2]), jax.random.key(0), max_new_tokens=8,
                         spec=SpecConfig(gamma=md.nodes), sampler=TOY_SAMPLER, eos_id=-1, pad_id=0, widths=None)
        pos_BN = s.cache.lengths[:, None] + jnp.asarray(md_lib.depths(md))[None]
        return md_lib.draft_rsd(model, s, jax.random.key(3), md, pos_BN, TOY_SAMPLER, True)

    tokens, valid, logq, parent, anc_drafted, _ = draft(params)
    parent, valid = np.asarray(parent[0]), np.asarray(valid[0])
    assert valid.all() and parent.tolist()[:4] == [-1, 0, 0, 0] and set(parent[4:]) <= {1, 2, 3}
    tokens = np.asarray(tokens[0])
    for a in range(4):  # siblings are distinct tokens (sampled without replacement)
        kids = tokens[np.flatnonzero(parent == a)]
        assert len(set(kids.tolist())) == len(kids)
    anc = np.asarray(md_lib.ancestors(jnp.asarray(parent)[None], md.levels)[0])
    np.testing.assert_array_equal(np.asarray(anc_drafted[0]), anc)  # built level by level as parents are drawn
    for n in range(4, 7):
        assert anc[n, [0, parent[n], n]].all() and anc[n].sum() == 3


def test_bad_configs_are_one_line_errors():
    with pytest.raises(ConfigError, match="does not apply to rsd_c"):
        MultiDraftConfig("rsd_c", verifier="kseq")
    with pytest.raises(ConfigError, match="spectr only"):
        MultiDraftConfig("rsd_s", adaptive_threshold=0.5)
    with pytest.raises(ConfigError, match="branching"):
        MultiDraftConfig("rsd_c", branching=(2, 0))
    with pytest.raises(ConfigError, match="method"):
        MultiDraftConfig("medusa")
    assert MultiDraftConfig("spectr", drafts=4, length=3).nodes == 13
    assert MultiDraftConfig("rsd_c", branching=(3, 2, 1)).nodes == 1 + 3 + 6 + 6


def test_conditional_gumbels_by_hand_and_their_max_is_the_parents():
    # G_a = 1, φ = (0.5, −1): Z = 0.5; G_0 = −log(e^−1 − e^−0.5 + e^−0.5) = 1,
    # G_1 = −log(e^−1 − e^−0.5 + e^1) = −log(2.47963) = −0.90811
    got = np.asarray(md_lib.conditional_gumbels(jnp.asarray([1.0]), jnp.asarray([0.5, -1.0])))
    np.testing.assert_allclose(got, [1.0, -0.90811], atol=1e-5)
    phi = jax.random.gumbel(jax.random.key(0), (50, 7)) * 3
    g = jax.random.gumbel(jax.random.key(1), (50, 1)) + 2
    out = md_lib.conditional_gumbels(g, phi)
    np.testing.assert_allclose(np.asarray(out.max(-1)), np.asarray(g[:, 0]), atol=1e-5)
    assert (np.argsort(np.asarray(out), -1) == np.argsort(np.asarray(phi), -1)).all()  # order kept


def test_committed_cache_equals_a_fresh_forward(md=RSD_C):
    """After one sampled round (with rejections), the next token's logits from the committed cache
    equal a fresh forward over prompt + emitted tokens: commit moved the right K/V into place."""
    from decode.speculative import SpecConfig, spec_prefill

    graphdef, params = nnx.split(Transformer(SMALL, nnx.Rngs(0)))
    prompts, lengths = _batch(PROMPTS)
    md = md.resolve(SMALL)
    sampler = SamplerConfig(1.0)
    kw = dict(sampler=sampler, eos_id=-1, pad_id=0, widths=SMALL.check_widths(None))

    @jax.jit
    def one_round(params):
        model = nnx.merge(graphdef, params)
        s = spec_prefill(model, prompts, lengths, jax.random.key(2), max_new_tokens=12,
                         spec=SpecConfig(gamma=md.nodes), **kw)
        s = md_lib.md_round(model, model, s, md=md, sparse=True, **kw)
        logits, _ = model(s.pending_B[:, None], s.cache.lengths[:, None], cache=s.cache)
        return s, logits[:, 0]

    s, got = one_round(params)
    num = np.asarray(s.num_B)
    assert len(set(num.tolist())) > 1  # rows accepted different numbers of tokens
    seqs = [list(PROMPTS[b]) + np.asarray(s.tokens_BN[b, : num[b]]).tolist() for b in range(len(PROMPTS))]
    assert [len(x) for x in seqs] == (np.asarray(s.cache.lengths) + 1).tolist()
    np.testing.assert_allclose(np.asarray(got), _fresh_next_logits(graphdef, params, seqs), atol=1e-4, rtol=1e-4)
