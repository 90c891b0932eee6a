"""Self-speculative decoding with MatFormer drafts, on device: one jitted `lax.while_loop`.

    tokens_BN, num_new_B, stats = generate(graphdef, params, prompts_BT, prompt_lengths_B, key,
                                           max_new_tokens=N, sampler=..., eos_id=..., pad_id=...,
                                           spec=SpecConfig(draft_widths=cfg.granularity_widths(8), gamma=4))

The draft is the same checkpoint at smaller FFN widths (any MatFormer granularity or Mix'n'Match
tuple; Spark layers use their sparse-gather path). A round, per row (Leviathan et al. 2023):

1. draft up to γ tokens d_1..d_γ ~ q_i at positions L+1..L+γ, where L = cache length and `pending`
   (the last emitted token, whose K/V is not yet cached) sits at L. With `adaptive_threshold` h a
   row stops drafting once 1 − Π_i c_i > h, c_i = the draft's top probability at step i (its own
   estimate that the target agrees; SpecDec++'s threshold rule with a free estimator).
2. verify [pending, d_1..d_γ] in one target forward → p_1..p_{γ+1};
3. accept d_i while u_i·q_i(d_i) ≤ p_i(d_i) (n = accepted count), then emit t ~ norm(max(p_{n+1} −
   q_{n+1}, 0)), with q_{n+1} := 0 past the drafted tokens (the bonus token ~ p), falling back to
   p_{n+1} when the residual has no mass;
4. commit: L += n + 1, pending = t. K/V past the new length is garbage that the attention mask
   never reads and the next round overwrites: rollback is that integer.

p and q are `sampling.processed_logprobs` of the logits (temperature, top-k, top-p; float32), the
distributions the plain sampler draws from, so the output is distributed exactly as plain sampling
from the target (tests/test_speculative.py checks it by chi-square on every continuation); at
temperature 0 it is the target's greedy output token for token.

The draft runs on a copy of the FFN weights cut to its widths once per call (`matformer.cut_ffn`;
1/8 of the FFN memory for F/8; a prefix slice inside the loop body is copied on every draft step,
2.2× slower F/8 FFN at 2B shapes on XLA:CPU), the rest of the weights are shared with the target.

Draft caches (`draft_cache`): "shared" — the draft reads the target's committed K/V and writes only
its speculative slots, which the verify overwrites (no draft prefill, no extra memory); "separate"
— the draft keeps its own cache (its own prefill). The draft never runs its last proposal d_γ, so
after a full acceptance its cache misses one position; every round therefore starts the separate
draft on the 2-token block [last committed token, pending] at [L−1, L] (rewriting a slot is harmless).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from decode import goodput as gp
from decode.goodput import GoodputConfig
from decode.rollout import prefill_cache
from decode.sampling import SamplerConfig, categorical, processed_logprobs, sample
from decode.spec_config import DRAFT_CACHES as DRAFT_CACHES  # re-exported: callers name spec.DRAFT_CACHES
from decode.spec_config import SpecConfig, SpecState
from spark.matformer import cut_ffn

# ---------------------------------------------------------------- accept / reject (pure, per block)

def uniforms(key, shape):
    """u in (0, 1]: u·q ≤ p is then false whenever p = 0, also for u's smallest draw."""
    return 1.0 - jax.random.uniform(key, shape)


def residual(p_BV, q_BV):
    """norm(max(p − q, 0)), or p where that has no mass (p == q up to rounding)."""
    r = jnp.maximum(p_BV - q_BV, 0.0)
    mass = jnp.sum(r, -1, keepdims=True)
    return jnp.where(mass > 0, r / jnp.where(mass > 0, mass, 1.0), p_BV)


def correction_dist(p_BTV, q_BTV, n_B):
    """The distribution of the token emitted after n accepted drafts: the residual at block index n
    (q is zero past the drafted tokens, so after a full acceptance this is p_{n+1}: the bonus)."""
    at = lambda x: jnp.take_along_axis(x, n_B[:, None, None], axis=1)[:, 0]  # noqa: E731
    return residual(at(p_BTV), at(q_BTV))


