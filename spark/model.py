"""The Transformer: Gemma-2 architecture with optional Spark FFN / attention and MatFormer widths.

    logits_BTV, cache = model(tokens_BT, positions_BT, cache=None | KVCache, widths=None)

Block (Gemma-2): h = x + post_attn_norm(attn(pre_attn_norm(x)));
                 y = h + post_ffw_norm(ffn(pre_ffw_norm(h))).
Embedding scaled by sqrt(d_model), tied output embedding, final-logit softcap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from spark import kernels
from spark.attention import Attention
from spark.cache import KVCache
from spark.config import ModelConfig
from spark.ffn import make_ffn
from spark.layers import RMSNorm, linear_rows, normal_init, softcap
from spark.sharding import constrain


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        norm = lambda: RMSNorm(cfg.d_model, cfg.rms_eps, pd)  # noqa: E731
        self.pre_attn_norm, self.post_attn_norm = norm(), norm()
        self.pre_ffw_norm, self.post_ffw_norm = norm(), norm()
        self.attn = Attention(cfg, layer, rngs)
        self.ffn = make_ffn(cfg, layer, rngs)

    def __call__(self, x_BTD, positions_BT, kv, width, segment_ids_BT=None, sparse: bool = False, width_index=None,
                 tree=None):
        """`width`: the FFN width; or, with a traced `width_index`, a tuple of widths of which the
        index picks one at run time (`lax.switch` over the FFN only: one compiled block, and a step
        at width w spends the FFN FLOPs of w)."""
        x_BTD = constrain(x_BTD, "batch", None, None)
        a, kv, aux_a = self.attn(self.pre_attn_norm(x_BTD), positions_BT, kv, segment_ids_BT, sparse, tree)
        h = constrain(x_BTD + self.post_attn_norm(a), "batch", None, None)
        if width_index is None:
            f, aux_f = self.ffn(self.pre_ffw_norm(h), width, sparse)
        else:
            # each branch rematerialised: differentiating a cond keeps the union of every branch's
            # residuals (zeros for the branches not taken); checkpointed, a branch's residual is its
            # input. Spark 2B, 2 layers on v5p: 27.5 -> 7.1 GiB per chip for +1.9% matmul FLOPs.
            branches = [jax.checkpoint(lambda x, w=w: self.ffn(x, w, sparse)) for w in width]
            f, aux_f = jax.lax.switch(width_index, branches, self.pre_ffw_norm(h))
        return constrain(h + self.post_ffw_norm(f), "batch", None, None), kv, {**aux_a, **aux_f}


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        self.embed = nnx.Param(normal_init(rngs, (cfg.vocab_size, cfg.d_model), cfg.d_model, pd))
        self.layers = nnx.List([Block(cfg, i, rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.rms_eps, pd)

    def __call__(self, tokens_BT, positions_BT, cache: KVCache | None = None, widths=None,
                 segment_ids_BT=None, return_aux: bool = False, sparse: bool = False, logits_at_B=None,
                 scan: bool = False, tree=None):
        """Returns (logits_BTV float32, cache), plus a dict of per-layer stats [L, ...] if return_aux.

        With a cache, the block's K/V are written at `positions_BT` (contiguous per row) and
        `cache.lengths` becomes last position + 1. `widths` is a static tuple of per-layer FFN
        widths (MatFormer Mix'n'Match); None is full width. `sparse` runs the Spark layers'
        sparse-gather decode path (same function, for blocks of a few tokens). `logits_at_B`
        computes the logits at one block index per row only (logits [B, 1, V]): a prefill needs
        just the last prompt token's. `scan` runs the layers as one lax.scan (`apply_layers`).
        `tree` (a `spark.cache.Tree`, with a cache): the block is draft-tree nodes, written to scratch
        slots past `cache.lengths`, which stays (`spark.cache.commit` moves the accepted path).
        """
        x = self.embed_tokens(tokens_BT)
        x, cache, stats = self.apply_layers(x, positions_BT, cache, widths, segment_ids_BT, sparse, scan=scan,
                                            tree=tree)
        if logits_at_B is not None:
            x = jnp.take_along_axis(x, logits_at_B[:, None, None], axis=1)
        logits = self.logits(x)
        return (logits, cache, stats) if return_aux else (logits, cache)

    def embed_tokens(self, tokens_BT):
        dt = jnp.dtype(self.cfg.dtype)
        ids = tokens_BT.reshape(-1)
        x = kernels.take_rows(self.embed[...], ids).reshape(*tokens_BT.shape, -1).astype(dt)
        return x * jnp.asarray(self.cfg.d_model**0.5, dt)

    def logits(self, x_BTD):
        """Final norm, tied output embedding, final softcap -> float32 logits."""
        x = self.final_norm(x_BTD)
        logits = softcap(linear_rows(x, self.embed[...], jnp.float32), self.cfg.final_logit_softcap)
        return constrain(logits, "batch", None, "vocab")

    def apply_layers(self, x_BTD, positions_BT, cache=None, widths=None, segment_ids_BT=None, sparse=False,
                     remat: str = "none", scan: bool = False, width_index=None, tree=None):
        """The blocks between embedding and output: -> (x_BTD, cache, per-layer stats).

        `remat` (training, cache=None): "none" keeps every block's activations for the backward
        pass; "dots_saveable" keeps only matmul outputs and recomputes the rest; "full" keeps only
        each block's input and recomputes the block (MaxText's names). `scan` (cache=None) runs the
        layers as one `lax.scan` over periods of the local/global pattern (`scan_layers`), so the
        compiled program holds one period's blocks whatever the depth; it needs every period to be
        alike (`scannable`) and falls back to the unrolled loop otherwise. With a traced
        `width_index`, `widths` is a tuple of width tuples (MatFormer granularities) and the index
        picks one at run time inside each block (training's 'sample' mode)."""
        if width_index is None:
            widths = self.cfg.check_widths(widths)
        else:  # per layer, the tuple of its widths across the granularities
            widths = tuple(zip(*[self.cfg.check_widths(w) for w in widths], strict=True))
        if tree is not None:
            if cache is None:
                raise ValueError("a tree block needs a cache")
            tree = tree.replace(base_B=cache.lengths)
        if scan and not sparse and tree is None and scannable(self, widths):
            return scan_layers(self, x_BTD, positions_BT, widths, segment_ids_BT, sparse, remat, width_index, cache)
        x = x_BTD
        new_k, new_v, auxes = [], [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            if remat != "none" and cache is None:
                x, kv, aux = _block_fn(remat)(nnx.graphdef(layer), nnx.state(layer), x, positions_BT, None,
                                              widths[i], segment_ids_BT, sparse, width_index)
            else:
                x, kv, aux = layer(x, positions_BT, kv, widths[i], segment_ids_BT, sparse, width_index, tree)
            auxes.append(aux)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        if cache is not None:  # a tree block leaves the committed length alone
            lengths = cache.lengths if tree is not None else positions_BT[:, -1].astype(jnp.int32) + 1
            cache = cache.replace(k=tuple(new_k), v=tuple(new_v), lengths=lengths)
        stats = {key: jnp.stack([a[key] for a in auxes]) for key in auxes[0]}
        return x, cache, stats


REMAT_POLICIES = {"none": None, "dots_saveable": jax.checkpoint_policies.dots_saveable,
                  "full": jax.checkpoint_policies.nothing_saveable}


def _block_call(graphdef, state, x_BTD, positions_BT, kv, width, segment_ids_BT, sparse, width_index):
    """One block from its graphdef and state: the function rematerialisation and the scan run."""
    return nnx.merge(graphdef, state)(x_BTD, positions_BT, kv, width, segment_ids_BT, sparse, width_index)


def _block_fn(remat: str):
    """_block_call, with its activations recomputed in the backward pass by REMAT_POLICIES[remat]."""
    if remat == "none":
        return _block_call
    return jax.checkpoint(_block_call, policy=REMAT_POLICIES[remat], static_argnums=(0, 5, 7))


def scannable(model: Transformer, widths) -> bool:
    """True when the layers repeat with the period of the local/global pattern: same structure
    (graphdef: kind, window, gate sparsity, FFN width) and the same MatFormer width at every
    position of the period."""
    period = len(model.cfg.layer_pattern)
    n = len(model.layers)
    if n % period:
        return False
    graphdefs = [nnx.graphdef(layer) for layer in model.layers]
    return all(graphdefs[i] == graphdefs[i % period] and widths[i] == widths[i % period] for i in range(n))


def scan_layers(model: Transformer, x_BTD, positions_BT, widths, segment_ids_BT=None, sparse=False,
                remat: str = "none", width_index=None, cache: KVCache | None = None):
    """The layers as a `lax.scan` over the L/P periods of the pattern (P = its length): the scan
    body applies one block per pattern position, with that position's parameters stacked over the
    periods at trace time ([L/P, ...]; the stored layout stays per layer, so checkpoints, the
    converter and the decoders are unchanged). A cache (prefill) is stacked the same way and
    unstacked after. Same result as the unrolled loop."""
    period = len(model.cfg.layer_pattern)
    layers = list(model.layers)
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)  # noqa: E731
    graphdefs = [nnx.graphdef(layers[p]) for p in range(period)]
    xs = [stack([nnx.state(layer) for layer in layers[p::period]]) for p in range(period)]
    if cache is not None:
        xs = [(st, stack(cache.k[p::period]), stack(cache.v[p::period])) for p, st in enumerate(xs)]

    block = _block_fn(remat if cache is None else "none")

    def body(x, xs_p):
        auxes, kvs = [], []
        for p in range(period):
            state, kv = (xs_p[p], None) if cache is None else (xs_p[p][0], xs_p[p][1:])
            x, kv, aux = block(graphdefs[p], state, x, positions_BT, kv, widths[p], segment_ids_BT, sparse,
                               width_index)
            auxes.append(aux)
            kvs.append(kv)
        stats = {k: jnp.stack([a[k] for a in auxes]) for k in auxes[0]}  # [P, ...] per period
        return x, (stats, kvs if cache is not None else None)

    x, (stats, kvs) = jax.lax.scan(body, x_BTD, xs)
    stats = {k: v.reshape(len(layers), *v.shape[2:]) for k, v in stats.items()}  # [L/P, P] -> [L]
    if cache is not None:  # kvs[p] = (k, v) stacked [L/P, ...]: back to one buffer per layer
        unstack = lambda i: tuple(kvs[layer % period][i][layer // period] for layer in range(len(layers)))  # noqa: E731
        cache = cache.replace(k=unstack(0), v=unstack(1), lengths=positions_BT[:, -1].astype(jnp.int32) + 1)
    return x, cache, stats


def count_params(cfg: ModelConfig) -> int:
    """Parameter count from shapes alone (`jax.eval_shape`, nothing allocated)."""
    shapes = jax.eval_shape(lambda: nnx.state(Transformer(cfg, nnx.Rngs(0)), nnx.Param))
    return sum(int(x.size) for x in jax.tree.leaves(shapes))
