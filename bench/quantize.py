#!/usr/bin/env python3
"""bench/quantize: how fast `qtool quantize` turns a checkpoint into each scheme.

For each scheme, on a synthetic checkpoint whose files are in the page cache (read twice first)
and with the output on tmpfs (/dev/shm), in one run:
  - qtool's input GB/s (checkpoint bytes / wall time of the whole command, best of --repeats), and
    the same over the conversion alone (the report's `seconds`: from opening the checkpoint to the
    output's rename, without the process start, which in a CUDA build loads cuBLAS);
  - the ratio to `cat FILES > /dev/null` of the same files, timed just before each qtool run;
  - the ratio to the reference implementation on the same tensors: bitsandbytes' CPU
    `int8_vectorwise_quant` (int8), `quantize_4bit` (nf4, fp4; `compress_statistics` for double
    quant), and for fp8 compressed-tensors' computation in torch (per-row absmax / 448 in the weight
    dtype, divide, clamp, cast). The reference is timed on tensors already in memory, with as many
    torch threads as qtool has; qtool's rate for this ratio counts only the bytes of the weights
    it quantized against its whole wall time (copies and I/O included), so the ratio is a floor;
    The same tensors are also quantized in memory by libquant (bench/quant_kernels --checkpoint):
    the kernel-to-kernel ratio, both sides without I/O;
  - the I/O floor: `cat` of the input plus writing as many bytes as qtool's output (zeros, 4 MiB
    writes, one stream) into the output's tmpfs, timed next to each qtool run; on a VM, tmpfs
    page allocation can make the output's write alone cost a large part of the input's `cat`;
  - peak resident memory (/usr/bin/time) against the largest tensor of the checkpoint.
Targets (DESIGN.md 7, the quantize issue): int8 and fp8 >= 0.4x cat, nf4 >= 0.2x cat, every scheme
>= 10x its reference. Results are printed and, with --results, appended to bench/RESULTS.md.

  quantize.py --qtool QTOOL [--preset flux --scale 0.45 --components transformer] [--threads 2]
              [--schemes int8,fp8_e4m3,nf4,nf4-dq] [--repeats 3] [--work DIR] [--results FILE]
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time

SCHEMES = {
    "int8": '{"quant_backend": "int8"}',
    "fp8_e4m3": '{"quant_backend": "fp8_e4m3"}',
    "fp8_e5m2": '{"quant_backend": "fp8_e5m2"}',
    "nf4": '{"quant_backend": "nf4"}',
    "nf4-dq": '{"quant_backend": "nf4", "quant_kwargs": {"double_quant": true}}',
    "fp4": '{"quant_backend": "fp4"}',
}
CAT_TARGET = {"int8": 0.4, "fp8_e4m3": 0.4, "fp8_e5m2": 0.4, "nf4": 0.2, "nf4-dq": 0.2, "fp4": 0.2}
REF_TARGET = 10.0


def safetensors_files(root):
    out = []
    for dirpath, _, files in os.walk(root):
        out += [os.path.join(dirpath, f) for f in files if f.endswith(".safetensors")]
    return sorted(out)


def largest_tensor(files):
    best = 0
    for f in files:
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            h = json.loads(fh.read(n))
        for k, v in h.items():
            if k != "__metadata__":
                best = max(best, v["data_offsets"][1] - v["data_offsets"][0])
    return best


def time_cat(files):
    t = time.perf_counter()
    subprocess.run(["cat"] + files, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def time_qtool(qtool, ckpt, config, out, threads):
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["/usr/bin/time", "-f", "maxrss_kb=%M", qtool, "quantize", ckpt, "--config", config, "-o", out,
           "--threads", str(threads), "--json", "-q"]
    t = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, check=True)
    wall = time.perf_counter() - t
    rss = int(re.search(r"maxrss_kb=(\d+)", p.stderr).group(1)) * 1024
    report = json.loads(p.stdout)
    shutil.rmtree(out, ignore_errors=True)
    return wall, rss, report


def time_write(path, nbytes):
    """Seconds to write nbytes of zeros into a new file at path (4 MiB writes), then remove it."""
    chunk = bytes(4 << 20)
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    left = nbytes
    while left > 0:
        left -= os.write(fd, chunk[:min(left, len(chunk))])
    os.close(fd)
    dt = time.perf_counter() - t
    os.unlink(path)
    return dt


def kernel_rate(kernels, scheme, ckpt, report, threads, max_bytes):
    """libquant's in-memory rate on the same tensors as the reference (bench/quant_kernels)."""
    path = os.path.join(os.path.dirname(os.path.abspath(kernels)), "bench-quantize-report.json")
    with open(path, "w") as f:
        json.dump(report, f)
    base = {"nf4-dq": "nf4"}.get(scheme, scheme)
    cmd = [kernels, "--checkpoint", ckpt, "--report", path, "--scheme", base, "--max-bytes", str(max_bytes),
           "--threads", str(threads), "--reps", "3"]
    if scheme.endswith("-dq"):
        cmd += ["--double-quant", "1"]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, check=True, text=True).stdout
    os.unlink(path)
    return json.loads(out)["gbps"] * 1e9


