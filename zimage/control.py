"""ControlNet: the Z-Image-Turbo Fun ControlNet Union models (versions 1, 2.0 with inpainting, 2.1 lite), run as
ComfyUI runs them.

A control network is a short stack of transformer blocks of the main model's width, fed with a control latent:
the control image's VAE latent, and for the inpainting versions also a mask and the masked image's latent
(16 + 1 + 16 channels). Its stream runs beside the main model's image tokens: the first block of a control stack
adds the main stream's image tokens to it (before_proj), every control block's output, projected (after_proj)
and times the strength, is a hint added to the image tokens after one main block.

Where the hints go (ComfyUI's ZImageControlPatch, which these reproduce, including its reading of the 2.0 file):
- control layer k after main block k * div, div = round(30 / n_control_layers) (30: the released model's depth;
  15 layers -> main blocks 0, 2, ..., 28; 3 -> 0, 10, 20; 6 -> 0, 5, ..., 25);
- with refiner control (2.0, 2.1), refiner control block i after noise-refiner block i; the 2.0 file whose
  refiner after_proj is all zeros ("broken") runs control layer 0 there instead, then layers 1.. at once;
- without it (version 1), the control latent's tokens first go through two plain refiner blocks.
The control stream sees only the image's own tokens (no pad tokens), at their RoPE positions, with no mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from einops import rearrange

from .attention import Attention
from .blocks import Ops, TransformerBlock
from .config import ZImageConfig

MAIN_DEPTH = 30  # the released model's layers, over which the control layers are spaced (see the module doc)


@dataclass(frozen=True)
class ControlConfig:
    n_control_layers: int  # 15 (2.0), 3 (2.1 lite), 6 (1.0)
    n_refiner_layers: int = 2
    in_channels: int = 16  # 33 with the inpainting channels (mask, masked image's latent)
    refiner_control: bool = False  # 2.0 and 2.1: hints after the noise refiner's blocks too
    broken: bool = False  # the 2.0 file whose refiner hints are all zero: ComfyUI runs control layers there

    @property
    def spacing(self) -> int:
        return round(MAIN_DEPTH / self.n_control_layers)


class ControlBlock(TransformerBlock):
    """A modulated transformer block of the control stream, with its hint projection (after_proj) and, first in its
    stack, the projection it adds the main stream's image tokens through (before_proj)."""

    def __init__(self, cfg: ZImageConfig, attention: Attention, ops: Ops, first: bool):
        super().__init__(cfg, attention, True, ops)
        if first:
            self.before_proj = ops.Linear(cfg.dim, cfg.dim)
        self.after_proj = ops.Linear(cfg.dim, cfg.dim)

    def step(self, c: torch.Tensor, image: torch.Tensor, rope, t_emb: torch.Tensor):
        """(hint, the control stream after this block)."""
        if hasattr(self, "before_proj"):
            c = self.before_proj(c) + image
        c = self(c, rope, None, t_emb)
        return self.after_proj(c), c


class ControlNet(nn.Module):
    def __init__(self, cfg: ZImageConfig, control: ControlConfig, attention: str = "auto", ops: Ops = Ops()):
        super().__init__()
        self.cfg, self.control = cfg, control
        self.attention = Attention(attention)
        self.control_x_embedder = ops.Linear(cfg.patch_size * cfg.patch_size * control.in_channels, cfg.dim)
        self.control_layers = nn.ModuleList(
            ControlBlock(cfg, self.attention, ops, first=i == 0) for i in range(control.n_control_layers))
        if control.refiner_control:
            self.control_noise_refiner = nn.ModuleList(
                ControlBlock(cfg, self.attention, ops, first=i == 0) for i in range(control.n_refiner_layers))
        else:
            self.control_noise_refiner = nn.ModuleList(
                TransformerBlock(cfg, self.attention, True, ops) for _ in range(control.n_refiner_layers))

    def embed(self, latent: torch.Tensor, rope, t_emb: torch.Tensor) -> torch.Tensor:
        """The control latent [B, in_channels, H, W] -> the control stream's first tokens [B, H * W / 4, dim]."""
        p = self.cfg.patch_size
        c = self.control_x_embedder(rearrange(latent, "b c (h ph) (w pw) -> b (h w) (ph pw c)", ph=p, pw=p))
        if not self.control.refiner_control:  # version 1 refines the control tokens on their own first
            for block in self.control_noise_refiner:
                c = block(c, rope, None, t_emb)
        return c


