"""Batch-1 decode speed: dense Gemma-2-2B shapes vs Spark Gemma-2-2B shapes (random weights).

    python bench/decode.py [--layers 8] [--prompts 128,1024,4096] [--new_tokens 64] [--rounds 3]
                           [--dtype float32] [--param_dtype bfloat16] [--json bench/results/decode.json]
    python bench/decode.py --layers 26 --alternate 3 ...   # f32 at full depth: one model per process
    python bench/decode.py --layers 26 --dtype_pairs 3 ... # dense, f32 then bf16 weights, alternated

`--huge_pages` backs every weight by 2 MB pages before timing (spark/kernels/hugepages.py; the
Spark FFN's scattered row reads miss the TLB on 4 KB pages; `bench/decode_variants.py --variant
huge_pages` measures the gain).
`--param_dtype` (default: --dtype) stores the weights in that dtype while activations and the KV
cache stay in --dtype: bfloat16 weights with float32 compute is what the CPU kernels (spark/kernels:
bf16 rows read as they are, float32 accumulation) make fast. `--alternate P`: the two models in
separate processes (f32 at 26 layers does not fit twice), dense / spark / dense / … for P pairs, each
timing its own bandwidth; reported per prompt: the median of the per-pair ratios.

Both models have the 2B per-layer shapes (d_model 2304, 8 query / 4 KV heads of 256, local window
4096 alternating with global layers, vocab 256000) and the same parameter count; the dense one has a
GeGLU of 9216, the Spark one a Spark FFN of 13824 (8% active, predictor rank 1024) and Spark
attention (≤ 256 keys per query, rank 128), decoded with the sparse-gather path. Only `--layers` of
the 26 layers are built (memory and time); the output says how many. Each prompt is prefilled for
real, then `--new_tokens` tokens are sampled by the jitted while_loop (generate.decode, donated
state); only the decode is timed. All variants run interleaved, round by round, in one process.

Reported per prompt length (medians over rounds):
  ms/token of each model and the Spark/dense speedup, measured with `--layers` layers + the head
  (each speedup — decode, FFN, attention — is the median over rounds of the ratio of the two
  samples a round took one after the other, `*_per_round` in the JSON: the machine's speed moves
  by tens of percent between rounds, little between neighbours);
  a 26-layer projection from the same measurements: (26/L·layers + head) per model, where the head
  (final norm + 256k-vocab logits) is timed on its own — labelled as a projection;
  the FFN-only speedup (all L FFNs, one token) and the attention-only speedup (all L attention
  layers, one token, over the prompt's cache); the Spark FFN's predictor and row gather (the
  kernel on a fixed row of 8% active neurons) each timed alone, with their GB/s (`ffn_parts`), and
  the gather of as many rows side by side (`gather_contiguous`: its reads without the jumps);
  every part net of a jitted call that only receives the model's parameters (`call_overhead_ms`);
  the bandwidth fraction: bytes a token must read (weights incl. the logit head; for Spark only the
  predictor, the realised active rows and the selected keys; KV of the visible positions) divided
  by the memory bandwidth measured in the same rounds (jnp.sum over 1 GiB), over the measured time;
  and the same per round, each decode sample against the bandwidth sample its round began with
  (`bandwidth_fraction_per_round`, median in `bandwidth_fraction_median_of_rounds`): a run whose
  speed moves between phases otherwise compares a decode in one phase with a bandwidth in another.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import BANDWIDTH_FLOATS, bandwidth_variant, interleaved, write_json  # noqa: E402
from bench.decode_models import (  # noqa: E402
    FULL_LAYERS,
    build,
    bytes_per_token,
    decode_from,
    ffn_bytes,
    huge_pages,
    model_configs,
    prefill,
)
from decode import generate as gen  # noqa: E402
from spark import kernels  # noqa: E402


def attn_stack(graphdef, params, x_B1D, pos_B1, cache, sparse):
    """Every layer's attention on one token, chained like the model's layers (x += 1e-3·out)."""
    model = nnx.merge(graphdef, params)
    x, ks, vs = x_B1D, [], []
    for i, layer in enumerate(model.layers):
        o, (k, v), _ = layer.attn(x, pos_B1, (cache.k[i], cache.v[i]), sparse=sparse)
        x, ks, vs = x + 1e-3 * o, ks + [k], vs + [v]
    return x, cache.replace(k=tuple(ks), v=tuple(vs))


def ffn_stack(graphdef, params, x_B1D, sparse):
    """Every layer's FFN on one token, chained like the model's layers (x += 1e-3·out)."""
    model = nnx.merge(graphdef, params)
    x = x_B1D
    for layer in model.layers:
        x = x + 1e-3 * layer.ffn(x, layer.ffn.w_down.shape[0], sparse)[0]
    return x


def ffn_pred_stack(graphdef, params, x_B1D):
    """The Spark FFN's predictor alone, every layer (its dense x[:r]·K1ᵀ)."""
    model = nnx.merge(graphdef, params)
    x = x_B1D
    for layer in model.layers:
        x = x + 1e-3 * jnp.mean(layer.ffn.predictor(x, layer.ffn.w_down.shape[0]))
    return x


