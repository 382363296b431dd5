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

from typing import NamedTuple

import torch
import torch.nn as nn

from .kernels import smoke_test, tl, triton, triton_runs

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
E4M3_TOP = E4M3_MAX * (1 - 2**-8)  # what a row's largest element is scaled to (quantize_rows)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 values, float32 scale [..., 1]) with x ~= values * scale, one scale per row.

    The factor sits a hair under E4M3_MAX / amax and is rounded to x's dtype, so that x * factor, rounded to
    x's dtype too, cannot push a row's largest element past the top code; the scale is its exact inverse.
    On CUDA one Triton kernel reads each bf16 row once, rounding as these steps do (its codes and scales
    are bit-equal to theirs, tests/test_gpu.py); elsewhere, and for float32, the PyTorch steps run."""
    if triton_runs(x) and x.dtype == torch.bfloat16 and x.numel():
        return _quantize_rows_triton(x)
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).float().clamp(min=1e-12)
    factor = (E4M3_TOP / amax).to(x.dtype)
    return (x * factor).to(E4M3), 1 / factor.float()


@smoke_test
def _run_quantize_kernel(device: torch.device, dtype: torch.dtype) -> None:
    quantize_rows(torch.ones(2, 100, device=device, dtype=torch.bfloat16))  # its kernel takes bf16 rows only


def _quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    width = x.shape[-1]
    codes = torch.empty(x.shape, dtype=E4M3, device=x.device)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(width)
    _quantize_rows_kernel[(x.numel() // width,)](x, codes, scale, width, E4M3_TOP, BLOCK=block,
                                                 num_warps=16 if block > 4096 else 8)
    return codes, scale


store_e4m3_row = None  # without Triton: the PyTorch steps of quantize_rows run instead

if triton is not None:

    @triton.jit
    def store_e4m3_row(x, codes_ptr, scale_ptr, offsets, mask, top):
        """Store one row x (bf16, in registers; masked elements 0) as quantize_rows does: its e4m3 codes at
        codes_ptr + offsets and its scale at scale_ptr. The kernels that produce a GEMM's input (fused.py) call this
        on the row they hold, so that no separate quantization pass reads it again."""
        amax = tl.maximum(tl.max(tl.abs(x.to(tl.float32)), axis=0), 1e-12)
        # IEEE division and round-to-nearest casts: the roundings of the PyTorch steps in quantize_rows
        factor = tl.math.div_rn(tl.cast(top, tl.float32), amax).to(x.dtype, fp_downcast_rounding="rtne")
        scaled = (x.to(tl.float32) * factor.to(tl.float32)).to(x.dtype, fp_downcast_rounding="rtne")
        tl.store(codes_ptr + offsets, scaled.to(codes_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr, tl.math.div_rn(1.0, factor.to(tl.float32)))

    @triton.jit  # top arrives as float64 inside torch.compile'd blocks: cast (store_e4m3_row)
    def _quantize_rows_kernel(x_ptr, codes_ptr, scale_ptr, width, top, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        x = tl.load(x_ptr + row * width + cols, mask=mask, other=0.0)
        store_e4m3_row(x, codes_ptr + row * width, scale_ptr + row, cols, mask, top)


def takes_e4m3_rows(linear: nn.Module) -> bool:
    """Whether a layer reads its input as E4M3Rows (an Fp8Linear): its producer then quantizes as it writes."""
    return getattr(linear, "takes_e4m3_rows", False)


def scaled_mm_supported(device: torch.device) -> bool:
    """Rowwise-scaled FP8 GEMMs need compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class E4M3Rows(NamedTuple):
    """Activations as an Fp8Linear reads them, quantized by the kernel that produced them (fused.py, `e4m3=True`):
    quantize_rows' codes [..., K] and scales [..., 1], and the dtype the rows were computed in (the GEMM's output's)."""

    codes: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @classmethod
    def of(cls, x: torch.Tensor) -> "E4M3Rows":
        return cls(*quantize_rows(x), x.dtype)


class Fp8Linear(nn.Module):
    """A bias-free Linear whose matrix lives in e4m3 with per-row scales; computes in FP8, returns x's dtype. It
    takes x as a tensor, quantized here per row, or as E4M3Rows its producer quantized (takes_e4m3_rows)."""

    takes_e4m3_rows = True

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

    def forward(self, x: torch.Tensor | E4M3Rows) -> torch.Tensor:
        rows = x if isinstance(x, E4M3Rows) else E4M3Rows.of(x)
        x_q, x_scale = rows.codes.reshape(-1, self.in_features), rows.scale.reshape(-1, 1)
        if x_q.is_cuda:
            out = torch._scaled_mm(x_q, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale.t(),
                                   out_dtype=torch.bfloat16 if rows.dtype == torch.float32 else rows.dtype,
                                   use_fast_accum=True)
        else:
            out = (x_q.float() * x_scale) @ (self.weight.float() * self.weight_scale).t()
        return out.to(rows.dtype).reshape(*rows.codes.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 rowwise"


def use_fp8_matmuls(model) -> None:
    """Compute an S3DiT's block matrix multiplies in FP8: each bias-free linear layer of its block stacks becomes
    the model's ops.Fp8Linear of the same weights (in place; call after the weights are loaded). Half the blocks'
    weight memory; on an H100 the GEMMs ran 1.9x faster and the forward 1.4x. The velocity moves: 9.3% against
    bf16 on random full-size weights, where bf16 implementations differ from each other by 1.6% (bench/results)."""
    for stack in model.block_stacks():
        _replace_linears(stack, model.ops.Fp8Linear)


def _replace_linears(module: nn.Module, fp8_linear: type[Fp8Linear]) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.bias is None:
            setattr(module, name, fp8_linear.from_linear(child))
        else:
            _replace_linears(child, fp8_linear)
