"""The elementwise steps of a block, each in one pass over memory (a Triton kernel on CUDA).

Between its matrix multiplies a block normalizes, modulates, rotates, gates and adds. Run as separate PyTorch
operations, each step reads and writes the activations again, RoPE several times in float32: at 1024x1024 on
an H100 they took 52 of the eager forward's 132 ms. Each function here is one kernel that reads its inputs
once, computes in float32 and rounds once, at the end.

Elsewhere (the CPU, Apple's MPS, PyTorch builds without Triton, or where kernels.check_kernels found Triton
broken) the same math runs as plain PyTorch. Triton's interpreter runs the kernels on CPU tensors, which is how
the CPU tests check them against their formulas (tests/test_fused.py).

Norms come in as modules: `norm.weight_for(x)` is the weight to scale x with (a host that keeps weights
elsewhere, or patches them per use, supplies its own), `norm.eps` its epsilon.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .fp8 import E4M3, E4M3_TOP, E4M3Rows, store_e4m3_row
from .kernels import e4m3_kernels_run, e4m3_smoke_test, smoke_test, tl, triton, triton_runs
from .rope import apply_rope


@smoke_test
def _run_each_kernel(device: torch.device, dtype: torch.dtype) -> None:
    x = torch.ones(1, 2, 3 * 2 * 16, device=device, dtype=dtype)
    norm = _Norm(torch.ones(x.shape[-1], device=device, dtype=dtype))
    head_norm = _Norm(torch.ones(16, device=device, dtype=dtype))
    rope = torch.ones(1, 2, 1, 8, device=device)
    add_gated_norm(x, norm_modulate(x, norm, x), norm, x)
    qk_norm_rope(x, 2, head_norm, head_norm, rope, rope)
    swiglu(x, x)


@e4m3_smoke_test
def _run_each_e4m3_kernel(device: torch.device, dtype: torch.dtype) -> None:
    x = torch.ones(1, 2, 3 * 2 * 16, device=device, dtype=torch.bfloat16)  # the kernels write e4m3 from bf16
    norm = _Norm(torch.ones(x.shape[-1], device=device, dtype=x.dtype))
    head_norm = _Norm(torch.ones(16, device=device, dtype=x.dtype))
    rope = torch.ones(1, 2, 1, 8, device=device)
    qk_norm_e4m3(x, 2, head_norm, head_norm, rope, rope)
    norm_modulate(x, norm, x, e4m3=True)
    swiglu(x, x, e4m3=True)


class _Norm:
    """A stand-in RMSNorm for the smoke test: a weight and an eps."""

    def __init__(self, weight: torch.Tensor):
        self.weight, self.eps = weight, 1e-6

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def norm_modulate(x: torch.Tensor, norm, scale: torch.Tensor | None = None, e4m3: bool = False):
    """norm(x) * (1 + scale): the input of an attention or feed-forward sublayer.
    x [B, S, D]; scale [B, 1 or S, D] (adaLN), or None for blocks without modulation. e4m3: return the result as
    the E4M3Rows its FP8 linear layers read, quantized in this same pass (bf16 on CUDA; elsewhere quantize_rows)."""
    weight = norm.weight_for(x)
    if not triton_runs(x):
        y = F.rms_norm(x, weight.shape, weight, norm.eps)
        y = y if scale is None else y * (1 + scale)
        return E4M3Rows.of(y) if e4m3 else y
    x = x.contiguous()
    dim = x.shape[-1]
    block = triton.next_power_of_2(dim)
    stride_b, stride_s = _row_strides(scale) if scale is not None else (0, 0)
    out, codes, scales = _outputs(x, e4m3)
    quantizing = codes is not None  # the unused outputs' pointers are x's: never written
    _norm_modulate_kernel[(x.numel() // dim,)](
        x, weight, scale if scale is not None else x, x if quantizing else out, codes if quantizing else x,
        scales if quantizing else x, x.shape[1], dim, stride_b, stride_s, norm.eps, E4M3_TOP,
        HAS_SCALE=scale is not None, E4M3=quantizing, BLOCK=block, num_warps=_warps(block))
    if quantizing:
        return E4M3Rows(codes, scales, x.dtype)
    return E4M3Rows.of(out) if e4m3 else out


def _outputs(x: torch.Tensor, e4m3: bool):
    """A producing kernel's outputs: (out, None, None), or (None, codes, scales) where it quantizes its rows
    itself (bf16 rows, where the e4m3 kernels run: the quantization kernel's own rounding, fp8.store_e4m3_row);
    other rows are written as they are and quantized after (quantize_rows)."""
    if e4m3 and x.dtype == torch.bfloat16 and e4m3_kernels_run(x):
        return None, torch.empty(x.shape, dtype=E4M3, device=x.device), torch.empty(
            (*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    return torch.empty_like(x), None, None


def add_gated_norm(x: torch.Tensor, y: torch.Tensor, norm, gate: torch.Tensor | None = None) -> torch.Tensor:
    """x + tanh(gate) * norm(y): a sublayer's output y added back into the residual stream x.
    x, y [B, S, D]; gate [B, 1 or S, D] (adaLN), or None for blocks without modulation."""
    weight = norm.weight_for(y)
    if not triton_runs(x):
        y = F.rms_norm(y, weight.shape, weight, norm.eps)
        return x + (y if gate is None else gate.tanh() * y)
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x)
    dim = x.shape[-1]
    block = triton.next_power_of_2(dim)
    stride_b, stride_s = _row_strides(gate) if gate is not None else (0, 0)
    _add_gated_norm_kernel[(x.numel() // dim,)](
        x, y, weight, gate if gate is not None else x, out, x.shape[1], dim, stride_b, stride_s, norm.eps,
        HAS_GATE=gate is not None, BLOCK=block, num_warps=_warps(block))
    return out


def qk_norm_rope(qkv: torch.Tensor, n_heads: int, q_norm, k_norm, cos: torch.Tensor, sin: torch.Tensor):
    """From the fused projection qkv [B, S, 3 * H * D]: q and k [B, S, H, D], each normalized per head
    (q_norm, k_norm) and rotated by RoPE (cos, sin [B, S, 1, D / 2], rope.py)."""
    q, k, _ = qkv.unflatten(-1, (3, n_heads, -1)).unbind(2)
    q_weight, k_weight = q_norm.weight_for(q), k_norm.weight_for(k)
    if not _kernel_takes(qkv, q.shape[-1]):
        return (apply_rope(F.rms_norm(q, q_weight.shape, q_weight, q_norm.eps), cos, sin),
                apply_rope(F.rms_norm(k, k_weight.shape, k_weight, k_norm.eps), cos, sin))
    out = torch.empty((2, *q.shape), dtype=qkv.dtype, device=qkv.device)
    _run_qk_kernel(qkv, n_heads, q_norm, k_norm, q_weight, k_weight, cos, sin, out)
    return out[0], out[1]


def qk_norm_e4m3(qkv: torch.Tensor, n_heads: int, q_norm, k_norm, cos: torch.Tensor, sin: torch.Tensor):
    """qk_norm_rope's q and k, and qkv's v, as e4m3 codes (3, B, S, H, D) with one float32 scale each (3,):
    x ~= codes[i] * scales[i]. What FP8 attention reads (fp8_attention.py), made in qk_norm_rope's one pass.

    q's and k's scales need no pass over the tensors: a head normalized by its RMS has length sqrt(D) at most
    (eps only shortens it), the norm's weight w stretches no element by more than max |w|, and a rotation keeps
    each pair's length; so no element of q exceeds sqrt(D) max |w|, which is put at the top code. e4m3 is a
    floating-point format, so this bound, looser than q's own largest element, costs no precision (it keeps q's
    elements in the normal range). v's scale comes from its largest magnitude, one reduction before the pass."""
    q, k, v = qkv.unflatten(-1, (3, n_heads, -1)).unbind(2)
    head_dim = q.shape[-1]
    q_weight, k_weight = q_norm.weight_for(q), k_norm.weight_for(k)
    v_amax = torch.linalg.vector_norm(v, float("inf"))  # one reduction over the strided view, exact in any dtype
    top_over_root = E4M3_TOP / math.sqrt(head_dim)
    if not _kernel_takes(qkv, head_dim) or not e4m3_kernels_run(qkv):
        factors = torch.stack((top_over_root / q_weight.abs().amax().float().clamp(min=1e-12),
                               top_over_root / k_weight.abs().amax().float().clamp(min=1e-12),
                               E4M3_TOP / v_amax.float().clamp(min=1e-12)))
        q = apply_rope(F.rms_norm(q.float(), q_weight.shape, q_weight.float(), q_norm.eps), cos, sin)
        k = apply_rope(F.rms_norm(k.float(), k_weight.shape, k_weight.float(), k_norm.eps), cos, sin)
        codes = torch.stack((q * factors[0], k * factors[1], v.float() * factors[2])).to(E4M3)
        return codes, 1 / factors
    codes = torch.empty((3, *q.shape), dtype=E4M3, device=qkv.device)
    scales = torch.empty(3, dtype=torch.float32, device=qkv.device)
    _run_qk_kernel(qkv, n_heads, q_norm, k_norm, q_weight, k_weight, cos, sin, codes, v_amax, scales, top_over_root)
    return codes, scales


