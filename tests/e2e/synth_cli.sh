#!/usr/bin/env bash
# qtool synth end to end: the tiny and tiny-flux presets written, read back by qtool inspect and
# checked against synth's own --json summary; bytes independent of --threads; a different
# --seed changes them; an existing output refused without --force; bad options exit 2 naming
# the option; --dry-run writes nothing.
#   synth_cli.sh QTOOL
set -eu
QTOOL=$1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SEED=${QTOOL_TEST_SEED:-$(( (RANDOM << 15) | RANDOM ))}
echo "QTOOL_TEST_SEED=$SEED"

fail() { echo "FAIL: $*"; exit 1; }

"$QTOOL" synth --help | grep -q 'tiny-flux' || fail "synth --help does not list the presets"

# --- tiny: a Llama-like model folder, sharded with an index ---
"$QTOOL" synth --preset tiny --seed "$SEED" -o "$WORK/tiny" --json >"$WORK/tiny.json" 2>"$WORK/tiny.err"
grep -q $'\r' "$WORK/tiny.err" && fail "progress bar drawn although stderr is not a terminal"
"$QTOOL" inspect "$WORK/tiny" --json >"$WORK/tiny.inspect.json" 2>/dev/null
python3 - "$WORK" <<'PY'
import json, os, sys
work = sys.argv[1]
synth = json.load(open(f"{work}/tiny.json"))
insp = json.load(open(f"{work}/tiny.inspect.json"))
d = f"{work}/tiny"
files = sorted(os.listdir(d))
assert "config.json" in files and "generation_config.json" in files, files
assert "model.safetensors.index.json" in files, files
shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
c = synth["components"][0]
assert len(shards) == c["shards"] > 1, (shards, c)
cfg = json.load(open(f"{d}/config.json"))
assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama", cfg
index = json.load(open(f"{d}/model.safetensors.index.json"))
assert sorted(set(index["weight_map"].values())) == shards, index["weight_map"]
# inspect reads back what synth says it wrote.
ic = insp["components"][0]
assert ic["parameters"] == c["params"] == synth["params"], (ic["parameters"], c["params"])
assert ic["bytes"] == c["bytes"], (ic["bytes"], c["bytes"])
assert len(ic["shards"]) == c["shards"]
assert ic["tensors"] == 2 + 9 * cfg["num_hidden_layers"] + 1, ic["tensors"]
if "block_lists" in ic:
    lists = {b["prefix"]: b["length"] for b in ic["block_lists"]}
    assert lists.get("model.layers") == cfg["num_hidden_layers"], lists
print("tiny ok:", c["params"], "params,", c["shards"], "shards")
PY

# --- tiny-flux: a diffusers pipeline folder ---
"$QTOOL" synth --preset tiny-flux --seed "$SEED" --threads 1 -o "$WORK/flux1" --json >"$WORK/flux.json" 2>/dev/null
"$QTOOL" synth --preset tiny-flux --seed "$SEED" --threads 2 -o "$WORK/flux2" 2>/dev/null
diff -r "$WORK/flux1" "$WORK/flux2" >/dev/null || fail "--threads 1 and --threads 2 wrote different files"
"$QTOOL" synth --preset tiny-flux --seed "$((SEED + 1))" -o "$WORK/flux3" 2>/dev/null
cmp -s "$WORK/flux1/vae/diffusion_pytorch_model.safetensors" "$WORK/flux3/vae/diffusion_pytorch_model.safetensors" &&
  fail "another --seed wrote the same vae"
"$QTOOL" inspect "$WORK/flux1" --json >"$WORK/flux.inspect.json" 2>/dev/null
python3 - "$WORK" <<'PY'
import json, os, sys
work = sys.argv[1]
synth = json.load(open(f"{work}/flux.json"))
insp = json.load(open(f"{work}/flux.inspect.json"))
root = f"{work}/flux1"
mi = json.load(open(f"{root}/model_index.json"))
assert mi["_class_name"] == "FluxPipeline", mi
assert mi["transformer"] == ["diffusers", "FluxTransformer2DModel"], mi
assert mi["text_encoder_2"] == ["transformers", "T5EncoderModel"], mi
want = {"scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae"}
assert set(k for k in mi if not k.startswith("_")) == want, mi
assert set(os.listdir(root)) == want | {"model_index.json"}, os.listdir(root)
# Every JSON file of the pipeline parses.
for dirpath, _, names in os.walk(root):
    for n in names:
        if n.endswith(".json"):
            json.load(open(os.path.join(dirpath, n)))
