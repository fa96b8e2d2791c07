#!/usr/bin/env bash
# Build llama.cpp's command-line tools (llama-quantize, llama-imatrix, llama-perplexity) from the llama.cpp that the
# llama-cpp-python source distribution vendors: a registry package, so this works where only PyPI is reachable.
#
#   scripts/build_llama_cpp.sh [DEST]        (DEST defaults to build/llama.cpp; the tools land in DEST/bin)
#
# Why these flags: GGML_NATIVE=OFF with the AVX2/AVX-512 switches named explicitly, and the AMX kernels off. On CPUs
# that report AMX but do not enable it for user processes (the 2-core CI machines are such), a native build dies with
# SIGILL (exit 132) in llama-imatrix and llama-perplexity. About 6 minutes on 2 cores. LLAMA_CPP_PYTHON_VERSION pins
# the package version (default: the one the benchmark records were made with).
set -euo pipefail
DEST="${1:-build/llama.cpp}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-$(nproc)}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
if [ -x "$DEST/bin/llama-perplexity" ] && [ -x "$DEST/bin/llama-quantize" ] && [ -x "$DEST/bin/llama-imatrix" ]; then
  echo "llama.cpp tools already built in $DEST/bin"
  exit 0
fi
WORK="$DEST/src"
mkdir -p "$WORK"
if [ ! -d "$WORK/llama_cpp_python-$VERSION" ]; then
  python -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$WORK"
  tar -xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
fi
SOURCE="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SOURCE" -B "$DEST/cmake" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON
cmake --build "$DEST/cmake" --config Release -j "$JOBS" --target llama-quantize llama-imatrix llama-perplexity
mkdir -p "$DEST/bin"
for tool in llama-quantize llama-imatrix llama-perplexity; do
  cp "$DEST/cmake/bin/$tool" "$DEST/bin/$tool"
done
"$DEST/bin/llama-quantize" --help >/dev/null 2>&1 || true
echo "llama.cpp tools built in $DEST/bin (llama-cpp-python $VERSION)"
