#!/usr/bin/env python3
"""Checks on qtool quantize / dequantize outputs, with the standard library only (the e2e tests
run where no torch is installed).

  quantize_check.py quantized  IN OUT CONFIG REPORT QTOOL_VERSION
  quantize_check.py dequantized ORIG QUANTIZED DEQ
  quantize_check.py same-tree  A B        (every file byte-identical)
"""
import fnmatch
import json
import os
import struct
import sys

SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
         "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    meta = h.pop("__metadata__", {})
    return h, meta


def weights_of(folder):
    """{tensor: (file, entry)} and {file: metadata} of the .safetensors files directly in folder."""
    tensors, metas = {}, {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        h, meta = header(os.path.join(folder, name))
        metas[name] = meta
        for t, e in h.items():
            if t in tensors:
                fail("%s: tensor %s twice" % (folder, t))
            tensors[t] = (name, e)
    return tensors, metas


def components(root):
    """{component name: folder} of a model folder ("") or a pipeline folder."""
    mi = os.path.join(root, "model_index.json")
    if not os.path.exists(mi):
        return {"": root}
    out = {}
    for k, v in json.load(open(mi)).items():
        d = os.path.join(root, k)
        if isinstance(v, list) and os.path.isdir(d) and any(f.endswith(".safetensors") for f in os.listdir(d)):
            out[k] = d
    return out


def other_files(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if ".safetensors" in f or f == "config.json":
                continue
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def is_linear_weight(name, entry, model_type=None):
    """qtool's rule (config.hpp: linear_exclusion, and T5's "wo" that transformers keeps in full
    precision), restated."""
    if not name.endswith(".weight") or len(entry["shape"]) != 2 or 0 in entry["shape"]:
        return False
    if entry["dtype"] not in ("BF16", "F16", "F32"):
        return False
    leaf = name[: -len(".weight")].split(".")[-1]
    if model_type in ("t5", "mt5", "umt5") and leaf == "wo":
        return False
    for p in ("embed_tokens", "embed_*", "shared", "wte", "wpe", "*embedding*", "relative_attention_bias", "*norm*",
              "ln_*", "lm_head"):
        if fnmatch.fnmatchcase(leaf, p):
            return False
    return True


def is_embedding(module):
    """An embedding or a norm by its last name part (not a Linear)."""
    leaf = module.split(".")[-1]
    return any(fnmatch.fnmatchcase(leaf, p) for p in ("embed_tokens", "embed_*", "shared", "wte", "wpe", "*embedding*",
                                                      "relative_attention_bias", "*norm*", "ln_*"))


def pattern_matches(pattern, module):
    parts = module.split(".")
    cands = [module] + [".".join(parts[:i]) for i in range(1, len(parts))] + [".".join(parts[i:]) for i in range(1, len(parts))]
    return any(fnmatch.fnmatchcase(c, pattern) for c in cands)


def scheme_for(config, comp, all_components):
    mapping = config.get("quant_mapping", {})
    if comp in mapping:
        e = mapping[comp]
        return e["scheme"], e, config.get("modules_to_not_convert", []) + e.get("modules_to_not_convert", [])
    listed = config.get("components_to_quantize", all_components)
    if "quant_backend" in config and comp in listed:
        return config["quant_backend"], config.get("quant_kwargs", {}), config.get("modules_to_not_convert", [])
    return None, None, None


def check_quantized(inp, out, config_path, report_path, version):
    config = json.load(open(config_path))
    report = json.load(open(report_path))
    if report["command"] != "quantize":
        fail("report command %r" % report["command"])
    in_comps, out_comps = components(inp), components(out)
    if sorted(in_comps) != sorted(out_comps):
        fail("components %s != %s" % (sorted(in_comps), sorted(out_comps)))
    if other_files(inp) != other_files(out):
        fail("non-weight files differ")
    by_name = {c["name"]: c for c in report["components"]}
    n_quantized_total = 0
    for comp, ind in in_comps.items():
        outd = out_comps[comp]
        tin, _ = weights_of(ind)
        tout, metas = weights_of(outd)
        scheme, kwargs, patterns = scheme_for(config, comp, list(in_comps))
        scheme = {"fp8": "fp8_e4m3"}.get(scheme, scheme)
        rc = by_name[comp]
        for fname, meta in metas.items():
            if meta.get("format") != "pt" or meta.get("qtool_version") != version or meta.get("qtool_command") != "quantize":
                fail("%s/%s: metadata %s" % (comp, fname, meta))
            if meta.get("qtool_scheme") != (scheme or "none"):
                fail("%s/%s: qtool_scheme %s, expected %s" % (comp, fname, meta.get("qtool_scheme"), scheme))
        cfg_in = json.load(open(os.path.join(ind, "config.json")))
        cfg_out = json.load(open(os.path.join(outd, "config.json")))
        qc = cfg_out.pop("quantization_config", None)
        if cfg_out != cfg_in:
            fail("%s: config.json changed beyond quantization_config" % comp)
        if scheme is None:
            if qc is not None or rc["scheme"] is not None:
                fail("%s: not in the config but quantized" % comp)
            for t, (f, e) in tin.items():
                if t not in tout or tout[t][1]["dtype"] != e["dtype"] or tout[t][1]["shape"] != e["shape"]:
                    fail("%s: %s changed" % (comp, t))
            continue
        if rc["scheme"] != scheme:
            fail("%s: report scheme %s, expected %s" % (comp, rc["scheme"], scheme))
        expected_out = set()
        skipped = []
        n_quant = 0
        for t, (f, e) in tin.items():
            m = t[: -len(".weight")] if t.endswith(".weight") else None
            if m is not None and is_linear_weight(t, e, cfg_in.get("model_type")) and \
                    not any(pattern_matches(p, m) for p in patterns):
                n_quant += 1
                w_file = tout[t][0]
                if scheme == "int8":
                    parts = {t: "I8", m + ".SCB": "F32", m + ".weight_format": "U8"}
                elif scheme.startswith("fp8"):
                    parts = {t: "F8_E4M3" if scheme == "fp8_e4m3" else "F8_E5M2", m + ".weight_scale": e["dtype"]}
                else:
                    dq = bool(kwargs.get("double_quant", False))
                    parts = {t: "U8", t + ".absmax": "U8" if dq else "F32", t + ".quant_map": "F32",
                             t + ".quant_state.bitsandbytes__" + scheme: "U8"}
                    if dq:
                        parts[t + ".nested_absmax"] = "F32"
                        parts[t + ".nested_quant_map"] = "F32"
                for p, dt in parts.items():
                    if p not in tout:
                        fail("%s: %s missing" % (comp, p))
                    if tout[p][1]["dtype"] != dt:
                        fail("%s: %s is %s, expected %s" % (comp, p, tout[p][1]["dtype"], dt))
                    if tout[p][0] != w_file:
                        fail("%s: %s in %s, its weight in %s" % (comp, p, tout[p][0], w_file))
                    expected_out.add(p)
            else:
                if m is not None and len(e["shape"]) == 2:
                    skipped.append(m)
                if t not in tout or tout[t][1] != dict(tout[t][1], dtype=e["dtype"], shape=e["shape"]):
                    fail("%s: %s not copied as it was" % (comp, t))
                expected_out.add(t)
        if set(tout) != expected_out:
            fail("%s: unexpected tensors %s" % (comp, sorted(set(tout) ^ expected_out)[:5]))
        if rc["tensors_converted"] != n_quant or n_quant == 0:
            fail("%s: report says %d converted, expected %d" % (comp, rc["tensors_converted"], n_quant))
        n_quantized_total += n_quant
        if qc is None:
            fail("%s: no quantization_config" % comp)
        listed = qc.get("ignore") if scheme.startswith("fp8") else qc.get("llm_int8_skip_modules")
        if scheme.startswith("fp8"):
            if qc["quant_method"] != "compressed-tensors" or qc["format"] != "naive-quantized":
                fail("%s: quantization_config %s" % (comp, qc))
            # compressed-tensors' ignore list holds Linear modules only: no embeddings.
            skipped = [m for m in skipped if not is_embedding(m)]
            for m in listed:
                if is_embedding(m):
                    fail("%s: embedding %s in the ignore list (%s)" % (comp, m, listed))
        else:
            if qc["quant_method"] != "bitsandbytes" or qc["load_in_4bit"] != (scheme in ("nf4", "fp4")) or \
                    qc["load_in_8bit"] != (scheme == "int8"):
                fail("%s: quantization_config %s" % (comp, qc))
        for m in skipped:
            if m not in listed:
                fail("%s: unquantized %s not listed for the loader (%s)" % (comp, m, listed))
        # Error figures are present and sane for every converted tensor.
        for t in report["tensors"]:
            if t["component"] == comp and t["scheme"] is not None:
                if not (0 < t["rel_rms"] < 0.3 and t["sqnr_db"] > 10):
                    fail("%s: %s error %s" % (comp, t["name"], t))
    if report["totals"]["tensors_converted"] != n_quantized_total:
        fail("report totals %s" % report["totals"])
    print("ok: %d tensors quantized in %d components" % (n_quantized_total, len(in_comps)))


def check_dequantized(orig, quantized, deq):
    for comp, od in components(orig).items():
        dd = components(deq)[comp]
        tin, _ = weights_of(od)
        tdq, metas = weights_of(dd)
        if sorted(tin) != sorted(tdq):
            fail("%s: tensor names differ after dequantize" % comp)
        for t, (f, e) in tin.items():
            if tdq[t][1]["dtype"] != e["dtype"] or tdq[t][1]["shape"] != e["shape"]:
                fail("%s: %s is %s %s, was %s %s" % (comp, t, tdq[t][1]["dtype"], tdq[t][1]["shape"], e["dtype"], e["shape"]))
        cfg = json.load(open(os.path.join(dd, "config.json")))
        if "quantization_config" in cfg:
            fail("%s: quantization_config left" % comp)
        if cfg != json.load(open(os.path.join(od, "config.json"))):
            fail("%s: config.json differs from the original" % comp)
        for meta in metas.values():
            if meta.get("qtool_command") != "dequantize":
                fail("%s: metadata %s" % (comp, meta))
    if other_files(orig) != other_files(deq):
        fail("non-weight files differ")
    print("ok: dequantized")


def same_tree(a, b):
    fa, fb = {}, {}
    for root, out in ((a, fa), (b, fb)):
        for dirpath, _, files in os.walk(root):
            for f in files:
                p = os.path.join(dirpath, f)
                out[os.path.relpath(p, root)] = open(p, "rb").read()
    if fa.keys() != fb.keys():
        fail("file lists differ: %s" % sorted(set(fa) ^ set(fb)))
    for k in fa:
        if fa[k] != fb[k]:
            fail("%s differs" % k)
    print("ok: %d files identical" % len(fa))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "quantized":
        check_quantized(*sys.argv[2:7])
    elif cmd == "dequantized":
        check_dequantized(*sys.argv[2:5])
    elif cmd == "same-tree":
        same_tree(*sys.argv[2:4])
    else:
        fail("unknown command " + cmd)
