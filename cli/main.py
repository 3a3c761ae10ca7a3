"""The `superopt` command. Bad input exits 2 with one line on stderr; a traceback is never shown."""

from __future__ import annotations

import math
import os
from pathlib import Path

import click
import torch

from superopt.cli.cache_cmd import cache_command
from superopt.cli.errors import Checked, Group, OutputFile, reports_errors
from superopt.cli.megakernel_cmd import megakernel_command
from superopt.cli.quantize_cmd import quantize_command
from superopt.cli.search_cmd import search_command, settings_for
from superopt.cli.serve_cmd import serve_command
from superopt.cli.verify_cmd import verify_command
from superopt.dot import to_dot
from superopt.errors import SuperoptError
from superopt.interpret import random_inputs, run
from superopt.serialize import graph_hash, write_atomic
from superopt.spec import check_positive_finite, check_seed, load


@click.group(cls=Group)
@click.version_option(package_name="superopt")
def main() -> None:
    """superopt: search, verify and compile fused kernels for tensor programs."""


FILE = click.Path(dir_okay=False, path_type=Path)
SEED = Checked("seed", int, check_seed)
MEMORY_BYTES = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
main.add_command(search_command)
main.add_command(verify_command)
main.add_command(cache_command)
main.add_command(megakernel_command)
main.add_command(quantize_command)
main.add_command(serve_command)


@main.command("run")
@click.argument("spec", type=FILE)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random inputs.")
@click.option(
    "--scale",
    type=Checked("scale", float, check_positive_finite),
    default=0.1,
    show_default=True,
    help="Inputs are drawn from N(0, scale^2).",
)
@click.option("--float64", "exact", is_flag=True, help="Compute in float64 instead of the graph's dtypes.")
@reports_errors
def run_command(spec: Path, seed: int, scale: float, exact: bool) -> None:
    """Run SPEC (YAML or JSON) on seeded random inputs; print each output's shape, dtype and checksums."""
    graph = load(spec)
    need = 8 * sum(math.prod(t.shape) for t in graph.tensors.values())  # float64 inputs, results kept to the end
    if need > MEMORY_BYTES:
        raise SuperoptError(
            f"{spec}: running it needs about {need / 2**30:.0f} GB for its tensors; "
            f"this machine has {MEMORY_BYTES / 2**30:.0f} GB"
        )
    outputs = run(graph, random_inputs(graph, seed, scale), "float64" if exact else "native")
    for name, out in zip(graph.outputs, outputs):
        x = out.double()
        bad = int((~torch.isfinite(x)).sum())
        note = f" non-finite={bad}" if bad else ""
        click.echo(
            f"{name}: shape={list(out.shape)} dtype={graph.tensors[name].dtype} "
            f"sum={x.sum().item():.6e} abs_sum={x.abs().sum().item():.6e}{note}"
        )


@main.command("show")
@click.argument("file", type=FILE)
@click.option("--dot", "dot_out", type=OutputFile(), help="Also write a graphviz DOT file here.")
@reports_errors
def show_command(file: Path, dot_out: Path | None) -> None:
    """Print the text form of FILE (YAML spec or JSON graph)."""
    graph = load(file)
    click.echo(str(graph))
    if dot_out is not None:
        try:
            write_atomic(dot_out, to_dot(graph))
        except OSError as e:
            raise SuperoptError(f"{dot_out}: cannot write: {e.strerror or e}") from None
        click.echo(f"wrote {dot_out}", err=True)


@main.command("validate")
@click.argument("file", type=FILE)
@reports_errors
def validate_command(file: Path) -> None:
    """Check FILE (YAML spec or JSON graph) and print a one-line summary."""
    graph = load(file)
    settings_for(file, graph.search_settings, {})  # the `search:` section too
    kernels = len(graph.ops)
    click.echo(
        f"{file}: ok: {graph.name}, {len(graph.inputs)} inputs, {kernels} kernel ops, "
        f"{len(graph.outputs)} outputs, hash {graph_hash(graph)[:16]}"
    )


if __name__ == "__main__":
    main()
