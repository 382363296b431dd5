"""GPU time of one 1024x1024 forward kernel by kernel (random full-size weights, 128 caption tokens).

    python bench/profile_forward.py engine fp8 compiled fp8_compiled > bench/results/profile-DATE.txt

Each named variant is timed (median of 5 CUDA-event timings after 3 warm-up calls), then profiled once; the
40 kernels that took the most time are listed with their count and mean duration.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_forward import random_engine, shared_copy, time_cuda  # noqa: E402

from zimage import ZImageConfig  # noqa: E402  (bench_forward puts the pack on the path)


def main():
    variants = sys.argv[1:] or ["engine", "fp8"]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}, "
          f"`bench/profile_forward.py {' '.join(variants)}`")
    cfg = ZImageConfig()
    engine = random_engine(cfg, "cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 128, 128, generator=g).cuda().bfloat16()
    sigma = torch.full((1,), 0.7, device="cuda")
    captions = [torch.randn(128, cfg.cap_feat_dim, generator=g).cuda().bfloat16()]
    for name in variants:
        model = shared_copy(engine)
        if "fp8" in name:
            model.use_fp8_matmuls()
        if "compiled" in name:
            model.compile_blocks()
        with torch.no_grad():
            ms, _ = time_cuda(lambda: model(latents, sigma, captions), 3, 5)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model(latents, sigma, captions)
                torch.cuda.synchronize()
        rows = sorted(((e.device_time_total / 1000, e.count, e.key[:150]) for e in prof.key_averages()
                       if e.device_time_total and not e.key.startswith(("aten::", "cuda"))), reverse=True)
        print(f"\n## {name}: {ms:.1f} ms per forward; kernels {sum(r[0] for r in rows):.1f} ms\n")
        for total, count, key in rows[:40]:
            print(f"{total:8.2f} ms {count:5d}x {1000 * total / count:8.1f} us  {key}")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
