"""Statistical top-k vs jax.lax.top_k on activation-shaped inputs (k = 8% of the row).

    python bench/sparsity.py [--rounds 7] [--json bench/results/sparsity.json]

Variants run interleaved in one process on rotating inputs (so no input stays in cache or trains
the branch predictor); the table shows medians and the ratio lax.top_k / statistical top-k.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import interleaved, write_json  # noqa: E402
from spark import sparsity  # noqa: E402

SHAPES = [(1, 9216), (256, 9216), (1024, 13824)]
K_FRAC = 0.08


def variants_for(shape, n_inputs: int):
    rows, d = shape
    k = int(round(K_FRAC * d))
    keys = jax.random.split(jax.random.key(rows * d), n_inputs)
    xs = [(jax.random.normal(key, shape, jnp.float32),) for key in keys]
    calls = max(1, 4096 // rows)
    stat = jax.jit(lambda x: sparsity.soft_topk(x, K_FRAC))
    exact = jax.jit(lambda x: jax.lax.top_k(x, k))
    return {"stat_topk": (stat, xs, calls), "lax_top_k": (exact, xs, max(1, calls // 4))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None, help="write results to this path")
    args = ap.parse_args(argv)

    results, payload = {}, {"k_frac": K_FRAC, "rounds": args.rounds, "shapes": {}}
    print(f"{'shape':>14} {'stat top-k':>12} {'lax.top_k':>12} {'speedup':>9}")
    for shape in SHAPES:
        res = interleaved(variants_for(shape, n_inputs=4), args.rounds)
        stat, exact = res["stat_topk"]["median_s"], res["lax_top_k"]["median_s"]
        name = f"{shape[0]}x{shape[1]}"
        results[name] = exact / stat
        payload["shapes"][name] = {**res, "speedup": exact / stat}
        print(f"{name:>14} {stat * 1e3:10.3f}ms {exact * 1e3:10.3f}ms {exact / stat:8.1f}x")
    payload["stat_topk_speedup_256x9216"] = results["256x9216"]
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
