#!/usr/bin/env python3
"""qtool verify's FluxPipeline run against diffusers' FluxPipeline, 2 denoising steps.

Two pipeline folders: a random tiny one built by diffusers / transformers and saved (build_small:
weights scaled so that activations stay of order 1), and `QTOOL synth --preset tiny-flux`'s (CLIP,
T5, the transformer, the VAE, the scheduler's config). diffusers loads each with
FluxPipeline.from_pretrained in bf16 and runs

    pooled = text_encoder(ids_1).pooler_output            (as _get_clip_prompt_embeds)
    embeds = text_encoder_2(ids_2)[0]                      (as _get_t5_prompt_embeds)
    FluxPipeline(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=latents, height, width,
                 num_inference_steps=2, guidance_scale=3.5, output_type="latent").images

on token ids and packed latents drawn from the printed seed (height and width give the latent
grid qtool uses: the factor pair of the image tokens closest to square). The same pipeline in
float32 on the same inputs, its transformer given the bf16 run's rounded timestep and guidance
(the conditioning, not the compute), is the yardstick: the framework's own bf16 noise. qtool's
`verify --inputs` of the same ids and latents writes its final latents (`images`); they must lie
within twice that noise of diffusers' bf16 latents (max and RMS, relative to the latents' RMS) and
no farther from the float32 latents than 1.25 x the framework's RMS distance.

With --save DIR the small pipeline is built in DIR and the inputs and diffusers' latents are
written to DIR/vectors.safetensors beside it (tests/runner/data/flux_pipeline_small: the default
suite's e2e_verify_pipeline_vectors replays them, tests/e2e/verify_forward.sh).

The small pipeline is judged whole: diffusers runs its own encoders on the ids. tiny-flux's
transformer (qtool synth's weights) amplifies its text conditioning strongly: the encoders' own
rounding differences (qtool's CLIP and T5 outputs lie within the framework's bf16 noise of its
own, forward_encoders.py) grow past the yardstick in 2 steps, so there diffusers is given qtool's
encoder outputs as prompt_embeds / pooled_prompt_embeds and the denoising loop is judged alone.

  pipeline_flux.py --qtool QTOOL --out WORK [--seed N] [--steps 2] [--save DIR]
"""
import argparse
import json
import math
import os
import shutil
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


def diffusers_latents(folder, dtype, ids1, ids2, latents, height, width, steps, embeds=None):
    """FluxPipeline's final latents; the prompt embeddings from its own encoders on the ids, or
    `embeds` = (pooled_prompt_embeds, prompt_embeds) given."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder, torch_dtype=dtype, tokenizer=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    if dtype == torch.float32:
        # The bf16 transformer sees t~ = bf16(bf16(bf16(t) / 1000) * 1000) (the pipeline casts t to
        # the latents' dtype before dividing; the model multiplies in its dtype) and g~ likewise:
        # give the float32 transformer the same conditioning, so that only the compute differs
        # (as forward_models.py does for one forward).
        bf = torch.bfloat16

        def same_conditioning(module, args, kwargs):
            t = (kwargs["timestep"] * 1000).to(bf)
            kwargs["timestep"] = ((t / 1000).to(bf) * 1000).float() / 1000
            if kwargs.get("guidance") is not None:
                kwargs["guidance"] = (kwargs["guidance"].to(bf) * 1000).float() / 1000
            return args, kwargs

        pipe.transformer.register_forward_pre_hook(same_conditioning, with_kwargs=True)
    with torch.no_grad():
        if embeds is None:
            pooled = pipe.text_encoder(ids1, output_hidden_states=False).pooler_output.to(dtype)
            embeds = pipe.text_encoder_2(ids2, output_hidden_states=False)[0].to(dtype)
        else:
            pooled, embeds = embeds[0].to(dtype), embeds[1].to(dtype)
        out = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=latents.to(dtype), height=height,
                   width=width, num_inference_steps=steps, guidance_scale=3.5, output_type="latent").images
    vsf = pipe.vae_scale_factor
    return out, vsf, pipe.scheduler.sigmas.tolist()


def build_small(folder, seed):
    """A random tiny FluxPipeline built by diffusers / transformers and saved in bf16: CLIP and T5
    of 2 layers, a transformer of one double and one single block (D 32, 16 latent channels), a
    one-block VAE (vae_scale_factor 1), FLUX.1-dev's scheduler config; weights from the seed,
    scaled so that activations stay of order 1 (forward_models.init_weights)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from forward_models import init_weights

    gen = torch.Generator().manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=24, eos_token_id=98,
                                        bos_token_id=97, pad_token_id=98, projection_dim=32))
    t5 = T5EncoderModel(T5Config(vocab_size=101, d_model=32, d_kv=16, num_heads=2, d_ff=48, num_layers=2,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                 relative_attention_max_distance=16))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[4, 6, 6])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D"], block_out_channels=[8], layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    for m in (clip, t5, transformer):
        init_weights(m, gen)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=None, text_encoder_2=t5,
                        tokenizer_2=None, transformer=transformer).to(torch.bfloat16)
    shutil.rmtree(folder, ignore_errors=True)
    pipe.save_pretrained(folder)


