"""2 MB pages under decode weights (Linux, CPU): `collapse(params)` moves every big CPU array of a
pytree into transparent huge pages, in place.

Why: the Spark FFN decode reads ~8% of the rows of K2 and V (spark/kernels ffn_gather), scattered
over matrices of 35 and 64 MB per layer at Gemma-2-2B shapes, so nearly every 2.5 KB or 4.6 KB
row starts on a 4 KB page whose translation is not in the TLB. A 2 MB page holds 450-800 such rows.
XLA:CPU allocates with 4 KB pages (it does not madvise), so the walk is paid on every row; the
dense GEMVs stream whole matrices and barely notice. Measured with
`python bench/decode_variants.py --variant huge_pages` (README, Results, session 42): 26 layers,
prompt 1024, Spark decode 1.032x faster, dense 1.017x.

How: madvise(MADV_COLLAPSE) (Linux ≥ 6.1) on the 2 MB-aligned interior of each array's buffer.
The kernel copies the pages into huge pages and remaps them; addresses and contents are unchanged,
so live jax arrays stay valid. It is a one-time copy (1.6-1.8 s per GB measured on this VM), so it is
opt-in: `sample.py --huge_pages`, `bench/decode.py --huge_pages`. Elsewhere (not Linux, an older
kernel, THP disabled, no CPU arrays) it does nothing and returns 0.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import time

import jax

HUGE_PAGE = 2 << 20  # x86-64 and arm64 (4 KB base pages) transparent huge page size
MADV_COLLAPSE = 25  # linux/mman.h (6.1)


@functools.cache
def _madvise():
    """libc's madvise(addr, length, advice) -> 0 or −1."""
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def aligned_interior(ptr: int, nbytes: int) -> tuple[int, int]:
    """The whole huge pages inside [ptr, ptr + nbytes): (start, length), length 0 if none."""
    start = -(-ptr // HUGE_PAGE) * HUGE_PAGE
    end = (ptr + nbytes) // HUGE_PAGE * HUGE_PAGE
    return start, max(0, end - start)


def collapse_range(ptr: int, nbytes: int, passes: int = 4) -> int:
    """Collapses the whole huge pages inside one buffer, page by page; a page that fails (EAGAIN or
    EINVAL, seen here on buffers just written; retried 10 ms later they moved) is retried up to
    `passes` times while a pass makes progress. -> bytes now in huge pages."""
    start, length = aligned_interior(ptr, nbytes)
    if length == 0 or not sys.platform.startswith("linux"):
        return 0
    madvise = _madvise()
    left = list(range(start, start + length, HUGE_PAGE))
    for i in range(passes):
        if i:
            time.sleep(0.01)
        before = len(left)
        left = [page for page in left if madvise(page, HUGE_PAGE, MADV_COLLAPSE) != 0]
        if not left or len(left) == before:  # done, or nothing moves (unsupported here)
            break
    return length - HUGE_PAGE * len(left)


def collapse(tree) -> int:
    """Moves every CPU jax array of `tree` (each addressable shard) that spans a whole 2 MB page into
    huge pages; -> the bytes collapsed (0 where unsupported). Values are unchanged."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if not isinstance(leaf, jax.Array):
            continue
        for shard in leaf.addressable_shards:
            if shard.device.platform == "cpu" and shard.data.nbytes >= HUGE_PAGE:
                total += collapse_range(shard.data.unsafe_buffer_pointer(), shard.data.nbytes)
    return total
