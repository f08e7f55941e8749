#!/usr/bin/env bash
# qtool verify end to end on the CPU backend (what CI runs): tiny presets synthesized, quantized
# with every scheme (bf16 left as is too), planned so that most groups are streamed and some are
# read from disk, then verified against the original (exit 0); the same checkpoint with quantized
# bytes corrupted after planning (exit 1, naming the check); a plan made for another checkpoint
# (exit 2); --trace and --report files; `qtool profile --backend cpu` feeding `qtool plan`.
#   verify_cli.sh QTOOL SOURCE_DIR
set -eu
QTOOL=$1
SRC=$2
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# A profile with small fixed costs so that MiB budgets force streaming on tiny models.
cat > "$WORK/small.json" <<'JSON'
{"format": "qtool-device-profile", "version": 1, "name": "small-test",
 "context_bytes": 1048576, "cublas_workspace_bytes": 1048576, "alloc_granularity_bytes": 4096,
 "pinned_page_table_bytes_per_gib": 4096}
JSON

"$QTOOL" synth --preset tiny -o "$WORK/tiny" -q
"$QTOOL" synth --preset tiny-flux -o "$WORK/tf" -q

# The smallest GPU budget qtool plan accepts for a checkpoint (from its error message).
smallest() {
  set +e
  "$QTOOL" plan "$1" --max-memory 0=1KiB,cpu=1GiB --tokens 16 --device-profile "$WORK/small.json" --no-phases \
    2>"$WORK/err" >/dev/null
  set -e
  sed -n 's/.*Smallest budget that fits: --max-memory 0=\([0-9]*\).*/\1/p' "$WORK/err"
}

count_targets() {  # count_targets PLAN TARGET
  python3 -c "import json,sys; p=json.load(open(sys.argv[1])); print(sum(g['target']==sys.argv[2] for g in p['groups']))" "$1" "$2"
}

# plan_for CKPT OUT: a GPU budget near the smallest (most groups streamed) and the first cpu budget,
# a pipeline planned as one sequence (--no-phases: verify keeps every component on the GPUs),
# in tenths of the checkpoint's size, that keeps some groups in pinned memory and sends others to
# disk.
plan_for() {
  local lo total pct
  lo=$(smallest "$1")
  [ -n "$lo" ] || { echo "FAIL: no smallest budget for $1: $(cat "$WORK/err")"; exit 1; }
  total=$(du -sb "$1" | cut -f1)
  for pct in 2 3 4 5 6 7 8; do
    # A cpu budget below the staging ring is refused (exit 2): try the next one.
    "$QTOOL" plan "$1" --max-memory "0=$((lo + total / 10)),cpu=$((total * pct / 10))" --tokens 16 \
      --device-profile "$WORK/small.json" --no-phases -o "$2" -q 2>/dev/null || continue
    if [ "$(count_targets "$2" cpu)" -gt 0 ] && [ "$(count_targets "$2" disk)" -gt 0 ]; then return; fi
  done
}

checked=0
for model in tiny tf; do
  for scheme in bf16 int8 fp8_e4m3 fp8_e5m2 nf4 fp4; do
    ck="$WORK/$model-$scheme"
    if [ "$scheme" = bf16 ]; then
      ck="$WORK/$model"
    elif [ "$scheme" = fp8_e5m2 ]; then
      # quantize refuses fp8_e5m2 for a folder (compressed-tensors' config cannot say e5m2) but
      # takes a single file: the folder copied, each weights file quantized in place.
      cp -r "$WORK/$model" "$ck"
      find "$ck" -name '*.safetensors' | while read -r f; do
        "$QTOOL" quantize "$WORK/$model/${f#"$ck"/}" --scheme fp8_e5m2 -o "$f" --force -q
      done
      # Shard indexes list the new weight_scale tensors too.
      find "$ck" -name '*.safetensors.index.json' | while read -r index; do
        python3 - "$index" <<'PY'
import json, os, struct, sys
path = sys.argv[1]
index = json.load(open(path))
weight_map, total = {}, 0
for shard in sorted(set(index["weight_map"].values())):
    with open(os.path.join(os.path.dirname(path), shard), "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    for name, t in header.items():
        if name != "__metadata__":
            weight_map[name] = shard
            total += t["data_offsets"][1] - t["data_offsets"][0]
json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, open(path, "w"), indent=2)
PY
      done
    else
      "$QTOOL" quantize "$WORK/$model" --scheme $scheme -o "$ck" -q
    fi
    plan="$WORK/plan-$model-$scheme.json"
    plan_for "$ck" "$plan"
    cpu=$(count_targets "$plan" cpu)
    disk=$(count_targets "$plan" disk)
    [ "$cpu" -gt 0 ] || { echo "FAIL: $model $scheme: no group in pinned memory"; exit 1; }
    [ "$disk" -gt 0 ] || { echo "FAIL: $model $scheme: no group on disk"; exit 1; }
    "$QTOOL" verify "$ck" --plan "$plan" --reference "$WORK/$model" --backend cpu --steps 2 --poison \
      --report "$WORK/report.json" -q
    python3 - "$WORK/report.json" "$scheme" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
