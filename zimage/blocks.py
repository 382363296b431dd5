"""The layers an S3-DiT is built from: a transformer block (attention and SwiGLU in norm sandwiches, timestep-
modulated where it sees image tokens), the timestep embedder and the final layer; and Ops, the layer classes
they are built with, which a host may replace at construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionKernel
from .config import ZImageConfig
from .fp8 import E4M3Rows, Fp8Linear, takes_e4m3_rows
from .fused import add_gated_norm, norm_modulate, swiglu
from .quantized import QuantizedLinear


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


@dataclass(frozen=True)
class Ops:
    """The layer classes a network is built from, each taking the arguments of the engine's own. A host that
    manages weights itself gives its own at construction, as ComfyUI does (nodes/comfy_model.py): a Linear and
    an RMSNorm it can offload, cast and patch per use, an Fp8Linear (made by fp8.use_fp8_matmuls) whose
    weight its patcher can change, and a QuantizedLinear (a GGUF file's matrices, checkpoint.load_transformer)
    whose dequantized weight it can patch at each use."""

    Linear: type[nn.Linear] = nn.Linear
    RMSNorm: type[RMSNorm] = RMSNorm
    Fp8Linear: type[Fp8Linear] = Fp8Linear
    QuantizedLinear: type[QuantizedLinear] = QuantizedLinear


class SelfAttention(nn.Module):
    """Multi-head self-attention with fused q/k/v, per-head RMSNorm on q and k, and RoPE."""

    def __init__(self, cfg: ZImageConfig, attention: AttentionKernel, ops: Ops):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = ops.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = ops.Linear(cfg.dim, cfg.dim, bias=False)
        self.q_norm = ops.RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = ops.RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.attend = attention

    def forward(self, x: torch.Tensor | E4M3Rows, rope: tuple[torch.Tensor, torch.Tensor],
                key_mask: torch.Tensor | None):
        # the kernel normalizes and rotates q and k in the form it reads them (attention.AttentionKernel)
        return self.out(self.attend.from_projection(self.qkv(x), self.n_heads, self.q_norm, self.k_norm, rope,
                                                    key_mask))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int, ops: Ops):
        super().__init__()
        # w1 and w3 stay separate (not one stacked matmul): these are the names LoRAs and ComfyUI's
        # model patcher address, and at this size two GEMMs run as fast as one
        self.w1 = ops.Linear(dim, hidden, bias=False)
        self.w2 = ops.Linear(hidden, dim, bias=False)
        self.w3 = ops.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor | E4M3Rows) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), e4m3=takes_e4m3_rows(self.w2)))


def per_token(modulation: torch.Tensor, noisy: torch.Tensor | None) -> torch.Tensor:
    """adaLN parameters for every token. [B, n] -> [B, 1, n]: one timestep for the whole sequence. In an Omni
    sequence, [B, 2, n] from the (clean, noisy) timestep embeddings, and noisy [B, S, 1] picks each token's
    row -> [B, S, n]."""
    return modulation[:, None] if noisy is None else modulation.take_along_dim(noisy, dim=1)


class TransformerBlock(nn.Module):
    """Attention and SwiGLU, each wrapped in a sandwich of RMSNorms; optionally timestep-modulated."""

    def __init__(self, cfg: ZImageConfig, attention: AttentionKernel, modulated: bool, ops: Ops):
        super().__init__()
        self.attention = SelfAttention(cfg, attention, ops)
        self.feed_forward = SwiGLU(cfg.dim, cfg.ffn_hidden, ops)
        self.attention_norm1 = ops.RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention_norm2 = ops.RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm1 = ops.RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm2 = ops.RMSNorm(cfg.dim, cfg.norm_eps)
        self.modulated = modulated
        if modulated:
            # one Linear in a Sequential: the index is part of the released checkpoints' key names
            self.adaLN_modulation = nn.Sequential(ops.Linear(cfg.t_embed_dim, 4 * cfg.dim))

    def forward(self, x, rope, key_mask, t_emb: torch.Tensor | None = None, noisy: torch.Tensor | None = None):
        # x + tanh(gate) * norm2(sublayer(norm1(x) * (1 + scale))), for attention then the feed-forward;
        # without modulation, x + norm2(sublayer(norm1(x))). Each norm step is one fused kernel (fused.py).
        scale_attn = gate_attn = scale_ffn = gate_ffn = None
        if self.modulated:
            scale_attn, gate_attn, scale_ffn, gate_ffn = per_token(self.adaLN_modulation(t_emb), noisy).chunk(4, dim=-1)
        # where the next layer computes in FP8 (fp8.use_fp8_matmuls), the norm step writes its e4m3 codes directly
        h = self.attention(norm_modulate(x, self.attention_norm1, scale_attn, takes_e4m3_rows(self.attention.qkv)),
                           rope, key_mask)
        x = add_gated_norm(x, h, self.attention_norm2, gate_attn)
        h = self.feed_forward(norm_modulate(x, self.ffn_norm1, scale_ffn, takes_e4m3_rows(self.feed_forward.w1)))
        return add_gated_norm(x, h, self.ffn_norm2, gate_ffn)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (256 of them, cos then sin) through a two-layer MLP."""

    n_freqs = 256

    def __init__(self, cfg: ZImageConfig, ops: Ops):
        super().__init__()
        self.mlp = nn.Sequential(ops.Linear(self.n_freqs, cfg.t_embed_mid), nn.SiLU(),
                                 ops.Linear(cfg.t_embed_mid, cfg.t_embed_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.n_freqs // 2
        freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / half))
        angles = t.float()[:, None] * freqs
        features = torch.cat((angles.cos(), angles.sin()), dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    def __init__(self, cfg: ZImageConfig, ops: Ops):
        super().__init__()
        self.norm_final = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.linear = ops.Linear(cfg.dim, cfg.patch_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), ops.Linear(cfg.t_embed_dim, cfg.dim))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        scale = 1 + self.adaLN_modulation(t_emb)[:, None]
        return self.linear(self.norm_final(x) * scale)
