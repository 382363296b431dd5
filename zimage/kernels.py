"""Whether this process runs the engine's Triton kernels (fused.py, fp8.py), decided once, for all of them.

A Triton install can be broken (it builds its launcher with the system's C compiler and the Python headers,
which some machines lack), and older GPUs lack what some kernels use. Before the first CUDA forward,
check_kernels runs every kernel once on small tensors; where any of them fails, every Triton path gives way to
its PyTorch steps, slower, after one warning, rather than every generation failing. Each module of kernels
registers the calls that exercise them (@smoke_test). Triton's interpreter (TRITON_INTERPRET=1) runs the
kernels on CPU tensors, which is how the CPU tests check them against their formulas.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # PyTorch on Windows or macOS comes without Triton
    triton = tl = None

# the interpreter runs kernels on CPU tensors
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# whether Triton builds and launches kernels in this process: None until check_kernels has tried
TRITON_WORKS: bool | None = None
# whether the kernels that write e4m3 codes run too (fused.py's e4m3 outputs; Ada and newer): newer code than the
# rest, checked apart so that where they fail only they give way (to quantization in separate passes)
E4M3_WORKS: bool | None = None
SMOKE_TESTS: list[Callable[[torch.device, torch.dtype], None]] = []
E4M3_SMOKE_TESTS: list[Callable[[torch.device, torch.dtype], None]] = []


def triton_runs(x: torch.Tensor) -> bool:
    """Whether x's kernels run in Triton: CUDA tensors once check_kernels has seen Triton work, or any tensor
    under the interpreter."""
    return triton is not None and ((x.is_cuda and bool(TRITON_WORKS)) or INTERPRETED)


def e4m3_kernels_run(x: torch.Tensor) -> bool:
    """Whether the kernels that write e4m3 codes run for x (as triton_runs, and check_kernels saw them work)."""
    return triton_runs(x) and (INTERPRETED or bool(E4M3_WORKS))


def smoke_test(run: Callable[[torch.device, torch.dtype], None]):
    """Register run(device, dtype), which calls a module's kernels once on small tensors, with check_kernels."""
    SMOKE_TESTS.append(run)
    return run


def e4m3_smoke_test(run: Callable[[torch.device, torch.dtype], None]):
    """Register run(device, dtype) for the kernels that write e4m3 codes (run where FP8 GEMMs run)."""
    E4M3_SMOKE_TESTS.append(run)
    return run


def check_kernels(device: torch.device, dtype: torch.dtype) -> None:
    """Build and run every registered kernel once on `device` in `dtype`, once per process (the Runner calls this
    before each forward; after the first it returns at once)."""
    global TRITON_WORKS, E4M3_WORKS
    if TRITON_WORKS is not None or triton is None or device.type != "cuda":
        return
    TRITON_WORKS = True  # so that the calls below take their kernels
    try:
        for run in SMOKE_TESTS:
            run(device, dtype)
    except Exception as e:  # whatever Triton raised: its compiler's, the driver's
        logging.warning(f"Z-Image: Triton cannot run its kernels here ({type(e).__name__}: {str(e)[:300]}); "
                        f"running the unfused PyTorch steps, which are slower. A C compiler and the Python "
                        f"development headers are what Triton usually lacks.")
        TRITON_WORKS = False
        return
    if torch.cuda.get_device_capability(device) < (8, 9):  # no e4m3 on the GPU, and no FP8 path uses them
        E4M3_WORKS = False
        return
    E4M3_WORKS = True
    try:
        for run in E4M3_SMOKE_TESTS:
            run(device, dtype)
    except Exception as e:
        logging.warning(f"Z-Image: Triton cannot run the kernels that write e4m3 codes here ({type(e).__name__}: "
                        f"{str(e)[:300]}); the FP8 paths quantize in separate passes, a little slower.")
        E4M3_WORKS = False
