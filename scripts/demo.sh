#!/usr/bin/env bash
# The whole path on a small Flux-like pipeline: synthesize, inspect, quantize (nf4 transformer,
# int8 T5), plan with a GPU budget that streams most blocks, verify against the original: the
# transformer runs its real forward on the CPU backend (the other components their linears), its
# output `transformer.sample` is compared with the original's and written with its inputs; a second
# verify replays those inputs.
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
$Q verify "$D/flux-nf4" --plan "$D/plan.json" --reference "$D/flux" --backend cpu --steps 2 \
  --outputs "$D/outputs.safetensors" --report "$D/verify-report.json"
$Q verify "$D/flux-nf4" --plan "$D/plan.json" --backend cpu --steps 1 \
  --inputs "$D/outputs.safetensors" --outputs "$D/replay.safetensors"
$Q inspect "$D/outputs.safetensors"
echo "demo: outputs in $D (outputs.safetensors: transformer.sample and the inputs it ran on)"
