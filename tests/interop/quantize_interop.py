#!/usr/bin/env python3
"""The loaders read what `qtool quantize` writes, on the CPU.

bitsandbytes (transformers' bitsandbytes quantizer, bitsandbytes >= 0.48 runs on the CPU): qtool's
int8, nf4 and nf4 with double quant of the synthesized tiny Llama load as Linear8bitLt / Linear4bit
(lm_head and the embeddings stay plain), and the logits on random token ids are compared with
  - the bf16 model (L), and
  - the same model with the weights of `qtool dequantize` (D), which isolates the loader.
Bounds: with n = |logits(bf16) - logits(f32)| / |logits(f32)|, the bf16 compute noise of the
original model, and e_w = |D - L| / |L|, the error the scheme's weights alone cause:
  nf4: the loader dequantizes the same values qtool does and runs a bf16 GEMM, so
       |B - D| / |D| <= 3n and |B - L| / |L| <= e_w + 3n;
  int8: LLM.int8 also quantizes the activations to 8 bits per row (absmax / 127, the same
       resolution as the weights), so |B - D| / |D| <= e_w + 3n and |B - L| / |L| <= 2 e_w + 3n.
A loader that misread the layout (a wrong absmax, nibble order, scale or skip list) gives errors of
order 1, far outside these.

The same for the T5 text encoder of the tiny flux pipeline quantized with sample_configs/flux-nf4.json
(text_encoder_2 in int8): transformers loads it with Linear8bitLt except T5's "wo" projections,
which it keeps in full precision and qtool leaves unquantized, and its hidden states are compared
like the int8 logits. (diffusers' bitsandbytes loader of the flux transformer refuses to run without
a GPU, so the pipeline's transformer is not loaded here.)

compressed-tensors: qtool's fp8 (e4m3, per channel and per tensor) decompresses, through the
naive-quantized compressor and through transformers' CompressedTensorsHfQuantizer (both compressed
on the CPU and decompressed on load), to exactly the values of `qtool dequantize`; and its
config.json is byte for byte the one compressed-tensors' own writer (ModelCompressor.update_config)
writes for the same model quantized weight-only to fp8 with lm_head ignored, key order included.
fp8_e5m2: compressed-tensors' schema cannot name it (QuantizationArgs' 8-bit float is always
float8_e4m3fn and it forbids other fields), and a model folder holding e5m2 codes under that config
loads (transformers' default, compressed) without a word into e4m3 parameters, i.e. with wrong
weights (shown with a folder assembled from qtool's single-file e5m2 output); so `qtool quantize`
refuses fp8_e5m2 for a folder (exit 2, saying why and to use fp8_e4m3).

  quantize_interop.py --qtool QTOOL --samples SAMPLE_CONFIGS_DIR [--work DIR]
"""
import argparse
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

FAILS = []


def check(cond, msg):
    print(("ok   " if cond else "FAIL ") + msg)
    if not cond:
        FAILS.append(msg)


def run(*args):
    subprocess.run([str(a) for a in args], check=True)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def load_dir(path):
    sd = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        sd.update(load_file(f))
    return sd


def logits(path, ids, **kw):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    m = AutoModelForCausalLM.from_pretrained(path, **kw)
    m.eval()
    with torch.no_grad():
        return m, m(ids).logits.float()


def bnb_case(qtool, tiny, work, name, config, ids, ref_bf16, noise):
    import bitsandbytes as bnb
    out, deq = os.path.join(work, "q-" + name), os.path.join(work, "dq-" + name)
    run(qtool, "quantize", tiny, "--config", config, "-o", out, "-q")
    run(qtool, "dequantize", out, "-o", deq, "-q")
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    int8 = qc["load_in_8bit"]
    model, lq = logits(out, ids, device_map="cpu")
    lin_type = bnb.nn.Linear8bitLt if int8 else bnb.nn.Linear4bit
    layer = model.model.layers[0]
    check(isinstance(layer.mlp.up_proj, lin_type) and isinstance(layer.self_attn.q_proj, lin_type),
          "%s: linears load as %s" % (name, lin_type.__name__))
    check(type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding,
          "%s: lm_head and embeddings stay plain (llm_int8_skip_modules %s)" % (name, qc["llm_int8_skip_modules"]))
    _, ld = logits(deq, ids, dtype=torch.bfloat16)
    e_w = rel(ld, ref_bf16)
    e_bd, e_bl = rel(lq, ld), rel(lq, ref_bf16)
    b_bd = e_w + 3 * noise if int8 else 3 * noise
    b_bl = 2 * e_w + 3 * noise if int8 else e_w + 3 * noise
    print("     %s: weights alone e_w=%.4f, bf16 noise n=%.4f" % (name, e_w, noise))
    check(e_bd <= b_bd, "%s: |bnb - dequantized| / |dequantized| = %.4f <= %.4f" % (name, e_bd, b_bd))
    check(e_bl <= b_bl, "%s: |bnb - bf16| / |bf16| = %.4f <= %.4f" % (name, e_bl, b_bl))


