"""Multi-draft vs single-draft speculative decoding at equal target tokens per verify forward.

    python bench/multidraft.py [--workdir runs/bench_lm] [--budgets 4,8,16] [--new_tokens 96]
                               [--rounds 3] [--temperature 0.8] [--proj_layers 2]
                               [--json bench/results/multidraft.json] [--png bench/results/multidraft.png]
    python bench/multidraft.py --task countdown --prompts 32 --new_tokens 24   # a reasoning model

With --task, the default workdir is runs/reasoning_TASK_matformer (configs/reasoning_countdown_matformer.py),
the prompts are the task's first test problems, each generated to its EOS, the share each method
solves is reported beside its speed (every method is lossless, so it matches plain sampling up to
noise), and results go to bench/results/multidraft_TASK.{json,png}. That model is tiny: its step
is bound by dispatch, not bytes, so its tokens/s say little; its block efficiency is the measurement.

On a trained MatFormer checkpoint (default runs/bench_lm: configs/bench_lm.py, whose batch-1 step
is bound by weight bytes; `python bench/bench_lm.py` shows it), batch 1, the F/8 self-draft, for
each budget B (draft tokens per round; every method's verify forward holds B + 1 target tokens):
single-draft γ = B (decode/speculative.py), SpecTr k = 2 and 4 rows of B/k tokens, RSD-C with a
wide (4, 1, …) and a deep (2, 1, …) branching vector of B nodes, RSD-S with beam 2 and 4 and depth
B/beam (decode/multidraft.py); plain decoding as the baseline. All variants run the same prompts
and seeds, interleaved round by round in one process.

Reported per method and budget: block efficiency (tokens emitted per target forward), its alpha*
reference (1 + a_1 + a_1 a_2 + ..., a_d the optimal acceptance of as many i.i.d. drafts as the
method verifies below a node at depth d, averaged over teacher-forced held-out positions; not a
strict bound, positions are not independent), measured tokens/s and speedup over plain
(medians), and the speedup predicted from the measured block
efficiency and separately measured forward costs (a t-token forward at full and F/8 width, looped
in one jit over the prompt's cache; the trees' as tree blocks of a (B + 1)-node round):
E · t_plain / (Σ_depths t_draft(nodes at that depth) + t_verify(B + 1)); the gap between the two
is what the decoding machinery (sampling, verification, commit, the loop) costs beyond forwards.
JSON fields `block_efficiency`, `multidraft_vs_single_at_equal_budget` (best
multi-draft / single-draft block efficiency per budget and overall), `speedup_best` (the best
measured lossless speedup), `acceptance` (alpha*_k and K-SEQ's acceptance per k); PNG: block
efficiency vs budget.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import BENCH_LM_CMD, interleaved, require_checkpoint, write_json  # noqa: E402
from bench.speculative import PROMPTS, _looped_forward  # noqa: E402
from decode import generate as gen  # noqa: E402
from decode import multidraft as md_lib  # noqa: E402
from decode import speculative as spec  # noqa: E402
from decode import verify  # noqa: E402
from decode.multidraft import MultiDraftConfig  # noqa: E402
from decode.sampling import SamplerConfig  # noqa: E402
from spark import train_lib  # noqa: E402
from spark.data.pipeline import get_tokenizer  # noqa: E402
from spark.matformer import cut_ffn  # noqa: E402
from spark.train import load_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK_CMD = ("python train.py --config configs/reasoning_countdown_matformer.py "
            "--workdir runs/reasoning_countdown_matformer")


def methods(budget: int, draft_widths) -> dict:
    """name -> SpecConfig | MultiDraftConfig with `budget` draft tokens per round."""
    out = {"single": spec.SpecConfig(draft_widths=draft_widths, gamma=budget)}
    for k in (2, 4):
        if budget % k == 0 and budget // k >= 1:
            out[f"spectr k={k}"] = MultiDraftConfig("spectr", draft_widths, drafts=k, length=budget // k)
    for name, b in (("wide", 4), ("deep", 2)):
        if budget % b == 0:
            out[f"rsd_c {name}"] = MultiDraftConfig("rsd_c", draft_widths, branching=(b,) + (1,) * (budget // b - 1))
    for w in (2, 4):
        if budget % w == 0:
            out[f"rsd_s W={w}"] = MultiDraftConfig("rsd_s", draft_widths, beam=w, depth=budget // w)
    return out


def draft_blocks(cfg) -> list[int]:
    """Tokens of each draft forward of a round (one per depth)."""
    if isinstance(cfg, spec.SpecConfig):
        return [1] * cfg.gamma
    return [len(ids) for ids in cfg.levels[:-1]]


def children(cfg) -> list[int]:
    """Candidates verified below an accepted node at each depth, at most: 1 (single), k (SpecTr:
    fewer once rows stop matching), the branching vector (RSD-C), W (RSD-S: the beam's nodes may
    all sit under the accepted one)."""
    if isinstance(cfg, spec.SpecConfig):
        return [1] * cfg.gamma
    if cfg.method == "spectr":
        return [cfg.drafts] * cfg.length
    return list(cfg.branching) if cfg.method == "rsd_c" else [cfg.beam] * cfg.depth


def acceptance(cfg, graphdef, params, draft_widths, sampler, ks, rows=8):
    """Per-position acceptance on held-out text, teacher-forced (full-width p, F/8 q, processed as
    the sampler does), averaged over positions, for each k: alpha*_k (the optimal acceptance of k
    i.i.d. drafts, any verifier) and K-SEQ's 1 - (1 - beta(rho*))^k (k = 1: both are 1 - TV)."""
    from flax import nnx

    from decode.sampling import processed_logprobs
    from spark.data.pipeline import make_dataset

    batch = next(iter(make_dataset(cfg.data, cfg.data.eval_split, seq_len=cfg.train.seq_len, batch_size=rows,
                                   seed=0, train=False)))

    @jax.jit
    def laws(params, tokens, positions, segments):
        model = nnx.merge(graphdef, params)
        out = []
        for w in (None, draft_widths):
            logits, _ = model(tokens, positions, widths=w, segment_ids_BT=segments)
            out.append(jnp.exp(processed_logprobs(logits.reshape(-1, logits.shape[-1]), sampler)))
        return out

    p, q = laws(params, *(jnp.asarray(batch[k]) for k in ("inputs", "positions", "segment_ids")))
    keep = np.asarray(batch["loss_mask"]).reshape(-1) > 0
    p, q = p[keep], q[keep]
    out = {k: {"alpha_star": float(jnp.mean(_per_position(verify.optimal_acceptance, p, q, k))),
               "kseq": float(jnp.mean(_per_position(_kseq_acceptance, p, q, k)))} for k in ks}
    return {"positions": int(keep.sum()), "per_k": out}


