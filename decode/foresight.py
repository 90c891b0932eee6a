"""Martingale foresight sampling (MFS) and φ-Decoding: one search step each, on the machinery of
decode/search_lib.py (docs/research/martingale_foresight.md §2 and §3).

MFS step (per problem; C = M·N candidates, K = the foresight buffer):
  1. expand every beam into N one-step candidates (τ_step); s = mean log-prob of the step;
  2. prune the *unfinished* candidates to s >= μ + λσ (population σ; the best is always kept, so
     σ = 0 keeps all and at least one survives — the released code keeps the first instead);
  3. R foresight rollouts to EOS per survivor (τ_foresight): F = mean over rollouts of their mean
     log-prob (an empty rollout — no room left — scores the step's s);
  4. advantage A = F − baseline(parent): the parent's F (paper) or its step score s (code);
  5. new beams: the best finished candidates by s (at most ⌊0.6 M⌋ slots, all M when nothing is
     unfinished), then the survivors by A, deterministically; a finished candidate is a step that
     ended in EOS, scored by its own s (deviation: the released code's finished candidates are
     empty steps — the end marker alone — that inherit the parent's step score);
  6. stop once t > T_min and max A of the new unfinished beams <= ε: the step is discarded and
     the problem keeps its previous beams (revert); stop too when every beam is finished.
φ-Decoding step: prune to s > μ − kσ, top up to M survivors by sampling softmax(s / 0.1) without
replacement, foresight as above, A = F − F_parent, alignment C = the share of foresight rollouts
whose extracted answer equals this survivor's (clustering by answer replaces TF-IDF k-means),
then M beams sampled without replacement (Gumbel top-k) from 0.5 softmax(A / 0.1) + 0.5 softmax(C);
stop once t >= T_min and the largest answer cluster holds >= δ of the rollouts.

Both record a per-step `trace` (kept sets, survivors, F, A, chosen candidates) that the NumPy
reference implementation in tests/foresight_ref.py reproduces exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from decode import rollout, search_lib
from spark.sparsity import masked_moments


def mfs_keep(s_BC, unf_BC, lam: float):
    """MFS width prune ("optional stopping"): s >= μ + λσ over the unfinished; the best always kept."""
    mu, sd = masked_moments(s_BC, unf_BC)
    best = jnp.max(jnp.where(unf_BC, s_BC, -jnp.inf), axis=1, keepdims=True)
    return unf_BC & ((s_BC >= mu + lam * sd) | (s_BC == best))


def phi_keep(s_BC, unf_BC, k: float, need_B, key, tau: float = 0.1):
    """φ in-width prune: s > μ − kσ; if fewer than `need` survive, top up by sampling
    softmax(s / τ) without replacement among the pruned (Gumbel top-k)."""
    mu, sd = masked_moments(s_BC, unf_BC)
    keep = unf_BC & (s_BC > mu - k * sd)
    g = jax.random.gumbel(key, s_BC.shape, jnp.float32)
    score = jnp.where(unf_BC & ~keep, s_BC / tau + g, -jnp.inf)
    order = jnp.argsort(-score, axis=1, stable=True)
    rank = jnp.argsort(order, axis=1, stable=True)  # rank of each candidate in the top-up order
    short = jnp.maximum(need_B - jnp.sum(keep, axis=1), 0)[:, None]
    return keep | ((rank < short) & (score > -jnp.inf))


def select_slots(fin_BC, s_BC, surv_BK, ok_BK, rank_BK, m: int, cap: int):
    """New beams: the best finished candidates by s (at most `cap`; all `m` slots when no survivor
    is left), then survivors by decreasing rank. -> (src [B, M] candidate index, ok [B, M],
    from_fin [B, M], survivor position [B, M])."""
    k = surv_BK.shape[1]
    cap_B = jnp.where(jnp.any(ok_BK, axis=1), cap, m)[:, None]
    fvals, fidx = jax.lax.top_k(jnp.where(fin_BC, s_BC, -jnp.inf), m)
    n_fin = jnp.sum((fvals > -jnp.inf) & (jnp.arange(m)[None] < cap_B), axis=1, keepdims=True)
    kk = min(m, k)
    _, upos = jax.lax.top_k(jnp.where(ok_BK, rank_BK, -jnp.inf), kk)
    j = jnp.arange(m)[None]
    u = jnp.clip(j - n_fin, 0, kk - 1)
    pos = jnp.take_along_axis(upos, u, axis=1)
    from_fin = j < n_fin
    src = jnp.where(from_fin, fidx, jnp.take_along_axis(surv_BK, pos, axis=1))
    ok = from_fin | ((j - n_fin < kk) & jnp.take_along_axis(ok_BK, pos, axis=1))
    return src, ok, from_fin, pos


def _survivors(lm, s: search_lib.State, cand, c, keep, kt, cfg, task):
    """Compact the kept candidates, roll them out: -> (idx, ok, overflow, F, A, stats, rollout rows)."""
    b = keep.shape[0]
    idx, ok, overflow = search_lib.compact(keep, c["s"], cfg.slots)
    F, fs_rows, out = search_lib.foresight(lm, cand, idx, ok, jax.random.fold_in(kt, 1), cfg, task)
    s_k = jnp.take_along_axis(c["s"], idx, axis=1)
    F = jnp.where(jnp.isnan(F), s_k, F)
    base = s.beams.F_BM if cfg.baseline == "parent_F" or cfg.method == "phi" else s.beams.s_BM
    parent = jnp.take_along_axis(c["parent"], idx, axis=1)
    A = jnp.where(ok, F - jnp.take_along_axis(base, parent, axis=1), -jnp.inf)
    stats = search_lib.add_call(s.stats, out, b, "foresight")
    stats["foresight_overflow"] = stats["foresight_overflow"] + overflow
    return idx, ok, F, A, stats, fs_rows


def _adopt(s: search_lib.State, cand, c, idx, ok, F, A, src, src_ok, from_fin, pos, stop, revert, keep, stats):
    """Gather the new beams; per problem keep the old ones where stopped before or reverted."""
    pick = lambda x: jnp.take_along_axis(x, pos, axis=1)  # noqa: E731
    F_new = jnp.where(from_fin, jnp.take_along_axis(c["F"], src, axis=1), pick(F))
    new = search_lib.gather_beams(cand, c, src, src_ok, F_new)
    live = ~s.stopped_B
    stop_now = live & stop
    beams = search_lib.keep_where(live & ~revert, new, s.beams)
    t = s.t
    rec = search_lib.candidate_record(live, cand, c, src, src_ok, stop_now)
    trace = search_lib.record(s.trace, t, rec | {"keep": keep, "surv": idx, "surv_ok": ok, "F": F, "A": A})
    stats = stats | {"steps": stats["steps"] + live.astype(jnp.int32)}
    return s.replace(t=t + 1, beams=beams, stopped_B=s.stopped_B | stop_now,
                     stop_step_B=jnp.where(stop_now, t, s.stop_step_B),
                     reverted_B=s.reverted_B | (live & revert), stats=stats, trace=trace)


def _unfinished_left(fin_BC, src, src_ok):
    return jnp.any(src_ok & ~jnp.take_along_axis(fin_BC, src, axis=1), axis=1)


def mfs_step(lm, s: search_lib.State, cfg: search_lib.SearchConfig, task: search_lib.TaskTokens) -> search_lib.State:
    b, m = s.beams.valid_BM.shape
    kt = jax.random.fold_in(s.key, s.t)
    cand, c, out = search_lib.expand(lm, s.beams, jax.random.fold_in(kt, 0), cfg, task, s.stopped_B)
    s = s.replace(stats=search_lib.add_call(s.stats, out, b, "expand"))
    unf = c["valid"] & ~c["fin"]
    keep = mfs_keep(c["s"], unf, cfg.sigma_rate) if cfg.prune else unf
    idx, ok, F, A, stats, _ = _survivors(lm, s, cand, c, keep, kt, cfg, task)
    fin = c["valid"] & c["fin"]
    src, src_ok, from_fin, pos = select_slots(fin, c["s"], idx, ok, A if cfg.rank == "A" else F, m, cfg.finished_cap)
    left = _unfinished_left(c["fin"], src, src_ok)
    max_A = jnp.max(jnp.where(src_ok & ~from_fin, jnp.take_along_axis(A, pos, axis=1), -jnp.inf), axis=1)
    revert = (s.t > cfg.min_steps) & left & (max_A <= cfg.epsilon) & cfg.early_stop
    return _adopt(s, cand, c, idx, ok, F, A, src, src_ok, from_fin, pos, revert | ~left, revert, keep, stats)


def alignment(keys_BKR, ok_BK):
    """φ alignment with clustering by extracted answer: for each survivor, the mean over its
    rollouts of the share of all valid rollouts that gave the same answer; and per problem the
    largest cluster's share."""
    b, k, r = keys_BKR.shape
    keys = keys_BKR.reshape(b, k * r)
    valid = jnp.repeat(ok_BK, r, axis=1)
    same = (keys[:, :, None] == keys[:, None, :]) & valid[:, None, :] & valid[:, :, None]
    n = jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1)
    share = jnp.sum(same, axis=2) / n
    return jnp.mean(share.reshape(b, k, r), axis=2), jnp.max(share, axis=1)