def ffn_gather_stack(graphdef, params, x_B1D, act_1F):
    """The Spark FFN's row gather alone (kernels.ffn_gather on a fixed activation row), every layer."""
    model = nnx.merge(graphdef, params)
    x = x_B1D
    for layer in model.layers:
        f = layer.ffn
        out = kernels.ffn_gather(x[0, :, f.rank:], act_1F, f.w_up[...], f.w_down[...])[0]
        x = x + 1e-3 * out[None]
    return x


def ffn_parts(variants, cfg, gd, p, xs):
    """Adds the Spark FFN's predictor and gather stacks to `variants`; -> bytes each reads per layer."""
    f = cfg.ffn_width(0)
    act = (jax.random.uniform(jax.random.key(7), (1, f)) < cfg.spark.ffn_k_frac).astype(jnp.float32)
    pred_j = jax.jit(ffn_pred_stack, static_argnames=("graphdef",))
    gather_j = jax.jit(ffn_gather_stack, static_argnames=("graphdef",))
    variants["ffn_pred/spark"] = (lambda x: pred_j(gd, p, x), [(x,) for x in xs], 10)
    variants["ffn_gather/spark"] = (lambda x: gather_j(gd, p, x, act), [(x,) for x in xs], 10)
    # the same number of rows, contiguous: what the same kernel reads when no row is a jump
    contig = (jnp.arange(f)[None] < jnp.sum(act)).astype(jnp.float32)
    variants["ffn_gather_contig/spark"] = (lambda x: gather_j(gd, p, x, contig), [(x,) for x in xs], 10)
    gathered = float(jnp.sum(act)) * (2 * cfg.d_model - cfg.ffn_rank)
    return {"predictor": f * cfg.ffn_rank, "gather": gathered, "gather_contiguous": gathered}


def head(graphdef, params, x_B1D):
    return nnx.merge(graphdef, params).logits(x_B1D)


class Stateful:
    """Calls a donating jitted fn, feeding its returned state back in (the cache updates in place)."""

    def __init__(self, fn, state):
        self.fn, self.state = fn, state

    def __call__(self, *args):
        out, self.state = self.fn(*args, self.state)
        return out


