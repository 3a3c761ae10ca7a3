"""The result cache: keys, hits and misses, corrupt entries, concurrent writers, budget upgrades, export/import."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import warnings

import pytest
from click.testing import CliRunner

import superopt
from superopt import pipeline
from superopt.cache import Cache, cache_key, versions
from superopt.cli.cache_cmd import cache_command
from superopt.pipeline import Settings, optimize_program
from superopt.search_space.api import search_preset

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

SETTINGS = {"preset": None, "seed": 0, "prune": True}


def rmsnorm_linear(b: int = 2, d: int = 64, n: int = 16, dtype: str = "float16", names=("x", "w", "y", "o")):
    g = superopt.Graph("rmsnorm_linear")
    x, w = g.input(names[0], [b, d], dtype), g.input(names[1], [d, n], dtype)
    g.output(g.matmul(g.rms_norm(x, eps=1e-6, out=names[2]), w, out=names[3]))
    return g


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    """One real result (a short search on a tiny program), for the tests to store, break and move."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUPEROPT_CACHE_DIR", str(root))
        outcome = optimize_program(rmsnorm_linear(), Settings(budget_s=2), Cache(root), progress="none")
    assert outcome.status == "searched"
    return outcome.result


def test_key_follows_program_settings_device_and_versions_not_names():
    key = cache_key(rmsnorm_linear(), SETTINGS, "h100")
    assert cache_key(rmsnorm_linear(names=("a", "b", "c", "d")), SETTINGS, "h100") == key
    assert cache_key(rmsnorm_linear(), SETTINGS | {"budget_s": 999}, "h100") == key  # the budget is not in it
    different = [
        cache_key(rmsnorm_linear(b=4), SETTINGS, "h100"),
        cache_key(rmsnorm_linear(dtype="bfloat16"), SETTINGS, "h100"),
        cache_key(rmsnorm_linear(), SETTINGS, "a100"),
        cache_key(rmsnorm_linear(), SETTINGS | {"preset": "mlp"}, "h100"),
        cache_key(rmsnorm_linear(), SETTINGS | {"seed": 1}, "h100"),
        cache_key(rmsnorm_linear(), SETTINGS, "h100", versions() | {"superopt": "9.9.9"}),
        cache_key(rmsnorm_linear(), SETTINGS, "h100", versions() | {"torch": "0.0.1"}),
    ]
    assert len({key, *different}) == len(different) + 1


def test_hit_runs_no_search(tmp_path, monkeypatch, entry):
    cache = Cache(tmp_path)
    graph = rmsnorm_linear(names=("p", "q", "r", "s"))  # the same program under other names
    assert cache.get(entry.key) is None
    assert optimize_program(graph, Settings(budget_s=2), cache, mode="require-hit").status == "miss"
    cache.put(entry)

    def no_search(*args, **kwargs):
        raise AssertionError("a cache hit must not search")

    monkeypatch.setattr(pipeline, "search", no_search)
    outcome = optimize_program(graph, Settings(budget_s=2), cache)
    assert outcome.status == "hit" and outcome.key == entry.key
    assert superopt.graph_hash(outcome.winner) == entry.best.hash


def cut(entry, by: tuple[str, ...], budget_s: float = 2.0, states: int = 10**6):
    """`entry` as if the budgets `by` had cut it, with these budgets."""
    return dataclasses.replace(entry, cut=by, settings=entry.settings | {"budget_s": budget_s, "states": states})


def test_exhaustive_result_is_final_a_cut_one_is_searched_again(tmp_path, monkeypatch, entry):
    assert entry.exhaustive and entry.search["cut"] == []  # the tiny program's whole space fits in 2 s
    cache = Cache(tmp_path)
    cache.put(entry)

    def no_search(*args, **kwargs):
        raise AssertionError("a cache hit must not search")

    monkeypatch.setattr(pipeline, "search", no_search)
    for settings in (Settings(budget_s=2), Settings(budget_s=500), Settings(budget_s=1, states=10**9)):
        assert optimize_program(rmsnorm_linear(), settings, cache).status == "hit"  # final, whatever is asked
    for by, more, less in [
        (("time",), Settings(budget_s=5), Settings(budget_s=2, states=10**9)),
        (("states",), Settings(budget_s=2, states=10**6 + 1), Settings(budget_s=500, states=10**6)),
        (("states", "time"), Settings(budget_s=2, states=10**7), Settings(budget_s=1, states=10)),
    ]:
        cache = Cache(tmp_path / "-".join(by))
        cache.put(cut(entry, by))
        assert optimize_program(rmsnorm_linear(), less, cache).status == "hit"  # no more of what cut it
        assert optimize_program(rmsnorm_linear(), more, cache, mode="require-hit").status == "hit"
        with pytest.raises(AssertionError, match="must not search"):
            optimize_program(rmsnorm_linear(), more, cache)


def test_states_cut_search_is_searched_again_and_upgraded(tmp_path):
    """End to end: a search the states budget cuts is stored as cut; asked again with more states it searches
    again and stores the exhaustive result, which later requests hit whatever they ask."""
    cache, notes = Cache(tmp_path), []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUPEROPT_CACHE_DIR", str(tmp_path))
        first = optimize_program(rmsnorm_linear(), Settings(budget_s=20, states=20), cache, progress="none")
        assert first.status == "searched" and first.result.cut == ("states",)
        assert cache.get(first.key).cut == ("states",) and cache.get(first.key).settings["states"] == 20
        again = optimize_program(rmsnorm_linear(), Settings(budget_s=20, states=20), cache, progress="none")
        assert again.status == "hit"
        more = optimize_program(rmsnorm_linear(), Settings(budget_s=20), cache, progress="none", say=notes.append)
    assert more.status == "searched" and more.result.exhaustive
    default = search_preset(rmsnorm_linear()).max_states
    assert notes == [f"cached result {first.key[:16]} was cut by its states budget of 20 < {default}: searching again"]
    assert cache.get(first.key).exhaustive and more.result.search["states"] > 20
    assert (
        optimize_program(rmsnorm_linear(), Settings(budget_s=1, states=20), cache, mode="require-hit").status == "hit"
    )


