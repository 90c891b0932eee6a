"""Model configuration: frozen dataclasses, validated on construction.

Every value a user can get wrong raises one `ConfigError` whose message names the field. The
dataclasses are frozen (hashable), so a config can live in an NNX graphdef or be a static jit
argument; change one with `dataclasses.replace`, which validates again.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from spark.errors import ConfigError

FfnKind = Literal["geglu", "spark"]
AttnKind = Literal["dense", "spark"]
LayerKind = Literal["local", "global"]


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _check_positive_ints(obj, section: str, names) -> None:
    for name in names:
        v = getattr(obj, name)
        _check(isinstance(v, int) and v >= 1, f"{section}.{name} must be a positive int, got {v!r}")


@dataclasses.dataclass(frozen=True)
class SparkConfig:
    """Spark Transformer settings (arXiv 2506.06644). Used when ffn_kind/attn_kind == 'spark'.

    ffn_k_frac: fraction of FFN neurons kept by statistical top-k (of the width in use).
    ffn_rank: r, the input coordinates x[:r] the FFN predictor reads (None: d_model // 2).
    attn_k: keys kept per query (all visible keys when at most this many are visible).
    attn_rank: r, the head dims q[:r]·k[:r] used as the attention predictor (None: head_dim // 2).
    attn_rope: 'split' rotates q[:r] and q[r:] separately (each score is then a function of the
      relative position alone); 'full' rotates the whole head first and then splits it.
    stop_grad_threshold: stop the gradient through the threshold θ (the paper is silent).
    decode_capacity_sigmas: sparse-gather decoding reads at most ceil(k + c·√k) neurons or keys per
      token (c = this value; a static shape); a token that selects more keeps the top ones by
      predictor score and the excess is counted as overflow in the decode stats. Default 3: no
      overflow measured at any MatFormer granularity of the trained demo model or at Gemma-2-2B
      shapes (random weights), where c = 2 already stays <= 0.1% of selections (worst 0.065%;
      `python bench/decode_capacity.py`, README). Replaces `decode_capacity` (a factor of k):
      configs saved with it load with this default.
    """

    ffn_k_frac: float = 0.08
    ffn_rank: int | None = None
    attn_k: int = 256
    attn_rank: int | None = None
    attn_rope: Literal["split", "full"] = "split"
    stop_grad_threshold: bool = False
    decode_capacity_sigmas: float = 3.0

    def __post_init__(self):
        _check(self.decode_capacity_sigmas >= 0.0,
               f"spark.decode_capacity_sigmas must be >= 0, got {self.decode_capacity_sigmas}")
        _check(0.0 < self.ffn_k_frac < 1.0, f"spark.ffn_k_frac must be in (0, 1), got {self.ffn_k_frac}")
        _check(self.attn_k >= 1, f"spark.attn_k must be >= 1, got {self.attn_k}")
        _check(self.attn_rope in ("split", "full"),
               f"spark.attn_rope must be 'split' or 'full', got {self.attn_rope!r}")


@dataclasses.dataclass(frozen=True)
class MatFormerConfig:
    """Nested FFN granularities as divisors of each layer's FFN width: (8, 4, 2, 1) gives
    widths F/8, F/4, F/2, F. `(1,)` turns nesting off."""

    divisors: tuple[int, ...] = (8, 4, 2, 1)

    def __post_init__(self):
        d = self.divisors
        _check(len(d) >= 1 and all(isinstance(x, int) and x >= 1 for x in d),
               f"matformer.divisors must be positive ints, got {d}")
        _check(1 in d, f"matformer.divisors must include 1 (the full width), got {d}")
        _check(len(set(d)) == len(d), f"matformer.divisors has duplicates: {d}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Gemma-2-style decoder. Defaults are a tiny model; see configs/ for real sizes.

    ffn_dim is the GeGLU width. A Spark FFN has 2 matrices instead of 3, so its width defaults to
    spark_ffn_dim = 1.5 * ffn_dim, which gives the same parameter count.
    layer_ffn_dims overrides the width layer by layer (used by extracted MatFormer submodels).
    gate_sparsity: Gemma-3n-style statistical top-k on the GeGLU gate, one sparsity per layer
    (0.95 keeps 5% of the gate; 0 is dense). None: off.
    max_seq_len: the context: the longest prompt + generation the decoders accept.
    """

    vocab_size: int = 259
    d_model: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    ffn_dim: int = 256
    spark_ffn_dim: int | None = None
    layer_ffn_dims: tuple[int, ...] | None = None
    layer_pattern: tuple[LayerKind, ...] = ("local", "global")
    sliding_window: int = 4096
    max_seq_len: int = 8192
    attn_logit_softcap: float | None = 50.0
    final_logit_softcap: float | None = 30.0
    query_pre_attn_scalar: float | None = None  # None: head_dim (scale 1/sqrt(head_dim))
    rope_theta: float = 10_000.0
    rms_eps: float = 1e-6
    ffn_kind: FfnKind = "geglu"
    attn_kind: AttnKind = "dense"
    gate_sparsity: tuple[float, ...] | None = None
    spark: SparkConfig = SparkConfig()
    matformer: MatFormerConfig = MatFormerConfig()
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    attn_block: int = 0  # > 0: attention without a cache (training) as blocked flash attention, this many keys a block

    def __post_init__(self):
        _check(self.attn_block >= 0, f"model.attn_block must be 0 (materialised scores) or positive, "
                                     f"got {self.attn_block}")
        _check_positive_ints(self, "model", ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                                             "head_dim", "ffn_dim", "sliding_window", "max_seq_len"))
        _check(self.num_heads % self.num_kv_heads == 0,
               f"model.num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        _check(self.ffn_kind in ("geglu", "spark"),
               f"model.ffn_kind must be 'geglu' or 'spark', got {self.ffn_kind!r}")
        _check(self.attn_kind in ("dense", "spark"),
               f"model.attn_kind must be 'dense' or 'spark', got {self.attn_kind!r}")
        _check(len(self.layer_pattern) >= 1 and all(k in ("local", "global") for k in self.layer_pattern),
               f"model.layer_pattern must be a non-empty tuple of 'local'/'global', got {self.layer_pattern}")
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"model.{name} must be positive or None, got {v}")
        for name in ("dtype", "param_dtype"):
            _check(getattr(self, name) in ("float32", "bfloat16"),
                   f"model.{name} must be 'float32' or 'bfloat16', got {getattr(self, name)!r}")
        if self.spark_ffn_dim is not None:
            _check(self.spark_ffn_dim >= 1, f"model.spark_ffn_dim must be >= 1, got {self.spark_ffn_dim}")
        if self.layer_ffn_dims is not None:
            _check(len(self.layer_ffn_dims) == self.num_layers and all(w >= 1 for w in self.layer_ffn_dims),
                   f"model.layer_ffn_dims needs {self.num_layers} positive widths, got {self.layer_ffn_dims}")
        if self.gate_sparsity is not None:
            _check(self.ffn_kind == "geglu", "model.gate_sparsity applies to the GeGLU FFN only")
            _check(len(self.gate_sparsity) == self.num_layers,
                   f"model.gate_sparsity needs one value per layer ({self.num_layers}), "
                   f"got {len(self.gate_sparsity)}")
            _check(all(0.0 <= s < 1.0 for s in self.gate_sparsity),
                   f"model.gate_sparsity values must be in [0, 1), got {self.gate_sparsity}")
        if self.ffn_kind == "spark":
            r = self.ffn_rank
            _check(0 < r < self.d_model,
                   f"spark.ffn_rank must be in (0, d_model={self.d_model}), got {r}")
        if self.attn_kind == "spark":
            r = self.attn_rank
            _check(0 < r < self.head_dim,
                   f"spark.attn_rank must be in (0, head_dim={self.head_dim}), got {r}")
            if self.spark.attn_rope == "split":
                _check(r % 2 == 0 and (self.head_dim - r) % 2 == 0,
                       f"spark.attn_rank ({r}) and head_dim - attn_rank must be even for split RoPE")
        else:
            _check(self.head_dim % 2 == 0, f"model.head_dim must be even for RoPE, got {self.head_dim}")
        for i in range(self.num_layers):
            f = self.ffn_width(i)
            for d in self.matformer.divisors:
                _check(f % d == 0, f"layer {i} FFN width {f} is not divisible by MatFormer divisor {d}")

    # ---- derived values -------------------------------------------------------------------------
    @property
    def ffn_rank(self) -> int:
        r = self.spark.ffn_rank
        return self.d_model // 2 if r is None else r

    @property
    def attn_rank(self) -> int:
        r = self.spark.attn_rank
        return self.head_dim // 2 if r is None else r

    def ffn_width(self, layer: int) -> int:
        """The full FFN width F of a layer."""
        if self.layer_ffn_dims is not None:
            return self.layer_ffn_dims[layer]
        if self.ffn_kind == "spark":
            return self.spark_ffn_dim if self.spark_ffn_dim is not None else (3 * self.ffn_dim) // 2
        return self.ffn_dim

    def layer_kind(self, layer: int) -> LayerKind:
        return self.layer_pattern[layer % len(self.layer_pattern)]

    def allowed_widths(self, layer: int) -> tuple[int, ...]:
        f = self.ffn_width(layer)
        return tuple(sorted(f // d for d in self.matformer.divisors))

    def granularity_widths(self, divisor: int) -> tuple[int, ...]:
        """Per-layer widths of one MatFormer granularity (divisor 8 -> every layer at F/8)."""
        _check(divisor in self.matformer.divisors,
               f"granularity 1/{divisor} is not one of matformer.divisors {self.matformer.divisors}")
        return tuple(self.ffn_width(i) // divisor for i in range(self.num_layers))

    def check_widths(self, widths: tuple[int, ...] | None) -> tuple[int, ...]:
        """Validate a Mix'n'Match width tuple (None = full width) and return it in full."""
        if widths is None:
            return tuple(self.ffn_width(i) for i in range(self.num_layers))
        widths = tuple(int(w) for w in widths)
        _check(len(widths) == self.num_layers,
               f"widths needs one value per layer ({self.num_layers}), got {len(widths)}")
        for i, w in enumerate(widths):
            allowed = self.allowed_widths(i)
            _check(w in allowed, f"width {w} of layer {i} is not a MatFormer granularity; allowed: {allowed}")
        return widths


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """name: 'python_stdlib' (the embedded corpus: the running Python's standard library), a
    reasoning task of spark/tasks ('countdown', 'pathfind', 'modchain': generated on the fly, loss
    on the solution only; use tokenizer='task'), or any tfds dataset prepared in array_record
    format (e.g. 'lm1b'); text_key names its text feature. name None: a config that needs the user
    to name a dataset (the 2B pod configs); building its pipeline says which flag to set."""

    name: str | None = "python_stdlib"
    data_dir: str | None = None  # None: ~/tensorflow_datasets
    train_split: str = "train"
    eval_split: str = "validation"
    text_key: str = "text"
    tokenizer: Literal["byte", "sentencepiece", "task"] = "byte"  # "task": the reasoning tasks' words
    spm_vocab_size: int = 2048  # when training a SentencePiece model
    spm_model: str | None = None  # local or gs://; None: WORKDIR/tokenizer.model (see spm_train)
    spm_train: bool = True  # no spm_model and no WORKDIR/tokenizer.model: train one on the train split
    spm_train_chars: int = 5_000_000  # characters of the train split the SentencePiece model sees

    def __post_init__(self):
        _check(self.tokenizer in ("byte", "sentencepiece", "task"),
               f"data.tokenizer must be 'byte', 'sentencepiece' or 'task', got {self.tokenizer!r}")
        _check(self.spm_vocab_size >= 300, f"data.spm_vocab_size must be >= 300, got {self.spm_vocab_size}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    matformer_mode: Literal["sum", "sample", "off"] = "sum"
    loss_chunk: int = 0  # > 0: cross-entropy over this many tokens at a time, never [B, T, V] logits (T % it == 0)
    remat: Literal["none", "dots_saveable", "full"] = "none"  # what the backward pass recomputes per block
    scan_layers: bool = False  # layers as one lax.scan over local/global periods: compile time independent of depth
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    ckpt_every: int = 100
    keep_ckpts: int = 2

    def __post_init__(self):
        _check_positive_ints(self, "train", ("steps", "batch_size", "seq_len", "grad_accum", "log_every",
                                             "eval_every", "eval_batches", "ckpt_every", "keep_ckpts"))
        _check(self.batch_size % self.grad_accum == 0,
               f"train.grad_accum ({self.grad_accum}) must divide batch_size ({self.batch_size})")
        _check(self.lr > 0, f"train.lr must be positive, got {self.lr}")
        _check(0 <= self.warmup_steps, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.loss_chunk >= 0 and (self.loss_chunk == 0 or self.seq_len % self.loss_chunk == 0),
               f"train.loss_chunk ({self.loss_chunk}) must be 0 (off) or divide seq_len ({self.seq_len})")
        _check(self.remat in ("none", "dots_saveable", "full"),
               f"train.remat must be 'none', 'dots_saveable' or 'full', got {self.remat!r}")
        _check(self.matformer_mode in ("sum", "sample", "off"),
               f"train.matformer_mode must be 'sum', 'sample' or 'off', got {self.matformer_mode!r}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (data, fsdp, tensor). -1 on one axis takes all remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = (self.data, self.fsdp, self.tensor)
        _check(all(s == -1 or s >= 1 for s in sizes) and sizes.count(-1) <= 1,
               f"mesh sizes must be positive, with at most one -1; got {sizes}")


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()


def from_dict(cls, d: dict):
    """Rebuild a (nested) config dataclass from `dataclasses.asdict` output (e.g. saved JSON)."""
    import typing

    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v, tp = d[f.name], hints[f.name]
        if dataclasses.is_dataclass(tp):
            v = from_dict(tp, v)
        elif isinstance(v, list):
            v = tuple(v)
        kw[f.name] = v
    return cls(**kw)
