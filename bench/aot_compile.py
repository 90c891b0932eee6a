"""Compile the real train step for a TPU pod topology on this machine (no TPU needed) and say
whether it fits: per-chip memory against the chip's HBM, compile time, FLOPs per chip.

    pip install -e '.[test]'     # the test extra carries libtpu (the TPU compiler) at the pinned jax
    python bench/aot_compile.py --config configs/spark_gemma2_2b.py --topology v5p:4x4x4 \\
        [--config.train.remat=full …] [--what train|sample] [--json PATH]

`jax.experimental.topologies` describes the pod's devices, `jax.jit(...).lower(abstract
arguments).compile()` runs the TPU compiler from libtpu (as MaxText's train_compile.py does), and
`compiled.memory_analysis()` / `cost_analysis()` read back what one chip needs. Nothing is
allocated: the state and batch are ShapeDtypeStructs with their shardings.

Per-chip total = argument + output + temp − alias bytes (donated state is aliased to the new
state). HBM is the limit the TPU compiler itself uses: the "available HBM" it reports when a
program does not fit (libtpu 0.0.42.1: v5e 15.75 GiB, v5p 95.74 GiB, v6e 31.25 GiB, v4 15.25 GiB
per device). "fits" means total ≤ 0.85 × HBM (headroom for the runtime and fragmentation).

Analytic FLOPs are the README's count, 3 × forward (6·N per token for the matmuls, plus 4·N·H·T
per layer for scores and values over all T keys, masked not skipped), for one step at the width
the step trains (MatFormer 'sample' mode: each granularity in its own row; 'sum': all of them).
Rematerialisation recomputes forward work, so XLA's count is above it by up to one forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import resource
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu is used as a compiler only: no TPU is attached
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")  # quiets libtpu's probe for a local TPU
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: no lock on a TPU to take

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import write_json  # noqa: E402
from bench.train_throughput import forward_flops_per_token  # noqa: E402
from spark import sharding, train_lib  # noqa: E402
from spark.cli import apply_overrides, load_config_file, main_guard, split_overrides  # noqa: E402
from spark.config import Config  # noqa: E402
from spark.errors import ConfigError  # noqa: E402
from spark.train import sharded_step  # noqa: E402

GIB = 2**30
HBM_GIB = {"TPU v5 lite": 15.75, "TPU v5": 95.74, "TPU v6 lite": 31.25, "TPU v4": 15.25}
FIT_FRACTION = 0.85
SAMPLE = {"batch": 64, "prompt": 2048, "new_tokens": 256}  # --what sample


def topology_devices(name: str) -> list:
    """The devices of a TPU topology ('v5p:4x4x4'), or a one-line ConfigError."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ConfigError("libtpu is not installed: pip install -e '.[test]' (or 'jax[tpu]==<the pinned jax>')") \
            from None
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # noqa: BLE001  (libtpu raises JaxRuntimeError / ValueError)
        msg = str(e).splitlines()[0][:200]
        if "external name" in msg or "topology" in msg.lower():
            raise ConfigError(f"unknown TPU topology {name!r} ({msg}); "
                              "use e.g. v5e:2x2, v5e:16x16, v5p:4x4x4, v6e:8x8") from None
        raise ConfigError(f"libtpu could not describe topology {name!r}: {msg}") from None


def hbm_bytes(device) -> int:
    kind = device.device_kind
    if kind not in HBM_GIB:
        raise ConfigError(f"no HBM figure for device kind {kind!r}; known: {sorted(HBM_GIB)}")
    return int(HBM_GIB[kind] * GIB)


def abstract_batch(cfg: Config, batch_sh) -> dict:
    shape = (cfg.train.batch_size, cfg.train.seq_len)
    spec = lambda dt: jax.ShapeDtypeStruct(shape, dt, sharding=batch_sh)  # noqa: E731
    return {"inputs": spec(jnp.int32), "targets": spec(jnp.int32), "positions": spec(jnp.int32),
            "segment_ids": spec(jnp.int32), "loss_mask": spec(jnp.float32)}


def train_program(cfg: Config, mesh):
    """(jitted train step, its lower, abstract arguments) for `mesh`."""
    abstract, state_sh, batch_sh, step_fn = sharded_step(cfg, mesh)
    return step_fn, step_fn.lower, (sharding.sharded_shapes(abstract, state_sh), abstract_batch(cfg, batch_sh))


