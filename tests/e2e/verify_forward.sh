#!/usr/bin/env bash
# The real forward in qtool verify, end to end on the CPU backend. One script, several modes, each
# its own ctest test (verify_forward.cmake); `setup` makes what the others share in WORK.
#   verify_forward.sh QTOOL SOURCE_DIR WORK setup
#     tiny Llama (nf4 with double quant) and tiny Flux (nf4; fp8) quantized with sample_configs and
#     planned so that groups stream; verify --reference passes and writes --outputs with the drawn
#     inputs; verify --inputs of that file replays the run bit for bit; the report says per
#     component whether the forward or the linears ran.
#   verify_forward.sh QTOOL SOURCE_DIR WORK corrupt MODEL TENSOR
#     TENSOR of MODEL (llama, flux, flux-fp8; "component/tensor" in a pipeline), every 7th byte
#     XORed after planning: verify --reference exits 1, naming the failed checks.
#   verify_forward.sh QTOOL SOURCE_DIR WORK input MODEL CASE
#     an --inputs file broken as CASE (st_edit.py derive): exit 2 naming the input, nothing written.
set -eu
QTOOL=$1
SRC=$2
WORK=$3
MODE=$4
EDIT="python3 $SRC/tests/e2e/st_edit.py"

ckpt_of() {
  case $1 in
    llama) echo "$WORK/llama-nf4" ;;
    flux) echo "$WORK/flux-nf4" ;;
    flux-fp8) echo "$WORK/flux-fp8" ;;
  esac
}
ref_of() { case $1 in llama) echo "$WORK/llama" ;; *) echo "$WORK/flux" ;; esac; }

if [ "$MODE" = setup ]; then
  rm -rf "$WORK" && mkdir -p "$WORK"
  cat > "$WORK/small.json" <<'JSON'
{"format": "qtool-device-profile", "version": 1, "name": "small-test",
 "context_bytes": 1048576, "cublas_workspace_bytes": 1048576, "alloc_granularity_bytes": 4096,
 "pinned_page_table_bytes_per_gib": 4096}
JSON
  "$QTOOL" synth --preset tiny -o "$WORK/llama" -q
  "$QTOOL" synth --preset tiny-flux -o "$WORK/flux" -q
  "$QTOOL" quantize "$WORK/llama" --config "$SRC/sample_configs/llama-nf4-dq.json" -o "$WORK/llama-nf4" -q
  "$QTOOL" quantize "$WORK/flux" --config "$SRC/sample_configs/flux-nf4.json" -o "$WORK/flux-nf4" -q
  "$QTOOL" quantize "$WORK/flux" --config "$SRC/sample_configs/flux-fp8.json" -o "$WORK/flux-fp8" -q
  for m in llama flux flux-fp8; do
    ck=$(ckpt_of $m)
    # A GPU budget a little above the smallest plan: most blocks stream through the slots.
    set +e
    "$QTOOL" plan "$ck" --max-memory 0=1KiB,cpu=1GiB --tokens 16 --device-profile "$WORK/small.json" 2>"$WORK/err" >/dev/null
    set -e
    lo=$(sed -n 's/.*Smallest budget that fits: --max-memory 0=\([0-9]*\).*/\1/p' "$WORK/err")
    [ -n "$lo" ] || { echo "FAIL: no smallest budget for $m: $(cat "$WORK/err")"; exit 1; }
    "$QTOOL" plan "$ck" --max-memory "0=$((lo + lo / 8)),cpu=1GiB" --tokens 16 --device-profile "$WORK/small.json" \
      -o "$WORK/plan-$m.json" -q
    "$QTOOL" verify "$ck" --plan "$WORK/plan-$m.json" --reference "$(ref_of $m)" --backend cpu --steps 2 --poison \
      --outputs "$WORK/out-$m.safetensors" --report "$WORK/report-$m.json" -q
    "$QTOOL" verify "$ck" --plan "$WORK/plan-$m.json" --backend cpu --steps 1 \
      --inputs "$WORK/out-$m.safetensors" --outputs "$WORK/replay-$m.safetensors" -q
    python3 - "$WORK" "$m" "$SRC" <<'PY'
