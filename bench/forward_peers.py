#!/usr/bin/env python3
"""The frameworks' forward on qtool's files, timed in one run on one GPU (issue 12's peers).

On a qtool-synthesized FluxTransformer2DModel folder (`qtool synth --preset flux --scale S
--components transformer`, bf16) and its qtool nf4 quantization (bitsandbytes-serialised), batch 1,
bf16, --image-tokens (4096) + --text-tokens (512), each case timed with CUDA events around one
forward (--warmup steps first, then the median of --steps):

  flux_bf16_resident        FluxTransformer2DModel.from_pretrained(torch_dtype=bf16).to(device)
  flux_nf4_resident         from_pretrained on qtool's nf4 folder: diffusers reads its
                            quantization_config (bitsandbytes, pre-quantized) as a user's load does
  flux_bf16_group_offload   enable_group_offload(onload=device, offload=cpu, block_level,
                            num_blocks_per_group=1, use_stream=True) on the bf16 model
  flux_nf4_group_offload    the same on the nf4 model, in a subprocess (it has crashed with an
                            illegal memory access, which kills the CUDA context): its figures, or
                            "crashed: <its last line>"
  llama_bf16_resident       (--llama DIR) LlamaForCausalLM bf16 on the device, --llama-tokens prefill
  llama_nf4_resident        (--llama-nf4 DIR) the same from qtool's nf4 folder through bitsandbytes
  pipeline_model_cpu_offload  (--pipeline DIR) FluxPipeline bf16 with enable_model_cpu_offload(),
                            --denoise-steps with output_type="latent": CLIP, T5 and each denoising
                            step timed and their peak memory (max_memory_allocated reset per phase)

Per case: step_ms (median of the CUDA-event times; wall_ms the same with host synchronisation),
setup_s (from the start of from_pretrained to the end of the first step, in this process),
peak_gpu_bytes (torch.cuda.max_memory_allocated from the start of the load), peak_reserved_bytes,
gpu_used_bytes (total - free of torch.cuda.mem_get_info after the steps: what nvidia-smi shows,
the CUDA context included), and the output's distance from the bf16 resident model's on the same
inputs (max and RMS relative to its RMS: 0 for an offloading that computes the same thing; the
quantization error for nf4; a wrong load shows as a large value or NaN). A case that fails records
its error and the run goes on.

Inputs are drawn from the printed --seed: hidden_states [1, Ti, in_channels], encoder_hidden_states
[1, Tt, joint_attention_dim], pooled_projections [1, pooled_projection_dim], a timestep in (0, 1),
img_ids (0, row, col) over the most nearly square grid of Ti tokens, txt_ids zeros (MODELS.md 1.2),
guidance 3.5 when the model has guidance_embeds; Llama: input_ids uniform over the vocabulary,
logits of every position (as qtool's runner computes them; --llama-logits-to-keep 1 for the last).

On --device cpu (a test of the paths: no figure means anything there) group offloading runs with
onload and offload on the CPU and no stream, the pipeline without model offloading (it needs an
accelerator), and the nf4 cases are skipped (diffusers' bitsandbytes loader refuses to run without
a GPU) unless --cpu-nf4 lifts that check so that the loading of qtool's file runs on
bitsandbytes' CPU backend.

  forward_peers.py [--flux DIR] [--flux-nf4 DIR] [--llama DIR] [--llama-nf4 DIR] [--pipeline DIR]
                   [--cases a,b] [--image-tokens 4096] [--text-tokens 512] [--llama-tokens 4096]
                   [--steps 10] [--warmup 2] [--denoise-steps 4] [--seed N] [--json OUT.json]
                   [--device cuda|cpu] [--cpu-nf4] [--isolate a,b] [--child-timeout 600]
                   [--qtool-bench build/bench/bench_forward [--qtool-bench-flux-args "--budget 2.5GiB"]]

With --qtool-bench, qtool's bench_forward runs first on the same files (in its own process, its
--data the folder holding --flux's bf16/ and --flux-nf4's nf4/, as `qtool synth -o DIR/bf16` and
`qtool quantize DIR/bf16 -o DIR/nf4` make them; likewise for Llama), and issue 12's ratios are
printed against this run's framework steps: qtool nf4 streamed / bf16 resident, qtool nf4 streamed /
qtool nf4 resident, qtool bf16 resident / bf16 resident, qtool nf4 resident / bitsandbytes nf4.
A DIR may be the model folder itself or a pipeline folder holding it (transformer/).
"""
import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

T_PROCESS = time.perf_counter()
warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

