#!/usr/bin/env bash
# Bad input that qtool must refuse (exit 2, naming the file, tensor, offset or link, nothing
# written) rather than accept: bytes after a NUL in a safetensors header; quantized codes without
# their scales (int8 without SCB, fp8 without weight_scale) and a weight_format judged by its first
# byte; NaN/Inf quant state given to dequantize; control characters in tensor and component names;
# symbolic link loops and links to folders outside the checkpoint (while symlinked files, as in the
# Hugging Face cache, are still followed); modules_to_not_convert that excludes everything.
#   accept_inputs.sh QTOOL SOURCE_DIR
set -uo pipefail
QTOOL=$1
SRC=$2
EDIT="python3 $SRC/tests/e2e/st_edit.py"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SEED=${QTOOL_TEST_SEED:-$RANDOM}
echo "seed $SEED"

fails=0
# expect RC PATTERN -- command...: runs it, checks the exit code and that stderr matches PATTERN.
expect() {
  local want=$1 pattern=$2
  shift 3
  "$@" >"$WORK/out" 2>"$WORK/err"
  local rc=$?
  if [ "$rc" -ne "$want" ] || { [ -n "$pattern" ] && ! grep -qaE -- "$pattern" "$WORK/err"; }; then
    echo "FAIL: $* -> exit $rc (wanted $want), stderr:"; cat -v "$WORK/err"; echo "  (wanted /$pattern/)"
    fails=$((fails + 1))
  fi
}
absent() { [ ! -e "$1" ] || { echo "FAIL: $1 was written"; fails=$((fails + 1)); }; }

# One-file Llama-like model (no index to keep in step with the edits), and a pipeline.
"$QTOOL" synth --preset tiny --seed "$SEED" --max-shard-size 0 -o "$WORK/t" -q || exit 1
"$QTOOL" synth --preset tiny-flux --seed "$SEED" -o "$WORK/tf" -q || exit 1
fresh() { rm -rf "$WORK/$2"; cp -r "$WORK/$1" "$WORK/$2"; }

# --- 1. Header bytes after a NUL: only space padding may follow the JSON object. -----------------
fresh t nul
$EDIT after-json "$WORK/nul/model.safetensors" 00676172626167652121
expect 2 'model\.safetensors: header has a NUL byte after its JSON object \(file offset [0-9]+\)' -- \
  "$QTOOL" inspect "$WORK/nul"
fresh t nul2
$EDIT after-json "$WORK/nul2/model.safetensors" 00
expect 2 'NUL byte after its JSON object' -- "$QTOOL" quantize "$WORK/nul2" --scheme int8 -o "$WORK/o"
absent "$WORK/o"
fresh t pad
$EDIT after-json "$WORK/pad/model.safetensors" 20202020
expect 0 '' -- "$QTOOL" inspect "$WORK/pad"

# --- 2. Quantized codes without their scales are not plain weights. ------------------------------
"$QTOOL" quantize "$WORK/t" --scheme int8 -o "$WORK/t-int8" -q || exit 1
"$QTOOL" quantize "$WORK/t" --scheme fp8_e4m3 -o "$WORK/t-fp8" -q || exit 1
"$QTOOL" quantize "$WORK/t" --scheme fp8_e5m2 -o "$WORK/t-e5m2" -q || exit 1
M=model.layers.1.mlp.down_proj
fresh t-int8 noscb
$EDIT drop "$WORK/noscb/model.safetensors" $M.SCB
fresh t-fp8 noscale
$EDIT drop "$WORK/noscale/model.safetensors" $M.weight_scale
fresh t-e5m2 noscale2
$EDIT drop "$WORK/noscale2/model.safetensors" $M.weight_scale
for ck in noscb noscale noscale2; do
  case $ck in
    noscb) want="tensor '$M\.weight': an I8 weight without '$M\.SCB'" ;;
    noscale) want="tensor '$M\.weight': an F8_E4M3 weight without '$M\.weight_scale'" ;;
    noscale2) want="tensor '$M\.weight': an F8_E5M2 weight without '$M\.weight_scale'" ;;
  esac
  expect 2 "$want" -- "$QTOOL" plan "$WORK/$ck" --max-memory 0=1GiB,cpu=1GiB -o "$WORK/p.json"
  absent "$WORK/p.json"
  expect 2 "$want" -- "$QTOOL" dequantize "$WORK/$ck" -o "$WORK/o"
  absent "$WORK/o"
