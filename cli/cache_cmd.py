"""`superopt cache ls | show KEY | export FILE | import FILE | clear [--older-than DAYS]`: the result cache."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import click

from superopt.cache import Cache
from superopt.cli.errors import OutputFile, reports_errors
from superopt.pipeline import trusted_winner
from superopt.serialize import from_json

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
    for path, entry in cache.entries():
        best = entry["best"]
        measured = best.get("measured_us")
        rows.append(
            [
                entry["key"][:16],
                entry["name"],
                entry["device"],
                f"{entry['settings']['budget_s']:g}",
                str(best["kernels"]),
                f"{best['predicted_us']:.1f}",
                f"{measured:.1f}" if isinstance(measured, (int, float)) else "-",
                cache.origin(entry),
                _written(path),
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
    entry = cache.find(key)
    if as_json:
        click.echo(json.dumps(entry, indent=1))
        return
    best = entry["best"]
    click.echo(f"key {entry['key']}\nprogram {entry['name']} (hash {entry['program_hash'][:16]})")
    click.echo(f"settings {json.dumps(entry['settings'])}\nversions {json.dumps(entry['versions'])}")
    click.echo(f"written {entry['created']} on {entry['gpu'] or 'a machine without a GPU'}")
    click.echo(
        f"winner {best['hash'][:16]} ({best['source']}): {best['kernels']} kernels, "
        f"{best['predicted_us']:.1f} us predicted"
    )
    click.echo(f"verification {json.dumps(best['verify'])}")
    click.echo(str(from_json(best["graph"], f"cache entry {entry['key'][:16]}")))


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
