#!/usr/bin/env bash
# qtool plan of a FluxPipeline by phase, end to end on `qtool synth --preset tiny-flux`: the table
# shows the four phases, each component's mode and why, per phase the GPU's memory and the job's
# time; the SVG has a bar per phase and GPU and a legend of its colours; the plan file's phases
# pass plan_check.py; --denoise-steps N repeats the denoising phase N times and bad values exit 2;
# --no-phases plans as one sequence; qtool verify runs every plan by phase as planned (components
# loaded and released per phase, groups streamed in their phase) with every check passing and the
# per-phase measured peak and times in the report, and refuses (exit 2, naming the phase) a plan
# whose phases do not match the pipeline.
#   plan_phases.sh QTOOL SOURCE_DIR
set -eu
QTOOL=$1
SRC=$2
CHECK="python3 $SRC/tests/e2e/plan_check.py"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

"$QTOOL" plan --help | grep -q -- '--denoise-steps'
"$QTOOL" synth --preset tiny-flux -o "$WORK/tf" -q
# Small fixed costs, so that the tiny weights decide what fits.
cat > "$WORK/small.json" <<'JSON'
{"format": "qtool-device-profile", "version": 1, "name": "small", "context_bytes": 1048576,
 "cublas_workspace_bytes": 65536, "alloc_granularity_bytes": 4096, "pinned_page_table_bytes_per_gib": 4096}
JSON
P="--device-profile $WORK/small.json --tokens 64"

set +e
"$QTOOL" plan "$WORK/tf" --max-memory 0=1KiB,cpu=1GiB $P -q 2>"$WORK/err" >/dev/null; rc=$?
set -e
[ "$rc" -eq 2 ] || fail "1 KiB budget exited $rc"
grep -q "phase 'denoise'" "$WORK/err" || fail "the error does not name the phase: $(cat "$WORK/err")"
lo=$(sed -n 's/.*Smallest budget that fits: --max-memory 0=\([0-9]*\).*/\1/p' "$WORK/err")
[ -n "$lo" ] || fail "no smallest budget: $(cat "$WORK/err")"

# Every budget from the smallest up: valid plans; the modes seen cover all three.
modes=""
for add in 0 262144 524288 1048576 2097152 4194304 8388608 67108864; do
  b=$((lo + add))
  "$QTOOL" plan "$WORK/tf" --max-memory "0=$b,cpu=1GiB" $P -o "$WORK/p$add.json" --svg "$WORK/p$add.svg" \
    2>"$WORK/t$add.txt" >/dev/null
  $CHECK "$WORK/tf" "$WORK/p$add.json" >/dev/null || fail "plan_check at $b"
  modes="$modes $(python3 -c "
import json, sys
p = json.load(open(sys.argv[1]))
assert p['version'] == 3 and [ph['name'] for ph in p['phases']] == ['text_encoder', 'text_encoder_2', 'denoise', 'vae']
assert p['phases'][2]['repeat'] == 28 and p['denoise_steps'] == 28
print(' '.join(c['name'] + '=' + c['mode'] for ph in p['phases'] for c in ph['components']))" "$WORK/p$add.json")"
done
for m in transformer=streamed transformer=resident =loaded; do
  echo "$modes" | grep -q -- "$m" || fail "no plan with $m: $modes"
done

# The table: the job, each phase with its components' modes and reasons, and its GPU's memory.
T="$WORK/t0.txt"
for word in "a pipeline job by phase, 28 denoising step(s)" "predicted job" "phase 1 'text_encoder'" \
  "phase 2 'text_encoder_2'" "phase 3 'denoise'" "phase 4 'vae'" "+ 28 x" "transformer (FluxTransformer2DModel)" \
  ": streamed" "why:" "convolutions are not executed" "resident" "loaded" "slots" "peak" "device_slots" \
  "offloaded modules"; do
  grep -qF -- "$word" "$T" || { cat "$T"; fail "table lacks '$word'"; }
