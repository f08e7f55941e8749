#!/usr/bin/env python3
"""torch.nn.functional.scaled_dot_product_attention at bench_attention's shapes (bf16, CUDA).

Inputs as the frameworks hold them: [1, T, H, d] random N(0, 1), transposed to [1, H, T, d] (not
contiguous, as diffusers and transformers pass them). Llama's GQA through enable_gqa=True (k and v
stay at 8 heads). Each measurement: 3 warm-ups, then 20 single calls timed by CUDA events, the
median. Rows: torch_sdpa (torch's own backend choice) and, where torch accepts the shape, each
backend forced (torch_sdpa_flash, torch_sdpa_cudnn, torch_sdpa_efficient). Prints one JSON array of
rows with bench_attention's fields; with --qtool-json FILE (bench_attention --json FILE) it also
prints qtool_mma / torch_sdpa TFLOP/s per shape (issue 12's target: >= 0.9).

  python3 bench/attention_torch.py [--json OUT] [--qtool-json QTOOL.json] [--reps 20] [--shape all]
"""
import argparse
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F

SHAPES = [  # name, heads, kv_heads, tokens, head_dim, causal: as bench/attention.cpp
    ("flux", 24, 24, 4608, 128, False),
    ("llama", 32, 8, 4096, 128, True),
    ("hd64", 24, 24, 4608, 64, False),
]


def backends():
    out = [("torch_sdpa", None)]
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:
        return out
    for name, attr in (("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"),
                       ("efficient", "EFFICIENT_ATTENTION")):
        if hasattr(SDPBackend, attr):
            out.append(("torch_sdpa_" + name, getattr(SDPBackend, attr)))
    return out


def time_ms(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="write the rows here as well")
    ap.add_argument("--qtool-json", help="bench_attention --json output: print the ratios")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--shape", default="all")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_torch.py: no CUDA device")
    device = torch.cuda.get_device_name(0)
    print(f"torch {torch.__version__} on {device}", file=sys.stderr)
    gen = torch.Generator(device="cuda").manual_seed(1234)
    rows = []
    for name, h, hkv, t, d, causal in SHAPES:
        if args.shape not in ("all", name):
            continue
        q = torch.randn(1, t, h, d, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
        k = torch.randn(1, t, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
        v = torch.randn(1, t, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
        kw = {"is_causal": causal, "scale": 1.0 / math.sqrt(d)}
        if hkv != h:
            kw["enable_gqa"] = True
        flop = 4.0 * t * t * d * h * (0.5 if causal else 1.0)
        for impl, backend in backends():
            def call():
                return F.scaled_dot_product_attention(q, k, v, **kw)
            try:
                if backend is None:
                    ms = time_ms(call, args.reps)
                else:
                    from torch.nn.attention import sdpa_kernel
                    with sdpa_kernel([backend]):
                        ms = time_ms(call, args.reps)
            except RuntimeError as e:  # the backend refuses this shape or is not built
                print(f"  {name} {impl}: not available ({str(e).splitlines()[0][:120]})", file=sys.stderr)
                continue
            row = {"impl": impl, "shape": name, "batch": 1, "heads": h, "kv_heads": hkv, "tokens": t,
                   "head_dim": d, "causal": causal, "dtype": "bf16", "ms": round(ms, 4),
                   "tflops": round(flop / ms / 1e9, 2), "device": device}
            rows.append(row)
            print(f"  {name:6s} {impl:22s} {ms:9.3f} ms {row['tflops']:7.1f} TFLOP/s", file=sys.stderr)
        del q, k, v
    print(json.dumps(rows, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.qtool_json:
        with open(args.qtool_json) as f:
            ours = json.load(f)
        print("ratios (TFLOP/s of ours / torch_sdpa; issue 12 asks >= 0.9):")
        for name, *_ in SHAPES:
            ref = [r for r in rows if r["shape"] == name and r["impl"] == "torch_sdpa"]
            if not ref:
                continue
            for r in ours:
                if r["shape"] == name:
                    print(f"  {name:6s} {r['impl']:13s} {r['tflops']:7.1f} / {ref[0]['tflops']:7.1f} = "
                          f"{r['tflops'] / ref[0]['tflops']:.3f}")


if __name__ == "__main__":
    main()
