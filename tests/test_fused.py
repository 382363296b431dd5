"""The fused steps of a block (zimage/fused.py) against their formulas, written out here in float64.

(FP8 quantization of a GEMM's rows has its own kernel, checked on the GPU only, in tests/test_gpu.py: the
interpreter's e4m3 casts do not round as the hardware's do. qk_norm_e4m3's codes are checked here against their
formula on the CPU path exactly, under the interpreter within e4m3's rounding, and on the GPU in test_gpu.py.)

Three ways they run: plain PyTorch (the CPU path), the Triton kernels under Triton's interpreter on the CPU
(in a process of its own: the interpreter is chosen when Triton first builds a kernel), and the Triton
kernels on the GPU. The shapes are awkward on purpose: widths that are not powers of two, three heads (the
kernel tiles four), per-token modulation (Omni), RoPE tables shared by the batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zimage import fused, kernels
from zimage.blocks import RMSNorm
from zimage.rope import inverse_frequencies, rope_angles


def _norm(dim: int, eps: float, g: torch.Generator) -> RMSNorm:
    norm = RMSNorm(dim, eps)
    norm.weight.data = 1 + 0.2 * torch.randn(dim, generator=g)
    return norm


def _rms(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.double(), sin.double()
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def cases(device: str, dtype: torch.dtype):
    """(name, the fused call, its float64 result) for each step and awkward shape."""
    g = torch.Generator().manual_seed(0)
    batch, seq, heads = 2, 9, 3

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    out = []
    for dim in (48, 80):
        norm = _norm(dim, 1e-5, g).to(device, dtype)
        x, y = rand(batch, seq, dim), rand(batch, seq, dim)
        shared = rand(batch, 1, 4 * dim).chunk(4, dim=-1)  # adaLN chunks: strided views, one row per sample
        per_token = rand(batch, seq, 4 * dim).chunk(4, dim=-1)  # Omni: one row per token
        for label, (scale, gate) in (("shared", shared[:2]), ("per token", per_token[2:]), ("none", (None, None))):
            out.append((f"norm_modulate dim {dim} {label}", fused.norm_modulate(x, norm, scale),
                        _rms(x, norm) * (1 if scale is None else 1 + scale.double())))
            out.append((f"add_gated_norm dim {dim} {label}", fused.add_gated_norm(x, y, norm, gate),
                        x.double() + _rms(y, norm) * (1 if gate is None else gate.double().tanh())))
        out.append((f"swiglu dim {dim}", fused.swiglu(x, y), torch.nn.functional.silu(x.double()) * y.double()))

    for head_dim, axes, rope_batch in ((16, (4, 6, 6), batch), (16, (4, 6, 6), 1), (24, (6, 8, 10), batch)):
        q_norm, k_norm = _norm(head_dim, 1e-5, g).to(device, dtype), _norm(head_dim, 1e-6, g).to(device, dtype)
        qkv = rand(batch, seq, 3 * heads * head_dim)
        positions = torch.randint(0, 60, (rope_batch, seq, 3), generator=g).float()
        cos, sin = (t.unsqueeze(-2).to(device) for t in rope_angles(positions, inverse_frequencies(axes, 256.0)))
        q, k = fused.qk_norm_rope(qkv, heads, q_norm, k_norm, cos, sin)
        q_ref, k_ref, _ = qkv.double().unflatten(-1, (3, heads, head_dim)).unbind(2)
        name = f"qk_norm_rope head {head_dim} rope batch {rope_batch}"
        out.append((f"{name} q", q, _rotate(_rms(q_ref, q_norm), cos, sin)))
        out.append((f"{name} k", k, _rotate(_rms(k_ref, k_norm), cos, sin)))
    return out


def e4m3_cases(device: str, dtype: torch.dtype):
    """(name, codes, scales, q k v in float64, the scales in float64) of qk_norm_e4m3 for awkward shapes."""
    g = torch.Generator().manual_seed(1)
    batch, seq, heads = 2, 9, 3
    out = []
    for head_dim, axes, rope_batch, v_size in ((16, (4, 6, 6), batch, 3.0), (16, (4, 6, 6), 1, 1e-3), (32, (8, 12, 12), 1, 40.0)):
        q_norm, k_norm = _norm(head_dim, 1e-5, g), _norm(head_dim, 1e-6, g)
        k_norm.weight.data *= 3  # the bound follows each weight
        q_norm, k_norm = q_norm.to(device, dtype), k_norm.to(device, dtype)
        qkv = torch.randn(batch, seq, 3, heads * head_dim, generator=g)
        qkv[:, :, 2] *= v_size  # v's scale follows its largest magnitude
        qkv = qkv.flatten(2).to(device, dtype)
        positions = torch.randint(0, 60, (rope_batch, seq, 3), generator=g).float()
        cos, sin = (t.unsqueeze(-2).to(device) for t in rope_angles(positions, inverse_frequencies(axes, 256.0)))
        codes, scales = fused.qk_norm_e4m3(qkv, heads, q_norm, k_norm, cos, sin)
        q, k, v = qkv.double().unflatten(-1, (3, heads, head_dim)).unbind(2)
        expected = torch.stack((_rotate(_rms(q, q_norm), cos, sin), _rotate(_rms(k, k_norm), cos, sin), v)).cpu()
        top = torch.finfo(torch.float8_e4m3fn).max * (1 - 2**-8)
        bound = head_dim ** 0.5
        expected_scales = torch.stack((bound * q_norm.weight.double().abs().max() / top,
                                       bound * k_norm.weight.double().abs().max() / top,
                                       v.abs().max() / top)).cpu()
        out.append((f"qk_norm_e4m3 head {head_dim} rope batch {rope_batch} v x{v_size}", codes.cpu(), scales.cpu(),
                    expected, expected_scales))
    return out


def e4m3_report(device: str, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """Per case: the scales' largest relative error, the dequantized codes' relative error against the formula,
    the share of codes that are not the formula's own rounding, and the largest code step between them."""
    report = {}
    with torch.no_grad():
        for name, codes, scales, expected, expected_scales in e4m3_cases(device, dtype):
            assert codes.dtype == torch.float8_e4m3fn and codes.shape == expected.shape, name
            assert scales.dtype == torch.float32 and scales.shape == (3,), name
            rounded = (expected / scales.double()[:, None, None, None, None]).float().to(torch.float8_e4m3fn)
            steps = (codes.view(torch.uint8).int() - rounded.view(torch.uint8).int()).abs()
            dequantized = codes.double() * scales.double()[:, None, None, None, None]
            report[name] = {"scales": ((scales.double() - expected_scales).abs() / expected_scales).max().item(),
                            "values": ((dequantized - expected).norm() / expected.norm()).item(),
                            "not rounded": (steps != 0).double().mean().item(), "largest step": steps.max().item(),
                            "largest code": codes.float().abs().max().item()}
    return report


