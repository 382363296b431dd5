"""ZImageLoraLoader: LoRAs in every naming Z-Image trainers write, every key applied or a clear error.

ComfyUI's own key map covers the native names. The diffusers names (to_q, to_k, to_v land on slices of the fused
qkv), under every prefix trainers write and in kohya style (Musubi Tuner: lora_unet_layers_0_attention_to_q),
come from the engine's one table of names (zimage.source_keys), which also loads the diffusers files. A file's
text-encoder (Qwen3) keys cannot apply to a MODEL: they are set aside and named, with the advice to load them
onto the CLIP; a file of nothing else is refused. Patches go through ComfyUI's ModelPatcher, which merges them
into the weights once when the model is loaded, not at every step (a GGUF model's quantized matrices cannot hold a
merged weight: they are patched at each use, nodes/comfy_model.py's ComfyQuantizedLinear). ComfyUI skips a key that
matches no weight, or a patch it cannot compute, with a log line; here either is an error naming it (_MissedKeys,
_misfits).
"""

from __future__ import annotations

import logging
import re
import threading

import torch
from torch.overrides import TorchFunctionMode

import comfy.lora
import comfy.lora_convert
import comfy.utils
import comfy.weight_adapter
import folder_paths

from .checks import require_finite
from ..zimage import CheckpointError, QuantizedLinear, WorkerRunner, read_safetensors_header, source_keys
from .comfy_model import engine_of

# What trainers write in front of a module's dotted name (ComfyUI's or diffusers'): nothing (DiffSynth-Studio,
# which saves its own DiT's parameters, named as diffusers names them), ai-toolkit's diffusion_model., diffusers'
# transformer., PEFT's base_model.model., and the ones InvokeAI reads (its Z-Image LoRA conversion strips
# base_model.model.transformer.[diffusion_model.] and transformer.diffusion_model.).
DOTTED_PREFIXES = ("", "diffusion_model.", "transformer.", "base_model.model.", "base_model.model.transformer.",
                   "transformer.diffusion_model.", "base_model.model.transformer.diffusion_model.")
# ... and in front of the name with "_" for ".": kohya / Musubi Tuner, OneTrainer, and VideoX-Fun's distilled
# Z-Image LoRAs (lora_unet__layers_0_attention_to_q, as InvokeAI and diffusers read them)
FLAT_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_unet__")

# Keys of a text-encoder (Qwen3) part that some files carry beside the transformer's: under a text-encoder
# prefix (kohya's lora_te_ / lora_te1_, diffusers' text_encoder., PEFT's base_model.model.text_encoder. as InvokeAI
# reads it, ComfyUI's text_encoders., te. / te1.), or with Qwen3's own module names under any prefix or none
# (DiffSynth-Studio's: model.layers.0.self_attn.q_proj). No transformer module has such a name
# (test_no_transformer_module_is_taken_for_the_text_encoder), so no transformer key is set aside by mistake.
TEXT_ENCODER_KEY = re.compile(r"^(lora_te\d*_|text_encoders?(_\d+)?\.|te\d*\.|base_model\.model\.text_encoder\.)"
                              r"|(^|[._])(layers[._]\d+[._](self_attn|mlp)|embed_tokens)[._]")
# how ComfyUI names Z-Image's text encoder in a LoRA: the only naming its LoraLoader applies to that CLIP
COMFY_TEXT_ENCODER_PREFIX = "text_encoders.qwen3_4b.transformer."


def zimage_lora_key_map(model_patcher) -> dict:
    """LoRA module name -> weight key (or (key, (dim, offset, size)) slice), for every naming we accept."""
    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    engine_of(model_patcher)
    for name, weight in model_patcher.model.diffusion_model.named_parameters():
        if not name.endswith(".weight"):
            continue
        key = "diffusion_model." + name
        for source, part, parts in source_keys(name):
            rows = weight.shape[0] // parts
            target = key if parts == 1 else (key, (0, part * rows, rows))
            module = source[: -len(".weight")]
            for prefix in FLAT_PREFIXES:
                key_map[prefix + module.replace(".", "_")] = target
            for prefix in DOTTED_PREFIXES:
                key_map[prefix + module] = target
    return key_map


