#!/usr/bin/env python3
"""Tiny random LlamaForCausalLM and FluxTransformer2DModel, built, saved and run by the frameworks.

For each variant this writes OUT/<variant>/ with
  config.json + model.safetensors (or diffusion_pytorch_model.safetensors): save_pretrained in bf16
  vectors.safetensors: the forward's inputs under the framework's argument names (input_ids,
      position_ids; hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids,
      txt_ids, guidance), the framework's output as F32 (`logits` / `sample`), the same model
      run in float32 on the same inputs (`logits.f32` / `sample.f32`: the bf16 computation's own
      noise, which the comparison's tolerance is derived from), and per-stage
      outputs in the model dtype: `stage.<unit>` (Llama: each decoder layer's hidden state, the
      final norm; Flux: x_embedder, time_text_embed, context_embedder, each block's text and image
      streams `stage.<block>.txt` / `.img`, norm_out), plus `rope.inv_freq` (Llama's fp32 buffer).
The model is reloaded from the saved folder with dtype bf16 and run on the CPU, so the vectors are
exactly what transformers / diffusers compute from the files qtool reads.

Weights are drawn from the printed seed with a scale that keeps activations of order 1 (linear
weights N(0, 1/in), embeddings N(0, 1), biases N(0, 0.1^2)), and every norm weight is perturbed
away from 1 (1 + N(0, 0.25^2)), so that a norm read wrongly or skipped changes the output.

With --compare TOOL, each folder is then handed to TOOL (tests/runner/forward_compare: qtool's
forward on the CPU ops against these vectors); the script fails when TOOL fails on any of them.

With --qtool QTOOL, each variant is also quantized by `QTOOL quantize` to nf4, int8 and fp8_e4m3
(OUT/<variant>.<scheme>), and the vectors beside the quantized weights are the framework's outputs
on `QTOOL dequantize`'s output of them (same inputs).

  forward_models.py --out DIR [--set committed|interop] [--seed N] [--only NAME] [--compare TOOL] [--qtool QTOOL]
"""
import argparse
import json
import math
import os
import subprocess
import sys
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

# Llama variants: sizes that are not powers of two; GQA with Hkv 1 and 2; llama3 scaling; tied
# and untied heads; biases; head_dim != D / H; explicit position ids with large offsets.
LLAMA = {
    # The default suite's checkpoints (committed under tests/runner/data/, a few hundred KB).
    "llama_small": dict(D=48, H=4, Hkv=2, hd=12, I=88, V=97, L=2, llama3=True, tied=False,
                        attention_bias=True, mlp_bias=False, theta=500000.0, eps=1e-5, B=2, T=9,
                        positions=None, committed=True),
    "llama_small_tied": dict(D=40, H=4, Hkv=1, hd=6, I=72, V=89, L=2, llama3=False, tied=True,
                             attention_bias=False, mlp_bias=True, theta=5000.0, eps=1e-6, B=1, T=10,
                             positions="offset", committed=True),
    # The interop suite adds the sizes of the brief.
    "llama_gqa2_untied": dict(D=72, H=6, Hkv=2, hd=12, I=136, V=211, L=3, llama3=True, tied=False,
                              attention_bias=False, mlp_bias=False, theta=500000.0, eps=1e-5, B=2,
                              T=13, positions=None, committed=False),
    "llama_gqa1_tied_bias": dict(D=72, H=6, Hkv=1, hd=8, I=100, V=173, L=3, llama3=True, tied=True,
                                 attention_bias=True, mlp_bias=True, theta=10000.0, eps=1e-6, B=2,
                                 T=11, positions="offset", committed=False),
}

# Flux variants: non-square latent grids, Tt != Ti, distinct non-zero text ids (so a RoPE on the
# wrong tokens shows), per-sample timesteps and guidance.
FLUX = {
    "flux_small": dict(n_double=2, n_single=2, H=2, hd=16, axes=[4, 6, 6], in_ch=12, out_ch=None,
                       joint=24, pooled=16, guidance=True, grid=(3, 4), Tt=5, B=2, committed=True),
    "flux_a": dict(n_double=2, n_single=3, H=3, hd=16, axes=[4, 6, 6], in_ch=12, out_ch=None, joint=40,
                   pooled=24, guidance=True, grid=(3, 5), Tt=7, B=2, committed=False),
    "flux_noguidance": dict(n_double=1, n_single=2, H=3, hd=16, axes=[2, 8, 6], in_ch=12, out_ch=10,
                            joint=40, pooled=24, guidance=False, grid=(2, 5), Tt=4, B=1, committed=False),
}


