"""sample.py on a tiny trained checkpoint: text and JSON output, --checkpoint, widths, and a
one-line error (exit != 0, no traceback) for every bad input a user can give."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from spark.cli import main_guard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(built_once, data_dir):
    def build(w):
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "tiny.py"),
               "--workdir", w, f"--config.data.data_dir={data_dir}", "--config.train.steps=4",
               "--config.train.ckpt_every=4", "--config.train.eval_every=4", "--config.model.max_seq_len=48",
               "--config.train.matformer_mode=off", "--no_progress"]  # one granularity: less compile
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]

    return built_once("sample_run", build)


def _sample(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def _sample_in_process(sample_cli, capsys, *args):
    """sample.main under the CLI's error guard, in this process (no interpreter start per case):
    -> (exit code, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main_guard(lambda: sample_cli.main(list(args)))
    return exc.value.code, capsys.readouterr().err


def test_text_output(workdir):
    r = _sample("--workdir", workdir, "--prompt", "def ", "--prompt", "import", "--max_new_tokens", "6")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--- 'def '\ndef " in r.stdout and "--- 'import'\nimport" in r.stdout
    assert "tokens in" in r.stderr


def test_json_output_and_checkpoint_path_and_widths(workdir, sample_cli, capsys):
    common = ["--prompt", "def ", "--prompt", "class A", "--max_new_tokens", "8", "--temperature", "0", "--json"]
    sample_cli.main(["--workdir", workdir, *common, "--widths", "48,96"])  # tiny Spark F = 96: layer 0 at F/2
    out = json.loads(capsys.readouterr().out)
    assert len(out["text"]) == 2 and out["tokens_per_s"] > 0
    st = out["stats"]
    assert st["widths"] == [48, 96] and st["new_tokens"] == [8, 8] and st["checkpoint_step"] == 4
    assert len(st["ffn_overflow"]) == 2 and len(st["attn_overflow"]) == 2  # per row
    assert len(st["ffn_density"]) == 2 and len(st["keys_per_query"]) == 2  # per layer
    sample_cli.main(["--checkpoint", os.path.join(workdir, "checkpoints", "4"), *common, "--widths", "48,96",
                     "--speculative", "--draft_granularity", "4", "--gamma", "2", "--huge_pages"])
    captured = capsys.readouterr()
    out2 = json.loads(captured.out)
    assert out2["text"] == out["text"]  # greedy, speculative or not: the same checkpoint gives the same text
    assert "huge pages: " in captured.err  # the tiny model's arrays are under 2 MB: nothing moved, nothing broken
    st2 = out2["stats"]
    assert st2["draft_widths"] == [24, 24] and st2["gamma"] == 2 and st2["new_tokens"] == [8, 8]
    assert 0 <= st2["acceptance_rate"] <= 1 and st2["rounds"] == sum(st2["rounds_per_row"]) > 0
    assert st2["tokens_per_round"] == pytest.approx(14 / st2["rounds"])  # 2 x (8 - 1 from the prefill)


@pytest.fixture(scope="module")
def corrupt_workdir(workdir, tmp_path_factory):
    w = str(tmp_path_factory.mktemp("corrupt"))
    shutil.copytree(workdir, w, dirs_exist_ok=True)
    for root, _, files in os.walk(os.path.join(w, "checkpoints", "4", "params")):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    return w


BAD = {
    "empty prompt": (["--prompt", ""], "empty prompt"),
    "no prompt": ([], "give at least one --prompt"),
    "too long": (["--prompt", "x" * 45, "--max_new_tokens", "8"], "exceeds the model's context of 48"),
    "widths count": (["--prompt", "a", "--widths", "96"], "widths needs one value per layer (2)"),
    "widths value": (["--prompt", "a", "--widths", "50,96"], "width 50 of layer 0 is not a MatFormer granularity"),
    "widths syntax": (["--prompt", "a", "--widths", "a,b"], "--widths must be comma-separated integers"),
    "granularity": (["--prompt", "a", "--granularity", "3"], "granularity 1/3 is not one of"),
    "temperature": (["--prompt", "a", "--temperature", "-1"], "temperature must be >= 0"),
    "draft flag alone": (["--prompt", "a", "--gamma", "2"], "--gamma need --speculative"),
    "gamma": (["--prompt", "a", "--speculative", "--gamma", "0"], "gamma must be >= 1"),
    "threshold": (["--prompt", "a", "--speculative", "--adaptive_threshold", "2"], "adaptive_threshold must be"),
    "draft widths": (["--prompt", "a", "--speculative", "--draft_widths", "50,96"], "width 50 of layer 0"),
    "verifier alone": (["--prompt", "a", "--speculative", "--verifier", "kseq"], "--verifier needs a multi-draft"),
    "verifier for tree": (["--prompt", "a", "--speculative", "--tree", "2,1", "--verifier", "kseq"],
                          "does not apply to rsd_c"),
    "beam without depth": (["--prompt", "a", "--speculative", "--tree_beam", "2"], "go together (RSD-S)"),
    "tree syntax": (["--prompt", "a", "--speculative", "--tree", "a"], "comma-separated integers like 3,2,1"),
    "tree and gamma": (["--prompt", "a", "--speculative", "--tree", "2", "--gamma", "2"], "a tree's depth is"),
    "multidraft separate": (["--prompt", "a", "--speculative", "--drafts", "2", "--draft_cache", "separate"],
                            "--draft_cache separate does not apply"),
    "adaptive tree": (["--prompt", "a", "--speculative", "--tree", "2", "--adaptive_threshold", "0.5"],
                      "applies to spectr only"),
    "search flag alone": (["--prompt", "a", "--beams", "2"], "--beams need a search --decoder"),
    "beams": (["--prompt", "a", "--decoder", "mfs", "--beams", "0"], "beams (M) must be >= 1"),
    "samples": (["--prompt", "a", "--decoder", "best_of_n", "--samples", "0"], "samples (N) must be >= 1"),
    "lambda": (["--prompt", "a", "--decoder", "mfs", "--sigma_rate", "-1"], "sigma_rate (λ) must be >= 0"),
    "budget": (["--prompt", "a", "--decoder", "mfs", "--step_tokens", "9", "--max_new_tokens", "8"],
               "max_gen (8) must hold at least one step (9 tokens)"),
    "rank": (["--prompt", "a", "--decoder", "mfs", "--rank", "s"], "rank must be 'A' or 'F'"),
    "prune": (["--prompt", "a", "--decoder", "mfs", "--prune", "no"], "--prune must be on or off, got 'no'"),
    "two decoders": (["--prompt", "a", "--decoder", "phi", "--speculative"], "pick one"),
    "typical": (["--prompt", "a", "--typical_p", "1.5"], "typical_p must be in (0, 1) (1: off), got 1.5"),
    "gamma word": (["--prompt", "a", "--speculative", "--gamma", "many"], "--gamma must be an integer or auto"),
    "gamma_max alone": (["--prompt", "a", "--speculative", "--gamma_max", "3"],
                        "--gamma_max and --cost_repeats go with --gamma auto"),
    "cost_repeats 0": (["--prompt", "a", "--speculative", "--gamma", "auto", "--cost_repeats", "0"],
                       "--cost_repeats must be >= 1, got 0"),
    "gamma auto short": (["--prompt", "a", "--speculative", "--gamma", "auto", "--max_new_tokens", "11"],
                         "with γ_max 4 that needs >= 12, got 11"),
    "gamma auto trees": (["--prompt", "a", "--speculative", "--gamma", "auto", "--drafts", "2"], "not with --drafts"),
    "bild flag alone": (["--prompt", "a", "--fallback", "0.5"], "--fallback need --decoder bild"),
    "bild gamma": (["--prompt", "a", "--decoder", "bild", "--gamma", "3"], "--gamma need --speculative"),
    "bild speculative": (["--prompt", "a", "--decoder", "bild", "--speculative"], "pick one"),
    "bild fallback": (["--prompt", "a", "--decoder", "bild", "--fallback", "2"], "fallback (α_FB) must be in [0, 1]"),
    "typical search": (["--prompt", "a", "--decoder", "mfs", "--typical_p", "0.9", "--top_k", "5"],
                       "--top_k, --typical_p: the search decoders sample at their own temperatures"),
    "delimiter": (["--prompt", "a", "--decoder", "beam", "--delimiter", "ab", "--max_new_tokens", "8"],
                  "it must be one"),
}


def test_search_decoders_json(workdir, sample_cli, capsys):
    common = ["--workdir", workdir, "--prompt", "def ", "--prompt", "class A", "--max_new_tokens", "10", "--json"]
    sample_cli.main([*common, "--decoder", "mfs", "--beams", "2", "--samples", "3", "--step_tokens", "4",
                 "--baseline", "parent_step", "--delimiter", " "])
    out = json.loads(capsys.readouterr().out)
    st = out["stats"]
    assert st["decoder"] == "mfs" and st["answer_rule"] == "quality" and len(out["text"]) == 2
    assert st["gen_tokens"] == [a + b + c for a, b, c in zip(st["expand_tokens"], st["foresight_tokens"],
                                                              st["final_tokens"], strict=True)]
    assert all(1 <= len(b) <= 2 for b in st["beams"]) and len(st["stop_step"]) == 2
    assert all(t in b for t, b in zip(out["text"], st["beams"], strict=True))
    sample_cli.main([*common, "--decoder", "self_consistency", "--samples", "4"])
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["answer_rule"] == "vote" and [len(b) for b in out["stats"]["beams"]] == [4, 4]


def test_multidraft_json_greedy_equals_plain(workdir, sample_cli, capsys):
    """The CLI path of decode/multidraft.py (one method; each method's greedy equality is in
    tests/test_multidraft.py) and the flag -> config mapping of the others."""
    common = ["--workdir", workdir, "--prompt", "def ", "--prompt", "class A", "--max_new_tokens", "8",
              "--temperature", "0", "--json"]
    sample_cli.main(common)
    plain = json.loads(capsys.readouterr().out)
    sample_cli.main([*common, "--speculative", "--draft_granularity", "4", "--tree", "2,1"])
    out = json.loads(capsys.readouterr().out)
    st = out["stats"]
    assert out["text"] == plain["text"]
    assert st["method"] == "rsd_c" and st["verifier"] == "recursive" and st["gamma"] == 2 and st["rounds"] > 0
    assert st["tree_nodes"] == 4 and st["accepted_per_round"] == pytest.approx(sum(st["accepted"]) / st["rounds"])
    for extra, want in ((["--drafts", "4", "--gamma", "2"], dict(method="spectr", drafts=4, length=2, verifier="kseq")),
                        (["--tree_beam", "3", "--tree_depth", "2", "--verifier", "target_only"],
                         dict(method="rsd_s", beam=3, depth=2, verifier="target_only"))):
        args = sample_cli.parse_args(["--workdir", workdir, "--prompt", "a", "--speculative", *extra])
        cfg = sample_cli.check_speculative_flags(args)
        assert all(getattr(cfg, k) == v for k, v in want.items()), (cfg, want)


def test_goodput_json_greedy_equals_plain(workdir, sample_cli, capsys):
    """--gamma auto: costs measured for γ = 0..γ_max at start, one γ per round, greedy output unchanged."""
    common = ["--workdir", workdir, "--prompt", "def ", "--max_new_tokens", "8", "--temperature", "0", "--json"]
    sample_cli.main(common)
    plain = json.loads(capsys.readouterr().out)
    sample_cli.main([*common, "--speculative", "--gamma", "auto", "--gamma_max", "1", "--cost_repeats", "3"])
    out = json.loads(capsys.readouterr().out)
    st = out["stats"]
    assert out["text"] == plain["text"] and len(st["goodput_costs"]) == 2 and all(c > 0 for c in st["goodput_costs"])
    assert len(st["gamma_chosen"]) == st["rounds"] and set(st["gamma_chosen"]) <= {0, 1}
    assert st["compile_seconds"] > 0 and st["cost_measure_seconds"] > 0


def test_bild_json(workdir, sample_cli, capsys):
    """--decoder bild flags reach the decoder (its policies are tests/test_bild.py's): α_FB = 0 with
    no rollback lets the little model write all but every (n+1)-th token."""
    sample_cli.main(["--workdir", workdir, "--prompt", "def ", "--prompt", "class A", "--max_new_tokens", "9",
                     "--temperature", "0", "--json", "--decoder", "bild", "--draft_granularity", "4",
                     "--max_little_steps", "2", "--fallback", "0", "--rollback", "inf", "--draft_cache", "separate"])
    st = json.loads(capsys.readouterr().out)["stats"]
    assert st["little_tokens"] == [6, 6] and st["rounds"] == [3, 3] and st["little_widths"][0] == st["widths"][0] // 4


@pytest.mark.parametrize("name", list(BAD))
def test_bad_inputs_give_one_line_errors(workdir, name, sample_cli, capsys):
    extra, msg = BAD[name]
    code, err = _sample_in_process(sample_cli, capsys, "--workdir", workdir, *extra)
    assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err[-2000:]


def test_cli_error_is_one_line_without_traceback(workdir):
    r = _sample("--workdir", workdir, "--prompt", "a", "--widths", "96")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: widths needs one value per layer (2), got 1"], r.stderr[-2000:]


def test_bad_checkpoints_give_one_line_errors(workdir, corrupt_workdir, tmp_path, sample_cli, capsys):
    cases = [(["--workdir", str(tmp_path / "missing")], "no checkpoints in"),
             (["--checkpoint", os.path.join(workdir, "checkpoints", "9")], "not found"),
             (["--checkpoint", workdir], "--checkpoint must be WORKDIR/checkpoints/STEP"),
             (["--workdir", corrupt_workdir], "checkpoint step 4 is unreadable")]
    os.makedirs(tmp_path / "empty" / "checkpoints")
    cases.append((["--workdir", str(tmp_path / "empty")], "no checkpoint found"))
    for args, msg in cases:
        code, err = _sample_in_process(sample_cli, capsys, *args, "--prompt", "a")
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (args, err[-2000:])


def test_prompts_that_are_not_utf8_are_one_line_errors(sample_cli, tmp_path):
    import argparse

    from spark.errors import ConfigError

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    args = argparse.Namespace(prompt=[], prompt_file=str(bad), max_new_tokens=8)
    with pytest.raises(ConfigError, match="is not UTF-8 \\(byte 3"):
        sample_cli.read_prompts(args)
    args = argparse.Namespace(prompt=["ok", "x\udce9"], prompt_file=None, max_new_tokens=8)  # surrogateescape'd
    with pytest.raises(ConfigError, match="prompt 1 is not valid UTF-8"):
        sample_cli.read_prompts(args)
