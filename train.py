"""Train a model: python train.py --config configs/cpu_demo.py --workdir runs/demo [--config.train.steps=200]

Resumes from WORKDIR's latest checkpoint (local or gs://). --eval_only evaluates it instead; --profile_steps A:B
traces steps A+1..B into WORKDIR/profile. Multi-host (TPU pods, multi-node GPU): pass
--coordinator_address HOST:PORT --num_processes N --process_id I (or --distributed on TPU VMs,
where jax finds them itself) on every host.
"""

import argparse
import json
import os
import sys

from spark.cli import apply_overrides, load_config_file, main_guard, split_overrides
from spark.errors import ConfigError


def parse_profile_steps(spec: str | None) -> tuple[int, int] | None:
    if spec is None:
        return None
    try:
        a, b = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ConfigError(f"--profile_steps must be A:B (two step numbers), got {spec!r}") from None
    if not 0 <= a < b:
        raise ConfigError(f"--profile_steps A:B needs 0 <= A < B, got {spec!r}")
    return a, b


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = split_overrides(argv)
    ap = argparse.ArgumentParser(
        description="Train a Spark/MatFormer transformer.",
        epilog="Any config field can be overridden: --config.SECTION.FIELD=VALUE, e.g. --config.train.steps=200 "
               "--config.model.attn_block=512 --config.data.data_dir=/data/tfds (the resolved config is printed "
               "and written to WORKDIR/config.json).")
    ap.add_argument("--config", required=True, help="configs/*.py file with get_config()")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--no_progress", action="store_true")
    ap.add_argument("--sigterm_after_step", type=int, help="preemption testing: SIGTERM after this step")
    ap.add_argument("--profile_steps", metavar="A:B", help="jax.profiler trace of the steps after A up to B "
                    "(e.g. 10:15: steps 11-15) into WORKDIR/profile (TensorBoard's profile plugin, Perfetto)")
    ap.add_argument("--eval_only", action="store_true",
                    help="evaluate the latest checkpoint on the config's eval split (no training); prints JSON")
    ap.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() with defaults")
    ap.add_argument("--coordinator_address")
    ap.add_argument("--num_processes", type=int)
    ap.add_argument("--process_id", type=int)
    args = ap.parse_args(rest)

    cfg = apply_overrides(load_config_file(args.config), overrides)
    profile = parse_profile_steps(args.profile_steps)

    import jax

    if args.coordinator_address:
        if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU multi-process
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    elif args.distributed:
        jax.distributed.initialize()

    from spark.train import TrainingError, evaluate, run

    if args.eval_only:
        res = evaluate(cfg, args.workdir)
        if jax.process_index() == 0:
            print(json.dumps(res))
        return
    try:
        last = run(cfg, args.workdir, progress=not args.no_progress, sigterm_after_step=args.sigterm_after_step,
                   profile_steps=profile)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if last and "preempted_at_step" not in last and jax.process_index() == 0:
        # loss_F: the full-width model's loss (the progress bar's); loss: the trained objective (summed
        # over the MatFormer granularities in "sum" mode)
        keys = [k for k in ("loss_F", "loss", "eval_loss", "eval_bpb", "tokens_per_s") if k in last]
        print("final: " + ", ".join(f"{k}={last[k]:.4g}" for k in keys))


if __name__ == "__main__":
    main_guard(main)
