"""Sample from a training workdir's latest checkpoint (plain sampling; one jitted call).

    python sample.py --workdir runs/demo --prompt 'def ' --max_new_tokens 200 [--temperature 0.8]
"""

import argparse
import json
import os
import sys
import time

from spark.cli import main_guard
from spark.config import ConfigError


def main(argv=None):
    ap = argparse.ArgumentParser(description="Sample from a checkpoint.")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--prompt", action="append", default=[], help="repeatable")
    ap.add_argument("--prompt_file", help="one prompt per line")
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top_k", type=int, default=0)
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--granularity", type=int, default=1, help="MatFormer divisor: 1 full, 8 = F/8")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    prompts = list(args.prompt)
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            raise ConfigError(f"prompt file {args.prompt_file!r} not found")
        prompts += [line.rstrip("\n") for line in open(args.prompt_file) if line.strip()]
    if not prompts:
        raise ConfigError("give at least one --prompt or --prompt_file")
    if any(not p for p in prompts):
        raise ConfigError("empty prompt")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from decode.generate import generate
    from decode.sampling import SamplerConfig
    from spark import checkpoint, train_lib
    from spark.config import Config, from_dict
    from spark.data.pipeline import get_tokenizer
    from spark.train import load_params

    ckdir = os.path.join(args.workdir, "checkpoints")
    if not os.path.isdir(ckdir):
        raise ConfigError(f"no checkpoints in {args.workdir!r}")
    ck = checkpoint.Checkpointer(ckdir, async_save=False)
    step = ck.latest_step()
    if step is None:
        raise ConfigError(f"no checkpoint found in {ckdir!r}")
    cfg = from_dict(Config, ck.saved_config(step))
    ck.close()
    sampler = SamplerConfig(args.temperature, args.top_k, args.top_p)
    widths = cfg.model.granularity_widths(args.granularity)
    params, step = load_params(cfg, args.workdir, step)
    tok = get_tokenizer(cfg.data, args.workdir)
    encoded = [tok.encode(p, bos=True) for p in prompts]
    t = max(len(e) for e in encoded)
    arr = np.full((len(encoded), t), tok.pad_id, np.int32)
    for i, e in enumerate(encoded):
        arr[i, : len(e)] = e
    lengths = jnp.asarray([len(e) for e in encoded], jnp.int32)
    kw = dict(max_new_tokens=args.max_new_tokens, sampler=sampler, eos_id=tok.eos_id, pad_id=tok.pad_id,
              widths=widths)
    graphdef = train_lib.graphdef_of(cfg)
    key = jax.random.key(args.seed)
    jax.block_until_ready(generate(graphdef, params, jnp.asarray(arr), lengths, key, **kw))  # compile
    t0 = time.perf_counter()
    out, n_new = jax.block_until_ready(generate(graphdef, params, jnp.asarray(arr), lengths, key, **kw))
    dt = time.perf_counter() - t0
    texts = [tok.decode(row[:n]) for row, n in zip(np.asarray(out), np.asarray(n_new), strict=True)]
    stats = {"checkpoint_step": step, "new_tokens": np.asarray(n_new).tolist(), "seconds": dt}
    if args.json:
        print(json.dumps({"text": texts, "prompts": prompts, "tokens_per_s": float(np.sum(n_new)) / dt,
                          "stats": stats}))
    else:
        for p, txt in zip(prompts, texts, strict=True):
            print(f"--- {p!r}\n{p}{txt}")
        print(f"[{int(np.sum(n_new))} tokens in {dt:.2f}s from step {step}]", file=sys.stderr)


if __name__ == "__main__":
    main_guard(main)
