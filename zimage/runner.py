"""How the forwards of one S3DiT run, decided once, when it is loaded; the network (model.py) is only the math.

A Runner checks a call's inputs, builds the positions and masks of each new input shape once (the sampler calls
with the same shapes every step), makes sure once per process that the Triton kernels run here (kernels.py),
streams in the block weights that sit in host memory (streaming.py), replays CUDA graphs (cuda_graphs.py), and
holds the memory graphs and streaming keep between forwards until release_buffers(), and splits a forward across
the processes of a torch.distributed group (parallel.py). Whatever else comes to change how forwards run plugs in
here, not into the network.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .control import ControlHints
from .cuda_graphs import GraphedForward, capture_blocker
from .kernels import check_kernels
from .model import S3DiT
from .blocks import SelfAttention
from .omni import Reference
from .parallel import BatchShare, SequenceShare, UlyssesAttention, padded_heads
from .sequence import layout_key, sequence_layout
from .streaming import WeightStreamer


class Runner:
    def __init__(self, model: S3DiT, cuda_graphs: bool = False, compile: bool = False,
                 share: SequenceShare | BatchShare | None = None):
        """cuda_graphs: replay each input shape's forward as one CUDA graph (cuda_graphs.py): the same kernels on
        the same inputs, launched at once instead of one by one. Used for prompts without reference images when
        every weight is on the CUDA device the inputs are on; otherwise forwards run as usual. Not over compiled
        blocks: they are no faster than the fused eager blocks, so there is nothing to combine them for (an early
        test that once found replays over them differing from a separately compiled model was not reproduced,
        bench/results/NOTES.md). Not under an allocator that cannot capture them (capture_blocker): then it says
        so, once, and forwards run as usual.
        compile: torch.compile every block. Blocks share their code, so a graph compiled for one serves every
        block of its kind and sequence length. Since the norms, RoPE, modulation and gates run as fused kernels
        (fused.py), which compiled graphs call as they are, this measured no faster on an H100 and gives the
        eager result bit for bit (bench/results).
        share: split each forward across the processes of a torch.distributed group (parallel.py); every process
        calls with the same inputs and gets the whole velocity. SequenceShare.of(group): this process computes its
        share of the tokens, and the model's blocks then attend across the processes (run it through this Runner
        only); prompts without reference images or ControlNets, no CUDA graphs yet (the collectives were not
        captured). BatchShare.of(group): this process computes its share of the samples as a whole forward of its
        own (everything this Runner runs, CUDA graphs included), then the velocities are gathered: with guidance,
        the positive and the negative pass on two processes (CFG parallel)."""
        self.model = model
        self.share = share
        if isinstance(share, SequenceShare):
            padded_heads(model.cfg.n_heads, share.count)  # refuses more processes than heads
            attention = UlyssesAttention(model.attention, share)
            for module in model.modules():
                if isinstance(module, SelfAttention):
                    module.attend = attention
        self.graphs: GraphedForward | None = None
        self.streamer: WeightStreamer | None = None
        self.layout_key = self.layout = None
        self.graphs_off: str | None = None  # why CUDA graphs, asked for, are not used
        if compile:
            _compile_blocks(model)
        if cuda_graphs:
            self.graphs_off = ("the blocks are compiled" if compile else
                               "the forward is split across processes" if isinstance(share, SequenceShare)
                               else capture_blocker())
            if self.graphs_off is None:
                self.graphs = GraphedForward()
            elif not compile:
                logging.warning(f"Z-Image: CUDA graphs are off: {self.graphs_off}.")

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __call__(self, latents: torch.Tensor, sigma: torch.Tensor, caption_feats: list,
                 references: list[list[Reference]] | None = None,
                 control: list[ControlHints] | None = None) -> torch.Tensor:
        """S3DiT.forward's velocity for these inputs, run as this runner runs forwards. control: ControlNets whose
        hints are added to the image tokens (control.py), in order."""
        if not isinstance(self.share, BatchShare):
            return self._forward(latents, sigma, caption_feats, references, control)
        self.model.check_inputs(latents, sigma, caption_feats, references)
        mine = self.share.samples(len(latents))
        if mine is None:  # a batch that does not split: computed whole by every process
            return self._forward(latents, sigma, caption_feats, references, control)
        control = [ControlHints(h.net, h.latent[mine] if len(h.latent) > 1 else h.latent, h.strength)
                   for h in control or ()]
        return self.share.gather(self._forward(latents[mine], sigma[mine], caption_feats[mine],
                                               references[mine] if references is not None else None, control))

    def _forward(self, latents, sigma, caption_feats, references, control) -> torch.Tensor:
        model = self.model
        model.check_inputs(latents, sigma, caption_feats, references)
        if control and references is not None:
            raise ValueError("a ControlNet and reference images in one forward: the Fun ControlNets are made for "
                             "Z-Image-Turbo's text-to-image sequence; use one or the other")
        if isinstance(self.share, SequenceShare) and (control or references is not None):
            raise ValueError("a forward split across processes takes prompts without ControlNets or reference "
                             "images for now: run those in one process")
        device = latents.device
        check_kernels(device, model.dtype)
        key = layout_key(latents, caption_feats, references)
        if key != self.layout_key:
            self.layout = sequence_layout(model.cfg, latents, caption_feats, references,
                                          self.share if isinstance(self.share, SequenceShare) else None)
            self.layout_key = key
        layout, blocks = self.layout, self._blocks(device)
        control = control or []
        n_captions = len(caption_feats)

        def forward(x, s, *rest):
            # the control latents and strengths are inputs like the latents: a graph replays with new ones
            captions, hinted = list(rest[:n_captions]), blocks
            for hints, latent, strength in zip(control, rest[n_captions::2], rest[n_captions + 1::2]):
                hinted = ControlHints(hints.net, latent, strength).blocks(model, hinted)
            return model(x, s, captions, references, layout=layout, blocks=hinted)

        inputs = [latents, sigma, *caption_feats]
        for hints in control:
            inputs += [hints.latent.to(device), torch.full((), hints.strength, device=device)]
        try:
            weights = self._graph_weights(device, control) if references is None else None
            if weights is None:
                return forward(*inputs)
            return self.graphs(forward, inputs, weights, keep=layout)
        finally:
            if self.streamer is not None:  # an exception inside a streamed block leaves its weights swapped
                self.streamer.restore()

    def stream_weights(self, device) -> None:
        """Run on `device` (CUDA) holding about five blocks' weights there (the first of each stack and two
        buffers): the other blocks' weights go to pinned host memory, and each forward copies them in one
        block ahead of use, overlapping compute (streaming.py). For cards smaller than the model."""
        stacks = self.model.block_stacks()
        for stack in stacks:
            for i, block in enumerate(stack):
                for p in block.parameters():
                    # the first block of each stack computes while the second is copied in
                    p.data = p.data.to(device) if i == 0 else p.data.to("cpu").pin_memory()
        for module in self.model.children():
            if all(module is not stack for stack in stacks):
                module.to(device)
        for p in self.model.parameters(recurse=False):  # the pad tokens
            p.data = p.data.to(device)

    def release_buffers(self) -> None:
        """Give back the GPU memory forwards keep from call to call: the CUDA graphs and the weight-streaming
        buffers. The next forward makes them anew."""
        if self.graphs is not None:
            self.graphs.clear()
        if self.streamer is not None:
            self.streamer.release()

    def _blocks(self, device: torch.device):
        """How each stack's blocks run on `device`: weights a host left in CPU memory stream in."""
        if device.type != "cuda":
            return iter
        if self.streamer is None or self.streamer.device != device:
            self.streamer = WeightStreamer(device)
        return self.streamer.run

    def _graph_weights(self, device: torch.device, control: list[ControlHints]) -> list[torch.Tensor] | None:
        """Every weight a forward reads (the ControlNets' too), when forwards replay as CUDA graphs here: graphs on,
        and all of those weights on `device`."""
        if self.graphs is None or device.type != "cuda":
            return None
        weights = list(self.model.parameters())
        for hints in control:
            weights += list(hints.net.parameters())
        return weights if all(w.device == device for w in weights) else None


def _compile_blocks(model: nn.Module) -> None:
    # one graph per (block kind, sequence length, mask): many more than the default 8 over a session of
    # different image sizes, and running past the limit would silently fall back to eager
    dynamo = torch._dynamo.config
    setattr(dynamo, "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit", 256)
    for stack in model.block_stacks():
        for block in stack:
            block.compile(dynamic=False)
