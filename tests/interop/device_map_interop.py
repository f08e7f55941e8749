#!/usr/bin/env python3
"""The device maps of `qtool plan` are accepted by the loaders' from_pretrained(device_map=...).

For every component of the presets (tiny-flux: CLIPTextModel, T5EncoderModel,
FluxTransformer2DModel, AutoencoderKL; flux, llama and llama-tied at a small --scale), written by
`qtool synth`: the component folder is planned with one GPU whose budget holds about half of it
and a host budget for a quarter (the rest goes to disk), so its device map mixes GPU, cpu and disk
keys. On this CPU-only machine the map is loaded with every GPU index replaced by "cpu" and every
"cpu" by "disk" (an offload folder), which keeps two devices, so that accelerate's dispatch runs its
check_device_map: every key must name a submodule of the model the loader builds, and every
parameter must be covered. transformers components load with transformers (5.x: CLIPTextModel
has no `text_model` level; its checkpoint's `text_model.*` keys load into the root), diffusers
components with diffusers. Any "device_map keys do not match any submodules" warning fails. The
transformers models' outputs on random token ids (from the printed seed) must equal those of the
same model loaded without a device map, bit for bit: the map placed every module where it belongs.
Run under transformers 4.x (PYTHONPATH to a 4.x install), a CLIPTextModel map as written must be
refused and, with the `text_model.` prefix the plan's notes tell 4.x users to add, accepted.

    device_map_interop.py QTOOL WORKDIR
"""
import json
import os
import random
import re
import shutil
import subprocess
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5

HERE = os.path.dirname(os.path.abspath(__file__))
FAILS = []


def check(cond, msg):
    print(("ok   " if cond else "FAIL ") + msg, flush=True)
    if not cond:
        FAILS.append(msg)


def folder_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))


