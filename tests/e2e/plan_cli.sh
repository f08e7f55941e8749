#!/usr/bin/env bash
# qtool plan end to end: synthesizes tiny pipelines and models (bf16, and quantized by `qtool
# quantize` with the sample configs), plans them for every strategy on one and two GPUs with
# budgets from roomy down to the smallest one qtool reports, and checks each plan file with
# plan_check.py (reads the checkpoint's headers itself). Also: the three --max-memory forms,
# --json equal to the file, --svg, an infeasible budget (exit 2, shortfall, and the smallest
# budget it names works), usage errors, --models-dir.
#   plan_cli.sh QTOOL SOURCE_DIR
set -eu
QTOOL=$1
SRC=$2
CHECK="python3 $SRC/tests/e2e/plan_check.py"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$QTOOL" plan --help | grep -q -- '--max-memory'
"$QTOOL" plan --help | grep -q -- '--device-map'

"$QTOOL" synth --preset tiny-flux -o "$WORK/tf" -q
"$QTOOL" synth --preset flux --scale 0.1 -o "$WORK/f01" -q
"$QTOOL" synth --preset llama-tied --scale 0.1 -o "$WORK/lt" -q
"$QTOOL" synth --preset tiny -o "$WORK/tiny" -q
"$QTOOL" quantize "$WORK/tf" --config "$SRC/sample_configs/flux-nf4.json" -o "$WORK/tf-nf4" -q
"$QTOOL" quantize "$WORK/f01" --config "$SRC/sample_configs/flux-nf4.json" -o "$WORK/f01-nf4" -q
"$QTOOL" quantize "$WORK/tiny" --config "$SRC/sample_configs/llama-nf4-dq.json" -o "$WORK/tiny-nf4" -q
"$QTOOL" quantize "$WORK/tiny" --config "$SRC/sample_configs/llama-int8.json" -o "$WORK/tiny-int8" -q

# The smallest GPU budget qtool accepts, from its error message for a 1 MiB budget.
smallest() {
  set +e
  "$QTOOL" plan "$1" --max-memory 0=1MiB --tokens 64 2>"$WORK/err" >/dev/null
  local rc=$?
  set -e
  [ "$rc" -eq 2 ] || { echo "FAIL: 1 MiB budget for $1 exited $rc" >&2; exit 1; }
  grep -q "short by [0-9]* bytes" "$WORK/err" || { echo "FAIL: no shortfall: $(cat "$WORK/err")" >&2; exit 1; }
  sed -n 's/.*Smallest budget that fits: --max-memory 0=\([0-9]*\).*/\1/p' "$WORK/err"
}

