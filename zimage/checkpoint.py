"""The transformer files users have, read without unpickling and without a second copy in memory.

Formats:
- ComfyUI single file (z_image_turbo_bf16.safetensors, fp8 variants): fused `attention.qkv`, `attention.out`,
  `q_norm`/`k_norm`, `feed_forward.w1/w2/w3`; sometimes under a `model.diffusion_model.` prefix.
- diffusers folder: `transformer/diffusion_pytorch_model-0000N-of-0000M.safetensors` plus its index json,
  with `attention.to_q/to_k/to_v/to_out.0`, `norm_q/norm_k`, `all_x_embedder.2-1`, `all_final_layer.2-1`.

Omni-Base and Edit add `siglip_embedder.0/1`, `siglip_refiner.N` (blocks named as the context refiner's) and
`siglip_pad_token`, under the same names in both formats.

The engine's own names are ComfyUI's, so a ComfyUI file needs no renaming and LoRA keys written for
ComfyUI address the engine's weights directly.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

import torch

from .config import ZImageConfig
from .model import S3DiT


class CheckpointError(ValueError):
    """A file that cannot be loaded as a Z-Image transformer; the message says what it is instead."""


PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")

# (pattern, replacement, part index, number of parts): source names -> engine names
RENAMES = [
    (re.compile(r"^all_x_embedder\.2-1\."), "x_embedder.", 0, 1),
    (re.compile(r"^all_final_layer\.2-1\."), "final_layer.", 0, 1),
    (re.compile(r"\.attention\.to_q\."), ".attention.qkv.", 0, 3),
    (re.compile(r"\.attention\.to_k\."), ".attention.qkv.", 1, 3),
    (re.compile(r"\.attention\.to_v\."), ".attention.qkv.", 2, 3),
    (re.compile(r"\.attention\.to_out\.0\."), ".attention.out.", 0, 1),
    (re.compile(r"\.attention\.norm_q\."), ".attention.q_norm.", 0, 1),
    (re.compile(r"\.attention\.norm_k\."), ".attention.k_norm.", 0, 1),
]

# per-tensor companions of fp8 weights in ComfyUI's scaled-fp8 files; folded into the weight on load
SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
IGNORED_KEYS = re.compile(r"(^scaled_fp8$|\.scale_input$|\.input_scale$|\.comfy_quant$)")

# Tensors that real Z-Image files carry and no Z-Image model uses, matched without the prefix: they are skipped on
# load. Every other key that the model does not explain is refused (check_layout), so that a file with weights
# this loader would drop is never run as if it were complete.
UNUSED_KEYS = frozenset({
    # Lumina-Image 2.0's NextDiT, which Z-Image's transformer descends from, builds a final RMSNorm(dim) that its
    # forward never calls (the final layer has its own norm). ComfyUI's NextDiT has that line commented out and
    # diffusers has no such key, but trainers built on the Lumina code save the whole module, so community
    # fine-tunes carry a [dim] norm_final.weight (under model.diffusion_model. like their other keys).
    "norm_final.weight",
})


def skipped(key: str) -> bool:
    """True for a key (prefix stripped) that holds no weight of the engine's: an fp8 marker or input scale, or a
    tensor known to be unused."""
    return key in UNUSED_KEYS or IGNORED_KEYS.search(key) is not None


def engine_key(source_key: str) -> tuple[str, int, int]:
    """Source tensor name (prefix already stripped) -> (engine name, part index, number of parts)."""
    for pattern, replacement, part, parts in RENAMES:
        if pattern.search(source_key):
            return pattern.sub(replacement, source_key, count=1), part, parts
    return source_key, 0, 1


def strip_prefix(keys: Iterable[str]) -> str:
    keys = list(keys)
    for prefix in PREFIXES:
        if any(k.startswith(prefix + "cap_embedder.") for k in keys):
            return prefix
    return ""


def conversion_plan(keys: Iterable[str]) -> dict[str, list[str]]:
    """Engine name -> the source names whose tensors are stacked (dim 0) to make it."""
    keys = list(keys)
    prefix = strip_prefix(keys)
    parts: dict[str, dict[int, str]] = defaultdict(dict)
    counts: dict[str, int] = {}
    for key in keys:
        # a key outside the prefix is no part of the plan; check_layout refuses it unless it is skipped()
        stripped = key.removeprefix(prefix)
        # skipped keys are matched without the prefix: a prefixed file's marker is `<prefix>scaled_fp8`
        if not key.startswith(prefix) or skipped(stripped) or key.endswith(SCALE_SUFFIXES):
            continue
        name, part, n = engine_key(stripped)
        if part in parts[name] or counts.setdefault(name, n) != n:
            # e.g. a fused attention.qkv and a separate to_q for one layer: which one the model is, nobody knows
            raise CheckpointError(f"{name} comes from both {next(iter(parts[name].values()))} and {key}: the file "
                                  f"mixes two layouts")
        parts[name][part] = key
    plan = {}
    for name, found in parts.items():
        if len(found) != counts[name]:
            raise CheckpointError(f"incomplete checkpoint: {name} needs {counts[name]} parts, found {sorted(found.values())}")
        plan[name] = [found[i] for i in range(counts[name])]
    return plan


def _dequantize(tensor: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        tensor = tensor.float()
    return tensor if scale is None else tensor.float() * scale.float()


def _scale_key(source_key: str, keys) -> str | None:
    stem = source_key.removesuffix(".weight")
    for suffix in SCALE_SUFFIXES:
        if stem + suffix in keys:
            return stem + suffix
    return None


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ComfyUI- or diffusers-format transformer state dict -> the engine's names (fp8 weights dequantized)."""
    keys = set(state_dict)
    out = {}
    for name, sources in conversion_plan(keys).items():
        tensors = []
        for s in sources:
            scale_key = _scale_key(s, keys)
            tensors.append(_dequantize(state_dict[s], state_dict[scale_key] if scale_key else None))
        out[name] = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
    return out


