"""GPU paths: the engine in bf16 on CUDA against float32 on the CPU, every attention kernel, seeded noise.
Skipped on machines without CUDA (CI has none); run on the GPU with `python -m pytest tests -m gpu`."""

from __future__ import annotations

import pytest
import torch

from helpers import randomize_, rel_err
from zimage import Runner, S3DiT, ZImageConfig, flow_sigmas, make_noise, sample
from zimage.fp8 import use_fp8_matmuls

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: no CUDA device on this machine")]

# the released head and RoPE shapes, two main layers
CFG = ZImageConfig(dim=768, n_heads=6, n_layers=2, n_refiner_layers=1, ffn_hidden=2048, cap_feat_dim=256)


@pytest.fixture(scope="module")
def cpu_model():
    return randomize_(S3DiT(CFG), seed=3).eval()


def on_cuda(model, dtype, attention):
    """A copy of model's network on CUDA; a Runner runs it as the engine runs forwards."""
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
        model = Runner(on_cuda(cpu_model, torch.bfloat16, attention))
        got = model(latents.cuda(), sigma.cuda(), [c.cuda() for c in captions]).float().cpu()
    assert torch.isfinite(got).all()
    assert rel_err(got, expected) < 2e-2


def test_a_broken_triton_falls_back_to_the_pytorch_steps_with_a_warning(cpu_model, monkeypatch, caplog):
    """Where Triton cannot build kernels (no C compiler or Python headers for its launcher), the forward warns
    once and runs the unfused PyTorch steps: the same velocity within bf16 rounding, no failed generation."""
    import logging

    from zimage import fused, kernels

    class CannotBuild:
        def __getitem__(self, grid):
            raise RuntimeError("Failed to compile the launcher: no C compiler")

    g = torch.Generator().manual_seed(22)
    latents = torch.randn(1, 16, 32, 48, generator=g)
    captions = [torch.randn(50, CFG.cap_feat_dim, generator=g)]
    sigma = torch.tensor([0.6])
    model = Runner(on_cuda(cpu_model, torch.bfloat16, "auto"))
    with torch.no_grad():
        expected = cpu_model(latents, sigma, captions)
        fused_out = model(latents.cuda(), sigma.cuda(), [captions[0].cuda()]).float().cpu()
        assert kernels.TRITON_WORKS is True
        monkeypatch.setattr(kernels, "TRITON_WORKS", None)
        monkeypatch.setattr(fused, "_swiglu_kernel", CannotBuild())
        with caplog.at_level(logging.WARNING):
            fallback = model(latents.cuda(), sigma.cuda(), [captions[0].cuda()]).float().cpu()
            model(latents.cuda(), sigma.cuda(), [captions[0].cuda()])
    assert kernels.TRITON_WORKS is False
    assert sum("Triton cannot run its kernels" in r.getMessage() for r in caplog.records) == 1
    assert rel_err(fallback, expected) < 2e-2 and rel_err(fused_out, expected) < 2e-2
    assert rel_err(fallback, fused_out) < 1e-2


