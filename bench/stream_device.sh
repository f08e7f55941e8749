#!/usr/bin/env bash
# The runner's GPU session in one go, for a machine with a GPU (run from the repository root):
# GPU tests, `qtool profile`, the flux transformer (reduced --scale) quantized to nf4, int8 and
# fp8, planned with a GPU budget that streams most blocks (one plan also with a host budget that
# sends groups to disk) and verified against the bf16 original, then bench_stream on the same data.
#
#   bench/stream_device.sh BIN_DIR OUT_DIR [SCALE] [two-gpus]
# BIN_DIR holds qtool, runner_gpu_test and bench_stream; logs and reports go to OUT_DIR. With
# `two-gpus`: the GPU tests, then nf4 planned `balanced` over GPUs 0 and 1 (streaming on both)
# and verified; no benchmark.
set -u
BIN=$(cd "$1" && pwd)
OUT=$2
SCALE=${3:-0.5}
MODE=${4:-one-gpu}
mkdir -p "$OUT"
export QTOOL_DATA_DIR=$PWD/sample_configs
Q=$BIN/qtool
WORK=${TMPDIR:-/tmp}/qtool-gpu-$$
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

# The CUDA runtime and cuBLAS are linked dynamically: find the toolkit's (or a Python wheel's).
for lib in $(ldd "$Q" | sed -n 's/^\s*\(lib[^ ]*\) => not found.*/\1/p'); do
  f=$(find /usr/local /usr/lib /opt -name "$lib" 2>/dev/null | head -1)
  [ -n "$f" ] && export LD_LIBRARY_PATH=$(dirname "$f"):${LD_LIBRARY_PATH:-}
done
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv | tee "$OUT/gpu.txt"
ldd "$Q" | grep -E "cublas|not found" | tee -a "$OUT/gpu.txt"

log "GPU tests"
t0=$(date +%s)
timeout 180 "$BIN/runner_gpu_test" > "$OUT/gpu_test.log" 2>&1
echo "runner_gpu_test exit $? in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
tail -4 "$OUT/gpu_test.log" | tee -a "$OUT/summary.txt"

log "profile"
"$Q" profile -o "$OUT/profile.json" --tmp-dir "$WORK" 2>&1 | tee "$OUT/profile.log" | tail -8

log "data: flux transformer at scale $SCALE"
t0=$(date +%s)
"$Q" synth --preset flux --scale "$SCALE" --components transformer -o "$WORK/bf16" -q
SCHEMES="nf4 int8 fp8_e4m3"
[ "$MODE" = two-gpus ] && SCHEMES=nf4
for s in $SCHEMES; do "$Q" quantize "$WORK/bf16" --scheme $s -o "$WORK/$s" -q 2>/dev/null; done
du -sh "$WORK"/* | tee -a "$OUT/summary.txt"
echo "data in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"

# The smallest GPU budget a plan fits in, from qtool plan's message.
smallest() {
  "$Q" plan "$1" --max-memory 0=1MiB,cpu=1TiB --tokens "$TOKENS" --device-profile "$OUT/profile.json" 2>&1 >/dev/null |
    sed -n 's/.*Smallest budget that fits: --max-memory 0=\([0-9]*\).*/\1/p'
}
TOKENS=1024
verify_one() {
  local s=$1 ck total lo cpu t0
  ck=$WORK/${s%-disk}
  total=$(du -sb "$ck" | cut -f1)
  lo=$(smallest "$ck")
  cpu=1TiB
  [ "$s" = nf4-disk ] && cpu=$((total / 2))
  log "verify $s: GPU budget $((lo + total / 5)) (smallest $lo + 20% of $total), cpu $cpu"
  "$Q" plan "$ck" --max-memory "0=$((lo + total / 5)),cpu=$cpu" --tokens $TOKENS \
    --device-profile "$OUT/profile.json" -o "$WORK/plan-$s.json" 2> "$OUT/plan-$s.txt"
  grep -E "^cuda:0|^cpu|^disk|offloaded|predicted step" "$OUT/plan-$s.txt" | tee -a "$OUT/summary.txt"
  t0=$(date +%s)
  timeout 150 "$Q" verify "$ck" --plan "$WORK/plan-$s.json" --reference "$WORK/bf16" --backend cuda --steps 5 --poison \
    --report "$OUT/verify-$s.json" --trace "$WORK/trace-$s.json" > "$OUT/verify-$s.log" 2>&1
  echo "verify $s exit $? in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
  grep -E "^\s+\[|trace:|verify" "$OUT/verify-$s.log" | tee -a "$OUT/summary.txt"
}

if [ "$MODE" = two-gpus ]; then
  ck=$WORK/nf4
  total=$(du -sb "$ck" | cut -f1)
  lo=$(smallest "$ck")
  b=$((lo + total / 5))
  log "verify nf4 on two GPUs: balanced, $b bytes per GPU"
  "$Q" plan "$ck" --device-map balanced --max-memory "0=$b,1=$b,cpu=1TiB" --tokens $TOKENS \
    --device-profile "$OUT/profile.json" -o "$WORK/plan-2gpu.json" 2> "$OUT/plan-2gpu.txt"
  grep -E "^cuda:|^cpu|offloaded|predicted step" "$OUT/plan-2gpu.txt" | tee -a "$OUT/summary.txt"
  timeout 200 "$Q" verify "$ck" --plan "$WORK/plan-2gpu.json" --reference "$WORK/bf16" --backend cuda --steps 5 \
    --poison --report "$OUT/verify-2gpu.json" --trace "$OUT/trace-2gpu.json" > "$OUT/verify-2gpu.log" 2>&1
  echo "verify 2gpu exit $?" | tee -a "$OUT/summary.txt"
  grep -E "^\s+\[|trace:|verify" "$OUT/verify-2gpu.log" | tee -a "$OUT/summary.txt"
  exit 0
fi

verify_one nf4
cp "$WORK/trace-nf4.json" "$OUT/trace-nf4.json"

log "bench_stream"
mkdir -p "$WORK/data"
ln -s "$WORK/bf16" "$WORK/data/bf16"; ln -s "$WORK/nf4" "$WORK/data/nf4"; ln -s "$WORK/int8" "$WORK/data/int8"
timeout 200 "$BIN/bench_stream" --data "$WORK/data" --work "$WORK/bench" --json "$OUT/bench_stream.json" \
  --models-dir "$PWD/sample_configs/models" > "$OUT/bench_stream.md" 2> "$OUT/bench_stream.log"
echo "bench_stream exit $?" | tee -a "$OUT/summary.txt"
cat "$OUT/bench_stream.md" | tee -a "$OUT/summary.txt"
tail -12 "$OUT/bench_stream.log"

verify_one int8
verify_one fp8_e4m3
verify_one nf4-disk
