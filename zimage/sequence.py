"""Where every token sits: positions (as RoPE cos/sin), attention masks and padding, for the plain sequence
(Turbo, Base) and the Omni one (reference images, omni.py). They depend on shapes alone, so whoever calls the
network builds them (runner.py builds each input shape's once: the sampler calls with the same shapes every
step), and the forward (model.py) only reads them.

One padding rule: every stream (a sample's image tokens, each caption or caption chunk, each image's SigLIP
tokens) is padded to a multiple of cfg.seq_multiple with that stream's learned pad token, and pad tokens sit at
position (0, 0, 0).
In a batch, the shorter samples' streams are padded to the longest with the same pad tokens, masked out of the
keys; a sequence-parallel forward (parallel.py) pads each stream further, the same way, to a multiple of its
process count, and each process computes its equal share of every stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from .config import ZImageConfig
from .parallel import SequenceShare
from .rope import inverse_frequencies, rope_angles


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_tokens(tokens: torch.Tensor, pad_token: torch.Tensor, length: int) -> torch.Tensor:
    """[..., n, dim] -> [..., length, dim], the new places filled with the learned pad token [1, dim]."""
    n_pad = length - tokens.shape[-2]
    if n_pad == 0:
        return tokens
    # .to(tokens): a host's partial offloading may leave the root's pad tokens on another device
    return torch.cat((tokens, pad_token.to(tokens).expand(*tokens.shape[:-2], n_pad, -1)), dim=-2)


def _rope(cfg: ZImageConfig, positions: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [..., 3] -> (cos, sin) [..., 1, head_dim / 2] on `device`, broadcast over heads."""
    cos, sin = rope_angles(positions.to(device), inverse_frequencies(cfg.rope_axes, cfg.rope_theta))
    return cos.unsqueeze(-2), sin.unsqueeze(-2)


# ---------------------------------------------------------------------------------------------------
# The plain sequence: per sample [image tokens, caption tokens]. Captions sit at (1 + k, 0, 0), their pad tokens
# included; image patches at (caption end + 1, row, col), the caption end being the sample's padded caption
# length; image pad tokens at (0, 0, 0). In a batch each caption is padded to its own multiple, then the batch to
# the longest, and a sample's keys end where its own caption padding ends.
# Split over processes, each stream is padded to a multiple of their count (image tokens at (0, 0, 0), caption
# tokens going on at 1 + k, all of them masked out of the keys); a process computes [its image tokens, its caption
# tokens], so attention sees the unified sequence as every process's such pair in process order.


@dataclass
class PlainLayout:
    image_rope: tuple[torch.Tensor, torch.Tensor]  # of the tokens this process computes
    caption_rope: tuple[torch.Tensor, torch.Tensor]
    unified_rope: tuple[torch.Tensor, torch.Tensor]
    caption_mask: torch.Tensor | None  # [B, 1, 1, S] keys to attend, in the order attention sees them; None: all
    unified_mask: torch.Tensor | None
    image_len: int  # the padded streams' lengths
    caption_len: int
    image_mask: torch.Tensor | None = None  # only a sequence-parallel forward masks image keys
    share: SequenceShare | None = None  # which share of each stream this process computes; None: all of it

    def own(self, tokens: torch.Tensor) -> torch.Tensor:
        """A padded stream's tokens [B, S, dim] -> those this process computes."""
        return tokens if self.share is None else tokens[:, self.share.tokens(tokens.shape[1])]

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """This process's tokens of a stream -> every process's, in stream order."""
        return tokens if self.share is None else self.share.gather(tokens)


