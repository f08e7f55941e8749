#!/usr/bin/env bash
# The GPU session in one command, on the device machine (from the repository root): builds qtool
# with the CUDA backend, runs `ctest -L gpu`, then the benchmarks, each logged under $OUT (the
# device runner's output folder; at most 8 files come back, so everything goes into a few logs).
#
#   bash scripts/gpu_check.sh [STAGE...]      STAGE: build tests bench full cudnn attn optimes
#                                             optimes-full
#                                             peers-flux peers-llama pipeline two-gpus
#                                             (default: build tests bench)
#
#   build:  configure and build build-gpu/ (kept between runs on a warm machine: a later call that
#           names only `tests` or `bench` reuses it; a call is limited to 10 minutes).
#   tests:  ctest -L gpu (the CUDA ops, the CUDA backend, the forwards against the CPU backend's).
#   bench:  bench_forward on the flux transformer at --scale 0.25 and a Llama at --scale 0.125 (bf16
#           and nf4, 4096 tokens, streamed against all-resident).
#   full:   bench_forward on the full-size flux transformer (--scale 1, nf4 at a 2.5 GiB budget;
#           synthesizing and quantizing 24 GB is most of it) and bench_stream (--scale 0.5): name it
#           alone in a call.
#   cudnn:  the cuDNN attention path: runner_cudnn_graph_test, the CUDA ops' attention cases with
#           QTOOL_TEST_REQUIRE_CUDNN=1 (a missing or refusing cuDNN fails instead of skipping), and
#           the forwards against the CPU backend with QTOOL_ATTENTION=cudnn (QTOOL_CUDNN_DEBUG=1:
#           each plan built and each shape refused is in the log).
#   attn:   bench_attention (qtool's kernels and cuDNN's) and bench/attention_torch.py (torch's SDPA
#           on the same shapes, and the ratios).
#   optimes: bench_forward on the flux transformer at --scale 0.25, bf16, with QTOOL_CUDA_OP_TIMES=1:
#           each run's GPU time per op (norm, elementwise, rope, linear, attention, ...), what bounds
#           a step.
#   optimes-full: the same on the full-size transformer, bf16 and nf4 with every weight resident,
#           linear through cuBLASLt and through cuBLAS (QTOOL_GEMM; QTOOL_OPTIMES_GEMMS=cublaslt:
#           the first only): optimes_full_*.log.
#   peers-flux: issue 12's comparison: the full-size flux transformer synthesized (bf16) and
#           quantized (nf4), then bench/forward_peers.py --qtool-bench (qtool's bench_forward first,
#           before the Python process holds a CUDA context; then diffusers bf16 and bitsandbytes nf4
#           resident and group offloading): needs diffusers and bitsandbytes (carry their wheels,
#           bench/README.md). Name it alone in a call.
#           QTOOL_PEERS_QTOOL_ONLY=1: qtool's set-up and trace only (no Python peers).
#   peers-llama: the same for the Llama-3-8B shape at 4096 tokens of prefill (qtool nf4 streamed
#           with a quarter of the weights resident, and resident; transformers bf16 and
#           bitsandbytes nf4 resident). Name it alone in a call.
#   pipeline: issue 13's run: the full-size FluxPipeline synthesized, quantized with
#           sample_configs/flux-nf4.json, planned at 12, 16 and 24 GiB (the GPU's built-in profile)
#           and verified with --backend cuda (4 denoising steps): name it alone in a call.
#   two-gpus: issue 14's run, on a machine with two GPUs (nvidia-h200-x2): `qtool profile` (its
#           peer copy bandwidth), ctest's gpu_verify_two_gpus, then the full-size flux transformer
#           (nf4) planned balanced at 2.5 GiB per GPU (each GPU streams at least half its blocks)
#           and the Llama-3-8B shape (bf16) balanced with everything resident, each verified with
#           --backend cuda and its output compared with the one-GPU plan's: two_gpus.log. Name it
#           alone in a call.
#
# Build dependencies (CLI11, nlohmann-json, doctest: header-only Debian packages) are taken from
# the system when present, else from .deps/*.deb carried with the tree (nothing can be fetched
# there), unpacked into a prefix under the build folder, never into /. Prepare them here once:
#   mkdir -p .deps   (.gitignore ignores it)
#   (cd .deps && apt-get download libcli11-dev nlohmann-json3-dev doctest-dev)
# and name .deps in the run's carry list.
#
# Files written to $OUT: build.log, gpu_tests.log, bench_forward.log (with its JSON appended),
# bench_stream.log (full), cudnn.log (cudnn), attention.log (attn), peers_FAMILY.log and .json
# (peers-flux, peers-llama), pipeline.log, plan-*.svg and
# pipeline_peer.json (pipeline), summary.txt. The exit status: 3 when the build fails, else that of the
# GPU tests (0 when they did not run).
set -u
cd "$(dirname "$0")/.."
STAGES=${*:-build tests bench}
has() { [[ " $STAGES " == *" $1 "* ]]; }
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
BUILD=${QTOOL_GPU_BUILD:-build-gpu}
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
say() { echo "== $*" | tee -a "$SUMMARY"; }
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

