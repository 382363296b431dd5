"""GGUF transformer files for the tests, written with the `gguf` package's GGUFWriter as city96's ComfyUI-GGUF
tools write them (tools/convert.py, then its patched llama-quantize), from a state dict under ComfyUI's names:

- general.architecture "lumina2", the quantization version and a file type;
- 1-D tensors and tensors of up to 1024 elements F32; the embedders, the final layer and both refiners in BF16;
  the 2-D weights of the main `layers.` in the mix of block types a llama-quantize preset picks (PRESETS);
- the [1, dim] pad tokens written as [dim], as the quantize tool writes them.

gguf-py quantizes Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 itself; it only dequantizes the K-quants, so those are made by
the small reference quantizers below (one scale and min per sub-block from its range, the scales quantized to
their bits, codes rounded to the nearest level), which fill the blocks exactly as ggml lays them out: gguf-py's
dequantization of their bytes is the check (k_quantize_is_read_back_by_gguf in test_gguf.py).
Independent of zimage's GGUF code on purpose.
"""

from __future__ import annotations

import numpy as np
import torch

GGML_PACKAGE_QUANTIZES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")

# llama-quantize preset -> (the main type, the fused qkv's, feed_forward.w2's), per city96's lcpp.patch rules for
# image models ("attention.qkv.weight" and ".feed_forward.w2.weight")
PRESETS = {
    "Q8_0": ("Q8_0", "Q8_0", "Q8_0"), "Q6_K": ("Q6_K", "Q6_K", "Q6_K"), "Q5_K_M": ("Q5_K", "Q6_K", "Q6_K"),
    "Q5_0": ("Q5_0", "Q5_0", "Q5_1"), "Q4_K_M": ("Q4_K", "Q5_K", "Q6_K"), "Q4_0": ("Q4_0", "Q4_0", "Q4_1"),
    "Q3_K_M": ("Q3_K", "Q4_K", "Q4_K"),
}
UNQUANTIZED = ("t_embedder.", "x_embedder.", "final_layer.", "cap_embedder.", "context_refiner.", "noise_refiner.")


def block_type(name: str, shape, preset: str) -> str:
    """The GGML type the tools give a tensor: F32, BF16, or the preset's block type."""
    main, qkv, w2 = PRESETS[preset]
    if len(shape) == 1 or int(np.prod(shape)) <= 1024:
        return "F32"
    if any(name.startswith(p) or ("." + p) in name for p in UNQUANTIZED) or "pad_token" in name:
        return "BF16"
    return qkv if "attention.qkv." in name else w2 if "feed_forward.w2." in name else main


def quantize(array: np.ndarray, qtype: str) -> np.ndarray:
    """float32 [..., cols] -> the bytes of qtype's blocks, uint8 [..., bytes per row] (floats: as gguf-py gives)."""
    import gguf

    array = np.ascontiguousarray(array, dtype=np.float32)
    if qtype not in K_QUANTIZERS:  # the float types, GGML_PACKAGE_QUANTIZES, and gguf-py's others (TQ1_0, TQ2_0)
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType[qtype])
    return K_QUANTIZERS[qtype](array.reshape(-1, 256)).reshape(*array.shape[:-1], -1)