def accept(key, logp_BTV, logq_BGV, drafts_BG, drafted_BG):
    """One verify block: -> (n_B accepted drafts, t_B the token emitted after them).

    logp_BTV: target log-probs at block indices 0..γ (T = γ + 1); logq_BGV: the draft's, from
    which drafts_BG were sampled; drafted_BG: which of the γ slots a row actually drafted."""
    k_u, k_t = jax.random.split(key)
    p = jnp.exp(logp_BTV)
    q = jnp.where(drafted_BG[..., None], jnp.exp(logq_BGV), 0.0)
    pick = lambda x: jnp.take_along_axis(x, drafts_BG[..., None], -1)[..., 0]  # noqa: E731
    ok_BG = drafted_BG & (uniforms(k_u, drafts_BG.shape) * pick(q) <= pick(p[:, :-1]))
    n_B = jnp.sum(jnp.cumprod(ok_BG, axis=1), axis=1).astype(jnp.int32)
    q_BTV = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)
    dist = correction_dist(p, q_BTV, n_B)
    t_B = categorical(k_t, jnp.log(dist))
    return n_B, t_B


def emit_window(drafts_BG, n_B, t_B, room_B, eos_id, pad_id):
    """The γ+1 tokens a round emits per row: d_1..d_n, t, cut after EOS and at `room` tokens.

    -> (window_BW padded with pad_id, count_B, hit_eos_B)."""
    g = drafts_BG.shape[1]
    j = jnp.arange(g + 1)
    w = jnp.concatenate([drafts_BG, t_B[:, None]], axis=1)
    w = jnp.where(j == n_B[:, None], t_B[:, None], w)
    valid = j <= n_B[:, None]
    is_eos = valid & (w == eos_id)
    first_eos = jnp.where(jnp.any(is_eos, 1), jnp.argmax(is_eos, 1), g + 1)
    count = jnp.minimum(jnp.minimum(n_B + 1, first_eos + 1), room_B)
    hit_eos = first_eos < count
    return jnp.where(j < count[:, None], w, pad_id), count.astype(jnp.int32), hit_eos


def emitted_tail(window_BW, count_B, pending_B):
    """(the last token of each row's window, the one before it — `pending_B` for a window of one):
    the next pending token and its predecessor. They are t and d_n only when the window was not cut
    (at an EOS, or at max_new_tokens: there the cache keeps `count` slots and the pending token is
    the last one emitted)."""
    at = lambda i: jnp.take_along_axis(window_BW, jnp.maximum(i, 0)[:, None], 1)[:, 0]  # noqa: E731
    return at(count_B - 1), jnp.where(count_B >= 2, at(count_B - 2), pending_B)


# ---------------------------------------------------------------- draft, verify, round

def _confidence(logits_BV, logq_BV, sampler):
    """The draft's own estimate that the target keeps its token: its top probability (at T=1 when
    greedy, where the processed q is one-hot)."""
    if sampler.temperature == 0.0:
        return jnp.max(jax.nn.softmax(logits_BV.astype(jnp.float32), -1), -1)
    return jnp.exp(jnp.max(logq_BV, -1))


