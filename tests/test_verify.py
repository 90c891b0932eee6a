"""decode/verify.py: the exact output law of each verifier, enumerated over every draft tuple of its
draft law, equals the target p (V = 4, k = 1, 2, 3; random laws, disjoint supports, q = p, one-hot q,
p = 0 on drafted tokens); power checks (a verifier fed the wrong draft law is not lossless); the
optimal multi-draft acceptance alpha* against a linear program, K-SEQ's acceptance against it;
hand-worked cases."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode import verify

V = 4


def _laws(seed):
    rng = np.random.default_rng(seed)
    p, q = rng.dirichlet(np.ones(V)), rng.dirichlet(np.ones(V))
    return p.astype(np.float32), q.astype(np.float32)


def _iid(q, k):
    tuples = np.array(list(itertools.product(range(V), repeat=k)))
    return tuples, np.prod(q[tuples], axis=1)


def _without_replacement(q, k):
    """Successive sampling from q: ordered distinct tuples and their probabilities."""
    tuples = np.array(list(itertools.permutations(range(V), k)))
    probs = np.ones(len(tuples))
    for i in range(k):
        left = 1.0 - (q[tuples[:, :i]].sum(axis=1) if i else 0.0)
        probs *= q[tuples[:, i]] / left
    return tuples, probs


def _law(verifier, p, q, tuples, probs):
    """sum over draft tuples of P(tuple) * the verifier's output law given it."""
    one = lambda x: verify.output_law(x, *verifier(jnp.asarray(p), jnp.asarray(q), x))  # noqa: E731
    laws = np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(tuples)))
    return probs @ laws


def _edge_laws():
    """(name, p, q): disjoint supports, q = p, one-hot q, p = 0 on tokens q drafts."""
    p, q = _laws(5)
    return [("disjoint", np.array([0.5, 0.5, 0, 0], np.float32), np.array([0, 0, 0.3, 0.7], np.float32)),
            ("q=p", p, p), ("one-hot q", p, np.array([0, 1, 0, 0], np.float32)),
            ("p=0 on drafts", np.array([0.6, 0, 0.4, 0], np.float32), q)]


def _cases(k, distinct: bool):
    """4 random laws and the edge cases (for distinct drafts only where q has k tokens to draw)."""
    return [(f"seed {s}", *_laws(s)) for s in range(4)] + [
        c for c in _edge_laws() if not distinct or (c[2] > 0).sum() >= k]


VERIFIERS = {
    "kseq": (verify.kseq, _iid),
    "recursive_with": (lambda p, q, x: verify.recursive(p, q, x, without_replacement=False), _iid),
    "recursive_without": (verify.recursive, _without_replacement),
}


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("name", list(VERIFIERS))
def test_output_law_is_the_target(name, k):
    verifier, drafts = VERIFIERS[name]
    for case, p, q in _cases(k, distinct=drafts is _without_replacement):
        law = _law(verifier, p, q, *drafts(q, k))
        np.testing.assert_allclose(law, p, atol=3e-6, err_msg=f"{name} k={k} {case}")


@pytest.mark.parametrize("name,wrong", [("kseq", _without_replacement), ("recursive_with", _without_replacement),
                                        ("recursive_without", _iid)])
def test_power_a_verifier_fed_the_other_draft_law_is_not_lossless(name, wrong):
    verifier, _ = VERIFIERS[name]
    worst = max(float(np.abs(_law(verifier, p, q, *wrong(q, 3)) - p).max()) for p, q in map(_laws, range(4)))
    assert worst > 0.01, worst


def test_target_only_is_lossless_for_any_set_and_counts_duplicates_once():
    for seed in range(4):
        p, q = _laws(seed)
        for cand in ([int(np.argmax(q))], list(np.argsort(-q)[:3]), [1, 1, 2], [3, 0, 3, 0]):
            x = jnp.asarray(cand)
            acc, res = verify.target_only(jnp.asarray(p), x)
            np.testing.assert_allclose(np.asarray(verify.output_law(x, acc, res)), p, atol=2e-6)
            reached = 1.0 - float(jnp.prod(1.0 - acc))
            assert abs(reached - p[sorted(set(cand))].sum()) < 2e-6  # acceptance = p(S)


