"""Decode with the weights on 4 KB pages vs the same weights on 2 MB pages, interleaved in one process.

    python bench/huge_pages.py [--model spark|dense] [--layers 26] [--prompt 128] [--new_tokens 32]
                               [--rounds 7] [--json bench/results/huge_pages_spark.json]

One model (Gemma-2-2B shapes, random bf16 weights, f32 activations, bench/decode_models.py) is
built once; a copy of its parameters is moved into transparent huge pages
(spark/kernels/hugepages.py). The prompt is prefilled once, then each round decodes `--new_tokens`
tokens from that state with each copy in turn (the jitted while_loop, generate.decode). Reported:
the median ms/token of each, the median of the per-round ratios, and the collapse's cost. The Spark
FFN reads ~8% of the rows of K2 and V, scattered: on 4 KB pages nearly every row misses the TLB.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import interleaved, write_json  # noqa: E402
from bench.decode_models import build, decode_from, model_configs, param_bytes, prefill  # noqa: E402
from spark import kernels  # noqa: E402
from spark.kernels import hugepages  # noqa: E402


def run(args) -> dict:
    cfgs = model_configs(args.layers, "float32", "bfloat16", models=(args.model,))
    gd, small = build(cfgs, args.seed)[args.model]
    huge = jax.block_until_ready(jax.tree.map(lambda a: jnp.array(a, copy=True), small))
    t0 = time.perf_counter()
    moved = hugepages.collapse(huge)
    collapse_s = time.perf_counter() - t0
    sparse = args.model == "spark"
    prompt = jax.random.randint(jax.random.key(args.prompt), (1, args.prompt), 0, cfgs[args.model].vocab_size)
    state = prefill(gd, small, prompt, args.new_tokens, sparse)

    def decode(params):
        return decode_from(gd, params, state, args.new_tokens, sparse).rows.gen_RL

    res = interleaved({"4k": (lambda: decode(small), [()], 1), "2m": (lambda: decode(huge), [()], 1)},
                      args.rounds)
    per_tok = {k: [s * 1e3 / args.new_tokens for s in r["samples_s"]] for k, r in res.items()}
    ratios = [a / b for a, b in zip(per_tok["4k"], per_tok["2m"], strict=True)]
    return {"model": args.model, "layers": args.layers, "prompt": args.prompt, "new_tokens": args.new_tokens,
            "rounds": args.rounds, "kernels": kernels.status(), "param_GB": param_bytes(small) / 1e9,
            "collapsed_GB": moved / 1e9, "collapse_s": collapse_s,
            "ms_per_token": {k: statistics.median(v) for k, v in per_tok.items()},
            "samples_ms_per_token": per_tok, "speedup_median_of_rounds": statistics.median(ratios)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="spark", choices=["spark", "dense"])
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    r = run(args)
    print(f"{r['model']}, {r['layers']} layers, prompt {r['prompt']}: 4 KB pages {r['ms_per_token']['4k']:.1f} "
          f"ms/token, 2 MB pages {r['ms_per_token']['2m']:.1f} ms/token -> {r['speedup_median_of_rounds']:.3f}x "
          f"(median of {r['rounds']} rounds); {r['collapsed_GB']:.2f} of {r['param_GB']:.2f} GB collapsed in "
          f"{r['collapse_s']:.1f} s")
    write_json(args.json, {"benchmark": "huge_pages", **r})


if __name__ == "__main__":
    main()
