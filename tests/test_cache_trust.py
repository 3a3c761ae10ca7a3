"""The cache never trusts its files: tampered winners, programs and hashes, corrupt bytes, wrong field types and
non-finite numbers are quarantined misses (never served); keys never become paths outside the cache; imports are
checked whole before anything is written; entries are signed here; a held lock times out with one line."""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import json
import os
import shutil
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from superopt import cache as cache_module
from superopt.cache import EXPORT_FORMAT, Cache, read_entry
from superopt.capture import optimize
from superopt.cli.cache_cmd import cache_command
from superopt.cli.search_cmd import search_command
from superopt.errors import SuperoptError
from superopt.kernels.timing import TOLERANCE, relative_error
from superopt.pipeline import trusted_winner
from superopt.result import Result
from superopt.serialize import from_json, graph_hash

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

SPEC = """
name: trust_rmsnorm_silu
dims: {B: 2, D: 64, N: 16}
inputs:
  x: {shape: [B, D], dtype: float16}
  w: {shape: [D, N], dtype: float16}
ops:
  - y = rms_norm(x, eps=1e-6)
  - o = silu(y @ w)
outputs: [o]
search: {budget_s: 2}
"""
SWAP = {"silu": "sigmoid", "div": "mul", "mul": "div", "accum_sum": "accum_max"}


def rmsnorm_silu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.silu(F.rms_norm(x, (x.shape[-1],), eps=1e-6) @ w)


def float64_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return F.silu(x / torch.sqrt(x.square().mean(-1, keepdim=True) + 1e-6) @ w.double())


def ops(graph: dict) -> list[dict]:
    """A graph JSON's ops, kernel level and inside each kernel's block graph."""
    return [o for op in graph["ops"] for o in [op, *(op.get("block") or {}).get("ops", [])]]


def swap_op(entry: dict) -> None:
    op = next(o for o in ops(entry["best"]["graph"]) if o["op"] in SWAP)
    op["op"] = SWAP[op["op"]]


def change_eps(entry: dict) -> None:
    next(o for o in ops(entry["best"]["graph"]) if "eps" in o.get("attrs", {}))["attrs"]["eps"] = 0.5


def scale_by_2(entry: dict) -> None:
    graph = entry["best"]["graph"]
    graph["ops"].append({"op": "mul_scalar", "inputs": graph["outputs"], "outputs": ["scaled"], "attrs": {"c": 2.0}})
    graph["outputs"] = ["scaled"]


WINNER_TAMPERS = {"op": swap_op, "eps": change_eps, "scale": scale_by_2}


def tampered(entry: dict, how: str) -> dict:
    """`entry` changed as an attacker would: a winner tampered with and its hash recomputed (only verification can
    tell), or the stored program hash or the program itself changed."""
    bad = copy.deepcopy(entry)
    bad.pop("signature", None)
    if how in WINNER_TAMPERS:
        WINNER_TAMPERS[how](bad)
        bad["best"]["hash"] = graph_hash(from_json(bad["best"]["graph"]))
        bad["best"]["source"] = "search"
        read_entry(bad, bad["key"])  # consistent on its face: the verifier must catch it
    elif how == "program_hash":
        bad["program_hash"] = "0" * 64
    else:
        bad["program"]["ops"][0]["attrs"]["eps"] = 0.5
    return bad


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A cache filled by one `superopt search` of SPEC: (spec path, cache dir, its entry)."""
    root = tmp_path_factory.mktemp("trust")
    spec, cache = root / "trust.yaml", root / "cache"
    spec.write_text(SPEC)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUPEROPT_CACHE_DIR", str(cache))
        result = CliRunner().invoke(search_command, [str(spec), "--cache-dir", str(cache), "--progress", "none"])
    assert result.exit_code == 0, result.output
    [stored] = list(Cache(cache).entries())
    return spec, cache, stored.doc


@pytest.fixture
def planted(base, tmp_path, monkeypatch):
    """A copy of the base cache and a function that writes text as its entry's file."""
    spec, source, entry = base
    root = tmp_path / "cache"
    shutil.copytree(source, root)
    monkeypatch.setenv("SUPEROPT_CACHE_DIR", str(root))
    path = Cache(root).path(entry["key"])

    def plant(text: str | bytes) -> None:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())

    return spec, root, entry, plant


def cache_warnings(seen: list) -> list[str]:
    return [str(w.message) for w in seen if str(w.message).startswith("cache entry")]


