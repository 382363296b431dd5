"""Can a Triton kernel be captured in a CUDA graph under PyTorch's cudaMallocAsync allocator (ComfyUI's default)?

One kind of argument per run, since a failed capture leaves the process unable to capture again:
  tensor   the kernel takes tensors (as the engine's kernels do today);
  address  it takes their addresses as integers and makes pointers of them in the kernel.
Each prints whether the capture worked, whether a replay computes the right values, and the kernel's time eager
and replayed, on a 64M-element bf16 tensor (a lost vectorization would show as a slower address kernel).

    python bench/probe_capture.py tensor; python bench/probe_capture.py address
"""

from __future__ import annotations

import os
import sys

os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "backend:cudaMallocAsync"  # before torch is imported

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

BLOCK = 4096


@triton.jit
def _double_tensor(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=inside) * 2, mask=inside)


@triton.jit
def _double_address(x_address, y_address, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    x_ptr, y_ptr = x_address.to(tl.pointer_type(DTYPE)), y_address.to(tl.pointer_type(DTYPE))
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=inside) * 2, mask=inside)


def step(kind: str, x: torch.Tensor) -> torch.Tensor:
    shifted = x + 1  # allocated inside the capture, as a forward's activations are
    out = torch.empty_like(shifted)
    grid = (triton.cdiv(shifted.numel(), BLOCK),)
    if kind == "tensor":
        _double_tensor[grid](shifted, out, shifted.numel(), BLOCK=BLOCK)
    else:
        _double_address[grid](shifted.data_ptr(), out.data_ptr(), shifted.numel(), DTYPE=tl.bfloat16, BLOCK=BLOCK)
    return out


def median_ms(fn, iters: int = 21) -> float:
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[iters // 2]


def main():
    kind = sys.argv[1] if len(sys.argv) > 1 else "address"
    print(f"allocator {torch.cuda.get_allocator_backend()}, triton {triton.__version__}, {kind} arguments")
    x = torch.randn(64 << 20, device="cuda", dtype=torch.bfloat16)
    print(f"eager: {median_ms(lambda: step(kind, x)):.4f} ms")
    side = torch.cuda.Stream()  # warm up off the default stream, as torch.cuda.graph expects
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(kind, x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = step(kind, x)
    except Exception as e:
        print(f"capture FAILED: {type(e).__name__}: {str(e)[:200]}")
        return
    x.copy_(torch.randn_like(x))
    graph.replay()
    print(f"captured; replay equal to eager: {torch.equal(out, (x + 1) * 2)}; "
          f"replayed: {median_ms(graph.replay):.4f} ms")


if __name__ == "__main__":
    main()
