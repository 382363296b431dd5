"""GroupNorm, with SiLU after it where the network wants one, in two passes over channels_last activations.

The VAE decoder normalizes every activation before each convolution (groups of channels, statistics over the
whole image). In channels_last memory, where cuDNN's convolutions run fastest, one spatial position is one
contiguous row of channels, so both passes read whole rows: the first reduces each tile of rows to per-group
mean and squared deviations (float32), the second normalizes, scales and shifts each channel and applies SiLU
while the value is in registers, writing the activation dtype once. Between them one small kernel combines the
tiles' statistics exactly (Chan's parallel formula), not as a sum of squares minus a squared sum, which cancels
badly where a group's mean is large against its spread.

Tensors the kernels do not take (not channels_last on CUDA, channel counts that are not powers of two) run
PyTorch's group_norm and silu, as does every device without Triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import smoke_test, tl, triton, triton_runs

ELEMENTS_PER_TILE = 8192  # rows x channels a program holds: 64 registers a thread at 8 warps in float32


@smoke_test
def _run_kernels(device: torch.device, dtype: torch.dtype) -> None:
    x = torch.ones(1, 64, 4, 4, device=device, dtype=dtype).to(memory_format=torch.channels_last)
    ones = torch.ones(64, device=device, dtype=dtype)
    group_norm(x, 32, ones, ones, 1e-6, silu=True)


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               silu: bool = False) -> torch.Tensor:
    """GroupNorm of x [N, C, H, W] over `groups` groups of channels with per-channel weight and bias, then
    x * sigmoid(x) if silu. The result has x's dtype and memory format."""
    if not _kernels_take(x, groups):
        y = F.group_norm(x, groups, weight.to(x.dtype), bias.to(x.dtype), eps)
        return F.silu(y) if silu else y
    n, c, h, w = x.shape
    rows = h * w
    tile_rows = max(1, ELEMENTS_PER_TILE // c)
    tiles = triton.cdiv(rows, tile_rows)
    means = torch.empty(n, tiles, groups, device=x.device, dtype=torch.float32)
    squares = torch.empty_like(means)  # each tile's sum of squared deviations from its own mean
    _tile_stats_kernel[(tiles, n)](x, means, squares, rows, C=c, GROUPS=groups, TILE_ROWS=tile_rows, num_warps=8)
    mean = torch.empty(n, groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    _combine_kernel[(groups, n)](means, squares, mean, rstd, rows, tiles, eps, GROUPS=groups, GROUP_SIZE=c // groups,
                                 TILE_ROWS=tile_rows, BLOCK=min(1024, triton.next_power_of_2(tiles)))
    out = torch.empty_like(x)  # channels_last, as x
    _normalize_kernel[(tiles, n)](x, out, mean, rstd, weight, bias, rows, C=c, GROUPS=groups, TILE_ROWS=tile_rows,
                                  SILU=silu, num_warps=8)
    return out


def _kernels_take(x: torch.Tensor, groups: int) -> bool:
    if x.dim() != 4 or not triton_runs(x) or not x.is_contiguous(memory_format=torch.channels_last):
        return False
    c = x.shape[1]
    power_of_two = lambda v: v > 0 and v & (v - 1) == 0  # noqa: E731  (tiles reshape to [rows, groups, c / groups])
    return power_of_two(c) and power_of_two(groups) and c % groups == 0 and c <= ELEMENTS_PER_TILE


if triton is not None:

    @triton.jit
    def _tile_stats_kernel(x_ptr, means_ptr, squares_ptr, rows, C: tl.constexpr, GROUPS: tl.constexpr,
                           TILE_ROWS: tl.constexpr):
        tile, sample = tl.program_id(0), tl.program_id(1)  # tiles first: a grid's later axes stop at 65535
        row = tile * TILE_ROWS + tl.arange(0, TILE_ROWS)
        valid = row < rows
        offsets = sample.to(tl.int64) * rows * C + row[:, None].to(tl.int64) * C + tl.arange(0, C)[None, :]
        x = tl.load(x_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
        x = tl.reshape(x, (TILE_ROWS, GROUPS, C // GROUPS))
        # summed relative to the tile's first row (its groups' means), so that a mean large against the spread
        # does not swamp the float32 sum
        first = tl.load(x_ptr + sample.to(tl.int64) * rows * C + (tile * TILE_ROWS).to(tl.int64) * C
                        + tl.arange(0, C)).to(tl.float32)
        reference = tl.sum(tl.reshape(first, (GROUPS, C // GROUPS)), axis=1) / (C // GROUPS)
        inside = tl.reshape(valid, (TILE_ROWS, 1, 1))
        shifted = tl.where(inside, x - reference[None, :, None], 0.0)
        count = tl.sum(valid.to(tl.float32), axis=0) * (C // GROUPS)
        offset = tl.sum(tl.sum(shifted, axis=2), axis=0) / count
        deviation = tl.where(inside, shifted - offset[None, :, None], 0.0)
        squares = tl.sum(tl.sum(deviation * deviation, axis=2), axis=0)
        out = (sample * tl.num_programs(0) + tile) * GROUPS + tl.arange(0, GROUPS)
        tl.store(means_ptr + out, reference + offset)
        tl.store(squares_ptr + out, squares)

    @triton.jit
    def _combine_kernel(means_ptr, squares_ptr, mean_ptr, rstd_ptr, rows, tiles, eps, GROUPS: tl.constexpr,
                        GROUP_SIZE: tl.constexpr, TILE_ROWS: tl.constexpr, BLOCK: tl.constexpr):
        # Chan's formula: a group's mean and variance from its tiles' means and squared deviations, the means
        # summed relative to the first tile's (float32 would otherwise lose a mean large against the spread)
        group, sample = tl.program_id(0), tl.program_id(1)
        base = sample.to(tl.int64) * tiles * GROUPS + group
        first = tl.load(means_ptr + base)
        last_count = ((rows - (tiles - 1) * TILE_ROWS) * GROUP_SIZE).to(tl.float32)
        total = (rows * GROUP_SIZE).to(tl.float32)
        shifted = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, tiles, BLOCK):
            tile = start + tl.arange(0, BLOCK)
            inside = tile < tiles
            count = tl.where(tile == tiles - 1, last_count, TILE_ROWS * GROUP_SIZE)
            m = tl.load(means_ptr + base + tile.to(tl.int64) * GROUPS, mask=inside, other=0.0)
            shifted += tl.where(inside, count * (m - first), 0.0)
        mean = first + tl.sum(shifted, axis=0) / total
        squares = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, tiles, BLOCK):
            tile = start + tl.arange(0, BLOCK)
            inside = tile < tiles
            count = tl.where(tile == tiles - 1, last_count, TILE_ROWS * GROUP_SIZE)
            offset = base + tile.to(tl.int64) * GROUPS
            m = tl.load(means_ptr + offset, mask=inside, other=0.0)
            s = tl.load(squares_ptr + offset, mask=inside, other=0.0)
            squares += tl.where(inside, s + count * (m - mean) * (m - mean), 0.0)
        out = sample * GROUPS + group
        tl.store(mean_ptr + out, mean)
        tl.store(rstd_ptr + out, 1.0 / tl.sqrt(tl.sum(squares, axis=0) / total + eps))

    @triton.jit
    def _normalize_kernel(x_ptr, out_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, rows, C: tl.constexpr,
                          GROUPS: tl.constexpr, TILE_ROWS: tl.constexpr, SILU: tl.constexpr):
        tile, sample = tl.program_id(0), tl.program_id(1)  # tiles first: a grid's later axes stop at 65535
        row = tile * TILE_ROWS + tl.arange(0, TILE_ROWS)
        valid = row < rows
        channel = tl.arange(0, C)
        group = sample * GROUPS + channel // (C // GROUPS)
        mean = tl.load(mean_ptr + group)
        scale = tl.load(rstd_ptr + group) * tl.load(weight_ptr + channel).to(tl.float32)
        bias = tl.load(bias_ptr + channel).to(tl.float32)
        offsets = sample.to(tl.int64) * rows * C + row[:, None].to(tl.int64) * C + channel[None, :]
        x = tl.load(x_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
        y = (x - mean[None, :]) * scale[None, :] + bias[None, :]  # centred first: no cancellation of large means
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=valid[:, None])
