"""Weight streaming: run the 6B model on a card that cannot hold it.

The first block of each stack stays on the device, so each stack starts computing while its second block
is copied in. The other blocks' weights stay in pinned host memory. Two device buffers, each the size of the largest block,
take turns: while block i computes from one, a side stream copies block i+1 into the other. Each block
is run with its parameters pointed at its buffer and pointed back at host memory right after its kernels
are queued, so the model's state dict always holds the real weights. The forward then costs about the
host-to-device transfer of the weights, with the compute hidden under it.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class WeightStreamer:
    """Streams the blocks of several stacks (ModuleLists) through one pair of device buffers."""

    def __init__(self, stacks: list[nn.ModuleList], device: torch.device):
        self.device = torch.device(device)
        # per block: (parameter, pinned host tensor, offset into a buffer, numel)
        self.layouts: dict[nn.Module, list[tuple[nn.Parameter, torch.Tensor, int, int]]] = {}
        largest, dtype = 0, None
        for block in (b for stack in stacks for b in stack[1:]):
            layout, offset = [], 0
            for p in block.parameters():
                if dtype is not None and p.dtype != dtype:
                    raise ValueError("weight streaming needs the blocks' weights in one dtype (stream bf16 weights, "
                                     "without FP8 matmuls)")
                dtype = p.dtype
                host = p.data.to("cpu").pin_memory()
                p.data = host
                layout.append((p, host, offset, p.numel()))
                offset += p.numel()
            self.layouts[block] = layout
            largest = max(largest, offset)
        for stack in stacks:
            if len(stack):
                stack[0].to(self.device)
        self.buffers = [torch.empty(largest, dtype=dtype, device=self.device) for _ in range(2)]
        self.copy_stream = torch.cuda.Stream(self.device)
        self.loaded = [torch.cuda.Event() for _ in range(2)]  # the copy into buffer k is done
        # the block that last used buffer k is done; never recorded before the first use, and waiting on an
        # unrecorded event returns at once
        self.freed = [torch.cuda.Event() for _ in range(2)]
        self.slot = 0

    def bytes_per_forward(self) -> int:
        return sum(host.numel() * host.element_size() for layout in self.layouts.values() for _, host, _, _ in layout)

    def _prefetch(self, block: nn.Module, slot: int) -> None:
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.freed[slot])
            buffer = self.buffers[slot]
            for _, host, offset, n in self.layouts[block]:
                buffer[offset: offset + n].copy_(host.view(-1), non_blocking=True)
            self.loaded[slot].record(self.copy_stream)

    def run(self, stack: nn.ModuleList):
        """Yield each block of `stack` ready to run on the device; the next block's copy overlaps its compute."""
        compute = torch.cuda.current_stream(self.device)
        streamed = [block for block in stack if block in self.layouts]
        if streamed:
            self._prefetch(streamed[0], self.slot)  # copied while the resident first block computes
        n = 0
        for block in stack:
            if block not in self.layouts:
                yield block
                continue
            slot, self.slot = self.slot, 1 - self.slot
            n += 1
            if n < len(streamed):
                self._prefetch(streamed[n], self.slot)
            compute.wait_event(self.loaded[slot])
            buffer = self.buffers[slot]
            for p, host, offset, size in self.layouts[block]:
                p.data = buffer[offset: offset + size].view(host.shape)
            yield block
            # the block's kernels are queued: its buffer is free once they finish; the parameters go home now
            self.freed[slot].record(compute)
            for p, host, _, _ in self.layouts[block]:
                p.data = host
