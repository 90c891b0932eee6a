"""Checkpoint format: parameters and optimizer state are separate items, so sampling reads the
parameters alone; a params-only checkpoint resumes training with a fresh optimizer state; a
checkpoint written before the split (one 'state' item) still loads and resumes."""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from spark import checkpoint, train_lib
from spark.cli import load_config_file, override
from spark.train import load_checkpoint, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_run(data_dir, steps, ckpt_every: int = 2):
    """configs/tiny.py at one granularity, logging every step (tests/test_preemption.py uses it too)."""
    cfg = load_config_file(os.path.join(ROOT, "configs", "tiny.py"))
    for k, v in [("data.data_dir", data_dir), ("train.matformer_mode", "off"), ("train.steps", str(steps)),
                 ("train.ckpt_every", str(ckpt_every)), ("train.log_every", "1"), ("train.eval_every", "100")]:
        cfg = override(cfg, k, v)
    return cfg


_cfg = tiny_run


def _batch(cfg):
    from spark.data.pipeline import make_dataset

    return next(iter(make_dataset(cfg.data, "train", seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
                                  seed=0, train=True)))


def _steps_logged(workdir):
    return [json.loads(x)["step"] for x in open(os.path.join(workdir, "metrics.jsonl"))]


def test_params_only_restore_and_resume_with_fresh_optimizer(tmp_path, data_dir):
    cfg = _cfg(data_dir, 2)
    state = jax.jit(train_lib.train_step, static_argnames=("cfg", "graphdef"))(  # one real step: moments ≠ 0
        train_lib.init_state(cfg), _batch(cfg), cfg=cfg, graphdef=train_lib.graphdef_of(cfg))[0]
    ck = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    ck.save(2, {**state, "step": np.int32(2)}, {}, cfg)
    ck.close()
    step_dir = tmp_path / "checkpoints" / "2"
    assert {"params", "train", "data", "config"} <= set(os.listdir(step_dir)) and not (step_dir / "state").exists()
    _, params, _ = load_checkpoint(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, params, state["params"])
    for root, _, files in os.walk(step_dir / "train"):  # sampling never reads the optimizer state
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    _, params_alone, step = load_checkpoint(str(tmp_path))
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, params_alone, params)
    shutil.rmtree(step_dir / "train")  # now a params-only checkpoint
    # resumes at step 2 with fresh AdamW moments; blocked attention is how, not what: it may differ
    run(override(_cfg(data_dir, 4), "model.attn_block", "8"), str(tmp_path), progress=False)
    assert _steps_logged(tmp_path) == [3, 4]
    ck = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    cfg = _cfg(data_dir, 4)
    state, _ = ck.restore(4, jax.eval_shape(lambda: train_lib.init_state(cfg)), cfg)
    ck.close()
    assert int(state["step"]) == 4
    # fresh moments at step 2: after two updates AdamW's step counter is 2, not 4
    counts = [int(x) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x) == 0 and x.dtype == np.int32]
    assert counts and set(counts) == {2}, counts


def test_checkpoint_from_before_the_split_loads_and_resumes(tmp_path, data_dir):
    """Written the old way (one 'state' item with params and optimizer state together)."""
    cfg = _cfg(data_dir, 2)
    state = train_lib.init_state(cfg)
    mngr = ocp.CheckpointManager(str(tmp_path / "checkpoints"), item_names=("state", "data", "config"),
                                 options=ocp.CheckpointManagerOptions(create=True))
    state["step"] = np.int32(2)
    mngr.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({}),
                                         config=ocp.args.JsonSave(checkpoint.config_json(cfg))))
    mngr.wait_until_finished()
    mngr.close()
    _, params, step = load_checkpoint(str(tmp_path))
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, params, state["params"])
    run(_cfg(data_dir, 4), str(tmp_path), progress=False)
    assert _steps_logged(tmp_path) == [3, 4]


def _param_shapes(model_cfg):
    from flax import nnx

    from spark.model import Transformer

    state = jax.eval_shape(lambda: nnx.state(Transformer(model_cfg, nnx.Rngs(0)), nnx.Param))
    return jax.tree.map(lambda x: x.shape, state)


def test_shape_fields_are_exactly_the_fields_that_set_parameter_shapes():
    """Every model field, changed alone: checkpoint.model_differences calls it a shape field iff the
    parameter shapes change, so a restore refuses exactly the configs it cannot load."""
    import dataclasses

    from spark.config import Config, MatFormerConfig, ModelConfig, SparkConfig

    geglu = ModelConfig(ffn_dim=128)
    spark = ModelConfig(ffn_dim=128, ffn_kind="spark", attn_kind="spark")
    changes = {  # field: (base, value)
        "vocab_size": (geglu, 300), "d_model": (geglu, 96), "num_layers": (geglu, 2), "num_heads": (geglu, 8),
        "num_kv_heads": (geglu, 4), "head_dim": (geglu, 32), "ffn_dim": (geglu, 64), "spark_ffn_dim": (spark, 96),
        "layer_ffn_dims": (geglu, (64, 128, 64, 128)), "ffn_kind": (geglu, "spark"),
        "layer_pattern": (geglu, ("global",)), "sliding_window": (geglu, 8), "max_seq_len": (geglu, 64),
        "attn_logit_softcap": (geglu, None), "final_logit_softcap": (geglu, None),
        "query_pre_attn_scalar": (geglu, 8.0), "rope_theta": (geglu, 5e5), "rms_eps": (geglu, 1e-5),
        "attn_kind": (geglu, "spark"), "gate_sparsity": (geglu, (0.5, 0.0, 0.5, 0.0)),
        "matformer": (geglu, MatFormerConfig((1,))), "dtype": (geglu, "bfloat16"),
        "param_dtype": (geglu, "bfloat16"), "attn_block": (geglu, 16),
        "spark.ffn_k_frac": (spark, 0.2), "spark.ffn_rank": (spark, 16), "spark.attn_k": (spark, 8),
        "spark.attn_rank": (spark, 4), "spark.attn_rope": (spark, "full"), "spark.stop_grad_threshold": (spark, True),
        "spark.decode_capacity_sigmas": (spark, 2.0),
    }
    fields = {f.name for f in dataclasses.fields(ModelConfig) if f.name != "spark"}
    assert set(changes) == fields | {f"spark.{f.name}" for f in dataclasses.fields(SparkConfig)}  # new fields: add
    for field, (base, value) in changes.items():
        if field.startswith("spark."):
            changed = dataclasses.replace(base, spark=dataclasses.replace(base.spark, **{field[6:]: value}))
        else:
            changed = dataclasses.replace(base, **{field: value})
        shapes, other = checkpoint.model_differences(checkpoint.config_json(Config(model=changed)), Config(model=base))
        reshaped = _param_shapes(changed) != _param_shapes(base)
        also = ["spark.ffn_rank"] if field == "ffn_kind" else []  # a GeGLU FFN has no predictor rank
        assert (shapes, other) == ((sorted([field, *also]), []) if reshaped else ([], [field])), (field, shapes, other)
    # the effective predictor rank: None means d_model // 2, and a GeGLU FFN has none
    explicit = dataclasses.replace(spark, spark=SparkConfig(ffn_rank=32))
    assert checkpoint.model_differences(checkpoint.config_json(Config(model=explicit)), Config(model=spark))[0] == []