def masked_softmax(x_BK, mask_BK):
    z = jnp.where(mask_BK, x_BK, -jnp.inf)
    z = z - jnp.max(jnp.where(mask_BK, z, -jnp.inf), axis=1, keepdims=True)
    e = jnp.where(mask_BK, jnp.exp(z), 0.0)
    return e / jnp.maximum(jnp.sum(e, axis=1, keepdims=True), 1e-30)


def phi_step(lm, s: search_lib.State, cfg: search_lib.SearchConfig, task: search_lib.TaskTokens) -> search_lib.State:
    b, m = s.beams.valid_BM.shape
    kt = jax.random.fold_in(s.key, s.t)
    cand, c, out = search_lib.expand(lm, s.beams, jax.random.fold_in(kt, 0), cfg, task, s.stopped_B)
    s = s.replace(stats=search_lib.add_call(s.stats, out, b, "expand"))
    unf, fin = c["valid"] & ~c["fin"], c["valid"] & c["fin"]
    n_fin = jnp.minimum(jnp.sum(fin, axis=1), cfg.finished_cap)
    keep = phi_keep(c["s"], unf, cfg.phi_sigma_rate, m - n_fin, jax.random.fold_in(kt, 2))
    idx, ok, F, A, stats, fs_rows = _survivors(lm, s, cand, c, keep, kt, cfg, task)
    keys = rollout.answer_keys(fs_rows, task.delim_id, task.eos_id, task.answer_span)
    align, largest = alignment(keys.reshape(b, cfg.slots, cfg.rollouts), ok)
    w = 0.5 * masked_softmax(A / cfg.phi_tau_advantage, ok) + 0.5 * masked_softmax(align, ok)
    g = jax.random.gumbel(jax.random.fold_in(kt, 3), w.shape, jnp.float32)
    rank = jnp.where(ok, jnp.log(w) + g, -jnp.inf)  # Gumbel top-k: M draws without replacement ∝ w
    src, src_ok, from_fin, pos = select_slots(fin, c["s"], idx, ok, rank, m, cfg.finished_cap)
    left = _unfinished_left(c["fin"], src, src_ok)
    converged = (s.t >= cfg.min_steps) & jnp.any(ok, axis=1) & (largest >= cfg.phi_delta) & cfg.early_stop
    return _adopt(s, cand, c, idx, ok, F, A, src, src_ok, from_fin, pos, converged | ~left,
                  jnp.zeros_like(left), keep, stats)