def compare(name, folder, qtool, work, seed, steps, save, qtool_embeds):
    """diffusers' FluxPipeline (bf16, float32) and qtool verify on the same ids and latents; with
    `qtool_embeds` diffusers gets qtool's encoder outputs as prompt embeddings (the denoising loop
    judged alone), else it runs its own encoders on the ids (the whole pipeline)."""
    def cfg(component):
        with open(os.path.join(folder, component, "config.json")) as f:
            return json.load(f)

    clip_vocab, t5_vocab = cfg("text_encoder")["vocab_size"], cfg("text_encoder_2")["vocab_size"]
    vsf = 2 ** (len(cfg("vae")["block_out_channels"]) - 1)
    gen = torch.Generator().manual_seed(seed)
    rows = max(r for r in range(1, TOKENS + 1) if r * r <= TOKENS and TOKENS % r == 0)
    cols = TOKENS // rows
    height, width = rows * 2 * vsf, cols * 2 * vsf
    # CLIP ids: random tokens, then EOS (the vocabulary's last id) to the end, as the tokenizer pads.
    eos = clip_vocab - 1
    ids1 = torch.randint(0, eos, (1, TOKENS), generator=gen)
    ids1[0, 9:] = eos
    ids2 = torch.randint(0, t5_vocab, (1, TOKENS), generator=gen)
    latents = torch.randn(1, TOKENS, cfg("transformer")["in_channels"], generator=gen).to(torch.bfloat16)

    inputs = {"text_encoder.input_ids": ids1.contiguous(), "text_encoder_2.input_ids": ids2.contiguous(),
              "latents": latents.contiguous()}
    in_file = os.path.join(work, f"{name}-inputs.safetensors")
    save_file(inputs, in_file)
    plan = os.path.join(work, f"{name}-plan.json")
    run([qtool, "plan", folder, "--max-memory", "0=4GiB,cpu=4GiB", "--tokens", str(TOKENS), "-o", plan, "-q"])
    out_file = os.path.join(work, f"{name}-qtool.safetensors")
    run([qtool, "verify", folder, "--plan", plan, "--backend", "cpu", "--steps", "1", "--denoise-steps", str(steps),
         "--inputs", in_file, "--outputs", out_file, "-q", "-j", "2"])
    written = load_file(out_file)
    ours = written["images"]
    embeds = None
    if qtool_embeds:
        embeds = (written["text_encoder.pooler_output"], written["text_encoder_2.last_hidden_state"])
    bf16, _, sigmas = diffusers_latents(folder, torch.bfloat16, ids1, ids2, latents, height, width, steps, embeds)
    f32, _, _ = diffusers_latents(folder, torch.float32, ids1, ids2, latents, height, width, steps, embeds)
    print(f"  {name}: diffusers' latents {tuple(bf16.shape)} on a {rows}x{cols} grid (height {height}, width "
          f"{width}), sigmas {[round(s, 6) for s in sigmas]}, prompt embeddings "
          f"{'qtool' if qtool_embeds else 'its own encoders'}", flush=True)

    vs_fw = deviation(ours, bf16.float())
    noise = deviation(bf16.float(), f32.float())
    vs_f32 = deviation(ours, f32.float())
    ok = (math.isfinite(vs_fw[0]) and vs_fw[0] <= 2 * noise[0] and vs_fw[1] <= 2 * noise[1]
          and vs_f32[1] <= 1.25 * noise[1])
    print(f"  {name}: qtool vs diffusers (bf16), {steps} steps: max rel {vs_fw[0]:.5f}, rms rel {vs_fw[1]:.5f}; "
          f"diffusers' own noise (bf16 vs float32): max rel {noise[0]:.5f}, rms rel {noise[1]:.5f}; "
          f"qtool vs float32 rms rel {vs_f32[1]:.5f}: {'ok' if ok else 'FAIL'}", flush=True)
    if save:
        vectors = dict(inputs)
        vectors["images"] = bf16.float().contiguous()
        vectors["images.f32"] = f32.float().contiguous()
        save_file(vectors, os.path.join(folder, "vectors.safetensors"),
                  metadata={"seed": str(seed), "denoise_steps": str(steps), "tokens": str(TOKENS)})
        print(f"  saved {os.path.join(folder, 'vectors.safetensors')}", flush=True)
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qtool", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=20261205)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--save", default=None,
                    help="build the small pipeline in this folder and keep its vectors there (tests/runner/data/"
                         "flux_pipeline_small)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"pipeline_flux.py: seed {args.seed}, torch {torch.__version__}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    small = args.save or os.path.join(args.out, "flux_pipeline_small")
    build_small(small, args.seed)
    ok = compare("small", small, args.qtool, args.out, args.seed + 1, args.steps, bool(args.save), False)
    synth = os.path.join(args.out, "tiny-flux")
    shutil.rmtree(synth, ignore_errors=True)
    run([args.qtool, "synth", "--preset", "tiny-flux", "-o", synth, "-q"])
    ok = compare("tiny-flux", synth, args.qtool, args.out, args.seed + 2, args.steps, False, True) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
