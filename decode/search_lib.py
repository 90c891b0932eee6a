"""The machinery every step-level search runs on (decode/search.py dispatches; the methods live in
decode/foresight.py and decode/baselines.py, which import this module and nothing imports back).

The search state holds M beams per problem as `rollout.Rows` (B·M rows, each with its own cache).
A step expands every beam into N candidates (`expand`: gather the beam's row N times, sample one
step), the method keeps some and, for foresight methods, rolls each survivor out to EOS
(`foresight`); new beams are gathered from the chosen candidates. A step is the tokens up to and
including the task's delimiter; a candidate whose step ends in EOS is *finished* and a finished
beam is carried forward unchanged as its own candidate 0 (the released MFS code instead re-expands
finished beams into duplicates). Every problem finishes its beams with one rollout each
(`finalize`) and answers by both rules (`choose`): argmax quality, and majority vote over the
final beams' answers (ties: higher quality).

All buffers have static shapes; problems that stopped are masked. Accounting per problem
(`stats`): gen_tokens (tokens sampled for it), prefill_tokens (its prompt), forward_tokens
(row-tokens the LM computed for its rows, padding of stopped rows included),
foresight_overflow (survivors dropped because the foresight buffer was full).
"""

from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp

from decode import rollout
from decode.rollout import Rows
from spark.errors import ConfigError

METHODS = ("mfs", "phi", "beam", "sample")
BASELINES = ("parent_F", "parent_step")


@dataclasses.dataclass(frozen=True)
class TaskTokens:
    """What a search needs to know about a task's token grammar."""

    delim_id: int  # ends a step
    eos_id: int  # ends a solution
    answer_span: str = "all"  # the answer a vote compares: "all" generated tokens or the "last_step"
    pad_id: int = 0


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Defaults follow the released MFS code (see docs/research/martingale_foresight.md §2.3);
    where paper and code disagree the flag says which is which."""

    method: str = "mfs"
    beams: int = 8  # M
    samples: int = 8  # N: step samples per beam (method "sample": completions per problem)
    max_steps: int = 8  # T_max
    min_steps: int = 0  # T_min: the stop rules are tested only at steps t > T_min (mfs), t >= T_min (phi)
    sigma_rate: float = 0.8  # λ: mfs keeps unfinished candidates with s >= μ + λσ
    prune: bool = True  # False: no mfs width prune, every unfinished candidate is rolled out (ablation)
    rank: str = "A"  # mfs orders survivors by A (paper) or by F itself (ablation: A telescopes to F_t − F_0)
    epsilon: float = 1e-4  # mfs stop when max A <= ε (code 1e-4, paper 1e-6)
    early_stop: bool = True  # False: never stop early (mfs ε rule, φ cluster rule): the counterfactual
    baseline: str = "parent_F"  # A = F − baseline(parent): paper "parent_F", code "parent_step"
    rollouts: int = 1  # R foresight rollouts per survivor, F = their mean
    foresight_slots: int = 0  # K_f survivors rolled out per problem (0: ceil(M·N / 2))
    finished_frac: float = 0.6  # finished candidates keep at most max(1, floor(0.6 M)) slots
    tau_step: float = 0.7
    tau_foresight: float = 1.0  # the code leaves vLLM's default 1.0
    tau_final: float = 1.0  # finishing rollouts; method "sample" samples at this temperature (0: greedy)
    step_tokens: int = 16  # cap on one step's tokens
    max_gen: int = 96  # cap on a solution's generated tokens (the row buffer)
    phi_sigma_rate: float = 1.0  # φ keeps s > μ − kσ (paper and code k = 1)
    phi_tau_advantage: float = 0.1  # φ code: softmax(A / 0.1)
    phi_delta: float = 0.7  # φ stop when the largest answer cluster holds >= δ of the rollouts

    def __post_init__(self):
        checks = [(self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}"),
                  (self.beams >= 1, f"beams (M) must be >= 1, got {self.beams}"),
                  (self.samples >= 1, f"samples (N) must be >= 1, got {self.samples}"),
                  (self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
                  (self.min_steps >= 0, f"min_steps must be >= 0, got {self.min_steps}"),
                  (self.sigma_rate >= 0, f"sigma_rate (λ) must be >= 0, got {self.sigma_rate}"),
                  (self.phi_sigma_rate >= 0, f"phi_sigma_rate must be >= 0, got {self.phi_sigma_rate}"),
                  (self.epsilon >= 0, f"epsilon must be >= 0, got {self.epsilon}"),
                  (self.baseline in BASELINES, f"baseline must be one of {BASELINES}, got {self.baseline!r}"),
                  (self.rank in ("A", "F"), f"rank must be 'A' or 'F', got {self.rank!r}"),
                  (self.rollouts >= 1, f"rollouts (R) must be >= 1, got {self.rollouts}"),
                  (self.foresight_slots >= 0, f"foresight_slots must be >= 0, got {self.foresight_slots}"),
                  (0 <= self.finished_frac <= 1, f"finished_frac must be in [0, 1], got {self.finished_frac}"),
                  (min(self.tau_step, self.tau_foresight, self.tau_final) >= 0, "temperatures must be >= 0"),
                  (self.step_tokens >= 1, f"step_tokens must be >= 1, got {self.step_tokens}"),
                  (self.max_gen >= self.step_tokens,
                   f"max_gen ({self.max_gen}) must hold at least one step ({self.step_tokens} tokens)"),
                  (0 < self.phi_delta <= 1, f"phi_delta must be in (0, 1], got {self.phi_delta}")]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @property
    def slots(self) -> int:
        """K_f: the static foresight buffer per problem."""
        return min(self.beams * self.samples, self.foresight_slots or math.ceil(self.beams * self.samples / 2))

    @property
    def finished_cap(self) -> int:
        return max(1, int(self.finished_frac * self.beams))


@flax.struct.dataclass
class Beams:
    rows: Rows  # B·M rows
    valid_BM: jax.Array  # bool: the slot holds a beam
    fin_BM: jax.Array  # bool: the beam ended with EOS (or filled its buffer)
    s_BM: jax.Array  # float32: score of the step that made it (mean untempered log-prob)
    F_BM: jax.Array  # float32: its foresight value (finished: s)
    cum_BM: jax.Array  # float32: cumulative log-prob of its generated tokens (beam search)


@flax.struct.dataclass
class State:
    t: jax.Array  # int32: steps taken
    beams: Beams
    stopped_B: jax.Array  # bool
    stop_step_B: jax.Array  # int32: the step whose stop rule fired (-1: none)
    reverted_B: jax.Array  # bool: the step was discarded (mfs convergence stop)
    key: jax.Array
    stats: dict  # per-problem counters [B]
    trace: dict  # per-step records [T_max, B, ...] for tests and diagnostics


def per_problem(x_R, b):
    """Sum a per-row quantity over each problem's rows (rows are problem-major)."""
    return jnp.sum(x_R.reshape(b, -1), axis=1)


