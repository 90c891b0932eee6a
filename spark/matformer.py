"""MatFormer (arXiv 2310.07707): extract a standalone submodel from a nested checkpoint.

Every FFN matrix is stored neuron-major [F, ·], so the submodel at per-layer widths m_i keeps the
first m_i rows of each layer's FFN matrices; everything else is shared unchanged. Its forward at
full width equals the nested model's forward at `widths`.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from spark.config import MatFormerConfig
from spark.model import Transformer


def submodel_config(cfg, widths):
    widths = cfg.check_widths(widths)
    return dataclasses.replace(cfg, layer_ffn_dims=widths, matformer=MatFormerConfig((1,)))


def extract(model: Transformer, widths) -> Transformer:
    """A smaller Transformer whose parameters are prefix slices of `model`'s FFNs."""
    cfg = submodel_config(model.cfg, widths)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    full = nnx.state(model)

    def take_prefix(new, old):
        return old[tuple(slice(0, n) for n in new.shape)]

    return nnx.merge(graphdef, jax.tree.map(take_prefix, abstract, full))
