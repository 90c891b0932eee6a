"""MFS and φ-Decoding on device == the NumPy reference (tests/foresight_ref.py) on a mock LM:
kept/pruned sets, survivors, F, advantages, chosen candidates, stop step, revert, final answers
and token accounting; edge cases; a planted task whose correct step only foresight can see."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from foresight_ref import Reference, answer_key, hash_lm, planted_lm

from decode import rollout, search, search_lib
from spark.errors import ConfigError

V, DELIM, EOS = 7, 3, 2
TASK = search.TaskTokens(delim_id=DELIM, eos_id=EOS, answer_span="all")
PROMPTS = [[5, 1, 4, 6], [6, 6], [1, 5, 0]]
BASE = search.SearchConfig(beams=3, samples=3, max_steps=4, step_tokens=3, max_gen=10, rollouts=1)

CASES = {  # name: (method, config changes, hash-LM seed); test_cases_reach_their_edge checks each edge
    "mfs": ("mfs", {}, 0),
    "mfs-all-finished-at-step-0": ("mfs", dict(eos_bias=12.0), 8),
    "mfs-code-baseline-R2": ("mfs", dict(baseline="parent_step", rollouts=2, tau_step=1.0), 1),
    "mfs-revert-first-eligible": ("mfs", dict(epsilon=1e3), 2),
    "mfs-min-steps-overflow": ("mfs", dict(sigma_rate=0.0, foresight_slots=2, min_steps=2, epsilon=1e3), 3),
    "mfs-one-candidate": ("mfs", dict(beams=1, samples=1), 4),
    "mfs-buffer-is-one-step": ("mfs", dict(max_gen=3), 5),
    "mfs-greedy-steps": ("mfs", dict(tau_step=0.0, tau_final=0.0), 6),
    "mfs-no-prune-rank-by-F": ("mfs", dict(prune=False, rank="F", foresight_slots=5), 9),
    "phi": ("phi", dict(min_steps=1), 0),
    "beam": ("beam", {}, 0),
    "beam-finished-compete": ("beam", dict(eos_bias=1.5, samples=2), 3),
    "phi-R2-overflow": ("phi", dict(rollouts=2, foresight_slots=3, phi_sigma_rate=2.0, answer_span_last=True), 7),
}


def _batch(prompts):
    arr = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    for i, x in enumerate(prompts):
        arr[i, : len(x)] = x
    return jnp.asarray(arr), jnp.asarray([len(x) for x in prompts], jnp.int32)


def _run(lm, cfg, task, prompts, key):
    fn = jax.jit(lambda p, n, k: search.run_search(lm, p, n, k, cfg, task))
    return jax.tree.map(np.asarray, fn(*_batch(prompts), key))


def _case(name):
    method, changes, seed = CASES[name]
    changes = dict(changes)
    task = dataclasses.replace(TASK, answer_span="last_step") if changes.pop("answer_span_last", False) else TASK
    lm = hash_lm(V, seed=seed, bias={EOS: changes.pop("eos_bias", 0.0)})
    return dataclasses.replace(BASE, method=method, **changes), task, lm


def _partition(keys):
    return [[i for i, y in enumerate(keys) if y == x] for x in keys]


def _search_and_reference(name):
    cfg, task, lm = _case(name)
    key = jax.random.key(11)
    got = _run(lm, cfg, task, PROMPTS, key)
    reference = Reference(lm, cfg, task, PROMPTS, V)
    return got, reference.run(key, cfg.method), reference


def _assert_same(got, ref, reference):
    tr = got["trace"]
    assert len(ref["trace"]) >= 1
    for t, rec in enumerate(ref["trace"]):
        for b, r in enumerate(rec):
            assert bool(tr["live"][t, b]) == (r is not None), (t, b)
            if r is None:
                continue
            where = f"step {t} problem {b}"
            unf = sorted(r["s"])
            np.testing.assert_allclose(tr["s"][t, b, unf], [r["s"][c] for c in unf], rtol=1e-5, err_msg=where)
            assert np.flatnonzero(tr["keep"][t, b]).tolist() == r["keep"], where
            k = len(r["surv"])
            assert tr["surv_ok"][t, b].sum() == k and tr["surv"][t, b, :k].tolist() == r["surv"], where
            np.testing.assert_allclose(tr["F"][t, b, :k], r["F"], rtol=1e-5, atol=1e-6, err_msg=where)
            np.testing.assert_allclose(tr["A"][t, b, :k], r["A"], rtol=1e-5, atol=1e-5, err_msg=where)
            n = len(r["src"])
            assert tr["src_ok"][t, b].sum() == n and tr["src"][t, b, :n].tolist() == r["src"], where
            if "cum" in r:  # beam search ranks by the cumulative log-prob
                valid = sorted(r["cum"])
                assert np.flatnonzero(tr["cand_valid"][t, b]).tolist() == valid, where
                np.testing.assert_allclose(tr["cum"][t, b, valid], [r["cum"][c] for c in valid], rtol=1e-5,
                                           err_msg=where)
    assert got["stop_step"].tolist() == ref["stop_step"]
    assert got["reverted"].tolist() == ref["reverted"]
    valid = np.isfinite(np.asarray(ref["quality"]))
    assert (got["valid"] == valid).all()
    np.testing.assert_allclose(got["quality"][valid], np.asarray(ref["quality"])[valid], rtol=1e-5, atol=1e-6)
    assert got["choice_quality"].tolist() == ref["choice_quality"]
    assert got["choice_vote"].tolist() == ref["choice_vote"]
    for b in range(len(PROMPTS)):
        ok = [i for i, x in enumerate(ref["keys"][b]) if x is not None]
        assert _partition(got["answer_keys"][b, ok].tolist()) == _partition([ref["keys"][b][i] for i in ok])
    st = got["stats"]
    overflow = [sum(max(len(rec[b]["keep"]) - reference.cfg.slots, 0) for rec in ref["trace"] if rec[b] is not None)
                for b in range(len(PROMPTS))]
    assert st["foresight_overflow"].tolist() == overflow
    assert st["gen_tokens"].tolist() == ref["gen_tokens"]
    assert (st["gen_tokens"] == st["expand_tokens"] + st["foresight_tokens"] + st["final_tokens"]).all()
    assert st["forward_tokens"].tolist() == [reference.forward_tokens(max(map(len, PROMPTS)))] * len(PROMPTS)


@pytest.mark.parametrize("name", list(CASES))
def test_device_search_equals_reference(name):
    _assert_same(*_search_and_reference(name))


def test_cases_reach_their_edge():
    """Each named edge case really happens (a case that drifted off its edge would test nothing)."""
    def run(name):
        cfg, task, lm = _case(name)
        got = _run(lm, cfg, task, PROMPTS, jax.random.key(11))
        return got, got["trace"], got["stats"]

    got, tr, _ = run("mfs-all-finished-at-step-0")
    assert got["stop_step"].tolist() == [0, 0, 0] and not got["reverted"].any()
    assert not (tr["cand_valid"][0] & ~tr["cand_fin"][0]).any() and got["valid"].all()
    got, _, _ = run("mfs-revert-first-eligible")
    assert got["stop_step"].tolist() == [1, 1, 1] and got["reverted"].all()
    got, _, st = run("mfs-min-steps-overflow")
    assert (st["foresight_overflow"] > 0).all() and (got["stop_step"] > 2).all()
    got, tr, _ = run("mfs-greedy-steps")  # identical candidates: σ = 0, all kept
    unf = tr["cand_valid"][0] & ~tr["cand_fin"][0]
    assert (tr["keep"][0] == unf).all() and unf.sum() == 3 * 9
    _, tr, _ = run("mfs-one-candidate")
    assert (tr["cand_valid"] & ~tr["cand_fin"]).sum(axis=2).max() == 1 and tr["keep"].sum() > 0
    got, _, _ = run("mfs-buffer-is-one-step")
    assert (got["num"][got["valid"]] <= 3).all()
    _, tr, st = run("mfs-no-prune-rank-by-F")  # every unfinished candidate kept; more than the buffer holds
    assert (tr["keep"] == (tr["cand_valid"] & ~tr["cand_fin"])).all() and (st["foresight_overflow"] > 0).all()
    first = np.argmax(np.where(tr["surv_ok"][0], tr["F"][0], -np.inf), axis=1)  # the best F leads at step 0
    none_fin = ~(tr["cand_valid"][0] & tr["cand_fin"][0]).any(axis=1)  # (finished candidates come first)
    assert none_fin.any()
    assert (tr["src"][0][:, 0] == np.take_along_axis(tr["surv"][0], first[:, None], 1)[:, 0])[none_fin].all()


def _wrong_parent_expand(lm, beams, key, cfg, task, stopped_B):
    b, m = beams.valid_BM.shape  # every candidate continues beam 0
    beams = beams.replace(rows=rollout.take(beams.rows, jnp.repeat(jnp.arange(b) * m, m)))
    return REAL_EXPAND(lm, beams, key, cfg, task, stopped_B)


REAL_EXPAND = search_lib.expand
BROKEN = {  # a wrong algorithm must fail the comparison
    "prune-strict-without-best": ("foresight.mfs_keep", lambda s, unf, lam: unf & (s > jnp.mean(s) + lam)),
    "select-by-F-not-A": ("foresight.select_slots", None),
    "wrong-parent-cache": ("search_lib.expand", _wrong_parent_expand),
}


@pytest.mark.parametrize("bug", list(BROKEN))
def test_power_broken_variants_differ(bug, monkeypatch):
    from decode import foresight

    target, fn = BROKEN[bug]
    if bug == "select-by-F-not-A":
        real = foresight.select_slots

        def fn(fin, s, surv, ok, rank, m, cap):
            return real(fin, s, surv, ok, -rank, m, cap)

    module, name = target.split(".")
    monkeypatch.setattr({"foresight": foresight, "search_lib": search_lib}[module], name, fn)
    with pytest.raises(AssertionError):
        _assert_same(*_search_and_reference("mfs-code-baseline-R2"))


def _solutions(out, rule):
    pick = out[f"choice_{rule}"]
    b = np.arange(len(pick))
    return [row[:n].tolist() for row, n in zip(out["tokens"][b, pick], out["num"][b, pick], strict=True)]


def test_search_finds_the_planted_step_sampling_does_not():
    """After `bad` the mock LM only babbles; after `good` it finishes confidently. Both first
    steps are equally likely, so only looking ahead (or scoring whole solutions) tells them apart."""
    good, bad = 5, 4
    lm = planted_lm(8, prompt_len=3, good=good, bad=bad, delim=DELIM, eos=EOS)
    prompts = [[1, 6, 7]] * 16
    solved = [good, DELIM, good, EOS]
    cfg = dataclasses.replace(BASE, beams=4, samples=4, max_gen=12, foresight_slots=16)
    for method in ("mfs", "phi"):
        out = _run(lm, dataclasses.replace(cfg, method=method), TASK, prompts, jax.random.key(3))
        for rule in ("quality", "vote"):
            assert _solutions(out, rule) == [solved] * 16, (method, rule)
    # beam search sees `bad` only once it has babbled; a first step that keeps no `good` beam is lost
    beam = _run(lm, dataclasses.replace(cfg, method="beam"), TASK, prompts, jax.random.key(3))
    assert sum(x == solved for x in _solutions(beam, "quality")) >= 12
    greedy = _run(lm, dataclasses.replace(cfg, method="sample", samples=1, tau_final=0.0), TASK, prompts,
                  jax.random.key(0))
    assert all(x[0] == bad for x in _solutions(greedy, "quality"))  # a tie: argmax takes the lower id
    sampled = _run(lm, dataclasses.replace(cfg, method="sample", samples=1), TASK, prompts, jax.random.key(0))
    wins = sum(x == solved for x in _solutions(sampled, "quality"))
    assert 3 <= wins <= 13  # Binomial(16, 1/2)


def test_sample_baseline_accounting_and_answer_rules():
    """Best-of-N takes the highest mean log-prob, self-consistency the most frequent answer;
    the token counters equal what the buffers hold."""
    cfg, task, lm = _case("mfs")
    cfg = dataclasses.replace(cfg, method="sample", samples=6, tau_final=1.0)
    out = _run(lm, cfg, task, PROMPTS, jax.random.key(5))
    st = out["stats"]
    assert st["gen_tokens"].tolist() == out["num"].sum(axis=1).tolist() == st["final_tokens"].tolist()
    longest = out["num"].max()
    assert st["forward_tokens"].tolist() == [max(map(len, PROMPTS)) + longest * 6] * 3
    for b in range(3):
        sols = [tuple(out["tokens"][b, i, : out["num"][b, i]]) for i in range(6)]
        q = out["quality"][b]
        assert out["choice_quality"][b] == int(np.argmax(q))
        votes = [sum(answer_key(x, task) == answer_key(y, task) for y in sols) for x in sols]
        assert votes[out["choice_vote"][b]] == max(votes)
        assert q[out["choice_vote"][b]] == max(q[i] for i in range(6) if votes[i] == max(votes))


def test_answer_keys_spans():
    rows = rollout.Rows(cache=None, logits_RV=jnp.zeros((4, V)), pos_R=jnp.zeros(4, jnp.int32),
                        gen_RL=jnp.asarray([[4, 3, 5, 2, 0], [4, 3, 5, 3, 2], [6, 3, 5, 2, 0], [5, 0, 0, 0, 0]]),
                        n_gen_R=jnp.asarray([4, 5, 4, 1]), done_R=jnp.asarray([True, True, True, False]))
    last = rollout.answer_keys(rows, DELIM, EOS, "last_step").tolist()
    full = rollout.answer_keys(rows, DELIM, EOS, "all").tolist()
    assert last[0] == last[1] == last[2] == last[3]  # "5" after the last delimiter / a trailing one dropped
    assert full[0] == full[1] != full[2] and full[3] != full[0]
    with pytest.raises(ValueError, match="answer span"):
        rollout.answer_keys(rows, DELIM, EOS, "middle")


@pytest.mark.parametrize("bad,msg", [
    (dict(beams=0), "beams \\(M\\) must be >= 1"),
    (dict(samples=0), "samples \\(N\\) must be >= 1"),
    (dict(sigma_rate=-0.5), "sigma_rate \\(λ\\) must be >= 0"),
    (dict(step_tokens=8, max_gen=4), "max_gen \\(4\\) must hold at least one step \\(8 tokens\\)"),
    (dict(method="mcts"), "method must be one of"),
    (dict(baseline="parent"), "baseline must be one of"),
    (dict(rank="s"), "rank must be .A. or .F."),
])
def test_bad_config_is_a_one_line_error(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        search.SearchConfig(**bad)
