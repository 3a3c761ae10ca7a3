"""`superopt cache ls | show KEY | export FILE | import FILE | clear [--older-than DAYS]`: the result cache."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import click

from superopt.cache import Cache
from superopt.cli.errors import OutputFile, reports_errors
from superopt.pipeline import trusted_winner

FILE = click.Path(dir_okay=False, path_type=Path)


@click.group("cache")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Cache folder (default: $SUPEROPT_CACHE_DIR or ~/.cache/superopt).",
)
@click.pass_context
def cache_command(ctx: click.Context, cache_dir: Path | None) -> None:
    """Inspect and move the result cache (keyed by program, search settings, device class and versions)."""
    ctx.obj = Cache(cache_dir)


@cache_command.command("ls")
@click.pass_obj
@reports_errors
def ls_command(cache: Cache) -> None:
    """One line per entry: key, program, device, budget, winner's kernels and times, origin (signed "local"ly,
    "imported" or "unsigned"), when it was written; then the entries moved into quarantine, each with why."""
    head = ["key", "program", "device", "budget s", "kernels", "predicted us", "measured us", "origin", "written", ""]
    rows = [head]
    for stored in cache.entries():
        r = stored.result
        measured = r.best_trial.measured_us if r.best_trial else None
        rows.append(
            [
                r.key[:16],
                r.name,
                r.device,
                f"{r.settings['budget_s']:g}",
                str(r.best.kernels),
                f"{r.best.predicted_us:.1f}",
                f"{measured:.1f}" if measured is not None else "-",
                cache.origin(stored.doc),
                _written(stored.path),
                "",
            ]
        )
    quarantined = cache.quarantined()
    for path, why in quarantined:
        rows.append([path.stem[:16], "(quarantined)", "", "", "", "", "", "", _written(path), why])
    widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    click.echo(
        f"{len(rows) - 1 - len(quarantined)} entries, {len(quarantined)} quarantined in {cache.results}", err=True
    )


def _written(path: Path) -> str:
    return datetime.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")


@cache_command.command("show")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Print the whole entry as JSON.")
@click.pass_obj
@reports_errors
def show_command(cache: Cache, key: str, as_json: bool) -> None:
    """The entry whose key starts with KEY: program, settings, versions, verification and the winning µGraph."""
    r = cache.find(key)
    if as_json:
        click.echo(json.dumps(r.to_json(), indent=1))
        return
    best = r.best
    click.echo(f"key {r.key}\nprogram {r.name} (hash {r.program_hash[:16]})")
    click.echo(f"settings {json.dumps(r.settings)}\nversions {json.dumps(r.versions)}")
    click.echo(f"written {r.created} on {r.gpu or 'a machine without a GPU'}")
    click.echo(f"winner {best.hash[:16]} ({best.source}): {best.kernels} kernels, {best.predicted_us:.1f} us predicted")
    click.echo(f"verification {json.dumps(best.verify.to_json())}")
    click.echo(str(best.graph))


@cache_command.command("export")
@click.argument("file", type=OutputFile())
@click.pass_obj
@reports_errors
def export_command(cache: Cache, file: Path) -> None:
    """Write every valid entry into FILE (one JSON document)."""
    click.echo(f"exported {cache.export(file)} entries to {file}")


@cache_command.command("import")
@click.argument("file", type=FILE)
@click.pass_obj
@reports_errors
def import_command(cache: Cache, file: Path) -> None:
    """Store the entries of FILE, each re-verified first (any that fails refuses the file); an entry already here
    with a larger budget is kept."""
    written, kept = cache.import_(file, trusted_winner)
    click.echo(
        f"imported {written} entries into {cache.results}" + (f"; kept {kept} better ones already here" if kept else "")
    )


@cache_command.command("clear")
@click.option("--older-than", "days", type=float, help="Only what was written more than DAYS days ago.")
@click.pass_obj
@reports_errors
def clear_command(cache: Cache, days: float | None) -> None:
    """Remove cached results and generated kernel modules."""
    click.echo(f"removed {cache.clear(days)} files from {cache.root}")
