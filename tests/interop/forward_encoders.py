#!/usr/bin/env python3
"""Tiny random T5EncoderModel and CLIPTextModel, built, saved and run by transformers.

The sibling of forward_models.py, with the same layout: for each variant OUT/<variant>/ holds
  config.json + model.safetensors: save_pretrained in the variant's dtype (bf16; one T5 in fp16,
  where transformers keeps `wo` in float32)
  vectors.safetensors: the inputs (input_ids, attention_mask), the framework's outputs as F32
      (`last_hidden_state`, and `pooler_output` for CLIP), the same model run in float32
      (`<output>.f32`, the tolerance's noise), and per-stage outputs `stage.<unit>` (each block /
      layer, CLIP's embeddings and final_layer_norm).
With --synth QTOOL, the CLIP and T5 of `QTOOL synth --preset tiny-flux` (random weights written by
qtool, configs as the Hub's) are run as well, on inputs drawn from the seed.

T5 variants use T >= 100 so that keys 91+ positions away reach the last logarithmic bucket.
CLIP variants use the legacy eos_token_id 2 (argmax pooling) and eos_token_id = vocab - 1 (first
EOS), with ids containing token 2 and EOS-padded tails, so that the two rules pick different
positions.

  forward_encoders.py --out DIR [--set committed|interop] [--seed N] [--only NAME] [--compare TOOL]
                      [--qtool QTOOL] [--synth QTOOL]
"""
import argparse
import math
import os
import subprocess
import sys
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

T5 = {
    # Committed under tests/runner/data/ (the default suite): small, but T = 100.
    "t5_small": dict(D=40, dkv=12, H=3, F=56, L=2, V=67, NB=32, MD=128, proj="gated-gelu", B=1, T=100,
                     mask=False, dtype="bf16", committed=True),
    # The interop suite: the brief's sizes, a padding mask, ReLU, fp16 with the fp32 wo.
    "t5_a": dict(D=40, dkv=12, H=3, F=56, L=3, V=101, NB=32, MD=128, proj="gated-gelu", B=2, T=130,
                 mask=True, dtype="bf16", committed=False),
    "t5_relu": dict(D=36, dkv=10, H=2, F=44, L=2, V=53, NB=16, MD=40, proj="relu", B=2, T=57, mask=False,
                    dtype="bf16", committed=False),
    "t5_fp16": dict(D=40, dkv=12, H=3, F=56, L=3, V=101, NB=32, MD=128, proj="gated-gelu", B=2, T=110,
                    mask=False, dtype="fp16", committed=False),
}

