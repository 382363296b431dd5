"""ZImageEdit: an instruction and reference images -> Omni conditioning and a latent for ZImageSampler.

Z-Image-Omni-Base and Z-Image-Edit read a chat turn with the images inline: the instruction is encoded in
chunks around the images (zimage.omni_prompt_chunks), each reference image enters the sequence as clean VAE
latent tokens and, through the model's SigLIP embedder, as vision-encoder features. The conditioning this
node returns carries all of it; ZImageSampler hands it to every model evaluation.
"""

from __future__ import annotations

import logging
import math

import torch

import comfy.model_management as mm

from ..zimage import Reference, omni_prompt_chunks
from .comfy_model import OMNI_KEY, caption_features, engine_of
from .text_encode import encode, require_qwen3


def encode_chunks(clip, texts: list[str]) -> list[torch.Tensor]:
    """Each chunk text through the text encoder on its own (second-to-last hidden state, padding dropped)."""
    chunks = []
    for text in texts:
        ((context, extras),), warning = encode(clip, text, "{}")  # the chunk texts carry their own markup
        if warning:
            logging.warning("ZImageEdit: " + warning)
        chunks.append(caption_features(context, extras.get("attention_mask"))[0].float().cpu())
    return chunks


def siglip_grid(clip_vision, image: torch.Tensor) -> torch.Tensor:
    """The vision encoder's last hidden state for one image [1, H, W, 3], as its patch grid [rows, cols, c]."""
    tokens = clip_vision.encode_image(image, crop=False)["last_hidden_state"][0]
    side = math.isqrt(tokens.shape[0])
    if side * side != tokens.shape[0]:
        raise ValueError(f"ZImageEdit: the vision encoder gave {tokens.shape[0]} tokens, not a square grid; use a "
                         f"SigLIP vision model (CLIPVisionLoader).")
    return tokens.reshape(side, side, -1).float().cpu()


class ZImageEdit:
    DESCRIPTION = ("Instruction editing and reference images for Z-Image-Edit / Omni-Base: encodes the instruction "
                   "around the reference images as the Omni models read it, and returns conditioning and a latent "
                   "of the first image's size for ZImageSampler (denoise 1 edits from noise; below 1 starts from the "
                   "source image).")
    CATEGORY = "Z-Image"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    OUTPUT_TOOLTIPS = ("The instruction with the reference images, for ZImageSampler's positive input.",
                       "The negative prompt with the same reference images, for ZImageSampler's negative input.",
                       "The first reference image's latent: the size of the result, and the start for denoise < 1.")
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A Z-Image-Edit or Z-Image-Omni-Base model from ZImageLoader."}),
                "clip": ("CLIP", {"tooltip": "Qwen3-4B from ComfyUI's CLIPLoader (qwen_3_4b.safetensors, type lumina2); "
                                             "the instruction is encoded in chunks around the images, so this node "
                                             "encodes it itself."}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "The SigLIP vision encoder from ComfyUI's CLIPVisionLoader, "
                                                           "whose features the Omni models' SigLIP embedder reads."}),
                "vae": ("VAE", {"tooltip": "The FLUX VAE (ae.safetensors) that encodes the reference images."}),
                "image": ("IMAGE", {"tooltip": "The image to edit. A batch of several images gives several references "
                                               "of one size; sides must be multiples of 16 pixels."}),
                "instruction": ("STRING", {"multiline": True, "tooltip":
                                "What to do with the image, in Chinese or English, e.g. 'replace the background with a "
                                "rainy New York street' or '让她手里拿着一杯咖啡'."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "What to steer away from; used by the sampler when cfg > 0."}),
            },
            "optional": {
                "image_2": ("IMAGE", {"tooltip": "Another reference image, of any size (multiples of 16 pixels)."}),
            },
        }

    def edit(self, model, clip, clip_vision, vae, image, instruction, negative_prompt, image_2=None):
        transformer = engine_of(model)
        require_qwen3(clip, "ZImageEdit")
        if transformer.cfg.siglip_feat_dim is None:
            raise ValueError("ZImageEdit: this is a Z-Image Turbo/Base model; editing and reference images need a "
                             "Z-Image-Edit or Z-Image-Omni-Base checkpoint in ZImageLoader. For image-to-image with "
                             "Turbo, encode the image with VAEEncode and use ZImageSampler with denoise below 1.")
        images = [img[None] for img in image] + ([img[None] for img in image_2] if image_2 is not None else [])
        references, encoded = [], []
        for n, img in enumerate(images, 1):
            height, width = img.shape[1:3]
            if height % 16 or width % 16 or min(height, width) < 64 or max(height, width) > 4096:
                raise ValueError(f"ZImageEdit: reference image {n} is {width}x{height}; Z-Image needs sides that are "
                                 f"multiples of 16 pixels, from 64 to 4096. Resize or crop it first (ImageScale, "
                                 f"ImageCrop).")
            siglip = siglip_grid(clip_vision, img)
            if siglip.shape[-1] != transformer.cfg.siglip_feat_dim:
                raise ValueError(f"ZImageEdit: the vision encoder's features are {siglip.shape[-1]} wide; this model's "
                                 f"SigLIP embedder reads {transformer.cfg.siglip_feat_dim}. Load the SigLIP model the "
                                 f"checkpoint was trained with.")
            encoded.append(vae.encode(img[..., :3]))
            latent = model.model.process_latent_in(encoded[-1].float())[0]
            references.append(Reference(latent.cpu(), siglip))

        n = len(references)
        positive = encode_chunks(clip, omni_prompt_chunks(instruction, n))
        negative = encode_chunks(clip, omni_prompt_chunks(negative_prompt, n))

        def conditioning(chunks):
            # the concatenated chunks stand in as the plain context, so that nodes that only look see a prompt
            context = torch.cat(chunks)[None].to(mm.intermediate_device())
            return [[context, {OMNI_KEY: {"chunks": chunks, "references": references}}]]

        return conditioning(positive), conditioning(negative), {"samples": encoded[0]}
