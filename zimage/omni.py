"""Omni-Base and Edit: reference images as clean tokens in the sequence, laid out as diffusers' Omni transformer
and ZImageOmniPipeline (0.42.1) lay them out.

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
from torch.nn.utils.rnn import pad_sequence

from .config import ZImageConfig
from .rope import rope_angles


@dataclass
class Reference:
    """One clean conditioning image of an Omni/Edit sample."""

    latent: torch.Tensor  # [C, h, w]: the image's VAE latent, scaled like the target's
    # [rows, cols, siglip_feat_dim]: SigLIP2's last hidden state for the image, on its patch grid
    # (ZImageOmniPipeline: Siglip2ImageProcessor's spatial_shapes, the first rows * cols tokens)
    siglip: torch.Tensor | None

    def to(self, device: torch.device | str) -> "Reference":
        return Reference(self.latent.to(device), None if self.siglip is None else self.siglip.to(device))


def omni_prompt_chunks(prompt: str, n_references: int) -> list[str]:
    """The caption chunks, as text, of a prompt with n_references reference images (see the module doc).
    Each is encoded on its own (second-to-last hidden state, padding dropped) to make one caption chunk."""
    if n_references == 0:
        return [f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"]
    return (["<|im_start|>user\n<|vision_start|>"]
            + ["<|vision_end|><|vision_start|>"] * (n_references - 1)
            + [f"<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n<|vision_start|>", "<|vision_end|><|im_end|>"])


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_tokens(tokens: torch.Tensor, pad_token: torch.Tensor, multiple: int) -> torch.Tensor:
    """[n, dim] -> [round_up(n), dim], filled with the learned pad token."""
    n_pad = round_up(len(tokens), multiple) - len(tokens)
    # .to(tokens): a host's partial offloading may leave the root's pad tokens on another device
    return torch.cat((tokens, pad_token.to(tokens).expand(n_pad, -1)))


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


# ---------------------------------------------------------------------------------------------------
# Positions. Along the sequence axis, chunk j starts at s_j (s_0 = 1, s_{j+1} = s_j + len_j + 2): between
# two chunks sit two slots, image j's latent at s_j + len_j and its SigLIP features at s_j + len_j + 1.
# Latent tokens take (slot, row, col) on their token grid; SigLIP tokens (slot + 1, row', col') with their
# grid stretched over the latent's pixel grid: row' = int(row / (rows - 1) * (h - 1)), in float32 as the
# reference computes it. Pad tokens sit at (0, 0, 0).


@dataclass
class Stream:
    """One stream of a batch: per-sample token counts and the batch-padded positions, masks, noise flags."""

    lengths: list[int]
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin [B, S, 1, head_dim / 2]
    key_mask: torch.Tensor | None  # [B, 1, 1, S]; None when every sample fills S
    noisy: torch.Tensor  # [B, S, 1] int64: 1 for a noisy token, 0 for a clean one (the timestep row it takes)

    def pack(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """Per-sample token rows [n_i, dim] -> [B, S, dim], zeros after each sample's end."""
        assert [len(r) for r in rows] == self.lengths, ([len(r) for r in rows], self.lengths)
        return pad_sequence(rows, batch_first=True)


@dataclass
class OmniLayout:
    images: Stream
    captions: Stream
    siglip: Stream | None  # None when no sample has references
    unified: Stream  # per sample [captions, images, siglip]
    target_start: list[int]  # where each sample's target tokens begin in the unified sequence


@dataclass
class SampleTokens:
    """One sample's tokens in one stream: positions [n, 3] and noise flags [n]."""

    positions: torch.Tensor
    noisy: torch.Tensor

    @staticmethod
    def cat(parts: list["SampleTokens"]) -> "SampleTokens":
        if not parts:
            return SampleTokens(torch.zeros(0, 3, dtype=torch.int64), torch.zeros(0, dtype=torch.bool))
        return SampleTokens(torch.cat([t.positions for t in parts]), torch.cat([t.noisy for t in parts]))


def _padded(positions: torch.Tensor, noisy: bool, multiple: int) -> SampleTokens:
    n_pad = round_up(len(positions), multiple) - len(positions)
    positions = torch.cat((positions, torch.zeros(n_pad, 3, dtype=torch.int64)))
    return SampleTokens(positions, torch.full((len(positions),), noisy))


