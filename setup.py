"""The optional C++ extension spark.kernels._cpu (XLA FFI decode kernels, spark/kernels/cpu_kernels.cc).

Everything else is in pyproject.toml. The extension is `optional`: if it does not compile (no C++17
compiler, no jaxlib headers), setuptools prints one warning and the install goes on; spark.kernels
then runs its jnp references. The XLA FFI headers come from the jaxlib that pyproject.toml's
[build-system] pins (jaxlib/include, what jax.ffi.include_dir() returns), not from this repository.
The AVX-512 and AVX2 paths are compiled under target pragmas (simd_rows.inc, once per ISA) and
chosen at run time, so the build does not depend on the building machine's CPU (no -march=native).
"""

import importlib.util
import os

from setuptools import Extension, setup


def jaxlib_include() -> list[str]:
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or spec.origin is None:
        print("warning: jaxlib not importable at build time: spark.kernels will use its jnp fallback")
        return []
    return [os.path.join(os.path.dirname(spec.origin), "include")]


setup(ext_modules=[Extension(
    "spark.kernels._cpu", ["spark/kernels/cpu_kernels.cc"],
    depends=[f"spark/kernels/{f}.inc" for f in ("simd_rows", "simd_math", "ffn_kernels", "attention_kernel")],
    include_dirs=jaxlib_include(), language="c++",
    extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-Wno-sign-compare"], optional=True)])