class _MissedKeys(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.keys = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("lora key not loaded"):
            self.keys.append(message.split(":", 1)[-1].strip())


# the calls that read a tensor's values, which a tensor on the meta device does not have
VALUE_READS = frozenset({torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__,
                         torch.Tensor.__int__, torch.Tensor.__index__})


class _PatchProbe(TorchFunctionMode):
    """Watches ComfyUI compute one patch onto a weight of `shape`, noting each change it hands over (to the
    patch's function before adding it, or copied in by a "set" patch), the shape of every product that it
    reshapes into the weight's shape, and whether its math read a tensor's values."""

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.shape = shape
        self.changes = []
        self.read_values = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.read_values |= func in VALUE_READS
        out = func(*args, **(kwargs or {}))
        if func in (torch.Tensor.reshape, torch.reshape) and out.shape == self.shape:
            # ComfyUI fits a product (LoRA up @ down, LoHa, LoKr, GLoRA) to the weight with
            # reshape(weight.shape), meant to unflatten a conv kernel's trailing dimensions. A product with the
            # weight's element count but other rows (a LoRA for the transposed matrix, for w2 instead of w1)
            # would be scrambled into it without an error: its rows must be the weight's.
            if args[0].shape[:1] != out.shape[:1]:
                self.changes.append(args[0].shape)
        elif func is torch.Tensor.copy_ and args[0].shape == self.shape:
            self.changes.append(args[1].shape)
        return out

    def function(self, change: torch.Tensor) -> torch.Tensor:
        self.changes.append(change.shape)
        return change


class _Silenced(logging.Filter):
    """Keeps the warnings and errors this thread logs while it is installed (ComfyUI logs a patch that fails to
    compute, and goes on), instead of printing them: the node's own error reports the patch."""

    def __init__(self):
        super().__init__()
        self.records = []

    def filter(self, record):
        if record.levelno < logging.WARNING or record.thread != threading.get_ident():
            return True
        self.records.append(record)
        return False


def _computes(patch, key: str, shape: torch.Size, offset, target: torch.Size,
              device: str) -> tuple[bool, list[torch.Size], bool]:
    """Has ComfyUI compute `patch` at strength 1 onto a weight of `shape` on `device` (onto its `target` part
    where `offset` names one): (whether it went through without an exception or a logged failure, the
    changes it handed over, whether it read tensor values)."""
    probe = _PatchProbe(target)
    silenced = _Silenced()
    root = logging.getLogger()
    root.addFilter(silenced)
    try:
        with probe:
            weight = torch.zeros(shape, device=device)
            comfy.lora.calculate_weight([(1.0, patch, 1.0, offset, probe.function)], weight, key)
        ok = True
    except Exception:  # ComfyUI lets some adapters' errors through (LoHa's and LoKr's products, GLoRA's rank)
        ok = False
    finally:
        root.removeFilter(silenced)
    return ok and not silenced.records, probe.changes, probe.read_values


def _describe(patch) -> str:
    """The patch's kind and its tensors' shapes, e.g. "lora [96, 4] [5, 64]", for the error message."""
    if isinstance(patch, comfy.weight_adapter.WeightAdapterBase):
        kind, values = patch.name, patch.weights
    elif len(patch) == 2 and isinstance(patch[0], str):
        kind, values = patch
    else:
        kind, values = "diff", patch
    shapes = [list(v.shape) for v in values if isinstance(v, torch.Tensor)]
    return " ".join([kind, *map(str, shapes)])


def _misfits(model_patcher, patches: dict) -> list[str]:
    """Patches that would not change their weight as written, each with what is wrong: their tensors do not
    make a change of the weight's shape (another model's LoRA reusing these module names, such as Lumina 2's;
    a file whose down and up ranks differ) or the math fails. ComfyUI would go on with the weight unchanged
    and at most an error line in the log.

    Each patch is computed by ComfyUI's own code, for every adapter type it has, on a weight on the meta
    device: shapes without values, so nothing of the model's size is allocated or multiplied. Math that
    branches on a value (OFT's and BOFT's constraint) cannot run there; such a patch is computed again on a
    zero weight in memory."""
    state = model_patcher.model.state_dict()
    misfits = []
    for target, patch in patches.items():
        key, offset = (target, None) if isinstance(target, str) else target[:2]
        if key not in state:
            continue  # reported by apply_lora as found no weight
        shape = _logical_shape(model_patcher.model, key, state[key])
        want = shape if offset is None else shape[:offset[0]] + (offset[2],) + shape[offset[0] + 1:]
        ok, changes, read_values = _computes(patch, key, shape, offset, want, "meta")
        if not ok and read_values:
            ok, changes, _ = _computes(patch, key, shape, offset, want, "cpu")
        wrong = [c for c in changes if c != want]
        if ok and changes and not wrong:
            continue
        problem = f"makes a {list(wrong[0])} change" if ok and wrong else "cannot make a change"
        rows = "" if offset is None else f" rows {offset[1]}:{offset[1] + offset[2]}"
        misfits.append(f"{key}{rows}: {_describe(patch)} {problem} for the model's {list(want)} weight")
    return misfits


def _logical_shape(model, key: str, tensor: torch.Tensor) -> torch.Size:
    """The shape of the weight a patch changes: a quantized matrix's own (its parameter holds its bytes,
    QuantizedLinear.weight_shape), any other tensor's shape."""
    owner, _, name = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return module.weight_shape if name == "weight" and isinstance(module, QuantizedLinear) else tensor.shape


def _text_encoder_advice(keys: list[str]) -> str:
    """What to do with a LoRA's text-encoder keys, which a MODEL cannot take."""
    examples = keys[:: -(-len(keys) // 3)]  # three from across the sorted keys: not one module's three tensors
    advice = (f"{len(keys)} of its keys are for a text encoder, not the transformer (e.g. "
              f"{', '.join(examples)}), and this node changes only the model: apply them to the CLIP with a CLIP "
              f"LoRA loader, such as ComfyUI's LoraLoader on the CLIP with strength_model 0")
    others = [k for k in keys if not k.startswith(COMFY_TEXT_ENCODER_PREFIX)]
    if others:
        # ComfyUI's LoraLoader would skip these with a log line each: the advice alone would lose them silently
        advice += (f"; that one takes them only in ComfyUI's naming ({COMFY_TEXT_ENCODER_PREFIX}model.layers.N...) "
                   f"and would skip the {len(others)} named otherwise")
    return advice + "."


def apply_lora(model_patcher, lora_sd: dict, strength: float):
    """A clone of model_patcher with the LoRA's transformer patches added, and notes for the user (on its
    text-encoder part, which is not applied); raises if any other LoRA key would be ignored."""
    # one NaN or infinity in a patch spreads through the merged weight to every pixel: a black image, and no error
    non_finite = [k for k, v in lora_sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if non_finite:
        raise ValueError(f"{len(non_finite)} tensors of this LoRA hold NaN or infinite values (e.g. "
                         f"{', '.join(non_finite[:3])}); merged, they would make every image black. The file is "
                         f"damaged, or was saved from a training run that diverged: re-download it, or use an "
                         f"earlier checkpoint of the training.")
    text_encoder = sorted(k for k in lora_sd if TEXT_ENCODER_KEY.search(k))
    transformer = {k: v for k, v in lora_sd.items() if not TEXT_ENCODER_KEY.search(k)}
    if text_encoder and not transformer:
        raise ValueError("this LoRA holds no weights for the Z-Image transformer: "
                         + _text_encoder_advice(text_encoder))
    lora_sd = comfy.lora_convert.convert_lora(transformer)
    missed = _MissedKeys()
    root = logging.getLogger()
    root.addHandler(missed)
    try:
        patches = comfy.lora.load_lora(lora_sd, zimage_lora_key_map(model_patcher))
    finally:
        root.removeHandler(missed)
    if missed.keys:
        raise ValueError(f"this LoRA has {len(missed.keys)} keys that do not match Z-Image's weights (e.g. "
                         f"{', '.join(missed.keys[:3])}). Is it a LoRA for another model?")
    if not patches:
        raise ValueError("this LoRA holds no weights that apply to Z-Image")
    misfits = _misfits(model_patcher, patches)
    if misfits:
        raise ValueError(f"{len(misfits)} LoRA weights do not fit this Z-Image model's shapes (e.g. "
                         f"{'; '.join(misfits[:3])}). Is it a LoRA for another model or model size? If it is "
                         f"for this one, the file is damaged: re-download it.")
    patched = model_patcher.clone()
    applied = set(patched.add_patches(patches, strength))
    unapplied = [k if isinstance(k, str) else k[0] for k in patches if k not in applied]
    if unapplied:
        raise ValueError(f"{len(unapplied)} LoRA patches found no weight in the model: {', '.join(unapplied[:3])}")
    if not text_encoder:
        return patched, []
    return patched, [f"applied its transformer part ({len(patches)} modules); " + _text_encoder_advice(text_encoder)]


class ZImageLoraLoader:
    DESCRIPTION = ("Applies a Z-Image LoRA (ai-toolkit / diffusers PEFT, kohya / Musubi Tuner, OneTrainer, "
                   "DiffSynth-Studio, InvokeAI or ComfyUI naming; LyCORIS LoHa and LoKr too). Every key must land on a "
                   "weight; weights are merged once at load, so sampling speed is unchanged (a GGUF model's quantized "
                   "matrices are patched as they are dequantized, at each use). A text-encoder part in "
                   "the file is not applied here: the node says so and how to apply it to the CLIP.")
    CATEGORY = "Z-Image"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)  # as ZImageLoader's output, whose place it takes
    OUTPUT_TOOLTIPS = ("The model with the LoRA applied.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A model from ZImageLoader."}),
            "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "A LoRA from models/loras."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "How strongly the LoRA changes the weights; 0 leaves the model as it is."}),
        }}

    def load(self, model, lora_name, strength):
        if isinstance(engine_of(model), WorkerRunner):
            raise ValueError("ZImageLoraLoader: LoRAs do not apply to a model across GPUs yet (its weights live in "
                             "its worker processes). Load the model with ZImageLoader on one GPU to use LoRAs.")
        require_finite("ZImageLoraLoader", strength=strength)
        if strength == 0:
            return {"ui": {"text": []}, "result": (model,)}
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        if not path.endswith((".safetensors", ".sft")):
            raise ValueError(f"{lora_name} is not a .safetensors file; pickled LoRAs are never opened.")
        try:
            # the checks the transformer's loader makes: a truncated download or another format, named as such
            read_safetensors_header(path)
        except CheckpointError as e:
            raise ValueError(f"ZImageLoraLoader: {e}") from None
        lora_sd = comfy.utils.load_torch_file(path, safe_load=True)
        try:
            patched, notes = apply_lora(model, lora_sd, strength)
        except ValueError as e:
            raise ValueError(f"ZImageLoraLoader ({lora_name}): {e}") from None
        notes = [f"ZImageLoraLoader ({lora_name}): {note}" for note in notes]
        for note in notes:
            logging.warning(note)
        return {"ui": {"text": notes}, "result": (patched,)}