def test_e4m3_codes_of_q_k_v_are_their_formula_rounded():
    """The plain PyTorch path: the scales are the bounds (q, k) and the largest magnitude (v) over the top code;
    each code is the float64 formula's value over its scale, rounded to e4m3 (a float32 step away at most)."""
    for name, r in e4m3_report("cpu", torch.float32).items():
        assert r["scales"] < 1e-6, (name, r)
        assert r["largest step"] <= 1 and r["not rounded"] < 0.002, (name, r)
        assert 0.01 < r["values"] < 0.04, (name, r)  # e4m3 keeps 3 mantissa bits: a few percent, never exact
        assert r["largest code"] <= 448, (name, r)


def e4m3_rows_mismatches(device: str) -> dict[str, list[int]]:
    """Per producer and shape, [codes that differ, scales that differ] between the producer's own e4m3 rows
    (e4m3=True) and quantize_rows of the bf16 output it writes otherwise: the fused path must be the same numbers."""
    from zimage.fp8 import E4M3Rows, quantize_rows

    g = torch.Generator().manual_seed(2)
    batch, seq = 2, 9

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, torch.bfloat16)

    out = {}

    def compare(name, rows, plain):
        codes, scale = quantize_rows(plain)
        assert isinstance(rows, E4M3Rows) and rows.dtype == torch.bfloat16, name
        out[name] = [int((rows.codes.view(torch.uint8) != codes.view(torch.uint8)).sum()),
                     int((rows.scale != scale).sum())]

    for dim in (48, 80):
        norm = _norm(dim, 1e-5, g).to(device, torch.bfloat16)
        x = rand(batch, seq, dim, scale=5.0)
        x[0, 3] = 0  # a zero row: the smallest scale, no division by zero
        shared = rand(batch, 1, 4 * dim).chunk(4, dim=-1)[0]
        per_token = rand(batch, seq, 4 * dim).chunk(4, dim=-1)[2]
        for label, scale in (("shared", shared), ("per token", per_token), ("none", None)):
            compare(f"norm_modulate dim {dim} {label}", fused.norm_modulate(x, norm, scale, e4m3=True),
                    fused.norm_modulate(x, norm, scale))
        a, b = rand(batch, seq, dim, scale=3.0), rand(batch, seq, dim)
        compare(f"swiglu dim {dim}", fused.swiglu(a, b, e4m3=True), fused.swiglu(a, b))
    return out


