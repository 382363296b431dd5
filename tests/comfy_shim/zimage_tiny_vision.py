"""Test-only ComfyUI custom node (never shipped with the pack): a tiny SigLIP vision encoder.

ComfyUI recognises a SigLIP file by its full size (27 layers, hidden 1152) and builds it from a json config in
its own tree. The test server adds one more config, a tiny SigLIP, and recognises the tiny file by its hidden
size. CLIPVisionLoader, the preprocessing and the encoder's forward are ComfyUI's own code, unchanged.
"""

import json
import os
import tempfile

import comfy.clip_vision

TINY_HIDDEN = 24
CONFIG = {"num_channels": 3, "hidden_act": "gelu_pytorch_tanh", "hidden_size": TINY_HIDDEN, "image_size": 64,
          "intermediate_size": 48, "model_type": "siglip_vision_model", "num_attention_heads": 2,
          "num_hidden_layers": 2, "patch_size": 16, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


def config_path() -> str:
    path = os.path.join(tempfile.gettempdir(), "zimage_tiny_siglip.json")
    with open(path, "w") as f:
        json.dump(CONFIG, f)
    return path


def install():
    if getattr(comfy.clip_vision.load_clipvision_from_sd, "tiny_siglip", False):
        return
    original = comfy.clip_vision.load_clipvision_from_sd

    def load_clipvision_from_sd(sd, prefix="", convert_keys=False):
        norm = sd.get("vision_model.encoder.layers.0.layer_norm1.weight")
        if norm is not None and norm.shape[0] == TINY_HIDDEN:
            clip = comfy.clip_vision.ClipVisionModel(config_path())
            clip.load_sd(sd)
            return clip
        return original(sd, prefix, convert_keys)

    load_clipvision_from_sd.tiny_siglip = True
    comfy.clip_vision.load_clipvision_from_sd = load_clipvision_from_sd


install()
NODE_CLASS_MAPPINGS = {}