def reference_rate(scheme, ckpt, report, threads, max_bytes):
    """Bytes per second of the reference quantizer over (a prefix of) the weights qtool quantized."""
    import torch
    import warnings
    warnings.filterwarnings("ignore")
    from safetensors import safe_open
    torch.set_num_threads(threads)
    wanted = [(t["component"], t["name"]) for t in report["tensors"] if t["scheme"] is not None]
    tensors, total = [], 0
    files = safetensors_files(ckpt)
    index = {}
    for f in files:
        comp = os.path.relpath(os.path.dirname(f), ckpt)
        comp = "" if comp == "." else comp
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                index[(comp, k)] = f
    for comp, name in wanted:
        if total >= max_bytes:
            break
        with safe_open(index[(comp, name)], "pt") as fh:
            w = fh.get_tensor(name)
        tensors.append(w)
        total += w.numel() * w.element_size()
    if scheme == "int8":
        import bitsandbytes.functional as F
        fn = lambda w: F.int8_vectorwise_quant(w.to(torch.float16))  # noqa: E731
    elif scheme.startswith("fp8"):
        dt, fmax = (torch.float8_e4m3fn, 448.0) if scheme == "fp8_e4m3" else (torch.float8_e5m2, 57344.0)
        fn = lambda w: (w / (w.abs().amax(dim=1, keepdim=True) / fmax)).clamp(-fmax, fmax).to(dt)  # noqa: E731
    else:
        import bitsandbytes.functional as F
        qt = "fp4" if scheme == "fp4" else "nf4"
        dq = scheme.endswith("-dq")
        fn = lambda w: F.quantize_4bit(w, quant_type=qt, blocksize=64, compress_statistics=dq)  # noqa: E731
    fn(tensors[0][:8])  # load the kernels outside the timing
    t = time.perf_counter()
    for w in tensors:
        fn(w)
    return total / (time.perf_counter() - t), total


