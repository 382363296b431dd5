"""What the bench scripts share: random weights, the reference implementations built on the engine's weights,
inputs, timing, peak memory, and where a result came from.

Each script is run as `python bench/X.py`, so this folder is on the path and `from common import ...` finds
this module; importing it puts the pack's root on the path too, for `zimage`.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from zimage import S3DiT, ZImageConfig, source_keys  # noqa: E402
from zimage.fp8 import Fp8Linear, use_fp8_matmuls  # noqa: E402

GiB = 2**30


# --- random weights -------------------------------------------------------------------------------------------

def random_engine(cfg: ZImageConfig, device, dtype, attention="auto") -> S3DiT:
    """An S3DiT of random weights drawn where it lives (on a GPU: seconds for the full 6B model), scaled so that
    activations stay in range through 30 blocks: matrices by fan-in, norms near 1."""
    torch.manual_seed(0)
    with torch.device(device):
        model = S3DiT(cfg, attention=attention).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "pad_token" not in name:
                p.normal_(0, 0.8 / p.shape[-1] ** 0.5)
            elif "norm" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0, 0.1)
    return model.eval().requires_grad_(False)


def random_state(shapes: dict[str, torch.Size], dtype, seed: int) -> dict[str, torch.Tensor]:
    """A state dict of random tensors for a host's own loaders to read (files, ComfyUI's text encoder and VAE):
    drawn on the GPU (fast), kept on the CPU; norms near 1, matrices fan-in scaled."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g, device="cuda", dtype=torch.float32)
        if len(shape) >= 2:
            t *= 0.8 / (torch.Size(shape[1:]).numel() ** 0.5)
        elif "norm" in name and name.endswith("weight"):
            t = 1 + 0.1 * t
        else:
            t *= 0.02
        out[name] = t.to(dtype).cpu()
    return out


def shapes_of(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def shared_copy(engine: S3DiT) -> S3DiT:
    """Another S3DiT holding the same weight tensors (no copy), for a variant that rewires its modules in place
    (FP8 linears, compiled blocks) while the original stays as it is."""
    with torch.device("meta"):
        twin = S3DiT(engine.cfg, attention=engine.attention.backend, ops=engine.ops)
        if any(isinstance(m, Fp8Linear) for m in engine.modules()):
            use_fp8_matmuls(twin)  # the same modules as the original's, so that its state dict fits
    twin.load_state_dict(engine.state_dict(), assign=True)
    return twin.eval().requires_grad_(False)


def random_inputs(cfg: ZImageConfig, size: int, batch: int, caption: int, device, dtype, generator: torch.Generator):
    """(latents [batch, 16, size/8, size/8], sigma 0.7 each, `batch` captions of `caption` tokens) for a
    size x size image, drawn on the CPU from `generator` (the same numbers on every device)."""
    latents = torch.randn(batch, cfg.in_channels, size // 8, size // 8, generator=generator).to(device, dtype)
    sigma = torch.full((batch,), 0.7, device=device)
    captions = [torch.randn(caption, cfg.cap_feat_dim, generator=generator).to(device, dtype) for _ in range(batch)]
    return latents, sigma, captions


# --- the reference implementations, on the engine's weight tensors (no copy) ---------------------------------

def comfy_native(engine: S3DiT, comfyui: str):
    """ComfyUI's own NextDiT (the one its UNETLoader builds for Z-Image) holding the engine's tensors: ComfyUI
    names them as the engine does."""
    sys.path.insert(0, comfyui)
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    import comfy.ops
    from comfy.ldm.lumina.model import NextDiT

    cfg = engine.cfg
    with torch.device("meta"):
        native = NextDiT(patch_size=2, in_channels=16, dim=cfg.dim, n_layers=cfg.n_layers,
                         n_refiner_layers=cfg.n_refiner_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads,
                         multiple_of=256, ffn_dim_multiplier=8.0 / 3.0, norm_eps=1e-5, qk_norm=True,
                         cap_feat_dim=cfg.cap_feat_dim, axes_dims=list(cfg.rope_axes), axes_lens=[1536, 512, 512],
                         rope_theta=256.0, z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32,
                         dtype=engine.dtype, operations=comfy.ops.disable_weight_init)
    native.load_state_dict(engine.state_dict(), assign=True)
    return native.eval()


def diffusers_model(engine: S3DiT):
    """diffusers' ZImageTransformer2DModel holding the engine's tensors, under the names zimage.source_keys gives
    them (the table the engine loads diffusers files with): where diffusers keeps `parts` tensors that the engine
    stacks along dim 0 (q, k and v in one qkv), each part is a view of the engine's rows."""
    from diffusers import ZImageTransformer2DModel

    cfg = engine.cfg
    with torch.device("meta"):
        model = ZImageTransformer2DModel(dim=cfg.dim, n_layers=cfg.n_layers, n_refiner_layers=cfg.n_refiner_layers,
                                         n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads, cap_feat_dim=cfg.cap_feat_dim,
                                         axes_lens=[1536, 512, 512])
    sd = {}
    for key, value in engine.state_dict().items():
        # source_keys lists the engine's own name first, then diffusers' where it differs
        names = source_keys(key)
        for name, part, parts in names[1:] or names:
            sd[name] = value.chunk(parts)[part]
    model.load_state_dict(sd, assign=True, strict=True)
    return model.eval()


# --- timing and memory -----------------------------------------------------------------------------------------

def time_interleaved(runs: dict, warmup: int, iters: int) -> dict[str, tuple[float, float]]:
    """{name: (median ms, spread ms)}, timing the variants in turns, one call each per round: a GPU's clocks
    drift as it warms, and timing one variant after another would hand the drift to whichever came last."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in runs}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    for _ in range(iters):
        for name, fn in runs.items():
            if not cuda:  # --device cpu dry run of a script itself
                t = time.perf_counter()
                fn()
                times[name].append(1000 * (time.perf_counter() - t))
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: (statistics.median(t), max(t) - min(t)) for name, t in times.items()}


def time_cuda(fn, warmup: int, iters: int) -> tuple[float, float]:
    """(median ms, spread ms) of one function."""
    return time_interleaved({"fn": fn}, warmup, iters)["fn"]


def peak_above(fn, baseline: int) -> float:
    """GiB allocated at the peak of one call, above `baseline` bytes (the weights); NaN without CUDA."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / GiB


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a - b‖ / ‖b‖: how far a result is from the one it is compared with."""
    return ((a - b).norm() / b.norm()).item()


# --- results -------------------------------------------------------------------------------------------------

def provenance(device="cuda") -> dict:
    """The device, torch version, date and command line every result file records."""
    name = torch.cuda.get_device_name() if str(device).startswith("cuda") else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "command": " ".join(sys.argv)}


def provenance_line(info: dict) -> str:
    """provenance() as the first line under a markdown result's title."""
    return f"{info['device']}, torch {info['torch']}, {info['date']}, `{info['command']}`"


def write_json(result: dict, folder: str, name: str) -> str:
    """Write `result` to folder/name (the folder made if missing); the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return path
