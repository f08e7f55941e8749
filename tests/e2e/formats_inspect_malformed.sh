#!/usr/bin/env bash
# qtool inspect on malformed checkpoints: every case exits 2 with a message naming the file and the
# tensor (and the offset where there is one), never crashes, and prints nothing on stdout.
#   formats_inspect_malformed.sh QTOOL
set -u
QTOOL=$1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Each case: a file or folder under $WORK/cases, and a line in $WORK/cases.tsv:
#   path <TAB> kind <TAB> needle <TAB> needle ...
python3 - "$WORK" <<'PY'
import json, os, struct, sys
work = sys.argv[1]
cases_dir = os.path.join(work, "cases")
os.makedirs(cases_dir)
rows = []

def raw(header, data_len, length=None):
    h = header.encode() if isinstance(header, str) else header
    n = len(h) if length is None else length
    return struct.pack("<Q", n) + h + bytes((i * 7 + 1) & 0xFF for i in range(data_len))

def entry(name, dtype, shape, b, e):
    return '"%s":{"dtype":"%s","shape":%s,"data_offsets":[%d,%d]}' % (name, dtype, shape, b, e)

def hdr(*entries):
    return "{" + ",".join(entries) + "}"

A = entry("a.weight", "F32", "[2,2]", 0, 16)
B = entry("b.weight", "BF16", "[3]", 16, 22)

def case(name, data, kind, *needles):
    path = os.path.join(cases_dir, name + ".safetensors")
    with open(path, "wb") as f:
        f.write(data)
    rows.append([path, kind, name + ".safetensors"] + list(needles))

case("empty_file", b"", "invalid input", "offset 0")
case("short_file", b"\x01\x00", "invalid input", "offset 0")
case("header_too_large", raw("{}", 0, 100_000_001), "invalid input", "limit", "offset 0")
case("header_past_eof", raw("{}", 0, 4096), "invalid input", "past the end", "offset 0")
case("truncated_header", raw(hdr(A, B), 22)[:40], "invalid input", "past the end")
case("truncated_data", raw(hdr(A, B), 19), "invalid input", "'b.weight'", "exceeds data size 19", "file offset")
case("trailing_bytes", raw(hdr(A, B), 25), "invalid input", "'b.weight'", "3 trailing bytes", "file offset")
case("not_utf8", raw(hdr(A, entry("b.w\xff", "BF16", "[3]", 16, 22)).encode("latin-1"), 22), "invalid input", "UTF-8", "file offset")
case("bad_json", raw('{"a.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16],}}', 16), "invalid input", "'a.weight'", "JSON", "file offset")
case("not_object", raw("[1,2]", 0), "invalid input", "'{'", "file offset")
case("unknown_dtype", raw(hdr(entry("a.weight", "F9", "[2,2]", 0, 16)), 16), "invalid input", "'a.weight'", "F9", "file offset")
case("unsupported_dtype", raw(hdr(entry("a.scale", "F8_E8M0", "[4]", 0, 4)), 4), "unsupported", "'a.scale'", "F8_E8M0", "file offset")
case("negative_shape", raw(hdr(entry("a.weight", "F32", "[-2,2]", 0, 16)), 16), "invalid input", "'a.weight'", "negative", "file offset")
case("float_shape", raw(hdr(entry("a.weight", "F32", "[2.5,2]", 0, 16)), 16), "invalid input", "'a.weight'", "not an integer", "file offset")
case("shape_overflow", raw(hdr(entry("a.weight", "U8", "[4294967296,4294967296,2]", 0, 16)), 16), "invalid input", "'a.weight'", "overflow", "file offset")
case("bytes_overflow", raw(hdr(entry("a.weight", "F64", "[4611686018427387904]", 0, 16)), 16), "invalid input", "'a.weight'", "overflow", "file offset")
case("negative_offset", raw('{"a.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[-16,0]}}', 16), "invalid input", "'a.weight'", "negative", "file offset")
case("three_offsets", raw('{"a.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16,32]}}', 16), "invalid input", "'a.weight'", "file offset")
case("missing_dtype", raw('{"a.weight":{"shape":[2,2],"data_offsets":[0,16]}}', 16), "invalid input", "'a.weight'", "dtype", "file offset")
case("end_before_begin", raw(hdr(entry("a.weight", "U8", "[0]", 16, 0)), 16), "invalid input", "'a.weight'", "before begin", "file offset")
case("size_mismatch", raw(hdr(entry("a.weight", "F32", "[2,2]", 0, 12), entry("b", "U8", "[4]", 12, 16)), 16), "invalid input", "'a.weight'", "needs 16", "file offset")
case("not_at_zero", raw(hdr(entry("a.weight", "F32", "[2,2]", 8, 24)), 24), "invalid input", "'a.weight'", "offset 0", "file offset")
case("gap", raw(hdr(A, entry("b.weight", "BF16", "[3]", 20, 26)), 26), "invalid input", "'b.weight'", "gap", "file offset")
case("overlap", raw(hdr(A, entry("b.weight", "BF16", "[3]", 10, 16), entry("c", "U8", "[6]", 16, 22)), 22), "invalid input", "'b.weight'", "overlap", "file offset")
case("duplicate_name", raw(hdr(A, B, entry("a.weight", "F32", "[2,2]", 22, 38)), 38), "invalid input", "'a.weight'", "duplicate", "file offset")
case("metadata_not_string", raw('{"__metadata__":{"step":1},' + A + '}', 16), "invalid input", "__metadata__", "'step'", "file offset")
case("metadata_not_map", raw('{"__metadata__":[1],' + A + '}', 16), "invalid input", "__metadata__", "file offset")

