"""Training throughput: tokens/s of a train step and the fraction of the machine's measured f32
matmul peak it reaches, for the demo configs (Spark + MatFormer vs dense).

    python bench/train_throughput.py [--rounds 5] [--json bench/results/train_throughput.json]

Besides the two demo configs, each pod-training ingredient runs as a variant of the Spark demo with
its switch on (e.g. `spark_matformer+loss_chunk`: train.loss_chunk = 32), and `+pod` with all of
them (the 2B configs' combination), interleaved with the demo as it is (every switch off: the
default), so each CPU cost is a ratio measured in one process.

FLOPs per step (counted as 2 per multiply-add, training = 3 x forward):
  forward per token, per granularity with per-layer FFN width w_l:
    sum_l [ 2·D·(N·H + 2·K·H) + 2·N·H·D        q, k, v, o projections
            + 4·N·H·T                           scores and values over all T keys (masked, not skipped)
            + c·D·w_l ]                         FFN: c = 6 for GeGLU, 4 for Spark (dense-masked)
    + 2·D·V                                     tied output embedding
  summed over the granularities trained each step (4 in MatFormer 'sum' mode).
The XLA cost-analysis FLOP count of the compiled step is reported next to it as a cross-check.
The peak is a 2048³ f32 GEMM timed interleaved with the train steps in the same process.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import interleaved, write_json  # noqa: E402
from spark import train_lib  # noqa: E402
from spark.cli import apply_overrides, load_config_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"spark_matformer": "configs/cpu_demo.py", "dense": "configs/dense_demo.py"}
POD = {"train.loss_chunk": "32", "train.remat": "full", "train.scan_layers": "True", "model.attn_block": "32"}
SWITCHED = {  # name: (base, {field: value}); "+pod" is every pod-training switch of configs/*_2b.py at once
    "spark_matformer+loss_chunk": ("spark_matformer", {"train.loss_chunk": "32"}),
    "spark_matformer+remat_full": ("spark_matformer", {"train.remat": "full"}),
    "spark_matformer+scan_layers": ("spark_matformer", {"train.scan_layers": "True"}),
    "spark_matformer+attn_block": ("spark_matformer", {"model.attn_block": "32"}),
    "spark_matformer+pod": ("spark_matformer", POD),
}



def forward_flops_per_token(m, widths, t: int) -> float:
    attn = 2 * m.d_model * (m.num_heads * m.head_dim + 2 * m.num_kv_heads * m.head_dim)
    attn += 2 * m.num_heads * m.head_dim * m.d_model + 4 * m.num_heads * m.head_dim * t
    c = 4 if m.ffn_kind == "spark" else 6
    return sum(attn + c * m.d_model * w for w in widths) + 2 * m.d_model * m.vocab_size


def train_flops(cfg) -> float:
    t = cfg.train
    per_token = sum(forward_flops_per_token(cfg.model, w, t.seq_len) for _, w in train_lib.granularities(cfg))
    return 3.0 * per_token * t.batch_size * t.seq_len


def step_variant(cfg):
    graphdef = train_lib.graphdef_of(cfg)
    step = jax.jit(functools.partial(train_lib.train_step, cfg=cfg, graphdef=graphdef))
    b, t = cfg.train.batch_size, cfg.train.seq_len
    keys = jax.random.split(jax.random.key(0), 3)
    batches = []
    for k in keys:
        toks = jax.random.randint(k, (b, t + 1), 0, 256)
        batches.append({"inputs": toks[:, :-1], "targets": toks[:, 1:],
                        "positions": jnp.broadcast_to(jnp.arange(t), (b, t)),
                        "segment_ids": jnp.ones((b, t), jnp.int32), "loss_mask": jnp.ones((b, t))})
    state = train_lib.init_state(cfg)
    compiled = step.lower(state, batches[0]).compile()
    xla_flops = (compiled.cost_analysis() or {}).get("flops")
    fn = lambda batch: compiled(state, batch)[1]["loss"]  # noqa: E731 (state not donated: reused)
    return fn, [(x,) for x in batches], xla_flops


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    n = 2048
    mats = [(jax.random.normal(jax.random.key(i), (n, n)), jax.random.normal(jax.random.key(i + 9), (n, n)))
            for i in range(2)]
    variants = {"gemm_2048_f32": (jax.jit(jnp.matmul), mats, 4)}
    flops, xla = {"gemm_2048_f32": 2.0 * n**3}, {}
    cfgs = {name: load_config_file(os.path.join(ROOT, path)) for name, path in CONFIGS.items()}
    cfgs |= {name: apply_overrides(cfgs[base], fields.items()) for name, (base, fields) in SWITCHED.items()}
    for name, cfg in cfgs.items():
        fn, batches, xla[name] = step_variant(cfg)
        variants[name] = (fn, batches, 2)
        flops[name] = train_flops(cfg)
    res = interleaved(variants, args.rounds)
    peak = flops["gemm_2048_f32"] / res["gemm_2048_f32"]["median_s"]
    out = {"peak_gemm_flops_per_s": peak, "rounds": args.rounds, "configs": {}}
    print(f"measured f32 GEMM peak: {peak / 1e9:.0f} GFLOP/s")
    print(f"{'config':>28} {'step':>9} {'tokens/s':>10} {'GFLOP/step':>11} {'XLA GFLOP':>10} {'of peak':>8}")
    for name, cfg in cfgs.items():
        s = res[name]["median_s"]
        toks = cfg.train.batch_size * cfg.train.seq_len
        frac = flops[name] / s / peak
        out["configs"][name] = {"step_s": s, "tokens_per_s": toks / s, "flops_per_step": flops[name],
                                "xla_flops_per_step": xla[name], "fraction_of_peak": frac, **res[name]}
        xla_g = f"{xla[name] / 1e9:10.2f}" if xla[name] else f"{'n/a':>10}"
        print(f"{name:>28} {s * 1e3:7.1f}ms {toks / s:10.0f} {flops[name] / 1e9:11.2f} {xla_g} {frac:7.1%}")
    for name, (base, _) in SWITCHED.items():
        ratio = res[base]["median_s"] / res[name]["median_s"]
        out["configs"][name]["speed_vs_switch_off"] = ratio
        print(f"{name}: {ratio:.3f}x the step rate of {base}")
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
