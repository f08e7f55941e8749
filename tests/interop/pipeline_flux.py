#!/usr/bin/env python3
"""qtool verify's FluxPipeline run against diffusers' FluxPipeline, 2 denoising steps.

`QTOOL synth --preset tiny-flux` writes a pipeline folder (CLIP, T5, the transformer, the VAE, the
scheduler's config); diffusers loads it with FluxPipeline.from_pretrained in bf16 and runs

    pooled = text_encoder(ids_1).pooler_output            (as _get_clip_prompt_embeds)
    embeds = text_encoder_2(ids_2)[0]                      (as _get_t5_prompt_embeds)
    FluxPipeline(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=latents, height, width,
                 num_inference_steps=2, guidance_scale=3.5, output_type="latent").images

on token ids and packed latents drawn from the printed seed (height and width give the latent
grid qtool uses: the factor pair of the image tokens closest to square). The same pipeline in
float32 on the same inputs is the yardstick: the framework's own bf16 noise. qtool's
`verify --inputs` of the same ids and latents writes its final latents (`images`); they must lie
within twice that noise of diffusers' bf16 latents (max and RMS, relative to the latents' RMS) and
no farther from the float32 latents than 1.25 x the framework's RMS distance.

With --save DIR the inputs and diffusers' latents are written to DIR/vectors.safetensors (the
default suite's e2e test replays them: tests/e2e/verify_pipeline.sh).

  pipeline_flux.py --qtool QTOOL --out WORK [--seed N] [--steps 2] [--save DIR]
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
from safetensors.torch import load_file, save_file  # noqa: E402

TOKENS = 16  # the plan's tokens: image tokens, and the encoders' ids (pipeline.hpp)


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def deviation(got, want):
    got, want = got.double().flatten(), want.double().flatten()
    rms = want.pow(2).mean().sqrt().item()
    d = got - want
    return d.abs().max().item() / rms, d.pow(2).mean().sqrt().item() / rms


def diffusers_latents(folder, dtype, ids1, ids2, latents, height, width, steps):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder, torch_dtype=dtype, tokenizer=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pooled = pipe.text_encoder(ids1, output_hidden_states=False).pooler_output.to(dtype)
        embeds = pipe.text_encoder_2(ids2, output_hidden_states=False)[0].to(dtype)
        out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=latents.to(dtype), height=height,
                   width=width, num_inference_steps=steps, guidance_scale=3.5, output_type="latent").images
    vsf = pipe.vae_scale_factor
    return out, vsf, pipe.scheduler.sigmas.tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qtool", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=20261205)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--save", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"pipeline_flux.py: seed {args.seed}, torch {torch.__version__}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    folder = os.path.join(args.out, "tiny-flux")
    run([args.qtool, "synth", "--preset", "tiny-flux", "-o", folder, "-q", "-f"])
    with open(os.path.join(folder, "transformer", "config.json")) as f:
        tcfg = json.load(f)
    with open(os.path.join(folder, "text_encoder", "config.json")) as f:
        clip_vocab = json.load(f)["vocab_size"]
    with open(os.path.join(folder, "text_encoder_2", "config.json")) as f:
        t5_vocab = json.load(f)["vocab_size"]
    with open(os.path.join(folder, "vae", "config.json")) as f:
        vsf = 2 ** (len(json.load(f)["block_out_channels"]) - 1)

    gen = torch.Generator().manual_seed(args.seed)
    rows = max(r for r in range(1, TOKENS + 1) if r * r <= TOKENS and TOKENS % r == 0)
    cols = TOKENS // rows
    height, width = rows * 2 * vsf, cols * 2 * vsf
    # CLIP ids: random tokens, then EOS (the vocabulary's last id) to the end, as the tokenizer pads.
    eos = clip_vocab - 1
    ids1 = torch.randint(0, eos, (1, TOKENS), generator=gen)
    ids1[0, 9:] = eos
    ids2 = torch.randint(0, t5_vocab, (1, TOKENS), generator=gen)
    latents = torch.randn(1, TOKENS, tcfg["in_channels"], generator=gen).to(torch.bfloat16)

    bf16, _, sigmas = diffusers_latents(folder, torch.bfloat16, ids1, ids2, latents, height, width, args.steps)
    f32, _, _ = diffusers_latents(folder, torch.float32, ids1, ids2, latents, height, width, args.steps)
    print(f"  diffusers: latents {tuple(bf16.shape)} on a {rows}x{cols} grid (height {height}, width {width}), "
          f"sigmas {[round(s, 6) for s in sigmas]}", flush=True)

    inputs = {"text_encoder.input_ids": ids1.contiguous(), "text_encoder_2.input_ids": ids2.contiguous(),
              "latents": latents.contiguous()}
    in_file = os.path.join(args.out, "inputs.safetensors")
    save_file(inputs, in_file)
    plan = os.path.join(args.out, "plan.json")
    run([args.qtool, "plan", folder, "--max-memory", "0=4GiB,cpu=4GiB", "--tokens", str(TOKENS), "-o", plan, "-q", "-f"])
    out_file = os.path.join(args.out, "qtool.safetensors")
    run([args.qtool, "verify", folder, "--plan", plan, "--backend", "cpu", "--steps", "1", "--denoise-steps",
         str(args.steps), "--inputs", in_file, "--outputs", out_file, "-q", "-j", "2"])
    ours = load_file(out_file)["images"]

    vs_fw = deviation(ours, bf16.float())
    noise = deviation(bf16.float(), f32.float())
    vs_f32 = deviation(ours, f32.float())
    ok = (math.isfinite(vs_fw[0]) and vs_fw[0] <= 2 * noise[0] and vs_fw[1] <= 2 * noise[1]
          and vs_f32[1] <= 1.25 * noise[1])
    print(f"  qtool vs diffusers (bf16), {args.steps} steps: max rel {vs_fw[0]:.5f}, rms rel {vs_fw[1]:.5f}; "
          f"diffusers' own noise (bf16 vs float32): max rel {noise[0]:.5f}, rms rel {noise[1]:.5f}; "
          f"qtool vs float32 rms rel {vs_f32[1]:.5f}: {'ok' if ok else 'FAIL'}", flush=True)
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        vectors = dict(inputs)
        vectors["images"] = bf16.float().contiguous()
        vectors["images.f32"] = f32.float().contiguous()
        save_file(vectors, os.path.join(args.save, "vectors.safetensors"),
                  metadata={"seed": str(args.seed), "denoise_steps": str(args.steps), "tokens": str(TOKENS)})
        print(f"  saved {os.path.join(args.save, 'vectors.safetensors')}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
