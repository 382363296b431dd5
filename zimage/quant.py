"""ComfyUI's quantized weight formats, read as the numbers they stand for.

ComfyUI marks a quantized linear layer `<layer>` in one of two ways: a `<layer>.comfy_quant` tensor (uint8, the
bytes of a JSON object such as {"format": "nvfp4"}), or an entry for it in the file's `_quantization_metadata`
(safetensors __metadata__, JSON {"layers": {"<layer>": {...}}}). Older "scaled fp8" files instead carry a
`scaled_fp8` marker and a `<layer>.scale_weight` per fp8 weight (ComfyUI reads them as float8_e4m3fn layers).
The layouts, as ComfyUI 0.8-0.14 (comfy/ops.py mixed_precision_ops, comfy/quant_ops.py) and comfy-kitchen
(tensor/nvfp4.py, tensor/int8.py, backends/eager/quantization.py) define them, for a layer of out_features N and
in_features K:

- float8_e4m3fn, float8_e5m2: `weight` F8_E4M3 / F8_E5M2 [N, K], `weight_scale` (the legacy files'
  `scale_weight`) one float32 per tensor; W = weight * weight_scale.
- nvfp4: `weight` U8 [N, K/2], two FP4 (E2M1) codes a byte, the high nibble first (element 2j), low nibble
  element 2j+1; the code's bit 3 is its sign, bits 0-2 index (0, 0.5, 1, 1.5, 2, 3, 4, 6). `weight_scale`
  F8_E4M3 (or its bytes as U8) one scale per 16 consecutive elements of a row, stored in cuBLAS's blocked layout
  for block-scaled GEMMs: padded to [ceil(N/128)*128, ceil(K/64)*4], then each 128x4 tile laid out as 32 rows of
  16 bytes where byte 4*i + j of row r is the tile's element (32*i + r, j). `weight_scale_2` one float32 per
  tensor. W[n, k] = code(n, k) * (weight_scale_2 * weight_scale[n, k // 16]).
- int8_tensorwise: `weight` I8 [N, K], `weight_scale` one float32 per tensor or per row ([N, 1]);
  W = weight * weight_scale. With "convrot": true (and "convrot_groupsize" G, 256 by default; at the top level of
  the JSON or under its "params") the rows were rotated before quantization, each run of G input columns
  multiplied by the transposed normalized regular Hadamard matrix H_G (the Kronecker power of the order-4
  matrix whose antidiagonal is -1 and all else +1, over sqrt(G)); rotating back, W = (weight * weight_scale) @ H_G
  per run of G columns (H_G is orthogonal).

`input_scale` (`scale_input`) tensors are activation scales for ComfyUI's FP8/FP4 matrix multiplies: they do
not change the weights, and the engine, which computes from the dequantized weights, skips them (keys.skipped).
Every other format (mxfp8, the W4 formats of newer ComfyUI, anything unknown), a setting of a known format that
changes its arithmetic and is not handled here, and a layer whose tensors do not fit its format, is refused with a
CheckpointError that names it: nothing is read as something it is not.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .files import CheckpointError, TensorEntry
from .keys import PREFIXES

MARKER = ".comfy_quant"
METADATA_KEY = "_quantization_metadata"
LEGACY_MARKER = "scaled_fp8"
FP8_FORMATS = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
LOADED_FORMATS = (*FP8_FORMATS, "nvfp4", "int8_tensorwise")
FLOAT_DTYPES = ("F32", "BF16", "F16")
# settings of a layer's JSON that do not change its weights: how ComfyUI multiplies (full precision or not), and
# descriptions of the tensors that the header already gives
HARMLESS_SETTINGS = {"format", "full_precision_matrix_mult", "orig_dtype", "orig_shape", "per_row"}
USE_INSTEAD = ("Use the bf16 release of the same model instead (Comfy-Org's z_image_turbo_bf16.safetensors or "
               "z_image_bf16.safetensors), with the loader's weight_dtype fp8_e4m3fn for about half the memory or "
               "fp8_e4m3fn_fast for FP8 matrix multiplies.")

# E2M1 magnitudes by the low three bits of a code
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized weight of a file: its format, the tensors it is made of, and the shape it stands for."""
    format: str
    weight: str  # the file's key of the stored codes
    scale: str  # weight_scale (legacy: scale_weight)
    scale_2: str | None = None  # nvfp4's per-tensor scale
    convrot_group: int = 0  # int8_tensorwise's Hadamard group size, 0 without rotation
    shape: tuple[int, ...] = ()
    companions: tuple[str, ...] = ()  # every key of the layer besides the weight that this format uses up

    def dequantize(self, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The weight as float32, from the file's tensors (read(key))."""
        codes = read(self.weight)
        if self.format == "nvfp4":
            n, k = self.shape
            block = _unblock(_fp8_bytes(read(self.scale)).float(), n, k // 16)
            total = read(self.scale_2).float().reshape(()) * block  # ComfyUI's order: the two scales first
            return (_fp4_values(codes).reshape(n, k // 16, 16) * total.unsqueeze(-1)).reshape(n, k)
        weight = codes.float() * read(self.scale).float()
        if self.convrot_group:
            n, k = weight.shape
            g = self.convrot_group
            weight = (weight.reshape(n, k // g, g) @ hadamard(g)).reshape(n, k)
        return weight


def hadamard(size: int) -> torch.Tensor:
    """The normalized regular Hadamard matrix of a power-of-4 order that ConvRot rotates by: a Kronecker power of
    the order-4 matrix with -1 on its antidiagonal and +1 elsewhere, over sqrt(size). Symmetric and orthogonal."""
    h4 = torch.ones(4, 4) - 2 * torch.eye(4).flip(0)
    h = torch.ones(1, 1)
    while h.shape[0] < size:
        h = torch.kron(h, h4)
    return h / math.sqrt(size)


def _fp8_bytes(scale: torch.Tensor) -> torch.Tensor:
    # ComfyUI views a U8 block scale as e4m3 (mixed_precision_ops' _load_scale_param)
    return scale.view(torch.float8_e4m3fn) if scale.dtype == torch.uint8 else scale


def _fp4_values(codes: torch.Tensor) -> torch.Tensor:
    """U8 [N, K/2] of E2M1 pairs (high nibble first) -> float32 [N, K]."""
    pairs = torch.stack([codes >> 4, codes & 0x0F], dim=-1).reshape(codes.shape[0], -1).long()
    magnitude = torch.tensor(FP4_VALUES)[pairs & 7]
    return torch.where(pairs & 8 != 0, -magnitude, magnitude)


def _unblock(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """cuBLAS's blocked scale layout (module docstring) -> the [rows, cols] matrix of scales."""
    row_tiles, col_tiles = -(-rows // 128), -(-cols // 4)
    # byte 4*i + j of row r of tile (a, b) is the scale of row 128*a + 32*i + r, column 4*b + j
    tiles = blocked.reshape(row_tiles, col_tiles, 32, 4, 4)
    return tiles.permute(0, 3, 2, 1, 4).reshape(row_tiles * 128, col_tiles * 4)[:rows, :cols]


def blocked_scale_shape(rows: int, cols: int) -> list[int]:
    """The stored shape of nvfp4 block scales for a [rows, cols] weight (cols / 16 scales a row)."""
    return [-(-rows // 128) * 128, -(-(cols // 16) // 4) * 4]


def _layer_settings(name: str, layer: str, conf) -> dict:
    if not (isinstance(conf, dict) and isinstance(conf.get("format"), str)):
        raise CheckpointError(f"{name} is damaged: the quantization settings of {layer} are {conf!r:.80}, not a JSON "
                              f"object naming its format. Re-download it.")
    return conf


def _markers(name: str, entries: Mapping[str, TensorEntry], read: Callable[[str], torch.Tensor],
             metadata: Mapping[str, str] | None) -> dict[str, dict]:
    """layer -> its quantization settings, from the per-layer `comfy_quant` tensors and the file's
    `_quantization_metadata` (ComfyUI lets the metadata win; here the two must agree)."""
    found = {}
    for key, entry in entries.items():
        if not key.endswith(MARKER):
            continue
        layer = key.removesuffix(MARKER)
        if entry.dtype != "U8" or len(entry.shape) != 1 or entry.shape[0] > 65536:
            raise CheckpointError(f"{name} is damaged: {key} is {entry.dtype} {entry.shape}, where ComfyUI writes a "
                                  f"layer's quantization settings as the bytes (U8) of a JSON object. Re-download it.")
        try:
            conf = json.loads(read(key).numpy().tobytes())
        except (ValueError, RecursionError):
            conf = None
        found[layer] = _layer_settings(name, key, conf)
    text = (metadata or {}).get(METADATA_KEY)
    if text is not None:
        try:
            layers = json.loads(text).get("layers")
        except (ValueError, RecursionError, AttributeError):
            layers = None
        if not isinstance(layers, dict):
            raise CheckpointError(f"{name} is damaged: its {METADATA_KEY} is not a JSON object with the \"layers\" "
                                  f"ComfyUI writes there. Re-download it.")
        for layer, conf in layers.items():
            conf = _layer_settings(name, f"{layer} ({METADATA_KEY})", conf)
            if found.get(layer, conf) != conf:
                raise CheckpointError(f"{name} is damaged: {layer}{MARKER} says {found[layer]} and its "
                                      f"{METADATA_KEY} says {conf}. Re-download it.")
            found[layer] = conf
    return found


def _refuse(name: str, layer: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{name} is a ComfyUI quantized file whose layer {layer} {problem}. comfyui-zimage "
                           f"reads ComfyUI's float8_e4m3fn, float8_e5m2, nvfp4 and int8_tensorwise (with or "
                           f"without convrot) layers; it was not loaded, so that no weight would be misread. "
                           f"{USE_INSTEAD}")


def _check(name: str, entries: Mapping[str, TensorEntry], key: str | None, what: str, dtypes, shape=None) -> None:
    """A tensor of a quantized layer is there, with one of `dtypes`, and `shape` where given (a list, or "one"
    for a single value)."""
    if key is None or key not in entries:
        raise CheckpointError(f"{name} is damaged: its quantized layer has no {what} ({key}). Re-download it.")
    entry = entries[key]
    fits = shape is None or (math.prod(entry.shape) == 1 if shape == "one" else entry.shape == shape)
    if entry.dtype not in dtypes or not fits:
        wanted = "one value" if shape == "one" else shape or "any shape"
        raise CheckpointError(f"{name} is damaged: {key} is {entry.dtype} {entry.shape}, where its format makes the "
                              f"{what} {' or '.join(dtypes)} {wanted}. Re-download it.")


def _layer(name: str, layer: str, conf: dict, entries: Mapping[str, TensorEntry]) -> QuantizedWeight:
    fmt, weight = conf["format"], layer + ".weight"
    if fmt not in LOADED_FORMATS:
        raise _refuse(name, layer, f"is in the {fmt!r} format")
    params = conf.get("params", {})
    convrot = fmt == "int8_tensorwise" and isinstance(params, dict) and \
        conf.get("convrot", params.get("convrot", False))
    unknown = set(conf) - HARMLESS_SETTINGS - ({"convrot", "convrot_groupsize", "params"} if fmt == "int8_tensorwise"
                                                else set())
    if isinstance(params, dict) and fmt == "int8_tensorwise":
        unknown |= {f"params.{k}" for k in set(params) - {"convrot", "convrot_groupsize"}}
    if unknown:
        raise _refuse(name, layer, f"({fmt}) has settings this loader does not know: {sorted(unknown)}")
    _check(name, entries, weight, f"{fmt} codes", {"nvfp4": ["U8"], "int8_tensorwise": ["I8"]}.get(
        fmt, [FP8_FORMATS.get(fmt)]))
    stored = entries[weight].shape
    scale, companions = layer + ".weight_scale", [layer + ".weight_scale"]
    if fmt in FP8_FORMATS:
        _check(name, entries, scale, "weight scale", FLOAT_DTYPES)
        _check_broadcast(name, scale, weight, entries)
        return QuantizedWeight(fmt, weight, scale, shape=tuple(stored), companions=tuple(companions))
    if len(stored) != 2:
        raise CheckpointError(f"{name} is damaged: {weight} is {stored}, where {fmt} stores a matrix. Re-download it.")
    if fmt == "nvfp4":
        n, k = stored[0], stored[1] * 2
        if k % 16:
            raise _refuse(name, layer, f"(nvfp4) has {k} input columns, not whole blocks of 16")
        if layer + ".pre_quant_scale" in entries:
            raise _refuse(name, layer, "(nvfp4) carries a pre_quant_scale (activation smoothing)")
        _check(name, entries, scale, "block scales", ["F8_E4M3", "U8"], blocked_scale_shape(n, k))
        _check(name, entries, layer + ".weight_scale_2", "tensor scale", FLOAT_DTYPES, "one")
        companions.append(layer + ".weight_scale_2")
        return QuantizedWeight(fmt, weight, scale, layer + ".weight_scale_2", shape=(n, k),
                               companions=tuple(companions))
    n, k = stored
    _check(name, entries, scale, "weight scale", FLOAT_DTYPES)
    if not (math.prod(entries[scale].shape) == 1 or entries[scale].shape == [n, 1]):
        raise CheckpointError(f"{name} is damaged: {scale} is {entries[scale].shape}, where int8_tensorwise has one "
                              f"scale for {weight} {stored} or one per row ([{n}, 1]). Re-download it.")
    group = 0
    if convrot:
        group = conf.get("convrot_groupsize", params.get("convrot_groupsize", 256))
        if not (type(group) is int and group >= 4 and 4 ** round(math.log(group, 4)) == group and k % group == 0):
            raise _refuse(name, layer, f"(int8_tensorwise, convrot) has convrot_groupsize {group!r}, where ConvRot "
                                       f"needs a power of 4 dividing its {k} input columns")
    return QuantizedWeight(fmt, weight, scale, convrot_group=group, shape=(n, k), companions=tuple(companions))


def _check_broadcast(name: str, scale: str, weight: str, entries: Mapping[str, TensorEntry]) -> None:
    try:  # multiplied into the weight on load: it must broadcast to the weight's shape
        fits = list(torch.broadcast_shapes(entries[scale].shape, entries[weight].shape)) == entries[weight].shape
    except RuntimeError:
        fits = False
    if not fits:
        raise CheckpointError(f"{name} is damaged or not a Z-Image transformer: the shapes of {scale} "
                              f"{entries[scale].shape} (a scale for {weight} {entries[weight].shape}) do not fit. "
                              f"Re-download it.")


def quantized_weights(name: str, entries: Mapping[str, TensorEntry], read: Callable[[str], torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> dict[str, QuantizedWeight]:
    """Every quantized weight of a file (its key -> QuantizedWeight), from its markers, its metadata and the legacy
    scaled-fp8 scales; CheckpointError for a format this module does not load, naming it and what to use instead.
    A scale whose weight is not in the file is left out: the caller refuses it as a tensor no model has."""
    layers = {}
    for layer, conf in _markers(name, entries, read, metadata).items():
        # community packs name layers in _quantization_metadata without the prefix their keys carry
        prefixed = [p + layer for p in PREFIXES if p + layer + ".weight" in entries]
        layers[layer if layer + ".weight" in entries or len(prefixed) != 1 else prefixed[0]] = conf
    quantized = {}
    for layer, conf in sorted(layers.items()):
        if layer + ".weight" not in entries:
            raise CheckpointError(f"{name} is damaged: it marks {layer} as quantized ({conf.get('format')}) but holds "
                                  f"no {layer}.weight. Re-download it.")
        q = _layer(name, layer, conf, entries)
        marker = [layer + MARKER] if layer + MARKER in entries else []
        quantized[q.weight] = QuantizedWeight(q.format, q.weight, q.scale, q.scale_2, q.convrot_group, q.shape,
                                              (*q.companions, *marker))
    for key, entry in entries.items():
        # the legacy scaled-fp8 layout: an fp8 weight with a scale_weight (or weight_scale) and no marker
        for suffix in (".scale_weight", ".weight_scale"):
            layer = key.removesuffix(suffix)
            weight = layer + ".weight"
            if not key.endswith(suffix) or layer in layers or weight not in entries:
                continue
            dtype = entries[weight].dtype
            fmt = next((f for f, d in FP8_FORMATS.items() if d == dtype), None)
            if fmt is None:
                raise _refuse(name, layer, f"has a {key} beside a {dtype} weight and no comfy_quant marker saying "
                                           f"what its numbers are")
            if weight in quantized:
                raise CheckpointError(f"{name} is damaged: {weight} has both {quantized[weight].scale} and {key}. "
                                      f"Re-download it.")
            _check(name, entries, key, "weight scale", FLOAT_DTYPES)
            _check_broadcast(name, key, weight, entries)
            quantized[weight] = QuantizedWeight(fmt, weight, key, shape=tuple(entries[weight].shape), companions=(key,))
    return quantized


def describe(quantized: Mapping[str, QuantizedWeight]) -> str:
    """What a file's quantized weights are, for the log: "" for none."""
    counts: dict[str, int] = {}
    for q in quantized.values():
        label = q.format + (" convrot" if q.convrot_group else "")
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{n} {label}" for label, n in sorted(counts.items()))
