"""The training loop: mesh, sharded state, data, checkpoints, metrics. `run(cfg, workdir)`.

A run resumes from the latest checkpoint in WORKDIR/checkpoints automatically (state and data
iterator), so killing and restarting a run continues it exactly. A non-finite loss stops the run
with an error before anything non-finite is saved.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from spark import checkpoint, metrics, paths, sharding, train_lib
from spark.config import Config, from_dict
from spark.data.pipeline import get_tokenizer, make_dataset
from spark.errors import ConfigError


class TrainingError(RuntimeError):
    pass


def _check_workdir(workdir: str) -> None:
    try:
        root = paths.path(workdir)
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from None


def _tokenizer(cfg: Config, workdir: str):
    tok = get_tokenizer(cfg.data, workdir)
    if tok.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) must equal the tokenizer's vocabulary "
                          f"({tok.vocab_size})")
    return tok


def _global_batch(local: dict, batch_sh) -> dict:
    return {k: jax.make_array_from_process_local_data(batch_sh, np.asarray(v)) for k, v in local.items()}


def _eval(cfg: Config, eval_fn, params, batch_sh, tok) -> dict:
    ds = make_dataset(cfg.data, cfg.data.eval_split, seq_len=cfg.train.seq_len,
                      batch_size=cfg.train.batch_size, seed=0, train=False,
                      process_index=jax.process_index(), process_count=jax.process_count(), tokenizer=tok)
    sums: dict = {}
    n_bytes = 0.0  # UTF-8 bytes of this process's counted targets
    for i, local in enumerate(ds):
        if i >= cfg.train.eval_batches:
            break
        n_bytes += float(np.sum(tok.bytes_per_id[local["targets"]] * local["loss_mask"]))
        out = eval_fn(params, _global_batch(local, batch_sh))
        for name, (tot, cnt) in out.items():
            s = sums.setdefault(name, [0.0, 0.0])
            s[0] += float(tot)
            s[1] += float(cnt)
    res = {f"eval_loss_{name}": tot / max(cnt, 1.0) for name, (tot, cnt) in sums.items()}
    if "eval_loss_F" in res:
        res["eval_loss"] = res["eval_loss_F"]
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            n_bytes = float(np.sum(multihost_utils.process_allgather(np.float32(n_bytes))))
        tokens = sums["F"][1]
        res["eval_bpb"] = train_lib.bits_per_byte(res["eval_loss"], n_bytes / max(tokens, 1.0))
    return res


def sharded_step(cfg: Config, mesh):
    """(abstract state, state shardings, batch sharding, jitted train step) on `mesh`: the step
    train.py runs, and the one bench/aot_compile.py compiles for a TPU topology."""
    batch_sh = sharding.batch_sharding(mesh)
    abstract = jax.eval_shape(functools.partial(train_lib.init_state, cfg))
    state_sh = sharding.tree_shardings(mesh, abstract)
    state_sh["step"] = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step_fn = jax.jit(functools.partial(train_lib.train_step, cfg=cfg, graphdef=train_lib.graphdef_of(cfg)),
                      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)
    return abstract, state_sh, batch_sh, step_fn


class _Profiler:
    """A jax.profiler trace of steps [a, b) (0-based, as the loop counts) into WORKDIR/profile
    (TensorBoard's profile plugin or Perfetto read it). A remote workdir: traced locally, then copied."""

    def __init__(self, workdir: str, steps: tuple[int, int] | None):
        self.steps, self.dest, self.local = steps, paths.path(workdir) / "profile", None

    def at(self, step: int, state) -> None:
        if self.steps and step == self.steps[0]:
            jax.block_until_ready(state)
            self.local = tempfile.mkdtemp(prefix="profile_") if paths.is_remote(self.dest) else str(self.dest)
            jax.profiler.start_trace(self.local)
        elif self.steps and step == self.steps[1]:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if self.local is None:
            return
        jax.profiler.stop_trace()
        if paths.is_remote(self.dest):
            paths.upload_tree(self.local, self.dest)
            shutil.rmtree(self.local, ignore_errors=True)
        print(f"profile of steps {self.steps[0] + 1}..{self.steps[1]} written to {self.dest}", file=sys.stderr)
        self.local = None


class _PreemptionFlag:
    """SIGTERM (a preempted or stopped VM) asks the loop to checkpoint the current step and stop.
    One process: a handler sets a flag (the previous handler comes back after the run). Several:
    jax.distributed's preemption service catches SIGTERM on any host and
    `reached_preemption_sync_point` turns true at the same step on every host."""

    def __init__(self):
        self.hit, self._old = False, None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum, frame):
        self.hit = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.hit

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _restore_newest_intact(ckpt, target, cfg, is_main: bool):
    """(step, state, data_state) of the newest checkpoint that reads back, or None when there is
    none. An unreadable newer one is reported on one line and deleted (it would block saving that
    step again); a config mismatch is an error, not a fall-back."""
    steps = sorted(ckpt.all_steps(), reverse=True)
    for i, step in enumerate(steps):
        try:
            state, data_state = ckpt.restore(step, target, cfg)
        except checkpoint.UnreadableCheckpointError as e:
            if i + 1 == len(steps):
                raise
            if is_main:
                print(f"warning: checkpoint step {step} is unreadable ({str(e).splitlines()[0][:160]}); "
                      f"deleting it and trying step {steps[i + 1]}", file=sys.stderr)
            ckpt.delete(step)
            continue
        return step, state, data_state
    return None