def _kseq_acceptance(p_V, q_V, k):
    rho = verify.kseq_rho(p_V, q_V, k)
    return 1.0 - (1.0 - jnp.sum(jnp.minimum(q_V, p_V / rho))) ** k


@functools.partial(jax.jit, static_argnums=(0, 3))
def _per_position(fn, p_NV, q_NV, k):
    return jax.vmap(lambda a, b: fn(a, b, k))(p_NV, q_NV)


def load_self_drafting(args):
    """(cfg, params, step) of args.workdir, or exit with the command that trains it (the countdown
    MatFormer model with --task, else runs/bench_lm) — also when it has no F/8 MatFormer prefix."""
    cmd = TASK_CMD if args.task else BENCH_LM_CMD
    require_checkpoint(args.workdir, cmd, minutes=35 if args.task else 45)
    cfg, params, step = load_checkpoint(args.workdir, None)
    if cfg.train.matformer_mode == "off" or 8 not in cfg.model.matformer.divisors:
        sys.exit(f"{args.workdir} was not trained with MatFormer widths down to F/8 (train.matformer_mode="
                 f"{cfg.train.matformer_mode!r}): its F/8 prefix is no draft model. Train one, e.g.\n  {cmd}")
    return cfg, params, step


def prompts_of(args, tok):
    """(encoded prompts, EOS id, (task, instances) or None): the first `--prompts` code openings
    of bench/speculative.py, generated to exactly `--new_tokens` (no EOS); or, with `--task`, the
    first test problems of that task, each generated to its EOS (at most `--new_tokens`)."""
    if not args.task:
        return [list(tok.encode(p, bos=True)) for p in PROMPTS[:args.prompts]], -1, None
    from spark import tasks

    task = tasks.get(args.task)
    insts = [tasks.instance(task, "test", i) for i in range(args.prompts)]
    return [list(tok.encode(x.prompt, bos=True)) for x in insts], tok.eos_id, (task, insts)