class ControlHints:
    """One forward's control: wraps the main model's noise-refiner and main blocks so that each, after it runs, gets
    its hint. An instance keeps the control stream from block to block within one forward (a new forward starts
    it anew)."""

    def __init__(self, net: ControlNet, latent: torch.Tensor, strength: float | torch.Tensor):
        if latent.ndim != 4 or latent.shape[1] != net.control.in_channels:
            raise ValueError(f"the control latent must be [B, {net.control.in_channels}, H, W], got "
                             f"{list(latent.shape)}")
        self.net, self.latent, self.strength = net, latent, strength

    def blocks(self, model, blocks):
        """A block runner for model.forward: `blocks` (how the stacks' blocks run) with the hints added."""

        def run(stack):
            if stack is model.noise_refiner:
                return self._refiner(blocks(stack))
            if stack is model.layers:
                return self._main(blocks(stack))
            return blocks(stack)

        return run

    def _hinted(self, block, after):
        """block, then after(its input's image tokens, rope, t_emb) gives the hint added to its output's image
        tokens. The control stream computes in its own weights' dtype, which a host may keep apart from the main
        model's."""
        n, dtype = self._image_tokens(), self.net.control_x_embedder.weight.dtype

        def run(x, rope, key_mask, t_emb, *rest):
            out = block(x, rope, key_mask, t_emb, *rest)
            hint = after(x[:, :n].to(dtype), tuple(r[:, :n] for r in rope), t_emb.to(dtype))
            if hint is not None:
                # in float32 as a float strength multiplies (a tensor strength is a CUDA graph's input)
                out[:, :n] += (hint.float() * self.strength).to(out.dtype)
            return out
        return run

    def _refiner(self, blocks):
        net = self.net
        for i, block in enumerate(blocks):
            def after(image, rope, t_emb, i=i):
                if i == 0:  # a new forward: the control stream starts from the control latent
                    self.image_input = image
                    latent = self.latent.to(image).expand(len(image), -1, -1, -1)  # one control image per sample
                    self.c = net.embed(latent, rope, t_emb)
                if net.control.refiner_control and i < net.control.n_refiner_layers:
                    hint, self.c = self._refiner_step(i, rope, t_emb)
                    return hint
                return None
            yield self._hinted(block, after)

    def _refiner_step(self, i, rope, t_emb):
        net, x = self.net, self.image_input
        if not net.control.broken:
            return net.control_noise_refiner[i].step(self.c, x, rope, t_emb)
        if i == 0:
            return net.control_layers[0].step(self.c, x, rope, t_emb)
        first, c = None, self.c
        for layer in net.control_layers[1:]:
            hint, c = layer.step(c, x, rope, t_emb)
            first = hint if first is None else first
        return first, c

    def _main(self, blocks):
        net = self.net
        depth, spacing = net.control.n_control_layers, net.control.spacing
        for i, block in enumerate(blocks):
            if i % spacing or i // spacing >= depth:
                yield block
                continue

            def after(image, rope, t_emb, k=i // spacing):
                if k == 0:  # every main control layer reads the main stream's input
                    self.image_input = image
                hint, self.c = net.control_layers[k].step(self.c, self.image_input, rope, t_emb)
                return hint
            yield self._hinted(block, after)

    def _image_tokens(self) -> int:
        p = self.net.cfg.patch_size
        return (self.latent.shape[2] // p) * (self.latent.shape[3] // p)
