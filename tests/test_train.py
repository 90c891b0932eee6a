"""Training: 1-device == 8-device mesh, grad accumulation, non-finite stop, eval-only and profiling, CLI errors."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from spark import checkpoint, sharding, train_lib
from spark.cli import load_config_file, override
from spark.config import Config, MeshConfig, ModelConfig
from spark.errors import ConfigError
from spark.train import TrainingError, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
OFF = "--config.train.matformer_mode=off"  # one granularity: ~60% of the compile, where MatFormer is not the point


def _train_cli(workdir, data_dir, *extra, check=True, cwd=ROOT):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", TINY, "--workdir", str(workdir),
           f"--config.data.data_dir={data_dir}", "--config.train.log_every=1", "--no_progress", *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(workdir):
    rows = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows}


def _loss_and_grads(cfg, batch, mesh_cfg):
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[: int(np.prod([mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]))])
    graphdef = train_lib.graphdef_of(cfg)
    state = train_lib.init_state(cfg)
    params = jax.device_put(state["params"], sharding.tree_shardings(mesh, state["params"]))
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    fn = jax.jit(jax.value_and_grad(functools.partial(train_lib.loss_fn, cfg=cfg, step=0), has_aux=True),
                 static_argnums=1)
    (loss, _), grads = fn(params, graphdef, batch)
    return float(loss), jax.tree.map(np.asarray, grads)


TP_EXPECTED = {  # leaf name -> PartitionSpec on a (data, fsdp, tensor) mesh
    "embed": ("tensor", "fsdp"), "w_q": ("fsdp", "tensor", None), "w_k": ("fsdp", "tensor", None),
    "w_v": ("fsdp", "tensor", None), "w_o": ("tensor", None, "fsdp"), "w_gate": ("fsdp", None),
    "w_up": ("fsdp", None), "w_down": ("fsdp", None), "w_pred": ("fsdp", None), "scale": (None,)}


@pytest.mark.parametrize("kind", ["dense", "spark"])
def test_eight_device_mesh_matches_one_device(kind, data_dir):
    """1 device == FSDP over 4 (× data 2) == tensor parallel over 2 (× data 4). The model's heads (4),
    KV heads (2), vocabulary (260) and widths divide every mesh axis they are sharded over, so
    every parameter really is split as its PartitionSpec says (checked), none is replicated."""
    cfg = load_config_file(TINY)
    model = dataclasses.replace(cfg.model, num_heads=4, num_kv_heads=2, vocab_size=260)
    if kind == "dense":
        model = dataclasses.replace(model, ffn_kind="geglu", attn_kind="dense")
    cfg = dataclasses.replace(cfg, model=model)
    from spark.data.pipeline import make_dataset

    ds = make_dataset(dataclasses.replace(cfg.data, data_dir=data_dir), "train", seq_len=32, batch_size=8,
                      seed=0, train=True)
    batch = next(iter(ds))
    tp = MeshConfig(4, 1, 2)
    mesh = sharding.make_mesh(tp, jax.devices())
    specs = jax.tree_util.tree_flatten_with_path(sharding.tree_shardings(mesh, train_lib.init_state(cfg)["params"]))[0]
    for path, sh in specs:
        name = sharding.param_name(path)
        assert tuple(sh.spec) == TP_EXPECTED[name.rsplit(".", 1)[-1]], name
    l1, g1 = _loss_and_grads(cfg, batch, MeshConfig(1, 1, 1))
    l8, g8 = _loss_and_grads(cfg, batch, MeshConfig(2, 4, 1))
    l8t, g8t = _loss_and_grads(cfg, batch, tp)
    assert abs(l1 - l8) / l1 < 1e-5 and abs(l1 - l8t) / l1 < 1e-5
    # float32 reductions run in another order on 8 devices: relative error of the whole gradient
    # ≤ 1e-5, of each leaf ≤ 1e-4 (a wrong sharding gives O(1) errors)
    def rel(a, b):
        return np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-12)

    flat = lambda g: np.concatenate([x.ravel() for x in jax.tree.leaves(g)])  # noqa: E731
    assert rel(flat(g1), flat(g8)) < 1e-5 and rel(flat(g1), flat(g8t)) < 1e-5
    for a, b, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g8), jax.tree.leaves(g8t), strict=True):
        assert rel(a, b) < 1e-4 and rel(a, c) < 1e-4


def test_sharding_rules_are_strict():
    """A dimension its mesh axes do not divide, and a parameter without a rule, are ConfigErrors."""
    cfg = load_config_file(TINY)  # 2 heads, 1 KV head, vocabulary 259
    params = train_lib.init_state(cfg)["params"]
    with pytest.raises(ConfigError, match=r"embed: its vocab dimension \(259\) is not divisible by mesh axes tensor"):
        sharding.tree_shardings(sharding.make_mesh(MeshConfig(2, 1, 4), jax.devices()), params)
    with pytest.raises(ConfigError, match="no sharding rule for 'extra.w_new'"):
        sharding.tree_shardings(sharding.make_mesh(MeshConfig(8, 1, 1), jax.devices()),
                                {"extra": {"w_new": np.zeros((4, 4))}})


def test_nonfinite_loss_stops_and_last_checkpoint_restores(tmp_path, data_dir):
    cfg = load_config_file(TINY)
    for k, v in [("data.data_dir", data_dir), ("train.lr", "1e30"), ("train.ckpt_every", "1"),
                 ("train.log_every", "1"), ("train.matformer_mode", "off")]:
        cfg = override(cfg, k, v)
    with pytest.raises(TrainingError, match="non-finite loss .* last good checkpoint \\(step (\\d+)\\)"):
        run(cfg, str(tmp_path), progress=False)
    ck = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    step = ck.latest_step()
    assert step is not None and step >= 1
    state, _ = ck.restore(step, jax.eval_shape(functools.partial(train_lib.init_state, cfg)), cfg)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


@pytest.mark.parametrize("extra,msg", [
    (["--config.train.stepz=3"], "unknown config key 'train.stepz'"),
    (["--config.train.steps=abc"], "--config.train.steps expects int"),
    (["--config.data.name=no_such_dataset"], "cannot open dataset 'no_such_dataset'"),
    (["--config.data.name=lm1b"], "dataset 'lm1b' is not prepared in"),  # never a download inside training
    (["--workdir=/proc/forbidden"], "is not writable"),
    (["--profile_steps=5"], "--profile_steps must be A:B"),
])
def test_cli_bad_inputs_give_one_line_errors(tmp_path, data_dir, extra, msg):
    r = _train_cli(tmp_path / "w", data_dir, *extra, check=False)
    assert r.returncode != 0
    assert msg in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_batch_that_does_not_split_over_the_devices_is_a_config_error(tmp_path, data_dir):
    cfg = override(override(load_config_file(TINY), "data.data_dir", data_dir), "train.batch_size", "4")
    with pytest.raises(ConfigError, match=r"batch_size / grad_accum \(4 / 1\) must be a multiple of the 8 devices"):
        run(cfg, str(tmp_path), progress=False)


def test_profile_eval_only_and_config_changes_on_resume(tmp_path, data_dir, capsys):
    """One workdir: profile_steps writes a trace; train.py --eval_only prints the final eval again;
    a resume with another shape is a one-line error, with a non-shape change a note and it trains on."""
    import glob
    import importlib.util

    from spark.checkpoint import CheckpointError

    w = str(tmp_path / "w")
    cfg = override(override(override(load_config_file(TINY), "data.data_dir", data_dir), "train.steps", "2"),
                   "train.matformer_mode", "off")
    # the profiled run in a fresh process: a profiler started in a worker that has run many tests
    # segfaulted once (jax 0.10.2, XLA:CPU)
    r = _train_cli(w, data_dir, OFF, "--config.train.steps=2", "--config.train.ckpt_every=1", "--profile_steps=0:1")
    assert "profile of steps 1..1 written to" in r.stderr
    assert glob.glob(os.path.join(w, "profile", "**", "*.xplane.pb"), recursive=True)
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
    train_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_cli)
    train_cli.main(["--config", TINY, "--workdir", w, f"--config.data.data_dir={data_dir}", OFF, "--eval_only"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    logged = [json.loads(x) for x in open(os.path.join(w, "metrics.jsonl"))][-1]
    assert res["step"] == 2 and abs(res["eval_loss"] - logged["eval_loss"]) <= 1e-6 * logged["eval_loss"]
    assert abs(res["eval_bpb"] - logged["eval_bpb"]) <= 1e-6 * logged["eval_bpb"]
    with pytest.raises(CheckpointError, match=r"model differs in: d_model, .*which set parameter shapes"):
        run(override(override(cfg, "train.steps", "4"), "model.d_model", "48"), w, progress=False)
    run(override(override(cfg, "train.steps", "3"), "model.sliding_window", "8"), w, progress=False)
    assert "note: model.sliding_window differ from the checkpoint's config" in capsys.readouterr().err
    assert [json.loads(x)["step"] for x in open(os.path.join(w, "metrics.jsonl"))] == [1, 2, 3]


def test_configs_build_and_count_parameters():
    from spark.model import count_params

    for name in ("tiny", "cpu_demo", "dense_demo", "gemma2_2b", "spark_gemma2_2b"):
        cfg = load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))
        assert isinstance(cfg, Config) and count_params(cfg.model) > 0
    dense = load_config_file(os.path.join(ROOT, "configs", "dense_demo.py")).model
    spark = load_config_file(os.path.join(ROOT, "configs", "cpu_demo.py")).model
    assert count_params(dense) == count_params(spark)
    assert isinstance(ModelConfig(), ModelConfig)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_step(cfg, batch):
    graphdef = train_lib.graphdef_of(cfg)
    step = jax.jit(functools.partial(train_lib.train_step, cfg=cfg, graphdef=graphdef))
    return step(train_lib.init_state(cfg), batch)


def test_grad_accumulation_and_sampled_granularity(data_dir):
    from spark.data.pipeline import make_dataset

    cfg = override(load_config_file(TINY), "data.data_dir", data_dir)
    batch = next(iter(make_dataset(cfg.data, "train", seq_len=32, batch_size=8, seed=0, train=True)))
    s1, m1 = _one_step(cfg, batch)
    s2, m2 = _one_step(override(cfg, "train.grad_accum", "2"), batch)
    assert abs(float(m1["loss"]) - float(m2["loss"])) <= 1e-5 * abs(float(m1["loss"]))
    assert abs(float(m1["grad_norm"]) - float(m2["grad_norm"])) <= 1e-5 * float(m1["grad_norm"])
    assert abs(float(m1["loss_F/8"]) - float(m2["loss_F/8"])) <= 1e-5 * float(m1["loss_F/8"])
    # 'sample' mode trains one granularity per step: its loss is that granularity's loss
    cfg_s = override(cfg, "train.matformer_mode", "sample")
    _, ms = _one_step(cfg_s, batch)
    names = [n for n, _ in train_lib.granularities(cfg)]
    chosen = names[int(ms["granularity"])]
    assert abs(float(ms["loss"]) - float(m1[f"loss_{chosen}"])) < 1e-5


def test_sentencepiece_tokenizer_is_trained_into_the_workdir_and_sampled(tmp_path, data_dir, sample_cli, capsys):
    extra = ["--config.data.tokenizer=sentencepiece", "--config.data.spm_vocab_size=640",
             "--config.data.spm_train_chars=100000", "--config.model.vocab_size=640",
             "--config.train.steps=2", "--config.train.eval_every=2", "--config.train.ckpt_every=2", OFF]
    _train_cli(tmp_path, data_dir, *extra)
    assert os.path.exists(tmp_path / "tokenizer.model")
    last = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")][-1]
    # bits per byte divides by the bytes each token stands for (> 1 for a subword vocabulary)
    assert last["eval_bpb"] < last["eval_loss"] / np.log(2)
    capsys.readouterr()
    sample_cli.main(["--workdir", str(tmp_path), "--prompt", "import os", "--max_new_tokens", "5", "--json"])
    assert len(json.loads(capsys.readouterr().out)["text"]) == 1
    cfg = load_config_file(TINY)  # the model's vocabulary must match the tokenizer's
    for k, v in [("data.data_dir", data_dir), ("data.tokenizer", "sentencepiece"),
                 ("data.spm_model", str(tmp_path / "tokenizer.model"))]:
        cfg = override(cfg, k, v)
    with pytest.raises(ConfigError, match="must equal the tokenizer's vocabulary \\(640\\)"):
        run(cfg, str(tmp_path / "v"), progress=False)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, data_dir):
    _train_cli(tmp_path, data_dir, "--config.train.steps=2", "--config.train.ckpt_every=2", OFF)
    state_dir = tmp_path / "checkpoints" / "2" / "train"  # what a resume reads besides the parameters
    for root, _, files in os.walk(state_dir):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    r = _train_cli(tmp_path, data_dir, "--config.train.steps=4", OFF, check=False)
    assert r.returncode != 0 and "checkpoint step 2 is unreadable" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_bf16_compute_with_f32_params(data_dir):
    from spark.data.pipeline import make_dataset

    cfg = override(override(load_config_file(TINY), "data.data_dir", data_dir), "train.matformer_mode", "off")
    batch = next(iter(make_dataset(cfg.data, "train", seq_len=32, batch_size=8, seed=0, train=True)))
    s32, m32 = _one_step(cfg, batch)
    s16, m16 = _one_step(override(cfg, "model.dtype", "bfloat16"), batch)
    assert jax.tree.leaves(s16["params"])[0].dtype == np.float32  # master weights stay f32
    assert np.isfinite(float(m16["loss"])) and abs(float(m16["loss"]) / float(m32["loss"]) - 1) < 0.02
