"""GGUF matrices on CUDA: dequantized on the GPU as on the CPU, captured in CUDA graphs, streamed from host memory.
Skipped without CUDA; run on the GPU with `python -m pytest tests/test_gguf_gpu.py -m gpu`."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")

from gguf_files import write_gguf
from helpers import randomize_
from test_gguf import CFG, valid_random_blocks
from zimage import Runner, S3DiT, load_transformer
from zimage.ggml import FORMATS, dequantize
from zimage.quantized import QuantizedLinear

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: no CUDA device on this machine")]


@pytest.mark.parametrize("qtype", list(FORMATS))
def test_gpu_dequantization_equals_the_cpu(qtype):
    raw = torch.from_numpy(valid_random_blocks(qtype, 4096, seed=3).reshape(64, -1))
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize(raw.cuda(), qtype, dtype).cpu(), dequantize(raw, qtype, dtype))


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "z_image_turbo-Q4_K_M.gguf"
    return str(write_gguf(path, randomize_(S3DiT(CFG), seed=6).state_dict(), "Q4_K_M"))


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 32, 48, generator=g).cuda(), torch.tensor([0.8, 0.3], device="cuda"),
            [torch.randn(n, CFG.cap_feat_dim, generator=g).cuda().bfloat16() for n in (30, 70)])


def test_cuda_graphs_capture_the_dequantization(gguf_path):
    eager = Runner(load_transformer(gguf_path, device="cuda", dtype=torch.bfloat16))
    graphed = Runner(load_transformer(gguf_path, device="cuda", dtype=torch.bfloat16), cuda_graphs=True)
    assert isinstance(graphed.model.layers[0].attention.qkv, QuantizedLinear)
    with torch.no_grad():
        for seed in range(3):
            assert torch.equal(graphed(*inputs(seed)), eager(*inputs(seed)))
    assert len(graphed.graphs.graphs) == 1 and None not in graphed.graphs.graphs.values()


def test_streamed_quantized_blocks_give_the_resident_result(gguf_path):
    resident = Runner(load_transformer(gguf_path, device="cuda", dtype=torch.bfloat16))
    streamed = Runner(load_transformer(gguf_path, device="cpu", dtype=torch.bfloat16))
    streamed.stream_weights("cuda")
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(streamed(*inputs()), resident(*inputs()))
    weight = streamed.model.layers[1].feed_forward.w2.weight
    assert weight.dtype == torch.uint8 and weight.device.type == "cpu" and weight.is_pinned()


def test_bf16_gguf_model_on_cuda_matches_its_float32_cpu_model(gguf_path):
    from helpers import rel_err

    cpu = load_transformer(gguf_path, dtype=torch.float32)
    gpu = Runner(load_transformer(gguf_path, device="cuda", dtype=torch.bfloat16))
    latents, sigma, captions = inputs(4)
    with torch.no_grad():
        expected = cpu(latents.cpu(), sigma.cpu(), [c.float().cpu() for c in captions])
        got = gpu(latents, sigma, captions).float().cpu()
    assert rel_err(got, expected) < 2e-2
