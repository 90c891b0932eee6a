"""Multi-draft speculative decoding on device: SpecTr (k i.i.d. draft rows) and RSD (draft trees
without replacement: RSD-C with a fixed branching vector, RSD-S by stochastic beam search), each
one jitted `lax.while_loop` on the tree-capable cache (spark/cache.py: Tree, commit).

    tokens_BN, num_new_B, stats = generate(graphdef, params, prompts_BT, prompt_lengths_B, key,
                                           max_new_tokens=N, sampler=..., eos_id=..., pad_id=...,
                                           md=MultiDraftConfig("spectr", drafts=4, length=3))

A round, per row, with L = the committed length and `pending` (the last emitted token) at L:
1. draft: the MatFormer self-draft (the same weights, FFNs cut to the draft widths) grows a tree
   whose root is `pending`, one forward per depth over that depth's nodes, writing their K/V to the
   scratch slots L + node of the shared cache:
   - spectr: k rows of `length` tokens, each sampled from q(·|its own row), the first tokens i.i.d.
     from q at the root (with `adaptive_threshold` h, a row stops once 1 − Π top-prob > h, as in
     decode/speculative.py; rows that share a prefix share that decision);
   - rsd_c: every node at depth d − 1 gets `branching[d − 1]` distinct children, Gumbel-top-b of
     its q (their order of decreasing perturbed value is the order they are tested in);
   - rsd_s: a stochastic beam of `beam` nodes per depth (Kool et al. 2019: children's Gumbels
     conditioned on their parent's, the global top-`beam` kept), `depth` levels.
2. verify: one target forward over all nodes (tree attention), p at every node;
3. walk from the root: at the current node, its children are tested by decode/verify.py
   (spectr: `kseq` over the children of the rows still matching the accepted prefix, ρ* for
   their number; rsd: `recursive` without replacement in sampling order; any: `target_only`);
   an accepted child becomes the current node, a rejection emits the residual draw and ends the
   round; at a node without children the target samples the bonus token from p;
4. commit the root and the accepted path (spark/cache.py: commit), pending = the last token.

At temperature 0 the children are deterministic (rsd: the draft's top-b / beam top-W by log q;
spectr: the k rows coincide) and `target_only` verifies them: the output is the target's greedy
output token for token. All tree arrays of spectr and rsd_c are compile-time constants; rsd_s's
parents and ancestor masks are built on device each round.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from decode import verify
from decode.sampling import SamplerConfig, categorical, processed_logprobs
from decode.spec_config import SpecConfig, SpecState
from decode.speculative import emit_window, emitted_tail, running, spec_prefill, summarize
from spark.cache import Tree, commit
from spark.errors import ConfigError
from spark.matformer import cut_ffn

METHODS = ("spectr", "rsd_c", "rsd_s")
VERIFIERS = {"spectr": ("kseq", "recursive", "target_only"), "rsd_c": ("recursive", "target_only"),
             "rsd_s": ("recursive", "target_only")}


@dataclasses.dataclass(frozen=True)
class MultiDraftConfig:
    """Static settings of a multi-draft decode (a jit static argument).

    method: "spectr" | "rsd_c" | "rsd_s"; draft_widths: the draft's per-layer FFN widths (None:
    the smallest MatFormer granularity); drafts, length: SpecTr's k rows of `length` tokens;
    branching: RSD-C's children per node at each depth; beam, depth: RSD-S; verifier: one of
    VERIFIERS[method] (None: the first, kseq | recursive); adaptive_threshold: SpecTr only;
    verify_sparse: the Spark sparse-gather path for the verify block (None: as `sparse`)."""

    method: str = "spectr"
    draft_widths: tuple[int, ...] | None = None
    drafts: int = 2
    length: int = 3
    branching: tuple[int, ...] = (3, 2, 1)
    beam: int = 2
    depth: int = 3
    verifier: str | None = None
    adaptive_threshold: float | None = None
    verify_sparse: bool | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"multi-draft method must be one of {METHODS}, got {self.method!r}")
        v = self.verifier or VERIFIERS[self.method][0]
        if v not in VERIFIERS[self.method]:
            raise ConfigError(f"--verifier {v} does not apply to {self.method} (use one of {VERIFIERS[self.method]})")
        object.__setattr__(self, "verifier", v)
        object.__setattr__(self, "branching", tuple(int(b) for b in self.branching))
        for name in ("drafts", "length", "beam", "depth"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.branching or min(self.branching) < 1:
            raise ConfigError(f"branching must be positive integers, got {self.branching}")
        h = self.adaptive_threshold
        if h is not None and (self.method != "spectr" or not 0.0 <= h <= 1.0):
            raise ConfigError(f"adaptive_threshold applies to spectr only, in [0, 1]; got {h} for {self.method}")
        if self.draft_widths is not None:
            object.__setattr__(self, "draft_widths", tuple(int(w) for w in self.draft_widths))

    def resolve(self, model_cfg) -> MultiDraftConfig:
        w = self.draft_widths or model_cfg.granularity_widths(max(model_cfg.matformer.divisors))
        return dataclasses.replace(self, draft_widths=model_cfg.check_widths(w))

    @property
    def levels(self) -> list[np.ndarray]:
        """The node ids at each depth (level 0 = [0], the root), breadth-first."""
        if self.method == "spectr":
            k, n = self.drafts, self.length
            return [np.zeros(1, np.int64)] + [1 + np.arange(k) * n + (d - 1) for d in range(1, n + 1)]
        widths = np.cumprod(self.branching) if self.method == "rsd_c" else [self.beam] * self.depth
        starts = np.concatenate([[1], 1 + np.cumsum(widths)])
        return [np.zeros(1, np.int64)] + [np.arange(starts[d], starts[d] + w) for d, w in enumerate(widths)]

    @property
    def nodes(self) -> int:
        """Tree nodes including the root: the target tokens of one verify forward."""
        return int(sum(len(x) for x in self.levels))

    @property
    def static_parent(self) -> np.ndarray:
        """Each node's parent (−1 for the root); for rsd_s, a placeholder (parents are drawn)."""
        lv, parent = self.levels, np.full(self.nodes, -1)
        for d in range(1, len(lv)):
            if self.method == "spectr":
                parent[lv[d]] = 0 if d == 1 else lv[d - 1]
            elif self.method == "rsd_c":
                parent[lv[d]] = np.repeat(lv[d - 1], self.branching[d - 1])
            else:
                parent[lv[d]] = lv[d - 1][0]
        return parent


