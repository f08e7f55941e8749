#!/usr/bin/env bash
# qtool verify refuses (exit 2, naming the plan item) a hand-edited plan whose parts disagree with
# each other or with the checkpoint, before anything runs: a device_map that contradicts the groups
# and the schedule, a linear taken out of its group and re-declared as a tied alias, a reversed or
# duplicated schedule, edited linear shapes or kinds, a tensor listed twice, a tied alias whose
# primary is missing, a group tensor no step runs. The plans qtool writes still pass (streamed,
# all resident, tied embeddings, a pipeline).
#   accept_plan.sh QTOOL SOURCE_DIR
set -uo pipefail
QTOOL=$1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SEED=${QTOOL_TEST_SEED:-$RANDOM}
echo "seed $SEED"

fails=0
expect() {
  local want=$1 pattern=$2
  shift 3
  "$@" >"$WORK/out" 2>"$WORK/err"
  local rc=$?
  if [ "$rc" -ne "$want" ] || { [ -n "$pattern" ] && ! grep -qaE -- "$pattern" "$WORK/err"; }; then
    echo "FAIL: $* -> exit $rc (wanted $want), stderr:"; cat "$WORK/err"; echo "  (wanted /$pattern/)"
    fails=$((fails + 1))
  fi
}

# A profile with small fixed costs so that MiB budgets force streaming on tiny models. Pipelines are
# planned as one sequence (--no-phases): the hand edits below are of the schedule verify runs.
cat > "$WORK/small.json" <<'JSON'
{"format": "qtool-device-profile", "version": 1, "name": "small-test",
 "context_bytes": 1048576, "cublas_workspace_bytes": 1048576, "alloc_granularity_bytes": 4096,
 "pinned_page_table_bytes_per_gib": 4096}
JSON
smallest() {
  "$QTOOL" plan "$1" --max-memory 0=1KiB,cpu=1GiB --tokens 16 --device-profile "$WORK/small.json" --no-phases "${@:2}" 2>&1 >/dev/null |
    sed -n 's/.*Smallest budget that fits: --max-memory 0=\([0-9]*\).*/\1/p'
}
# plan CKPT OUT EXTRA_BYTES [OPTIONS]: a plan with a GPU budget EXTRA_BYTES above the smallest.
plan() {
  local lo
  lo=$(smallest "$1" "${@:4}")
  [ -n "$lo" ] || { echo "FAIL: no smallest budget for $1"; exit 1; }
  "$QTOOL" plan "$1" --max-memory "0=$((lo + $3)),cpu=1GiB" --tokens 16 --device-profile "$WORK/small.json" \
    --no-phases -o "$2" -q "${@:4}" || exit 1
}
verify() { "$QTOOL" verify "$1" --plan "$2" --backend cpu --steps 1; }

"$QTOOL" synth --preset tiny --seed "$SEED" -o "$WORK/t" -q || exit 1
"$QTOOL" quantize "$WORK/t" --scheme nf4 -o "$WORK/q" -q || exit 1
"$QTOOL" synth --preset llama-tied --scale 0.01 --seed "$SEED" -o "$WORK/lt" -q || exit 1
"$QTOOL" synth --preset tiny-flux --seed "$SEED" -o "$WORK/tf" -q || exit 1
"$QTOOL" quantize "$WORK/tf" --scheme int8 -o "$WORK/tfq" -q || exit 1

plan "$WORK/q" "$WORK/stream.json" 400000    # most blocks streamed from pinned memory
plan "$WORK/q" "$WORK/leaf.json" 400000 --offload leaf
"$QTOOL" plan "$WORK/q" --max-memory 0=1GiB,cpu=1GiB --tokens 16 --device-profile "$WORK/small.json" -o "$WORK/res.json" -q ||
  exit 1
plan "$WORK/lt" "$WORK/tied.json" 100000
plan "$WORK/tfq" "$WORK/pipe.json" 300000
"$QTOOL" plan "$WORK/tfq" --max-memory 0=1GiB,cpu=1GiB --tokens 16 --device-profile "$WORK/small.json" \
  --no-phases -o "$WORK/pipe-res.json" -q || exit 1
python3 -c "import json,sys; p=json.load(open(sys.argv[1])); assert len(p['groups']) >= 3 and any(s['group'] < 0 for s in p['schedule']), p['groups']" \
  "$WORK/stream.json" || { echo "FAIL: the streamed plan streams too little"; fails=$((fails + 1)); }
python3 -c "import json,sys; p=json.load(open(sys.argv[1])); assert p['components'][0]['tied'] and p['groups']" \
  "$WORK/tied.json" || { echo "FAIL: the tied plan has no tie or no group"; fails=$((fails + 1)); }

