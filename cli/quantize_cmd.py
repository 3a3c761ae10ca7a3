"""`superopt quantize MODEL.yaml --bits 8|4 --group G --out DIR`: a model's linear weights quantized.

Round to nearest with one scale a group of G input features (superopt/quant.py), symmetric unless --asymmetric;
each layer's attention and MLP projections are quantized, and the LM head (`lm_head.qweight`, `lm_head.scales`,
`lm_head.qzeros`, named `lm_head.weight` in the metadata's list: a tied model's too, its embedding kept bf16
beside it) unless --lm-head bf16; the embedding and the norms stay bf16. Writes DIR/model.safetensors
(superopt/checkpoint.py's quantized format) and DIR/NAME-intBITS.yaml, a model spec of the same config whose
weights are that file: every command that takes a model spec reads it, the weights dequantized exactly as the
IR's dequant does. Error-compensated methods (GPTQ, AWQ) need a library this project does not
depend on (none is installed here), so round to nearest is the one method.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import yaml

from superopt.checkpoint import QUANTIZATION, quantized_names, write_safetensors
from superopt.cli.errors import Folder, reports_errors
from superopt.errors import SuperoptError
from superopt.model import LM_HEAD, LM_HEADS, load_spec
from superopt.quant import dequantize, quantize
from superopt.serialize import write_atomic


@click.command("quantize")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--bits", type=click.Choice(["8", "4"]), required=True, help="Bits a weight: int8 or int4.")
@click.option("--group", type=click.IntRange(1), default=128, show_default=True, help="Input features a scale.")
@click.option("--asymmetric", is_flag=True, help="A zero point a group too (min to max, not -max to max).")
@click.option(
    "--lm-head",
    type=click.Choice(LM_HEADS),
    default="same",
    show_default=True,
    help="The LM head: quantized as the projections are (same), or kept bf16.",
)
@click.option("--out", "out_dir", type=Folder(), required=True, help="Folder for the checkpoint and its spec.")
@reports_errors
def quantize_command(spec: Path, bits: str, group: int, asymmetric: bool, lm_head: str, out_dir: Path) -> None:
    """Quantize MODEL.yaml's linear weights to int8 or int4 with per-group scales; write the checkpoint and a
    model spec that reads it."""
    ms = load_spec(spec)
    model = ms.load()
    names = quantized_names(model.weights) + [LM_HEAD] * (lm_head == "same")
    tensors = {name: w for name, w in model.weights.items() if name not in names}
    error = {"squared": 0.0, "norm": 0.0}
    for name in names:
        w = model.w(name)  # a tied LM head: the embedding table, quantized as a copy of its own
        if w.shape[-1] % group:
            raise SuperoptError(f"{spec}: '{name}' has {w.shape[-1]} input features, not a multiple of --group {group}")
        q, scale, zero = quantize(w, int(bits), group, symmetric=not asymmetric)
        stem = name.removesuffix(".weight")
        tensors |= {f"{stem}.qweight": q, f"{stem}.scales": scale} | (
            {f"{stem}.qzeros": zero} if zero is not None else {}
        )
        back = dequantize(q, scale, zero, group).float()
        error["squared"] += float((back - w.float()).square().sum())
        error["norm"] += float(w.float().square().sum())
    meta = {"bits": int(bits), "group": group, "symmetric": not asymmetric, "high_first": False, "method": "rtn"}
    meta["weights"] = names
    name = f"{ms.name}-int{bits}"
    doc = {"name": name, "model": ms.config.hf_fields(), "weights": "model.safetensors", "max_seq": ms.max_seq}
    try:
        write_safetensors(out_dir / "model.safetensors", tensors, {QUANTIZATION: json.dumps(meta)})
        write_atomic(out_dir / f"{name}.yaml", yaml.safe_dump(doc, sort_keys=False))
    except OSError as e:
        raise SuperoptError(f"{out_dir}: cannot write: {e.strerror or e}") from None
    before = sum(w.numel() * w.element_size() for w in model.weights.values())  # a tied head: the table, once
    after = sum(t.numel() * t.element_size() for t in tensors.values())
    rel = (error["squared"] / error["norm"]) ** 0.5 if error["norm"] else 0.0
    click.echo(
        f"{ms.name}: {len(names)} weights to int{bits} in groups of {group} "
        f"({'asymmetric' if asymmetric else 'symmetric'}, round to nearest): {before / 2**20:.1f} MiB -> "
        f"{after / 2**20:.1f} MiB, relative error of the quantized weights {rel:.2e}; wrote "
        f"{out_dir}/model.safetensors, {out_dir}/{name}.yaml"
    )
