#!/usr/bin/env bash
# qtool --help/--version, and qtool inspect on valid checkpoints: a sharded model folder and a
# pipeline folder, written here with Python's standard library; --json is checked field by field
# against what was written.
#   formats_inspect.sh QTOOL
set -eu
QTOOL=$1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$QTOOL" --help >/dev/null
"$QTOOL" --version | grep -q '^qtool '
"$QTOOL" inspect --help | grep -q -- '--json'
"$QTOOL" inspect --version | grep -q '^qtool '
# Usage errors exit 2.
set +e
"$QTOOL" inspect >/dev/null 2>&1; rc=$?
[ "$rc" -eq 2 ] || { echo "FAIL: inspect without PATH exited $rc"; exit 1; }
"$QTOOL" inspect "$WORK/does-not-exist" 2>"$WORK/err"; rc=$?
[ "$rc" -eq 2 ] && grep -q "does-not-exist" "$WORK/err" || { echo "FAIL: missing path exited $rc: $(cat "$WORK/err")"; exit 1; }
set -e

python3 - "$WORK" <<'PY'
import json, os, random, struct, sys
work = sys.argv[1]
seed = random.randrange(1 << 30)
print("seed", seed)
rng = random.Random(seed)
SIZES = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1, "I64": 8}

def write_st(path, tensors, meta=None):
    # tensors: list of (name, dtype, shape); data in descending dtype size like qtool's writer.
    header, off, data = {}, 0, b""
    if meta: header["__metadata__"] = meta
    for name, dt, shape in sorted(tensors, key=lambda t: -SIZES[t[1]]):
        n = SIZES[dt]
        for d in shape: n *= d
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}
        data += bytes(rng.randrange(256) for _ in range(n))
        off += n
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)

def numel(shape):
    n = 1
    for d in shape: n *= d
    return n

# A sharded Llama-like model folder.
model = os.path.join(work, "llama")
os.makedirs(model)
layers = rng.randrange(2, 6)
shards = [[("model.embed_tokens.weight", "BF16", [64, 16])]]
for l in range(layers):
    p = "model.layers.%d." % l
    shards.append([(p + "self_attn.q_proj.weight", "BF16", [16, 16]), (p + "mlp.up_proj.weight", "F8_E4M3", [32, 16]),
                   (p + "mlp.up_proj.weight_scale", "F32", [32, 1]), (p + "input_layernorm.weight", "F16", [16])])
shards.append([("model.norm.weight", "F32", [16]), ("lm_head.weight", "BF16", [64, 16]), ("step", "I64", [])])
names = ["model-%05d-of-%05d.safetensors" % (i + 1, len(shards)) for i in range(len(shards))]
wm = {}
for name, ts in zip(names, shards):
    write_st(os.path.join(model, name), ts, {"format": "pt"})
    for t in ts: wm[t[0]] = name
all_t = [t for ts in shards for t in ts]
total = sum(SIZES[t[1]] * numel(t[2]) for t in all_t)
json.dump({"metadata": {"total_size": total}, "weight_map": wm}, open(os.path.join(model, "model.safetensors.index.json"), "w"))
json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": layers},
          open(os.path.join(model, "config.json"), "w"))
expect = {"layers": layers, "shards": names, "tensors": len(all_t), "params": sum(numel(t[2]) for t in all_t),
          "bytes": total, "dtypes": {}}
for t in all_t:
    d = expect["dtypes"].setdefault(t[1], {"tensors": 0, "bytes": 0})
    d["tensors"] += 1
    d["bytes"] += SIZES[t[1]] * numel(t[2])
json.dump(expect, open(os.path.join(work, "expect.json"), "w"))

# A pipeline: transformer (diffusers), text_encoder (transformers), scheduler (no weights).
pipe = os.path.join(work, "pipe")
for d in ("transformer", "text_encoder", "scheduler"): os.makedirs(os.path.join(pipe, d))
json.dump({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
           "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
           "text_encoder": ["transformers", "CLIPTextModel"]}, open(os.path.join(pipe, "model_index.json"), "w"))
