"""The CPU kernels' ISA paths against each other and XLA's own dot, at Gemma-2-2B decode shapes.

    python bench/kernel_paths.py [--rounds 7] [--tokens 1,4] [--json bench/results/kernel_paths.json]

Per weight dtype (f32, bf16) and token count N (1: a decode step; 4: a speculative verify block):
  rows    y = x · Wᵀ, W [9216, 2304] (an FFN gate / up projection; kernels.gemv_rows)
  cols    y = h · W,  W [9216, 2304] (the down projection; kernels.gemv_cols)
  gather  the Spark FFN's active rows, K2 [13824, 1280] and V [13824, 2304], 8% of the rows active
          for each token (kernels.ffn_gather; N tokens share none of their rows, as in a verify block
          of distinct tokens at worst)
for every kernel path this CPU has (SPARK_CPU_KERNELS_ISA: avx512, avx2, portable) and XLA's dot
(SPARK_CPU_KERNELS=0: the jnp reference — for the gather every row, the masked formula), all
interleaved round by round in one process. Each variant rotates through 4 weight copies, so no
weight stays in cache; the read bandwidth (jnp.sum over 1 GiB) is timed in the same rounds, and each
variant is reported as the fraction of it that its weight bytes reach (the bound is 1).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import BANDWIDTH_BYTES, bandwidth_variant, int_list, interleaved, write_json  # noqa: E402
from spark import kernels  # noqa: E402

COPIES = 4
F, D = 9216, 2304  # the dense GeGLU of Gemma-2-2B
FS, E, DENSITY = 13824, 1280, 0.08  # the Spark FFN: neurons, gate width D − r (r = 1024), active fraction


def paths() -> list[str]:
    best = kernels.ISAS[kernels.cpu_isa()] if kernels.enabled() else -1
    return [name for name, level in sorted(kernels.ISAS.items(), key=lambda kv: -kv[1]) if level <= best] + ["xla"]


def compiled(path: str, fn, args):
    """fn compiled for `args` under `path`'s environment (the dispatch reads it when tracing)."""
    env = {"SPARK_CPU_KERNELS": "0" if path == "xla" else "1", "SPARK_CPU_KERNELS_ISA": "" if path == "xla" else path}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return jax.jit(lambda *a: fn(*a)).lower(*args).compile()  # a new function: jit caches traces by it
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def cases(dtype, n: int, key):
    """name -> (fn, list of argument tuples, weight bytes read per call)."""
    ks = jax.random.split(key, 8)
    normal = lambda k, shape: (jax.random.normal(k, shape) * 0.03).astype(dtype)  # noqa: E731
    w = [normal(k, (F, D)) for k in jax.random.split(ks[0], COPIES)]
    k2 = [normal(k, (FS, E)) for k in jax.random.split(ks[1], COPIES)]
    v = [normal(k, (FS, D)) for k in jax.random.split(ks[2], COPIES)]
    x, h, x2 = (jax.random.normal(ks[3], (n, D)), jax.random.normal(ks[4], (n, F)),
                jax.random.normal(ks[5], (n, E)))
    active = max(1, int(DENSITY * FS))
    perm = jax.random.permutation(ks[6], FS)
    act = jnp.zeros((n, FS)).at[jnp.arange(n)[:, None], perm[: n * active].reshape(n, active)].set(1.0)
    rows_read = min(FS, n * active)
    size = jnp.dtype(dtype).itemsize
    return {
        "rows": (lambda x, w: kernels.gemv_rows(x, w), [(x, wi) for wi in w], F * D * size),
        "cols": (lambda h, w: kernels.gemv_cols(h, w), [(h, wi) for wi in w], F * D * size),
        "gather": (lambda x2, a, k, v: kernels.ffn_gather(x2, a, k, v)[0],
                   [(x2, act, ki, vi) for ki, vi in zip(k2, v, strict=True)], rows_read * (E + D) * size),
    }


def run(args) -> dict:
    out = {"kernels": kernels.status(), "paths": paths(), "results": []}
    for dtype in (jnp.float32, jnp.bfloat16):
        for n in args.tokens:
            variants, nbytes = {"bandwidth": bandwidth_variant()}, {}
            for case, (fn, arg_list, b) in cases(dtype, n, jax.random.key(args.seed)).items():
                for path in out["paths"]:
                    variants[f"{case}/{path}"] = (compiled(path, fn, arg_list[0]), arg_list, args.calls)
                    nbytes[f"{case}/{path}"] = b
            med = {k: s["median_s"] for k, s in interleaved(variants, args.rounds).items()}
            bw = BANDWIDTH_BYTES / med.pop("bandwidth")
            for name, s in med.items():
                case, path = name.split("/")
                out["results"].append({"dtype": jnp.dtype(dtype).name, "tokens": n, "case": case, "path": path,
                                       "ms": s * 1e3, "GBps": nbytes[name] / s / 1e9,
                                       "bandwidth_fraction": nbytes[name] / s / bw, "bandwidth_GBps": bw / 1e9})
            print_block(out["results"], jnp.dtype(dtype).name, n, out["paths"])
    return out


def print_block(results, dtype: str, n: int, names: list[str]):
    rows = [r for r in results if r["dtype"] == dtype and r["tokens"] == n]
    print(f"\n{dtype}, N = {n} (bandwidth {rows[0]['bandwidth_GBps']:.1f} GB/s): ms (fraction of bandwidth)")
    print("case    " + "".join(f"{p:>18}" for p in names))
    for case in ("rows", "cols", "gather"):
        cells = {r["path"]: f"{r['ms']:.2f} ({r['bandwidth_fraction']:.2f})" for r in rows if r["case"] == case}
        print(f"{case:8}" + "".join(f"{cells.get(p, '-'):>18}" for p in names))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20, help="calls per timing sample")
    ap.add_argument("--tokens", type=int_list, default=[1, 4])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    print(kernels.status())
    write_json(args.json, run(args))


if __name__ == "__main__":
    main()
