"""Device mesh and the one table of logical-axis -> mesh-axis rules.

Parameters get a PartitionSpec from their name (PARAM_AXES) through RULES. The FFN width F is
sharded over 'fsdp', not 'tensor': a MatFormer prefix slice of a tensor-sharded axis would add a
collective on every call. A dimension that a mesh axis does not divide is replicated instead.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from spark.config import MeshConfig
from spark.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
RULES = {"batch": ("data", "fsdp"), "embed": "fsdp", "vocab": "tensor", "heads": "tensor",
         "kv_heads": "tensor", "ffn": "fsdp"}
PARAM_AXES = {
    "embed": ("vocab", "embed"),
    "w_q": ("embed", "heads", None), "w_k": ("embed", "kv_heads", None),
    "w_v": ("embed", "kv_heads", None), "w_o": ("heads", None, "embed"),
    "w_gate": ("ffn", None), "w_up": ("ffn", None), "w_down": ("ffn", None), "w_pred": ("ffn", None),
    "scale": (None,),
}


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    devices = devices if devices is not None else jax.devices()
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % fixed:
            raise ConfigError(f"mesh {sizes}: {len(devices)} devices are not divisible by {fixed}")
        sizes[sizes.index(-1)] = len(devices) // fixed
    if int(np.prod(sizes)) != len(devices):
        raise ConfigError(f"mesh {dict(zip(AXES, sizes, strict=True))} needs {int(np.prod(sizes))} "
                          f"devices, found {len(devices)}")
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(mesh, logical, shape) -> PartitionSpec:
    out = []
    for name, dim in zip(logical, shape, strict=True):
        axes = RULES.get(name) if name else None
        size = int(np.prod([mesh.shape[a] for a in np.atleast_1d(axes)])) if axes else 1
        out.append(axes if axes and dim % size == 0 else None)
    return PartitionSpec(*out)


def param_sharding(mesh, path, leaf) -> NamedSharding:
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("value", "raw_value") and len(path) > 1:
        name = str(getattr(path[-2], "key", path[-2]))
    logical = PARAM_AXES.get(name, (None,) * leaf.ndim)
    return NamedSharding(mesh, logical_to_spec(mesh, logical, leaf.shape))


def tree_shardings(mesh, tree):
    """Shardings for a params-like tree (optimizer moments reuse the parameter names)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: param_sharding(mesh, p, x) if getattr(x, "ndim", 0) > 0
        else NamedSharding(mesh, PartitionSpec()), tree)


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(RULES["batch"]))