def test_float32_cuda_matches_cpu_closely(cpu_model):
    g = torch.Generator().manual_seed(1)
    latents, captions = torch.randn(1, 16, 32, 32, generator=g), [torch.randn(40, CFG.cap_feat_dim, generator=g)]
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        expected = cpu_model(latents, torch.tensor([0.5]), captions)
        got = Runner(on_cuda(cpu_model, torch.float32, "math"))(latents.cuda(), torch.tensor([0.5], device="cuda"),
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


def test_compiled_blocks_match_eager_on_cuda(cpu_model):
    """torch.compile fuses each block's elementwise work; the function stays the same (bf16 rounding apart)."""
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(2, 16, 48, 64, generator=g).cuda().bfloat16()
    captions = [torch.randn(n, CFG.cap_feat_dim, generator=g).cuda().bfloat16() for n in (50, 128)]
    sigma = torch.tensor([0.9, 0.4], device="cuda")
    eager = Runner(on_cuda(cpu_model, torch.bfloat16, "auto"))
    compiled = Runner(on_cuda(cpu_model, torch.bfloat16, "auto"), compile=True)
    with torch.no_grad():
        expected = eager(latents, sigma, captions).float()
        got = compiled(latents, sigma, captions).float()
        again = compiled(latents[:1], sigma[:1], captions[:1]).float()  # another shape: compiles anew, still right
    assert rel_err(got, expected) < 1e-2
    assert rel_err(again, expected[:1]) < 1e-2


def test_fp8_scaled_mm_matches_the_dequantized_product():
    """The GPU's rowwise-scaled FP8 GEMM computes what the CPU path computes from the same e4m3 codes."""
    from zimage.fp8 import Fp8Linear, quantize_rows, scaled_mm_supported

    if not scaled_mm_supported(torch.device("cuda")):
        pytest.skip("rowwise FP8 GEMMs need compute capability 8.9 or newer")
    g = torch.Generator().manual_seed(5)
    linear = torch.nn.Linear(768, 2048, bias=False)
    linear.weight.data = torch.randn(2048, 768, generator=g) / 768 ** 0.5
    fp8 = Fp8Linear.from_linear(linear).cuda()
    x = torch.randn(3, 100, 768, generator=g).cuda().bfloat16()
    x_q, x_scale = quantize_rows(x.reshape(-1, 768))
    expected = (x_q.float() * x_scale) @ (fp8.weight.float() * fp8.weight_scale).t()
    got = fp8(x).float().reshape(-1, 2048)
    assert rel_err(got, expected) < 1e-2  # bf16 output rounding
    assert rel_err(got, linear.cuda()(x.float()).reshape(-1, 2048)) < 0.06


def test_fp8_quantization_kernel_gives_the_pytorch_codes_and_scales(monkeypatch):
    """quantize_rows' Triton kernel rounds as its PyTorch steps do: the same e4m3 codes and scales, bit for
    bit, on rows of every scale, widths that are not powers of two, and an all-zero row."""
    import zimage.fp8 as fp8
    from zimage import kernels

    kernels.check_kernels(torch.device("cuda"), torch.bfloat16)
    assert kernels.TRITON_WORKS
    g = torch.Generator().manual_seed(21)
    for width in (768, 3840, 10240, 100):
        x = (torch.randn(257, width, generator=g) * torch.logspace(-6, 4, 257)[:, None]).to("cuda", torch.bfloat16)
        x[3] = 0
        codes, scale = fp8.quantize_rows(x)
        monkeypatch.setattr(fp8, "triton_runs", lambda t: False)
        expected_codes, expected_scale = fp8.quantize_rows(x)
        monkeypatch.undo()
        assert torch.equal(codes.view(torch.uint8), expected_codes.view(torch.uint8)), width
        assert torch.equal(scale, expected_scale), width


def test_fp8_model_on_cuda_stays_close_to_float32(cpu_model):
    g = torch.Generator().manual_seed(6)
    latents = torch.randn(1, 16, 64, 64, generator=g)
    captions = [torch.randn(96, CFG.cap_feat_dim, generator=g)]
    sigma = torch.tensor([0.6])
    network = on_cuda(cpu_model, torch.bfloat16, "auto")
    use_fp8_matmuls(network)
    model = Runner(network)
    with torch.no_grad():
        expected = cpu_model(latents, sigma, captions)
        got = model(latents.cuda(), sigma.cuda(), [captions[0].cuda()]).float().cpu()
    assert torch.isfinite(got).all()
    assert rel_err(got, expected) < 0.1


def test_streamed_weights_give_the_resident_result_and_stay_on_the_host():
    """Blocks copied in one ahead of use compute exactly what resident blocks compute."""
    cfg = ZImageConfig(dim=768, n_heads=6, n_layers=5, n_refiner_layers=2, ffn_hidden=2048, cap_feat_dim=256)
    source = randomize_(S3DiT(cfg), seed=8).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(2, 16, 32, 48, generator=g).cuda().bfloat16()
    captions = [torch.randn(n, cfg.cap_feat_dim, generator=g).cuda().bfloat16() for n in (30, 70)]
    sigma = torch.tensor([0.7, 0.2], device="cuda")
    resident = S3DiT(cfg).to("cuda", torch.bfloat16).eval()
    resident.load_state_dict(source.state_dict())
    network = S3DiT(cfg).to(torch.bfloat16).eval()
    network.load_state_dict(source.state_dict())
    streamed = Runner(network)
    streamed.stream_weights("cuda")
    with torch.no_grad():
        expected = Runner(resident)(latents, sigma, captions)
        for _ in range(2):  # the second forward reuses the buffers
            assert torch.equal(streamed(latents, sigma, captions), expected)
    for i in range(1, cfg.n_layers):
        weight = network.layers[i].feed_forward.w2.weight
        assert weight.device.type == "cpu" and weight.is_pinned()
        assert torch.equal(weight, source.layers[i].feed_forward.w2.weight)
    assert network.x_embedder.weight.is_cuda and network.layers[0].attention.qkv.weight.is_cuda  # resident



@pytest.mark.parametrize("path", ["eager", "compiled", "streamed"])
def test_omni_references_on_cuda_match_float32_cpu(path):
    """Reference images (Omni / Edit) through every GPU path: bf16 on CUDA against float32 on the CPU."""
    from zimage import Reference

    cfg = ZImageConfig(dim=768, n_heads=6, n_layers=3, n_refiner_layers=2, ffn_hidden=2048, cap_feat_dim=256,
                       siglip_feat_dim=128)
    source = randomize_(S3DiT(cfg), seed=10).eval()
    g = torch.Generator().manual_seed(11)
    latents = torch.randn(2, 16, 32, 40, generator=g)
    captions = [[torch.randn(n, cfg.cap_feat_dim, generator=g) for n in lens] for lens in ((5, 3, 40, 2), (7, 60, 3))]
    references = [[Reference(torch.randn(16, 32, 40, generator=g), torch.randn(6, 8, 128, generator=g)),
                   Reference(torch.randn(16, 24, 24, generator=g), torch.randn(5, 5, 128, generator=g))],
                  [Reference(torch.randn(16, 16, 48, generator=g), torch.randn(4, 9, 128, generator=g))]]
    sigma = torch.tensor([0.8, 0.35])
    network = S3DiT(cfg).to(torch.bfloat16).eval()
    network.load_state_dict(source.state_dict())
    gpu = Runner(network if path == "streamed" else network.cuda(), compile=path == "compiled")
    if path == "streamed":
        gpu.stream_weights("cuda")
    with torch.no_grad():
        expected = source(latents, sigma, captions, references=references)
        got = gpu(latents.cuda().bfloat16(), sigma.cuda(), [[c.cuda().bfloat16() for c in cs] for cs in captions],
                  references=[[r.to("cuda") for r in refs] for refs in references]).float().cpu()
    assert torch.isfinite(got).all()
    assert rel_err(got, expected) < 3e-2


def test_blocks_a_host_left_on_the_cpu_stream_in_and_go_back():
    """What a host's partial loading leaves (ComfyUI's lowvram: some layers of some blocks in CPU memory,
    pinned or not, in mixed dtypes) streams through the buffers and computes what resident weights compute;
    the weights are on the CPU again afterwards, also when a block raises."""
    cfg = ZImageConfig(dim=768, n_heads=6, n_layers=4, n_refiner_layers=2, ffn_hidden=2048, cap_feat_dim=256)
    source = randomize_(S3DiT(cfg), seed=12).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(13)
    latents = torch.randn(1, 16, 32, 32, generator=g).cuda()
    captions = [torch.randn(40, cfg.cap_feat_dim, generator=g).cuda()]
    sigma = torch.tensor([0.6], device="cuda")
    resident = S3DiT(cfg).to("cuda", torch.bfloat16).eval()
    resident.load_state_dict(source.state_dict())
    use_fp8_matmuls(resident)  # e4m3 weights, float32 scales and bf16 norms in one block
    network = S3DiT(cfg).to("cuda", torch.bfloat16).eval()
    network.load_state_dict(source.state_dict())
    use_fp8_matmuls(network)
    partial = Runner(network)
    on_host = [network.layers[0].feed_forward.w2, network.layers[1].attention, network.layers[3],
               network.context_refiner[1].ffn_norm1, network.noise_refiner[0].feed_forward]
    for i, module in enumerate(on_host):
        for p in module.parameters():
            p.data = p.data.cpu().pin_memory() if i % 2 else p.data.cpu()
    host_params = [p for m in on_host for p in m.parameters()]
    with torch.no_grad():
        expected = Runner(resident)(latents, sigma, captions)
        for _ in range(2):
            assert torch.equal(partial(latents, sigma, captions), expected)
        assert all(p.device.type == "cpu" for p in host_params)

        def fail(*args):
            raise RuntimeError("interrupted")
        hook = network.layers[3].feed_forward.register_forward_hook(fail)
        with pytest.raises(RuntimeError, match="interrupted"):
            partial(latents, sigma, captions)
        hook.remove()
        assert all(p.device.type == "cpu" for p in host_params)
        assert torch.equal(partial(latents, sigma, captions), expected)
        assert partial.streamer.buffers  # kept between forwards
        partial.release_buffers()
        assert not partial.streamer.buffers
        assert torch.equal(partial(latents, sigma, captions), expected)


def test_cuda_graph_replays_give_the_eager_result(cpu_model):
    """A graph replays the kernels the eager forward ran: the same velocity, bit for bit, at every step and
    shape; a weight replaced or moved drops the graphs, and weights changed in place are read anew."""
    g = torch.Generator().manual_seed(14)
    eager = Runner(on_cuda(cpu_model, torch.bfloat16, "auto"))
    graphed = Runner(on_cuda(cpu_model, torch.bfloat16, "auto"), cuda_graphs=True)
    shapes = [((1, 16, 32, 48), (77,)), ((2, 16, 32, 32), (20, 90))]
    with torch.no_grad():
        for (shape, lens), sigma in [(shapes[0], 0.9), (shapes[0], 0.5), (shapes[1], 0.7), (shapes[0], 0.2),
                                     (shapes[1], 0.3)]:
            latents = torch.randn(shape, generator=g).cuda()
            captions = [torch.randn(n, CFG.cap_feat_dim, generator=g).cuda().bfloat16() for n in lens]
            s = torch.full((shape[0],), sigma, device="cuda")
            assert torch.equal(graphed(latents, s, captions), eager(latents, s, captions))
        assert len(graphed.graphs.graphs) == 2 and None not in graphed.graphs.graphs.values()

        # a LoRA-like change: in place (same address, the graph reads it) and by a new tensor (graphs dropped)
        for change in ("in place", "replaced"):
            for runner in (eager, graphed):
                w = runner.model.layers[1].feed_forward.w2
                if change == "in place":
                    w.weight.data.mul_(1.5)
                else:
                    w.weight = torch.nn.Parameter(w.weight.data * 0.5, requires_grad=False)
            assert torch.equal(graphed(latents, s, captions), eager(latents, s, captions))
        assert len(graphed.graphs.graphs) == 1
        graphed.release_buffers()
        assert not graphed.graphs.graphs


def test_compiled_blocks_run_without_cuda_graphs(cpu_model):
    """Over compiled blocks graphs are not used (Runner says why): the compiled result, no capture."""
    g = torch.Generator().manual_seed(20)
    latents = torch.randn(1, 16, 32, 32, generator=g).cuda()
    captions = [torch.randn(30, CFG.cap_feat_dim, generator=g).cuda().bfloat16()]
    sigma = torch.tensor([0.4], device="cuda")
    model = Runner(on_cuda(cpu_model, torch.bfloat16, "auto"), cuda_graphs=True, compile=True)
    with torch.no_grad():
        expected = Runner(on_cuda(cpu_model, torch.bfloat16, "auto"))(latents, sigma, captions).float()
        for _ in range(2):
            assert rel_err(model(latents, sigma, captions).float(), expected) < 1e-2
    assert model.graphs is None


def test_an_interruption_during_capture_gets_through(cpu_model):
    """A host's interruption raised inside the forward while it is being captured reaches the caller (not
    taken for a capture failure), and the next call captures and replays as usual."""
    class Interrupted(Exception):
        pass

    model = Runner(on_cuda(cpu_model, torch.bfloat16, "auto"), cuda_graphs=True)
    reference = Runner(on_cuda(cpu_model, torch.bfloat16, "auto"))
    latents = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(18)).cuda()
    captions = [torch.randn(20, CFG.cap_feat_dim, generator=torch.Generator().manual_seed(19)).cuda().bfloat16()]
    sigma = torch.tensor([0.5], device="cuda")
    calls = []

    def interrupt_the_second_call(module, args):  # the first call runs eagerly, the second is the capture
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted()

    hook = model.model.layers[0].register_forward_pre_hook(interrupt_the_second_call)
    with torch.no_grad():
        with pytest.raises(Interrupted):
            model(latents, sigma, captions)
        hook.remove()
        expected = reference(latents, sigma, captions)
        for _ in range(2):
            assert torch.equal(model(latents, sigma, captions), expected)
    assert None not in model.graphs.graphs.values()