def run(args):
    cfgs = model_configs(args.layers, args.dtype, args.param_dtype, args.models.split(","))
    split = build(cfgs, args.seed)
    huge = huge_pages(split) if args.huge_pages else None
    attn_j = jax.jit(attn_stack, static_argnames=("graphdef", "sparse"), donate_argnums=(4,))
    ffn_j = jax.jit(ffn_stack, static_argnames=("graphdef", "sparse"))
    head_j = jax.jit(head, static_argnames=("graphdef",))
    cfg0 = next(iter(cfgs.values()))
    xs = [jax.random.normal(jax.random.key(i), (1, 1, cfg0.d_model), cfg0.dtype) for i in range(4)]
    variants = {"bandwidth": bandwidth_variant()}
    parts = args.parts.split(",")
    gd_h, p_h = next(iter(split.values()))
    if "head" in parts:
        variants["head"] = (lambda x: head_j(gd_h, p_h, x), [(x,) for x in xs], 10)
    for name, (gd, p) in split.items():
        sparse = name == "spark"
        if "ffn" in parts:
            variants[f"ffn/{name}"] = (lambda x, gd=gd, p=p, s=sparse: ffn_j(gd, p, x, s), [(x,) for x in xs], 10)
        if "ffn_parts" in parts and sparse:
            parts_bytes = ffn_parts(variants, cfgs[name], gd, p, xs)

    templates, stats = {}, {}
    for t in args.prompts:
        prompt = jax.random.randint(jax.random.key(t), (1, t), 0, cfg0.vocab_size)
        for name, (gd, p) in split.items():
            sparse = name == "spark"
            print(f"prefill {name} t={t}", file=sys.stderr, flush=True)
            state = templates[(name, t)] = prefill(gd, p, prompt, args.new_tokens, sparse)

            def dec(gd=gd, p=p, key=(name, t), sparse=sparse):
                out = decode_from(gd, p, templates[key], args.new_tokens, sparse)
                stats[key] = out
                return out.rows.gen_RL

            variants[f"decode/{name}/{t}"] = (dec, [()], 1)
            if "attn" in parts:
                attn = Stateful(lambda x, pos, c, gd=gd, p=p, s=sparse: attn_j(gd, p, x, pos, c, s),
                                jax.tree.map(jnp.copy, state.rows.cache))
                pos = jnp.array([[t]], jnp.int32)
                variants[f"attn/{name}/{t}"] = (attn, [(x, pos) for x in xs], 5)
    if set(parts) - {"decode"}:  # parts are single calls: what passing a model's parameters costs
        noop_j = jax.jit(lambda gd, p, x: x, static_argnums=0)
        for name, (gd, p) in split.items():
            variants[f"call/{name}"] = (lambda x, gd=gd, p=p: noop_j(gd, p, x), [(x,) for x in xs], 10)
    res = interleaved(variants, args.rounds)
    med = net_medians(res, list(split))
    out = summarize(args, cfgs, split, med, stats, res)
    out["huge_pages"] = huge
    if "ffn_pred/spark" in med:  # the Spark FFN's two weight reads, each on its own
        item, bw = jnp.dtype(cfgs["spark"].param_dtype).itemsize, out["bandwidth_GBps"]
        out["spark_ffn_parts"] = {}
        for k, v in (("predictor", "pred"), ("gather", "gather"), ("gather_contiguous", "gather_contig")):
            s = med[f"ffn_{v}/spark"]
            gbps = args.layers * parts_bytes[k] * item / s / 1e9
            out["spark_ffn_parts"][k] = {"ms": s * 1e3, "GBps": gbps, "of_bandwidth": gbps / bw}
    return out


def net_medians(res, names):
    """Median seconds per variant; the part timings (head, ffn, attn, ffn_pred, ffn_gather: one
    jitted call each, the model's parameters passed in) net of the same call doing nothing
    (`call/<model>`: the dispatch of a few hundred parameter leaves, ~0.4 ms at 8 layers)."""
    med = {k: v["median_s"] for k, v in res.items()}
    for k in list(med):
        part, _, rest = k.partition("/")
        model = names[0] if k == "head" else rest.split("/")[0]
        if part in ("head", "ffn", "attn", "ffn_pred", "ffn_gather", "ffn_gather_contig") and f"call/{model}" in med:
            med[k] -= med[f"call/{model}"]
    return med


def paired_ratio(res, med, a: str, b: str) -> tuple[float, list[float]]:
    """The median over rounds of a/b from the two samples each round took one after the other (the
    machine's speed moves between rounds, not between neighbours); a part's samples net of its
    model's `call/` median as in net_medians -> (median, per round)."""
    def net(k):
        model = k.split("/")[1]
        return med.get(f"call/{model}", 0.0) if k.split("/")[0] in ("ffn", "attn") else 0.0
    ratios = [(x - net(a)) / (y - net(b)) for x, y in zip(res[a]["samples_s"], res[b]["samples_s"], strict=True)]
    return statistics.median(ratios), ratios


