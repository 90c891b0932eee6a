"""Test setup: 8 fake CPU devices, the persistent compilation cache and fast compiles, before any JAX use."""

import os
import shutil

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the suite is CPU-only; libtpu (test extra) is a compiler here
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # both pytest workers may load it for the AOT test
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The suite is compile-bound: LLVM at -O0 compiles ~30% faster, and XLA:CPU's older elemental
# fusion emitters another ~25% (a speculative-decoding loop: 8.0 -> 6.0 s, interleaved A/B); XLA's
# own HLO passes (fusion, layout, the numerics they decide) still run. Subprocesses inherit it.
# The statistical end-to-end decoder tests are execution-bound instead: they compile through
# tests/optimized_jit.py, which sets the optimization level back for their calls alone.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
_cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


import pytest  # noqa: E402

from spark import kernels  # noqa: E402


def _built_once(tmp_path_factory, worker_id, name, build):
    from filelock import FileLock

    if worker_id == "master":  # no xdist: a directory of this session's own
        path = tmp_path_factory.mktemp(name)
        build(str(path))
        return str(path)
    path = tmp_path_factory.getbasetemp().parent / name  # the run's directory, above each worker's
    with FileLock(str(path) + ".lock"):
        if not (path / ".built").exists():
            shutil.rmtree(path, ignore_errors=True)  # what a failed build left
            path.mkdir()
            build(str(path))
            (path / ".built").touch()
    return str(path)


@pytest.fixture(scope="session")
def built_once(tmp_path_factory, worker_id):
    """built_once(name, build) -> a directory that `build(path)` fills once per test run, shared
    by the pytest-xdist workers (the first builds it under a file lock, the others reuse it): a
    module fixture would otherwise be built again by every worker that runs one of its tests."""
    return lambda name, build: _built_once(tmp_path_factory, worker_id, name, build)


@pytest.fixture(scope="session")
def sample_cli():
    """sample.py (a script, not a package module) imported once, to call its main() in process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "sample_cli", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def data_dir(built_once):
    """The python_stdlib tfds dataset, prepared once per test run."""
    from spark.data import stdlib

    return built_once("tfds", stdlib.prepare)


# Files whose tests run longest (end-to-end runs in subprocesses, the AOT compile, the notebook),
# slowest first: run first, so that with `-n 2 --dist worksteal` the two workers end together
# instead of one finishing a long test alone (the measured imbalance was ~60 s of a 640 s run).
FIRST = ("test_preemption.py", "test_notebook.py", "test_pod.py", "test_reasoning_bench.py", "test_gcs.py",
         "test_train.py", "test_tasks.py", "test_hf_parity.py", "test_checkpoint.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))


@pytest.fixture(params=list(kernels.ISAS))
def isa(request, monkeypatch):
    """Each ISA path of spark/kernels the CPU has (SPARK_CPU_KERNELS_ISA), the others skipped."""
    if kernels.enabled() and kernels.ISAS[request.param] > kernels.ISAS[kernels.cpu_isa()]:
        pytest.skip(f"this CPU has no {request.param}")
    monkeypatch.setenv("SPARK_CPU_KERNELS_ISA", request.param)
    assert kernels.isa() == kernels.ISAS[request.param]
    return request.param
