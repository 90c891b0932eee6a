"""Speculative decoding with MatFormer self-drafts vs plain decoding, batch 1.

    python bench/speculative.py [--workdir runs/bench_lm] [--new_tokens 128] [--rounds 3]
                                [--temperature 0.8] [--gammas 1,2,3,4,5,6] [--granularities 8,4,2]
                                [--proj_layers 4] [--json bench/results/speculative.json]
                                [--png bench/results/speculative.png]
    python bench/speculative.py --from_json bench/results/speculative.json   (re-draw the PNG)

Part 1, measured: a trained MatFormer checkpoint, by default runs/bench_lm (configs/bench_lm.py,
whose batch-1 step is bound by weight bytes; the command that trains it is printed when it is
missing; the 0.8M-parameter demo model is overhead-bound: its F/8 step costs a full step), one
prompt at a time (batch 1). Variants: plain `decode.generate.generate`, and
`decode.speculative.generate` for every draft granularity × γ (shared draft cache), adaptive γ
(γ_max = max γ, thresholds 0.3 / 0.5) per granularity, and the separate draft cache at γ = 3. Every
variant runs the same prompts and seeds, interleaved round by round in one process; the table gives
median tokens/s, the ratio to plain, the acceptance rate (accepted / drafted) and tokens per round.

Part 2, a projection (not a measurement of speculative decoding at that size): at the Gemma-2-2B
shapes, dense (configs/gemma2_2b.py) and Spark (configs/spark_gemma2_2b.py), random weights,
`--proj_layers` of 26 layers, a 1024-token cache, it times one target decode forward (T = 1), one
verify forward (T = γ + 1; Spark both sparse-gather and masked) and one draft forward per
granularity, each in a loop inside one jit with the cache carried in place, and the logit head
alone per block size; scales the layers to 26; and combines them with the tokens per round and
drafted tokens per round measured in part 1:
    speedup = tokens_per_round · t_target / (drafted_per_round · t_draft + t_verify(γ)).
The acceptance of a trained 2B model's drafts is not known here, which is why this is a projection.

Part 3, an analytic model (no timing): the same tokens and drafts per round on a bandwidth-bound
accelerator, where a forward costs the bytes it reads and a (γ+1)-token verify costs one step
(`bandwidth_model`; dense 2B target).
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
from bench.common import interleaved, require_checkpoint, write_json  # noqa: E402
from bench.decode_models import model_configs  # noqa: E402
from decode import generate as gen  # noqa: E402
from decode import speculative as spec  # noqa: E402
from decode.sampling import SamplerConfig  # noqa: E402
from spark import cache as kv_cache  # noqa: E402
from spark import train_lib  # noqa: E402
from spark.config import MatFormerConfig  # noqa: E402
from spark.data.pipeline import get_tokenizer  # noqa: E402
from spark.matformer import cut_ffn  # noqa: E402
from spark.model import Transformer  # noqa: E402
from spark.train import load_checkpoint  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL_LAYERS = 26
PROMPTS = ["def ", "import os\n", "class ", "    return ", "if __name__ == "]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bench_lm"))
    ap.add_argument("--new_tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--gammas", default="1,2,3,4,5,6")
    ap.add_argument("--granularities", default="8,4,2")
    ap.add_argument("--thresholds", default="0.3,0.5")
    ap.add_argument("--proj_layers", type=int, default=4)
    ap.add_argument("--proj_reps", type=int, default=8)
    ap.add_argument("--json")
    ap.add_argument("--png")
    ap.add_argument("--from_json", help="only re-draw the PNG from this results JSON")
    return ap.parse_args()


# ---------------------------------------------------------------- part 1: measured on the demo model

def variants_of(model_cfg, gammas, granularities, thresholds):
    """name -> SpecConfig (None: plain decoding)."""
    out = {"plain": None}
    for g in granularities:
        dw = model_cfg.granularity_widths(g)
        for gamma in gammas:
            out[f"F/{g} γ={gamma}"] = spec.SpecConfig(draft_widths=dw, gamma=gamma)
        for h in thresholds:
            out[f"F/{g} adaptive h={h} γmax={max(gammas)}"] = spec.SpecConfig(draft_widths=dw, gamma=max(gammas),
                                                                              adaptive_threshold=h)
        out[f"F/{g} γ=3 separate"] = spec.SpecConfig(draft_widths=dw, gamma=3, draft_cache="separate")
    return out


def measure(args):
    require_checkpoint(args.workdir)
    cfg, params, step = load_checkpoint(args.workdir, None)
    tok = get_tokenizer(cfg.data, args.workdir)
    graphdef = train_lib.graphdef_of(cfg)
    sampler = SamplerConfig(args.temperature)
    common = dict(max_new_tokens=args.new_tokens, sampler=sampler, eos_id=-1, pad_id=tok.pad_id)
    encoded = [list(tok.encode(p, bos=True)) for p in PROMPTS]
    width = max(map(len, encoded))  # one padded shape: one compile per variant
    inputs = [(params, jnp.asarray([e + [tok.pad_id] * (width - len(e))], jnp.int32),
               jnp.asarray([len(e)], jnp.int32), jax.random.key(i)) for i, e in enumerate(encoded)]
    gammas = [int(x) for x in args.gammas.split(",")]
    grans = [int(x) for x in args.granularities.split(",")]
    thresholds = [float(x) for x in args.thresholds.split(",") if x]
    configs = variants_of(cfg.model, gammas, grans, thresholds)

    fns, acc = {}, {}
    for name, kw in configs.items():
        extra = {} if kw is None else {"spec": kw}
        fns[name] = functools.partial(gen.generate if kw is None else spec.generate, graphdef, **common, **extra)
        if kw is not None:  # acceptance stats over all prompts (same seeds as the timing)
            st = [jax.device_get(fns[name](*x)[2]) for x in inputs]
            acc[name] = {"acceptance_rate": float(np.mean([s["acceptance_rate"] for s in st])),
                         "tokens_per_round": float(np.mean([s["tokens_per_round"] for s in st])),
                         "drafted_per_round": float(np.mean([s["drafted"].sum() / max(s["rounds"].sum(), 1)
                                                             for s in st]))}
        print(f"compiled {name}", flush=True)
    timing = interleaved({n: (f, inputs, len(inputs)) for n, f in fns.items()}, args.rounds)
    plain_s = timing["plain"]["median_s"]
    rows = {}
    for name in configs:
        s = timing[name]["median_s"]
        rows[name] = {"tokens_per_s": args.new_tokens / s, "speedup": plain_s / s, **acc.get(name, {}),
                      "samples_s": timing[name]["samples_s"]}
    return {"checkpoint": args.workdir, "checkpoint_step": step, "temperature": args.temperature,
            "new_tokens": args.new_tokens, "configs": rows}


# ---------------------------------------------------------------- part 2: forward costs at 2B shapes

def forward_costs(layers, gammas, granularities, reps, rounds, prompt_len=1024, draft_sizes=(1,), batch=1,
                  kinds=("dense", "spark")):
    """Seconds per forward at the 2B shapes, dense and Spark: target T=1, verify T=γ+1 (Spark: on
    the sparse-gather path and masked), draft per granularity at each block size in `draft_sizes`
    (T=1: "draft F/g", else "draft F/g T=t"; a tree's depth drafts its nodes at once) — each the
    embedding and `layers` layers, without the head — and the head alone per block size. Medians
    of interleaved rounds, then the layers scaled to 26: t26 = t·26/layers + head(T) (timed apart:
    the head reads as many bytes as several layers, and a difference of the two would be noise).
    `batch` rows decode together (every row the same block); `kinds` picks dense and/or Spark."""
    nested = MatFormerConfig(divisors=(8, 4, 2, 1))  # the draft widths (the shapes are what is timed)
    cfgs = {k: dataclasses.replace(c, matformer=nested)  # f32: bf16 is far slower on XLA:CPU (bench/decode.py)
            for k, c in model_configs(layers, "float32").items() if k in kinds}
    variants, heads = {}, {}
    for kind, cfg in cfgs.items():
        graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
        cache = kv_cache.init(cfg, batch, prompt_len + 16)
        cache = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape, x.dtype) if x.ndim > 1 else x,
                             cache)  # random keys: Spark attention selects ~256 of them, as after a real prefill
        cache = cache.replace(lengths=jnp.full((batch,), prompt_len, jnp.int32))
        run = functools.partial(_looped_forward, graphdef, reps=reps, start=prompt_len, vocab=cfg.vocab_size,
                                head=False, batch=batch)
        args = [(params, cache)]
        variants[f"{kind} target"] = (jax.jit(functools.partial(run, t=1, widths=None, sparse=True)), args, 1)
        for g in gammas:
            variants[f"{kind} verify γ={g}"] = (jax.jit(functools.partial(run, t=g + 1, widths=None, sparse=True)),
                                                args, 1)
            if kind == "spark":
                variants[f"{kind} verify γ={g} masked"] = (
                    jax.jit(functools.partial(run, t=g + 1, widths=None, sparse=False)), args, 1)
        for gr in granularities:  # FFN weights cut to the draft widths, as decode/speculative.py does
            dw = cfg.granularity_widths(gr)
            for t in draft_sizes:
                variants[draft_key(kind, gr, t)] = (jax.jit(functools.partial(run, t=t, widths=dw, sparse=True)),
                                                    [(cut_ffn(params, cfg, dw), cache)], 1)
        if kind == kinds[0]:
            for t in sorted({1, *(g + 1 for g in gammas), *draft_sizes}):
                x = jax.random.normal(jax.random.key(2), (batch, t, cfg.d_model))
                heads[t] = f"head T={t}"
                variants[heads[t]] = (jax.jit(functools.partial(_looped_head, graphdef, reps=reps)), [(params, x)], 1)
    per = {k: v["median_s"] / reps for k, v in interleaved(variants, rounds).items()}
    head_s = {t: per.pop(name) for t, name in heads.items()}
    scale = FULL_LAYERS / layers

    def block(name):
        if "verify" in name:
            return int(name.split("γ=")[1].split()[0]) + 1
        return int(name.split("T=")[1]) if "T=" in name else 1

    projected = {k: v * scale + head_s[block(k)] for k, v in per.items()}
    return {"layers_measured": layers, "prompt_len": prompt_len, "head_s": head_s, "layers_s": per,
            "projected_26_layers_s": projected}


def draft_key(kind: str, granularity: int, t: int = 1) -> str:
    """forward_costs' name of a draft forward of a t-token block."""
    return f"{kind} draft F/{granularity}" + (f" T={t}" if t > 1 else "")


def _looped_forward(graphdef, params, cache, *, t, widths, sparse, reps, start, vocab, head=True, tree_nodes=None,
                    batch=1):
    """`reps` forwards of a t-token block at the same positions, the cache carried in place
    (head=False: the embedding and the layers only), `batch` rows. tree_nodes = n: the block is the
    first t nodes of an n-node draft tree (a chain: the mask's content does not change the work),
    written to scratch slots as multi-draft decoding does."""
    model = nnx.merge(graphdef, params)
    pos = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32)[None], (batch, t))
    tree = None
    if tree_nodes is not None:
        tree = kv_cache.Tree(node_BT=jnp.arange(t, dtype=jnp.int32)[None],
                             anc_BTN=jnp.tril(jnp.ones((t, tree_nodes), bool))[None],
                             pos_BN=start + jnp.arange(tree_nodes, dtype=jnp.int32)[None])

    def body(i, carry):
        cache, acc = carry
        tok = (pos + i) % vocab
        if head:
            out, cache = model(tok, pos, cache=cache, widths=widths, sparse=sparse, tree=tree)
        else:
            out, cache, _ = model.apply_layers(model.embed_tokens(tok), pos, cache, widths, sparse=sparse, tree=tree)
        return cache, acc + out[0, -1, 0]
    return jax.lax.fori_loop(0, reps, body, (cache, jnp.float32(0)))[1]


