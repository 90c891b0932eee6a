"""Checkpoints: the only file that knows orbax.

Each step directory holds the train state (StandardSave), the data iterator's state and the
run's config (JSON). Saves are async; the newest `keep` are kept. Restoring checks that the saved
config describes the same model and optimizer shapes, so a checkpoint from another config is a
clear error, never a silent re-initialisation.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp

from spark.config import from_dict
from spark.errors import ConfigError


class CheckpointError(ConfigError):
    pass


def config_json(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                            create=True)
        self._mngr = ocp.CheckpointManager(os.path.abspath(directory), options=opts,
                                           item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def save(self, step: int, state, data_state: dict, cfg) -> None:
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config_json(cfg))))

    def saved_config(self, step: int) -> dict:
        """The config JSON saved with `step`; CheckpointError if it cannot be read."""
        try:
            return self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable files
            raise CheckpointError(f"checkpoint step {step} is unreadable: {type(e).__name__}: {e}") from None

    def restore(self, step: int, abstract_state, cfg) -> tuple[object, dict]:
        """(state, data_state) of `step`; raises CheckpointError on a config mismatch or corruption."""
        saved = self.saved_config(step)
        ours = config_json(cfg)
        for section in ("model",):
            try:  # fields added since the checkpoint was written take their defaults
                theirs = config_json(from_dict(type(getattr(cfg, section)), saved.get(section, {})))
            except Exception:  # noqa: BLE001 - an invalid saved config differs everywhere
                theirs = {}
            if theirs != ours[section]:
                diff = sorted(k for k in ours[section] if theirs.get(k) != ours[section][k])
                raise CheckpointError(f"checkpoint at step {step} was written by another config "
                                      f"({section} differs in: {', '.join(diff)})")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint step {step} is unreadable: {type(e).__name__}: {e}") from None
        return out["state"], out["data"]

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
