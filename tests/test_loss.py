"""The chunked cross-entropy (train.loss_chunk) is the full cross-entropy: same loss and same
gradient for every parameter, with a loss mask and packed segments; bad chunk sizes are errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark import train_lib
from spark.config import Config, ModelConfig, TrainConfig
from spark.errors import ConfigError

CFG = Config(model=ModelConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                               ffn_dim=64, sliding_window=8),
             train=TrainConfig(batch_size=2, seq_len=32, matformer_mode="sum"))


def _batch():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    tok = jax.random.randint(k1, (2, 33), 0, 259)
    seg = jnp.concatenate([jnp.ones((2, 20), jnp.int32), 2 * jnp.ones((2, 12), jnp.int32)], 1)  # two documents
    pos = jnp.concatenate([jnp.arange(20), jnp.arange(12)])[None].repeat(2, 0)
    mask = (jax.random.uniform(k2, (2, 32)) > 0.3).astype(jnp.float32)  # e.g. prompt tokens not counted
    return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "positions": pos, "segment_ids": seg, "loss_mask": mask}


@pytest.mark.parametrize("chunk", [8, 32])
def test_chunked_loss_and_gradient_equal_full(chunk):
    state = train_lib.init_state(CFG)
    graphdef = train_lib.graphdef_of(CFG)
    batch = _batch()
    chunked = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, loss_chunk=chunk))

    def value_and_grad(cfg):
        fn = jax.jit(jax.value_and_grad(lambda p: train_lib.loss_fn(p, graphdef, batch, cfg, 0)[0]))
        return fn(state["params"])

    (full, g_full), (part, g_part) = value_and_grad(CFG), value_and_grad(chunked)
    np.testing.assert_allclose(float(part), float(full), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_part), jax.tree.leaves(g_full), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_chunked_loss_never_forms_the_full_logits():
    """The jaxpr of the chunked loss holds no [B, T, V] array; the full loss does."""
    state = train_lib.init_state(CFG)
    graphdef = train_lib.graphdef_of(CFG)
    batch = _batch()
    one = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, matformer_mode="off"))

    def shapes(cfg):
        jaxpr = jax.make_jaxpr(jax.grad(lambda p: train_lib.loss_fn(p, graphdef, batch, cfg, 0)[0]))(state["params"])
        return {tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "shape")}

    assert (2, 32, 259) in shapes(one)
    chunked = shapes(dataclasses.replace(one, train=dataclasses.replace(one.train, loss_chunk=8)))
    assert (2, 32, 259) not in chunked


@pytest.mark.parametrize("bad", [-1, 5])
def test_bad_loss_chunk(bad):
    with pytest.raises(ConfigError, match="loss_chunk"):
        TrainConfig(seq_len=32, loss_chunk=bad)
    with pytest.raises(ConfigError, match="remat"):
        TrainConfig(remat="some")


@pytest.mark.parametrize("remat", ["dots_saveable", "full"])
def test_remat_gradient_equals_no_remat(remat):
    """train.remat recomputes block activations in the backward pass: same loss and gradients, and
    the gradient's jaxpr really holds a rematerialised block (a `checkpoint`/`remat` equation)."""
    cfg = dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, ffn_kind="spark", attn_kind="spark"),
                              train=dataclasses.replace(CFG.train, matformer_mode="off"))
    state = train_lib.init_state(cfg)
    graphdef = train_lib.graphdef_of(cfg)
    batch = _batch()
    on = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, remat=remat, loss_chunk=8))

    def grad_fn(c):
        return jax.value_and_grad(lambda p: train_lib.loss_fn(p, graphdef, batch, c, 0)[0])

    (l0, g0), (l1, g1) = jax.jit(grad_fn(cfg))(state["params"]), jax.jit(grad_fn(on))(state["params"])
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):  # recomputation reorders f32 sums
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), np.linalg.norm(a - b) / np.linalg.norm(b)
    names = {e.primitive.name for e in jax.make_jaxpr(grad_fn(on))(state["params"]).jaxpr.eqns}
    assert names & {"checkpoint", "remat", "remat2"}, names
    assert not {"checkpoint", "remat", "remat2"} & {e.primitive.name for e in
                                                    jax.make_jaxpr(grad_fn(cfg))(state["params"]).jaxpr.eqns}
