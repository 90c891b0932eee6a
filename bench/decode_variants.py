"""One model's decode under two settings of the same run time, interleaved in one process.

    python bench/decode_variants.py --variant huge_pages|spin [--model spark|dense] [--layers 26]
                                    [--prompt 128] [--new_tokens 32] [--rounds 7] [--json FILE]

One model (Gemma-2-2B shapes, random bf16 weights, f32 activations, bench/decode_models.py) is
built once and its prompt prefilled once; each round decodes `--new_tokens` tokens from that state
(the jitted while_loop, generate.decode) under each setting in turn. Reported: the median ms/token
of each, and the median of the per-round ratios (first / second: > 1 means the second is faster).

  huge_pages  the weights on 4 KB pages vs a copy moved into 2 MB transparent huge pages
              (spark/kernels/hugepages.py): the Spark FFN reads ~8% of the rows of K2 and V,
              scattered, and on 4 KB pages nearly every row misses the TLB.
  spin        the kernels' helper task returning to XLA's pool after each call (spin 0) vs staying
              awake `--spin_us` µs for the next call's chunks (spark/kernels set_spin_us); both on
              2 MB pages.
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


def settings(args, params) -> tuple[dict, dict]:
    """name -> (params, set-up run before each sample), and what preparing them cost."""
    t0 = time.perf_counter()
    if args.variant == "huge_pages":
        huge = jax.block_until_ready(jax.tree.map(lambda a: jnp.array(a, copy=True), params))
        moved = hugepages.collapse(huge)
        info = {"collapsed_GB": moved / 1e9, "collapse_s": time.perf_counter() - t0}
        return {"4k": (params, lambda: None), "2m": (huge, lambda: None)}, info
    moved = hugepages.collapse(params)
    info = {"collapsed_GB": moved / 1e9, "collapse_s": time.perf_counter() - t0, "spin_us": args.spin_us}
    return {"spin 0": (params, lambda: kernels.set_spin_us(0)),
            f"spin {args.spin_us}": (params, lambda: kernels.set_spin_us(args.spin_us))}, info


def run(args) -> dict:
    cfgs = model_configs(args.layers, "float32", "bfloat16", models=(args.model,))
    gd, params = build(cfgs, args.seed)[args.model]
    variants, info = settings(args, params)
    sparse = args.model == "spark"
    prompt = jax.random.randint(jax.random.key(args.prompt), (1, args.prompt), 0, cfgs[args.model].vocab_size)
    state = prefill(gd, params, prompt, args.new_tokens, sparse)

    def decode(p, set_up):
        set_up()
        return decode_from(gd, p, state, args.new_tokens, sparse).rows.gen_RL

    try:
        res = interleaved({name: (lambda p=p, s=s: decode(p, s), [()], 1) for name, (p, s) in variants.items()},
                          args.rounds)
    finally:
        kernels.set_spin_us()
    per_tok = {k: [s * 1e3 / args.new_tokens for s in r["samples_s"]] for k, r in res.items()}
    first, second = per_tok.values()
    ratios = [a / b for a, b in zip(first, second, strict=True)]
    return {"variant": args.variant, "model": args.model, "layers": args.layers, "prompt": args.prompt,
            "new_tokens": args.new_tokens, "rounds": args.rounds, "kernels": kernels.status(),
            "param_GB": param_bytes(params) / 1e9, **info,
            "ms_per_token": {k: statistics.median(v) for k, v in per_tok.items()},
            "samples_ms_per_token": per_tok, "speedup_median_of_rounds": statistics.median(ratios)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", required=True, choices=["huge_pages", "spin"])
    ap.add_argument("--model", default="spark", choices=["spark", "dense"])
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--spin_us", type=int, default=kernels.SPIN_US)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    r = run(args)
    (a, ta), (b, tb) = r["ms_per_token"].items()
    print(f"{r['model']}, {r['layers']} layers, prompt {r['prompt']}: {a} {ta:.1f} ms/token, {b} {tb:.1f} ms/token "
          f"-> {r['speedup_median_of_rounds']:.3f}x (median of {r['rounds']} rounds); {r['collapsed_GB']:.2f} of "
          f"{r['param_GB']:.2f} GB collapsed in {r['collapse_s']:.1f} s")
    write_json(args.json, {"benchmark": f"decode_variants/{args.variant}", **r})


if __name__ == "__main__":
    main()
