"""The transformer files users have, read without unpickling and without a second copy in memory.

Formats:
- ComfyUI single file (z_image_turbo_bf16.safetensors, fp8 variants): fused `attention.qkv`, `attention.out`,
  `q_norm`/`k_norm`, `feed_forward.w1/w2/w3`; sometimes under a `model.diffusion_model.` prefix.
- diffusers folder: `transformer/diffusion_pytorch_model-0000N-of-0000M.safetensors` plus its index json,
  with `attention.to_q/to_k/to_v/to_out.0`, `norm_q/norm_k`, `all_x_embedder.2-1`, `all_final_layer.2-1`.

Omni-Base and Edit add `siglip_embedder.0/1`, `siglip_refiner.N` (blocks named as the context refiner's) and
`siglip_pad_token`, under the same names in both formats.

The names (which file tensor is which engine weight) are keys.py's; reading the files, files.py's.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .blocks import Ops
from .config import ZImageConfig
from .control import ControlConfig, ControlNet
from .fp8 import use_fp8_matmuls
from .fp8_attention import use_fp8_attention
from .gguf_file import GGUFFile, is_gguf
from .files import (SAFETENSORS_DTYPES, CheckpointError, TensorEntry, checkpoint_files, read_json,
                    read_safetensors_header, read_safetensors_metadata, short_repr, transformer_folder)
from .keys import SCALE_SUFFIXES, engine_key, skipped, strip_prefix
from .model import S3DiT
from .quant import QuantizedWeight, describe, quantized_weights


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


def assemble(sources: list[str], quantized: dict[str, QuantizedWeight], read: Callable[[str], torch.Tensor]
             ) -> torch.Tensor:
    """One engine tensor from its source tensors (conversion_plan): each read, a quantized one dequantized
    (quant.py; its scales may sit in any shard of a folder, not only the weight's), a plain fp8 one as float32,
    and the parts stacked along dim 0."""
    tensors = []
    for source in sources:
        tensor = quantized[source].dequantize(read) if source in quantized else read(source)
        tensors.append(tensor.float() if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else tensor)
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ComfyUI- or diffusers-format transformer state dict -> the engine's names (quantized weights
    dequantized)."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    entries = {k: TensorEntry("", names.get(v.dtype, str(v.dtype)), list(v.shape)) for k, v in state_dict.items()}
    quantized = quantized_weights("the state dict", entries, state_dict.__getitem__)
    return {name: assemble(sources, quantized, state_dict.__getitem__)
            for name, sources in conversion_plan(state_dict).items()}


def _quantized(name: str, files: list[str], entries: dict[str, TensorEntry]) -> dict[str, QuantizedWeight]:
    """A file's (or folder's) quantized weights (quant.py), from its layers' markers and its files' metadata."""
    from safetensors import safe_open

    metadata = {}
    for file in files:
        metadata |= read_safetensors_metadata(file)
    handles = {}

    def read(key):  # only the markers, a few bytes each
        file = entries[key].file
        if file not in handles:
            handles[file] = safe_open(file, framework="pt", device="cpu")
        return handles[file].get_tensor(key)

    try:
        return quantized_weights(name, entries, read, metadata)
    finally:
        handles.clear()


def describe_foreign(keys: list[str]) -> str:
    """A guess at what a non-Z-Image file is, from its key names."""
    joined = "\n".join(keys)
    guesses = [
        (r"lora_(A|B|up|down)\b|\.lora\.", "a LoRA: load it with a LoRA loader node, on top of the Z-Image model"),
        (r"double_blocks\.|single_blocks\.", "a FLUX transformer"),
        (r"joint_blocks\.", "a Stable Diffusion 3 transformer"),
        (r"input_blocks\.|conditioner\.embedders|down_blocks\.\d+\.resnets", "a Stable Diffusion / SDXL UNet checkpoint"),
        (r"(^|\.)vision_model\.|(^|\.)patch_embedding\.", "a CLIP/SigLIP vision encoder (put it in models/clip_vision)"),
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
    format: str  # "comfyui", "diffusers" or "gguf" (gguf_file.py)
    variant: str  # "z-image" (Turbo and Base share one layout) or "z-image-omni" (Omni-Base, Edit: SigLIP weights)
    stored_dtype: torch.dtype  # dtype of the big matrices as stored (uint8: GGUF blocks, a quantization's bytes)
    config: ZImageConfig
    plan: dict[str, list[str]]
    entries: dict[str, TensorEntry]
    quantized: dict[str, QuantizedWeight] = dataclasses.field(default_factory=dict)  # weight key -> its format

    @property
    def quantization(self) -> str:
        """What the file's quantized weights are ("" for none), e.g. "240 nvfp4"."""
        return describe(self.quantized)