def draft(model, s: SpecState, key, *, spec: SpecConfig, sampler, sparse, fallback: float | None = None):
    """γ draft tokens per row (unrolled); with an adaptive threshold or a `fallback` up to γ, in a
    while_loop that ends once no row is drafting. `fallback` α (BiLD, decode/bild.py): a row stops
    at the first token whose draft confidence is below α, and that token is not drafted.

    -> (drafts_BG, logq_BGV, drafted_BG, target cache with the draft's slots written | unchanged,
    draft cache | None). logq is the processed distribution each draft was sampled from."""
    b, gamma, widths = s.pending_B.shape[0], spec.gamma, spec.draft_widths
    pos0 = s.cache.lengths
    cache = s.draft_cache if spec.separate else s.cache
    if spec.separate:  # [last, pending] at [L-1, L]: refills the slot a full acceptance left unwritten
        tok, pos = jnp.stack([s.last_B, s.pending_B], 1), jnp.stack([pos0 - 1, pos0], 1)
        logits, cache = model(tok, pos, cache=cache, widths=widths, sparse=sparse,
                              logits_at_B=jnp.ones((b,), jnp.int32))
    else:
        logits, cache = model(s.pending_B[:, None], pos0[:, None], cache=cache, widths=widths, sparse=sparse)
    v = logits.shape[-1]
    keys = jax.random.split(key, gamma)

    def pick(i, logits_BV, drafts, logq, drafted, active, confidence):
        d, lq = sample(keys[i], logits_BV, sampler)
        if fallback is not None:  # the unconfident token is discarded, not drafted
            active = active & (_confidence(logits_BV, lq, sampler) >= fallback)
        drafts = drafts.at[:, i].set(jnp.where(active, d, 0))
        logq = logq.at[:, i].set(lq)
        drafted = drafted.at[:, i].set(active)
        if spec.adaptive_threshold is not None:  # fixed γ: no confidence to compute
            confidence = confidence * _confidence(logits_BV, lq, sampler)
            active = active & (1.0 - confidence <= spec.adaptive_threshold)
        return drafts, logq, drafted, active, confidence

    init = (jnp.zeros((b, gamma), jnp.int32), jnp.zeros((b, gamma, v), jnp.float32),
            jnp.zeros((b, gamma), bool), ~s.done_B, jnp.ones((b,), jnp.float32))
    carry = pick(0, logits[:, 0], *init)

    def body(c):
        i, cache, (drafts, logq, drafted, active, confidence) = c
        tok = jax.lax.dynamic_slice_in_dim(drafts, i - 1, 1, axis=1)
        logits, cache = model(tok, (pos0 + i)[:, None], cache=cache, widths=widths, sparse=sparse)
        return i + 1, cache, pick(i, logits[:, 0], drafts, logq, drafted, active, confidence)

    c = (1, cache, carry)
    if spec.adaptive_threshold is None and fallback is None:  # fixed γ: unrolled (no loop overhead per step)
        for _ in range(1, gamma):
            c = body(c)
    else:  # stops as soon as no row is drafting any more
        c = jax.lax.while_loop(lambda c: (c[0] < gamma) & jnp.any(c[2][3]), body, (jnp.int32(1), *c[1:]))
    _, cache, (drafts, logq, drafted, _, _) = c
    if spec.separate:
        return drafts, logq, drafted, s.cache, cache
    return drafts, logq, drafted, cache, None


def committed_lengths(lengths_B, count_B):
    """Rollback: the cache keeps `count` of the block's γ+1 slots (pending + accepted drafts)."""
    return lengths_B + count_B


def verify(model, cache, pending_B, drafts_BG, *, widths, sparse):
    """One target forward over [pending, d_1..d_γ] -> (logits_BTV, cache)."""
    g = drafts_BG.shape[1]
    block = jnp.concatenate([pending_B[:, None], drafts_BG], axis=1)
    pos = cache.lengths[:, None] + jnp.arange(g + 1, dtype=jnp.int32)
    return model(block, pos, cache=cache, widths=widths, sparse=sparse)


def bucket_sizes(gamma: int) -> list[int]:
    """Draft counts a verify block is compiled for when drafting stops early: 0, powers of two, γ."""
    return sorted({0, gamma} | {2**i for i in range(gamma.bit_length()) if 2**i < gamma})


