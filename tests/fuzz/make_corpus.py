#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (tests/fuzz/corpus_<target>/seed_*), from real files:
qtool's synthetic tiny-flux pipeline and its quantized outputs, the sample configs, budgets and
device profiles, and the malformed cases of the e2e tests. Findings (crash-*, regression_*) that the
fuzzers added are left alone.

  make_corpus.py --qtool build/apps/qtool/qtool [--out tests/fuzz]

The plan seeds are plans `qtool plan` makes for tiny-flux quantized with fuzz_plan.cpp's config, so
the plan fuzzer starts from plans that reach the schedule.
"""
import argparse
import glob
import json
import os
import shutil
import struct
import subprocess
import tempfile

SEP = b"\n@@file@@\n"  # fuzz_util.hpp's kFileSeparator
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# fuzz_plan.cpp's kQuantConfig.
PLAN_QUANT_CONFIG = {
    "quant_backend": "nf4",
    "quant_kwargs": {"double_quant": True},
    "components_to_quantize": ["transformer"],
    "quant_mapping": {"text_encoder": {"scheme": "fp8_e4m3"}, "text_encoder_2": {"scheme": "int8"}},
}


def st_file(tensors, metadata=None, trailing=0):
    """A .safetensors file: tensors is [(name, dtype, shape, bytes)]."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data + bytes(trailing)


