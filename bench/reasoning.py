"""Search decoders on verifiable reasoning tasks: accuracy vs generated tokens, with confidence
intervals, a paired comparison against the best compute-matched baseline, and diagnostics of
whether foresight can help at all.

    python bench/reasoning.py --task countdown --workdir runs/reasoning_countdown \\
        --n 500 --seeds 3 --json bench/results/reasoning_countdown.json --png bench/results/reasoning_countdown.png

Protocol (docs/research/martingale_foresight.md §6):
- the checkpoint is chosen on the *validation* split: the latest whose greedy accuracy lies in
  20–70% (`--step` overrides); everything else runs on the first `--n` *test* problems;
- every method is scored by both answer rules (argmax mean log-prob; majority vote over its
  final beams/samples), for `--seeds` decoding seeds; accuracy is the mean over problems and
  seeds with a 95% bootstrap CI over problems; cost is generated tokens per problem (every token
  sampled: steps, foresight rollouts, completions), plus forward row-tokens including padding;
- paired comparison: each MFS row against the most accurate non-MFS row that used no more than
  1.1× its tokens (paired bootstrap over problems), and against φ-Decoding (token ratio);
- diagnostics on MFS 4×4 (first seed): AUROC of the foresight value F (and of the step score s)
  for "the task is still solvable after this step" (exact solver labels), the share of pruned
  steps that were solvable vs of kept ones, the distinct first steps among the candidates and
  among those the prune keeps, pass@beams, and the early-stop counterfactual (the same seed with
  early stopping off, on the problems where it fired).
Tiny models trained in minutes test the mechanism, not the papers' claims about 8B LLMs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import write_json  # noqa: E402
from bench.stats import auroc, bootstrap_ci, paired_bootstrap  # noqa: E402

MAIN = {  # label: SearchConfig fields (the task's step/solution budgets are added)
    "greedy": dict(method="sample", samples=1, tau_final=0.0),
    "sample×1": dict(method="sample", samples=1, tau_final=0.7),
    "sample×4": dict(method="sample", samples=4, tau_final=0.7),
    "sample×16": dict(method="sample", samples=16, tau_final=0.7),
    "sample×64": dict(method="sample", samples=64, tau_final=0.7),
    "beam 4×4": dict(method="beam", beams=4, samples=4),
    "phi 4×4": dict(method="phi", beams=4, samples=4, min_steps=1),
    "mfs 2×2": dict(method="mfs", beams=2, samples=2),
    "mfs 4×4": dict(method="mfs", beams=4, samples=4),
    "mfs 8×8": dict(method="mfs", beams=8, samples=8),
}
_MFS4 = MAIN["mfs 4×4"]
_ALL16 = dict(prune=False, foresight_slots=_MFS4["beams"] * _MFS4["samples"])  # every candidate rolled out
ABLATIONS = {  # martingale_foresight.md §6.4: changes to "mfs 4×4"; run with --methods
    "mfs 4×4 λ=0": _MFS4 | dict(sigma_rate=0.0),  # prune to s ≥ μ instead of μ + 0.8σ
    "mfs 4×4 baseline=step": _MFS4 | dict(baseline="parent_step"),  # the released code's A
    "mfs 4×4 R=4": _MFS4 | dict(rollouts=4),  # F from 4 rollouts per survivor
    "mfs 4×4 no stop": _MFS4 | dict(early_stop=False),  # no ε rule
    "mfs 4×4 τf=0.7": _MFS4 | dict(tau_foresight=0.7),  # foresight rollouts at the step temperature
    "mfs 4×4 rank F": _MFS4 | dict(rank="F"),  # survivors ordered by F, not A = F − parent's F
    "mfs 4×4 no prune": _MFS4 | _ALL16,
    "mfs 4×4 no prune + rank F": _MFS4 | _ALL16 | dict(rank="F"),
}
METHODS = MAIN | ABLATIONS
DIAGNOSED = "mfs 4×4"


def family(label: str) -> str:
    return label.split(" ")[0].split("×")[0]


def row_name(label: str, rule: str) -> str:
    if label.startswith("sample×") and label != "sample×1":
        return ("best-of-" if rule == "quality" else "self-consistency@") + label.split("×")[1]
    return f"{label} [{rule}]"


def first_step(tr) -> dict:
    """How many distinct first steps the candidates hold, and how many the width prune keeps
    (means over problems): search can only change the answer through the steps it keeps."""
    def distinct(mask_PC):
        return float(np.mean([len({tuple(tr["cand_tokens"][0, p, c, : tr["cand_num"][0, p, c]])
                                   for c in np.flatnonzero(m)}) for p, m in enumerate(mask_PC)]))

    unf = tr["cand_valid"][0] & ~tr["cand_fin"][0]
    return {"step0_distinct_candidates": distinct(unf), "step0_distinct_kept": distinct(unf & tr["keep"][0])}


def diagnostics(task, insts, res, res_nostop) -> dict:
    """Foresight AUROC, pruning false negatives, early-stop counterfactual (one seed)."""
    tr = res["trace"]
    live = tr["live"]  # [T, P]
    f_score, f_label, s_score, s_label, kept_solvable, pruned_solvable = [], [], [], [], [], []
    for t, p in zip(*np.nonzero(live), strict=True):
        inst = insts[p]
        unf = tr["cand_valid"][t, p] & ~tr["cand_fin"][t, p]
        label = {}
        for c in np.flatnonzero(unf):
            lab = task.solvable_after(inst, tr["cand_tokens"][t, p, c, : tr["cand_num"][t, p, c]])
            label[c] = bool(lab)
            s_score.append(tr["s"][t, p, c])
            s_label.append(label[c])
            (kept_solvable if tr["keep"][t, p, c] else pruned_solvable).append(label[c])
        for k in np.flatnonzero(tr["surv_ok"][t, p]):
            f_score.append(tr["F"][t, p, k])
            f_label.append(label[tr["surv"][t, p, k]])
    fired = np.asarray(res["reverted"], bool)
    out = {"foresight_auroc": auroc(f_score, f_label), "step_score_auroc": auroc(s_score, s_label),
           **first_step(tr),
           "survivors": len(f_score), "survivor_solvable_share": float(np.mean(f_label)) if f_label else None,
           "pruned_solvable_share": float(np.mean(pruned_solvable)) if pruned_solvable else None,
           "kept_solvable_share": float(np.mean(kept_solvable)) if kept_solvable else None,
           "pass_at_beams": float(np.mean(res["pass_at_beams"])), "early_stop_fired": int(fired.sum())}
    if fired.any():
        for rule in ("quality", "vote"):
            out[f"early_stop_{rule}"] = {
                "with_stop": float(res[f"correct_{rule}"][fired].mean()),
                "without_stop": float(res_nostop[f"correct_{rule}"][fired].mean()),
                "tokens_with": float(res["gen_tokens"][fired].mean()),
                "tokens_without": float(res_nostop["gen_tokens"][fired].mean())}
    return out


def summarize(runs: dict) -> dict:
    """runs: label -> list over seeds of evaluate() results -> table rows."""
    rows = {}
    for label, seeds in runs.items():
        tokens = np.mean([r["gen_tokens"].mean() for r in seeds])
        fwd = np.mean([r["forward_tokens"].mean() for r in seeds])
        sec = np.mean([r["seconds_after_compile"] / max(r["batches_timed"], 1) for r in seeds])
        pass_k = float(np.mean([r["pass_at_beams"].mean() for r in seeds]))  # any final beam/sample correct
        for rule in ("quality", "vote"):
            if label in ("greedy", "sample×1") and rule == "vote":
                continue  # one sample: both rules pick it
            correct = np.stack([r[f"correct_{rule}"] for r in seeds], axis=1).astype(float)
            acc, lo, hi = bootstrap_ci(correct)
            rows[row_name(label, rule)] = {
                "method": label, "rule": rule, "family": family(label), "accuracy": acc, "ci95": [lo, hi],
                "accuracy_per_seed": correct.mean(axis=0).tolist(), "gen_tokens": float(tokens),
                "forward_tokens": float(fwd), "seconds_per_batch": float(sec), "pass_at_final": pass_k,
                "_correct": correct}
    return rows


def compare(rows: dict) -> dict:
    out = {}
    for name, r in rows.items():
        if r["family"] != "mfs":
            continue
        rivals = {n: x for n, x in rows.items() if x["family"] != "mfs" and x["gen_tokens"] <= 1.1 * r["gen_tokens"]}
        if rivals:
            best = max(rivals, key=lambda n: rivals[n]["accuracy"])
            out[name] = {"vs": best, "tokens_ratio": r["gen_tokens"] / rivals[best]["gen_tokens"],
                         **paired_bootstrap(r["_correct"], rivals[best]["_correct"])}
        phi = rows.get(f"phi 4×4 [{r['rule']}]")
        if phi is not None:
            out[name]["vs_phi"] = {"tokens_ratio": r["gen_tokens"] / phi["gen_tokens"],
                                   **paired_bootstrap(r["_correct"], phi["_correct"])}
    return out


def same_as_quality(rows: dict, name: str, tol: float) -> bool:
    """A "[vote]" row whose accuracy is within `tol` of its "[quality]" twin's: shown once."""
    twin = rows.get(name.replace("[vote]", "[quality]")) if "[vote]" in name else None
    return twin is not None and abs(twin["accuracy"] - rows[name]["accuracy"]) < tol


