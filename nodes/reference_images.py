"""Reference images in ComfyUI conditioning, for Z-Image-Omni-Base and Z-Image-Edit models.

ComfyUI (0.14 and later) writes an Omni prompt into a CONDITIONING entry the way its TextEncodeZImageOmni does:
- the context: the prompt's own chunk, `<|vision_end|>{prompt}<|im_end|>\\n<|im_start|>assistant\\n<|vision_start|>`;
- `reference_latents_text_embeds`: the other chunks, one before each image and the closing one (N + 1);
- `reference_latents`: each image's VAE latent; `clip_vision_outputs`: each image's vision-encoder output.
ZImageEdit writes the same entries, so one path serves both nodes, under ZImageSampler and under KSampler. The
engine lays the sequence out as the official pipeline does (zimage/omni.py), whichever node wrote it.
"""

from __future__ import annotations

import math

import torch

from ..zimage import Reference

REFERENCE_KEYS = ("reference_latents", "clip_vision_outputs", "reference_latents_text_embeds")


def siglip_grid(output, index: int = 0) -> torch.Tensor:
    """A vision encoder's last hidden state for one image, as its patch grid [rows, cols, c]. SigLIP2 NaFlex
    (ComfyUI 0.14 and later) encodes each image at its own aspect and records the size it encoded
    (image_sizes: channels, height, width); a fixed-size SigLIP encodes a square."""
    tokens = output["last_hidden_state"][index]
    n = tokens.shape[0]
    sizes = getattr(output, "image_sizes", None)
    if sizes:
        height, width = int(sizes[index][-2]), int(sizes[index][-1])
        patch = math.isqrt(height * width // n)
        if patch * patch * n == height * width and height % patch == 0 and width % patch == 0:
            return tokens.reshape(height // patch, width // patch, -1)
        raise ValueError(f"the vision encoder gave {n} tokens for a {width}x{height} image, which is no patch grid; "
                         f"use a SigLIP vision model (CLIPVisionLoader).")
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"the vision encoder gave {n} tokens, not a square grid; use a SigLIP vision model "
                         f"(CLIPVisionLoader).")
    return tokens.reshape(side, side, -1)


def reference_conds(extras: dict, process_latent_in) -> dict[str, list[torch.Tensor]]:
    """A conditioning entry's reference images -> lists of batch-first tensors: "ref_latents" [b, C, h, w] (scaled
    as the model reads latents), "siglip_feats" [b, rows, cols, c], "ref_contexts" N + 1 chunks [b, L, width].
    {} when the entry has none. Refuses what the engine cannot run as given rather than dropping part of it."""
    latents = list(extras.get("reference_latents") or [])
    vision = list(extras.get("clip_vision_outputs") or [])
    texts = list(extras.get("reference_latents_text_embeds") or [])
    if not (latents or vision or texts):
        return {}
    if not latents:
        raise ValueError(f"the conditioning carries {len(vision)} images' vision features but no reference latents: "
                         f"connect the VAE to TextEncodeZImageOmni (the model reads each image through both).")
    if len(vision) != len(latents):
        raise ValueError(f"the conditioning carries {len(latents)} reference images but {len(vision)} vision-encoder "
                         f"outputs: connect a SigLIP vision model (CLIPVisionLoader) to TextEncodeZImageOmni's "
                         f"image_encoder; Z-Image-Omni and Edit read every reference through it.")
    if len(texts) != len(latents) + 1:
        raise ValueError(f"the conditioning carries {len(latents)} reference images and {len(texts)} text chunks "
                         f"around them, where {len(latents) + 1} belong; encode it again with TextEncodeZImageOmni "
                         f"or ZImageEdit.")
    ref_latents = []
    for latent in latents:
        # TextEncodeZImageOmni's auto resize makes sides multiples of 8 pixels; the model reads 2x2 latent patches
        # (16 pixels). The official pipeline crops references to multiples of 16 pixels: the last odd row or
        # column of latent cells (8 pixels) goes.
        h, w = latent.shape[-2:]
        ref_latents.append(process_latent_in(latent[..., : h - h % 2, : w - w % 2].float()))
    siglip = [torch.stack([siglip_grid(out, i) for i in range(len(out["last_hidden_state"]))]).float()
              for out in vision]
    return {"ref_latents": ref_latents, "siglip_feats": siglip, "ref_contexts": [t.float() for t in texts]}


def omni_inputs(captions: list[torch.Tensor], conds: dict[str, list[torch.Tensor]]):
    """Per-sample caption chunks and References for the engine, from each sample's prompt chunk (`captions`, one
    [L, width] per sample) and reference_conds' tensors (batch 1, or one row per sample)."""

    def row(tensor: torch.Tensor, b: int) -> torch.Tensor:
        return tensor[b if len(tensor) > 1 else 0]

    n = len(conds["ref_latents"])
    chunks, references = [], []
    for b, caption in enumerate(captions):
        texts = [row(t, b) for t in conds["ref_contexts"]]
        chunks.append(texts[:n] + [caption] + texts[n:])
        references.append([Reference(row(latent, b), row(grid, b))
                           for latent, grid in zip(conds["ref_latents"], conds["siglip_feats"])])
    return chunks, references