def ramp(nbytes, step=7, dtype="BF16"):
    """nbytes of small values of dtype (BF16, F16, F32; U8/I8 for anything else), like trained weights."""
    vals = [((i * step) % 31 - 15) / 64.0 for i in range(nbytes // {"F32": 4, "F16": 2, "BF16": 2}.get(dtype, 1))]
    if dtype == "F32":
        return struct.pack("<%df" % len(vals), *vals)
    if dtype == "F16":
        return struct.pack("<%de" % len(vals), *vals)
    if dtype == "BF16":
        return b"".join(struct.pack("<f", v)[2:] for v in vals)
    return bytes((i * step + 3) & 0x7F for i in range(nbytes))


def checkpoint_input(flags, config=b"", index=b"", shard1=b"", shard2=b"", model_index=b""):
    sections = [config, index, shard1, shard2, model_index]
    while sections and not sections[-1]:
        sections.pop()
    return bytes([flags]) + SEP.join(s if isinstance(s, bytes) else s.encode() for s in sections)


def write(dirname, name, data):
    os.makedirs(dirname, exist_ok=True)
    with open(os.path.join(dirname, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def clear_seeds(dirname):
    for f in glob.glob(os.path.join(dirname, "seed_*")):
        os.unlink(f)


def run(*cmd):
    subprocess.run(list(cmd), check=True, stdout=subprocess.DEVNULL)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def checkpoint_seeds(qtool, work, out):
    d = os.path.join(out, "corpus_checkpoint_open")
    clear_seeds(d)
    flux = os.path.join(work, "tiny-flux")
    llama_cfg = json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                            "num_hidden_layers": 1, "torch_dtype": "bfloat16", "tie_word_embeddings": False})
    q = ("model.layers.0.self_attn.q_proj.weight", "BF16", [8, 64], ramp(8 * 64 * 2))
    o = ("model.layers.0.self_attn.o_proj.weight", "BF16", [64, 8], ramp(64 * 8 * 2, 5))
    norm = ("model.layers.0.input_layernorm.weight", "BF16", [64], ramp(128, 3))
    emb = ("model.embed_tokens.weight", "BF16", [4, 64], ramp(4 * 64 * 2, 11))
    single = st_file([emb, q, o, norm], {"format": "pt"})
    s1, s2 = st_file([emb, q]), st_file([o, norm])
    n1, n2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    index = json.dumps({"metadata": {"total_size": 2560},
                        "weight_map": {emb[0]: n1, q[0]: n1, o[0]: n2, norm[0]: n2}})
    write(d, "seed_model_single", checkpoint_input(0, llama_cfg, b"", single))
    write(d, "seed_model_sharded", checkpoint_input(2, llama_cfg, index, s1, s2))
    write(d, "seed_model_no_config", checkpoint_input(4, b"", b"", single))
    write(d, "seed_single_file", checkpoint_input(8, b"", b"", single))
    write(d, "seed_f32_f16", checkpoint_input(0, llama_cfg, b"", st_file([
        ("model.layers.0.mlp.up_proj.weight", "F32", [4, 32], ramp(4 * 32 * 4, dtype="F32")),
        ("model.layers.0.mlp.down_proj.weight", "F16", [32, 4], ramp(32 * 4 * 2, 3, dtype="F16"))])))

    # The tiny-flux transformer's own files, as a pipeline.
    t = os.path.join(flux, "transformer")
    tcfg = read(os.path.join(t, "config.json"))
    mi = json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]})
    dq = [("transformer_blocks.0.attn.to_q.weight", "BF16", [64, 64], ramp(64 * 64 * 2)),
          ("transformer_blocks.0.attn.to_q.bias", "BF16", [64], ramp(128, 5))]
    dk = [("transformer_blocks.0.attn.to_k.weight", "BF16", [64, 64], ramp(64 * 64 * 2, 9))]
    dn1, dn2 = "diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"
    dindex = json.dumps({"metadata": {"total_size": 16512},
                         "weight_map": {dq[0][0]: dn1, dq[1][0]: dn1, dk[0][0]: dn2}})
    write(d, "seed_pipeline_sharded", checkpoint_input(1 | 2 | 16, tcfg, dindex, st_file(dq), st_file(dk), mi))
    write(d, "seed_pipeline_single", checkpoint_input(1 | 16, tcfg, b"", st_file(dq + dk), b"", mi))

    # Quantized outputs of a small model folder: every scheme's tensors and config.json.
    src = os.path.join(work, "small")
    os.makedirs(src)
    write(src, "config.json", llama_cfg)
    write(src, "model.safetensors", single)
    for scheme in ["int8", "fp8_e4m3", "fp8_e5m2", "nf4", "fp4"]:
        for dq_flag in ([False, True] if scheme in ("nf4", "fp4") else [False]):
            name = scheme + ("_dq" if dq_flag else "")
            cfg = os.path.join(work, name + ".json")
            kw = {"quant_backend": scheme}
            if dq_flag:
                kw["quant_kwargs"] = {"double_quant": True}
            write(work, name + ".json", json.dumps(kw))
            dst = os.path.join(work, "small-" + name)
            run(qtool, "quantize", src, "--config", cfg, "-o", dst, "-q")
            write(d, "seed_quantized_" + name, checkpoint_input(
                0, read(os.path.join(dst, "config.json")), b"", read(os.path.join(dst, "model.safetensors"))))

    # The e2e tests' malformed folders (tests/e2e/formats_inspect_malformed.sh).
    a = ("a", "F32", [2], ramp(8, dtype="F32"))
    b = ("b", "U8", [3], ramp(3, dtype="U8"))
    c = ("c", "I8", [4], ramp(4, dtype="I8"))
    S1, S2 = st_file([a, b]), st_file([c])
    def idx(wm):
        return json.dumps({"metadata": {"total_size": 15}, "weight_map": wm})
    write(d, "seed_index_missing_shard", checkpoint_input(2, "{}", idx({"a": n1, "b": n1, "c": "model-00003-of-00003.safetensors"}), S1, S2))
    write(d, "seed_index_wrong_shard", checkpoint_input(2, "{}", idx({"a": n1, "b": n2, "c": n2}), S1, S2))
    write(d, "seed_index_extra_tensor", checkpoint_input(2, "{}", idx({"a": n1, "b": n1, "c": n2, "d": n2}), S1, S2))
    write(d, "seed_bad_shard", checkpoint_input(2, "{}", idx({"a": n1, "b": n1, "c": n2}), S1, S2[:-1]))
    write(d, "seed_model_index_bad_json", checkpoint_input(1 | 16, "{}", b"", S2, b"", '{"transformer": ["diffusers", "X"],}'))
    write(d, "seed_model_index_bad_entry", checkpoint_input(1 | 16, "{}", b"", S2, b"", '{"transformer": ["diffusers"]}'))
    write(d, "seed_model_index_missing_folder", checkpoint_input(1 | 16, "{}", b"", S2, b"", json.dumps(
        {"_class_name": "FluxPipeline", "transformer": ["diffusers", "X"], "vae": ["diffusers", "AutoencoderKL"]})))
    write(d, "seed_trailing_bytes", checkpoint_input(0, llama_cfg, b"", st_file([q], trailing=3)))
    write(d, "seed_two_files_no_index", checkpoint_input(0, llama_cfg, b"", S1, S2))
    write(d, "seed_config_not_object", checkpoint_input(0, "[1, 2]", b"", single))


