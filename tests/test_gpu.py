"""GPU paths: the engine in bf16 on CUDA against float32 on the CPU, every attention kernel, seeded noise.
Skipped on machines without CUDA (CI has none); run on the GPU with `python -m pytest tests -m gpu`."""

from __future__ import annotations

import pytest
import torch

from helpers import randomize_, rel_err
from zimage import S3DiT, ZImageConfig, flow_sigmas, make_noise, sample

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: no CUDA device on this machine")]

# the released head and RoPE shapes, two main layers
CFG = ZImageConfig(dim=768, n_heads=6, n_layers=2, n_refiner_layers=1, ffn_hidden=2048, cap_feat_dim=256)


@pytest.fixture(scope="module")
def cpu_model():
    return randomize_(S3DiT(CFG), seed=3).eval()


def on_cuda(model, dtype, attention):
    gpu = S3DiT(CFG, attention=attention).to("cuda", dtype).eval()
    gpu.load_state_dict(model.state_dict())
    return gpu


@pytest.mark.parametrize("attention", ["auto", "cudnn", "flash", "efficient", "math"])
def test_bf16_cuda_matches_float32_cpu(cpu_model, attention):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 64, 48, generator=g)
    captions = [torch.randn(n, CFG.cap_feat_dim, generator=g) for n in (77, 128)]
    sigma = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        expected = cpu_model(latents, sigma, captions)
        model = on_cuda(cpu_model, torch.bfloat16, attention)
        got = model(latents.cuda(), sigma.cuda(), [c.cuda() for c in captions]).float().cpu()
    assert torch.isfinite(got).all()
    assert rel_err(got, expected) < 2e-2


def test_float32_cuda_matches_cpu_closely(cpu_model):
    g = torch.Generator().manual_seed(1)
    latents, captions = torch.randn(1, 16, 32, 32, generator=g), [torch.randn(40, CFG.cap_feat_dim, generator=g)]
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        expected = cpu_model(latents, torch.tensor([0.5]), captions)
        got = on_cuda(cpu_model, torch.float32, "math")(latents.cuda(), torch.tensor([0.5], device="cuda"),
                                                        [captions[0].cuda()]).cpu()
    assert rel_err(got, expected) < 1e-5


def test_sampling_on_cuda_starts_from_the_cpu_noise(cpu_model):
    """The same seed gives the same noise whatever device samples, so CPU and GPU runs agree."""
    noise = make_noise(11, (1, 16, 32, 32))
    captions = [torch.randn(20, CFG.cap_feat_dim, generator=torch.Generator().manual_seed(2))]
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = sample(cpu_model, noise, flow_sigmas(4, 3.0), captions)
    gpu = sample(on_cuda(cpu_model, torch.float32, "math"), noise, flow_sigmas(4, 3.0), captions)
    assert rel_err(gpu.cpu(), cpu) < 1e-4
