"""Flow-matching sampling: shifted sigma schedule, Euler steps, classifier-free guidance.

x_sigma = sigma * noise + (1 - sigma) * x0, and the model returns v = noise - x0, so each Euler step is
x <- x + (sigma_next - sigma) * v. Guidance follows the official Z-Image pipelines:
    v = v_pos + guidance * (v_pos - v_neg)        (guidance 0: no negative pass; ComfyUI's cfg = guidance + 1)
    cfg_normalization k > 0: |v| is capped at k * |v_pos| per sample
    cfg_truncation c: guidance is switched off once 1 - sigma > c
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .model import S3DiT
from .omni import Reference
from .runner import Runner

@dataclass(frozen=True)
class Preset:
    steps: int
    shift: float
    guidance: float
    cfg_normalization: float = 0.0
    cfg_truncation: float = 1.0


PRESETS = {
    # The official Turbo recipe says "9 steps": 9 sigmas from 1 to 0, shift 3, of which the last is 0, so
    # 8 transformer evaluations (the 9th evaluation of older pipelines moved x by (0 - 0) * v). Here that
    # is steps=8: the same grid, without the wasted call. (diffusers 0.42.1 with num_inference_steps=9
    # makes 9 evaluations on a finer grid; with 8 it matches this preset exactly.)
    "turbo": Preset(steps=8, shift=3.0, guidance=0.0),
    # Base: the official card's 50 steps, guidance 4 with a negative prompt (ComfyUI cfg 5)
    "base": Preset(steps=50, shift=3.0, guidance=4.0),
}

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step index, predicted x0, x after the step)


def flow_sigmas(steps: int, shift: float, denoise: float = 1.0) -> list[float]:
    """steps + 1 sigmas ending at 0: shift * t / (1 + (shift - 1) * t) on an even grid of t from 1 to 0.

    `steps` is the number of model evaluations (doubled when guidance is on). With denoise < 1 the grid is
    laid out for steps / denoise steps and only its last `steps` are run, as ComfyUI's KSampler does.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    # written so that NaN fails too: every comparison with NaN is false
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    if not 0.0 < shift < math.inf:
        raise ValueError(f"shift must be positive and finite, got {shift}")
    total = steps if denoise >= 1.0 else int(steps / denoise)
    t = torch.linspace(1.0, 0.0, total + 1, dtype=torch.float64)
    sigmas = shift * t / (1 + (shift - 1) * t)
    return sigmas[-(steps + 1):].tolist()


def make_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Gaussian noise from a CPU generator: the same numbers whatever device samples (and the same as
    ComfyUI's KSampler draws for that seed and latent shape)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")


@torch.no_grad()
def sample(
    model: Runner | S3DiT,
    noise: torch.Tensor,
    sigmas: list[float],
    positive: list[torch.Tensor],
    negative: list[torch.Tensor] | None = None,
    guidance: float = 0.0,
    cfg_normalization: float = 0.0,
    cfg_truncation: float = 1.0,
    latent: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    device: torch.device | str | None = None,
    references: list[list[Reference]] | None = None,
) -> torch.Tensor:
    """Integrate from sigmas[0] to sigmas[-1] and return the final latents (float32, on `device`).

    model: a Runner (runner.py), or an S3DiT, which then runs as it is (Runner(model)).

    noise, latent: [B, C, H, W]; latent is the clean starting image for img2img (None: empty).
    positive, negative: B caption feature tensors each, [L_i, cap_feat_dim] (with references, B lists of chunks).
    device: where to compute; default the model's. A host that offloads part of the weights (ComfyUI's
    lowvram) names its compute device here, since the model's first weight may sit elsewhere.
    references: Omni-Base / Edit: per sample, its clean reference images, given to every evaluation (the
    negative pass too) and never integrated; positive and negative captions are then lists of chunks.
    """
    for name, value in (("guidance", guidance), ("cfg_normalization", cfg_normalization),
                        ("cfg_truncation", cfg_truncation)):
        if not math.isfinite(value):  # a NaN guidance or truncation would silently turn guidance off
            raise ValueError(f"{name} must be a finite number, got {value}")
    if not isinstance(model, Runner):
        model = Runner(model)
    if guidance > 0 and negative is None:
        raise ValueError("guidance > 0 needs negative captions (an empty prompt's are the usual choice)")
    if len(positive) != noise.shape[0] or (negative is not None and len(negative) != noise.shape[0]):
        raise ValueError(f"need {noise.shape[0]} captions per side for a batch of {noise.shape[0]}")
    device = torch.device(device) if device is not None else model.device
    batch = noise.shape[0]
    x = noise.to(device=device, dtype=torch.float32) * sigmas[0]
    if latent is not None and sigmas[0] < 1.0:
        x = x + (1.0 - sigmas[0]) * latent.to(device=device, dtype=torch.float32)

    def to_device(caption):  # a tensor, or with references a list of chunk tensors
        return [c.to(device) for c in caption] if isinstance(caption, (list, tuple)) else caption.to(device)

    positive = [to_device(c) for c in positive]
    both = positive + [to_device(c) for c in negative] if negative is not None else None
    if references is not None:
        references = [[r.to(device) for r in refs] for refs in references]
    references_both = references + references if references is not None else None  # the guided batch's

    try:
        for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            guided = guidance > 0 and (1.0 - sigma) <= cfg_truncation
            if guided:
                v_pos, v_neg = model(torch.cat((x, x)), torch.full((2 * batch,), sigma, device=device), both,
                                     references=references_both).float().chunk(2)
                v = v_pos + guidance * (v_pos - v_neg)
                if cfg_normalization > 0:
                    dims = tuple(range(1, v.ndim))
                    limit = cfg_normalization * torch.linalg.vector_norm(v_pos, dim=dims, keepdim=True)
                    v = v * (limit / torch.linalg.vector_norm(v, dim=dims, keepdim=True)).clamp(max=1.0)
            else:
                v = model(x, torch.full((batch,), sigma, device=device), positive, references=references).float()
            if callback is not None:
                x0 = x - sigma * v
            x = x + (sigma_next - sigma) * v
            if callback is not None:
                callback(i, x0, x)
    finally:
        model.release_buffers()  # graphs and streaming buffers: the memory goes back to the caller (a VAE decode next)
    return x