def t5_case(qtool, samples, work, seed):
    import bitsandbytes as bnb
    from transformers import T5EncoderModel
    from transformers.utils import logging
    logging.set_verbosity_error()
    flux = os.path.join(work, "tiny-flux")
    out, deq = os.path.join(work, "q-flux"), os.path.join(work, "dq-flux")
    run(qtool, "synth", "--preset", "tiny-flux", "--seed", seed, "-o", flux, "-q")
    run(qtool, "quantize", flux, "--config", os.path.join(samples, "flux-nf4.json"), "-o", out, "-q")
    run(qtool, "dequantize", out, "-o", deq, "-q")
    ids = torch.randint(0, 500, (2, 16))

    def hidden(path, **kw):
        m = T5EncoderModel.from_pretrained(os.path.join(path, "text_encoder_2"), **kw)
        with torch.no_grad():
            return m, m(ids).last_hidden_state.float()

    m, hq = hidden(out, device_map="cpu")
    block = m.encoder.block[0].layer
    check(isinstance(block[0].SelfAttention.q, bnb.nn.Linear8bitLt) and isinstance(block[1].DenseReluDense.wi_0, bnb.nn.Linear8bitLt),
          "t5 int8: attention and wi_* load as Linear8bitLt")
    check(type(block[1].DenseReluDense.wo) is torch.nn.Linear and block[1].DenseReluDense.wo.weight.is_floating_point(),
          "t5 int8: wo stays a float Linear, as transformers keeps it")
    _, href = hidden(flux, dtype=torch.bfloat16)
    _, h32 = hidden(flux, dtype=torch.float32)
    _, hd = hidden(deq, dtype=torch.bfloat16)
    noise, e_w = rel(href, h32), rel(hd, href)
    print("     t5 int8: weights alone e_w=%.4f, bf16 noise n=%.4f" % (e_w, noise))
    check(rel(hq, hd) <= e_w + 3 * noise, "t5 int8: |bnb - dequantized| = %.4f <= %.4f" % (rel(hq, hd), e_w + 3 * noise))
    check(rel(hq, href) <= 2 * e_w + 3 * noise, "t5 int8: |bnb - bf16| = %.4f <= %.4f" % (rel(hq, href), 2 * e_w + 3 * noise))


def fp8_config_case(qtool, tiny, work, per_tensor):
    """config.json of qtool's fp8 output against compressed-tensors' writer, byte for byte."""
    import compressed_tensors
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from transformers import AutoModelForCausalLM
    name = "fp8-config-" + ("tensor" if per_tensor else "channel")
    out = os.path.join(work, "q-" + name)
    cfg_path = os.path.join(work, name + ".json")
    open(cfg_path, "w").write(json.dumps({"quant_backend": "fp8_e4m3", "quant_kwargs": {"per_tensor": per_tensor}}))
    run(qtool, "quantize", tiny, "--config", cfg_path, "-o", out, "-q")
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=8, type="float", symmetric=True, strategy="tensor" if per_tensor else "channel"))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for _, module in model.named_modules():
        if hasattr(module, "weight_scale"):
            module.weight_scale.data.fill_(1.0)  # the config does not depend on the scales' values
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    ref_dir = os.path.join(work, "ct-" + name)
    os.makedirs(ref_dir, exist_ok=True)
    shutil.copy(os.path.join(tiny, "config.json"), os.path.join(ref_dir, "config.json"))
    compressor.update_config(ref_dir)
    ours = open(os.path.join(out, "config.json"), "rb").read()
    theirs = open(os.path.join(ref_dir, "config.json"), "rb").read()
    qc_ours = json.loads(ours)["quantization_config"]
    qc_theirs = json.loads(theirs)["quantization_config"]
    check(qc_ours == qc_theirs, "%s: quantization_config equals compressed-tensors %s's as JSON values (format %s, "
          "version %s, ignore %s)" % (name, compressed_tensors.__version__, qc_ours.get("format"),
                                       qc_ours.get("version"), qc_ours.get("ignore")))
    check(ours.rstrip(b"\n") == theirs.rstrip(b"\n"),
          "%s: config.json is byte-identical to compressed-tensors' (%d vs %d bytes, key order included)"
          % (name, len(ours.rstrip(b"\n")), len(theirs.rstrip(b"\n"))))


