#!/usr/bin/env bash
# Build (once) and install the pinned llama-cpp-python used as the test oracle.
#
# Why a build of our own: a default build enables llama.cpp's AMX kernels, which segfault in decode on
# these CPUs under KVM, and -march=native bakes in whatever the build host has. We build with
# GGML_NATIVE=OFF and exactly the x86 extensions /proc/cpuinfo reports, AMX off. The wheel is kept in a
# wheelhouse keyed by version and flags, so repeated runs (CI on the same machine) install in seconds.
set -euo pipefail
PY=${1:?usage: build_oracle.sh PYTHON}
VERSION=0.3.36
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
args="-DGGML_NATIVE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF"
args+=" -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2)"
args+=" -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16)"
args+=" -DGGML_AVX_VNNI=$(has avx_vnni)"
key=$(echo "$VERSION $args" | sha256sum | cut -c1-12)
house=${GGUFRUN_WHEELHOUSE:-$HOME/.cache/ggufrun/wheels}/llama-cpp-python-$key
if "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  exit 0
fi
if ! ls "$house"/llama_cpp_python-$VERSION-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION (oracle; about 5 minutes, once) with: $args"
  mkdir -p "$house.tmp"
  CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$PY" -m pip wheel --no-deps --no-binary llama-cpp-python -w "$house.tmp" "llama-cpp-python==$VERSION"
  rm -rf "$house" && mv "$house.tmp" "$house"
fi
"$PY" -m pip install --no-deps "$house"/llama_cpp_python-$VERSION-*.whl
# its runtime needs, without letting pip pick another numpy
"$PY" -m pip install "diskcache>=5.6.1" "typing-extensions>=4.5.0"
