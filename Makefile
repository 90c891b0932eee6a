# make setup | test | demo | bench | lint  — setup is idempotent (stamp file keyed on pyproject.toml and
# constraints.txt: the exact tested versions; pyproject.toml holds the ranges users install from — and on
# setup.py and the C++ kernel source, so an edited kernel is rebuilt by the editable install).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache

.PHONY: setup test demo bench lint py312 clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt setup.py spark/kernels/cpu_kernels.cc spark/kernels/*.inc
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	@touch $(STAMP)

# two pytest workers: the suite is compile-bound and XLA compiles on one core (fresh cache: 419 s vs 625 s)
test: setup
	$(BIN)/python -m pytest -n 2 --dist worksteal tests

# the CPU demo: JAX_PLATFORMS=cpu keeps libtpu (installed by the test extra, used as a compiler by
# bench/aot_compile.py) from probing for a TPU; set JAX_PLATFORMS yourself to run it elsewhere
demo: setup
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(BIN)/python train.py --config configs/cpu_demo.py --workdir runs/demo
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(BIN)/python sample.py --workdir runs/demo --prompt 'def ' \
		--max_new_tokens 120

bench: setup
	$(BIN)/python bench/sparsity.py --json bench/results/sparsity.json
	$(BIN)/python bench/train_throughput.py --json bench/results/train_throughput.json
	$(BIN)/python bench/decode_layouts.py --json bench/results/decode_layouts.json
	$(BIN)/python bench/decode.py --rounds 5 --json bench/results/decode.json
	$(BIN)/python bench/speculative.py --rounds 5 --json bench/results/speculative.json \
		--png bench/results/speculative.png

lint: setup
	$(BIN)/ruff check spark decode tests bench configs *.py
	$(BIN)/shellcheck -x tpu_setup/*.sh .ci/run .ci/resolve_py312.sh

# pyproject.toml's ranges resolve for Python 3.12 (Colab's), with a wheel for every package (needs the index)
py312:
	.ci/resolve_py312.sh

clean:
	rm -rf $(VENV) .jax_cache
