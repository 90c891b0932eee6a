"""Generation on the cache interface: prefill + token-by-token decode == full forward, ragged
batches, and one compiled call whose loop is a `while`."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decode.generate import decode, generate, start, summarize
from decode.sampling import SamplerConfig
from spark import cache as kv_cache
from spark.config import ModelConfig, SparkConfig
from spark.model import Transformer

TINY = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   ffn_dim=64, sliding_window=5)
SPARK = dataclasses.replace(TINY, ffn_kind="spark", attn_kind="spark", spark=SparkConfig(ffn_k_frac=0.25, attn_k=4,
                                                                                  decode_capacity_sigmas=100.0))
CASES = {"dense": (TINY, None), "spark": (SPARK, None), "spark_mixnmatch": (SPARK, (12, 48))}


@pytest.mark.parametrize("block", [1, 3], ids=["token", "block3"])
@pytest.mark.parametrize("name", list(CASES))
def test_prefill_then_decode_equals_full_forward(name, block):
    """Token by token, and in blocks of 3 (a speculative verify) that cross the window edge."""
    cfg, widths = CASES[name]
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    b, t, p = 2, 16, 6  # 16 > sliding window 5; Spark keeps 4 keys once more are visible
    tokens = jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))

    @jax.jit
    def fwd(params, tok, pos, cache):
        return nnx.merge(graphdef, params)(tok, pos, cache=cache, widths=widths)

    full, _ = fwd(params, tokens, pos, None)
    logits, cache = fwd(params, tokens[:, :p], pos[:, :p], kv_cache.init(cfg, b, t))
    steps = [logits]
    for i in range(p, t, block):
        j = min(i + block, t)
        logits, cache = fwd(params, tokens[:, i:j], pos[:, i:j], cache)
        steps.append(logits)
    got = jnp.concatenate(steps, axis=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=1e-4, rtol=1e-4)
    assert cache.lengths.tolist() == [t, t]


def _batch(prompts):
    t = max(len(x) for x in prompts)
    arr = np.zeros((len(prompts), t), np.int32)
    for i, x in enumerate(prompts):
        arr[i, : len(x)] = x
    return jnp.asarray(arr), jnp.asarray([len(x) for x in prompts], jnp.int32)


def _gen(model, prompts, max_new=8, eos_id=-1, full=False, temperature=0.0, **kw):
    graphdef, params = nnx.split(model)
    arr, lengths = _batch(prompts)
    out, n, stats = generate(graphdef, params, arr, lengths, jax.random.key(0), max_new_tokens=max_new,
                             sampler=SamplerConfig(temperature=temperature), eos_id=eos_id, pad_id=0, **kw)
    return (np.asarray(out), np.asarray(n), stats) if full else (np.asarray(out), np.asarray(n))


@pytest.mark.parametrize("cfg", [TINY, SPARK], ids=["dense", "spark"])
def test_ragged_batch_equals_rows_alone(cfg):
    model = Transformer(cfg, nnx.Rngs(2))
    prompts = [[5, 9, 3, 7, 1, 2, 8, 4, 6], [11, 12, 13]]
    batch, n = _gen(model, prompts)
    assert n.tolist() == [8, 8]
    alone, _ = _gen(model, prompts[1:])  # the padded row (the other has no padding: one B = 1 compile)
    np.testing.assert_array_equal(batch[1], alone[0])
    # greedy continuation equals argmax of a full forward over the generated prefix
    seq = jnp.asarray([prompts[1] + batch[1].tolist()])
    logits, _ = nnx.jit(lambda m, x: m(x, jnp.arange(x.shape[1])[None]))(model, seq)
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits[0, 2:-1], -1)), batch[1])


def test_generation_is_one_compiled_call_with_a_while_loop():
    model = Transformer(TINY, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    args = (graphdef, params, jnp.ones((1, 4), jnp.int32), jnp.array([4]), jax.random.key(0))
    kw = dict(max_new_tokens=5, sampler=SamplerConfig(temperature=0.0), eos_id=-1, pad_id=0)
    text = generate.lower(*args, **kw).as_text()
    assert "stablehlo.while" in text
    jaxpr = jax.make_jaxpr(lambda p, x, n, k: generate(graphdef, p, x, n, k, **kw))(*args[1:])
    assert "while" in str(jaxpr)


def test_compiled_decode_loop_does_not_copy_the_cache():
    """The decode loop updates its donated KV cache in place: the optimized program holds no copy of
    a whole cache buffer (a vmapped dynamic_update_slice made XLA:CPU copy each layer's K and V
    four times per step at these shapes, as at Gemma-2-2B's: spark/cache.py write_slots)."""
    cfg = dataclasses.replace(TINY, num_layers=1, d_model=64, num_heads=8, num_kv_heads=4, head_dim=64)
    graphdef, params = nnx.split(Transformer(cfg, nnx.Rngs(0)))
    state = start(graphdef, params, jnp.ones((1, 16), jnp.int32), jnp.array([16]), jax.random.key(0),
                  max_new_tokens=6)
    kw = dict(max_steps=6, sampler=SamplerConfig(temperature=1.0), eos_id=-1, pad_id=0)
    copies = cache_copies(decode.lower(graphdef, params, state, **kw).compile().as_text(), state.rows.cache)
    assert not copies, copies[:3]


def cache_copies(hlo: str, cache, in_entry: bool = True) -> list[str]:
    """The copy instructions of an optimized HLO text whose shape is one of `cache`'s K/V buffers;
    without `in_entry`, only those outside the entry computation (the loops: the entry may allocate
    the cache by copying one broadcast)."""
    if not in_entry:
        entry = hlo[hlo.index("\nENTRY"):]
        hlo = hlo[:hlo.index("\nENTRY")] + entry[entry.index("\n}\n"):]
    shapes = {f"f32[{','.join(map(str, b.shape))}]" for b in (*cache.k, *cache.v)}
    assert any(f"= {s}" in hlo for s in shapes), shapes  # the buffers are there to be copied
    return [line for line in hlo.splitlines() if " copy(" in line and any(f"= {s}" in line for s in shapes)]


PROMPTS = [[5, 9, 3, 7, 1, 2, 8, 4, 6], [11, 12, 13]]


def test_eos_stops_each_row_and_pads():
    model = Transformer(TINY, nnx.Rngs(2))
    free, _ = _gen(model, PROMPTS, max_new=10, temperature=1.0)
    j = next(j for j in range(1, 10) if free[0, j] not in free[0, :j])  # a token row 0 first emits at step j
    eos = int(free[0, j])
    out, n = _gen(model, PROMPTS, max_new=10, eos_id=eos, temperature=1.0)
    assert n[0] == j + 1 and out[0, : j + 1].tolist() == free[0, : j + 1].tolist()
    assert (out[0, j + 1:] == 0).all()
    hits = np.flatnonzero(free[1] == eos)
    assert n[1] == (hits[0] + 1 if len(hits) else 10)


def test_start_then_donated_decode_equals_generate():
    model = Transformer(SPARK, nnx.Rngs(4))
    graphdef, params = nnx.split(model)
    arr, lengths = _batch(PROMPTS)
    kw = dict(sampler=SamplerConfig(temperature=1.0, top_k=20), eos_id=-1, pad_id=0)
    want, n_want, _ = generate(graphdef, params, arr, lengths, jax.random.key(7), max_new_tokens=9, **kw)
    state = start(graphdef, params, arr, lengths, jax.random.key(7), max_new_tokens=9)
    state = decode(graphdef, params, state, max_steps=4, **kw)  # two calls: 4 + 5 steps
    state = decode(graphdef, params, state, max_steps=100, **kw)
    chex.assert_trees_all_equal(state.rows.gen_RL, want)  # the split loop draws the same tokens
    assert int(state.step) == 9
    assert summarize(state)["ffn_overflow"].shape == (2,)


def test_sparse_generation_matches_masked_and_reports_stats(monkeypatch):
    model = Transformer(SPARK, nnx.Rngs(5))  # capacity 4k: nothing overflows
    sparse, _, stats = _gen(model, PROMPTS, max_new=10, full=True)
    masked, _, stats_m = _gen(model, PROMPTS, max_new=10, full=True, sparse=False)
    np.testing.assert_array_equal(sparse, masked)
    assert stats["ffn_overflow"].tolist() == [0, 0] and stats["attn_overflow"].tolist() == [0, 0]
    assert "ffn_overflow" not in stats_m
    assert stats["ffn_density"].shape == (2,) and 0.1 < float(stats["ffn_density"].mean()) < 0.45
    assert int(stats["steps"]) == 10
    tight = dataclasses.replace(SPARK, spark=dataclasses.replace(SPARK.spark, decode_capacity_sigmas=0.0))
    monkeypatch.setenv("SPARK_CPU_KERNELS", "0")  # the capacity path (GPU/TPU); the CPU kernels have none
    _, _, stats_t = _gen(Transformer(tight, nnx.Rngs(5)), PROMPTS, max_new=10, full=True)
    assert int(stats_t["ffn_overflow"].sum()) > 0  # a tight capacity overflows, and says so
