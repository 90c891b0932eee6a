"""Checkpoints: the only file that knows orbax.

Each step directory holds the parameters and the rest of the train state ({step, opt_state}) as
two items (StandardSave), the data iterator's state and the run's config (JSON), so sampling
restores the parameters alone (an AdamW state is twice their size). A params-only checkpoint (no
'train' item: `spark/convert.py` writes one) resumes training with a fresh optimizer state.
Checkpoints written before the split hold one 'state' item; they still load (whole).
Saves are async; the newest `keep` are kept. Restoring checks that the saved config gives the
parameters the same shapes (SHAPE_FIELDS), so a checkpoint of another model is a clear error, never
a silent re-initialisation; the other model fields (layer_pattern, matformer, dtype, sparsity, …)
may change between runs — `model_changes` names them so the trainer can say so.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import orbax.checkpoint as ocp

from spark import paths
from spark.config import from_dict
from spark.errors import ConfigError


class CheckpointError(ConfigError):
    pass


class UnreadableCheckpointError(CheckpointError):
    """A step whose files cannot be read back (truncated, flipped, half written)."""


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


# The model fields that set a parameter's shape (or its presence): a checkpoint restores only into a
# config that agrees on all of them. `spark.ffn_rank` sizes the Spark FFN predictor (w_pred [F, r]),
# compared by its effective value (None = d_model // 2; irrelevant to a GeGLU FFN).
# tests/test_checkpoint.py checks the list against the parameter shapes, field by field.
SHAPE_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_dim",
                "spark_ffn_dim", "layer_ffn_dims", "ffn_kind", "spark.ffn_rank")


def _flat_model(m) -> dict:
    d = config_json(m)
    flat = {**{k: v for k, v in d.items() if k != "spark"}, **{f"spark.{k}": v for k, v in d["spark"].items()}}
    flat["spark.ffn_rank"] = m.ffn_rank if m.ffn_kind == "spark" else None
    return flat


def model_differences(saved: dict, cfg) -> tuple[list[str], list[str]]:
    """(shape fields, other fields) where the model of config JSON `saved` differs from cfg.model.
    Fields added since `saved` was written take their defaults; an unreadable one differs everywhere."""
    ours = _flat_model(cfg.model)
    try:
        theirs = _flat_model(from_dict(type(cfg.model), saved.get("model", {})))
    except Exception:  # noqa: BLE001 - an invalid saved config differs everywhere
        theirs = {}
    diff = sorted(k for k in ours if theirs.get(k, object()) != ours[k])
    return [k for k in diff if k in SHAPE_FIELDS], [k for k in diff if k not in SHAPE_FIELDS]


def config_json(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                            create=True)
        self._mngr = ocp.CheckpointManager(paths.path(directory), options=opts,
                                           item_names=("params", "train", "state", "data", "config"))

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def save(self, step: int, state, data_state: dict, cfg) -> None:
        """state: {step, params, opt_state}, or {params} alone (a params-only checkpoint)."""
        items = {"params": ocp.args.StandardSave(state["params"]), "data": ocp.args.JsonSave(data_state),
                 "config": ocp.args.JsonSave(config_json(cfg))}
        if "opt_state" in state:
            items["train"] = ocp.args.StandardSave({"step": state["step"], "opt_state": state["opt_state"]})
        self._mngr.save(step, args=ocp.args.Composite(**items))

    def _has(self, step: int, item: str) -> bool:
        return (self._mngr.directory / str(step) / item).exists()

    def saved_config(self, step: int) -> dict:
        """The config JSON saved with `step`; CheckpointError if it cannot be read."""
        try:
            return self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable files
            raise UnreadableCheckpointError(f"checkpoint step {step} is unreadable: {type(e).__name__}: {e}") from None

    def restore(self, step: int, abstract_state, cfg) -> tuple[object, dict]:
        """(state, data_state) of `step`; raises CheckpointError on a config mismatch or corruption.
        From a params-only checkpoint, state is {params} (no step, no opt_state)."""
        self._check_config(step, cfg)
        if self._has(step, "state"):  # written before params and optimizer state were split
            out = self._restore(step, state=ocp.args.StandardRestore(_abstract(abstract_state)),
                                data=ocp.args.JsonRestore())
            return out["state"], out["data"]
        items = {"params": ocp.args.StandardRestore(_abstract(abstract_state["params"]))}
        if self._has(step, "train"):
            items["train"] = ocp.args.StandardRestore(_abstract(
                {"step": abstract_state["step"], "opt_state": abstract_state["opt_state"]}))
        if self._has(step, "data"):
            items["data"] = ocp.args.JsonRestore()
        out = self._restore(step, **items)
        return {**out.get("train", {}), "params": out["params"]}, out.get("data") or {}

    def restore_params(self, step: int, abstract_state, cfg):
        """The parameters of `step`, read alone (checkpoints from before the split are read whole)."""
        if self._has(step, "state"):
            return self.restore(step, abstract_state, cfg)[0]["params"]
        self._check_config(step, cfg)
        return self._restore(step, params=ocp.args.StandardRestore(_abstract(abstract_state["params"])))["params"]

    def _restore(self, step: int, **items) -> dict:
        try:
            return self._mngr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001
            raise UnreadableCheckpointError(f"checkpoint step {step} is unreadable: {type(e).__name__}: {e}") from None

    def model_changes(self, step: int, cfg) -> list[str]:
        """The model fields (none of them shapes) in which cfg differs from the config saved with step."""
        return model_differences(self.saved_config(step), cfg)[1]

    def _check_config(self, step: int, cfg) -> None:
        shapes, _ = model_differences(self.saved_config(step), cfg)
        if shapes:
            raise CheckpointError(f"checkpoint at step {step} was written by another config (model differs in: "
                                  f"{', '.join(shapes)}, which set parameter shapes)")

    def delete(self, step: int) -> None:
        self._mngr.delete(step)

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
