"""Scaled dot-product attention with its kernel chosen once, when the model is loaded.

PyTorch picks among several SDPA kernels per call. On an H100 the cuDNN kernel ran this model's shape
(1, 30, 4224, 128) 1.9x faster than the flash kernel, which PyTorch would otherwise prefer, so the
model states its preference order once and every layer uses it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .fused import qk_norm_rope

# The preferred kernel first; where it cannot take a call (flash takes no mask, which batches of captions of
# different lengths need), PyTorch falls through to the next in the list.
FALLBACK = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
BACKENDS: dict[str, list[SDPBackend]] = {
    "auto": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, *FALLBACK],
    "cudnn": [SDPBackend.CUDNN_ATTENTION, *FALLBACK],
    "flash": [SDPBackend.FLASH_ATTENTION, *FALLBACK],
    "efficient": FALLBACK,
    "math": [SDPBackend.MATH],
}


class AttentionKernel:
    """How a layer attends: attention(q, k, v, key_mask) with q, k, v [B, H, S, D] and key_mask [B, 1, 1, S] bool
    or None, returning [B, H, S, D]; and from_projection, which starts from the layer's fused projection. A kernel
    that wants q, k and v in another form (FP8 codes, fp8_attention.py) overrides from_projection."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None):
        raise NotImplementedError

    def from_projection(self, qkv: torch.Tensor, n_heads: int, q_norm, k_norm, rope, key_mask) -> torch.Tensor:
        """qkv [B, S, 3 * H * D] -> [B, S, H * D]: q and k normalized per head and rotated (fused.qk_norm_rope),
        then attended."""
        q, k = qk_norm_rope(qkv, n_heads, q_norm, k_norm, *rope)  # each [B, S, H, D]
        v = qkv.unflatten(-1, (3, n_heads, -1))[:, :, 2]
        out = self(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), key_mask)
        return out.transpose(1, 2).flatten(2)


class Attention(AttentionKernel):
    """PyTorch's scaled dot-product attention, its kernels in this backend's order."""

    def __init__(self, backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.backend = backend
        self.kernels = BACKENDS[backend]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None):
        if q.device.type != "cuda":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        with sdpa_kernel(self.kernels, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)

    def __repr__(self):
        return f"Attention({self.backend!r})"