def search(*args: str) -> tuple[object, list[str]]:
    """`superopt search ARGS`, and the cache's warnings."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = CliRunner().invoke(search_command, [*args, "--progress", "none"])
    return result, cache_warnings(seen)


@pytest.mark.parametrize("how", [*WINNER_TAMPERS, "program_hash", "program"])
def test_tampered_entry_is_never_served_by_the_cli(planted, how):
    spec, root, entry, plant = planted
    bad = json.dumps(tampered(entry, how))
    plant(bad)
    result, warned = search(str(spec), "--offline", "--json", "--cache-dir", str(root))
    assert result.exit_code == 0, result.output
    assert "cache hit" not in result.output and "offline, so the unfused program" in result.output
    doc = json.loads(result.output[result.output.index("{") : result.output.rindex("}") + 1])
    assert doc["best"]["source"] == "program" and doc["best"]["hash"] == entry["program_hash"]
    assert len(warned) == 1 and entry["key"][:16] in warned[0] and "quarantine" in warned[0], warned
    assert "\n" not in warned[0]
    quarantine = root / "results" / "quarantine"
    assert (quarantine / f"{entry['key']}.json").read_text() == bad
    # planted again: --require-hit misses (exit 1), and the first quarantined file is kept
    plant(bad)
    result, warned = search(str(spec), "--require-hit", "--cache-dir", str(root))
    assert result.exit_code == 1 and "cache hit" not in result.output and len(warned) == 1
    assert sorted(p.name for p in quarantine.glob("*.json")) == [f"{entry['key']}.1.json", f"{entry['key']}.json"]
    ls = CliRunner().invoke(cache_command, ["--cache-dir", str(root), "ls"])
    assert ls.exit_code == 0 and ls.output.count("(quarantined)") == 2 and entry["key"][:16] in ls.output


@pytest.mark.parametrize("how", WINNER_TAMPERS)
def test_tampered_entry_is_never_served_by_optimize(tmp_path, monkeypatch, how):
    monkeypatch.setenv("SUPEROPT_CACHE_DIR", str(tmp_path))
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 64, generator=gen).half(), (torch.randn(64, 16, generator=gen) / 8).half()
    expected = float64_reference(x, w)
    first = optimize(budget_s=2, cache_dir=tmp_path)(rmsnorm_silu)
    assert relative_error(first(x, w), expected) < TOLERANCE["float16"]
    cache = Cache(tmp_path)
    [stored] = list(cache.entries())
    path, entry = stored.path, stored.doc
    bad = json.dumps(tampered(entry, how))
    for mode in ("offline", "require-hit", "search"):
        path.write_text(bad)
        fn = optimize(mode=mode, budget_s=2, cache_dir=tmp_path)(rmsnorm_silu)
        with pytest.warns(UserWarning, match=f"cache entry {entry['key'][:16]}.*quarantine"):
            if mode == "require-hit":
                with pytest.raises(SuperoptError, match="cache miss"):
                    fn(x, w)
                continue
            out = fn(x, w)
        assert [o.status for o in fn.outcomes] == ["offline" if mode == "offline" else "searched"]
        assert relative_error(out, expected) < TOLERANCE["float16"]
    assert cache.get(entry["key"], trusted_winner) is not None  # the search stored a good entry again


@pytest.mark.parametrize(
    "content",
    [
        os.urandom(300),
        "wrong types",
        '{"format": "superopt.result/1", "key": "%s", "settings": {"budget_s": NaN}}',
        "budget Infinity",
    ],
)
def test_corrupt_entry_never_breaks_ls_show_export_and_a_search_repairs_it(planted, tmp_path, content):
    spec, root, entry, plant = planted
    if content == "wrong types":
        bad = copy.deepcopy(entry)
        bad["best"]["kernels"], bad["settings"]["seed"] = "1", 0.5
        content = json.dumps(bad)
    elif content == "budget Infinity":
        content = json.dumps(entry).replace('"budget_s": 2', '"budget_s": Infinity')
        assert "Infinity" in content
    elif isinstance(content, str):
        content = content % entry["key"]
    plant(content)
    runner = CliRunner()
    with pytest.warns(UserWarning, match="corrupt or untrusted"):
        ls = runner.invoke(cache_command, ["--cache-dir", str(root), "ls"])
    assert ls.exit_code == 0 and "(quarantined)" in ls.output and "0 entries, 1 quarantined" in ls.output
    show = runner.invoke(cache_command, ["--cache-dir", str(root), "show", entry["key"][:8]])
    assert show.exit_code == 2 and "no entry" in show.output
    export = runner.invoke(cache_command, ["--cache-dir", str(root), "export", str(tmp_path / "out.json")])
    assert export.exit_code == 0 and "exported 0 entries" in export.output
    plant(content)  # back in place, for the search to meet
    result, warned = search(str(spec), "--cache-dir", str(root))
    assert result.exit_code == 0 and "cache hit" not in result.output and len(warned) == 1
    read_entry(json.loads(Cache(root).path(entry["key"]).read_text()), entry["key"])
    result, warned = search(str(spec), "--require-hit", "--cache-dir", str(root))
    assert result.exit_code == 0 and "cache hit" in result.output and not warned


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("key", ["../../x", "/ABSOLUTE/x", "", "x" * 300, "A" * 64, 123, None])
def test_import_with_a_bad_key_writes_nothing(base, tmp_path, key):
    spec, source, entry = base
    bad = copy.deepcopy(entry)
    bad["key"] = key.replace("/ABSOLUTE", str(tmp_path)) if isinstance(key, str) else key
    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps({"format": EXPORT_FORMAT, "entries": [entry, bad]}))
    (tmp_path / "cache").mkdir()
    before = tree(tmp_path)
    result = CliRunner().invoke(cache_command, ["--cache-dir", str(tmp_path / "cache"), "import", str(bundle)])
    assert result.exit_code == 2 and "entries[1]" in result.output and "not a cache key" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert tree(tmp_path) == before  # not even the valid entries[0]


def test_import_refuses_a_tampered_winner(base, tmp_path):
    spec, source, entry = base
    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps({"format": EXPORT_FORMAT, "entries": [tampered(entry, "scale")]}))
    result = CliRunner().invoke(cache_command, ["--cache-dir", str(tmp_path / "cache"), "import", str(bundle)])
    assert result.exit_code == 2 and "entries[0]" in result.output and "does not compute its program" in result.output
    assert not (tmp_path / "cache" / "results").exists()


def test_entries_are_signed_here_and_imported_elsewhere(base, tmp_path):
    spec, source, entry = base
    runner = CliRunner()
    assert (source / ".key").stat().st_mode & 0o777 == 0o600
    ls = runner.invoke(cache_command, ["--cache-dir", str(source), "ls"])
    assert ls.exit_code == 0 and "local" in ls.output
    bundle = tmp_path / "bundle.json"
    assert runner.invoke(cache_command, ["--cache-dir", str(source), "export", str(bundle)]).exit_code == 0
    assert (source / ".key").read_bytes().hex() not in bundle.read_text()
    there = tmp_path / "there"
    assert runner.invoke(cache_command, ["--cache-dir", str(there), "import", str(bundle)]).exit_code == 0
    ls = runner.invoke(cache_command, ["--cache-dir", str(there), "ls"])
    assert ls.exit_code == 0 and "imported" in ls.output and "local" not in ls.output
    unsigned = {k: v for k, v in entry.items() if k != "signature"}
    assert Cache(there).origin(unsigned) == "unsigned"
    # a signature tells origin only: a locally signed entry with a tampered winner is still refused
    Cache(there).put(Result.from_json(tampered(entry, "scale")))
    assert Cache(there).origin(json.loads(Cache(there).path(entry["key"]).read_text())) == "local"
    with pytest.warns(UserWarning, match="does not compute its program"):
        assert Cache(there).get(entry["key"], trusted_winner) is None


def test_a_held_lock_says_so_then_times_out(base, tmp_path, monkeypatch):
    spec, source, entry = base
    cache = Cache(tmp_path)
    cache.results.mkdir(parents=True)
    holder = open(cache.results / ".lock", "w")  # its own open file: flock conflicts as with another process
    fcntl.flock(holder, fcntl.LOCK_EX)
    monkeypatch.setattr(cache_module, "LOCK_NOTE_S", 0.1)
    monkeypatch.setenv("SUPEROPT_LOCK_TIMEOUT_S", "0.4")
    with pytest.warns(UserWarning, match="waiting for the cache lock"):
        with pytest.raises(SuperoptError, match=r"\.lock: still held by another superopt process after 0.4 s"):
            cache.put(Result.from_json(entry))
    assert cache.get(entry["key"]) is None
    monkeypatch.setenv("SUPEROPT_LOCK_TIMEOUT_S", "30")
    threading.Timer(0.5, holder.close).start()  # the holder lets go: the waiting put goes on
    with pytest.warns(UserWarning, match="waiting for the cache lock"):
        assert cache.put(Result.from_json(entry))
    assert cache.get(entry["key"]).to_json() == {k: v for k, v in entry.items() if k != "signature"}


@pytest.mark.parametrize("days", ["-1", "nan", "inf"])
def test_clear_rejects_a_negative_or_non_finite_age(tmp_path, days):
    result = CliRunner().invoke(cache_command, ["--cache-dir", str(tmp_path), "clear", "--older-than", days])
    assert result.exit_code == 2 and "finite number of days >= 0" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_put_refuses_non_finite_numbers(base, tmp_path):
    spec, source, entry = base
    result = Result.from_json(entry)
    for field, value in (("settings", result.settings | {"budget_s": float("nan")}), ("search", {"x": float("inf")})):
        with pytest.raises(SuperoptError, match="cannot store"):
            Cache(tmp_path).put(dataclasses.replace(result, **{field: value}))
    assert not Cache(tmp_path).path(entry["key"]).exists()
