"""Batch-1 decode speed: dense Gemma-2-2B shapes vs Spark Gemma-2-2B shapes (random weights).

    python bench/decode.py [--layers 8] [--prompts 128,1024,4096] [--new_tokens 64] [--rounds 3]
                           [--json bench/results/decode.json]

Both models have the 2B per-layer shapes (d_model 2304, 8 query / 4 KV heads of 256, local window
4096 alternating with global layers, vocab 256000) and the same parameter count; the dense one has a
GeGLU of 9216, the Spark one a Spark FFN of 13824 (8% active, predictor rank 1024) and Spark
attention (≤ 256 keys per query, rank 128), decoded with the sparse-gather path. Only `--layers` of
the 26 layers are built (memory and time); the output says how many. Each prompt is prefilled for
real, then `--new_tokens` tokens are sampled by the jitted while_loop (generate.decode, donated
state); only the decode is timed. All variants run interleaved, round by round, in one process.

Reported per prompt length (medians over rounds):
  ms/token of each model and the Spark/dense speedup, measured with `--layers` layers + the head;
  a 26-layer projection from the same measurements: (26/L·layers + head) per model, where the head
  (final norm + 256k-vocab logits) is timed on its own — labelled as a projection;
  the FFN-only speedup (all L FFNs, one token) and the attention-only speedup (all L attention
  layers, one token, over the prompt's cache);
  the bandwidth fraction: bytes a token must read (weights incl. the logit head; for Spark only the
  predictor, the realised active rows and the selected keys; KV of the visible positions) divided
  by the memory bandwidth measured in the same rounds (jnp.sum over 1 GiB), over the measured time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import interleaved, write_json  # noqa: E402
from decode import generate as gen  # noqa: E402
from decode.sampling import SamplerConfig  # noqa: E402
from spark.cli import load_config_file  # noqa: E402
from spark.model import Transformer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FULL_LAYERS = 26
BANDWIDTH_FLOATS = 256 * 1024 * 1024  # 1 GiB of float32, summed to measure read bandwidth


def model_configs(layers: int, dtype: str):
    """The dense and Spark 2B model configs (configs/gemma2_2b.py, spark_gemma2_2b.py), `layers` deep."""
    kw = dict(num_layers=layers, dtype=dtype, param_dtype=dtype)
    return {name: dataclasses.replace(load_config_file(os.path.join(ROOT, "configs", f"{file}.py")).model, **kw)
            for name, file in (("dense", "gemma2_2b"), ("spark", "spark_gemma2_2b"))}


def build(cfgs, seed: int):
    models = {name: Transformer(cfg, nnx.Rngs(seed + i)) for i, (name, cfg) in enumerate(cfgs.items())}
    models["spark"].embed = models["dense"].embed  # one shared 256k x 2304 table: same head, half the memory
    return {name: nnx.split(m) for name, m in models.items()}


def param_bytes(params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def bytes_per_token(cfg, params, visible: float, ffn_density: float | None, keys_per_query: float | None):
    """Bytes one decode token must read: weights (the embedding once, as the logit head), KV cache."""
    item = jnp.dtype(cfg.param_dtype).itemsize
    total = param_bytes(params)
    l, d, h, kh, n = cfg.num_layers, cfg.d_model, cfg.head_dim, cfg.num_kv_heads, cfg.num_heads
    if cfg.ffn_kind == "spark":  # K2 and V: only the active rows
        f, r = cfg.ffn_width(0), cfg.ffn_rank
        total -= l * f * ((d - r) + d) * item * (1.0 - ffn_density)
    if cfg.attn_kind == "spark":  # first r dims of every visible key + gate half and value of the kept keys
        r = cfg.attn_rank
        kv = l * (visible * kh * r + keys_per_query * n * ((h - r) + h)) * item
    else:
        kv = l * visible * kh * 2 * h * item
    return total + kv


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
    cfgs = model_configs(args.layers, args.dtype)
    split = build(cfgs, args.seed)
    sampler = SamplerConfig(temperature=1.0)
    attn_j = jax.jit(attn_stack, static_argnames=("graphdef", "sparse"), donate_argnums=(4,))
    ffn_j = jax.jit(ffn_stack, static_argnames=("graphdef", "sparse"))
    head_j = jax.jit(head, static_argnames=("graphdef",))
    xs = [jax.random.normal(jax.random.key(i), (1, 1, cfgs["dense"].d_model)) for i in range(4)]
    big = jnp.ones((BANDWIDTH_FLOATS,), jnp.float32)
    bw_fn = jax.jit(jnp.sum)

    variants = {"bandwidth": (bw_fn, [(big,)], 3)}
    gd_d, p_d = split["dense"]
    variants["head"] = (lambda x: head_j(gd_d, p_d, x), [(x,) for x in xs], 10)
    for name, (gd, p) in split.items():
        sparse = name == "spark"
        variants[f"ffn/{name}"] = (lambda x, gd=gd, p=p, s=sparse: ffn_j(gd, p, x, s), [(x,) for x in xs], 10)

    templates, stats = {}, {}
    for t in args.prompts:
        prompt = jax.random.randint(jax.random.key(t), (1, t), 0, cfgs["dense"].vocab_size)
        for name, (gd, p) in split.items():
            sparse = name == "spark"
            print(f"prefill {name} t={t}", file=sys.stderr, flush=True)
            state = gen.start(gd, p, prompt, jnp.array([t]), jax.random.key(0), max_new_tokens=args.new_tokens,
                              sparse=sparse)
            templates[(name, t)] = jax.block_until_ready(state)

            def dec(gd=gd, p=p, key=(name, t), sparse=sparse):
                fresh = jax.tree.map(jnp.copy, templates[key])
                out = gen.decode(gd, p, fresh, max_steps=args.new_tokens, sampler=sampler, eos_id=-1, pad_id=0,
                             sparse=sparse)
                stats[key] = out
                return out.rows.gen_RL

            variants[f"decode/{name}/{t}"] = (dec, [()], 1)
            attn = Stateful(lambda x, pos, c, gd=gd, p=p, s=sparse: attn_j(gd, p, x, pos, c, s),
                            jax.tree.map(jnp.copy, state.rows.cache))
            pos = jnp.array([[t]], jnp.int32)
            variants[f"attn/{name}/{t}"] = (attn, [(x, pos) for x in xs], 5)
    res = interleaved(variants, args.rounds)
    return summarize(args, cfgs, split, res, stats)


def summarize(args, cfgs, split, res, stats):
    med = {k: v["median_s"] for k, v in res.items()}
    bw = 4 * BANDWIDTH_FLOATS / med["bandwidth"]
    out = {"layers": args.layers, "dtype": args.dtype, "new_tokens": args.new_tokens, "rounds": args.rounds,
           "note": f"Gemma-2-2B per-layer shapes, {args.layers} of {FULL_LAYERS} layers, vocab 256000, random "
                   "weights, batch 1; 26-layer figures are projections from the measured layer and head times",
           "bandwidth_GBps": bw / 1e9, "head_ms": med["head"] * 1e3,
           "ffn_ms": {n: med[f"ffn/{n}"] * 1e3 for n in cfgs},
           "ffn_speedup": med["ffn/dense"] / med["ffn/spark"],
           "ms_per_token": {}, "spark_vs_dense_decode_speedup": {}, "projected_26_layer_speedup": {},
           "attention_ms": {}, "attention_speedup": {}, "bandwidth_fraction": {"dense": {}, "spark": {}},
           "spark_decode_stats": {}}
    for t in args.prompts:
        per_tok = {n: med[f"decode/{n}/{t}"] / args.new_tokens for n in cfgs}
        out["ms_per_token"][t] = {n: v * 1e3 for n, v in per_tok.items()}
        out["spark_vs_dense_decode_speedup"][t] = per_tok["dense"] / per_tok["spark"]
        scale = FULL_LAYERS / args.layers
        proj = {n: scale * (v - med["head"]) + med["head"] for n, v in per_tok.items()}
        out["projected_26_layer_speedup"][t] = proj["dense"] / proj["spark"]
        out["attention_ms"][t] = {n: med[f"attn/{n}/{t}"] * 1e3 for n in cfgs}
        out["attention_speedup"][t] = med[f"attn/dense/{t}"] / med[f"attn/spark/{t}"]
        s = gen.summarize(stats[("spark", t)])
        density = float(jnp.mean(s["ffn_density"]))
        kpq = float(jnp.mean(s["keys_per_query"]))
        out["spark_decode_stats"][t] = {"ffn_density": density, "keys_per_query": kpq,
                                        "ffn_overflow": int(s["ffn_overflow"].sum()),
                                        "attn_overflow": int(s["attn_overflow"].sum())}
        visible = t + (args.new_tokens + 1) / 2
        for n, (_, p) in split.items():
            b = bytes_per_token(cfgs[n], p, visible, density, kpq)
            out["bandwidth_fraction"][n][t] = b / bw / per_tok[n]
    return out


def print_table(r):
    print(f"\nDecode at batch 1, {r['note']}; bandwidth {r['bandwidth_GBps']:.1f} GB/s, head {r['head_ms']:.1f} ms")
    print(f"{'prompt':>7} {'dense ms/tok':>12} {'spark ms/tok':>12} {'speedup':>8} {'26L proj':>9} "
          f"{'attn speedup':>12} {'BW dense':>9} {'BW spark':>9} {'keys/q':>7} {'FFN dens':>8}")
    for t, ms in r["ms_per_token"].items():
        st = r["spark_decode_stats"][t]
        print(f"{t:>7} {ms['dense']:>12.1f} {ms['spark']:>12.1f} {r['spark_vs_dense_decode_speedup'][t]:>7.2f}x "
              f"{r['projected_26_layer_speedup'][t]:>8.2f}x {r['attention_speedup'][t]:>11.2f}x "
              f"{r['bandwidth_fraction']['dense'][t]:>9.0%} {r['bandwidth_fraction']['spark'][t]:>9.0%} "
              f"{st['keys_per_query']:>7.0f} {st['ffn_density']:>8.3f}")
    print(f"FFN only ({r['layers']} layers, one token): dense {r['ffn_ms']['dense']:.2f} ms, "
          f"spark {r['ffn_ms']['spark']:.2f} ms -> {r['ffn_speedup']:.2f}x")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompts", default="128,1024,4096")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    args.prompts = [int(x) for x in args.prompts.split(",")]
    if args.layers < 2 or args.layers % 2:
        ap.error("--layers must be an even number >= 2 (local/global pairs)")
    r = run(args)
    print_table(r)
    write_json(args.json, {"benchmark": "decode", **r})


if __name__ == "__main__":
    main()
