"""qtool synth against the reference libraries (label "interop").

  synth_interop.py transformers QTOOL WORK
      The tiny preset loads with transformers' LlamaForCausalLM.from_pretrained with no missing,
      unexpected or mismatched keys and gives finite logits; a scaled llama-tied loads with its
      embeddings tied; the tiny-flux text encoders and tokenizers load with their transformers
      classes. At scale 1 (from `qtool synth --dry-run --json`, nothing written), the tensor
      names and shapes of llama, llama-tied, CLIP-L and T5-XXL equal those of the transformers
      models built on the meta device from the emitted config.json.
  synth_interop.py diffusers QTOOL WORK
      The same for diffusers (exit 77, skipped, when diffusers is not installed): full-scale
      FluxTransformer2DModel and AutoencoderKL names and shapes; tiny-flux and a scaled flux
      load component by component with no key problems, and FluxPipeline.from_pretrained runs
      one denoising step on tiny-flux to a finite image.
"""
import json
import math
import os
import random
import shutil
import subprocess
import sys


def run_qtool(qtool, *args):
    r = subprocess.run([qtool, "synth", *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"qtool synth {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r.stdout


def synth(qtool, work, name, *args, seed):
    out = os.path.join(work, name)
    run_qtool(qtool, *args, "--seed", str(seed), "--force", "-o", out)
    return out


def dry_run(qtool, preset, scale=1.0):
    d = json.loads(run_qtool(qtool, "--preset", preset, "--scale", str(scale), "--dry-run", "--json"))
    return {c["name"]: c for c in d["components"]}


def shapes_of(component):
    return {t["name"]: list(t["shape"]) for t in component["tensors"]}


def meta_shapes(model):
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def same_shapes(label, ours, ref):
    missing = sorted(set(ref) - set(ours))
    extra = sorted(set(ours) - set(ref))
    wrong = sorted(k for k in set(ours) & set(ref) if ours[k] != ref[k])
    if missing or extra or wrong:
        sys.exit(f"{label}: missing {missing[:5]} ({len(missing)}), extra {extra[:5]} ({len(extra)}), "
                 f"wrong shapes {[(k, ours[k], ref[k]) for k in wrong[:5]]} ({len(wrong)})")
    n = sum(math.prod(s) for s in ours.values())
    print(f"{label}: {len(ours)} tensors, {n} parameters match the reference definition")


def check_loading_info(label, info):
    problems = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs") if info.get(k)}
    if problems:
        sys.exit(f"{label}: loading problems {problems}")


def transformers_part(qtool, work, seed):
    import torch
    from accelerate import init_empty_weights
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, LlamaConfig, LlamaForCausalLM,
                              T5Config, T5EncoderModel, T5TokenizerFast)

    # tiny: loads as LlamaForCausalLM, computes finite logits.
    for dtype in ("bf16", "f32"):
        path = synth(qtool, work, f"tiny-{dtype}", "--preset", "tiny", "--dtype", dtype, seed=seed)
        model, info = LlamaForCausalLM.from_pretrained(path, output_loading_info=True)
        check_loading_info(f"tiny {dtype}", info)
        cfg = json.load(open(os.path.join(path, "config.json")))
        assert model.config.hidden_size == cfg["hidden_size"] and model.config.vocab_size == cfg["vocab_size"]
        want = torch.bfloat16 if dtype == "bf16" else torch.float32
        assert model.model.embed_tokens.weight.dtype == want, model.model.embed_tokens.weight.dtype
        ids = torch.randint(0, cfg["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (2, 12, cfg["vocab_size"]), logits.shape
        assert torch.isfinite(logits.float()).all(), "non-finite logits"
        print(f"tiny {dtype}: LlamaForCausalLM loaded, logits {tuple(logits.shape)} finite")

    # llama-tied, scaled: tied embeddings, no lm_head tensor in the files.
    path = synth(qtool, work, "llama-tied", "--preset", "llama-tied", "--scale", "0.05", seed=seed)
    model, info = LlamaForCausalLM.from_pretrained(path, output_loading_info=True)
    check_loading_info("llama-tied 0.05", info)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"
    print("llama-tied 0.05: loaded with tied embeddings")

    # Full-scale names and shapes against the definitions, built on the meta device.
    for preset in ("llama", "llama-tied"):
        c = dry_run(qtool, preset)[""]
        with init_empty_weights():
            ref = meta_shapes(LlamaForCausalLM(LlamaConfig(**c["json_files"]["config.json"])))
        if c["json_files"]["config.json"]["tie_word_embeddings"]:
            ref.pop("lm_head.weight")  # tied: saved once, as embed_tokens
        same_shapes(f"{preset} (scale 1)", shapes_of(c), ref)
    for scale in (1.0, 0.1):
        flux = dry_run(qtool, "flux", scale)
        with init_empty_weights():
            t5 = meta_shapes(T5EncoderModel(T5Config(**flux["text_encoder_2"]["json_files"]["config.json"])))
            clip = meta_shapes(CLIPTextModel(CLIPTextConfig(**flux["text_encoder"]["json_files"]["config.json"])))
        t5.pop("encoder.embed_tokens.weight")  # tied to shared.weight, not saved
        same_shapes(f"T5EncoderModel (scale {scale})", shapes_of(flux["text_encoder_2"]), t5)
        # Hub checkpoints keep CLIPTextTransformer under text_model.
        ours = {k.removeprefix("text_model."): v for k, v in shapes_of(flux["text_encoder"]).items()}
        same_shapes(f"CLIPTextModel (scale {scale})", ours, clip)

    # tiny-flux's transformers components load from their folders.
    root = synth(qtool, work, "tiny-flux", "--preset", "tiny-flux", seed=seed)
    for sub, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", T5EncoderModel)):
        model, info = cls.from_pretrained(os.path.join(root, sub), output_loading_info=True)
        check_loading_info(f"tiny-flux {sub}", info)
        print(f"tiny-flux {sub}: {cls.__name__} loaded")
    clip_tok = CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer"))
    t5_tok = T5TokenizerFast.from_pretrained(os.path.join(root, "tokenizer_2"))
    for label, tok, sub in (("tokenizer", clip_tok, "text_encoder"), ("tokenizer_2", t5_tok, "text_encoder_2")):
        vocab = json.load(open(os.path.join(root, sub, "config.json")))["vocab_size"]
        ids = tok("A photo of a cat, 35mm.")["input_ids"]
        assert len(ids) > 5 and max(ids) < vocab, (label, ids)
        assert tok.unk_token_id not in ids[1:-1] or label == "tokenizer", (label, ids)
        print(f"tiny-flux {label}: {type(tok).__name__} encodes to {ids}")


def diffusers_part(qtool, work, seed):
    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("diffusers is not installed: skipped")
        sys.exit(77)
    import numpy as np
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

    for scale in (1.0, 0.1):
        flux = dry_run(qtool, "flux", scale)
        for name, cls in (("transformer", FluxTransformer2DModel), ("vae", AutoencoderKL)):
            cfg = {k: v for k, v in flux[name]["json_files"]["config.json"].items() if not k.startswith("_")}
            with init_empty_weights():
                ref = meta_shapes(cls(**cfg))
            same_shapes(f"{cls.__name__} (scale {scale})", shapes_of(flux[name]), ref)

    for label, args in (("tiny-flux", ["--preset", "tiny-flux"]), ("flux-0.03", ["--preset", "flux", "--scale", "0.03"])):
        root = synth(qtool, work, label, *args, seed=seed)
        for sub, cls in (("transformer", FluxTransformer2DModel), ("vae", AutoencoderKL)):
            model, info = cls.from_pretrained(os.path.join(root, sub), output_loading_info=True)
            check_loading_info(f"{label} {sub}", info)
            print(f"{label} {sub}: {cls.__name__} loaded")

    root = os.path.join(work, "tiny-flux")
    pipe = FluxPipeline.from_pretrained(root, torch_dtype=torch.float32)
    image = pipe(prompt="a photo of a cat", height=64, width=64, num_inference_steps=1, guidance_scale=3.5,
                 max_sequence_length=16, output_type="np",
                 generator=torch.Generator().manual_seed(seed)).images
    assert image.shape == (1, 64, 64, 3), image.shape
    assert np.isfinite(image).all(), "non-finite image"
    print(f"tiny-flux: FluxPipeline ran one step to a finite {image.shape} image")


def main():
    part, qtool, work = sys.argv[1], sys.argv[2], sys.argv[3]
    seed = int(os.environ.get("QTOOL_TEST_SEED", random.randrange(1 << 30)))
    print("QTOOL_TEST_SEED", seed)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        {"transformers": transformers_part, "diffusers": diffusers_part}[part](qtool, work, seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("ok")


if __name__ == "__main__":
    main()