def _alpha_star_lp(p, q, k):
    """The optimal k-draft acceptance as a linear program over couplings (no closed form used): a
    conditional law pi(y | x) for every draft tuple x ~ q^k, with sum_x q^k(x) pi(y | x) = p(y),
    maximising P(y in x)."""
    from scipy.optimize import linprog

    tuples, probs = _iid(q, k)
    n = len(tuples)
    hit = np.array([[y in t for y in range(V)] for t in tuples], float)  # [n, V]
    a_eq = np.concatenate([np.kron(np.eye(n), np.ones((1, V))),  # each pi(. | x) sums to 1
                           np.kron(probs[None], np.eye(V))])  # the output law is p
    b_eq = np.concatenate([np.ones(n), p])
    res = linprog(-(probs[:, None] * hit).ravel(), A_eq=a_eq[:-1], b_eq=b_eq[:-1],  # the last row is implied
                  bounds=(0, None), method="highs")
    assert res.status == 0, res.message
    return -res.fun


@pytest.mark.parametrize("k", [1, 2, 3])
def test_optimal_acceptance_equals_the_linear_program(k):
    """The sorted-prefix closed form (decode/verify.py: optimal_acceptance) against an LP solver."""
    for case, p, q in _cases(k, distinct=False):
        p, q = (x.astype(np.float64) / x.astype(np.float64).sum() for x in (p, q))
        got = float(verify.optimal_acceptance(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32), k))
        assert abs(got - _alpha_star_lp(p, q, k)) < 2e-6, (case, k)
    p, q = _laws(0)  # k = 1: 1 - TV
    assert abs(float(verify.optimal_acceptance(jnp.asarray(p), jnp.asarray(q), 1)) - (1 - 0.5 * np.abs(p - q).sum())) \
        < 2e-6


def _kseq_hit(p, q, x):
    """P(some candidate of x is accepted) under K-SEQ."""
    return 1.0 - jnp.prod(1.0 - verify.kseq(p, q, x)[0])


@pytest.mark.parametrize("k", [2, 3, 4])
def test_kseq_acceptance_is_near_optimal_and_never_above_it(k):
    """K-SEQ's acceptance (the law of `kseq`, enumerated) equals its closed form 1 - (1 - beta(rho*))^k
    and lies in [(1 - (1 - 1/k)^k) alpha*, alpha*] (SpecTr, Theorem 3)."""
    for case, p, q in _cases(k, distinct=False):
        rho = float(verify.kseq_rho(jnp.asarray(p), jnp.asarray(q), k))
        beta = np.minimum(q, p / rho).sum()
        acc = 1.0 - (1.0 - beta) ** k
        if k <= 3:  # enumerated: P(some draft accepted) over every tuple
            tuples, probs = _iid(q, k)
            hit = jax.vmap(functools.partial(_kseq_hit, jnp.asarray(p), jnp.asarray(q)))(jnp.asarray(tuples))
            assert abs(float(probs @ np.asarray(hit)) - acc) < 3e-6, case
        best = float(verify.optimal_acceptance(jnp.asarray(p), jnp.asarray(q), k))
        assert (1 - (1 - 1 / k) ** k) * best - 1e-6 <= acc <= best + 1e-6, (case, acc, best)
        single = 1.0 - 0.5 * np.abs(p - q).sum()  # k = 1: 1 - TV
        assert acc >= single - 1e-6


