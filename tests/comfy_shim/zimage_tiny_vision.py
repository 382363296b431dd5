"""Test-only ComfyUI custom node (never shipped with the pack): tiny SigLIP vision encoders.

ComfyUI recognises a SigLIP file by its full size (27 layers, hidden 1152) and builds it from a json config in
its own tree. The test server adds two more configs, a tiny fixed-size SigLIP and (on ComfyUI versions that
have SigLIP2 NaFlex, 0.14 and later) a tiny NaFlex SigLIP2, and recognises the tiny files by their hidden size
and, as ComfyUI does, NaFlex by its 2-D patch embedding. CLIPVisionLoader, the preprocessing and the encoder's
forward are ComfyUI's own code, unchanged.
"""

import json
import os
import tempfile

import comfy.clip_vision

TINY_HIDDEN = 24
CONFIG = {"num_channels": 3, "hidden_act": "gelu_pytorch_tanh", "hidden_size": TINY_HIDDEN, "image_size": 64,
          "intermediate_size": 48, "model_type": "siglip_vision_model", "num_attention_heads": 2,
          "num_hidden_layers": 2, "patch_size": 16, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}

# NaFlex: each image at its own aspect, resized to at most num_patches 16-pixel patches (a square number: ComfyUI
# resamples a square grid of position embeddings to the image's grid)
NAFLEX_CONFIG = {**CONFIG, "model_type": "siglip2_vision_model", "image_size": -1, "num_patches": 64}


def has_naflex() -> bool:
    return "siglip2_vision_model" in comfy.clip_vision.IMAGE_ENCODERS


def config_path(config: dict) -> str:
    path = os.path.join(tempfile.gettempdir(), f"zimage_tiny_{config['model_type']}.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def install():
    if getattr(comfy.clip_vision.load_clipvision_from_sd, "tiny_siglip", False):
        return
    original = comfy.clip_vision.load_clipvision_from_sd

    def load_clipvision_from_sd(sd, prefix="", convert_keys=False):
        norm = sd.get("vision_model.encoder.layers.0.layer_norm1.weight")
        if norm is not None and norm.shape[0] == TINY_HIDDEN:
            naflex = sd["vision_model.embeddings.patch_embedding.weight"].ndim == 2
            clip = comfy.clip_vision.ClipVisionModel(config_path(NAFLEX_CONFIG if naflex else CONFIG))
            clip.load_sd(sd)
            return clip
        return original(sd, prefix, convert_keys)

    load_clipvision_from_sd.tiny_siglip = True
    comfy.clip_vision.load_clipvision_from_sd = load_clipvision_from_sd


install()
NODE_CLASS_MAPPINGS = {}
