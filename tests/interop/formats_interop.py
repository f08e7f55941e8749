"""Interop of qtool's safetensors I/O with the reference Python packages.

  formats_interop.py qtool-to-python WRITE_SAMPLE WORK
      A sharded multi-dtype checkpoint written by qtool (formats_write_sample) reads back byte-identical,
      tensor by tensor, through safetensors.safe_open (BF16, F8_E4M3, F8_E5M2, scalars and zero-size
      tensors included); its index agrees with the shards.
  formats_interop.py python-to-qtool DUMP QTOOL WORK
      A small random LlamaForCausalLM saved by transformers' save_pretrained in several shards reads
      back byte-identical through qtool's reader (formats_dump), and `qtool inspect --json` agrees
      with the model on tensors, parameters, bytes and shards.
"""
import json
import os
import random
import subprocess
import sys

import numpy as np
import torch
from safetensors import safe_open

TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "U64": torch.uint64,
}


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The tensor's bytes in C order, as safetensors stores them (little-endian)."""
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def qtool_to_python(write_sample: str, work: str) -> None:
    seed = random.randrange(1 << 31)
    print("seed", seed)
    max_shard = 3000
    subprocess.run([write_sample, work, str(seed), str(max_shard)], check=True)
    ckpt = os.path.join(work, "ckpt")
    expected = json.load(open(os.path.join(work, "expected.json")))
    blob = open(os.path.join(work, "expected.bin"), "rb").read()
    index = json.load(open(os.path.join(ckpt, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == expected["n_shards"] > 1, (shards, expected["n_shards"])
    assert sorted(os.listdir(ckpt)) == sorted(shards + ["model.safetensors.index.json", "config.json"]), os.listdir(ckpt)

    seen = {}
    total = 0
    for shard in shards:
        with safe_open(os.path.join(ckpt, shard), framework="pt") as f:
            assert f.metadata()["format"] == "pt", f.metadata()
            assert f.metadata()["qtool.sample_seed"] == str(seed)
            for name in f.keys():
                assert name not in seen, "tensor %s in two shards" % name
                assert index["weight_map"][name] == shard, (name, shard)
                seen[name] = f.get_tensor(name)
                total += seen[name].numel() * seen[name].element_size()
    assert index["metadata"]["total_size"] == total, (index["metadata"]["total_size"], total)

    dtypes_seen = set()
    for e in expected["tensors"]:
        t = seen.pop(e["name"])
        assert t.dtype == TORCH_DTYPES[e["dtype"]], (e["name"], t.dtype, e["dtype"])
        assert list(t.shape) == e["shape"], (e["name"], list(t.shape), e["shape"])
        want = blob[e["offset"]:e["offset"] + e["nbytes"]]
        got = tensor_bytes(t)
        assert got == want, "tensor %s: bytes differ" % e["name"]
        dtypes_seen.add(e["dtype"])
    assert not seen, "tensors qtool did not mean to write: %s" % sorted(seen)
    assert {"BF16", "F8_E4M3", "F8_E5M2", "F16", "F32", "F64", "I8", "U8", "BOOL"} <= dtypes_seen, dtypes_seen

    # numpy framework too, for the dtypes numpy has.
    n_np = 0
    for shard in shards:
        with safe_open(os.path.join(ckpt, shard), framework="numpy") as f:
            for name in f.keys():
                dt = f.get_slice(name).get_dtype()
                if dt in ("BF16", "F8_E4M3", "F8_E5M2"):
                    continue
                e = next(x for x in expected["tensors"] if x["name"] == name)
                a = f.get_tensor(name)
                assert np.ascontiguousarray(a).tobytes() == blob[e["offset"]:e["offset"] + e["nbytes"]], name
                n_np += 1
    print("qtool -> python: %d tensors in %d shards byte-identical (%d also through numpy)"
          % (len(expected["tensors"]), len(shards), n_np))


def python_to_qtool(dump: str, qtool: str, work: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    seed = random.randrange(1 << 31)
    print("seed", seed)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    # Give the norms some other dtype, so that the shards mix dtypes.
    for m in model.modules():
        if type(m).__name__ == "LlamaRMSNorm":
            m.float()
    out = os.path.join(work, "llama")
    model.save_pretrained(out, max_shard_size="100KB", safe_serialization=True)
    files = sorted(os.listdir(out))
    shard_files = [f for f in files if f.endswith(".safetensors")]
    assert len(shard_files) > 2 and "model.safetensors.index.json" in files, files

    subprocess.run([dump, out, os.path.join(work, "dump")], check=True)
    manifest = json.load(open(os.path.join(work, "dump.json")))
    blob = open(os.path.join(work, "dump.bin"), "rb").read()
    got = {t["name"]: t for t in manifest["tensors"]}

    # Against the files as the safetensors library reads them.
    n = 0
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    for shard in shard_files:
        with safe_open(os.path.join(out, shard), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                q = got.pop(name)
                assert q["shard"] == shard == index["weight_map"][name], (name, q["shard"], shard)
                assert q["shape"] == list(t.shape), (name, q["shape"], list(t.shape))
                assert TORCH_DTYPES[q["dtype"]] == t.dtype, (name, q["dtype"], t.dtype)
                assert blob[q["offset"]:q["offset"] + q["nbytes"]] == tensor_bytes(t), "tensor %s differs" % name
                n += 1
    assert not got, "qtool saw tensors the files do not hold: %s" % sorted(got)

    # Against the model itself.
    state = model.state_dict()
    by_name = {t["name"]: t for t in manifest["tensors"]}
    for name, t in state.items():
        q = by_name[name]
        assert blob[q["offset"]:q["offset"] + q["nbytes"]] == tensor_bytes(t), "tensor %s differs from the model" % name

    # qtool inspect --json agrees.
    r = subprocess.run([qtool, "inspect", out, "--json", "--quiet"], check=True, capture_output=True, text=True)
    d = json.loads(r.stdout)
    c = d["components"][0]
    assert d["layout"] == "model"
    assert c["tensors"] == len(state), (c["tensors"], len(state))
    assert c["parameters"] == sum(t.numel() for t in state.values())
    assert c["bytes"] == sum(t.numel() * t.element_size() for t in state.values())
    assert [s["file"] for s in c["shards"]] == shard_files
    assert c["config"]["architecture"] == "LlamaForCausalLM"
    if "block_lists" in c:
        assert {b["prefix"]: b["length"] for b in c["block_lists"]} == {"model.layers": 3}, c["block_lists"]
    print("python -> qtool: %d tensors in %d shards byte-identical" % (n, len(shard_files)))


def main() -> int:
    mode = sys.argv[1]
    if mode == "qtool-to-python":
        qtool_to_python(sys.argv[2], sys.argv[3])
    elif mode == "python-to-qtool":
        python_to_qtool(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit("unknown mode " + mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
