#!/usr/bin/env bash
# Set up flexinfer in .venv (first time only) and show what it is for: the default model
# (SmolLM2-135M-Instruct, fetched once into ~/.cache/flexinfer) answering one prompt in RAM and
# again under a memory budget too small for it (scripts/demo.py). With arguments, runs
# `flexinfer run ARGS` instead, e.g. `bash scripts/demo.sh --chat`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/flexinfer ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet .
fi
if [ "$#" -eq 0 ]; then exec .venv/bin/python scripts/demo.py; fi
exec .venv/bin/flexinfer run "$@"