def test_hand_worked_cases():
    p, q = jnp.array([0.5, 0.3, 0.2]), jnp.array([0.2, 0.3, 0.5])
    # K-SEQ, k = 2: for rho in [1, 2], beta = 0.2 + 0.5/rho, and 1 - (1 - beta)^2 = rho beta reduces to
    # 0.2 rho^3 + 0.14 rho^2 - 0.8 rho + 0.25 = 0: rho* = 1.45678, beta = 0.54322, acceptance 0.79136
    rho = float(verify.kseq_rho(p, q, 2))
    assert abs(rho - 1.45678) < 1e-4
    acc, res = verify.kseq(p, q, jnp.array([2, 0]))
    np.testing.assert_allclose(np.asarray(acc), [0.2 / (rho * 0.5), 1.0], atol=1e-5)  # min(1, p/(rho q))
    # k = 1 is standard SD: rho = 1, accept min(1, p/q), residual (p - q)_+ normalised = token 0
    acc1, res1 = verify.kseq(p, q, jnp.array([2]))
    np.testing.assert_allclose(np.asarray(acc1), [0.4], atol=1e-6)
    np.testing.assert_allclose(np.asarray(res1), [1.0, 0.0, 0.0], atol=1e-6)
    # RSD, drafts (2, 0) without replacement: accept 2 w.p. 0.2/0.5 = 0.4; the target becomes
    # norm((p - q)_+) = (1, 0, 0), the draft law (0.4, 0.6, 0): token 0 is then accepted surely
    acc, _ = verify.recursive(p, q, jnp.array([2, 0]))
    np.testing.assert_allclose(np.asarray(acc), [0.4, 1.0], atol=1e-6)


def test_draw_samples_the_output_law():
    from scipy import stats

    p, q = _laws(7)
    x = jnp.array([1, 3, 1])
    acc, res = verify.kseq(jnp.asarray(p), jnp.asarray(q), x)
    n = 20000
    tokens, idx = jax.jit(jax.vmap(lambda key: verify.draw(key, x, acc, res)))(jax.random.split(jax.random.key(0), n))
    counts = np.bincount(np.asarray(tokens), minlength=V)
    law = np.asarray(verify.output_law(x, acc, res), np.float64)
    keep = law > 0
    assert stats.chisquare(counts[keep], law[keep] / law[keep].sum() * counts[keep].sum()).pvalue > 1e-3
    idx, tokens = np.asarray(idx), np.asarray(tokens)
    assert (tokens[idx >= 0] == np.asarray(x)[idx[idx >= 0]]).all()  # the index names the accepted candidate
    reach = np.concatenate([[1.0], np.cumprod(1.0 - np.asarray(acc, np.float64))])
    expected = np.append(reach[:-1] * np.asarray(acc), reach[-1])  # P(index 0, 1, 2, residual)
    seen = np.bincount(np.where(idx < 0, 3, idx), minlength=4)
    assert stats.chisquare(seen[expected > 0], expected[expected > 0] * n).pvalue > 1e-3


@pytest.mark.parametrize("name", ["kseq", "recursive_with", "recursive_without", "target_only"])
def test_a_masked_candidate_is_as_if_absent(name):
    """valid_K drops candidates: the result equals the verifier run on the valid ones alone."""
    fns = {"kseq": verify.kseq, "target_only": lambda p, q, x, v=None: verify.target_only(p, x, v),
           "recursive_with": lambda p, q, x, v=None: verify.recursive(p, q, x, v, without_replacement=False),
           "recursive_without": verify.recursive}
    fn = fns[name]
    for seed in range(3):
        p, q = map(jnp.asarray, _laws(seed))
        x = jnp.asarray(np.random.default_rng(seed).permutation(V)[:3])
        for valid in ([True, False, True], [False, True, True], [True, True, False], [False, False, False]):
            v = np.asarray(valid)
            law = verify.output_law(x, *fn(p, q, x, jnp.asarray(v)))
            alone = verify.output_law(x[v], *fn(p, q, x[v])) if v.any() else p
            np.testing.assert_allclose(np.asarray(law), np.asarray(alone), atol=2e-6, err_msg=f"{valid}")