def run(cfg: Config, workdir: str, progress: bool = True, sigterm_after_step: int | None = None,
        profile_steps: tuple[int, int] | None = None) -> dict:
    """Train (or resume) to cfg.train.steps. Returns the last logged metrics.

    profile_steps (a, b): a jax.profiler trace of steps a+1..b (0-based [a, b)) in WORKDIR/profile.
    sigterm_after_step (preemption testing): SIGTERM this process after that step."""
    _check_workdir(workdir)
    t = cfg.train
    mesh = sharding.make_mesh(cfg.mesh)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]  # the batch is split over both axes
    if (t.batch_size // t.grad_accum) % rows:
        raise ConfigError(f"train.batch_size / grad_accum ({t.batch_size} / {t.grad_accum}) must be a multiple of "
                          f"the {rows} devices the batch is split over (mesh data x fsdp)")
    init_fn = functools.partial(train_lib.init_state, cfg)
    abstract, state_sh, batch_sh, step_fn = sharded_step(cfg, mesh)
    graphdef = train_lib.graphdef_of(cfg)
    is_main = jax.process_index() == 0
    if is_main:  # the resolved config, on the console and at the workdir root
        resolved = checkpoint.config_json(cfg)
        paths.write_text_atomic(paths.path(workdir) / "config.json", json.dumps(resolved, indent=2))
        for section in ("model", "train", "data", "mesh"):
            print(f"config.{section}: {json.dumps(resolved[section], separators=(',', ':'))}", file=sys.stderr)

    tok = _tokenizer(cfg, workdir)
    ckpt = checkpoint.Checkpointer(paths.path(workdir) / "checkpoints", keep=t.keep_ckpts)
    data = make_dataset(cfg.data, cfg.data.train_split, seq_len=t.seq_len, batch_size=t.batch_size,
                        seed=t.seed, train=True, process_index=jax.process_index(),
                        process_count=jax.process_count(), tokenizer=tok)
    data_it = iter(data)
    restored = _restore_newest_intact(ckpt, sharding.sharded_shapes(abstract, state_sh), cfg, is_main)
    if restored is not None:
        latest, state, data_state = restored
        if "opt_state" not in state:  # a params-only checkpoint (e.g. converted): a fresh optimizer state
            state = jax.jit(lambda p: {"step": jnp.int32(latest), "params": p,
                                       "opt_state": train_lib.make_optimizer(cfg).init(p)},
                            out_shardings=state_sh)(state["params"])
        if data_state:
            data_it.set_state(data_state)
        if latest > t.steps:
            ckpt.close()
            raise ConfigError(f"the checkpoint in {workdir} is at step {latest}, past train.steps ({t.steps}); "
                              f"set --config.train.steps above {latest} to train on")
        changed = ckpt.model_changes(latest, cfg)  # on every process: orbax's restore synchronises them
        if is_main:
            print(f"resuming from step {latest}" + (": already done (train.steps)" if latest == t.steps else ""),
                  file=sys.stderr)
            if changed:
                print(f"note: model.{', model.'.join(changed)} differ from the checkpoint's config; continuing "
                      "with this config's values (none of them changes a parameter shape)", file=sys.stderr)
    else:
        state = jax.jit(init_fn, out_shardings=state_sh)()
    start = int(state["step"])

    eval_fn = jax.jit(functools.partial(train_lib.eval_step, cfg=cfg, graphdef=graphdef))
    writer = metrics.MetricsWriter(workdir, enabled=is_main, resume_step=start if restored is not None else None)
    preempted = _PreemptionFlag()
    bar = metrics.progress(t.steps, start, enabled=progress and is_main)
    tokens_per_step = t.batch_size * t.seq_len
    last, t_log, steps_since, acc = {}, time.perf_counter(), 0, None
    with contextlib.ExitStack() as cleanup:  # on exit, in reverse: SIGTERM handler, bar, checkpoints, metrics
        for close in (writer.close, ckpt.close, bar.close, preempted.restore):
            cleanup.callback(close)
        cleanup.enter_context(jax.set_mesh(mesh))  # the mesh the activation sharding pins (sharding.constrain) read
        profiler = _Profiler(workdir, profile_steps)
        cleanup.callback(profiler.stop)
        for step in range(start, t.steps):
            profiler.at(step, state)
            state, m = step_fn(state, _global_batch(next(data_it), batch_sh))
            acc = m if acc is None else jax.tree.map(jnp.add, acc, m)  # on device: no sync per step
            steps_since += 1
            done = step + 1
            logging = done % t.log_every == 0 or done == t.steps
            saving = done % t.ckpt_every == 0 or done == t.steps
            if logging or saving:
                # the loss was computed before this step's update; the new parameters must be finite too
                loss, pnorm = float(m["loss"]), float(m["param_norm"])
                if not (np.isfinite(loss) and np.isfinite(pnorm)):
                    ckpt.wait()
                    raise TrainingError(
                        f"non-finite loss ({loss}) or parameters (norm {pnorm}) at step {done}; stopping. "
                        f"The last good checkpoint (step {ckpt.latest_step()}) is intact in {workdir}/checkpoints")
            if logging:
                elapsed = time.perf_counter() - t_log
                mean = jax.tree.map(lambda x, n=steps_since: x / n, acc)  # averaged over the log interval
                row = {**mean, "lr": m["lr"], "tokens_per_s": tokens_per_step * steps_since / elapsed}
                if done % t.eval_every == 0 or done == t.steps:
                    row.update(_eval(cfg, eval_fn, state["params"], batch_sh, tok))
                last = writer.write(done, row)
                bar.set_postfix(loss=f"{last.get('loss_F', last['loss']):.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
                t_log, steps_since, acc = time.perf_counter(), 0, None
            if done == sigterm_after_step:  # preemption testing: what a spot VM receives
                os.kill(os.getpid(), signal.SIGTERM)
                if jax.process_count() > 1:  # the notice reaches the other hosts asynchronously; a real one
                    time.sleep(2.0)  # arrives ~30 s before the VM stops, a tiny test run would end first
            stop = preempted.reached(done)
            if saving or stop:
                ckpt.save(done, state, data_it.get_state(), cfg)
            bar.update(1)
            if stop:
                ckpt.wait()
                last = {**last, "preempted_at_step": done}
                if is_main:
                    print(f"preempted (SIGTERM): checkpoint of step {done} saved; run the same command to "
                          "resume", file=sys.stderr)
                break
    if is_main:
        metrics.plot_losses(workdir)
    return last


def evaluate(cfg: Config, workdir: str, step: int | None = None) -> dict:
    """The held-out metrics the training loop logs (eval_loss per granularity, eval_bpb), of the
    checkpoint at `step` (the latest when None), on cfg's mesh, data and eval_batches."""
    _check_workdir(workdir)
    mesh = sharding.make_mesh(cfg.mesh)
    abstract, state_sh, batch_sh, _ = sharded_step(cfg, mesh)
    ckpt = checkpoint.Checkpointer(paths.path(workdir) / "checkpoints", async_save=False)
    try:
        step = _pick_step(ckpt, step, workdir)
        params = ckpt.restore_params(step, sharding.sharded_shapes(abstract, state_sh), cfg)
    finally:
        ckpt.close()
    eval_fn = jax.jit(functools.partial(train_lib.eval_step, cfg=cfg, graphdef=train_lib.graphdef_of(cfg)))
    with jax.set_mesh(mesh):
        return {"step": step, **_eval(cfg, eval_fn, params, batch_sh, _tokenizer(cfg, workdir))}


def _pick_step(ck, step: int | None, workdir: str) -> int:
    """`step` (the latest when None), checked to exist in the workdir's checkpoints."""
    ckdir = str(paths.path(workdir) / "checkpoints")
    step = ck.latest_step() if step is None else step
    if step is None:
        raise checkpoint.CheckpointError(f"no checkpoint found in {ckdir!r}")
    if step not in ck.all_steps():
        raise checkpoint.CheckpointError(f"no checkpoint step {step} in {ckdir!r} (have {ck.all_steps()})")
    return step


def load_checkpoint(workdir: str, step: int | None = None):
    """(config, params, step) of a training workdir's checkpoint (the latest when step is None).

    Every way this can fail for a user (no such directory, no checkpoint, unreadable files) raises
    a one-line CheckpointError."""
    ckdir = paths.path(workdir) / "checkpoints"
    if not ckdir.is_dir():
        raise checkpoint.CheckpointError(f"no checkpoints in {workdir!r} (expected {ckdir}/)")
    ck = checkpoint.Checkpointer(ckdir, async_save=False)
    try:
        step = _pick_step(ck, step, workdir)
        cfg = from_dict(Config, ck.saved_config(step))
        params = ck.restore_params(step, jax.eval_shape(functools.partial(train_lib.init_state, cfg)), cfg)
    finally:
        ck.close()
    return cfg, jax.tree.map(jnp.asarray, params), step
