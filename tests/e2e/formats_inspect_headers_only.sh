#!/usr/bin/env bash
# qtool inspect reads headers only: a 256 MiB checkpoint is evicted from the page cache, inspected,
# and afterwards (fincore) almost none of it is cached: the tensor data was never read. Exits 77
# (skipped) where pages cannot be evicted (tmpfs, some overlay file systems).
#   formats_inspect_headers_only.sh QTOOL
set -eu
QTOOL=$1
WORK=$(mktemp -d "${QTOOL_BIG_TMP:-/var/tmp}/qtool-headers-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
command -v fincore >/dev/null || { echo "fincore not found: skipped"; exit 77; }

python3 - "$WORK/big.safetensors" <<'PY'
import json, os, struct, sys
path = sys.argv[1]
n_tensors, per = 64, 4 << 20  # 64 tensors of 4 MiB: 256 MiB of data
header = {"__metadata__": {"format": "pt"}}
for i in range(n_tensors):
    header["blocks.%d.weight" % i] = {"dtype": "BF16", "shape": [1024, 2048], "data_offsets": [i * per, (i + 1) * per]}
h = json.dumps(header).encode()
h += b" " * ((8 - len(h) % 8) % 8)
chunk = os.urandom(per)
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    for i in range(n_tensors):
        f.write(chunk)
    f.flush()
    os.fsync(f.fileno())
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
PY
resident() { fincore --bytes --noheadings --output RES "$1" | tr -d ' '; }
before=$(resident "$WORK/big.safetensors")
if [ "$before" -gt $((4 << 20)) ]; then
  echo "page cache eviction does not work here ($before bytes still resident): skipped"
  exit 77
fi
start=$(date +%s%N)
"$QTOOL" inspect "$WORK/big.safetensors" --json >/dev/null
end=$(date +%s%N)
after=$(resident "$WORK/big.safetensors")
size=$(stat -c %s "$WORK/big.safetensors")
echo "file $size bytes; resident before $before, after inspect $after; inspect took $(((end - start) / 1000000)) ms"
# The header is about 7 KiB: allow a little readahead, far less than one tensor (4 MiB).
[ "$after" -le $((256 << 10)) ] || { echo "FAIL: inspect read $after bytes of a $size-byte file"; exit 1; }
