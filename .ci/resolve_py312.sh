#!/usr/bin/env bash
# Show that pyproject.toml's dependency ranges resolve for Python 3.12 (Colab's) on x86-64 Linux,
# from this Python 3.11 machine: uv resolves the ranges for 3.12 (Requires-Python markers included),
# then pip checks that every pinned result has a cp312/py3 wheel (promise, a pure-Python sdist that
# tensorflow-datasets needs, is the one exception). Needs the package index. Usage: .ci/resolve_py312.sh
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q uv
python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
  > "$tmp/requirements.in"
"$tmp/venv/bin/uv" pip compile -q --python-version 3.12 --no-header --no-annotate "$tmp/requirements.in" \
  -o "$tmp/lock.txt"
grep -E '^(jax|jaxlib|flax|optax|orbax-checkpoint|numpy|tensorflow-datasets|grain)==' "$tmp/lock.txt"
grep -v '^promise==' "$tmp/lock.txt" > "$tmp/wheels.txt"
platforms=()
for v in 17 24 26 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${v}_x86_64"); done
"$tmp/venv/bin/pip" install -q --dry-run --ignore-installed --ignore-requires-python --no-deps --python-version 3.12 \
  "${platforms[@]}" --only-binary=:all: --target "$tmp/target" -r "$tmp/wheels.txt"
echo "python 3.12: $(wc -l < "$tmp/lock.txt") packages resolve; every one but promise has a wheel"
