"""Pure training functions: init_state, train_step, eval_step (jit them with shardings).

The train state is a plain dict pytree {step, params, opt_state}; params is the NNX state as a
pure dict, merged back into a module inside the loss (`nnx.merge(graphdef, params)`), so jit,
grad and checkpointing see ordinary arrays.

MatFormer joint training (train.matformer_mode):
  'sum'    the loss is the sum over all granularities (one forward per granularity);
  'sample' one granularity per step, drawn from the step number: one forward whose FFNs pick the
           granularity's width at run time (a lax.switch over the FFN inside each block);
  'off'    full width only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from spark.config import Config
from spark.model import Transformer


def granularities(cfg: Config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, per-layer widths) trained jointly, smallest first ('F/8', ..., 'F'); 'F' only when off."""
    m = cfg.model
    divisors = [1] if cfg.train.matformer_mode == "off" else sorted(m.matformer.divisors, reverse=True)
    return [("F" if d == 1 else f"F/{d}", m.granularity_widths(d)) for d in divisors]


def schedule(cfg: Config) -> optax.Schedule:
    t = cfg.train
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
        decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.lr * t.min_lr_ratio)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    t = cfg.train
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(schedule(cfg), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask))


def init_model(cfg: Config, seed: int):
    return Transformer(cfg.model, nnx.Rngs(seed))


def init_state(cfg: Config) -> dict:
    """Fresh parameters and optimizer state (a function of the config and seed only)."""
    params = nnx.to_pure_dict(nnx.state(init_model(cfg, cfg.train.seed)))
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": make_optimizer(cfg).init(params)}


def graphdef_of(cfg: Config):
    return nnx.split(nnx.eval_shape(lambda: init_model(cfg, 0)))[0]


def token_loss(logits_BTV, targets_BT, mask_BT):
    """Sum of masked next-token cross-entropies (nats) and the number of counted tokens."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    return jnp.sum(ce * mask_BT), jnp.sum(mask_BT)


def chunked_token_loss(model, x_BTD, targets_BT, mask_BT, chunk: int):
    """token_loss of the model's logits at the final hidden states x_BTD, computed `chunk` tokens at
    a time: a scan whose rematerialised body forms one [B, chunk, V] float32 block of logits, so the
    [B, T, V] logits (for a 256k vocabulary, the largest tensor of a step) never exist, in the forward
    or the backward pass."""
    b, t, d = x_BTD.shape
    n = t // chunk
    split = lambda a: a.reshape(b, n, chunk, *a.shape[2:]).swapaxes(0, 1)  # noqa: E731  [n, B, chunk, ...]

    @jax.checkpoint
    def block(x_BCD, y_BC, m_BC):
        return token_loss(model.logits(x_BCD), y_BC, m_BC)

    def body(acc, xs):
        total, count = block(*xs)
        return (acc[0] + total, acc[1] + count), None

    zero = jnp.zeros((), jnp.float32)
    (total, count), _ = jax.lax.scan(body, (zero, zero), (split(x_BTD), split(targets_BT), split(mask_BT)))
    return total, count


def _forward(graphdef, params, batch, widths, norm, train, width_index=None):
    model = nnx.merge(graphdef, params)
    x, _, stats = model.apply_layers(model.embed_tokens(batch["inputs"]), batch["positions"], widths=widths,
                                     segment_ids_BT=batch["segment_ids"], remat=train.remat,
                                     scan=train.scan_layers, width_index=width_index)
    targets, mask = batch["targets"], batch["loss_mask"].astype(jnp.float32)
    if train.loss_chunk:
        total, _ = chunked_token_loss(model, x, targets, mask, train.loss_chunk)
    else:
        total, _ = token_loss(model.logits(x), targets, mask)
    return total / norm, stats


def loss_fn(params, graphdef, batch, cfg: Config, step, norm=None):
    """Scalar training loss and metrics (per-granularity losses, per-layer Spark statistics).

    Cross-entropy is summed over the batch's counted targets and divided by `norm` (default: their
    number), so micro-batches that share the full batch's count add up to the full-batch loss."""
    grans = granularities(cfg)
    if norm is None:
        norm = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    metrics = {}
    if cfg.train.matformer_mode == "sample" and len(grans) > 1:  # one forward; each FFN switches its width
        index = jax.random.randint(jax.random.fold_in(jax.random.key(cfg.train.seed), step), (), 0, len(grans))
        loss, stats = _forward(graphdef, params, batch, tuple(w for _, w in grans), norm, cfg.train, index)
        metrics["granularity"] = index
    else:
        losses = []
        for name, w in grans:
            li, stats = _forward(graphdef, params, batch, w, norm, cfg.train)  # stats: the last (full) width
            losses.append(li)
            metrics[f"loss_{name}"] = li
        loss = sum(losses)
    for key, per_layer in stats.items():
        metrics[key] = per_layer
    return loss, metrics


def train_step(state: dict, batch: dict, *, cfg: Config, graphdef) -> tuple[dict, dict]:
    """One optimizer step over the batch, accumulating gradients over train.grad_accum slices."""
    accum = cfg.train.grad_accum
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    norm = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

    def micro(carry, mb):
        (loss, metrics), grads = grad_fn(state["params"], graphdef, mb, cfg, state["step"], norm)
        return jax.tree.map(jnp.add, carry, (loss, grads)), metrics

    if accum == 1:
        (loss, metrics), grads = grad_fn(state["params"], graphdef, batch, cfg, state["step"], norm)
    else:  # the sum over micro-batches is exactly the full-batch loss and gradient
        mbs = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
        zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state["params"]))
        (loss, grads), metrics = jax.lax.scan(micro, zeros, mbs)
        metrics = {k: (jnp.sum(v, 0) if k.startswith("loss_") else jnp.mean(v, 0)) for k, v in metrics.items()}
    updates, opt_state = make_optimizer(cfg).update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params),
               "lr": schedule(cfg)(state["step"])}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def eval_step(params, batch, *, cfg: Config, graphdef) -> dict:
    """Summed held-out cross-entropy (nats) and token count, per granularity."""
    out = {}
    model = nnx.merge(graphdef, params)
    for name, w in granularities(cfg):
        logits, _ = model(batch["inputs"], batch["positions"], widths=w, segment_ids_BT=batch["segment_ids"])
        out[name] = token_loss(logits, batch["targets"], batch["loss_mask"])
    return out


def bits_per_byte(nats_per_token: float, bytes_per_token: float = 1.0) -> float:
    return nats_per_token / (math.log(2.0) * bytes_per_token)
