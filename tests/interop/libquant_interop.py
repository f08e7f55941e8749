"""libquant's schemes against the real packages on the CPU, byte for byte.

For each scheme (int8; fp8 e4m3/e5m2 per channel and per tensor; nf4/fp4 with blocksizes 32..4096,
with and without double quant) it writes random weights and edge cases (all-zero rows and blocks,
subnormals, +-max, odd element counts, rows of length 1, every finite 16-bit value) to a
.safetensors file, quantizes them with qtool (libquant_tool) and with bitsandbytes 0.50 /
compressed-tensors / torch (libquant_ref.py), and asserts:
  - every tensor qtool writes is byte-identical to the reference's, the quant_state JSON included
    (bitsandbytes' json.dumps: key order, separators, nested_offset as Python's shortest repr);
  - qtool's dequantization equals the reference's (bitsandbytes' portable 4-bit and int8
    dequantization, compressed-tensors' fp8 decompression);
  - bitsandbytes' QuantState.from_dict accepts qtool's 4-bit tensors and its dequantize_4bit gives
    what it gives for its own.

    python libquant_interop.py --tool build/tests/interop/libquant_tool [--seed N] [--quick]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # bitsandbytes' compiled dequant: eager is the same math

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import libquant_ref as ref  # noqa: E402

PARTS_4BIT = ["weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map"]
REF_KEY = {"weight": "weight", "absmax": "scale", "quant_map": "quant_map", "nested_absmax": "nested_absmax",
           "nested_quant_map": "nested_quant_map", "SCB": "scale", "weight_format": "weight_format",
           "weight_scale": "scale"}


def qtool_names(module, scheme, double_quant):
    """(tensor name, reference key) pairs of one quantized linear, as libquant writes them."""
    if scheme == "int8":
        return [(f"{module}.weight", "weight"), (f"{module}.SCB", "scale"), (f"{module}.weight_format", "weight_format")]
    if scheme.startswith("fp8"):
        return [(f"{module}.weight", "weight"), (f"{module}.weight_scale", "scale")]
    names = [(f"{module}.weight", "weight"), (f"{module}.weight.absmax", "scale"), (f"{module}.weight.quant_map", "quant_map")]
    if double_quant:
        names += [(f"{module}.weight.nested_absmax", "nested_absmax"),
                  (f"{module}.weight.nested_quant_map", "nested_quant_map")]
    return names


def raw(t):
    return ref.tensor_bytes(t)


def all_16bit_values(dtype, limit):
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)
    v = bits.float()
    keep = torch.isfinite(v) & (v.abs() <= limit)
    vals = bits[keep]
    return torch.cat([torch.tensor([limit], dtype=dtype), vals]).reshape(1, -1)


def make_tensors(scheme, gen, quick):
    shapes = [(1, 1), (1, 2), (3, 1), (2, 3), (7, 13), (33, 65), (64, 64), (5, 4097), (129, 31), (17, 256)]
    if not quick:
        shapes += [(2048, 2048), (300, 1000)]  # 65536 blocks of 64: torch.mean's two-thread reduction
    tensors = {}
    for dt_name, dt in ref.TORCH_DTYPES.items():
        for rows, cols in shapes:
            if rows * cols > 1_000_000 and dt_name != "BF16":
                continue
            tensors[f"{dt_name.lower()}_{rows}x{cols}.weight"] = ref.edge_tensor(dt, rows, cols, gen, scheme)
    if scheme in ("fp8_e4m3", "fp8_e5m2", "int8"):
        # Every finite 16-bit value within range: the fp8 scale is exactly 1 (the first element is
        # the format's max), so each value's fp8 encoding (or its int8 code) is checked directly.
        limit = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "int8": 65280.0}[scheme]
        for dt_name in ("BF16", "F16"):
            tensors[f"all_{dt_name.lower()}.weight"] = all_16bit_values(ref.TORCH_DTYPES[dt_name], limit)
    if scheme in ("nf4", "fp4"):
        from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds
        b, _ = _get_4bit_quantize_bounds(scheme, torch.device("cpu"))
        row = torch.cat([torch.tensor([1.0]), b, -b, torch.zeros(1)]).reshape(1, -1)
        tensors["ties.weight"] = row.float()
    return tensors


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"FAILED: {' '.join(cmd)}\n{p.stderr}")


def check_config(tool, tmp, scheme, blocksize, double_quant, per_tensor, gen, quick, threads):
    tag = f"{scheme} bs={blocksize}{' dq' if double_quant else ''}{' per-tensor' if per_tensor else ''}"
    tensors = make_tensors(scheme, gen, quick)
    src = os.path.join(tmp, "in.safetensors")
    out = os.path.join(tmp, "out.safetensors")
    deq = os.path.join(tmp, "deq.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, src)
    cmd = [tool, "quantize", src, out, scheme, "--threads", str(threads)]
    if scheme in ("nf4", "fp4"):
        cmd += ["--blocksize", str(blocksize)]
    if double_quant:
        cmd.append("--double-quant")
    if per_tensor:
        cmd.append("--per-tensor")
    t0 = time.time()
    run(cmd)
    t_qtool = time.time() - t0
    run([tool, "dequantize", out, deq, "--threads", str(threads)])
    got = load_file(out)
    got_deq = load_file(deq)
    failures = []
    n_state_bytes_equal = [0]
    t_ref = 0.0
    for name, w in tensors.items():
        module = name[: -len(".weight")]
        t0 = time.time()
        r = ref.reference(scheme, w, blocksize=blocksize, double_quant=double_quant, per_tensor=per_tensor)
        t_ref += time.time() - t0
        for tname, key in qtool_names(module, scheme, double_quant):
            if tname not in got:
                failures.append(f"{tag}: {tname} missing")
                continue
            if raw(got[tname]) != r[key]:
                a, b = raw(got[tname]), r[key]
                first = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
                failures.append(f"{tag}: {tname} differs from the reference at byte {first} "
                                f"(sizes {len(a)} / {len(b)})")
        # Dequantization: qtool's float32, rounded to the reference's output dtype.
        ours = got_deq[f"{module}.weight"]
        ref_deq = r["dequant"]
        out_dtype = torch.float32 if scheme == "int8" else w.dtype
        if raw(ours.reshape(w.shape).to(out_dtype)) != ref_deq:
            failures.append(f"{tag}: {module} dequantized differs from the reference")
        if scheme in ("nf4", "fp4"):
            qs_bytes = bytes(got[f"{module}.weight.quant_state.bitsandbytes__{scheme}"].tolist())
            if qs_bytes != r["quant_state_bytes"]:
                failures.append(f"{tag}: {module} quant_state bytes {qs_bytes!r} != bitsandbytes' "
                                f"{r['quant_state_bytes']!r}")
            n_state_bytes_equal[0] += qs_bytes == r["quant_state_bytes"]
            js = json.loads(qs_bytes.decode())
            rs = r["quant_state"]
            for k in rs:
                same = (torch.tensor(js.get(k), dtype=torch.float32) == torch.tensor(rs[k], dtype=torch.float32)).item() \
                    if k == "nested_offset" else js.get(k) == rs[k]
                if not same:
                    failures.append(f"{tag}: {module} quant_state[{k}] = {js.get(k)!r}, reference {rs[k]!r}")
            if set(js) != set(rs):
                failures.append(f"{tag}: {module} quant_state keys {sorted(js)} != {sorted(rs)}")
            # bitsandbytes loads qtool's tensors (as transformers does) and dequantizes them.
            import bitsandbytes.functional as F
            from bitsandbytes.functional import QuantState
            prefix = f"{module}.weight."
            qs = {k[len(prefix):]: v for k, v in got.items() if k.startswith(prefix)}
            state = QuantState.from_dict(qs, device=torch.device("cpu"))
            bnb_deq = F.dequantize_4bit(got[f"{module}.weight"], state)
            if raw(bnb_deq) != r["native_dequant"]:
                failures.append(f"{tag}: {module}: bitsandbytes dequantizes qtool's tensors differently from its own")
    if scheme in ("nf4", "fp4"):
        print(f"    {tag}: {n_state_bytes_equal[0]} of {len(tensors)} quant_state blobs byte-identical to "
              f"bitsandbytes'", flush=True)
    return tag, failures, t_qtool, t_ref


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", required=True)
    ap.add_argument("--seed", type=int, default=int(time.time()) % 1_000_000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    # qtool's double quant takes torch.mean as torch computes it with 2 threads (libquant's default).
    torch.set_num_threads(2)
    print(f"seed {args.seed}; torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
          f"threads {torch.get_num_threads()}", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    configs = [("int8", 64, False, False)]
    for s in ("fp8_e4m3", "fp8_e5m2"):
        configs += [(s, 64, False, False), (s, 64, False, True)]
    for s in ("nf4", "fp4"):
        for bs in (32, 64, 128, 4096):
            configs.append((s, bs, False, False))
        for bs in (32, 64, 256):
            configs.append((s, bs, True, False))
    all_failures = []
    with tempfile.TemporaryDirectory(prefix="qtool-libquant-interop-") as tmp:
        for scheme, bs, dq, pt in configs:
            tag, failures, tq, tr = check_config(args.tool, tmp, scheme, bs, dq, pt, gen, args.quick, args.threads)
            status = "ok" if not failures else f"{len(failures)} FAILURES"
            print(f"{tag:32s} {status}  (qtool {tq:.2f}s incl. process start, reference {tr:.2f}s)", flush=True)
            for f in failures[:10]:
                print("   ", f)
            all_failures += failures
    if all_failures:
        print(f"{len(all_failures)} failures (seed {args.seed})")
        sys.exit(1)
    print("all byte-identical")


if __name__ == "__main__":
    main()
