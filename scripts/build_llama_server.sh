#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (the peer of `flexinfer serve`, issue 12) from the llama.cpp sources
# vendored in the llama-cpp-python 0.3.36 sdist, so the peer is the same llama.cpp as the oracle.
#
#   bash scripts/build_llama_server.sh [OUT_DIR]      # default /work/peers; ~10-20 min on 2 cores
#
# Result: OUT_DIR/llama-server (statically linked ggml), OUT_DIR/build.log.
# Flags: those DEVELOPERS.md lists for these CPUs (AVX2/AVX512, no AMX: AMX crashes on batches of 2+).
# pip download fetches the sdist (--no-binary for llama-cpp-python only: with :all: pip would also
# build its build dependencies, cmake included, from source just to read the metadata).
set -euo pipefail
OUT=${1:-/work/peers}
PY=${PYTHON:-/work/main/.venv/bin/python}
VERSION=0.3.36
JOBS=${JOBS:-2}
mkdir -p "$OUT/src"
cd "$OUT/src"
if [ ! -f "llama_cpp_python-$VERSION.tar.gz" ]; then
    "$PY" -m pip download --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -d .
fi
rm -rf "llama_cpp_python-$VERSION"
tar xzf "llama_cpp_python-$VERSION.tar.gz"
SRC="$OUT/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
test -f "$SRC/CMakeLists.txt" || { echo "build_llama_server: no llama.cpp sources in $SRC" >&2; exit 2; }
cmake -S "$SRC" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
cmake --build "$OUT/build" --target llama-server -j "$JOBS"
cp "$OUT/build/bin/llama-server" "$OUT/llama-server"
"$OUT/llama-server" --version
echo "built $OUT/llama-server"
