"""Checkpoints on disk: safetensors files, and the quantized checkpoints `superopt quantize` writes.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape and byte
range; "__metadata__": string pairs), then the raw tensors. The `safetensors` package reads it where it is
installed (memory-mapped); otherwise the reader here does, checking every field first: the header is untrusted.

A quantized checkpoint is a safetensors file whose metadata holds QUANTIZATION (JSON: bits, group, symmetric,
high_first, method, and the names of the quantized weights). A quantized linear weight `P.weight` [out, in] is
stored as `P.qweight` (int8 [out, in], or int4 two a byte as uint8 [out, in / 2]: superopt/quant.py), `P.scales`
([out, in / group], bf16) and, where asymmetric, `P.qzeros` (the same); every other weight as it was. The LM
head may be one of them (`lm_head`, quantized with the projections by default): for a model with tied embeddings
it is a copy of its own, the embedding table staying bf16 (the token's row is gathered from it). Reading one
dequantizes each weight by the IR's dequant (superopt.quant.dequantize), so a model computes what its quantized
weights hold, bit for bit.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch

from superopt.errors import SpecError, SuperoptError
from superopt.quant import RANGES, dequantize
from superopt.serialize import write_atomic

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I8": torch.int8, "U8": torch.uint8}
NAMES = {v: k for k, v in DTYPES.items()}
QUANTIZATION = "superopt.quantization"


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file; SpecError naming the file and the fault."""
    try:
        from safetensors import safe_open  # an optional dependency; the reader below serves without it
    except ImportError:
        safe_open = None
    if safe_open is not None:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    data = path.read_bytes()
    if len(data) < 8:
        raise SpecError(f"{path}: {len(data)} bytes: not a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise SpecError(f"{path}: its header says {n} bytes, the file has {len(data) - 8} after the length")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpecError(f"{path}: the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise SpecError(f"{path}: the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SpecError(f"{path}: __metadata__ is not an object of strings")
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        try:
            dtype, shape, (start, stop) = DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
            ok = all(isinstance(d, int) and d >= 0 for d in shape) and 0 <= start <= stop <= len(body)
        except (KeyError, TypeError, ValueError):
            raise SpecError(f"{path}: tensor '{name}': not a dtype ({', '.join(DTYPES)}), shape and offsets") from None
        if not ok or stop - start != math.prod(shape) * dtype.itemsize:
            raise SpecError(f"{path}: tensor '{name}': its shape {shape} and byte range [{start}, {stop}) disagree")
        raw = bytearray(body[start:stop])
        out[name] = torch.frombuffer(raw, dtype=dtype).reshape(shape) if raw else torch.zeros(shape, dtype=dtype)
    return out, metadata


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """`tensors` (contiguous, on the CPU) and `metadata` as one safetensors file, written atomically."""
    header: dict[str, Any] = {"__metadata__": metadata}
    chunks, at = [], 0
    for name, t in tensors.items():
        if t.dtype not in NAMES:
            raise SuperoptError(f"{path}: tensor '{name}' is {t.dtype}, which safetensors here does not hold")
        raw = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + len(raw)]}
        chunks.append(raw)
        at += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the tensors start 8-byte aligned
    write_atomic(path, struct.pack("<Q", len(text)) + text + b"".join(chunks))


def quantized_names(weights: dict[str, torch.Tensor]) -> list[str]:
    """Each layer's attention and MLP projections: the linear weights `superopt quantize` always quantizes (the LM
    head too unless --lm-head bf16; the embedding and the norms stay bf16)."""
    parts = tuple(f"self_attn.{p}_proj" for p in "qkvo") + tuple(f"mlp.{p}_proj" for p in ("gate", "up", "down"))
    return [n for n in weights if n.startswith("model.layers.") and n.removesuffix(".weight").endswith(parts)]


def dequantized(tensors: dict[str, torch.Tensor], metadata: dict[str, str], where: Path) -> dict[str, torch.Tensor]:
    """A quantized checkpoint's tensors with each quantized weight dequantized under its `.weight` name; other
    files' tensors as they are."""
    if QUANTIZATION not in metadata:
        return tensors
    try:
        q = json.loads(metadata[QUANTIZATION])
        bits, group, high_first, names = q["bits"], q["group"], q["high_first"], q["weights"]
        if bits not in RANGES or not isinstance(group, int) or not isinstance(high_first, bool):
            raise ValueError(f"bits {bits!r}, group {group!r}")
        names = [str(n) for n in names]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise SpecError(f"{where}: its {QUANTIZATION} metadata is malformed ({e})") from None
    out = dict(tensors)
    for name in names:
        stem = name.removesuffix(".weight")
        qw, scales = out.pop(f"{stem}.qweight", None), out.pop(f"{stem}.scales", None)
        zeros = out.pop(f"{stem}.qzeros", None)
        if qw is None or scales is None:
            raise SpecError(f"{where}: the quantized weight '{name}' has no {stem}.qweight or {stem}.scales")
        if qw.dtype != (torch.int8 if bits == 8 else torch.uint8):
            raise SpecError(f"{where}: {stem}.qweight is {qw.dtype}, not int{bits}'s storage")
        try:
            out[name] = dequantize(qw, scales, zeros, group, high_first)
        except SuperoptError as e:
            raise SpecError(f"{where}: {stem}: {e}") from None
    return out
