"""The decode attention kernel (kernels.attention) alone, dense against Spark, at Gemma-2-2B shapes.

    python bench/attention_kernel.py [--keys 128,1024,4096] [--rounds 9] [--json bench/results/attention_kernel.json]

One query token (G = 2 query heads per KV head, K = 4 KV heads, H = 256), float32 cache as the
decode keeps it (spark/cache.py: dense V transposed; Spark the keys' first r = 128 dims apart from
[gate half | value] rows), softcap 50, Spark keeping ≤ 256 keys by the statistical threshold.
Each variant is a chain of 26 calls, one per layer, each on its own cache buffers (so nothing stays
in cache), all interleaved round by round with a `jnp.sum` bandwidth sample; bytes per layer: dense
every visible key and value, Spark the first r dims of every visible key plus the gate half and value
of the keys some query of the KV head kept (each read once: the union over its G queries).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import BANDWIDTH_BYTES, bandwidth_variant, int_list, interleaved, write_json  # noqa: E402
from spark import kernels, sparsity  # noqa: E402

LAYERS, K, G, H, R, ATTN_K, CAP = 26, 4, 2, 256, 128, 256, 50.0


def caches(keys: int, seed: int):
    """Per layer: dense (K [1,K,S,H], V [1,K,H,S]) and Spark (K1 [1,K,S,R], [gate | V] [1,K,S,2H−R])."""
    s = keys + 40  # slots past the visible keys, as a decode's cache has
    out = {"dense": [], "spark": []}
    for i in range(LAYERS):
        k, v = jax.random.normal(jax.random.key(seed + i), (2, 1, K, s, H))
        out["dense"].append((k, v.swapaxes(-1, -2)))
        out["spark"].append((k[..., :R], jnp.concatenate([k[..., R:], v], axis=-1)))
    return out


def kept_union(q, bufs, valid) -> float:
    """Mean over layers and KV heads of the keys some of the G queries keeps (the masked Spark
    attention's selection, sparsity.keep_k_of_valid, which the kernel computes too)."""
    counts = []
    for k1, _ in bufs:
        s1 = jnp.einsum("BTKGR,BKSR->BKGTS", q[..., :R], k1) * R**-0.5
        keep = sparsity.keep_k_of_valid(s1, jnp.broadcast_to(valid[:, None, None], s1.shape), ATTN_K)
        counts.append(jnp.sum(jnp.any(keep, axis=(2, 3)), axis=-1))  # [B, K]
    return float(jnp.mean(jnp.stack(counts)))


def chain(spark: bool):
    def run(q, bufs, valid, z):
        acc, kept = jnp.zeros_like(q), []
        for k, v in bufs:
            out, n, _ = kernels.attention(q + acc, k, v, valid, z, None, rank=R if spark else H,
                                          scale=(R if spark else H) ** -0.5, gate_scale=(H - R) ** -0.5,
                                          softcap=CAP, spark=spark, v_t=not spark)
            acc, kept = acc + 1e-6 * out, kept + [n]
        return acc, jnp.mean(jnp.stack(kept).astype(jnp.float32))
    return jax.jit(run)


def run(args) -> dict:
    q = jax.random.normal(jax.random.key(args.seed), (1, 1, K, G, H))
    out = {"kernels": kernels.status(), "results": []}
    for keys in args.keys:
        bufs = caches(keys, args.seed)
        valid = (jnp.arange(keys + 40) < keys)[None, None]
        z = kernels.spark_z(valid, ATTN_K)
        fns = {name: chain(name == "spark") for name in bufs}
        variants = {"bandwidth": bandwidth_variant()}
        for name, fn in fns.items():
            variants[name] = (fn, [(q, bufs[name], valid, z if name == "spark" else jnp.zeros_like(z))], 3)
        res = interleaved(variants, args.rounds)
        bw = BANDWIDTH_BYTES / res.pop("bandwidth")["median_s"]
        kept = float(fns["spark"](q, bufs["spark"], valid, z)[1])
        union = kept_union(q, bufs["spark"], valid)
        nbytes = {"dense": keys * K * 2 * H * 4, "spark": (keys * K * R + union * K * (2 * H - R)) * 4}
        ratio = sorted(d / s for d, s in zip(res["dense"]["samples_s"], res["spark"]["samples_s"], strict=True))
        row = {"keys": keys, "bandwidth_GBps": bw / 1e9, "spark_keys_per_query": kept, "spark_keys_read": union,
               "spark_vs_dense": ratio[len(ratio) // 2], "byte_ratio": nbytes["dense"] / nbytes["spark"]}
        for name, r in res.items():
            s = r["median_s"] / LAYERS
            row[name] = {"us_per_layer": s * 1e6, "bytes_per_layer": nbytes[name],
                         "bandwidth_fraction": nbytes[name] / s / bw}
        out["results"].append(row)
        print(f"{keys:5} keys: dense {row['dense']['us_per_layer']:6.1f} us/layer "
              f"({row['dense']['bandwidth_fraction']:.2f} of {bw / 1e9:.1f} GB/s), Spark "
              f"{row['spark']['us_per_layer']:6.1f} ({row['spark']['bandwidth_fraction']:.2f}; "
              f"{kept:.0f} keys a query, {union:.0f} a KV head): {row['spark_vs_dense']:.2f}x dense "
              f"(byte ratio {row['byte_ratio']:.2f}x)",
              flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int_list, default=[128, 1024, 4096])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    print(kernels.status())
    write_json(args.json, run(args))


if __name__ == "__main__":
    main()