import json, sys
sys.path.insert(0, sys.argv[3] + "/tests/e2e")
import st_edit
work, m = sys.argv[1], sys.argv[2]
r = json.load(open(f"{work}/report-{m}.json"))
names = {c["name"]: c["status"] for c in r["checks"]}
for n in ("finite outputs", "every tensor read", "streamed == resident", "no state left behind",
          "reference error", "reference output", "peak memory"):
    assert names.get(n) == "pass", (n, names)
ran = {c["component"]: c["ran"] for c in r["components"]}
want = "" if m == "llama" else "transformer"
assert ran[want] == "forward", ran
if m != "llama":
    assert ran["text_encoder"] == "forward" and ran["text_encoder_2"] == "forward", ran
    assert ran["vae"] == "linears only", ran
fr = next(f for f in r["forward_reference"] if f["component"] == want)
assert 0 < fr["rel_error"] <= fr["bound"], fr
plan = json.load(open(f"{work}/plan-{m}.json"))
assert any(g for g in plan["groups"]), "nothing streamed"
_, out = st_edit.read(f"{work}/out-{m}.safetensors")
_, replay = st_edit.read(f"{work}/replay-{m}.safetensors")
name = "logits" if m == "llama" else "transformer.sample"
assert out[name][0] == "F32" and out[name][2] == replay[name][2], "replay differs"
outputs = {name} if m == "llama" else {name, "text_encoder.last_hidden_state", "text_encoder.pooler_output",
                                       "text_encoder_2.last_hidden_state"}
assert set(replay) == outputs, sorted(replay)  # given inputs are not written back
for o in outputs:
    assert out[o][2] == replay[o][2], o
assert len(out) > 1, "drawn inputs not written"
print(m, "ok: rel error", fr["rel_error"], "bound", fr["bound"], "simulated", fr["simulated_rel_error"])
PY
  done
  exit 0
fi

MODEL=$5
ck=$(ckpt_of "$MODEL")
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
if [ "$MODE" = corrupt ]; then
  cp -r "$ck" "$T/ck"
  $EDIT corrupt "$T/ck/$(dirname "$6")" "$(basename "$6")"  # COMPONENT/TENSOR in a pipeline
  set +e
  "$QTOOL" verify "$T/ck" --plan "$WORK/plan-$MODEL.json" --reference "$(ref_of "$MODEL")" --backend cpu --steps 1 \
    2>"$T/err"
  rc=$?
  set -e
  [ "$rc" -eq 1 ] || { echo "FAIL: $MODEL $6 corrupted: exit $rc"; cat "$T/err"; exit 1; }
  grep "verify failed" "$T/err"
  exit 0
fi
if [ "$MODE" = input ]; then
  $EDIT derive "$WORK/out-$MODEL.safetensors" "$T/in.safetensors" "$6"
  set +e
  "$QTOOL" verify "$ck" --plan "$WORK/plan-$MODEL.json" --backend cpu --steps 1 --inputs "$T/in.safetensors" \
    --outputs "$T/out.safetensors" --report "$T/report.json" 2>"$T/err"
  rc=$?
  set -e
  [ "$rc" -eq 2 ] || { echo "FAIL: $MODEL input $6: exit $rc"; cat "$T/err"; exit 1; }
  grep -q "inputs" "$T/err" || { echo "FAIL: the message does not name --inputs"; cat "$T/err"; exit 1; }
  [ ! -e "$T/out.safetensors" ] && [ ! -e "$T/report.json" ] || { echo "FAIL: written despite bad input"; exit 1; }
  ls "$T" | grep -q tmp && { echo "FAIL: temporary left"; exit 1; }
  cat "$T/err"
  exit 0
fi
echo "unknown mode $MODE"
exit 2
