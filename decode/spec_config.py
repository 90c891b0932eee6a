"""The static settings of a speculative decode (`SpecConfig`, a jit static argument) and the state
its `lax.while_loop` carries (`SpecState`): shared by the speculative, goodput, BiLD and
multi-draft decoders (decode/speculative.py, bild.py, multidraft.py)."""

from __future__ import annotations

import dataclasses

import flax.struct
import jax

from decode.goodput import GoodputConfig
from spark.cache import KVCache
from spark.errors import ConfigError

DRAFT_CACHES = ("shared", "separate")


@flax.struct.dataclass
class SpecState:
    rounds: jax.Array  # int32 []: rounds run (the loop counter)
    tokens_BN: jax.Array  # int32 [B, N + γ + 1]: emitted tokens (γ + 1 slack for the window write)
    num_B: jax.Array  # int32 [B]: tokens emitted so far
    pending_B: jax.Array  # int32 [B]: last emitted token, its K/V not yet cached
    last_B: jax.Array  # int32 [B]: the token before it (the separate draft re-reads it)
    done_B: jax.Array  # bool [B]
    cache: KVCache  # the target's; cache.lengths = position of `pending`
    draft_cache: KVCache | None  # separate mode only
    key: jax.Array
    stats: dict  # per row [B]: rounds, drafted, accepted


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    """The static settings that make a decode speculative (a jit static argument, like SamplerConfig).

    draft_widths: the draft's per-layer FFN widths (None: the smallest MatFormer granularity);
    gamma: drafts per round (the most, with an adaptive threshold); adaptive_threshold h: stop
    drafting once 1 − Π top-prob > h (None: always γ); draft_cache: "shared" | "separate";
    verify_sparse: the Spark sparse-gather path for the (γ+1)-token verify (None: as `sparse`);
    goodput: choose γ ∈ 0..gamma per round from this cost model (decode/goodput.py)."""

    draft_widths: tuple[int, ...] | None = None
    gamma: int = 3
    adaptive_threshold: float | None = None
    draft_cache: str = "shared"
    verify_sparse: bool | None = None
    goodput: GoodputConfig | None = None

    def __post_init__(self):
        if self.gamma < 1:
            raise ConfigError(f"gamma must be >= 1, got {self.gamma}")
        if self.goodput is not None:
            if self.gamma != self.goodput.gamma_max:
                raise ConfigError(f"goodput: gamma ({self.gamma}) must be the cost model's γ_max "
                                  f"({self.goodput.gamma_max})")
            if self.adaptive_threshold is not None or self.draft_cache != "shared":
                raise ConfigError("goodput-chosen γ works with a fixed γ per round and the shared draft cache")
        if self.draft_cache not in DRAFT_CACHES:
            raise ConfigError(f"draft_cache must be one of {DRAFT_CACHES}, got {self.draft_cache!r}")
        h = self.adaptive_threshold
        if h is not None and not 0.0 <= h <= 1.0:
            raise ConfigError(f"adaptive_threshold must be in [0, 1], got {h}")
        if self.draft_widths is not None:
            object.__setattr__(self, "draft_widths", tuple(int(w) for w in self.draft_widths))

    @property
    def separate(self) -> bool:
        return self.draft_cache == "separate"

    def resolve(self, model_cfg) -> SpecConfig:
        """Draft widths checked against the model (None -> its smallest granularity)."""
        w = self.draft_widths or model_cfg.granularity_widths(max(model_cfg.matformer.divisors))
        return dataclasses.replace(self, draft_widths=model_cfg.check_widths(w))