def plot(task_name: str, rows: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"greedy": "black", "sample": "tab:gray", "beam": "tab:green", "phi": "tab:orange", "mfs": "tab:blue"}
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in rows.items():
        lo, hi = r["ci95"]
        ax.errorbar(r["gen_tokens"], r["accuracy"], yerr=[[r["accuracy"] - lo], [hi - r["accuracy"]]],
                    fmt="o" if r["rule"] == "quality" else "s", color=colors[r["family"]], capsize=3, alpha=0.8)
        if same_as_quality(rows, name, 0.004):
            continue  # the same point as its argmax-quality twin: one label
        label = name.replace(" [quality]", "") if r["rule"] == "quality" else name.replace(" [vote]", " (vote)")
        ax.annotate(label, (r["gen_tokens"], r["accuracy"]), fontsize=7, xytext=(5, -3 if r["rule"] == "vote" else 3),
                    textcoords="offset points")
    for fam, c in colors.items():
        ax.plot([], [], "o", color=c, label=fam)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("generated tokens per problem (log)")
    ax.set_ylabel("accuracy (test, 95% CI)")
    ax.set_title(f"{task_name}: accuracy vs tokens (o argmax quality, s majority vote)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"wrote {path}")


def markdown(res: dict) -> str:
    """The README table of a saved result (a vote row equal to its quality twin is omitted)."""
    rows, step = res["rows"], res["checkpoint_step"]
    val = (res.get("validation_greedy_accuracy") or {}).get(str(step))
    d = res.get("diagnostics") or {}
    out = [f"**{res['task']}** (checkpoint step {step}" + (f", validation greedy {val:.2f}" if val is not None else "")
           + f"; foresight AUROC {d.get('foresight_auroc') or float('nan'):.2f}, step-score AUROC "
           f"{d.get('step_score_auroc') or float('nan'):.2f})", "",
           "| method | accuracy [95% CI] | tokens / problem | forward row-tokens | pass@final |",
           "| --- | --- | --- | --- | --- |"]
    for name, x in rows.items():
        if same_as_quality(rows, name, 0.001):
            continue
        pk = x.get("pass_at_final", float("nan"))
        out.append(f"| {name.replace(' [quality]', '')} | {x['accuracy']:.3f} [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}] "
                   f"| {x['gen_tokens']:.0f} | {x['forward_tokens']:.0f} | {pk:.3f} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--workdir")
    ap.add_argument("--from_json", help="redraw --png from a saved result and print its README table")
    ap.add_argument("--step", type=int, default=None, help="default: chosen on validation (20–70% greedy)")
    ap.add_argument("--n", type=int, default=500, help="test problems")
    ap.add_argument("--n_val", type=int, default=200, help="validation problems for the checkpoint choice")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(MAIN),
                    help="comma-separated subset of: " + ", ".join(METHODS) + " (default: all but the ablations)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--json")
    ap.add_argument("--png")
    args = ap.parse_args(argv)
    if args.from_json:  # redraw the PNG and print the README table
        with open(args.from_json) as f:
            res = json.load(f)
        if args.png:
            plot(args.task, res["rows"], args.png)
        print(markdown(res))
        return
    if not args.workdir:
        raise SystemExit("error: --workdir is required")

    from bench import evaluate as ev
    from spark import tasks
    from spark.train import load_checkpoint
    from spark.train_lib import graphdef_of

    task = tasks.get(args.task)
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown methods {unknown}; choose from {list(METHODS)}")
    val_acc = None
    step = args.step
    if step is None:
        step, val_acc = ev.select_checkpoint(args.workdir, task, n=args.n_val, progress=True)
        print(f"validation greedy accuracy by step: {val_acc}")
        if step is None:
            raise SystemExit("error: no checkpoint has validation greedy accuracy in [0.2, 0.7]; pass --step")
    cfg, params, step = load_checkpoint(args.workdir, step)
    graphdef = graphdef_of(cfg)
    insts, prompts, lengths = ev.problems(task, "test", args.n)
    runs, diag = {}, None
    t_start = time.time()
    for label in methods:
        scfg = ev.search_config(task, **METHODS[label])
        n_seeds = 1 if label == "greedy" else args.seeds
        runs[label] = [ev.evaluate(graphdef, params, task, insts=insts, prompts=prompts, lengths=lengths, cfg=scfg,
                                   seed=s, batch=args.batch, progress=True, keep_trace=label == DIAGNOSED and s == 0)
                       for s in range(n_seeds)]
        print(f"{label}: accuracy quality {np.mean([r['correct_quality'].mean() for r in runs[label]]):.3f} "
              f"vote {np.mean([r['correct_vote'].mean() for r in runs[label]]):.3f}, tokens "
              f"{np.mean([r['gen_tokens'].mean() for r in runs[label]]):.1f} ({time.time() - t_start:.0f}s)")
        if label == DIAGNOSED:
            nostop = ev.evaluate(graphdef, params, task, insts=insts, prompts=prompts, lengths=lengths,
                                 cfg=ev.search_config(task, **METHODS[label], early_stop=False), seed=0,
                                 batch=args.batch)
            diag = diagnostics(task, insts, runs[label][0], nostop)
            print(f"diagnostics: {diag}")
    rows = summarize(runs)
    paired = compare(rows)
    for name, r in rows.items():
        print(f"{name:28s} acc {r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]  tokens "
              f"{r['gen_tokens']:8.1f}  forward {r['forward_tokens']:8.1f}  pass@final {r['pass_at_final']:.3f}")
    for name, c in paired.items():
        print(f"{name} vs {c.get('vs')}: diff {c.get('diff', 0):+.3f} [{c.get('lo', 0):+.3f}, {c.get('hi', 0):+.3f}] "
              f"p={c.get('p_a_not_better', 1):.3f}, tokens ×{c.get('tokens_ratio', 0):.2f}")
    if args.png:
        plot(args.task, rows, args.png)
    write_json(args.json, {
        "task": args.task, "workdir": args.workdir, "checkpoint_step": step, "validation_greedy_accuracy": val_acc,
        "n_test": args.n, "seeds": args.seeds, "methods": {k: METHODS[k] for k in methods},
        "rows": {k: {f: v for f, v in r.items() if not f.startswith("_")} for k, r in rows.items()},
        "paired": paired, "diagnostics": diag, "seconds": time.time() - t_start})


if __name__ == "__main__":
    main()
