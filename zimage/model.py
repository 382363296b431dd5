"""S3-DiT, the single-stream diffusion transformer of Z-Image: its parameters and the math of a forward.

Caption tokens (Qwen3 hidden states) and image tokens (2x2 patches of the FLUX latent) are refined
separately (context refiner, noise refiner), then concatenated into one sequence that 30 identical
blocks process together. Blocks that see image tokens are modulated by the timestep (adaLN); the
final layer maps image tokens back to latent patches.

Omni-Base and Edit models also take reference images: clean tokens in the same sequence (omni.py).

Convention: forward(latents, sigma, caption_feats) returns the flow velocity v = noise - x0, so an
Euler step is x_next = x + (sigma_next - sigma) * v, and sigma = 1 is pure noise.

How forwards run (positions built once per shape, CUDA graphs, weight streaming, compile) is the Runner's
(runner.py); the network only reads the positions it is given and runs its blocks as it is handed them.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
from einops import rearrange

from .attention import Attention
from .blocks import FinalLayer, Ops, TimestepEmbedder, TransformerBlock
from .config import ZImageConfig
from .omni import Reference, check_references, flatten_siglip
from .sequence import OmniLayout, PlainLayout, pad_tokens, round_up, sequence_layout

# blocks(stack) yields a stack's blocks ready to run: as they are (iter), or with their weights streamed in
BlockRunner = Callable[[nn.ModuleList], Iterable[nn.Module]]


class S3DiT(nn.Module):
    def __init__(self, cfg: ZImageConfig, attention: str = "auto", ops: Ops = Ops()):
        """attention: the SDPA kernel preference (attention.BACKENDS); ops: the layer classes (blocks.Ops)."""
        super().__init__()
        self.cfg = cfg
        self.ops = ops
        self.attention = Attention(attention)
        self.x_embedder = ops.Linear(cfg.patch_dim, cfg.dim)
        self.cap_embedder = nn.Sequential(ops.RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), ops.Linear(cfg.cap_feat_dim, cfg.dim))
        self.t_embedder = TimestepEmbedder(cfg, ops)
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.noise_refiner = nn.ModuleList(
            TransformerBlock(cfg, self.attention, True, ops) for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(
            TransformerBlock(cfg, self.attention, False, ops) for _ in range(cfg.n_refiner_layers))
        self.layers = nn.ModuleList(TransformerBlock(cfg, self.attention, True, ops) for _ in range(cfg.n_layers))
        self.final_layer = FinalLayer(cfg, ops)
        if cfg.siglip_feat_dim is not None:
            # Omni-Base / Edit: the reference images' SigLIP2 features, embedded and refined like the captions
            self.siglip_embedder = nn.Sequential(ops.RMSNorm(cfg.siglip_feat_dim, cfg.norm_eps),
                                                 ops.Linear(cfg.siglip_feat_dim, cfg.dim))
            self.siglip_refiner = nn.ModuleList(
                TransformerBlock(cfg, self.attention, False, ops) for _ in range(cfg.n_refiner_layers))
            self.siglip_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))

    def block_stacks(self) -> list[nn.ModuleList]:
        """The stacks of transformer blocks, as cfg.block_stacks names them."""
        return [getattr(self, name) for name in self.cfg.block_stacks]

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.weight.device

    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, caption_feats: list,
                references: list[list[Reference]] | None = None, layout: PlainLayout | OmniLayout | None = None,
                blocks: BlockRunner = iter) -> torch.Tensor:
        """latents [B, C, H, W], sigma [B] (1 = pure noise), caption_feats B tensors [L_i, cap_feat_dim]
        -> velocity [B, C, H, W] in the model's dtype.

        references (Omni-Base / Edit models): per sample, a list of clean Reference images, [] for none. Each
        caption is then a list of chunk tensors [L, cap_feat_dim], one before each image and a closing one
        (omni_prompt_chunks). Only the target, latents, is being denoised; the references stay clean.
        layout: the positions and masks of these inputs (sequence.sequence_layout); given, the caller has
        checked the inputs it built them from (check_inputs). blocks: how each stack's blocks are run.
        The fused steps run as Triton kernels once kernels.check_kernels has found that they run here (a Runner
        checks before its first forward), as their PyTorch steps before.
        """
        if layout is None:
            self.check_inputs(latents, sigma, caption_feats, references)
            layout = sequence_layout(self.cfg, latents, caption_feats, references)
        if references is None:
            return self.forward_plain(latents, sigma, caption_feats, layout, blocks)
        return self.forward_with_references(latents, sigma, caption_feats, references, layout, blocks)

    def forward_plain(self, latents: torch.Tensor, sigma: torch.Tensor, caption_feats: list[torch.Tensor],
                      layout: PlainLayout, blocks: BlockRunner = iter) -> torch.Tensor:
        """Turbo and Base, and Omni models without references: per sample [image tokens, caption tokens]."""
        p = self.cfg.patch_size
        rows, cols = latents.shape[2] // p, latents.shape[3] // p
        t_emb = self.t_embedder((1 - sigma) * self.cfg.t_scale)

        # image stream: patches -> tokens, padded with the learned pad token
        image = self.x_embedder(rearrange(latents.to(self.dtype), "b c (h ph) (w pw) -> b (h w) (ph pw c)", ph=p, pw=p))
        image = layout.own(pad_tokens(image, self.x_pad_token, layout.image_len))
        for block in blocks(self.noise_refiner):
            image = block(image, layout.image_rope, layout.image_mask, t_emb)

        # caption stream: each caption padded to its own multiple of 32, the batch to the longest (with pad tokens)
        caption_tokens = self.cap_embedder(torch.cat(caption_feats).to(self.dtype))
        caption = layout.own(torch.stack([pad_tokens(part, self.cap_pad_token, layout.caption_len)
                                          for part in caption_tokens.split([len(c) for c in caption_feats])]))
        for block in blocks(self.context_refiner):
            caption = block(caption, layout.caption_rope, layout.caption_mask)

        # one stream: [image, caption]; a sample's keys end where its own caption padding ends
        x = torch.cat((image, caption), dim=1)
        for block in blocks(self.layers):
            x = block(x, layout.unified_rope, layout.unified_mask, t_emb)

        # layout.own and layout.gather: in a sequence-parallel forward, this process's share of each stream
        # (parallel.py), every process's share of the same size; otherwise all of it. The final layer works token by
        # token, so its image pad tokens are dropped after it.
        patches = layout.gather(self.final_layer(x[:, :image.shape[1]], t_emb))
        return self._velocity(patches[:, :rows * cols], rows)

    def forward_with_references(self, latents: torch.Tensor, sigma: torch.Tensor, captions: list[list[torch.Tensor]],
                                references: list[list[Reference]], layout: OmniLayout,
                                blocks: BlockRunner = iter) -> torch.Tensor:
        """Omni-Base and Edit: per sample [caption chunks, images, SigLIP features] (omni.py)."""
        cfg = self.cfg
        p, m = cfg.patch_size, cfg.seq_multiple
        # rows (clean, noisy): clean tokens are modulated as a finished image would be (sigma 0)
        t_emb = torch.stack((self.t_embedder(torch.full_like(sigma, cfg.t_scale)),
                             self.t_embedder((1 - sigma) * cfg.t_scale)), dim=1)

        def padded(tokens, pad_token):  # [n, dim] -> the stream's padding rule (sequence.py)
            return pad_tokens(tokens, pad_token, round_up(len(tokens), m))

        def image_tokens(latent):  # [C, h, w] -> padded tokens
            patches = rearrange(latent.to(self.dtype), "c (h ph) (w pw) -> (h w) (ph pw c)", ph=p, pw=p)
            return padded(self.x_embedder(patches), self.x_pad_token)

        # image stream: a sample's references, then its target; the noise refiner sees them together
        x = layout.images.pack([torch.cat([image_tokens(r.latent) for r in refs] + [image_tokens(target)])
                                for refs, target in zip(references, latents)])
        for block in blocks(self.noise_refiner):
            x = block(x, layout.images.rope, layout.images.key_mask, t_emb, layout.images.noisy)

        # caption stream: each chunk padded on its own
        caption = layout.captions.pack([
            torch.cat([padded(self.cap_embedder(chunk.to(self.dtype)), self.cap_pad_token) for chunk in chunks])
            for chunks in captions])
        for block in blocks(self.context_refiner):
            caption = block(caption, layout.captions.rope, layout.captions.key_mask)

        # SigLIP stream: the references' features; the target's place is one block of pad tokens
        siglip_lens = [0] * len(references)
        if layout.siglip is not None:
            target_slot = self.siglip_pad_token.to(caption).expand(m, -1)
            siglip = layout.siglip.pack([
                torch.cat([padded(self.siglip_embedder(flatten_siglip(r.siglip.to(self.dtype))), self.siglip_pad_token)
                           for r in refs] + [target_slot])
                if refs else caption.new_zeros(0, cfg.dim) for refs in references])
            for block in blocks(self.siglip_refiner):
                siglip = block(siglip, layout.siglip.rope, layout.siglip.key_mask)
            siglip_lens = layout.siglip.lengths

        # one stream per sample: [captions, images, SigLIP]
        unified = layout.unified.pack([
            torch.cat((caption[i, :nc], x[i, :nx]) + ((siglip[i, :ns],) if ns else ()))
            for i, (nc, nx, ns) in enumerate(zip(layout.captions.lengths, layout.images.lengths, siglip_lens))])
        for block in blocks(self.layers):
            unified = block(unified, layout.unified.rope, layout.unified.key_mask, t_emb, layout.unified.noisy)

        rows, cols = latents.shape[2] // p, latents.shape[3] // p
        target = torch.stack([u[start:start + rows * cols] for u, start in zip(unified, layout.target_start)])
        return self._velocity(self.final_layer(target, t_emb[:, 1]), rows)  # the target's tokens are all noisy

    def _velocity(self, patches: torch.Tensor, rows: int) -> torch.Tensor:
        """The final layer's [B, rows * cols, patch_dim] -> velocity [B, C, H, W]. The network is trained to predict
        x0 - noise (it is fed t = 1 - sigma); v is its negation."""
        p = self.cfg.patch_size
        return -rearrange(patches, "b (h w) (ph pw c) -> b c (h ph) (w pw)", h=rows, ph=p, pw=p)

    def check_inputs(self, latents, sigma, caption_feats, references) -> None:
        """Refuse, saying what to do, inputs the network cannot take."""
        cfg = self.cfg
        if latents.ndim != 4 or latents.shape[1] != cfg.in_channels:
            raise ValueError(f"latents must be [B, {cfg.in_channels}, H, W], got {list(latents.shape)}")
        if latents.shape[2] % cfg.patch_size or latents.shape[3] % cfg.patch_size:
            raise ValueError(f"latent height and width must be multiples of {cfg.patch_size} (images multiples "
                             f"of {8 * cfg.patch_size} pixels), got {latents.shape[2]}x{latents.shape[3]}")
        if sigma.shape != (latents.shape[0],):
            raise ValueError(f"sigma must have shape [{latents.shape[0]}], got {list(sigma.shape)}")
        if len(caption_feats) != latents.shape[0]:
            raise ValueError(f"{len(caption_feats)} captions for a batch of {latents.shape[0]} latents")
        if references is not None:
            check_references(cfg, latents, caption_feats, references)
        chunks = [chunk for c in caption_feats for chunk in c] if references is not None else caption_feats
        for chunk in chunks:
            if not isinstance(chunk, torch.Tensor):
                raise ValueError(f"each caption must be a tensor [L > 0, {cfg.cap_feat_dim}] (lists of chunks go with "
                                 f"references), got a {type(chunk).__name__}")
            if chunk.ndim != 2 or chunk.shape[1] != cfg.cap_feat_dim or len(chunk) == 0:
                raise ValueError(f"each caption must be [L > 0, {cfg.cap_feat_dim}], got {list(chunk.shape)}")
