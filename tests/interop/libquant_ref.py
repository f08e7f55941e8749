"""Reference outputs of qtool's quant schemes, computed by the real packages on the CPU.

int8      bitsandbytes.functional.int8_vectorwise_quant on the weight cast to float16
fp8_e4m3  compressed-tensors' calculate_qparams + quantize (float, 8 bits, channel or tensor)
fp8_e5m2  the same algorithm with torch's float8_e5m2 cast (compressed-tensors has no e5m2 path)
nf4, fp4  bitsandbytes.functional.quantize_4bit (compress_statistics for double quant)

Each function returns {part: bytes} with the parts qtool writes (libquant/quant.hpp, Part), and for
4-bit the quant_state dict that bitsandbytes would serialise.
"""
import json
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore")

TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def tensor_bytes(t: torch.Tensor) -> bytes:
    # A fresh tensor has standard strides (a [1, 1] result may carry odd ones that view() rejects).
    u = torch.empty(t.shape, dtype=t.dtype)
    u.copy_(t)
    return u.reshape(-1).view(torch.uint8).numpy().tobytes() if u.numel() else b""


def int8_ref(w: torch.Tensor) -> dict:
    import bitsandbytes.functional as F

    cb, scb, _ = F.int8_vectorwise_quant(w.contiguous().to(torch.float16))
    return {"weight": tensor_bytes(cb), "scale": tensor_bytes(scb.float()), "weight_format": b"\x00",
            "dequant": tensor_bytes(F.int8_vectorwise_dequant(cb, scb).float())}


def fp8_ref(w: torch.Tensor, e5m2: bool, per_tensor: bool) -> dict:
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    if per_tensor:
        min_vals, max_vals = w.amin().reshape(1), w.amax().reshape(1)
        strategy = "tensor"
    else:
        min_vals, max_vals = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        strategy = "channel"
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy)
    if not e5m2:
        scale, zp = calculate_qparams(min_vals, max_vals, args)
        q = quantize(w, scale, zp, args, dtype=torch.float8_e4m3fn)
    else:
        fmax = torch.finfo(torch.float8_e5m2).max
        amax = torch.max(min_vals.abs(), max_vals.abs())
        scale = amax / fmax
        scale = torch.where(scale == 0, torch.tensor(torch.finfo(w.dtype).eps, dtype=w.dtype), scale)
        # As compressed-tensors' _quantize: the quotient plus the (zero) zero point, clamped, cast.
        scaled = w / scale
        scaled += torch.zeros_like(scale)
        q = torch.clamp(scaled, -fmax, fmax).to(torch.float8_e5m2)
    scale = scale.reshape(1) if per_tensor else scale.reshape(-1, 1)
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    # compressed-tensors' decompression: q.to(scale dtype) * scale, in the weight's dtype.
    deq = dequantize(q, scale, None, args)
    return {"weight": tensor_bytes(q), "scale": tensor_bytes(scale), "dequant": tensor_bytes(deq.to(w.dtype))}


def bnb4_ref(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool) -> dict:
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(w.contiguous(), blocksize=blocksize, compress_statistics=double_quant,
                                    quant_type=quant_type)
    out = {"weight": tensor_bytes(packed), "scale": tensor_bytes(state.absmax), "quant_map": tensor_bytes(state.code)}
    if double_quant:
        out["nested_absmax"] = tensor_bytes(state.state2.absmax)
        out["nested_quant_map"] = tensor_bytes(state.state2.code)
    # bitsandbytes' portable dequantization (its default backend): code[q] * absmax in float32, then
    # the weight's dtype. (Its native CPU kernel gives the same except where it is wrong: the
    # AVX512 path indexes absmax per row, so rows shorter than a block read the wrong absmax, and
    # AVX512-BF16 conversion flushes subnormals.)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    absmax = state.absmax
    if double_quant:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    deq = _dequantize_4bit_compute(packed.reshape(-1), absmax.float(), state.code, blocksize, list(w.shape), w.dtype)
    out["dequant"] = tensor_bytes(deq)  # in the weight's dtype
    out["native_dequant"] = tensor_bytes(F.dequantize_4bit(packed, state))
    packed_dict = state.as_dict(packed=True)
    key = "quant_state.bitsandbytes__" + quant_type
    out["quant_state_bytes"] = bytes(packed_dict[key].numpy().tolist())
    out["quant_state"] = json.loads(out["quant_state_bytes"].decode())
    return out


def reference(scheme: str, w: torch.Tensor, blocksize=64, double_quant=False, per_tensor=False) -> dict:
    if scheme == "int8":
        return int8_ref(w)
    if scheme in ("fp8_e4m3", "fp8_e5m2"):
        return fp8_ref(w, scheme == "fp8_e5m2", per_tensor)
    if scheme in ("nf4", "fp4"):
        return bnb4_ref(w, scheme, blocksize, double_quant)
    raise ValueError(scheme)


def edge_tensor(dtype: torch.dtype, rows: int, cols: int, gen: torch.Generator, scheme: str) -> torch.Tensor:
    """Random weights with the edge cases of each scheme mixed in: an all-zero row (and so zero
    blocks), a row of extremes, subnormals, tiny and huge magnitudes."""
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float32) * 0.05
    # Per-row scale variation and rare outliers, as trained weights have.
    w *= torch.exp(torch.randn(rows, 1, generator=gen) * 0.5)
    mask = torch.rand(rows, cols, generator=gen) < 0.01
    w[mask] *= 20
    fin = torch.finfo(dtype)
    if rows >= 2:
        w[1].zero_()
    if rows >= 3:
        # int8 works on the fp16 cast: the largest value that survives it.
        big = float(fin.max) if scheme != "int8" else (65504.0 if dtype != torch.bfloat16 else 65280.0)
        w[2, :] = torch.linspace(-1, 1, cols) * 0.5
        w[2, 0] = big
        if cols > 1:
            w[2, 1] = -big
    if rows >= 4:
        tiny = float(fin.tiny)
        w[3, :] = tiny * torch.arange(cols, dtype=torch.float32).remainder(7).sub(3)
        if dtype != torch.float16:
            w[3, :: max(1, cols // 3)] = tiny / 8  # subnormals of bf16/f32
    if rows >= 5:
        w[4, :] = torch.randn(cols, generator=gen) * 1e-6
    return w.to(dtype)
