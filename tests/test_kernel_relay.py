"""The kernels' relay (spark/kernels/cpu_kernels.cc parallel_chunks): the helper task that stays
awake between kernel calls takes later calls' chunks, and changes no result."""

import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark import kernels

needs_kernels = pytest.mark.skipif(not kernels.enabled(), reason=f"spark.kernels: {kernels.status()}")


@needs_kernels
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: no helper task to keep awake")
def test_awake_helper_takes_chunks_and_changes_no_result():
    """The relay (cpu_kernels.cc parallel_chunks): with a spin window the helper task stays awake and
    runs later calls' chunks (relayed_chunks grows), without one it never does; results are the
    same bits either way, also with four Python threads calling at once (one spinning task, calls
    racing for it)."""
    rng = np.random.default_rng(11)
    w = jnp.asarray(rng.standard_normal((8192, 256), np.float32) / 16)  # 16 chunks, 8 MB a call
    xs = [jnp.asarray(rng.standard_normal((1, 256), np.float32)) for _ in range(4)]
    chain = jax.jit(lambda x: jax.lax.fori_loop(0, 40, lambda i, y: jnp.tanh(kernels.gemv_rows(y, w)[:, :256]), x))

    def run_all(threads):
        if not threads:
            return [np.asarray(chain(x)) for x in xs]
        out = [None] * len(xs)

        def one(i):
            out[i] = np.asarray(chain(xs[i]))
        pool = [threading.Thread(target=one, args=(i,)) for i in range(len(xs))]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return out

    try:
        kernels.set_spin_us(0)
        before = kernels.relayed_chunks()
        ref = run_all(False)
        assert kernels.relayed_chunks() == before  # no spin: never relayed
        kernels.set_spin_us(1_000_000)
        before = kernels.relayed_chunks()
        deadline = time.monotonic() + 60  # a loaded CPU may starve the yielding helper for a while
        while kernels.relayed_chunks() == before and time.monotonic() < deadline:
            serial = run_all(False)
            for r, a in zip(ref, serial, strict=True):
                np.testing.assert_array_equal(a, r)
        assert kernels.relayed_chunks() > before
        together = run_all(True)
    finally:
        kernels.set_spin_us()  # the default again
    for r, b in zip(ref, together, strict=True):
        np.testing.assert_array_equal(b, r)
