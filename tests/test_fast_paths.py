"""Fast paths: FP8 matmuls (e4m3 weights, per-row scales, activations per token), FP8 attention (q, k, v as e4m3
codes), compiled blocks, CUDA graphs."""

from __future__ import annotations

import os

import pytest
import torch

from safetensors.torch import save_file

from helpers import randomize_, rel_err
from zimage import Runner, S3DiT, ZImageConfig, load_transformer
from zimage.attention import Attention
from zimage.blocks import SelfAttention
from zimage.fp8 import E4M3, Fp8Linear, quantize_rows, use_fp8_matmuls
from zimage.fp8_attention import Fp8Attention, use_fp8_attention

CFG = ZImageConfig.tiny()


def test_rowwise_quantization_keeps_each_row_within_e4m3_rounding():
    g = torch.Generator().manual_seed(0)
    # rows of very different magnitudes: one scale per row keeps the small rows' precision
    x = torch.randn(64, 96, generator=g) * torch.logspace(-4, 3, 64)[:, None]
    q, scale = quantize_rows(x)
    assert q.dtype == E4M3 and scale.shape == (64, 1)
    back = q.float() * scale
    row_err = (back - x).norm(dim=1) / x.norm(dim=1)
    assert row_err.max() < 2 ** -4  # e4m3 keeps 3 mantissa bits: at most 1/16 relative per element
    assert q.float().abs().amax(dim=1).max() == 448.0  # the largest element of each row lands on the top code


def test_fp8_linear_equals_the_dequantized_product():
    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(96, 48, bias=False)
    linear.weight.data = torch.randn(48, 96, generator=g)
    fp8 = Fp8Linear.from_linear(linear)
    x = torch.randn(2, 10, 96, generator=g)
    x_q, x_scale = quantize_rows(x.reshape(-1, 96))
    expected = (x_q.float() * x_scale) @ (fp8.weight.float() * fp8.weight_scale).t()
    got = fp8(x)
    assert got.shape == (2, 10, 48)
    assert rel_err(got.reshape(-1, 48), expected) < 1e-6
    err = rel_err(got, linear(x))
    assert 1e-3 < err < 0.06  # quantized (not a silent bf16 path), and no worse than e4m3 rounding


def test_fp8_linear_refuses_a_bias():
    with pytest.raises(ValueError, match="bias-free"):
        Fp8Linear.from_linear(torch.nn.Linear(16, 16, bias=True))


def test_fp8_model_converts_only_the_block_matrices_and_stays_close():
    model = randomize_(S3DiT(CFG), seed=2).eval()
    reference = S3DiT(CFG).eval()
    reference.load_state_dict(model.state_dict())
    use_fp8_matmuls(model)
    for name, module in model.named_modules():
        if name.startswith(("layers.", "noise_refiner.", "context_refiner.")) and name.endswith(
                ("attention.qkv", "attention.out", "w1", "w2", "w3")):
            assert isinstance(module, Fp8Linear), name
    # embedders, adaLN and the final layer keep full precision
    assert model.x_embedder.weight.dtype == torch.float32
    assert model.layers[0].adaLN_modulation[0].weight.dtype == torch.float32
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 16, 8, 12, generator=g)
    captions = [torch.randn(n, CFG.cap_feat_dim, generator=g) for n in (9, 40)]
    sigma = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        err = rel_err(model(latents, sigma, captions), reference(latents, sigma, captions))
    assert 1e-3 < err < 0.1


def test_load_transformer_chooses_fp8_matmuls_at_load(tmp_path):
    source = randomize_(S3DiT(CFG), seed=4).eval()
    path = os.path.join(tmp_path, "z_image_turbo_bf16.safetensors")
    save_file(source.state_dict(), path)  # the engine's names are the ComfyUI single file's
    model = load_transformer(path, dtype=torch.float32, fp8_matmuls=True)
    assert isinstance(model.layers[0].feed_forward.w1, Fp8Linear)
    expected = Fp8Linear.from_linear(source.layers[0].feed_forward.w1)
    assert torch.equal(model.layers[0].feed_forward.w1.weight.float(), expected.weight.float())


