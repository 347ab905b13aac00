#!/bin/sh
# Build llama.cpp's `llama-server` from the llama-cpp-python source distribution on PyPI (its
# vendored llama.cpp), outside this repository, for bench/bench_chat.py's side-by-side run.
#   sh bench/build-llama-server.sh [DIR]      (default: ../llama-build next to the repository)
# Takes ~15-20 minutes on 2 cores. Needs cmake and a C++ compiler.
#
# The binary is tuned for the CPU it is built on (-march=native) but never uses AMX: a virtual CPU
# may advertise AMX in CPUID while the hypervisor does not enable its tile state, and then
# llama.cpp's AMX kernels die with SIGILL. GGML_NATIVE=ON would add -march=native after our flags
# (re-enabling AMX), so it is off and the architecture flags are ours alone; ggml reads the
# instruction sets from the compiler's predefined macros (__AVX2__, __AVX512F__, ...).
set -eu
main() {
    here=$(cd "$(dirname "$0")/.." && pwd)
    dir=${1:-"$here/../llama-build"}
    mkdir -p "$dir"
    cd "$dir"
    if [ -x bin/llama-server ] && bin/llama-server --version >/dev/null 2>&1; then
        echo "llama-server already built: $dir/bin/llama-server"
        return 0
    fi
    python3 -m pip download --no-deps --no-binary :all: --dest . "llama-cpp-python>=0.3.7"
    for sdist in llama_cpp_python-*.tar.gz; do :; done  # the last in glob order, the newest
    tar xzf "$sdist"
    src="$dir/${sdist%.tar.gz}/vendor/llama.cpp"
    arch="-march=native"
    for flag in -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -mno-amx-fp16 -mno-amx-complex; do
        # Older compilers do not know every AMX flag (and then cannot emit those instructions).
        if echo 'int main(void){return 0;}' | cc -x c -Werror "$flag" -o /dev/null - 2>/dev/null; then
            arch="$arch $flag"
        fi
    done
    cmake -S "$src" -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DGGML_NATIVE=OFF -DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF \
        -DGGML_SSE42=OFF -DGGML_BMI2=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
        -DCMAKE_C_FLAGS="$arch" -DCMAKE_CXX_FLAGS="$arch" \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
    cmake --build build --target llama-server -j "$(nproc)"
    mkdir -p bin
    cp build/bin/llama-server bin/
    # Refuse to hand back a binary that cannot start here (SIGILL shows up as exit status 132).
    if ! bin/llama-server --version; then
        echo "built bin/llama-server does not run on this machine" >&2
        return 1
    fi
    echo "built $dir/bin/llama-server"
}
main "$@"