def bucketed_verify(model, cache, pending_B, drafts_BG, logq_BGV, drafted_BG, key, *, judge, sampler, widths,
                    sparse):
    """verify + judge on the smallest compiled block (`bucket_sizes`) that holds every row's drafts,
    chosen by `lax.switch`: a round whose drafting stopped after m tokens (adaptive stop, BiLD's
    fallback) pays for a block of about m + 1 tokens, not γ + 1 (a (γ+1)-token verify costs several
    steps on a CPU). -> (n_B, t_B, cache)."""
    sizes = bucket_sizes(drafts_BG.shape[1])
    need = jnp.max(jnp.sum(drafted_BG, 1))
    pick = jnp.sum(jnp.asarray(sizes) < need)  # the first size >= need

    def branch(m):
        def run(cache):
            logits, cache = verify(model, cache, pending_B, drafts_BG[:, :m], widths=widths, sparse=sparse)
            n, t = judge(key, logits, logq_BGV[:, :m], drafts_BG[:, :m], drafted_BG[:, :m], sampler)
            return n, t, cache
        return run

    return jax.lax.switch(pick, [branch(m) for m in sizes], cache)


def lossless_judge(key, logits_BTV, logq_BGV, drafts_BG, drafted_BG, sampler):
    """Speculative sampling's test (`accept`) against the target's processed laws (float32)."""
    b, t, v = logits_BTV.shape
    logp = processed_logprobs(logits_BTV.reshape(b * t, v), sampler).reshape(b, t, v)
    return accept(key, logp, logq_BGV, drafts_BG, drafted_BG)


def spec_round(model, s: SpecState, *, spec: SpecConfig, sampler, eos_id, pad_id, widths, sparse,
               drafter=None, judge=lossless_judge, fallback: float | None = None,
               slack: int | None = None) -> SpecState:
    """One draft + verify round. `drafter`: the draft model (the same weights, FFNs cut to the draft
    widths by matformer.cut_ffn); default `model` itself. `judge` (key, logits_BTV, logq_BGV,
    drafts_BG, drafted_BG, sampler) -> (n_B kept drafts, t_B the token after them) and `fallback`
    (see `draft`) make the round BiLD's (decode/bild.py). `slack`: the room kept after
    max_new_tokens in tokens_BN (default γ + 1; rounds of several γ in one loop share the largest)."""
    gamma = spec.gamma
    k_draft, k_accept = jax.random.split(jax.random.fold_in(s.key, s.rounds))
    lengths = s.cache.lengths
    drafts, logq, drafted, cache, dcache = draft(drafter or model, s, k_draft, spec=spec, sampler=sampler,
                                                 sparse=sparse, fallback=fallback)
    vkw = dict(widths=widths, sparse=sparse if spec.verify_sparse is None else spec.verify_sparse)
    cache = cache.replace(lengths=lengths)
    if fallback is None and spec.adaptive_threshold is None:
        logits, cache = verify(model, cache, s.pending_B, drafts, **vkw)
        n, t = judge(k_accept, logits, logq, drafts, drafted, sampler)
    else:  # drafts of data-dependent length: verify the smallest block that holds them
        n, t, cache = bucketed_verify(model, cache, s.pending_B, drafts, logq, drafted, k_accept, judge=judge,
                                      sampler=sampler, **vkw)

    live = ~s.done_B
    max_new = s.tokens_BN.shape[1] - (slack or gamma + 1)
    window, count, hit_eos = emit_window(drafts, n, t, jnp.where(live, max_new - s.num_B, 0), eos_id, pad_id)
    tokens = jax.vmap(lambda row, w, at: jax.lax.dynamic_update_slice(row, w, (at,)))(s.tokens_BN, window, s.num_B)
    num = s.num_B + count
    new_lengths = jnp.where(live, committed_lengths(lengths, count), lengths)
    pending, before = emitted_tail(window, count, s.pending_B)
    n_drafted = jnp.sum(drafted, 1)
    stats = s.stats | {"rounds": s.stats["rounds"] + live,  # other keys: the caller's (goodput, BiLD)
                       "drafted": s.stats["drafted"] + jnp.where(live, n_drafted, 0),
                       "accepted": s.stats["accepted"] + jnp.where(live, n, 0)}
    if "short_rounds" in s.stats:  # BiLD's fallbacks (drafting stopped early), rollbacks (a draft rejected)
        stats |= {"short_rounds": s.stats["short_rounds"] + (live & (n_drafted < gamma)),
                  "rejecting_rounds": s.stats["rejecting_rounds"] + (live & (n < n_drafted)),
                  "emitted_drafts": s.stats["emitted_drafts"] + jnp.minimum(n, count)}  # count: 0 unless live
    return SpecState(rounds=s.rounds + 1, tokens_BN=tokens, num_B=num, pending_B=jnp.where(live, pending, s.pending_B),
                     last_B=jnp.where(live, before, s.last_B), done_B=s.done_B | hit_eos | (num >= max_new),
                     cache=cache.replace(lengths=new_lengths),
                     draft_cache=None if dcache is None else dcache.replace(lengths=new_lengths),
                     key=s.key, stats=stats)