CASES = [
    # name, the argument it needs, runs in a subprocess by default
    ("flux_bf16_resident", "flux", False),
    ("flux_nf4_resident", "flux_nf4", False),
    ("flux_bf16_group_offload", "flux", False),
    ("flux_nf4_group_offload", "flux_nf4", True),
    ("llama_bf16_resident", "llama", False),
    ("llama_nf4_resident", "llama_nf4", False),
    ("pipeline_model_cpu_offload", "pipeline", False),
]
NF4_CASES = {"flux_nf4_resident", "flux_nf4_group_offload", "llama_nf4_resident"}
GiB = 1024 ** 3


def log(msg):
    print(f"[{time.perf_counter() - T_PROCESS:7.1f}s] {msg}", flush=True)


def model_folder(path, component):
    """(folder, subfolder) for from_pretrained: a pipeline folder gives its component."""
    if not os.path.isdir(path):
        raise SystemExit(f"forward_peers.py: {path}: not a folder")
    if os.path.exists(os.path.join(path, "config.json")):
        return path, None
    if os.path.exists(os.path.join(path, component, "config.json")):
        return path, component
    raise SystemExit(f"forward_peers.py: {path}: neither a model folder (config.json) nor a pipeline folder "
                     f"with {component}/config.json")


def read_config(path, component):
    folder, sub = model_folder(path, component)
    with open(os.path.join(folder, sub or "", "config.json")) as f:
        return json.load(f)


def folder_bytes(path):
    n = 0
    for root, _, files in os.walk(path):
        for f in files:
            if f.endswith(".safetensors"):
                n += os.path.getsize(os.path.join(root, f))
    return n


def prewarm(path):
    """Reads every .safetensors file once, so that every case's load sees the same warm page cache."""
    t0 = time.perf_counter()
    n = 0
    buf = bytearray(64 << 20)
    for root, _, files in os.walk(path):
        for f in sorted(files):
            if f.endswith(".safetensors"):
                with open(os.path.join(root, f), "rb", buffering=0) as fh:
                    while True:
                        k = fh.readinto(buf)
                        if not k:
                            break
                        n += k
    dt = time.perf_counter() - t0
    log(f"page cache: read {n / 1e9:.2f} GB of {path} in {dt:.1f} s")


class Device:
    def __init__(self, name):
        self.name = name
        self.cuda = name.startswith("cuda")
        self.torch = torch.device(name)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(self):
        return torch.cuda.max_memory_allocated() if self.cuda else None

    def peak_reserved(self):
        return torch.cuda.max_memory_reserved() if self.cuda else None

    def used(self):
        if not self.cuda:
            return None
        free, total = torch.cuda.mem_get_info()
        return total - free

    def release(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            # Pinned host memory (group offloading pins every weight) stays in torch's host cache.
            if hasattr(torch._C, "_host_emptyCache"):
                torch._C._host_emptyCache()


def time_steps(dev, step, warmup, steps, t_load):
    """Runs step() warmup + steps times; returns (the time the first step ended, the timed steps'
    CUDA-event ms, their wall ms, the last output)."""
    ev = []
    walls = []
    first_end = None
    out = None
    for i in range(warmup + steps):
        dev.sync()
        w0 = time.perf_counter()
        if dev.cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
        out = step()
        if dev.cuda:
            e1.record()
        dev.sync()
        w1 = time.perf_counter()
        if first_end is None:
            first_end = w1
        if i >= warmup:
            walls.append((w1 - w0) * 1e3)
            ev.append(e0.elapsed_time(e1) if dev.cuda else (w1 - w0) * 1e3)
    return first_end, ev, walls, out


def deviation(got, want):
    """(max, rms) of got - want relative to want's RMS, in float64, in chunks (Llama's logits are
    half a billion values)."""
    g, w = got.flatten(), want.flatten()
    if g.numel() != w.numel():
        raise RuntimeError(f"output has {g.numel()} values, the bf16 resident model's {w.numel()}")
    sw = sd = mx = 0.0
    chunk = 1 << 24
    for i in range(0, g.numel(), chunk):
        gd, wd = g[i:i + chunk].double(), w[i:i + chunk].double()
        d = gd - wd
        sw += wd.pow(2).sum().item()
        sd += d.pow(2).sum().item()
        if math.isnan(mx) or torch.isnan(d).any():
            mx = math.nan  # Python's max() drops a NaN that comes second
        else:
            mx = max(mx, d.abs().max().item())
    n = max(g.numel(), 1)
    rms = math.sqrt(sw / n) or 1.0
    return mx / rms, math.sqrt(sd / n) / rms


def grid(tokens):
    rows = max(r for r in range(1, tokens + 1) if r * r <= tokens and tokens % r == 0)
    return rows, tokens // rows


def flux_inputs(cfg, image_tokens, text_tokens, seed, dev, dtype):
    gen = torch.Generator().manual_seed(seed)
    rows, cols = grid(image_tokens)
    img_ids = torch.zeros(rows, cols, 3)
    img_ids[..., 1] += torch.arange(rows)[:, None]
    img_ids[..., 2] += torch.arange(cols)[None, :]
    x = {
        "hidden_states": torch.randn(1, image_tokens, cfg["in_channels"], generator=gen),
        "encoder_hidden_states": torch.randn(1, text_tokens, cfg["joint_attention_dim"], generator=gen),
        "pooled_projections": torch.randn(1, cfg["pooled_projection_dim"], generator=gen),
        "timestep": torch.rand(1, generator=gen).clamp(0.02, 0.98),
        "img_ids": img_ids.reshape(image_tokens, 3),
        "txt_ids": torch.zeros(text_tokens, 3),
    }
    if cfg.get("guidance_embeds", False):
        x["guidance"] = torch.tensor([3.5])
    out = {}
    for k, v in x.items():
        # The pipeline passes timestep and guidance in float32, the rest in the model dtype.
        out[k] = v.to(dev.torch, torch.float32 if k in ("timestep", "guidance") else dtype)
    return out


def llama_inputs(cfg, tokens, seed, dev):
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, cfg["vocab_size"], (1, tokens), generator=gen).to(dev.torch)}


