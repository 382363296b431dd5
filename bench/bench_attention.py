"""One layer's attention at the transformer's own shapes (30 heads of 128; 1024x1024 is 4224 tokens, 2048x2048
16512), from the fused projection qkv to the output the next projection takes: the bf16 path (qk_norm_rope, then
cuDNN's bf16 SDPA) against the FP8 path (qk_norm_e4m3, then cuDNN's FP8 attention, fp8_attention.py). Also each
attention kernel alone, and the FP8 output's error against the bf16 path and against float32 attention of the
same q, k, v.

Timed with CUDA events under torch.inference_mode, variants in turns; medians and spreads.

    python bench/bench_attention.py --out bench/results
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from common import provenance, provenance_line, rel_err, time_interleaved, write_json
from zimage.attention import Attention
from zimage.fp8_attention import Fp8Attention
from zimage.fused import qk_norm_e4m3, qk_norm_rope
from zimage.kernels import check_kernels


class Norm:
    def __init__(self, weight):
        self.weight, self.eps = weight, 1e-5

    def weight_for(self, x):
        return self.weight


def inputs(tokens: int, heads: int, head_dim: int, sharpness: float, seed: int):
    """qkv of one layer, norm weights (sharpness scales them: larger logits, peakier attention), RoPE tables."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(1, tokens, 3 * heads * head_dim, device="cuda", generator=g).bfloat16()
    norms = [Norm((sharpness * (1 + 0.2 * torch.randn(head_dim, device="cuda", generator=g))).bfloat16())
             for _ in range(2)]
    angles = torch.rand(1, tokens, 1, head_dim // 2, device="cuda", generator=g) * 2 * math.pi
    return qkv, norms, (angles.cos(), angles.sin())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[4224, 16512])
    parser.add_argument("--heads", type=int, default=30)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--sharpness", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    torch.inference_mode().__enter__()
    check_kernels(torch.device("cuda"), torch.bfloat16)
    exact = Attention("auto")
    fp8 = Fp8Attention(exact)
    heads, head_dim = args.heads, args.head_dim
    rows = []
    for tokens in args.tokens:
        qkv, (q_norm, k_norm), rope = inputs(tokens, heads, head_dim, 1.0, 0)
        q, k = qk_norm_rope(qkv, heads, q_norm, k_norm, *rope)
        v = qkv.unflatten(-1, (3, heads, -1))[:, :, 2]
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        codes, scales = qk_norm_e4m3(qkv, heads, q_norm, k_norm, *rope)
        fp8._runs(qkv, None)
        if fp8.refusal[qkv.device]:
            raise SystemExit(f"FP8 attention cannot run here: {fp8.refusal[qkv.device]}")
        runs = {
            "bf16 layer (qk_norm_rope + cuDNN bf16 SDPA)":
                lambda: exact.from_projection(qkv, heads, q_norm, k_norm, rope, None),
            "fp8 layer (qk_norm_e4m3 + cuDNN FP8 attention)":
                lambda: fp8.from_projection(qkv, heads, q_norm, k_norm, rope, None),
            "bf16 kernel alone": lambda: exact(qh, kh, vh, None),
            "fp8 kernel alone": lambda: fp8._attend(codes, scales, torch.bfloat16),
            "qk_norm_rope alone": lambda: qk_norm_rope(qkv, heads, q_norm, k_norm, *rope),
            "qk_norm_e4m3 alone": lambda: qk_norm_e4m3(qkv, heads, q_norm, k_norm, *rope),
        }
        times = time_interleaved(runs, args.warmup, args.iters)
        flops = 4 * tokens * tokens * head_dim * heads
        row = {"tokens": tokens, "ms": {n: t[0] for n, t in times.items()},
               "spread_ms": {n: t[1] for n, t in times.items()},
               "kernel_tflops": {n: flops / (times[n][0] * 1e9) for n in ("bf16 kernel alone", "fp8 kernel alone")}}
        errors = {}
        for sharpness in args.sharpness:
            qkv_s, (qn, kn), rope_s = inputs(tokens, heads, head_dim, sharpness, 1)
            out_bf16 = exact.from_projection(qkv_s, heads, qn, kn, rope_s, None).float()
            out_fp8 = fp8.from_projection(qkv_s, heads, qn, kn, rope_s, None).float()
            qs, ks = qk_norm_rope(qkv_s.float(), heads, qn, kn, *rope_s)
            vs = qkv_s.float().unflatten(-1, (3, heads, -1))[:, :, 2]
            ref = F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2))
            ref = ref.transpose(1, 2).flatten(2)
            logits = (qs[0, :256, 0] @ ks[0, :, 0].t()) / math.sqrt(head_dim)
            errors[str(sharpness)] = {"fp8 vs bf16": rel_err(out_fp8, out_bf16), "fp8 vs fp32": rel_err(out_fp8, ref),
                                      "bf16 vs fp32": rel_err(out_bf16, ref), "logit std": logits.std().item()}
        row["errors"] = errors
        rows.append(row)
        print(row, flush=True)
    result = {**provenance(), "heads": heads, "head_dim": head_dim, "rows": rows}
    stamp = result["date"].replace("-", "") + "-" + __import__("time").strftime("%H%M%S")
    write_json(result, args.out, f"attention-{stamp}.json")
    lines = [f"# One layer's attention, bf16 vs FP8 ({heads} heads of {head_dim}, batch 1)", "",
             provenance_line(result), "",
             "Milliseconds per call, median (spread), CUDA events under inference_mode, variants in turns. A layer "
             "goes from the fused projection qkv to the output the next projection reads.", "",
             "| variant | " + " | ".join(f"{r['tokens']} tokens" for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for name in rows[0]["ms"]:
        lines.append(f"| {name} | " + " | ".join(f"{r['ms'][name]:.3f} ({r['spread_ms'][name]:.3f})" for r in rows)
                     + " |")
    lines.append("| fp8 layer / bf16 layer | " + " | ".join(
        f"{r['ms']['fp8 layer (qk_norm_e4m3 + cuDNN FP8 attention)'] / r['ms']['bf16 layer (qk_norm_rope + cuDNN bf16 SDPA)']:.2f}"
        for r in rows) + " |")
    lines.append("| fp8 kernel / bf16 kernel | " + " | ".join(
        f"{r['ms']['fp8 kernel alone'] / r['ms']['bf16 kernel alone']:.2f}" for r in rows) + " |")
    lines.append("| kernel TFLOP/s bf16, fp8 | " + " | ".join(
        f"{r['kernel_tflops']['bf16 kernel alone']:.0f}, {r['kernel_tflops']['fp8 kernel alone']:.0f}" for r in rows)
        + " |")
    lines += ["", "Relative error of the layer's output (‖a − b‖ / ‖b‖); float32 is attention of the same q, k, v in "
              "float32. Sharpness scales the q and k norms' weights (peakier attention).", "",
              "| tokens | sharpness | logit std | fp8 vs bf16 | fp8 vs fp32 | bf16 vs fp32 |", "|---|---|---|---|---|---|"]
    for r in rows:
        for s, e in r["errors"].items():
            lines.append(f"| {r['tokens']} | {s} | {e['logit std']:.2f} | {e['fp8 vs bf16']:.2e} | "
                         f"{e['fp8 vs fp32']:.2e} | {e['bf16 vs fp32']:.2e} |")
    with open(f"{args.out}/attention-{stamp}.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