done
# The SVG: a legend of every colour, a bar per phase and GPU, the job's time.
S="$WORK/p0.svg"
for word in "resident for the whole job" "loaded at the phase's start, released after it" "streamed: device slots" \
  "reserve: context" "free (budget not used)" "predicted job" "phase 1 text_encoder (x1)" "phase 3 denoise (x28)" \
  "phase 4 vae (x1)" "transformer streamed"; do
  grep -qF -- "$word" "$S" || fail "SVG lacks '$word'"
done
[ "$(grep -c 'class="legend"' "$S")" -eq 5 ] || fail "the legend has not 5 entries"
[ "$(grep -c '>cuda:0</text>' "$S")" -eq 4 ] || fail "not one bar per phase on cuda:0"
python3 -c "import sys, xml.dom.minidom as m; m.parse(sys.argv[1])" "$S" || fail "SVG is not XML"
# Two GPUs: a bar per phase and GPU.
"$QTOOL" plan "$WORK/tf" --max-memory "0=$((lo + 1048576)),1=$((lo + 1048576)),cpu=1GiB" --device-map balanced $P \
  -o "$WORK/two.json" --svg "$WORK/two.svg" -q
$CHECK "$WORK/tf" "$WORK/two.json" >/dev/null
[ "$(grep -c '>cuda:1</text>' "$WORK/two.svg")" -eq 4 ] || fail "not one bar per phase on cuda:1"

# --denoise-steps: the denoising phase runs N times, the job's time grows by N steps.
"$QTOOL" plan "$WORK/tf" --max-memory "0=$((lo + 67108864)),cpu=1GiB" $P --denoise-steps 4 -o "$WORK/n4.json" -q
python3 - "$WORK/n4.json" "$WORK/p67108864.json" <<'PY'
import json, sys
a, b = (json.load(open(f)) for f in sys.argv[1:])
assert a["denoise_steps"] == 4 and a["phases"][2]["repeat"] == 4
step = a["phases"][2]["step_s"]
assert abs((b["predicted_job_s"] - a["predicted_job_s"]) - 24 * step) <= 1e-9 * b["predicted_job_s"], (a, b)
PY
for bad in 0 1001 x -3; do
  set +e
  "$QTOOL" plan "$WORK/tf" --max-memory 0=1GiB $P --denoise-steps "$bad" -q 2>"$WORK/err" >/dev/null; rc=$?
  set -e
  [ "$rc" -eq 2 ] || fail "--denoise-steps $bad exited $rc"
  grep -q -- "--denoise-steps" "$WORK/err" || fail "--denoise-steps $bad: $(cat "$WORK/err")"
done
# --no-phases plans the pipeline as one sequence, as before (version 2, no phases).
"$QTOOL" plan "$WORK/tf" --max-memory "0=$((lo + 1048576)),cpu=1GiB" $P --no-phases --json -q | python3 -c "
import json, sys; p = json.load(sys.stdin); assert p['version'] == 2 and 'phases' not in p"

# qtool verify runs each plan by phase as planned: the components a phase loads are uploaded at
# its start and freed at its end, streamed ones go through the phase's own slots; every check
# passes, and per phase and GPU the measured peak is at most the predicted one (the memory held
# falls back between phases), with the measured load and step times beside the predicted ones.
for add in 0 262144 1048576 4194304 67108864; do
  "$QTOOL" verify "$WORK/tf" --plan "$WORK/p$add.json" --backend cpu --steps 2 --denoise-steps 2 \
    --report "$WORK/vr$add.json" -q || fail "verify of the plan by phase at $((lo + add))"
  python3 - "$WORK/vr$add.json" "$WORK/p$add.json" <<'PY'
