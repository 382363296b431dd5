"""3-axis rotary position embedding.

Every token has a position (sequence, row, column). The head dimension is split into three slices
(32, 48, 48 in the released model); each slice rotates its adjacent pairs (x[2i], x[2i+1]) by
position * theta^(-2i / slice).
"""

from __future__ import annotations

import torch


def inverse_frequencies(rope_axes: tuple[int, ...], theta: float) -> list[torch.Tensor]:
    """One float64 vector of theta^(-2i/d) per axis (float64 so that large positions keep their angle).
    Always on the CPU: the model may be built on the meta device, and rope_angles moves them."""
    return [1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d) for d in rope_axes]


def rope_angles(positions: torch.Tensor, inv_freqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [..., 3] -> (cos, sin), each [..., head_dim / 2] in float32."""
    angles = torch.cat(
        [positions[..., axis, None].double() * f.to(positions.device) for axis, f in enumerate(inv_freqs)], dim=-1
    ).float()
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, S, H, D] by cos, sin [B, S, 1, D/2]; computed in float32, returned in x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs.unbind(-1)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