# ---------------------------------------------------------------------------------------------------
# Reading files: the safetensors header is parsed by hand first, so that every refusal can say why.

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


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _sizes(value) -> bool:
    # bool is an int to Python, not to JSON: `true` is no size
    return isinstance(value, list) and all(type(n) is int and n >= 0 for n in value)


def _entry_problem(entry) -> str | None:
    """What is wrong with one tensor's header entry, or None: the safetensors library refuses all of these."""
    if not isinstance(entry, dict):
        return f"is described by {_short(entry)} instead of its dtype, shape and data_offsets"
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            return f"has no {field}"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_BITS:
        return f"has dtype {_short(dtype)}, none of the safetensors format's ({', '.join(SAFETENSORS_BITS)})"
    if not _sizes(shape):
        return f"has shape {_short(shape)} instead of a list of sizes"
    if not (_sizes(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        return f"has data_offsets {_short(offsets)} instead of [begin, end]"
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
        raise CheckpointError(f"{name} is damaged: its __metadata__ is {_short(metadata)}, not a table of strings. "
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


def _read_json(path: str) -> object:
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
        index = _read_json(index_path)
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
                                  f"{', '.join(map(_short, outside))}, where diffusers writes .safetensors file names "
                                  f"inside the model folder. Nothing was read from there; re-download the model.")
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise CheckpointError(f"{folder}: the index lists shards that are not there: {', '.join(missing)}")
        return [os.path.join(folder, f) for f in files]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no .safetensors files")
    return [os.path.join(folder, f) for f in files]


def describe_foreign(keys: list[str]) -> str:
    """A guess at what a non-Z-Image file is, from its key names."""
    joined = "\n".join(keys)
    guesses = [
        (r"lora_(A|B|up|down)\b|\.lora\.", "a LoRA: load it with a LoRA loader node, on top of the Z-Image model"),
        (r"double_blocks\.|single_blocks\.", "a FLUX transformer"),
        (r"joint_blocks\.", "a Stable Diffusion 3 transformer"),
        (r"input_blocks\.|conditioner\.embedders|down_blocks\.\d+\.resnets", "a Stable Diffusion / SDXL UNet checkpoint"),
        (r"(^|\.)embed_tokens\.|self_attn\.q_proj", "a language-model text encoder (put it in models/text_encoders)"),
        (r"text_model\.|text_projection", "a CLIP text encoder"),
        (r"(^|\.)(decoder|encoder)\.(conv_in|mid)", "a VAE (put it in models/vae)"),
        (r"transformer_blocks\.", "a transformer of another model family"),
    ]
    for pattern, what in guesses:
        if re.search(pattern, joined, flags=re.M):
            return what
    return "not a Z-Image transformer (first keys: " + ", ".join(sorted(keys)[:4]) + ")"


@dataclass
class CheckpointInfo:
    files: list[str]
    format: str  # "comfyui" or "diffusers"
    variant: str  # "z-image" (Turbo and Base share one layout) or "z-image-omni" (Omni-Base, Edit: SigLIP weights)
    stored_dtype: torch.dtype  # dtype of the big matrices as stored
    config: ZImageConfig
    plan: dict[str, list[str]]
    entries: dict[str, TensorEntry]


def inspect_checkpoint(path: str) -> CheckpointInfo:
    """Identify a transformer file or folder from its headers alone (and a diffusers folder's config.json):
    format, variant, config; a file whose tensors are not exactly that model's raises CheckpointError."""
    files = checkpoint_files(path)
    entries: dict[str, TensorEntry] = {}
    for file in files:
        entries.update(read_safetensors_header(file))
    keys = list(entries)
    name = os.path.basename(path.rstrip("/"))
    if not keys:
        raise CheckpointError(f"{name} holds no tensors")
    prefix = strip_prefix(keys)
    if prefix + "cap_embedder.1.weight" not in entries:
        raise CheckpointError(f"{name} is {describe_foreign(keys)}, not a Z-Image transformer.")
    try:
        plan = conversion_plan(keys)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None

    def shape(engine_name, rank):
        """The shape of a tensor the config is read from: the rank the model has there, no size 0 (a divisor)."""
        sources = plan.get(engine_name)
        if not sources:
            raise CheckpointError(f"{name} is not a complete Z-Image transformer: {engine_name} is missing")
        found = entries[sources[0]].shape
        if len(found) != rank or 0 in found:
            raise CheckpointError(f"{name} is damaged: {sources[0]} has shape {found}, where a Z-Image transformer "
                                  f"has a {rank}-D tensor with no empty side. Re-download it.")
        return found

    dim, patch_dim = shape("x_embedder.weight", 2)
    if dim == 2304:
        raise CheckpointError(f"{name} is a Lumina Image 2.0 transformer, not Z-Image.")
    head_dim = shape("layers.0.attention.q_norm.weight", 1)[0]
    if dim % head_dim or patch_dim % ZImageConfig.patch_size**2:
        raise CheckpointError(f"{name} is damaged or not a Z-Image transformer: its width {dim} is no multiple of its "
                              f"head size {head_dim}, or its patch input {patch_dim} no multiple of "
                              f"{ZImageConfig.patch_size**2}. Re-download it.")
    t_mid, n_freqs = shape("t_embedder.mlp.0.weight", 2)
    variant = "z-image-omni" if any(k.startswith("siglip_") for k in plan) else "z-image"
    fields = dict(
        dim=dim,
        n_layers=_count(plan, "layers"),
        n_refiner_layers=_count(plan, "noise_refiner"),
        n_heads=dim // head_dim,
        ffn_hidden=shape("layers.0.feed_forward.w1.weight", 2)[0],
        in_channels=patch_dim // ZImageConfig.patch_size**2,
        cap_feat_dim=shape("cap_embedder.1.weight", 2)[1],
        t_embed_dim=shape("t_embedder.mlp.2.weight", 2)[0],
        t_embed_mid=t_mid,
        rope_axes=ZImageConfig.rope_axes_for(head_dim),
        siglip_feat_dim=shape("siglip_embedder.1.weight", 2)[1] if variant == "z-image-omni" else None,
    )
    config_json = os.path.join(transformer_folder(path), "config.json")
    taken = config_json_fields(config_json, fields) if os.path.isdir(path) and os.path.isfile(config_json) else {}
    try:
        cfg = ZImageConfig(**fields | taken)
    except ValueError as e:  # e.g. RoPE axes that do not fit the head size
        raise CheckpointError(f"{config_json if taken else name} does not describe a model the engine can build: "
                              f"{e}. Re-download it.") from None
    if _count(plan, "context_refiner") != cfg.n_refiner_layers:
        raise CheckpointError(f"{name}: noise and context refiners differ in depth; not a Z-Image transformer")
    if variant == "z-image-omni" and _count(plan, "siglip_refiner") != cfg.n_refiner_layers:
        raise CheckpointError(f"{name} is an incomplete Z-Image Omni/Edit transformer: its SigLIP refiner has "
                              f"{_count(plan, 'siglip_refiner')} blocks, its other refiners {cfg.n_refiner_layers}")
    check_layout(name, cfg, plan, entries, prefix)
    fmt = "diffusers" if any("to_q" in k or "all_x_embedder" in k for k in keys) else "comfyui"
    stored = SAFETENSORS_DTYPES.get(entries[plan["layers.0.attention.qkv.weight"][0]].dtype, torch.float32)
    return CheckpointInfo(files, fmt, variant, stored, cfg, plan, entries)


# A diffusers folder's transformer/config.json holds ZImageTransformer2DModel's arguments. The ones the headers
# cannot tell (how the head is split between the RoPE axes, and the other constants of the forward) are taken
# from it: config.json key -> ZImageConfig field.
CONFIG_TAKEN = {"axes_dims": "rope_axes", "axes_lens": "rope_lengths", "rope_theta": "rope_theta",
                "norm_eps": "norm_eps", "t_scale": "t_scale"}
# The ones the headers do tell must agree with them: config.json key -> the ZImageConfig field it is.
CONFIG_CHECKED = {"dim": "dim", "n_layers": "n_layers", "n_refiner_layers": "n_refiner_layers", "n_heads": "n_heads",
                  "n_kv_heads": "n_heads",  # the engine's attention has as many key/value heads as query heads
                  "in_channels": "in_channels", "cap_feat_dim": "cap_feat_dim", "siglip_feat_dim": "siglip_feat_dim"}
# And the choices of layout the engine has only one of.
CONFIG_FIXED = {"all_patch_size": [ZImageConfig.patch_size], "all_f_patch_size": [1], "qk_norm": True}


def config_json_fields(path: str, fields: dict) -> dict:
    """The ZImageConfig fields a diffusers config.json gives, after checking it against `fields`, those the
    headers gave."""
    config = _read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is a JSON {type(config).__name__}, not the transformer's settings. Re-download "
                              f"it from the model's repository.")
    for key, field in CONFIG_CHECKED.items():
        if key in config and config[key] != fields[field]:
            raise CheckpointError(f"{path} says {key} is {_short(config[key])}, but the weights beside it make it "
                                  f"{fields[field]!r}: the folder mixes files of different models. Re-download it.")
    for key, value in CONFIG_FIXED.items():
        if key in config and config[key] != value:
            raise CheckpointError(f"{path} says {key} is {_short(config[key])}, where Z-Image has {value!r}, the only "
                                  f"layout this loader runs: the folder holds another model.")
    taken = {}
    for key, field in CONFIG_TAKEN.items():
        if key not in config:
            continue
        value = config[key]
        if isinstance(getattr(ZImageConfig, field), tuple):  # the RoPE axes' sizes and position counts
            if not (isinstance(value, list) and len(value) == 3 and all(type(n) is int and n > 0 for n in value)):
                raise CheckpointError(f"{path} has {key} {_short(value)}, not three positive integers. Re-download "
                                      f"it from the model's repository.")
            taken[field] = tuple(value)
            continue
        if not (type(value) in (int, float) and 0 < value < math.inf):
            raise CheckpointError(f"{path} has {key} {_short(value)}, not a positive number. Re-download it from "
                                  f"the model's repository.")
        taken[field] = float(value)
    return taken


def check_layout(name: str, cfg: ZImageConfig, plan: dict[str, list[str]], entries: dict[str, TensorEntry],
                 prefix: str) -> None:
    """The one place that decides whether a file holds exactly the model `cfg` describes: every parameter present
    with its shape, and every tensor in the file either a parameter (or a part of one), an fp8 weight's scale, or
    skipped() by name. Anything else is refused, so no weight is ever dropped in silence."""
    with torch.device("meta"):
        expected = {k: list(p.shape) for k, p in S3DiT(cfg).named_parameters()}
    used, wrong = set(), []
    for engine_name, sources in plan.items():
        if engine_name not in expected:
            continue  # its sources are left unused: refused below by their names in the file
        used.update(sources)
        shapes = [entries[s].shape for s in sources]
        found = shapes[0] if len(shapes) == 1 else None
        if len(shapes) > 1 and all(len(s) >= 1 and s[1:] == shapes[0][1:] for s in shapes):
            found = [sum(s[0] for s in shapes), *shapes[0][1:]]  # the parts are stacked along dim 0
        if found != expected[engine_name]:
            wrong.append(f"{' + '.join(f'{s} {entries[s].shape}' for s in sources)} (needed {expected[engine_name]})")
        for s in sources:
            scale = _scale_key(s, entries)
            if scale:
                used.add(scale)
                try:  # multiplied into the weight on load: it must broadcast to the weight's shape
                    fits = list(torch.broadcast_shapes(entries[scale].shape, entries[s].shape)) == entries[s].shape
                except RuntimeError:
                    fits = False
                if not fits:
                    wrong.append(f"{scale} {entries[scale].shape} (a scale for {s} {entries[s].shape})")
    unknown = sorted(k for k in entries if k not in used and not skipped(k.removeprefix(prefix)))
    missing = sorted(set(expected) - set(plan))
    if unknown:
        raise CheckpointError(f"{name} holds tensors that a Z-Image transformer does not have: "
                              f"{', '.join(unknown[:8])}{f' and {len(unknown) - 8} more' if len(unknown) > 8 else ''}. "
                              f"It is another model, or a Z-Image variant this loader does not know; it was not "
                              f"loaded, so that none of its weights would be dropped.")
    if missing:
        raise CheckpointError(f"{name} is not a complete Z-Image transformer: missing {', '.join(missing[:8])}"
                              f"{f' and {len(missing) - 8} more' if len(missing) > 8 else ''}. Re-download it.")
    if wrong:
        raise CheckpointError(f"{name} is damaged or not a Z-Image transformer: the shapes of {'; '.join(wrong[:4])} "
                              f"do not fit the model its other tensors describe. Re-download it.")


def _count(plan, stack: str) -> int:
    return len({k.split(".")[1] for k in plan if k.startswith(stack + ".")})


def load_transformer(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                     attention: str = "auto", fp8_matmuls: bool = False, compile: bool = False,
                     cuda_graphs: bool = False) -> S3DiT:
    """Load a Z-Image transformer file or diffusers folder into an S3DiT on `device`.

    dtype None keeps the stored precision (fp8 files load as bfloat16). Tensors are read one at a time
    from the memory-mapped files and written straight into the model on `device`.
    attention, fp8_matmuls, compile, cuda_graphs: how the forward runs, chosen here once (see S3DiT).
    """
    from safetensors import safe_open

    info = inspect_checkpoint(path)
    if dtype is None:
        dtype = torch.bfloat16 if info.stored_dtype.itemsize == 1 else info.stored_dtype
    device = torch.device(device)
    with torch.device("meta"):
        model = S3DiT(info.config, attention=attention)
    # inspect_checkpoint's check_layout has matched every name and shape of the plan to this model
    handles = {}

    def read(key):
        file = info.entries[key].file
        if file not in handles:
            handles[file] = safe_open(file, framework="pt", device="cpu")
        return handles[file].get_tensor(key)

    try:
        for name, sources in info.plan.items():
            tensors = []
            for s in sources:
                scale_key = _scale_key(s, info.entries)  # in any shard of a folder, not only the weight's
                scale = read(scale_key) if scale_key else None
                tensors.append(_dequantize(read(s), scale).to(device=device, dtype=dtype))
            tensor = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
            module_name, _, param_name = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            setattr(module, param_name, torch.nn.Parameter(tensor, requires_grad=False))
    finally:
        handles.clear()
    if fp8_matmuls:
        model.use_fp8_matmuls()
    if compile:
        model.compile_blocks()
    if cuda_graphs:
        model.use_cuda_graphs()
    return model.eval()
