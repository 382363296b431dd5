"""One process, one GPU: transformer forwards of native ComfyUI and of this engine, each variant loaded from the same
random full-size file through its public loader and run as ComfyUI runs it.

Variants (--variants picks some):
- native: ComfyUI's UNETLoader (weight_dtype default): its NextDiT, eager;
- native_compiled: the same model through ComfyUI's TorchCompileModel (inductor, the whole diffusion model);
- native_fp8: UNETLoader with weight_dtype fp8_e4m3fn_fast (ComfyUI's fp8 ops, comfy-kitchen where installed);
- engine: ZImageLoader's defaults (CUDA graphs on where the allocator allows them: see --allocator);
- engine_fp8: ZImageLoader fp8_e4m3fn_fast; engine_compiled: ZImageLoader with compile on.
Each is one evaluation as KSampler makes it, BaseModel.apply_model with the conditioning ComfyUI gives a Z-Image
model, under torch.inference_mode as ComfyUI's executor runs its nodes. All models are loaded onto the GPU by
ComfyUI's model management first (an error if any stays partly in host memory). The variants are timed in turns,
one call each per round, with CUDA events; the tables give medians and spread (max - min).

--diagnose adds native called the way the earlier version of this bench called it (its NextDiT directly, without
ComfyUI's model wrapper) and native under torch.no_grad instead of inference_mode, each way: where the time of
the earlier bench's native numbers went.

On the GPU machine (one size per process: each fits in a device call, and compiled variants see one shape):
    python bench/bench_forward.py --models /tmp/zimage-bench --sizes 1024 --out bench/results
A dry run on the CPU (tiny random files, a few iterations):
    python bench/bench_forward.py --tiny --models /tmp/zimage-bench-tiny --out /tmp/bench-out

ComfyUI's folder comes from --comfyui or $COMFYUI_PATH.
"""

from __future__ import annotations

import argparse
import os
import time

import comfy_process

VARIANTS = ("native", "native_compiled", "native_fp8", "engine", "engine_fp8", "engine_compiled")
DIAGNOSTIC = ("native_no_grad", "native_direct", "native_direct_no_grad")


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024])
    parser.add_argument("--caption", type=int, default=128, help="caption tokens")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--diagnose", action="store_true", help="also time native as the earlier bench called it")
    parser.add_argument("--profile", action="store_true", help="kernel-time breakdown of each variant")
    return comfy_process.parse_arguments(parser)


# ComfyUI's flags and allocator are set before torch is imported, as its main.py does
ARGS = arguments()
comfy_process.start_from(ARGS)

import torch  # noqa: E402

from common import (GiB, peak_above, provenance, provenance_line, rel_err, time_interleaved,  # noqa: E402
                    write_json)
from zimage import ZImageConfig  # noqa: E402


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


def load_variants(nodes: dict, names: list[str]) -> dict:
    """{variant: ModelPatcher}, each loaded from the transformer file by its public loader, as the nodes do."""
    import comfy.model_management as mm
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from comfy_extras.nodes_torch_compile import skip_torch_compile_dict

    from common import MODEL_FILES

    name = MODEL_FILES["diffusion_models"]
    loaded = {}
    for variant in names:
        if variant == "native_compiled":
            continue  # ComfyUI's TorchCompileModel on native's model, below
        if variant.startswith("native"):
            dtype = "fp8_e4m3fn_fast" if variant == "native_fp8" else "default"
            (loaded[variant],) = nodes["UNETLoader"]().load_unet(name, dtype)
        else:
            dtype = "fp8_e4m3fn_fast" if variant == "engine_fp8" else "default"
            (loaded[variant],) = nodes["ZImageLoader"]().load(name, dtype, "auto", compile=variant == "engine_compiled",
                                                             cuda_graphs=True)["result"]
    if "native_compiled" in names:
        if "native" not in loaded:
            (loaded["native"],) = nodes["UNETLoader"]().load_unet(name, "default")
        # what ComfyUI's TorchCompileModel node does (backend inductor), on a clone sharing native's weights
        compiled = loaded["native"].clone()
        set_torch_compile_wrapper(model=compiled, backend="inductor", options={"guard_filter_fn": skip_torch_compile_dict})
        loaded["native_compiled"] = compiled
    # every model on the GPU, as ComfyUI's sampler loads them; a partial load would time weight copies instead
    mm.load_models_gpu([m for v, m in loaded.items() if v != "native_compiled"])
    device = mm.get_torch_device()
    for variant, patcher in loaded.items():
        off = [n for n, p in patcher.model.diffusion_model.named_parameters() if p.device.type != device.type]
        if off:
            raise SystemExit(f"{variant}: {len(off)} weights stayed off {device} (ComfyUI loaded it partially: too "
                             f"many variants for this GPU's memory); time fewer --variants per process")
    check_native_ops(loaded)
    return loaded