def depths(md: MultiDraftConfig) -> np.ndarray:
    out = np.zeros(md.nodes, np.int32)
    for d, ids in enumerate(md.levels):
        out[ids] = d
    return out


def add_level(anc_BNN, parent_BN, ids):
    """The ancestor rows of the nodes `ids`: their parent's row and themselves."""
    n = anc_BNN.shape[1]
    rows = jnp.take_along_axis(anc_BNN, parent_BN[:, ids, None], axis=1) | jnp.eye(n, dtype=bool)[ids]
    return anc_BNN.at[:, ids].set(rows)


def ancestors(parent_BN, levels):
    """anc[b, n, m]: m is n or one of its ancestors, built level by level (parents precede children)."""
    b, n = parent_BN.shape
    anc = jnp.broadcast_to(jnp.eye(n, dtype=bool), (b, n, n))
    for ids in levels[1:]:
        anc = add_level(anc, parent_BN, ids)
    return anc


def _log1mexp(x):
    """log(1 − e^x) for x ≤ 0, stable at both ends."""
    return jnp.where(x > -0.693, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def conditional_gumbels(g_parent, phi_V):
    """Stochastic beam search's children values (Kool et al. 2019): G_c = −log(e^−G − e^−Z + e^−φ_c),
    Z = max φ, in a stable form; the largest child's value is its parent's G."""
    z = jnp.max(phi_V, -1, keepdims=True)
    u = g_parent - phi_V + _log1mexp(jnp.minimum(phi_V - z, 0.0))
    return g_parent - jnp.maximum(u, 0.0) - jnp.log1p(jnp.exp(-jnp.abs(u)))


# ---------------------------------------------------------------- draft trees

def tree_block(ids, anc_BNN, pos_BN) -> Tree:
    """The nodes `ids` of a round's tree as one model block."""
    b = anc_BNN.shape[0]
    return Tree(node_BT=jnp.broadcast_to(jnp.asarray(ids, jnp.int32), (b, len(ids))), anc_BTN=anc_BNN[:, ids],
                pos_BN=pos_BN)


def _draft_forward(drafter, tokens_BT, ids, anc_BNN, pos_BN, md, cache, sparse, sampler):
    """The draft at the nodes `ids` (one depth) -> (processed logq [B, T, V], raw logits, cache)."""
    b = tokens_BT.shape[0]
    logits, cache = drafter(tokens_BT, pos_BN[:, ids], cache=cache, widths=md.draft_widths, sparse=sparse,
                            tree=tree_block(ids, anc_BNN, pos_BN))
    v = logits.shape[-1]
    logq = processed_logprobs(logits.reshape(-1, v), sampler).reshape(b, len(ids), v)
    return logq, logits, cache


def _top_children(key, logq_BV, logits_BV, b: int, greedy: bool):
    """b distinct children: Gumbel-top-b of logq (decreasing perturbed value: the sampling order),
    or at temperature 0 the draft's top-b by its raw logits. -> (tokens [B, b], valid [B, b])."""
    if greedy:
        _, tok = jax.lax.top_k(logits_BV, b)
        return tok.astype(jnp.int32), jnp.ones(tok.shape, bool)
    g = jax.random.gumbel(key, logq_BV.shape)
    val, tok = jax.lax.top_k(logq_BV + g, b)
    return tok.astype(jnp.int32), val > -jnp.inf  # never a child with q = 0


def _row_draws(key, logq_BKV, greedy: bool):
    """One token per SpecTr row, independently (K-SEQ needs i.i.d. drafts)."""
    if greedy:
        return jnp.argmax(logq_BKV, -1).astype(jnp.int32)
    return categorical(key, logq_BKV)


def draft_spectr(drafter, s: SpecState, key, md, pos_BN, sampler, sparse):
    """k rows of `length` tokens. -> (node tokens [B, N], valid [B, N], logq [B, N, V], parent, ancestors,
    cache). With an adaptive threshold the depths run in a while_loop that ends once no row is drafting."""
    b, k, n_len, nn = s.pending_B.shape[0], md.drafts, md.length, md.nodes
    lv, parent = md.levels, jnp.broadcast_to(jnp.asarray(md.static_parent, jnp.int32), (b, nn))
    anc = ancestors(parent, lv)  # a static tree: built once per round
    greedy = sampler.temperature == 0.0

    def level(d, ids, kids, carry):
        """The draft forward at depth d (node ids `ids`) samples each row's token at depth d + 1."""
        tokens, valid, logq_all, cache, active, conf = carry
        logq, logits, cache = _draft_forward(drafter, tokens[:, ids], ids, anc, pos_BN, md, cache, sparse, sampler)
        logq_all = logq_all.at[:, ids].set(logq)
        logq_k = jnp.broadcast_to(logq, (b, k, logq.shape[-1]))  # at the root, one q feeds every row
        tokens = tokens.at[:, kids].set(_row_draws(jax.random.fold_in(key, d), logq_k, greedy))
        valid = valid.at[:, kids].set(active)
        if md.adaptive_threshold is not None:
            conf = conf * jnp.max(jax.nn.softmax(jnp.broadcast_to(logits, logq_k.shape), -1) if greedy
                                  else jnp.exp(logq_k), -1)
            active = active & (1.0 - conf <= md.adaptive_threshold)
        return tokens, valid, logq_all, cache, active, conf

    v = drafter.cfg.vocab_size
    carry = (jnp.zeros((b, nn), jnp.int32).at[:, 0].set(s.pending_B), jnp.zeros((b, nn), bool).at[:, 0].set(True),
             jnp.zeros((b, nn, v), jnp.float32), s.cache, jnp.broadcast_to(~s.done_B[:, None], (b, k)),
             jnp.ones((b, k), jnp.float32))
    carry = level(0, lv[0], lv[1], carry)
    if md.adaptive_threshold is None:  # fixed length: unrolled
        for d in range(1, n_len):
            carry = level(d, lv[d], lv[d + 1], carry)
    else:  # row r's node at depth d is 1 + r·length + (d − 1)
        rows = 1 + jnp.arange(k, dtype=jnp.int32) * n_len
        body = lambda c: (c[0] + 1, level(c[0], rows + c[0] - 1, rows + c[0], c[1]))  # noqa: E731
        carry = jax.lax.while_loop(lambda c: (c[0] < n_len) & jnp.any(c[1][4]), body, (jnp.int32(1), carry))[1]
    tokens, valid, logq_all, cache, _, _ = carry
    return tokens, valid, logq_all, parent, anc, cache


def draft_rsd(drafter, s: SpecState, key, md, pos_BN, sampler, sparse):
    """RSD-C / RSD-S trees. -> (node tokens [B, N], valid [B, N], logq [B, N, V], parent [B, N],
    ancestors [B, N, N], cache)."""
    b, nn, v = s.pending_B.shape[0], md.nodes, drafter.cfg.vocab_size
    lv = md.levels
    parent = jnp.broadcast_to(jnp.asarray(md.static_parent, jnp.int32), (b, nn))
    # rsd_c: a static tree, built once; rsd_s: each level's rows are added once its parents are drawn
    anc = ancestors(parent, lv) if md.method == "rsd_c" else jnp.broadcast_to(jnp.eye(nn, dtype=bool), (b, nn, nn))
    tokens = jnp.zeros((b, nn), jnp.int32).at[:, 0].set(s.pending_B)
    valid = jnp.zeros((b, nn), bool).at[:, 0].set(~s.done_B)
    score = jnp.zeros((b, nn), jnp.float32)  # rsd_s: cumulative log q of each node's path
    gval = jnp.zeros((b, nn), jnp.float32)  # rsd_s: each node's perturbed value G
    greedy = sampler.temperature == 0.0
    cache, logq_all = s.cache, jnp.zeros((b, nn, v), jnp.float32)
    for d in range(len(lv) - 1):
        ids, kids = lv[d], lv[d + 1]
        logq, logits, cache = _draft_forward(drafter, tokens[:, ids], ids, anc, pos_BN, md, cache, sparse, sampler)
        logq_all = logq_all.at[:, ids].set(logq)
        kd = jax.random.fold_in(key, d)
        if md.method == "rsd_c":
            nb = md.branching[d]
            tok, ok = _top_children(kd, logq.reshape(-1, v), logits.reshape(-1, v), nb, greedy)
            tokens = tokens.at[:, kids].set(tok.reshape(b, -1))
            ok = ok.reshape(b, len(ids), nb) & valid[:, ids, None]
            valid = valid.at[:, kids].set(ok.reshape(b, -1))
            continue
        # rsd_s: every child of every beam node, perturbed conditionally on its parent; global top-W
        if greedy:  # beam search by the draft's own (untempered) log-probabilities
            lq = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
            phi = score[:, ids, None] + lq
            g_child = phi
        else:
            lq = logq
            phi = score[:, ids, None] + lq + jax.random.gumbel(kd, lq.shape)
            g_par = gval[:, ids, None] if d > 0 else jnp.max(phi, -1, keepdims=True)  # root: plain Gumbel-top-k
            g_child = conditional_gumbels(g_par, phi)
        g_child = jnp.where(valid[:, ids, None] & (lq > -jnp.inf), g_child, -jnp.inf)
        best, flat = jax.lax.top_k(g_child.reshape(b, -1), len(kids))
        par_local, tok = flat // v, (flat % v).astype(jnp.int32)
        parent = parent.at[:, kids].set(jnp.asarray(ids, jnp.int32)[par_local])
        anc = add_level(anc, parent, kids)
        tokens = tokens.at[:, kids].set(tok)
        valid = valid.at[:, kids].set(best > -jnp.inf)
        score = score.at[:, kids].set(jnp.take_along_axis(score[:, ids], par_local, 1)
                                      + jnp.take_along_axis(lq.reshape(b, -1), flat, 1))
        gval = gval.at[:, kids].set(best)
    return tokens, valid, logq_all, parent, anc, cache


# ---------------------------------------------------------------- verify, walk, round

def _verifier(md, greedy: bool):
    name = "target_only" if greedy else md.verifier
    if name == "kseq":
        return lambda p, q, x, ok: verify.kseq(p, q, x, ok)
    if name == "recursive":
        return lambda p, q, x, ok: verify.recursive(p, q, x, ok, without_replacement=md.method != "spectr")
    return lambda p, q, x, ok: verify.target_only(p, x, ok)


def walk(key, md, sampler, tokens_BN, valid_BN, parent_BN, logp_BNV, logq_BNV):
    """Verification from the root down. -> (path nodes [B, D] (accepted, in order), n accepted [B],
    the token emitted after them [B], tokens of the path [B, D])."""
    b, depth = tokens_BN.shape[0], len(md.levels) - 1
    check = jax.vmap(_verifier(md, sampler.temperature == 0.0))
    take_v = lambda x, i: jnp.take_along_axis(x, i[:, None, None], 1)[:, 0]  # noqa: E731
    node = jnp.zeros((b,), jnp.int32)
    going = jnp.ones((b,), bool)  # still walking: every test so far accepted
    n = jnp.zeros((b,), jnp.int32)
    out = jnp.zeros((b,), jnp.int32)
    path, path_tok = jnp.zeros((b, depth), jnp.int32), jnp.zeros((b, depth), jnp.int32)
    alive = jnp.ones((b, md.drafts), bool)  # spectr: rows that match the accepted prefix
    for d in range(1, depth + 1):
        kids = jnp.asarray(md.levels[d], jnp.int32)
        x = tokens_BN[:, kids]
        ok = valid_BN[:, kids]
        ok = ok & alive if md.method == "spectr" else ok & (parent_BN[:, kids] == node[:, None])
        p, q = jnp.exp(take_v(logp_BNV, node)), jnp.exp(take_v(logq_BNV, node))
        acc, res = check(p, q, x, ok)
        y, idx = jax.vmap(verify.draw)(jax.random.split(jax.random.fold_in(key, d), b), x, acc, res)
        hit = going & (idx >= 0)
        out = jnp.where(going & ~hit, y, out)  # rejected (or no child: the bonus from p at this node)
        chosen = kids[jnp.maximum(idx, 0)]
        path = path.at[:, d - 1].set(jnp.where(hit, chosen, 0))
        path_tok = path_tok.at[:, d - 1].set(jnp.where(hit, y, 0))
        n = n + hit
        node = jnp.where(hit, chosen, node)
        if md.method == "spectr":
            alive = alive & ok & (x == y[:, None])
        going = hit
    p_leaf = take_v(logp_BNV, node)
    if sampler.temperature == 0.0:
        bonus = jnp.argmax(p_leaf, -1).astype(jnp.int32)
    else:
        bonus = categorical(jax.random.fold_in(key, depth + 1), p_leaf)
    out = jnp.where(going, bonus, out)
    return path, n, out, path_tok


def md_round(model, drafter, s: SpecState, *, md: MultiDraftConfig, sampler, eos_id, pad_id, widths,
             sparse) -> SpecState:
    k_draft, k_walk = jax.random.split(jax.random.fold_in(s.key, s.rounds))
    lengths = s.cache.lengths
    pos_BN = lengths[:, None] + jnp.asarray(depths(md))[None]  # siblings share a position
    draft = draft_spectr if md.method == "spectr" else draft_rsd
    tokens, valid, logq, parent, anc, cache = draft(drafter, s, k_draft, md, pos_BN, sampler, sparse)
    # verify: every node in one target forward
    b, nn = tokens.shape
    vs = sparse if md.verify_sparse is None else md.verify_sparse
    logits, cache = model(tokens, pos_BN, cache=cache, widths=widths, sparse=vs,
                          tree=tree_block(np.arange(nn), anc, pos_BN))
    v = logits.shape[-1]
    logp = processed_logprobs(logits.reshape(b * nn, v), sampler).reshape(b, nn, v)
    path, n, t, path_tok = walk(k_walk, md, sampler, tokens, valid, parent, logp, logq)

    live = ~s.done_B
    max_new = s.tokens_BN.shape[1] - nn - 1
    window, count, hit_eos = emit_window(path_tok, n, t, jnp.where(live, max_new - s.num_B, 0), eos_id, pad_id)
    out = jax.vmap(lambda row, w, at: jax.lax.dynamic_update_slice(row, w, (at,)))(s.tokens_BN, window, s.num_B)
    num = s.num_B + count
    kept = lengths[:, None] + jnp.concatenate([jnp.zeros((b, 1), jnp.int32), path], 1)  # root + accepted path
    cache = commit(cache.replace(lengths=lengths), kept, jnp.where(live, count, 0))
    stats = {"rounds": s.stats["rounds"] + live,
             "drafted": s.stats["drafted"] + jnp.where(live, jnp.sum(valid[:, 1:], 1), 0),
             "accepted": s.stats["accepted"] + jnp.where(live, n, 0)}
    pending = emitted_tail(window, count, s.pending_B)[0]
    return s.replace(rounds=s.rounds + 1, tokens_BN=out, num_B=num, pending_B=jnp.where(live, pending, s.pending_B),
                     done_B=s.done_B | hit_eos | (num >= max_new), cache=cache, stats=stats)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampler", "eos_id", "pad_id", "md",
                                             "widths", "sparse"))
