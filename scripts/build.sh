#!/usr/bin/env bash
# Configures and builds qtool in build/ (CUDA backend when the toolkit is at /usr/local/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo ${QTOOL_CMAKE_ARGS:-} >/dev/null
cmake --build build -j "$(nproc)"