def check_native_ops(loaded: dict) -> None:
    """Native fp8_e4m3fn_fast must run ComfyUI's fp8 matmuls, not fall back to casting fp8 weights to bf16 (which
    UNETLoader does without a word on a GPU it judges without FP8 compute)."""
    import comfy.ops

    if "native_fp8" in loaded and not torch.cuda.is_available():
        return  # the CPU dry run: no FP8 matmuls to check
    if "native_fp8" in loaded:
        linears = [m for m in loaded["native_fp8"].model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)]
        if not any(isinstance(m, comfy.ops.fp8_ops.Linear) for m in linears):
            raise SystemExit("native_fp8: UNETLoader did not build ComfyUI's fp8 ops (this GPU or ComfyUI has no FP8 "
                             "compute): the variant would time bf16 casting, not fp8 matmuls")


def evaluation(patcher, x, sigma, context):
    """One evaluation as KSampler makes it: BaseModel.apply_model with the conditioning ComfyUI's Lumina2 gives a
    Z-Image model (c_crossattn, num_tokens) and the transformer_options its sampler passes: the patcher's own, with
    its wrappers (ComfyUI's torch.compile is one)."""
    import comfy.patcher_extension as ext

    options = ext.copy_nested_dicts(patcher.model_options["transformer_options"])
    options["wrappers"] = ext.copy_nested_dicts(patcher.wrappers)
    options.update(cond_or_uncond=[0], sigmas=sigma)
    model = patcher.model
    return lambda: model.apply_model(x, sigma, c_crossattn=context, num_tokens=context.shape[1],
                                     transformer_options=options)


def no_grad(fn):
    """fn under torch.no_grad instead of inference_mode (the earlier bench's mode)."""
    def run():
        with torch.inference_mode(False), torch.no_grad():
            return fn()
    return run


