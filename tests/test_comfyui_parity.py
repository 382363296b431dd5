"""The engine against ComfyUI's native NextDiT in its Z-Image configuration, on the same random weights.

ComfyUI builds its Z-Image model from comfy/ldm/lumina/model.py with z_image_modulation; its single-file
checkpoints are that model's state dict. Two facts of ComfyUI's model shape the test config:
- its FFN width is rounded up to a multiple of 256 and its timestep MLP is min(dim, 1024) wide, which the
  released 3840-wide model satisfies and the engine reads from the weights;
- its q/k RMSNorms are built without an eps (torch then uses float32's machine epsilon) where the official
  model and diffusers use 1e-5; the test sets 1e-5 on those two norms so that the rest is compared exactly.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from helpers import randomize_, rel_err
from zimage import S3DiT, ZImageConfig, convert_state_dict, load_transformer

pytestmark = pytest.mark.host

CFG = ZImageConfig(dim=256, n_heads=2, n_layers=2, n_refiner_layers=1, ffn_hidden=768, cap_feat_dim=64,
                   t_embed_dim=256, t_embed_mid=256)


@pytest.fixture(scope="module")
def native(comfyui_path):
    import comfy.ops
    from comfy.ldm.lumina.model import NextDiT

    model = NextDiT(patch_size=2, in_channels=16, dim=CFG.dim, n_layers=CFG.n_layers,
                    n_refiner_layers=CFG.n_refiner_layers, n_heads=CFG.n_heads, n_kv_heads=CFG.n_heads,
                    multiple_of=256, ffn_dim_multiplier=8.0 / 3.0, norm_eps=1e-5, qk_norm=True,
                    cap_feat_dim=CFG.cap_feat_dim, axes_dims=list(CFG.rope_axes), axes_lens=[1536, 512, 512],
                    rope_theta=256.0, z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32,
                    operations=comfy.ops.disable_weight_init)
    randomize_(model, seed=11).eval()
    for name, module in model.named_modules():
        if name.endswith(("q_norm", "k_norm")):
            module.eps = 1e-5
    return model


def native_velocity(model, latents, sigma, context):
    # ComfyUI's NextDiT takes sigma as its timestep and already returns the negated output
    return model(latents, sigma, context, num_tokens=context.shape[1])


@pytest.mark.parametrize("height,width,caption_len,sigmas", [
    (6, 10, 37, [0.8]),
    (12, 8, 32, [0.25, 0.95]),
    (8, 8, 5, [1.0, 0.5]),
])
def test_velocity_matches_comfyui(native, height, width, caption_len, sigmas):
    model = S3DiT(CFG).eval()
    model.load_state_dict(convert_state_dict(native.state_dict()), strict=True)
    g = torch.Generator().manual_seed(caption_len)
    latents = torch.randn(len(sigmas), 16, height, width, generator=g)
    context = torch.randn(len(sigmas), caption_len, CFG.cap_feat_dim, generator=g)
    sigma = torch.tensor(sigmas)
    with torch.no_grad():
        expected = native_velocity(native, latents, sigma, context)
        got = model(latents, sigma, list(context))
    assert rel_err(got, expected) <= 1e-5


def test_comfyui_single_file_loads_to_the_same_model(native, tmp_path):
    """A file in ComfyUI's own layout (its state dict under model.diffusion_model.) through load_transformer."""
    path = tmp_path / "z_image_tiny.safetensors"
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in native.state_dict().items()}, str(path))
    model = load_transformer(str(path), dtype=torch.float32)
    assert model.cfg == CFG
    g = torch.Generator().manual_seed(0)
    latents, context = torch.randn(1, 16, 6, 6, generator=g), torch.randn(1, 20, CFG.cap_feat_dim, generator=g)
    with torch.no_grad():
        assert rel_err(model(latents, torch.tensor([0.6]), list(context)),
                       native_velocity(native, latents, torch.tensor([0.6]), context)) <= 1e-5


def test_engine_weights_have_comfyui_names_and_shapes(native):
    """The engine's state dict is ComfyUI's, name for name and shape for shape, so LoRA key maps and
    patches written for ComfyUI's model address the engine's weights."""
    engine = {k: tuple(v.shape) for k, v in S3DiT(CFG).state_dict().items()}
    assert engine == {k: tuple(v.shape) for k, v in native.state_dict().items()}