def generate(graphdef, params, prompts_BT, prompt_lengths_B, key, *, max_new_tokens: int, sampler: SamplerConfig,
             eos_id: int, pad_id: int, md: MultiDraftConfig = MultiDraftConfig(), widths=None, sparse: bool = True):
    """Multi-draft speculative sampling from the target (`widths`, None = full) with a MatFormer
    self-draft. Returns (new_tokens [B, max_new_tokens], num_new [B], stats) as
    decode/speculative.py: generate; stats add `tree_nodes` (draft tokens per verify forward)."""
    model = nnx.merge(graphdef, params)
    md, widths = md.resolve(model.cfg), model.cfg.check_widths(widths)
    drafter = nnx.merge(graphdef, cut_ffn(params, model.cfg, md.draft_widths))
    spec = SpecConfig(draft_widths=md.draft_widths, gamma=md.nodes)  # slack and window room for the tree
    s = spec_prefill(model, prompts_BT, prompt_lengths_B, key, max_new_tokens=max_new_tokens, spec=spec,
                     sampler=sampler, eos_id=eos_id, pad_id=pad_id, widths=widths, drafter=drafter)
    kw = dict(md=md, sampler=sampler, eos_id=eos_id, pad_id=pad_id, widths=widths, sparse=sparse)
    cond = running(max_new_tokens)
    s = jax.lax.while_loop(cond, lambda s: md_round(model, drafter, s, **kw), s)
    return s.tokens_BN[:, :max_new_tokens], s.num_B, summarize(s) | {"tree_nodes": jnp.int32(md.nodes - 1)}
