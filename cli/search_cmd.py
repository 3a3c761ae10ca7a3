"""`superopt search SPEC...`: the fastest verified µGraph of each program, from the cache or a search.

Exit status: 0 every program has a result; 1 `--require-hit` and some program missed the cache; 2 bad input.
Per program it prints whether the cache hit, then a table of the top candidates (predicted and, on a GPU,
measured microseconds, speedups over torch eager and torch.compile timed in the same run, fraction of the floor);
at the end, on stderr, the cache's hit and miss counts.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from superopt.cache import Cache
from superopt.cli.errors import Checked, Folder, OutputFile, reports_errors
from superopt.errors import SuperoptError
from superopt.ir import KernelGraph
from superopt.kernels.device import DEVICES
from superopt.model import ModelSpec, is_model_spec, load_spec
from superopt.model_search import search_model
from superopt.pipeline import SETTING_CHECKS, Settings, device_spec, optimize_program
from superopt.result import Baseline, Result
from superopt.search_space.cluster import connect
from superopt.serialize import write_atomic
from superopt.spec import load

EXIT_MISS = 1


def _num(x: float | None, fmt: str) -> str:
    return format(x, fmt) if x is not None else "-"


def table(result: Result) -> str:
    """The result's candidates, best-ranked first; `*` marks the winner."""
    head = ["", "candidate", "kernels", "predicted us", "measured us", "vs eager", "vs compile", "of floor", "status"]
    rows = [head]
    for c in result.candidates:
        speedups = [c.speedups.get(name) for name in ("eager", "torch.compile")]
        rows.append(
            [
                "*" if c.hash == result.best.hash else "",
                c.hash[:12] + (" (program)" if c.source == "program" else ""),
                str(c.kernels),
                _num(c.predicted_us, ".1f"),
                _num(c.trial.measured_us if c.trial else None, ".1f"),
                *(_num(x, ".2f") + "x" * (x is not None) for x in speedups),
                _num(c.fraction_of_floor, ".2f"),
                c.trial.status if c.trial else "-",
            ]
        )
    widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def _baseline(b: Baseline) -> str:
    if b.median_us is not None:
        return f"{b.median_us:.1f} us"
    return f"skipped ({b.message})" if b.status == "skipped" else "failed"


def summary(result: Result) -> list[str]:
    """What the table cannot say: the baselines, or why nothing was timed, how the winner was checked, and why
    no candidate is fused where none is."""
    lines = []
    if result.measured:
        times = ", ".join(f"{k} {_baseline(v)}" for k, v in result.baselines.items())
        lines.append(f"on {result.gpu}: {times}; floor {result.floor_us:.3g} us")
    else:
        lines.append(
            f"timing needs a GPU: ranked by the cost model for {result.device} (floor {result.floor_us:.3g} us)"
        )
        trial = result.best_trial
        if trial is not None and trial.status == "ok":
            where = f" ({trial.checked_on})" if trial.checked_on else ""
            lines.append(
                f"the winner's Triton code ran under the interpreter{where}: error {trial.error_vs_tolerance:.3g} "
                "of the dtype's tolerance against the reference interpreter"
            )
        elif trial is not None and trial.message:
            lines.append(f"the winner was not run under the interpreter: {trial.message}")
    verify = result.best.verify
    bound = f", bound {verify.bound:.3g}" if verify.method == "tested" else ""
    lines.append(f"winner verified: {verify.method}{bound}")
    if result.search and result.search.get("unfused"):
        lines.append(f"no fused candidate: {result.search['unfused']}")
    if result.cut:
        lines.append(f"cut by the {' and '.join(result.cut)} budget: a larger one may find more")
    return lines


def settings_for(spec: Path, given: dict[str, Any], overrides: dict[str, Any]) -> Settings:
    """The spec's search settings (`given`, its `search:` section) under the options given; a SuperoptError
    naming the spec."""
    try:
        return Settings.merged(given, **overrides)
    except SuperoptError as e:
        raise SuperoptError(f"{spec}: {e}") from None


@dataclass
class Job:
    """One SPEC of the command: a program, or a model (whose layer programs are searched and planned)."""

    path: Path
    settings: Settings
    graph: KernelGraph | None = None
    model: ModelSpec | None = None


def read_job(path: Path, overrides: dict[str, Any]) -> Job:
    if is_model_spec(path):
        model = load_spec(path)
        return Job(path, settings_for(path, model.search_settings, overrides), model=model)
    graph = load(path)
    return Job(path, settings_for(path, graph.search_settings, overrides), graph=graph)


