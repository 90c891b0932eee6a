"""`jit`: jax.jit with XLA's backend optimizations back on, for the tests whose time is execution,
not compilation — the statistical end-to-end decoders that run 10^4–10^5 rows in one call.
tests/conftest.py compiles everything at LLVM -O0 because the suite as a whole is compile-bound;
`compiler_options` sets the level back for one compile (it overrides XLA_FLAGS' debug options).
Measured here: test_speculative.py's end-to-end [separate] case 25 s -> 7-9 s."""

import jax

OPTIONS = {"xla_backend_optimization_level": 3}


def jit(fn, **kw):
    return jax.jit(fn, compiler_options=OPTIONS, **kw)
