"""Checks a qtool plan file against the checkpoint it was made for, independently of qtool:
reads every safetensors header itself, then verifies that every tensor is covered by exactly one
device_map key of its component, that no block (an item of a top-most ModuleList) is split across
locations, that every device's predicted peak adds up and stays within its budget, that offload
groups hold whole, 256-byte aligned tensors on the location the device map names, and that the
schedule runs every stored tensor exactly once.

    plan_check.py CHECKPOINT PLAN.json[:yes|:no] [PLAN.json[:yes|:no] ...]

`:yes` / `:no` after a plan also requires that it does / does not offload anything.
"""
import json
import os
import struct
import sys

QUANT_SUFFIXES = (".weight.absmax", ".weight.quant_map", ".weight.nested_absmax", ".weight.nested_quant_map")


def module_of(name):
    p = name.rfind(".weight.quant_state.")
    if p >= 0:
        return name[:p]
    for s in QUANT_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name.rsplit(".", 1)[0] if "." in name else ""


def read_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h


def component_tensors(folder):
    names = {}
    for fn in sorted(os.listdir(folder)):
        if fn.endswith(".safetensors"):
            for k, v in read_header(os.path.join(folder, fn)).items():
                names[k] = v["data_offsets"][1] - v["data_offsets"][0]
    return names


def components(ckpt):
    if os.path.isfile(ckpt):
        return {"": {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in read_header(ckpt).items()}}
    mi = os.path.join(ckpt, "model_index.json")
    if os.path.exists(mi):
        out = {}
        for name in json.load(open(mi)):
            d = os.path.join(ckpt, name)
            if not name.startswith("_") and os.path.isdir(d):
                t = component_tensors(d)
                if t:
                    out[name] = t
        return out
    return {"": component_tensors(ckpt)}


def blocks_of(names):
    """Top-most block of each tensor (None outside blocks)."""
    children, own = {}, {}
    for n in names:
        m = module_of(n)
        own.setdefault(m, []).append(n)
        parts = m.split(".") if m else []
        for i in range(len(parts)):
            children.setdefault(".".join(parts[:i]), set()).add(parts[i])
    def is_list(prefix):
        ch = children.get(prefix)
        return bool(ch) and all(c.isdigit() for c in ch) and prefix not in own
    out = {}
    for n in names:
        m = module_of(n)
        parts = m.split(".") if m else []
        block = None
        for i in range(len(parts)):
            if is_list(".".join(parts[:i])) and parts[i].isdigit():
                block = ".".join(parts[: i + 1])
                break
        out[n] = block
    return out


def covers(key, name):
    return key == "" or key == name or name.startswith(key + ".")


def main():
    ckpt = sys.argv[1]
    comps = components(ckpt)
    failed = False
    for arg in sys.argv[2:]:
        expect = None
        if arg.endswith(":yes") or arg.endswith(":no"):
            arg, flag = arg.rsplit(":", 1)
            expect = flag == "yes"
        errors = check(comps, json.load(open(arg)), expect)
        for e in errors[:20]:
            print(f"FAIL: {arg}: {e}")
        failed = failed or bool(errors)
    if failed:
        sys.exit(1)
    print(f"ok: {len(sys.argv) - 2} plan(s), {sum(len(t) for t in comps.values())} tensors")