def run_model(
    job: Job, cache: Cache, mode: str, progress: str, say: Callable[[str], None], tables: bool
) -> tuple[str, str, dict[str, Any]]:
    """A model spec: its plan, each layer program's outcome said as it comes; (status, key, its JSON)."""
    assert job.model is not None
    n_sms = device_spec(job.settings.device).sm_count
    outcome = search_model(job.model, job.settings, cache, mode, n_sms, progress, say)
    for name, o in outcome.programs.items():
        if o.result is not None and tables:
            say(f"-- {name}: {o.note}")
            for line in summary(o.result):
                say(f"   {line}")
    say(outcome.note)
    if isinstance(outcome.lowering, str):
        say(f"task bodies: {outcome.lowering}")
    else:
        for name, r in outcome.lowering.items():
            say(f"-- {name}: lowered to task bodies, {r}".splitlines()[0])
    doc = {
        "model": job.model.name,
        "plan": outcome.plan.to_json() if outcome.plan else None,
        "programs": {n: o.result.to_json() for n, o in outcome.programs.items() if o.result is not None},
        "lowering": outcome.lowering_json(),
    }
    return outcome.status, outcome.key, doc


@click.command("search")
@click.argument("specs", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--budget",
    "budget_s",
    type=Checked("budget", float, SETTING_CHECKS["budget_s"]),
    help="Wall time per program in seconds, search, checks and timing included (default: the spec's, else 120).",
)
@click.option(
    "--states",
    type=Checked("number of states", int, SETTING_CHECKS["states"]),
    help="States the enumeration visits at most: the same result on any machine (default: the preset's).",
)
@click.option(
    "--device",
    type=Checked("device", str, SETTING_CHECKS["device"]),
    help=f"Device class to rank for ({', '.join(DEVICES)}; default: the GPU present, else h100).",
)
@click.option(
    "--preset", type=Checked("preset", str, SETTING_CHECKS["preset"]), help="Search preset (default: the spec's)."
)
@click.option(
    "--seed",
    type=Checked("seed", int, SETTING_CHECKS["seed"]),
    help="Seed of the search and of the test inputs (default: the spec's, else 0).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result JSON (a list for several specs), not tables.")
@click.option("--out", type=OutputFile(), help="Write the result JSON here.")
@click.option("--offline", is_flag=True, help="Never search: a cache miss runs the unfused program and says so.")
@click.option("--require-hit", is_flag=True, help="Never search: a cache miss exits 1 (for CI).")
@click.option(
    "--progress",
    type=click.Choice(["bar", "plain", "json", "none"]),
    default=None,
    help="How a search reports progress.",
)
@click.option(
    "--cache-dir",
    type=Folder(),
    help="Cache folder (default: $SUPEROPT_CACHE_DIR or ~/.cache/superopt).",
)
@click.option(
    "--ray",
    "ray_address",
    metavar="ADDRESS",
    help="Enumerate and verify on a Ray cluster: auto, local, host:port or ray://host:port (superopt[ray]).",
)
@reports_errors
def search_command(
    specs: tuple[Path, ...],
    budget_s: float | None,
    states: int | None,
    device: str | None,
    preset: str | None,
    seed: int | None,
    as_json: bool,
    out: Path | None,
    offline: bool,
    require_hit: bool,
    progress: str | None,
    cache_dir: Path | None,
    ray_address: str | None,
) -> None:
    """Find the fastest verified µGraph of each SPEC (YAML, JSON graph, .onnx or .pt2), cache first. A model
    spec (YAML with a `model:` section, or an HF config.json) searches each program of its decode step and
    plans its megakernel."""
    overrides = {"preset": preset, "budget_s": budget_s, "states": states, "seed": seed, "device": device}
    jobs = [read_job(spec, overrides | {"ray": ray_address}) for spec in specs]  # bad input fails before any search
    if ray_address is not None and not (offline or require_hit):
        connect(ray_address)
    cache = Cache(cache_dir)
    mode = "require-hit" if require_hit else "offline" if offline else "search"
    say = (lambda line: click.echo(line, err=True)) if as_json else click.echo
    statuses, docs = [], []
    for job in jobs:
        if job.model is not None:
            say(f"== {job.model.name} ({job.path}): a model")
            status, key, doc = run_model(job, cache, mode, progress or "auto", say, tables=not as_json)
        else:
            assert job.graph is not None
            say(f"== {job.graph.name} ({job.path})")
            outcome = optimize_program(job.graph, job.settings, cache, mode, progress or "auto", say=say)
            say(outcome.note)
            if outcome.result is not None and not as_json:
                click.echo(table(outcome.result))
                for line in summary(outcome.result):
                    click.echo(line)
            status, key, doc = outcome.status, outcome.key, outcome.result.to_json() if outcome.result else None
        statuses.append(status)
        if doc is not None and status != "miss":
            docs.append(doc | {"cache": {"status": status, "key": key}})
    text = json.dumps(docs[0] if len(specs) == 1 and docs else docs, indent=1) + "\n"
    if as_json:
        click.echo(text, nl=False)
    if out is not None and docs:
        try:
            write_atomic(out, text)
        except OSError as e:
            raise SuperoptError(f"{out}: cannot write: {e.strerror or e}") from None
        click.echo(f"wrote {out}", err=True)
    hits = sum(status == "hit" for status in statuses)
    misses = len(statuses) - hits
    click.echo(f"cache: {hits} hit{'s' * (hits != 1)}, {misses} miss{'es' * (misses != 1)}", err=True)
    if "miss" in statuses:
        sys.exit(EXIT_MISS)