say "gpu_check ($STAGES) on $(hostname), $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current \
  --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
ls /usr/local/cuda/lib64/libcudnn.so.9 /usr/lib/x86_64-linux-gnu/libcudnn.so.9 2>/dev/null |
  sed 's/^/cuDNN library (attention_cudnn.cpp loads the toolkit'"'"'s first): /' >>"$SUMMARY"

# --- Build. --------------------------------------------------------------------------------------
if has build; then
PREFIX_ARGS=()
if ! [ -f /usr/include/doctest/doctest.h ] || ! [ -d /usr/include/CLI ] || ! [ -d /usr/include/nlohmann ]; then
  if ls .deps/*.deb >/dev/null 2>&1; then
    PREFIX=$PWD/$BUILD-deps
    mkdir -p "$PREFIX"
    for f in .deps/*.deb; do dpkg -x "$f" "$PREFIX"; done
    PREFIX_ARGS=(-DCMAKE_PREFIX_PATH="$PREFIX/usr" -DCMAKE_CXX_FLAGS="-isystem $PREFIX/usr/include")
    say "build dependencies from .deps ($(ls .deps/*.deb | wc -l) packages)"
  else
    say "missing CLI11 / nlohmann-json / doctest headers and no .deps/*.deb: see this script's header"
    exit 3
  fi
fi
t0=$(date +%s)
{
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CUDA_ARCHITECTURES=90 \
    "${PREFIX_ARGS[@]}" &&
    cmake --build "$BUILD" -j "$(nproc)" --target qtool runner_gpu_test runner_cuda_ops_test \
      runner_cuda_driver_test runner_cudnn_graph_test bench_forward bench_stream bench_attention
} >"$OUT/build.log" 2>&1
rc=$?
say "build exit $rc in $(($(date +%s) - t0)) s"
if [ $rc -ne 0 ]; then
  tail -30 "$OUT/build.log" | tee -a "$SUMMARY"
  exit 3
fi
grep -E "CUDA backend" "$OUT/build.log" | head -2 >>"$SUMMARY"
fi

# --- GPU tests (verbose: the measured CUDA-vs-CPU forward errors are printed). ------------------
test_rc=0
if has tests; then
  t0=$(date +%s)
  timeout 560 ctest --test-dir "$BUILD" -L gpu -V --timeout 480 >"$OUT/gpu_tests.log" 2>&1
  test_rc=$?
  say "ctest -L gpu exit $test_rc in $(($(date +%s) - t0)) s"
  grep -E "tests passed|tests failed|Failed|Not Run|Skipped|Passed" "$OUT/gpu_tests.log" | tail -12 |
    tee -a "$SUMMARY"
  grep -E "rel RMS" "$OUT/gpu_tests.log" | sed 's/^.*MESSAGE: //' | tee -a "$SUMMARY"
fi

# --- Benchmarks. ---------------------------------------------------------------------------------
export QTOOL_DATA_DIR=$PWD/sample_configs
bench_forward() {  # label, seconds, arguments...
  local label=$1 limit=$2
  shift 2
  say "bench_forward $label: $*"
  local t0
  t0=$(date +%s)
  timeout "$limit" "$BUILD/bench/bench_forward" --json "$OUT/bench_forward_$label.json" "$@" \
    >>"$OUT/bench_forward.log" 2>&1
  echo "exit $? in $(($(date +%s) - t0)) s" | tee -a "$SUMMARY"
  [ -f "$OUT/bench_forward_$label.json" ] && {
    echo "--- $label json" >>"$OUT/bench_forward.log"
    cat "$OUT/bench_forward_$label.json" >>"$OUT/bench_forward.log"
    rm -f "$OUT/bench_forward_$label.json"
  }
}
: >"$OUT/bench_forward.log"
if has bench; then
  bench_forward flux-small 280 --preset flux --scale 0.25 --tokens 4096 --steps 5
  bench_forward llama-small 250 --preset llama --scale 0.125 --tokens 4096 --steps 5
fi
if has full; then
  bench_forward flux-full 400 --preset flux --scale 1 --tokens 4096 --steps 4 --schemes nf4 --budget 2.5GiB
  say "bench_stream --scale 0.5"
  timeout 150 "$BUILD/bench/bench_stream" --scale 0.5 >"$OUT/bench_stream.log" 2>&1
  echo "exit $?" | tee -a "$SUMMARY"
  grep -E "^\|" "$OUT/bench_stream.log" >>"$SUMMARY"
fi
grep -E "^\|" "$OUT/bench_forward.log" | tee -a "$SUMMARY"

# --- cuDNN's attention. --------------------------------------------------------------------------
if has cudnn; then
  t0=$(date +%s)
  {
    QTOOL_CUDNN_DEBUG=1 "$BUILD/tests/runner/runner_cudnn_graph_test"
    echo "runner_cudnn_graph_test exit $?"
    QTOOL_CUDNN_DEBUG=1 QTOOL_TEST_REQUIRE_CUDNN=1 "$BUILD/tests/runner/runner_cuda_ops_test" \
      -tc='*cuDNN*,*which attention*,*tensor-core*,*timings*'
    echo "runner_cuda_ops_test (attention) exit $?"
    QTOOL_ATTENTION=cudnn QTOOL_CUDNN_DEBUG=1 timeout 400 "$BUILD/tests/runner/runner_cuda_driver_test"
    echo "runner_cuda_driver_test with QTOOL_ATTENTION=cudnn exit $?"
  } >"$OUT/cudnn.log" 2>&1
  say "cudnn stage in $(($(date +%s) - t0)) s"
  grep -E "exit [0-9]+$|test cases:|plan built|refused|loaded from" "$OUT/cudnn.log" | head -20 | tee -a "$SUMMARY"
fi

# --- Attention against torch's SDPA. -------------------------------------------------------------
if has attn; then
  {
    QTOOL_CUDNN_DEBUG=1 timeout 200 "$BUILD/bench/bench_attention" --json "$OUT/attention_qtool.json"
    echo "bench_attention exit $?"
    timeout 200 python3 bench/attention_torch.py --qtool-json "$OUT/attention_qtool.json"
    echo "attention_torch.py exit $?"
  } >"$OUT/attention.log" 2>&1
  rm -f "$OUT/attention_qtool.json"
  say "attention"
  grep -E "TFLOP|ratio|exit" "$OUT/attention.log" | tail -24 | tee -a "$SUMMARY"
fi

if has optimes; then
  say "bench_forward with QTOOL_CUDA_OP_TIMES=1 (flux --scale 0.25, bf16)"
  QTOOL_CUDA_OP_TIMES=1 timeout 300 "$BUILD/bench/bench_forward" --preset flux --scale 0.25 --tokens 4096 \
    --steps 3 --schemes bf16 >"$OUT/optimes.log" 2>&1
  echo "exit $?" | tee -a "$SUMMARY"
  grep -E "CUDA op times|^  [a-z_]+ +[0-9]+ calls" "$OUT/optimes.log" | tail -16 | tee -a "$SUMMARY"
fi

if has optimes-full; then
  # The full-size transformer, every weight resident (a 70 GiB budget): per-op GPU times of the
  # bf16 and nf4 steps, linear through cuBLASLt (bias and GELU in the epilogue) and through cuBLAS.
  D=/tmp/qtool-optimes
  rm -rf "$D" /tmp/qtool-peers /tmp/qtool-pipeline
  "$BUILD/apps/qtool/qtool" synth --preset flux --scale 1 --components transformer --seed 1 -o "$D/bf16" -q &&
    "$BUILD/apps/qtool/qtool" quantize "$D/bf16" -o "$D/nf4" --scheme nf4 -q
  for gemm in ${QTOOL_OPTIMES_GEMMS:-cublaslt cublas}; do
    say "bench_forward with QTOOL_CUDA_OP_TIMES=1 QTOOL_GEMM=$gemm (flux --scale 1, bf16 and nf4, resident)"
    QTOOL_GEMM=$gemm QTOOL_CUDA_OP_TIMES=1 timeout 240 "$BUILD/bench/bench_forward" --data "$D" --tokens 4096 \
      --steps 6 --schemes bf16,nf4 --budget 70GiB >"$OUT/optimes_full_$gemm.log" 2>&1
    echo "exit $?" | tee -a "$SUMMARY"
    grep -E "FluxTransformer2DModel forward" "$OUT/optimes_full_$gemm.log" | tee -a "$SUMMARY"
  done
  rm -rf "$D"
fi

# --- Issue 12: qtool against the frameworks on the same files, one family per call. ------------
peers() {  # family: flux or llama
  local fam=$1 Q=$BUILD/apps/qtool/qtool D=/tmp/qtool-peers
  rm -rf /tmp/qtool-pipeline "$D"  # the disk holds one full-size model family at a time
  {
    set -x
    if [ "$fam" = flux ]; then
      "$Q" synth --preset flux --scale 1 --components transformer --seed 1 -o "$D/bf16" -q
    else
      "$Q" synth --preset llama --scale 1 --seed 1 -o "$D/bf16" -q
    fi
    "$Q" quantize "$D/bf16" -o "$D/nf4" --scheme nf4 -q
    if [ -z "${QTOOL_PEERS_QTOOL_ONLY:-}" ]; then
      timeout 500 python3 bench/forward_peers.py "--$fam" "$D/bf16" "--$fam-nf4" "$D/nf4" \
        --qtool-bench "$BUILD/bench/bench_forward" --json "$OUT/peers_$fam.json"
      echo "forward_peers ($fam) exit $?"
    fi
    if [ "$fam" = flux ]; then
      # Set-up from process start to the end of the first step, nf4 at 2.5 GiB, with the GPU's
      # built-in profile (as a user's job: nothing measured first), against the group-offloading
      # set-up above.
      prof=sample_configs/devices/h100-pcie-gen5.json
      nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && prof=sample_configs/devices/h200.json
      timeout 120 "$BUILD/bench/bench_forward" --first-step "$prof" --data "$D" --schemes nf4 --budget 2.5GiB
      echo "bench_forward --first-step exit $?"
      # A trace of the streamed nf4 step at 2.5 GiB: the copy of group k+1 under the compute of k.
      "$Q" plan "$D/nf4" --max-memory 0=2.5GiB,cpu=100GiB --device-profile "$prof" -o "$D/plan.json" -q
      timeout 200 "$Q" verify "$D/nf4" --plan "$D/plan.json" --backend cuda --steps 2 --trace "$D/trace.json"
      echo "verify --trace exit $?"
    fi
    set +x
  } >"$OUT/peers_$fam.log" 2>&1
  say "peers $fam"
  grep -E "^\||exit [0-9]+$|crashed|^first step|trace: |\[(pass|FAIL)\]" "$OUT/peers_$fam.log" | cut -c1-300 | tee -a "$SUMMARY"
}
has peers-flux && peers flux
has peers-llama && peers llama

# --- Issue 13: the full-size pipeline at 12, 16 and 24 GiB. ---------------------------------------
if has pipeline; then
  Q=$BUILD/apps/qtool/qtool
  P=${QTOOL_PIPELINE_DIR:-/tmp/qtool-pipeline}
  {
    set -x
    [ -d "$P/flux" ] || "$Q" synth --preset flux --scale 1 --seed 1 -o "$P/flux" -q
    [ -d "$P/flux-nf4" ] || "$Q" quantize "$P/flux" --config sample_configs/flux-nf4.json -o "$P/flux-nf4" -q
    for gib in 12 16 24; do
      "$Q" plan "$P/flux-nf4" --max-memory "0=${gib}GiB" -o "$P/plan-$gib.json" --svg "$OUT/plan-$gib.svg"
      timeout 150 "$Q" verify "$P/flux-nf4" --plan "$P/plan-$gib.json" --backend cuda --steps 2 \
        --denoise-steps 4 --report "$P/verify-$gib.json"
      echo "verify at $gib GiB exit $?"
      # Per phase: predicted and measured load, step and peak (the report's plan_phases).
      python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1])).get("plan_phases"), indent=1))' \
        "$P/verify-$gib.json"
    done
    # The peer: diffusers' FluxPipeline bf16 with enable_model_cpu_offload (needs diffusers: carry
    # its wheel, bench/README.md).
    if python3 -c "import diffusers" 2>/dev/null; then
      timeout 240 python3 bench/forward_peers.py --pipeline "$P/flux" --cases pipeline_model_cpu_offload \
        --denoise-steps 4 --json "$OUT/pipeline_peer.json"
      echo "forward_peers --pipeline exit $?"
    else
      echo "diffusers is not installed: no peer"
    fi
    set +x
  } >"$OUT/pipeline.log" 2>&1
  say "pipeline"
  grep -E "verify at|\[(pass|FAIL)\]|predicted job" "$OUT/pipeline.log" | cut -c1-300 | tee -a "$SUMMARY"
fi
# --- Issue 14: two GPUs, the real forward balanced across both. -----------------------------------
if has two-gpus; then
  Q=$BUILD/apps/qtool/qtool
  D=/tmp/qtool-two
  rm -rf /tmp/qtool-peers /tmp/qtool-pipeline "$D"
  {
    set -x
    nvidia-smi -L
    "$Q" profile -o "$D/profile.json"
    (cd "$BUILD" && ctest -R gpu_verify_two_gpus --output-on-failure)
    "$Q" synth --preset flux --scale 1 --components transformer --seed 1 -o "$D/flux" -q
    "$Q" quantize "$D/flux" -o "$D/flux-nf4" --scheme nf4 -q
    rm -rf "$D/flux"
    "$Q" synth --preset llama --scale 1 --seed 1 -o "$D/llama" -q
    # one family at a time: NAME CKPT TWO-GPU-BUDGET ONE-GPU-BUDGET
    two() {
      "$Q" plan "$2" --device-profile "$D/profile.json" --device-map balanced --max-memory "$3,cpu=100GiB" \
        -o "$D/$1-2.json"
      "$Q" plan "$2" --device-profile "$D/profile.json" --max-memory "$4,cpu=100GiB" -o "$D/$1-1.json" -q
      python3 - "$D/$1-2.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
per = {}
for s in p["schedule"]:
    m = s["modules"][0]
    if any(m.startswith(b) for b in ("transformer_blocks.", "single_transformer_blocks.", "model.layers.")):
        n = per.setdefault(s["gpu"], [0, 0])
        n[0] += 1
        n[1] += s["group"] >= 0
for gpu, (blocks, streamed) in sorted(per.items()):
    print(f"plan: gpu {gpu}: {streamed} of {blocks} blocks streamed")
PY
      for n in 2 1; do
        timeout 300 "$Q" verify "$2" --plan "$D/$1-$n.json" --backend cuda --steps 3 \
          --report "$D/$1-$n.report.json" --outputs "$D/$1-$n.out.safetensors"
        echo "verify $1 on $n GPU(s) exit $?"
      done
      python3 - "$D/$1-1.out.safetensors" "$D/$1-2.out.safetensors" "$D/$1-2.report.json" <<'PY'
import json, struct, sys
import numpy as np
def tensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
        data = f.read()
    return {k: np.frombuffer(data[v["data_offsets"][0]:v["data_offsets"][1]], np.float32)
            for k, v in h.items() if k != "__metadata__" and v["dtype"] == "F32"}
one, two = tensors(sys.argv[1]), tensors(sys.argv[2])
for k in one:
    a, b = one[k].astype(np.float64), two[k].astype(np.float64)
    print(f"two GPUs against one: {k}: relative RMS {np.sqrt(((a - b) ** 2).sum() / (a ** 2).sum()):.3g}")
t = json.load(open(sys.argv[3]))["timing"]
print("peer: {} bytes per step, median {:.3f} ms, {:.1f} GB/s against the profile's {:.1f} GB/s".format(
    t["peer_bytes_per_step"], t["peer_median_ms"], t["peer_gbps"], t["profile_p2p_gbps"]))
PY
    }
    two flux "$D/flux-nf4" "0=2.5GiB,1=2.5GiB" "0=2.5GiB"
    two llama "$D/llama" "0=12GiB,1=12GiB" "0=40GiB"
    set +x
  } >"$OUT/two_gpus.log" 2>&1
  say "two-gpus"
  grep -E "plan: gpu|verify .* exit|relative RMS|peer:|\[(pass|FAIL)\]|step time|Passed|Failed|peer copy" "$OUT/two_gpus.log" \
    | cut -c1-400 | tee -a "$SUMMARY"
fi
exit $test_rc