def e5m2_case(qtool, tiny, work):
    """fp8_e5m2: refused for a folder; a hand-made folder shows what a loader would do with it."""
    from compressed_tensors.quantization import QuantizationArgs
    args = QuantizationArgs(num_bits=8, type="float")
    try:
        QuantizationArgs(num_bits=8, type="float", dtype="float8_e5m2")
        extra_refused = False
    except Exception:
        extra_refused = True
    check(args.pytorch_dtype() == torch.float8_e4m3fn and extra_refused,
          "compressed-tensors' schema has no e5m2: 8-bit float weights are %s, other fields refused" % args.pytorch_dtype())
    out = os.path.join(work, "q-e5m2")
    r = subprocess.run([qtool, "quantize", tiny, "--scheme", "fp8_e5m2", "-o", out], capture_output=True, text=True)
    check(r.returncode == 2 and "fp8_e5m2" in r.stderr and "use fp8_e4m3" in r.stderr and not os.path.exists(out),
          "qtool quantize refuses fp8_e5m2 for a model folder (exit %d: %s)" % (r.returncode, r.stderr.strip()[:160]))
    # What a loader does with e5m2 codes under compressed-tensors' config: qtool's single-file
    # e5m2 output, given the folder's config.json and the config of its e4m3 output.
    e4 = os.path.join(work, "q-e4m3-for-e5m2")
    run(qtool, "quantize", tiny, "--scheme", "fp8_e4m3", "-o", e4, "-q")
    hand = os.path.join(work, "hand-e5m2")
    os.makedirs(hand)
    shutil.copy(os.path.join(e4, "config.json"), os.path.join(hand, "config.json"))
    from safetensors import safe_open
    weight_map = {}
    dq = {}
    for f in sorted(glob.glob(os.path.join(tiny, "*.safetensors"))):
        name = os.path.basename(f)
        run(qtool, "quantize", f, "--scheme", "fp8_e5m2", "-o", os.path.join(hand, name), "-q")
        deq = os.path.join(work, "dq-hand-" + name)
        run(qtool, "dequantize", os.path.join(hand, name), "-o", deq, "-q")
        dq.update(load_file(deq))
        with safe_open(os.path.join(hand, name), "pt") as sf:
            weight_map.update({k: name for k in sf.keys()})
    index = glob.glob(os.path.join(tiny, "*.safetensors.index.json"))
    if index:
        json.dump({"metadata": {}, "weight_map": weight_map},
                  open(os.path.join(hand, os.path.basename(index[0])), "w"))
    scaled = {k[: -len("_scale")] for k in weight_map if k.endswith(".weight_scale")}
    # transformers' default load keeps the weights compressed, in parameters of compressed-tensors'
    # 8-bit float dtype (e4m3): the e5m2 codes are converted into them, without a word.
    from transformers import AutoModelForCausalLM
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForCausalLM.from_pretrained(hand, device_map="cpu")
    msd = model.state_dict()
    names = sorted(scaled)
    n_bad_modules = n_bad = n_all = 0
    for k in names:
        w = (msd[k].float() * msd[k + "_scale"].float()).to(dq[k].dtype)
        differ = int((w != dq[k]).sum())
        n_bad_modules += differ > 0
        n_bad += differ
        n_all += w.numel()
    e5m2_words = [str(w.message)[:80] for w in caught if "e5m2" in str(w.message).lower()]
    check(names and n_bad_modules == len(names) and not e5m2_words and msd[names[0]].dtype == torch.float8_e4m3fn,
          "e5m2 codes under compressed-tensors' config load without a word, as %s parameters: %d of %d weights "
          "in %d of %d modules differ from qtool dequantize's (which is why quantize refuses it)"
          % (msd[names[0]].dtype, n_bad, n_all, n_bad_modules, len(names)))