import json, sys
r, p = (json.load(open(f)) for f in sys.argv[1:])
assert r["passed"] and all(c["status"] != "fail" for c in r["checks"]), r["checks"]
peak = next(c for c in r["checks"] if c["name"] == "peak memory")
assert peak["status"] == "pass" and "by phase:" in peak["detail"], peak
# The whole run's figure mixes phases: the check leads with each GPU's largest phase instead.
assert peak["detail"].startswith("gpu 0 ") and "predicted (the largest phase's)" in peak["detail"], peak
phases = r["plan_phases"]
assert [ph["phase"] for ph in phases] == [ph["name"] for ph in p["phases"]], phases
modes = {c["name"]: c["mode"] for ph in p["phases"] for c in ph["components"]}
for ph, pp in zip(phases, p["phases"]):
    assert ph["predicted_load_s"] == pp["load_s"] and ph["predicted_step_s"] == pp["step_s"], ph
    assert ph["measured_passes"] == (2 if ph["phase"] == "denoise" else 1), ph
    assert ph["measured_load_s"] >= 0 and ph["measured_step_s"] > 0, ph
    assert abs(ph["measured_time_s"] - (ph["measured_load_s"] + pp["repeat"] * ph["measured_step_s"])) < 1e-9, ph
    # What a phase uploads at its start: its loaded and streamed components' resident weights.
    loads = [c for c in pp["components"] if c["mode"] != "resident"]
    assert (ph["measured_load_bytes"] > 0) == any(c["load_bytes"] > 0 for c in loads), (ph, pp["components"])
    for d, dp in zip(ph["devices"], pp["devices"]):
        assert d["predicted_peak_bytes"] == dp["predicted_peak"], d
        assert 0 < d["measured_peak_bytes"] <= d["predicted_peak_bytes"], (ph["phase"], d)
# Memory follows the phases: with a component loaded, some phase holds less than another.
held = [ph["devices"][0]["held_bytes"] for ph in phases]
if "loaded" in modes.values():
    assert min(held) < max(held), held
PY
done
verify_2() {  # verify_2 PLAN WORDS...: exit 2, the message naming each word
  set +e
  "$QTOOL" verify "$WORK/tf" --plan "$1" --backend cpu --steps 1 --denoise-steps 2 -q 2>"$WORK/err" >/dev/null; rc=$?
  set -e
  [ "$rc" -eq 2 ] || fail "verify $1 exited $rc: $(cat "$WORK/err")"
  for w in "${@:2}"; do grep -qF -- "$w" "$WORK/err" || fail "verify $1: no '$w' in $(cat "$WORK/err")"; done
}
python3 - "$WORK/p67108864.json" "$WORK/swapped.json" "$WORK/repeat.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
q = json.loads(json.dumps(p))
q["phases"][0]["components"], q["phases"][1]["components"] = q["phases"][1]["components"], q["phases"][0]["components"]
q["phases"][0]["schedule"], q["phases"][1]["schedule"] = q["phases"][1]["schedule"], q["phases"][0]["schedule"]
json.dump(q, open(sys.argv[2], "w"))
q = json.loads(json.dumps(p))
q["phases"][3]["repeat"] = 2
q["phases"][3]["time_s"] = q["phases"][3]["load_s"] + 2 * q["phases"][3]["step_s"]
q["predicted_job_s"] = q["job_load_s"] + sum(ph["time_s"] for ph in q["phases"])
json.dump(q, open(sys.argv[3], "w"))
PY
verify_2 "$WORK/swapped.json" "plan phase" "text_encoder"
verify_2 "$WORK/repeat.json" "plan phase 'vae': repeat 2"
"$QTOOL" plan "$WORK/tf" --max-memory "0=$((lo + 1048576)),cpu=1GiB" $P --no-phases -o "$WORK/seq.json" -q
"$QTOOL" verify "$WORK/tf" --plan "$WORK/seq.json" --backend cpu --steps 1 --denoise-steps 2 -q ||
  fail "verify of the --no-phases plan"

# A plan file of a checkpoint without phases is still version 2.
"$QTOOL" synth --preset tiny -o "$WORK/tiny" -q
"$QTOOL" plan "$WORK/tiny" --max-memory 0=1GiB $P --json -q | python3 -c "
import json, sys; p = json.load(sys.stdin); assert p['version'] == 2 and 'phases' not in p"
echo "plan phases e2e ok"