def check(comps, plan, expect):
    errors = []
    if plan.get("format") != "qtool-plan" or plan.get("version") not in (2, 3):
        return ["not a version-2 or version-3 qtool plan"]
    if (plan["version"] == 3) != ("phases" in plan):
        return ["a version-3 plan has phases, a version-2 plan none"]
    pcomps = {c["name"]: c for c in plan["components"]}
    if set(comps) != set(pcomps):
        errors.append(f"components differ: checkpoint {sorted(comps)} plan {sorted(pcomps)}")
    loc = {}
    for cname, tensors in comps.items():
        c = pcomps.get(cname)
        if c is None:
            continue
        # Keys are the loader's module names; "checkpoint_prefix" (transformers 5's CLIPTextModel has no
        # text_model level) maps them back onto the checkpoint's tensor names.
        pre = c.get("checkpoint_prefix")
        keys = [((pre + "." + k if k else pre) if pre else k, v) for k, v in c["device_map"].items()]
        if pre and not all(n == pre or n.startswith(pre + ".") for n in tensors):
            errors.append(f"{cname}: checkpoint_prefix {pre!r} but not every tensor has it")
        aliases = {t["alias"] for t in c["tied"]}
        used = set()
        for n in tensors:
            hits = [(k, v) for k, v in keys if covers(k, n)]
            if len(hits) != 1:
                errors.append(f"{cname}: tensor {n} covered by {len(hits)} keys")
                continue
            used.add(hits[0][0])
            loc[(cname, n)] = hits[0][1]
        for k, _ in keys:
            if k not in used and not any(covers(k, a) for a in aliases):
                errors.append(f"{cname}: key {k!r} covers no tensor")
        per_block = {}
        for n, b in blocks_of(list(tensors)).items():
            if b is not None and (cname, n) in loc:
                per_block.setdefault(b, set()).add(json.dumps(loc[(cname, n)]))
        for b, ls in per_block.items():
            if len(ls) > 1:
                errors.append(f"{cname}: block {b} split across {sorted(ls)}")
    for d in plan["devices"]:
        total = d["arena_bytes"] + sum(r["bytes"] for r in d["reserve"])
        if total != d["predicted_peak"]:
            errors.append(f"{d['device']}: peak {d['predicted_peak']} != arena + reserve {total}")
        if d["budget"] is not None and d["device"] != "disk" and d["predicted_peak"] > d["budget"]:
            errors.append(f"{d['device']}: peak {d['predicted_peak']} over budget {d['budget']}")
    names = [c["name"] for c in plan["components"]]
    for g in plan["groups"]:
        cname = names[g["component"]]
        end = 0
        for t in g["tensors"]:
            if t["arena_offset"] % 256 or t["arena_offset"] < end:
                errors.append(f"group {g['id']}: tensor {t['name']} misaligned or overlapping")
            end = t["arena_offset"] + t["nbytes"]
            if comps.get(cname, {}).get(t["name"]) != t["nbytes"]:
                errors.append(f"group {g['id']}: tensor {t['name']} size {t['nbytes']} differs from the checkpoint")
            if loc.get((cname, t["name"])) != g["target"]:
                errors.append(f"group {g['id']}: tensor {t['name']} target {g['target']} but device map {loc.get((cname, t['name']))}")
        if end > g["arena_bytes"]:
            errors.append(f"group {g['id']}: tensors end beyond arena_bytes")
    runs = {}
    for s in plan["schedule"]:
        for t in s["tensors"]:
            runs[(names[s["component"]], t)] = runs.get((names[s["component"]], t), 0) + 1
    for cname, tensors in comps.items():
        aliases = {t["alias"] for t in pcomps.get(cname, {"tied": []})["tied"]}
        for n in tensors:
            want = 0 if n in aliases else 1
            if runs.get((cname, n), 0) != want:
                errors.append(f"{cname}: tensor {n} runs {runs.get((cname, n), 0)} times in the schedule")
    if "phases" in plan:
        errors += check_phases(plan)
    offloaded = any(not isinstance(v, int) for v in loc.values())
    if expect is not None and offloaded != expect:
        errors.append(f"expected offload {expect}, plan offloads {offloaded}")
    return errors


def check_phases(plan):
    """A plan by phase: every component in one phase, the phases' steps in order, each phase's
    peak per GPU the sum of its parts and within the budget, the job's time the sum of its parts."""
    errors = []
    names = [c["name"] for c in plan["components"]]
    budgets = {d["device"]: d["budget"] for d in plan["devices"]}
    streamed = {names[g["component"]] for g in plan["groups"]}
    seen, nxt, job = [], 0, plan["job_load_s"]
    for ph in plan["phases"]:
        b, e = ph["schedule"]
        if b != nxt or e < b:
            errors.append(f"phase {ph['name']}: schedule [{b}, {e}) does not follow step {nxt}")
        nxt = e
        mine = {c["name"] for c in ph["components"]}
        seen += list(mine)
        for s in plan["schedule"][b:e]:
            if names[s["component"]] not in mine:
                errors.append(f"phase {ph['name']}: a step of {names[s['component']]}")
        for c in ph["components"]:
            if (c["mode"] == "streamed") != (c["name"] in streamed):
                errors.append(f"phase {ph['name']}: {c['name']} is {c['mode']}, groups: {c['name'] in streamed}")
            if not c["reason"]:
                errors.append(f"phase {ph['name']}: {c['name']} has no reason")
        for d in ph["devices"]:
            total = d["resident_bytes"] + d["arena_bytes"] + sum(r["bytes"] for r in d["reserve"])
            if total != d["predicted_peak"] or d["predicted_peak"] > budgets[d["device"]]:
                errors.append(f"phase {ph['name']}: {d['device']} peak {d['predicted_peak']} (parts {total}, "
                              f"budget {budgets[d['device']]})")
        want = ph["load_s"] + ph["repeat"] * ph["step_s"]
        if abs(ph["time_s"] - want) > 1e-9 * max(1.0, want):
            errors.append(f"phase {ph['name']}: time {ph['time_s']} != {want}")
        job += ph["time_s"]
    if nxt != len(plan["schedule"]):
        errors.append("steps in no phase")
    if sorted(seen) != sorted(names):
        errors.append(f"components by phase {sorted(seen)} != {sorted(names)}")
    if abs(plan["predicted_job_s"] - job) > 1e-9 * max(1.0, job):
        errors.append(f"predicted_job_s {plan['predicted_job_s']} != {job}")
    return errors


if __name__ == "__main__":
    main()
