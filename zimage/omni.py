"""Omni-Base and Edit: reference images as clean tokens in the sequence, laid out as diffusers' Omni transformer
and ZImageOmniPipeline (0.42.1) lay them out (the positions: sequence.py; the chunk texts: prompt.py).

An Omni sample is a chat turn with its images inline. Its caption is encoded in chunks, each on its own, one
chunk before every image (the references first, the target being generated last) and a closing one after:

    chunk 0      <|im_start|>user\\n<|vision_start|>                                            reference 0
    chunk k      <|vision_end|><|vision_start|>                                                reference k
    chunk N      <|vision_end|>{prompt}<|im_end|>\\n<|im_start|>assistant\\n<|vision_start|>    the target
    chunk N + 1  <|vision_end|><|im_end|>

With no references the caption is one chunk, the plain chat template. Every image brings two streams of
tokens: its latent's 2x2 patches (image embedder, noise refiner: the references' tokens beside the target's)
and its SigLIP2 features (SigLIP embedder and refiner; the target has none, 32 SigLIP pad tokens stand in).
The main layers see each sample as [caption chunks, images, SigLIP features]. A token is clean or noisy: the
references' tokens and the chunks before them are clean, modulated by the timestep embedding of a finished
image (sigma 0); the target, its SigLIP slot and the chunks from the prompt on are modulated by sigma.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ZImageConfig


@dataclass
class Reference:
    """One clean conditioning image of an Omni/Edit sample."""

    latent: torch.Tensor  # [C, h, w]: the image's VAE latent, scaled like the target's
    # [rows, cols, siglip_feat_dim]: SigLIP2's last hidden state for the image, on its patch grid
    # (ZImageOmniPipeline: Siglip2ImageProcessor's spatial_shapes, the first rows * cols tokens)
    siglip: torch.Tensor | None

    def to(self, device: torch.device | str) -> "Reference":
        return Reference(self.latent.to(device), None if self.siglip is None else self.siglip.to(device))


def flatten_siglip(features: torch.Tensor) -> torch.Tensor:
    """SigLIP grid [rows, cols, c] -> [rows * cols, c] in the order the reference reads it: diffusers (and
    ComfyUI) permute to [c, rows, cols] and reshape that to [rows * cols, c], a channel-major read, not the
    row-major flatten one might expect. Kept: it is what the reference implementation feeds the model."""
    rows, cols, channels = features.shape
    return features.permute(2, 0, 1).reshape(rows * cols, channels)


def check_references(cfg: ZImageConfig, latents: torch.Tensor, captions: list, references: list) -> None:
    """Refuse, saying what to do, Omni inputs the model cannot use."""
    if cfg.siglip_feat_dim is None:
        raise ValueError("reference images were given, but this model has no SigLIP image embedder: it is a Z-Image "
                         "Turbo/Base checkpoint. Editing and reference images need Z-Image-Omni-Base or Z-Image-Edit.")
    if len(references) != latents.shape[0]:
        raise ValueError(f"{len(references)} reference lists for a batch of {latents.shape[0]} latents: give one list "
                         f"per sample ([] for a sample without references)")
    p = cfg.patch_size
    for i, (refs, caption) in enumerate(zip(references, captions)):
        n_chunks = len(refs) + 2 if refs else 1
        if isinstance(caption, torch.Tensor) or len(caption) != n_chunks:
            got = f"a tensor {list(caption.shape)}" if isinstance(caption, torch.Tensor) else f"{len(caption)} chunks"
            raise ValueError(f"sample {i} has {len(refs)} reference(s), so its caption must be a list of {n_chunks} "
                             f"chunk(s), each encoded on its own from omni_prompt_chunks(prompt, {len(refs)}); got {got}")
        for j, ref in enumerate(refs):
            where = f"reference {j} of sample {i}"
            if not isinstance(ref, Reference):
                raise ValueError(f"{where} is a {type(ref).__name__}; wrap it as Reference(latent, siglip)")
            latent = ref.latent
            if latent.ndim != 3 or latent.shape[0] != cfg.in_channels:
                raise ValueError(f"{where}: its latent must be [{cfg.in_channels}, h, w] (one image's VAE latent, no "
                                 f"batch dimension), got {list(latent.shape)}")
            h, w = latent.shape[1:]
            if h % p or w % p:
                raise ValueError(f"{where}: its latent is {h}x{w}; height and width must be multiples of {p} (images "
                                 f"multiples of {8 * p} pixels): crop or resize the reference")
            if h > cfg.rope_lengths[1] or w > cfg.rope_lengths[2]:
                raise ValueError(f"{where}: its latent is {h}x{w}, larger than the model can place: its SigLIP tokens' "
                                 f"positions span the latent's height and width, and the model's RoPE covers "
                                 f"{cfg.rope_lengths[1]}x{cfg.rope_lengths[2]}. Resize the reference to at most "
                                 f"{8 * cfg.rope_lengths[1]}x{8 * cfg.rope_lengths[2]} pixels (the pipeline uses 1024x1024).")
            siglip = ref.siglip
            if siglip is None:
                raise ValueError(f"{where} has no SigLIP features; this model needs them: SigLIP2's last hidden state "
                                 f"for the reference image on its patch grid, [rows, cols, {cfg.siglip_feat_dim}]")
            if siglip.ndim != 3 or siglip.shape[2] != cfg.siglip_feat_dim or 0 in siglip.shape:
                raise ValueError(f"{where}: its SigLIP features must be [rows, cols, {cfg.siglip_feat_dim}], got "
                                 f"{list(siglip.shape)}")
