"""One categorical draw per row: decode.sampling.categorical (two-stage inverse CDF) against
jax.random.categorical (a Gumbel per token), interleaved in one process, medians.

    python bench/sampling.py [--vocabs 8192,256000] [--batches 1,8] [--rounds 7] [--json F]

Both are jitted alone on log-probabilities [B, V]; each call uses a fresh key from a list.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import interleaved, write_json  # noqa: E402
from decode.sampling import categorical  # noqa: E402

DRAWS = {"two_stage": jax.jit(categorical),
         "gumbel": jax.jit(lambda key, logp: jax.random.categorical(key, logp, -1))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocabs", default="8192,256000")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    keys = list(jax.random.split(jax.random.key(1), 20))
    variants, cases = {}, []
    for v in map(int, args.vocabs.split(",")):
        for b in map(int, args.batches.split(",")):
            logp = jax.nn.log_softmax(3 * jax.random.normal(jax.random.key(v + b), (b, v)))
            cases.append((v, b))
            for name, fn in DRAWS.items():
                variants[f"{name}/{v}/{b}"] = (fn, [(k, logp) for k in keys], 20)
    res = interleaved(variants, args.rounds)
    rows = []
    for v, b in cases:
        ms = {n: res[f"{n}/{v}/{b}"]["median_s"] * 1e3 for n in DRAWS}
        rows.append({"vocab": v, "batch": b, "ms": ms, "gumbel_over_two_stage": ms["gumbel"] / ms["two_stage"]})
        print(f"V={v:7d} B={b:2d}  two-stage {ms['two_stage']:8.3f} ms  gumbel {ms['gumbel']:8.3f} ms  "
              f"ratio {ms['gumbel'] / ms['two_stage']:6.1f}x")
    write_json(args.json, {"benchmark": "sampling", "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