def test_truncated_entry_is_one_warning_and_a_miss_then_rewritten(tmp_path, entry):
    cache = Cache(tmp_path)
    cache.put(entry)
    path = cache.path(entry.key)
    path.write_text(path.read_text()[:200])
    with pytest.warns(UserWarning, match="corrupt.*truncated or not JSON.*miss"):
        assert cache.get(entry.key) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second read of the same entry does not warn again
        assert cache.get(entry.key) is None
        assert cache.put(entry)
    stored = json.loads(path.read_text())
    assert stored.pop("signature") and stored == entry.to_json()
    assert cache.get(entry.key).to_json() == entry.to_json()


def test_wrong_content_is_a_miss(tmp_path, entry):
    cache = Cache(tmp_path)
    bad = entry.to_json()
    bad["best"]["graph"]["ops"][0]["op"] = "no_such_op"
    cache.path(entry.key).parent.mkdir(parents=True)
    cache.path(entry.key).write_text(json.dumps(bad))
    with pytest.warns(UserWarning, match="corrupt.*no_such_op"):
        assert cache.get(entry.key) is None


def test_larger_budget_upgrades_smaller_does_not(tmp_path, entry):
    cache = Cache(tmp_path)
    small, large = (cut(entry, ("time",), budget_s=b) for b in (1.0, 50.0))
    assert cache.put(small)
    assert cache.put(large)
    assert not cache.put(small)
    assert cache.get(entry.key).settings["budget_s"] == 50.0
    assert [e.path.name for e in cache.entries()] == [f"{entry.key}.json"]
    # an exhaustive result is final: it replaces any cut one, and none replaces it
    assert cache.put(dataclasses.replace(entry, settings=entry.settings | {"budget_s": 1.0}))
    assert not cache.put(cut(entry, ("time",), budget_s=1000.0)) and not cache.put(cut(entry, ("states",)))
    assert cache.get(entry.key).exhaustive


WRITER = """
import dataclasses, json, sys
from superopt.cache import Cache
from superopt.result import Result
entry = Result.from_json(json.loads(open(sys.argv[2]).read()))
for k in range(40):
    Cache(sys.argv[1]).put(dataclasses.replace(entry, settings=entry.settings | {"budget_s": float(sys.argv[3]) + k}))
"""


def test_two_processes_writing_one_key_leave_one_valid_entry(tmp_path, entry):
    source = tmp_path / "entry.json"
    source.write_text(json.dumps(cut(entry, ("time",)).to_json()))  # cut by its budget: a larger one upgrades it
    root = tmp_path / "cache"
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(source), str(start)]) for start in (0, 1000)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    cache = Cache(root)
    files = sorted(p.name for p in cache.results.iterdir() if p.name != ".lock")
    assert files == [f"{entry.key}.json"]  # no temporary file left behind
    stored = cache.get(entry.key)
    assert stored is not None and stored.settings["budget_s"] == 1039.0  # the larger budget won


def test_export_clear_import_hit(tmp_path, entry):
    runner = CliRunner()
    here, there, bundle = tmp_path / "here", tmp_path / "there", tmp_path / "bundle.json"
    Cache(here).put(entry)
    result = runner.invoke(cache_command, ["--cache-dir", str(here), "ls"])
    assert result.exit_code == 0 and entry.key[:16] in result.output and "rmsnorm_linear" in result.output
    result = runner.invoke(cache_command, ["--cache-dir", str(here), "show", entry.key[:10]])
    assert result.exit_code == 0 and "winner" in result.output and entry.best.hash[:16] in result.output
    assert runner.invoke(cache_command, ["--cache-dir", str(here), "export", str(bundle)]).exit_code == 0
    result = runner.invoke(cache_command, ["--cache-dir", str(here), "clear"])
    assert result.exit_code == 0 and "removed 1 files" in result.output
    assert Cache(here).get(entry.key) is None
    for root in (here, there):  # back where it was, and onto another machine's cache
        result = runner.invoke(cache_command, ["--cache-dir", str(root), "import", str(bundle)])
        assert result.exit_code == 0 and "imported 1 entries" in result.output
        outcome = optimize_program(rmsnorm_linear(), Settings(budget_s=2), Cache(root), mode="require-hit")
        assert outcome.status == "hit" and outcome.result.to_json() == entry.to_json()
    result = runner.invoke(cache_command, ["--cache-dir", str(here), "show", "ffff"])
    assert result.exit_code == 2 and "no entry" in result.output


def test_clear_older_than(tmp_path, entry):
    cache = Cache(tmp_path)
    settings = entry.settings | {"seed": 1}  # another seed: another key
    old = dataclasses.replace(entry, settings=settings, key=cache_key(entry.program, settings, entry.device))
    cache.put(old)
    cache.put(entry)
    long_ago = time.time() - 10 * 86400
    os.utime(cache.path(old.key), (long_ago, long_ago))
    assert cache.clear(older_than_days=5) == 1
    assert cache.get(old.key) is None and cache.get(entry.key).to_json() == entry.to_json()


def test_import_rejects_what_is_not_an_export(tmp_path):
    (tmp_path / "x.json").write_text('{"format": "something else"}')
    result = CliRunner().invoke(cache_command, ["--cache-dir", str(tmp_path), "import", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "not a cache export" in result.output