def folder_case(name, files, kind, *needles):
    d = os.path.join(cases_dir, name)
    os.makedirs(d)
    for rel, data in files.items():
        p = os.path.join(d, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    rows.append([d, kind] + list(needles))

S1 = raw(hdr(entry("a", "F32", "[2]", 0, 8), entry("b", "U8", "[3]", 8, 11)), 11)
S2 = raw(hdr(entry("c", "I8", "[4]", 0, 4)), 4)
def index(wm):
    return json.dumps({"metadata": {"total_size": 15}, "weight_map": wm})
N1, N2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
folder_case("index_missing_shard", {N1: S1, N2: S2, "model.safetensors.index.json": index({"a": N1, "b": N1, "c": "model-00003-of-00003.safetensors"})},
            "invalid input", "model.safetensors.index.json", "'c'", "model-00003-of-00003.safetensors")
folder_case("index_wrong_shard", {N1: S1, N2: S2, "model.safetensors.index.json": index({"a": N1, "b": N2, "c": N2})},
            "invalid input", N1, "'b'", "file offset")
folder_case("index_extra_tensor", {N1: S1, N2: S2, "model.safetensors.index.json": index({"a": N1, "b": N1, "c": N2, "d": N2})},
            "invalid input", "model.safetensors.index.json", "'d'")
folder_case("bad_shard_in_folder", {N1: S1, N2: S2[:-1], "model.safetensors.index.json": index({"a": N1, "b": N1, "c": N2})},
            "invalid input", N2, "'c'", "file offset")
MI = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
T = {"transformer/diffusion_pytorch_model.safetensors": S2, "transformer/config.json": "{}"}
folder_case("model_index_bad_json", dict(T, **{"model_index.json": '{"transformer": ["diffusers", "X"],}'}),
            "invalid input", "model_index.json", "byte")
folder_case("model_index_bad_entry", dict(T, **{"model_index.json": '{"transformer": ["diffusers"]}'}),
            "invalid input", "model_index.json", "'transformer'")
folder_case("model_index_missing_folder", {"model_index.json": json.dumps(dict(MI, vae=["diffusers", "AutoencoderKL"])), **T},
            "invalid input", "model_index.json", "'vae'")

with open(os.path.join(work, "cases.tsv"), "w") as f:
    for r in rows:
        f.write("\t".join(r) + "\n")
PY

failed=0
n=0
while IFS=$'\t' read -r -a row; do
  path=${row[0]}
  kind=${row[1]}
  needles=("${row[@]:2}")
  n=$((n + 1))
  "$QTOOL" inspect "$path" --json >"$WORK/out" 2>"$WORK/err"
  rc=$?
  msg=$(cat "$WORK/err")
  if [ "$rc" -ne 2 ]; then
    echo "FAIL $(basename "$path"): exit $rc, expected 2: $msg"
    failed=$((failed + 1))
    continue
  fi
  if [ -s "$WORK/out" ]; then
    echo "FAIL $(basename "$path"): printed on stdout: $(head -c 200 "$WORK/out")"
    failed=$((failed + 1))
  fi
  case "$msg" in
    *"qtool: $kind: "*) ;;
    *) echo "FAIL $(basename "$path"): expected a '$kind' error: $msg"; failed=$((failed + 1)) ;;
  esac
  for needle in "${needles[@]}"; do
    if [[ "$msg" != *"$needle"* ]]; then
      echo "FAIL $(basename "$path"): message lacks '$needle': $msg"
      failed=$((failed + 1))
    fi
  done
done <"$WORK/cases.tsv"

echo "$n malformed cases, $failed failures"
[ "$n" -ge 30 ] || { echo "FAIL: only $n cases"; exit 1; }
[ "$failed" -eq 0 ]