def fp8_case(qtool, tiny, work, name, config_text, ids):
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    cfg_path = os.path.join(work, name + ".json")
    open(cfg_path, "w").write(config_text)
    out, deq = os.path.join(work, "q-" + name), os.path.join(work, "dq-" + name)
    run(qtool, "quantize", tiny, "--config", cfg_path, "-o", out, "-q")
    run(qtool, "dequantize", out, "-o", deq, "-q")
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    cfg = QuantizationConfig.model_validate(qc)
    scheme = cfg.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(cfg.format)
    sd, dq = load_dir(out), load_dir(deq)
    n = bad = 0
    for k in sd:
        if not k.endswith(".weight_scale"):
            continue
        m = k[: -len(".weight_scale")]
        got = compressor.decompress({"weight": sd[m + ".weight"], "weight_scale": sd[k]}, scheme)["weight"]
        n += 1
        if got.dtype != dq[m + ".weight"].dtype or not torch.equal(got, dq[m + ".weight"]):
            bad += 1
    check(n > 0 and bad == 0, "%s: %s decompresses %d weights to qtool dequantize's values (%d differ)"
          % (name, compressor.__name__, n, bad))
    if sd[next(k for k in sd if k.endswith(".weight_scale"))[: -len("_scale")]].dtype != torch.float8_e4m3fn:
        return
    from transformers import CompressedTensorsConfig
    model, lq = logits(out, ids, device_map="cpu", quantization_config=CompressedTensorsConfig(dequantize=True))
    msd = model.state_dict()
    diff = [k for k, v in dq.items() if k in msd and not torch.equal(msd[k].to(v.dtype), v)]
    check(not diff, "%s: transformers decompresses on load to qtool dequantize's weights (%d differ)" % (name, len(diff)))
    _, lc = logits(out, ids, device_map="cpu")
    _, ld = logits(deq, ids, dtype=torch.bfloat16)
    check(torch.equal(lc, ld), "%s: compressed model's logits equal the dequantized model's (max diff %.3g)"
          % (name, (lc - ld).abs().max().item()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qtool", required=True)
    ap.add_argument("--samples", required=True)
    ap.add_argument("--work")
    args = ap.parse_args()
    seed = int(os.environ.get("QTOOL_TEST_SEED", random.randrange(1 << 30)))
    print("QTOOL_TEST_SEED=%d" % seed)
    work = args.work or tempfile.mkdtemp(prefix="qtool-quantize-interop-")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        tiny = os.path.join(work, "tiny")
        run(args.qtool, "synth", "--preset", "tiny", "--seed", seed, "-o", tiny, "-q")
        torch.manual_seed(seed)
        ids = torch.randint(0, 1000, (2, 24))
        _, ref_bf16 = logits(tiny, ids, dtype=torch.bfloat16)
        _, ref_f32 = logits(tiny, ids, dtype=torch.float32)
        noise = rel(ref_bf16, ref_f32)
        nf4_plain = os.path.join(work, "nf4.json")
        open(nf4_plain, "w").write('{"quant_backend": "nf4"}')
        for name, cfg in (("int8", os.path.join(args.samples, "llama-int8.json")),
                          ("nf4-dq", os.path.join(args.samples, "llama-nf4-dq.json")), ("nf4", nf4_plain)):
            bnb_case(args.qtool, tiny, work, name, cfg, ids, ref_bf16, noise)
        t5_case(args.qtool, args.samples, work, seed)
        fp8_case(args.qtool, tiny, work, "fp8-channel", open(os.path.join(args.samples, "llama-fp8.json")).read(), ids)
        fp8_case(args.qtool, tiny, work, "fp8-tensor", '{"quant_backend": "fp8_e4m3", "quant_kwargs": {"per_tensor": true}}', ids)
        fp8_config_case(args.qtool, tiny, work, False)
        fp8_config_case(args.qtool, tiny, work, True)
        e5m2_case(args.qtool, tiny, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if FAILS:
        print("%d check(s) failed" % len(FAILS))
        sys.exit(1)
    print("all ok")


if __name__ == "__main__":
    main()