def inspect_checkpoint(path: str) -> CheckpointInfo:
    """Identify a transformer file or folder from its headers alone (and a diffusers folder's config.json):
    format, variant, config; a file whose tensors are not exactly that model's raises CheckpointError."""
    files = checkpoint_files(path)
    entries: dict[str, TensorEntry] = {}
    for file in files:
        entries.update(GGUFFile(file).entries if is_gguf(file) else read_safetensors_header(file))
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
        n_layers=_depth(plan, "layers"),
        n_refiner_layers=_depth(plan, "noise_refiner"),
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
    for stack, depth in cfg.block_stacks.items():
        if _depth(plan, stack) != depth:
            raise CheckpointError(f"{name} is an incomplete Z-Image{' Omni/Edit' if cfg.siglip_feat_dim else ''} "
                                  f"transformer: its {stack} has {_depth(plan, stack)} blocks, where the rest of it "
                                  f"makes {depth}. Re-download it.")
    # ComfyUI's quantized repacks are safetensors files; a GGUF's quantization is its tensors' GGML types
    quantized = {} if is_gguf(files[0]) else _quantized(name, files, entries)
    check_layout(name, cfg, plan, entries, prefix, quantized)
    fmt = "diffusers" if any("to_q" in k or "all_x_embedder" in k for k in keys) else "comfyui"
    stored = SAFETENSORS_DTYPES.get(entries[plan["layers.0.attention.qkv.weight"][0]].dtype, torch.float32)
    qkv = quantized.get(plan["layers.0.attention.qkv.weight"][0])
    if qkv is not None and qkv.format in ("nvfp4", "int8_tensorwise"):
        stored = torch.bfloat16  # nothing computes in these: they load dequantized, as bf16 unless told otherwise
    if is_gguf(files[0]):  # its float types have safetensors' names; the others are GGML blocks, kept as bytes
        fmt = "gguf"
        stored = SAFETENSORS_DTYPES.get(entries[plan["layers.0.attention.qkv.weight"][0]].dtype, torch.uint8)
    return CheckpointInfo(files, fmt, variant, stored, cfg, plan, entries, quantized)


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
    config = read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is a JSON {type(config).__name__}, not the transformer's settings. Re-download "
                              f"it from the model's repository.")
    for key, field in CONFIG_CHECKED.items():
        if key in config and config[key] != fields[field]:
            raise CheckpointError(f"{path} says {key} is {short_repr(config[key])}, but the weights beside it make it "
                                  f"{fields[field]!r}: the folder mixes files of different models. Re-download it.")
    for key, value in CONFIG_FIXED.items():
        if key in config and config[key] != value:
            raise CheckpointError(f"{path} says {key} is {short_repr(config[key])}, where Z-Image has {value!r}, the only "
                                  f"layout this loader runs: the folder holds another model.")
    taken = {}
    for key, field in CONFIG_TAKEN.items():
        if key not in config:
            continue
        value = config[key]
        if isinstance(getattr(ZImageConfig, field), tuple):  # the RoPE axes' sizes and position counts
            if not (isinstance(value, list) and len(value) == 3 and all(type(n) is int and n > 0 for n in value)):
                raise CheckpointError(f"{path} has {key} {short_repr(value)}, not three positive integers. Re-download "
                                      f"it from the model's repository.")
            taken[field] = tuple(value)
            continue
        if not (type(value) in (int, float) and 0 < value < math.inf):
            raise CheckpointError(f"{path} has {key} {short_repr(value)}, not a positive number. Re-download it from "
                                  f"the model's repository.")
        taken[field] = float(value)
    return taken


def check_layout(name: str, cfg: ZImageConfig, plan: dict[str, list[str]], entries: dict[str, TensorEntry],
                 prefix: str, quantized: dict[str, QuantizedWeight]) -> None:
    """Whether a file holds exactly the transformer `cfg` describes (check_names)."""
    with torch.device("meta"):
        expected = {k: list(p.shape) for k, p in S3DiT(cfg).named_parameters()}
    check_names(name, expected, plan, entries, prefix, quantized=quantized)


