"""GGUF transformer files, read with the `gguf` package (llama.cpp's own reader), never parsed by hand.

The Z-Image GGUFs people have come from city96's ComfyUI-GGUF tools (tools/convert.py writes a BF16/F16 GGUF
of a ComfyUI single file, its patched llama-quantize quantizes it) or from stable-diffusion.cpp:
- `general.architecture` is "lumina2" (Lumina Image 2.0 and Z-Image share ComfyUI's NextDiT); stable-diffusion.cpp
  writes none, and ComfyUI-GGUF's compatibility markers "pig" and "cow" say nothing either: then the tensor names
  alone decide, as for every file;
- tensor names are ComfyUI's (fused attention.qkv), with or without the `model.diffusion_model.` prefix: the one
  table of names (keys.py) maps them, and the layout is checked against the config as for safetensors files;
- 1-D tensors and tensors of up to 1024 elements are F32; the quantize tool quantizes only the main `layers.`'
  2-D weights and keeps the embedders, the final layer and both refiners in the source's BF16 or F16;
- the quantize tool writes each tensor with ggml's count of dimensions, which ends at the last one above 1, so the
  [1, dim] pad tokens come back as [dim] (ComfyUI-GGUF issue/PR 392, InvokeAI PR 8690);
- `comfy.gguf.orig_shape.<name>` (an INT32 array), where the converter reshaped a tensor to rows of 256
  (SD1/SDXL convolutions; never for lumina2), gives the tensor's real shape.

Entries are described as safetensors headers are (files.TensorEntry), with the GGML type name as the dtype
("Q4_K", "BF16", ...), so that checkpoint.py plans and checks a GGUF file with the same code.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch

from .files import CheckpointError, TensorEntry
from .ggml import FLOAT_TYPES, FORMATS, dequantize, row_bytes

ARCHITECTURE = "lumina2"
# general.architecture values under which the names must tell the model: none (stable-diffusion.cpp) and
# ComfyUI-GGUF's compatibility markers
UNNAMED_ARCHITECTURES = (None, "pig", "cow")
TEXT_ARCHITECTURES = {"t5", "t5encoder", "llama", "qwen2", "qwen2vl", "qwen3", "qwen3vl", "gemma2", "gemma3"}
SQUEEZED = re.compile(r"(^|\.)\w*pad_token$")  # [1, dim] tensors that the quantize tool writes as [dim]
SUPPORTED = ", ".join([*FORMATS, *FLOAT_TYPES])


def is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _gguf_module():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading GGUF files needs the `gguf` package: pip install gguf (with the Python that "
                              "runs ComfyUI), or pip install -r requirements.txt in comfyui-zimage") from None
    return gguf


class GGUFFile:
    """One GGUF transformer file: its tensors' entries, checked, and their data (memory-mapped, read on demand)."""

    def __init__(self, path: str):
        gguf = _gguf_module()
        self.path = path
        name = os.path.basename(path)
        try:
            reader = gguf.GGUFReader(path)
        except Exception as e:  # the reader raises ValueError, IndexError, ... on a damaged or truncated file
            raise CheckpointError(f"{name} is damaged or truncated: the gguf package cannot read it ({e}). "
                                  f"Re-download it.") from None
        arch = _string_field(reader, "general.architecture")
        if arch not in (ARCHITECTURE, *UNNAMED_ARCHITECTURES):
            what = ("a text encoder: load it with a GGUF CLIP loader (ComfyUI-GGUF's CLIPLoaderGGUF)"
                    if arch in TEXT_ARCHITECTURES else "another model family's")
            raise CheckpointError(f"{name} is a GGUF of architecture {arch!r} ({what}), not a Z-Image transformer, "
                                  f"whose GGUFs say {ARCHITECTURE!r}.")
        size = os.path.getsize(path)
        self.tensors, self.entries = {}, {}
        for tensor in reader.tensors:
            qtype = tensor.tensor_type.name
            if qtype not in FORMATS and qtype not in FLOAT_TYPES:
                raise CheckpointError(f"{name} stores {tensor.name} as {qtype}, a GGML type comfyui-zimage does not "
                                      f"dequantize (it reads {SUPPORTED}). Use a file of one of those types, e.g. "
                                      f"a Q4_K_M, Q5_K_M or Q8_0 GGUF, or the safetensors model.")
            if tensor.data_offset + tensor.n_bytes > size:
                raise CheckpointError(f"{name} is truncated: {tensor.name} ends past the end of the file. "
                                      f"Re-download it.")
            stored = [int(n) for n in reversed(tensor.shape.tolist())]  # ggml lists dimensions innermost first
            shape = _int_array_field(reader, f"comfy.gguf.orig_shape.{tensor.name}") or stored
            if SQUEEZED.search(tensor.name) and len(shape) == 1:
                shape = [1, *shape]
            if int(np.prod(shape)) != int(np.prod(stored)):
                raise CheckpointError(f"{name} is damaged: {tensor.name} is stored as {stored} but its recorded shape "
                                      f"{shape} has another number of elements. Re-download it.")
            self.tensors[tensor.name] = (tensor, stored)
            self.entries[tensor.name] = TensorEntry(path, qtype, shape)

    def read(self, key: str) -> torch.Tensor:
        """A tensor as a dense float tensor on the CPU: float types as stored, block quantizations dequantized to
        float32."""
        tensor, stored = self.tensors[key]
        entry = self.entries[key]
        data = torch.from_numpy(np.array(tensor.data))  # a copy: the memory map is read-only
        if entry.dtype in FORMATS:
            data = dequantize(data.reshape(-1, row_bytes(entry.dtype, stored[-1])), entry.dtype)
        elif entry.dtype == "BF16":  # the reader gives BF16 as its bytes
            data = data.view(torch.bfloat16)
        return data.reshape(entry.shape)

    def quantized_rows(self, keys: list[str]) -> tuple[torch.Tensor, str] | None:
        """The raw blocks of a matrix made of these tensors stacked along dim 0, uint8 [rows, bytes per row], and
        their quantization; None unless they are all matrices of one block quantization stored row by row (a
        quantized fused qkv, or q, k and v of one type, stack as they are: ggml's blocks never span rows)."""
        types = {self.entries[k].dtype for k in keys}
        if len(types) != 1 or next(iter(types)) not in FORMATS:
            return None
        qtype = types.pop()
        parts = []
        for key in keys:
            tensor, stored = self.tensors[key]
            if len(stored) != 2 or stored != self.entries[key].shape:  # reshaped by the converter: not rows
                return None
            parts.append(torch.from_numpy(np.array(tensor.data)).reshape(stored[0], row_bytes(qtype, stored[1])))
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), qtype


def describe_types(entries: dict[str, TensorEntry]) -> str:
    """The GGML types of a file's tensors and how many of each: the block quantizations first (what the file is),
    then the float types, each most first: "Q4_K 120, Q5_K 30, Q6_K 30, F32 200, BF16 45"."""
    counts: dict[str, int] = {}
    for entry in entries.values():
        counts[entry.dtype] = counts.get(entry.dtype, 0) + 1
    order = sorted(counts.items(), key=lambda item: (item[0] not in FORMATS, -item[1]))
    return ", ".join(f"{t} {n}" for t, n in order)


def _string_field(reader, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    return value if isinstance(value, str) else None


def _int_array_field(reader, key: str) -> list[int] | None:
    field = reader.get_field(key)
    if field is None:
        return None
    value = field.contents()
    if not (isinstance(value, list) and all(isinstance(v, int) for v in value)):
        raise CheckpointError(f"{os.path.basename(reader.data.filename)} is damaged: its {key} is {value!r}, not a "
                              f"list of sizes. Re-download it.")
    return value
