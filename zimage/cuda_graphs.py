"""CUDA graphs: the whole forward as one launch.

A forward queues about a thousand kernels; between them the GPU waits on Python. The sampler calls the
transformer with the same shapes at every step, so the first call at a shape runs as usual (choosing cuDNN
plans, building the RoPE tables) and is then captured into a CUDA graph; every later call copies its inputs into the graph's own input tensors and replays it. The
kernels and their inputs are the same, so the result is too.

A graph reads the weights at the addresses they had when it was captured: the graphs are dropped as soon
as any weight has moved or been replaced (a host offloading the model, a LoRA patch swapping a tensor).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch


def capture_blocker() -> str | None:
    """Why this process cannot capture the forward, or None. Under PyTorch's cudaMallocAsync allocator (ComfyUI's
    default on NVIDIA GPUs) a capture hands the kernels stream-ordered memory that Triton's launcher cannot
    resolve, so the fused kernels refuse it mid-capture, and the broken capture leaves allocations that abort
    the process at exit (seen on an H100 inside ComfyUI 0.14's executor, tests/test_gpu_host.py)."""
    if torch.cuda.get_allocator_backend() == "cudaMallocAsync":
        return ("PyTorch runs its cudaMallocAsync allocator (ComfyUI's default on NVIDIA GPUs), under which the "
                "fused Triton kernels cannot be captured; start ComfyUI with --disable-cuda-malloc to use them")
    return None


class CapturedForward:
    """One shape's graph with its static inputs and output."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], pool, keep):
        self.inputs = [t.clone() for t in inputs]
        self.keep = keep  # tensors the graph reads that its caller built outside it (positions, masks)
        self.graph = torch.cuda.CUDAGraph()
        # Captured on a side stream, as CUDA requires. Not through torch.cuda.graph(), which empties the
        # allocator's cache first: a host such as ComfyUI keeps that memory on purpose.
        caller = torch.cuda.current_stream()
        stream = torch.cuda.Stream(caller.device)
        stream.wait_stream(caller)
        with torch.cuda.stream(stream):
            # thread_local: a host's other threads may use CUDA meanwhile without breaking the capture
            self.graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                self.output = fn(*self.inputs)
            except BaseException:
                # end the broken capture, but raise what stopped it (a host's interruption must get through)
                try:
                    self.graph.capture_end()
                except RuntimeError:
                    pass
                raise
            self.graph.capture_end()
        caller.wait_stream(stream)

    def replay(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        for static, t in zip(self.inputs, inputs):
            static.copy_(t)
        self.graph.replay()
        return self.output.clone()  # the next replay overwrites the graph's output


class GraphedForward:
    """Graphs of one function, one per input shape, sharing one memory pool: they never run at once, and each
    output is copied out before another replay."""

    def __init__(self):
        self.graphs: dict[tuple, CapturedForward | None] = {}  # None: capture failed, run it as usual
        self.weights: tuple[int, ...] = ()
        self.pool = None

    def __call__(self, fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], weights: list[torch.Tensor],
                 keep=None) -> torch.Tensor:
        """fn(*inputs) -> a tensor, reading `weights` (all on the inputs' CUDA device) and `keep`."""
        addresses = tuple(w.data_ptr() for w in weights)
        if addresses != self.weights:
            self.clear()
            self.weights = addresses
        key = tuple((t.shape, t.dtype, t.device) for t in inputs)
        if key in self.graphs:
            graph = self.graphs[key]
            return fn(*inputs) if graph is None else graph.replay(inputs)
        out = fn(*inputs)  # outside the capture: picks kernels and plans, allocates lookups
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        try:
            graph = CapturedForward(fn, inputs, self.pool, keep)
        except BaseException as e:
            if all(g is None for g in self.graphs.values()):
                self.pool = None  # the broken graph was the pool's only user and took the pool with it
            if not isinstance(e, RuntimeError):
                raise  # a host's interruption, say: not a capture problem
            # an operation that cannot be captured: this shape runs as usual
            logging.warning(f"Z-Image: CUDA graph capture failed, running without it at this shape: {e}")
            graph = None
        self.graphs[key] = graph
        return out

    def clear(self) -> None:
        self.graphs.clear()
        self.weights = ()
        self.pool = None
