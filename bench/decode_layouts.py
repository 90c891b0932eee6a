"""The layout choices behind sparse-gather decoding, measured at Gemma-2-2B shapes (one token, f32).

    python bench/decode_layouts.py [--rounds 7] [--json bench/results/decode_layouts.json]

1. Spark FFN rows (F = 13824, D = 2304, r = 1024, 8% active, capacity 1.25·k): K2 and V as two
   neuron-major matrices [F, D−r] and [F, D] (what spark/ffn.py stores) vs one fused [F, 2D−r]
   matrix gathered once; the dense GeGLU (F = 9216) for scale.
2. KV cache at S = 4160 slots, 4 KV heads × 2 queries each, H = 256: dense attention over
   [B, S, K, H] vs [B, K, S, H] vs K [B, K, S, H] with V [B, K, H, S] (what spark/cache.py uses
   for dense attention).
3. The attention projections as 3-D einsums over [D, N, H] / [N, H, D] weights vs the same weights
   reshaped to 2-D (what spark/attention.py does).
4. x·Wᵀ for weights stored one row per output — the logit head (V = 256000) and an FFN gate
   (9216 × 2304) — for blocks of 1, 2, 4 and 7 tokens (decode, speculative verify): formed
   token-major [T, F] vs output-major [F, T] then transposed after a barrier (what
   spark/layers.py's rows_matmul does for small blocks).
Every group rotates through 4 weight copies (2 for the 2.4 GB head; nothing stays in cache) and
runs interleaved.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import interleaved, write_json  # noqa: E402

COPIES = 4
GATHER = dict(mode="promise_in_bounds", indices_are_sorted=True)


def _copies(key, shape):
    return [jax.random.normal(k, shape) * 0.03 for k in jax.random.split(key, COPIES)]


def ffn_variants(key):
    f, d, r, k = 13824, 2304, 1024, int(0.08 * 13824)
    cap = int(1.25 * k)
    ks = jax.random.split(key, 6)
    up, down = _copies(ks[0], (f, d - r)), _copies(ks[1], (f, d))
    fused = [jnp.concatenate([u, w], 1) for u, w in zip(up, down, strict=True)]
    gate9, up9, down9 = (_copies(ks[i], (9216, d)) for i in (2, 3, 4))
    x = jax.random.normal(ks[5], (d,))
    idx = jnp.sort(jax.random.choice(ks[5], f, (cap,), replace=False)).astype(jnp.int32)
    act = jnp.ones((cap,))

    def separate(u, w):
        return (act * (u.at[idx].get(**GATHER) @ x[r:])) @ w.at[idx].get(**GATHER)

    def one_matrix(uw):
        rows = uw.at[idx].get(**GATHER)
        return (act * (rows[:, : d - r] @ x[r:])) @ rows[:, d - r:]

    def geglu(g, u, w):
        return (jax.nn.gelu(g @ x) * (u @ x)) @ w

    return {"ffn/rows_separate": (jax.jit(separate), list(zip(up, down, strict=True)), 8),
            "ffn/rows_fused": (jax.jit(one_matrix), [(m,) for m in fused], 8),
            "ffn/dense_geglu_9216": (jax.jit(geglu), list(zip(gate9, up9, down9, strict=True)), 8)}


def cache_variants(key):
    s, kh, g, h = 4160, 4, 2, 256
    ks = jax.random.split(key, 3)
    k_bskh, v_bskh = _copies(ks[0], (1, s, kh, h)), _copies(ks[1], (1, s, kh, h))
    q = jax.random.normal(ks[2], (1, 1, kh, g, h))

    def attend(k_spec, v_spec):
        def fn(k, v):
            p = jax.nn.softmax(jnp.einsum(f"BTKGH,{k_spec}->BKGTS", q, k), -1)
            return jnp.einsum(f"BKGTS,{v_spec}->BTKGH", p, v)
        return jax.jit(fn)

    bksh = [(jnp.asarray(k.transpose(0, 2, 1, 3)), jnp.asarray(v.transpose(0, 2, 1, 3)))
            for k, v in zip(k_bskh, v_bskh, strict=True)]
    bkhs = [(k, jnp.asarray(v.transpose(0, 1, 3, 2))) for k, v in bksh]
    return {"cache/BSKH": (attend("BSKH", "BSKH"), list(zip(k_bskh, v_bskh, strict=True)), 6),
            "cache/BKSH": (attend("BKSH", "BKSH"), bksh, 6),
            "cache/K_BKSH_V_BKHS": (attend("BKSH", "BKHS"), bkhs, 6)}


def projection_variants(key):
    d, n, h = 2304, 8, 256
    ks = jax.random.split(key, 3)
    w_dnh, w_nhd = _copies(ks[0], (d, n, h)), _copies(ks[1], (n, h, d))
    x, o = jax.random.normal(ks[2], (1, 1, d)), jax.random.normal(ks[2], (1, 1, n, h))
    q_args = [(x, w) for w in w_dnh]  # activations are arguments, as in a model (not folded constants)
    o_args = [(o, w) for w in w_nhd]
    return {
        "proj/q_einsum_3d": (jax.jit(lambda x, w: jnp.einsum("BTD,DNH->BTNH", x, w)), q_args, 12),
        "proj/q_2d": (jax.jit(lambda x, w: jnp.einsum("BTD,DF->BTF", x, w.reshape(d, n * h))), q_args, 12),
        "proj/o_einsum_3d": (jax.jit(lambda o, w: jnp.einsum("BTNH,NHD->BTD", o, w)), o_args, 12),
        "proj/o_2d": (jax.jit(lambda o, w: jnp.einsum("BTF,FD->BTD", o.reshape(1, 1, n * h), w.reshape(n * h, d))),
                      o_args, 12)}


def rows_variants(key):
    """x·Wᵀ for W stored one row per output: the 256k-vocab head and a 9216-neuron FFN gate."""
    from spark.layers import rows_matmul

    d, out = 2304, {}
    heads = [jax.random.normal(k, (256000, d)) * 0.03 for k in jax.random.split(key, 2)]
    gates = _copies(key, (9216, d))
    for group, ws, calls in (("head", heads, 2), ("rows", gates, 12)):
        for t in (1, 2, 4, 7):
            args = [(jax.random.normal(key, (1, t, d)), w) for w in ws]
            out[f"{group}/T{t}_token_major"] = (jax.jit(lambda x, w: jnp.einsum("BTD,FD->BTF", x, w)), args, calls)
            out[f"{group}/T{t}_output_major"] = (jax.jit(rows_matmul), args, calls)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    keys = jax.random.split(jax.random.key(0), 4)
    variants = {**ffn_variants(keys[0]), **cache_variants(keys[1]), **projection_variants(keys[2]),
                **rows_variants(keys[3])}
    res = interleaved(variants, args.rounds)
    ms = {n: r["median_s"] * 1e3 for n, r in res.items()}
    ratios = {"ffn_fused_over_separate": ms["ffn/rows_fused"] / ms["ffn/rows_separate"],
              "ffn_dense_over_sparse_rows": ms["ffn/dense_geglu_9216"] / ms["ffn/rows_separate"],
              "cache_BSKH_over_K_BKSH_V_BKHS": ms["cache/BSKH"] / ms["cache/K_BKSH_V_BKHS"],
              "cache_BKSH_over_K_BKSH_V_BKHS": ms["cache/BKSH"] / ms["cache/K_BKSH_V_BKHS"],
              "q_3d_over_2d": ms["proj/q_einsum_3d"] / ms["proj/q_2d"],
              "o_3d_over_2d": ms["proj/o_einsum_3d"] / ms["proj/o_2d"],
              **{f"{g}_T{t}_token_over_output_major": ms[f"{g}/T{t}_token_major"] / ms[f"{g}/T{t}_output_major"]
                 for g in ("head", "rows") for t in (1, 2, 4, 7)}}
    print(f"{'variant':28s} {'median ms':>10}")
    for n, v in ms.items():
        print(f"{n:28s} {v:>10.3f}")
    for n, v in ratios.items():
        print(f"{n:38s} {v:.2f}x")
    write_json(args.json, {"benchmark": "decode_layouts", "rounds": args.rounds, "median_ms": ms, "ratios": ratios})


if __name__ == "__main__":
    main()