done
# verify: a plan for the damaged checkpoint (the original's, without the dropped tensor, with the
# damaged checkpoint's fingerprint) must not run the module's codes as a weight.
"$QTOOL" plan "$WORK/t-int8" --max-memory 0=1GiB,cpu=1GiB -o "$WORK/p-int8.json" -q || exit 1
"$QTOOL" verify "$WORK/noscb" --plan "$WORK/p-int8.json" --backend cpu -q 2>"$WORK/err"
fp=$(sed -n 's/.* has fingerprint \([0-9a-f]*\).*/\1/p' "$WORK/err")
[ -n "$fp" ] || { echo "FAIL: no fingerprint in: $(cat "$WORK/err")"; fails=$((fails + 1)); }
python3 - "$WORK/p-int8.json" "$WORK/p-noscb.json" "$fp" "$M.SCB" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
p["fingerprint"] = sys.argv[3]
for s in p["schedule"]:
    s["tensors"] = [t for t in s["tensors"] if t != sys.argv[4]]
json.dump(p, open(sys.argv[2], "w"))
PY
expect 2 "tensor '$M\.weight': an I8 weight without '$M\.SCB'" -- \
  "$QTOOL" verify "$WORK/noscb" --plan "$WORK/p-noscb.json" --backend cpu
# weight_format: the whole value counts, not its first byte (I32 256 has a first byte of 0).
fresh t-int8 wf
$EDIT set-scalar "$WORK/wf/model.safetensors" $M.weight_format I32 256
expect 2 "tensor '$M\.weight_format': weight format 256 is not supported" -- "$QTOOL" dequantize "$WORK/wf" -o "$WORK/o"
absent "$WORK/o"
fresh t-int8 wf64
$EDIT set-scalar "$WORK/wf64/model.safetensors" $M.weight_format I64 4294967296
expect 2 "weight format 4294967296 is not supported" -- "$QTOOL" plan "$WORK/wf64" --max-memory 0=1GiB,cpu=1GiB -o "$WORK/p.json"
fresh t-int8 wf0
$EDIT set-scalar "$WORK/wf0/model.safetensors" $M.weight_format I64 0
expect 0 '' -- "$QTOOL" dequantize "$WORK/wf0" -o "$WORK/o" -q
rm -rf "$WORK/o"

# --- 5. dequantize of NaN/Inf quant state: exit 2 naming the tensor and element. ------------------
printf '{"quant_backend":"nf4","quant_kwargs":{"double_quant":true}}' > "$WORK/dq.json"
"$QTOOL" quantize "$WORK/t" --scheme nf4 -o "$WORK/t-nf4" -q || exit 1
"$QTOOL" quantize "$WORK/t" --config "$WORK/dq.json" -o "$WORK/t-dq" -q || exit 1
# CKPT TENSOR ELEMENT VALUE
for bad in "t-nf4 $M.weight.absmax 3 nan" "t-nf4 $M.weight.absmax 0 inf" "t-nf4 $M.weight.quant_map 5 nan" \
           "t-dq $M.weight.nested_absmax 0 -inf" "t-int8 $M.SCB 7 nan" "t-fp8 $M.weight_scale 2 inf"; do
  set -- $bad
  fresh "$1" bad
  $EDIT set-elem "$WORK/bad/model.safetensors" "$2" "$3" "$4"
  expect 2 "tensor '${2//./\\.}': element $3 is -?(NaN|Inf)" -- "$QTOOL" dequantize "$WORK/bad" -o "$WORK/o"
  absent "$WORK/o"
done
expect 0 '' -- "$QTOOL" dequantize "$WORK/t-dq" -o "$WORK/o" -q
rm -rf "$WORK/o"

# --- 6. Control characters in names: exit 2, the name escaped, the message whole. -----------------
fresh t ctl
$EDIT rename "$WORK/ctl/model.safetensors" model.norm.weight 'model.norm\u0000x.weight'
expect 2 "tensor name 'model\.norm\\\\x00x\.weight' holds a control character .* must be printable \(header, file offset [0-9]+\)" -- \
  "$QTOOL" inspect "$WORK/ctl"
fresh t ctl2
$EDIT rename "$WORK/ctl2/model.safetensors" model.norm.weight 'model.norm\u001b[2J.weight'
expect 2 "tensor name 'model\.norm\\\\x1b\[2J\.weight'" -- "$QTOOL" quantize "$WORK/ctl2" --scheme nf4 -o "$WORK/o"
absent "$WORK/o"
fresh tf ctl3
python3 - "$WORK/ctl3/model_index.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
j["text\u0000encoder"] = j.pop("text_encoder")
json.dump(j, open(sys.argv[1], "w"))
PY
expect 2 "model_index\.json: component name 'text\\\\x00encoder' holds a control character .*cannot name a folder" -- \
  "$QTOOL" plan "$WORK/ctl3" --max-memory 0=1GiB,cpu=1GiB -o "$WORK/p.json"
printf '{"quant_backend":"int8","components_to_quantize":["trans\\u0000former"]}' > "$WORK/ctl.json"
expect 2 "components_to_quantize\[0\]: unknown component 'trans\\\\x00former' in .* \(it has" -- \
  "$QTOOL" quantize "$WORK/tf" --config "$WORK/ctl.json" -o "$WORK/o"
absent "$WORK/o"