def test_compiled_blocks_compute_the_eager_function():
    """Compiled blocks change the kernels, not the function: same velocity on the CPU (inductor's C++ backend)."""
    eager = randomize_(S3DiT(CFG), seed=7).eval()
    network = S3DiT(CFG).eval()
    network.load_state_dict(eager.state_dict())
    model = Runner(network, compile=True)
    g = torch.Generator().manual_seed(8)
    latents = torch.randn(2, 16, 8, 12, generator=g)
    captions = [torch.randn(n, CFG.cap_feat_dim, generator=g) for n in (9, 40)]
    sigma = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        assert rel_err(model(latents, sigma, captions), eager(latents, sigma, captions)) < 1e-5


def test_cuda_graphs_leave_cpu_forwards_and_sampling_as_they_were():
    """CUDA graphs only change CUDA forwards (tests/test_gpu.py captures, replays and releases them): on the CPU
    every forward and every sampling run gives what the model without them gives, and nothing is captured."""
    from zimage import flow_sigmas, make_noise, sample

    model = randomize_(S3DiT(CFG), seed=9).eval()
    network = S3DiT(CFG).eval()
    network.load_state_dict(model.state_dict())
    graphed = Runner(network, cuda_graphs=True)
    captions = [torch.randn(12, CFG.cap_feat_dim, generator=torch.Generator().manual_seed(10))]
    noise = make_noise(3, (1, 16, 8, 8))
    with torch.no_grad():
        assert torch.equal(graphed(noise, torch.tensor([0.5]), captions), model(noise, torch.tensor([0.5]), captions))
    assert torch.equal(sample(graphed, noise, flow_sigmas(3, 3.0), captions), sample(model, noise, flow_sigmas(3, 3.0), captions))
    assert not graphed.graphs.graphs


@pytest.mark.parametrize("cfg", [CFG, ZImageConfig.tiny(siglip_feat_dim=24)], ids=["turbo", "omni"])
def test_the_block_stacks_are_the_configs_one_list(cfg):
    """FP8, compile, streaming, loading and the hosts' weight handling all go through S3DiT.block_stacks(), which
    follows cfg.block_stacks: every ModuleList of blocks the network has is in it, at the configured depth."""
    model = S3DiT(cfg)
    stacks = model.block_stacks()
    assert [len(s) for s in stacks] == list(cfg.block_stacks.values())
    assert {id(m) for m in model.modules() if isinstance(m, torch.nn.ModuleList)} == {id(s) for s in stacks}
    use_fp8_matmuls(model)
    assert all(isinstance(m.attention.qkv, Fp8Linear) for s in stacks for m in s)


def _fp8_twins(seed: int):
    """(reference, FP8 matmuls alone, FP8 matmuls and attention) on the same random weights."""
    reference = randomize_(S3DiT(CFG), seed=seed).eval()
    models = []
    for attention in (False, True):
        model = S3DiT(CFG).eval()
        model.load_state_dict(reference.state_dict())
        use_fp8_matmuls(model)
        if attention:
            use_fp8_attention(model)
        models.append(model)
    return reference, *models


def test_fp8_attention_attends_every_block_from_e4m3_codes_and_stays_close():
    reference, fp8_matmuls, fp8_all = _fp8_twins(seed=5)
    attends = [m.attend for m in fp8_all.modules() if isinstance(m, SelfAttention)]
    assert len(attends) == sum(len(stack) for stack in fp8_all.block_stacks())
    assert all(isinstance(a, Fp8Attention) and a is fp8_all.attention for a in attends)
    g = torch.Generator().manual_seed(6)
    latents = torch.randn(1, 16, 8, 12, generator=g)
    captions = [torch.randn(20, CFG.cap_feat_dim, generator=g)]
    sigma = torch.tensor([0.6])
    with torch.no_grad():
        exact, matmuls, both = (m(latents, sigma, captions) for m in (reference, fp8_matmuls, fp8_all))
    # q, k and v rounded to e4m3 move the velocity (the attention ran on codes), within e4m3's rounding
    assert 1e-3 < rel_err(both, matmuls) < 0.05
    assert rel_err(both, exact) < 0.1


