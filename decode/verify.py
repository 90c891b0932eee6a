"""Single-position verifiers for multi-draft speculative decoding: pure, static-shape JAX.

Each verifier takes the target law p_V and the draft law q_V at one position (processed
probabilities: temperature / top-k / top-p already applied, `decode/sampling.py`) and the k
candidate tokens x_K in the order they are tested, and returns

    accept_K   P(candidate i is accepted | candidates before it were rejected)
    residual_V the law of the output when every candidate is rejected

so the output law is  P(y) = sum_i [prod_{j<i} (1 - a_j)] a_i 1{x_i = y} + prod_j (1 - a_j) r(y).
An optional `valid_K` mask drops candidates (a tree node with fewer children than the static
width, a SpecTr row that no longer matches): a dropped candidate has acceptance 0 and changes
nothing, so the result is the verifier's on the valid candidates alone.
`draw` samples from that; the exact-law tests enumerate draft tuples through the same functions.
Which verifier is lossless for which draft law (../shared/docs/research/multidraft_and_policies.md):

- `kseq` (SpecTr's K-SEQ): k i.i.d. drafts from q. Accept x w.p. min(1, p(x) / (rho q(x))) with
  rho* the root of 1 - (1 - beta)^k = rho beta, beta(rho) = sum_x min(q(x), p(x)/rho) (bisection,
  fixed iterations, upper bracket end so the result stays lossless); k = 1 is standard SD.
- `recursive` (recursive rejection sampling): after a rejected x_i the target becomes
  norm((p_i - q_i)_+); `without_replacement` (RSD: distinct drafts by successive sampling from q)
  also removes x_i from the draft law; with replacement (SpecInfer) q stays.
- `target_only`: any candidate set chosen without the coins (duplicates count once): inverse-CDF
  sampling of p with the candidates first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from decode.sampling import categorical

_TINY = 1e-30


def _normalise(x_V):
    s = jnp.sum(x_V)
    return jnp.where(s > _TINY, x_V / jnp.maximum(s, _TINY), x_V)


def kseq_rho(p_V, q_V, k: int, iters: int = 40):
    """rho* in [1, k]: the largest acceptance 1 - (1 - beta(rho))^k that stays lossless."""
    beta = lambda rho: jnp.sum(jnp.minimum(q_V, p_V / rho))  # noqa: E731
    f = lambda rho: 1.0 - (1.0 - beta(rho)) ** k - rho * beta(rho)  # noqa: E731 - decreasing, f(k) <= 0

    def halve(_, lo_hi):
        lo, hi = lo_hi
        mid = 0.5 * (lo + hi)
        up = f(mid) > 0.0
        return jnp.where(up, mid, lo), jnp.where(up, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, halve, (jnp.float32(1.0), jnp.float32(k)))
    return hi


def _all(x_K, valid_K):
    return jnp.ones(x_K.shape, bool) if valid_K is None else valid_K


def kseq(p_V, q_V, x_K, valid_K=None):
    """SpecTr K-SEQ for the k valid candidates, i.i.d. drafts from q_V: (accept_K, residual_V)."""
    valid_K = _all(x_K, valid_K)
    k = jnp.sum(valid_K).astype(jnp.float32)
    rho = kseq_rho(p_V, q_V, jnp.maximum(k, 1.0))
    m_V = jnp.minimum(q_V, p_V / rho)
    beta = jnp.sum(m_V)
    accept_K = jnp.where(q_V[x_K] > 0, jnp.minimum(1.0, p_V[x_K] / jnp.maximum(rho * q_V[x_K], _TINY)), 0.0)
    c = (1.0 - (1.0 - beta) ** k) / jnp.maximum(beta, _TINY)  # c <= rho: P(out = y via the tests) <= p(y)
    residual_V = _normalise(jnp.maximum(p_V - c * m_V, 0.0))
    return jnp.where(valid_K, accept_K, 0.0), jnp.where((beta > _TINY) & (k > 0), residual_V, p_V)


def recursive(p_V, q_V, x_K, valid_K=None, without_replacement: bool = True):
    """Recursive rejection sampling over the valid candidates in order: (accept_K, residual_V)."""

    def step(carry, x_ok):
        (p, q), (x, ok) = carry, x_ok
        a = jnp.where(q[x] > 0, jnp.minimum(1.0, p[x] / jnp.maximum(q[x], _TINY)), jnp.where(p[x] > 0, 1.0, 0.0))
        r = jnp.maximum(p - q, 0.0)
        p_next = jnp.where(jnp.sum(r) > _TINY, _normalise(r), p)  # p == q: never rejected
        q_next = _normalise(q.at[x].set(0.0)) if without_replacement else q
        return (jnp.where(ok, p_next, p), jnp.where(ok, q_next, q)), jnp.where(ok, a, 0.0)

    (residual_V, _), accept_K = jax.lax.scan(step, (p_V, q_V), (x_K, _all(x_K, valid_K)))
    return accept_K, residual_V


def target_only(p_V, x_K, valid_K=None):
    """Target-only verification of any candidate set (no draft law): (accept_K, residual_V)."""

    def step(p, x_ok):
        x, ok = x_ok
        a = p[x]  # p restricted to what is left, renormalised; a repeated candidate has p[x] = 0 by now
        return jnp.where(ok, _normalise(p.at[x].set(0.0)), p), jnp.where(ok, a, 0.0)

    residual_V, accept_K = jax.lax.scan(step, p_V, (x_K, _all(x_K, valid_K)))
    return accept_K, residual_V


def optimal_acceptance(p_V, q_V, k: int):
    """alpha*: the largest acceptance P(output in drafts) any lossless verifier of k i.i.d. drafts
    from q can reach (Towards Optimal Multi-draft SD): the minimum over sets H of p(H) + 1 - q(H)^k,
    attained by a prefix of the tokens sorted by ascending p/q. k = 1 gives 1 - TV(p, q)."""
    order = jnp.argsort(p_V / jnp.maximum(q_V, _TINY))  # tokens with q = 0 (p/q huge) sort last
    zero = jnp.zeros((1,), p_V.dtype)
    p_H = jnp.concatenate([zero, jnp.cumsum(p_V[order])])
    q_H = jnp.concatenate([zero, jnp.cumsum(q_V[order])])
    return jnp.min(p_H + 1.0 - jnp.minimum(q_H, 1.0) ** k)


def draw(key, x_K, accept_K, residual_V):
    """(token, index of the accepted candidate or -1 when the residual was drawn)."""
    k_coin, k_res = jax.random.split(key)
    hit_K = jax.random.uniform(k_coin, accept_K.shape) < accept_K
    first = jnp.argmax(hit_K)
    correction = categorical(k_res, jnp.log(jnp.maximum(residual_V, 0.0)))
    any_hit = jnp.any(hit_K)
    return jnp.where(any_hit, x_K[first], correction), jnp.where(any_hit, first, -1)


def output_law(x_K, accept_K, residual_V):
    """The exact law of `draw`'s token (for tests and analysis)."""
    reach_K = jnp.concatenate([jnp.ones((1,)), jnp.cumprod(1.0 - accept_K)])  # P(reach i), then P(all rejected)
    law_V = jnp.zeros_like(residual_V).at[x_K].add(reach_K[:-1] * accept_K)
    return law_V + reach_K[-1] * residual_V
