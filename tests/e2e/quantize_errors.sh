#!/usr/bin/env bash
# qtool quantize / dequantize on bad input: config mistakes name the key and exit 2; a pattern that
# matches nothing is a warning; an existing output is refused (exit 2, left as it was) unless
# --force; NaN or Inf in a weight exits 2 naming the tensor and the element, leaving nothing under
# the output name.
#   quantize_errors.sh QTOOL
set -uo pipefail
QTOOL=$1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SEED=${QTOOL_TEST_SEED:-$RANDOM}
echo "seed $SEED"
"$QTOOL" synth --preset tiny-flux --seed "$SEED" -o "$WORK/flux" -q || exit 1

fails=0
# expect RC PATTERN -- command...: runs it, checks the exit code and that stderr matches PATTERN.
expect() {
  local want=$1 pattern=$2
  shift 3
  "$@" >"$WORK/out" 2>"$WORK/err"
  local rc=$?
  if [ "$rc" -ne "$want" ] || ! grep -qE -- "$pattern" "$WORK/err"; then
    echo "FAIL: $* -> exit $rc (wanted $want), stderr:"; cat "$WORK/err"; echo "  (wanted /$pattern/)"
    fails=$((fails + 1))
  fi
}
cfg() { printf '%s' "$2" > "$WORK/$1.json"; echo "$WORK/$1.json"; }

expect 2 'unknown key' -- "$QTOOL" quantize "$WORK/flux" --config "$(cfg k '{"quant_backend":"nf4","quant_kwarg":{}}')" -o "$WORK/o"
expect 2 'k\.json: quant_kwarg: unknown key' -- "$QTOOL" quantize "$WORK/flux" --config "$WORK/k.json" -o "$WORK/o"
expect 2 "quant_mapping\.transformer\.scheme: unknown scheme 'nf5'" -- \
  "$QTOOL" quantize "$WORK/flux" --config "$(cfg s '{"quant_mapping":{"transformer":{"scheme":"nf5"}}}')" -o "$WORK/o"
expect 2 'quant_kwargs\.blocksize: blocksize 100 is not allowed' -- \
  "$QTOOL" quantize "$WORK/flux" --config "$(cfg b '{"quant_backend":"nf4","quant_kwargs":{"blocksize":100}}')" -o "$WORK/o"
expect 2 "components_to_quantize\[1\]: unknown component 'unet'" -- \
  "$QTOOL" quantize "$WORK/flux" --config "$(cfg c '{"quant_backend":"nf4","components_to_quantize":["transformer","unet"]}')" -o "$WORK/o"
expect 2 "quant_mapping\.scheduler: component 'scheduler' holds no weights" -- \
  "$QTOOL" quantize "$WORK/flux" --config "$(cfg w '{"quant_mapping":{"scheduler":{"scheme":"int8"}}}')" -o "$WORK/o"
expect 2 'invalid JSON' -- "$QTOOL" quantize "$WORK/flux" --config "$(cfg j '{"quant_backend": nf4}')" -o "$WORK/o"
expect 2 '--config' -- "$QTOOL" quantize "$WORK/flux" -o "$WORK/o"
expect 2 "unknown scheme 'int4'" -- "$QTOOL" quantize "$WORK/flux" --scheme int4 -o "$WORK/o"
expect 2 'max-shard-size' -- "$QTOOL" quantize "$WORK/flux" --scheme int8 --max-shard-size 12XB -o "$WORK/o"
expect 2 'dtype' -- "$QTOOL" dequantize "$WORK/flux" --dtype int8 -o "$WORK/o"
# fp8_e5m2 in a folder: compressed-tensors' config cannot say e5m2 and loaders would read e4m3.
expect 2 "fp8_e5m2 for component '[a-z_0-9]+' of .*float8_e4m3fn.*use fp8_e4m3" -- \
  "$QTOOL" quantize "$WORK/flux" --scheme fp8_e5m2 -o "$WORK/o"
expect 2 "fp8_e5m2 for component 'text_encoder_2' .*read the codes as e4m3" -- \
  "$QTOOL" quantize "$WORK/flux" --config "$(cfg e '{"quant_mapping":{"transformer":{"scheme":"int8"},"text_encoder_2":{"scheme":"fp8_e5m2"}}}')" -o "$WORK/o"
[ -e "$WORK/o" ] && { echo "FAIL: an output appeared after errors"; fails=$((fails + 1)); }

# A pattern matching nothing: a warning naming it, and the run succeeds.
expect 0 "modules_to_not_convert\[0\]: pattern 'no_such_layer' matches no module" -- \
  "$QTOOL" quantize "$WORK/flux" --config "$(cfg p '{"quant_backend":"int8","components_to_quantize":["transformer"],"modules_to_not_convert":["no_such_layer"]}')" -o "$WORK/o"

# An existing output is refused and left alone; --force replaces it.
expect 2 'exists.*--force' -- "$QTOOL" quantize "$WORK/flux" --scheme nf4 -o "$WORK/o"
[ -f "$WORK/o/model_index.json" ] || { echo "FAIL: the existing output was touched"; fails=$((fails + 1)); }
echo keep > "$WORK/o/mine.txt"
expect 0 '' -- "$QTOOL" quantize "$WORK/flux" --scheme nf4 -o "$WORK/o" --force
[ -e "$WORK/o/mine.txt" ] && { echo "FAIL: --force kept the old output"; fails=$((fails + 1)); }
# The output cannot be the input.
expect 2 'output is the input' -- "$QTOOL" quantize "$WORK/flux" --scheme nf4 -o "$WORK/flux" --force

# NaN / Inf in a weight: a model folder written here with one bad element.
for bad in nan inf -inf; do
  python3 - "$WORK/bad-$bad" "$bad" "$SEED" <<'PY'
import json, os, random, struct, sys
out, bad, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
os.makedirs(out)
json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, open(os.path.join(out, "config.json"), "w"))
tensors = {"model.layers.0.mlp.up_proj.weight": (8, 16), "model.layers.0.mlp.down_proj.weight": (6, 40)}
header, data = {}, b""
for name, (r, c) in tensors.items():
    vals = [rng.gauss(0, 0.02) for _ in range(r * c)]
    if name.endswith("down_proj.weight"):
        vals[4 * 40 + 17] = bad   # element (4, 17)
    header[name] = {"dtype": "F32", "shape": [r, c], "data_offsets": [len(data), len(data) + 4 * r * c]}
    data += struct.pack("<%df" % (r * c), *vals)
h = json.dumps(header).encode()
h += b" " * ((8 - len(h) % 8) % 8)
open(os.path.join(out, "model.safetensors"), "wb").write(struct.pack("<Q", len(h)) + h + data)
PY
  for scheme in int8 fp8_e4m3 nf4; do
    expect 2 "model\.layers\.0\.mlp\.down_proj\.weight.*\(4, 17\)" -- \
      "$QTOOL" quantize "$WORK/bad-$bad" --scheme $scheme -o "$WORK/nan-out"
    if ls -d "$WORK"/nan-out* >/dev/null 2>&1; then echo "FAIL: $bad/$scheme left $(ls -d "$WORK"/nan-out*)"; fails=$((fails + 1)); fi
  done
done

[ "$fails" -eq 0 ] || { echo "$fails failure(s)"; exit 1; }
echo "ok"