names = {c["name"]: c["status"] for c in r["checks"]}
for n in ("plan matches checkpoint", "finite outputs", "streamed == resident", "no state left behind",
          "reference error", "planned == direct", "peak memory"):
    assert names.get(n) == "pass", (n, names)
assert r["passed"] is True
layers = r["layers"]
assert layers and all(l["within"] for l in layers)
if sys.argv[2] != "bf16":
    q = [l for l in layers if l["scheme"] == sys.argv[2]]
    assert q, "no quantized layer"
    assert all(0 < l["rel_error"] <= l["bound"] for l in q)
PY
    checked=$((checked + 1))
  done
done
# nf4 with double quant (the sample config) on the pipeline.
"$QTOOL" quantize "$WORK/tf" --config "$SRC/sample_configs/flux-nf4.json" -o "$WORK/tf-cfg" -q
plan_for "$WORK/tf-cfg" "$WORK/plan-cfg.json"
"$QTOOL" verify "$WORK/tf-cfg" --plan "$WORK/plan-cfg.json" --reference "$WORK/tf" --backend cpu --steps 2 \
  --trace "$WORK/trace.json" -q
python3 - "$WORK/trace.json" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
ev = [e for e in t["traceEvents"] if e["ph"] == "X"]
lanes = {e["cat"] for e in ev}
assert lanes == {"copy", "compute"}, lanes
assert all(e["dur"] >= 0 for e in ev)
PY
echo "verified $((checked + 1)) checkpoints"

# Quantized bytes corrupted after planning: the plan still matches (same structure), verify fails.
ck="$WORK/tiny-nf4"
python3 - "$ck" <<'PY'
import json, os, random, struct, sys
d = sys.argv[1]
f = [x for x in os.listdir(d) if x.endswith(".safetensors")][0]
p = os.path.join(d, f)
with open(p, "r+b") as fh:
    n = struct.unpack("<Q", fh.read(8))[0]
    h = json.loads(fh.read(n))
    name = sorted(k for k in h if k.endswith("q_proj.weight"))[0]
    b, e = h[name]["data_offsets"]
    rng = random.Random(1)
    fh.seek(8 + n + b)
    fh.write(bytes(rng.randrange(256) for _ in range(e - b)))
print("corrupted", name)
PY
set +e
"$QTOOL" verify "$ck" --plan "$WORK/plan-tiny-nf4.json" --reference "$WORK/tiny" --backend cpu --steps 1 2>"$WORK/err"
rc=$?
set -e
[ "$rc" -eq 1 ] || { echo "FAIL: corrupted checkpoint exited $rc"; cat "$WORK/err"; exit 1; }
grep -q "verify failed: .*reference error" "$WORK/err" || { echo "FAIL: no named check"; cat "$WORK/err"; exit 1; }

# A plan made for another checkpoint: bad input.
set +e
"$QTOOL" verify "$WORK/tiny-int8" --plan "$WORK/plan-tiny-bf16.json" --backend cpu 2>"$WORK/err"
rc=$?
set -e
[ "$rc" -eq 2 ] || { echo "FAIL: mismatched plan exited $rc"; cat "$WORK/err"; exit 1; }
grep -q "fingerprint" "$WORK/err"
# Missing plan file, bad option.
set +e
"$QTOOL" verify "$WORK/tiny" --plan "$WORK/none.json" --backend cpu 2>/dev/null; rc1=$?
"$QTOOL" verify "$WORK/tiny" --plan "$WORK/plan-tiny-bf16.json" --backend tpu 2>/dev/null; rc2=$?
set -e
[ "$rc1" -eq 2 ] && [ "$rc2" -eq 2 ] || { echo "FAIL: bad input exited $rc1 / $rc2"; exit 1; }

# qtool profile on the CPU backend writes a profile the planner reads.
"$QTOOL" profile --backend cpu --copy-size 8MiB --repeats 2 -o "$WORK/cpu-profile.json" -q
"$QTOOL" plan "$WORK/tiny" --max-memory 0=64MiB --device-profile "$WORK/cpu-profile.json" -q -o "$WORK/p.json"
echo "verify e2e ok"