def allow_bnb_on_cpu():
    """--cpu-nf4: diffusers' bitsandbytes quantizer refuses to load without a GPU; bitsandbytes
    itself has CPU kernels, so the check is lifted to let the nf4 loading path run in a CPU test."""
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    BnB4BitDiffusersQuantizer.validate_environment = lambda self, *a, **k: None


class Runner:
    def __init__(self, args):
        self.a = args
        self.dev = Device(args.device)
        self.dtype = torch.bfloat16
        self.ref = {}  # model -> bf16 resident output (CPU float32)
        if args.ref:
            from safetensors.torch import load_file
            self.ref = {k: v for k, v in load_file(args.ref).items()}

    # ---- helpers -------------------------------------------------------------------------------
    def finish(self, rec, t_load, step, model_key, load_done=None):
        a, dev = self.a, self.dev
        first_end, ev, walls, out = time_steps(dev, step, a.warmup, a.steps, t_load)
        rec.update(step_ms=statistics.median(ev), step_ms_min=min(ev), step_ms_max=max(ev),
                   wall_ms=statistics.median(walls), setup_s=first_end - t_load, peak_gpu_bytes=dev.peak(),
                   peak_reserved_bytes=dev.peak_reserved(), gpu_used_bytes=dev.used())
        if a.child:
            # In a process of its own: process start (interpreter, imports, CUDA context) to the end
            # of the first step.
            rec["since_process_start_s"] = first_end - T_PROCESS
        out = out.cpu().float()  # after the memory figures: no float32 copy on the device
        if load_done is not None:
            rec["load_s"] = load_done - t_load
        rec["output_finite"] = bool(torch.isfinite(out).all().item())
        rec["output_rms"] = math.sqrt(sum(c.double().pow(2).sum().item() for c in out.flatten().split(1 << 24))
                                      / max(out.numel(), 1))
        if model_key in self.ref:
            mx, rms = deviation(out, self.ref[model_key])
            rec["vs_bf16_resident_max_rel"], rec["vs_bf16_resident_rms_rel"] = mx, rms
        return out

    def flux_cls(self):
        from diffusers import FluxTransformer2DModel
        return FluxTransformer2DModel

    def flux_load(self, path, quantized):
        folder, sub = model_folder(path, "transformer")
        kw = {"torch_dtype": self.dtype}
        if sub:
            kw["subfolder"] = sub
        if quantized and not self.dev.cuda:
            kw["device_map"] = {"": "cpu"}
        return self.flux_cls().from_pretrained(folder, **kw).eval()

    def flux_step(self, model, inputs):
        def step():
            with torch.inference_mode():
                return model(**inputs, return_dict=False)[0]
        return step

    def quant_note(self, model, rec):
        """Records what diffusers / transformers made of the quantization_config."""
        import bitsandbytes as bnb

        n4 = sum(1 for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
        nlin = sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear))
        qc = getattr(getattr(model, "config", None), "quantization_config", None)
        rec["linear4bit_modules"] = n4
        rec["linear_modules"] = nlin
        rec["loaded_with"] = "from_pretrained(quantized folder) with its quantization_config " + (
            f"({type(qc).__name__ if qc is not None and not isinstance(qc, dict) else 'dict'})")
        if n4 == 0:
            raise RuntimeError("the model has no bitsandbytes Linear4bit module: the nf4 file was not read as nf4")

    def run_model(self, rec, quantized, load, place, step_of, model_key):
        """Times load() and place(model) (the model where it runs) as the load, then the steps of
        step_of(model) through finish; frees the model. The output of the last step."""
        dev = self.dev
        dev.release()
        dev.reset_peak()
        t0 = time.perf_counter()
        model = load()
        if quantized:
            self.quant_note(model, rec)
        model = place(model)
        dev.sync()
        t1 = time.perf_counter()
        out = self.finish(rec, t0, step_of(model), model_key, t1)
        del model
        dev.release()
        return out

    # ---- cases ---------------------------------------------------------------------------------
    def flux(self, rec, quantized, group_offload):
        a, dev = self.a, self.dev
        path = a.flux_nf4 if quantized else a.flux
        cfg = read_config(path, "transformer")
        inputs = flux_inputs(cfg, a.image_tokens, a.text_tokens, a.seed, dev, self.dtype)
        if group_offload:
            use_stream = dev.cuda
            rec["offload"] = (f"enable_group_offload(onload_device={dev.name}, offload_device=cpu, "
                              f"offload_type='block_level', num_blocks_per_group=1, use_stream={use_stream})")

            def place(model):
                model.enable_group_offload(onload_device=dev.torch, offload_device=torch.device("cpu"),
                                           offload_type="block_level", num_blocks_per_group=1,
                                           use_stream=use_stream)
                return model
        else:
            def place(model):  # bitsandbytes puts a quantized model on the device as it loads
                return model if quantized else model.to(dev.torch)
        return self.run_model(rec, quantized, lambda: self.flux_load(path, quantized), place,
                              lambda model: self.flux_step(model, inputs), "flux")

    def llama_resident(self, rec, quantized):
        from transformers import LlamaForCausalLM

        a, dev = self.a, self.dev
        path = a.llama_nf4 if quantized else a.llama
        cfg = read_config(path, "")
        inputs = llama_inputs(cfg, a.llama_tokens, a.seed, dev)

        def load():
            return LlamaForCausalLM.from_pretrained(path, dtype=self.dtype, device_map=dev.name).eval()

        def step_of(model):
            rec["attn_implementation"] = getattr(model.config, "_attn_implementation", None)

            def step():
                with torch.inference_mode():
                    return model(**inputs, use_cache=False, logits_to_keep=a.llama_logits_to_keep).logits
            return step
        out = self.run_model(rec, quantized, load, lambda model: model, step_of, "llama")
        rec["logits_shape"] = list(out.shape)
        return out

    def pipeline(self, rec):
        from diffusers import FluxPipeline

        a, dev = self.a, self.dev
        model_folder(a.pipeline, "transformer")  # a pipeline folder with its transformer, or a clear error
        with open(os.path.join(a.pipeline, "vae", "config.json")) as f:
            vsf = 2 ** (len(json.load(f)["block_out_channels"]) - 1)
        rows, cols = grid(a.image_tokens)
        height, width = rows * 2 * vsf, cols * 2 * vsf
        rec.update(height=height, width=width, denoise_steps=a.denoise_steps, runs=a.pipeline_runs)
        dev.release()
        dev.reset_peak()
        t0 = time.perf_counter()
        pipe = FluxPipeline.from_pretrained(a.pipeline, torch_dtype=self.dtype)
        pipe.set_progress_bar_config(disable=True)
        if dev.cuda:
            pipe.enable_model_cpu_offload(device=dev.name)
            rec["offload"] = "enable_model_cpu_offload()"
        else:
            rec["offload"] = "none (enable_model_cpu_offload needs an accelerator): the CPU run tests the paths"
        t_loaded = time.perf_counter()
        rec["load_s"] = t_loaded - t0

        marks = []  # (label, time, peak since the previous mark)

        def mark(label):
            dev.sync()
            marks.append((label, time.perf_counter(), dev.peak()))
            dev.reset_peak()

        hooks = []
        for name, comp in (("clip", pipe.text_encoder), ("t5", pipe.text_encoder_2)):
            hooks.append(comp.register_forward_pre_hook(lambda m, args, n=name: mark(f"{n}.start")))
            hooks.append(comp.register_forward_hook(lambda m, args, out, n=name: mark(f"{n}.end")))

        def on_step(p, i, t, kw):
            mark(f"step{i}")
            return kw

        runs = []
        latents = None
        for r in range(a.pipeline_runs):
            marks.clear()
            gen = torch.Generator().manual_seed(a.seed)
            mark("start")
            with torch.inference_mode():
                latents = pipe(prompt="a photograph of a red fox in the snow, high detail", height=height,
                               width=width, num_inference_steps=a.denoise_steps, max_sequence_length=a.text_tokens,
                               guidance_scale=3.5, generator=gen, output_type="latent",
                               callback_on_step_end=on_step).images
            mark("end")
            runs.append(list(marks))
        for h in hooks:
            h.remove()
        first, last = runs[0], runs[-1]
        step0 = next(m for m in first if m[0] == "step0")
        rec["setup_s"] = step0[1] - t0  # from_pretrained to the end of the first denoising step
        t = {lab: (tm, pk) for lab, tm, pk in last}

        def span(a_, b_):
            return (t[b_][0] - t[a_][0]) * 1e3

        phases = {
            "clip_ms": span("clip.start", "clip.end"), "clip_peak_bytes": t["clip.end"][1],
            "t5_ms": span("t5.start", "t5.end"), "t5_peak_bytes": t["t5.end"][1],
            "encode_ms": span("start", "t5.end"),
            "step0_ms": span("t5.end", "step0"), "step0_peak_bytes": t["step0"][1],
        }
        steps = [span(f"step{i - 1}", f"step{i}") for i in range(1, a.denoise_steps)]
        peaks = [t[f"step{i}"][1] for i in range(1, a.denoise_steps)]
        if steps:
            phases["step_ms_all"] = steps
            rec["step_ms"] = statistics.median(steps)
            phases["steps_peak_bytes"] = max(peaks) if dev.cuda else None
        phases["after_loop_ms"] = span(f"step{a.denoise_steps - 1}", "end")
        phases["total_ms"] = span("start", "end")
        if steps:
            # A job of --job-steps steps, extrapolated: the encoders, the first step (which moves the
            # transformer in), the other steps at the median, the tail (offload to the CPU).
            phases["job_steps"] = a.job_steps
            phases["job_ms_extrapolated"] = (phases["encode_ms"] + phases["step0_ms"] +
                                             (a.job_steps - 1) * rec["step_ms"] + phases["after_loop_ms"])
        rec["phases"] = phases
        rec["peak_gpu_bytes"] = max((p for _, _, p in last if p is not None), default=None)
        rec["gpu_used_bytes"] = dev.used()
        rec["latents_shape"] = list(latents.shape)
        rec["output_finite"] = bool(torch.isfinite(latents.float()).all().item())
        del pipe
        dev.release()
        return None

    def run_case(self, name):
        rec = {"name": name, "device": self.dev.name}
        try:
            fn = {
                "flux_bf16_resident": lambda: self.flux(rec, False, False),
                "flux_nf4_resident": lambda: self.flux(rec, True, False),
                "flux_bf16_group_offload": lambda: self.flux(rec, False, True),
                "flux_nf4_group_offload": lambda: self.flux(rec, True, True),
                "llama_bf16_resident": lambda: self.llama_resident(rec, False),
                "llama_nf4_resident": lambda: self.llama_resident(rec, True),
                "pipeline_model_cpu_offload": lambda: self.pipeline(rec),
            }[name]
            out = fn()
            if name in ("flux_bf16_resident", "llama_bf16_resident") and out is not None:
                self.ref[name.split("_")[0]] = out
        except Exception as e:  # the case failed; the others still run
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            rec["error"] = f"{type(e).__name__}: {lines[0] if lines else ''}"
            traceback.print_exc()
            try:
                self.dev.release()
            except Exception as e2:  # a dead CUDA context (illegal memory access) fails again here
                rec["error_on_release"] = f"{type(e2).__name__}: {str(e2).strip().splitlines()[0]}"
        return rec