def under_the_interpreter(call: str, module: str = "test_fused"):
    """<module>.<call>'s JSON result, computed in a process of its own where Triton's interpreter runs the kernels
    on CPU tensors (it is chosen when Triton first builds a kernel)."""
    pytest.importorskip("triton", reason="Triton is not installed with this PyTorch (it comes with Linux builds)")
    script = (f"import json, torch, {module}; from zimage import kernels; "
              "assert kernels.INTERPRETED and kernels.triton_runs(torch.zeros(1)); "
              f"print(json.dumps({module}.{call}))")
    here = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(here), str(here.parent)]))
    result = subprocess.run([sys.executable, "-c", script], cwd=here, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_producers_write_the_e4m3_rows_quantize_rows_makes_of_their_output():
    mismatches = e4m3_rows_mismatches("cpu")
    assert mismatches and all(m == [0, 0] for m in mismatches.values()), mismatches


def test_producer_kernels_under_the_interpreter_quantize_as_the_quantization_kernel():
    """Under the interpreter both sides are Triton kernels (quantize_rows' own, and the producers' fused
    quantization), so its e4m3 casts are the same on both: the codes and scales must be equal."""
    mismatches = under_the_interpreter("e4m3_rows_mismatches('cpu')")
    assert mismatches.keys() == e4m3_rows_mismatches("cpu").keys()
    assert all(m == [0, 0] for m in mismatches.values()), mismatches


def relative_errors(device: str, dtype: torch.dtype) -> dict[str, float]:
    errors = {}
    with torch.no_grad():
        for name, got, expected in cases(device, dtype):
            assert got.dtype == dtype and got.shape == expected.shape, name
            expected = expected.cpu()
            errors[name] = ((got.cpu().double() - expected).norm() / expected.norm()).item()
    return errors


def test_plain_pytorch_path_computes_the_formulas():
    errors = relative_errors("cpu", torch.float32)
    assert max(errors.values()) < 1e-6, errors


def test_triton_kernels_compute_the_formulas_under_the_interpreter():
    """The kernels themselves, run by Triton's interpreter on CPU tensors: the CPU machines (CI) check them."""
    errors = under_the_interpreter("relative_errors('cpu', torch.float32)")
    assert len(errors) == len(relative_errors("cpu", torch.float32))
    assert max(errors.values()) < 1e-6, errors


def test_e4m3_kernel_under_the_interpreter_writes_the_formula_within_e4m3_rounding():
    """qk_norm_e4m3's kernel under the interpreter: its scales as the formula's; its codes as the formula's
    rounding except where the interpreter's own e4m3 cast rounds a carry into the next binade one binade low
    (seen: 8 written as 4), so the codes are checked through their values, within e4m3's rounding."""
    report = under_the_interpreter("e4m3_report('cpu', torch.float32)")
    assert report.keys() == e4m3_report("cpu", torch.float32).keys()
    for name, r in report.items():
        assert r["scales"] < 1e-6, (name, r)
        assert r["not rounded"] < 0.05 and r["values"] < 0.08, (name, r)
        assert r["largest code"] <= 448, (name, r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: no CUDA device on this machine")
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_triton_kernels_compute_the_formulas_on_cuda(dtype, tolerance):
    kernels.check_kernels(torch.device("cuda"), torch.bfloat16)
    assert kernels.TRITON_WORKS, "Triton cannot run its kernels on this machine"
    errors = relative_errors("cuda", dtype)
    assert max(errors.values()) < tolerance, errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="GPU test: needs a CUDA device with FP8 (Ada or newer)")
def test_producer_kernels_on_cuda_quantize_as_the_quantization_kernel():
    kernels.check_kernels(torch.device("cuda"), torch.bfloat16)
    assert kernels.TRITON_WORKS, "Triton cannot run its kernels on this machine"
    assert kernels.E4M3_WORKS, "the kernels that write e4m3 codes do not run on this GPU"
    mismatches = e4m3_rows_mismatches("cuda")
    assert all(m == [0, 0] for m in mismatches.values()), mismatches