n=0
for ck in tf f01 f01-nf4 lt tiny-nf4 tiny-int8; do
  lo=$(smallest "$WORK/$ck")
  total=$(du -sb "$WORK/$ck" | cut -f1)
  # At the smallest budget most of a model is streamed, unless it is so small that keeping it all
  # costs less than a slot and the pinned memory's page tables (2 MiB allocations).
  most=":yes"
  [ "$total" -lt 16777216 ] && most=""
  hi=$((lo + total + 8 * 1048576))
  plans=()
  # One GPU: every strategy is sequential; two GPUs: each strategy.
  for sg in sequential:1 sequential:2 balanced:2 balanced_low_0:2 auto:2; do
    strategy=${sg%:*}
    ngpu=${sg#*:}
    for step in 0 4 8; do
      b=$((hi - (hi - lo) * step / 8))
      mm="0=$b"
      [ "$ngpu" -eq 2 ] && mm="0=$b,1=$b"
      out="$WORK/plan-$ck-$strategy-$ngpu-$step.json"
      "$QTOOL" plan "$WORK/$ck" --device-map $strategy --max-memory "$mm,cpu=1GiB" --tokens 64 -o "$out" -q
      expect=""
      [ "$step" -eq 0 ] && expect=":no"
      [ "$step" -eq 8 ] && [ "$ngpu" -eq 1 ] && expect="$most"
      plans+=("$out$expect")
      n=$((n + 1))
    done
  done
  # The smallest budget really is the smallest: one byte less is refused.
  set +e
  "$QTOOL" plan "$WORK/$ck" --max-memory "0=$((lo - 1))" --tokens 64 -q 2>/dev/null; rc=$?
  set -e
  [ "$rc" -eq 2 ] || { echo "FAIL: $ck: budget below the smallest exited $rc"; exit 1; }
  "$QTOOL" plan "$WORK/$ck" --max-memory "0=$lo" --tokens 64 -q -o "$WORK/min-$ck.json"
  $CHECK "$WORK/$ck" "${plans[@]}" "$WORK/min-$ck.json$most"
done
echo "checked $n plans"

# A cpu budget too small for pinned groups sends groups to disk; one too small for the staging
# ring is refused with the cpu budget that fits, which then works.
lo=$(smallest "$WORK/f01")
"$QTOOL" plan "$WORK/f01" --max-memory "0=$lo,cpu=6MiB" --tokens 64 -o "$WORK/disk.json" -q
$CHECK "$WORK/f01" "$WORK/disk.json"
python3 -c "import json,sys; p=json.load(open(sys.argv[1])); assert any(g['target']=='disk' for g in p['groups']), 'no disk group'" "$WORK/disk.json"
set +e
"$QTOOL" plan "$WORK/f01" --max-memory "0=$lo,cpu=1KiB" --tokens 64 -q 2>"$WORK/err"; rc=$?
set -e
[ "$rc" -eq 2 ] && grep -q "short by" "$WORK/err" || { echo "FAIL: tiny cpu budget exited $rc: $(cat "$WORK/err")"; exit 1; }
cpu=$(sed -n 's/.*Smallest budget that fits: cpu=\([0-9]*\).*/\1/p' "$WORK/err")
"$QTOOL" plan "$WORK/f01" --max-memory "0=$lo,cpu=$cpu" --tokens 64 -o "$WORK/disk2.json" -q
$CHECK "$WORK/f01" "$WORK/disk2.json"

# The three --max-memory forms give the same plan; --json on stdout is the file's content.
"$QTOOL" plan "$WORK/tf" --max-memory "0=700MiB,1=700MiB,cpu=1GiB" --tokens 64 -o "$WORK/a.json" -q
"$QTOOL" plan "$WORK/tf" --max-memory '{"0": "700MiB", "1": 734003200, "cpu": "1GiB"}' --tokens 64 --json -q > "$WORK/b.json"
echo '{"0": "700MiB", "1": "700MiB", "cpu": "1GiB"}' > "$WORK/budget.json"
"$QTOOL" plan "$WORK/tf" --max-memory "$WORK/budget.json" --tokens 64 -o "$WORK/c.json" -q
python3 - "$WORK" <<'PY'
import json, sys
w = sys.argv[1]
a, b, c = (json.load(open(f"{w}/{x}.json")) for x in "abc")
for p in (b, c):
    for k in ("components", "groups", "schedule", "predicted_step_s"):
        assert p[k] == a[k], k
    assert [(d["device"], d["budget"], d["predicted_peak"]) for d in p["devices"]] == \
        [(d["device"], d["budget"], d["predicted_peak"]) for d in a["devices"]]
# Pipeline components in execution order: text encoders, transformer, vae.
assert [x["name"] for x in a["components"]] == ["text_encoder", "text_encoder_2", "transformer", "vae"], a["components"]
assert a["components"][2]["template"] == "flux-transformer"
PY

# --svg draws one bar per device.
"$QTOOL" plan "$WORK/f01-nf4" --max-memory "0=$(smallest "$WORK/f01-nf4"),cpu=1GiB" --tokens 64 --svg "$WORK/p.svg" -q
grep -q '<svg' "$WORK/p.svg"
grep -q 'cuda:0' "$WORK/p.svg"
grep -q 'device_slots' "$WORK/p.svg"

# The table on stderr names the reserve items and the offloaded modules' reason.
"$QTOOL" plan "$WORK/f01" --max-memory "0=$(smallest "$WORK/f01")" --tokens 64 2>"$WORK/table" >/dev/null
for word in cuda_context cublas_workspace activation_in device_slots "offloaded modules" reason; do
  grep -q "$word" "$WORK/table" || { echo "FAIL: table lacks '$word'"; cat "$WORK/table"; exit 1; }
done
# A tied head is placed with its embedding.
"$QTOOL" plan "$WORK/lt" --max-memory "0=4GiB" --json -q | python3 -c "
import json, sys
p = json.load(sys.stdin)
c = p['components'][0]
assert c['tied'] and c['tied'][0]['alias'] == 'lm_head.weight', c['tied']
assert c['device_map'] == {'': 0}, c['device_map']
"
# Usage errors and bad files exit 2 and name the option.
expect_2() {
  set +e
  "$QTOOL" plan "$@" -q 2>"$WORK/err" >/dev/null; local rc=$?
  set -e
  [ "$rc" -eq 2 ] || { echo "FAIL: plan $* exited $rc"; exit 1; }
}
expect_2 "$WORK/tf" --device-map greedy --max-memory 0=1GiB
grep -q -- "--device-map" "$WORK/err"
expect_2 "$WORK/tf" --max-memory 0=12XB
grep -q -- "--max-memory" "$WORK/err"
expect_2 "$WORK/tf" --max-memory cpu=1GiB
expect_2 "$WORK/tf" --max-memory 0=1GiB --offload sideways
expect_2 "$WORK/tf" --max-memory 0=1GiB --device-profile "$WORK/nope.json"
expect_2 "$WORK/does-not-exist" --max-memory 0=1GiB
expect_2 "$WORK/tf" --max-memory 0=1GiB --models-dir "$WORK/nope"
echo '{"format": "qtool-device-profile", "version": 1, "h2d_pinned_gbps": -1}' > "$WORK/bad-profile.json"
expect_2 "$WORK/tf" --max-memory 0=1GiB --device-profile "$WORK/bad-profile.json"
grep -q "h2d_pinned_gbps" "$WORK/err"
# Without templates the order falls back to the heuristic and says so.
mkdir "$WORK/empty-models"
"$QTOOL" plan "$WORK/tf" --max-memory 0=1GiB --models-dir "$WORK/empty-models" 2>"$WORK/table" >/dev/null
grep -q "heuristic" "$WORK/table"
# Named device profiles from sample_configs/devices.
"$QTOOL" plan "$WORK/tf" --max-memory 0=1GiB --device-profile h200 --json -q | python3 -c "
import json, sys; p = json.load(sys.stdin); assert p['settings']['device_profile'] == 'h200'
assert p['notes'][0].startswith('using device profile h200'), p['notes'][0]"
# Without --device-profile: the GPU's profile (built in by name, cached or measured), or the default
# without a GPU; which one is said on stderr and first in the plan's notes.
"$QTOOL" plan "$WORK/tf" --max-memory 0=1GiB --json 2>"$WORK/err" | python3 -c "
import json, sys; p = json.load(sys.stdin); n = p['notes'][0]
assert n.startswith('using device profile ') and p['settings']['device_profile'] in n, n
assert 'GPU found' in n, n  # 'no GPU found' (the default) or the profile 'for the GPU found'"
grep -q "using device profile" "$WORK/err"
# The CLIP text encoder's device_map keys are transformers 5's module names (no text_model level),
# and the notes say what transformers 4.x users do.
"$QTOOL" plan "$WORK/tf" --max-memory 0=1GiB --json -q | python3 -c "
import json, sys; p = json.load(sys.stdin)
c = [c for c in p['components'] if c['name'] == 'text_encoder'][0]
assert c['checkpoint_prefix'] == 'text_model' and c['device_map'], c
assert not any(k.startswith('text_model') for k in c['device_map']), list(c['device_map'])
assert any(\"prefix every key with 'text_model.'\" in n for n in p['notes']), p['notes']"
echo "plan e2e ok"
