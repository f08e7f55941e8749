#!/usr/bin/env bash
# The real forward in qtool verify, end to end on the CPU backend. One script, several modes, each
# its own ctest test (verify_forward.cmake); `setup` makes what the others share in WORK.
#   verify_forward.sh QTOOL SOURCE_DIR WORK setup
#     tiny Llama (nf4 with double quant) and tiny Flux (nf4; fp8) quantized with sample_configs and
#     planned so that groups stream; verify --reference passes and writes --outputs with the drawn
#     inputs; verify --inputs of that file replays the run bit for bit; the report says per
#     component whether the forward or the linears ran. The Flux pipeline folders run as the
#     pipeline (--denoise-steps 2): every check per phase, the final latents (`images`) against
#     the original pipeline's, the replay's latents bit for bit.
#   verify_forward.sh QTOOL SOURCE_DIR WORK corrupt MODEL TENSOR
#     TENSOR of MODEL (llama, flux, flux-fp8; "component/tensor" in a pipeline), every 7th byte
#     XORed after planning: verify --reference exits 1, naming the failed checks.
#   verify_forward.sh QTOOL SOURCE_DIR WORK input MODEL CASE
#     an --inputs file broken as CASE (st_edit.py derive): exit 2 naming the input, nothing written.
#     (Flux: the pipeline's inputs; "latents" a wrong latents shape, "nolatents" none, "missing" a
#     token input left out: the message names it.)
#   verify_forward.sh QTOOL SOURCE_DIR WORK denoise-usage
#     --denoise-steps on a model folder, 0 or past 1000: exit 2 naming the option.
#   verify_forward.sh QTOOL SOURCE_DIR WORK transformer-folder
#     a FluxPipeline folder of the transformer alone verifies as its component (the pipeline needs
#     the encoders); --denoise-steps on it: exit 2 naming the missing components.
#   verify_forward.sh QTOOL SOURCE_DIR WORK long-sequence
#     the tiny Flux transformer planned and verified at 4096 image tokens (the benchmark's size):
#     the activation memory follows the batch of hidden_states, not the 4096 rows of img_ids (a
#     forward sized by every input's first dimension asked for 4096 times its memory).
#   verify_forward.sh QTOOL SOURCE_DIR WORK pipeline-vectors FOLDER
#     the small FluxPipeline FOLDER (built and saved by diffusers / transformers,
#     tests/interop/pipeline_flux.py --save) run by verify on the ids and latents of its
#     vectors.safetensors for 2 steps: its final latents within twice diffusers' own bf16 noise of
#     diffusers' FluxPipeline latents (max and RMS), and no farther from the float32 run than 1.25x.
set -eu
QTOOL=$1
SRC=$2
WORK=$3
MODE=$4
EDIT="python3 $SRC/tests/e2e/st_edit.py"

ckpt_of() {
  case $1 in
    llama) echo "$WORK/llama-nf4" ;;
    flux) echo "$WORK/flux-nf4" ;;
    flux-fp8) echo "$WORK/flux-fp8" ;;
  esac
}
ref_of() { case $1 in llama) echo "$WORK/llama" ;; *) echo "$WORK/flux" ;; esac; }
# The denoising steps of the Flux pipeline runs (none for Llama).
steps_of() { case $1 in llama) echo "" ;; *) echo "--denoise-steps 2" ;; esac; }

if [ "$MODE" = setup ]; then
  rm -rf "$WORK" && mkdir -p "$WORK"
  cat > "$WORK/small.json" <<'JSON'
{"format": "qtool-device-profile", "version": 1, "name": "small-test",
 "context_bytes": 1048576, "cublas_workspace_bytes": 1048576, "alloc_granularity_bytes": 4096,
 "pinned_page_table_bytes_per_gib": 4096}