def solved_share(problems, outputs) -> float:
    """The share of the problems whose generated solution (cut at the row's length) the task verifies."""
    task, insts = problems
    return float(np.mean([task.verify(x, o[0][0, :o[1][0]]) for x, o in zip(insts, outputs, strict=True)]))


def ceiling(alphas: list[float]) -> float:
    """Tokens per target forward if the path's node at depth d were accepted with probability
    alphas[d - 1], independently of the others: 1 + a_1 + a_1 a_2 + ... (the bonus included)."""
    return float(1.0 + np.sum(np.cumprod(alphas)))


def measure(args):
    cfg, params, step = load_self_drafting(args)
    tok = get_tokenizer(cfg.data, args.workdir)
    graphdef = train_lib.graphdef_of(cfg)
    dw = cfg.model.granularity_widths(8)
    encoded, eos_id, problems = prompts_of(args, tok)
    common = dict(max_new_tokens=args.new_tokens, sampler=SamplerConfig(args.temperature), eos_id=eos_id,
                  pad_id=tok.pad_id)
    width = max(map(len, encoded))
    inputs = [(params, jnp.asarray([e + [tok.pad_id] * (width - len(e))], jnp.int32),
               jnp.asarray([len(e)], jnp.int32), jax.random.key(i)) for i, e in enumerate(encoded)]
    budgets = [int(x) for x in args.budgets.split(",")]
    fns, confs, eff = {"plain": functools.partial(gen.generate, graphdef, **common)}, {}, {}
    outputs = {"plain": [jax.device_get(fns["plain"](*x)) for x in inputs]}
    for b in budgets:
        for name, c in methods(b, dw).items():
            key = f"{name} B={b}"
            fn = (functools.partial(spec.generate, graphdef, spec=c, **common) if isinstance(c, spec.SpecConfig)
                  else functools.partial(md_lib.generate, graphdef, md=c, **common))
            outputs[key] = [jax.device_get(fn(*x)) for x in inputs]
            st = [o[2] for o in outputs[key]]
            eff[key] = float(np.sum([s["tokens_per_round"] * s["rounds"].sum() for s in st])
                             / np.sum([s["rounds"].sum() for s in st]))
            fns[key], confs[key] = fn, (name, b, c)
            print(f"{key}: {eff[key]:.2f} tokens per target forward", flush=True)
    new_tokens = {k: float(np.mean([o[1].sum() for o in v])) for k, v in outputs.items()}  # < --new_tokens: EOS
    solved = {k: solved_share(problems, v) for k, v in outputs.items()} if problems else {}
    acc = acceptance(cfg, graphdef, params, dw, common["sampler"],
                     sorted({k for _, _, c in confs.values() for k in children(c)}))
    print("per-position acceptance (teacher-forced, held-out): " + ", ".join(
        f"k={k}: alpha* {v['alpha_star']:.3f} K-SEQ {v['kseq']:.3f}" for k, v in acc["per_k"].items()), flush=True)
    timing = interleaved({n: (f, inputs, len(inputs)) for n, f in fns.items()}, args.rounds)
    costs = forward_costs(cfg.model, graphdef, params, dw, budgets, confs, width, args.rounds)
    plain_tps = new_tokens["plain"] / timing["plain"]["median_s"]
    t_step = costs["full T=1"]
    rows = {}
    for key, (name, b, c) in confs.items():
        tps = new_tokens[key] / timing[key]["median_s"]
        t_round = round_forwards_s(costs, c, b)
        rows[key] = {"method": name, "budget": b, "block_efficiency": eff[key],
                     "alpha_star_ceiling": ceiling([acc["per_k"][k]["alpha_star"] for k in children(c)]),
                     "tokens_per_s": tps, "speedup": tps / plain_tps,
                     "predicted_speedup": eff[key] * t_step / t_round,
                     "samples_s": timing[key]["samples_s"]} | ({"solved": solved[key]} if solved else {})
    out = summarize(args, step, rows, costs, plain_tps) | {"acceptance": acc}
    if problems:
        out |= {"task": args.task, "problems": len(problems[1]), "plain_solved": solved["plain"]}
    if args.proj_layers:
        out["projection_2b"] = project_2b(args, confs, eff, budgets)
    return out


