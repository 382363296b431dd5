"""The block GEMMs of one 1024x1024 forward (4224 tokens), alone: bf16 against FP8 scaling modes.

Tells how fast each matmul the transformer runs can be on this GPU, and which FP8 mode to use:
rowwise scales (per token x per output row, what zimage.fp8 uses) or one scale per tensor, each with and
without fast accumulation.

    python bench/bench_gemm.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common import provenance, rel_err, time_cuda, write_json
from zimage.fp8 import quantize_rows

E4M3 = torch.float8_e4m3fn


SHAPES = {"qkv": (3840, 11520), "out": (3840, 3840), "w1 / w3": (3840, 10240), "w1+w3 stacked": (3840, 20480),
          "w2": (10240, 3840)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4224)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    m = args.tokens
    rows = []
    for name, (k, n) in SHAPES.items():
        # several input sets, so that repeated runs do not measure the cache
        a = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        flops = 2 * m * k * n
        row = {"gemm": name, "m": m, "k": k, "n": n}
        i = iter(range(10**9))
        row["bf16"] = time_cuda(lambda: a[next(i) % 3] @ w.t(), 5, 30)[0]
        a8 = [x.to(E4M3) for x in a]
        w8 = w.mul(64).to(E4M3)
        one = torch.ones((), device="cuda")
        sa, sb = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
        for mode, (scale_a, scale_b) in {"rowwise": (sa, sb), "tensorwise": (one, one)}.items():
            for fast in (False, True):
                fn = lambda: torch._scaled_mm(a8[next(i) % 3], w8.t(), scale_a=scale_a, scale_b=scale_b,  # noqa: E731
                                              out_dtype=torch.bfloat16, use_fast_accum=fast)
                row[f"fp8 {mode}{' fast' if fast else ''}"] = time_cuda(fn, 5, 30)[0]
        for key in list(row):
            if key not in ("gemm", "m", "k", "n"):
                row[key + " TFLOP/s"] = flops / row[key] / 1e9
        # what fast accumulation costs in accuracy, on zimage.fp8's own quantization: its error against the
        # float32 product of the same e4m3 codes, next to the error the quantization itself makes
        x_q, x_scale = quantize_rows(a[0])
        w_q, w_scale = quantize_rows(w)
        exact = (x_q.float() * x_scale) @ (w_q.float() * w_scale).t()
        for fast in (False, True):
            out = torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=torch.bfloat16,
                                   use_fast_accum=fast).float()
            row[f"fp8 rowwise{' fast' if fast else ''} accumulation rel err"] = rel_err(out, exact)
        row["fp8 quantization rel err"] = rel_err(exact, a[0].float() @ w.float().t())
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"what": f"block GEMMs at {m} tokens", **provenance(), "rows": rows}
    write_json(result, args.out, f"gemm-{time.strftime('%Y%m%d-%H%M')}.json")
    modes = [k for k in rows[0] if k.endswith("TFLOP/s")]
    print("| gemm | " + " | ".join(modes) + " |")
    for r in rows:
        print(f"| {r['gemm']} | " + " | ".join(f"{r[k]:.0f}" for k in modes) + " |")
    errors = [k for k in rows[0] if k.endswith("rel err")]
    print("| gemm | " + " | ".join(errors) + " |")
    for r in rows:
        print(f"| {r['gemm']} | " + " | ".join(f"{r[k]:.2e}" for k in errors) + " |")


if __name__ == "__main__":
    main()
