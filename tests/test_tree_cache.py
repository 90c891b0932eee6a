"""The tree-capable cache (spark/cache.py: Tree, commit): every node of a draft tree, verified in
one block (or in blocks by depth, as a drafter runs), gets the logits of a full forward of its
root-to-node path; commit then leaves the cache a linear decode continues from. Ragged prefixes,
a sliding window shorter than prefix + tree depth, dense and Spark (masked and sparse-gather)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spark import cache as kv_cache
from spark.config import ModelConfig, SparkConfig
from spark.model import Transformer

TINY = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   ffn_dim=64, sliding_window=5)
SPARK = dataclasses.replace(TINY, ffn_kind="spark", attn_kind="spark",
                            spark=SparkConfig(ffn_k_frac=0.25, attn_k=3, decode_capacity_sigmas=100.0))
CASES = {"dense": (TINY, False), "spark_sparse": (SPARK, True)}  # the masked Spark path: test_a_chain_tree…

PARENT = np.array([-1, 0, 0, 1, 2, 2, 4])  # BFS order; node 6 is at depth 3
DEPTH = np.array([0, 1, 1, 2, 2, 2, 3])
PREFIX = [6, 4]  # ragged rows; 6 + 3 > the window 5


def ancestors(parent):
    """anc[n, m]: m is n or an ancestor of n."""
    n = len(parent)
    anc = np.eye(n, dtype=bool)
    for i in range(n):
        j = parent[i]
        while j >= 0:
            anc[i, j] = True
            j = parent[j]
    return anc


def path(parent, n):
    out = [n]
    while parent[out[-1]] >= 0:
        out.append(parent[out[-1]])
    return out[::-1]


@pytest.mark.parametrize("name", list(CASES))
def test_tree_nodes_equal_full_forward_of_their_paths_and_commit(name):
    cfg, sparse = CASES[name]
    model = Transformer(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    b, n, width = 2, len(PARENT), max(PREFIX)
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, cfg.vocab_size, (b, width))
    nodes = rng.integers(0, cfg.vocab_size, (b, n))
    anc = ancestors(PARENT)
    lengths = jnp.asarray(PREFIX, jnp.int32)

    @jax.jit
    def fwd(tok, pos, cache, tree=None):
        return nnx.merge(graphdef, params)(tok, pos, cache=cache, sparse=sparse, tree=tree)

    def full(seqs, at):
        """logits of a full forward of each sequence (padded at the end: causal) at index `at`."""
        arr = np.zeros((len(seqs), 16), np.int32)
        for i, x in enumerate(seqs):
            arr[i, : len(x)] = x
        logits = jax.jit(lambda a: nnx.merge(graphdef, params)(a, jnp.arange(16)[None], sparse=False)[0])(arr)
        return [logits[i, j] for i, j in enumerate(at)]

    _, cache = fwd(jnp.asarray(prompts), jnp.broadcast_to(jnp.arange(width), (b, width)), kv_cache.init(cfg, b, 20))
    cache = cache.replace(lengths=lengths)
    pos_BN = lengths[:, None] + jnp.asarray(DEPTH)[None]

    def tree_block(ids):
        ids = np.asarray(ids)
        tree = kv_cache.Tree(node_BT=jnp.broadcast_to(jnp.asarray(ids), (b, len(ids))),
                             anc_BTN=jnp.broadcast_to(jnp.asarray(anc[ids]), (b, len(ids), n)), pos_BN=pos_BN)
        return jnp.asarray(nodes[:, ids]), pos_BN[:, ids], tree

    logits_all, after = fwd(*tree_block(range(n))[:2], cache, tree_block(range(n))[2])
    assert after.lengths.tolist() == PREFIX  # a tree block leaves the committed length alone
    by_depth, c = [], cache  # as a drafter runs: one block per depth, each reading the scratch before it
    for d in range(DEPTH.max() + 1):
        ids = np.flatnonzero(DEPTH == d)
        tok, pos, tree = tree_block(ids)
        lg, c = fwd(tok, pos, c, tree)
        by_depth.append((ids, lg))
    seqs = [np.concatenate([prompts[row, :PREFIX[row]], nodes[row, path(PARENT, node)]])
            for row in range(b) for node in range(n)]
    refs = full(seqs, [len(x) - 1 for x in seqs])
    for row in range(b):
        for node in range(n):
            np.testing.assert_allclose(logits_all[row, node], refs[row * n + node], atol=2e-4, rtol=2e-4,
                                       err_msg=f"row {row} node {node}")
        for ids, lg in by_depth:
            np.testing.assert_allclose(lg[row], logits_all[row, ids], atol=2e-4, rtol=2e-4)

    # commit: row 0 keeps the path to node 6 (4 nodes), row 1 the path to node 3 (3 nodes)
    keep = [path(PARENT, 6), path(PARENT, 3) + [0]]
    kept_slots = lengths[:, None] + jnp.asarray(keep)
    n_kept = jnp.asarray([4, 3], jnp.int32)
    committed = kv_cache.commit(after, kept_slots, n_kept)
    assert committed.lengths.tolist() == [PREFIX[0] + 4, PREFIX[1] + 3]
    nxt = rng.integers(0, cfg.vocab_size, (b, 2))
    lg, _ = fwd(jnp.asarray(nxt), committed.lengths[:, None] + jnp.arange(2)[None], committed)
    seqs = [np.concatenate([prompts[row, :PREFIX[row]], nodes[row, keep[row][: int(n_kept[row])]], nxt[row]])
            for row in range(b) for _ in range(2)]
    refs = full(seqs, [len(x) - 2 + i % 2 for i, x in enumerate(seqs)])
    for row in range(b):
        np.testing.assert_allclose(lg[row], np.stack(refs[2 * row: 2 * row + 2]), atol=2e-4, rtol=2e-4,
                                   err_msg=f"row {row} after commit")


def test_a_chain_tree_equals_the_linear_block():
    """A tree that is a chain (anc = lower triangle) is the linear block: logits and cache (Spark,
    masked path)."""
    graphdef, params = nnx.split(Transformer(SPARK, nnx.Rngs(1)))
    model = jax.jit(lambda *a, **kw: nnx.merge(graphdef, params)(*a, **kw))
    b, t, p = 2, 4, 6
    tok = jax.random.randint(jax.random.key(2), (b, p + t), 0, SPARK.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(p + t), (b, p + t))
    _, cache = model(tok[:, :p], pos[:, :p], cache=kv_cache.init(SPARK, b, 16))
    lin, lin_cache = model(tok[:, p:], pos[:, p:], cache=cache)
    tree = kv_cache.Tree(node_BT=jnp.broadcast_to(jnp.arange(t), (b, t)),
                         anc_BTN=jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t)), pos_BN=pos[:, p:])
    tr, tr_cache = model(tok[:, p:], pos[:, p:], cache=cache, tree=tree)
    np.testing.assert_allclose(tr, lin, atol=1e-5, rtol=1e-5)
    committed = kv_cache.commit(tr_cache, p + jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.full((b,), t))
    for a, c in zip(committed.k + committed.v, lin_cache.k + lin_cache.v, strict=True):
        np.testing.assert_allclose(a, c, atol=1e-6)
    assert committed.lengths.tolist() == lin_cache.lengths.tolist()
