"""Reads and rewrites safetensors files and qtool plans in plain Python (no torch), so that the e2e
tests can damage a checkpoint, a plan or a forward's inputs in one precise way.

    python3 st_edit.py COMMAND FILE ARGS...   (see the commands at the bottom)
    python3 st_edit.py corrupt DIR TENSOR     XOR 0xFF into every 7th byte of TENSOR (from byte 3)
                                              in whichever shard of the model folder DIR holds it
    python3 st_edit.py derive IN OUT CASE     write OUT from the inputs in IN (a verify --outputs
                                              file) broken as CASE says: missing, misnamed,
                                              unprefixed, shape, tokens, dtype, range
"""
import json
import os
import struct
import sys

SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
         "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read(path):
    """-> (metadata or None, {name: [dtype, shape, bytes]}) in file order."""
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    meta = header.pop("__metadata__", None)
    tensors = {}
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        b, en = e["data_offsets"]
        tensors[name] = [e["dtype"], e["shape"], data[b:en]]
    return meta, tensors


def write(path, meta, tensors, after_json=b""):
    """Writes the tensors back to back; `after_json` goes right after the JSON object, before the
    space padding."""
    header, data = {}, b""
    if meta is not None:
        header["__metadata__"] = meta
    for name, (dtype, shape, blob) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    hb = json.dumps(header, separators=(",", ":")).encode() + after_json
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + data)


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
    _, tensors = read(src)
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
        inputs[ids] = [dtype, shape + [1], data]
    elif case == "tokens":  # twice the tokens the plan was made for
        inputs[ids] = [dtype, shape[:1] + [2 * shape[1]] + shape[2:], data * 2]
    elif case == "dtype":  # ids as U8 / states as I64: no framework passes these
        if dtype in ("I64", "I32"):
            inputs[ids] = ["U8", shape, bytes(len(data) // SIZES[dtype])]
        else:
            inputs[ids] = ["I64", shape, bytes(len(data) // SIZES[dtype] * 8)]
    elif case == "latents":  # a pipeline's latents with twice the channels
        dtype, shape, data = inputs["latents"]
        inputs["latents"] = [dtype, shape[:2] + [shape[2] * 2], data * 2]
    elif case == "nolatents":  # a pipeline's latents left out
        del inputs["latents"]
    elif case == "range":  # a token id past the vocabulary
        assert dtype in ("I64", "I32"), "range applies to token ids"
        big = struct.pack("<q" if dtype == "I64" else "<i", 1 << 30)
        inputs[ids] = [dtype, shape, big + data[len(big):]]
    else:
        sys.exit(f"unknown case {case}")
    write(dst, None, inputs)


def main():
    cmd, path = sys.argv[1], sys.argv[2]
    args = sys.argv[3:]
    if cmd == "corrupt":
        return corrupt(path, args[0])
    if cmd == "derive":
        return derive(path, args[0], args[1])
    if cmd == "names":  # prints the tensor names, one a line
        sys.stdout.write("".join(name + "\n" for name in read(path)[1]))
        return
    meta, tensors = read(path)
    if cmd == "after-json":  # BYTES_HEX: bytes placed right after the header's JSON object
        write(path, meta, tensors, bytes.fromhex(args[0]))
    elif cmd == "drop":  # NAME: removes a tensor
        del tensors[args[0]]
        write(path, meta, tensors)
    elif cmd == "rename":  # OLD NEW (NEW may hold JSON escapes such as \u0000)
        new = json.loads('"' + args[1] + '"')
        tensors = {new if k == args[0] else k: v for k, v in tensors.items()}
        write(path, meta, tensors)
    elif cmd == "set-elem":  # NAME INDEX VALUE: one element of a F32/F16/BF16 tensor ("nan", "inf" too)
        dtype, shape, blob = tensors[args[0]]
        i, v = int(args[1]), float(args[2])
        if dtype == "F32":
            elem = struct.pack("<f", v)
        elif dtype == "F16":
            elem = struct.pack("<e", v)
        elif dtype == "BF16":
            elem = struct.pack("<f", v)[2:]  # the high half (NaN and Inf stay NaN and Inf)
        else:
            sys.exit("set-elem: dtype " + dtype)
        n = len(elem)
        tensors[args[0]] = [dtype, shape, blob[:n * i] + elem + blob[n * i + n:]]
        write(path, meta, tensors)
    elif cmd == "set-scalar":  # NAME DTYPE VALUE: replaces a tensor by a scalar of DTYPE
        fmt = {"U8": "<B", "I32": "<i", "I64": "<q"}[args[1]]
        tensors[args[0]] = [args[1], [], struct.pack(fmt, int(args[2]))]
        write(path, meta, tensors)
    elif cmd == "flip-byte":  # NAME INDEX: inverts one byte of a tensor
        dtype, shape, blob = tensors[args[0]]
        i = int(args[1])
        tensors[args[0]] = [dtype, shape, blob[:i] + bytes([blob[i] ^ 0xFF]) + blob[i + 1:]]
        write(path, meta, tensors)
    elif cmd == "replace-text":  # NAME OLD NEW: edits a U8 JSON blob (a quant_state) keeping its size
        dtype, shape, blob = tensors[args[0]]
        old, new = args[1].encode(), args[2].encode()
        assert len(old) == len(new) and old in blob, (old, new)
        tensors[args[0]] = [dtype, shape, blob.replace(old, new, 1)]
        write(path, meta, tensors)
    else:
        sys.exit("st_edit.py: unknown command " + cmd)


if __name__ == "__main__":
    main()