# The plans qtool writes pass.
expect 0 '' -- verify "$WORK/q" "$WORK/stream.json"
expect 0 '' -- verify "$WORK/q" "$WORK/res.json"
expect 0 '' -- verify "$WORK/lt" "$WORK/tied.json"
expect 0 '' -- verify "$WORK/tfq" "$WORK/pipe.json"
expect 0 '' -- verify "$WORK/tfq" "$WORK/pipe-res.json"
expect 0 '' -- verify "$WORK/q" "$WORK/leaf.json"

# edit BASE OUT PYTHON: OUT is BASE's plan after running PYTHON on it (as `p`).
edit() {
  python3 - "$WORK/$1.json" "$WORK/$2.json" "$3" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
c = p["components"][0]
dm = c["device_map"]
def step_of(tensor):
    return next(s for s in p["schedule"] if tensor in s["tensors"])
def group_of(tensor):
    return next(g for g in p["groups"] if any(t["name"] == tensor for t in g["tensors"]))
def append_to_group(g, name, nbytes):
    off = (g["arena_bytes"] + 255) // 256 * 256
    g["tensors"].append({"name": name, "nbytes": nbytes, "arena_offset": off})
    g["arena_bytes"] = (off + nbytes + 255) // 256 * 256
exec(sys.argv[3])
json.dump(p, open(sys.argv[2], "w"), indent=1)
PY
}
W=model.layers.1.mlp.down_proj.weight  # in the all-resident plan
# A linear weight that the streamed plan puts in a group.
WS=$(python3 -c "import json,sys; p=json.load(open(sys.argv[1])); print(next(t['name'] for g in p['groups'] for t in g['tensors'] if t['name'].endswith('down_proj.weight')))" "$WORK/stream.json")
[ -n "$WS" ] || { echo "FAIL: no streamed linear"; exit 1; }

# device_map against the schedule and the groups.
edit stream e1 'k = next(k for k, v in dm.items() if v == 0); dm[k] = "cpu"'
expect 2 "device_map\['[^']+'\] = cpu, but tensor '[^']+' is resident on gpu 0 \(schedule\[[0-9]+\]\): the device map a loader deploys must be the plan verified" -- \
  verify "$WORK/q" "$WORK/e1.json"
edit stream e2 'k = next(k for k, v in dm.items() if v == "cpu"); dm[k] = 0'
expect 2 "device_map\['[^']+'\] = 0, but tensor '[^']+' is in groups\[[0-9]+\] \(target cpu\)" -- verify "$WORK/q" "$WORK/e2.json"
edit res e3 'dm.clear(); dm["model.layers"] = 0; dm["lm_head"] = 0'
expect 2 "no key covers tensor 'model\.(embed_tokens|norm)\.weight'" -- verify "$WORK/q" "$WORK/e3.json"
edit res e4 'dm["model.layers.1"] = 0'
expect 2 "device_map\['model\.layers\.1'\]: overlaps key ''|device_map\[''\]: the whole component is mapped, yet other keys overlap" -- \
  verify "$WORK/q" "$WORK/e4.json"
edit res e5 'dm["decoder.nothing"] = 0; del dm[""]; dm["model"] = 0; dm["lm_head"] = 0'
expect 2 "device_map\['decoder\.nothing'\]: names no module or tensor" -- verify "$WORK/q" "$WORK/e5.json"

# A linear taken out of its step (and group) and re-declared as a tied alias of another tensor.
edit stream e6 '
g = group_of("'$WS'")
g["tensors"] = [t for t in g["tensors"] if t["name"] != "'$WS'"]
s = step_of("'$WS'")
s["tensors"].remove("'$WS'")
s["linears"] = [l for l in s["linears"] if l["weight"] != "'$WS'"]
c["tied"].append({"alias": "'$WS'", "primary": "'${WS/down_proj/up_proj}'"})'
expect 2 "tied\[0\]: '${WS//./\\.}' is a tensor of the checkpoint that differs from its declared primary" -- \
  verify "$WORK/q" "$WORK/e6.json"
edit res e7 '
s = step_of("'$W'")
s["tensors"].remove("'$W'")
c["tied"].append({"alias": "'$W'", "primary": "model.layers.1.mlp.gate_proj.weight"})'
expect 2 "is a tensor of the checkpoint that differs from its declared primary" -- verify "$WORK/q" "$WORK/e7.json"
# ... or only taken out of its step's tensors (the group still copies it), or run by another step.
edit stream e8 'step_of("'$WS'")["tensors"].remove("'$WS'")'
expect 2 "groups\[[0-9]+\]: tensor '$WS' is copied but no step that streams the group lists it" -- verify "$WORK/q" "$WORK/e8.json"
edit res e9 'step_of("'$W'")["tensors"].remove("'$W'"); p["schedule"][-1]["tensors"].append("'$W'")'
expect 2 "linears\[[0-9]+\] \('model\.layers\.1\.mlp\.down_proj'\): its weight '$W' is not among the step's tensors" -- \
  verify "$WORK/q" "$WORK/e9.json"