def write_gguf(path, state_dict: dict[str, torch.Tensor], types: dict[str, str] | str = "Q4_K_M",
               arch: str | None = "lumina2", prefix: str = "", squeeze_pad_tokens: bool = True, extra=None):
    """state_dict (ComfyUI or diffusers names) as a GGUF file. types: a PRESETS name, or the type of each tensor.
    arch None writes no general.architecture (as stable-diffusion.cpp does). extra(writer): more metadata."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch=arch or "unused")
    if arch is None:
        writer.kv_data[0].pop("general.architecture")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    if extra:
        extra(writer)
    for name, tensor in state_dict.items():
        array = tensor.detach().float().numpy()
        qtype = types[name] if isinstance(types, dict) else block_type(name, array.shape, types)
        if squeeze_pad_tokens and "pad_token" in name:
            array = array.reshape(-1)
        data = quantize(array, qtype)
        writer.add_tensor(prefix + name, data, raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dequantize(data: np.ndarray, qtype: str) -> np.ndarray:
    """gguf-py's own dequantization: the reference the engine's must equal."""
    import gguf

    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])


# --- reference K-quantizers (256-element super-blocks) --------------------------------------------------

def _f16(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """values [n] -> (their float16 bytes [n, 2], the float16 values as float32 [n, 1])."""
    half = values.astype(np.float16)
    return half.reshape(-1, 1).view(np.uint8), half.astype(np.float32).reshape(-1, 1)


def _safe_div(a, b):
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(np.shape(a), np.shape(b)), dtype=np.float32),
                     where=b != 0)


def _affine(sub: np.ndarray, levels: int, scale_bits: int):
    """Sub-blocks [n, k, m] -> codes [n, k, m] in 0..levels, with w = d * sc * q - dmin * mn: (codes, sc, mn, d
    bytes, dmin bytes), sc and mn [n, k] of scale_bits bits."""
    top = 2 ** scale_bits - 1
    lo = np.minimum(sub.min(-1), 0)
    scale, mins = (sub.max(-1) - lo) / levels, -lo
    d_bytes, d = _f16(scale.max(-1) / top)
    m_bytes, dmin = _f16(mins.max(-1) / top)
    sc = np.clip(np.rint(_safe_div(scale, d)), 0, top).astype(np.uint8)
    mn = np.clip(np.rint(_safe_div(mins, dmin)), 0, top).astype(np.uint8)
    step, offset = d * sc, dmin * mn
    q = np.clip(np.rint(_safe_div(sub + offset[..., None], step[..., None])), 0, levels).astype(np.uint8)
    return q, sc, mn, d_bytes, m_bytes


def _symmetric(sub: np.ndarray, low: int, high: int, scale_max: int):
    """Sub-blocks [n, k, m] -> signed codes in low..high with w = d * s * q: (codes, s [n, k] int, d bytes)."""
    scale = np.take_along_axis(sub, np.abs(sub).argmax(-1)[..., None], -1).squeeze(-1) / low  # largest |w|: code low
    d_bytes, d = _f16(np.abs(scale).max(-1) / scale_max)
    s = np.clip(np.rint(_safe_div(scale, d)), -scale_max, scale_max).astype(np.int32)
    q = np.clip(np.rint(_safe_div(sub, (d * s)[..., None])), low, high).astype(np.int32)
    return q, s, d_bytes


def _pack_fields(codes: np.ndarray, bits: int) -> np.ndarray:
    """[n, 8 // bits, b] codes -> [n, b] bytes: slice k in bits k*bits and up."""
    out = np.zeros(codes.shape[:1] + codes.shape[2:], dtype=np.uint8)
    for k in range(codes.shape[1]):
        out |= (codes[:, k].astype(np.uint8) & (2 ** bits - 1)) << (k * bits)
    return out


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 6-bit scales and mins [n, 8] -> ggml's 12 bytes."""
    out = np.zeros((len(sc), 12), dtype=np.uint8)
    out[:, :4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:] = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return out


def _q2_k(blocks):
    n = len(blocks)
    q, sc, mn, d, dmin = _affine(blocks.reshape(n, 16, 16), 3, 4)
    qs = _pack_fields(q.reshape(n, 2, 4, 32).transpose(0, 2, 1, 3).reshape(n, 4, 64), 2)  # byte h*32+j: fields s
    return np.concatenate([sc | (mn << 4), qs, d, dmin], axis=1)


def _q3_k(blocks):
    n = len(blocks)
    q, s, d = _symmetric(blocks.reshape(n, 16, 16), -4, 3, 31)
    q = q.reshape(n, 256)
    low = ((q + 4) & 3).astype(np.uint8)
    high = (q >= 0).astype(np.uint8)
    qs = _pack_fields(low.reshape(n, 2, 4, 32).transpose(0, 2, 1, 3).reshape(n, 4, 64), 2)
    hmask = _pack_fields(high.reshape(n, 8, 32), 1)
    s6 = (s + 32).astype(np.uint8)
    scales = np.concatenate([_pack_fields((s6 & 0xF).reshape(n, 2, 8), 4),
                             _pack_fields((s6 >> 4).reshape(n, 4, 4), 2)], axis=1)
    return np.concatenate([hmask, qs, scales, d], axis=1)


def _q45_k(blocks, bits):
    n = len(blocks)
    q, sc, mn, d, dmin = _affine(blocks.reshape(n, 8, 32), 2 ** bits - 1, 6)
    qs = _pack_fields((q & 0xF).reshape(n, 4, 2, 32).transpose(0, 2, 1, 3).reshape(n, 2, 128), 4)
    parts = [d, dmin, _pack_k_scales(sc, mn)]
    if bits == 5:
        parts.append(_pack_fields((q >> 4).reshape(n, 8, 32), 1))
    return np.concatenate(parts + [qs], axis=1)


def _q6_k(blocks):
    n = len(blocks)
    q, s, d = _symmetric(blocks.reshape(n, 16, 16), -32, 31, 127)
    q = (q + 32).astype(np.uint8).reshape(n, 2, 128)  # halves of 128
    ql = _pack_fields((q & 0xF).reshape(n, 2, 2, 64).transpose(0, 2, 1, 3).reshape(n, 2, 128), 4)
    qh = _pack_fields((q >> 4).reshape(n, 2, 4, 32).transpose(0, 2, 1, 3).reshape(n, 4, 64), 2)
    return np.concatenate([ql, qh, s.astype(np.int8).view(np.uint8), d], axis=1)


K_QUANTIZERS = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": lambda b: _q45_k(b, 4), "Q5_K": lambda b: _q45_k(b, 5),
                "Q6_K": _q6_k}
