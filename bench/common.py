"""Shared benchmark helpers: interleaved timing (ABAB rounds), medians, ratios, JSON output.

The machine's speed changes by up to 2x over minutes, so variants are always compared inside one
process, round by round, and only medians and ratios are reported.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp


def time_call(fn, args_list, calls: int) -> float:
    """Seconds per call of fn over `calls` calls, rotating through args_list (inputs not cached)."""
    jax.block_until_ready(fn(*args_list[0]))
    t0 = time.perf_counter()
    out = None
    for i in range(calls):
        out = fn(*args_list[i % len(args_list)])
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / calls


BANDWIDTH_FLOATS = 256 * 1024 * 1024  # 1 GiB of float32, summed to measure read bandwidth
BANDWIDTH_BYTES = 4 * BANDWIDTH_FLOATS


@functools.lru_cache(maxsize=None)
def bandwidth_variant(calls: int = 3):
    """An `interleaved` variant that reads BANDWIDTH_BYTES (`jnp.sum` over 1 GiB of float32): timed
    in the same rounds as the others, BANDWIDTH_BYTES / its median is the read bandwidth."""
    return jax.jit(jnp.sum), [(jnp.ones((BANDWIDTH_FLOATS,), jnp.float32),)], calls


def int_list(text: str) -> list[int]:
    """An argparse type: "128,1024" -> [128, 1024]."""
    return [int(t) for t in text.split(",")]


def interleaved(variants: dict, rounds: int) -> dict:
    """variants: name -> (fn, args_list, calls). Runs every variant once per round, in turn.

    Returns name -> {"median_s", "min_s", "max_s", "samples_s"}."""
    for fn, args_list, _ in variants.values():  # compile everything first
        jax.block_until_ready(fn(*args_list[0]))
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (fn, args_list, calls) in variants.items():
            samples[name].append(time_call(fn, args_list, calls))
    return {n: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s), "samples_s": s}
            for n, s in samples.items()}


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_checkpoint(workdir):
    """Train configs/cpu_demo.py into `workdir` unless it already holds checkpoints."""
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        return
    print(f"no checkpoint in {workdir}: training configs/cpu_demo.py first (about 6 minutes)")
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config",
                    os.path.join(ROOT, "configs", "cpu_demo.py"), "--workdir", workdir], check=True)


BENCH_LM_CMD = "python train.py --config configs/bench_lm.py --workdir runs/bench_lm"


def require_checkpoint(workdir, cmd: str = BENCH_LM_CMD, minutes: int = 45):
    """Exit with the command that trains `workdir` (by default runs/bench_lm, the speculative
    benchmarks' model: its decode step is bound by weight bytes) when it holds no checkpoint."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        sys.exit(f"no checkpoint in {workdir}: train it first (about {minutes} minutes here, resumable):\n  {cmd}")


def environment() -> dict:
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({**payload, "environment": environment()}, f, indent=2)
    print(f"wrote {path}")
