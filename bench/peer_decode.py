"""The peer: Hugging Face transformers' Gemma-2 (torch, CPU) decoding at the Gemma-2-2B shapes, and the
alternation of its processes with ours (bench/decode.py) that gives per-pair ratios.

    python bench/peer_decode.py --child --dtype float32 [--prompts 128,1024] [--new_tokens 32]
    python bench/peer_decode.py [--pairs 3] [--ours "--dtype bfloat16 --param_dtype bfloat16"] \
                                [--peer_dtypes float32,bfloat16] [--json bench/results/peer_decode.json]

Child: `Gemma2ForCausalLM` built from a config with the 2B shapes (26 layers, d_model 2304, GeGLU
9216, 8 / 4 heads of 256, vocab 256000, window 4096, softcaps 50 / 30), random weights created in the
target dtype, torch's default thread count, the default attention implementation. Per prompt length:
`generate(max_new_tokens=N + 1)` minus `generate(max_new_tokens=1)` (greedy, no early stop, both
include the same prefill), median of --rounds, so the time is the N decode steps alone; and the read
bandwidth (torch.sum over 1 GiB of float32) in the same process.

Parent: alternates processes — ours (bench/decode.py with --ours flags, 26 layers), then the peer in
each dtype — for --pairs rounds; every process measures its own bandwidth. Reported: per prompt the
median over pairs of the per-pair ratios of tokens/s, `dense_vs_hf` and `spark_vs_hf` against the
faster peer dtype of that pair and against each peer dtype, with the tokens/s and bandwidths.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BANDWIDTH_FLOATS = 256 * 1024 * 1024


def hf_model(dtype: str, layers: int):
    import torch
    import transformers

    cfg = transformers.Gemma2Config(
        vocab_size=256_000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, sliding_window=4096,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256,
        max_position_embeddings=8192)
    torch.manual_seed(0)
    torch.set_default_dtype(getattr(torch, dtype))  # parameters created in the target dtype
    try:
        model = transformers.Gemma2ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    return model


def child(args) -> dict:
    import torch

    model = hf_model(args.dtype, args.layers)
    big = torch.ones(BANDWIDTH_FLOATS)
    out = {"dtype": args.dtype, "layers": args.layers, "threads": torch.get_num_threads(),
           "attn_implementation": model.config._attn_implementation, "tokens_per_s": {}, "bandwidth_GBps": []}
    gen = dict(do_sample=False, min_new_tokens=None, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        for t in args.prompts:
            ids = torch.randint(0, 256_000, (1, t), generator=torch.Generator().manual_seed(t))
            times = {1: [], args.new_tokens + 1: []}
            for _ in range(args.rounds):
                for n in times:
                    t0 = time.perf_counter()
                    res = model.generate(ids, max_new_tokens=n, **gen)
                    times[n].append(time.perf_counter() - t0)
                    assert res.shape[1] == t + n, res.shape
                t0 = time.perf_counter()
                float(big.sum())
                out["bandwidth_GBps"].append(4 * BANDWIDTH_FLOATS / (time.perf_counter() - t0) / 1e9)
            decode = statistics.median(times[args.new_tokens + 1]) - statistics.median(times[1])
            out["tokens_per_s"][t] = args.new_tokens / decode
            print(f"HF {args.dtype} prompt {t}: {out['tokens_per_s'][t]:.2f} tok/s", file=sys.stderr, flush=True)
    out["bandwidth_GBps"] = statistics.median(out["bandwidth_GBps"])
    return out


def run_json(cmd: list[str]) -> dict:
    """Run a child that prints one `RESULT {json}` line."""
    r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"JAX_PLATFORMS": "cpu"})
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not lines:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def parent(args):
    prompts = ",".join(map(str, args.prompts))
    ours_cmd = [sys.executable, os.path.join(ROOT, "bench", "decode.py"), "--result_line", "--layers",
                str(args.layers), "--prompts", prompts, "--new_tokens", str(args.new_tokens), "--rounds",
                str(args.rounds), "--parts", "decode", *shlex.split(args.ours)]
    peer_dtypes = args.peer_dtypes.split(",")
    pairs = []
    for p in range(args.pairs):
        ours = run_json(ours_cmd)
        peers = {d: run_json([sys.executable, __file__, "--child", "--dtype", d, "--layers", str(args.layers),
                              "--prompts", prompts, "--new_tokens", str(args.new_tokens), "--rounds",
                              str(args.rounds)]) for d in peer_dtypes}
        pairs.append({"ours": ours, "peer": peers})
        for t in map(str, args.prompts):
            ms = ours["ms_per_token"][t]
            print(f"pair {p + 1}, prompt {t}: ours " + ", ".join(f"{m} {1e3 / v:.2f}" for m, v in ms.items())
                  + " tok/s; HF " + ", ".join(f"{d} {peers[d]['tokens_per_s'][t]:.2f}" for d in peer_dtypes)
                  + " tok/s", flush=True)
    out = {"layers": args.layers, "new_tokens": args.new_tokens, "ours_flags": args.ours, "pairs": pairs,
           "dense_vs_hf": {}, "spark_vs_hf": {}, "vs_each_peer_dtype": {}}
    def ratios(t, model, dtypes):
        """Median over pairs of ours / the fastest of `dtypes` in the same pair (tokens/s)."""
        return statistics.median(1e3 / pr["ours"]["ms_per_token"][t][model]
                                 / max(pr["peer"][d]["tokens_per_s"][t] for d in dtypes) for pr in pairs)

    for t in map(str, args.prompts):
        out["dense_vs_hf"][t] = ratios(t, "dense", peer_dtypes)
        out["spark_vs_hf"][t] = ratios(t, "spark", peer_dtypes)
        out["vs_each_peer_dtype"][t] = {f"{m}_vs_hf_{d}": ratios(t, m, [d]) for m in ("dense", "spark")
                                        for d in peer_dtypes}
        print(f"prompt {t}: dense/HF {out['dense_vs_hf'][t]:.2f}x, spark/HF {out['spark_vs_hf'][t]:.2f}x "
              f"(vs the faster HF dtype of each pair; medians of {args.pairs} pairs) "
              + ", ".join(f"{k} {v:.2f}x" for k, v in out["vs_each_peer_dtype"][t].items()))
    sys.path.insert(0, ROOT)
    from bench.common import write_json

    write_json(args.json, {"benchmark": "peer_decode", **out})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", action="store_true", help="run the HF peer once and print RESULT {json}")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--prompts", default="128,1024")
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--ours", default="--dtype float32 --param_dtype bfloat16",
                    help="bench/decode.py flags of our process")
    ap.add_argument("--peer_dtypes", default="float32,bfloat16")
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "peer_decode.json"))
    args = ap.parse_args(argv)
    args.prompts = [int(x) for x in args.prompts.split(",")]
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
    else:
        parent(args)


if __name__ == "__main__":
    main()
