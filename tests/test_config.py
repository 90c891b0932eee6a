"""Every validation error of spark.config is raised with a message naming the field."""

import dataclasses

import pytest

from spark.config import MatFormerConfig, ModelConfig, SparkConfig
from spark.errors import ConfigError

BAD_MODEL = [
    (dict(num_heads=6, num_kv_heads=4), "must divide num_heads"),
    (dict(d_model=0), "d_model must be a positive int"),
    (dict(ffn_kind="moe"), "ffn_kind must be"),
    (dict(attn_kind="linear"), "attn_kind must be"),
    (dict(layer_pattern=("local", "sliding")), "layer_pattern"),
    (dict(attn_logit_softcap=-1.0), "attn_logit_softcap must be positive"),
    (dict(dtype="float16"), "dtype must be"),
    (dict(ffn_kind="spark", spark=SparkConfig(ffn_rank=64)), r"ffn_rank must be in \(0, d_model=64\)"),
    (dict(attn_kind="spark", spark=SparkConfig(attn_rank=16)), r"attn_rank must be in \(0, head_dim=16\)"),
    (dict(attn_kind="spark", spark=SparkConfig(attn_rank=5)), "must be even for split RoPE"),
    (dict(gate_sparsity=(0.95,)), "one value per layer"),
    (dict(gate_sparsity=(1.0, 0, 0, 0)), r"gate_sparsity values must be in \[0, 1\)"),
    (dict(ffn_kind="spark", gate_sparsity=(0.9, 0, 0, 0)), "GeGLU FFN only"),
    (dict(ffn_dim=100), "not divisible by MatFormer divisor 8"),
    (dict(layer_ffn_dims=(64, 64)), "layer_ffn_dims needs 4"),
]


@pytest.mark.parametrize("kw,msg", BAD_MODEL)
def test_model_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        ModelConfig(**kw)


@pytest.mark.parametrize("kw,msg", [
    (dict(ffn_k_frac=0.0), r"ffn_k_frac must be in \(0, 1\)"),
    (dict(ffn_k_frac=1.0), r"ffn_k_frac must be in \(0, 1\)"),
    (dict(attn_k=0), "attn_k must be >= 1"),
    (dict(decode_capacity_sigmas=-1.0), "decode_capacity_sigmas must be >= 0"),
    (dict(attn_rope="interleaved"), "attn_rope must be"),
])
def test_spark_config_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        SparkConfig(**kw)


@pytest.mark.parametrize("divs,msg", [((8, 4),  "must include 1"), ((2, 2, 1), "duplicates"),
                                      ((0, 1), "positive ints")])
def test_matformer_config_errors(divs, msg):
    with pytest.raises(ConfigError, match=msg):
        MatFormerConfig(divs)


def test_widths_validation_and_derived_values():
    cfg = ModelConfig(ffn_kind="spark")
    assert cfg.ffn_width(0) == 384 and cfg.ffn_rank == 32
    assert cfg.granularity_widths(8) == (48,) * 4
    assert cfg.check_widths(None) == (384,) * 4
    assert cfg.check_widths((48, 96, 192, 384)) == (48, 96, 192, 384)
    with pytest.raises(ConfigError, match="width 50 of layer 0 is not a MatFormer granularity"):
        cfg.check_widths((50, 96, 192, 384))
    with pytest.raises(ConfigError, match="one value per layer"):
        cfg.check_widths((48,))
    with pytest.raises(ConfigError, match="granularity 1/3"):
        cfg.granularity_widths(3)
    # replace() validates again; configs are hashable (static jit arguments, NNX graphdefs)
    with pytest.raises(ConfigError):
        dataclasses.replace(cfg, num_kv_heads=3)
    assert hash(cfg) == hash(ModelConfig(ffn_kind="spark"))


def test_config_saved_with_the_old_capacity_factor_loads_with_the_new_default():
    """Checkpoints written before decode_capacity_sigmas saved spark.decode_capacity (a factor of k)."""
    from spark.config import from_dict

    saved = dataclasses.asdict(ModelConfig(ffn_kind="spark", spark=SparkConfig(attn_k=32)))
    saved["spark"].pop("decode_capacity_sigmas")
    saved["spark"]["decode_capacity"] = 1.25
    cfg = from_dict(ModelConfig, saved)
    assert cfg.spark.decode_capacity_sigmas == SparkConfig().decode_capacity_sigmas and cfg.spark.attn_k == 32