CLIP = {
    "clip_small": dict(D=36, H=3, I=52, L=2, V=99, P=40, eos="legacy", B=3, T=16, mask=False, committed=True),
    "clip_small_eos": dict(D=36, H=3, I=52, L=2, V=99, P=40, eos="last", B=3, T=16, mask=False, committed=True),
    "clip_a": dict(D=48, H=4, I=76, L=3, V=131, P=40, eos="last", B=3, T=33, mask=True, committed=False),
    "clip_legacy_a": dict(D=48, H=4, I=76, L=3, V=131, P=40, eos="legacy", B=2, T=40, mask=False,
                          committed=False),
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def init_weights(model, gen):
    """Linear weights N(0, 1/in), embeddings N(0, 1), biases N(0, 0.01), norms 1 + N(0, 0.0625)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 + 0.25 * torch.randn(p.shape, generator=gen)) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embed" in name or "shared" in name or "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))


def hook_stages(blocks, named, stages):
    hooks = []
    for key, mod in named:
        hooks.append(mod.register_forward_hook(
            lambda m, a, o, key=key: stages.__setitem__(key, o[0] if isinstance(o, tuple) else o)))
    return hooks


def t5_run(cls, path, dtype, inputs, with_stages):
    model = cls.from_pretrained(path, dtype=dtype).eval()
    stages = {}
    hooks = []
    if with_stages:
        hooks = hook_stages(None, [(f"stage.encoder.block.{i}", b) for i, b in enumerate(model.encoder.block)],
                            stages)
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    for h in hooks:
        h.remove()
    return out, stages


def t5_variant(name, v, out_dir, seed):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=v["V"], d_model=v["D"], d_kv=v["dkv"], num_heads=v["H"], d_ff=v["F"],
                   num_layers=v["L"], relative_attention_num_buckets=v["NB"],
                   relative_attention_max_distance=v["MD"], feed_forward_proj=v["proj"],
                   layer_norm_epsilon=1e-6, dropout_rate=0.0)
    gen = torch.Generator().manual_seed(seed)
    model = T5EncoderModel(cfg)
    init_weights(model, gen)
    dt = DTYPES[v["dtype"]]
    model = model.to(dt)
    path = os.path.join(out_dir, name)
    model.save_pretrained(path)

    B, T = v["B"], v["T"]
    inputs = {"input_ids": torch.randint(0, v["V"], (B, T), generator=gen, dtype=torch.int64)}
    if v["mask"]:
        mask = torch.ones(B, T, dtype=torch.int64)
        mask[0, T - 7:] = 0  # padding at the end of one sample
        inputs["attention_mask"] = mask
    out, stages = t5_run(T5EncoderModel, path, dt, inputs, True)
    tensors = {k: t.contiguous() for k, t in inputs.items()}
    tensors["last_hidden_state"] = out.float().contiguous()
    tensors["last_hidden_state.f32"] = t5_run(T5EncoderModel, path, torch.float32, inputs, False)[0].contiguous()
    for k, t in stages.items():
        tensors[k] = t.detach().contiguous()
    save_file(tensors, os.path.join(path, "vectors.safetensors"))
    return out


def clip_ids(v, gen, eos):
    """Random ids below EOS holding token 2, then an EOS-padded tail at a per-sample length."""
    B, T = v["B"], v["T"]
    ids = torch.randint(3, eos, (B, T), generator=gen, dtype=torch.int64)
    for b in range(B):
        ids[b, 1 + b] = 2
        end = T - 1 - 3 * b if b % 2 == 0 else 4 + b
        ids[b, end:] = eos
    return ids


def clip_run(path, dtype, inputs, with_stages):
    from transformers import CLIPTextModel

    model = CLIPTextModel.from_pretrained(path, dtype=dtype).eval()
    root = model.text_model if hasattr(model, "text_model") else model
    stages = {}
    hooks = []
    if with_stages:
        with open(os.path.join(path, "model.safetensors"), "rb") as f:
            prefix = "text_model." if b'"text_model.' in f.read(1 << 16) else ""
        named = [(f"stage.{prefix}embeddings", root.embeddings)]
        named += [(f"stage.{prefix}encoder.layers.{i}", layer) for i, layer in enumerate(root.encoder.layers)]
        named += [(f"stage.{prefix}final_layer_norm", root.final_layer_norm)]
        hooks = hook_stages(None, named, stages)
    with torch.no_grad():
        out = model(**inputs)
    for h in hooks:
        h.remove()
    return out.last_hidden_state, out.pooler_output, stages


def clip_variant(name, v, out_dir, seed):
    from transformers import CLIPTextConfig, CLIPTextModel

    eos = v["V"] - 1
    cfg = CLIPTextConfig(vocab_size=v["V"], hidden_size=v["D"], intermediate_size=v["I"],
                         num_hidden_layers=v["L"], num_attention_heads=v["H"], max_position_embeddings=v["P"],
                         hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=v["D"],
                         bos_token_id=0, pad_token_id=1, eos_token_id=2 if v["eos"] == "legacy" else eos)
    gen = torch.Generator().manual_seed(seed)
    model = CLIPTextModel(cfg)
    init_weights(model, gen)
    model = model.to(torch.bfloat16)
    path = os.path.join(out_dir, name)
    model.save_pretrained(path)

    inputs = {"input_ids": clip_ids(v, gen, eos)}
    if v["mask"]:
        mask = torch.ones(v["B"], v["T"], dtype=torch.int64)
        mask[0, -3:] = 0
        inputs["attention_mask"] = mask
    last, pooled, stages = clip_run(path, torch.bfloat16, inputs, True)
    last32, pooled32, _ = clip_run(path, torch.float32, inputs, False)
    tensors = {k: t.contiguous() for k, t in inputs.items()}
    tensors["last_hidden_state"] = last.float().contiguous()
    tensors["last_hidden_state.f32"] = last32.contiguous()
    tensors["pooler_output"] = pooled.float().contiguous()
    tensors["pooler_output.f32"] = pooled32.contiguous()
    for k, t in stages.items():
        tensors[k] = t.detach().contiguous()
    save_file(tensors, os.path.join(path, "vectors.safetensors"))
    return last


def synth_variants(out_dir, qtool, seed):
    """The CLIP and T5 of `qtool synth --preset tiny-flux`, run by transformers on seeded ids."""
    pipe = os.path.join(out_dir, "tiny-flux")
    subprocess.run([qtool, "synth", "--preset", "tiny-flux", "-o", pipe, "--seed", str(seed), "--components", "text_encoder,text_encoder_2", "--threads", "2", "-q", "--force"],
                   check=True)
    from safetensors import safe_open
    from transformers import CLIPTextModel, T5EncoderModel
    import json

    gen = torch.Generator().manual_seed(seed)
    done = []
    for comp, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", T5EncoderModel)):
        path = os.path.join(pipe, comp)
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        V = cfg["vocab_size"]
        if cls is CLIPTextModel:
            ids = clip_ids(dict(B=2, T=min(77, cfg["max_position_embeddings"])), gen, V - 1)
        else:
            ids = torch.randint(0, V, (2, 96), generator=gen, dtype=torch.int64)
        inputs = {"input_ids": ids}
        tensors = dict(inputs)
        for dt, suffix in ((torch.bfloat16, ""), (torch.float32, ".f32")):
            with torch.no_grad():
                out = cls.from_pretrained(path, dtype=dt).eval()(**inputs)
            tensors["last_hidden_state" + suffix] = out.last_hidden_state.float().contiguous()
            if cls is CLIPTextModel:
                tensors["pooler_output" + suffix] = out.pooler_output.float().contiguous()
        save_file(tensors, os.path.join(path, "vectors.safetensors"))
        print(f"  tiny-flux/{comp}: output {tuple(tensors['last_hidden_state'].shape)}", flush=True)
        done.append(path)
    return done


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", choices=["committed", "interop"], default="interop")
    ap.add_argument("--seed", type=int, default=20261205)
    ap.add_argument("--only", default=None)
    ap.add_argument("--compare", default=None)
    ap.add_argument("--synth", default=None, help="also run the encoders of QTOOL synth --preset tiny-flux")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"forward_encoders.py: seed {args.seed}, torch {torch.__version__}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    k = 0
    done = []
    for table, fn in ((T5, t5_variant), (CLIP, clip_variant)):
        for name, v in table.items():
            k += 1
            if args.only and name != args.only:
                continue
            if args.set == "committed" and not v["committed"]:
                continue
            out = fn(name, v, args.out, args.seed + k)
            print(f"  {name}: output {tuple(out.shape)}, rms {out.float().pow(2).mean().sqrt():.4f}", flush=True)
            done.append(os.path.join(args.out, name))
    if args.synth and not args.only:
        done += synth_variants(args.out, args.synth, args.seed)
    if args.compare:
        rc = subprocess.run([args.compare] + done).returncode
        if rc != 0:
            print(f"forward_encoders.py: {args.compare} failed (exit {rc})", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