# A tied alias whose primary is missing, or tied to itself.
edit tied e10 'c["tied"][0]["primary"] = "model.embed_tokens.weight_gone"'
expect 2 "tied\[0\]: the primary 'model\.embed_tokens\.weight_gone' of tied alias 'lm_head\.weight' is not in the checkpoint" -- \
  verify "$WORK/lt" "$WORK/e10.json"
edit tied e11 'c["tied"].append(dict(c["tied"][0]))'
expect 2 "tied\[1\]: alias 'lm_head\.weight' is listed twice" -- verify "$WORK/lt" "$WORK/e11.json"

# Reversed and duplicated schedules.
edit stream e12 'p["schedule"].reverse()'
expect 2 "schedule\[[0-9]+\]: streams groups\[[0-9]+\] before groups\[0\] was used" -- verify "$WORK/q" "$WORK/e12.json"
edit res e13 'p["schedule"].reverse()'
expect 2 "schedule\[[0-9]+\]: runs block model\.layers\.[0-9] after block model\.layers\.[0-9]" -- verify "$WORK/q" "$WORK/e13.json"
edit res e14 'p["schedule"].insert(2, dict(p["schedule"][1]))'
expect 2 "schedule\[2\]: tensor '[^']+' is also listed by schedule\[1\]" -- verify "$WORK/q" "$WORK/e14.json"
edit stream e15 'p["schedule"].append(dict(p["schedule"][0]))'
expect 2 "schedule\[[0-9]+\]: tensor '[^']+' is also listed by schedule\[0\]" -- verify "$WORK/q" "$WORK/e15.json"
edit res e16 's = p["schedule"]; s[1], s[2] = s[2], s[1]'
expect 2 "runs block model\.layers\.0 after block model\.layers\.1" -- verify "$WORK/q" "$WORK/e16.json"
edit stream e17 '
s = p["schedule"]
i = next(i for i in range(len(s) - 1) if 0 <= s[i]["group"] < s[i + 1]["group"])
s[i], s[i + 1] = s[i + 1], s[i]'
expect 2 "schedule\[[0-9]+\]: streams groups\[[0-9]+\] before groups\[[0-9]+\] was used" -- verify "$WORK/q" "$WORK/e17.json"
edit pipe-res e18 's = p["schedule"]; moved = s.pop(0); s.append(moved)'
expect 2 "schedule\[[0-9]+\]: runs component '[a-z_0-9]*' \(components\[0\]\) after components\[[0-9]+\]" -- verify "$WORK/tfq" "$WORK/e18.json"

# Edited linear shapes and kinds.
edit res e19 'l = step_of("'$W'")["linears"][0]; l["out"] += 1'
expect 2 "linears\[0\] \('[^']+'\): the plan says \[[0-9]+, [0-9]+\] but the checkpoint's '[^']+' is \[[0-9]+, [0-9]+\]" -- \
  verify "$WORK/q" "$WORK/e19.json"
edit stream e20 'l = next(l for l in step_of("'$WS'")["linears"] if l["weight"] == "'$WS'"); l["out"], l["in"] = l["in"], l["out"]'
expect 2 "the plan says \[[0-9]+, [0-9]+\] but the checkpoint's" -- verify "$WORK/q" "$WORK/e20.json"
edit res e21 'l = step_of("'$W'")["linears"][0]; l["kind"] = "int8"'
expect 2 "the plan says kind 'int8' but the checkpoint's '[^']+' is 'nf4'" -- verify "$WORK/q" "$WORK/e21.json"
edit res e22 's = step_of("'$W'"); s["linears"] = s["linears"][1:]'
expect 2 "schedule\[[0-9]+\]: runs linear '[^']+' .*but the step's linears do not declare it" -- verify "$WORK/q" "$WORK/e22.json"
edit res e23 's = step_of("'$W'"); s["linears"].append(dict(s["linears"][0]))'
expect 2 "declared twice in the step" -- verify "$WORK/q" "$WORK/e23.json"

# A tensor listed twice: resident and in a group; twice in a group; twice in a step.
edit stream e24 '
t = p["groups"][0]["tensors"][0]["name"]
next(s for s in p["schedule"] if s["group"] < 0 and s["tensors"])["tensors"].append(t)'
expect 2 "tensor '[^']+' is (also listed by schedule\[[0-9]+\]|resident on gpu 0 in this step but also offloaded in groups\[0\])" -- \
  verify "$WORK/q" "$WORK/e24.json"
edit stream e25 '
g = p["groups"][1]
t = g["tensors"][0]
append_to_group(g, t["name"], t["nbytes"])'
expect 2 "groups\[1\]: tensor '[^']+' is listed twice in the group" -- verify "$WORK/q" "$WORK/e25.json"
edit res e26 's = step_of("'$W'"); s["tensors"].append("'$W'")'
expect 2 "tensor '$W' is listed twice in the step" -- verify "$WORK/q" "$WORK/e26.json"

[ "$fails" -eq 0 ] || { echo "$fails failure(s)"; exit 1; }
echo "every inconsistent plan refused"