JSON
  "$QTOOL" synth --preset tiny -o "$WORK/llama" -q
  "$QTOOL" synth --preset tiny-flux -o "$WORK/flux" -q
  "$QTOOL" quantize "$WORK/llama" --config "$SRC/sample_configs/llama-nf4-dq.json" -o "$WORK/llama-nf4" -q
  "$QTOOL" quantize "$WORK/flux" --config "$SRC/sample_configs/flux-nf4.json" -o "$WORK/flux-nf4" -q
  "$QTOOL" quantize "$WORK/flux" --config "$SRC/sample_configs/flux-fp8.json" -o "$WORK/flux-fp8" -q
  for m in llama flux flux-fp8; do
    ck=$(ckpt_of $m)
    # A GPU budget a little above the smallest plan: most blocks stream through the slots.
    set +e
    # A pipeline as one sequence (--no-phases): verify keeps every component on the GPUs.
    "$QTOOL" plan "$ck" --max-memory 0=1KiB,cpu=1GiB --tokens 16 --device-profile "$WORK/small.json" --no-phases \
      2>"$WORK/err" >/dev/null
    set -e
    lo=$(sed -n 's/.*Smallest budget that fits: --max-memory 0=\([0-9]*\).*/\1/p' "$WORK/err")
    [ -n "$lo" ] || { echo "FAIL: no smallest budget for $m: $(cat "$WORK/err")"; exit 1; }
    "$QTOOL" plan "$ck" --max-memory "0=$((lo + lo / 8)),cpu=1GiB" --tokens 16 --device-profile "$WORK/small.json" \
      --no-phases -o "$WORK/plan-$m.json" -q
    # shellcheck disable=SC2046
    "$QTOOL" verify "$ck" --plan "$WORK/plan-$m.json" --reference "$(ref_of $m)" --backend cpu --steps 2 --poison \
      $(steps_of $m) --outputs "$WORK/out-$m.safetensors" --report "$WORK/report-$m.json" 2>"$WORK/log-$m.txt"
    # shellcheck disable=SC2046
    "$QTOOL" verify "$ck" --plan "$WORK/plan-$m.json" --backend cpu --steps 1 $(steps_of $m) \
      --inputs "$WORK/out-$m.safetensors" --outputs "$WORK/replay-$m.safetensors" -q
    python3 - "$WORK" "$m" "$SRC" <<'PY'
import json, sys
sys.path.insert(0, sys.argv[3] + "/tests/e2e")
import st_edit
work, m = sys.argv[1], sys.argv[2]
r = json.load(open(f"{work}/report-{m}.json"))
names = {c["name"]: c["status"] for c in r["checks"]}
for n in ("finite outputs", "every tensor read", "streamed == resident", "no state left behind",
          "reference error", "reference output", "peak memory") + (() if m == "llama" else ("reference latents",)):
    assert names.get(n) == "pass", (n, names)
ran = {c["component"]: c["ran"] for c in r["components"]}
want = "" if m == "llama" else "transformer"
assert ran[want] == "forward", ran
if m != "llama":
    assert ran["text_encoder"] == "forward" and ran["text_encoder_2"] == "forward", ran
    assert ran["vae"] == "linears only", ran
    # The pipeline: CLIP, T5, the transformer twice, the VAE; every check per phase.
    p = r["pipeline"]
    assert p["denoise_steps"] == 2 and len(p["sigmas"]) == 3 and p["sigmas"][0] > p["sigmas"][1] > p["sigmas"][2] == 0, p
    assert p["sigmas"][0] == 1.0 and abs(p["timesteps"][1] - 1000 * p["sigmas"][1]) < 1e-3, p
    passes = {c["component"]: c.get("passes") for c in r["components"]}
    assert passes["transformer"] == 2 and passes["text_encoder"] == 1 and passes["text_encoder_2"] == 1, passes
    phases = [ph["component"] for ph in r["phases"]]
    assert phases[:4] == ["text_encoder", "text_encoder_2", "transformer", "vae"], phases
    for ph in r["phases"]:
        assert ph["outputs_checked"] > 0 and ph["nonfinite"] == 0 and ph["streamed_vs_resident_mismatches"] == 0, ph
        assert ph["unread_tensors"] == 0, ph
    assert all("per phase" in c["detail"] for c in r["checks"] if c["name"] in ("finite outputs", "streamed == resident")), r["checks"]
    pr = r["pipeline_reference"]
    assert pr["within"] and 0 < pr["rel_error"] <= pr["bound"] and pr["substituted"], pr
    log = open(f"{work}/log-{m}.txt").read()
    assert "transformer x 2 denoising steps" in log and "per phase" in log, log
fr = next(f for f in r["forward_reference"] if f["component"] == want)
assert 0 < fr["rel_error"] <= fr["bound"], fr
plan = json.load(open(f"{work}/plan-{m}.json"))
assert any(g for g in plan["groups"]), "nothing streamed"
_, out = st_edit.read(f"{work}/out-{m}.safetensors")
_, replay = st_edit.read(f"{work}/replay-{m}.safetensors")
name = "logits" if m == "llama" else "images"
assert out[name][0] == "F32" and out[name][2] == replay[name][2], "replay differs"
outputs = {name} if m == "llama" else {name, "transformer.sample", "text_encoder.last_hidden_state",
                                       "text_encoder.pooler_output", "text_encoder_2.last_hidden_state"}