def sample_program(cfg: Config, mesh, batch: int, prompt: int, new_tokens: int):
    """(jitted prefill + decode loop of decode/generate.py, its lower, abstract arguments): `batch` prompts of
    `prompt` tokens, `new_tokens` sampled in the while_loop; parameters FSDP-sharded as in training,
    prompts and the KV cache sharded by row."""
    from decode import generate
    from decode.sampling import SamplerConfig

    graphdef = train_lib.graphdef_of(cfg)
    abstract = jax.eval_shape(lambda: train_lib.init_state(cfg)["params"])
    params = sharding.sharded_shapes(abstract, sharding.tree_shardings(mesh, abstract))
    rows = sharding.batch_sharding(mesh)
    prompts = jax.ShapeDtypeStruct((batch, prompt), jnp.int32, sharding=rows)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
    key = jax.eval_shape(lambda: jax.random.key(0))
    static = dict(max_new_tokens=new_tokens, sampler=SamplerConfig(), eos_id=1, pad_id=0,
                  scan_prefill=cfg.train.scan_layers)
    return (functools.partial(generate.generate, graphdef, **static),
            functools.partial(generate.generate.lower, graphdef, **static), (params, prompts, lengths, key))


def compile_report(lower, args, hbm: int, n_devices: int) -> dict:
    """Lower and compile at `args`; per-chip memory, XLA's FLOPs and the fit verdict."""
    t0 = time.perf_counter()
    lowered = lower(*args)
    t1 = time.perf_counter()
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # a TPU executable cannot be read back on CPU
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        return _out_of_memory(e, t1 - t0, time.perf_counter() - t1, hbm, n_devices)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)
    return {"lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
            "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
            "temp_bytes": mem.temp_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes,
            "total_bytes": total, "hbm_bytes": hbm, "hbm_fraction": round(total / hbm, 4),
            "fits": bool(total <= FIT_FRACTION * hbm), "xla_flops_per_chip": float(cost.get("flops", 0.0)),
            "n_devices": n_devices}


def _out_of_memory(err, lower_s: float, compile_s: float, hbm: int, n_devices: int) -> dict:
    """The report of a compile the TPU compiler refused for lack of HBM (it names the temporaries'
    size; the other sizes are not reported, so total = temporaries)."""
    m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", str(err))
    if "RESOURCE_EXHAUSTED" not in str(err) or not m:
        raise err
    temp = int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)
    return {"lower_s": round(lower_s, 2), "compile_s": round(compile_s, 2), "argument_bytes": None,
            "output_bytes": None, "temp_bytes": temp, "alias_bytes": None, "total_bytes": temp, "hbm_bytes": hbm,
            "hbm_fraction": round(temp / hbm, 4), "fits": False, "xla_flops_per_chip": None, "n_devices": n_devices,
            "compiler_error": str(err).splitlines()[0][:300]}


def matmul_flops(closed_jaxpr, branch: int | None = None) -> float:
    """2 × multiply-adds of every dot_general in a jaxpr, with scan bodies multiplied by their
    length (XLA's cost analysis counts a loop body once), a while_loop body once, and of a cond
    the branch `branch` (MatFormer's run-time width switch: the granularity the step trains) or
    else the largest. The whole program's count, all devices together."""
    total = 0.0
    for eqn in closed_jaxpr.jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in lc])
        elif name == "scan":
            total += eqn.params["length"] * matmul_flops(eqn.params["jaxpr"], branch)
        elif name == "cond":
            counts = [matmul_flops(b, branch) for b in eqn.params["branches"]]
            total += counts[branch] if branch is not None and branch < len(counts) else max(counts)
        else:
            for key in ("jaxpr", "call_jaxpr", "fun_jaxpr", "body_jaxpr"):
                sub = eqn.params.get(key)
                if sub is not None:
                    sub = sub if hasattr(sub, "jaxpr") else jax.extend.core.ClosedJaxpr(sub, ())
                    total += matmul_flops(sub, branch)
    return total


def analytic_flops_per_chip(cfg: Config, n_devices: int) -> dict:
    """3 × forward FLOPs of one step per granularity (and their sum for 'sum' mode), per chip."""
    t = cfg.train
    tokens = t.batch_size * t.seq_len
    per = {name: 3.0 * forward_flops_per_token(cfg.model, w, t.seq_len) * tokens / n_devices
           for name, w in train_lib.granularities(cfg)}
    if t.matformer_mode == "sum":
        per["step"] = sum(per.values())
    else:
        per["step"] = per["F"] if t.matformer_mode == "off" else sum(per.values()) / len(per)
    return per


