"""Hand-computed search runs: every number below is worked out in the comments from the papers'
definitions, not from the implementation or tests/foresight_ref.py (a misreading shared by both
would pass the reference comparison, not these).

The world (vocabulary a = 0, b = 1, EOS = 2; prompt [a]; a step is one token):
  first token:  P(a) = 0.6, P(b) = 0.4
  after a:      P(a) = P(b) = 0.5            after b:  P(b) = 1
  after two:    P(EOS) = 1
So a is the likelier first step, but b leads to the likelier solution:
  [a, x, EOS] has mean log-prob (ln 0.6 + ln 0.5 + 0) / 3 = -0.401324,
  [b, b, EOS] has mean log-prob (ln 0.4 + 0 + 0) / 3 = -0.305430.
Foresight rollouts and completions are greedy (τ = 0; a tie goes to the lower id, a):
  from [a]: [a, EOS], F = (ln 0.5 + 0) / 2 = -0.346574;   from [b]: [b, EOS], F = 0.
M = 2 beams, N = 2 samples; with key 3 the four step-0 candidates (beam 0: c0, c1; beam 1: c2,
c3) are drawn as [a, a, b, a] (checked first): s(a) = ln 0.6 = -0.510826, s(b) = ln 0.4 = -0.916291.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from foresight_ref import MockLM

from decode import search

A_, B_, EOS = 0, 1, 2
NEG = -60.0
S_A, S_B = math.log(0.6), math.log(0.4)
F_A, F_B = (math.log(0.5) + 0.0) / 2, 0.0
Q_A, Q_B = (math.log(0.6) + math.log(0.5)) / 3, math.log(0.4) / 3


def _world():
    def row(n_gen, first):
        if n_gen == 0:
            return [math.log(0.6), math.log(0.4), NEG]
        if n_gen == 1:
            return [math.log(0.5), math.log(0.5), NEG] if first == A_ else [NEG, 0.0, NEG]
        return [NEG, NEG, 0.0]

    tab = np.array([[row(n, f) for f in range(3)] for n in range(3)], np.float32)  # [n_gen, first token, V]
    t_j = jnp.asarray(tab)
    return MockLM(lambda toks, pos: t_j[jnp.clip(pos, 0, 2), toks[:, 1]],
                  lambda seq: tab[min(len(seq) - 1, 2), seq[1] if len(seq) > 1 else 0], 0)


TASK = search.TaskTokens(delim_id=3, eos_id=EOS)  # a step ends after its one token (step_tokens=1)


def _run(method, **kw):
    cfg = search.SearchConfig(**(dict(method=method, beams=2, samples=2, max_steps=4, step_tokens=1, max_gen=4,
                                      tau_step=1.0, tau_foresight=0.0, tau_final=0.0) | kw))
    out = jax.jit(lambda p, n, k: search.run_search(_world(), p, n, k, cfg, TASK))(
        jnp.asarray([[A_]]), jnp.asarray([1]), jax.random.key(3))
    out = jax.tree.map(np.asarray, out)
    chex.assert_shape([out["quality"], out["valid"]], (1, cfg.samples if method == "sample" else cfg.beams))
    if method != "sample":
        assert out["trace"]["cand_tokens"][0, 0, :, 0].tolist() == [A_, A_, B_, A_]  # the draws the comments assume
    return out


def _answer(out, rule="quality"):
    j = int(out[f"choice_{rule}"][0])
    return out["tokens"][0, j, : out["num"][0, j]].tolist(), float(out["quality"][0, j])


def test_mfs_default_prunes_the_unlikely_step():
    """λ = 0: μ = (3 s(a) + s(b)) / 4 = -0.612192; kept s >= μ: c0, c1, c3 (b is pruned).
    K = ceil(4/2) = 2 slots hold c0, c1 (best s, lower index first); c3 overflows (1).
    F = -0.346574 for both, A = F − F(root) = F − 0; new beams c0, c1.
    Step 1: each [a] beam expands to a or b, s = ln 0.5 for all (σ = 0: all kept, 2 overflow);
    F = 0 (the rollout is EOS alone), A = 0 − (−0.346574) = +0.346574 > ε: no revert.
    Step 2: every candidate is EOS: all finished, stop. Answer [a, x, EOS], quality -0.401324.
    Tokens: 4 + 2·2 (step 0) + 4 + 2·1 (step 1) + 4 (step 2) = 18."""
    out = _run("mfs", sigma_rate=0.0)
    tr = out["trace"]
    assert tr["keep"][0, 0].tolist() == [True, True, False, True]
    assert tr["surv"][0, 0].tolist() == [0, 1] and tr["surv_ok"][0, 0].all()
    np.testing.assert_allclose(tr["s"][0, 0], [S_A, S_A, S_B, S_A], rtol=1e-5)
    np.testing.assert_allclose(tr["F"][0, 0], [F_A, F_A], rtol=1e-5)
    np.testing.assert_allclose(tr["A"][0, 0], [F_A, F_A], rtol=1e-5)
    assert tr["src"][0, 0].tolist() == [0, 1]
    np.testing.assert_allclose(tr["A"][1, 0], [-F_A, -F_A], rtol=1e-5)
    assert out["stop_step"].tolist() == [2] and not out["reverted"][0]
    assert out["stats"]["foresight_overflow"].tolist() == [3] and out["stats"]["gen_tokens"].tolist() == [18]
    toks, q = _answer(out)
    assert toks[0] == A_ and toks[-1] == EOS and len(toks) == 3
    assert q == pytest.approx(Q_A, rel=1e-5)


def test_mfs_without_prune_follows_foresight_then_its_advantage():
    """prune off, K = 4: every candidate is rolled out; slots in order of s: c0, c1, c3, c2;
    F = [F_A, F_A, F_A, 0]; A = F − 0; best A is c2 (b, A = 0), then c0 (A = -0.346574, the lower
    slot among the ties): new beams [c2, c0] — foresight found b.
    Step 1: beam 0 = [b] expands to [b, b] twice (s = ln 1 = 0), beam 1 = [a] to [a, ·] twice
    (s = ln 0.5); slots by s: the b-children first. Every rollout is EOS alone, F = 0, so
    A = F − F(parent) = 0 − 0 = 0 for the b-children and 0 − (−0.346574) = +0.346574 for the
    a-children: the advantage measures *improvement*, so the new beams are the a-children (slots
    2, 3) and the answer is [a, ·, EOS], quality -0.401324. Ranked by F instead (the ablation) the
    four tie at 0, the first slots win, and the answer is [b, b, EOS], quality -0.305430."""
    out = _run("mfs", prune=False, foresight_slots=4)
    tr = out["trace"]
    assert tr["surv"][0, 0].tolist() == [0, 1, 3, 2]
    np.testing.assert_allclose(tr["F"][0, 0], [F_A, F_A, F_A, F_B], atol=1e-6)
    assert tr["src"][0, 0].tolist() == [2, 0]
    assert tr["cand_tokens"][1, 0, :, :2].tolist()[:2] == [[B_, B_], [B_, B_]]
    np.testing.assert_allclose(tr["A"][1, 0], [0.0, 0.0, -F_A, -F_A], atol=1e-6)
    assert tr["src"][1, 0].tolist() == [2, 3]
    toks, q = _answer(out)
    assert toks[0] == A_ and q == pytest.approx(Q_A, rel=1e-5)
    by_f = _run("mfs", prune=False, foresight_slots=4, rank="F")
    assert by_f["trace"]["src"][1, 0].tolist() == [0, 1]
    for rule in ("quality", "vote"):
        toks, q = _answer(by_f, rule)
        assert toks == [B_, B_, EOS] and q == pytest.approx(Q_B, rel=1e-5)


def test_beam_search_keeps_the_likelier_prefix():
    """Step 0: cumulative log-prob = s; the top 2 of [s_A, s_A, s_B, s_A] are c0, c1 (ties to the
    lower index): b is gone, although its solution is likelier. Step 1: cum = ln 0.6 + ln 0.5 =
    -1.203973 for all four; step 2 adds ln 1 = 0. Answer [a, x, EOS], quality -0.401324."""
    out = _run("beam")
    tr = out["trace"]
    np.testing.assert_allclose(tr["cum"][0, 0], [S_A, S_A, S_B, S_A], rtol=1e-5)
    assert tr["src"][0, 0].tolist() == [0, 1]
    np.testing.assert_allclose(tr["cum"][1, 0], [S_A + math.log(0.5)] * 4, rtol=1e-5)
    toks, q = _answer(out)
    assert toks[0] == A_ and q == pytest.approx(Q_A, rel=1e-5)


def test_phi_prunes_below_mean_minus_k_sigma_and_stops_on_agreement():
    """μ = (3 s(a) + s(b)) / 4 = -0.612192. σ over the four s (population): deviations 0.101366
    (a), -0.304099 (b); σ² = (3·0.010275 + 0.092476)/4 = 0.030825, σ = 0.175572. With k = 1.6:
    keep s > μ − 1.6σ = -0.893107: c0, c1, c3; b (-0.916291) is pruned (the sample std 0.202733
    would give -0.936565 and keep it). M − 0 finished = 2 needed: no top-up. Survivors c0, c1
    (K = 2), F = A = -0.346574 each. Both rollouts answer [a, a]: one cluster holding all of them
    (share 1 >= δ = 0.7), so φ stops at step 0 and completes both beams greedily: [a, a, EOS],
    quality -0.401324."""
    out = _run("phi", phi_sigma_rate=1.6)
    tr = out["trace"]
    assert tr["keep"][0, 0].tolist() == [True, True, False, True]
    np.testing.assert_allclose(tr["A"][0, 0], [F_A, F_A], rtol=1e-5)
    assert sorted(tr["src"][0, 0].tolist()) == [0, 1]
    assert out["stop_step"].tolist() == [0]
    toks, q = _answer(out)
    assert toks == [A_, A_, EOS] and q == pytest.approx(Q_A, rel=1e-5)


def test_greedy_sample_baseline():
    """Greedy (N = 1, τ = 0): a (0.6), then a (the tie to the lower id), then EOS: 3 tokens,
    quality -0.401324 — the likelier first step, the less likely solution."""
    out = _run("sample", samples=1)
    toks, q = _answer(out)
    assert toks == [A_, A_, EOS] and q == pytest.approx(Q_A, rel=1e-5)
    assert out["stats"]["gen_tokens"].tolist() == [3]
