#!/usr/bin/env bash
# Hostile input through the CLI (issue 9: crashes, hangs, and exit 3 where the user is at fault):
# every one must exit 2 naming the file, key or option, within a time limit, and leave no output.
#   deep JSON and duplicate keys in every JSON reader, 1e400, wrong-typed values; size strings a
#   double cannot hold; paths that are not UTF-8 in JSON output; --tokens, --threads, prefetch,
#   n_slots, arena_offset out of range; FIFOs where files are expected; a thread that cannot start;
#   a quant-state shape whose element count wraps past 2^64.
#   harden_cli.sh QTOOL
set -uo pipefail
QTOOL=$1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SEED=${QTOOL_TEST_SEED:-$RANDOM}
echo "seed $SEED"
"$QTOOL" synth --preset tiny --seed "$SEED" -o "$WORK/tiny" -q || exit 1
"$QTOOL" synth --preset tiny-flux --seed "$SEED" -o "$WORK/flux" -q || exit 1

fails=0
# expect RC PATTERN -- command...: runs it (30 s at most), checks the exit code and that stderr
# matches PATTERN (extended regex).
expect() {
  local want=$1 pattern=$2
  shift 3
  timeout 30 "$@" >"$WORK/out" 2>"$WORK/err" </dev/null
  local rc=$?
  if [ "$rc" -ne "$want" ] || { [ -n "$pattern" ] && ! grep -qE -- "$pattern" "$WORK/err"; }; then
    echo "FAIL: $* -> exit $rc (wanted $want), stderr:"; head -c 600 "$WORK/err"; echo "  (wanted /$pattern/)"
    fails=$((fails + 1))
  fi
}
no_output() {
  if [ -e "$1" ]; then echo "FAIL: $1 exists after an error"; fails=$((fails + 1)); rm -rf "$1"; fi
}
# A copy of a synthetic checkpoint to break.
copy() { rm -rf "$WORK/$2"; cp -r "$WORK/$1" "$WORK/$2"; echo "$WORK/$2"; }
deep() { python3 -c "import sys; n=int(sys.argv[1]); sys.stdout.write(sys.argv[2] + '['*n + ']'*n + sys.argv[3])" "$@"; }

# A profile with small fixed costs so that MiB budgets force streaming on tiny models.
cat > "$WORK/small.json" <<'JSON'
{"format": "qtool-device-profile", "version": 1, "name": "small-test",
 "context_bytes": 1048576, "cublas_workspace_bytes": 1048576, "alloc_granularity_bytes": 4096,
 "pinned_page_table_bytes_per_gib": 4096}
JSON
PLAN_ARGS=(--max-memory 0=64GiB,cpu=64GiB --tokens 16 --device-profile "$WORK/small.json")

# ---- Deep JSON (SIGSEGV before) in every reader -------------------------------------------------
D=100000
m=$(copy tiny deep-config); deep $D '{"a": ' '}' > "$m/config.json"
expect 2 'config\.json: invalid JSON at byte [0-9]+: .*nested deeper than 128' -- "$QTOOL" inspect "$m"
expect 2 'config\.json: .*nested deeper' -- "$QTOOL" plan "$m" "${PLAN_ARGS[@]}"
expect 2 'config\.json: .*nested deeper' -- "$QTOOL" quantize "$m" --scheme int8 -o "$WORK/o"
expect 2 'config\.json: .*nested deeper' -- "$QTOOL" dequantize "$m" -o "$WORK/o"
no_output "$WORK/o"
m=$(copy flux deep-index); deep $D '{"_class_name": "FluxPipeline", "x": ' '}' > "$m/model_index.json"
expect 2 'model_index\.json: .*byte [0-9]+.*nested deeper' -- "$QTOOL" inspect "$m"
deep $D '' '' > "$WORK/deep-cfg.json"
expect 2 'deep-cfg\.json: .*nested deeper' -- "$QTOOL" quantize "$WORK/tiny" --config "$WORK/deep-cfg.json" -o "$WORK/o"
expect 2 '--max-memory: invalid JSON at byte 133: .*nested deeper' -- \
  "$QTOOL" plan "$WORK/tiny" --max-memory "$(deep 3000 '{"0": ' '}')"
