"""Omni-Base / Edit: reference images in the engine against diffusers 0.42.1 on the same random weights (float32).

The velocity with references equals ZImageTransformer2DModel's Omni mode (nested image lists, SigLIP features,
image_noise_mask), and sample() with references equals ZImageOmniPipeline's own loop, run end to end with a tiny
VAE and a tiny SigLIP2 whose outputs the engine is handed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import diffusers_omni_velocity, diffusers_velocity, reference_pair, rel_err
from zimage import (Reference, S3DiT, ZImageConfig, flow_sigmas, make_noise, omni_prompt_chunks,
                    sample)

TINY = ZImageConfig.tiny(siglip_feat_dim=24)
# the released head (128) and RoPE split (32, 48, 48); fewer, narrower layers
MID = ZImageConfig(dim=384, n_heads=3, n_layers=2, n_refiner_layers=1, ffn_hidden=1024, cap_feat_dim=96,
                   t_embed_dim=256, siglip_feat_dim=72)


PARITY_CONFIGS = {"tiny": TINY, "mid": MID}  # the `pair` fixture (conftest.py) runs each


def make_inputs(cfg, seed, height, width, samples, sigmas):
    """samples: per sample (caption chunk lengths, [(reference latent h, w, SigLIP rows, cols), ...])."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(samples), cfg.in_channels, height, width, generator=g)
    captions = [[torch.randn(n, cfg.cap_feat_dim, generator=g) for n in lens] for lens, _ in samples]
    references = [[Reference(torch.randn(cfg.in_channels, h, w, generator=g),
                             torch.randn(rows, cols, cfg.siglip_feat_dim, generator=g))
                   for h, w, rows, cols in refs] for _, refs in samples]
    return latents, torch.tensor(sigmas), captions, references


