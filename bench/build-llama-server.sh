#!/bin/sh
# Build llama.cpp's `llama-server` from the llama-cpp-python source distribution on PyPI (its
# vendored llama.cpp), outside this repository, for bench/bench_chat.py's side-by-side run.
#   sh bench/build-llama-server.sh [DIR]      (default: ../llama-build next to the repository)
# Takes ~15-20 minutes on 2 cores. Needs cmake and a C++ compiler.
set -eu
main() {
    here=$(cd "$(dirname "$0")/.." && pwd)
    dir=${1:-"$here/../llama-build"}
    mkdir -p "$dir"
    cd "$dir"
    if [ -x bin/llama-server ]; then
        echo "llama-server already built: $dir/bin/llama-server"
        return 0
    fi
    python3 -m pip download --no-deps --no-binary :all: --dest . "llama-cpp-python>=0.3.7"
    sdist=$(ls llama_cpp_python-*.tar.gz | tail -n 1)
    tar xzf "$sdist"
    src="$dir/${sdist%.tar.gz}/vendor/llama.cpp"
    cmake -S "$src" -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
    cmake --build build --target llama-server -j "$(nproc)"
    mkdir -p bin
    cp build/bin/llama-server bin/
    echo "built $dir/bin/llama-server"
}
main "$@"
