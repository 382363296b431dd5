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

PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if PACK not in sys.path:  # a script that put ComfyUI first (comfy_process.start) keeps it first: both have nodes/
    sys.path.insert(0, PACK)
from zimage import S3DiT, ZImageConfig  # noqa: E402
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


def random_state(shapes: dict[str, torch.Size], dtype, seed: int, device="cuda") -> dict[str, torch.Tensor]:
    """A state dict of random tensors for a host's own loaders to read (files, ComfyUI's text encoder and VAE):
    drawn on `device` (a GPU: fast), kept on the CPU; norms near 1, matrices fan-in scaled."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
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


# --- model files for ComfyUI's loaders and the pack's ------------------------------------------------------------

# the names users have, in the folders ComfyUI reads them from, so that the shipped workflows run unchanged
MODEL_FILES = {"diffusion_models": "z_image_turbo_bf16.safetensors", "text_encoders": "qwen_3_4b.safetensors",
               "vae": "ae.safetensors"}
# --tiny: the smallest transformer ComfyUI's NextDiT builds as the engine does (its timestep MLP gives 256
# features to every block, so the width is at least 256; its FFN rounds int(dim * 8 / 3) up to 256), captions as
# wide as the test suite's tiny Qwen3 (tests/comfy_shim)
TINY_DIT = ZImageConfig(dim=256, n_heads=4, n_layers=2, n_refiner_layers=2, ffn_hidden=768, cap_feat_dim=32,
                        t_embed_dim=256, t_embed_mid=256, rope_axes=ZImageConfig.rope_axes_for(64))
FLUX_VAE = dict(double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def transformer_shapes(cfg: ZImageConfig) -> dict[str, torch.Size]:
    """The transformer file's tensors (ComfyUI's single-file names, which are the engine's)."""
    with torch.device("meta"):
        return shapes_of(S3DiT(cfg))


def text_encoder_shapes() -> dict[str, torch.Size]:
    """ComfyUI's Qwen3-4B, as its qwen_3_4b.safetensors names it (the tiny one where the test shim is installed).
    ComfyUI must be importable."""
    import comfy.ops
    import comfy.text_encoders.llama

    with torch.device("meta"):
        return shapes_of(comfy.text_encoders.llama.Qwen3_4B({}, dtype=torch.bfloat16, device="meta",
                                                             operations=comfy.ops.manual_cast))


def vae_shapes() -> dict[str, torch.Size]:
    """The FLUX VAE (ae.safetensors), encoder and decoder, at full size."""
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder

    with torch.device("meta"):
        return shapes_of(torch.nn.ModuleDict({"encoder": Encoder(**FLUX_VAE), "decoder": Decoder(**FLUX_VAE)}))


def write_model_files(models: str, dit: ZImageConfig, device, kinds=("diffusion_models", "text_encoders", "vae")
                      ) -> dict[str, str]:
    """{folder kind: path} of the three files under models/<kind>/, random weights in the released files' names,
    shapes and dtypes (transformer and text encoder bf16, VAE fp32). Each is written once and reused: a file is
    written under a temporary name and renamed when complete, so a run stopped mid-write leaves nothing to
    reuse. A file whose tensors do not have the shapes asked for (another config's) is an error."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    wanted = {"diffusion_models": (lambda: transformer_shapes(dit), torch.bfloat16, 0),
              "text_encoders": (text_encoder_shapes, torch.bfloat16, 1),
              "vae": (vae_shapes, torch.float32, 2)}
    paths = {}
    for kind, (shapes, dtype, seed) in wanted.items():
        if kind not in kinds:
            continue
        folder = os.path.join(models, kind)
        os.makedirs(folder, exist_ok=True)
        path = paths[kind] = os.path.join(folder, MODEL_FILES[kind])
        shapes = shapes()
        if os.path.exists(path):
            with safe_open(path, "pt") as f:
                found = {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}
            if found != dict(shapes):
                raise SystemExit(f"{path} holds other tensors than this run's {kind} (another config's?): "
                                 f"delete it or pass another --models folder")
            continue
        t = time.time()
        save_file(random_state(shapes, dtype, seed, device), path + ".partial")
        os.replace(path + ".partial", path)
        print(f"wrote {path} ({os.path.getsize(path) / GiB:.1f} GiB) in {time.time() - t:.0f} s", flush=True)
    return paths


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
