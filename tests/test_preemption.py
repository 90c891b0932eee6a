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
