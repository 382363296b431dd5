"""VAE decode of the FLUX VAE as users run it: ComfyUI's VAE Decode node against the pack's Z-Image/VAE Decode, on
one VAE loaded by ComfyUI's VAELoader from a random full-size ae.safetensors, at several image sizes.

Each node is called as the executor calls it (under torch.inference_mode, the latent on the CPU as a sampler leaves
it, the image back on ComfyUI's output device as float32), in turns with CUDA events; medians and spreads. The
pack's image is compared with ComfyUI's. --profile adds each decode's kernel-time breakdown.

    python bench/bench_vae.py --models /tmp/zimage-bench --sizes 512 1024 2048 --out bench/results
"""

from __future__ import annotations

import argparse
import time

import comfy_process


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="kernel-time breakdown of each decode")
    return comfy_process.parse_arguments(parser)


ARGS = arguments()  # ComfyUI's flags and allocator are set before torch is imported, as its main.py does
comfy_process.start_from(ARGS)

import torch  # noqa: E402

from common import MODEL_FILES, peak_above, provenance, provenance_line, time_interleaved, write_json  # noqa: E402


def kernel_breakdown(fn, top: int = 12) -> list[tuple[str, float]]:
    """The `top` CUDA kernels of one call by total time (ms), and the sum of all as "total"."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    events.sort(key=lambda e: -e.device_time_total)
    rows = [(e.key[:90], e.device_time_total / 1000) for e in events[:top]]
    return rows + [("total", sum(e.device_time_total for e in events) / 1000)]


def main():
    allocator, device, _, nodes = comfy_process.prepare(ARGS, kinds=("vae",))
    (vae,) = nodes["VAELoader"]().load_vae(MODEL_FILES["vae"])
    native, pack = nodes["VAEDecode"](), nodes["ZImageVAEDecode"]()
    result = {**provenance(device), **comfy_process.comfy_versions(), "allocator": allocator,
              "vae_dtype": str(vae.vae_dtype), "sizes": {}}
    generator = torch.Generator().manual_seed(0)
    for size in ARGS.sizes:
        latent = {"samples": torch.randn(1, 16, size // 8, size // 8, generator=generator)}
        runs = {"native VAEDecode": lambda: native.decode(vae, latent),
                "pack ZImageVAEDecode": lambda: pack.decode(latent, vae)}
        with torch.inference_mode():
            (expected,), (image,) = runs["native VAEDecode"](), runs["pack ZImageVAEDecode"]()
            times = time_interleaved(runs, ARGS.warmup, ARGS.iters)
            breakdown = {name: kernel_breakdown(fn) for name, fn in runs.items()} if ARGS.profile else {}
            resident = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
            peaks = {name: peak_above(fn, resident) for name, fn in runs.items()}
        difference = (image - expected).abs()
        result["sizes"][size] = {
            "ms": {name: {"median": t[0], "spread": t[1]} for name, t in times.items()},
            "ratio": times["pack ZImageVAEDecode"][0] / times["native VAEDecode"][0], "peak_gib": peaks,
            "max_abs_difference": difference.max().item(), "mean_abs_difference": difference.mean().item(),
            "pixels_off_by_a_level": (difference > 0.5 / 255).float().mean().item(), "kernels": breakdown}
        print(f"{size}: " + ", ".join(f"{n} {t[0]:.2f} ms (spread {t[1]:.2f})" for n, t in times.items())
              + f"; ratio {result['sizes'][size]['ratio']:.2f}; peak GiB above resident "
              + ", ".join(f"{n} {p:.2f}" for n, p in peaks.items())
              + f"; |pack - native| max {difference.max().item():.4f} "
              f"mean {difference.mean().item():.5f}", flush=True)
        for name, rows in breakdown.items():
            print(f"  {name}: " + "; ".join(f"{k} {v:.2f}" for k, v in rows), flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = write_json(result, ARGS.out, f"vae-{stamp}.json")
    lines = [f"# VAE decode, FLUX VAE through ComfyUI's VAELoader: VAE Decode vs Z-Image/VAE Decode", "",
             provenance_line(result), "",
             f"ComfyUI {result['comfyui']}, allocator {allocator}, VAE dtype {result['vae_dtype']}, batch 1, "
             f"random full-size weights; ms, median (spread) of {ARGS.iters} calls in turns.", "",
             "| size | VAE Decode | Z-Image/VAE Decode | ratio | peak GiB (VAE Decode, Z-Image) | max abs difference | mean abs difference |",
             "|---|---|---|---|---|---|---|"]
    for size, r in result["sizes"].items():
        ms = r["ms"]
        lines.append(f"| {size} | {ms['native VAEDecode']['median']:.2f} ({ms['native VAEDecode']['spread']:.2f}) | "
                     f"{ms['pack ZImageVAEDecode']['median']:.2f} ({ms['pack ZImageVAEDecode']['spread']:.2f}) | "
                     f"{r['ratio']:.2f} | {r['peak_gib']['native VAEDecode']:.2f}, {r['peak_gib']['pack ZImageVAEDecode']:.2f} | "
                     f"{r['max_abs_difference']:.4f} | {r['mean_abs_difference']:.5f} |")
    with open(path.replace(".json", ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