CASES = {
    "one reference": (8, 8, [((5, 20, 3), [(8, 8, 4, 4)])], [0.7]),
    "two references, non-square": (6, 10, [((4, 2, 37, 3), [(10, 6, 5, 3), (4, 12, 2, 6)])], [0.3]),
    # chunks of whole pad blocks: nothing for diffusers' caption positions to shift (omni.caption_tokens)
    "chunks without padding": (4, 6, [((32, 64, 32), [(6, 4, 3, 5)])], [1.0]),
    "batch 2, captions differ": (6, 8, [((6, 21, 4), [(8, 12, 3, 5)]), ((6, 40, 4), [(8, 12, 3, 5)])], [0.9, 0.2]),
    "batch 2, references differ": (8, 6, [((3, 1, 50, 2), [(4, 4, 1, 1), (12, 8, 6, 4)]), ((9, 9, 3), [(6, 14, 3, 7)])],
                                   [0.5, 0.03]),
    "no references (Omni text-to-image)": (6, 6, [((17,), []), ((40,), [])], [0.6, 0.0]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_velocity_matches_diffusers(pair, case):
    cfg, reference, model = pair
    height, width, samples, sigmas = CASES[case]
    latents, sigma, captions, references = make_inputs(cfg, 5, height, width, samples, sigmas)
    with torch.no_grad():
        expected = diffusers_omni_velocity(reference, latents, sigma, captions, references)
        got = model(latents, sigma, captions, references=references)
    assert got.shape == latents.shape
    assert rel_err(got, expected) <= 1e-5


def test_mixed_batch_equals_each_sample_alone(pair):
    """Samples with none, two and one references in one batch (diffusers cannot batch these: it reads the first
    sample's SigLIP features for all): each gets what it gets alone, which is diffusers' result."""
    cfg, reference, model = pair
    samples = [((12,), []), ((3, 3, 30, 5), [(6, 8, 3, 4), (10, 4, 5, 2)]), ((7, 70, 2), [(8, 8, 2, 2)])]
    latents, sigma, captions, references = make_inputs(cfg, 6, 6, 8, samples, [0.8, 0.4, 0.1])
    with torch.no_grad():
        batched = model(latents, sigma, captions, references=references)
        for i in range(3):
            one = slice(i, i + 1)
            alone = model(latents[one], sigma[one], captions[one], references=references[one])
            assert rel_err(batched[one], alone) <= 1e-5
            assert rel_err(alone, diffusers_omni_velocity(reference, latents[one], sigma[one], captions[one],
                                                          references[one])) <= 1e-5


def test_velocity_depends_on_every_input():
    """Guards against a parity test passing for a model that ignores an input."""
    reference, model = reference_pair(TINY, seed=2)
    latents, sigma, captions, references = make_inputs(TINY, 7, 6, 6, [((4, 9, 3), [(6, 6, 3, 3)])], [0.5])
    ref = references[0][0]
    with torch.no_grad():
        base = model(latents, sigma, captions, references=references)
        changed = {
            "sigma": model(latents, torch.tensor([0.6]), captions, references=references),
            "reference latent": model(latents, sigma, captions, references=[[Reference(ref.latent.flip(-1), ref.siglip)]]),
            "SigLIP features": model(latents, sigma, captions, references=[[Reference(ref.latent, ref.siglip.flip(0))]]),
        }
        for j in range(3):
            chunks = list(captions[0])
            chunks[j] = -chunks[j]
            changed[f"chunk {j}"] = model(latents, sigma, [chunks], references=references)
    for what, velocity in changed.items():
        assert rel_err(velocity, base) > 1e-3, what


def test_prompt_word_order_is_lost_as_in_diffusers():
    """diffusers' caption positions (omni.caption_tokens): after a 4-token first chunk, the next 28 tokens all sit at
    position 0, so the order of a prompt that short is invisible to the attention, in diffusers and here alike
    (upstream: huggingface/diffusers#13574). Reordering the first chunk, whose positions are right, is not."""
    reference, model = reference_pair(TINY, seed=2)
    latents, sigma, captions, references = make_inputs(TINY, 7, 6, 6, [((4, 9, 3), [(6, 6, 3, 3)])], [0.5])
    prompt_reversed = [captions[0][0], captions[0][1].flip(0), captions[0][2]]
    first_reversed = [captions[0][0].flip(0), captions[0][1], captions[0][2]]
    with torch.no_grad():
        base = model(latents, sigma, captions, references=references)
        for chunks, same in ((prompt_reversed, True), (first_reversed, False)):
            got = model(latents, sigma, [chunks], references=references)
            expected = diffusers_omni_velocity(reference, latents, sigma, [chunks], references)
            assert rel_err(got, expected) <= 1e-5
            assert (rel_err(got, base) <= 1e-5) == same


def test_without_references_is_the_base_model(pair):
    """An Omni model called without references runs the base layout: diffusers' base mode, and a Turbo/Base-shaped
    engine holding the same weights without the SigLIP ones."""
    cfg, reference, model = pair
    g = torch.Generator().manual_seed(8)
    latents = torch.randn(2, cfg.in_channels, 6, 8, generator=g)
    captions = [torch.randn(n, cfg.cap_feat_dim, generator=g) for n in (5, 40)]
    sigma = torch.tensor([0.7, 0.2])
    base_cfg = ZImageConfig(**{**cfg.__dict__, "siglip_feat_dim": None})
    base = S3DiT(base_cfg).eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("siglip_")}, strict=True)
    with torch.no_grad():
        got = model(latents, sigma, captions)
        assert rel_err(got, diffusers_velocity(reference, latents, sigma, captions)) <= 1e-5
        assert torch.equal(got, base(latents, sigma, captions))


