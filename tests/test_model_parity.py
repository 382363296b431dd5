"""The engine's velocity equals diffusers' ZImageTransformer2DModel on the same random weights (float32)."""

from __future__ import annotations

import pytest
import torch

from helpers import diffusers_velocity, rel_err
from zimage import S3DiT, ZImageConfig

TINY = ZImageConfig.tiny()
# the released head (128) and RoPE split (32, 48, 48), theta 256; fewer and narrower layers
MID = ZImageConfig(dim=384, n_heads=3, n_layers=2, n_refiner_layers=1, ffn_hidden=1024, cap_feat_dim=96,
                   t_embed_dim=256)


PARITY_CONFIGS = {"tiny": TINY, "mid": MID}  # the `pair` fixture (conftest.py) runs each


CASES = [
    # (latent H, W, caption lengths, sigmas)
    (8, 12, [7], [1.0]),  # non-square, caption shorter than one pad block
    (10, 6, [32], [0.5]),  # caption exactly one block: no caption padding
    (6, 10, [5, 70], [0.9, 0.2]),  # batch 2, captions padded to 32 and 96: masked attention
    (12, 12, [40, 33], [0.03, 0.61]),  # both round to 64: equal lengths, no mask needed
    (14, 4, [1, 9], [0.75, 0.75]),  # 7x2 patches = 14 tokens, padded to 32 with the image pad token
]


@pytest.mark.parametrize("height,width,caption_lens,sigmas", CASES)
def test_velocity_matches_diffusers(pair, height, width, caption_lens, sigmas):
    cfg, reference, model = pair
    g = torch.Generator().manual_seed(height * 100 + width)
    latents = torch.randn(len(sigmas), cfg.in_channels, height, width, generator=g)
    captions = [torch.randn(n, cfg.cap_feat_dim, generator=g) for n in caption_lens]
    sigma = torch.tensor(sigmas)
    with torch.no_grad():
        expected = diffusers_velocity(reference, latents, sigma, captions)
        got = model(latents, sigma, captions)
    assert got.shape == latents.shape
    assert rel_err(got, expected) <= 1e-5


def test_batch_equals_each_sample_alone(pair):
    """Captions of different lengths in one batch: each sample's result is what it gets alone."""
    cfg, _, model = pair
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(3, cfg.in_channels, 8, 10, generator=g)
    captions = [torch.randn(n, cfg.cap_feat_dim, generator=g) for n in (3, 100, 31)]
    sigma = torch.tensor([0.9, 0.4, 0.1])
    with torch.no_grad():
        batched = model(latents, sigma, captions)
        for i in range(3):
            alone = model(latents[i:i + 1], sigma[i:i + 1], captions[i:i + 1])
            assert rel_err(batched[i:i + 1], alone) <= 1e-5


def test_velocity_depends_on_every_input(pair):
    """Guards against a parity test passing for a model that ignores an input."""
    cfg, _, model = pair
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, cfg.in_channels, 6, 6, generator=g)
    caption = [torch.randn(9, cfg.cap_feat_dim, generator=g)]
    with torch.no_grad():
        base = model(latents, torch.tensor([0.5]), caption)
        assert rel_err(model(latents, torch.tensor([0.6]), caption), base) > 1e-3
        assert rel_err(model(latents, torch.tensor([0.5]), [caption[0].flip(0)]), base) > 1e-3
        assert rel_err(model(latents.flip(-1), torch.tensor([0.5]), caption), base) > 1e-3


def test_full_size_parameter_count():
    with torch.device("meta"):
        model = S3DiT(ZImageConfig())
    assert sum(p.numel() for p in model.parameters()) == 6_154_908_736


@pytest.mark.parametrize("bad,message", [
    (lambda c: (torch.zeros(1, 4, 8, 8), torch.ones(1), [torch.zeros(3, c.cap_feat_dim)]), "latents must be"),
    (lambda c: (torch.zeros(1, 16, 7, 8), torch.ones(1), [torch.zeros(3, c.cap_feat_dim)]), "multiples of 2"),
    (lambda c: (torch.zeros(2, 16, 8, 8), torch.ones(2), [torch.zeros(3, c.cap_feat_dim)]), "1 captions for a batch of 2"),
    (lambda c: (torch.zeros(1, 16, 8, 8), torch.ones(1), [torch.zeros(3, 7)]), "each caption must be"),
    (lambda c: (torch.zeros(1, 16, 8, 8), torch.ones(1), [torch.zeros(0, c.cap_feat_dim)]), "each caption must be"),
])
def test_bad_inputs_are_explained(bad, message):
    model = S3DiT(TINY)
    with pytest.raises(ValueError, match=message):
        model(*bad(TINY))
