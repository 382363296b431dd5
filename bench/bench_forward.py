"""One process, one GPU, the same random weights: this engine vs ComfyUI's native NextDiT vs diffusers.

All three models share the engine's weight tensors (ComfyUI uses the same names; diffusers gets row views of
the fused qkv), so the comparison costs one copy of the weights. Each forward is timed with CUDA events after
warm-up, the variants in turns (one call each per round); the table reports medians, peak memory above the weights, and ratios to native ComfyUI.

    python bench/bench_forward.py --comfyui /path/to/ComfyUI --out bench/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from zimage import S3DiT, ZImageConfig  # noqa: E402

GiB = 2**30


def random_engine(cfg: ZImageConfig, device, dtype, attention="auto") -> S3DiT:
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


def comfy_native(engine: S3DiT, comfyui: str):
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
    from diffusers import ZImageTransformer2DModel

    cfg = engine.cfg
    with torch.device("meta"):
        model = ZImageTransformer2DModel(dim=cfg.dim, n_layers=cfg.n_layers, n_refiner_layers=cfg.n_refiner_layers,
                                         n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads, cap_feat_dim=cfg.cap_feat_dim,
                                         axes_lens=[1536, 512, 512])
    sd = {}
    for key, value in engine.state_dict().items():
        if ".attention.qkv." in key:
            for i, name in enumerate(("to_q", "to_k", "to_v")):
                sd[key.replace("qkv", name)] = value[i * cfg.dim:(i + 1) * cfg.dim]
            continue
        key = (key.replace("attention.out.", "attention.to_out.0.").replace("attention.q_norm.", "attention.norm_q.")
               .replace("attention.k_norm.", "attention.norm_k."))
        if key.startswith(("x_embedder.", "final_layer.")):
            head, rest = key.split(".", 1)
            key = f"all_{head}.2-1.{rest}"
        sd[key] = value
    model.load_state_dict(sd, assign=True, strict=True)
    return model.eval()


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
            if not cuda:  # --device cpu dry run of the script itself
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
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / GiB


def forward_flops(cfg: ZImageConfig, n_image: int, n_caption: int) -> float:
    """Matmul and attention FLOPs of one forward (batch 1), ignoring norms and elementwise work."""
    d, h = cfg.dim, cfg.ffn_hidden
    per_token_block = 2 * (4 * d * d + 3 * d * h)
    s = n_image + n_caption
    main = cfg.n_layers * (s * per_token_block + 4 * s * s * d)
    refiners = cfg.n_refiner_layers * (n_image * per_token_block + 4 * n_image ** 2 * d
                                       + n_caption * per_token_block + 4 * n_caption ** 2 * d)
    return main + refiners + 2 * n_image * d * 64 * 2


def shared_copy(engine: S3DiT) -> S3DiT:
    """Another S3DiT holding the same weight tensors (no copy), for a variant that rewires its modules."""
    from zimage.fp8 import Fp8Linear

    with torch.device("meta"):
        twin = S3DiT(engine.cfg, attention=engine.attention.backend)
        if any(isinstance(m, Fp8Linear) for m in engine.modules()):
            twin.use_fp8_matmuls()
    twin.load_state_dict(engine.state_dict(), assign=True)
    return twin.eval().requires_grad_(False)


def kernel_breakdown(fn) -> dict[str, float]:
    """GPU time of one call by kernel kind (ms): matmuls, attention, everything else."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kinds = {"gemm": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if not us or event.key.startswith(("aten::", "cuda", "Memcpy", "Memset")) or "profiler" in event.key.lower():
            continue
        name = event.key.lower()
        # inductor names its fused Triton kernels after the ops they feed (..._scaled_dot_product_...): other
        if name.startswith("triton"):
            kind = "other"
        elif any(k in name for k in ("cudnn", "fmha", "flash", "attention", "sdpa")):
            kind = "attention"
        elif any(k in name for k in ("gemm", "xmma", "cutlass", "nvjet", "matmul", "scaled_mm")):
            kind = "gemm"
        else:
            kind = "other"
        kinds[kind] += us / 1000
    return kinds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 1536, 2048])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--caption", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile-sizes", type=int, nargs="*", default=[1024],
                        help="sizes that also time the compiled variants (each new shape compiles anew)")
    parser.add_argument("--no-fp8", action="store_true")
    parser.add_argument("--profile", action="store_true", help="kernel-time breakdown of each variant at batch 1")
    parser.add_argument("--tiny", action="store_true", help="tiny config, for a dry run of the script")
    parser.add_argument("--skip-diffusers-above", type=int, default=2048)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # --tiny: the smallest shape all three implementations build alike (ComfyUI rounds the FFN to 256 and
    # caps the timestep MLP at the model width; diffusers fixes it at 1024)
    cfg = ZImageConfig(dim=1152, n_heads=9, n_layers=2, n_refiner_layers=1, ffn_hidden=3072, cap_feat_dim=64,
                       t_embed_dim=256) if args.tiny else ZImageConfig()
    engine = random_engine(cfg, device, dtype)
    weights = torch.cuda.memory_allocated() if device == "cuda" else 0
    native = comfy_native(engine, args.comfyui)
    reference = diffusers_model(engine)
    from zimage.attention import Attention

    def variant(source: S3DiT, compile: bool, graphs: bool) -> S3DiT:
        model = shared_copy(source)
        if compile:
            model.compile_blocks()
        if graphs:
            model.use_cuda_graphs()
        return model

    # CUDA graphs go with eager blocks only (S3DiT.use_cuda_graphs says why)
    graphed, compiled = variant(engine, False, True), variant(engine, True, False)
    fp8 = fp8_compiled = None
    if not args.no_fp8:
        fp8 = shared_copy(engine)
        fp8.use_fp8_matmuls()
        fp8_compiled = variant(fp8, True, False)
    weights_all = torch.cuda.memory_allocated() if device == "cuda" else 0

    rows, profiles = [], {}
    g = torch.Generator(device="cpu").manual_seed(0)
    for size in args.sizes:
        for batch in args.batches:
            latents = torch.randn(batch, 16, size // 8, size // 8, generator=g).to(device, dtype)
            sigma = torch.full((batch,), 0.7, device=device)
            captions = [torch.randn(args.caption, cfg.cap_feat_dim, generator=g).to(device, dtype) for _ in range(batch)]
            context = torch.stack(captions)
            runs = {
                "engine": lambda: engine(latents, sigma, captions),
                "comfyui": lambda: native(latents, sigma, context, num_tokens=args.caption),
            }
            if size <= args.skip_diffusers_above:
                runs["diffusers"] = lambda: reference(list(latents.unsqueeze(2).unbind(0)), 1 - sigma, captions,
                                                      return_dict=False)[0]
            if device == "cuda":
                runs["engine_graphs"] = lambda: graphed(latents, sigma, captions)
            if fp8 is not None:
                runs["engine_fp8"] = lambda: fp8(latents, sigma, captions)
            if size in args.compile_sizes:
                runs["engine_compiled"] = lambda: compiled(latents, sigma, captions)
                if fp8_compiled is not None:
                    runs["engine_fp8_compiled"] = lambda: fp8_compiled(latents, sigma, captions)
            # the same modules on the flash kernel: what choosing cuDNN first is worth
            def engine_flash(kernels=Attention("flash").kernels):
                saved, engine.attention.kernels = engine.attention.kernels, kernels
                try:
                    return engine(latents, sigma, captions)
                finally:
                    engine.attention.kernels = saved

            runs["engine_flash"] = engine_flash
            row = {"size": size, "batch": batch, "tokens": (size // 16) ** 2 + args.caption}
            with torch.no_grad():
                outs = {}
                for name, fn in runs.items():
                    t0 = time.perf_counter()
                    outs[name] = fn()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    row[f"{name}_first_call_s"] = time.perf_counter() - t0  # includes compilation
                for name, (ms, spread) in time_interleaved(runs, args.warmup, args.iters).items():
                    row[f"{name}_ms"], row[f"{name}_spread_ms"] = ms, spread
                for name, fn in runs.items():
                    row[f"{name}_peak_gib"] = peak_above(fn, weights_all)
                    if args.profile and batch == 1 and device == "cuda" and name.startswith("engine"):
                        profiles[f"{name}@{size}"] = kernel_breakdown(fn)
                ref = outs["comfyui"].float()
                for name in outs:
                    if name.startswith("engine"):
                        row[f"{name}_vs_comfyui_rel_err"] = ((outs[name].float() - ref).norm() / ref.norm()).item()
                # what the fast paths change against the eager bf16 engine
                base = outs["engine"].float()
                for name in ("engine_graphs", "engine_compiled", "engine_fp8", "engine_fp8_compiled"):
                    if name in outs:
                        row[f"{name}_vs_engine_rel_err"] = ((outs[name].float() - base).norm() / base.norm()).item()
                if "diffusers" in outs:
                    d = -torch.stack([o.float() for o in outs["diffusers"]]).squeeze(2)
                    row["engine_vs_diffusers_rel_err"] = ((outs["engine"].float() - d).norm() / d.norm()).item()
            flops = batch * forward_flops(cfg, (size // 16) ** 2, args.caption)
            for name in runs:
                if name.startswith("engine"):
                    row[f"{name}_tflops"] = flops / row[f"{name}_ms"] / 1e9
                    row[f"{name}_over_comfyui"] = row[f"{name}_ms"] / row["comfyui_ms"]
            if "diffusers_ms" in row:
                row["engine_over_diffusers"] = row["engine_ms"] / row["diffusers_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)

    result = {
        "what": "S3-DiT forward, random full-size bf16 weights, caption tokens per sample: %d" % args.caption,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
        "weights_gib": weights / GiB, "rows": rows, "kernel_ms_by_kind": profiles,
    }
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(args.out, f"forward-{stamp}.json"), "w") as f:
        json.dump(result, f, indent=2)
    write_table(result, os.path.join(args.out, f"forward-{stamp}.md"))


def write_table(result: dict, path: str) -> None:
    nan = float("nan")
    lines = ["# S3-DiT forward: engine vs ComfyUI native vs diffusers", "",
             f"{result['device']}, torch {result['torch']}, {result['date']}, `{result['command']}`", "",
             "Milliseconds per forward (median of CUDA-event timings). Ratios are to native ComfyUI eager, same run.", "",
             "| size | batch | engine | + graphs | compiled | fp8 | fp8 compiled "
             "| engine (flash attn) | ComfyUI | diffusers | engine/ComfyUI | + graphs/ComfyUI | compiled/ComfyUI "
             "| fp8/ComfyUI | fp8 compiled/ComfyUI | engine TFLOP/s | peak GiB engine / ComfyUI |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ms = " | ".join(f"{r.get(f'engine{v}_ms', nan):.1f}" for v in ("", "_graphs", "_compiled", "_fp8", "_fp8_compiled"))
        lines.append(
            f"| {r['size']} | {r['batch']} | {ms} | {r['engine_flash_ms']:.1f} | "
            f"{r['comfyui_ms']:.1f} | {r.get('diffusers_ms', nan):.1f} | "
            + " | ".join(f"{r.get(f'engine{v}_over_comfyui', nan):.2f}" for v in ("", "_graphs", "_compiled", "_fp8", "_fp8_compiled"))
            + f" | "
            f"{r['engine_tflops']:.0f} | {r['engine_peak_gib']:.2f} / {r['comfyui_peak_gib']:.2f} |")
    versus = ("graphs", "compiled", "fp8", "fp8_compiled")
    lines += ["", "Relative error of the velocity (‖a − b‖ / ‖b‖):", "",
              "| size | batch | engine vs ComfyUI | engine vs diffusers | "
              + " | ".join(f"{v.replace('_', ' ').replace(' graphs', ' + graphs')} vs engine" for v in versus) + " |",
              "|---|---|---|---|" + "---|" * len(versus)]
    for r in result["rows"]:
        lines.append(f"| {r['size']} | {r['batch']} | {r['engine_vs_comfyui_rel_err']:.1e} | "
                     f"{r.get('engine_vs_diffusers_rel_err', nan):.1e} | "
                     + " | ".join(f"{r.get(f'engine_{v}_vs_engine_rel_err', nan):.1e}" for v in versus) + " |")
    if result.get("kernel_ms_by_kind"):
        lines += ["", "GPU kernel time by kind (ms, one forward, batch 1):", "", "| variant@size | gemm | attention | other |",
                  "|---|---|---|---|"]
        for name, k in result["kernel_ms_by_kind"].items():
            lines.append(f"| {name} | {k['gemm']:.1f} | {k['attention']:.1f} | {k['other']:.1f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