def machine():
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return "%d-core %s, %.0f GiB, Linux %s" % (os.cpu_count(), cpu, mem, platform.release())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qtool", required=True)
    ap.add_argument("--kernels", help="bench/quant_kernels (default: beside qtool in the build tree)")
    ap.add_argument("--preset", default="flux")
    ap.add_argument("--scale", default="0.45")
    ap.add_argument("--components", default="transformer")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--schemes", default="int8,fp8_e4m3,nf4,nf4-dq")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference-bytes", type=int, default=256 << 20,
                    help="weights the (slow) reference quantizes, at most")
    ap.add_argument("--work", default="/var/tmp/qtool-bench-quantize")
    ap.add_argument("--out", default="/dev/shm/qtool-bench-quantize-out")
    ap.add_argument("--results", help="append a section to this RESULTS.md")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint in --work")
    args = ap.parse_args()
    if not args.kernels:
        args.kernels = os.path.join(os.path.dirname(os.path.abspath(args.qtool)), "..", "..", "bench", "quant_kernels")

    ckpt = os.path.join(args.work, "%s-%s-%s" % (args.preset, args.scale, args.components.replace(",", "+")))
    if not os.path.isdir(ckpt):
        os.makedirs(args.work, exist_ok=True)
        cmd = [args.qtool, "synth", "--preset", args.preset, "--scale", args.scale, "-o", ckpt, "-q"]
        if args.components:
            cmd += ["--components", args.components]
        subprocess.run(cmd, check=True)
    files = safetensors_files(ckpt)
    nbytes = sum(os.path.getsize(f) for f in files)
    biggest = largest_tensor(files)
    load_before = os.getloadavg()
    # What the process holds before converting anything.
    p = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", args.qtool, "--version"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, check=True)
    baseline_rss = int(re.search(r"maxrss_kb=(\d+)", p.stderr).group(1)) * 1024
    t = time.perf_counter()
    subprocess.run([args.qtool, "--version"], stdout=subprocess.DEVNULL, check=True)
    startup = time.perf_counter() - t
    for _ in range(2):
        time_cat(files)

    rows = []
    for scheme in args.schemes.split(","):
        config = os.path.join(args.work, "bench-%s.json" % scheme)
        open(config, "w").write(SCHEMES[scheme])
        cats, walls, inprocs, rsss, writes, report = [], [], [], [], [], None
        for _ in range(args.repeats):
            cats.append(time_cat(files))
            wall, rss, report = time_qtool(args.qtool, ckpt, config, args.out, args.threads)
            writes.append(time_write(args.out + ".floor", report["bytes_out"]))
            walls.append(wall)
            inprocs.append(report["seconds"])
            rsss.append(rss)
        quantized_bytes = sum(t["bytes_in"] for t in report["tensors"] if t["scheme"] is not None)
        ref_rate, ref_bytes = reference_rate(scheme, ckpt, report, args.threads, args.reference_bytes)
        kern_rate = kernel_rate(args.kernels, scheme, ckpt, report, args.threads, args.reference_bytes)
        wall, cat, write = min(walls), min(cats), min(writes)
        inproc = min(inprocs)
        row = {
            "scheme": scheme,
            "qtool_gbps": nbytes / wall / 1e9,
            "qtool_gbps_median": nbytes / statistics.median(walls) / 1e9,
            "inproc_gbps": nbytes / inproc / 1e9,
            "vs_cat_inproc": cat / inproc,
            "cat_gbps": nbytes / cat / 1e9,
            "vs_cat": cat / wall,
            "vs_cat_median": statistics.median(cats) / statistics.median(walls),
            "ref_gbps": ref_rate / 1e9,
            "vs_ref": (quantized_bytes / wall) / ref_rate,
            "kernel_gbps": kern_rate / 1e9,
            "kernel_vs_ref": kern_rate / ref_rate,
            "write_gbps": report["bytes_out"] / write / 1e9,
            "write_vs_cat": write / cat,
            "vs_floor": (cat + write) / wall,
            "ref_bytes": ref_bytes,
            "rss": max(rsss),
            "rss_vs_largest": max(rsss) / biggest,
            "rss_above_start": max(rsss) - baseline_rss,
            "sqnr_db": report["totals"]["sqnr_db"],
        }
        row["ok"] = row["vs_cat"] >= CAT_TARGET[scheme] and row["kernel_vs_ref"] >= REF_TARGET
        rows.append(row)
        print("%-9s qtool %.2f GB/s (median %.2f; conversion alone %.2f), cat %.2f GB/s -> %.2fx cat (conversion "
              "alone %.2fx; target %.1fx); reference %.3f GB/s -> %.0fx (target %.0fx); peak RSS %.0f MiB (%.0f MiB "
              "above the process start) = %.1fx the largest tensor; SQNR %.1f dB; kernel %.2f GB/s -> %.0fx the reference; "
              "output write alone %.2f GB/s = %.2fx cat's time; qtool reaches %.2fx the I/O floor (cat + write)"
              % (scheme, row["qtool_gbps"], row["qtool_gbps_median"], row["inproc_gbps"], row["cat_gbps"], row["vs_cat"],
                 row["vs_cat_inproc"], CAT_TARGET[scheme], row["ref_gbps"], row["vs_ref"], REF_TARGET,
                 row["rss"] / 2**20, row["rss_above_start"] / 2**20, row["rss_vs_largest"], row["sqnr_db"],
                 row["kernel_gbps"], row["kernel_vs_ref"], row["write_gbps"], row["write_vs_cat"], row["vs_floor"]),
              flush=True)
    load_after = os.getloadavg()
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)

    if args.results:
        today = datetime.date.today().isoformat()
        lines = []
        if not os.path.exists(args.results):
            lines += ["# Benchmark results", "", "Recorded by the benchmarks in this folder; each section says when, on what",
                      "machine and what was measured.", ""]
        lines += [
            "## quantize (%s)" % today,
            "",
            "Machine: %s. Load average %.1f / %.1f / %.1f before, %.1f / %.1f / %.1f after (the machine is shared)."
            % ((machine(),) + tuple(load_before) + tuple(load_after)),
            "",
            "`bench/quantize.py --preset %s --scale %s --components %s --threads %d --repeats %d`: %s, %d files, "
            "%.2f GB, largest tensor %.1f MB; page cache warm, output on /dev/shm. qtool and cat are timed "
            "alternately, best of %d each; the reference quantizes the first %.0f MB of the weights qtool "
            "quantized, in memory, with %d torch threads (bitsandbytes %s; torch for fp8)."
            % (args.preset, args.scale, args.components, args.threads, args.repeats, os.path.basename(ckpt), len(files),
               nbytes / 1e9, biggest / 1e6, args.repeats, rows[0]["ref_bytes"] / 1e6, args.threads, bnb_version()),
            "",
            "`qtool --version` alone takes %.2f s and %.0f MiB of RSS in this build (process start; "
            "a CUDA build loads cuBLAS only when it runs on a GPU). \"conversion alone\" is the report's `seconds`, without that start." % (startup, baseline_rss / 2**20),
            "",
            "| scheme | qtool GB/s (best / median / conversion alone) | cat GB/s | qtool / cat (conversion alone) | target | output write alone: GB/s, time / cat's | qtool / I/O floor (cat + write) | reference GB/s | libquant in memory, same tensors: GB/s, / reference | target | qtool end to end / reference | peak RSS (above start) | RSS / largest tensor | SQNR |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append("| %s | %.2f / %.2f / %.2f | %.2f | %.2fx (%.2fx) %s | %.1fx | %.2f, %.2fx | %.2fx | %.3f | %.2f, %.0fx %s | %.0fx | %.0fx | %.0f MiB (%.0f MiB) | %.1fx | %.1f dB |" % (
                r["scheme"], r["qtool_gbps"], r["qtool_gbps_median"], r["inproc_gbps"], r["cat_gbps"], r["vs_cat"],
                r["vs_cat_inproc"], "" if r["vs_cat"] >= CAT_TARGET[r["scheme"]] else "(below)", CAT_TARGET[r["scheme"]],
                r["write_gbps"], r["write_vs_cat"], r["vs_floor"],
                r["ref_gbps"], r["kernel_gbps"], r["kernel_vs_ref"], "" if r["kernel_vs_ref"] >= REF_TARGET else "(below)",
                REF_TARGET, r["vs_ref"], r["rss"] / 2**20, r["rss_above_start"] / 2**20, r["rss_vs_largest"], r["sqnr_db"]))
        lines.append("")
        with open(args.results, "a") as f:
            f.write("\n".join(lines) + "\n")
        print("appended to", args.results)
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


def bnb_version():
    try:
        import bitsandbytes
        return bitsandbytes.__version__
    except Exception:  # noqa: BLE001
        return "absent"


if __name__ == "__main__":
    main()
