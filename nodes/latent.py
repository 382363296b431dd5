"""ZImageLatent: an empty 16-channel latent (ComfyUI's FLUX latent format) for Z-Image."""

from __future__ import annotations

import torch

import comfy.model_management as mm

# about one megapixel, every side a multiple of 16
ASPECTS = {
    "custom": None,
    "1:1 (1024x1024)": (1024, 1024),
    "4:3 (1152x864)": (1152, 864),
    "3:4 (864x1152)": (864, 1152),
    "3:2 (1248x832)": (1248, 832),
    "2:3 (832x1248)": (832, 1248),
    "16:9 (1344x768)": (1344, 768),
    "9:16 (768x1344)": (768, 1344),
    "21:9 (1536x640)": (1536, 640),
}
MIN_SIDE, MAX_SIDE = 256, 4096


def size_problem(width: int, height: int) -> str | None:
    problems = []
    for name, side in (("width", width), ("height", height)):
        if side % 16:
            problems.append(f"{name} {side} is not a multiple of 16 (use {side // 16 * 16} or {side // 16 * 16 + 16})")
        elif not MIN_SIDE <= side <= MAX_SIDE:
            problems.append(f"{name} {side} is outside {MIN_SIDE}..{MAX_SIDE}")
    if not problems:
        return None
    return "; ".join(problems) + ". Z-Image packs 2x2 latent patches of 8-pixel VAE cells, so sides are multiples of 16."


class ZImageLatent:
    DESCRIPTION = ("An empty latent for Z-Image: 16 channels at 1/8 of the image size, sides multiples of 16. Choosing "
                   "an aspect fills in width and height.")
    CATEGORY = "Z-Image"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Empty latents to sample into.",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 1024, "min": MIN_SIDE, "max": MAX_SIDE, "step": 16,
                              "tooltip": "Image width in pixels, a multiple of 16."}),
            "height": ("INT", {"default": 1024, "min": MIN_SIDE, "max": MAX_SIDE, "step": 16,
                               "tooltip": "Image height in pixels, a multiple of 16."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per run."}),
            "aspect": (list(ASPECTS), {"default": "custom", "sizes": ASPECTS, "tooltip":
                       "Fills in width and height with a size of about one megapixel; changing either makes it "
                       "custom. The latent always has the size width and height show."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, width, height, batch_size, aspect):
        # defining this replaces ComfyUI's own range checks for these inputs, so all of them are made here
        if aspect not in ASPECTS:
            return f"unknown aspect {aspect!r}"
        # ComfyUI hands this method the raw values: a width it could not read as an INT arrives as it was sent
        for name, value in (("width", width), ("height", height), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                return f"{name} {value!r} is not a whole number"
        if not 1 <= batch_size <= 64:
            return f"batch_size {batch_size} is outside 1..64"
        return size_problem(width, height) or True

    def generate(self, width, height, batch_size, aspect):
        # aspect is the graph editor's shortcut (web/zimage.js fills width and height from ASPECTS)
        latent = torch.zeros([batch_size, 16, height // 8, width // 8], device=mm.intermediate_device())
        return ({"samples": latent},)