def plain_layout(cfg: ZImageConfig, rows: int, cols: int, caption_lens: list[int], device,
                 share: SequenceShare | None = None) -> PlainLayout:
    """rows x cols image tokens per sample, one caption of caption_lens[i] tokens per sample; share: which share
    of the tokens this process computes in a sequence-parallel forward."""
    m, count = cfg.seq_multiple, 1 if share is None else share.count
    batch = len(caption_lens)
    padded_caps = torch.tensor([round_up(n, m) for n in caption_lens])
    caption_len = round_up(int(padded_caps.max()), count)
    n_image = rows * cols
    image_len = round_up(round_up(n_image, m), count)

    caption_pos = torch.zeros(caption_len, 3)
    caption_pos[:, 0] = torch.arange(1, caption_len + 1)
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1).flatten(0, 1)
    image_pos = torch.zeros(batch, image_len, 3)
    image_pos[:, :n_image, 0] = (padded_caps + 1)[:, None].float()
    image_pos[:, :n_image, 1:] = grid.float()

    image_keys = (torch.arange(image_len) < round_up(n_image, m)).expand(batch, -1)
    caption_keys = torch.arange(caption_len)[None] < padded_caps[:, None]
    image_part = caption_part = slice(None)
    unified_keys = torch.cat((image_keys, caption_keys), dim=1)
    if share is not None:
        image_part, caption_part = share.tokens(image_len), share.tokens(caption_len)
        unified_keys = torch.cat([torch.cat((image_keys[:, SequenceShare(i, count).tokens(image_len)],
                                             caption_keys[:, SequenceShare(i, count).tokens(caption_len)]), dim=1)
                                  for i in range(count)], dim=1)

    image_rope = _rope(cfg, image_pos[:, image_part], device)
    caption_rope = _rope(cfg, caption_pos[caption_part].expand(batch, -1, -1), device)
    unified_rope = tuple(torch.cat((a, b), dim=1) for a, b in zip(image_rope, caption_rope))

    def mask(keys):  # None when every key is attended
        return None if bool(keys.all()) else keys[:, None, None].to(device)

    return PlainLayout(image_rope, caption_rope, unified_rope, mask(caption_keys), mask(unified_keys), image_len,
                       caption_len, mask(image_keys), share)


# ---------------------------------------------------------------------------------------------------
# The Omni sequence (omni.py describes its chunks and streams). Along the sequence axis, chunk j starts at s_j
# (s_0 = 1, s_{j+1} = s_j + len_j + 2): between two chunks sit two slots, image j's latent at s_j + len_j and its
# SigLIP features at s_j + len_j + 1. Latent tokens take (slot, row, col) on their token grid; SigLIP tokens
# (slot + 1, row', col') with their grid stretched over the latent's pixel grid:
# row' = int(row / (rows - 1) * (h - 1)), in float32 as the reference computes it.


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


def omni_layout(cfg: ZImageConfig, chunk_lens: list[list[int]], reference_sizes: list[list[tuple[int, int]]],
                siglip_sizes: list[list[tuple[int, int]]], target_size: tuple[int, int], device) -> OmniLayout:
    """Per sample: its caption chunks' lengths, its references' latent sizes and SigLIP grid sizes; the target's
    latent size (sizes are latent pixels and SigLIP grid cells)."""
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
        rope = _rope(cfg, pad_sequence([t.positions for t in tokens], batch_first=True), device)
        noisy = pad_sequence([t.noisy for t in tokens], batch_first=True).long()[..., None].to(device)
        key_mask = None
        if len(set(lengths)) > 1:
            key_mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None])[:, None, None].to(device)
        return Stream(lengths, rope, key_mask, noisy)

    unified = [SampleTokens.cat(parts) for parts in zip(captions, images, siglips)]
    has_siglip = any(len(s.noisy) for s in siglips)
    return OmniLayout(stream(images), stream(captions), stream(siglips) if has_siglip else None, stream(unified),
                      target_start)


# ---------------------------------------------------------------------------------------------------


def layout_key(latents: torch.Tensor, captions: list, references: list | None) -> tuple:
    """Everything a layout depends on: two calls with equal keys have equal layouts."""
    if references is None:
        return "plain", tuple(latents.shape), tuple(len(c) for c in captions), latents.device
    return ("omni", tuple(latents.shape[2:]), tuple(tuple(len(c) for c in chunks) for chunks in captions),
            tuple(tuple((tuple(r.latent.shape[1:]), tuple(r.siglip.shape[:2])) for r in refs) for refs in references),
            latents.device)


def sequence_layout(cfg: ZImageConfig, latents: torch.Tensor, captions: list, references: list | None,
                    share: SequenceShare | None = None) -> PlainLayout | OmniLayout:
    """The layout of one forward's inputs (model.py's forward takes the same arguments); share: this process's
    share of a sequence-parallel forward (plain sequences only)."""
    device = torch.device(latents.device)
    if references is None:
        p = cfg.patch_size
        return plain_layout(cfg, latents.shape[2] // p, latents.shape[3] // p, [len(c) for c in captions], device,
                            share)
    if share is not None:
        raise ValueError("sequence parallelism runs prompts without reference images for now: run Omni and Edit "
                         "prompts with references in one process")
    return omni_layout(cfg, [[len(c) for c in chunks] for chunks in captions],
                       [[tuple(r.latent.shape[1:]) for r in refs] for refs in references],
                       [[tuple(r.siglip.shape[:2]) for r in refs] for refs in references],
                       tuple(latents.shape[2:]), device)
