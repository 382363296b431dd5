"""FP8 (e4m3) matrix multiplies for the transformer blocks' linear layers.

Each weight matrix is stored in float8 e4m3 with one float32 scale per output row; activations are
quantized per token at run time (one scale per row of x). y = (x_q * s_x) (W_q * s_w)^T is then one
scaled FP8 GEMM with a bf16 result (torch._scaled_mm, rowwise scales, Hopper and newer). Elsewhere the
same arithmetic runs on dequantized tensors, so CPU tests see the rounding the GPU kernel sees.

The GEMM uses fast accumulation (partial sums kept in the tensor cores' own precision): 11% faster on an
H100, and its error against exact accumulation of the same codes, 2-3e-3, is a tenth of what the e4m3
rounding itself makes, 3.8e-2 (bench/bench_gemm.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 values, float32 scale [..., 1]) with x ~= values * scale, one scale per row."""
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).float().clamp(min=1e-12)
    # One multiply in x's own dtype (no float32 copy of the activations: eager runs each step as a pass over
    # memory). The factor sits a hair under E4M3_MAX / amax, so that rounding it to x's dtype cannot push a
    # row's largest element past the top code; the scale is its exact inverse.
    factor = (E4M3_MAX * (1 - 2**-8) / amax).to(x.dtype)
    return (x * factor).to(E4M3), 1 / factor.float()


def scaled_mm_supported(device: torch.device) -> bool:
    """Rowwise-scaled FP8 GEMMs need compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Module):
    """A bias-free Linear whose matrix lives in e4m3 with per-row scales; computes in FP8, returns x's dtype."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # [N, K] e4m3
        self.weight_scale = nn.Parameter(weight_scale, requires_grad=False)  # [N, 1] float32
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        if linear.bias is not None:
            raise ValueError("Fp8Linear takes bias-free layers (the transformer blocks' linears have none)")
        return cls(*quantize_rows(linear.weight.detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        x_q, x_scale = quantize_rows(rows)
        if x.is_cuda:
            out = torch._scaled_mm(x_q, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale.t(),
                                   out_dtype=torch.bfloat16 if x.dtype == torch.float32 else x.dtype,
                                   use_fast_accum=True)
        else:
            out = (x_q.float() * x_scale) @ (self.weight.float() * self.weight_scale).t()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 rowwise"


def use_fp8_linears(blocks: nn.Module) -> None:
    """Replace every bias-free nn.Linear under `blocks` with an Fp8Linear of its weights (in place)."""
    for name, child in list(blocks.named_children()):
        if type(child) is nn.Linear and child.bias is None:
            setattr(blocks, name, Fp8Linear.from_linear(child))
        else:
            use_fp8_linears(child)
