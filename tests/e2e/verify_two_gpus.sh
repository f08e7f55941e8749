#!/usr/bin/env bash
# qtool verify of plans over two GPUs on the CPU backend (each "GPU" has its own ops and memory):
# every unit runs on the GPU the plan puts it on, and the forward's state crosses between units.
#   - a Flux transformer (flux --scale 0.25, nf4) planned `balanced` at the first budget (from the
#     smallest up, in steps of 5%) where both GPUs stream at least half of their blocks;
#   - a tiny Llama (nf4) `balanced` with everything resident, and a tied one (its head runs with the
#     embedding it shares, on GPU 0: the state goes to GPU 1 and comes back);
#   - a tiny FluxPipeline (bf16) `balanced`: the encoders, the transformer and the VAE's linears.
# Each: every check passes, the output equals the one-GPU plan's bit for bit (the CPU ops are the
# same), and the bytes handed between GPUs per step are the forward's state (planner
# handover_bytes: the stream, RoPE tables, ...) at each change of GPU inside a component, as the
# report and the trace's "peer copy" events give them.
# With BACKEND cuda (label gpu; skipped, exit 77, without two GPUs) the same on two real GPUs with
# the GPUs' own device profile; the outputs then agree with the
# one-GPU run's within the forward's tolerance (relative RMS 2e-2) rather than bit for bit.
# PART: flux (the Flux transformer; slow under the sanitizers, so the default suite runs it under
# the label `long`), models (the others; label e2e) or all (the default).
#   verify_two_gpus.sh QTOOL [BACKEND [PART]]
set -eu
QTOOL=$1
BACKEND=${2:-cpu}
PART=${3:-all}
if [ "$BACKEND" = cuda ]; then
  n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${n:-0}" -ge 2 ] || { echo "fewer than two GPUs: skipped"; exit 77; }
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SEED=${QTOOL_TEST_SEED:-$RANDOM}
echo "seed $SEED"

# A device profile whose fixed costs (context, workspace, 2 MiB rounding) do not dwarf tiny models.
python3 - "$WORK/small.json" <<'PY'
import json, sys
p = {"format": "qtool-device-profile", "version": 1, "name": "test-small", "device_names": ["test"],
     "description": "tiny fixed costs for CPU tests", "memory_bytes": 1 << 34, "h2d_pinned_gbps": 55.0,
     "h2d_pageable_gbps": 8.0, "p2p_gbps": 50.0, "disk_read_gbps": 1.7, "device_bandwidth_gbps": 2900.0,
     "bf16_tflops": 650.0, "attention_tflops": 650.0, "activation_gbps": 790.0,
     "dequant_gelems_per_s": {"int8": 715, "fp8_e4m3": 730, "fp8_e5m2": 735, "nf4": 850, "fp4": 845,
                              "f16": 360, "f32": 355},
     "context_bytes": 1 << 20, "cublas_workspace_bytes": 0, "alloc_granularity_bytes": 256,
     "host_alloc_granularity_bytes": 4096, "pinned_page_table_bytes_per_gib": 0, "kernel_launch_us": 4.5,
     "copy_latency_us": 2.7}
json.dump(p, open(sys.argv[1], "w"))
PY
P="--device-profile $WORK/small.json --tokens 16"
[ "$BACKEND" = cuda ] && P="--tokens 16"

if [ "$PART" != flux ]; then
  "$QTOOL" synth --preset tiny --seed "$SEED" -o "$WORK/t" -q
  "$QTOOL" quantize "$WORK/t" --scheme nf4 -o "$WORK/tq" -q
  "$QTOOL" synth --preset tiny-flux --seed "$SEED" -o "$WORK/p" -q
  "$QTOOL" synth --preset llama-tied --scale 0.1 --seed "$SEED" -o "$WORK/lt" -q
  "$QTOOL" quantize "$WORK/lt" --scheme nf4 -o "$WORK/ltq" -q
fi

