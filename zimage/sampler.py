"""Flow-matching sampling: shifted sigma schedule, Euler or multistep steps, classifier-free guidance, masks.

x_sigma = sigma * noise + (1 - sigma) * x0, and the model returns v = noise - x0, so its clean prediction at x is
x0_hat = x - sigma * v. Guidance follows the official Z-Image pipelines:
    v = v_pos + guidance * (v_pos - v_neg)        (guidance 0: no negative pass; ComfyUI's cfg = guidance + 1)
    cfg_normalization k > 0: |v| is capped at k * |v_pos| per sample
    cfg_truncation c: guidance is switched off once 1 - sigma > c
Steps, from sigma to sigma_next (SAMPLERS):
    euler: along the straight line through x and x0_hat: x <- x + (sigma_next - sigma) * (x - x0_hat) / sigma
    res_multistep: an exponential-integrator step in log sigma, x <- a x + (1 - a) x0_hat with a = sigma_next / sigma,
        plus a second-order term from the previous step's prediction (see _res_multistep_step). Its first step and
        a step to sigma 0 are Euler steps. The same steps as ComfyUI's samplers of those names, on the same sigmas.
A mask (inpainting) keeps part of a given latent: see sample().
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .control import ControlHints
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

SAMPLERS = ("euler", "res_multistep")
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


def make_noise(seed: int, shape: tuple[int, ...], indices: list[int] | None = None) -> torch.Tensor:
    """Gaussian noise from a CPU generator: the same numbers whatever device samples (and the same as
    ComfyUI's KSampler draws for that seed and latent shape).

    indices: for a batch that holds some entries of a larger one (ComfyUI's batch_index), the entries' numbers
    in that batch, one per entry of `shape`'s batch: entry k gets the noise of entry indices[k], where entry j's
    noise is the (j + 1)-th single-entry draw from the seed. Repeats are allowed; the order is kept.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    if indices is None:
        return torch.randn(shape, generator=generator, dtype=torch.float32, device="cpu")
    indices = list(indices)
    if len(indices) != shape[0] or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                           for i in indices):
        raise ValueError(f"indices must be {shape[0]} whole numbers >= 0, one per batch entry; got {indices}")
    draws = [torch.randn((1, *shape[1:]), generator=generator, dtype=torch.float32, device="cpu")
             for _ in range(max(indices) + 1)]
    return torch.cat([draws[i] for i in indices])


def check_sigmas(sigmas: list[float]) -> None:
    """What every step needs of a schedule: at least two finite sigmas, strictly decreasing, none below 0."""
    if len(sigmas) < 2:
        raise ValueError(f"need at least 2 sigmas (one step), got {len(sigmas)}")
    if not all(math.isfinite(s) for s in sigmas) or sigmas[-1] < 0 or any(b >= a for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"sigmas must be finite, strictly decreasing and not below 0, got {sigmas}")


def check_mask(mask: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor | None) -> None:
    """A mask the sampler can apply as given: 4-D, the noise's height and width, a batch of 1 or the noise's,
    1 or the noise's channels, finite values in [0, 1], and a latent for it to keep."""
    if latent is None:
        raise ValueError("a mask keeps part of a latent: pass the latent (the image being inpainted)")
    batch, channels, height, width = noise.shape
    if (mask.ndim != 4 or mask.shape[2:] != noise.shape[2:] or mask.shape[0] not in (1, batch)
            or mask.shape[1] not in (1, channels)):
        raise ValueError(f"the mask is {list(mask.shape)}; for noise {list(noise.shape)} it must be "
                         f"[1 or {batch}, 1 or {channels}, {height}, {width}] (resize it to the latent first)")
    if not bool(torch.isfinite(mask).all()) or mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"the mask's values must be finite and in [0, 1] (1 samples, 0 keeps the latent); they "
                         f"range over [{mask.min().item()}, {mask.max().item()}]")