def run_captured(cmd, timeout, echo_lines):
    """Runs cmd with its stdout and stderr captured and echoes the last echo_lines lines of its
    output: (seconds, the output's non-blank lines, exit code or None when it timed out)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        text, rc = p.stdout, p.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc = None
    seconds = time.perf_counter() - t0
    sys.stdout.write("".join(f"    | {ln}\n" for ln in text.splitlines()[-echo_lines:]))
    return seconds, [ln for ln in text.splitlines() if ln.strip()], rc


def run_child(args, name, ref_file):
    """Runs one case in a fresh process; its record, or "crashed: <last line>"."""
    with tempfile.TemporaryDirectory(prefix="forward-peers-") as tmp:
        out_json = os.path.join(tmp, "case.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--json", out_json] + args.passthrough
        if ref_file:
            cmd += ["--ref", ref_file]
        log(f"{name}: in a subprocess")
        seconds, lines, rc = run_captured(cmd, args.child_timeout, 40)
        last = lines[-1].strip() if lines else "(no output)"
        rec = {"name": name, "device": args.device, "subprocess": True, "subprocess_s": seconds, "exit_code": rc}
        if rc is None:
            rec["error"] = f"timed out after {args.child_timeout} s: {last}"
        elif os.path.exists(out_json):
            with open(out_json) as f:
                got = json.load(f)["cases"]
            rec.update(got[0])
            rec["subprocess"] = True
            rec["exit_code"] = rc
            if "error" in rec:
                rec["error"] = f"crashed: {rec['error']}"
        else:
            rec["error"] = f"crashed (exit {rc}): {last}"
        return rec


def qtool_bench_data(args, family):
    """bench_forward --data's folder: --FAMILY is DIR/bf16 and --FAMILY-nf4 DIR/nf4 (either may be
    absent); (DIR, schemes)."""
    paths = {"bf16": getattr(args, family), "nf4": getattr(args, family + "_nf4")}
    parents = set()
    schemes = []
    for scheme, path in paths.items():
        if not path:
            continue
        path = os.path.abspath(path.rstrip("/"))
        if os.path.basename(path) != scheme:
            raise SystemExit(f"forward_peers.py: --qtool-bench runs bench_forward --data DIR, which reads DIR/bf16 "
                             f"and DIR/nf4: --{family}{'' if scheme == 'bf16' else '-nf4'} {path} is not named "
                             f"{scheme}")
        parents.add(os.path.dirname(path))
        schemes.append(scheme)
    if len(parents) != 1:
        raise SystemExit(f"forward_peers.py: --qtool-bench: --{family} and --{family}-nf4 must be DIR/bf16 and "
                         f"DIR/nf4 of one DIR (bench_forward --data's layout)")
    return parents.pop(), schemes


def run_qtool_bench(args, family):
    """qtool's bench_forward on the same files, in a subprocess before the frameworks' cases: its
    JSON (streamed and all-resident step per scheme), or an error."""
    import shlex

    data, schemes = qtool_bench_data(args, family)
    tokens = args.image_tokens if family == "flux" else args.llama_tokens
    extra = shlex.split(args.qtool_bench_flux_args if family == "flux" else args.qtool_bench_llama_args)
    rec = {"name": f"qtool_{family}", "data": data, "schemes": schemes}
    with tempfile.TemporaryDirectory(prefix="forward-peers-qtool-") as tmp:
        out_json = os.path.join(tmp, "bench_forward.json")
        cmd = [args.qtool_bench, "--preset", family, "--data", data, "--schemes", ",".join(schemes), "--tokens",
               str(tokens), "--json", out_json] + extra
        rec["command"] = " ".join(shlex.quote(c) for c in cmd)
        log(f"qtool: {rec['command']}")
        rec["wall_s"], lines, rc = run_captured(cmd, args.child_timeout, 30)
        if rc == 0 and os.path.exists(out_json):
            with open(out_json) as f:
                rec["result"] = json.load(f)
        else:
            rec["error"] = (f"timed out after {args.child_timeout} s" if rc is None else f"exit {rc}") + \
                f": {lines[-1] if lines else '(no output)'}"
    return rec


def issue12_ratios(cases, qtool):
    """issue 12's ratios, each against the peer measured in this run: (label, value, op, limit)."""
    by = {c["name"]: c.get("step_ms") for c in cases}
    rows = []
    for fam, peer in (("flux", "diffusers"), ("llama", "transformers")):
        q = qtool.get(fam, {}).get("result")
        if not q:
            continue

        def qt(scheme, key):
            return q.get(scheme, {}).get(key)

        def add(label, num, den, op, limit):
            if num is not None and den:
                rows.append((label, num / den, op, limit))
        add(f"{fam}: qtool nf4 streamed / {peer} bf16 resident", qt("nf4", "streamed_median_ms"),
            by.get(f"{fam}_bf16_resident"), "<=", 1.0)
        add(f"{fam}: qtool nf4 streamed / qtool nf4 resident", qt("nf4", "streamed_median_ms"),
            qt("nf4", "resident_median_ms"), "<=", 1.15)
        add(f"{fam}: qtool bf16 resident / {peer} bf16 resident", qt("bf16", "resident_median_ms"),
            by.get(f"{fam}_bf16_resident"), "<=", 1.0)
        add(f"{fam}: qtool nf4 resident / {peer} + bitsandbytes nf4 resident", qt("nf4", "resident_median_ms"),
            by.get(f"{fam}_nf4_resident"), "<=", 0.9)
        add(f"{fam}: qtool nf4 streamed / {peer} bf16 group offloading", qt("nf4", "streamed_median_ms"),
            by.get(f"{fam}_bf16_group_offload"), "", None)
        add(f"{fam}: qtool bf16 streamed / {peer} bf16 group offloading", qt("bf16", "streamed_median_ms"),
            by.get(f"{fam}_bf16_group_offload"), "", None)
    return rows


