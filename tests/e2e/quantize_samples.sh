#!/usr/bin/env bash
# qtool quantize with every sample config on the tiny presets (tiny-flux for the flux configs,
# tiny for the llama ones): the report on stdout (--json) equals --report, the output's tensors,
# shards, config.json quantization_config and metadata are what the config asks (quantize_check.py),
# the input is untouched, the output does not depend on the thread count, and dequantize gives back
# the original names, shapes, dtypes and configs.
#   quantize_samples.sh QTOOL SAMPLE_CONFIGS_DIR
set -euo pipefail
QTOOL=$1
SAMPLES=$2
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SEED=${QTOOL_TEST_SEED:-$RANDOM}
echo "seed $SEED"
VERSION=$("$QTOOL" --version | awk '{print $2}')

"$QTOOL" quantize --help | grep -q -- '--config'
"$QTOOL" dequantize --help | grep -q -- '--dtype'

"$QTOOL" synth --preset tiny-flux --seed "$SEED" -o "$WORK/flux" -q
"$QTOOL" synth --preset tiny --seed "$SEED" -o "$WORK/llama" -q
( cd "$WORK" && find flux llama -type f -exec sha256sum {} + | sort ) > "$WORK/input.sha"

for cfg in "$SAMPLES"/*.json; do
  name=$(basename "$cfg" .json)
  case "$name" in
    flux-*) in="$WORK/flux" ;;
    llama-*) in="$WORK/llama" ;;
    *) continue ;;
  esac
  echo "== $name"
  out="$WORK/q-$name"
  "$QTOOL" quantize "$in" --config "$cfg" -o "$out" --json --report "$WORK/$name.report.json" \
    >"$WORK/$name.stdout.json" 2>"$WORK/$name.stderr"
  grep -q "total" "$WORK/$name.stderr" || { echo "FAIL: no summary on stderr"; cat "$WORK/$name.stderr"; exit 1; }
  python3 - "$WORK/$name.stdout.json" "$WORK/$name.report.json" <<'PY'
import json, sys
a, b = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
if a != b:
    sys.exit("FAIL: --json and --report differ")
PY
  python3 "$HERE/quantize_check.py" quantized "$in" "$out" "$cfg" "$WORK/$name.report.json" "$VERSION"
  "$QTOOL" inspect "$out" >/dev/null 2>&1 || { echo "FAIL: inspect $out"; exit 1; }

  # One thread gives the same bytes as two.
  "$QTOOL" quantize "$in" --config "$cfg" -o "$WORK/t1-$name" --threads 1 -q
  python3 "$HERE/quantize_check.py" same-tree "$out" "$WORK/t1-$name"
  rm -rf "$WORK/t1-$name"

  "$QTOOL" dequantize "$out" -o "$WORK/dq-$name" -q
  python3 "$HERE/quantize_check.py" dequantized "$in" "$out" "$WORK/dq-$name"
  rm -rf "$out" "$WORK/dq-$name"
done

# --scheme without a config quantizes every component.
"$QTOOL" quantize "$WORK/flux" --scheme int8 -o "$WORK/all-int8" --json -q > "$WORK/all.json"
python3 - "$WORK/all.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
schemes = {c["name"]: c["scheme"] for c in r["components"]}
if set(schemes.values()) != {"int8"}:
    sys.exit("FAIL: --scheme int8 gave %s" % schemes)
PY

( cd "$WORK" && find flux llama -type f -exec sha256sum {} + | sort ) | cmp -s - "$WORK/input.sha" \
  || { echo "FAIL: the input was modified"; exit 1; }
echo "ok"