# Blocks streamed of the blocks each GPU runs, "GPU:STREAMED/BLOCKS ...", and whether each GPU
# streams at least half of its own.
streams() {
  python3 - "$1" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
per = {}
for s in p["schedule"]:
    m = s["modules"][0]
    if m.startswith("transformer_blocks.") or m.startswith("single_transformer_blocks."):
        n = per.setdefault(s["gpu"], [0, 0])
        n[0] += 1
        n[1] += s["group"] >= 0
ok = len(per) == 2 and all(2 * st >= n for n, st in per.values())
print(" ".join(f"{g}:{st}/{n}" for g, (n, st) in sorted(per.items())), "yes" if ok else "no")
PY
}
# The Flux transformer's budget, b: the first from the smallest up where both GPUs stream at least
# half of their blocks.
flux_budget() {
  # The smallest GPU budget for two GPUs, from the error for a 1 KiB one.
  set +e
  "$QTOOL" plan "$WORK/fq" $P --device-map balanced --max-memory 0=1KiB,1=1KiB,cpu=1GiB 2>"$WORK/err" >/dev/null
  set -e
  lo=$(sed -n 's/.*Smallest budget that fits: --max-memory 0=\([0-9]*\).*/\1/p' "$WORK/err")
  [ -n "$lo" ] || { echo "FAIL: no smallest budget: $(cat "$WORK/err")"; exit 1; }
  b=""
  for f in $(seq 100 5 300); do
    try=$((lo * f / 100))
    "$QTOOL" plan "$WORK/fq" $P --device-map balanced --max-memory "0=$try,1=$try,cpu=1GiB" -o "$WORK/scan.json" -q
    if [ "$(streams "$WORK/scan.json" | awk '{print $NF}')" = yes ]; then
      b=$try
      echo "both GPUs stream at least half their blocks at $f% of the smallest budget: $(streams "$WORK/scan.json")"
      break
    fi
  done
  [ -n "$b" ] || { echo "FAIL: no budget up to 3 x the smallest streams half the blocks on each GPU"; exit 1; }
}

fails=0
# run NAME CKPT MAXMEM STEPS CHECKS: verify the two-GPU plan and the one-GPU plan, compare.
run() {
  local name=$1 ck=$2 mm=$3 steps=$4 checks=$5
  "$QTOOL" plan "$ck" $P --device-map balanced --max-memory "$mm,cpu=1GiB" -o "$WORK/$name-2.json" -q
  "$QTOOL" plan "$ck" $P --max-memory "0=1GiB,cpu=1GiB" -o "$WORK/$name-1.json" -q
  for n in 1 2; do
    if ! "$QTOOL" verify "$ck" --plan "$WORK/$name-$n.json" --backend "$BACKEND" --steps "$steps" \
      --report "$WORK/$name-$n.report.json" --outputs "$WORK/$name-$n.out.safetensors" \
      --trace "$WORK/$name-$n.trace.json" >"$WORK/out" 2>&1; then
      echo "FAIL: $name on $n GPU(s):"; cat "$WORK/out"; fails=$((fails + 1)); return
    fi
  done
  if [ "$BACKEND" = cpu ] && ! cmp -s "$WORK/$name-1.out.safetensors" "$WORK/$name-2.out.safetensors"; then
    echo "FAIL: $name: the two-GPU output differs from the one-GPU output"; fails=$((fails + 1))
  fi
  if [ "$BACKEND" = cuda ] && ! python3 - "$WORK/$name-1.out.safetensors" "$WORK/$name-2.out.safetensors" <<'PY'
import array, json, math, struct, sys
def tensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, v in h.items():
        if k == "__metadata__" or v["dtype"] != "F32":
            continue
        a = array.array("f")
        a.frombytes(data[v["data_offsets"][0]:v["data_offsets"][1]])
        out[k] = a
    return out
one, two = tensors(sys.argv[1]), tensors(sys.argv[2])
for k in one:
    err = sum((x - y) ** 2 for x, y in zip(one[k], two[k]))
    ref = sum(x * x for x in one[k])
    rel = math.sqrt(err / ref) if ref > 0 else math.sqrt(err)
    print(f"{k}: two GPUs against one, relative RMS {rel:.3g}")
    assert rel <= 2e-2, k
PY
  then
    echo "FAIL: $name: the two-GPU output is outside the tolerance"; fails=$((fails + 1))
  fi
  if ! python3 - "$WORK/$name-2.json" "$WORK/$name-2.report.json" "$WORK/$name-2.trace.json" \
    "$WORK/$name-2.out.safetensors" "$ck" "$checks" <<'PY'
import json, struct, sys
plan, report, trace = (json.load(open(f)) for f in sys.argv[1:4])
out_file, ck, checks = sys.argv[4], sys.argv[5], sys.argv[6].split(",")
assert report["passed"], [c for c in report["checks"] if c["status"] == "FAIL"]

def header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))
shapes = {k: v["shape"] for k, v in header(out_file).items() if k != "__metadata__"}

