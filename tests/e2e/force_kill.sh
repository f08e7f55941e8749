#!/usr/bin/env bash
# kill -9 at random moments of `--force` runs that replace an existing output (synth, then
# quantize): after every kill the final name holds a complete output, the old one or the new one,
# byte for byte; a later run removes every temporary the killed runs left.
#   force_kill.sh QTOOL [N_KILLS]
# The random kill moments come from a printed seed (QTOOL_TEST_SEED to replay).
set -eu
QTOOL=$1
N=${2:-24}
SEED=${QTOOL_TEST_SEED:-$(( $(date +%s) % 32768 ))}
echo "QTOOL_TEST_SEED=$SEED"
RANDOM=$SEED
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
fail() { echo "FAIL: $*"; ls -la "$WORK"; exit 1; }

# A digest of every file (name and bytes) under a folder.
digest() { (cd "$1" && find . -type f | LC_ALL=C sort | xargs sha256sum) | sha256sum | cut -d' ' -f1; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
leftovers() { compgen -G "$WORK/out.tmp-*" || true; compgen -G "$WORK/out.old-*" || true; }

# run_kills NAME CMD_A CMD_B: CMD_A and CMD_B write two different outputs to $WORK/out with --force.
run_kills() {
  local name=$1 cmd_a=$2 cmd_b=$3
  rm -rf "$WORK/out"
  eval "$cmd_b" || fail "$name: reference run B"
  local want_b; want_b=$(digest "$WORK/out")
  local t0; t0=$(now_ms)
  eval "$cmd_a" || fail "$name: reference run A"
  local ms=$(( $(now_ms) - t0 + 1 ))
  local want_a; want_a=$(digest "$WORK/out")
  [ "$want_a" != "$want_b" ] || fail "$name: the two runs write the same bytes; the test could not tell them apart"
  echo "$name: a run takes ${ms} ms; killing $N runs at random moments in [0, $(( ms * 5 / 4 ))] ms"
  local n_old=0 n_new=0 n_left=0 i
  for i in $(seq 1 "$N"); do
    local before cmd; before=$(digest "$WORK/out")
    if [ "$before" = "$want_a" ]; then cmd=$cmd_b; else cmd=$cmd_a; fi
    eval "exec $cmd" &  # exec: $! is qtool itself, not a subshell around it
    local pid=$!
    local delay_ms=$(( RANDOM * ms * 5 / 4 / 32768 ))
    sleep "$(printf '%d.%03d' $((delay_ms / 1000)) $((delay_ms % 1000)))"
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    [ -e "$WORK/out" ] || fail "$name kill $i (after ${delay_ms} ms): nothing under the final name"
    local after; after=$(digest "$WORK/out")
    if [ "$after" = "$before" ]; then n_old=$((n_old + 1))
    elif [ "$after" = "$want_a" ] || [ "$after" = "$want_b" ]; then n_new=$((n_new + 1))
    else fail "$name kill $i (after ${delay_ms} ms): the final name holds neither the old nor the new output"; fi
    [ -z "$(leftovers)" ] || n_left=$((n_left + 1))
  done
  echo "$name: $n_old kills left the old output, $n_new the new one; $n_left left temporaries"
  [ "$n_old" -gt 0 ] || fail "$name: no kill landed before the commit"
  # A complete run removes what the killed ones left and replaces the output.
  local before; before=$(digest "$WORK/out")
  if [ "$before" = "$want_a" ]; then eval "$cmd_b"; else eval "$cmd_a"; fi
  [ -z "$(leftovers)" ] || fail "$name: temporaries left after a complete run: $(leftovers)"
  [ "$(digest "$WORK/out")" != "$before" ] || fail "$name: the complete run did not replace the output"
}

run_kills synth \
  "'$QTOOL' synth --preset llama --scale 0.05 --seed 1 --threads 1 --force -o '$WORK/out' -q 2>/dev/null" \
  "'$QTOOL' synth --preset llama --scale 0.05 --seed 2 --threads 1 --force -o '$WORK/out' -q 2>/dev/null"

"$QTOOL" synth --preset llama --scale 0.05 --seed 3 -o "$WORK/in" -q
run_kills quantize \
  "'$QTOOL' quantize '$WORK/in' --scheme int8 --threads 1 --force -o '$WORK/out' -q 2>/dev/null" \
  "'$QTOOL' quantize '$WORK/in' --scheme nf4 --threads 1 --force -o '$WORK/out' -q 2>/dev/null"
echo "force_kill ok"