def test_sampling_with_cuda_graphs_matches_and_frees_them(cpu_model):
    noise = make_noise(15, (1, 16, 32, 32))
    captions = [torch.randn(30, CFG.cap_feat_dim, generator=torch.Generator().manual_seed(16)).cuda().bfloat16()]
    plain = on_cuda(cpu_model, torch.bfloat16, "auto")
    graphed = Runner(on_cuda(cpu_model, torch.bfloat16, "auto"), cuda_graphs=True)
    sigmas = flow_sigmas(6, 3.0)
    negative = [torch.randn(12, CFG.cap_feat_dim, generator=torch.Generator().manual_seed(17)).cuda().bfloat16()]
    kwargs = dict(negative=negative, guidance=3.0, cfg_truncation=0.5)  # guided (batch 2), then batch 1
    assert torch.equal(sample(graphed, noise, sigmas, captions, **kwargs), sample(plain, noise, sigmas, captions, **kwargs))
    assert not graphed.graphs.graphs  # released when sampling ends


def test_a_controlnet_runs_on_every_gpu_path():
    """A Fun ControlNet (2.0's layout: 15 control layers, inpainting channels, refiner hints) through the GPU paths:
    CUDA graphs replay the eager result bit for bit with new control latents and strengths at every call (one capture);
    streamed main weights give the resident result; under fp8 matmuls graphs replay fp8's eager result, which stays
    close to bf16; bf16 stays close to float32 on the CPU."""
    from zimage import ControlConfig, ControlHints, ControlNet

    cfg = ZImageConfig(dim=768, n_heads=6, n_layers=4, n_refiner_layers=2, ffn_hidden=2048, cap_feat_dim=256)
    source = randomize_(S3DiT(cfg), seed=30).eval()
    control = randomize_(ControlNet(cfg, ControlConfig(n_control_layers=15, in_channels=33, refiner_control=True)),
                         seed=31).eval()
    gpu_control = ControlNet(cfg, control.control).to("cuda", torch.bfloat16).eval()
    gpu_control.load_state_dict(control.state_dict())

    def network(device="cuda", fp8=False):
        model = S3DiT(cfg).to(device, torch.bfloat16).eval()
        model.load_state_dict(source.state_dict())
        if fp8:
            use_fp8_matmuls(model)
        return model

    g = torch.Generator().manual_seed(32)
    calls = []
    for sigma, strength in ((0.9, 1.0), (0.6, 0.65), (0.3, -0.4)):
        calls.append((torch.randn(1, 16, 32, 48, generator=g).cuda().bfloat16(), torch.tensor([sigma], device="cuda"),
                      [torch.randn(40, cfg.cap_feat_dim, generator=g).cuda().bfloat16()],
                      torch.randn(1, 33, 32, 48, generator=g).cuda().bfloat16(), strength))
    streamed = Runner(network("cpu"))
    streamed.stream_weights("cuda")
    runners = {"eager": Runner(network()), "graphed": Runner(network(), cuda_graphs=True), "streamed": streamed,
               "fp8": Runner(network(fp8=True)), "fp8 graphed": Runner(network(fp8=True), cuda_graphs=True)}
    with torch.no_grad():
        for latents, sigma, captions, hint_latent, strength in calls:
            hints = [ControlHints(gpu_control, hint_latent, strength)]
            out = {name: runner(latents, sigma, captions, control=hints) for name, runner in runners.items()}
            assert torch.equal(out["graphed"], out["eager"])
            assert torch.equal(out["streamed"], out["eager"])
            assert torch.equal(out["fp8 graphed"], out["fp8"])
            assert rel_err(out["fp8"].float(), out["eager"].float()) < 0.1
            without = runners["eager"](latents, sigma, captions)
            assert rel_err(out["eager"].float(), without.float()) > 1e-2  # the hints count
        reference = Runner(source)(latents.float().cpu(), sigma.cpu(), [captions[0].float().cpu()],
                                   control=[ControlHints(control, hint_latent.float().cpu(), strength)])
        assert rel_err(out["eager"].float().cpu(), reference) < 3e-2
    for name in ("graphed", "fp8 graphed"):  # captured once, replayed with each call's control inputs
        assert len(runners[name].graphs.graphs) == 1 and None not in runners[name].graphs.graphs.values(), name


