"""Is configs/bench_lm.py's batch-1 decode step bound by weight bytes? (The model every speculative
benchmark measures on; the 0.8M-parameter demo is dispatch-bound.)

    python bench/bench_lm.py [--workdir runs/bench_lm] [--steps 32] [--rounds 5]
                             [--json bench/results/bench_lm.json]

With --workdir its trained checkpoint, else random weights (the step's cost does not depend on the
values, except the Spark sparse path's realised density, which the stats report). Interleaved in
one process: `jnp.sum` over a float32 buffer of the model's weight bytes (the read bandwidth), and
`--steps` decode steps (the jitted while_loop of decode/generate.py, one token per step, a 64-token
prompt) at full width and at the F/8 MatFormer draft width, each on the Spark sparse-gather path and
on the masked path (every weight read). Reported: ms per step, the bytes a step must read (masked:
all weights; sparse: bench/decode_models.py's `bytes_per_token` from the realised FFN density and keys per
query), bandwidth fraction = bytes / step time / bandwidth, and the F/8 : F step-time ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import interleaved, write_json  # noqa: E402
from bench.decode_models import bytes_per_token, param_bytes  # noqa: E402
from decode import generate as gen  # noqa: E402
from decode.sampling import SamplerConfig  # noqa: E402
from spark.cli import load_config_file  # noqa: E402
from spark.matformer import cut_ffn  # noqa: E402
from spark.model import Transformer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = 64


def load(workdir: str | None):
    if workdir and os.path.isdir(os.path.join(workdir, "checkpoints")):
        from spark.train import load_checkpoint
        from spark.train_lib import graphdef_of

        cfg, params, step = load_checkpoint(workdir)
        return cfg.model, graphdef_of(cfg), params, step
    cfg = load_config_file(os.path.join(ROOT, "configs", "bench_lm.py")).model
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    return cfg, graphdef, params, None


def run(args) -> dict:
    cfg, graphdef, params, step = load(args.workdir)
    weight_bytes = param_bytes(params)
    buf = jnp.ones((weight_bytes // 4,), jnp.float32)
    prompt = jax.random.randint(jax.random.key(0), (1, PROMPT), 0, cfg.vocab_size)
    sampler = SamplerConfig(temperature=1.0)
    variants, stats = {"bandwidth": (jax.jit(jnp.sum), [(buf,)], 5)}, {}
    for width_name, widths in (("F", None), ("F/8", cfg.granularity_widths(8))):
        for sparse in (True, False):
            name = f"{width_name}/{'sparse' if sparse else 'masked'}"
            state = jax.block_until_ready(gen.start(graphdef, params, prompt, jnp.array([PROMPT]), jax.random.key(1),
                                                    max_new_tokens=args.steps, widths=widths, sparse=sparse))

            def dec(state=state, widths=widths, sparse=sparse, name=name):
                out = gen.decode(graphdef, params, jax.tree.map(jnp.copy, state), max_steps=args.steps,
                                 sampler=sampler, eos_id=-1, pad_id=0, widths=widths, sparse=sparse)
                stats[name] = gen.summarize(out)
                return out.rows.gen_RL

            variants[name] = (dec, [()], 1)
    res = interleaved(variants, args.rounds)
    med = {k: v["median_s"] for k, v in res.items()}
    bandwidth = weight_bytes / med["bandwidth"]
    out = {"config": "configs/bench_lm.py", "checkpoint_step": step, "weight_bytes": weight_bytes,
           "bandwidth_GBps": bandwidth / 1e9, "steps": args.steps, "ms_per_step": {}, "bytes_per_step": {},
           "bandwidth_fraction": {}, "timings": res}
    for name in variants:
        if name == "bandwidth":
            continue
        per_step = med[name] / args.steps
        st, draft = stats[name], name.startswith("F/8")
        w_cfg, w_params = (cfg, params) if not draft else draft_model(cfg, params)
        if name.endswith("sparse"):
            density = float(np.mean(st["ffn_density"])) if "ffn_density" in st else None
            kpq = float(np.mean(st["keys_per_query"])) if "keys_per_query" in st else None
            nbytes = bytes_per_token(w_cfg, w_params, PROMPT + args.steps / 2, density, kpq)
        else:
            nbytes = param_bytes(w_params)
        out["ms_per_step"][name] = per_step * 1e3
        out["bytes_per_step"][name] = nbytes
        out["bandwidth_fraction"][name] = nbytes / per_step / bandwidth
    out["draft_to_full_step"] = {p: med[f"F/8/{p}"] / med[f"F/{p}"] for p in ("sparse", "masked")}
    return out


def draft_model(cfg, params):
    """The F/8 draft as a model of its own: the FFNs cut to F/8 (spark/matformer.py: cut_ffn)."""
    f8 = cfg.granularity_widths(8)[0]
    key = "spark_ffn_dim" if cfg.ffn_kind == "spark" else "ffn_dim"
    return dataclasses.replace(cfg, **{key: f8}), cut_ffn(params, cfg, cfg.granularity_widths(8))


def print_table(r):
    print(f"\nconfigs/bench_lm.py batch-1 decode, {r['weight_bytes'] / 1e6:.0f} MB of weights, "
          f"read bandwidth {r['bandwidth_GBps']:.1f} GB/s (jnp.sum over the same bytes)")
    print(f"{'variant':>12} {'ms/step':>8} {'MB/step':>8} {'of bandwidth':>13}")
    for name, ms in r["ms_per_step"].items():
        print(f"{name:>12} {ms:8.2f} {r['bytes_per_step'][name] / 1e6:8.1f} {r['bandwidth_fraction'][name]:13.0%}")
    print("F/8 step : F step — " + ", ".join(f"{k} {v:.2f}" for k, v in r["draft_to_full_step"].items()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "bench_lm.json"))
    args = ap.parse_args(argv)
    r = run(args)
    print_table(r)
    write_json(args.json, r)


if __name__ == "__main__":
    main()