def add_call(stats, out, b, name):
    """Account one `sample_until` call: tokens generated, row-tokens computed and the LM's per-row
    counters (Spark decode overflow) per problem."""
    n = per_problem(out["n_tok"], b)
    counts = {k: stats[k] + per_problem(v, b) for k, v in out["row_stats"].items() if k in stats}
    return stats | counts | {"gen_tokens": stats["gen_tokens"] + n, f"{name}_tokens": stats[f"{name}_tokens"] + n,
                             "forward_tokens": stats["forward_tokens"] + out["forward_tokens"] // b}


def empty_trace(cfg: SearchConfig, b: int) -> dict:
    """Per-step records [T_max, B, ...] (written by every step method; beam search leaves the
    foresight fields at zero)."""
    t, c, k, m = cfg.max_steps, cfg.beams * cfg.samples, cfg.slots, cfg.beams
    z = lambda shape, dt: jnp.zeros((t, b, *shape), dt)  # noqa: E731
    return {"live": z((), bool), "s": z((c,), jnp.float32), "cum": z((c,), jnp.float32), "cand_valid": z((c,), bool),
            "cand_fin": z((c,), bool), "keep": z((c,), bool), "surv": z((k,), jnp.int32), "surv_ok": z((k,), bool),
            "F": z((k,), jnp.float32), "A": z((k,), jnp.float32), "src": z((m,), jnp.int32), "src_ok": z((m,), bool),
            "stop": z((), bool), "cand_tokens": z((c, cfg.max_gen), jnp.int32), "cand_num": z((c,), jnp.int32)}


def candidate_record(live_B, cand: Rows, c: dict, src_BM, src_ok_BM, stop_B) -> dict:
    """The step's trace fields every method records: its candidates and the chosen ones."""
    b, n_c = c["valid"].shape
    return {"live": live_B, "s": c["s"], "cum": c["cum"], "cand_valid": c["valid"], "cand_fin": c["fin"],
            "src": src_BM, "src_ok": src_ok_BM, "stop": stop_B, "cand_tokens": cand.gen_RL.reshape(b, n_c, -1),
            "cand_num": cand.n_gen_R.reshape(b, n_c)}


def record(trace, t, rec: dict):
    """Write step t's records (the keys `rec` has) into the trace."""
    return {k: (v.at[t].set(rec[k].astype(v.dtype)) if k in rec else v) for k, v in trace.items()}


def expand(lm, beams: Beams, key, cfg: SearchConfig, task: TaskTokens, stopped_B):
    """Every live beam -> N one-step candidates; a finished beam -> itself as candidate 0.
    Returns (cand Rows [B·M·N], dict of [B, C] arrays, the sample_until output)."""
    b, m = beams.valid_BM.shape
    n = cfg.samples
    parent_C = jnp.repeat(jnp.arange(m), n)  # candidate c of a problem comes from beam c // N
    rows = rollout.take(beams.rows, (jnp.arange(b)[:, None] * m + parent_C[None]))
    pv, pf = beams.valid_BM[:, parent_C], beams.fin_BM[:, parent_C]
    live = pv & ~pf & ~stopped_B[:, None]
    carry = pv & pf & (jnp.arange(m * n) % n == 0)[None] & ~stopped_B[:, None]
    rows, out = rollout.sample_until(lm, rows, key, live.reshape(-1), draw=rollout.gumbel_draw(cfg.tau_step),
                                     stop_ids=(task.delim_id,), eos_id=task.eos_id, max_tokens=cfg.step_tokens,
                                     pad_id=task.pad_id)
    new = (out["n_tok"] > 0).reshape(b, -1)
    s_new = rollout.mean_logp(out, -jnp.inf).reshape(b, -1)
    full = rows.n_gen_R.reshape(b, -1) >= rows.gen_RL.shape[1]
    fin_new = rows.done_R.reshape(b, -1) | full
    c = dict(parent=jnp.broadcast_to(parent_C, live.shape), valid=(live & new) | carry,
             fin=jnp.where(carry, True, fin_new),
             s=jnp.where(carry, beams.s_BM[:, parent_C], s_new),
             F=jnp.where(carry, beams.F_BM[:, parent_C], s_new),
             cum=beams.cum_BM[:, parent_C] + out["sum_logp"].reshape(b, -1))
    return rows, c, out


def compact(keep_BC, score_BC, slots: int):
    """The kept candidates' indices in `slots` static places, best score first (ties: lower
    index) -> (idx [B, K], ok [B, K], overflow [B])."""
    vals, idx = jax.lax.top_k(jnp.where(keep_BC, score_BC, -jnp.inf), slots)
    ok = jnp.take_along_axis(keep_BC, idx, axis=1) & (vals > -jnp.inf)
    return idx, ok, jnp.sum(keep_BC, axis=1) - jnp.sum(ok, axis=1)


def foresight(lm, cand: Rows, idx_BK, ok_BK, key, cfg: SearchConfig, task: TaskTokens):
    """R rollouts to EOS from each surviving candidate -> (F [B, K] mean over the rollouts of
    their mean log-prob, rollout Rows [B·K·R], sample_until output). An empty rollout (no room
    left in the buffer) has F = NaN here; callers substitute the candidate's step score."""
    b, k = idx_BK.shape
    c = cand.n_gen_R.shape[0] // b
    rows_idx = jnp.repeat((jnp.arange(b)[:, None] * c + idx_BK).reshape(-1), cfg.rollouts)
    rows = rollout.take(cand, rows_idx)
    active = jnp.repeat(ok_BK.reshape(-1), cfg.rollouts)
    rows, out = rollout.sample_until(lm, rows, key, active, draw=rollout.gumbel_draw(cfg.tau_foresight),
                                     stop_ids=(), eos_id=task.eos_id, max_tokens=cfg.max_gen, pad_id=task.pad_id)
    f = rollout.mean_logp(out, jnp.nan).reshape(b, k, cfg.rollouts)
    return jnp.mean(f, axis=2), rows, out


def gather_beams(cand: Rows, c: dict, src_BM, ok_BM, F_BM) -> Beams:
    b, m = src_BM.shape
    n_c = c["valid"].shape[1]
    pick = lambda x: jnp.take_along_axis(x, src_BM, axis=1)  # noqa: E731
    return Beams(rows=rollout.take(cand, jnp.arange(b)[:, None] * n_c + src_BM), valid_BM=ok_BM,
                 fin_BM=pick(c["fin"]) & ok_BM, s_BM=pick(c["s"]), F_BM=F_BM, cum_BM=pick(c["cum"]))


def keep_where(cond_B, new, old):
    """Per problem: `new` where cond, else `old` (leaves lead with B or B·M problem-major rows)."""
    def one(x, y):
        c = jnp.repeat(cond_B, x.shape[0] // cond_B.shape[0])
        return jnp.where(c.reshape((-1,) + (1,) * (x.ndim - 1)), x, y)

    return jax.tree.map(one, new, old)


def initial_beams(rows: Rows, m: int) -> Beams:
    b = rows.n_gen_R.shape[0]
    rows = rollout.take(rows, jnp.repeat(jnp.arange(b), m))
    z = jnp.zeros((b, m), jnp.float32)
    return Beams(rows=rows, valid_BM=jnp.ones((b, m), bool), fin_BM=jnp.zeros((b, m), bool), s_BM=z, F_BM=z,
                 cum_BM=z)


def finalize(lm, beams: Beams, key, cfg: SearchConfig, task: TaskTokens):
    """Complete every unfinished beam with one rollout to EOS (τ_final) -> (final Rows,
    quality [B, M], the sample_until output). Quality is the same for every method: the mean
    untempered log-prob of the whole generated solution (the MFS code mixes the final
    completion's mean with stored step scores)."""
    b, m = beams.valid_BM.shape
    active = (beams.valid_BM & ~beams.fin_BM).reshape(-1)
    rows, out = rollout.sample_until(lm, beams.rows, key, active, draw=rollout.gumbel_draw(cfg.tau_final),
                                     stop_ids=(), eos_id=task.eos_id, max_tokens=cfg.max_gen, pad_id=task.pad_id)
    return rows, solution_quality(beams.cum_BM.reshape(-1) + out["sum_logp"], rows).reshape(b, m), out


def solution_quality(sum_logp_R, rows: Rows):
    return sum_logp_R / jnp.maximum(rows.n_gen_R, 1)


def choose(keys_BM, quality_BM, valid_BM):
    """Both answer rules -> (argmax-quality index [B], majority-vote index [B]; vote ties go to
    the higher quality, then the lower index)."""
    q = jnp.where(valid_BM, quality_BM, -jnp.inf)
    best = jnp.argmax(q, axis=1)
    same = (keys_BM[:, :, None] == keys_BM[:, None, :]) & valid_BM[:, None, :]
    votes = jnp.where(valid_BM, jnp.sum(same, axis=2), -1)
    top = votes == jnp.max(votes, axis=1, keepdims=True)
    vote = jnp.argmax(jnp.where(top, q, -jnp.inf), axis=1)
    return best, jnp.where(jnp.any(top & jnp.isfinite(q), axis=1), vote, jnp.argmax(top, axis=1))



def outputs(rows: Rows, quality_BM, valid_BM, task: TaskTokens, stats, state=None):
    b, m = valid_BM.shape
    keys = rollout.answer_keys(rows, task.delim_id, task.eos_id, task.answer_span).reshape(b, m)
    best, vote = choose(keys, quality_BM, valid_BM)
    out = {"tokens": rows.gen_RL.reshape(b, m, -1), "num": rows.n_gen_R.reshape(b, m), "valid": valid_BM,
           "quality": quality_BM, "answer_keys": keys, "choice_quality": best, "choice_vote": vote, "stats": stats}
    if state is not None:
        out |= {"stop_step": state.stop_step_B, "reverted": state.reverted_B, "trace": state.trace}
    return out
