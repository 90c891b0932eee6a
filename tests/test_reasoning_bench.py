"""bench/reasoning.py end to end on a tiny task model (a few training steps): checkpoint choice
on validation, every answer rule, the diagnostics and the JSON/PNG outputs — so the benchmark
cannot rot. Its numbers mean nothing at this size."""

import json
import os

import numpy as np
import pytest

from bench import evaluate as ev
from spark import tasks
from spark.cli import override
from spark.train import run


@pytest.fixture(scope="module")
def workdir(built_once):
    cfg = tasks.train_config("modchain", steps=20, d_model=32, num_layers=2, seq_len=48, batch_size=8, ckpt_every=10)
    return built_once("modchain_run",
                      lambda w: run(override(cfg, "train.log_every", "10"), w, progress=False))


def test_select_checkpoint_and_evaluate(workdir):
    task = tasks.get("modchain")
    step, acc = ev.select_checkpoint(workdir, task, n=16, lo=0.0, hi=1.0)
    assert sorted(acc) == [10, 20] and step == 20 and all(0 <= a <= 1 for a in acc.values())
    assert ev.select_checkpoint(workdir, task, n=16, lo=2.0, hi=3.0)[0] is None


def test_bench_runs_end_to_end(workdir, tmp_path):
    from bench import reasoning

    out_json, out_png = str(tmp_path / "r.json"), str(tmp_path / "r.png")
    reasoning.main(["--task", "modchain", "--workdir", workdir, "--step", "20", "--n", "12", "--seeds", "2",
                    "--batch", "8", "--methods", "greedy,sample×4,mfs 4×4", "--json", out_json, "--png", out_png])
    res = json.load(open(out_json))
    assert os.path.getsize(out_png) > 0
    rows = res["rows"]
    assert set(rows) == {"greedy [quality]", "best-of-4", "self-consistency@4", "mfs 4×4 [quality]",
                         "mfs 4×4 [vote]"}
    for r in rows.values():
        assert 0 <= r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] <= 1 and r["gen_tokens"] > 0
    assert rows["best-of-4"]["gen_tokens"] > rows["greedy [quality]"]["gen_tokens"]
    assert len(rows["mfs 4×4 [vote]"]["accuracy_per_seed"]) == 2
    d = res["diagnostics"]
    assert d["survivors"] > 0 and 0 <= d["pass_at_beams"] <= 1
    assert {"step0_distinct_candidates", "step0_distinct_kept"} <= set(d)
    assert d["foresight_auroc"] is None or 0 <= d["foresight_auroc"] <= 1
    assert "mfs 4×4 [quality]" in res["paired"] and np.isfinite(res["paired"]["mfs 4×4 [quality]"]["diff"])


def test_ablations_change_mfs_4x4():
    from bench import reasoning

    main = reasoning.MAIN["mfs 4×4"]
    base = ev.search_config(tasks.get("countdown"), **main)
    for label, fields in reasoning.ABLATIONS.items():
        cfg = ev.search_config(tasks.get("countdown"), **fields)  # a valid config
        assert {f: v for f, v in fields.items() if f in main} == main, label
        assert all(getattr(cfg, f) != getattr(base, f) for f in fields if f not in main), label
    assert set(reasoning.METHODS) == set(reasoning.MAIN) | set(reasoning.ABLATIONS)


def test_first_step_counts_distinct_unfinished_steps():
    from bench.reasoning import first_step

    # [T=1, P=2, C=4, L=3]; tokens past cand_num differ and must be ignored; <eos> = 2
    tokens = np.array([[[[5, 3, 1], [5, 3, 2], [7, 3, 0], [9, 2, 0]],
                        [[4, 3, 0], [6, 3, 0], [8, 3, 0], [8, 3, 0]]]])
    tr = {"cand_tokens": tokens, "cand_num": np.full((1, 2, 4), 2),
          "cand_valid": np.array([[[1, 1, 1, 1], [1, 1, 1, 0]]], bool),
          "cand_fin": np.array([[[0, 0, 0, 1], [0, 0, 0, 0]]], bool),
          "keep": np.array([[[1, 1, 0, 0], [1, 1, 0, 1]]], bool)}
    # problem 0: unfinished {5 3, 7 3}, kept {5 3}; problem 1: valid {4 3, 6 3, 8 3}, kept {4 3, 6 3}
    assert first_step(tr) == {"step0_distinct_candidates": 2.5, "step0_distinct_kept": 1.5}


def test_multidraft_bench_pieces_by_hand():
    """bench/multidraft.py's bookkeeping: the alpha* reference 1 + a1 + a1 a2 (+ ...), the
    candidates verified below a node and the draft forwards' sizes of each method at budget 8."""
    from bench import multidraft as mb
    from spark.config import ModelConfig

    assert mb.ceiling([0.5, 0.5]) == pytest.approx(1.75) and mb.ceiling([1.0] * 4) == 5.0
    widths = ModelConfig().granularity_widths(8)
    got = {n: (mb.children(c), mb.draft_blocks(c)) for n, c in mb.methods(8, widths).items()}
    assert got == {"single": ([1] * 8, [1] * 8), "spectr k=2": ([2] * 4, [1, 2, 2, 2]), "spectr k=4": ([4, 4], [1, 4]),
                   "rsd_c wide": ([4, 1], [1, 4]), "rsd_c deep": ([2, 1, 1, 1], [1, 2, 2, 2]),
                   "rsd_s W=2": ([2] * 4, [1, 2, 2, 2]), "rsd_s W=4": ([4, 4], [1, 4])}


def test_multidraft_bench_task_prompts_and_bad_checkpoint(workdir):
    """--task prompts are the task's test problems, generated to EOS; a checkpoint trained without
    MatFormer widths (no F/8 draft) is refused with the command that trains one."""
    import argparse

    from bench import multidraft as mb

    tok = tasks.TaskTokenizer()
    enc, eos, (task, insts) = mb.prompts_of(argparse.Namespace(task="countdown", prompts=3), tok)
    assert eos == tok.eos_id and len(enc) == len(insts) == 3 and task is tasks.get("countdown")
    assert enc[1] == list(tok.encode(tasks.instance(task, "test", 1).prompt, bos=True))
    with pytest.raises(SystemExit, match="(?s)not trained with MatFormer.*reasoning_countdown_matformer"):
        mb.main(["--task", "modchain", "--workdir", workdir])