def main():
    allocator, device, cfg, nodes = comfy_process.prepare(ARGS, kinds=("diffusion_models",))
    if ARGS.diagnose and "native" not in ARGS.variants:
        raise SystemExit("--diagnose times native in other ways: include native in --variants")

    rows, profiles = [], {}
    with torch.inference_mode():  # as ComfyUI's executor runs its nodes, the loaders too
        t0 = time.time()
        models = load_variants(nodes, ARGS.variants)
        load_s = time.time() - t0
        weights = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        runners = {v: m.model.runner for v, m in models.items() if v.startswith("engine")}
        graphs = {v: r.graphs is not None for v, r in runners.items()}
        print("loaded in %.0f s; engine CUDA graphs: %s" % (load_s, graphs), flush=True)

    g = torch.Generator(device="cpu").manual_seed(0)
    for size in ARGS.sizes:
        if any(v.endswith("compiled") for v in ARGS.variants):
            torch._dynamo.reset()  # each size compiles anew for itself, as in a process that sees only that size
        # sampling runs in float32 latents; the conditioning as the text encoder hands it over
        x = torch.randn(1, 16, size // 8, size // 8, generator=g).to(device)
        sigma = torch.full((1,), 0.7, device=device)
        context = torch.randn(1, ARGS.caption, cfg.cap_feat_dim, generator=g).to(device)
        runs = {v: evaluation(models[v], x, sigma, context) for v in ARGS.variants}
        if ARGS.diagnose:
            native = models["native"].model.diffusion_model
            dtype = models["native"].model.get_dtype_inference()
            xd, cd = x.to(dtype), context.to(dtype)
            direct = lambda: native(xd, sigma, cd, num_tokens=ARGS.caption)  # noqa: E731
            runs.update(native_no_grad=no_grad(runs["native"]), native_direct=direct,
                        native_direct_no_grad=no_grad(direct))
        row = {"size": size, "tokens": (size // 16) ** 2 + ARGS.caption}
        with torch.inference_mode():
            outs = {}
            for name, fn in runs.items():
                t = time.perf_counter()
                outs[name] = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                row[f"{name}_first_call_s"] = time.perf_counter() - t  # includes compiling and graph capture
            for name, (ms, spread) in time_interleaved(runs, ARGS.warmup, ARGS.iters).items():
                row[f"{name}_ms"], row[f"{name}_spread_ms"] = ms, spread
            for name, fn in runs.items():
                row[f"{name}_peak_gib"] = peak_above(fn, weights)
                if ARGS.profile and device.type == "cuda":
                    profiles[f"{name}@{size}"] = kernel_breakdown(fn)
            # the model's output (velocity) of every variant against native eager's
            velocity = {n: o.float() if n.startswith("native_direct") else (x - o.float()) / sigma.view(-1, 1, 1, 1)
                        for n, o in outs.items()}
            for name, v in velocity.items():
                if name != "native":
                    row[f"{name}_vs_native_rel_err"] = rel_err(v, velocity["native"]) if "native" in velocity else None
        flops = forward_flops(cfg, (size // 16) ** 2, ARGS.caption)
        for name in runs:
            row[f"{name}_tflops"] = flops / row[f"{name}_ms"] / 1e9
            if "native_ms" in row:
                row[f"{name}_over_native"] = row[f"{name}_ms"] / row["native_ms"]
        rows.append(row)
        print(row, flush=True)

    result = {"what": f"Z-Image transformer forward, batch 1, {ARGS.caption} caption tokens, random "
                      f"{'tiny' if ARGS.tiny else 'full-size'} weights from one file, each variant through its "
                      f"public loader and BaseModel.apply_model under torch.inference_mode",
              **provenance(str(device)), **comfy_process.comfy_versions(), "allocator": allocator,
              "engine_cuda_graphs": graphs, "load_s": load_s, "weights_gib": weights / GiB,
              "variants": list(runs), "rows": rows, "kernel_ms_by_kind": profiles}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_json(result, ARGS.out, f"forward-{stamp}.json")
    write_table(result, os.path.join(ARGS.out, f"forward-{stamp}.md"))


LABELS = {"native": "native ComfyUI NextDiT, eager", "native_compiled": "native + TorchCompileModel (inductor)",
          "native_fp8": "native fp8_e4m3fn_fast (UNETLoader)", "engine": "engine, ZImageLoader default",
          "engine_fp8": "engine fp8_e4m3fn_fast", "engine_compiled": "engine, compile on",
          "native_no_grad": "(diagnostic) native under no_grad", "native_direct": "(diagnostic) native NextDiT "
          "called directly", "native_direct_no_grad": "(diagnostic) native NextDiT directly, no_grad (earlier bench)"}


def write_table(result: dict, path: str) -> None:
    rows = result["rows"]
    sizes = [r["size"] for r in rows]
    graphs = result["engine_cuda_graphs"]
    lines = ["# Z-Image transformer forward: native ComfyUI and this engine", "", provenance_line(result), "",
             f"ComfyUI {result['comfyui']}, comfy-kitchen {result['comfy_kitchen'] or 'not installed'}, cuDNN frontend "
             f"{result['cudnn_frontend'] or 'not installed (engine attention in bf16)'}, allocator "
             f"{result['allocator']}; engine CUDA graphs: "
             + ", ".join(f"{v} {'on' if on else 'off'}" for v, on in graphs.items()) + ".", "",
             result["what"] + ". Milliseconds per forward: median (spread) of CUDA-event timings, variants timed in "
             "turns; ratio to native eager in the same run.", "",
             "| variant | " + " | ".join(str(s) for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for name in result["variants"]:
        cells = []
        for r in rows:
            ratio = r.get(f"{name}_over_native")
            cells.append(f"{r[f'{name}_ms']:.1f} ({r[f'{name}_spread_ms']:.1f})"
                         + (f", {ratio:.2f}x" if ratio is not None and name != "native" else ""))
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    lines += ["", "First call (s, includes compiling and CUDA graph capture), peak GiB above the loaded weights, "
              "TFLOP/s, and the velocity's relative error against native eager (‖a − b‖ / ‖b‖):", "",
              "| variant | size | first call s | peak GiB | TFLOP/s | vs native |", "|---|---|---|---|---|---|"]
    for r in rows:
        for name in result["variants"]:
            err = r.get(f"{name}_vs_native_rel_err")
            lines.append(f"| {name} | {r['size']} | {r[f'{name}_first_call_s']:.1f} | {r[f'{name}_peak_gib']:.2f} | "
                         f"{r[f'{name}_tflops']:.0f} | {'' if err is None else f'{err:.1e}'} |")
    if result.get("kernel_ms_by_kind"):
        lines += ["", "GPU kernel time by kind (ms, one forward):", "", "| variant@size | gemm | attention | other |",
                  "|---|---|---|---|"]
        for name, k in result["kernel_ms_by_kind"].items():
            lines.append(f"| {name} | {k['gemm']:.1f} | {k['attention']:.1f} | {k['other']:.1f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