deep $D '{"0": ' '}' > "$WORK/deep-budget.json"
expect 2 'deep-budget\.json.*nested deeper' -- "$QTOOL" plan "$WORK/tiny" --max-memory "$WORK/deep-budget.json"
deep $D '{"format": "qtool-device-profile", "version": 1, "x": ' '}' > "$WORK/deep-profile.json"
expect 2 'deep-profile\.json: .*nested deeper' -- "$QTOOL" plan "$WORK/tiny" --device-profile "$WORK/deep-profile.json"
deep $D '' '' > "$WORK/deep-plan.json"
expect 2 'deep-plan\.json: .*nested deeper' -- "$QTOOL" verify "$WORK/tiny" --plan "$WORK/deep-plan.json" --backend cpu
# A sharded model's index.
"$QTOOL" synth --preset tiny --seed "$SEED" --max-shard-size 200KB -o "$WORK/sharded" -q || exit 1
m=$(copy sharded deep-shards); deep $D '{"weight_map": {}, "x": ' '}' > "$m/model.safetensors.index.json"
expect 2 'model\.safetensors\.index\.json: .*nested deeper' -- "$QTOOL" inspect "$m"
mkdir -p "$WORK/models"; deep $D '' '' > "$WORK/models/t.json"
expect 2 't\.json: .*nested deeper' -- "$QTOOL" plan "$WORK/tiny" "${PLAN_ARGS[@]}" --models-dir "$WORK/models"

# ---- Duplicate keys (silently resolved before) ---------------------------------------------------
printf '%s' '{"quant_backend": "int8", "quant_backend": "nf4"}' > "$WORK/dup.json"
expect 2 "dup\.json: invalid JSON.*duplicate key 'quant_backend'" -- "$QTOOL" quantize "$WORK/tiny" --config "$WORK/dup.json" -o "$WORK/o"
expect 2 "--max-memory: invalid JSON.*duplicate key '0'" -- "$QTOOL" plan "$WORK/tiny" --max-memory '{"0": "1GiB", "0": "2GiB"}'
m=$(copy tiny dup-config); python3 - "$m/config.json" <<'PY'
import sys
p = sys.argv[1]
t = open(p).read().rstrip()
assert t.endswith("}")
open(p, "w").write(t[:-1] + ', "model_type": "t5"}')
PY
expect 2 "config\.json: invalid JSON.*duplicate key 'model_type'" -- "$QTOOL" quantize "$m" --scheme int8 -o "$WORK/o"
no_output "$WORK/o"

# ---- Numbers outside the double range, wrong types (exit 3 before) ------------------------------
printf '%s' '{"quant_backend": "nf4", "quant_kwargs": {"blocksize": 1e400}}' > "$WORK/big.json"
expect 2 'big\.json: invalid JSON at byte [0-9]+: .*number overflow' -- "$QTOOL" quantize "$WORK/tiny" --config "$WORK/big.json" -o "$WORK/o"
expect 2 '--max-memory: invalid JSON at byte [0-9]+' -- "$QTOOL" plan "$WORK/tiny" --max-memory '{"0": -1e400}'
printf '%s' '{"format": "qtool-device-profile", "version": 1, "h2d_pinned_gbps": 1e999}' > "$WORK/big-profile.json"
expect 2 'big-profile\.json: invalid JSON at byte' -- "$QTOOL" plan "$WORK/tiny" --device-profile "$WORK/big-profile.json"
printf '%s' '{"format": 5, "version": 1, "templates": []}' > "$WORK/models/t.json"
expect 2 "t\.json: key 'format' must be" -- "$QTOOL" plan "$WORK/tiny" "${PLAN_ARGS[@]}" --models-dir "$WORK/models"

