"""One process, one GPU, the same random weights: this engine vs ComfyUI's native NextDiT vs diffusers.

All three models share the engine's weight tensors (ComfyUI uses the same names; diffusers gets them under the
names zimage.source_keys gives, q, k and v as row views of the fused qkv), so the comparison costs one copy of the
weights. The engine's variants are zimage.Runners, as the loader runs the network: eager (the fused kernels), with
CUDA graphs, with compiled blocks, with FP8 matmuls, and eager on the flash attention kernel. Each forward is timed
with CUDA events after warm-up, the variants in turns (one call each per round); the table reports medians, peak
memory above the weights, and ratios to native ComfyUI.

    python bench/bench_forward.py --comfyui /path/to/ComfyUI --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from common import (GiB, comfy_native, diffusers_model, peak_above, provenance, provenance_line, random_engine,
                    random_inputs, rel_err, shared_copy, time_interleaved, write_json)
from zimage import Runner, ZImageConfig
from zimage.attention import Attention
from zimage.fp8 import use_fp8_matmuls


def forward_flops(cfg: ZImageConfig, n_image: int, n_caption: int) -> float:
    """Matmul and attention FLOPs of one forward (batch 1), ignoring norms and elementwise work."""
    d, h = cfg.dim, cfg.ffn_hidden
    per_token_block = 2 * (4 * d * d + 3 * d * h)
    s = n_image + n_caption
    main = cfg.n_layers * (s * per_token_block + 4 * s * s * d)
    refiners = cfg.n_refiner_layers * (n_image * per_token_block + 4 * n_image ** 2 * d
                                       + n_caption * per_token_block + 4 * n_caption ** 2 * d)
    return main + refiners + 2 * n_image * d * 64 * 2


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

    # each variant is a Runner, the way the loader runs forwards; the eager one runs the fused kernels. Compiling
    # and FP8 rewire a network's modules in place, so those run on shared copies (the same weight tensors).
    # CUDA graphs go with eager blocks only (zimage.Runner says why).
    eager = Runner(engine)
    graphed = Runner(engine, cuda_graphs=True)
    compiled = Runner(shared_copy(engine), compile=True)
    fp8 = fp8_compiled = None
    if not args.no_fp8:
        fp8_model = shared_copy(engine)
        use_fp8_matmuls(fp8_model)
        fp8, fp8_compiled = Runner(fp8_model), Runner(shared_copy(fp8_model), compile=True)
    weights_all = torch.cuda.memory_allocated() if device == "cuda" else 0

    rows, profiles = [], {}
    g = torch.Generator(device="cpu").manual_seed(0)
    for size in args.sizes:
        for batch in args.batches:
            latents, sigma, captions = random_inputs(cfg, size, batch, args.caption, device, dtype, g)
            context = torch.stack(captions)
            runs = {
                "engine": lambda: eager(latents, sigma, captions),
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
                    return eager(latents, sigma, captions)
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
                        row[f"{name}_vs_comfyui_rel_err"] = rel_err(outs[name].float(), ref)
                # what the fast paths change against the eager bf16 engine
                base = outs["engine"].float()
                for name in ("engine_graphs", "engine_compiled", "engine_fp8", "engine_fp8_compiled"):
                    if name in outs:
                        row[f"{name}_vs_engine_rel_err"] = rel_err(outs[name].float(), base)
                if "diffusers" in outs:
                    d = -torch.stack([o.float() for o in outs["diffusers"]]).squeeze(2)
                    row["engine_vs_diffusers_rel_err"] = rel_err(outs["engine"].float(), d)
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
        **provenance(device), "python": platform.python_version(),
        "weights_gib": weights / GiB, "rows": rows, "kernel_ms_by_kind": profiles,
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_json(result, args.out, f"forward-{stamp}.json")
    write_table(result, os.path.join(args.out, f"forward-{stamp}.md"))


def write_table(result: dict, path: str) -> None:
    nan = float("nan")
    lines = ["# S3-DiT forward: engine vs ComfyUI native vs diffusers", "",
             provenance_line(result), "",
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
