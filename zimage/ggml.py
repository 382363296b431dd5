"""GGML's block quantizations (the tensor types of GGUF files), dequantized with PyTorch operations.

A quantized matrix is stored row by row; each row is a run of blocks, and each block holds the codes of a fixed
number of consecutive elements of its row (32, or 256 for the K-quants) with the scales they need. A block never
spans two rows, so the rows of a matrix are independent byte strings: stacking the rows of two matrices of one
type stacks the matrices (how a fused qkv is made from q, k and v), and a matrix dequantizes on any device with
batched elementwise operations over all its blocks at once, which a CUDA graph can capture.

The layouts are ggml's (ggml-common.h); every formula computes in float32 in the order the `gguf` package's
reference dequantization does, so a CPU and a GPU give the same values as that reference, bit for bit
(tests/test_gguf.py, tests/test_gpu.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockFormat:
    elements: int  # per block
    nbytes: int  # per block


# The block quantizations this module dequantizes, by their GGML names; the IQ and TQ types (lattice codebooks,
# ternary) are not among them.
FORMATS = {
    "Q8_0": BlockFormat(32, 34), "Q4_0": BlockFormat(32, 18), "Q4_1": BlockFormat(32, 20),
    "Q5_0": BlockFormat(32, 22), "Q5_1": BlockFormat(32, 24),
    "Q2_K": BlockFormat(256, 84), "Q3_K": BlockFormat(256, 110), "Q4_K": BlockFormat(256, 144),
    "Q5_K": BlockFormat(256, 176), "Q6_K": BlockFormat(256, 210),
}
# GGUF's plain float types, stored as they are
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def row_bytes(qtype: str, columns: int) -> int:
    """Bytes of one row of `columns` elements in a block quantization."""
    fmt = FORMATS[qtype]
    if columns % fmt.elements:
        raise ValueError(f"a {qtype} row holds whole blocks of {fmt.elements} elements, not {columns}")
    return columns // fmt.elements * fmt.nbytes


def dequantize(raw: torch.Tensor, qtype: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """raw uint8 [rows, bytes per row] of a block quantization -> [rows, columns] in dtype, on raw's device."""
    fmt = FORMATS[qtype]
    rows = raw.shape[0]
    blocks = raw.reshape(-1, fmt.nbytes)
    values = _DEQUANTIZE[qtype](blocks)
    return values.reshape(rows, -1).to(dtype)


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 stored at byte `at` of each block, as float32 [n, 1]."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _fields(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[n, *, b] bytes -> [n, *, 8 // bits, b]: field k of every byte (bits k*bits and up) in slice k, so that
    a byte run's low fields come first, as ggml orders them. The shifts are made on the device by a kernel (no
    host copy, which a CUDA graph could not capture)."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device).reshape(-1, 1)
    return (packed.unsqueeze(-2) >> shifts) & ((1 << bits) - 1)


def _low_high_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 16] bytes -> [n, 32] 4-bit codes: the 16 low nibbles, then the 16 high ones (the 32-element blocks)."""
    return _fields(qs, 4).reshape(len(qs), -1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes of a little-endian 32-bit mask -> [n, 32] bits, bit j for element j."""
    return _fields(qh.unsqueeze(-1), 1).reshape(len(qh), 32)


def _q8_0(b):
    return _f16(b, 0) * b[:, 2:].view(torch.int8).float()


def _q4_0(b):
    return _f16(b, 0) * (_low_high_nibbles(b[:, 2:]).float() - 8)


def _q4_1(b):
    return _f16(b, 0) * _low_high_nibbles(b[:, 4:]).float() + _f16(b, 2)


def _q5_0(b):
    q = _low_high_nibbles(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)
    return _f16(b, 0) * (q.float() - 16)


def _q5_1(b):
    q = _low_high_nibbles(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)
    return _f16(b, 0) * q.float() + _f16(b, 2)


