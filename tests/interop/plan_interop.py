"""qtool's balanced plan against accelerate on the same model and budgets.

The model: a synthetic Llama written by `qtool synth` (and a tied-embedding variant); the same
model built on the meta device by transformers from that checkpoint's config.json. For each
budget (two GPUs, from roomy to most-offloaded): accelerate's
infer_auto_device_map(get_balanced_memory(...)) with no_split_module_classes=["LlamaDecoderLayer"]
beside `qtool plan --device-map balanced` with the same max_memory. accelerate's max_memory is
memory for weights, so qtool plans with a device profile that has no CUDA context or cuBLAS
workspace (plan_accelerate.json) and --tokens 1: both place weights into the same bytes.

Checks: qtool keeps at least as many bytes on the GPUs; its max/mean GPU load is no worse;
accelerate's check_device_map accepts qtool's device_map. Prints a Markdown table (--table FILE
writes it too).

    plan_interop.py QTOOL WORKDIR [--table FILE]
"""
import json
import logging
import os
import random
import shutil
import subprocess
import sys

import torch
from accelerate import init_empty_weights
from accelerate.utils import check_device_map, get_balanced_memory, infer_auto_device_map
from transformers import LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 1 << 30
MIB = 1 << 20


def param_sizes(model):
    """Bytes in bf16 of each parameter, tied parameters once (buffers such as rotary inv_freq are
    not in the checkpoint and are left out)."""
    seen, out = set(), {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = p.data_ptr() if p.device.type != "meta" else id(p)
        out[name] = 0 if key in seen else p.numel() * 2
        seen.add(key)
    return out


def gpu_loads(device_map, params, ngpu):
    loads = [0] * ngpu
    other = 0
    for name, size in params.items():
        keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
        dev = device_map[max(keys, key=len)]
        if isinstance(dev, int):
            loads[dev] += size
        else:
            other += size
    return loads, other


def ratio(loads):
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else float("inf")


def main():
    # accelerate warns that GPUs 0 and 1 are absent on this machine; it plans for them anyway.
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    qtool, work = sys.argv[1], sys.argv[2]
    table_path = None
    if "--table" in sys.argv:
        table_path = sys.argv[sys.argv.index("--table") + 1]
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    rows = []
    failures = []
    for preset, scale in (("llama", 0.25), ("llama-tied", 0.25)):
        ck = os.path.join(work, preset)
        subprocess.run([qtool, "synth", "--preset", preset, "--scale", str(scale), "-o", ck, "-q"], check=True)
        cfg = json.load(open(os.path.join(ck, "config.json")))
        config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
        with init_empty_weights():
            model = LlamaForCausalLM(config)
        model.tie_weights()
        params = param_sizes(model)
        total = sum(params.values())
        # The smallest budget qtool can plan with (every layer streamed through one slot: the
        # embedding, the largest layer, must fit a slot, as accelerate's largest-layer reserve says).
        err = subprocess.run([qtool, "plan", ck, "--max-memory", "0=1,1=1", "--tokens", "1", "--device-profile",
                              os.path.join(HERE, "plan_accelerate.json")], capture_output=True, text=True).stderr
        smallest = int(err.split("Smallest budget that fits: --max-memory 0=")[1].split()[0])
        # Budgets per GPU, as fractions of half the model: roomy, tight, and offloading ones down to
        # the smallest, plus one random fraction (from the printed seed).
        fractions = [1.5, 1.1, 1.02, 0.95, 0.8, 0.6, 0.4, rng.uniform(0.4, 1.2)]
        budgets = sorted({max(int(total / 2 * f), smallest) for f in fractions}, reverse=True)
        for budget in budgets:
            f = budget / (total / 2)
            mm = {0: budget, 1: budget, "cpu": 64 * GIB}
            nsc = ["LlamaDecoderLayer"]
            bal = get_balanced_memory(model, max_memory=dict(mm), no_split_module_classes=nsc, dtype=torch.bfloat16)
            acc = infer_auto_device_map(model, max_memory=bal, no_split_module_classes=nsc, dtype=torch.bfloat16)
            acc_loads, acc_off = gpu_loads(acc, params, 2)
            out = subprocess.run(
                [qtool, "plan", ck, "--device-map", "balanced", "--max-memory", f"0={budget},1={budget},cpu=64GiB",
                 "--tokens", "1", "--device-profile", os.path.join(HERE, "plan_accelerate.json"), "--json", "-q"],
                check=True, capture_output=True, text=True).stdout
            plan = json.loads(out)
            comp = plan["components"][0]
            qdm = comp["device_map"]
            q_loads = [next(d["weights_bytes"] for d in plan["devices"] if d["device"] == f"cuda:{g}") for g in (0, 1)]
            q_off = plan["offloaded_bytes"]
            # qtool's bytes are the checkpoint's: they must agree with torch's parameter sizes.
            if sum(q_loads) + q_off != total:
                failures.append(f"{preset} f={f:.2f}: qtool places {sum(q_loads) + q_off} bytes, the model has {total}")
            try:
                check_device_map(model, {k: v for k, v in qdm.items()})
                accepted = "yes"
            except Exception as e:  # noqa: BLE001
                accepted = f"no: {e}"
                failures.append(f"{preset} f={f:.2f}: check_device_map rejected qtool's map: {e}")
            qr, ar = ratio(q_loads), ratio(acc_loads)
            rows.append((preset, scale, f, budget, sum(acc_loads), acc_off, ar, sum(q_loads), q_off, qr, accepted,
                         plan["settings"]["offload"]))
            if sum(q_loads) < sum(acc_loads):
                failures.append(f"{preset} f={f:.2f}: qtool keeps {sum(q_loads)} bytes on GPUs, accelerate {sum(acc_loads)}")
            if qr > ar + 1e-9:
                failures.append(f"{preset} f={f:.2f}: qtool max/mean {qr:.4f} worse than accelerate's {ar:.4f}")
    lines = ["| model | budget per GPU (x half the model) | accelerate on GPUs | accelerate offloaded | accelerate max/mean | "
             "qtool on GPUs | qtool offloaded | qtool max/mean | qtool offload mode | check_device_map(qtool) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (preset, scale, f, budget, ag, ao, ar, qg, qo, qr, acc, mode) in rows:
        lines.append(f"| {preset} --scale {scale} | {budget / MIB:.1f} MiB ({f:.2f}) | {ag / MIB:.1f} MiB | {ao / MIB:.1f} MiB | "
                     f"{ar:.3f} | {qg / MIB:.1f} MiB | {qo / MIB:.1f} MiB | {qr:.3f} | {mode} | {acc} |")
    table = "\n".join(lines)
    print(table)
    if table_path:
        with open(table_path, "w") as fh:
            fh.write(table + "\n")
    for f in failures:
        print("FAIL:", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
