"""Draft policies on a trained MatFormer checkpoint: BiLD's speed/quality frontier (batch 1) and
goodput-chosen speculation under batching.

    python bench/policies.py [--workdir runs/bench_lm] [--fallbacks 0.1,0.2,0.3,0.5,0.7,0.9] [--rollbacks 2,3,5]
                             [--batches 1,4,16] [--new_tokens 64] [--rounds 3]
    python bench/policies.py --task countdown --prompts 32 --new_tokens 24 --batches ""   # BiLD on a task

Part 1, BiLD (decode/bild.py; greedy, as the paper; little = F/8, max_little_steps 10), one prompt at
a time, each (α_FB, α_RB) of the grid and plain full-width greedy decoding interleaved round by
round. Quality, from one teacher-forced full-width forward over each prompt + BiLD's output: the
token match rate (the share of BiLD's tokens equal to the full-width argmax given BiLD's own
prefix) and the full-width mean log-likelihood (T = 1) of BiLD's tokens; with --task, the share
of test problems solved. Speed: tokens/s and the speedup over plain, against a bound implied by
the measured step costs — plain decoding's seconds per token at full width and at the little
widths (timed in the same rounds) — and the counts: the same tokens if every little step (kept or
discarded) cost a little decode step and every big forward a big one (a verify block of several
tokens costs at least that).

Part 2, goodput (decode/goodput.py; sampled at --temperature, lossless), for each batch size B
(rows: the prompts cycled): plain decoding (γ = 0), fixed γ = 1 and 3, the adaptive-threshold stop
(γ_max 3, h = 0.5) and γ chosen per round by goodput (γ_max 3, the round costs measured at that B,
reported), interleaved. Reported: tokens/s per variant, goodput vs the best fixed γ, the γ it chose
(histogram), each decoder's compile time and the seconds of the cost measurement (goodput's compile
is in them: the decode reuses it). Then the same choice with round costs timed at the
Gemma-2-2B shapes per batch size (`--proj_layers` layers + the head, scaled; a projection: the
acceptance is this model's, the mean of the JSON's goodput runs; `--parts goodput_2b` runs it alone).

JSON fields `bild` (rows per (α_FB, α_RB)), `goodput` (per B), `goodput_2b`; PNG: the BiLD frontier
(speedup vs token match, with the bound) and, per B, tokens/s of each variant relative to plain.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import interleaved, write_json  # noqa: E402
from bench.multidraft import load_self_drafting, prompts_of, solved_share  # noqa: E402
from bench.speculative import PROMPTS  # noqa: E402
from decode import bild as bild_lib  # noqa: E402
from decode import generate as gen  # noqa: E402
from decode import goodput as gp  # noqa: E402
from decode import goodput_costs  # noqa: E402
from decode import speculative as spec  # noqa: E402
from decode.sampling import SamplerConfig  # noqa: E402
from spark import train_lib  # noqa: E402
from spark.data.pipeline import get_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GREEDY = SamplerConfig(0.0)


def padded(encoded, pad_id):
    width = max(map(len, encoded))
    return (jnp.asarray([e + [pad_id] * (width - len(e)) for e in encoded], jnp.int32),
            jnp.asarray([len(e) for e in encoded], jnp.int32))


def quality(graphdef, params, prompt, out_ids):
    """(token match rate, mean full-width log-likelihood) of generated ids after a prompt."""
    seq = jnp.asarray([list(prompt) + list(out_ids)], jnp.int32)
    logits, _ = nnx.merge(graphdef, params)(seq, jnp.arange(seq.shape[1])[None])
    logp = jax.nn.log_softmax(logits[0, len(prompt) - 1 : -1].astype(jnp.float32), -1)
    ids = jnp.asarray(out_ids)
    return (float(jnp.mean(jnp.argmax(logp, -1) == ids)),
            float(jnp.mean(jnp.take_along_axis(logp, ids[:, None], -1))))


def bild_grid(args, cfg, graphdef, params, tok):
    encoded, eos_id, problems = prompts_of(args, tok)
    lw = cfg.model.granularity_widths(8)
    inputs = [(params, *padded([e], tok.pad_id), jax.random.key(i)) for i, e in enumerate(encoded)]
    common = dict(max_new_tokens=args.new_tokens, sampler=GREEDY, eos_id=eos_id, pad_id=tok.pad_id)
    fns = {"plain": functools.partial(gen.generate, graphdef, **common),
           "plain little": functools.partial(gen.generate, graphdef, widths=lw, **common)}  # the bound's step
    grid = [(float(f), float(r)) for f in args.fallbacks.split(",") for r in args.rollbacks.split(",")]
    bild = functools.partial(bild_lib.generate, graphdef, bild=bild_lib.BiLDConfig(lw, 0.5, 1.0, args.max_little_steps),
                             **common)  # one compile: the thresholds are traced arguments
    for fb, rb in grid:
        fns[f"bild fb={fb} rb={rb}"] = functools.partial(bild, thresholds=jnp.asarray([fb, rb], jnp.float32))
    outs = {k: [jax.device_get(f(*x)) for x in inputs] for k, f in fns.items()}
    print("BiLD: compiled", len(fns), "variants", flush=True)
    timing = interleaved({n: (f, inputs, len(inputs)) for n, f in fns.items()}, args.rounds)
    tokens = {k: float(np.mean([o[1][0] for o in v])) for k, v in outs.items()}
    costs = {m: timing[k]["median_s"] / tokens[k] for m, k in (("big", "plain"), ("little", "plain little"))}
    plain_tps = tokens["plain"] / timing["plain"]["median_s"]
    rows = {}
    for name, out in outs.items():
        if name == "plain little":
            continue
        q = [quality(graphdef, params, e, o[0][0, : o[1][0]]) for e, o in zip(encoded, out, strict=True)]
        tps = tokens[name] / timing[name]["median_s"]
        row = {"tokens_per_s": tps, "speedup": tps / plain_tps, "token_match": float(np.mean([m for m, _ in q])),
               "loglik": float(np.mean([ll for _, ll in q]))}
        if problems:
            row["solved"] = solved_share(problems, out)
        if name != "plain":
            st = [o[2] for o in out]
            little_steps = sum(int(s["drafted"].sum() + s["fallbacks"].sum()) for s in st)  # discarded ones too
            big = sum(int(s["rounds"].sum()) for s in st)
            emitted = sum(int(o[1][0]) - 1 for o in out)  # after the prefill's token, which plain emits too
            bound_s = little_steps * costs["little"] + big * costs["big"]
            row |= {"fallback": fb_rb(name), "little_share": float(np.mean([s["little_share"] for s in st])),
                    "fallbacks_per_token": sum(int(s["fallbacks"].sum()) for s in st) / emitted,
                    "rollbacks_per_token": sum(int(s["rollbacks"].sum()) for s in st) / emitted,
                    "speedup_bound": emitted * costs["big"] / bound_s}
        rows[name] = row
        print(f"{name}: {row['speedup']:.2f}x, match {row['token_match']:.3f}", flush=True)
    return {"step_s": costs, "rows": rows, "plain_tokens_per_s": plain_tps}


def fb_rb(name):
    fb, rb = name.split()[1:]
    return [float(fb[3:]), float(rb[3:])]


GAMMA_MAX = 3
GOODPUT_VARIANTS = ("goodput", "goodput per-row", "goodput tokens")


def tokens_objective(sc):
    return dataclasses.replace(sc, goodput=dataclasses.replace(sc.goodput, objective="tokens"))


def per_row(sc):
    return dataclasses.replace(sc, goodput=dataclasses.replace(sc.goodput, shrink=False))


def goodput_sweep(args, cfg, graphdef, params, tok):
    """Per batch size: plain (γ = 0), fixed γ = 1 and 3, the adaptive-threshold stop (γ_max 3,
    h = 0.5) and goodput (γ_max 3, round costs measured at that batch) by the batch's projected
    finish time ("goodput"; "goodput per-row": by the rows' own acceptance estimates, unshrunk) and by
    SmartSpec's summed tokens per second ("goodput tokens"), interleaved."""
    encoded = [list(tok.encode(p, bos=True)) for p in PROMPTS]
    dw = cfg.model.granularity_widths(8)
    sampler = SamplerConfig(args.temperature)
    common = dict(max_new_tokens=args.new_tokens, sampler=sampler, eos_id=-1, pad_id=tok.pad_id)
    out = {}
    for b in [int(x) for x in args.batches.split(",") if x]:
        arr, lengths = padded([encoded[i % len(encoded)] for i in range(b)], tok.pad_id)
        auto = spec.SpecConfig(dw, gamma=GAMMA_MAX, goodput=gp.GoodputConfig((1.0,) * (GAMMA_MAX + 1)))
        t0 = time.perf_counter()
        costs, switch = goodput_costs.measure_costs(graphdef, params, arr, lengths, spec=auto, **common)
        measure_s = time.perf_counter() - t0
        sc = {"γ=1": spec.SpecConfig(dw, gamma=1), "γ=3": spec.SpecConfig(dw, gamma=3),
              "adaptive h=0.5": spec.SpecConfig(dw, gamma=GAMMA_MAX, adaptive_threshold=0.5),
              "goodput": goodput_costs.with_costs(auto, costs, switch),
              "goodput per-row": goodput_costs.with_costs(per_row(auto), costs, switch),
              "goodput tokens": goodput_costs.with_costs(tokens_objective(auto), costs, switch)}
        variants = {"plain": functools.partial(gen.generate, graphdef, **common)}
        variants |= {n: functools.partial(spec.generate, graphdef, spec=c, **common) for n, c in sc.items()}
        inputs = [(params, arr, lengths, jax.random.key(i)) for i in range(max(2, -(-args.paths // b)))]
        first_s = {}
        for name, f in variants.items():  # the first call compiles
            t0 = time.perf_counter()
            jax.block_until_ready(f(*inputs[0]))
            first_s[name] = time.perf_counter() - t0
        hist, est = {}, {}
        for name in GOODPUT_VARIANTS:
            st = [jax.device_get(variants[name](*x)[2]) for x in inputs]
            chosen = np.concatenate([s["gamma_chosen"] for s in st])
            hist[name] = np.bincount(chosen[chosen >= 0], minlength=GAMMA_MAX + 1).tolist()
            est[name] = float(np.mean([s["acceptance_estimate"] for s in st]))
        timing = interleaved({n: (f, inputs, len(inputs)) for n, f in variants.items()}, args.rounds)
        tps = {n: b * args.new_tokens / t["median_s"] for n, t in timing.items()}
        best_name = max(("plain", "γ=1", "γ=3"), key=tps.get)
        best = tps[best_name]
        paired = {n: float(np.median(np.divide(timing[best_name]["samples_s"], timing[n]["samples_s"])))
                  for n in GOODPUT_VARIANTS}  # per-round ratios: robust to the machine's drift
        out[b] = {"round_costs_s": list(costs), "switch_cost_s": switch, "keys": len(inputs), "tokens_per_s": tps,
                  "speedup": {n: v / tps["plain"] for n, v in tps.items()},
                  "goodput_vs_best_fixed": tps["goodput"] / best,
                  "goodput_tokens_vs_best_fixed": tps["goodput tokens"] / best,
                  "best_fixed": best_name, "goodput_vs_best_fixed_paired": paired["goodput"],
                  "goodput_tokens_vs_best_fixed_paired": paired["goodput tokens"],
                  "goodput_per_row_vs_best_fixed": tps["goodput per-row"] / best,
                  "goodput_per_row_vs_best_fixed_paired": paired["goodput per-row"],
                  "gamma_histogram_per_row": hist["goodput per-row"],
                  "gamma_histogram": hist["goodput"], "gamma_histogram_tokens": hist["goodput tokens"],
                  "mean_gamma": float(np.dot(hist["goodput"], range(GAMMA_MAX + 1)) / sum(hist["goodput"])),
                  "acceptance_estimate": est["goodput"],
                  "compile_s": {n: t - timing[n]["median_s"] for n, t in first_s.items()},
                  "cost_measure_s": measure_s}  # goodput's compile is in it: its first call above reuses it
        print(f"B={b}: " + ", ".join(f"{n} {v:.2f}x" for n, v in out[b]["speedup"].items())
              + f"; goodput / best fixed ({best_name}) {tps['goodput'] / best:.3f} (per-round pairs "
              + f"{paired['goodput']:.3f}); goodput γ histogram {hist['goodput']} "
              + f"(per-row {hist['goodput per-row']} at {tps['goodput per-row'] / best:.3f}, tokens objective "
              + f"{hist['goodput tokens']}), round costs "
              + ", ".join(f"{c * 1e3:.1f}" for c in costs) + f" ms, a change of γ and back {switch * 1e3:.2f} ms, "
              + f"{len(inputs)} keys", flush=True)
    return out


def project_2b(batches, alpha, layers, rounds, new_tokens):
    """Goodput's choice with the round costs of the Gemma-2-2B shapes (dense target, F/8 draft;
    bench/speculative.py: forward_costs at each batch size, `layers` of 26 layers and the head,
    a 256-token cache) and the acceptance measured here: per batch size the round costs, the
    projected tokens/s of each fixed γ (B · new_tokens / (cost(γ) · projected rounds to finish the
    batch), decode/goodput.py) and the γ goodput picks."""
    from bench.speculative import draft_key, forward_costs

    out = {}
    for b in batches:
        c = forward_costs(layers, list(range(1, GAMMA_MAX + 1)), [8], reps=2, rounds=rounds, prompt_len=256,
                          batch=b, kinds=("dense",))["projected_26_layers_s"]
        costs = [c["dense target"]] + [g * c[draft_key("dense", 8)] + c[f"dense verify γ={g}"]
                                       for g in range(1, GAMMA_MAX + 1)]
        a_B, live_B, left_B = jnp.full((b,), alpha), jnp.ones((b,), bool), jnp.full((b,), new_tokens)
        rounds_G = np.asarray(gp.projected_rounds(a_B, left_B, live_B, GAMMA_MAX, new_tokens))
        pick = int(gp.choose_gamma(a_B, live_B, left_B, jnp.asarray(costs, jnp.float32), "finish", new_tokens))
        out[b] = {"round_costs_s": costs,
                  "tokens_per_s": {g: float(b * new_tokens / (costs[g] * rounds_G[g])) for g in range(len(costs))},
                  "goodput_gamma": pick}
        print(f"2B shapes, B={b}: round costs " + ", ".join(f"{x * 1e3:.0f}" for x in costs)
              + f" ms for γ = 0..{GAMMA_MAX}; goodput picks γ = {pick}", flush=True)
    return out


def plot(r, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 + bool(r.get("goodput"))
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0, 0]
    rows = [v for k, v in r["bild"]["rows"].items() if k != "plain"]
    sc = ax.scatter([v["token_match"] for v in rows], [v["speedup"] for v in rows],
                    c=[v["fallback"][0] for v in rows], cmap="viridis", label="measured")
    ax.scatter([v["token_match"] for v in rows], [v["speedup_bound"] for v in rows], marker="_", c="grey",
               label="bound from step costs")
    ax.axhline(1.0, color="k", lw=0.5)
    fig.colorbar(sc, ax=ax, label="α_FB")
    ax.set(xlabel="token match with full-width greedy", ylabel="speedup over plain (batch 1)",
           title=f"BiLD, {os.path.basename(r['checkpoint'])}")
    ax.legend(fontsize=7)
    if panels == 2:
        ax = axes[0, 1]
        bs = sorted(r["goodput"], key=int)
        names = [n for n in r["goodput"][bs[0]]["speedup"] if all(n in r["goodput"][b]["speedup"] for b in bs)]
        for name in names:
            ax.plot([int(b) for b in bs], [r["goodput"][b]["speedup"][name] for b in bs], marker="o", label=name)
        ax.set(xscale="log", xlabel="batch size", ylabel="tokens/s ÷ plain", title="goodput-chosen γ vs fixed γ")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None, help="default runs/bench_lm, with --task runs/reasoning_TASK_matformer")
    ap.add_argument("--task", help="BiLD on this reasoning task's test problems (spark/tasks)")
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fallbacks", default="0.1,0.2,0.3,0.5,0.7,0.9")
    ap.add_argument("--rollbacks", default="2,3,5")
    ap.add_argument("--max_little_steps", type=int, default=10)
    ap.add_argument("--batches", default="1,4,16,64", help="goodput sweep ('' to skip)")
    ap.add_argument("--proj_layers", type=int, default=2, help="goodput at 2B shapes: layers timed (0: skip)")
    ap.add_argument("--temperature", type=float, default=0.8, help="the goodput sweep's sampler")
    ap.add_argument("--paths", type=int, default=16,
                    help="goodput: rows decoded per variant and timing round (keys: max(2, paths / B)); the "
                         "decoders' sampled paths differ, and at B = 1 one key's luck moved a ratio by ~5%%")
    ap.add_argument("--json", help="default bench/results/policies[_TASK].json")
    ap.add_argument("--png", help="default bench/results/policies[_TASK].png")
    ap.add_argument("--parts", default="bild,goodput",
                    help="bild, goodput, goodput_2b (the 2B-shape projection alone, with the acceptance of "
                         "the JSON's goodput runs): each run merges its parts (and each goodput batch) into the "
                         "JSON, so they can run in separate processes")
    ap.add_argument("--from_json", help="only re-draw the PNG from this results JSON")
    args = ap.parse_args(argv)
    stem = os.path.join(ROOT, "bench", "results", "policies" + (f"_{args.task}" if args.task else ""))
    args.json, args.png = args.json or stem + ".json", args.png or stem + ".png"
    if args.from_json:
        with open(args.from_json) as f:
            return plot(json.load(f), args.png)
    if not args.task and not 1 <= args.prompts <= len(PROMPTS):
        ap.error(f"--prompts must be in 1..{len(PROMPTS)} without --task, got {args.prompts}")
    args.workdir = args.workdir or os.path.join(
        ROOT, "runs", f"reasoning_{args.task}_matformer" if args.task else "bench_lm")
    cfg, params, step = load_self_drafting(args)
    tok = get_tokenizer(cfg.data, args.workdir)
    graphdef = train_lib.graphdef_of(cfg)
    r = {}
    if os.path.exists(args.json):  # merge: parts run in separate processes
        with open(args.json) as f:
            r = json.load(f)
        if r.get("checkpoint") != args.workdir or r.get("checkpoint_step") != step:
            r = {}
    r |= {"checkpoint": args.workdir, "checkpoint_step": step, "new_tokens": args.new_tokens}
    parts = args.parts.split(",")
    if "bild" in parts:
        r |= {"max_little_steps": args.max_little_steps, "bild": bild_grid(args, cfg, graphdef, params, tok)}
    if args.task:
        r["task"] = args.task
    swept = {}
    if "goodput" in parts and args.batches and not args.task:
        swept = goodput_sweep(args, cfg, graphdef, params, tok)
        r["goodput"] = {**r.get("goodput", {}), **{str(b): v for b, v in swept.items()}}
        r["goodput_temperature"] = args.temperature
    if args.proj_layers and r.get("goodput") and not args.task and (swept or "goodput_2b" in parts):
        alpha = float(np.mean([v["acceptance_estimate"] for v in r["goodput"].values()]))
        batches = sorted(int(b) for b in (swept or r["goodput"]))
        p2 = project_2b(batches, alpha, args.proj_layers, args.rounds, args.new_tokens)
        r["goodput_2b"] = {**r.get("goodput_2b", {}), **{str(b): v for b, v in p2.items()}}
    write_json(args.json, r)
    if "bild" in r:
        plot(r, args.png)


if __name__ == "__main__":
    main()