def check_names(name: str, expected: dict[str, list[int]], plan: dict[str, list[str]],
                entries: dict[str, TensorEntry], prefix: str = "", what: str = "Z-Image transformer",
                quantized: dict[str, QuantizedWeight] | None = None) -> None:
    """The one place that decides whether a file holds exactly the model whose parameters' shapes are `expected`:
    every parameter present with its shape (a quantized weight's: the shape it stands for), and every tensor in the
    file either a parameter (or a part of one), a quantized weight's scale or marker, or skipped() by name.
    Anything else is refused, so no weight is ever dropped in silence."""
    used, wrong, quantized = set(), [], quantized or {}
    for engine_name, sources in plan.items():
        if engine_name not in expected:
            continue  # its sources are left unused: refused below by their names in the file
        used.update(sources)
        for s in sources:
            used.update(quantized[s].companions if s in quantized else ())
        shapes = [list(quantized[s].shape) if s in quantized else entries[s].shape for s in sources]
        found = shapes[0] if len(shapes) == 1 else None
        if len(shapes) > 1 and all(len(s) >= 1 and s[1:] == shapes[0][1:] for s in shapes):
            found = [sum(s[0] for s in shapes), *shapes[0][1:]]  # the parts are stacked along dim 0
        if found != expected[engine_name]:
            wrong.append(f"{' + '.join(f'{s} {shape}' for s, shape in zip(sources, shapes))} "
                         f"(needed {expected[engine_name]})")
    unknown = sorted(k for k in entries if k not in used and not skipped(k.removeprefix(prefix)))
    missing = sorted(set(expected) - set(plan))
    if unknown:
        raise CheckpointError(f"{name} holds tensors that a {what} does not have: "
                              f"{', '.join(unknown[:8])}{f' and {len(unknown) - 8} more' if len(unknown) > 8 else ''}. "
                              f"It is another model, or a Z-Image variant this loader does not know; it was not "
                              f"loaded, so that none of its weights would be dropped.")
    if missing:
        raise CheckpointError(f"{name} is not a complete {what}: missing {', '.join(missing[:8])}"
                              f"{f' and {len(missing) - 8} more' if len(missing) > 8 else ''}. Re-download it.")
    if wrong:
        raise CheckpointError(f"{name} is damaged or not a {what}: the shapes of {'; '.join(wrong[:4])} "
                              f"do not fit the model its other tensors describe. Re-download it.")


def _depth(plan, stack: str) -> int:
    return len({k.split(".")[1] for k in plan if k.startswith(stack + ".")})


def load_transformer(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                     attention: str = "auto", fp8_matmuls: bool = False, fp8_attention: bool = False,
                     ops: Ops = Ops()) -> S3DiT:
    """Load a Z-Image transformer file or diffusers folder into an S3DiT on `device`.

    dtype None keeps the stored precision (fp8 files load as bfloat16). Tensors are read one at a time
    from the memory-mapped files and written straight into the model on `device`.
    A GGUF file's block-quantized matrices of the block stacks stay quantized: each becomes an
    ops.QuantizedLinear holding its bytes, dequantized to `dtype` at each use (quantized.py); its other tensors
    are dequantized here (GGUF's own choice leaves them in BF16, F16 or F32 anyway).
    attention: the SDPA kernel preference (attention.BACKENDS). fp8_matmuls: the blocks' matrices as e4m3 with
    FP8 matrix multiplies (fp8.use_fp8_matmuls; not for quantized GGUF matrices, which keep their own
    quantization). fp8_attention: attention in FP8 where cuDNN's FP8 kernel runs (fp8_attention.py; elsewhere the
    `attention` kernels). ops: the layer classes, a host's own (blocks.Ops).
    How its forwards run (CUDA graphs, compile, streaming) is a Runner's (runner.py).
    """
    from safetensors import safe_open

    info = inspect_checkpoint(path)
    if dtype is None:
        dtype = torch.bfloat16 if info.stored_dtype.itemsize == 1 else info.stored_dtype
    device = torch.device(device)
    with torch.device("meta"):
        model = S3DiT(info.config, attention=attention, ops=ops)
    # inspect_checkpoint's check_layout has matched every name and shape of the plan to this model
    handles = {}
    gguf = GGUFFile(info.files[0]) if info.format == "gguf" else None
    if gguf is not None and fp8_matmuls and info.stored_dtype == torch.uint8:
        raise ValueError(f"{os.path.basename(path)} is a quantized GGUF: its matrices keep their own quantization "
                         f"and are dequantized at each use, so there are no bf16 weights to compute in FP8. Load "
                         f"it without fp8_matmuls, or use the safetensors model for FP8.")

    def read(key):
        if gguf is not None:
            return gguf.read(key)
        file = info.entries[key].file
        if file not in handles:
            handles[file] = safe_open(file, framework="pt", device="cpu")
        return handles[file].get_tensor(key)

    try:
        for name, sources in info.plan.items():
            if gguf is not None and _keep_quantized(model, name, sources, gguf, device):
                continue
            tensor = assemble(sources, info.quantized, read).to(device=device, dtype=dtype)
            module_name, _, param_name = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            setattr(module, param_name, torch.nn.Parameter(tensor, requires_grad=False))
    finally:
        handles.clear()
    if fp8_matmuls:
        use_fp8_matmuls(model)
    if fp8_attention:
        use_fp8_attention(model)
    return model.eval()