if m != "llama":
    # The pipeline's inputs replay; the transformer's are made by the flow, not written.
    assert {"latents", "text_encoder.input_ids", "text_encoder_2.input_ids"} <= set(out), sorted(out)
    assert not any(k.startswith("transformer.") and k != "transformer.sample" for k in out), sorted(out)
    assert out["latents"][1] == out["images"][1] and out["latents"][2] != out["images"][2], "latents unchanged"
assert set(replay) == outputs, sorted(replay)  # given inputs are not written back
for o in outputs:
    assert out[o][2] == replay[o][2], o
assert len(out) > 1, "drawn inputs not written"
print(m, "ok: rel error", fr["rel_error"], "bound", fr["bound"], "simulated", fr["simulated_rel_error"])
PY
  done
  exit 0
fi

if [ "$MODE" = pipeline-vectors ]; then
  T=$(mktemp -d)
  trap 'rm -rf "$T"' EXIT
  python3 - "$5/vectors.safetensors" "$T/in.safetensors" "$SRC" <<'PY'
import sys
sys.path.insert(0, sys.argv[3] + "/tests/e2e")
import st_edit
_, t = st_edit.read(sys.argv[1])
st_edit.write(sys.argv[2], None, {k: v for k, v in t.items() if not k.startswith("images")})
PY
  "$QTOOL" plan "$5" --max-memory 0=4GiB,cpu=4GiB --tokens 16 --device-profile "$WORK/small.json" \
    -o "$T/plan.json" -q
  "$QTOOL" verify "$5" --plan "$T/plan.json" --backend cpu --steps 1 --denoise-steps 2 \
    --inputs "$T/in.safetensors" --outputs "$T/out.safetensors" -q
  python3 - "$5/vectors.safetensors" "$T/out.safetensors" "$SRC" <<'PY'