def init_weights(model, gen):
    """Linear weights N(0, 1/in), embeddings N(0, 1), biases N(0, 0.01), norms 1 + N(0, 0.0625)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)
            module = leaf[0] if len(leaf) == 2 else ""
            last = module.rsplit(".", 1)[-1]
            if "norm" in last:
                p.copy_(1.0 + 0.25 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))


def llama_variant(name, v, out_dir, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "default", "rope_theta": v["theta"]}
    if v["llama3"]:
        rope = {"rope_type": "llama3", "rope_theta": v["theta"], "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = LlamaConfig(vocab_size=v["V"], hidden_size=v["D"], intermediate_size=v["I"],
                      num_hidden_layers=v["L"], num_attention_heads=v["H"], num_key_value_heads=v["Hkv"],
                      head_dim=v["hd"], rms_norm_eps=v["eps"], rope_parameters=rope,
                      tie_word_embeddings=v["tied"], attention_bias=v["attention_bias"],
                      mlp_bias=v["mlp_bias"], max_position_embeddings=4096)
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    init_weights(model, gen)
    if v["tied"]:
        model.tie_weights()
    model = model.to(torch.bfloat16)
    path = os.path.join(out_dir, name)
    model.save_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()

    B, T = v["B"], v["T"]
    inputs = {"input_ids": torch.randint(0, v["V"], (B, T), generator=gen, dtype=torch.int64)}
    if v["positions"] == "offset":
        # Per-sample offsets, one of them past original_max_position_embeddings.
        base = torch.tensor([[3], [1000]])[:B]
        inputs["position_ids"] = base + torch.arange(T)[None, :]

    stages = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_hook(
            lambda m, a, o, i=i: stages.__setitem__(f"stage.model.layers.{i}", (o[0] if isinstance(o, tuple) else o))))
    hooks.append(model.model.norm.register_forward_hook(lambda m, a, o: stages.__setitem__("stage.model.norm", o)))
    with torch.no_grad():
        logits = model(**inputs).logits
    for h in hooks:
        h.remove()
    tensors = {k: t.contiguous() for k, t in inputs.items()}
    tensors["logits"] = logits.float().contiguous()
    # The same model and inputs in float32: the bf16 computation's own noise.
    model32 = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        tensors["logits.f32"] = model32(**inputs).logits.contiguous()
    tensors["rope.inv_freq"] = model.model.rotary_emb.inv_freq.float().contiguous()
    for k, t in stages.items():
        tensors[k] = t.detach().contiguous()
    save_file(tensors, os.path.join(path, "vectors.safetensors"))
    return logits


def flux_variant(name, v, out_dir, seed):
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=v["in_ch"], out_channels=v["out_ch"],
                                   num_layers=v["n_double"], num_single_layers=v["n_single"],
                                   attention_head_dim=v["hd"], num_attention_heads=v["H"],
                                   joint_attention_dim=v["joint"], pooled_projection_dim=v["pooled"],
                                   guidance_embeds=v["guidance"], axes_dims_rope=v["axes"])
    gen = torch.Generator().manual_seed(seed)
    init_weights(model, gen)
    model = model.to(torch.bfloat16)
    path = os.path.join(out_dir, name)
    model.save_pretrained(path)
    model = FluxTransformer2DModel.from_pretrained(path, torch_dtype=torch.bfloat16).eval()

    B, Tt = v["B"], v["Tt"]
    gh, gw = v["grid"]
    Ti = gh * gw
    bf = torch.bfloat16
    # The pipeline's image ids: (0, row, col) over the packed latent grid, in the model dtype.
    img_ids = torch.zeros(gh, gw, 3)
    img_ids[..., 1] += torch.arange(gh)[:, None]
    img_ids[..., 2] += torch.arange(gw)[None, :]
    img_ids = img_ids.reshape(Ti, 3)
    img_ids[:, 0] = 1.0  # non-zero first axis (Kontext-style), so axis 0 is exercised too
    inputs = {
        "hidden_states": torch.randn(B, Ti, v["in_ch"], generator=gen).to(bf),
        "encoder_hidden_states": torch.randn(B, Tt, v["joint"], generator=gen).to(bf),
        "pooled_projections": torch.randn(B, v["pooled"], generator=gen).to(bf),
        "timestep": torch.tensor([0.3125, 0.123456, 0.9993][:B], dtype=torch.float32),
        "img_ids": img_ids.to(bf),
        # Distinct non-zero text ids: the pipeline's are zeros (an identity rotation), these
        # make a RoPE applied to the wrong tokens visible.
        "txt_ids": torch.randint(0, 9, (Tt, 3), generator=gen).to(bf),
    }
    if v["guidance"]:
        inputs["guidance"] = torch.tensor([3.5, 4.25, 1.0][:B], dtype=torch.float32)

    stages = {}
    hooks = []

    def keep(key):
        def hook(m, a, o):
            stages[key] = o
        return hook

    for unit in ["x_embedder", "time_text_embed", "context_embedder", "norm_out"]:
        hooks.append(getattr(model, unit).register_forward_hook(keep("stage." + unit)))
    def keep_streams(key):
        def hook(m, a, o):
            stages[key + ".txt"], stages[key + ".img"] = o[0], o[1]
        return hook

    for i, blk in enumerate(model.transformer_blocks):
        hooks.append(blk.register_forward_hook(keep_streams(f"stage.transformer_blocks.{i}")))
    for j, blk in enumerate(model.single_transformer_blocks):
        hooks.append(blk.register_forward_hook(keep_streams(f"stage.single_transformer_blocks.{j}")))
    with torch.no_grad():
        sample = model(**inputs, return_dict=False)[0]
    for h in hooks:
        h.remove()
    tensors = {k: t.contiguous() for k, t in inputs.items()}
    tensors["sample"] = sample.float().contiguous()
    model32 = FluxTransformer2DModel.from_pretrained(path, torch_dtype=torch.float32).eval()
    inputs32 = {k: (t.float() if t.is_floating_point() else t) for k, t in inputs.items()}
    # The bf16 model sees t~ = bf16(bf16(t) * 1000) (and g~ likewise): give the float32 model
    # the same values, so that only the compute differs, not the conditioning.
    for k in ("timestep", "guidance"):
        if k in inputs32:
            inputs32[k] = (inputs[k].to(bf) * 1000).float() / 1000
    with torch.no_grad():
        tensors["sample.f32"] = model32(**inputs32, return_dict=False)[0].contiguous()
    for k, t in stages.items():
        tensors[k] = t.detach().contiguous()
    save_file(tensors, os.path.join(path, "vectors.safetensors"))
    return sample


INPUT_NAMES = ("input_ids", "position_ids", "hidden_states", "encoder_hidden_states", "pooled_projections",
               "timestep", "img_ids", "txt_ids", "guidance")


def quantized_variant(name, out_dir, qtool, scheme):
    """`qtool quantize` OUT/name to OUT/name.scheme; the framework runs `qtool dequantize`'s output
    of it (bf16 and float32) on the base variant's inputs; the vectors go beside the quantized
    weights, so qtool's forward on the quantized file is compared with the framework on the
    same weights dequantized."""
    from safetensors.torch import load_file

    base = os.path.join(out_dir, name)
    qpath = os.path.join(out_dir, f"{name}.{scheme}")
    dpath = os.path.join(out_dir, f"{name}.{scheme}.dequantized")
    for args in (["quantize", base, "-o", qpath, "--scheme", scheme], ["dequantize", qpath, "-o", dpath]):
        subprocess.run([qtool] + args + ["-q", "-f", "-j", "2"], check=True)
    vectors = load_file(os.path.join(base, "vectors.safetensors"))
    inputs = {k: t for k, t in vectors.items() if k in INPUT_NAMES}
    with open(os.path.join(base, "config.json")) as f:
        is_llama = "architectures" in json.load(f)
    tensors = dict(inputs)
    if is_llama:
        from transformers import LlamaForCausalLM
        with torch.no_grad():
            m = LlamaForCausalLM.from_pretrained(dpath, dtype=torch.bfloat16).eval()
            tensors["logits"] = m(**inputs).logits.float().contiguous()
            m = LlamaForCausalLM.from_pretrained(dpath, dtype=torch.float32).eval()
            tensors["logits.f32"] = m(**inputs).logits.contiguous()
        out = tensors["logits"]
    else:
        from diffusers import FluxTransformer2DModel
        bf = torch.bfloat16
        inputs32 = {k: (t.float() if t.is_floating_point() else t) for k, t in inputs.items()}
        for k in ("timestep", "guidance"):
            if k in inputs32:
                inputs32[k] = (inputs[k].to(bf) * 1000).float() / 1000
        with torch.no_grad():
            m = FluxTransformer2DModel.from_pretrained(dpath, torch_dtype=bf).eval()
            tensors["sample"] = m(**inputs, return_dict=False)[0].float().contiguous()
            m = FluxTransformer2DModel.from_pretrained(dpath, torch_dtype=torch.float32).eval()
            tensors["sample.f32"] = m(**inputs32, return_dict=False)[0].contiguous()
        out = tensors["sample"]
    save_file(tensors, os.path.join(qpath, "vectors.safetensors"))
    return qpath, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", choices=["committed", "interop"], default="interop")
    ap.add_argument("--seed", type=int, default=20261205)
    ap.add_argument("--only", default=None)
    ap.add_argument("--compare", default=None)
    ap.add_argument("--qtool", default=None,
                    help="also quantize each variant with QTOOL to nf4, int8 and fp8_e4m3 (see quantized_variant)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"forward_models.py: seed {args.seed}, torch {torch.__version__}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    k = 0
    done = []
    for table, fn in ((LLAMA, llama_variant), (FLUX, flux_variant)):
        for name, v in table.items():
            k += 1
            if args.only and name != args.only:
                continue
            if args.set == "committed" and not v["committed"]:
                continue
            out = fn(name, v, args.out, args.seed + k)
            print(f"  {name}: output {tuple(out.shape)}, rms {out.float().pow(2).mean().sqrt():.4f}", flush=True)
            done.append(os.path.join(args.out, name))
            if args.qtool:
                for scheme in ("nf4", "int8", "fp8_e4m3"):
                    qpath, q = quantized_variant(name, args.out, args.qtool, scheme)
                    print(f"  {name}.{scheme}: output {tuple(q.shape)}, rms {q.float().pow(2).mean().sqrt():.4f}",
                          flush=True)
                    done.append(qpath)
    if args.compare:
        rc = subprocess.run([args.compare] + done).returncode
        if rc != 0:
            print(f"forward_models.py: {args.compare} failed (exit {rc})", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