# ---- Size strings a double cannot hold (std::stod threw: exit 3) --------------------------------
BIG=$(python3 -c "print('9' * 400)")
TINY=$(python3 -c "print('0.' + '0' * 400 + '1')")
expect 2 '--max-shard-size' -- "$QTOOL" quantize "$WORK/tiny" --scheme int8 --max-shard-size "${BIG}GB" -o "$WORK/o"
expect 2 '--max-shard-size: must be more than 0' -- "$QTOOL" quantize "$WORK/tiny" --scheme int8 --max-shard-size "${TINY}GB" -o "$WORK/o"
expect 2 "--max-memory '0'" -- "$QTOOL" plan "$WORK/tiny" --max-memory "0=${BIG}GiB"
expect 2 "--max-memory 'cpu'" -- "$QTOOL" plan "$WORK/tiny" --max-memory "{\"0\": \"1GiB\", \"cpu\": \"${BIG}\"}"
expect 2 '--max-memory' -- "$QTOOL" plan "$WORK/tiny" --max-memory "0=-1"
no_output "$WORK/o"

# ---- Paths that are not UTF-8, in JSON output (type_error: exit 3 before) -----------------------
NU="$WORK/caf$(printf '\351')"
mkdir -p "$NU"
cp -r "$WORK/tiny" "$NU/tiny"
expect 0 '' -- "$QTOOL" inspect "$NU/tiny" --json
python3 -c "import json,sys; d=json.load(open(sys.argv[1])); assert d['path'].endswith('caf\ufffd/tiny'), d['path']" "$WORK/out" ||
  { echo "FAIL: inspect --json of a non-UTF-8 path"; fails=$((fails + 1)); }
expect 0 '' -- "$QTOOL" plan "$NU/tiny" "${PLAN_ARGS[@]}" -o "$NU/plan.json" --json
python3 -c "import json,sys; json.load(open(sys.argv[1], 'rb'))" "$NU/plan.json" ||
  { echo "FAIL: plan -o with a non-UTF-8 path is not JSON"; fails=$((fails + 1)); }
expect 0 '' -- "$QTOOL" quantize "$NU/tiny" --scheme int8 -o "$NU/q" --report "$NU/report.json" -q
python3 -c "import json,sys; d=json.load(open(sys.argv[1], 'rb')); assert 'caf\ufffd' in d['input'], d['input']" "$NU/report.json" ||
  { echo "FAIL: quantize --report with a non-UTF-8 path"; fails=$((fails + 1)); }
# A --report that cannot be written is refused before the conversion, not after its commit.
expect 2 '--report: the folder .*no-such-dir does not exist' -- \
  "$QTOOL" quantize "$WORK/tiny" --scheme int8 -o "$WORK/o" --report "$WORK/no-such-dir/r.json"
no_output "$WORK/o"

# ---- --tokens, --prefetch, --threads out of range -----------------------------------------------
expect 2 '--tokens' -- "$QTOOL" plan "$WORK/tiny" "${PLAN_ARGS[@]}" --tokens -1
expect 2 '--tokens' -- "$QTOOL" plan "$WORK/tiny" --max-memory 0=64GiB,cpu=64GiB --tokens 1152921504606846976
expect 2 '--prefetch' -- "$QTOOL" plan "$WORK/tiny" "${PLAN_ARGS[@]}" --prefetch 100000000
expect 2 '--blocks-per-group' -- "$QTOOL" plan "$WORK/tiny" "${PLAN_ARGS[@]}" --blocks-per-group 4294967295
"$QTOOL" plan "$WORK/tiny" "${PLAN_ARGS[@]}" -o "$WORK/plan.json" -q || exit 1
expect 2 '--tokens' -- "$QTOOL" verify "$WORK/tiny" --plan "$WORK/plan.json" --backend cpu --tokens 4611686018427387904
expect 2 '--tokens' -- "$QTOOL" verify "$WORK/tiny" --plan "$WORK/plan.json" --backend cpu --tokens -5
for t in -1 100000 1000000; do
  expect 2 '--threads' -- "$QTOOL" quantize "$WORK/tiny" --scheme int8 -o "$WORK/o" --threads $t
  expect 2 '--threads' -- "$QTOOL" dequantize "$WORK/tiny" -o "$WORK/o" -j $t
  expect 2 '--threads' -- "$QTOOL" verify "$WORK/tiny" --plan "$WORK/plan.json" --backend cpu --threads $t
  expect 2 '--threads' -- "$QTOOL" synth --preset tiny -o "$WORK/o" --threads $t
  expect 2 '--threads' -- "$QTOOL" profile --backend cpu --threads $t
