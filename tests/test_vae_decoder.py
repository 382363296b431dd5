"""The engine's VAE decoder: its fused GroupNorm + SiLU against torch's, and the whole decoder against ComfyUI's
own Decoder on the same random FLUX-VAE weights (what VAEDecode runs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import randomize_
from test_fused import under_the_interpreter
from zimage.group_norm import group_norm
from zimage.vae_decoder import DecoderConfig, VAEDecoder

# the released VAE's widths (ComfyUI builds every FLUX-type VAE at 128 channels, multipliers 1, 2, 4, 4)
FLUX_VAE = dict(double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def group_norm_errors(device: str) -> dict[str, float]:
    """Largest error of group_norm against torch's group_norm (+ silu) in float64, per case; the cases cover a
    partial last tile, every width of the decoder, and a group whose mean is large against its spread."""
    g = torch.Generator().manual_seed(0)
    errors = {}
    cases = {"64ch one partial tile": (2, 64, 9, 7, 0.0), "64ch 24 tiles, the last partial": (2, 64, 50, 61, 0.0),
             "128ch": (1, 128, 16, 16, 0.0), "512ch": (1, 512, 5, 6, 0.0),
             "512ch 1032 tiles (the combination's loop twice)": (1, 512, 129, 128, 0.0),
             "mean 300 spread 1": (1, 128, 12, 12, 300.0)}
    for name, (n, c, h, w, offset) in cases.items():
        x = (torch.randn(n, c, h, w, generator=g) + offset).to(device, torch.float32)
        weight, bias = torch.randn(c, generator=g).to(device), torch.randn(c, generator=g).to(device)
        for silu in (False, True):
            y = group_norm(x.contiguous(memory_format=torch.channels_last), 32, weight, bias, 1e-6, silu=silu)
            assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == x.dtype
            expected = F.group_norm(x.double(), 32, weight.double(), bias.double(), 1e-6)
            expected = F.silu(expected) if silu else expected
            errors[f"{name}{' silu' if silu else ''}"] = (y.double() - expected).abs().max().item()
    return errors


def test_group_norm_on_the_pytorch_path_is_torchs():
    """(torch's CPU group_norm itself loses ~0.15 where the mean is 300 times the spread: that case is the
    kernels' test below)"""
    errors = {k: v for k, v in group_norm_errors("cpu").items() if not k.startswith("mean")}
    assert len(errors) == 10 and max(errors.values()) < 1e-5, errors


def test_group_norm_kernels_under_the_interpreter_match_torch():
    """The three kernels (statistics per tile, their combination by Chan's formula, normalization) within float32
    rounding; where the mean is 300 times the spread, within a few of the input's own float32 steps (3e-5 at 300),
    where torch's CPU group_norm loses 0.15."""
    errors = under_the_interpreter("group_norm_errors('cpu')", module="test_vae_decoder")
    assert errors.keys() == group_norm_errors("cpu").keys()
    assert max(v for k, v in errors.items() if not k.startswith("mean")) < 5e-6, errors  # a few float32 steps at ~4
    assert max(v for k, v in errors.items() if k.startswith("mean")) < 1e-4, errors


def comfy_decoder(seed: int = 2):
    from comfy.ldm.modules.diffusionmodules.model import Decoder

    return randomize_(Decoder(**FLUX_VAE), seed=seed, spread=False).eval()


@pytest.mark.host
def test_decoder_is_comfyuis_decoder_on_the_same_weights(comfyui_path):
    native = comfy_decoder()
    weights = native.state_dict()
    assert DecoderConfig.of(weights) == DecoderConfig()
    engine = VAEDecoder.lending(weights)
    assert engine.conv_in.weight.data_ptr() == native.conv_in.weight.data_ptr(), "the weights were copied"
    z = torch.randn(2, 16, 6, 5, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, image = native(z), engine(z)
    assert image.shape == (2, 3, 48, 40)
    torch.testing.assert_close(image, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.host
def test_decoder_refuses_weights_of_another_layout(comfyui_path):
    weights = comfy_decoder().state_dict()
    with pytest.raises(ValueError, match="not a FLUX-type VAE decoder"):
        VAEDecoder.lending({k: v for k, v in weights.items() if not k.startswith("conv_out")})
    weights["up.0.attn.0.q.weight"] = torch.zeros(128, 128, 1, 1)  # an attention the FLUX VAE does not have
    with pytest.raises(ValueError, match="not a FLUX-type VAE decoder"):
        VAEDecoder.lending(weights)


def comfy_vae(z_channels: int = 16):
    """ComfyUI's VAE object for a random VAE of the FLUX layout (z_channels 16) or, with 4, SD's (whose decode
    adds a post-quant convolution: ComfyUI builds another autoencoder class for it)."""
    import comfy.sd
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder

    config = {**FLUX_VAE, "z_channels": z_channels}
    parts = torch.nn.ModuleDict({"encoder": Encoder(**config), "decoder": Decoder(**config)})
    weights = randomize_(parts, seed=2, spread=False).state_dict()
    if z_channels == 4:
        weights.update({"quant_conv.weight": torch.eye(8)[:, :, None, None], "quant_conv.bias": torch.zeros(8),
                        "post_quant_conv.weight": torch.eye(4)[:, :, None, None], "post_quant_conv.bias": torch.zeros(4)})
    return comfy.sd.VAE(sd=weights)


def node_class(zimage_pack):
    import importlib

    return importlib.import_module(f"{zimage_pack.__name__}.nodes.vae_decode")


@pytest.mark.host
def test_the_node_decodes_as_comfyuis_vae_decode(zimage_pack, monkeypatch):
    nodes = node_class(zimage_pack)
    vae = comfy_vae()
    z = torch.randn(2, 16, 5, 6, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = vae.decode(z)
        assert isinstance(nodes.engine_decoder(vae), zimage_pack.zimage.VAEDecoder)
        monkeypatch.setattr(vae, "decode", lambda *a, **k: pytest.fail("ComfyUI's decode ran instead"))
        (image,) = nodes.ZImageVAEDecode().decode({"samples": z}, vae)
        (one_frame,) = nodes.ZImageVAEDecode().decode({"samples": z[:, :, None]}, vae)  # [N, C, 1, h, w]
    assert image.shape == expected.shape == (2, 40, 48, 3) and image.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(image, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(one_frame, image, rtol=0, atol=0)


@pytest.mark.host
def test_the_node_hands_other_vaes_to_comfyui_and_refuses_foreign_latents(zimage_pack, caplog):
    nodes = node_class(zimage_pack)
    sd_vae = comfy_vae(z_channels=4)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode(), caplog.at_level("INFO"):
        assert "not a FLUX-type VAE" in nodes.engine_decoder(sd_vae)
        (image,) = nodes.ZImageVAEDecode().decode({"samples": z}, sd_vae)
        torch.testing.assert_close(image, sd_vae.decode(z), rtol=0, atol=0)
    assert "ComfyUI's own decoder runs this VAE, since it is not a FLUX-type VAE" in caplog.text
    with pytest.raises(ValueError, match=r"shape \(1, 4, 4, 4\), where this VAE decodes \[batch, 16, height, width\]"):
        nodes.ZImageVAEDecode().decode({"samples": z}, comfy_vae())


@pytest.mark.host
def test_the_turbo_workflow_with_the_node_saves_vae_decodes_image(comfy_server):
    from PIL import Image
    import numpy as np

    from comfy_host import load_workflow, output_images, shrink

    graph = shrink(load_workflow("zimage_turbo_t2i.api.json"))
    pixels = {}
    for decode in ("VAEDecode", "ZImageVAEDecode"):
        graph["7"]["class_type"] = decode
        entry = comfy_server.run(graph)
        assert entry["status"]["status_str"] == "success", entry["status"]
        (saved,) = output_images(entry)
        path = comfy_server.base / "output" / saved["subfolder"] / saved["filename"]
        pixels[decode] = np.asarray(Image.open(path)).astype(int)
    difference = np.abs(pixels["VAEDecode"] - pixels["ZImageVAEDecode"])
    assert pixels["VAEDecode"].shape == (256, 256, 3) and pixels["VAEDecode"].std() > 1  # not a blank image
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3, (difference.max(), (difference > 0).mean())


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: no CUDA device on this machine")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", [40, 2048])  # 2048: 65536 tiles of 64 rows, past a grid's second axis
@pytest.mark.gpu
@needs_cuda
def test_group_norm_kernels_on_cuda_match_torch(dtype, side):
    from zimage.kernels import check_kernels, triton_runs

    check_kernels(torch.device("cuda"), torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(1, 128, side, side, device="cuda", generator=g) * 3 + 1).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(128, device="cuda", generator=g), torch.randn(128, device="cuda", generator=g)
    assert triton_runs(x)
    y = group_norm(x, 32, weight.to(dtype), bias.to(dtype), 1e-6, silu=True)
    expected = F.silu(F.group_norm(x.double(), 32, weight.to(dtype).double(), bias.to(dtype).double(), 1e-6))
    error = (y.double() - expected).abs().max().item()
    assert error < (2e-5 if dtype == torch.float32 else 2 ** -7 * expected.abs().max().item()), error


@pytest.mark.host
@pytest.mark.gpu
@needs_cuda
def test_decoder_on_cuda_in_bf16_stays_with_comfyuis(comfyui_path):
    """The fast path (channels_last, Triton GroupNorm + SiLU, cuDNN) in bf16 is no further from float32 than
    ComfyUI's Decoder in bf16 on the same GPU."""
    from helpers import rel_err

    native = comfy_decoder().to("cuda")
    z = torch.randn(1, 16, 64, 64, generator=torch.Generator().manual_seed(5)).cuda()
    with torch.inference_mode():
        exact = native(z)  # float32
        native.to(torch.bfloat16)
        native_bf16 = native(z.bfloat16()).float()
        engine = VAEDecoder.lending(dict(native.named_parameters()))(z.bfloat16()).float()
    native_error, engine_error = rel_err(native_bf16, exact), rel_err(engine, exact)
    # (the two bf16 paths differ from each other by about both errors: 2.1e-2 on an H100)
    assert engine_error < max(1.5 * native_error, 1e-2), (engine_error, native_error)
