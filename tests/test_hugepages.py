"""spark/kernels/hugepages.py: `collapse` moves big CPU arrays into 2 MB pages (seen in the kernel's
own accounting, /proc/self/smaps), touches nothing outside them, and leaves values and use intact."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark.kernels import hugepages

MB = 1 << 20


def _mapping_huge_kb(addr: int) -> int | None:
    """AnonHugePages (kB) of the mapping holding `addr`, from /proc/self/smaps; None if not found."""
    found = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                found = lo <= addr < hi
            elif found and head == "AnonHugePages:":
                return int(line.split()[1])
    return None


def test_aligned_interior_is_the_whole_huge_pages_inside():
    p = hugepages.HUGE_PAGE
    assert hugepages.aligned_interior(p, 3 * p) == (p, 3 * p)
    assert hugepages.aligned_interior(p + 4096, 3 * p) == (2 * p, 2 * p)  # not rounded outward
    assert hugepages.aligned_interior(p - 4096, p + 8192) == (p, p)
    assert hugepages.aligned_interior(p + 1, p) == (2 * p, 0)  # no whole page inside


def test_collapse_keeps_values_and_skips_small_arrays():
    big = jax.random.normal(jax.random.key(0), (3 * MB,), jnp.float32)  # 12 MB
    small = jnp.arange(1000, dtype=jnp.float32)
    before = np.asarray(big).copy()
    moved = hugepages.collapse({"big": big, "small": small, "n": 3})
    assert 0 <= moved <= big.nbytes
    np.testing.assert_array_equal(np.asarray(big), before)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: x * 2)(big)), before * 2)
    assert hugepages.collapse({"small": small}) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_collapse_backs_the_array_by_huge_pages():
    x = jnp.ones((5 * MB,), jnp.float32) * 3.0  # 20 MB, allocated by XLA with 4 KB pages
    ptr = x.unsafe_buffer_pointer()
    start, length = hugepages.aligned_interior(ptr, x.nbytes)
    before = _mapping_huge_kb(start)
    moved = hugepages.collapse(x)
    if moved == 0:
        pytest.skip("MADV_COLLAPSE unsupported here (Linux < 6.1, THP disabled, no free huge page)")
    assert 0 < moved <= length  # pages the kernel could not allocate under memory pressure are left
    after = _mapping_huge_kb(start)
    assert before is not None and after is not None
    assert after - before >= moved // 1024  # the kernel's own accounting: they are huge pages now
    assert float(jnp.sum(x)) == 3.0 * x.size


def test_failed_pages_are_retried_while_passes_make_progress(monkeypatch):
    """Pages that fail transiently (EAGAIN) are collapsed on a later pass; a range where nothing
    moves is given up after one pass (an unsupported kernel costs no waiting)."""
    page = hugepages.HUGE_PAGE
    calls = []

    def flaky(addr, length, advice):  # every page but the first fails on its first try
        assert length == page and addr % page == 0 and advice == hugepages.MADV_COLLAPSE
        calls.append(addr)
        return 0 if addr == 4 * page or calls.count(addr) > 1 else -1

    monkeypatch.setattr(hugepages, "_LIBC", [flaky])
    assert hugepages.collapse_range(3 * page + 8, 5 * page) == 4 * page  # 4 whole pages inside: 4P .. 8P
    assert len(calls) == 4 + 3
    calls.clear()
    monkeypatch.setattr(hugepages, "_LIBC", [lambda addr, length, advice: calls.append(addr) or -1])
    assert hugepages.collapse_range(page, 3 * page) == 0
    assert len(calls) == 3  # one pass: no progress, no retry