done
no_output "$WORK/o"
# A worker thread the system cannot start: a clean exit 2, no deadlock (the hook fails worker 3).
expect 2 'cannot start worker thread 4 of 8' -- \
  env QTOOL_TEST_FAIL_THREAD=3 "$QTOOL" quantize "$WORK/tiny" --scheme int8 -o "$WORK/o" --threads 8
no_output "$WORK/o"

# ---- Hand-edited plans: settings and offsets past their range ------------------------------------
# A plan where groups are streamed: the smallest GPU budget plan accepts, from its error message.
"$QTOOL" plan "$WORK/tiny" --max-memory 0=1KiB,cpu=1GiB --tokens 16 --device-profile "$WORK/small.json" 2>"$WORK/err" >/dev/null
LO=$(sed -n 's/.*Smallest budget that fits: --max-memory 0=\([0-9]*\).*/\1/p' "$WORK/err")
[ -n "$LO" ] || { echo "FAIL: no smallest budget: $(cat "$WORK/err")"; exit 1; }
"$QTOOL" plan "$WORK/tiny" --max-memory "0=$LO,cpu=1GiB" --tokens 16 --device-profile "$WORK/small.json" -o "$WORK/sp.json" -q || exit 1
edit_plan() {  # edit_plan OUT PYTHON-STATEMENT (on p)
  python3 -c "import json,sys; p=json.load(open(sys.argv[1])); $2; json.dump(p, open(sys.argv[3], 'w'))" "$WORK/sp.json" "$2" "$1"
}
python3 -c "import json,sys; p=json.load(open(sys.argv[1])); assert p['groups'], 'no streamed group'" "$WORK/sp.json" || exit 1
expect 0 '' -- "$QTOOL" verify "$WORK/tiny" --plan "$WORK/sp.json" --backend cpu --steps 1 -q
edit_plan "$WORK/e.json" "p['settings']['tokens'] = 2**62"
expect 2 "e\.json: key 'settings\.tokens' is 4611686018427387904, more than" -- "$QTOOL" verify "$WORK/tiny" --plan "$WORK/e.json" --backend cpu
edit_plan "$WORK/e.json" "p['settings']['prefetch'] = 10**8"
expect 2 "key 'settings\.prefetch' is 100000000" -- "$QTOOL" verify "$WORK/tiny" --plan "$WORK/e.json" --backend cpu
edit_plan "$WORK/e.json" "p['devices'][0]['n_slots'] = 2**32 - 1"
expect 2 "key 'devices\[0\]\.n_slots' is 4294967295" -- "$QTOOL" verify "$WORK/tiny" --plan "$WORK/e.json" --backend cpu
# The last tensor of group 0 moved to 2^64 - 256: offset + nbytes wraps past 2^64.
edit_plan "$WORK/e.json" "t=p['groups'][0]['tensors'][-1]; t['arena_offset'] = 2**64 - 256"
expect 2 "groups\[0\]: tensor '[^']+' arena_offset 18446744073709551360 \+ nbytes [0-9]+ is past 2\^64" -- \
  "$QTOOL" verify "$WORK/tiny" --plan "$WORK/e.json" --backend cpu
edit_plan "$WORK/e.json" "p['groups'][0]['arena_bytes'] = 2**64 - 1"
expect 2 "groups\[0\]: arena_bytes 18446744073709551615 is not" -- "$QTOOL" verify "$WORK/tiny" --plan "$WORK/e.json" --backend cpu
edit_plan "$WORK/e.json" "p['schedule'][0]['group'] = 2**32"
expect 2 "schedule\[0\]\.group 4294967296 out of range" -- "$QTOOL" verify "$WORK/tiny" --plan "$WORK/e.json" --backend cpu
edit_plan "$WORK/e.json" "p['predicted_step_s'] = 'fast'"
expect 2 "key '\.predicted_step_s' must be a number" -- "$QTOOL" verify "$WORK/tiny" --plan "$WORK/e.json" --backend cpu