def plain_round(model, s: SpecState, *, sampler, eos_id, pad_id, widths, sparse, slack: int) -> SpecState:
    """Goodput's γ = 0 round: one target step that samples straight from the target's logits (no
    draft, no acceptance test; what decode/generate.py's loop does), in the speculative state."""
    live, lengths, rows = ~s.done_B, s.cache.lengths, jnp.arange(s.num_B.shape[0])
    logits, cache = model(s.pending_B[:, None], lengths[:, None], cache=s.cache, widths=widths, sparse=sparse)
    t, _ = sample(jax.random.fold_in(s.key, s.rounds), logits[:, 0], sampler)
    t = jnp.where(live, t, pad_id)  # a finished row's slot at num_B holds pad already
    tokens = s.tokens_BN.at[rows, s.num_B].set(t)
    num = s.num_B + live
    return s.replace(rounds=s.rounds + 1, tokens_BN=tokens, num_B=num, pending_B=jnp.where(live, t, s.pending_B),
                     last_B=jnp.where(live, s.pending_B, s.last_B),
                     done_B=s.done_B | (t == eos_id) | (num >= s.tokens_BN.shape[1] - slack),
                     cache=cache.replace(lengths=jnp.where(live, lengths + 1, lengths)),
                     stats=s.stats | {"rounds": s.stats["rounds"] + live})


def spec_prefill(model, prompts_BT, prompt_lengths_B, key, *, max_new_tokens, spec: SpecConfig, sampler, eos_id,
                 pad_id, widths, drafter=None) -> SpecState:
    """Prefill the target (and the separate draft), emit the first token from the target."""
    b = prompts_BT.shape[0]
    lengths = prompt_lengths_B.astype(jnp.int32)
    fill = functools.partial(prefill_cache, prompts_BT=prompts_BT, prompt_lengths_B=lengths,
                             max_new_tokens=max_new_tokens, slack=spec.gamma + 2)
    logits_BV, cache = fill(model, widths=widths)
    dcache = fill(drafter or model, widths=spec.draft_widths)[1] if spec.separate else None
    k_first, key = jax.random.split(key)
    first, _ = sample(k_first, logits_BV, sampler)
    tokens = jnp.full((b, max_new_tokens + spec.gamma + 1), pad_id, jnp.int32).at[:, 0].set(first)
    last = jnp.take_along_axis(prompts_BT, (lengths - 1)[:, None], 1)[:, 0].astype(jnp.int32)
    zeros = jnp.zeros((b,), jnp.int32)
    return SpecState(rounds=jnp.int32(0), tokens_BN=tokens, num_B=jnp.ones((b,), jnp.int32), pending_B=first,
                     last_B=last, done_B=(first == eos_id) | (max_new_tokens <= 1),
                     cache=cache, draft_cache=dcache, key=key,
                     stats={"rounds": zeros, "drafted": zeros, "accepted": zeros})


