#!/usr/bin/env bash
# The whole path on a small Flux-like pipeline: synthesize, inspect, quantize (nf4 transformer,
# int8 T5), plan with a GPU budget that streams most blocks, verify against the original.
# Uses the CUDA backend when a GPU is present, the CPU backend otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
Q=./build/apps/qtool/qtool
D=${QTOOL_DEMO_DIR:-/tmp/qtool-demo}
rm -rf "$D" && mkdir -p "$D"
$Q synth --preset flux --scale 0.15 -o "$D/flux"
$Q inspect "$D/flux"
$Q quantize "$D/flux" --config sample_configs/flux-nf4.json -o "$D/flux-nf4" --report "$D/quantize-report.json"
$Q plan "$D/flux-nf4" --device-map balanced --max-memory 0=660MiB,cpu=4GiB --tokens 64 -o "$D/plan.json"
$Q verify "$D/flux-nf4" --plan "$D/plan.json" --reference "$D/flux" --tokens 64 --report "$D/verify-report.json"
echo "demo: outputs in $D"
