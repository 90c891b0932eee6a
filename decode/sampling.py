"""Logits -> processed distribution -> token. Temperature, top-k and top-p are static settings.

`processed_logprobs` returns the exact distribution a token is drawn from (float32), which
speculative decoding needs for its accept/reject test.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    def __post_init__(self):
        from spark.errors import ConfigError

        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def processed_logprobs(logits_BV, cfg: SamplerConfig):
    """Log-probabilities after temperature, top-k and top-p (−inf outside the support)."""
    x = logits_BV.astype(jnp.float32)
    if cfg.temperature == 0.0:
        return jnp.where(jax.nn.one_hot(jnp.argmax(x, -1), x.shape[-1], dtype=bool), 0.0, -jnp.inf)
    x = x / cfg.temperature
    if cfg.top_k > 0 and cfg.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, cfg.top_k)[0][..., -1:]
        x = jnp.where(x >= kth, x, -jnp.inf)
    if cfg.top_p < 1.0:
        order = jnp.argsort(-x, axis=-1)
        sorted_p = jnp.take_along_axis(jax.nn.softmax(x, -1), order, -1)
        before = jnp.cumsum(sorted_p, -1) - sorted_p  # mass strictly before each token
        keep_sorted = before < cfg.top_p  # the top token is always kept
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(keep_sorted)
        x = jnp.where(keep, x, -jnp.inf)
    return jax.nn.log_softmax(x, -1)


def sample(key, logits_BV, cfg: SamplerConfig):
    """(tokens_B, logprobs_BV): a draw from the processed distribution, and that distribution."""
    logp = processed_logprobs(logits_BV, cfg)
    if cfg.temperature == 0.0:
        return jnp.argmax(logp, -1).astype(jnp.int32), logp
    return jax.random.categorical(key, logp, -1).astype(jnp.int32), logp
