"""Faults a real run meets: SIGTERM (a preempted spot VM) checkpoints the current step and stops
cleanly, and the resumed run equals an uninterrupted one; a corrupt newest checkpoint falls back
to the newest intact one with a warning; a resume never duplicates metric rows; train.steps at or
below the checkpoint's step says so."""

import json
import os

import pytest
from test_checkpoint import tiny_run

from spark.errors import ConfigError
from spark.train import run


def _cfg(data_dir, steps):
    return tiny_run(data_dir, steps, ckpt_every=4)


def _rows(workdir):
    return [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]


def _losses(workdir):
    return [(r["step"], r["loss"]) for r in _rows(workdir)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
    w = str(tmp_path_factory.mktemp("straight"))
    run(_cfg(data_dir, 7), w, progress=False)
    return w


def test_sigterm_checkpoints_and_resume_equals_uninterrupted(tmp_path, data_dir, uninterrupted, capsys):
    w = str(tmp_path)
    last = run(_cfg(data_dir, 7), w, progress=False, sigterm_after_step=5)  # between the checkpoints at 4 and 8
    assert last["preempted_at_step"] == 5
    assert sorted(os.listdir(os.path.join(w, "checkpoints")))[-1] == "5"  # the current step, not the last 4
    err = capsys.readouterr().err
    assert "preempted (SIGTERM): checkpoint of step 5 saved" in err
    assert '"steps":7' in err.split("config.train: ")[1].splitlines()[0]  # the resolved config is printed
    assert json.load(open(os.path.join(w, "config.json")))["train"]["steps"] == 7  # and written
    run(_cfg(data_dir, 7), w, progress=False)
    assert "resuming from step 5" in capsys.readouterr().err
    assert _losses(w) == _losses(uninterrupted)  # exactly: same batches, same state, no duplicate rows


def test_corrupt_newest_checkpoint_falls_back_and_metrics_do_not_repeat(tmp_path, data_dir, uninterrupted, capsys):
    import shutil

    w = str(tmp_path)
    shutil.copytree(uninterrupted, w, dirs_exist_ok=True)  # checkpoints 4 and 7, metrics rows 1..7
    for root, _, files in os.walk(os.path.join(w, "checkpoints", "7", "params")):
        for f in files:
            with open(os.path.join(root, f), "r+b") as fh:
                fh.truncate(max(os.path.getsize(os.path.join(root, f)) // 2, 1))
    run(_cfg(data_dir, 7), w, progress=False)
    err = capsys.readouterr().err
    assert "warning: checkpoint step 7 is unreadable" in err and "trying step 4" in err
    lines = [x for x in err.strip().splitlines() if not x.startswith("config.")]
    assert len(lines) == 2, lines  # one warning line (not a TensorStore spec) and "resuming from step 4"
    assert _losses(w) == _losses(uninterrupted)  # steps 5..7 retrained, rows 5..7 replaced, not appended


def test_steps_at_or_below_the_checkpoint(uninterrupted, data_dir, tmp_path, capsys):
    import shutil

    w = str(tmp_path)
    shutil.copytree(uninterrupted, w, dirs_exist_ok=True)
    assert run(_cfg(data_dir, 7), w, progress=False) == {}
    assert "resuming from step 7: already done" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="at step 7, past train.steps \\(5\\); set --config.train.steps above 7"):
        run(_cfg(data_dir, 5), w, progress=False)


def test_two_processes_sigterm_to_one_both_save_the_same_step_and_resume(uninterrupted, data_dir, tmp_path):
    """train.py as a pod runs it: 2 processes x 2 CPU devices (gloo collectives on loopback).
    Process 1 alone gets SIGTERM after step 2; jax.distributed's preemption sync point stops both at
    the same step, both save it and exit 0; resumed as 2 processes, the losses equal the
    uninterrupted 8-device run (rel 1e-5: reductions run in another order)."""
    import subprocess
    import sys

    from test_train import ROOT, TINY, _free_port

    w = str(tmp_path / "two")
    base = [sys.executable, os.path.join(ROOT, "train.py"), "--config", TINY, "--workdir", w, "--no_progress",
            f"--config.data.data_dir={data_dir}", "--config.train.matformer_mode=off", "--config.train.steps=7",
            "--config.train.ckpt_every=4", "--config.train.log_every=1", "--config.train.eval_every=100"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}

    def two(sigterm_to_1=()):
        port = _free_port()
        procs = [subprocess.Popen(base + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                          f"--process_id={i}", *(sigterm_to_1 if i == 1 else ())],
                                  env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
        outs = [p.communicate(timeout=600) for p in procs]
        return [p.returncode for p in procs], [o[1] for o in outs]

    codes, errs = two(["--sigterm_after_step=2"])
    assert codes == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    saved = sorted(int(s) for s in os.listdir(os.path.join(w, "checkpoints")))
    stop = saved[-1]
    assert len(saved) == 1 and 3 <= stop <= 5, saved  # the agreed preemption step, soon after the signal
    assert f"preempted (SIGTERM): checkpoint of step {stop} saved" in errs[0]  # process 0 was not signalled
    assert [r["step"] for r in _rows(w)] == list(range(1, stop + 1))
    codes, errs = two()
    assert codes == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    assert f"resuming from step {stop}" in errs[0]
    one, two_ = _losses(uninterrupted), _losses(w)
    assert [s for s, _ in one] == [s for s, _ in two_] == list(range(1, 8))
    for (step, a), (_, b) in zip(one, two_, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)
