"""The FLUX VAE's decoder (ae.safetensors, Z-Image's VAE), run for speed: channels_last, fused GroupNorm + SiLU.

The math is the latent-diffusion decoder every FLUX-family tool runs: a 3x3 convolution in, a middle of two
residual blocks around one single-head attention over all positions, then per level, coarsest first, res_blocks
+ 1 residual blocks and (except at the finest) a nearest 2x upsample followed by a 3x3 convolution, and finally
GroupNorm, SiLU and a 3x3 convolution out to RGB in [-1, 1]. Residual block: GroupNorm, SiLU, conv, GroupNorm,
SiLU, conv, plus the input (through a 1x1 convolution where the width changes).

What makes it fast is layout, not different math: activations stay channels_last, where cuDNN's convolutions
run without transposing, and each GroupNorm + SiLU is one read and one write (group_norm.py). The parameters
keep the names of the file's `decoder.` weights, so a host's loaded VAE lends its tensors (load_state_dict with
assign=True): nothing is copied or held twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .group_norm import group_norm
from .kernels import check_kernels


@dataclass(frozen=True)
class DecoderConfig:
    z_channels: int = 16  # the latent's channels
    channels: int = 128  # the finest level's width; level i has channels * multipliers[i]
    multipliers: tuple[int, ...] = (1, 2, 4, 4)
    res_blocks: int = 2  # the file's num_res_blocks: each level of the decoder runs one more
    out_channels: int = 3
    groups: int = 32  # GroupNorm's groups, everywhere
    eps: float = 1e-6

    @classmethod
    def of(cls, weights: dict[str, torch.Tensor]) -> "DecoderConfig":
        """The shape of the decoder whose weights (the file's names without `decoder.`) these are."""
        try:
            levels = 1 + max(int(m.group(1)) for k in weights if (m := re.match(r"up\.(\d+)\.", k)))
            blocks = 1 + max(int(m.group(1)) for k in weights if (m := re.match(r"up\.0\.block\.(\d+)\.", k)))
            channels = weights["conv_out.weight"].shape[1]
            widths = [weights[f"up.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)]
            return cls(z_channels=weights["conv_in.weight"].shape[1], channels=channels,
                       multipliers=tuple(w // channels for w in widths), res_blocks=blocks - 1,
                       out_channels=weights["conv_out.weight"].shape[0])
        except (KeyError, ValueError, IndexError) as e:
            raise ValueError(f"these are not a FLUX-type VAE decoder's weights ({type(e).__name__}: {e})") from None

    @property
    def upscale(self) -> int:
        return 2 ** (len(self.multipliers) - 1)


class GroupNorm(nn.Module):
    """GroupNorm's parameters (named as torch.nn.GroupNorm's); silu: SiLU after it, in the same pass."""

    def __init__(self, channels: int, cfg: DecoderConfig):
        super().__init__()
        self.groups, self.eps = cfg.groups, cfg.eps
        self.weight = nn.Parameter(torch.empty(channels))
        self.bias = nn.Parameter(torch.empty(channels))

    def forward(self, x: torch.Tensor, silu: bool) -> torch.Tensor:
        return group_norm(x, self.groups, self.weight, self.bias, self.eps, silu=silu)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, cfg: DecoderConfig):
        super().__init__()
        self.norm1, self.conv1 = GroupNorm(c_in, cfg), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = GroupNorm(c_out, cfg), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.norm2(self.conv1(self.norm1(x, silu=True)), silu=True))
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


class Attention(nn.Module):
    """One head over every position, its projections 1x1 convolutions (the file's q, k, v, proj_out)."""

    def __init__(self, c: int, cfg: DecoderConfig):
        super().__init__()
        self.norm = GroupNorm(c, cfg)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        normed = self.norm(x, silu=False)
        # a 1x1 convolution is a matmul over positions: as [n, 1, h*w, c] rows for attention
        q, k, v = (p(normed).permute(0, 2, 3, 1).reshape(n, 1, h * w, c) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.reshape(n, h, w, c).permute(0, 3, 1, 2)  # channels_last again, without a copy
        return self.proj_out(out.contiguous(memory_format=torch.channels_last)).add_(x)


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VAEDecoder(nn.Module):
    """latent [N, z_channels, h, w] -> image [N, 3, h * upscale, w * upscale] in [-1, 1], unclamped."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.channels * m for m in cfg.multipliers]
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResBlock(widths[-1], widths[-1], cfg)
        self.mid.attn_1 = Attention(widths[-1], cfg)
        self.mid.block_2 = ResBlock(widths[-1], widths[-1], cfg)
        self.up = nn.ModuleList()  # indexed finest first, as in the file; run coarsest first
        c_in = widths[-1]
        for level in reversed(range(len(widths))):
            up = nn.Module()
            up.block = nn.ModuleList(ResBlock(c_in if i == 0 else widths[level], widths[level], cfg)
                                     for i in range(cfg.res_blocks + 1))
            if level > 0:
                up.upsample = Upsample(widths[level])
            self.up.insert(0, up)
            c_in = widths[level]
        self.norm_out = GroupNorm(widths[0], cfg)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    @classmethod
    def lending(cls, weights: dict[str, torch.Tensor]) -> "VAEDecoder":
        """A decoder on `weights` themselves (the file's names without `decoder.`; their device and dtype):
        built on the meta device, then handed the tensors; Parameters are taken as they are, so a host's module
        that later moves its parameters (param.data swapped) moves this decoder's too. Raises ValueError for any
        other layout. Run it under torch.inference_mode (or no_grad)."""
        with torch.device("meta"):
            decoder = cls(DecoderConfig.of(weights))
        try:
            decoder.load_state_dict(weights, assign=True)
        except RuntimeError as e:
            raise ValueError(f"these are not a FLUX-type VAE decoder's weights: {str(e)[:300]}") from None
        return decoder.eval()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        weight = self.conv_in.weight
        check_kernels(weight.device, weight.dtype)
        x = z.to(weight.device, weight.dtype)
        if x.is_cuda:  # cuDNN's fastest layout (a CPU's convolutions prefer the default one)
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.conv_in(x)
        x = self.mid.block_2(self.mid.attn_1(self.mid.block_1(x)))
        for up in reversed(self.up):
            for block in up.block:
                x = block(x)
            if hasattr(up, "upsample"):
                x = up.upsample(x)
        return self.conv_out(self.norm_out(x, silu=True))