def _fp8_attention_blocker():
    from zimage import fp8_attention_blocker

    return fp8_attention_blocker(torch.device("cuda"))


needs_fp8_attention = pytest.mark.skipif(not torch.cuda.is_available() or _fp8_attention_blocker() is not None,
                                         reason="FP8 attention cannot run here (see fp8_attention_blocker)")


def test_e4m3_qkv_kernel_gives_the_pytorch_codes_and_scales(monkeypatch):
    """qk_norm_e4m3's Triton kernel against its PyTorch steps on the GPU: the same scales bit for bit, the codes
    the same or, where float32 sums in another order cross a rounding boundary, one code apart."""
    from zimage import fused, kernels
    from zimage.blocks import RMSNorm
    from zimage.rope import inverse_frequencies, rope_angles

    kernels.check_kernels(torch.device("cuda"), torch.bfloat16)
    assert kernels.TRITON_WORKS
    g = torch.Generator().manual_seed(31)
    heads, head_dim = 30, 128
    norms = []
    for _ in range(2):
        norm = RMSNorm(head_dim, 1e-5)
        norm.weight.data = 1 + 0.3 * torch.randn(head_dim, generator=g)
        norms.append(norm.to("cuda", torch.bfloat16))
    qkv = (torch.randn(2, 300, 3 * heads * head_dim, generator=g) * 4).to("cuda", torch.bfloat16)
    positions = torch.randint(0, 100, (1, 300, 3), generator=g).float()
    cos, sin = (t.unsqueeze(-2).cuda() for t in rope_angles(positions, inverse_frequencies((32, 48, 48), 256.0)))
    codes, scales = fused.qk_norm_e4m3(qkv, heads, *norms, cos, sin)
    monkeypatch.setattr(fused, "triton_runs", lambda t: False)
    expected_codes, expected_scales = fused.qk_norm_e4m3(qkv, heads, *norms, cos, sin)
    monkeypatch.undo()
    assert torch.equal(scales, expected_scales)
    steps = (codes.view(torch.uint8).int() - expected_codes.view(torch.uint8).int()).abs()
    assert steps.max() <= 1 and (steps != 0).float().mean() < 1e-3, ((steps != 0).float().mean().item())