def summarize(args, cfgs, split, med, stats, res):
    bw = 4 * BANDWIDTH_FLOATS / med["bandwidth"]
    names = list(cfgs)
    out = {"layers": args.layers, "dtype": args.dtype, "param_dtype": args.param_dtype, "models": names,
           "new_tokens": args.new_tokens, "rounds": args.rounds,
           "note": f"Gemma-2-2B per-layer shapes, {args.layers} of {FULL_LAYERS} layers, vocab 256000, random "
                   "weights, batch 1" + ("; 26-layer figures are projections from the measured layer and head "
                                         "times" if args.layers < FULL_LAYERS else ""),
           "kernels": kernels.status(), "bandwidth_GBps": bw / 1e9,
           "ms_per_token": {}, "bytes_per_token": {}, "bound_ms_per_token": {},
           "bandwidth_fraction": {n: {} for n in names}, "spark_decode_stats": {}}
    both = len(names) == 2
    out["call_overhead_ms"] = {n: med[f"call/{n}"] * 1e3 for n in names if f"call/{n}" in med}
    if "head" in med:
        out["head_ms"] = med["head"] * 1e3
    if "ffn/" + names[0] in med:
        out["ffn_ms"] = {n: med[f"ffn/{n}"] * 1e3 for n in names}
    for t in args.prompts:
        per_tok = {n: med[f"decode/{n}/{t}"] / args.new_tokens for n in names}
        out["ms_per_token"][t] = {n: v * 1e3 for n, v in per_tok.items()}
        density = kpq = None
        if "spark" in names:
            st = gen.summarize(stats[("spark", t)])
            density, kpq = float(jnp.mean(st["ffn_density"])), float(jnp.mean(st["keys_per_query"]))
            out["spark_decode_stats"][t] = {"ffn_density": density, "keys_per_query": kpq,
                                            "ffn_overflow": int(st["ffn_overflow"].sum()),
                                            "attn_overflow": int(st["attn_overflow"].sum())}
        visible = t + (args.new_tokens + 1) / 2
        out["bytes_per_token"][t], out["bound_ms_per_token"][t] = {}, {}
        for n, (_, p) in split.items():
            b = bytes_per_token(cfgs[n], p, visible, density, kpq)
            out["bytes_per_token"][t][n] = b
            out["bound_ms_per_token"][t][n] = b / bw * 1e3
            out["bandwidth_fraction"][n][t] = b / bw / per_tok[n]
            rounds = [b * bw_s / (4 * BANDWIDTH_FLOATS) / (dec_s / args.new_tokens) for bw_s, dec_s in
                      zip(res["bandwidth"]["samples_s"], res[f"decode/{n}/{t}"]["samples_s"], strict=True)]
            out.setdefault("bandwidth_fraction_per_round", {}).setdefault(n, {})[t] = rounds
            out.setdefault("bandwidth_fraction_median_of_rounds", {}).setdefault(n, {})[t] = statistics.median(rounds)
        if both:
            ratio_bound = out["bytes_per_token"][t]["dense"] / out["bytes_per_token"][t]["spark"]
            speedup, per_round = paired_ratio(res, med, f"decode/dense/{t}", f"decode/spark/{t}")
            out.setdefault("spark_vs_dense_decode_speedup", {})[t] = speedup
            out.setdefault("spark_vs_dense_per_round", {})[t] = per_round
            out.setdefault("byte_ratio_bound", {})[t] = ratio_bound
            out.setdefault("spark_vs_dense_vs_bound", {})[t] = speedup / ratio_bound
            if "head" in med and args.layers < FULL_LAYERS:
                scale = FULL_LAYERS / args.layers
                proj = {n: scale * (v - med["head"]) + med["head"] for n, v in per_tok.items()}
                out.setdefault("projected_26_layer_speedup", {})[t] = proj["dense"] / proj["spark"]
            if f"attn/dense/{t}" in med:
                out.setdefault("attention_ms", {})[t] = {n: med[f"attn/{n}/{t}"] * 1e3 for n in names}
                out.setdefault("attention_speedup", {})[t] = paired_ratio(res, med, f"attn/dense/{t}",
                                                                           f"attn/spark/{t}")[0]
    if both and "ffn_ms" in out:
        density = statistics.median(v["ffn_density"] for v in out["spark_decode_stats"].values())
        out["ffn_speedup"], out["ffn_speedup_per_round"] = paired_ratio(res, med, "ffn/dense", "ffn/spark")
        out["ffn_byte_ratio_bound"] = ffn_bytes(cfgs["dense"], None) / ffn_bytes(cfgs["spark"], density)
    return out