def _res_multistep_step(x, x0, previous_x0, sigma_prev, sigma, sigma_next):
    """One step of the second-order multistep exponential integrator (res_multistep) in x0-prediction form.

    In log sigma, with h = log(sigma / sigma_next), the first-order step is x <- a x + (1 - a) x0 where
    a = sigma_next / sigma = exp(-h). The prediction is taken as linear in log sigma through the previous step's
    (at sigma_prev, r = log(sigma_prev / sigma) / h step sizes back) and this one's; integrating that line
    exactly adds (1 - (1 - a) / h) / r * (x0 - previous_x0)."""
    a = sigma_next / sigma
    h = math.log(sigma / sigma_next)
    r = math.log(sigma_prev / sigma) / h
    return a * x + (1 - a) * x0 + ((1 - (1 - a) / h) / r) * (x0 - previous_x0)


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
    mask: torch.Tensor | None = None,
    sampler: str = "euler",
    control: list[ControlHints] | None = None,
) -> torch.Tensor:
    """Integrate from sigmas[0] to sigmas[-1] and return the final latents (float32, on `device`).

    model: a Runner (runner.py) or anything called as one (workers.WorkerRunner), or an S3DiT, which then runs as
    it is (Runner(model)).

    noise, latent: [B, C, H, W]; latent is the clean starting image for img2img (None: empty).
    sigmas: strictly decreasing, from at most 1 down to (usually) 0; flow_sigmas() makes them.
    positive, negative: B caption feature tensors each, [L_i, cap_feat_dim] (with references, B lists of chunks).
    device: where to compute; default the model's. A host that offloads part of the weights (ComfyUI's
    lowvram) names its compute device here, since the model's first weight may sit elsewhere.
    references: Omni-Base / Edit: per sample, its clean reference images, given to every evaluation (the
    negative pass too) and never integrated; positive and negative captions are then lists of chunks.
    mask: inpainting. Where to sample, per latent value: [1 or B, 1 or C, H, W], values in [0, 1]; 1 samples, 0
    keeps `latent` (which is then required), values between blend the two. Before each evaluation the kept part
    of x is set to where `latent` lies at that sigma on its straight path to `noise` (sigma * noise +
    (1 - sigma) * latent), and the kept part of the clean prediction is `latent` itself, so the steps end on
    `latent` there; the rest is sampled with the whole image in view.
    sampler: one of SAMPLERS (the module docstring gives their steps).
    control: ControlNets with their control latents ([1 or B, in_channels, H, W]) and strengths (control.py),
    given to every evaluation, the negative pass too, as ComfyUI's patches see both halves of a guided batch.
    """
    for name, value in (("guidance", guidance), ("cfg_normalization", cfg_normalization),
                        ("cfg_truncation", cfg_truncation)):
        if not math.isfinite(value):  # a NaN guidance or truncation would silently turn guidance off
            raise ValueError(f"{name} must be a finite number, got {value}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    check_sigmas(sigmas)
    if mask is not None:
        check_mask(mask, noise, latent)
    if isinstance(model, torch.nn.Module):  # an S3DiT (a host's import of this engine's included)
        model = Runner(model)
    if guidance > 0 and negative is None:
        raise ValueError("guidance > 0 needs negative captions (an empty prompt's are the usual choice)")
    if len(positive) != noise.shape[0] or (negative is not None and len(negative) != noise.shape[0]):
        raise ValueError(f"need {noise.shape[0]} captions per side for a batch of {noise.shape[0]}")
    device = torch.device(device) if device is not None else model.device
    batch = noise.shape[0]
    noise = noise.to(device=device, dtype=torch.float32)
    if latent is not None:
        latent = latent.to(device=device, dtype=torch.float32)
    x = noise * sigmas[0]
    if latent is not None and sigmas[0] < 1.0:
        x = x + (1.0 - sigmas[0]) * latent
    if mask is not None:
        mask = mask.to(device=device, dtype=torch.float32)

    def to_device(caption):  # a tensor, or with references a list of chunk tensors
        return [c.to(device) for c in caption] if isinstance(caption, (list, tuple)) else caption.to(device)

    positive = [to_device(c) for c in positive]
    both = positive + [to_device(c) for c in negative] if negative is not None else None
    if references is not None:
        references = [[r.to(device) for r in refs] for refs in references]
    references_both = references + references if references is not None else None  # the guided batch's

    for h in control or ():
        if len(h.latent) not in (1, batch) or h.latent.shape[2:] != noise.shape[2:]:
            raise ValueError(f"a control latent is {list(h.latent.shape)}; sampling {list(noise.shape)} needs one of "
                             f"[1 or {batch}, {h.net.control.in_channels}, {noise.shape[2]}, {noise.shape[3]}] (encode the "
                             f"control image at the size being sampled)")
    control = [ControlHints(h.net, h.latent.to(device), h.strength) for h in control or ()]
    control_both = [ControlHints(h.net, h.latent.repeat(2, 1, 1, 1) if len(h.latent) > 1 else h.latent, h.strength)
                    for h in control]  # the guided batch's: each sample's control latent for both of its halves

    def velocity(x_in, sigma):
        if guidance > 0 and (1.0 - sigma) <= cfg_truncation:
            v_pos, v_neg = model(torch.cat((x_in, x_in)), torch.full((2 * batch,), sigma, device=device), both,
                                 references=references_both, control=control_both).float().chunk(2)
            v = v_pos + guidance * (v_pos - v_neg)
            if cfg_normalization > 0:
                dims = tuple(range(1, v.ndim))
                limit = cfg_normalization * torch.linalg.vector_norm(v_pos, dim=dims, keepdim=True)
                v = v * (limit / torch.linalg.vector_norm(v, dim=dims, keepdim=True)).clamp(max=1.0)
            return v
        return model(x_in, torch.full((batch,), sigma, device=device), positive, references=references,
                     control=control).float()

    def clean_prediction(x, sigma):
        if mask is None:
            return x - sigma * velocity(x, sigma)
        x_in = mask * x + (1 - mask) * (sigma * noise + (1 - sigma) * latent)
        return mask * (x_in - sigma * velocity(x_in, sigma)) + (1 - mask) * latent

    previous = None  # (sigma, clean prediction) of the step before, for the multistep sampler
    try:
        for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            x0 = clean_prediction(x, sigma)
            if sampler == "res_multistep" and previous is not None and sigma_next > 0:
                x = _res_multistep_step(x, x0, previous[1], previous[0], sigma, sigma_next)
            else:
                x = x + (sigma_next - sigma) * ((x - x0) / sigma)
            previous = (sigma, x0)
            if callback is not None:
                callback(i, x0, x)
    finally:
        model.release_buffers()  # graphs and streaming buffers: the memory goes back to the caller (a VAE decode next)
    return x