# --- 3. Symbolic links in the checkpoint folder. ---------------------------------------------------
fresh tf loop
ln -s .. "$WORK/loop/tokenizer/up"
expect 2 "loop/tokenizer/up: a symbolic link loop" -- "$QTOOL" quantize "$WORK/loop" --scheme int8 -o "$WORK/o"
absent "$WORK/o"
fresh tf loop2
ln -s self2 "$WORK/loop2/tokenizer/self1"
ln -s self1 "$WORK/loop2/tokenizer/self2"
expect 2 "loop2/tokenizer/self[12]: a loop of symbolic links" -- "$QTOOL" quantize "$WORK/loop2" --scheme int8 -o "$WORK/o"
absent "$WORK/o"
mkdir -p "$WORK/elsewhere"
echo "not part of the model" > "$WORK/elsewhere/secret.txt"
fresh tf outside
ln -s "$WORK/elsewhere" "$WORK/outside/extra"
expect 2 "outside/extra: a symbolic link to the folder .*elsewhere, outside the checkpoint" -- \
  "$QTOOL" quantize "$WORK/outside" --scheme int8 -o "$WORK/o"
absent "$WORK/o"
expect 2 "outside/extra: a symbolic link to the folder" -- "$QTOOL" dequantize "$WORK/outside" -o "$WORK/o"
absent "$WORK/o"
# A link to a folder inside the checkpoint is followed (its files copied under the link's name).
fresh tf inside
ln -s tokenizer "$WORK/inside/tokenizer_link"
expect 0 '' -- "$QTOOL" quantize "$WORK/inside" --scheme int8 -o "$WORK/o" -q
diff -r "$WORK/inside/tokenizer" "$WORK/o/tokenizer_link" >/dev/null || { echo "FAIL: tokenizer_link not copied"; fails=$((fails + 1)); }
rm -rf "$WORK/o"
# The Hugging Face cache: snapshot files are links to blobs outside the snapshot folder.
HF="$WORK/hub/models--x--tiny-flux"
mkdir -p "$HF/blobs" "$HF/snapshots/abc"
(cd "$WORK/tf" && find . -type f) | while read -r f; do
  blob=$(sha256sum "$WORK/tf/$f" | cut -c1-64)
  cp "$WORK/tf/$f" "$HF/blobs/$blob"
  mkdir -p "$HF/snapshots/abc/$(dirname "$f")"
  depth=$(echo "$f" | tr -cd / | wc -c)
  up=""; for _ in $(seq 1 "$depth"); do up="../$up"; done
  ln -s "${up}../blobs/$blob" "$HF/snapshots/abc/$f"
done
[ -L "$HF/snapshots/abc/transformer/config.json" ] || { echo "FAIL: no cache layout"; fails=$((fails + 1)); }
expect 0 '' -- "$QTOOL" quantize "$HF/snapshots/abc" --scheme nf4 -o "$WORK/o" -q
for f in model_index.json tokenizer/vocab.json scheduler/scheduler_config.json tokenizer_2/spiece.model; do
  [ -e "$WORK/tf/$f" ] || continue
  { [ -f "$WORK/o/$f" ] && [ ! -L "$WORK/o/$f" ] && cmp -s "$WORK/tf/$f" "$WORK/o/$f"; } ||
    { echo "FAIL: $f not copied from the cache layout as a file"; fails=$((fails + 1)); }
done
n_in=$( (cd "$WORK/tf" && find . -type f ! -name '*.safetensors*' ! -name config.json) | sort)
n_out=$( (cd "$WORK/o" && find . -type f ! -name '*.safetensors*' ! -name config.json) | sort)
[ "$n_in" = "$n_out" ] || { echo "FAIL: other files differ: $n_in vs $n_out"; fails=$((fails + 1)); }
rm -rf "$WORK/o"

# --- 4. modules_to_not_convert that leaves nothing to quantize. ------------------------------------
printf '{"quant_backend":"int8","modules_to_not_convert":["*"]}' > "$WORK/all.json"
expect 2 "modules_to_not_convert: nothing would be quantized in the model: the patterns exclude all [0-9]+ of its linear weights \(first '.*' by '\*'\)" -- \
  "$QTOOL" quantize "$WORK/t" --config "$WORK/all.json" -o "$WORK/o"
grep -q "no linear weight" "$WORK/err" && { echo "FAIL: the misleading warning is still printed"; fails=$((fails + 1)); }
absent "$WORK/o"
printf '{"quant_backend":"nf4","components_to_quantize":["transformer"],"modules_to_not_convert":["*"]}' > "$WORK/all2.json"
expect 2 "nothing would be quantized in component 'transformer'" -- "$QTOOL" quantize "$WORK/tf" --config "$WORK/all2.json" -o "$WORK/o"
absent "$WORK/o"

[ "$fails" -eq 0 ] || { echo "$fails failure(s)"; exit 1; }
echo "all bad inputs refused"