import math, struct, sys
sys.path.insert(0, sys.argv[3] + "/tests/e2e")
import st_edit
_, want = st_edit.read(sys.argv[1])
_, got = st_edit.read(sys.argv[2])
f = lambda t: struct.unpack("<%df" % (len(t[2]) // 4), t[2])
ours, bf16, f32 = f(got["images"]), f(want["images"]), f(want["images.f32"])
assert got["images"][1] == want["images"][1], (got["images"][1], want["images"][1])
def dev(a, b):
    rms = math.sqrt(sum(x * x for x in b) / len(b))
    d = [x - y for x, y in zip(a, b)]
    return max(abs(x) for x in d) / rms, math.sqrt(sum(x * x for x in d) / len(d)) / rms
vs, noise, vs32 = dev(ours, bf16), dev(bf16, f32), dev(ours, f32)
ok = all(math.isfinite(x) for x in ours) and vs[0] <= 2 * noise[0] and vs[1] <= 2 * noise[1] and vs32[1] <= 1.25 * noise[1]
print(f"qtool vs diffusers FluxPipeline (2 steps): max rel {vs[0]:.5f}, rms rel {vs[1]:.5f}; diffusers bf16 vs "
      f"float32: max rel {noise[0]:.5f}, rms rel {noise[1]:.5f}; qtool vs float32 rms rel {vs32[1]:.5f}")
sys.exit(0 if ok else 1)
PY
  exit 0
fi

if [ "$MODE" = long-sequence ]; then
  T=$WORK/long-sequence
  rm -rf "$T"
  mkdir -p "$T"
  "$QTOOL" synth --preset tiny-flux --components transformer -o "$T/flux" -q
  "$QTOOL" plan "$T/flux/transformer" --max-memory 0=1GiB,cpu=4GiB --tokens 4096 -o "$T/plan.json" -q
  "$QTOOL" verify "$T/flux/transformer" --plan "$T/plan.json" --backend cpu >"$T/out" 2>&1 ||
    { echo "FAIL: verify at 4096 tokens"; cat "$T/out"; exit 1; }
  grep -q "\[pass\] peak memory" "$T/out" || { echo "FAIL: no peak memory check"; cat "$T/out"; exit 1; }
  exit 0
fi
if [ "$MODE" = transformer-folder ]; then
  # A FluxPipeline folder holding only its transformer (quantized for another folder's encoders):
  # planned by phase, verified as its component runs (its own random inputs); --denoise-steps
  # cannot run the pipeline without the encoders: exit 2 naming them.
  T=$WORK/transformer-folder
  rm -rf "$T"
  mkdir -p "$T"
  "$QTOOL" synth --preset tiny-flux --components transformer -o "$T/bf16" -q
  "$QTOOL" quantize "$T/bf16" -o "$T/nf4" --scheme nf4 -q
  "$QTOOL" plan "$T/nf4" --max-memory 0=1GiB,cpu=4GiB -o "$T/plan.json" -q
  "$QTOOL" verify "$T/nf4" --plan "$T/plan.json" --backend cpu --steps 1 >"$T/out" 2>&1 ||
    { echo "FAIL: verify of the transformer folder"; cat "$T/out"; exit 1; }
  grep -q "transformer: FluxTransformer2DModel forward" "$T/out" || { echo "FAIL: no forward"; cat "$T/out"; exit 1; }
  set +e
  "$QTOOL" verify "$T/nf4" --plan "$T/plan.json" --backend cpu --steps 1 --denoise-steps 2 2>"$T/err"
  rc=$?
  set -e
  [ "$rc" -eq 2 ] || { echo "FAIL: --denoise-steps on the transformer folder: exit $rc"; cat "$T/err"; exit 1; }
  grep -q -- "--denoise-steps.*text_encoder, text_encoder_2" "$T/err" || { echo "FAIL: not named"; cat "$T/err"; exit 1; }
  exit 0
fi
if [ "$MODE" = denoise-usage ]; then
  # --denoise-steps on a checkpoint that is not a FluxPipeline folder, and out of range: exit 2.
  for args in "$WORK/llama-nf4 --plan $WORK/plan-llama.json --denoise-steps 2" \
              "$WORK/flux-nf4 --plan $WORK/plan-flux.json --denoise-steps 0" \
              "$WORK/flux-nf4 --plan $WORK/plan-flux.json --denoise-steps 1001"; do
    set +e
    # shellcheck disable=SC2086
    "$QTOOL" verify $args --backend cpu --steps 1 2>"$WORK/err-denoise"
    rc=$?
    set -e
    [ "$rc" -eq 2 ] || { echo "FAIL: verify $args: exit $rc"; cat "$WORK/err-denoise"; exit 1; }
    grep -q -- "--denoise-steps" "$WORK/err-denoise" || { echo "FAIL: option not named"; cat "$WORK/err-denoise"; exit 1; }
  done
  exit 0
fi

MODEL=$5
ck=$(ckpt_of "$MODEL")
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
if [ "$MODE" = corrupt ]; then
  cp -r "$ck" "$T/ck"
  $EDIT corrupt "$T/ck/$(dirname "$6")" "$(basename "$6")"  # COMPONENT/TENSOR in a pipeline
  set +e
  # shellcheck disable=SC2046
  "$QTOOL" verify "$T/ck" --plan "$WORK/plan-$MODEL.json" --reference "$(ref_of "$MODEL")" --backend cpu --steps 1 \
    $(steps_of "$MODEL") 2>"$T/err"
  rc=$?
  set -e
  [ "$rc" -eq 1 ] || { echo "FAIL: $MODEL $6 corrupted: exit $rc"; cat "$T/err"; exit 1; }
  grep "verify failed" "$T/err"
  exit 0
fi
if [ "$MODE" = input ]; then
  $EDIT derive "$WORK/out-$MODEL.safetensors" "$T/in.safetensors" "$6"
  set +e
  # shellcheck disable=SC2046
  "$QTOOL" verify "$ck" --plan "$WORK/plan-$MODEL.json" --backend cpu --steps 1 --inputs "$T/in.safetensors" \
    $(steps_of "$MODEL") --outputs "$T/out.safetensors" --report "$T/report.json" 2>"$T/err"
  rc=$?
  set -e
  [ "$rc" -eq 2 ] || { echo "FAIL: $MODEL input $6: exit $rc"; cat "$T/err"; exit 1; }
  grep -q "inputs" "$T/err" || { echo "FAIL: the message does not name --inputs"; cat "$T/err"; exit 1; }
  # The input at fault is named.
  case "$MODEL:$6" in
    flux:latents | flux:nolatents) grep -q "'latents'" "$T/err" || { echo "FAIL: latents not named"; cat "$T/err"; exit 1; } ;;
    flux:missing) grep -q "input_ids" "$T/err" || { echo "FAIL: the token input not named"; cat "$T/err"; exit 1; } ;;
  esac
  [ ! -e "$T/out.safetensors" ] && [ ! -e "$T/report.json" ] || { echo "FAIL: written despite bad input"; exit 1; }
  ls "$T" | grep -q tmp && { echo "FAIL: temporary left"; exit 1; }
  cat "$T/err"
  exit 0
fi
echo "unknown mode $MODE"
exit 2