def config_seeds(out):
    d = os.path.join(out, "corpus_quant_config")
    clear_seeds(d)
    for f in sorted(glob.glob(os.path.join(ROOT, "sample_configs", "*.json"))):
        write(d, "seed_config_" + os.path.basename(f)[:-5], read(f))
    for sub, prefix in (("budgets", "budget_"), ("devices", "device_")):
        for f in sorted(glob.glob(os.path.join(ROOT, "sample_configs", sub, "*.json")) +
                        glob.glob(os.path.join(ROOT, "sample_configs", sub, "*.txt"))):
            write(d, "seed_" + prefix + os.path.splitext(os.path.basename(f))[0], read(f))
    # tests/e2e/quantize_errors.sh's configs, and the options each scheme has.
    cases = {
        "unknown_key": '{"quant_backend":"nf4","quant_kwarg":{}}',
        "unknown_scheme": '{"quant_mapping":{"transformer":{"scheme":"nf5"}}}',
        "bad_blocksize": '{"quant_backend":"nf4","quant_kwargs":{"blocksize":100}}',
        "unknown_component": '{"quant_backend":"nf4","components_to_quantize":["transformer","unet"]}',
        "weightless_component": '{"quant_mapping":{"scheduler":{"scheme":"int8"}}}',
        "bad_json": '{"quant_backend": nf4}',
        "pattern_matches_nothing": '{"quant_backend":"int8","components_to_quantize":["transformer"],"modules_to_not_convert":["no_such_layer"]}',
        "fp8_per_tensor": '{"quant_backend":"fp8","quant_kwargs":{"strategy":"tensor"},"modules_to_not_convert":["*norm*","proj_out"]}',
        "mapping_options": '{"quant_mapping":{"transformer":{"scheme":"fp4","blocksize":4096,"double_quant":true,"modules_to_not_convert":["transformer_blocks.0"]},"text_encoder_2":{"scheme":"fp8_e5m2","per_tensor":true}},"description":"x"}',
        "nested": "[" * 64 + "]" * 64,
    }
    for name, text in cases.items():
        write(d, "seed_" + name, text)


def plan_seeds(qtool, work, out):
    d = os.path.join(out, "corpus_plan")
    clear_seeds(d)
    flux = os.path.join(work, "tiny-flux")
    qflux = os.path.join(work, "tiny-flux-q")
    write(work, "plan-quant.json", json.dumps(PLAN_QUANT_CONFIG))
    run(qtool, "quantize", flux, "--config", os.path.join(work, "plan-quant.json"), "-o", qflux, "-q")
    # tiny-flux quantized holds 2.9 MB: a profile with a small context and allocation granularity
    # makes plans that stream it (h100-pcie-gen5's 600 MiB context would dwarf it).
    profile = json.load(open(os.path.join(ROOT, "sample_configs", "devices", "h100-pcie-gen5.json")))
    profile.update(name="fuzz-small", context_bytes=1 << 20, cublas_workspace_bytes=1 << 20,
                   alloc_granularity_bytes=4096)
    write(work, "small-profile.json", json.dumps(profile))
    variants = {
        "fits": ["--max-memory", "0=1GiB,cpu=1GiB"],
        "balanced": ["--max-memory", "0=3MiB,1=3MiB,cpu=1GiB", "--device-map", "balanced"],
        "streams": ["--max-memory", "0=5000KiB,cpu=1GiB"],
        "disk": ["--max-memory", "0=5000KiB,cpu=200KiB"],
    }
    for name, args in variants.items():
        plan = os.path.join(work, name + ".plan.json")
        p = subprocess.run([qtool, "plan", qflux, "-o", plan, "-q", "--tokens", "16", "--device-profile",
                            os.path.join(work, "small-profile.json")] + args,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            print("plan variant %s: %s" % (name, p.stderr.strip()))
            continue
        write(d, "seed_" + name, read(plan))
    # Early exits: not a plan, another version, a plan without its parts.
    write(d, "seed_not_object", "[]")
    write(d, "seed_other_version", '{"format": "qtool-plan", "version": 2}')
    write(d, "seed_empty_plan", '{"format": "qtool-plan", "version": 1}')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qtool", required=True)
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="qtool-corpus-")
    try:
        run(args.qtool, "synth", "--preset", "tiny-flux", "-o", os.path.join(work, "tiny-flux"), "-q")
        checkpoint_seeds(args.qtool, work, args.out)
        config_seeds(args.out)
        plan_seeds(args.qtool, work, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
