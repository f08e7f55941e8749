#!/usr/bin/env python3
"""Small safetensors edits for the verify e2e tests (standard library only).

  st_edit.py corrupt DIR TENSOR        XOR 0xFF into every 7th byte of TENSOR (from byte 3) in
                                       whichever shard of the model folder DIR holds it
  st_edit.py derive IN OUT CASE         write OUT from the inputs in IN (a verify --outputs file)
                                       broken as CASE says: missing, misnamed, unprefixed,
                                       shape, tokens, dtype, range
"""
import json
import os
import struct
import sys

DSIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "F64": 8}


def read(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", None)
    tensors = {}
    for name, t in header.items():
        b, e = t["data_offsets"]
        tensors[name] = (t["dtype"], list(t["shape"]), data[b:e])
    return tensors, meta


def write(path, tensors):
    header, blobs, off = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def corrupt(folder, tensor):
    for fname in sorted(os.listdir(folder)):
        if not fname.endswith(".safetensors"):
            continue
        path = os.path.join(folder, fname)
        with open(path, "r+b") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            if tensor not in header:
                continue
            b, e = header[tensor]["data_offsets"]
            f.seek(8 + n + b)
            data = bytearray(f.read(e - b))
            for i in range(3 % max(1, len(data)), len(data), 7):
                data[i] ^= 0xFF
            f.seek(8 + n + b)
            f.write(bytes(data))
            print(f"corrupted {tensor} in {fname} ({len(data)} bytes)")
            return
    sys.exit(f"no tensor {tensor} in {folder}")


def derive(src, dst, case):
    tensors, _ = read(src)
    inputs = {k: v for k, v in tensors.items() if not (k.endswith("logits") or k.endswith("sample"))}
    ids = [k for k in inputs if k.endswith("input_ids") or k.endswith("hidden_states") and "encoder" not in k][0]
    dtype, shape, data = inputs[ids]
    if case == "missing":
        del inputs[ids]
    elif case == "misnamed":
        inputs[ids + "_typo"] = inputs.pop(ids)
    elif case == "unprefixed":  # a pipeline's input without its component prefix
        inputs[ids.split(".", 1)[-1] if "." in ids else "model." + ids] = inputs.pop(ids)
    elif case == "shape":  # one more dimension of size 1 at the end
        inputs[ids] = (dtype, shape + [1], data)
    elif case == "tokens":  # twice the tokens the plan was made for
        inputs[ids] = (dtype, shape[:1] + [2 * shape[1]] + shape[2:], data * 2)
    elif case == "dtype":  # ids as U8 / states as I64: no framework passes these
        if dtype in ("I64", "I32"):
            inputs[ids] = ("U8", shape, bytes(len(data) // DSIZE[dtype]))
        else:
            inputs[ids] = ("I64", shape, bytes(len(data) // DSIZE[dtype] * 8))
    elif case == "range":  # a token id past the vocabulary
        assert dtype in ("I64", "I32"), "range applies to token ids"
        big = struct.pack("<q" if dtype == "I64" else "<i", 1 << 30)
        inputs[ids] = (dtype, shape, big + data[len(big):])
    else:
        sys.exit(f"unknown case {case}")
    write(dst, inputs)


if __name__ == "__main__":
    if sys.argv[1] == "corrupt":
        corrupt(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "derive":
        derive(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
