#!/usr/bin/env bash
# qtool verify --reference compares every tensor quantize copies unchanged (norms, embeddings,
# biases, the output head, unquantized linears) with the original byte for byte, and each quantized
# weight's recorded dtype with the original's: damage there is a failed check (exit 1) naming the
# tensor, although every linear output is still within its bound.
#   accept_reference.sh QTOOL SOURCE_DIR
set -uo pipefail
QTOOL=$1
SRC=$2
EDIT="python3 $SRC/tests/e2e/st_edit.py"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SEED=${QTOOL_TEST_SEED:-$RANDOM}
echo "seed $SEED"

fails=0
# check CKPT PLAN RC PATTERN: verify --reference; exit code RC and the report's check
# "reference tensors" detail matching PATTERN.
check() {
  "$QTOOL" verify "$1" --plan "$2" --reference "$3" --backend cpu --steps 1 --report "$WORK/r.json" \
    >"$WORK/out" 2>"$WORK/err"
  local rc=$?
  if [ "$rc" -ne "$4" ] || ! python3 - "$WORK/r.json" "$5" "$4" <<'PY'
import json, re, sys
r = json.load(open(sys.argv[1]))
c = {c["name"]: c for c in r["checks"]}
t = c["reference tensors"]
want = "pass" if sys.argv[3] == "0" else "FAIL"
assert t["status"] == want, t
assert re.search(sys.argv[2], t["detail"]), t["detail"]
# the linear outputs themselves are fine: only this check may fail
assert c["reference error"]["status"] == "pass", c["reference error"]
assert r["reference_tensors"]["compared"] > 0
PY
  then
    echo "FAIL: verify $1 -> exit $rc (wanted $4), stderr:"; cat "$WORK/err"; fails=$((fails + 1))
  fi
}

"$QTOOL" synth --preset tiny --seed "$SEED" --max-shard-size 0 -o "$WORK/t" -q || exit 1
"$QTOOL" synth --preset tiny-flux --seed "$SEED" -o "$WORK/tf" -q || exit 1
"$QTOOL" quantize "$WORK/t" --scheme nf4 -o "$WORK/t-nf4" -q || exit 1
"$QTOOL" quantize "$WORK/t" --scheme fp8 -o "$WORK/t-fp8" -q || exit 1
"$QTOOL" quantize "$WORK/tf" --scheme int8 -o "$WORK/tf-int8" -q || exit 1
for ck in t-nf4 t-fp8 tf-int8; do
  "$QTOOL" plan "$WORK/$ck" --max-memory 0=1GiB,cpu=1GiB --tokens 16 -o "$WORK/$ck.json" -q || exit 1
done

# Undamaged: pass, every unquantized tensor compared.
check "$WORK/t-nf4" "$WORK/t-nf4.json" "$WORK/t" 0 "^[0-9]+ unquantized tensors .* identical to the reference; 28 quantized weights"
check "$WORK/tf-int8" "$WORK/tf-int8.json" "$WORK/tf" 0 "identical to the reference"

fresh() { rm -rf "$WORK/d"; cp -r "$WORK/$1" "$WORK/d"; }
# One byte of a norm and of the embedding (kept unquantized, not run by the linear-only runner).
for t in model.norm.weight model.layers.2.post_attention_layernorm.weight model.embed_tokens.weight; do
  fresh t-nf4
  $EDIT flip-byte "$WORK/d/model.safetensors" "$t" 5
  check "$WORK/d" "$WORK/t-nf4.json" "$WORK/t" 1 "^1 difference\\(s\\) from the reference, first '${t//./\\.}': differs from the reference's copy at byte 5 \\(element 2\\)"
done
# A bias of the transformer of a pipeline (sharded), found by name.
cp -r "$WORK/tf-int8" "$WORK/tfd"
bias=$(for f in "$WORK"/tfd/transformer/*.safetensors; do $EDIT names "$f" | sed "s|^|$f |"; done | grep '\.bias$' | head -1)
set -- $bias
$EDIT flip-byte "$1" "$2" 0
check "$WORK/tfd" "$WORK/tf-int8.json" "$WORK/tf" 1 "first 'transformer/${2//./\\.}': differs from the reference's copy at byte 0 \\(element 0\\)"
# The 4-bit quant_state's dtype (the same length: float16 plus a space).
M=model.layers.1.self_attn.q_proj
fresh t-nf4
$EDIT replace-text "$WORK/d/model.safetensors" "$M.weight.quant_state.bitsandbytes__nf4" '"dtype": "bfloat16"' '"dtype": "float16" '
check "$WORK/d" "$WORK/t-nf4.json" "$WORK/t" 1 "first '${M//./\\.}\\.weight': the quant state records original dtype F16 \\(quant_state 'dtype'\\), the reference's weight is BF16"
# A reference whose unquantized tensor differs (the wrong original): named as well.
rm -rf "$WORK/r2"; cp -r "$WORK/t" "$WORK/r2"
$EDIT flip-byte "$WORK/r2/model.safetensors" model.norm.weight 0
check "$WORK/t-fp8" "$WORK/t-fp8.json" "$WORK/r2" 1 "first 'model\\.norm\\.weight': differs from the reference's copy at byte 0"

[ "$fails" -eq 0 ] || { echo "$fails failure(s)"; exit 1; }
echo "every copied tensor compared"
