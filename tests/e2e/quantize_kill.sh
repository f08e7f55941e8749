#!/usr/bin/env bash
# kill -9 in the middle of qtool quantize leaves nothing under the output name; a rerun succeeds and
# clears the killed run's temporary folder.
#   quantize_kill.sh QTOOL
set -euo pipefail
QTOOL=$1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$QTOOL" synth --preset llama --scale 0.1 -o "$WORK/in" -q
for attempt in 1 2 3; do
  "$QTOOL" quantize "$WORK/in" --scheme nf4 --threads 1 -o "$WORK/out" -q &
  pid=$!
  # Wait until it is writing shards, then kill it.
  for _ in $(seq 1 2000); do
    if compgen -G "$WORK/out.tmp-$pid/*.safetensors.tmp-*" >/dev/null; then break; fi
    sleep 0.005
  done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ -e "$WORK/out" ]; then
    echo "run finished before the kill (attempt $attempt)"; rm -rf "$WORK/out"; continue
  fi
  compgen -G "$WORK/out.tmp-*" >/dev/null || { echo "FAIL: the killed run left no temporary to test with"; exit 1; }
  echo "killed $pid mid-run: nothing under the output name"
  "$QTOOL" quantize "$WORK/in" --scheme nf4 -o "$WORK/out" -q
  [ -f "$WORK/out/config.json" ] || { echo "FAIL: rerun did not produce the output"; exit 1; }
  if compgen -G "$WORK/out.tmp-*" >/dev/null; then echo "FAIL: stale temporary left: $(ls -d "$WORK"/out.tmp-*)"; exit 1; fi
  "$QTOOL" inspect "$WORK/out" >/dev/null 2>&1
  echo "ok"
  exit 0
done
echo "FAIL: could not kill a run mid-way"
exit 1
