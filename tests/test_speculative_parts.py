"""Speculative decoding piece by piece: the emit window (EOS inside an accepted block, EOS as the
correction or bonus token, the `room` cut), the draft's log-q (the processed distribution its
tokens were drawn from), the separate draft cache straight after drafting, and acceptance of a
full-width draft — draft-side bugs cannot change the output distribution, only these can show them."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from decode import speculative as spec
from decode.rollout import prefill_cache
from decode.sampling import SamplerConfig, processed_logprobs
from spark import cache as kv_cache
from spark.config import ModelConfig
from spark.model import Transformer

E, PAD = 7, 0


def test_emit_window_eos_and_room():
    """Rows (drafts, accepted n, token t after them, room) -> the window by hand."""
    rows = [  # drafts      n  t  room   window        count  hit_eos
        ([1, E, 2], 3, 4, 10, [1, E, PAD, PAD], 2, True),  # EOS at an accepted draft index: cut after it
        ([1, 2, 3], 1, 9, 10, [1, 9, PAD, PAD], 2, False),  # t replaces the first rejected draft
        ([E, 1, 1], 0, 5, 10, [5, PAD, PAD, PAD], 1, False),  # a *rejected* draft EOS does not stop the row
        ([1, 2, 3], 3, E, 10, [1, 2, 3, E], 4, True),  # EOS as the bonus token
        ([1, 2, 3], 1, E, 10, [1, E, PAD, PAD], 2, True),  # EOS as the correction token
        ([1, 2, 3], 2, 6, 2, [1, 2, PAD, PAD], 2, False),  # room 2 cuts the window
        ([1, 2, E], 3, 4, 2, [1, 2, PAD, PAD], 2, False),  # an EOS past the room is not emitted: no stop
        ([E, 2, 3], 3, 4, 1, [E, PAD, PAD, PAD], 1, True),  # EOS first, room 1
    ]
    d, n, t, room, want, count, hit = (jnp.asarray([r[i] for r in rows]) for i in range(7))
    w, c, h = spec.emit_window(d, n, t, room, E, PAD)
    assert np.asarray(w).tolist() == np.asarray(want).tolist()
    assert np.asarray(c).tolist() == np.asarray(count).tolist()
    assert np.asarray(h).tolist() == np.asarray(hit).tolist()
    # the next pending token and its predecessor (pending before the round: 50 + row): the window's
    # last two — t only when nothing cut the window (rows 1, 3, 4), a draft where the room cut it (5, 6)
    pending, before = spec.emitted_tail(w, c, 50 + jnp.arange(len(rows)))
    assert np.asarray(pending).tolist() == [E, 9, 5, E, E, 2, 2, E]
    assert np.asarray(before).tolist() == [1, 1, 52, 3, 1, 1, 1, 57]


SMALL = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, ffn_dim=64,
                    sliding_window=5)  # one local (window 5 < the sequences here) and one global layer
PROMPTS = [[5, 9, 2, 44, 17, 3, 8], [11, 4, 30], [7, 7, 1, 60, 2]]
TRUNCATING = SamplerConfig(temperature=0.9, top_k=5, top_p=0.8)


def _batch(prompts):
    arr = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    for i, x in enumerate(prompts):
        arr[i, : len(x)] = x
    return jnp.asarray(arr), jnp.asarray([len(x) for x in prompts], jnp.int32)


@pytest.fixture(scope="module")
def small():
    return nnx.split(Transformer(SMALL, nnx.Rngs(0)))


def _kv_upto(cache, b, n):
    """Row b's K and V of every layer over slots [0, n), as [K, n, H] arrays."""
    vt = kv_cache.values_transposed(SMALL)
    ks = [np.asarray(k[b, :, :n]) for k in cache.k]
    vs = [np.asarray(v[b, :, :, :n].swapaxes(-1, -2) if vt else v[b, :, :n]) for v in cache.v]
    return ks, vs