def test_fp8_attention_leaves_masked_attention_to_the_exact_kernel(monkeypatch):
    """Captions of different lengths need a key mask, which cuDNN's FP8 kernel does not take here: the blocks whose
    sequence is masked (the caption refiner's, the main stack's) attend exactly; the image refiner's, unmasked,
    from codes."""
    _, _, fp8_all = _fp8_twins(seed=7)
    routes = []
    exact = fp8_all.attention.exact
    exact_from_projection = exact.from_projection
    monkeypatch.setattr(exact, "from_projection", lambda *a: routes.append(("exact", a[-1] is not None))
                        or exact_from_projection(*a))
    from zimage import fp8_attention
    to_codes = fp8_attention.qk_norm_e4m3
    monkeypatch.setattr(fp8_attention, "qk_norm_e4m3", lambda *a: routes.append(("codes", False)) or to_codes(*a))
    g = torch.Generator().manual_seed(8)
    latents = torch.randn(2, 16, 8, 12, generator=g)
    captions = [torch.randn(n, CFG.cap_feat_dim, generator=g) for n in (9, 40)]
    with torch.no_grad():
        fp8_all(latents, torch.tensor([0.8, 0.3]), captions)
    n = CFG.n_refiner_layers
    assert routes == [("codes", False)] * n + [("exact", True)] * (n + CFG.n_layers)


def test_fp8_attention_of_given_q_k_v_quantizes_each_by_its_largest_magnitude():
    """The call a wrapper makes (sequence parallelism trades q, k, v first): each tensor to e4m3 codes with its
    own scale, then attended; close to the exact attention, and equal to attending the dequantized codes."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 3, 50, 16, generator=g) * s for s in (1.0, 2.0, 30.0))
    fp8 = Fp8Attention(Attention())
    got = fp8(q, k, v, None)
    assert got.shape == q.shape
    codes = [(t * (448 * (1 - 2**-8) / t.abs().max())).to(E4M3) for t in (q, k, v)]
    deq = [c.float() * (t.abs().max() / (448 * (1 - 2**-8))) for c, t in zip(codes, (q, k, v))]
    assert rel_err(got, torch.nn.functional.scaled_dot_product_attention(*deq)) < 1e-5
    assert 1e-3 < rel_err(got, torch.nn.functional.scaled_dot_product_attention(q, k, v)) < 0.1


def test_load_transformer_chooses_fp8_attention_at_load(tmp_path):
    source = randomize_(S3DiT(CFG), seed=10).eval()
    path = os.path.join(tmp_path, "z_image_turbo_bf16.safetensors")
    save_file(source.state_dict(), path)
    model = load_transformer(path, dtype=torch.float32, fp8_matmuls=True, fp8_attention=True)
    assert isinstance(model.attention, Fp8Attention)
    assert all(m.attend is model.attention for m in model.modules() if isinstance(m, SelfAttention))
    plain = load_transformer(path, dtype=torch.float32, fp8_matmuls=True)
    assert not isinstance(plain.attention, Fp8Attention)


def test_fp8_attention_says_why_it_cannot_run(monkeypatch):
    """The reasons the loader's summary and the log give: a GPU older than Hopper; the cuDNN frontend missing."""
    import builtins

    from zimage.fp8_attention import fp8_attention_blocker

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert "NVIDIA GeForce RTX 3090 is older than Hopper" in fp8_attention_blocker(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    real_import = builtins.__import__

    def without_cudnn(name, *args, **kwargs):
        if name == "cudnn":
            raise ModuleNotFoundError("No module named 'cudnn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_cudnn)
    reason = fp8_attention_blocker(torch.device("cuda"))
    assert "the cuDNN frontend does not import" in reason and "pip install nvidia-cudnn-frontend" in reason
