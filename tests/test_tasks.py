"""Reasoning tasks: generated solutions verify, known bad ones do not, splits are disjoint, the
solvers' dead-end labels are right, and the training pipeline masks the prompt."""

import numpy as np
import pytest

from spark import tasks
from spark.config import DataConfig
from spark.errors import ConfigError
from spark.tasks import common
from spark.tasks.countdown import dead_end_share

TOK = tasks.TaskTokenizer()


def ids(text, eos=True):
    return TOK.encode(text, eos=eos)


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_generated_solutions_verify_and_fit_the_budget(name):
    task = tasks.get(name)
    for i in range(100):
        inst = tasks.instance(task, "validation", i)
        sol = ids(inst.solution)
        assert task.verify(inst, sol), inst
        assert task.solvable_after(inst, sol[:-1]) is True
        assert len(sol) <= task.max_gen
        assert all(len(s.split()) + 1 <= task.step_tokens for s in inst.solution.split(";"))
        assert not task.verify(inst, sol[:-1])  # no <eos>: unfinished


def test_countdown_verifier():
    inst = common.Instance("12 7 3 goal 15 |", "12 - 7 = 5 ; 5 * 3 = 15", ((3, 7, 12), 15))
    task = tasks.get("countdown")
    assert task.verify(inst, ids("12 - 7 = 5 ; 5 * 3 = 15"))
    assert task.verify(inst, ids("7 * 3 = 21 ; 21 - 12 = 9")) is False  # valid moves, wrong result
    for bad in ["12 - 7 = 6 ; 6 * 3 = 18",  # wrong arithmetic
                "12 - 7 = 5 ; 5 * 5 = 25",  # 5 used twice
                "12 - 7 = 5",  # a number left over
                "12 - 7 = 5 ; 5 * 3 = 15 ; 15 - 3 = 12",  # too many steps
                "7 - 12 = 5 ; 5 * 3 = 15",  # smaller first
                "12 - 7 5 ; 5 * 3 = 15"]:  # malformed
        assert not task.verify(inst, ids(bad)), bad
    assert task.solvable_after(inst, ids("12 - 7 = 5 ;", eos=False)) is True
    assert task.solvable_after(inst, ids("7 * 3 = 21 ;", eos=False)) is False  # a dead end
    assert task.solvable_after(inst, ids("7 * 3 = 20 ;", eos=False)) is None  # not a valid move
    share = dead_end_share((3, 7, 12), 15, 200)
    assert 0 < share < 1


def test_pathfind_verifier():
    task = tasks.get("pathfind")
    edges = ((4, 17), (4, 31), (4, 50), (17, 2), (31, 9), (50, 60), (60, 61))
    inst = common.Instance("", "31 ; 9", (4, 9, edges))
    assert task.verify(inst, ids("31 ; 9"))
    for bad in ["17 ; 2", "9", "31 ; 9 ; 4", "31 9", "50 ; 60 ; 61"]:
        assert not task.verify(inst, ids(bad)), bad
    assert task.solvable_after(inst, ids("31 ;", eos=False)) is True
    assert task.solvable_after(inst, ids("50 ; 60 ;", eos=False)) is False
    assert task.solvable_after(inst, ids("9 ;", eos=False)) is None


def test_modchain_verifier_checks_the_answer_only():
    from spark.tasks.modchain import ModChain

    task = ModChain(p=97)
    inst = common.Instance("", "48 ; 47 ; 42", (41, (("+", 7), ("-", 1), ("-", 5))))
    assert task.verify(inst, ids("48 ; 47 ; 42"))
    assert task.verify(inst, ids("1 ; 2 ; 42"))  # answer-only: a lucky final value counts
    assert not task.verify(inst, ids("48 ; 47 ; 43"))
    assert task.solvable_after(inst, ids("48 ;", eos=False)) and not task.solvable_after(inst, ids("49 ;", eos=False))


