"""S3-DiT, the single-stream diffusion transformer of Z-Image.

Caption tokens (Qwen3 hidden states) and image tokens (2x2 patches of the FLUX latent) are refined
separately (context refiner, noise refiner), then concatenated into one sequence that 30 identical
blocks process together. Blocks that see image tokens are modulated by the timestep (adaLN); the
final layer maps image tokens back to latent patches.

Omni-Base and Edit models also take reference images: clean tokens in the same sequence (omni.py).

Convention: forward(latents, sigma, caption_feats) returns the flow velocity v = noise - x0, so an
Euler step is x_next = x + (sigma_next - sigma) * v, and sigma = 1 is pure noise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .attention import Attention
from .config import ZImageConfig
from .fp8 import use_fp8_linears
from .omni import OmniLayout, Reference, build_layout, check_references, flatten_siglip, pad_tokens, round_up
from .cuda_graphs import GraphedForward, capture_blocker
from .fused import add_gated_norm, check_triton, norm_modulate, qk_norm_rope, swiglu
from .streaming import WeightStreamer
from .rope import inverse_frequencies, rope_angles


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        """The weight that scales x. A host that keeps weights elsewhere and casts or patches them per use
        overrides this (nodes/comfy_model.py); the fused kernels (fused.py) read the weight through it too."""
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight_for(x), self.eps)


class SelfAttention(nn.Module):
    """Multi-head self-attention with fused q/k/v, per-head RMSNorm on q and k, and RoPE."""

    def __init__(self, cfg: ZImageConfig, attention: Attention):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.attend = attention

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor | None):
        qkv = self.qkv(x)
        q, k = qk_norm_rope(qkv, self.n_heads, self.q_norm, self.k_norm, *rope)  # each [B, S, H, D]
        v = qkv.unflatten(-1, (3, self.n_heads, -1))[:, :, 2]
        out = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_mask)
        return self.out(out.transpose(1, 2).flatten(2))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        # w1 and w3 stay separate (not one stacked matmul): these are the names LoRAs and ComfyUI's
        # model patcher address, and at this size two GEMMs run as fast as one
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x)))


def per_token(modulation: torch.Tensor, noisy: torch.Tensor | None) -> torch.Tensor:
    """adaLN parameters for every token. [B, n] -> [B, 1, n]: one timestep for the whole sequence. In an Omni
    sequence, [B, 2, n] from the (clean, noisy) timestep embeddings, and noisy [B, S, 1] picks each token's
    row -> [B, S, n]."""
    return modulation[:, None] if noisy is None else modulation.take_along_dim(noisy, dim=1)


class TransformerBlock(nn.Module):
    """Attention and SwiGLU, each wrapped in a sandwich of RMSNorms; optionally timestep-modulated."""

    def __init__(self, cfg: ZImageConfig, attention: Attention, modulated: bool):
        super().__init__()
        self.attention = SelfAttention(cfg, attention)
        self.feed_forward = SwiGLU(cfg.dim, cfg.ffn_hidden)
        self.attention_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.modulated = modulated
        if modulated:
            # one Linear in a Sequential: the index is part of the released checkpoints' key names
            self.adaLN_modulation = nn.Sequential(nn.Linear(cfg.t_embed_dim, 4 * cfg.dim))

    def forward(self, x, rope, key_mask, t_emb: torch.Tensor | None = None, noisy: torch.Tensor | None = None):
        # x + tanh(gate) * norm2(sublayer(norm1(x) * (1 + scale))), for attention then the feed-forward;
        # without modulation, x + norm2(sublayer(norm1(x))). Each norm step is one fused kernel (fused.py).
        scale_attn = gate_attn = scale_ffn = gate_ffn = None
        if self.modulated:
            scale_attn, gate_attn, scale_ffn, gate_ffn = per_token(self.adaLN_modulation(t_emb), noisy).chunk(4, dim=-1)
        h = self.attention(norm_modulate(x, self.attention_norm1, scale_attn), rope, key_mask)
        x = add_gated_norm(x, h, self.attention_norm2, gate_attn)
        h = self.feed_forward(norm_modulate(x, self.ffn_norm1, scale_ffn))
        return add_gated_norm(x, h, self.ffn_norm2, gate_ffn)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (256 of them, cos then sin) through a two-layer MLP."""

    n_freqs = 256

    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(self.n_freqs, cfg.t_embed_mid), nn.SiLU(),
                                 nn.Linear(cfg.t_embed_mid, cfg.t_embed_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.n_freqs // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / half))
        angles = t.float()[:, None] * freqs
        features = torch.cat((angles.cos(), angles.sin()), dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(cfg.dim, cfg.patch_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.t_embed_dim, cfg.dim))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        scale = 1 + self.adaLN_modulation(t_emb)[:, None]
        return self.linear(self.norm_final(x) * scale)


@dataclass
class SequenceLayout:
    """What depends only on the batch's shapes: positions (as RoPE cos/sin) and attention masks."""

    image_rope: tuple[torch.Tensor, torch.Tensor]
    caption_rope: tuple[torch.Tensor, torch.Tensor]
    unified_rope: tuple[torch.Tensor, torch.Tensor]
    caption_mask: torch.Tensor | None  # [B, 1, 1, S] keys to attend; None when every sample is full length
    unified_mask: torch.Tensor | None


class S3DiT(nn.Module):
    def __init__(self, cfg: ZImageConfig, attention: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.attention = Attention(attention)
        self.x_embedder = nn.Linear(cfg.patch_dim, cfg.dim)
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, cfg.dim))
        self.t_embedder = TimestepEmbedder(cfg)
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.noise_refiner = nn.ModuleList(
            TransformerBlock(cfg, self.attention, modulated=True) for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(
            TransformerBlock(cfg, self.attention, modulated=False) for _ in range(cfg.n_refiner_layers))
        self.layers = nn.ModuleList(TransformerBlock(cfg, self.attention, modulated=True) for _ in range(cfg.n_layers))
        self.final_layer = FinalLayer(cfg)
        if cfg.siglip_feat_dim is not None:
            # Omni-Base / Edit: the reference images' SigLIP2 features, embedded and refined like the captions
            self.siglip_embedder = nn.Sequential(RMSNorm(cfg.siglip_feat_dim, cfg.norm_eps),
                                                 nn.Linear(cfg.siglip_feat_dim, cfg.dim))
            self.siglip_refiner = nn.ModuleList(
                TransformerBlock(cfg, self.attention, modulated=False) for _ in range(cfg.n_refiner_layers))
            self.siglip_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.inv_freqs = inverse_frequencies(cfg.rope_axes, cfg.rope_theta)
        self._layout_key = None
        self._layout = None
        self._streamer: WeightStreamer | None = None
        self._graphs: GraphedForward | None = None
        self._compiled = False  # compiled blocks run without CUDA graphs (use_cuda_graphs says why)

    def use_fp8_matmuls(self) -> None:
        """Compute the blocks' matrix multiplies in FP8: e4m3 weights with per-row scales, activations quantized
        per token (one fused kernel per matmul on CUDA). Half the blocks' weight memory; on an H100 the GEMMs ran
        1.9x faster and the forward 1.4x. The velocity moves: 9.3% against bf16 on random full-size weights, where
        bf16 implementations differ from each other by 1.6% (bench/results).
        Call after the weights are loaded."""
        for stack in self._block_stacks():
            use_fp8_linears(stack)

    def compile_blocks(self) -> None:
        """torch.compile every block. Blocks share their code, so a graph compiled for one block serves every
        block of the same kind and sequence length. Since the norms, RoPE, modulation and gates run as fused
        kernels (fused.py), which the compiled graphs call as they are, this measured no faster on an H100 and
        gives the eager result bit for bit (bench/results)."""
        # one graph per (block kind, sequence length, mask): many more than the default 8 over a session of
        # different image sizes, and running past the limit would silently fall back to eager
        dynamo = torch._dynamo.config
        setattr(dynamo, "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit", 256)
        for stack in self._block_stacks():
            for block in stack:
                block.compile(dynamic=False)
        self._compiled = True

    def stream_weights(self, device) -> None:
        """Run on `device` (CUDA) holding about five blocks' weights there (the first of each stack and two
        buffers): the other blocks' weights go to pinned host memory, and the forward copies each in one
        block ahead of use, overlapping compute (streaming.py). For cards smaller than the model."""
        for stack in self._block_stacks():
            for i, block in enumerate(stack):
                for p in block.parameters():
                    # the first block of each stack computes while the second is copied in
                    p.data = p.data.to(device) if i == 0 else p.data.to("cpu").pin_memory()
        for name, module in self.named_children():
            if all(module is not stack for stack in self._block_stacks()):
                module.to(device)
        for p in self.parameters(recurse=False):  # the pad tokens
            p.data = p.data.to(device)

    def use_cuda_graphs(self) -> None:
        """Replay the forward as a CUDA graph, one per input shape (cuda_graphs.py): the same kernels on the
        same inputs, launched at once instead of one by one. Used for prompts without reference images when
        every weight is on the CUDA device the inputs are on and the blocks are not compiled; otherwise the
        forward runs as usual. (Not over compiled blocks: they are no faster than the fused eager blocks, so
        there is nothing to combine for; an early test that once found replays over them differing from a
        separately compiled model was not reproduced, bench/results/NOTES.md.) release_buffers() frees their
        memory (sample() does when it ends). Not under an allocator that cannot capture them (capture_blocker):
        then it says so, once, and the forward runs as usual."""
        blocker = capture_blocker()
        if blocker is not None:
            logging.warning(f"Z-Image: CUDA graphs are off: {blocker}.")
            return
        self._graphs = GraphedForward()

    def release_buffers(self) -> None:
        """Give back the GPU memory the forward keeps from call to call: the CUDA graphs and the weight-streaming
        buffers. The next forward makes them anew."""
        if self._graphs is not None:
            self._graphs.clear()
        if self._streamer is not None:
            self._streamer.release()

    def _block_stacks(self) -> list[nn.ModuleList]:
        stacks = [self.noise_refiner, self.context_refiner, self.layers]
        return stacks + [self.siglip_refiner] if self.cfg.siglip_feat_dim is not None else stacks

    def _blocks(self, stack: nn.ModuleList, device: torch.device):
        """The blocks of a stack, ready to run on `device`: weights a host left in CPU memory stream in."""
        if device.type != "cuda":
            return iter(stack)
        if self._streamer is None or self._streamer.device != device:
            self._streamer = WeightStreamer(device)
        return self._streamer.run(stack)

    def _weights_on(self, device: torch.device) -> list[torch.Tensor] | None:
        """Every weight, if all of them are on `device`; else None."""
        weights = list(self.parameters())
        return weights if all(w.device == device for w in weights) else None

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.weight.device

    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, caption_feats: list,
                references: list[list[Reference]] | None = None) -> torch.Tensor:
        """latents [B, C, H, W], sigma [B] (1 = pure noise), caption_feats B tensors [L_i, cap_feat_dim]
        -> velocity [B, C, H, W] in the model's dtype.

        references (Omni-Base / Edit models): per sample, a list of clean Reference images, [] for none. Each
        caption is then a list of chunk tensors [L, cap_feat_dim], one before each image and a closing one
        (omni_prompt_chunks). Only the target, latents, is being denoised; the references stay clean.
        """
        self._check_inputs(latents, sigma, caption_feats, references)
        device = latents.device
        check_triton(device, self.dtype)  # once per process: whether the fused kernels can run
        try:
            if references is not None:
                return self._forward_omni(latents, sigma, caption_feats, references)
            p = self.cfg.patch_size
            layout = self._sequence_layout(latents.shape[0], latents.shape[2] // p, latents.shape[3] // p,
                                           [len(c) for c in caption_feats], device)
            graphs = self._graphs is not None and not self._compiled and device.type == "cuda"
            weights = self._weights_on(device) if graphs else None
            if weights is None:
                return self._forward_text(latents, sigma, caption_feats, layout)
            return self._graphs(lambda x, s, *captions: self._forward_text(x, s, list(captions), layout),
                                [latents, sigma, *caption_feats], weights, keep=layout)
        finally:
            if self._streamer is not None:  # an exception inside a streamed block leaves its weights swapped
                self._streamer.restore()

    def _forward_text(self, latents: torch.Tensor, sigma: torch.Tensor, caption_feats: list[torch.Tensor],
                      layout: SequenceLayout) -> torch.Tensor:
        cfg = self.cfg
        batch = latents.shape[0]
        p = cfg.patch_size
        rows, cols = latents.shape[2] // p, latents.shape[3] // p
        n_image = rows * cols
        caption_lens = [len(c) for c in caption_feats]
        device = latents.device

        t_emb = self.t_embedder((1 - sigma) * cfg.t_scale)

        # image stream: patches -> tokens, padded with the learned pad token
        image = self.x_embedder(rearrange(latents.to(self.dtype), "b c (h ph) (w pw) -> b (h w) (ph pw c)", ph=p, pw=p))
        n_image_pad = round_up(n_image, cfg.seq_multiple) - n_image
        if n_image_pad:
            # .to(image): a host's partial offloading may leave the root's pad tokens on another device
            image = torch.cat((image, self.x_pad_token.to(image).expand(batch, n_image_pad, -1)), dim=1)
        for block in self._blocks(self.noise_refiner, device):
            image = block(image, layout.image_rope, None, t_emb)

        # caption stream: each caption padded to its own multiple of 32, the batch to the longest
        caption_tokens = self.cap_embedder(torch.cat(caption_feats).to(self.dtype))
        caption_len = layout.caption_rope[0].shape[1]
        caption = self.cap_pad_token.to(caption_tokens).expand(batch, caption_len, -1).clone()
        for i, part in enumerate(caption_tokens.split(caption_lens)):
            caption[i, : len(part)] = part
        for block in self._blocks(self.context_refiner, device):
            caption = block(caption, layout.caption_rope, layout.caption_mask)

        # one stream: [image, caption]; a sample's keys end where its own caption padding ends
        x = torch.cat((image, caption), dim=1)
        for block in self._blocks(self.layers, device):
            x = block(x, layout.unified_rope, layout.unified_mask, t_emb)

        out = self.final_layer(x[:, :n_image], t_emb)
        out = rearrange(out, "b (h w) (ph pw c) -> b c (h ph) (w pw)", h=rows, ph=p, pw=p)
        # the network is trained to predict x0 - noise (it is fed t = 1 - sigma); v is its negation
        return -out

    def _check_inputs(self, latents, sigma, caption_feats, references):
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

    def _sequence_layout(self, batch: int, rows: int, cols: int, caption_lens: list[int], device) -> SequenceLayout:
        # The sampler calls forward with the same shapes every step: build positions and masks once.
        key = (batch, rows, cols, tuple(caption_lens), device)
        if key != self._layout_key:
            self._layout = self._build_layout(rows, cols, caption_lens, torch.device(device))
            self._layout_key = key
        return self._layout

    def _build_layout(self, rows: int, cols: int, caption_lens: list[int], device: torch.device) -> SequenceLayout:
        m = self.cfg.seq_multiple
        batch = len(caption_lens)
        padded_caps = torch.tensor([round_up(n, m) for n in caption_lens])
        caption_len = int(padded_caps.max())
        n_image = rows * cols
        image_len = round_up(n_image, m)

        # captions sit at (1 + k, 0, 0), pad tokens included; image patches at (caption end + 1, row, col);
        # image pad tokens at (0, 0, 0)
        caption_pos = torch.zeros(caption_len, 3)
        caption_pos[:, 0] = torch.arange(1, caption_len + 1)
        grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1).flatten(0, 1)
        image_pos = torch.zeros(batch, image_len, 3)
        image_pos[:, :n_image, 0] = (padded_caps + 1)[:, None].float()
        image_pos[:, :n_image, 1:] = grid.float()

        def rope(pos):
            cos, sin = rope_angles(pos.to(device), self.inv_freqs)
            return cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads

        image_rope = rope(image_pos)
        caption_rope = rope(caption_pos.expand(batch, -1, -1))
        unified_rope = tuple(torch.cat((a, b), dim=1) for a, b in zip(image_rope, caption_rope))

        caption_mask = unified_mask = None
        if len(set(padded_caps.tolist())) > 1:
            keys = torch.arange(caption_len)[None] < padded_caps[:, None]
            caption_mask = keys[:, None, None].to(device)
            unified_mask = torch.cat((torch.ones(batch, image_len, dtype=torch.bool), keys), dim=1)[:, None, None].to(device)
        return SequenceLayout(image_rope, caption_rope, unified_rope, caption_mask, unified_mask)

    # --- Omni-Base / Edit ------------------------------------------------------------------------------

    def _forward_omni(self, latents, sigma, captions, references) -> torch.Tensor:
        cfg = self.cfg
        p = cfg.patch_size
        layout = self._omni_layout(latents, captions, references)
        # rows (clean, noisy): clean tokens are modulated as a finished image would be (sigma 0)
        t_emb = torch.stack((self.t_embedder(torch.full_like(sigma, cfg.t_scale)),
                             self.t_embedder((1 - sigma) * cfg.t_scale)), dim=1)

        def image_tokens(latent):  # [C, h, w] -> padded tokens
            patches = rearrange(latent.to(self.dtype), "c (h ph) (w pw) -> (h w) (ph pw c)", ph=p, pw=p)
            return pad_tokens(self.x_embedder(patches), self.x_pad_token, cfg.seq_multiple)

        # image stream: a sample's references, then its target; the noise refiner sees them together
        x = layout.images.pack([torch.cat([image_tokens(r.latent) for r in refs] + [image_tokens(target)])
                                for refs, target in zip(references, latents)])
        for block in self._blocks(self.noise_refiner, latents.device):
            x = block(x, layout.images.rope, layout.images.key_mask, t_emb, layout.images.noisy)

        # caption stream: each chunk padded on its own
        caption = layout.captions.pack([
            torch.cat([pad_tokens(self.cap_embedder(chunk.to(self.dtype)), self.cap_pad_token, cfg.seq_multiple)
                       for chunk in chunks]) for chunks in captions])
        for block in self._blocks(self.context_refiner, latents.device):
            caption = block(caption, layout.captions.rope, layout.captions.key_mask)

        # SigLIP stream: the references' features; the target's place is one block of pad tokens
        siglip_lens = [0] * len(references)
        if layout.siglip is not None:
            target_slot = self.siglip_pad_token.to(caption).expand(cfg.seq_multiple, -1)
            siglip = layout.siglip.pack([
                torch.cat([pad_tokens(self.siglip_embedder(flatten_siglip(r.siglip.to(self.dtype))),
                                      self.siglip_pad_token, cfg.seq_multiple) for r in refs] + [target_slot])
                if refs else caption.new_zeros(0, cfg.dim) for refs in references])
            for block in self._blocks(self.siglip_refiner, latents.device):
                siglip = block(siglip, layout.siglip.rope, layout.siglip.key_mask)
            siglip_lens = layout.siglip.lengths

        # one stream per sample: [captions, images, SigLIP]
        unified = layout.unified.pack([
            torch.cat((caption[i, :nc], x[i, :nx]) + ((siglip[i, :ns],) if ns else ()))
            for i, (nc, nx, ns) in enumerate(zip(layout.captions.lengths, layout.images.lengths, siglip_lens))])
        for block in self._blocks(self.layers, latents.device):
            unified = block(unified, layout.unified.rope, layout.unified.key_mask, t_emb, layout.unified.noisy)

        rows, cols = latents.shape[2] // p, latents.shape[3] // p
        target = torch.stack([u[start:start + rows * cols] for u, start in zip(unified, layout.target_start)])
        out = self.final_layer(target, t_emb[:, 1])  # the target's tokens are all noisy
        out = rearrange(out, "b (h w) (ph pw c) -> b c (h ph) (w pw)", h=rows, ph=p, pw=p)
        return -out

    def _omni_layout(self, latents, captions, references) -> OmniLayout:
        # as _sequence_layout: the sampler calls with the same shapes every step
        chunk_lens = [[len(c) for c in chunks] for chunks in captions]
        reference_sizes = [[tuple(r.latent.shape[1:]) for r in refs] for refs in references]
        siglip_sizes = [[tuple(r.siglip.shape[:2]) for r in refs] for refs in references]
        target_size = tuple(latents.shape[2:])
        key = ("omni", chunk_lens, reference_sizes, siglip_sizes, target_size, latents.device)
        if key != self._layout_key:
            self._layout = build_layout(self.cfg, self.inv_freqs, chunk_lens, reference_sizes, siglip_sizes,
                                        target_size, torch.device(latents.device))
            self._layout_key = key
        return self._layout