@needs_fp8_attention
@pytest.mark.parametrize("tokens", [1152, 4224])
def test_cudnn_fp8_attention_attends_its_codes(tokens):
    """cuDNN's FP8 kernel against float32 attention of the same dequantized codes (what it is asked to compute;
    it also rounds the probabilities to e4m3), and against the bf16 path from the same projection."""
    from zimage.attention import Attention
    from zimage.blocks import RMSNorm
    from zimage.fp8_attention import Fp8Attention
    from zimage.fused import qk_norm_e4m3

    g = torch.Generator().manual_seed(32)
    heads, head_dim = 30, 128
    norms = []
    for _ in range(2):
        norm = RMSNorm(head_dim, 1e-5)
        norm.weight.data = 1.5 * (1 + 0.2 * torch.randn(head_dim, generator=g))
        norms.append(norm.to("cuda", torch.bfloat16))
    qkv = torch.randn(1, tokens, 3 * heads * head_dim, generator=g).to("cuda", torch.bfloat16)
    angles = torch.rand(1, tokens, 1, head_dim // 2, generator=g).cuda() * 6.28
    rope = (angles.cos(), angles.sin())
    exact = Attention("auto")
    fp8 = Fp8Attention(exact)
    with torch.no_grad():
        got = fp8.from_projection(qkv, heads, *norms, rope, None).float()
        codes, scales = qk_norm_e4m3(qkv, heads, *norms, *rope)
        q, k, v = (codes.float() * scales[:, None, None, None, None]).transpose(2, 3)
        of_codes = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        bf16 = exact.from_projection(qkv, heads, *norms, rope, None).float()
    assert fp8.graphs and None not in fp8.graphs.values(), "cuDNN refused the FP8 graph"
    assert got.shape == bf16.shape and torch.isfinite(got).all()
    err_codes, err_bf16 = rel_err(got, of_codes), rel_err(got, bf16)
    print(f"tokens {tokens}: FP8 attention vs float32 of its codes {err_codes:.2e}, vs the bf16 path {err_bf16:.2e}")
    # cuDNN rounds the probabilities to e4m3 too (3 mantissa bits, about 4 % per element), and q, k and v are
    # rounded against the bf16 path: bounds with room over that rounding, to be tightened once measured
    assert err_codes < 0.08, err_codes
    assert 1e-3 < err_bf16 < 0.12, err_bf16


@needs_fp8_attention
def test_fp8_attention_model_replays_cuda_graphs_bit_equal_and_stays_close(cpu_model):
    """The whole forward with FP8 matmuls and FP8 attention: CUDA graph replays equal eager bit for bit (the
    cuDNN graph runs on the capture's stream), and the velocity stays near float32."""
    from zimage.fp8_attention import Fp8Attention, use_fp8_attention

    g = torch.Generator().manual_seed(33)
    runners = []
    for graphs in (False, True):
        network = on_cuda(cpu_model, torch.bfloat16, "auto")
        use_fp8_matmuls(network)
        use_fp8_attention(network)
        runners.append(Runner(network, cuda_graphs=graphs))
    eager, graphed = runners
    captions = [torch.randn(96, CFG.cap_feat_dim, generator=g)]
    with torch.no_grad():
        for sigma in (0.9, 0.5, 0.2):
            latents = torch.randn(1, 16, 64, 64, generator=g)
            s = torch.tensor([sigma])
            got = graphed(latents.cuda(), s.cuda(), [captions[0].cuda()])
            assert torch.equal(got, eager(latents.cuda(), s.cuda(), [captions[0].cuda()]))
        expected = cpu_model(latents, s, captions)
    assert isinstance(graphed.model.attention, Fp8Attention) and None not in graphed.model.attention.graphs.values()
    assert len(graphed.graphs.graphs) == 1
    assert rel_err(got.float().cpu(), expected) < 0.15  # FP8 matmuls alone: < 0.1 (test above)


def test_fp8_producers_quantizing_as_they_write_give_the_same_forward(cpu_model, monkeypatch):
    """The norm and SwiGLU kernels that write their e4m3 rows themselves (fused.py, e4m3=True) give the FP8
    forward of the separate quantization pass bit for bit."""
    from zimage import blocks

    g = torch.Generator().manual_seed(34)
    latents = torch.randn(1, 16, 64, 64, generator=g).cuda()
    captions = [torch.randn(96, CFG.cap_feat_dim, generator=g).cuda()]
    sigma = torch.tensor([0.6]).cuda()
    network = on_cuda(cpu_model, torch.bfloat16, "auto")
    use_fp8_matmuls(network)
    model = Runner(network)
    with torch.no_grad():
        fused_quantization = model(latents, sigma, captions)
        monkeypatch.setattr(blocks, "takes_e4m3_rows", lambda layer: False)
        separate_pass = model(latents, sigma, captions)
    assert torch.equal(fused_quantization, separate_pass)
