"""spark/kernels/hugepages.py: `collapse` moves big CPU arrays into 2 MB pages (seen in the kernel's
own accounting, /proc/self/smaps), touches nothing outside them, and leaves values and use intact."""

import json
import os
import subprocess
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


PROBE = """
import json, sys
import jax.numpy as jnp
sys.path.insert(0, {root!r})
from tests.test_hugepages import _mapping_huge_kb
from spark.kernels import hugepages
x = jnp.ones((5 << 20,), jnp.float32) * 3.0  # 20 MB, allocated by XLA with 4 KB pages
start, length = hugepages.aligned_interior(x.unsafe_buffer_pointer(), x.nbytes)
before = _mapping_huge_kb(start)
moved = hugepages.collapse(x)
print(json.dumps(dict(length=length, before=before, moved=moved, after=_mapping_huge_kb(start),
                      ok=float(jnp.sum(x)) == 3.0 * x.size)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_collapse_backs_the_array_by_huge_pages():
    """In a fresh process (no memory an earlier collapse left huge for the allocator to hand out again),
    the array's mapping gains at least the huge pages `collapse` reports."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", PROBE.format(root=root)], capture_output=True, text=True,
                       cwd=root, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if out["moved"] == 0:
        pytest.skip("MADV_COLLAPSE unsupported here (Linux < 6.1, THP disabled, no free huge page)")
    assert 0 < out["moved"] <= out["length"] and out["ok"]  # pages the kernel could not allocate are left
    assert out["before"] is not None and out["after"] is not None
    assert out["after"] - out["before"] >= out["moved"] // 1024  # the kernel's own accounting


def test_failed_pages_are_retried_while_passes_make_progress(monkeypatch):
    """Pages that fail transiently (EAGAIN) are collapsed on a later pass; a range where nothing
    moves is given up after one pass (an unsupported kernel costs no waiting)."""
    page = hugepages.HUGE_PAGE
    calls = []

    def flaky(addr, length, advice):  # every page but the first fails on its first try
        assert length == page and addr % page == 0 and advice == hugepages.MADV_COLLAPSE
        calls.append(addr)
        return 0 if addr == 4 * page or calls.count(addr) > 1 else -1

    monkeypatch.setattr(hugepages, "_madvise", lambda: flaky)
    assert hugepages.collapse_range(3 * page + 8, 5 * page) == 4 * page  # 4 whole pages inside: 4P .. 8P
    assert len(calls) == 4 + 3
    calls.clear()
    monkeypatch.setattr(hugepages, "_madvise", lambda: lambda addr, length, advice: calls.append(addr) or -1)
    assert hugepages.collapse_range(page, 3 * page) == 0
    assert len(calls) == 3  # one pass: no progress, no retry