def _grid(slot: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(slot, row, col) for every cell, row-major."""
    r, c = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack((torch.full_like(r, slot), r, c), dim=-1).flatten(0, 1)


def caption_tokens(chunk_lens: list[int], n_references: int, multiple: int) -> tuple[SampleTokens, list[int]]:
    """The caption chunks' tokens and the sequence slot of the image after each chunk.

    Each chunk is padded to a multiple of 32. diffusers 0.42.1 lists a chunk's positions as s_j .. s_j + padded - 1
    followed by one (0, 0, 0) per pad token, and hands the concatenated chunks the first entries of the
    concatenated lists. From the second chunk on, a chunk therefore starts with the previous chunks' stray zeros
    and its positions run late by as many. Reproduced here exactly: it is what the reference computes.
    """
    lists, slots, start = [], [], 1
    for n in chunk_lens:
        padded = round_up(n, multiple)
        lists += [torch.arange(start, start + padded), torch.zeros(padded - n, dtype=torch.int64)]
        slots.append(start + n)
        start += n + 2
    n_tokens = sum(round_up(n, multiple) for n in chunk_lens)
    positions = torch.zeros(n_tokens, 3, dtype=torch.int64)
    positions[:, 0] = torch.cat(lists)[:n_tokens]
    # a chunk is modulated like the image after it: before a reference clean, from the prompt's chunk on noisy
    noisy = torch.cat([torch.full((round_up(n, multiple),), j >= n_references) for j, n in enumerate(chunk_lens)])
    return SampleTokens(positions, noisy), slots


def build_layout(cfg: ZImageConfig, inv_freqs: list[torch.Tensor], chunk_lens: list[list[int]],
                 reference_sizes: list[list[tuple[int, int]]], siglip_sizes: list[list[tuple[int, int]]],
                 target_size: tuple[int, int], device: torch.device) -> OmniLayout:
    """Everything that depends only on the batch's shapes (sizes are latent pixels and SigLIP grid cells)."""
    m, p = cfg.seq_multiple, cfg.patch_size
    images, captions, siglips, target_start = [], [], [], []
    for i, (lens, refs, grids) in enumerate(zip(chunk_lens, reference_sizes, siglip_sizes)):
        cap, slots = caption_tokens(lens, len(refs), m)
        sample_images = []
        for j, (h, w) in enumerate([*refs, target_size]):
            grid = _grid(slots[j], torch.arange(h // p), torch.arange(w // p))
            sample_images.append(_padded(grid, noisy=j == len(refs), multiple=m))
        sample_siglip = []
        for j, ((rows, cols), (h, w)) in enumerate(zip(grids, refs)):
            stretched_rows = (torch.arange(rows, dtype=torch.float32) / max(rows - 1, 1) * (h - 1)).long()
            stretched_cols = (torch.arange(cols, dtype=torch.float32) / max(cols - 1, 1) * (w - 1)).long()
            sample_siglip.append(_padded(_grid(slots[j] + 1, stretched_rows, stretched_cols), noisy=False, multiple=m))
        if refs:  # the target has no SigLIP features: one block of pad tokens holds its place
            sample_siglip.append(SampleTokens(torch.zeros(m, 3, dtype=torch.int64), torch.ones(m, dtype=torch.bool)))
        images.append(SampleTokens.cat(sample_images))
        captions.append(cap)
        siglips.append(SampleTokens.cat(sample_siglip))
        top = torch.cat((cap.positions, images[-1].positions, siglips[-1].positions)).amax(dim=0).tolist()
        if any(t >= n for t, n in zip(top, cfg.rope_lengths)):
            raise ValueError(f"sample {i}: its captions and images need RoPE positions up to {top} (sequence, row, "
                             f"column), but the model covers {list(cfg.rope_lengths)}: shorten the prompt, or use fewer "
                             f"or smaller images")
        target_start.append(len(cap.noisy) + sum(len(t.noisy) for t in sample_images[:-1]))

    def stream(tokens: list[SampleTokens]) -> Stream:
        lengths = [len(t.noisy) for t in tokens]
        positions = pad_sequence([t.positions for t in tokens], batch_first=True).to(device)
        cos, sin = rope_angles(positions, inv_freqs)
        noisy = pad_sequence([t.noisy for t in tokens], batch_first=True).long()[..., None].to(device)
        key_mask = None
        if len(set(lengths)) > 1:
            key_mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None])[:, None, None].to(device)
        return Stream(lengths, (cos.unsqueeze(-2), sin.unsqueeze(-2)), key_mask, noisy)

    unified = [SampleTokens.cat(parts) for parts in zip(captions, images, siglips)]
    has_siglip = any(len(s.noisy) for s in siglips)
    return OmniLayout(stream(images), stream(captions), stream(siglips) if has_siglip else None, stream(unified),
                      target_start)
