"""The engine's res_multistep sampler, inpainting masks and batch-index noise, against reference loops written here.

The references follow the published forms, not the engine's: res_multistep as the exponential integrator of
arXiv 2308.02157 in t = -log sigma with its phi-function coefficients b1, b2 (the engine writes the same step
as a first-order step plus a correction), and the mask as an explicit re-noising of the kept region before each
evaluation and a replaced prediction after it. Both run in float64 on the engine's own forwards.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import randomize_, rel_err
from zimage import Runner, S3DiT, ZImageConfig, flow_sigmas, make_noise, sample

CFG = ZImageConfig.tiny()


@pytest.fixture(scope="module")
def engine():
    return randomize_(S3DiT(CFG), seed=3).eval()


def captions(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, CFG.cap_feat_dim, generator=g) for n in lengths]


def reference_loop(engine, noise, sigmas, positive, method="euler", latent=None, mask=None):
    """x0-prediction sampling as k-diffusion-style samplers run it, with ComfyUI's inpainting semantics."""
    run = Runner(engine)
    noise = noise.double()
    x = sigmas[0] * noise + ((1 - sigmas[0]) * latent.double() if latent is not None else 0)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x_in = x
        if mask is not None:
            x_in = mask * x + (1 - mask) * (s * noise + (1 - s) * latent)
        with torch.no_grad():
            v = run(x_in.float(), torch.full((x.shape[0],), s), positive).double()
        denoised = x_in - s * v
        if mask is not None:
            denoised = mask * denoised + (1 - mask) * latent
        if method == "euler" or old_denoised is None or s_next == 0:
            x = x + (x - denoised) / s * (s_next - s)
        else:  # second-order multistep (res_multistep): t = -log sigma, step h, c2 = (t_prev - t) / h
            t, t_next, t_prev = -math.log(s), -math.log(s_next), -math.log(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            x = math.exp(-h) * x + h * (b1 * denoised + b2 * old_denoised)
        old_denoised = denoised
    return x.float()


@pytest.mark.parametrize("steps,shift,denoise", [(8, 3.0, 1.0), (5, 6.0, 1.0), (6, 3.0, 0.6)])
def test_res_multistep_matches_the_reference(engine, steps, shift, denoise):
    noise, image, positive = make_noise(1, (2, 16, 6, 8)), make_noise(2, (2, 16, 6, 8)), captions([9, 4], 1)
    sigmas = flow_sigmas(steps, shift, denoise)
    latent = image if denoise < 1 else None
    got = sample(engine, noise, sigmas, positive, latent=latent, sampler="res_multistep")
    expected = reference_loop(engine, noise, sigmas, positive, "res_multistep", latent=latent)
    assert rel_err(got, expected) <= 1e-5
    # a method of its own: not the Euler result
    euler = sample(engine, noise, sigmas, positive, latent=latent)
    assert rel_err(euler, reference_loop(engine, noise, sigmas, positive, "euler", latent=latent)) <= 1e-5
    assert rel_err(got, euler) > 1e-3


def region_mask(shape, soft=False):
    """1 on the left half of the columns (sampled), 0 on the right (kept); soft: a band of 0.5 between."""
    mask = torch.zeros(shape[0], 1, *shape[2:])
    mask[..., : shape[3] // 2] = 1.0
    if soft:
        mask[..., shape[3] // 2 : shape[3] // 2 + 2] = 0.5
    return mask


@pytest.mark.parametrize("method", ["euler", "res_multistep"])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("denoise", [1.0, 0.7])
def test_mask_keeps_the_latent_where_it_is_zero_and_matches_the_reference(engine, method, soft, denoise):
    shape = (2, 16, 6, 10)
    noise, image, positive = make_noise(5, shape), make_noise(6, shape), captions([7, 12], 3)
    mask = region_mask(shape, soft)
    sigmas = flow_sigmas(6, 3.0, denoise)
    got = sample(engine, noise, sigmas, positive, latent=image, mask=mask, sampler=method)
    expected = reference_loop(engine, noise, sigmas, positive, method, latent=image, mask=mask.double())
    assert rel_err(got, expected) <= 1e-5
    kept, sampled = (mask == 0).expand(shape), (mask == 1).expand(shape)
    torch.testing.assert_close(got[kept], image[kept], rtol=0, atol=1e-5)
    assert rel_err(got[sampled], image[sampled]) > 0.1
    # the sampled part saw the kept part: unmasked sampling gives another result there
    free = sample(engine, noise, sigmas, positive, latent=image if denoise < 1 else None, sampler=method)
    assert rel_err(got[sampled], free[sampled]) > 1e-3


def test_a_mask_of_ones_samples_as_without_a_mask(engine):
    shape = (1, 16, 4, 6)
    noise, image, positive = make_noise(7, shape), make_noise(8, shape), captions([5], 4)
    sigmas = flow_sigmas(4, 3.0)
    plain = sample(engine, noise, sigmas, positive)
    assert torch.equal(sample(engine, noise, sigmas, positive, latent=image, mask=torch.ones(1, 1, 4, 6)), plain)


def test_callback_sees_the_masked_prediction(engine):
    shape = (1, 16, 4, 6)
    noise, image, positive = make_noise(9, shape), make_noise(10, shape), captions([5], 5)
    mask = region_mask(shape)
    seen = []
    sample(engine, noise, flow_sigmas(3, 3.0), positive, latent=image, mask=mask,
           callback=lambda i, x0, x: seen.append(x0))
    kept = (mask == 0).expand(shape)
    assert len(seen) == 3 and all(torch.equal(x0[kept], image[kept]) for x0 in seen)


@pytest.mark.parametrize("mask,latent,message", [
    (torch.ones(1, 1, 4, 4), None, "pass the latent"),
    (torch.ones(1, 1, 2, 2), "image", r"the mask is \[1, 1, 2, 2\].*\[1 or 2, 1 or 16, 4, 4\]"),
    (torch.ones(3, 1, 4, 4), "image", r"the mask is \[3, 1, 4, 4\]"),
    (torch.ones(4, 4), "image", r"the mask is \[4, 4\]"),
    (torch.full((1, 1, 4, 4), 1.5), "image", r"in \[0, 1\].*1.5"),
    (torch.full((1, 1, 4, 4), float("nan")), "image", "finite"),
])
def test_bad_masks_are_refused(engine, mask, latent, message):
    noise = make_noise(0, (2, 16, 4, 4))
    with pytest.raises(ValueError, match=message):
        sample(engine, noise, flow_sigmas(2, 3.0), captions([3, 3], 0), latent=noise if latent else None, mask=mask)


@pytest.mark.parametrize("sigmas,message", [
    ([1.0], "at least 2 sigmas"),
    ([1.0, 0.5, 0.5, 0.0], "strictly decreasing"),
    ([1.0, float("nan"), 0.0], "finite"),
    ([1.0, 0.5, -0.1], "not below 0"),
])
def test_bad_sigmas_are_refused(engine, sigmas, message):
    with pytest.raises(ValueError, match=message):
        sample(engine, make_noise(0, (1, 16, 4, 4)), sigmas, captions([3], 0), sampler="res_multistep")


def test_an_unknown_sampler_is_refused(engine):
    with pytest.raises(ValueError, match="unknown sampler 'dpmpp_2m'; choose one of euler, res_multistep"):
        sample(engine, make_noise(0, (1, 16, 4, 4)), flow_sigmas(2, 3.0), captions([3], 0), sampler="dpmpp_2m")


def test_noise_for_batch_indices_is_that_of_those_entries():
    """Entry k gets the noise of entry indices[k] of the batch the seed draws; a full range is the plain draw."""
    shape = (4, 16, 5, 3)
    whole = make_noise(11, shape)
    assert torch.equal(make_noise(11, shape, [0, 1, 2, 3]), whole)
    picked = make_noise(11, (3, 16, 5, 3), [3, 1, 3])
    assert torch.equal(picked, whole[[3, 1, 3]])
    assert not torch.equal(make_noise(11, (1, 16, 5, 3), [2]), make_noise(11, (1, 16, 5, 3)))


@pytest.mark.parametrize("indices", [[0], [0, -1], [0, 1.5], [True, 0]])
def test_bad_batch_indices_are_refused(indices):
    with pytest.raises(ValueError, match=r"indices must be 2 whole numbers >= 0, one per batch entry"):
        make_noise(0, (2, 16, 4, 4), indices)
