#!/usr/bin/env bash
# Builds qtool and runs its tests: unit, end-to-end, and GPU tests (which skip themselves without
# a GPU). The interop suite against the Python reference packages is separate: see CONTRIBUTING.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
ctest --test-dir build -LE interop --output-on-failure -j "$(nproc)"