def _keep_quantized(model: S3DiT, name: str, sources: list[str], gguf: GGUFFile, device: torch.device) -> bool:
    """Put a GGUF matrix into `model` as an ops.QuantizedLinear holding its blocks, where it is the weight of a
    linear layer of a block stack stored in one block quantization; False (nothing done) otherwise. The layer's
    bias, loaded before or after, is the QuantizedLinear's."""
    module_name, _, param_name = name.rpartition(".")
    if param_name != "weight" or name.split(".")[0] not in model.cfg.block_stacks:
        return False
    module = model.get_submodule(module_name)
    if not isinstance(module, torch.nn.Linear):
        return False
    blocks = gguf.quantized_rows(sources)
    if blocks is None:
        return False
    raw, qtype = blocks
    owner, _, attr = module_name.rpartition(".")
    setattr(model.get_submodule(owner), attr,
            model.ops.QuantizedLinear(raw.to(device), qtype, module.in_features, module.bias))
    return True


def inspect_controlnet(path: str) -> tuple[ZImageConfig, ControlConfig, dict[str, list[str]], dict[str, TensorEntry]]:
    """A Fun ControlNet file (models/model_patches): the shape of the model it is for, its own shape, and its plan.
    Versions are told apart as ComfyUI's ModelPatchLoader tells them: 15 control layers (2.0), 3 (2.1 lite) or 6
    (1.0), the control input's channels, whether the refiner blocks give hints, and the 2.0 file whose refiner
    hints are all zero ("broken", which needs the tensor itself)."""
    name = os.path.basename(path)
    entries = {}
    for file in checkpoint_files(path):
        entries.update(read_safetensors_header(file))
    if not any(k.startswith("control_layers.") for k in entries):
        raise CheckpointError(f"{name} is not a Z-Image Fun ControlNet: it has no control_layers.")
    plan = conversion_plan(entries)

    def shape(key, rank):
        if key not in plan or len(entries[plan[key][0]].shape) != rank or 0 in entries[plan[key][0]].shape:
            raise CheckpointError(f"{name} is damaged or not a Z-Image Fun ControlNet: {key} is missing or has the "
                                  f"wrong shape. Re-download it.")
        return entries[plan[key][0]].shape

    dim, patch_in = shape("control_x_embedder.weight", 2)
    head_dim = shape("control_layers.0.attention.q_norm.weight", 1)[0]
    cfg = ZImageConfig(dim=dim, n_heads=dim // head_dim, ffn_hidden=shape("control_layers.0.feed_forward.w1.weight", 2)[0],
                       t_embed_dim=shape("control_layers.0.adaLN_modulation.0.weight", 2)[1],
                       rope_axes=ZImageConfig.rope_axes_for(head_dim))
    refiner_control = "control_noise_refiner.0.after_proj.weight" in plan
    control = ControlConfig(n_control_layers=_depth(plan, "control_layers"),
                            n_refiner_layers=_depth(plan, "control_noise_refiner"),
                            in_channels=patch_in // cfg.patch_size ** 2, refiner_control=refiner_control)
    if refiner_control and control.n_control_layers == 15:  # ComfyUI checks the 2.0 files alone
        from safetensors import safe_open

        source = plan["control_noise_refiner.0.after_proj.weight"][0]
        with safe_open(entries[source].file, framework="pt") as f:
            broken = torch.count_nonzero(f.get_tensor(source)).item() == 0
        control = ControlConfig(**{**control.__dict__, "broken": broken})
    with torch.device("meta"):
        expected = {k: list(p.shape) for k, p in ControlNet(cfg, control).named_parameters()}
    check_names(name, expected, plan, entries, what="Z-Image Fun ControlNet",
                quantized=_quantized(name, checkpoint_files(path), entries))
    return cfg, control, plan, entries


def load_controlnet(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    attention: str = "auto", ops: Ops = Ops()) -> ControlNet:
    """A Fun ControlNet file as the engine's ControlNet, on `device` in `dtype` (None: as stored)."""
    from safetensors import safe_open

    cfg, control, plan, entries = inspect_controlnet(path)
    quantized = _quantized(os.path.basename(path), checkpoint_files(path), entries)
    with torch.device("meta"):
        net = ControlNet(cfg, control, attention=attention, ops=ops)
    handles = {}
    try:
        for engine_name, sources in plan.items():
            def read(key):
                file = entries[key].file
                handles.setdefault(file, safe_open(file, framework="pt", device="cpu"))
                return handles[file].get_tensor(key)
            tensor = assemble(sources, quantized, read)
            owner, _, attr = engine_name.rpartition(".")
            setattr(net.get_submodule(owner), attr, torch.nn.Parameter(
                tensor.to(device=device, dtype=dtype or tensor.dtype), requires_grad=False))
    finally:
        handles.clear()
    return net.eval()
