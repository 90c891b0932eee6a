"""Run a search decoder over a task split and score it: the bridge between spark/tasks and
decode/search.py used by bench/reasoning.py and the tests.

    res = evaluate(graphdef, params, task, split="validation", n=200, cfg=SearchConfig(...), seed=0)
    res["correct_quality"], res["correct_vote"], res["gen_tokens"]   # per problem [n]
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from decode import search
from spark import checkpoint
from spark.tasks import common, vocab
from spark.train_lib import graphdef_of


def task_tokens(task) -> search.TaskTokens:
    return search.TaskTokens(delim_id=vocab.DELIM, eos_id=vocab.EOS, answer_span=task.answer_span, pad_id=vocab.PAD)


def search_config(task, **kw) -> search.SearchConfig:
    """A SearchConfig with the task's step and solution budgets unless given."""
    return search.SearchConfig(**({"step_tokens": task.step_tokens, "max_gen": task.max_gen} | kw))


def problems(task, split: str, n: int, seed: int = 0):
    """The first n instances of a split and their prompts, right-padded to one length ->
    (instances, prompts [n, T] int32, lengths [n])."""
    tok = vocab.TaskTokenizer()
    insts = [common.instance(task, split, i, seed) for i in range(n)]
    enc = [tok.encode(x.prompt, bos=True) for x in insts]
    arr = np.zeros((n, max(map(len, enc))), np.int32)
    for i, e in enumerate(enc):
        arr[i, : len(e)] = e
    return insts, arr, np.asarray([len(e) for e in enc], np.int32)


def evaluate(graphdef, params, task, *, insts, prompts, lengths, cfg: search.SearchConfig, seed: int = 0,
             batch: int = 32, progress: bool = False, keep_trace: bool = False) -> dict:
    """Every problem through `search.run` in fixed-size batches (the last one padded with copies
    of the last problem, dropped afterwards: one compile) -> per-problem numpy arrays: correct
    under both answer rules, the answers' token ids, the accounting of search.py, stop step and
    revert flags, and (keep_trace) the per-step trace with problems on axis 1; plus the seconds
    the batches took after the first (which compiles)."""
    n = len(insts)
    tt = task_tokens(task)
    key = jax.random.key(seed)
    rows, t_run = [], 0.0
    for lo in tqdm(range(0, n, batch), disable=not progress, desc=f"{task.name} {cfg.method}", leave=False):
        idx = np.minimum(np.arange(lo, lo + batch), n - 1) if n >= batch else np.arange(lo, lo + batch) % n
        t0 = time.perf_counter()
        out = jax.block_until_ready(search.run(graphdef, params, jnp.asarray(prompts[idx]), jnp.asarray(lengths[idx]),
                                               jax.random.fold_in(key, lo), cfg=cfg, task=tt))
        t_run += (time.perf_counter() - t0) if lo else 0.0
        keep = min(batch, n - lo)
        trace = out.pop("trace", None)
        trace = trace if keep_trace else None
        out = jax.tree.map(lambda x, keep=keep: np.asarray(x)[:keep], out)
        if trace is not None:
            out["trace"] = jax.tree.map(lambda x, keep=keep: np.asarray(x)[:, :keep], trace)
        rows.append(out)
    out = jax.tree.map(lambda *x: np.concatenate(x), *[{k: v for k, v in r.items() if k != "trace"} for r in rows])
    if keep_trace and "trace" in rows[0]:
        out["trace"] = jax.tree.map(lambda *x: np.concatenate(x, axis=1), *[r["trace"] for r in rows])
    res = dict(out["stats"]) | {"seconds_after_compile": t_run, "batches_timed": max(len(rows) - 1, 0)}
    for k in ("stop_step", "reverted", "trace"):
        if k in out:
            res[k] = out[k]
    for rule in ("quality", "vote"):
        pick = out[f"choice_{rule}"]
        sols = [out["tokens"][i, pick[i], : out["num"][i, pick[i]]] for i in range(n)]
        res[f"correct_{rule}"] = np.asarray([task.verify(x, s) for x, s in zip(insts, sols, strict=True)])
        res[f"answer_{rule}"] = sols
    res["pass_at_beams"] = np.asarray([
        any(task.verify(x, out["tokens"][i, j, : out["num"][i, j]]) for j in range(out["valid"].shape[1])
            if out["valid"][i, j]) for i, x in enumerate(insts)])
    return res


def greedy(task, **kw) -> search.SearchConfig:
    return search_config(task, method="sample", samples=1, tau_final=0.0, **kw)


def select_checkpoint(workdir: str, task, *, n: int = 200, lo: float = 0.2, hi: float = 0.7, progress=False):
    """Greedy accuracy on the validation split at every saved step -> (chosen step, {step: acc}).
    The chosen step is the latest whose accuracy lies in [lo, hi] (None if none does)."""
    from spark.train import load_checkpoint  # the training loop module: imported only when needed

    steps = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False).all_steps()
    insts, prompts, lengths = problems(task, "validation", n)
    acc = {}
    for step in steps:
        cfg, params, _ = load_checkpoint(workdir, step)
        res = evaluate(graphdef_of(cfg), params, task, insts=insts, prompts=prompts, lengths=lengths,
                       cfg=greedy(task), progress=progress)
        acc[step] = float(res["correct_quality"].mean())
    inside = [s for s in steps if lo <= acc[s] <= hi]
    return (max(inside) if inside else None), acc

