"""The sampler against diffusers 0.42.1's ZImagePipeline: schedule, Euler loop, CFG, normalization, truncation."""

from __future__ import annotations

import pytest
import torch

from helpers import reference_pair, rel_err
from zimage import PRESETS, ZImageConfig, flow_sigmas, make_noise, sample

CFG = ZImageConfig.tiny()


@pytest.fixture(scope="module")
def models():
    return reference_pair(CFG, seed=5)


def pipeline(transformer, shift=3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, noise, positive, negative=None, **kwargs):
    """diffusers' own loop on our noise and caption features; returns final latents and the transformer calls."""
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    try:
        latents = pipe(prompt_embeds=positive, negative_prompt_embeds=negative, latents=noise.clone(),
                       height=noise.shape[2] * 8, width=noise.shape[3] * 8, output_type="latent", **kwargs).images
    finally:
        hook.remove()
    return latents, calls


def captions(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, CFG.cap_feat_dim, generator=g) for n in lengths]


@pytest.mark.parametrize("steps", [1, 2, 8, 9, 28, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_sigmas_match_the_pipeline_schedule(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas, retrieve_timesteps

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=get_default_z_image_sigmas(steps))
    assert torch.allclose(torch.tensor(flow_sigmas(steps, shift), dtype=torch.float64), scheduler.sigmas.double(), atol=1e-6, rtol=0)


def test_turbo_preset_is_the_official_nine_sigma_recipe(models):
    """The official recipe: 9 sigmas from 1 to 0 (shift 3), hence 8 useful evaluations. diffusers 0.42.1
    with num_inference_steps=9 makes 9 evaluations on another grid; the preset makes 8, on this one."""
    reference, engine = models
    turbo = PRESETS["turbo"]
    t = torch.linspace(1, 0, 9, dtype=torch.float64)
    official = (3 * t / (1 + 2 * t)).tolist()
    assert (turbo.steps, turbo.shift, turbo.guidance) == (8, 3.0, 0.0)
    assert flow_sigmas(turbo.steps, turbo.shift) == pytest.approx(official, abs=1e-12)

    noise, positive = make_noise(1, (1, 16, 6, 8)), captions([11], 0)
    _, calls_nine = run_pipeline(pipeline(reference), noise, positive, num_inference_steps=9, guidance_scale=0.0)
    assert len(calls_nine) == 9

    expected, calls = run_pipeline(pipeline(reference), noise, positive, num_inference_steps=8, guidance_scale=0.0)
    assert len(calls) == 8
    evaluations = []
    hook = engine.register_forward_hook(lambda module, args, out: evaluations.append(1))
    got = sample(engine, noise, flow_sigmas(turbo.steps, turbo.shift), positive)
    hook.remove()
    assert len(evaluations) == 8
    assert rel_err(got, expected) <= 1e-5


def test_turbo_batch_with_different_captions_matches_pipeline(models):
    reference, engine = models
    noise, positive = make_noise(2, (2, 16, 8, 6)), captions([3, 45], 1)
    expected, _ = run_pipeline(pipeline(reference), noise, positive, num_inference_steps=5, guidance_scale=0.0)
    got = sample(engine, noise, flow_sigmas(5, 3.0), positive)
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("normalization,truncation", [(0.0, 1.0), (1.0, 1.0), (1.3, 1.0), (1.0, 0.5), (0.0, 0.2)])
def test_base_cfg_loop_matches_pipeline(models, normalization, truncation):
    reference, engine = models
    noise, positive, negative = make_noise(3, (2, 16, 6, 6)), captions([20, 7], 2), captions([5, 40], 3)
    expected, calls = run_pipeline(pipeline(reference), noise, positive, negative, num_inference_steps=6,
                                   guidance_scale=4.0, cfg_normalization=normalization if normalization != 1.0 else True,
                                   cfg_truncation=truncation)
    got = sample(engine, noise, flow_sigmas(6, 3.0), positive, negative, guidance=4.0,
                 cfg_normalization=normalization, cfg_truncation=truncation)
    assert rel_err(got, expected) <= 1e-5
    # the reference switched guidance off exactly where truncation says: batch 4 (guided) or 2 (not)
    sigmas = flow_sigmas(6, 3.0)[:-1]
    assert calls == [4 if 1 - s <= truncation else 2 for s in sigmas]


def test_cfg_options_change_the_result(models):
    _, engine = models
    noise, positive, negative = make_noise(4, (1, 16, 6, 6)), captions([20], 4), captions([5], 5)
    run = lambda **kw: sample(engine, noise, flow_sigmas(4, 3.0), positive, negative, **kw)
    plain = run(guidance=4.0)
    assert rel_err(run(guidance=4.0, cfg_normalization=1.0), plain) > 1e-3
    assert rel_err(run(guidance=4.0, cfg_truncation=0.3), plain) > 1e-3
    assert rel_err(run(guidance=0.0), plain) > 1e-3


def test_img2img_denoise_matches_pipeline_on_the_tail_of_the_schedule(models):
    """denoise 0.5 with 4 steps: the last 4 steps of the 8-step schedule, starting from the noised image."""
    reference, engine = models
    assert flow_sigmas(4, 3.0, denoise=0.5) == pytest.approx(flow_sigmas(8, 3.0)[-5:])
    noise, image, positive = make_noise(6, (1, 16, 6, 10)), make_noise(7, (1, 16, 6, 10)), captions([13], 6)
    sigmas = flow_sigmas(4, 3.0, denoise=0.5)
    start = sigmas[0] * noise + (1 - sigmas[0]) * image
    unshifted_tail = torch.linspace(1, 0, 9)[4:8].tolist()
    expected, calls = run_pipeline(pipeline(reference), start, positive, sigmas=unshifted_tail, guidance_scale=0.0)
    got = sample(engine, noise, sigmas, positive, latent=image)
    assert len(calls) == 4
    assert rel_err(got, expected) <= 1e-5


def test_noise_is_seeded_on_the_cpu():
    a, b = make_noise(42, (2, 16, 4, 4)), make_noise(42, (2, 16, 4, 4))
    assert a.device.type == "cpu" and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, make_noise(43, (2, 16, 4, 4)))
    # the stream ComfyUI's KSampler draws for a seed: the global generator after torch.manual_seed(seed)
    torch.manual_seed(42)
    assert torch.equal(a, torch.randn(2, 16, 4, 4))


def test_callback_sees_every_step_and_can_interrupt(models):
    _, engine = models
    noise, positive = make_noise(8, (1, 16, 4, 4)), captions([6], 7)
    sigmas = flow_sigmas(5, 3.0)
    seen = []

    def record(step, x0, x):
        seen.append((step, x0.clone(), x.clone()))

    final = sample(engine, noise, sigmas, positive, callback=record)
    assert [s for s, _, _ in seen] == list(range(5))
    assert torch.equal(seen[-1][2], final)
    # x0 is the prediction at that step: x = sigma * noise_hat + (1 - sigma) * x0 along the straight path
    x_before = seen[1][2]
    v = (seen[2][2] - x_before) / (sigmas[3] - sigmas[2])
    assert rel_err(seen[2][1], x_before - sigmas[2] * v) <= 1e-5

    class Interrupted(Exception):
        pass

    evaluations = []
    hook = engine.register_forward_hook(lambda module, args, out: evaluations.append(1))

    def stop_at_two(step, x0, x):
        if step == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        sample(engine, noise, sigmas, positive, callback=stop_at_two)
    hook.remove()
    assert len(evaluations) == 3


@pytest.mark.parametrize("kwargs,message", [
    (dict(steps=0, shift=3.0), "steps must be at least 1"),
    (dict(steps=4, shift=3.0, denoise=0.0), "denoise must be in"),
    (dict(steps=4, shift=3.0, denoise=1.5), "denoise must be in"),
    (dict(steps=4, shift=0.0), "shift must be positive"),
    (dict(steps=4, shift=float("nan")), "shift must be positive and finite"),
    (dict(steps=4, shift=float("inf")), "shift must be positive and finite"),
    (dict(steps=4, shift=3.0, denoise=float("nan")), "denoise must be in"),
])
def test_bad_schedules_are_explained(kwargs, message):
    with pytest.raises(ValueError, match=message):
        flow_sigmas(**kwargs)


def test_guidance_needs_negative(models):
    _, engine = models
    with pytest.raises(ValueError, match="negative"):
        sample(engine, make_noise(0, (1, 16, 4, 4)), flow_sigmas(2, 3.0), captions([3], 0), guidance=2.0)


@pytest.mark.parametrize("option", ["guidance", "cfg_normalization", "cfg_truncation"])
def test_non_finite_guidance_options_are_refused(models, option):
    """A NaN guidance compares false with 0 and would silently sample without guidance; NaN truncation likewise."""
    _, engine = models
    caps = captions([3], 0)
    with pytest.raises(ValueError, match=f"{option} must be a finite number"):
        sample(engine, make_noise(0, (1, 16, 4, 4)), flow_sigmas(2, 3.0), caps, caps, **{option: float("nan")})
