"""MatFormer (arXiv 2310.07707): the nested FFN cut, and standalone submodels.

Every FFN matrix is stored neuron-major [F, ·], so the model at per-layer widths m_i uses the
first m_i rows of each layer's FFN matrices; everything else is shared unchanged. `cut_ffn` is
that cut on a parameter pytree (the one definition: speculative decoding cuts its draft's
weights with it once per call, `extract` builds a standalone submodel with it), and the
submodel's forward at full width equals the nested model's forward at `widths`.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from spark.config import MatFormerConfig
from spark.model import Transformer


def cut_ffn(params, cfg, widths):
    """`params` (an nnx.State of a Transformer, or its pure dict) with every layer's FFN matrices
    cut to their first widths[layer] neurons."""
    widths = cfg.check_widths(widths)

    def cut(path, x):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        if keys[0] == "layers" and keys[2] == "ffn" and x.shape[0] == cfg.ffn_width(keys[1]):
            return x[: widths[keys[1]]]
        return x

    return jax.tree_util.tree_map_with_path(cut, params)


def submodel_config(cfg, widths):
    widths = cfg.check_widths(widths)
    return dataclasses.replace(cfg, layer_ffn_dims=widths, matformer=MatFormerConfig((1,)))


def extract(model: Transformer, widths) -> Transformer:
    """A smaller Transformer whose parameters are prefix slices of `model`'s FFNs."""
    cfg = submodel_config(model.cfg, widths)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    return nnx.merge(graphdef, cut_ffn(nnx.state(model), model.cfg, widths))