def summarize(s: SpecState) -> dict:
    """Per-row rounds / drafted / accepted [B]; batch acceptance_rate and tokens_per_round."""
    st = s.stats
    acc = jnp.sum(st["accepted"]) / jnp.maximum(jnp.sum(st["drafted"]), 1)
    per_round = jnp.sum(s.num_B - 1) / jnp.maximum(jnp.sum(st["rounds"]), 1)
    return st | {"acceptance_rate": acc, "tokens_per_round": per_round}


def models(graphdef, params, spec: SpecConfig, widths):
    """-> (target, draft model with its FFNs cut to the draft widths, resolved spec, checked widths)."""
    model = nnx.merge(graphdef, params)
    spec, widths = spec.resolve(model.cfg), model.cfg.check_widths(widths)
    return model, nnx.merge(graphdef, cut_ffn(params, model.cfg, spec.draft_widths)), spec, widths


def branches(model, drafter, spec: SpecConfig, *, sparse, **kw) -> list:
    """The round bodies for γ = 0 (a plain target step), 1, …, spec.gamma, sharing one state layout
    (slack γ_max + 1): the goodput decoder's per-γ loops (gp.goodput_round)."""
    common = dict(sparse=sparse, slack=spec.gamma + 1, **kw)
    return [functools.partial(plain_round, model, **common)] + [
        functools.partial(spec_round, model, spec=dataclasses.replace(spec, gamma=g, goodput=None), drafter=drafter,
                          **common) for g in range(1, spec.gamma + 1)]


def with_goodput_stats(s: SpecState, cfg: GoodputConfig, max_rounds: int, choose) -> SpecState:
    """The goodput decoder's extra stats: the moving acceptance counts, the γ of every round, and
    the first round's γ (`choose`: gp.chooser)."""
    return gp.with_choice(s.replace(stats=s.stats | gp.init_counts(cfg, s.num_B.shape[0])
                                    | {"gamma_chosen": jnp.full((max_rounds,), -1, jnp.int32)}), choose)


STATIC = ("graphdef", "max_new_tokens", "sampler", "eos_id", "pad_id", "spec", "widths", "sparse")


def generate(graphdef, params, prompts_BT, prompt_lengths_B, key, *, max_new_tokens: int, sampler: SamplerConfig,
             eos_id: int, pad_id: int, spec: SpecConfig = SpecConfig(), widths=None, sparse: bool = True):
    """Speculative sampling from the target (`widths`, None = full) with a MatFormer draft (`spec`).

    `sparse` runs Spark layers on the sparse-gather path (`spec.verify_sparse` may override it for
    the (γ+1)-token verify alone, whose gathers grow with the block; bench/speculative.py).

    Returns (new_tokens [B, max_new_tokens] padded with pad_id after EOS, num_new [B], stats), like
    decode.generate.generate; stats from `summarize`, with `spec.goodput` also gamma_chosen [rounds
    cap] (−1 past the last round) and each row's final acceptance_estimate. One jitted while_loop;
    with `spec.goodput` that of `goodput_generate`, whose cost vector is an argument, so the costs
    measured by goodput_costs.measure_costs and the decode that uses them share one compile."""
    kw = dict(max_new_tokens=max_new_tokens, sampler=sampler, eos_id=eos_id, pad_id=pad_id, widths=widths,
              sparse=sparse)
    if spec.goodput is None:
        return fixed_generate(graphdef, params, prompts_BT, prompt_lengths_B, key, spec=spec, **kw)
    return goodput_generate(graphdef, params, prompts_BT, prompt_lengths_B, key,
                            jnp.asarray(spec.goodput.costs, jnp.float32), jnp.int32(max_new_tokens),
                            jnp.float32(spec.goodput.switch_cost),
                            spec=goodput_static(spec), **kw)


