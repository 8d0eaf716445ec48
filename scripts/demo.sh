#!/usr/bin/env bash
# Set up flexinfer in .venv (first time only) and run the default model (SmolLM2-135M-Instruct,
# fetched once into ~/.cache/flexinfer). Extra arguments go to `flexinfer run`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/flexinfer ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet .
fi
if [ "$#" -eq 0 ]; then set -- --chat -p "Hello"; fi  # the instruct model answers as a chat
exec .venv/bin/flexinfer run "$@"