# --- sampling --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def omni_pipeline():
    """ZImageOmniPipeline with TINY's random transformer, a tiny bfloat16 VAE (the pipeline encodes in bfloat16) and
    a tiny SigLIP2; no text encoder: caption chunks go in as prompt_embeds."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageOmniPipeline
    from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

    reference, model = reference_pair(TINY, seed=3)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                        latent_channels=16, norm_num_groups=4, shift_factor=0.1159, scaling_factor=0.3611)
    siglip = Siglip2VisionModel(Siglip2VisionConfig(hidden_size=TINY.siglip_feat_dim, intermediate_size=48,
                                                    num_hidden_layers=1, num_attention_heads=2, patch_size=16,
                                                    num_patches=16))
    pipe = ZImageOmniPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
        vae=vae.to(torch.bfloat16).eval(), text_encoder=None, tokenizer=None, transformer=reference,
        siglip=siglip.eval(), siglip_processor=Siglip2ImageProcessor(patch_size=16, max_num_patches=16))
    pipe.set_progress_bar_config(disable=True)
    return pipe, model


def run_omni_pipeline(pipe, images, noise, positive, negative, **kwargs):
    """The pipeline's own loop on our noise and caption chunks. Returns its final latents, the references it built
    (its VAE latents and SigLIP features of the images, taken from its first transformer call) and the batch size
    of each transformer call."""
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda module, args, kw: calls.append(kw), with_kwargs=True)
    try:
        latents = pipe(image=images, prompt_embeds=positive, negative_prompt_embeds=negative, latents=noise.clone(),
                       output_type="latent", **kwargs).images
    finally:
        hook.remove()
    first = calls[0]
    batch = noise.shape[0]
    references = [[Reference(x.squeeze(1), s) for x, s in zip(first["x"][i][:-1], first["siglip_feats"][i][:-1])]
                  for i in range(batch)]
    assert all(mask == [0] * len(images) + [1] for mask in first["image_noise_mask"])
    return latents, references, [len(c["x"]) for c in calls]


def pictures(sizes, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def chunked(lens_per_sample, seed):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(n, TINY.cap_feat_dim, generator=g) for n in lens] for lens in lens_per_sample]


@pytest.mark.parametrize("guidance,normalization,truncation", [(0.0, 0.0, 1.0), (4.0, 0.0, 1.0), (4.0, 1.0, 0.2)])
def test_sampler_matches_omni_pipeline(omni_pipeline, guidance, normalization, truncation):
    """One reference, batch 2 with prompts of different lengths, the pipeline's CFG, normalization, truncation."""
    pipe, engine = omni_pipeline
    noise = make_noise(2, (2, 16, 8, 12))  # the reference's size: 96x64 pixels
    positive, negative = chunked([(6, 21, 4), (6, 40, 4)], 1), chunked([(6, 3, 4), (6, 3, 4)], 2)
    expected, references, calls = run_omni_pipeline(
        pipe, pictures([(96, 64)], 0), noise, positive, negative if guidance else None, num_inference_steps=4,
        guidance_scale=guidance, cfg_normalization=normalization == 1.0, cfg_truncation=truncation)
    got = sample(engine, noise, flow_sigmas(4, 3.0), positive, negative if guidance else None, guidance=guidance,
                 cfg_normalization=normalization, cfg_truncation=truncation, references=references)
    assert rel_err(got, expected) <= 1e-5
    sigmas = flow_sigmas(4, 3.0)[:-1]
    assert calls == [4 if guidance and 1 - s <= truncation else 2 for s in sigmas]


def test_sampler_with_two_references_matches_omni_pipeline(omni_pipeline):
    pipe, engine = omni_pipeline
    noise = make_noise(3, (1, 16, 10, 8))  # target size given: 64x80 pixels, unlike either reference
    positive, negative = chunked([(6, 9, 30, 4)], 3), chunked([(6, 9, 2, 4)], 4)
    expected, references, _ = run_omni_pipeline(
        pipe, pictures([(64, 96), (112, 64)], 1), noise, positive, negative, height=80, width=64,
        num_inference_steps=3, guidance_scale=3.0)
    assert [tuple(r.latent.shape[1:]) for r in references[0]] == [(12, 8), (8, 14)]
    got = sample(engine, noise, flow_sigmas(3, 3.0), positive, negative, guidance=3.0, references=references)
    assert rel_err(got, expected) <= 1e-5


def test_reference_changes_the_sample_and_none_gives_the_base_result(omni_pipeline):
    _, engine = omni_pipeline
    base = S3DiT(ZImageConfig.tiny()).eval()
    base.load_state_dict({k: v for k, v in engine.state_dict().items() if not k.startswith("siglip_")})
    g = torch.Generator().manual_seed(9)
    noise, sigmas = make_noise(11, (1, 16, 6, 6)), flow_sigmas(3, 3.0)
    caption = torch.randn(9, TINY.cap_feat_dim, generator=g)
    chunks = [torch.randn(4, TINY.cap_feat_dim, generator=g), caption, torch.randn(3, TINY.cap_feat_dim, generator=g)]
    references = [[Reference(torch.randn(16, 6, 6, generator=g), torch.randn(3, 3, TINY.siglip_feat_dim, generator=g))]]
    other = [[Reference(torch.randn(16, 6, 6, generator=g), references[0][0].siglip)]]

    plain = sample(engine, noise, sigmas, [caption])
    assert torch.equal(plain, sample(base, noise, sigmas, [caption]))
    edited = sample(engine, noise, sigmas, [chunks], references=references)
    assert rel_err(edited, plain) > 1e-2
    assert rel_err(sample(engine, noise, sigmas, [chunks], references=other), edited) > 1e-3
    assert torch.equal(edited, sample(engine, noise, sigmas, [chunks], references=references))  # the references stay clean