def ratio_table(rows):
    lines = ["| ratio (one run) | value | target | met |", "|---|---|---|---|"]
    for label, v, op, limit in rows:
        met = "" if limit is None else ("yes" if v <= limit else "no")
        lines.append(f"| {label} | {v:.3f} | {'' if limit is None else f'{op} {limit}'} | {met} |")
    return "\n".join(lines)


def fmt_gib(b):
    return "" if b is None else f"{b / GiB:.2f}"


def table(cases):
    base = {}
    for c in cases:
        if c["name"].endswith("bf16_resident") and "step_ms" in c:
            base[c["name"].split("_")[0]] = c["step_ms"]
    lines = ["| case | step ms (median) | / bf16 resident | setup s | peak alloc GiB | GPU used GiB | "
             "output vs bf16 (rms, max rel) | note |", "|---|---|---|---|---|---|---|---|"]
    for c in cases:
        fam = c["name"].split("_")[0]
        step = c.get("step_ms")
        ratio = f"{step / base[fam]:.2f}x" if step is not None and fam in base else ""
        dev = ""
        if "vs_bf16_resident_rms_rel" in c:
            dev = f"{c['vs_bf16_resident_rms_rel']:.4f}, {c['vs_bf16_resident_max_rel']:.4f}"
        note = c.get("error") or c.get("skipped") or ""
        if not note and c.get("phases"):
            ph = c["phases"]
            note = (f"CLIP {ph['clip_ms']:.0f} ms, T5 {ph['t5_ms']:.0f} ms, first step {ph['step0_ms']:.0f} ms; "
                    f"{ph.get('job_steps')}-step job ~{ph.get('job_ms_extrapolated', 0) / 1e3:.1f} s")
        setup = f"{c['setup_s']:.1f}" if c.get("setup_s") is not None else ""
        lines.append(f"| {c['name']} | {'' if step is None else f'{step:.1f}'} | {ratio} | {setup} | "
                     f"{fmt_gib(c.get('peak_gpu_bytes'))} | {fmt_gib(c.get('gpu_used_bytes'))} | {dev} | "
                     f"{note.replace('|', '/')} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flux", help="bf16 FluxTransformer2DModel folder (or a pipeline folder holding transformer/)")
    ap.add_argument("--flux-nf4", help="qtool's nf4 quantization of it")
    ap.add_argument("--llama", help="bf16 LlamaForCausalLM folder")
    ap.add_argument("--llama-nf4", help="qtool's nf4 quantization of it")
    ap.add_argument("--pipeline", help="a FluxPipeline folder (qtool synth --preset flux), bf16")
    ap.add_argument("--cases", default="", help="comma-separated subset of: " + ", ".join(c[0] for c in CASES))
    ap.add_argument("--isolate", default="flux_nf4_group_offload",
                    help="cases run in a subprocess (comma-separated; 'none' for none)")
    ap.add_argument("--image-tokens", type=int, default=4096)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--llama-tokens", type=int, default=4096)
    ap.add_argument("--llama-logits-to-keep", type=int, default=0, help="0: logits of every position")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--denoise-steps", type=int, default=4)
    ap.add_argument("--pipeline-runs", type=int, default=2, help="pipeline calls; the last one is reported")
    ap.add_argument("--job-steps", type=int, default=28, help="steps of the extrapolated pipeline job")
    ap.add_argument("--seed", type=int, default=int(time.time()) % 1_000_000)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cpu-nf4", action="store_true", help="on --device cpu, run the nf4 cases too (test only)")
    ap.add_argument("--no-prewarm", action="store_true", help="do not read the files into the page cache first")
    ap.add_argument("--child-timeout", type=int, default=300,
                    help="seconds a subprocess (an isolated case, bench_forward) may run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--qtool-bench", default=None,
                    help="qtool's bench_forward binary: run it first on the same files (--data = the folder "
                         "holding --flux bf16/ and --flux-nf4 nf4/, likewise for Llama) and print issue 12's "
                         "ratios against the frameworks' steps of this run")
    ap.add_argument("--qtool-bench-flux-args", default="--budget 2.5GiB --steps 5")
    ap.add_argument("--qtool-bench-llama-args", default="--resident-fraction 0.25 --steps 5")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ref", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1 or args.denoise_steps < 2:
        ap.error("--warmup and --steps must be at least 1, --denoise-steps at least 2")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device (use --device cpu for a test of the paths)")
    if args.device == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    if args.cpu_nf4 and args.device == "cpu":
        allow_bnb_on_cpu()
    # What a child process gets: everything but the case selection and the output.
    pt = []
    for k in ("flux", "flux_nf4", "llama", "llama_nf4", "pipeline"):
        if getattr(args, k):
            pt += [f"--{k.replace('_', '-')}", getattr(args, k)]
    for k in ("image_tokens", "text_tokens", "llama_tokens", "llama_logits_to_keep", "steps", "warmup", "seed"):
        pt += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    pt += ["--device", args.device, "--no-prewarm"] + (["--cpu-nf4"] if args.cpu_nf4 else [])
    args.passthrough = pt

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    runner = Runner(args)
    if args.child:
        rec = runner.run_case(args.child)
        with open(args.json, "w") as f:
            json.dump({"cases": [rec]}, f)
        return 0

    import diffusers
    import transformers
    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                "transformers": transformers.__version__, "python": sys.version.split()[0]}
    for mod in ("bitsandbytes", "accelerate"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as e:  # reported, not fatal: only the nf4 cases need bitsandbytes
            versions[mod] = f"unavailable ({type(e).__name__})"
    wanted = [c for c in args.cases.split(",") if c]
    unknown = [c for c in wanted if c not in [x[0] for x in CASES]]
    if unknown:
        ap.error(f"--cases: unknown {unknown}")
    isolate = set() if args.isolate == "none" else set(x for x in args.isolate.split(",") if x)
    warmed = set()

    def warm(need):
        path = getattr(args, need)
        if args.no_prewarm or not path or path in warmed:
            return
        folder, sub = (path, None) if need == "pipeline" else \
            model_folder(path, "transformer" if need.startswith("flux") else "")
        prewarm(os.path.join(folder, sub) if sub else folder)
        warmed.add(path)

    # qtool's benchmark first, before this process holds a CUDA context: its profile measures the
    # context as the device's used memory, and its runs would count ours as theirs.
    qtool = {}
    if args.qtool_bench:
        for fam in ("flux", "llama"):
            if getattr(args, fam) or getattr(args, fam + "_nf4"):
                warm(fam)
                warm(fam + "_nf4")
                qtool[fam] = run_qtool_bench(args, fam)
                log(f"qtool {fam}: " + (qtool[fam].get("error") or "done"))
    if runner.dev.cuda:
        versions["sdpa"] = {k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")()
                            for k in ("flash", "mem_efficient", "cudnn", "math")
                            if hasattr(torch.backends.cuda, f"{k}_sdp_enabled")}
    gpu = torch.cuda.get_device_name() if runner.dev.cuda else "cpu"
    log(f"forward_peers.py: seed {args.seed}; {gpu}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    context_used = runner.dev.used() if runner.dev.cuda else None
    if runner.dev.cuda:
        torch.zeros(1, device=runner.dev.torch)
        context_used = runner.dev.used()

    results = []
    tmp = tempfile.TemporaryDirectory(prefix="forward-peers-ref-")
    for name, need, _ in CASES:
        if wanted and name not in wanted:
            continue
        if not getattr(args, need):
            if wanted:
                ap.error(f"--cases {name} needs --{need.replace('_', '-')}")
            continue
        if name in NF4_CASES and not runner.dev.cuda and not args.cpu_nf4:
            msg = ("skipped on the CPU: diffusers' / transformers' bitsandbytes loading needs a GPU here "
                   "(--cpu-nf4 runs it on bitsandbytes' CPU backend)")
            log(f"{name}: {msg}")
            results.append({"name": name, "device": args.device, "skipped": msg})
            continue
        warm(need)
        if name in isolate:
            ref_file = None
            if runner.ref:
                from safetensors.torch import save_file
                ref_file = os.path.join(tmp.name, "ref.safetensors")
                save_file({k: v.contiguous() for k, v in runner.ref.items()}, ref_file)
            rec = run_child(args, name, ref_file)
        else:
            log(f"{name}: running")
            rec = runner.run_case(name)
        summary = {k: rec[k] for k in ("step_ms", "setup_s", "peak_gpu_bytes", "error") if rec.get(k) is not None}
        log(f"{name}: {json.dumps(summary)}")
        results.append(rec)

    doc = {"seed": args.seed, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "device": gpu,
           "versions": versions, "context_gpu_used_bytes": context_used,
           "inputs": {"image_tokens": args.image_tokens, "text_tokens": args.text_tokens,
                      "llama_tokens": args.llama_tokens, "batch": 1, "dtype": "bfloat16"},
           "files": {k: getattr(args, k) for k in ("flux", "flux_nf4", "llama", "llama_nf4", "pipeline")
                     if getattr(args, k)},
           "file_bytes": {k: folder_bytes(getattr(args, k)) for k in ("flux", "flux_nf4", "llama", "llama_nf4",
                                                                        "pipeline") if getattr(args, k)},
           "steps": args.steps, "warmup": args.warmup, "cases": results}
    print()
    print(table(results))
    if qtool:
        doc["qtool_bench_forward"] = qtool
        rows = issue12_ratios(results, qtool)
        doc["ratios"] = [{"ratio": lab, "value": v, "target": None if lim is None else f"{op} {lim}",
                          "met": None if lim is None else v <= lim} for lab, v, op, lim in rows]
        print()
        print(ratio_table(rows))
        for fam, r in qtool.items():
            if r.get("error"):
                print(f"qtool bench_forward ({fam}): {r['error']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        log(f"wrote {args.json}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