assert os.path.exists(f"{root}/transformer/diffusion_pytorch_model.safetensors.index.json")
assert os.path.exists(f"{root}/text_encoder/model.safetensors")
by_name = {c["name"]: c for c in insp["components"]}
assert set(by_name) == {"transformer", "text_encoder", "text_encoder_2", "vae"}, by_name.keys()
assert sorted(insp["other_components"]) == ["scheduler", "tokenizer", "tokenizer_2"], insp["other_components"]
for c in synth["components"]:
    if c["params"] == 0:
        continue
    ic = by_name[c["name"]]
    assert ic["parameters"] == c["params"] and ic["bytes"] == c["bytes"], (c, ic["parameters"])
    assert len(ic["shards"]) == c["shards"], (c["name"], len(ic["shards"]), c["shards"])
tcfg = json.load(open(f"{root}/transformer/config.json"))
if "block_lists" in by_name["transformer"]:
    lists = {b["prefix"]: b["length"] for b in by_name["transformer"]["block_lists"]}
    assert lists.get("transformer_blocks") == tcfg["num_layers"], lists
    assert lists.get("single_transformer_blocks") == tcfg["num_single_layers"], lists
print("tiny-flux ok:", synth["params"], "params")
PY

# --- an existing output is refused without --force, replaced with it ---
sum_before=$(cat "$WORK"/tiny/*.safetensors | md5sum)
set +e
"$QTOOL" synth --preset tiny --seed "$((SEED + 1))" -o "$WORK/tiny" 2>"$WORK/err"; rc=$?
set -e
[ "$rc" -eq 2 ] || fail "existing output: exit $rc, expected 2"
grep -q -- "--force" "$WORK/err" && grep -q "tiny" "$WORK/err" || fail "refusal message: $(cat "$WORK/err")"
[ "$(cat "$WORK"/tiny/*.safetensors | md5sum)" = "$sum_before" ] || fail "refused run changed the output"
"$QTOOL" synth --preset tiny --seed "$((SEED + 1))" -o "$WORK/tiny" --force 2>/dev/null
[ "$(cat "$WORK"/tiny/*.safetensors | md5sum)" != "$sum_before" ] || fail "--force did not replace the output"
ls "$WORK" | grep -q 'tmp-' && fail "temporaries left: $(ls "$WORK")"

# --- bad options: exit 2, the message names the option ---
expect_usage() {
  local option=$1
  shift
  set +e
  "$QTOOL" synth "$@" 2>"$WORK/err" >/dev/null; local rc=$?
  set -e
  [ "$rc" -eq 2 ] || fail "synth $*: exit $rc, expected 2"
  grep -q -- "$option" "$WORK/err" || fail "synth $*: message does not name $option: $(cat "$WORK/err")"
}
expect_usage --scale --preset tiny --scale 0 -o "$WORK/bad"
expect_usage --scale --preset tiny --scale 1.5 -o "$WORK/bad"
expect_usage --preset --preset no-such-model -o "$WORK/bad"
expect_usage --dtype --preset tiny --dtype f8_e4m3 -o "$WORK/bad"
expect_usage --components --preset tiny-flux --components unet -o "$WORK/bad"
expect_usage --components --preset tiny --components transformer -o "$WORK/bad"
expect_usage --max-shard-size --preset tiny --max-shard-size 12XB -o "$WORK/bad"
expect_usage --output --preset tiny
[ ! -e "$WORK/bad" ] || fail "a failed run left $WORK/bad"

# --- --dry-run describes the full-scale pipeline without writing ---
"$QTOOL" synth --preset flux --dry-run --json -o "$WORK/dry" >"$WORK/dry.json" 2>/dev/null
[ ! -e "$WORK/dry" ] || fail "--dry-run wrote $WORK/dry"
python3 - "$WORK/dry.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
c = {x["name"]: x for x in d["components"]}
assert abs(c["transformer"]["params"] / 11.90e9 - 1) < 0.01, c["transformer"]["params"]
assert c["transformer"]["shards"] == 3 and c["text_encoder_2"]["shards"] == 2, (c["transformer"]["shards"], c["text_encoder_2"]["shards"])
assert 33e9 < d["bytes"] < 35e9, d["bytes"]
print("dry run ok:", d["params"], "params,", d["bytes"], "bytes")
PY
echo "synth_cli ok"