def print_table(r):
    names = r["models"]
    print(f"\nDecode at batch 1, {r['note']}; {r['dtype']} activations, {r['param_dtype']} weights; "
          f"{r['kernels']}; bandwidth {r['bandwidth_GBps']:.1f} GB/s")
    print(f"{'prompt':>7} " + " ".join(f"{n + ' ms/tok':>14} {'bound':>7} {'BW frac':>7} {'/round':>7}" for n in names)
          + (f" {'speedup':>8} {'byte bound':>10} {'of bound':>8}" if len(names) == 2 else ""))
    for t, ms in r["ms_per_token"].items():
        row = f"{t:>7} " + " ".join(f"{ms[n]:>14.1f} {r['bound_ms_per_token'][t][n]:>7.1f} "
                                    f"{r['bandwidth_fraction'][n][t]:>7.0%} "
                                    f"{r['bandwidth_fraction_median_of_rounds'][n][t]:>7.0%}" for n in names)
        if len(names) == 2:
            row += (f" {r['spark_vs_dense_decode_speedup'][t]:>7.2f}x {r['byte_ratio_bound'][t]:>9.2f}x "
                    f"{r['spark_vs_dense_vs_bound'][t]:>8.0%}")
        print(row)
    if "ffn_speedup" in r:
        print(f"FFN only ({r['layers']} layers, one token): dense {r['ffn_ms']['dense']:.2f} ms, spark "
              f"{r['ffn_ms']['spark']:.2f} ms -> {r['ffn_speedup']:.2f}x (byte-ratio bound "
              f"{r['ffn_byte_ratio_bound']:.2f}x)")
    if "spark_ffn_parts" in r:
        print("Spark FFN parts: " + ", ".join(f"{k} {v['ms']:.2f} ms ({v['GBps']:.1f} GB/s, {v['of_bandwidth']:.0%})"
                                              for k, v in r["spark_ffn_parts"].items()))


def child_argv(args, model: str) -> list[str]:
    """The flags of one single-model process of `alternate` (its RESULT line read back)."""
    return ["--layers", str(args.layers), "--prompts", ",".join(map(str, args.prompts)), "--new_tokens",
            str(args.new_tokens), "--rounds", str(args.rounds), "--dtype", args.dtype, "--param_dtype",
            args.param_dtype, "--parts", args.parts, "--seed", str(args.seed), "--models", model, "--result_line",
            *(["--huge_pages"] if args.huge_pages else [])]


