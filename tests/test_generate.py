"""Generation on the cache interface: prefill + token-by-token decode == full forward, ragged
batches, and one compiled call whose loop is a `while`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decode import cache as kv_cache
from decode.generate import generate
from decode.sampling import SamplerConfig
from spark.config import ModelConfig, SparkConfig
from spark.model import Transformer

TINY = ModelConfig(vocab_size=61, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                   ffn_dim=64, sliding_window=5)
SPARK = dataclasses.replace(TINY, ffn_kind="spark", attn_kind="spark", spark=SparkConfig(ffn_k_frac=0.25, attn_k=4))
CASES = {"dense": (TINY, None), "spark": (SPARK, None), "spark_mixnmatch": (SPARK, (12, 96, 24, 48))}


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_then_decode_equals_full_forward(name):
    cfg, widths = CASES[name]
    model = Transformer(cfg, nnx.Rngs(0))
    b, t, p = 2, 16, 6  # 16 > sliding window 5; Spark keeps 4 keys once more are visible
    tokens = jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    full, _ = model(tokens, pos, widths=widths)
    cache = kv_cache.init(cfg, b, t)
    logits, cache = model(tokens[:, :p], pos[:, :p], cache=cache, widths=widths)
    steps = [logits]
    for i in range(p, t):
        logits, cache = model(tokens[:, i:i + 1], pos[:, i:i + 1], cache=cache, widths=widths)
        steps.append(logits)
    got = jnp.concatenate(steps, axis=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=1e-4, rtol=1e-4)
    assert cache.lengths.tolist() == [t, t]


def _gen(model, prompts, max_new=8):
    graphdef, params = nnx.split(model)
    t = max(len(x) for x in prompts)
    arr = np.zeros((len(prompts), t), np.int32)
    for i, x in enumerate(prompts):
        arr[i, : len(x)] = x
    lengths = jnp.asarray([len(x) for x in prompts], jnp.int32)
    out, n = generate(graphdef, params, jnp.asarray(arr), lengths, jax.random.key(0), max_new_tokens=max_new,
                      sampler=SamplerConfig(temperature=0.0), eos_id=-1, pad_id=0)
    return np.asarray(out), np.asarray(n)


@pytest.mark.parametrize("cfg", [TINY, SPARK], ids=["dense", "spark"])
def test_ragged_batch_equals_rows_alone(cfg):
    model = Transformer(cfg, nnx.Rngs(2))
    prompts = [[5, 9, 3, 7, 1, 2, 8, 4, 6], [11, 12, 13]]
    batch, n = _gen(model, prompts)
    assert n.tolist() == [8, 8]
    for i, p in enumerate(prompts):
        alone, _ = _gen(model, [p])
        np.testing.assert_array_equal(batch[i], alone[0])
    # greedy continuation equals argmax of a full forward over the generated prefix
    seq = jnp.asarray([prompts[1] + batch[1].tolist()])
    logits, _ = model(seq, jnp.arange(seq.shape[1])[None])
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