def project_2b(args, confs, eff, budgets):
    """The measured block efficiency with forward costs timed at the Gemma-2-2B shapes (random
    weights, `--proj_layers` of 26 layers scaled to 26, bench/speculative.py: forward_costs): a
    verify block of B + 1 tokens and draft blocks of each depth's node count, timed as linear blocks
    of that size (a tree's mask changes which keys a token sees, not the matmuls)."""
    from bench.speculative import draft_key, forward_costs

    sizes = sorted({n for _, _, c in confs.values() for n in draft_blocks(c)})
    costs = forward_costs(args.proj_layers, budgets, [8], reps=4, rounds=args.rounds, draft_sizes=sizes)
    c = costs["projected_26_layers_s"]
    speedup = {}
    for kind in ("dense", "spark"):
        for key, (_, b, conf) in confs.items():
            verify_s = min(v for k, v in c.items() if k.startswith(f"{kind} verify γ={b}"))
            draft_s = sum(c[draft_key(kind, 8, n)] for n in draft_blocks(conf))
            speedup[f"{kind} {key}"] = eff[key] * c[f"{kind} target"] / (draft_s + verify_s)
    best = {kind: max((k for k in speedup if k.startswith(kind)), key=speedup.get) for kind in ("dense", "spark")}
    return {"costs": costs, "speedup": speedup, "best": {k: [v, speedup[v]] for k, v in best.items()}}


def forward_costs(model_cfg, graphdef, params, draft_widths, budgets, confs, prompt_len, rounds, reps=8):
    """Seconds per forward of a t-token block after the prompt: the target at t = 1 (plain decoding)
    and t = B + 1 (single-draft verify), the F/8 draft at t = 1; for the trees, the same blocks as
    tree blocks of a (B + 1)-node round ("tree" keys: the ancestor mask and scratch slots cost what
    they cost in decoding), the target at t = B + 1 and the draft at every depth's node count."""
    from spark import cache as kv_cache

    cache = kv_cache.init(model_cfg, 1, prompt_len + 64, slack=32)
    cache = cache.replace(lengths=jnp.full((1,), prompt_len, jnp.int32))
    run = functools.partial(_looped_forward, graphdef, reps=reps, start=prompt_len, vocab=model_cfg.vocab_size)
    draft_params = cut_ffn(params, model_cfg, draft_widths)
    variants = {f"full T={t}": (jax.jit(functools.partial(run, t=t, widths=None, sparse=True)), [(params, cache)], 1)
                for t in sorted({1, *(b + 1 for b in budgets)})}
    variants["draft T=1"] = (jax.jit(functools.partial(run, t=1, widths=draft_widths, sparse=True)),
                             [(draft_params, cache)], 1)
    for b in budgets:
        variants[f"tree full T={b + 1} N={b + 1}"] = (
            jax.jit(functools.partial(run, t=b + 1, tree_nodes=b + 1, widths=None, sparse=True)), [(params, cache)], 1)
        sizes = {n for _, bb, c in confs.values() if bb == b and isinstance(c, MultiDraftConfig)
                 for n in draft_blocks(c)}
        for t in sorted(sizes):
            variants[f"tree draft T={t} N={b + 1}"] = (
                jax.jit(functools.partial(run, t=t, tree_nodes=b + 1, widths=draft_widths, sparse=True)),
                [(draft_params, cache)], 1)
    return {k: v["median_s"] / reps for k, v in interleaved(variants, rounds).items()}


def round_forwards_s(costs, conf, b) -> float:
    """The forwards of one round: a draft forward per depth, then the verify."""
    if isinstance(conf, spec.SpecConfig):
        return conf.gamma * costs["draft T=1"] + costs[f"full T={b + 1}"]
    return (sum(costs[f"tree draft T={n} N={b + 1}"] for n in draft_blocks(conf))
            + costs[f"tree full T={b + 1} N={b + 1}"])


