"""Pod-training ingredients: scanned layers == the unrolled loop, MatFormer's run-time width switch
== the static widths, the program size does not grow with depth, and the ahead-of-time TPU compile
of bench/aot_compile.py (libtpu as a compiler, no TPU) with its memory read back."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark import kernels, train_lib
from spark.config import Config, MatFormerConfig, MeshConfig, ModelConfig, SparkConfig, TrainConfig
from spark.errors import ConfigError

SPARK = ModelConfig(vocab_size=61, d_model=32, num_layers=4, num_heads=2, num_kv_heads=1, head_dim=16, ffn_dim=64,
                    sliding_window=6, ffn_kind="spark", attn_kind="spark", matformer=MatFormerConfig((4, 2, 1)),
                    spark=SparkConfig(ffn_k_frac=0.25, attn_k=4))
CFG = Config(model=SPARK, train=TrainConfig(batch_size=2, seq_len=24, matformer_mode="off"))


def _batch(cfg):
    k1, k2 = jax.random.split(jax.random.key(0))
    b, t = cfg.train.batch_size, cfg.train.seq_len
    tok = jax.random.randint(k1, (b, t + 1), 0, cfg.model.vocab_size)
    seg = jnp.concatenate([jnp.ones((b, 15), jnp.int32), 2 * jnp.ones((b, t - 15), jnp.int32)], 1)
    pos = jnp.concatenate([jnp.arange(15), jnp.arange(t - 15)])[None].repeat(b, 0)
    mask = (jax.random.uniform(k2, (b, t)) > 0.2).astype(jnp.float32)
    return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "positions": pos, "segment_ids": seg, "loss_mask": mask}


def _with(cfg, **train):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train))


def _loss_and_grad(cfg, params, batch, widths=None, width_index=None):
    graphdef = train_lib.graphdef_of(cfg)

    def loss(p):
        return train_lib._forward(graphdef, p, batch, widths, 1.0, cfg.train, width_index)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def _close(a_tree, b_tree, rtol):
    for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= rtol * max(np.linalg.norm(b), 1e-30), np.linalg.norm(a - b)


def test_scanned_layers_equal_unrolled():
    """Same parameters, same loss, gradients and per-layer stats (in layer order), ≤ 1e-5 (blocks
    rematerialised, as on a pod)."""
    cfg = _with(CFG, remat="full")
    params, batch = train_lib.init_state(cfg)["params"], _batch(cfg)
    (l0, st0), g0 = _loss_and_grad(cfg, params, batch)
    (l1, st1), g1 = _loss_and_grad(_with(cfg, scan_layers=True), params, batch)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    _close(g1, g0, 1e-5)
    for key in st0:  # [L] per layer: a period reshaped in the wrong order would permute them
        np.testing.assert_allclose(st1[key], st0[key], rtol=1e-5, atol=1e-7)
        assert st0[key].shape == (SPARK.num_layers,)
    assert len(set(np.round(np.asarray(st0["ffn_density"]), 6))) > 1  # layers differ: the order check has power


def test_scan_falls_back_for_mix_n_match_and_is_depth_independent():
    """Per-layer widths that differ between periods cannot share a scan body: the unrolled loop runs
    (same result). With the scan, the traced program has the same size at 2 and 8 layers."""
    cfg = _with(CFG, scan_layers=True)
    params, batch = train_lib.init_state(cfg)["params"], _batch(cfg)
    mix = (24, 96, 48, 96)  # period 2: position 0 differs across periods (24 vs 48)
    (l0, _), _ = _loss_and_grad(_with(cfg, scan_layers=False), params, batch, widths=mix)
    (l1, _), _ = _loss_and_grad(cfg, params, batch, widths=mix)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)

    def n_eqns(layers, scan):
        c = dataclasses.replace(_with(cfg, scan_layers=scan), model=dataclasses.replace(SPARK, num_layers=layers))
        params = jax.eval_shape(lambda: train_lib.init_state(c)["params"])
        graphdef = train_lib.graphdef_of(c)
        fn = jax.grad(lambda p: train_lib._forward(graphdef, p, batch, None, 1.0, c.train)[0])
        return len(jax.make_jaxpr(fn)(params).jaxpr.eqns)

    assert n_eqns(2, True) == n_eqns(8, True) < n_eqns(8, False)


def test_run_time_width_switch_equals_static_widths():
    """MatFormer 'sample' mode picks the granularity inside each block (lax.switch over the FFN):
    for every index, the loss and gradients of the static widths of that granularity."""
    model = dataclasses.replace(SPARK, num_layers=2, matformer=MatFormerConfig((2, 1)))  # one period
    cfg = dataclasses.replace(_with(CFG, scan_layers=True), model=model)
    params, batch = train_lib.init_state(cfg)["params"], _batch(cfg)
    grans = [w for _, w in train_lib.granularities(_with(cfg, matformer_mode="sample"))]
    graphdef = train_lib.graphdef_of(cfg)
    switch = jax.jit(jax.value_and_grad(  # one compile for every index
        lambda p, i: train_lib._forward(graphdef, p, batch, tuple(grans), 1.0, cfg.train, i), has_aux=True))
    for i, widths in enumerate(grans):
        (l_static, _), g_static = _loss_and_grad(cfg, params, batch, widths=widths)
        (l_switch, _), g_switch = switch(params, jnp.int32(i))
        np.testing.assert_allclose(float(l_switch), float(l_static), rtol=1e-6)
        _close(g_switch, g_static, 1e-5)


def test_sample_mode_compiles_one_model():
    """The sampled-granularity step traces attention once per layer (blocked attention is one
    custom-VJP call: as many as a single granularity's step), not once per granularity as a
    lax.switch over whole models would."""
    base = dataclasses.replace(CFG, model=dataclasses.replace(SPARK, attn_block=8))
    sample = _with(base, matformer_mode="sample")
    params = jax.eval_shape(lambda: train_lib.init_state(sample)["params"])
    graphdef, batch = train_lib.graphdef_of(sample), _batch(sample)

    def vjp_calls(cfg):
        fn = lambda p: train_lib.loss_fn(p, graphdef, batch, cfg, 0)[0]  # noqa: E731
        return str(jax.make_jaxpr(fn)(params)).count("custom_vjp_call")

    off = vjp_calls(_with(base, matformer_mode="off"))
    lookup = int(kernels.enabled())  # the embedding's take_rows kernel is a custom-VJP call on CPU too
    assert vjp_calls(sample) == off == SPARK.num_layers + lookup
    assert vjp_calls(_with(base, matformer_mode="sum")) == 3 * off


# ---- ahead-of-time TPU compilation --------------------------------------------------------------

def _libtpu():
    try:
        import libtpu  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("libtpu is part of the test extra: the AOT test must run in CI")
        pytest.skip("libtpu not installed (pip install -e '.[test]')")


def test_aot_compile_for_a_tpu_topology():
    """A 2-layer Spark + MatFormer step at batch 8 x 32 on v5e:2x2 (4 chips), as the 2B configs train
    (scan, remat, blocked attention, chunked loss, sampled granularity): the TPU compiler runs on
    this CPU machine and memory_analysis reads back sizes that add up; the state is FSDP-sharded
    (arguments per chip ≈ a quarter of the state)."""
    _libtpu()
    from bench import aot_compile

    # TPU tiles are (8, 128): smaller minor dims would be padded and hide the sharding
    model = dataclasses.replace(SPARK, num_layers=2, d_model=256, head_dim=128, ffn_dim=512, vocab_size=512,
                                attn_block=16, matformer=MatFormerConfig((2, 1)))
    cfg = Config(model=model, train=TrainConfig(batch_size=8, seq_len=32, matformer_mode="sample", scan_layers=True,
                                                remat="full", loss_chunk=16), mesh=MeshConfig(data=1, fsdp=-1))
    rep = aot_compile.run(cfg, "v5e:2x2", "train")
    assert rep["n_devices"] == 4 and rep["device_kind"] == "TPU v5 lite" and rep["mesh"]["fsdp"] == 4
    assert rep["hbm_bytes"] == int(15.75 * 2**30) and rep["fits"] and 0 < rep["hbm_fraction"] < 0.01
    assert rep["total_bytes"] == (rep["argument_bytes"] + rep["output_bytes"] + rep["temp_bytes"]
                                  - rep["alias_bytes"])
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(
        lambda: train_lib.init_state(cfg))))
    assert state_bytes / 4 <= rep["argument_bytes"] < state_bytes / 2  # sharded 4 ways (+ batch, norms)
    assert rep["alias_bytes"] > 0.9 * state_bytes / 4  # the donated state is updated in place
    assert rep["flops_per_chip"] > 0 and rep["temp_bytes"] > 0


def test_aot_errors_are_one_line():
    _libtpu()
    from bench import aot_compile

    with pytest.raises(ConfigError, match="unknown TPU topology 'v9x:2x2'"):
        aot_compile.topology_devices("v9x:2x2")


def test_matmul_flops_counts_loops_and_branches_by_hand():
    """A [4, 8] x [8, 16] matmul is 2·4·8·16 = 1024 FLOPs; inside a scan of length 5 it counts 5×;
    of a two-branch switch (the second with two such matmuls) the branch asked for, else the larger."""
    from bench.aot_compile import matmul_flops

    a, b = jnp.ones((4, 8)), jnp.ones((8, 16))
    assert matmul_flops(jax.make_jaxpr(jnp.matmul)(a, b)) == 1024

    def scanned(a, b):
        return jax.lax.scan(lambda c, _: (c + a @ b, None), jnp.zeros((4, 16)), None, length=5)[0]

    assert matmul_flops(jax.make_jaxpr(jax.jit(scanned))(a, b)) == 5 * 1024

    def switched(i, a, b):
        return jax.lax.switch(i, [lambda a, b: a @ b, lambda a, b: (a @ b) @ jnp.ones((16, 16))], a, b)

    jaxpr = jax.make_jaxpr(switched)(0, a, b)
    assert matmul_flops(jaxpr, 0) == 1024 and matmul_flops(jaxpr, 1) == 1024 + 2 * 4 * 16 * 16
    assert matmul_flops(jaxpr) == 1024 + 2 * 4 * 16 * 16


def test_activations_are_pinned_batch_sharded_under_the_mesh():
    """Under `jax.set_mesh` the train step pins activations to batch-sharded layouts (block input,
    residual and output; q, k, v; the logits): 6 per block + 1, and the same on the gradients.
    Without those pins XLA may keep the FSDP-sharded weights in place and replicate activations
    (681 GiB per chip for 2 layers of 2B)."""
    from bench.aot_compile import train_program
    from spark import sharding

    model = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, ffn_dim=64)
    cfg = Config(model=model, train=TrainConfig(batch_size=8, seq_len=16, matformer_mode="off"),
                 mesh=MeshConfig(data=1, fsdp=4))
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:4])
    with jax.set_mesh(mesh):
        _, lower, args = train_program(cfg, mesh)
        text = lower(*args).as_text()
    pins = [line for line in text.splitlines() if "sharding_constraint" in line]
    assert len(pins) == 2 * (6 * model.num_layers + 1)  # forward, and their cotangents in the backward
    assert all('[{"data", "fsdp"}' in line for line in pins), pins[:3]


def test_scanned_prefill_equals_unrolled():
    """A prefill into the cache as one scan (the cache stacked per period and unstacked after): same
    logits, every layer's K/V and lengths; the next decode step (unrolled) agrees too."""
    from flax import nnx

    from spark import cache as kv_cache
    from spark.model import Transformer

    model = Transformer(dataclasses.replace(SPARK, attn_block=8), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 17), 0, SPARK.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(17), (2, 17))

    @nnx.jit(static_argnames="scan")
    def run(model, scan):
        logits, cache = model(tokens[:, :16], pos[:, :16], cache=kv_cache.init(model.cfg, 2, 20), scan=scan)
        step, _ = model(tokens[:, 16:], pos[:, 16:], cache=cache)
        return logits, cache, step

    for a, b in zip(jax.tree.leaves(run(model, False)), jax.tree.leaves(run(model, True)), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)  # values are O(1)
