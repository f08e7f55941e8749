"""Generates reference_vectors.json: small fixed inputs and the outputs of the real bitsandbytes,
compressed-tensors and torch on them, so the default test suite checks every scheme bit for bit
without Python. Run once with the interop venv:

    python tests/libquant/gen_reference_vectors.py tests/libquant/reference_vectors.json
"""
import importlib.metadata as md
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # bitsandbytes' compiled dequant: eager is the same math
import json
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "interop"))
import libquant_ref as ref  # noqa: E402

SEED = 20261122


def hexb(b: bytes) -> str:
    return b.hex()


def case(name, scheme, dtype, w, blocksize=64, double_quant=False, per_tensor=False):
    out = ref.reference(scheme, w, blocksize=blocksize, double_quant=double_quant, per_tensor=per_tensor)
    c = {
        "name": name, "scheme": scheme, "dtype": dtype, "shape": list(w.shape), "blocksize": blocksize,
        "double_quant": double_quant, "per_tensor": per_tensor, "input": hexb(ref.tensor_bytes(w)),
        # quant_map and nested_quant_map are the tables below, checked once.
        "outputs": {k: hexb(v) for k, v in out.items()
                    if k not in ("quant_state", "quant_map", "nested_quant_map", "dequant", "native_dequant")},
    }
    if list(w.shape) == [6, 37] or w.shape[0] == 1:
        # The reference dequantization (bitsandbytes / compressed-tensors), in its output dtype.
        c["dequant"] = hexb(out["dequant"])
    if "quant_state" in out:
        c["quant_state"] = out["quant_state"]
    return c


def main():
    path = sys.argv[1]
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    cases = []
    for dt_name, dt in ref.TORCH_DTYPES.items():
        for scheme in ("int8", "fp8_e4m3", "fp8_e5m2", "nf4", "fp4"):
            shapes = [(6, 37), (5, 1), (1, 64)]
            for rows, cols in shapes:
                w = ref.edge_tensor(dt, rows, cols, gen, scheme)
                if scheme.startswith("fp8"):
                    cases.append(case(f"{scheme}-{dt_name}-{rows}x{cols}", scheme, dt_name, w))
                    cases.append(case(f"{scheme}-{dt_name}-{rows}x{cols}-tensor", scheme, dt_name, w, per_tensor=True))
                elif scheme in ("nf4", "fp4"):
                    for bs in (32, 64):
                        cases.append(case(f"{scheme}-{dt_name}-{rows}x{cols}-bs{bs}", scheme, dt_name, w, blocksize=bs))
                    cases.append(case(f"{scheme}-{dt_name}-{rows}x{cols}-dq", scheme, dt_name, w, blocksize=32,
                                      double_quant=True))
                else:
                    cases.append(case(f"{scheme}-{dt_name}-{rows}x{cols}", scheme, dt_name, w))
    # Double quant over more than one nested block (283 absmax values).
    w = ref.edge_tensor(torch.bfloat16, 70, 129, gen, "nf4")
    cases.append(case("nf4-BF16-70x129-dq", "nf4", "BF16", w, blocksize=32, double_quant=True))
    # Ties: values exactly on the 4-bit thresholds (absmax 1 makes the scale exact).
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds
    vals = [1.0]
    for qt in ("nf4", "fp4"):
        b, _ = _get_4bit_quantize_bounds(qt, torch.device("cpu"))
        vals += b.tolist()
    vals += [0.0, -0.0, 1e-45, -1e-45]
    row = torch.tensor(vals + [0.25] * (64 - len(vals)), dtype=torch.float32).reshape(1, 64)
    for scheme in ("nf4", "fp4"):
        cases.append(case(f"{scheme}-F32-ties", scheme, "F32", row))
    # Double quant whose nested absmax is so small that 1 / absmax2 overflows: blocks equal to the
    # mean (0 * inf = NaN in bitsandbytes' index arithmetic) and a zero block.
    w = torch.zeros(6, 64)
    for i, v in enumerate([1e-40, 1e-40, 1e-40, 1e-40, 2e-40, 0.0]):
        w[i, 0] = v
    for scheme in ("nf4", "fp4"):
        cases.append(case(f"{scheme}-F32-tiny-absmax-dq", scheme, "F32", w, blocksize=64, double_quant=True))
    # int8 ties: h * (127 / SCB) landing on .5 (SCB 2 -> multiplier 63.5).
    row = torch.tensor([[2.0, 1.0, -1.0, 0.5, -3.0 / 127 * 2, 1.0 / 63.5, 3.0, -2.0]], dtype=torch.float16)
    cases.append(case("int8-F16-ties", "int8", "F16", row))
    # fp8 ties: quotients halfway between fp8 values, and fp8 subnormals.
    row = torch.tensor([[448.0, 3.25, -3.75, 0.0029296875, 0.0009765625, 0.001953125 * 1.5, 13.0, 9.5, -0.0]],
                       dtype=torch.float32)
    for scheme in ("fp8_e4m3", "fp8_e5m2"):
        cases.append(case(f"{scheme}-F32-ties", scheme, "F32", row))

    # torch.mean of float32 vectors, as bitsandbytes' double quant takes it (sizes around the
    # parallel grain of 32768, with 1 and 2 threads). Inputs: x[i] = ((i * 2654435761) % 1000003) / 1000003.
    mean_cases = []
    threads0 = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for n in (1, 3, 16, 17, 63, 64, 65, 100, 1000, 4097, 32767, 32768, 32769, 65536, 70001, 131075):
            i = np.arange(n, dtype=np.uint64)
            x = ((i * np.uint64(2654435761)) % np.uint64(1000003)).astype(np.float32) / np.float32(1000003)
            m = torch.from_numpy(x).mean()
            mean_cases.append({"n": n, "threads": threads, "mean_bits": int(m.view(torch.int32).item()) & 0xFFFFFFFF})
    torch.set_num_threads(threads0)
    cap = torch.backends.cpu.get_cpu_capability()

    import bitsandbytes.functional as F
    tables = {
        "nf4_code": [int(v) & 0xFFFFFFFF for v in F.get_4bit_type("nf4", device="cpu").view(torch.int32).tolist()],
        "fp4_code": [int(v) & 0xFFFFFFFF for v in F.get_4bit_type("fp4", device="cpu").view(torch.int32).tolist()],
        "dynamic_map": [int(v) & 0xFFFFFFFF for v in F.create_dynamic_map().view(torch.int32).tolist()],
    }
    for qt in ("nf4", "fp4"):
        b, order = _get_4bit_quantize_bounds(qt, torch.device("cpu"))
        tables[qt + "_thresholds"] = [int(v) & 0xFFFFFFFF for v in b.view(torch.int32).tolist()]
        tables[qt + "_order"] = order.tolist()

    doc = {
        "generated_by": "tests/libquant/gen_reference_vectors.py",
        "seed": SEED,
        "versions": {p: md.version(p) for p in ("torch", "bitsandbytes", "compressed-tensors")},
        "torch_cpu_capability": cap,
        # torch's sum kernel uses its AVX2 (8-lane) build on AVX2 and AVX512 CPUs alike.
        "torch_mean_lanes": 8,
        "tables": tables,  # also: the quant_map / nested_quant_map of every 4-bit case
        "mean_cases": mean_cases,
        "cases": cases,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=0, separators=(",", ":"))
        f.write("\n")
    print(f"seed {SEED}: {len(cases)} cases, {len(mean_cases)} mean cases -> {path}")


if __name__ == "__main__":
    main()