def run(cfg: Config, topology: str, what: str) -> dict:
    devices = topology_devices(topology)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    hbm = hbm_bytes(devices[0])
    n = len(devices)
    with jax.set_mesh(mesh):  # as in training: the activation sharding constraints read it
        fn, lower, args = train_program(cfg, mesh) if what == "train" else sample_program(cfg, mesh, **SAMPLE)
        jaxpr = jax.make_jaxpr(fn)(*args)
        rep = compile_report(lower, args, hbm, n)
    rep.update(topology=topology, device_kind=devices[0].device_kind, mesh=dict(mesh.shape), what=what,
               flops_per_chip=matmul_flops(jaxpr) / n,
               peak_host_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))
    if what == "sample":
        return {**rep, "sample": SAMPLE, "analytic_flops_per_chip": None}
    analytic = analytic_flops_per_chip(cfg, n)
    grans = train_lib.granularities(cfg)
    rep.update(analytic_flops_per_chip=analytic["step"], analytic_flops_by_granularity=analytic)
    if cfg.train.matformer_mode == "sample" and len(grans) > 1:  # the program as run at each granularity
        rep["flops_per_chip_by_granularity"] = {name: matmul_flops(jaxpr, i) / n for i, (name, _) in enumerate(grans)}
        rep["flops_per_chip"] = sum(rep["flops_per_chip_by_granularity"].values()) / len(grans)
    return rep


def summary(rep: dict, cfg: Config) -> str:
    gb = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    t = cfg.train
    verdict = "fits" if rep["fits"] else "DOES NOT FIT"
    if rep["what"] == "sample":
        what = (f"sampling {rep['sample']['batch']} prompts of {rep['sample']['prompt']} tokens + "
                f"{rep['sample']['new_tokens']} new")
    else:
        what = (f"batch {t.batch_size} x {t.seq_len}, remat {t.remat}, scan {t.scan_layers}, "
                f"loss_chunk {t.loss_chunk}, attn_block {cfg.model.attn_block}, matformer {t.matformer_mode}")
    lines = [f"{rep['topology']}: {rep['n_devices']} x {rep['device_kind']}, mesh {rep['mesh']}; "
             f"{cfg.model.num_layers} layers, {what}",
             f"lower {rep['lower_s']:.1f} s, compile {rep['compile_s']:.1f} s, peak host RSS "
             f"{rep['peak_host_rss_gb']} GB"]
    if "compiler_error" in rep:
        return "\n".join([*lines, f"per chip: temporaries {gb(rep['temp_bytes'])} of {gb(rep['hbm_bytes'])} HBM "
                          f"({100 * rep['hbm_fraction']:.0f}%)", f"verdict: {verdict} ({rep['compiler_error']})"])
    lines.append(f"per chip: arguments {gb(rep['argument_bytes'])} + outputs {gb(rep['output_bytes'])} + "
                 f"temporaries {gb(rep['temp_bytes'])} - aliased {gb(rep['alias_bytes'])} = "
                 f"{gb(rep['total_bytes'])} of {gb(rep['hbm_bytes'])} HBM ({100 * rep['hbm_fraction']:.1f}%; "
                 "the compiler's limit, see the docstring)")
    flops = f"matmul FLOPs per chip: {rep['flops_per_chip']:.3e} (the program's, loops multiplied out)"
    if rep.get("analytic_flops_per_chip"):
        ratio = rep["flops_per_chip"] / rep["analytic_flops_per_chip"]
        flops += (f"; analytic {rep['analytic_flops_per_chip']:.3e} (x{ratio:.2f}: rematerialisation and the "
                  "flash backward recompute)")
    lines.append(flops)
    for name, f in rep.get("flops_per_chip_by_granularity", {}).items():
        lines.append(f"  at {name}: {f:.3e} (analytic {rep['analytic_flops_by_granularity'][name]:.3e})")
    lines.append(f"XLA cost analysis: {rep['xla_flops_per_chip']:.3e} FLOPs per chip (counts each loop body once)")
    lines.append(f"verdict: {verdict} (limit {FIT_FRACTION:.0%} of HBM, headroom "
                 f"{gb(FIT_FRACTION * rep['hbm_bytes'] - rep['total_bytes'])})")
    return "\n".join(lines)


def main():
    argv, overrides = split_overrides(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5e:16x16, v5p:4x4x4")
    ap.add_argument("--what", default="train", choices=["train", "sample"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cfg = apply_overrides(load_config_file(args.config), overrides)
    rep = run(cfg, args.topology, args.what)
    print(summary(rep, cfg))
    if args.json:
        write_json(args.json, {"config": args.config, "overrides": dict(overrides), **rep,
                               "train": dataclasses.asdict(cfg.train)})


if __name__ == "__main__":
    main_guard(main)
