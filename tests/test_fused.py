"""The fused steps of a block (zimage/fused.py) against their formulas, written out here in float64.

(FP8 quantization has its own kernel, checked on the GPU only, in tests/test_gpu.py: the interpreter's e4m3
casts do not round as the hardware's do.)

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
    pytest.importorskip("triton", reason="Triton is not installed with this PyTorch (it comes with Linux builds)")
    script = ("import json, torch, test_fused; from zimage import kernels; "
              "assert kernels.INTERPRETED and kernels.triton_runs(torch.zeros(1)); "
              "print(json.dumps(test_fused.relative_errors('cpu', torch.float32)))")
    here = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(here), str(here.parent)]))
    result = subprocess.run([sys.executable, "-c", script], cwd=here, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(errors) == len(relative_errors("cpu", torch.float32))
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: no CUDA device on this machine")
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_triton_kernels_compute_the_formulas_on_cuda(dtype, tolerance):
    kernels.check_kernels(torch.device("cuda"), torch.bfloat16)
    assert kernels.TRITON_WORKS, "Triton cannot run its kernels on this machine"
    errors = relative_errors("cuda", dtype)
    assert max(errors.values()) < tolerance, errors
