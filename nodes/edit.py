"""ZImageEdit: an instruction and reference images -> Omni conditioning and a latent for a sampler.

Z-Image-Omni-Base and Z-Image-Edit read a chat turn with the images inline: the instruction is encoded in
chunks around the images (zimage.omni_prompt_chunks), each reference image enters the sequence as clean VAE
latent tokens and, through the model's SigLIP embedder, as vision-encoder features. The conditioning this
node returns carries all of it, in the entries ComfyUI's TextEncodeZImageOmni writes (reference_images.py);
ZImageSampler and KSampler hand it to every model evaluation.
"""

from __future__ import annotations

import logging

import torch

import comfy.model_management as mm

from ..zimage import omni_prompt_chunks
from .comfy_model import caption_features, engine_of
from .reference_images import siglip_grid
from .text_encode import check_prompt, encode, require_qwen3


def encode_chunks(clip, texts: list[str]) -> list[torch.Tensor]:
    """Each chunk text through the text encoder on its own (second-to-last hidden state, padding dropped)."""
    chunks = []
    for text in texts:
        ((context, extras),), warning = encode(clip, text, "{}")  # the chunk texts carry their own markup
        if warning:
            logging.warning("ZImageEdit: " + warning)
        chunks.append(caption_features(context, extras.get("attention_mask"))[0].float().cpu())
    return chunks


class ZImageEdit:
    DESCRIPTION = ("Instruction editing and reference images for Z-Image-Edit / Omni-Base: encodes the instruction "
                   "around the reference images as the Omni models read it, and returns conditioning and a latent "
                   "of the first image's size for ZImageSampler or KSampler (denoise 1 edits from noise; below 1 "
                   "starts from the source image).")
    CATEGORY = "Z-Image"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    OUTPUT_TOOLTIPS = ("The instruction with the reference images, for the sampler's positive input.",
                       "The negative prompt with the same reference images, for the sampler's negative input.",
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
        for name, batch in (("image", image), ("image_2", image_2)):
            if batch is not None and len(batch) == 0:
                raise ValueError(f"ZImageEdit: the {name} input holds no reference image (an empty batch). Connect a "
                                 f"node that gives at least one image, e.g. LoadImage.")
        warnings = [w for w in (check_prompt(instruction, "instruction", "ZImageEdit"),
                                check_prompt(negative_prompt, "negative prompt", "ZImageEdit")) if w]
        for w in warnings:
            logging.warning("ZImageEdit: " + w)
        images = [img[None] for img in image] + ([img[None] for img in image_2] if image_2 is not None else [])
        latents, vision = [], []
        for n, img in enumerate(images, 1):
            height, width = img.shape[1:3]
            if height % 16 or width % 16 or min(height, width) < 64 or max(height, width) > 4096:
                raise ValueError(f"ZImageEdit: reference image {n} is {width}x{height}; Z-Image needs sides that are "
                                 f"multiples of 16 pixels, from 64 to 4096. Resize or crop it first (ImageScale, "
                                 f"ImageCrop).")
            vision.append(clip_vision.encode_image(img, crop=False))
            try:
                features = siglip_grid(vision[-1]).shape[-1]
            except ValueError as e:
                raise ValueError(f"ZImageEdit: {e}") from None
            if features != transformer.cfg.siglip_feat_dim:
                raise ValueError(f"ZImageEdit: the vision encoder's features are {features} wide; this model's "
                                 f"SigLIP embedder reads {transformer.cfg.siglip_feat_dim}. Load the SigLIP model the "
                                 f"checkpoint was trained with.")
            latents.append(vae.encode(img[..., :3]))

        def conditioning(text: str):
            # the entries TextEncodeZImageOmni writes (reference_images.py): the prompt's own chunk as the context,
            # the chunks before each image and the closing one beside it
            chunks = [c[None] for c in encode_chunks(clip, omni_prompt_chunks(text, len(latents)))]
            context = chunks.pop(len(latents)).to(mm.intermediate_device())
            return [[context, {"reference_latents": latents, "clip_vision_outputs": vision,
                               "reference_latents_text_embeds": chunks}]]

        return {"ui": {"text": warnings}, "result": (conditioning(instruction), conditioning(negative_prompt),
                                                     {"samples": latents[0]})}