def _looped_head(graphdef, params, x, *, reps):
    model = nnx.merge(graphdef, params)
    return jax.lax.fori_loop(0, reps, lambda i, a: a + model.logits(x + a)[0, 0, 0], jnp.float32(0))


def project(demo, costs):
    """Projected speedup per (target kind, demo config): measured tokens and drafts per round,
    forward costs at 2B shapes (the faster verify mode for Spark)."""
    c = costs["projected_26_layers_s"]
    out = {}
    for kind in ("dense", "spark"):
        for name, row in demo["configs"].items():
            if "tokens_per_round" not in row or "separate" in name:
                continue
            gr = int(name.split()[0][2:])
            gamma = int(name.split("γmax=")[1]) if "adaptive" in name else int(name.split("γ=")[1].split()[0])
            verify = min(v for k, v in c.items() if k.startswith(f"{kind} verify γ={gamma}"))
            cost = row["drafted_per_round"] * c[draft_key(kind, gr)] + verify
            out[f"{kind} {name}"] = row["tokens_per_round"] * c[f"{kind} target"] / cost
    return out


def bandwidth_model(demo, granularities, prompt_len=1024):
    """An analytic projection for a bandwidth-bound accelerator and the dense 2B target: a forward
    costs the bytes it reads, and a (γ+1)-token verify reads what one decode step reads, so
    speedup = tokens_per_round / (drafted_per_round · c + 1), c = draft bytes / target bytes.
    (Not for the Spark target: its verify reads the union of the block's active rows, which grows
    with γ.)"""
    cfg = model_configs(FULL_LAYERS, "float32")["dense"]
    d, n, kh, h, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_width(0)
    attn = d * n * h * 2 + d * kh * h * 2 + prompt_len * kh * h * 2  # q, o, k, v weights + the KV read

    def step_bytes(width):
        return 4 * (cfg.num_layers * (attn + 3 * width * d) + cfg.vocab_size * d)

    c = {gr: step_bytes(f // gr) / step_bytes(f) for gr in granularities}
    out = {}
    for name, row in demo["configs"].items():
        if "tokens_per_round" in row and "separate" not in name:
            gr = int(name.split()[0][2:])
            out[name] = row["tokens_per_round"] / (row["drafted_per_round"] * c[gr] + 1.0)
    return {"draft_cost_ratio": c, "speedup": out}


# ---------------------------------------------------------------- report

def plot(png, payload):
    """Speedup vs γ per draft granularity: measured, projected (2B timings), analytic model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    demo, projected = payload["measured"], payload["projection"]["speedup"]
    bw = payload["bandwidth_model"]["speedup"]
    names = [k for k in demo["configs"] if "γ=" in k and "separate" not in k]
    grans = sorted({int(k.split()[0][2:]) for k in names}, reverse=True)
    gammas = sorted({int(k.split("γ=")[1]) for k in names})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for gr in grans:
        cfgs = [f"F/{gr} γ={g}" for g in gammas]
        axes[0].plot(gammas, [demo["configs"][c]["speedup"] for c in cfgs], marker="o", label=f"draft F/{gr}")
        for kind, ls in (("dense", "-"), ("spark", ":")):
            axes[1].plot(gammas, [projected[f"{kind} {c}"] for c in cfgs], marker="o", ls=ls,
                         label=f"{kind} target, draft F/{gr}")
        axes[2].plot(gammas, [bw[c] for c in cfgs], marker="o", label=f"draft F/{gr}")
    axes[0].set_title(f"measured: {os.path.basename(demo['checkpoint'])}, T={demo['temperature']}, batch 1, 2-core CPU")
    axes[1].set_title("projection: 2B shapes, forward times on this CPU")
    axes[2].set_title("analytic: dense 2B, bandwidth-bound accelerator")
    for ax in axes:
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("γ (draft tokens per round)")
        ax.set_ylabel("tokens/s vs plain decoding")
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main():
    args = parse_args()
    if args.from_json:  # re-draw the figure from a results file
        with open(args.from_json) as f:
            plot(args.png or args.from_json.replace(".json", ".png"), json.load(f))
        return
    t0 = time.time()
    gammas = [int(x) for x in args.gammas.split(",")]
    grans = [int(x) for x in args.granularities.split(",")]
    demo = measure(args)
    print(f"\nmeasured on {demo['checkpoint']} (step {demo['checkpoint_step']}), batch 1, "
          f"{demo['new_tokens']} new tokens, temperature {demo['temperature']}, {len(PROMPTS)} prompts")
    print(f"{'config':34s} {'tok/s':>7s} {'speedup':>8s} {'accept':>7s} {'tok/round':>9s}")
    for name, r in demo["configs"].items():
        print(f"{name:34s} {r['tokens_per_s']:7.1f} {r['speedup']:7.2f}x {r.get('acceptance_rate', 1.0):7.2f} "
              f"{r.get('tokens_per_round', 1.0):9.2f}")
    costs = forward_costs(args.proj_layers, gammas, grans, args.proj_reps, args.rounds)
    projected = project(demo, costs)
    print(f"\nprojection to Gemma-2-2B shapes, dense and Spark targets (26 layers; forward costs measured with "
          f"{args.proj_layers} layers + the head, 1024-token cache; tokens per round from the measured model)")
    print("  ms per forward: " + ", ".join(f"{k} {1e3 * v:.0f}" for k, v in costs["projected_26_layers_s"].items()))
    for kind in ("dense", "spark"):
        best_k = max((k for k in projected if k.startswith(kind)), key=projected.get)
        print(f"  best projected, {kind} target: {best_k[len(kind) + 1:]}: {projected[best_k]:.2f}x")
    best_proj = max(projected, key=projected.get)
    bw = bandwidth_model(demo, grans)
    best_bw = max(bw["speedup"], key=bw["speedup"].get)
    print("\nanalytic bandwidth-bound model, dense 2B target (verify costs one step; cost = bytes read): "
          "draft/target bytes " + ", ".join(f"F/{g} {c:.2f}" for g, c in bw["draft_cost_ratio"].items()))
    print(f"  best: {best_bw}: {bw['speedup'][best_bw]:.2f}x")
    spec_rows = {k: v for k, v in demo["configs"].items() if k != "plain"}
    best = max(spec_rows, key=lambda k: spec_rows[k]["speedup"])
    print(f"\nbest measured: {best}: {spec_rows[best]['speedup']:.2f}x "
          f"(acceptance {spec_rows[best]['acceptance_rate']:.2f}); total {time.time() - t0:.0f}s")
    payload = {"speedup_best": spec_rows[best]["speedup"], "best_config": best,
               "acceptance_rate": {k: v["acceptance_rate"] for k, v in spec_rows.items()},
               "measured": demo, "projection": {"note": "forward costs measured at 2B shapes; acceptance from the "
                                                "demo model; not a measured 2B speculative run",
                                                "costs": costs, "speedup": projected,
                                                "speedup_best": projected[best_proj], "best_config": best_proj},
               "bandwidth_model": {**bw, "speedup_best": bw["speedup"][best_bw], "best_config": best_bw}}
    write_json(args.json, payload)
    if args.png:
        plot(args.png, payload)


if __name__ == "__main__":
    main()
