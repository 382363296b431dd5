"""Weight streaming under a small VRAM cap: the full model at 1024x1024 with the blocks in pinned host memory.

Measures the host-to-device bandwidth (pinned, block-sized copies), caps PyTorch's memory at --cap-gib, and
times a forward of a zimage.Runner that streams the weights (Runner.stream_weights). The bound is the streamed
bytes over the measured bandwidth: a forward cannot be faster than moving its weights, and overlapping hides
the compute under the copies.

    python bench/bench_streaming.py --cap-gib 4 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from common import GiB, provenance, random_engine, random_inputs, time_cuda, write_json
from zimage import Runner, ZImageConfig


def h2d_gbps(nbytes: int, repeats: int = 10) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    ms, _ = time_cuda(lambda: device.copy_(host, non_blocking=True), 2, repeats)
    return nbytes / ms / 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cap-gib", type=float, default=4.0)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--caption", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    cfg = ZImageConfig()
    engine = random_engine(cfg, "cuda", torch.bfloat16)  # drawn on the GPU (fast), then sent to the host
    block_bytes = sum(p.numel() * p.element_size() for p in engine.layers[0].parameters())
    gbps = statistics.median(h2d_gbps(block_bytes) for _ in range(3))
    engine.cpu()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(args.cap_gib * GiB / total)
    runner = Runner(engine)
    runner.stream_weights("cuda")
    streamed = sum(p.nbytes for p in engine.parameters() if not p.is_cuda)  # copied in every forward
    resident = torch.cuda.memory_allocated()

    latents, sigma, captions = random_inputs(cfg, args.size, 1, args.caption, "cuda", torch.bfloat16,
                                             torch.Generator().manual_seed(0))
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        ms, spread = time_cuda(lambda: runner(latents, sigma, captions), 1, args.iters)
        out = runner(latents, sigma, captions)
    bound_ms = streamed / gbps / 1e6
    result = {
        "what": f"S3-DiT forward {args.size}x{args.size}, blocks streamed from pinned host memory, "
                f"PyTorch memory capped at {args.cap_gib:g} GiB",
        **provenance(),
        "h2d_gb_per_s": gbps, "streamed_gib": streamed / GiB, "transfer_bound_ms": bound_ms,
        "forward_ms": ms, "spread_ms": spread, "over_bound": ms / bound_ms,
        "resident_gib": resident / GiB, "peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
        "finite": bool(torch.isfinite(out).all()),
    }
    write_json(result, args.out, f"streaming-{args.cap_gib:g}gib.json")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
