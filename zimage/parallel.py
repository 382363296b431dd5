"""Sequence parallelism (Ulysses): one forward split across the processes of a torch.distributed group.

Each process computes an equal contiguous share of every stream's tokens (sequence.py pads the streams so that
the shares are equal, the extra tokens masked out of the keys). Everything in a block but attention works token
by token, so it runs on the share as it is. Attention needs every token: UlyssesAttention trades, in one
all-to-all, this process's tokens of every head for every process's tokens of a share of the heads, attends
over the whole sequence for those heads, and trades back. The final layer's output is gathered at the end
(SequenceShare.gather), so every process returns the whole velocity.

Only torch.distributed collectives (all_to_all_single, all_gather): the same code on gloo (CPU) and NCCL (GPU).
Starting the processes and their group (torch.multiprocessing, torchrun) is the caller's; a process that stalls
or dies makes the others' collectives fail after the group's timeout, with an error that says so.

Heads: the released models have 30 of them, which 2, 3, 5, 6, 10, 15 and 30 processes split evenly. For other
counts the heads are padded with zero heads to the next multiple and those are dropped after attention: any count
up to the number of heads runs, at the cost of the padded heads' share (4 processes: 32 heads for 30, about 7 %
more attention work and traffic), rather than refusing counts that machines commonly have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .attention import AttentionKernel


def padded_heads(n_heads: int, count: int) -> int:
    """The head count split over `count` processes: the next multiple of count (zero heads fill the rest)."""
    if count > n_heads:
        raise ValueError(f"{count} processes for a model of {n_heads} attention heads: each process needs at least "
                         f"one head; use at most {n_heads} processes")
    return -(-n_heads // count) * count


@dataclass(frozen=True)
class _Share:
    """This process's part (`index` of `count`) of the work of the processes of `group` (None: the default group);
    Share.of(group) is the calling process's."""

    index: int
    count: int
    group: dist.ProcessGroup | None = None

    @classmethod
    def of(cls, group: dist.ProcessGroup | None = None):
        if not dist.is_initialized():
            raise RuntimeError(f"{cls.__name__} needs a torch.distributed process group: call "
                               f"torch.distributed.init_process_group in every process first")
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    def _gather(self, what: str, part: torch.Tensor, dim: int) -> torch.Tensor:
        """Every process's `part` (all of one shape), concatenated along dim in process order."""
        part = part.contiguous()
        parts = [torch.empty_like(part) for _ in range(self.count)]
        self._collective(what, dist.all_gather, parts, part, group=self.group)
        return torch.cat(parts, dim=dim)

    def _collective(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except RuntimeError as e:  # gloo and NCCL raise RuntimeError (or subclasses) on timeouts and lost peers
            raise RuntimeError(f"Z-Image {self.kind}: process {self.index} of {self.count} failed {what}: "
                               f"another process has failed or stalled ({e})") from e


@dataclass(frozen=True)
class BatchShare(_Share):
    """Share `index` of `count` of a forward's samples, computed by this process: with classifier-free guidance
    the sampler's batch is [positive, negative], so two processes compute one pass each (CFG parallel). Each
    process runs its samples as one whole forward (masks only where its own captions differ in length), and every
    process returns the whole batch's velocity (gather)."""

    kind = "batch parallel"

    def samples(self, batch: int) -> slice | None:
        """This process's samples of a batch; None where the batch does not split into equal shares (a batch of 1,
        as ComfyUI's KSampler makes when the positive and negative captions differ in length): then every process
        computes the whole batch, as one process would, and nothing is gained."""
        if batch % self.count:
            return None
        n = batch // self.count
        return slice(self.index * n, (self.index + 1) * n)

    def gather(self, velocity: torch.Tensor) -> torch.Tensor:
        """[n, ...] of this process -> [count * n, ...], every process's samples in process order."""
        return self._gather("gathering the velocities", velocity, dim=0)


@dataclass(frozen=True)
class SequenceShare(_Share):
    """Share `index` of `count` of every stream's tokens, computed by this process of `group` (None: the default
    group). SequenceShare.of(group) is the share of the calling process."""

    kind = "sequence parallel"

    def tokens(self, length: int) -> slice:
        """This process's tokens of a stream of `length` tokens (a multiple of count)."""
        if length % self.count:
            raise ValueError(f"a stream of {length} tokens does not split into {self.count} equal shares")
        n = length // self.count
        return slice(self.index * n, (self.index + 1) * n)

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, n, ...] of this process -> [B, count * n, ...]: every process's tokens, in process order."""
        return self._gather("gathering the image tokens", tokens, dim=1)

    def all_to_all(self, what: str, x: torch.Tensor) -> torch.Tensor:
        """x [count, ...]: x[j] goes to process j; returns [count, ...] with [j] from process j."""
        x = x.contiguous()
        out = torch.empty_like(x)  # contiguous as x is now: the collective writes it as one block per process
        self._collective(what, dist.all_to_all_single, out, x, group=self.group)
        return out


class UlyssesAttention(AttentionKernel):
    """attention(q, k, v, key_mask) as Attention's, q, k, v [B, H, s, D] holding this process's share of the
    sequence; key_mask [B, 1, 1, count * s] covers every process's tokens in process order (sequence.py)."""

    def __init__(self, attention: AttentionKernel, share: SequenceShare):
        self.attention = attention
        self.share = share

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None):
        n = self.share.count
        heads, s = q.shape[1], q.shape[2]
        qkv = torch.stack((q, k, v))  # [3, B, H, s, D]
        qkv = F.pad(qkv, (0, 0, 0, 0, 0, padded_heads(heads, n) - heads))
        # [count, 3, B, H / count, s, D]: process j gets the j-th group of heads of these tokens
        qkv = self.share.all_to_all("trading q, k, v", qkv.unflatten(2, (n, -1)).movedim(2, 0))
        # [3, B, H / count, count * s, D]: these heads for every process's tokens, in process order
        q, k, v = qkv.permute(1, 2, 3, 0, 4, 5).flatten(3, 4)
        out = self.attention(q, k, v, key_mask)
        # back: process j gets its tokens of these heads; then [B, H, s, D] with the zero heads dropped
        out = self.share.all_to_all("trading the attention output", out.unflatten(2, (n, s)).permute(2, 0, 1, 3, 4))
        return out.movedim(0, 1).flatten(1, 2)[:, :heads]

    def __repr__(self):
        return f"UlyssesAttention({self.attention!r}, share {self.share.index} of {self.share.count})"