def _kernel_takes(qkv: torch.Tensor, head_dim: int) -> bool:
    return triton_runs(qkv) and not head_dim & (head_dim - 1)  # the kernel tiles a head as a power of two


def _run_qk_kernel(qkv, n_heads, q_norm, k_norm, q_weight, k_weight, cos, sin, out, v_amax=None, scales=None,
                   top_over_root=1.0):
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    batch, seq_len = qkv.shape[:2]
    # a table of batch 1 serves every sample: index the tables by their strides, batch stride 0 then
    rope_b, rope_s = (cos.stride(0) if cos.shape[0] > 1 else 0), cos.stride(1)
    e4m3 = v_amax is not None
    _qk_norm_rope_kernel[(batch * seq_len,)](
        qkv, q_weight, k_weight, cos, sin, out, v_amax if e4m3 else qkv, scales if e4m3 else qkv, batch * seq_len,
        seq_len, n_heads, rope_b, rope_s, q_norm.eps, k_norm.eps, top_over_root, E4M3_TOP,
        HEAD_DIM=out.shape[-1], BLOCK_H=triton.next_power_of_2(n_heads), E4M3=e4m3, num_warps=4)


def swiglu(a: torch.Tensor, b: torch.Tensor, e4m3: bool = False):
    """silu(a) * b: the gated activation between a feed-forward's two projections. e4m3: as E4M3Rows, quantized
    in this same pass (see norm_modulate)."""
    if not triton_runs(a):
        y = F.silu(a) * b
        return E4M3Rows.of(y) if e4m3 else y
    a, b = a.contiguous(), b.contiguous()
    out, codes, scales = _outputs(a, e4m3)
    if codes is not None:  # one program per row: the row's largest magnitude sets its scale
        width = a.shape[-1]
        block = triton.next_power_of_2(width)
        _swiglu_rows_kernel[(a.numel() // width,)](a, b, codes, scales, width, E4M3_TOP, BLOCK=block,
                                                   num_warps=16 if block > 4096 else 8)
        return E4M3Rows(codes, scales, a.dtype)
    n = a.numel()
    block = 2048
    _swiglu_kernel[(triton.cdiv(n, block),)](a, b, out, n, BLOCK=block, num_warps=8)
    return E4M3Rows.of(out) if e4m3 else out


def _row_strides(t: torch.Tensor) -> tuple[int, int]:
    """Batch and sequence strides of a [B, 1 or S, D] modulation tensor (a chunk of the adaLN output, rows
    contiguous); 0 where it is shared across that axis."""
    if t.ndim != 3 or t.stride(-1) != 1:
        raise ValueError(f"adaLN tensors must be [B, 1 or S, D] with contiguous rows, got {list(t.shape)}")
    return (t.stride(0) if t.shape[0] > 1 else 0), (t.stride(1) if t.shape[1] > 1 else 0)


# Float arguments (eps) are cast to float32 inside the kernels: inside torch.compile'd blocks they arrive as
# float64.
if triton is not None:

    @triton.jit
    def _normalized_row(ptr, w_ptr, row, dim, eps, BLOCK: tl.constexpr):
        """Row `row` of a [rows, dim] tensor, RMS-normalized and scaled by the norm's weight, in float32."""
        cols = tl.arange(0, BLOCK)
        mask = cols < dim
        x = tl.load(ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / dim + tl.cast(eps, tl.float32))
        return x * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _adaln_row(ptr, row, seq_len, stride_b, stride_s, dim, BLOCK: tl.constexpr):
        """Token `row`'s row of a [B, 1 or S, D] modulation tensor (scale or gate), by its strides, in float32."""
        cols = tl.arange(0, BLOCK)
        row_ptr = ptr + (row // seq_len) * stride_b + (row % seq_len) * stride_s
        return tl.load(row_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)

    @triton.jit
    def _norm_modulate_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, codes_ptr, scales_ptr, seq_len, dim, scale_stride_b,
                              scale_stride_s, eps, top, HAS_SCALE: tl.constexpr, E4M3: tl.constexpr,
                              BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        y = _normalized_row(x_ptr, w_ptr, row, dim, eps, BLOCK)
        if HAS_SCALE:
            y = y * (1.0 + _adaln_row(scale_ptr, row, seq_len, scale_stride_b, scale_stride_s, dim, BLOCK))
        cols = tl.arange(0, BLOCK)
        if E4M3:  # the bf16 row the unfused path would write, quantized as quantize_rows would
            store_e4m3_row(y.to(x_ptr.dtype.element_ty), codes_ptr + row * dim, scales_ptr + row, cols, cols < dim,
                           top)
        else:
            tl.store(out_ptr + row * dim + cols, y.to(out_ptr.dtype.element_ty), mask=cols < dim)

    @triton.jit
    def _add_gated_norm_kernel(x_ptr, y_ptr, w_ptr, gate_ptr, out_ptr, seq_len, dim, gate_stride_b, gate_stride_s,
                               eps, HAS_GATE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        y = _normalized_row(y_ptr, w_ptr, row, dim, eps, BLOCK)
        if HAS_GATE:
            g = _adaln_row(gate_ptr, row, seq_len, gate_stride_b, gate_stride_s, dim, BLOCK)
            y = y * (2.0 * tl.sigmoid(2.0 * g) - 1.0)  # tanh(g)
        cols = tl.arange(0, BLOCK)
        mask = cols < dim
        x = tl.load(x_ptr + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * dim + cols, (x + y).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm_rotate(src, dst, w_ptr, cos, sin, n_heads, eps, factor, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
        """One token's heads [n_heads, HEAD_DIM] from src: RMS-normalized per head, pairs rotated, times factor
        (1, or an e4m3 code's scale), to dst."""
        heads = tl.arange(0, BLOCK_H)[:, None]
        offsets = heads * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
        mask = heads < n_heads
        x = tl.load(src + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + tl.cast(eps, tl.float32))
        x = x * rstd[:, None] * tl.load(w_ptr + tl.arange(0, HEAD_DIM)).to(tl.float32)[None, :]
        even, odd = tl.split(tl.reshape(x, (BLOCK_H, HEAD_DIM // 2, 2)))
        rotated = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (BLOCK_H, HEAD_DIM))
        tl.store(dst + offsets, (rotated * factor).to(dst.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)

    @triton.jit
    def _bound_factor(w_ptr, top_over_root, HEAD_DIM: tl.constexpr):
        """qk_norm_e4m3's factor for a head norm's weight: top / (sqrt(HEAD_DIM) * max |w|)."""
        w_max = tl.max(tl.abs(tl.load(w_ptr + tl.arange(0, HEAD_DIM)).to(tl.float32)), axis=0)
        return tl.math.div_rn(tl.cast(top_over_root, tl.float32), tl.maximum(w_max, 1e-12))

    @triton.jit
    def _qk_norm_rope_kernel(qkv_ptr, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr, out_ptr, v_amax_ptr, descale_ptr, n_tokens,
                             seq_len, n_heads, rope_stride_b, rope_stride_s, q_eps, k_eps, top_over_root, top,
                             HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, E4M3: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        width = n_heads * HEAD_DIM
        pairs = tl.arange(0, HEAD_DIM // 2)[None, :]
        rope = (token // seq_len) * rope_stride_b + (token % seq_len) * rope_stride_s + pairs
        cos = tl.load(cos_ptr + rope).to(tl.float32)
        sin = tl.load(sin_ptr + rope).to(tl.float32)
        src = qkv_ptr + token * 3 * width
        dst = out_ptr + token * width
        if E4M3:  # qk_norm_e4m3: q, k and v as e4m3 codes, and their three scales
            q_factor = _bound_factor(q_w_ptr, top_over_root, HEAD_DIM)
            k_factor = _bound_factor(k_w_ptr, top_over_root, HEAD_DIM)
            v_factor = tl.math.div_rn(tl.cast(top, tl.float32),
                                      tl.maximum(tl.load(v_amax_ptr).to(tl.float32), 1e-12))
            heads = tl.arange(0, BLOCK_H)[:, None]
            offsets = heads * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
            v = tl.load(src + 2 * width + offsets, mask=heads < n_heads, other=0.0).to(tl.float32)
            tl.store(dst + 2 * n_tokens * width + offsets, (v * v_factor).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
                     mask=heads < n_heads)
            if token == 0:
                tl.store(descale_ptr, tl.math.div_rn(1.0, q_factor))
                tl.store(descale_ptr + 1, tl.math.div_rn(1.0, k_factor))
                tl.store(descale_ptr + 2, tl.math.div_rn(1.0, v_factor))
        else:
            q_factor = 1.0
            k_factor = 1.0
        _norm_rotate(src, dst, q_w_ptr, cos, sin, n_heads, q_eps, q_factor, HEAD_DIM, BLOCK_H)
        _norm_rotate(src + width, dst + n_tokens * width, k_w_ptr, cos, sin, n_heads, k_eps, k_factor, HEAD_DIM,
                     BLOCK_H)

    @triton.jit
    def _swiglu_rows_kernel(a_ptr, b_ptr, codes_ptr, scales_ptr, width, top, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        a = tl.load(a_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
        y = (a * tl.sigmoid(a) * b).to(a_ptr.dtype.element_ty)  # the bf16 row the unfused kernel would write
        store_e4m3_row(y, codes_ptr + row * width, scales_ptr + row, cols, mask, top)

    @triton.jit
    def _swiglu_kernel(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        a = tl.load(a_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, (a * tl.sigmoid(a) * b).to(out_ptr.dtype.element_ty), mask=mask)
