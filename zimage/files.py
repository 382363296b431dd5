"""The files of a checkpoint, read without trusting them: a safetensors file's header checked against the format
before anything else is read, and the shards a diffusers folder's index names, held inside the folder.

Any safetensors file can be read this way (a transformer, a LoRA); every refusal is a CheckpointError that names
the file and says what to do.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass

import torch


class CheckpointError(ValueError):
    """A file that cannot be loaded as a Z-Image transformer; the message says what it is instead."""


# The safetensors header is parsed by hand first, so that every refusal can say why.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

# bits per element of every dtype the safetensors format defines (those the safetensors library accepts), so that
# the header of any file can be checked against its size, whether or not the engine can compute in that dtype
SAFETENSORS_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
                    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
                    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}


@dataclass
class TensorEntry:
    file: str
    dtype: str
    shape: list[int]


def short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _sizes(value) -> bool:
    # bool is an int to Python, not to JSON: `true` is no size
    return isinstance(value, list) and all(type(n) is int and n >= 0 for n in value)


def _entry_problem(entry) -> str | None:
    """What is wrong with one tensor's header entry, or None: the safetensors library refuses all of these."""
    if not isinstance(entry, dict):
        return f"is described by {short_repr(entry)} instead of its dtype, shape and data_offsets"
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            return f"has no {field}"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_BITS:
        return f"has dtype {short_repr(dtype)}, none of the safetensors format's ({', '.join(SAFETENSORS_BITS)})"
    if not _sizes(shape):
        return f"has shape {short_repr(shape)} instead of a list of sizes"
    if not (_sizes(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        return f"has data_offsets {short_repr(offsets)} instead of [begin, end]"
    bits = math.prod(shape) * SAFETENSORS_BITS[dtype]
    if offsets[1] - offsets[0] != bits / 8:
        return (f"has {offsets[1] - offsets[0]} bytes of data where its dtype {dtype} and shape {shape} "
                f"need {bits / 8:g}")
    return None


def read_safetensors_header(path: str) -> dict[str, TensorEntry]:
    """The tensors a safetensors file holds (name -> file, dtype, shape), from its header alone, which is checked
    first against the format: every entry complete, each tensor as many bytes as its dtype and shape need, the
    tensors end to end and the file exactly that long. Any safetensors file can be read this way (a transformer,
    a LoRA); a damaged one raises CheckpointError naming the file."""
    name = os.path.basename(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
        # A safetensors file starts with its header's length, whose low byte can be anything (0x80, "PK", ...),
        # then the header's "{": the magic numbers of other formats only count when that "{" is absent.
        if head[8:9] != b"{":
            if head[:2] == b"PK" or head[:1] == b"\x80":
                raise CheckpointError(f"{name} is a pickled PyTorch checkpoint (.ckpt/.pt/.bin). Pickles can run code, "
                                      f"so comfyui-zimage never opens them: use the .safetensors release of the model.")
            if head[:4] == b"GGUF":
                raise CheckpointError(f"{name} is a GGUF file; comfyui-zimage loads .safetensors transformer files.")
        if len(head) < 9:
            raise CheckpointError(f"{name} is {size} bytes long: too short to be a safetensors file (truncated download?)")
        header_len = struct.unpack("<Q", head[:8])[0]
        f.seek(8)
        if header_len > min(size - 8, 100 * 2**20):
            raise CheckpointError(f"{name} is not a safetensors file, or it is truncated: its header claims "
                                  f"{header_len} bytes but the file holds {size}. Re-download it.")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # recursion: "[[[[..." nested deep
            raise CheckpointError(f"{name} is not a safetensors file (unreadable header: {e}).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name} is not a safetensors file, or it is damaged: its header is a JSON "
                              f"{type(header).__name__}, not an object naming its tensors. Re-download it.")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{name} is damaged: its __metadata__ is {short_repr(metadata)}, not a table of strings. "
                              f"Re-download it.")
    spans = []
    for key, entry in header.items():
        problem = _entry_problem(entry)
        if problem:
            raise CheckpointError(f"{name} is damaged: its tensor {key} {problem}. Re-download it.")
        spans.append((*entry["data_offsets"], key))
    data_end = 0
    for begin, end, key in sorted(spans):
        if begin != data_end:  # the format lays the tensors end to end, from the first byte after the header
            raise CheckpointError(f"{name} is damaged: its tensor {key} starts at byte {begin} of the data, where "
                                  f"the tensors before it end at byte {data_end}. Re-download it.")
        data_end = end
    needed = 8 + header_len + data_end
    if needed > size:
        raise CheckpointError(f"{name} is truncated: its tensors need {needed} bytes but the file "
                              f"holds {size} ({100 * size / needed:.0f}%). Re-download it.")
    if needed < size:
        raise CheckpointError(f"{name} is damaged: {size - needed} bytes follow its last tensor, which the "
                              f"safetensors format does not allow. Re-download it.")
    return {k: TensorEntry(path, v["dtype"], v["shape"]) for k, v in header.items()}


def read_json(path: str) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is not valid JSON ({e}). Re-download it from the model's repository.") from None


def _plain_file_name(shard: str) -> bool:
    # diffusers writes bare shard names; a path (absolute, with / or \, a drive's colon, ..) could name any file on
    # the machine. NUL would make os.path raise.
    return shard.endswith(".safetensors") and re.search(r"[/\\:\x00]", shard) is None


def transformer_folder(path: str) -> str:
    """The folder of a diffusers model's transformer: its transformer/ subfolder, or the folder itself."""
    sub = os.path.join(path, "transformer")
    return sub if os.path.isdir(sub) else path


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a single-file checkpoint or of a diffusers folder (or its transformer/)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} does not exist")
    folder = transformer_folder(path)
    indexes = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors.index.json"))
    if indexes:
        index_path = os.path.join(folder, indexes[0])
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
            raise CheckpointError(f"{index_path} is not a diffusers index: it needs a \"weight_map\" from tensor names "
                                  f"to shard file names. Re-download it from the model's repository.")
        files = sorted(set(weight_map.values()))
        # Only the index's names are held to bare file names: a shard that is a symlink the user placed in the
        # folder is followed, as ComfyUI's own model lists follow symlinks.
        outside = [f for f in files if not _plain_file_name(f)]
        if outside:
            raise CheckpointError(f"{index_path} is broken or malicious: its weight_map names "
                                  f"{', '.join(map(short_repr, outside))}, where diffusers writes .safetensors file names "
                                  f"inside the model folder. Nothing was read from there; re-download the model.")
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise CheckpointError(f"{folder}: the index lists shards that are not there: {', '.join(missing)}")
        return [os.path.join(folder, f) for f in files]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no .safetensors files")
    return [os.path.join(folder, f) for f in files]


def read_safetensors_metadata(path: str) -> dict[str, str]:
    """A safetensors file's __metadata__ (ComfyUI keeps the settings of quantized layers there, quant.py); {} for
    a file of another format. For a file read_safetensors_header has checked."""
    with open(path, "rb") as f:
        if f.read(9)[8:9] != b"{":  # not a safetensors header (read_safetensors_header's test)
            return {}
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}