def run_child(args, model: str, label: str) -> dict:
    """One single-model process (child_argv); its RESULT line as a dict."""
    r = subprocess.run([sys.executable, __file__, *child_argv(args, model)], capture_output=True, text=True)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not line:
        sys.exit(f"{label} process failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def alternate(args):
    """dense and spark in separate processes, alternated for args.alternate pairs; per prompt the
    median over pairs of each per-pair ratio."""
    pairs = []
    for p in range(args.alternate):
        pair = {name: run_child(args, name, name) for name in ("dense", "spark")}
        pairs.append(pair)
        print(f"pair {p + 1}: " + ", ".join(
            f"prompt {t}: dense {pair['dense']['ms_per_token'][t]['dense']:.0f} ms/tok "
            f"({pair['dense']['bandwidth_fraction']['dense'][t]:.0%} of its bound), spark "
            f"{pair['spark']['ms_per_token'][t]['spark']:.0f} ms/tok" for t in pair["dense"]["ms_per_token"]),
            flush=True)
    med = statistics.median
    out = {"alternated_pairs": args.alternate, "pairs": pairs, "layers": args.layers, "dtype": args.dtype,
           "param_dtype": args.param_dtype, "kernels": pairs[0]["dense"]["kernels"],
           "spark_vs_dense_decode_speedup": {}, "byte_ratio_bound": {}, "spark_vs_dense_vs_bound": {},
           "bandwidth_fraction": {"dense": {}, "spark": {}}, "ms_per_token": {}}
    for t in pairs[0]["dense"]["ms_per_token"]:
        sp = [pr["dense"]["ms_per_token"][t]["dense"] / pr["spark"]["ms_per_token"][t]["spark"] for pr in pairs]
        bound = [pr["dense"]["bytes_per_token"][t]["dense"] / pr["spark"]["bytes_per_token"][t]["spark"]
                 for pr in pairs]
        out["spark_vs_dense_decode_speedup"][t] = med(sp)
        out["byte_ratio_bound"][t] = med(bound)
        out["spark_vs_dense_vs_bound"][t] = med([a / b for a, b in zip(sp, bound, strict=True)])
        out["ms_per_token"][t] = {n: med([pr[n]["ms_per_token"][t][n] for pr in pairs]) for n in ("dense", "spark")}
        for n in ("dense", "spark"):
            out["bandwidth_fraction"][n][t] = med([pr[n]["bandwidth_fraction"][n][t] for pr in pairs])
        print(f"prompt {t}: spark/dense {out['spark_vs_dense_decode_speedup'][t]:.2f}x of a "
              f"{out['byte_ratio_bound'][t]:.2f}x byte bound ({out['spark_vs_dense_vs_bound'][t]:.0%}); "
              f"bandwidth fraction dense {out['bandwidth_fraction']['dense'][t]:.0%}, "
              f"spark {out['bandwidth_fraction']['spark'][t]:.0%} (medians of {args.alternate} pairs)")
    return out


def dtype_pairs(args):
    """The dense model with float32 weights, then bfloat16 weights (activations: --dtype), in separate
    processes alternated for args.dtype_pairs pairs; per prompt the median of the per-pair speedups."""
    pairs = []
    for p in range(args.dtype_pairs):
        pair = {w: run_child(argparse.Namespace(**{**vars(args), "param_dtype": w}), "dense", f"{w} weights")
                for w in ("float32", "bfloat16")}
        pairs.append(pair)
        print(f"pair {p + 1}: " + ", ".join(
            f"prompt {t}: " + ", ".join(f"{w} {pair[w]['ms_per_token'][t]['dense']:.0f} ms/tok "
                                        f"({pair[w]['bandwidth_fraction']['dense'][t]:.0%} of its bound)"
                                        for w in pair) for t in pair["float32"]["ms_per_token"]), flush=True)
    out = {"dtype_pairs": args.dtype_pairs, "pairs": pairs, "layers": args.layers, "dtype": args.dtype,
           "kernels": pairs[0]["bfloat16"]["kernels"], "bf16_vs_f32": {}}
    for t in pairs[0]["float32"]["ms_per_token"]:
        ratios = [pr["float32"]["ms_per_token"][t]["dense"] / pr["bfloat16"]["ms_per_token"][t]["dense"]
                  for pr in pairs]
        out["bf16_vs_f32"][t] = {"median": statistics.median(ratios), "per_pair": ratios}
        print(f"prompt {t}: bf16 weights / f32 weights {statistics.median(ratios):.2f}x "
              f"(median of {args.dtype_pairs} pairs: {', '.join(f'{x:.2f}' for x in ratios)}; bytes 2.0x)")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompts", default="128,1024,4096")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--param_dtype", choices=["float32", "bfloat16"], help="default: --dtype")
    ap.add_argument("--models", default="dense,spark")
    ap.add_argument("--parts", default="decode,head,ffn,ffn_parts,attn", help="what to time besides the bandwidth")
    ap.add_argument("--alternate", type=int, default=0, help="pairs of one-model processes (f32 at 26 layers)")
    ap.add_argument("--dtype_pairs", type=int, default=0,
                    help="pairs of dense processes, float32 then bfloat16 weights (the bf16 speedup)")
    ap.add_argument("--huge_pages", action="store_true",
                    help="back the weights by 2 MB pages first (spark/kernels/hugepages.py, Linux)")
    ap.add_argument("--result_line", action="store_true", help="print RESULT {json} (bench/peer_decode.py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    args.param_dtype = args.param_dtype or args.dtype
    args.prompts = [int(x) for x in args.prompts.split(",")]
    if args.layers < 2 or args.layers % 2:
        ap.error("--layers must be an even number >= 2 (local/global pairs)")
    if args.alternate and args.dtype_pairs:
        ap.error("--alternate and --dtype_pairs are separate runs")
    if args.alternate:
        r = alternate(args)
    elif args.dtype_pairs:
        r = dtype_pairs(args)
    else:
        r = run(args)
        print_table(r)
    if args.result_line:
        print("RESULT " + json.dumps(r), flush=True)
    write_json(args.json, {"benchmark": "decode", **r})


if __name__ == "__main__":
    main()
