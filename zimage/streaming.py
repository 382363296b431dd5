"""Weight streaming: run blocks whose weights sit in host memory, on a card that cannot hold them all.

Whatever left a block's parameters off the compute device (Runner.stream_weights, or a host's partial
loading such as ComfyUI's lowvram), they are copied in one block ahead of use, on a side stream, into one
of two device buffers that take turns: while block i computes from one, block i+1 is copied into the
other. Each block runs with those parameters pointed at its buffer and pointed back at host memory right
after its kernels are queued, so the model's state dict always holds the real weights. From pinned host
memory the copies overlap compute, and a fully streamed forward costs about the host-to-device transfer
of its weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn

ALIGN = 256  # bytes: every parameter's slice of a buffer starts aligned, whatever the dtypes before it


class WeightStreamer:
    """Streams the off-device parameters of a stack's blocks through two device buffers."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.copy_stream = torch.cuda.Stream(self.device)
        self.loaded = [torch.cuda.Event() for _ in range(2)]  # the copy into buffer k is done
        # the block that last used buffer k is done; waiting on an event never recorded returns at once
        self.freed = [torch.cuda.Event() for _ in range(2)]
        self.swapped: list[tuple[nn.Parameter, torch.Tensor]] = []  # parameters pointed at a buffer now
        # kept from stack to stack and forward to forward (allocating anew each time would make the allocator
        # free and sync under a tight memory cap); release() drops them
        self.buffers: list[torch.Tensor] = []

    def _plan(self, block: nn.Module) -> tuple[list[tuple[nn.Parameter, int]], int]:
        """The block's parameters off the device, each with its byte offset in a buffer; the bytes needed."""
        plan, size = [], 0
        for p in block.parameters():
            if p.device != self.device:
                plan.append((p, size))
                size += -(-p.nbytes // ALIGN) * ALIGN
        return plan, size

    def run(self, stack: nn.ModuleList):
        """Yield each block of `stack` ready to run on the device; the next streamed block's copy overlaps it.
        A caller that stops early (an exception in a block) calls restore()."""
        plans = [self._plan(block) for block in stack]
        streamed = [i for i, (plan, _) in enumerate(plans) if plan]
        if not streamed:
            yield from stack
            return
        compute = torch.cuda.current_stream(self.device)
        buffers = self._buffers(max(n for _, n in plans), compute)
        slot_of = {i: k % 2 for k, i in enumerate(streamed)}
        self._prefetch(plans[streamed[0]][0], buffers[0], 0)
        queued = 1
        for i, block in enumerate(stack):
            plan = plans[i][0]
            if not plan:
                yield block
                continue
            if queued < len(streamed):
                following = streamed[queued]
                self._prefetch(plans[following][0], buffers[slot_of[following]], slot_of[following])
                queued += 1
            slot = slot_of[i]
            compute.wait_event(self.loaded[slot])
            for p, offset in plan:
                self.swapped.append((p, p.data))
                p.data = buffers[slot][offset: offset + p.nbytes].view(p.dtype).view(p.shape)
            yield block
            # the block's kernels are queued: its buffer is free once they finish; the parameters go home now
            self.freed[slot].record(compute)
            self.restore()

    def _buffers(self, size: int, compute: torch.cuda.Stream) -> list[torch.Tensor]:
        if not self.buffers or self.buffers[0].numel() < size:
            self.buffers = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)]
            # their memory may have been freed by kernels still queued on the compute stream: the copies into
            # them start after those
            self.copy_stream.wait_stream(compute)
        return self.buffers

    def release(self) -> None:
        """Give the buffers' memory back; the next streamed forward allocates them again."""
        self.buffers = []

    def _prefetch(self, plan: list[tuple[nn.Parameter, int]], buffer: torch.Tensor, slot: int) -> None:
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.freed[slot])
            for p, offset in plan:
                buffer[offset: offset + p.nbytes].copy_(p.data.reshape(-1).view(torch.uint8), non_blocking=True)
            self.loaded[slot].record(self.copy_stream)

    def restore(self) -> None:
        """Point every parameter now on a buffer back at its host memory."""
        for p, host in self.swapped:
            p.data = host
        self.swapped.clear()
