#!/usr/bin/env bash
# The whole path on a small Flux-like pipeline: synthesize, inspect, quantize (nf4 transformer,
# int8 T5), plan with a GPU budget that streams most blocks, verify against the original: the
# pipeline runs as diffusers' FluxPipeline does on the CPU backend (CLIP and T5 encode the token
# ids, the transformer denoises for 2 steps with the flow-matching Euler scheduler, the VAE runs its
# linears), its final latents `images` are compared with the original pipeline's and written with
# the ids and latents it started from; a second verify replays those inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
Q=./build/apps/qtool/qtool
D=${QTOOL_DEMO_DIR:-/tmp/qtool-demo}
rm -rf "$D" && mkdir -p "$D"
$Q synth --preset flux --scale 0.15 -o "$D/flux"
$Q inspect "$D/flux"
$Q quantize "$D/flux" --config sample_configs/flux-nf4.json -o "$D/flux-nf4" --report "$D/quantize-report.json"
$Q plan "$D/flux-nf4" --device-map balanced --max-memory 0=676MiB,cpu=4GiB --tokens 64 -o "$D/plan.json"
$Q verify "$D/flux-nf4" --plan "$D/plan.json" --reference "$D/flux" --backend cpu --steps 2 --denoise-steps 2 \
  --outputs "$D/outputs.safetensors" --report "$D/verify-report.json"
$Q verify "$D/flux-nf4" --plan "$D/plan.json" --backend cpu --steps 1 --denoise-steps 2 \
  --inputs "$D/outputs.safetensors" --outputs "$D/replay.safetensors"
$Q inspect "$D/outputs.safetensors"
echo "demo: outputs in $D (outputs.safetensors: the final latents \`images\`, the encoders' and the last step's" \
  "outputs, and the token ids and latents the pipeline started from)"
