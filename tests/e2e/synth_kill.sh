#!/usr/bin/env bash
# qtool synth killed with SIGKILL while writing leaves nothing under the output's name; the next
# run removes the dead run's temporary and succeeds.
#   synth_kill.sh QTOOL
set -eu
QTOOL=$1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

# A few hundred MB, so the run is still writing when it is killed.
"$QTOOL" synth --preset llama --scale 0.3 --threads 1 -o "$WORK/out" 2>/dev/null &
pid=$!
for _ in $(seq 1 2000); do
  compgen -G "$WORK/out.tmp-*/model-*" >/dev/null && break
  sleep 0.005
done
kill -9 "$pid" 2>/dev/null || fail "synth finished before it could be killed"
wait "$pid" 2>/dev/null || true
[ ! -e "$WORK/out" ] || fail "a killed run left $WORK/out"
compgen -G "$WORK/out.tmp-*" >/dev/null || fail "no temporary was being written when killed"

"$QTOOL" synth --preset tiny -o "$WORK/out" 2>/dev/null
[ -f "$WORK/out/config.json" ] || fail "rerun did not write the output"
compgen -G "$WORK/out.tmp-*" >/dev/null && fail "the dead run's temporary is still there: $(ls "$WORK")"
echo "synth_kill ok"