def plan_component(qtool, comp_dir, work):
    """A plan whose device map mixes GPU and offloaded keys: one GPU with room for about half the
    weights above the planner's reserve (more when the planner streams everything at that budget)
    and a host budget for a quarter (each raised to the smallest the planner accepts when that is
    more)."""
    profile = os.path.join(HERE, "plan_accelerate.json")
    total = folder_bytes(comp_dir)
    plan_path = os.path.join(work, "plan.json")
    # The smallest GPU budget the planner accepts (its reserve: context, the forward's activations,
    # the streaming ring).
    r = subprocess.run([qtool, "plan", comp_dir, "--max-memory", "0=1024,cpu=%d" % (total // 4), "--tokens", "1",
                        "--device-profile", profile, "-o", plan_path, "-q"], capture_output=True, text=True)
    m = re.search(r"Smallest budget that fits: (?:--max-memory )?0=(\d+)", r.stderr)
    floor = int(m.group(1)) if m else 0
    # A fraction of the weights alone first (models whose weights dwarf the reserve), then on top of
    # the reserve (tiny models, whose reserve is as large as their weights).
    gpu_budgets = [int(total * f) for f in (0.5, 0.65, 0.8, 0.9)] + [floor + int(total * f) for f in (0.1, 0.25, 0.5)]
    for gpu_budget in gpu_budgets:
        budget = {"0": gpu_budget, "cpu": total // 4}
        for _ in range(6):
            r = subprocess.run([qtool, "plan", comp_dir, "--max-memory",
                                ",".join("%s=%d" % kv for kv in budget.items()), "--tokens", "1",
                                "--device-profile", profile, "-o", plan_path, "-q"], capture_output=True, text=True)
            if r.returncode == 0:
                break
            m = re.search(r"Smallest budget that fits: (?:--max-memory )?([0-9a-z]+)=(\d+)", r.stderr)
            if not m:
                raise RuntimeError("qtool plan failed: " + r.stderr)
            budget[m.group(1)] = int(m.group(2))
        else:
            raise RuntimeError("no budget found: " + r.stderr)
        plan = json.load(open(plan_path))
        assert len(plan["components"]) == 1
        values = plan["components"][0]["device_map"].values()
        if any(isinstance(v, int) for v in values) and any(not isinstance(v, int) for v in values):
            break
    return plan["components"][0], plan["notes"]


def cpu_only(device_map):
    return {k: ("cpu" if isinstance(v, int) else "disk") for k, v in device_map.items()}


def load(cls_name, comp_dir, device_map, offload):
    if hasattr(transformers, cls_name):
        cls = getattr(transformers, cls_name)
        kw = {"torch_dtype" if TRANSFORMERS_4 else "dtype": torch.bfloat16}
    else:
        import diffusers
        cls = getattr(diffusers, cls_name)
        kw = {"torch_dtype": torch.bfloat16}
    if device_map is not None:
        kw.update(device_map=device_map, offload_folder=offload)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = cls.from_pretrained(comp_dir, **kw)
    return model, [str(w.message) for w in caught]


def outputs(model, cls_name, ids):
    with torch.no_grad():
        if cls_name == "LlamaForCausalLM":
            return model(input_ids=ids).logits
        if cls_name in ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"):
            return model(input_ids=ids).last_hidden_state
    return None


def main():
    qtool, work = sys.argv[1], sys.argv[2]
    seed = int(os.environ.get("QTOOL_TEST_SEED", random.randrange(1 << 30)))
    print("QTOOL_TEST_SEED=%d" % seed)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    print("transformers", transformers.__version__)
    n_loaded = 0
    for preset, scale in (("tiny-flux", None), ("flux", 0.02), ("llama", 0.05), ("llama-tied", 0.05)):
        ck = os.path.join(work, preset)
        cmd = [qtool, "synth", "--preset", preset, "--seed", str(seed), "-o", ck, "-q"]
        if scale:
            cmd += ["--scale", str(scale)]
        subprocess.run(cmd, check=True)
        if os.path.exists(os.path.join(ck, "model_index.json")):
            comps = [c for c in sorted(os.listdir(ck))
                     if os.path.isdir(os.path.join(ck, c)) and any(f.endswith(".safetensors")
                                                                  for f in os.listdir(os.path.join(ck, c)))]
        else:
            comps = [""]
        for comp in comps:
            comp_dir = os.path.join(ck, comp)
            cfg = json.load(open(os.path.join(comp_dir, "config.json")))
            cls_name = (cfg.get("architectures") or [cfg.get("_class_name")])[0]
            label = "%s/%s (%s)" % (preset, comp or "model", cls_name)
            cp, cp_notes = plan_component(qtool, comp_dir, work)
            dm = cpu_only(cp["device_map"])
            kinds = sorted({("gpu" if isinstance(v, int) else v) for v in cp["device_map"].values()})
            if len(set(dm.values())) < 2:
                check(False, "%s: the plan keeps everything in one place (%s); the map would not be checked"
                      % (label, kinds))
                continue
            offload = os.path.join(work, "offload")
            prefix = cp.get("checkpoint_prefix")
            if TRANSFORMERS_4 and prefix:
                # transformers 4.x keeps the level transformers 5 drops: the plan's note says to put the
                # prefix back; the keys as written must be refused there, or the note would be wrong.
                shutil.rmtree(offload, ignore_errors=True)
                try:
                    load(cls_name, comp_dir, dm, offload)
                    refused = "accepted"
                except Exception as e:
                    refused = str(e)
                check(refused != "accepted" and "import" not in refused, "%s: transformers 4 refuses the "
                      "transformers 5 keys (%s)" % (label, refused[:150]))
                check(any(prefix in n for n in cp_notes), "%s: the plan's notes say what 4.x users do" % label)
                dm = {(prefix + "." + k if k else prefix): v for k, v in dm.items()}
            shutil.rmtree(offload, ignore_errors=True)
            try:
                model, caught = load(cls_name, comp_dir, dm, offload)
            except Exception as e:  # the loader refused the map
                check(False, "%s: from_pretrained refused the plan's device_map %s: %s"
                      % (label, list(dm)[:4], str(e)[:300]))
                continue
            bad = [w for w in caught if "device_map" in w and "do not match" in w]
            check(not bad, "%s: %d device_map keys (%s), e.g. %s, accepted%s"
                  % (label, len(dm), "+".join(kinds), list(dm)[:3], (": " + bad[0][:200]) if bad else ""))
            n_loaded += 1
            torch.manual_seed(seed)
            vocab = cfg.get("vocab_size", 1000)
            ids = torch.randint(0, min(vocab, 1000), (2, 7))
            try:
                got = outputs(model, cls_name, ids)
            except Exception as e:
                check(False, "%s: the model loaded with the device map fails to run: %s" % (label, str(e)[:200]))
                continue
            if got is not None:
                plain, _ = load(cls_name, comp_dir, None, None)
                want = outputs(plain, cls_name, ids)
                check(torch.equal(got, want), "%s: outputs with the device map equal the plain load's (max diff %.3g)"
                      % (label, (got.float() - want.float()).abs().max().item()))
            del model
    check(n_loaded >= 10, "%d components loaded with their plan's device map" % n_loaded)
    if FAILS:
        print("%d check(s) failed" % len(FAILS))
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