@pytest.mark.parametrize("draft_cache", spec.DRAFT_CACHES)
def test_draft_logq_and_cache_after_a_full_acceptance(small, draft_cache):
    """Round 1 at temperature 0 with a full-width draft accepts every draft, so the separate draft
    cache misses d_γ's slot until the next round refills it; round 2 then drafts with a truncating
    sampler. Its log-q must equal processed_logprobs of the draft model's logits at each drafted
    position (recomputed by a fresh forward), and the separate draft cache, straight after
    drafting, must equal a fresh prefill of the prompt, the committed tokens and the drafts."""
    graphdef, params = small
    gamma, widths = 3, SMALL.check_widths(None)
    prompts, lengths = _batch(PROMPTS)
    sc = spec.SpecConfig(draft_widths=widths, gamma=gamma, draft_cache=draft_cache)
    kw = dict(spec=sc, eos_id=-1, pad_id=0, widths=widths)

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        s = spec.spec_prefill(model, prompts, lengths, jax.random.key(0), max_new_tokens=16,
                              sampler=SamplerConfig(0.0), **kw)
        s = spec.spec_round(model, s, sampler=SamplerConfig(0.0), sparse=True, **kw)
        return s, spec.draft(model, s, jax.random.key(5), spec=sc, sampler=TRUNCATING, sparse=True)

    s, (drafts, logq, drafted, _, dcache) = run(params)
    chex.assert_shape([drafts, drafted], (3, gamma))
    chex.assert_shape(logq, (3, gamma, SMALL.vocab_size))
    assert np.asarray(s.stats["accepted"]).tolist() == [gamma] * 3  # round 1 accepted everything
    assert np.asarray(drafted).all()
    seqs, starts = [], []
    for b in range(3):
        L = int(s.cache.lengths[b])
        committed = np.asarray(s.tokens_BN[b, : s.num_B[b]]).tolist()
        assert len(PROMPTS[b]) + len(committed) == L + 1  # pending sits at L
        seqs.append(PROMPTS[b] + committed + np.asarray(drafts[b, : gamma - 1]).tolist())  # slots 0 .. L+γ-1
        starts.append(L)
    padded, lens = _batch(seqs)  # right padding: a causal forward's earlier positions do not see it

    @jax.jit
    def fresh(params):
        model = nnx.merge(graphdef, params)
        _, cache = prefill_cache(model, padded, lens, max_new_tokens=4)
        return model(padded, jnp.broadcast_to(jnp.arange(padded.shape[1]), padded.shape))[0], cache

    ref, ref_cache = fresh(params)
    for b, (L, seq) in enumerate(zip(starts, seqs, strict=True)):
        want = np.asarray(processed_logprobs(ref[b, L : L + gamma], TRUNCATING))  # the draft's laws at L .. L+γ-1
        got = np.asarray(logq[b])
        assert (np.isfinite(got) == np.isfinite(want)).all() and (~np.isfinite(want)).any()  # truncation shows
        np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], atol=1e-4)
        if draft_cache == "separate":
            gk, gv = _kv_upto(dcache, b, len(seq))
            fk, fv = _kv_upto(ref_cache, b, len(seq))
            for x, y in zip(gk + gv, fk + fv, strict=True):
                np.testing.assert_allclose(x, y, atol=1e-4, err_msg=f"row {b}")
    if draft_cache == "shared":
        assert dcache is None


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_full_width_separate_draft_accepts_everything(small, temperature):
    """A full-width draft with its own cache is the target: at temperature 0 it accepts every
    draft exactly; sampled, p/q = 1 up to rounding, so ≥ 0.999 of the drafts."""
    graphdef, params = small
    prompts, lengths = _batch(PROMPTS * 4)
    sc = spec.SpecConfig(draft_widths=SMALL.check_widths(None), gamma=3, draft_cache="separate")
    _, num, st = spec.generate(graphdef, params, prompts, lengths, jax.random.key(3), max_new_tokens=40,
                               sampler=SamplerConfig(temperature), eos_id=-1, pad_id=0, spec=sc)
    drafted, accepted = int(np.sum(st["drafted"])), int(np.sum(st["accepted"]))
    assert drafted > 300
    if temperature == 0.0:
        assert accepted == drafted
    else:
        assert accepted >= 0.999 * drafted, (accepted, drafted)