def test_splits_are_disjoint_and_deterministic():
    task = tasks.get("countdown")
    keys = {s: {tasks.instance(task, s, i).key for i in range(150)} for s in common.SPLITS}
    assert not (keys["train"] & keys["validation"]) and not (keys["train"] & keys["test"])
    assert not (keys["validation"] & keys["test"])
    assert tasks.instance(task, "test", 3) == tasks.instance(task, "test", 3)
    assert all(common.split_of(k) == "test" for k in keys["test"])


def test_tokenizer_and_errors():
    assert TOK.decode(TOK.encode("12 - 7 = 5 ;", bos=True, eos=True)) == "12 - 7 = 5 ;"
    with pytest.raises(ConfigError, match="not a word of the task vocabulary"):
        TOK.encode("12 minus 7")
    with pytest.raises(ConfigError, match="unknown task"):
        tasks.get("sudoku")


def test_pipeline_trains_on_solutions_only():
    from spark.data.pipeline import make_dataset

    ds = make_dataset(DataConfig(name="modchain", tokenizer="task"), "train", seq_len=48, batch_size=2, seed=0,
                      train=True)
    b = next(iter(ds))
    bar = TOK.ids["|"]
    for inp, seg, mask in zip(b["inputs"], b["segment_ids"], b["loss_mask"], strict=True):
        # a target is trained on iff its document's "|" came at or before it (solution and <eos>)
        tgt_seg = np.append(seg[1:], 0)  # approximation at the row's last position: checked separately
        after_bar = np.zeros(len(inp), bool)
        for t in range(len(inp)):
            after_bar[t] = inp[t] == bar or (t > 0 and after_bar[t - 1] and seg[t] == seg[t - 1])
        expect = after_bar & (tgt_seg == seg)
        assert (mask[:-1].astype(bool) == expect[:-1]).all()
        assert mask.sum() > 0 and (mask[inp == tasks.vocab.BOS] == 0).all()


def test_pipeline_packs_task_examples_whole():
    """No solution is cut from its prompt: every document in a row runs from <bos> to <eos>."""
    from spark.data.pipeline import make_dataset

    ds = make_dataset(DataConfig(name="pathfind", tokenizer="task"), "train", seq_len=64, batch_size=4, seed=0,
                      train=True)
    eos = tasks.vocab.EOS
    for b, _ in zip(ds, range(3), strict=False):
        for inp, tgt, seg in zip(b["inputs"], b["targets"], b["segment_ids"], strict=True):
            docs = [np.flatnonzero(seg == s) for s in np.unique(seg[seg > 0])]
            assert docs and all(inp[d[0]] == tasks.vocab.BOS for d in docs)
            # a document's <eos> is its last input, or the row's last target when it fills the row
            assert all(inp[d[-1]] == eos or (d[-1] == len(inp) - 1 and tgt[-1] == eos) for d in docs)
    with pytest.raises(ConfigError, match="does not fit a row"):
        next(iter(make_dataset(DataConfig(name="pathfind", tokenizer="task"), "train", seq_len=16, batch_size=4,
                               seed=0, train=True)))


def test_bench_statistics():
    from bench.stats import auroc, bootstrap_ci, paired_bootstrap

    rng = np.random.default_rng(0)
    s, y = rng.normal(size=300), rng.random(300) < 0.4
    brute = np.mean([(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]])
    assert auroc(s, y) == pytest.approx(brute)
    assert auroc([1, 1, 2, 2], [0, 1, 0, 1]) == 0.5 and auroc([3, 2, 1], [1, 1, 0]) == 1.0
    assert auroc([1, 2], [1, 1]) is None
    x = (rng.random((400, 3)) < 0.3).astype(float)
    mean, lo, hi = bootstrap_ci(x)
    assert lo < mean < hi and hi - lo < 0.1 and abs(mean - 0.3) < 0.05
    better = np.clip(x + (rng.random((400, 3)) < 0.2), 0, 1)
    cmp = paired_bootstrap(better, x)
    assert cmp["diff"] > 0 and cmp["lo"] > 0 and cmp["p_a_not_better"] < 0.01
    assert paired_bootstrap(x, x)["diff"] == 0