def summarize(args, step, rows, costs, plain_tps):
    budgets = sorted({r["budget"] for r in rows.values()})
    eff = {}
    for r in rows.values():
        eff.setdefault(r["method"], {})[r["budget"]] = r["block_efficiency"]
    ratio = {}
    for b in budgets:
        multi = max(v[b] for m, v in eff.items() if m != "single" and b in v)
        ratio[b] = multi / eff["single"][b]
    best = max(rows.values(), key=lambda r: r["speedup"])
    return {"checkpoint": args.workdir, "checkpoint_step": step, "temperature": args.temperature,
            "new_tokens": args.new_tokens, "prompts": args.prompts, "plain_tokens_per_s": plain_tps, "rows": rows,
            "block_efficiency": eff, "multidraft_vs_single_at_equal_budget": {"per_budget": ratio,
                                                                             "best": max(ratio.values())},
            "speedup_best": {"method": best["method"], "budget": best["budget"], "speedup": best["speedup"],
                             "predicted_speedup": best["predicted_speedup"]},
            "forward_s": costs}


def print_table(r):
    task = f", {r['task']}: {r['problems']} test problems, plain solves {r['plain_solved']:.2f}" if "task" in r else ""
    print(f"\n{r['checkpoint']} (step {r['checkpoint_step']}), T = {r['temperature']}, batch 1, "
          f"plain {r['plain_tokens_per_s']:.0f} tokens/s{task}")
    print(f"{'method':>14} {'B':>3} {'tokens/fwd':>10} {'α* ref':>7} {'tokens/s':>9} {'speedup':>8} "
          f"{'predicted':>9}" + (f" {'solved':>6}" if task else ""))
    for row in r["rows"].values():
        print(f"{row['method']:>14} {row['budget']:>3} {row['block_efficiency']:10.2f} "
              f"{row['alpha_star_ceiling']:7.2f} {row['tokens_per_s']:9.0f} {row['speedup']:7.2f}x "
              f"{row['predicted_speedup']:8.2f}x" + (f" {row['solved']:6.2f}" if task else ""))
    m = r["multidraft_vs_single_at_equal_budget"]
    print("best multi-draft / single-draft tokens per target forward: "
          + ", ".join(f"B={b}: {v:.2f}" for b, v in m["per_budget"].items()))
    s = r["speedup_best"]
    print(f"fastest: {s['method']} B={s['budget']}, {s['speedup']:.2f}x measured, {s['predicted_speedup']:.2f}x "
          "predicted")
    if "projection_2b" in r:
        p = r["projection_2b"]
        print("projected at 2B shapes (this block efficiency, forward costs timed at 2B shapes): " + ", ".join(
            f"{kind} target best {name[len(kind) + 1:]} {v:.2f}x" for kind, (name, v) in p["best"].items()))


def plot(r, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, by_b in r["block_efficiency"].items():
        by_b = {int(k): v for k, v in by_b.items()}  # JSON keys are strings
        b = sorted(by_b)
        ax.plot(b, [by_b[x] for x in b], marker="o", label=method, lw=2.5 if method == "single" else 1.2)
    ax.set(xlabel="draft tokens per round B (verify forward = B + 1 tokens)", ylabel="tokens per target forward",
           title=f"block efficiency, {os.path.basename(r['checkpoint'])} T={r['temperature']}")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench_lm"))
    ap.add_argument("--budgets", default="4,8,16")
    ap.add_argument("--task", help="prompts from this reasoning task's test split (spark/tasks), generated to EOS")
    ap.add_argument("--prompts", type=int, default=5, help="how many prompts (text: at most 5)")
    ap.add_argument("--new_tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--proj_layers", type=int, default=2, help="layers timed at 2B shapes (0: no projection)")
    ap.add_argument("--json", help="default bench/results/multidraft[_TASK].json")
    ap.add_argument("--png", help="default bench/results/multidraft[_TASK].png")
    ap.add_argument("--from_json", help="only re-draw the PNG from this results JSON")
    args = ap.parse_args(argv)
    stem = os.path.join(ROOT, "bench", "results", "multidraft" + (f"_{args.task}" if args.task else ""))
    args.json, args.png = args.json or stem + ".json", args.png or stem + ".png"
    if not args.task and not 1 <= args.prompts <= len(PROMPTS):
        ap.error(f"--prompts must be in 1..{len(PROMPTS)} without --task, got {args.prompts}")
    if args.task and args.workdir == ap.get_default("workdir"):
        args.workdir = os.path.join(ROOT, "runs", f"reasoning_{args.task}_matformer")
    if args.from_json:
        with open(args.from_json) as f:
            return plot(json.load(f), args.png)
    r = measure(args)
    print_table(r)
    write_json(args.json, r)
    plot(r, args.png)


if __name__ == "__main__":
    main()
