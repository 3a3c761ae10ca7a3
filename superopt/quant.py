"""Weight quantization: round-to-nearest with one scale (and zero point) per group of the last dim, in the layout
the IR's dequant op reads (superopt/ops.py; docs/architecture.md, "Quantized weights").

A weight [..., N, K] (a linear layer's [out, in]) is cut into groups of `group` consecutive values of each row.
Symmetric (the default): scale = max|w| / qmax over the group, q = round(w / scale) clamped to [qmin, qmax],
no zero point. Asymmetric: scale = (max w - min w) / (qmax - qmin), zero = qmin - round(min w / scale), q =
round(w / scale) + zero clamped; dequant gives (q - zero) * scale. qmin, qmax are -8, 7 for int4 and -128, 127
for int8. Rounding is to nearest, ties to even (torch.round). The scale is rounded to its dtype first and q is
computed from the rounded scale in float32, so dequant reconstructs every value from what is stored. A group
whose scale is 0 (all zeros, or a maximum below the dtype's smallest value) gets scale 1 and q 0.

int4 values are packed two a byte along the last dim, value 2j in bits 0-3 of byte j and 2j + 1 in bits 4-7
(swapped with high_first), each in 4-bit two's complement. Checkpoints that store unsigned nibbles u with an
unsigned zero point (GPTQ, AWQ) convert by u - 8 for both, which is XOR 0x88 on each byte.
"""

from __future__ import annotations

import torch

from superopt.errors import SuperoptError
from superopt.interpret import run, unpack_int4
from superopt.ir import KernelGraph
from superopt.ops import TORCH_TO_IR

RANGES = {4: (-8, 7), 8: (-128, 127)}  # bits -> (qmin, qmax)


def pack_int4(values: torch.Tensor, high_first: bool = False) -> torch.Tensor:
    """Signed 4-bit values [..., K] (K even, each in -8..7) as bytes [..., K / 2], torch.uint8: value 2j in the low
    nibble of byte j (the high one with high_first). The inverse of superopt.interpret.unpack_int4."""
    if values.shape[-1] % 2:
        raise SuperoptError(f"pack_int4: the last dim must be even (two values a byte), got {list(values.shape)}")
    if values.dtype.is_floating_point or bool(((values < -8) | (values > 7)).any()):
        raise SuperoptError("pack_int4: values must be integers in -8..7")
    nibbles = values.to(torch.int64) & 15
    first, second = nibbles[..., 0::2], nibbles[..., 1::2]
    if high_first:
        first, second = second, first
    return (first | second << 4).to(torch.uint8)


def quantize(
    w: torch.Tensor,
    bits: int,
    group: int,
    symmetric: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    high_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q, scale, zero) of float weight `w` [..., K] in groups of `group` along the last dim (see the module doc):
    q int8 [..., K] or packed int4 uint8 [..., K / 2]; scale [..., K / group] in `dtype`; zero the same, or None
    where symmetric."""
    if bits not in RANGES:
        raise SuperoptError(f"quantize: bits must be 4 or 8, got {bits!r}")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise SuperoptError(f"quantize: group must be a positive integer, got {group!r}")
    if not w.dtype.is_floating_point or w.dim() == 0:
        raise SuperoptError(f"quantize: w must be a float tensor of rank >= 1, got {w.dtype}{list(w.shape)}")
    if w.shape[-1] % group:
        raise SuperoptError(f"quantize: a row of {w.shape[-1]} values does not split into groups of {group}")
    if bits == 4 and w.shape[-1] % 2:
        raise SuperoptError(f"quantize: int4 packs two values a byte; a row of {w.shape[-1]} is odd")
    if dtype not in TORCH_TO_IR or not dtype.is_floating_point:
        raise SuperoptError(f"quantize: dtype must be float16, bfloat16 or float32, got {dtype}")
    if not bool(torch.isfinite(w).all()):
        raise SuperoptError("quantize: w has NaN or infinite values")
    qmin, qmax = RANGES[bits]
    grouped = w.float().reshape(*w.shape[:-1], w.shape[-1] // group, group)
    if symmetric:
        spread = grouped.abs().amax(-1) / qmax
    else:
        low, high = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)  # 0 stays exact
        spread = (high - low) / (qmax - qmin)
    scale = spread.to(dtype)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    divisor = scale.float()[..., None]
    zero = None
    if symmetric:
        q = torch.round(grouped / divisor)
    else:
        zero = (qmin - torch.round(low / scale.float())).clamp(qmin, qmax).to(dtype)
        q = torch.round(grouped / divisor) + zero.float()[..., None]
    q = q.clamp(qmin, qmax).to(torch.int64).reshape(w.shape)
    return (pack_int4(q, high_first) if bits == 4 else q.to(torch.int8)), scale, zero


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int, high_first: bool = False
) -> torch.Tensor:
    """The IR's dequant on these tensors, run by the reference interpreter: its semantics by definition."""
    if q.dtype not in (torch.int8, torch.uint8):
        raise SuperoptError(f"dequantize: q must be int8 or packed int4 (uint8), got {q.dtype}")
    g = KernelGraph("dequantize")
    qt = g.input("q", tuple(q.shape), "int8" if q.dtype == torch.int8 else "int4")
    operands = [qt, g.input("scale", tuple(scale.shape), TORCH_TO_IR.get(scale.dtype, str(scale.dtype)))]
    if zero is not None:
        operands.append(g.input("zero", tuple(zero.shape), TORCH_TO_IR.get(zero.dtype, str(zero.dtype))))
    g.output(g.op("dequant", *operands, group=group, high_first=high_first))
    inputs = {"q": q, "scale": scale} | ({"zero": zero} if zero is not None else {})
    (out,) = run(g, inputs)
    return out


__all__ = ["RANGES", "dequantize", "pack_int4", "quantize", "unpack_int4"]
