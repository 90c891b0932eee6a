"""A plain NumPy reference for decode/search.py's MFS, φ-Decoding and step beam search, and the
mock LMs driving it.

The reference is written from docs/research/martingale_foresight.md and decode/foresight.py's
docstring, one problem and one candidate at a time (lists and loops, float64 scores). It shares
only the random draws with the JAX version: the Gumbel noise of `sample_until` call `key`,
iteration i, is gumbel(fold_in(key, i), [rows, V]) and a row reads its own line (the row layouts
are documented in decode/search.py), so both pick the same tokens.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# ---------------------------------------------------------------- mock LMs


class MockLM:
    """A deterministic LM over a token buffer cache: logits = fn(tokens [R, S], pos [R]) where
    pos is the slot of the newest token. `np_logits(seq)` is the same function on one list."""

    def __init__(self, fn, np_fn, max_len: int):
        self.fn, self.np_fn, self.max_len = fn, np_fn, max_len

    def prefill(self, prompts_BT, lengths_B, max_new):
        b, t = prompts_BT.shape
        toks = jnp.zeros((b, t + max_new + 8), jnp.int32).at[:, :t].set(prompts_BT)
        last = lengths_B.astype(jnp.int32) - 1
        return self.fn(toks, last), {"toks": toks}

    def __call__(self, tok_R, pos_R, cache):
        toks = cache["toks"].at[jnp.arange(tok_R.shape[0]), pos_R].set(tok_R)
        return self.fn(toks, pos_R), {"toks": toks}, {}, {}

    def np_logits(self, seq):
        return self.np_fn(list(seq))


def hash_lm(vocab: int, table_rows: int = 4093, seed: int = 0, scale: float = 2.0, bias=None) -> MockLM:
    """Logits = TABLE[hash(whole history) % rows] (+ a per-token `bias`): every token depends on
    the entire prefix, so a wrong cache gather changes the draws."""
    table = np.random.default_rng(seed).normal(size=(table_rows, vocab)) * scale
    for tok, x in (bias or {}).items():
        table[:, tok] += x
    table = table.astype(np.float32)
    t_j = jnp.asarray(table)

    def fn(toks_RS, pos_R):
        s = toks_RS.shape[1]
        inside = jnp.arange(s)[None] <= pos_R[:, None]
        powers = jnp.cumprod(jnp.full((s,), 31, jnp.uint32))
        h = jnp.sum(jnp.where(inside, toks_RS.astype(jnp.uint32) + 1, 0) * powers[None], axis=1, dtype=jnp.uint32)
        return t_j[(h % table_rows).astype(jnp.int32)]

    def np_fn(seq):
        h, p = 0, 1
        for tok in seq:
            p = (p * 31) % 2**32
            h = (h + (tok + 1) * p) % 2**32
        return table[h % table_rows]

    return MockLM(fn, np_fn, 0)


def planted_lm(vocab: int, prompt_len: int, good: int, bad: int, delim: int, eos: int) -> MockLM:
    """A task whose correct first step is known: the first step is `good` or `bad` (equally
    likely) then the delimiter; after `bad` every continuation is uniform noise (a dead end), after
    `good` the model finishes confidently with `good, eos`. Self-likelihood foresight should find
    `good`; plain sampling takes it half of the time."""
    other = [t for t in range(vocab) if t not in (eos,)]

    def row(first, last, n_gen):
        z = np.full(vocab, -30.0, np.float32)
        if n_gen == 0:
            z[good], z[bad] = 0.0, 0.0
        elif n_gen == 1:
            z[delim] = 0.0
        elif first == good:
            z[good if last == delim else eos] = 0.0
        else:
            z[other] = 0.0
            z[eos] = np.log(0.02)
        return z

    n = prompt_len
    tab = np.stack([[[row(f, la, g) for g in range(3)] for la in range(vocab)] for f in range(vocab)])  # [F, L, 3, V]
    t_j = jnp.asarray(tab)

    def fn(toks_RS, pos_R):
        n_gen = jnp.clip(pos_R - (n - 1), 0, 2)
        first = toks_RS[:, n]
        last = jnp.take_along_axis(toks_RS, pos_R[:, None], axis=1)[:, 0]
        return t_j[first, last, n_gen]

    def np_fn(seq):
        g = min(max(len(seq) - n, 0), 2)
        return tab[seq[n] if len(seq) > n else 0, seq[-1], g]

    return MockLM(fn, np_fn, 0)


# ---------------------------------------------------------------- the reference


@functools.lru_cache(maxsize=None)
def _noise(key_data: tuple, i: int, rows: int, vocab: int):
    key = jax.random.wrap_key_data(jnp.asarray(key_data, jnp.uint32))
    return np.asarray(jax.random.gumbel(jax.random.fold_in(key, i), (rows, vocab), jnp.float32))


def _kd(key):
    return tuple(np.asarray(jax.random.key_data(key)).tolist())


def log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max()
    return z - m - math.log(np.exp(z - m).sum())


class Reference:
    def __init__(self, lm: MockLM, cfg, task, prompts, vocab: int):
        self.lm, self.cfg, self.task, self.prompts, self.v = lm, cfg, task, [list(p) for p in prompts], vocab
        self.b = len(prompts)
        self.calls = {}  # (call key, rows) -> iterations

    def forward_tokens(self, padded_len):
        """Row-tokens computed per problem: the padded prefill plus, per call, iterations × its rows per problem."""
        return padded_len + sum(it * rows // self.b for (_, rows), it in self.calls.items())

    def rollout(self, b, gen, key, row, rows, stops, max_tokens, tau):
        """One row of sample_until: -> (tokens, untempered log-probs). Records the call's longest
        row (the JAX loop runs that many iterations over all of the call's rows)."""
        out, lps = [], []
        cap = self.cfg.max_gen - len(gen)
        for i in range(min(max_tokens, cap)):
            z = self.lm.np_logits(self.prompts[b] + gen + out)
            if tau == 0:
                tok = int(np.argmax(z))
            else:
                tok = int(np.argmax(z / np.float32(tau) + _noise(_kd(key), i, rows, self.v)[row]))
            out.append(tok)
            lps.append(log_softmax(z)[tok])
            if tok in stops or tok == self.task.eos_id:
                break
        self.calls[(_kd(key), rows)] = max(self.calls.get((_kd(key), rows), 0), len(out))
        return out, lps

    # one search step for every live problem; returns per-problem records
    def run(self, key, method):
        cfg, M, N = self.cfg, self.cfg.beams, self.cfg.samples
        C, K, R = M * N, cfg.slots, cfg.rollouts
        root = dict(gen=[], fin=False, s=0.0, F=0.0, cum=0.0)
        beams = [[dict(root) for _ in range(M)] for _ in range(self.b)]
        stopped, stop_step, reverted = [False] * self.b, [-1] * self.b, [False] * self.b
        gen_tokens = [0] * self.b
        trace, t = [], 0
        while t < cfg.max_steps and not all(stopped):
            kt = jax.random.fold_in(key, t)
            k_exp, k_fs = jax.random.fold_in(kt, 0), jax.random.fold_in(kt, 1)
            rec = []
            for b in range(self.b):
                if stopped[b]:
                    rec.append(None)
                    continue
                cands = []
                for c in range(C):
                    m, j = divmod(c, N)
                    beam = beams[b][m]
                    if beam is None or (beam["fin"] and j > 0):
                        cands.append(None)
                    elif beam["fin"]:
                        cands.append(dict(beam, parent=m))
                    else:
                        toks, lps = self.rollout(b, beam["gen"], k_exp, b * C + c, self.b * C,
                                                 {self.task.delim_id}, cfg.step_tokens, cfg.tau_step)
                        gen_tokens[b] += len(toks)
                        gen = beam["gen"] + toks
                        cands.append(dict(gen=gen, fin=toks[-1] == self.task.eos_id or len(gen) >= cfg.max_gen,
                                          s=float(np.mean(lps)), cum=beam["cum"] + float(np.sum(lps)), parent=m))
                        cands[-1]["F"] = cands[-1]["s"]
                unf = [c for c in range(C) if cands[c] is not None and not cands[c]["fin"]]
                s_unf = np.array([cands[c]["s"] for c in unf])
                if method == "beam":
                    rec.append(self.beam_select(b, beams, cands, unf))
                    stopped[b] = not any(x is not None and not x["fin"] for x in beams[b])
                    stop_step[b] = t if stopped[b] else -1
                    continue
                if method == "mfs":
                    keep = self.mfs_keep(unf, s_unf)
                else:
                    n_fin = min(sum(1 for x in cands if x is not None and x["fin"]), cfg.finished_cap)
                    keep = self.phi_keep(unf, s_unf, cands, M - n_fin, jax.random.fold_in(kt, 2), b)
                kept = sorted(keep, key=lambda c: (-cands[c]["s"], c))
                surv = kept[:K]
                F, A, fs_keys = [], [], []
                for k, c in enumerate(surv):
                    fs = []
                    for r in range(R):
                        toks, lps = self.rollout(b, cands[c]["gen"], k_fs, (b * K + k) * R + r, self.b * K * R, set(),
                                                 cfg.max_gen, cfg.tau_foresight)
                        gen_tokens[b] += len(toks)
                        fs.append(np.mean(lps) if toks else np.nan)
                        fs_keys.append((k, answer_key(cands[c]["gen"] + toks, self.task)))
                    f = float(np.mean(fs))
                    F.append(cands[c]["s"] if np.isnan(f) else f)
                    parent = beams[b][cands[c]["parent"]]
                    use_F = cfg.baseline == "parent_F" or method == "phi"
                    A.append(F[-1] - (parent["F"] if use_F else parent["s"]))
                fin = sorted((c for c in range(C) if cands[c] is not None and cands[c]["fin"]),
                             key=lambda c: (-cands[c]["s"], c))
                n_fin = min(len(fin), cfg.finished_cap if surv else M)
                if method == "mfs":
                    by = A if cfg.rank == "A" else F
                    order = sorted(range(len(surv)), key=lambda k: (-by[k], k))
                    largest = 0.0
                else:
                    order, largest = self.phi_order(surv, A, fs_keys, jax.random.fold_in(kt, 3), b)
                src = fin[:n_fin] + [surv[k] for k in order][: M - n_fin]
                new = [dict(cands[c], A=-np.inf if i < n_fin else A[order[i - n_fin]],
                            F=cands[c]["F"] if i < n_fin else F[order[i - n_fin]]) for i, c in enumerate(src)]
                new += [None] * (M - len(new))
                left = any(x is not None and not x["fin"] for x in new)
                max_A = max([x["A"] for x in new if x is not None and not x["fin"]], default=-np.inf)
                if method == "mfs":
                    revert = t > cfg.min_steps and left and max_A <= cfg.epsilon
                else:
                    revert = False
                    left = left and not (t >= cfg.min_steps and surv and largest >= cfg.phi_delta)
                if not revert:
                    beams[b] = new
                if revert or not left:
                    stopped[b], stop_step[b], reverted[b] = True, t, revert
                rec.append(dict(keep=sorted(keep), surv=surv, F=F, A=A, src=src, s={c: cands[c]["s"] for c in unf}))
            trace.append(rec)
            t += 1
        final = self.finalize(beams, key, gen_tokens)
        return dict(trace=trace, stop_step=stop_step, reverted=reverted, gen_tokens=gen_tokens, **final)

    def beam_select(self, b, beams, cands, unf):
        """Step beam search: the M valid candidates with the highest cumulative log-prob of the
        whole solution (finished beams compete with theirs), ties to the lower index."""
        valid = [c for c in range(len(cands)) if cands[c] is not None]
        src = sorted(valid, key=lambda c: (-cands[c]["cum"], c))[: self.cfg.beams]
        beams[b] = [dict(cands[c]) for c in src] + [None] * (self.cfg.beams - len(src))
        return dict(keep=[], surv=[], F=[], A=[], src=src, s={c: cands[c]["s"] for c in unf},
                    cum={c: cands[c]["cum"] for c in valid})

    def mfs_keep(self, unf, s):
        if not unf or not self.cfg.prune:
            return list(unf)
        thr = s.mean() + self.cfg.sigma_rate * s.std()
        return [c for c, x in zip(unf, s, strict=True) if x >= thr or x == s.max()]

    def phi_keep(self, unf, s, cands, need, key, b):
        if not unf:
            return []
        keep = [c for c, x in zip(unf, s, strict=True) if x > s.mean() - self.cfg.phi_sigma_rate * s.std()]
        C = len(cands)
        g = np.asarray(jax.random.gumbel(key, (self.b, C), jnp.float32))[b]
        rest = sorted((c for c in unf if c not in keep), key=lambda c: (-(np.float32(cands[c]["s"]) / np.float32(0.1)
                                                                         + g[c]), c))
        return keep + rest[: max(need - len(keep), 0)]

    def phi_order(self, surv, A, fs_keys, key, b):
        if not surv:
            return [], 0.0
        R, K = self.cfg.rollouts, self.cfg.slots
        keys = [kk for _, kk in fs_keys]
        share = [sum(x == y for y in keys) / len(keys) for x in keys]
        align = [np.mean(share[k * R:(k + 1) * R]) for k in range(len(surv))]

        def softmax(x):
            e = np.exp(np.asarray(x) - np.max(x))
            return e / e.sum()

        w = 0.5 * softmax(np.asarray(A) / self.cfg.phi_tau_advantage) + 0.5 * softmax(align)
        g = np.asarray(jax.random.gumbel(key, (self.b, K), jnp.float32))[b]
        order = sorted(range(len(surv)), key=lambda k: (-(np.log(w[k]) + g[k]), k))
        return order, max(share)

    def finalize(self, beams, key, gen_tokens):
        cfg, M = self.cfg, self.cfg.beams
        kf = jax.random.fold_in(key, 1 << 20)
        quality, keys, choice_q, choice_v = [], [], [], []
        for b in range(self.b):
            q, ks = [], []
            for m, beam in enumerate(beams[b]):
                if beam is None:
                    q.append(-np.inf)
                    ks.append(None)
                    continue
                toks, lps = [], []
                if not beam["fin"]:
                    toks, lps = self.rollout(b, beam["gen"], kf, b * M + m, self.b * M, set(), cfg.max_gen,
                                             cfg.tau_final)
                    gen_tokens[b] += len(toks)
                gen = beam["gen"] + toks
                q.append((beam["cum"] + float(np.sum(lps))) / max(len(gen), 1))
                ks.append(answer_key(gen, self.task))
            quality.append(q)
            keys.append(ks)
            choice_q.append(int(np.argmax(q)))
            votes = [sum(k == x for x in ks) if k is not None else -1 for k in ks]
            top = [i for i in range(M) if votes[i] == max(votes)]
            choice_v.append(max(top, key=lambda i: (q[i], -i)))
        return dict(quality=quality, keys=keys, choice_quality=choice_q, choice_vote=choice_v)


def answer_key(gen, task):
    """decode.rollout.answer_keys for one list of tokens (EOS and a trailing delimiter dropped)."""
    toks = list(gen)
    if toks and toks[-1] == task.eos_id:
        toks = toks[:-1]
    if toks and toks[-1] == task.delim_id:
        toks = toks[:-1]
    if task.answer_span == "last_step" and task.delim_id in toks:
        toks = toks[len(toks) - toks[::-1].index(task.delim_id):]
    return tuple(toks)