# ---- FIFOs where files are expected (blocked forever before) ------------------------------------
m=$(copy tiny fifo-config); rm "$m/config.json"; mkfifo "$m/config.json"
expect 2 'config\.json: not a regular file \(a FIFO\)' -- "$QTOOL" inspect "$m"
expect 2 'config\.json: not a regular file' -- "$QTOOL" plan "$m" "${PLAN_ARGS[@]}"
expect 2 'config\.json: not a regular file' -- "$QTOOL" quantize "$m" --scheme int8 -o "$WORK/o"
m=$(copy flux fifo-index); rm "$m/model_index.json"; mkfifo "$m/model_index.json"
expect 2 'model_index\.json: not a regular file' -- "$QTOOL" inspect "$m"
m=$(copy flux fifo-other); mkfifo "$m/notes.txt"
expect 2 'notes\.txt: not a regular file' -- "$QTOOL" quantize "$m" --scheme int8 -o "$WORK/o"
mkfifo "$WORK/fifo.json"
expect 2 'fifo\.json: not a regular file' -- "$QTOOL" quantize "$WORK/tiny" --config "$WORK/fifo.json" -o "$WORK/o"
expect 2 'fifo\.json: not a regular file' -- "$QTOOL" verify "$WORK/tiny" --plan "$WORK/fifo.json" --backend cpu
expect 2 '--device-profile' -- "$QTOOL" plan "$WORK/tiny" --device-profile "$WORK/fifo.json"
expect 2 '--max-memory' -- "$QTOOL" plan "$WORK/tiny" --max-memory "$WORK/fifo.json"
expect 2 'fifo\.json' -- "$QTOOL" inspect "$WORK/fifo.json"
no_output "$WORK/o"

# ---- A quant-state shape whose element count wraps past 2^64 (UBSan overflow, abort before) -----
"$QTOOL" quantize "$WORK/tiny" --scheme nf4 -o "$WORK/nf4" -q || exit 1
python3 - "$WORK/nf4/model.safetensors" <<'PY' || exit 1
# Rewrites the first quant_state so that shape = [1 + 2^(64-a), n] where n = rows * cols and 2^a
# divides n: the product wraps to n exactly, so every other check of the old code passed.
import json, struct, sys
path = sys.argv[1]
raw = open(path, "rb").read()
hlen = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + hlen])
data = raw[8 + hlen:]
name = next(k for k in header if ".quant_state." in k)
b, e = header[name]["data_offsets"]
state = json.loads(data[b:e])
n = state["shape"][0] * state["shape"][1]
a = (n & -n).bit_length() - 1
assert a >= 2, n
state["shape"] = [1 + 2 ** (64 - a), n]
assert (state["shape"][0] * state["shape"][1]) % 2**64 == n
blob = json.dumps(state).encode()
tensors = {k: v for k, v in header.items() if k != "__metadata__"}
chunks, off, out_header = [], 0, {}
if "__metadata__" in header: out_header["__metadata__"] = header["__metadata__"]
for k, v in sorted(tensors.items(), key=lambda kv: kv[1]["data_offsets"][0]):
    bytes_ = blob if k == name else data[v["data_offsets"][0]:v["data_offsets"][1]]
    shape = [len(bytes_)] if k == name else v["shape"]
    out_header[k] = {"dtype": v["dtype"], "shape": shape, "data_offsets": [off, off + len(bytes_)]}
    chunks.append(bytes_)
    off += len(bytes_)
h = json.dumps(out_header).encode()
h += b" " * (-len(h) % 8)
open(path, "wb").write(struct.pack("<Q", len(h)) + h + b"".join(chunks))
print(name)
PY
expect 2 "quant_state\.bitsandbytes__nf4'.*quant_state key 'shape'.*more elements than fit in 64 bits" -- \
  "$QTOOL" plan "$WORK/nf4" "${PLAN_ARGS[@]}"
expect 2 "quant_state key 'shape'.*64 bits" -- "$QTOOL" dequantize "$WORK/nf4" -o "$WORK/o"
no_output "$WORK/o"

if [ "$fails" -ne 0 ]; then
  echo "$fails failure(s)"
  exit 1
fi
echo "every hostile input exited 2 in time"