def test_prompt_chunks_are_the_pipelines():
    """omni_prompt_chunks gives the texts ZImageOmniPipeline hands its tokenizer, one chunk per entry."""
    from diffusers import ZImageOmniPipeline

    class Captured(Exception):
        pass

    class Tokenizer:
        def __call__(self, texts, **kwargs):
            self.texts = list(texts)
            raise Captured

    class Pipe:
        tokenizer = Tokenizer()

    prompts = ["a red fox", "把猫换成狗"]
    for n in range(4):
        with pytest.raises(Captured):
            ZImageOmniPipeline._encode_prompt(Pipe(), prompt=list(prompts), device="cpu", num_condition_images=n)
        assert Pipe.tokenizer.texts == [chunk for p in prompts for chunk in omni_prompt_chunks(p, n)]
        assert len(omni_prompt_chunks("x", n)) == (n + 2 if n else 1)


# --- refusals ------------------------------------------------------------------------------------------------

def _ref(h=6, w=6, grid=(3, 3), width=TINY.siglip_feat_dim, channels=16):
    return Reference(torch.zeros(channels, h, w), None if grid is None else torch.zeros(*grid, width))


def _chunks(*lens):
    return [torch.zeros(n, TINY.cap_feat_dim) for n in lens]


REFUSALS = {
    "base model": (ZImageConfig.tiny(), [_chunks(3, 5, 2)], [[_ref()]], "Turbo/Base checkpoint"),
    "odd reference size": (TINY, [_chunks(3, 5, 2)], [[_ref(h=7)]], "multiples of 2"),
    "reference too large": (TINY, [_chunks(3, 5, 2)], [[_ref(h=514, w=8)]], "larger than the model can place"),
    "reference channels": (TINY, [_chunks(3, 5, 2)], [[_ref(channels=4)]], r"latent must be \[16, h, w\]"),
    "batched reference": (TINY, [_chunks(3, 5, 2)], [[Reference(torch.zeros(1, 16, 6, 6), torch.zeros(3, 3, 24))]],
                          r"latent must be \[16, h, w\]"),
    "no SigLIP features": (TINY, [_chunks(3, 5, 2)], [[_ref(grid=None)]], "has no SigLIP features"),
    "SigLIP width": (TINY, [_chunks(3, 5, 2)], [[_ref(width=7)]], r"SigLIP features must be \[rows, cols, 24\]"),
    "too few chunks": (TINY, [_chunks(3, 5)], [[_ref()]], "must be a list of 3 chunk"),
    "caption not chunked": (TINY, [torch.zeros(5, 32)], [[_ref()]], "must be a list of 3 chunk"),
    "reference lists": (TINY, [_chunks(3, 5, 2)], [[_ref()], [_ref()]], "2 reference lists for a batch of 1"),
    "not a Reference": (TINY, [_chunks(3, 5, 2)], [[torch.zeros(16, 6, 6)]], "wrap it as Reference"),
    "chunk width": (TINY, [[torch.zeros(3, 32), torch.zeros(5, 7), torch.zeros(2, 32)]], [[_ref()]],
                    "each caption must be"),
    "caption too long for RoPE": (TINY, [_chunks(3, 1600, 2)], [[_ref()]], "need RoPE positions up to"),
    "chunks without references": (TINY, [_chunks(3, 5, 2)], None, "lists of chunks go with references"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_omni_inputs_are_explained(case):
    cfg, captions, references, message = REFUSALS[case]
    model = S3DiT(cfg)
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(1, 16, 6, 6), torch.ones(1), captions, references=references)
