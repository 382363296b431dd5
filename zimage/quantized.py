"""A Linear layer whose matrix stays in a GGML block quantization (a GGUF file's Q4_K, Q8_0, ...) in memory.

The matrix is held as its raw blocks, one uint8 row of bytes per output row, and dequantized to the input's dtype
on the input's device at every use (ggml.py). It is an ordinary parameter to everything else: a Runner's weight
streaming copies its bytes in block by block, a CUDA graph captures its dequantization with the matrix multiply,
and a host moves or offloads it like any weight; only its memory is the quantization's (a Q4_K matrix takes 0.56
bytes per weight against bf16's 2).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ggml import FORMATS, dequantize, row_bytes


class QuantizedLinear(nn.Module):
    def __init__(self, raw: torch.Tensor, qtype: str, in_features: int, bias: torch.Tensor | None = None):
        """raw: uint8 [out_features, bytes per row] in the block quantization `qtype` (ggml.FORMATS)."""
        super().__init__()
        if qtype not in FORMATS:
            raise ValueError(f"{qtype} is not a block quantization this engine dequantizes ({', '.join(FORMATS)})")
        if raw.dtype != torch.uint8 or raw.ndim != 2 or raw.shape[1] != row_bytes(qtype, in_features):
            raise ValueError(f"a {qtype} matrix of {in_features} columns is uint8 [rows, "
                             f"{row_bytes(qtype, in_features)}], got {raw.dtype} {list(raw.shape)}")
        self.qtype = qtype
        self.in_features, self.out_features = in_features, raw.shape[0]
        self.weight = nn.Parameter(raw, requires_grad=False)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))

    @property
    def weight_shape(self) -> torch.Size:
        """The matrix's shape, [out_features, in_features] (self.weight holds its bytes)."""
        return torch.Size((self.out_features, self.in_features))

    def dequantized(self, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
        """The matrix as a dense [out_features, in_features] tensor in dtype, dequantized on `device` (its own by
        default): the bytes are copied there first, so that the work happens where the compute is."""
        raw = self.weight if device is None else self.weight.to(device, non_blocking=True)
        return dequantize(raw, self.qtype, dtype)

    def weight_and_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The matrix and bias that multiply x, in x's dtype on x's device. A host that patches weights at each use
        (a LoRA on a quantized matrix, nodes/comfy_model.py) overrides this."""
        bias = None if self.bias is None else self.bias.to(x)
        return self.dequantized(x.dtype, x.device), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self.weight_and_bias(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qtype}"
