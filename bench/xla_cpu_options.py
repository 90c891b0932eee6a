"""What XLA:CPU itself reaches on the decode GEMVs, before any custom kernel: back ends (XNNPACK,
oneDNN, YNNPACK fusions, vector width, fast math — XLA_FLAGS, one process each) × formulations of
the same product, at the Gemma-2-2B batch-1 shapes, against the read bandwidth measured in the
same process.

    python bench/xla_cpu_options.py [--pairs 3] [--flags default,xnn_dot,...] [--json ...]

Products (x: one token, f32; W stored neuron-major [F, D] as spark/ffn.py):
  rows  y[F] = W[F, D]·x[D]   (gate/up projections, the Spark predictor K1, the 256k-vocab head)
  cols  y[D] = h[F]·W[F, D]   (the down projection)
Formulations per weight dtype:
  f32   dot        — jnp.einsum (what the model runs)
        mulsum     — jnp.sum(W * x, axis): an elementwise-reduce loop fusion, no dot emitter
  bf16  dot_bf16   — x cast to bf16, einsum with f32 accumulation (preferred_element_type)
        upcast_dot — W.astype(f32) then the f32 einsum (XLA may or may not fuse the convert)
        mulsum     — jnp.sum(W.astype(f32) * x, axis): reads the bf16 bytes once
  both  kernel     — spark.kernels (XLA FFI, cpu_kernels.cc), when built
  spark ffn gather — the Spark FFN decode's active rows of K2 and V (2B shapes, 8% active):
        xla (row gathers + einsums) vs kernel; bytes = the active rows

Each flag set runs in its own process (XLA_FLAGS are read at start); processes alternate
A B C … A B C … for --pairs rounds, each timing its own bandwidth (jnp.sum over 1 GiB). Reported per
(flag set, product, formulation): GB/s of weight bytes (median over rounds) and the fraction of
that process's bandwidth. JSON: bench/results/xla_cpu_options.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG_SETS = {
    "default": "",
    "xnn_dot": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "xnn_off": "--xla_cpu_use_xnnpack=false",
    "onednn": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "ynn_dot": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "vector512": "--xla_cpu_prefer_vector_width=512",
    "fast_math": "--xla_cpu_enable_fast_math=true",
}
SHAPES = {"ffn 9216x2304": (9216, 2304), "head 256000x2304": (256000, 2304)}
BANDWIDTH_FLOATS = 256 * 1024 * 1024


def formulations(jnp, kind: str, dtype: str):
    """name -> f(W, x) for the product `kind` ('rows' | 'cols') with weights of `dtype`."""
    rows = kind == "rows"
    spec = "FD,D->F" if rows else "FD,F->D"
    bcast = (lambda x: x[None, :]) if rows else (lambda x: x[:, None])  # noqa: E731
    axis = 1 if rows else 0
    if dtype == "float32":
        return {"dot": lambda w, x: jnp.einsum(spec, w, x),
                "mulsum": lambda w, x: jnp.sum(w * bcast(x), axis)}
    return {"dot_bf16": lambda w, x: jnp.einsum(spec, w, x.astype(jnp.bfloat16), preferred_element_type=jnp.float32),
            "upcast_dot": lambda w, x: jnp.einsum(spec, w.astype(jnp.float32), x),
            "mulsum": lambda w, x: jnp.sum(w.astype(jnp.float32) * bcast(x), axis)}


def kernel_formulations(kind: str):
    """The spark.kernels FFI kernel of the product (empty when the extension is not built)."""
    from spark import kernels

    if not kernels.enabled():
        return {}
    if kind == "rows":
        return {"kernel": lambda w, x: kernels.gemv_rows(x[None], w)[0]}
    return {"kernel": lambda w, x: kernels.gemv_cols(x[None], w)[0]}


def gather_variants(jnp, rng, dtype):
    """The Spark FFN decode at 2B shapes (F 13824, r 1024, k = 8% + 3σ capacity): XLA's row gathers
    + einsums (spark/ffn.py off CPU) vs the fused kernel. -> name -> (fn, args), bytes of rows read."""
    import numpy as np

    from spark import kernels, sparsity

    f, d, r = 13824, 2304, 1024
    cap = sparsity.capacity(0.08 * f, f, 3.0)
    k2 = jnp.asarray(rng.standard_normal((f, d - r), np.float32) / 40, dtype)
    v = jnp.asarray(rng.standard_normal((f, d), np.float32) / 40, dtype)
    active = int(0.08 * f)
    idx = jnp.asarray(np.sort(rng.choice(f, cap, replace=False))[None], jnp.int32)
    act = jnp.asarray(np.where(np.arange(cap) < active, rng.random(cap), 0.0)[None], jnp.float32)
    x2 = jnp.asarray(rng.standard_normal((1, d - r), np.float32))
    out = {"xla": (kernels.capacity_gather, (x2, idx, act, k2, v))}
    if kernels.enabled():
        act_NF = jnp.zeros((1, f), jnp.float32).at[0, idx[0]].set(act[0])
        out["kernel"] = (lambda *a: kernels.ffn_gather(*a)[0], (x2, act_NF, k2, v))
    return out, active * (2 * d - r) * jnp.dtype(dtype).itemsize


def child(rounds: int) -> dict:
    """Run in a process with its XLA_FLAGS: every (shape, product, dtype, formulation) timed, one
    round at a time, with the bandwidth."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, ROOT)
    from bench.common import interleaved

    rng = np.random.default_rng(0)
    big = jnp.ones((BANDWIDTH_FLOATS,), jnp.float32)
    variants, nbytes = {"bandwidth": (jax.jit(jnp.sum), [(big,)], 3)}, {}
    for sname, (f, d) in SHAPES.items():
        w32 = jnp.asarray(rng.standard_normal((f, d), np.float32) / np.sqrt(d))
        for dtype in ("float32", "bfloat16"):
            w = w32.astype(dtype)
            for kind in ("rows", "cols"):
                if sname.startswith("head") and kind == "cols":
                    continue  # the head is only ever a rows product
                x = jnp.asarray(rng.standard_normal((d if kind == "rows" else f,), np.float32))
                for fname, fn in (formulations(jnp, kind, dtype) | kernel_formulations(kind)).items():
                    key = f"{sname} {kind} {dtype} {fname}"
                    calls = 3 if sname.startswith("head") else 20
                    variants[key] = (jax.jit(fn), [(w, x)], calls)
                    nbytes[key] = w.size * w.dtype.itemsize
        del w32
    for dtype in ("float32", "bfloat16"):
        gv, gbytes = gather_variants(jnp, rng, dtype)
        for fname, (fn, fargs) in gv.items():
            key = f"spark ffn gather {dtype} {fname}"
            variants[key] = (jax.jit(fn), [fargs], 20)
            nbytes[key] = gbytes
    t = interleaved(variants, rounds)
    bw = 4 * BANDWIDTH_FLOATS / t["bandwidth"]["median_s"]
    return {"bandwidth_GBps": bw / 1e9,
            "GBps": {k: nbytes[k] / v["median_s"] / 1e9 for k, v in t.items() if k != "bandwidth"},
            "bandwidth_fraction": {k: nbytes[k] / v["median_s"] / bw for k, v in t.items() if k != "bandwidth"}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=3, help="rounds of the alternating processes")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds inside each process")
    ap.add_argument("--flags", default=",".join(FLAG_SETS))
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "xla_cpu_options.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.rounds)), flush=True)
        return
    names = args.flags.split(",")
    unknown = [n for n in names if n not in FLAG_SETS]
    if unknown:
        ap.error(f"unknown flag sets {unknown}; known: {list(FLAG_SETS)}")
    runs = {n: [] for n in names}
    for p in range(args.pairs):
        for n in names:
            env = os.environ | {"XLA_FLAGS": FLAG_SETS[n], "JAX_PLATFORMS": "cpu"}
            r = subprocess.run([sys.executable, __file__, "--child", "--rounds", str(args.rounds)], env=env,
                               capture_output=True, text=True)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if r.returncode or not line:
                print(f"{n}: failed (rc {r.returncode}): {r.stderr.strip().splitlines()[-1:]}", flush=True)
                runs[n].append(None)
                continue
            runs[n].append(json.loads(line[0][7:]))
            print(f"round {p + 1} {n}: bandwidth {runs[n][-1]['bandwidth_GBps']:.1f} GB/s", flush=True)
    out = {"flags": {n: FLAG_SETS[n] for n in names}, "results": {}}
    for n, rs in runs.items():
        rs = [r for r in rs if r]
        if not rs:
            out["results"][n] = None
            continue
        out["results"][n] = {
            "bandwidth_GBps": statistics.median(r["bandwidth_GBps"] for r in rs),
            "GBps": {k: statistics.median(r["GBps"][k] for r in rs) for k in rs[0]["GBps"]},
            "bandwidth_fraction": {k: statistics.median(r["bandwidth_fraction"][k] for r in rs)
                                   for k in rs[0]["GBps"]}}
    keys = next(r for r in out["results"].values() if r)["GBps"]
    print("\nweight GB/s (fraction of the process's bandwidth), medians over rounds")
    print(f"{'product':<42}" + "".join(f"{n:>16}" for n in names))
    for k in keys:
        cells = [f"{r['GBps'][k]:6.1f} ({r['bandwidth_fraction'][k]:4.0%})" if r else "failed"
                 for r in out["results"].values()]
        print(f"{k:<42}" + "".join(f"{c:>16}" for c in cells))
    sys.path.insert(0, ROOT)
    from bench.common import write_json

    write_json(args.json, out)


if __name__ == "__main__":
    main()