def _q2_k(b):
    # 16 sub-blocks of 16: a 4-bit scale and a 4-bit min each; 2-bit codes, each 32-byte run holding 4 fields
    n = len(b)
    scales, d, dmin = b[:, :16], _f16(b, 80), _f16(b, 82)
    q = _fields(b[:, 16:80].reshape(n, 2, 32), 2).reshape(n, 16, 16).float()
    return ((d * (scales & 0xF).float()).unsqueeze(-1) * q - (dmin * (scales >> 4).float()).unsqueeze(-1)).reshape(n, -1)


def _q3_k(b):
    # 2-bit low codes and a high-bit mask whose bit set means "no -4"; 16 6-bit signed scales in 12 bytes:
    # the low 4 bits of scale i are nibble i of bytes 0-7 (low nibbles first), its top 2 bits field i of bytes 8-11
    n = len(b)
    low = _fields(b[:, 32:96].reshape(n, 2, 32), 2).reshape(n, 16, 16)
    high = _fields(b[:, :32], 1).reshape(n, 16, 16)
    sc = b[:, 96:108]
    scales = (_fields(sc[:, :8], 4).reshape(n, 16) | (_fields(sc[:, 8:], 2).reshape(n, 16) << 4)).float() - 32
    q = low.float() - 4 * (1 - high.float())
    return ((_f16(b, 108) * scales).unsqueeze(-1) * q).reshape(n, -1)


def _k_scales(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 8 6-bit scales and 8 6-bit mins packed in 12 bytes -> two [n, 8]. Bytes 0-3 hold scales 0-3 in
    their low 6 bits, bytes 4-7 mins 0-3; bytes 8-11 hold scales 4-7 (low nibble) and mins 4-7 (high nibble),
    whose top 2 bits are the top bits of bytes 0-3 and 4-7."""
    a, m, rest = sc[:, :4], sc[:, 4:8], sc[:, 8:12]
    scales = torch.cat((a & 63, (rest & 0xF) | ((a >> 2) & 0x30)), dim=1)
    mins = torch.cat((m & 63, (rest >> 4) | ((m >> 2) & 0x30)), dim=1)
    return scales.float(), mins.float()


def _q4_k(b):
    # 8 sub-blocks of 32; each 32-byte run of codes holds two sub-blocks (low nibbles, then high)
    n = len(b)
    scales, mins = _k_scales(b[:, 4:16])
    q = _fields(b[:, 16:].reshape(n, 4, 32), 4).reshape(n, 8, 32).float()
    return ((_f16(b, 0) * scales).unsqueeze(-1) * q - (_f16(b, 2) * mins).unsqueeze(-1)).reshape(n, -1)


def _q5_k(b):
    n = len(b)
    scales, mins = _k_scales(b[:, 4:16])
    low = _fields(b[:, 48:].reshape(n, 4, 32), 4).reshape(n, 8, 32)
    high = _fields(b[:, 16:48], 1).reshape(n, 8, 32)  # bit i of byte j: element j of sub-block i
    q = (low | (high << 4)).float()
    return ((_f16(b, 0) * scales).unsqueeze(-1) * q - (_f16(b, 2) * mins).unsqueeze(-1)).reshape(n, -1)


def _q6_k(b):
    # 16 sub-blocks of 16 with int8 scales; 4 low bits in 2 runs of 64 bytes, 2 high bits in 2 runs of 32
    n = len(b)
    low = _fields(b[:, :128].reshape(n, 2, 64), 4).reshape(n, 8, 32)
    high = _fields(b[:, 128:192].reshape(n, 2, 32), 2).reshape(n, 8, 32)
    q = ((low | (high << 4)).float() - 32).reshape(n, 16, 16)
    scales = b[:, 192:208].view(torch.int8).float()
    return ((_f16(b, 208) * scales).unsqueeze(-1) * q).reshape(n, -1)


_DEQUANTIZE = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q2_K": _q2_k,
               "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