def config(component):
    import os
    d = os.path.join(ck, component) if component else ck
    return json.load(open(os.path.join(d, "config.json")))

# The forward's state at a boundary (planner handover_bytes, runner Forward::shared_state); None
# for a linears-only component (each GPU makes its own input).
def state_bytes(component, after_norm_out):
    c = config(component)
    pre = component + "." if component else ""
    cls = c.get("_class_name") or c.get("architectures", [""])[0]
    if cls == "FluxTransformer2DModel":
        if pre + "hidden_states" in shapes:
            b, ti, _ = shapes[pre + "hidden_states"]
            tt = shapes[pre + "encoder_hidden_states"][1]
        else:  # in a pipeline: the latents, and T5's output as the text stream
            b, ti, _ = shapes["latents"]
            tt = shapes["text_encoder_2.last_hidden_state"][1]
        d = c["num_attention_heads"] * c["attention_head_dim"]
        out = c["patch_size"] ** 2 * (c.get("out_channels") or c["in_channels"])
        n = b * (tt + ti) * d * 2 + 2 * b * d * 2 + 2 * (tt + ti) * c["attention_head_dim"] * 4 + b * ti * out * 2
        return n + (b * ti * d * 2 if after_norm_out else 0)
    if cls == "LlamaForCausalLM":
        b, t = shapes[pre + "input_ids"]
        hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        return b * t * (c["hidden_size"] + 2 * hd) * 2
    if cls == "CLIPTextModel":
        b, t = shapes[pre + "input_ids"]
        return b * t * c["hidden_size"] * 2 + b * t * 8
    if cls == "T5EncoderModel":
        b, t = shapes[pre + "input_ids"]
        return b * t * c["d_model"] * 2 + c["num_heads"] * t * t * 2 + b * t * 8
    return None

# Each change of GPU between consecutive steps of a component with a forward (the pipeline's
# transformer once per denoising step).
names = [c["name"] for c in plan["components"]]
expected, crossings = 0, 0
passes = {"transformer": plan.get("denoise_steps", 1)} if "text_encoder" in names else {}
steps = plan["schedule"]
for i in range(1, len(steps)):
    a, b = steps[i - 1], steps[i]
    if a["component"] != b["component"] or a["gpu"] == b["gpu"]:
        continue
    comp = names[b["component"]]
    n = state_bytes(comp, b["modules"][0] == "proj_out")
    if n is None:
        continue
    crossings += passes.get(comp, 1)
    expected += passes.get(comp, 1) * n
got = report["timing"]["peer_bytes_per_step"]
assert crossings > 0, "the plan never changes GPU inside a component"
assert got == expected, (got, expected, crossings)
# The trace: the units ran on both GPUs' compute lanes; the peer copies of a step sum to it.
events = trace["traceEvents"]
peer = [e for e in events if e.get("name", "").startswith("peer copy")]
assert peer, "no peer copy in the trace"
step0 = sum(e["args"]["bytes"] for e in peer if e["args"].get("step", 0) == 0)
assert step0 == expected, (step0, expected)
for name in checks:
    c = {c["name"]: c for c in report["checks"]}[name]
    assert c["status"] == "pass", c
devs = {s["gpu"] for s in steps}
assert devs == {0, 1}, devs
print(f"{crossings} crossing(s), {got} bytes per step")
PY
  then
    echo "FAIL: $name (above)"; fails=$((fails + 1))
  fi
}

if [ "$PART" != models ]; then
  "$QTOOL" synth --preset flux --scale 0.25 --components transformer --seed "$SEED" -o "$WORK/f" -q
  "$QTOOL" quantize "$WORK/f" --scheme nf4 -o "$WORK/fq" -q
  flux_budget
  run flux "$WORK/fq" "0=$b,1=$b" 1 "streamed == resident,peak memory"
fi
if [ "$PART" != flux ]; then
  run llama "$WORK/tq" "0=1GiB,1=1GiB" 2 "streamed == resident,peak memory"
  run llama-tied "$WORK/ltq" "0=1GiB,1=1GiB" 2 "streamed == resident,peak memory"
  run pipeline "$WORK/p" "0=1GiB,1=1GiB" 1 "peak memory"
fi
[ "$fails" -eq 0 ] || { echo "$fails failure(s)"; exit 1; }
echo "ok"