def goodput_static(spec: SpecConfig) -> SpecConfig:
    """The goodput decoder's static settings: its costs and switch cost, arguments of goodput_generate,
    replaced by ones and zero."""
    return dataclasses.replace(spec, goodput=dataclasses.replace(spec.goodput, costs=(1.0,) * (spec.gamma + 1),
                                                                 switch_cost=0.0))


def prefilled(graphdef, params, prompts_BT, prompt_lengths_B, key, *, max_new_tokens, sampler, eos_id, pad_id, spec,
              widths):
    """(target, draft, resolved spec, the round keywords, the state after the prefill) of a decode."""
    model, drafter, spec, widths = models(graphdef, params, spec, widths)
    kw = dict(sampler=sampler, eos_id=eos_id, pad_id=pad_id, widths=widths)
    s = spec_prefill(model, prompts_BT, prompt_lengths_B, key, max_new_tokens=max_new_tokens, drafter=drafter,
                     spec=spec, **kw)
    return model, drafter, spec, kw, s


def running(max_rounds):
    """The decode loop's condition: rounds left and a row still decoding."""
    return lambda s: (s.rounds < max_rounds) & ~jnp.all(s.done_B)


@functools.partial(jax.jit, static_argnames=STATIC)
def fixed_generate(graphdef, params, prompts_BT, prompt_lengths_B, key, *, max_new_tokens: int,
                   sampler: SamplerConfig, eos_id: int, pad_id: int, spec: SpecConfig, widths, sparse: bool):
    """`generate` with γ drafts per round (at most γ with spec.adaptive_threshold)."""
    model, drafter, spec, kw, s = prefilled(graphdef, params, prompts_BT, prompt_lengths_B, key, spec=spec,
                                            max_new_tokens=max_new_tokens, sampler=sampler, eos_id=eos_id,
                                            pad_id=pad_id, widths=widths)
    step = functools.partial(spec_round, model, spec=spec, sparse=sparse, drafter=drafter, **kw)
    s = jax.lax.while_loop(running(max_new_tokens), step, s)
    return s.tokens_BN[:, :max_new_tokens], s.num_B, summarize(s)


@functools.partial(jax.jit, static_argnames=STATIC)
def goodput_generate(graphdef, params, prompts_BT, prompt_lengths_B, key, costs_G, max_rounds, switch_s, *,
                     max_new_tokens: int, sampler: SamplerConfig, eos_id: int, pad_id: int, spec: SpecConfig, widths,
                     sparse: bool):
    """`generate` with γ chosen per round by goodput from `costs_G` [γ_max + 1] and `switch_s` (float32;
    spec.goodput.costs and .switch_cost are not read), stopping after `max_rounds` rounds (int32; at
    most max_new_tokens, which sizes the cache and buffers): measure_costs forces γ with a cost vector
    (and a negative switch cost) and times a number of rounds.
    stats also hold `loop_rounds`, the rounds run."""
    model, drafter, spec, kw, s = prefilled(graphdef, params, prompts_BT, prompt_lengths_B, key, spec=spec,
                                            max_new_tokens=max_new_tokens, sampler=sampler, eos_id=eos_id,
                                            pad_id=pad_id, widths=widths)
    cond = running(jnp.minimum(max_rounds, max_new_tokens))
    choose = gp.chooser(spec.goodput, max_new_tokens, costs_G, switch_s)
    step = functools.partial(gp.goodput_round, branches(model, drafter, spec, sparse=sparse, **kw),
                             cfg=spec.goodput, more=cond, choose=choose)
    s = jax.lax.while_loop(cond, step, with_goodput_stats(s, spec.goodput, max_new_tokens, choose))
    st = {k: v for k, v in summarize(s).items() if not k.startswith("goodput_")}
    return (s.tokens_BN[:, :max_new_tokens], s.num_B,
            st | {"acceptance_estimate": gp.estimate(s.stats), "loop_rounds": s.rounds})
