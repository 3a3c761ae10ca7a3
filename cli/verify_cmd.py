"""`superopt verify A B`: are two programs or µGraphs (YAML specs or JSON graphs) equivalent?

Exit status: 0 equivalent, 1 not equivalent (prints the first differing output and the seed that shows it),
3 undecided (prints why), 2 bad input (unreadable file, different signatures: one line on stderr).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from superopt.cli.errors import Checked, reports_errors
from superopt.spec import check_seed, load
from superopt.verification import float_gate, verify

EXIT_EQUIVALENT, EXIT_DIFFERENT, EXIT_UNDECIDED = 0, 1, 3
MAX_TESTS = 10**6  # each test holds the programs' tensors over a finite field: more only grows memory


@click.command("verify")
@click.argument("a", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("b", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--tests",
    type=click.IntRange(1, MAX_TESTS),
    default=4,
    show_default=True,
    help="Finite-field tests (each with fresh randomness).",
)
@click.option(
    "--seed",
    type=Checked("seed", int, check_seed),
    default=None,
    help="Seed of the randomness (default: fresh; printed).",
)
@click.option("--no-prove", is_flag=True, help="Skip the z3 proof attempt on small graphs.")
@click.option("--gate", is_flag=True, help="Also run B in its own dtypes against A in float64 (the float gate).")
@reports_errors
def verify_command(a: Path, b: Path, tests: int, seed: int | None, no_prove: bool, gate: bool) -> None:
    """Check that A and B (same inputs and outputs) compute the same function."""
    graphs = load(a), load(b)
    result = verify(*graphs, tests=tests, seed=seed, prove=not no_prove)
    click.echo(str(result))
    status = {True: EXIT_EQUIVALENT, False: EXIT_DIFFERENT, None: EXIT_UNDECIDED}[result.equivalent]
    if gate and status == EXIT_EQUIVALENT:
        verdict = float_gate(graphs[1], graphs[0])
        click.echo(
            f"float gate: {'passed' if verdict.passed else 'failed: ' + verdict.reason} (error {verdict.error:.3g})"
        )
        status = EXIT_EQUIVALENT if verdict.passed else EXIT_DIFFERENT
    sys.exit(status)
