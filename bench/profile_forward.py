"""GPU time of one 1024x1024 forward kernel by kernel (random full-size weights, 128 caption tokens).

    python bench/profile_forward.py engine fp8 compiled fp8_compiled > bench/results/profile-DATE.txt

Each named variant is timed (median of 5 CUDA-event timings after 3 warm-up calls), then profiled once; the
40 kernels that took the most time are listed with their count and mean duration.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from common import provenance, provenance_line, random_engine, random_inputs, shared_copy, time_cuda
from zimage import Runner, ZImageConfig
from zimage.fp8 import use_fp8_matmuls

VARIANTS = ["engine", "fp8", "compiled", "fp8_compiled"]


def main():
    parser = argparse.ArgumentParser(description="GPU time of one 1024x1024 forward, kernel by kernel")
    # no default list here: argparse checks a positional's default against choices as one value, and refuses it
    parser.add_argument("variants", nargs="*", choices=VARIANTS, help="engine: eager bf16 (the fused kernels); fp8: "
                        "FP8 matmuls; compiled: compiled blocks (default: engine fp8)")
    variants = parser.parse_args().variants or ["engine", "fp8"]
    print(f"# {provenance_line(provenance())}")
    cfg = ZImageConfig()
    engine = random_engine(cfg, "cuda", torch.bfloat16)
    latents, sigma, captions = random_inputs(cfg, 1024, 1, 128, "cuda", torch.bfloat16,
                                             torch.Generator().manual_seed(0))
    for name in variants:
        network = shared_copy(engine)  # FP8 and compile rewire the modules: the next variant starts from bf16 eager
        if "fp8" in name:
            use_fp8_matmuls(network)
        runner = Runner(network, compile="compiled" in name)
        with torch.no_grad():
            ms, _ = time_cuda(lambda: runner(latents, sigma, captions), 3, 5)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                runner(latents, sigma, captions)
                torch.cuda.synchronize()
        rows = sorted(((e.device_time_total / 1000, e.count, e.key[:150]) for e in prof.key_averages()
                       if e.device_time_total and not e.key.startswith(("aten::", "cuda"))), reverse=True)
        print(f"\n## {name}: {ms:.1f} ms per forward; kernels {sum(r[0] for r in rows):.1f} ms\n")
        for total, count, key in rows[:40]:
            print(f"{total:8.2f} ms {count:5d}x {1000 * total / count:8.1f} us  {key}")
        runner = network = None  # this variant's FP8 weights go before the next variant is built
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
