#!/usr/bin/env bash
# The llama.cpp peer of `lape-awq bench serve` / `bench engine`: builds llama.cpp's own tools (llama-server,
# llama-bench, llama-batched-bench) from the llama.cpp source that PyPI's llama-cpp-python sdist vendors
# (PyPI is the only package index this project may assume). llama-cpp-python's own Python server answers
# one request at a time; llama-server has slots and continuous batching, what a llama.cpp user would serve
# with. About 10-15 minutes on 2 cores. Installs into $LAPE_AWQ_HOME/llama.cpp/bin (default
# ~/.cache/lape-awq/llama.cpp/bin), where the benchmarks look for it.
#
#   bench/install_llama_cpp.sh [VERSION]        # default: the version pinned below
set -euo pipefail
VERSION="${1:-0.3.36}"
HOME_DIR="${LAPE_AWQ_HOME:-$HOME/.cache/lape-awq}"
ROOT="$HOME_DIR/llama.cpp"
SRC="$ROOT/llama_cpp_python-$VERSION/vendor/llama.cpp"
PYTHON="${PYTHON:-python3}"
mkdir -p "$ROOT"
if [ ! -d "$SRC" ]; then
  echo "[1/3] llama-cpp-python $VERSION source from PyPI"
  "$PYTHON" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$ROOT"
  tar xzf "$ROOT/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT"
fi
command -v cmake >/dev/null || "$PYTHON" -m pip install -q cmake
# llama.cpp's AMX path crashes at the first decode on the AMX CPUs this project runs on; AVX-512 stays.
NO_AMX="-mno-amx-int8 -mno-amx-tile -mno-amx-bf16"
echo "[2/3] configure (native CPU flags, AMX off, no web UI download, no curl/openssl)"
cmake -S "$SRC" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >"$ROOT/configure.log"
echo "[3/3] build llama-server llama-bench llama-batched-bench ($(nproc) jobs; log: $ROOT/build.log)"
cmake --build "$ROOT/build" -j "$(nproc)" --target llama-server llama-bench llama-batched-bench \
  >"$ROOT/build.log"
mkdir -p "$ROOT/bin"
for tool in llama-server llama-bench llama-batched-bench; do
  cp "$ROOT/build/bin/$tool" "$ROOT/bin/$tool"
done
echo "llama.cpp $VERSION tools in $ROOT/bin"
