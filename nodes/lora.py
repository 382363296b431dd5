"""ZImageLoraLoader: LoRAs in every naming Z-Image trainers write, every key applied or a clear error.

ComfyUI's own key map for Z-Image covers its native names and diffusers/PEFT names (to_q, to_k, to_v land
on slices of the fused qkv). Kohya-style names (Musubi Tuner: lora_unet_layers_0_attention_to_q) are added
here from the same diffusers table. Patches go through ComfyUI's ModelPatcher, which merges them into the
weights once when the model is loaded, not at every step.
"""

from __future__ import annotations

import logging
import math

import comfy.lora
import comfy.lora_convert
import comfy.utils
import comfy.weight_adapter
import folder_paths

from .comfy_model import engine_of

PEFT_PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.")


def zimage_lora_key_map(model_patcher) -> dict:
    """LoRA module name -> weight key (or (key, (dim, offset, size)) slice), for every naming we accept."""
    key_map = comfy.lora.model_lora_keys_unet(model_patcher.model, {})
    cfg = engine_of(model_patcher).cfg
    diffusers = comfy.utils.z_image_to_diffusers(
        {"n_layers": cfg.n_layers, "dim": cfg.dim, "n_refiner_layers": cfg.n_refiner_layers},
        output_prefix="diffusion_model.")
    state = model_patcher.model.state_dict()
    for name, target in diffusers.items():
        key = target[0] if isinstance(target, tuple) else target
        if not name.endswith(".weight") or key not in state:
            continue
        module = name[: -len(".weight")]
        key_map["lora_unet_" + module.replace(".", "_")] = target
        key_map["lora_transformer_" + module.replace(".", "_")] = target
        for prefix in PEFT_PREFIXES:
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


def _misfits(model_patcher, patches: dict) -> list[str]:
    """Patches whose matrices do not fit their weight (a LoRA of another model that reuses these module names,
    such as Lumina 2's): ComfyUI would skip each at load time with only an error line in the log."""
    state = model_patcher.model.state_dict()
    misfits = []
    for target, patch in patches.items():
        key, offset = (target, None) if isinstance(target, str) else target
        if key not in state:
            continue  # reported by apply_lora as found no weight
        shape = list(state[key].shape)
        if offset is not None:
            shape[offset[0]] = offset[2]
        if isinstance(patch, comfy.weight_adapter.LoRAAdapter):
            up, down, _alpha, mid, _dora_scale, reshape = patch.weights
            if mid is not None or reshape is not None:
                continue
            have, want = [up.shape[0], down[0].numel()], [shape[0], math.prod(shape[1:])]
        elif isinstance(patch, tuple) and len(patch) == 2 and patch[0] == "diff" and len(patch[1]) == 1:
            have, want = list(patch[1][0].shape), shape
        else:
            continue  # other adapter types are left to ComfyUI
        if have != want:
            misfits.append(f"{key}{'' if offset is None else f' rows {offset[1]}:{offset[1] + offset[2]}'}: "
                           f"LoRA {have} vs model {want}")
    return misfits


def apply_lora(model_patcher, lora_sd: dict, strength: float):
    """A clone of model_patcher with the LoRA's patches added; raises if any LoRA key would be ignored."""
    lora_sd = comfy.lora_convert.convert_lora(lora_sd)
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
                         f"{'; '.join(misfits[:3])}). Is it a LoRA for another model or model size?")
    patched = model_patcher.clone()
    applied = set(patched.add_patches(patches, strength))
    unapplied = [k if isinstance(k, str) else k[0] for k in patches if k not in applied]
    if unapplied:
        raise ValueError(f"{len(unapplied)} LoRA patches found no weight in the model: {', '.join(unapplied[:3])}")
    return patched


class ZImageLoraLoader:
    DESCRIPTION = ("Applies a Z-Image LoRA (ai-toolkit / diffusers PEFT, kohya / Musubi Tuner, or ComfyUI naming). "
                   "Every key must land on a weight; weights are merged once at load, so sampling speed is unchanged.")
    CATEGORY = "Z-Image"
    RETURN_TYPES = ("MODEL",)
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
        engine_of(model)
        if strength == 0:
            return (model,)
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        if not path.endswith((".safetensors", ".sft")):
            raise ValueError(f"{lora_name} is not a .safetensors file; pickled LoRAs are never opened.")
        lora_sd = comfy.utils.load_torch_file(path, safe_load=True)
        try:
            return (apply_lora(model, lora_sd, strength),)
        except ValueError as e:
            raise ValueError(f"ZImageLoraLoader ({lora_name}): {e}") from None