write_st(os.path.join(pipe, "transformer", "diffusion_pytorch_model.safetensors"),
         [("transformer_blocks.%d.attn.to_q.weight" % i, "BF16", [8, 8]) for i in range(3)] +
         [("single_transformer_blocks.%d.proj_out.weight" % i, "BF16", [8, 8]) for i in range(5)])
json.dump({"_class_name": "FluxTransformer2DModel"}, open(os.path.join(pipe, "transformer", "config.json"), "w"))
write_st(os.path.join(pipe, "text_encoder", "model.safetensors"), [("text_model.final_layer_norm.weight", "F32", [8])])
json.dump({"shift": 3.0}, open(os.path.join(pipe, "scheduler", "scheduler_config.json"), "w"))
PY

"$QTOOL" inspect "$WORK/llama" --json >"$WORK/llama.json" 2>"$WORK/llama.txt"
cat "$WORK/llama.txt"
python3 - "$WORK" <<'PY'
import json, sys
work = sys.argv[1]
d = json.load(open(work + "/llama.json"))
e = json.load(open(work + "/expect.json"))
assert d["layout"] == "model", d["layout"]
assert len(d["components"]) == 1
c = d["components"][0]
assert c["tensors"] == e["tensors"], (c["tensors"], e["tensors"])
assert c["parameters"] == e["params"], (c["parameters"], e["params"])
assert c["bytes"] == e["bytes"]
assert [s["file"] for s in c["shards"]] == e["shards"], c["shards"]
assert c["index"] == "model.safetensors.index.json"
assert {k: {"tensors": v["tensors"], "bytes": v["bytes"]} for k, v in c["dtypes"].items()} == e["dtypes"], c["dtypes"]
assert c["config"]["architecture"] == "LlamaForCausalLM"
assert len(d["fingerprint"]) == 32
assert d["totals"]["files"] == len(e["shards"])
if "block_lists" in c:
    bl = {b["prefix"]: b["length"] for b in c["block_lists"]}
    assert bl == {"model.layers": e["layers"]}, bl
print("model folder: ok")
PY
grep -q "LlamaForCausalLM" "$WORK/llama.txt"
grep -q "model-00001-of-" "$WORK/llama.txt"

"$QTOOL" inspect "$WORK/pipe" --json >"$WORK/pipe.json" 2>"$WORK/pipe.txt"
cat "$WORK/pipe.txt"
python3 - "$WORK" <<'PY'
import json, sys
d = json.load(open(sys.argv[1] + "/pipe.json"))
assert d["layout"] == "pipeline"
assert d["pipeline_class"] == "FluxPipeline"
assert [c["name"] for c in d["components"]] == ["transformer", "text_encoder"], d["components"]
assert d["other_components"] == ["scheduler"]
t = d["components"][0]
assert t["class"] == "FluxTransformer2DModel" and t["library"] == "diffusers"
assert t["tensors"] == 8 and t["parameters"] == 8 * 64 and t["bytes"] == 8 * 128
if "block_lists" in t:
    bl = {b["prefix"]: (b["length"], b["bytes"]) for b in t["block_lists"]}
    assert bl == {"transformer_blocks": (3, 384), "single_transformer_blocks": (5, 640)}, bl
print("pipeline folder: ok")
PY

# A single file, and --quiet silences the table but not the JSON.
f=$(ls "$WORK"/pipe/transformer/*.safetensors)
"$QTOOL" inspect "$f" --json --quiet >"$WORK/file.json" 2>"$WORK/file.txt"
[ ! -s "$WORK/file.txt" ] || { echo "FAIL: --quiet printed: $(cat "$WORK/file.txt")"; exit 1; }
python3 -c "import json,sys; d=json.load(open(sys.argv[1])); assert d['layout']=='file' and d['components'][0]['tensors']==8" "$WORK/file.json"
echo "inspect e2e: ok"
