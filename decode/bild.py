"""BiLD, the Big Little Decoder (Kim et al. 2023), with the MatFormer self-draft as the little
model: one jitted `lax.while_loop`, the round structure of decode/speculative.py.

    tokens_BN, num_new_B, stats = generate(graphdef, params, prompts_BT, prompt_lengths_B, key,
                                           max_new_tokens=N, sampler=..., eos_id=..., pad_id=...,
                                           bild=BiLDConfig(fallback=0.6, rollback=5.0, max_little_steps=10))

The big model (full width, or `widths`) emits the first token; then each round, per row:

1. little steps (the model at `little_widths`, default F/8): token i ~ the little model's law (its
   argmax when greedy), kept while its confidence — the little model's top probability (at
   temperature 1 when greedy) — is ≥ α_FB; the first unconfident token is discarded and control
   falls back to the big model (a *fallback*); after `max_little_steps` kept tokens it is handed
   over anyway;
2. one big forward over [pending, little tokens]: the little token at block position i is *rolled
   back*, with everything after it, when −log p_big(token) > α_RB (p_big: the big model's law, at
   temperature 1 when greedy; the sampler's processed law otherwise, so a token outside its
   top-k/top-p support is always rolled back);
3. the big model emits its own token after the kept little tokens (argmax, or a draw from its
   processed law), as in the official code (kssteven418/BigLittleDecoder: T5BiLDModel).

Not distribution-preserving: a lossy fast mode, kept out of the losslessness tests. α_FB = 1 makes
every round a big step (plain decoding of the big model); α_FB = 0 with α_RB = inf never consults
the big model after its first token until `max_little_steps` little tokens are out.

Caches (`draft_cache`, as in decode/speculative.py): "shared" — one cache; little steps read the
big model's committed K/V and write scratch slots that the big forward overwrites; "separate" —
the little model keeps its own cache, so it decodes exactly as the little model alone (the mode
tests/test_bild.py checks against a NumPy reference of the two policies).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from decode.sampling import SamplerConfig, categorical, processed_logprobs
from decode.spec_config import DRAFT_CACHES, SpecConfig
from decode.speculative import models, running, spec_prefill, spec_round, summarize
from spark.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class BiLDConfig:
    """little_widths: the little model's per-layer FFN widths (None: the smallest MatFormer
    granularity); fallback α_FB in [0, 1]; rollback α_RB > 0 (inf: never); max_little_steps ≥ 1."""

    little_widths: tuple[int, ...] | None = None
    fallback: float = 0.6
    rollback: float = 5.0
    max_little_steps: int = 10
    draft_cache: str = "shared"

    def __post_init__(self):
        if not 0.0 <= self.fallback <= 1.0:
            raise ConfigError(f"fallback (α_FB) must be in [0, 1], got {self.fallback}")
        if not self.rollback > 0.0:
            raise ConfigError(f"rollback (α_RB) must be > 0 (inf: never roll back), got {self.rollback}")
        if self.max_little_steps < 1:
            raise ConfigError(f"max_little_steps must be >= 1, got {self.max_little_steps}")
        if self.draft_cache not in DRAFT_CACHES:
            raise ConfigError(f"draft_cache must be one of {DRAFT_CACHES}, got {self.draft_cache!r}")
        if self.little_widths is not None:
            object.__setattr__(self, "little_widths", tuple(int(w) for w in self.little_widths))

    def spec(self) -> SpecConfig:
        """The speculative round this runs on: γ = max_little_steps, the little model as the draft."""
        return SpecConfig(draft_widths=self.little_widths, gamma=self.max_little_steps, draft_cache=self.draft_cache)


def big_logprobs(logits_BTV, sampler: SamplerConfig):
    """The big model's law that the rollback test reads and its token is drawn from: the processed
    law when sampling, the temperature-1 softmax when greedy (a one-hot law would roll back every
    token but the argmax)."""
    b, t, v = logits_BTV.shape
    if sampler.temperature == 0.0:
        return jax.nn.log_softmax(logits_BTV.astype(jnp.float32), -1)
    return processed_logprobs(logits_BTV.reshape(b * t, v), sampler).reshape(b, t, v)


def rollback_judge(rollback: float):
    """The big step as a speculative round's judge: -> judge(key, logits_BTV, logq, drafts_BG,
    drafted_BG, sampler) -> (n_B little tokens kept, t_B the big model's token after them)."""

    def judge(key, logits_BTV, logq_BGV, drafts_BG, drafted_BG, sampler):
        del logq_BGV  # BiLD never looks at the little model's law after drafting
        logp = big_logprobs(logits_BTV, sampler)
        nll_BG = -jnp.take_along_axis(logp[:, :-1], drafts_BG[..., None], -1)[..., 0]
        kept_BG = drafted_BG & (nll_BG <= rollback)
        n_B = jnp.sum(jnp.cumprod(kept_BG, axis=1), axis=1).astype(jnp.int32)
        logp_n = jnp.take_along_axis(logp, n_B[:, None, None], 1)[:, 0]
        if sampler.temperature == 0.0:
            return n_B, jnp.argmax(logp_n, -1).astype(jnp.int32)
        return n_B, categorical(key, logp_n)

    return judge


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampler", "eos_id", "pad_id", "bild",
                                             "widths", "sparse"))
def generate(graphdef, params, prompts_BT, prompt_lengths_B, key, thresholds=None, *, max_new_tokens: int,
             sampler: SamplerConfig, eos_id: int, pad_id: int, bild: BiLDConfig = BiLDConfig(), widths=None,
             sparse: bool = True):
    """BiLD decoding: the big model at `widths` (None: full), the little at `bild.little_widths`.
    `thresholds` (float32 [2]: α_FB, α_RB), when given, replace the config's as traced values: one
    compile serves a whole grid of them (bench/policies.py).

    Returns (new_tokens [B, max_new_tokens] padded with pad_id after EOS, num_new [B], stats):
    per row `rounds` (big forwards after the prefill), `little_tokens` (little tokens emitted),
    `fallbacks` (rounds the little model ended unconfident), `rollbacks` (rounds the big model
    rejected a little token), `drafted` (little tokens proposed); batch `little_share` (kept
    little tokens / tokens emitted after the first) and `tokens_per_round`."""
    model, little, spec, widths = models(graphdef, params, bild.spec(), widths)
    kw = dict(spec=spec, sampler=sampler, eos_id=eos_id, pad_id=pad_id, widths=widths)
    s = spec_prefill(model, prompts_BT, prompt_lengths_B, key, max_new_tokens=max_new_tokens, drafter=little, **kw)
    zeros = jnp.zeros_like(s.num_B)
    s = s.replace(stats=s.stats | {"short_rounds": zeros, "rejecting_rounds": zeros, "emitted_drafts": zeros})
    fallback, rollback = (bild.fallback, bild.rollback) if thresholds is None else (thresholds[0], thresholds[1])
    step = functools.partial(spec_round, model, sparse=sparse, drafter=little, judge=rollback_judge(rollback),
                             fallback=fallback, **kw)
    cond = running(max_new_tokens)
    s = jax.lax.while_loop(cond, step, s)
    st = summarize(s)
    little_share = jnp.sum(st["emitted_drafts"]) / jnp.maximum(jnp.sum(s.num_B - 1), 1)
    return s.tokens_BN[:, :max_new_tokens], s.num_B, {
        "rounds": st["rounds"], "little_tokens": st["emitted_drafts"], "drafted": st["drafted"],
        "fallbacks": st["short_rounds"], "rollbacks": st["rejecting_rounds"], "little_share": little_share,
        "tokens_per_round": st["tokens_per_round"]}
