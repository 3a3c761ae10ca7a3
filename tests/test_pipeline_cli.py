"""`superopt search`: cache first, search on a miss, --offline, --require-hit, --json/--out, the trial log; and
the pipeline's CPU path (ranked by the model, the winner run under the Triton interpreter)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from graphs import import_fused

import superopt
from superopt import pipeline
from superopt.cache import Cache, TrialLog
from superopt.cli.main import main
from superopt.cli.search_cmd import search_command
from superopt.interpret import random_inputs, run
from superopt.kernels import compile
from superopt.kernels.cost import predict
from superopt.kernels.device import DEVICES
from superopt.kernels.timing import TOLERANCE, Measurement, relative_error
from superopt.result import Candidate, Verification
from superopt.search_space import SearchResult, api

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

SPEC = """
name: tiny_gated_mlp
dims: {B: 2, D: 64, N: 16}
inputs:
  x: {shape: [B, D], dtype: float16}
  w1: {shape: [D, N], dtype: float16}
  w2: {shape: [D, N], dtype: float16}
ops:
  - o = mul(silu(x @ w1), x @ w2)
outputs: [o]
search: {budget_s: 2}
"""


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One `superopt search --json --out` run on a miss: (spec path, cache dir, its output, the result JSON)."""
    root = tmp_path_factory.mktemp("search")
    spec, out, cache = root / "tiny.yaml", root / "result.json", root / "cache"
    spec.write_text(SPEC)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SUPEROPT_CACHE_DIR", str(cache))  # generated kernels too
        result = CliRunner().invoke(
            search_command, [str(spec), "--cache-dir", str(cache), "--progress", "none", "--out", str(out)]
        )
    assert result.exit_code == 0, result.output
    return spec, cache, result.output, json.loads(out.read_text())


def test_miss_searches_and_stores_a_result(searched):
    spec, cache, output, doc = searched
    assert "timing needs a GPU" in output and "cache: 0 hits, 1 miss" in output
    assert doc["cache"]["status"] == "searched" and doc["measured"] is False and doc["device"] == "h100"
    assert doc["settings"]["budget_s"] == 2  # from the spec's search section
    assert set(doc["versions"]) == {"superopt", "torch", "triton"}
    stored = Cache(cache).get(doc["key"])
    assert stored is not None and stored.to_json()["best"] == doc["best"]
    best = doc["best"]
    assert best["status"] in ("ok", "unchecked") and best["verify"]
    ranks = [c["predicted_us"] for c in doc["candidates"]]
    assert ranks == sorted(ranks) and 1 <= len(ranks) <= doc["candidates_total"]
    if len(ranks) == doc["candidates_total"]:  # all shown: the input program is always among them
        assert any(c["source"] == "program" for c in doc["candidates"])


def test_trial_log_lies_beside_the_entry(searched):
    spec, cache, output, doc = searched
    lines = [json.loads(line) for line in Cache(cache).trial_log_path(doc["key"]).read_text().splitlines()]
    assert lines and all({"hash", "status", "predicted_us", "measured_us"} <= set(line) for line in lines)
    assert any(line["hash"] == doc["best"]["hash"] and line["status"] == doc["best"]["status"] for line in lines)


def test_winner_runs_under_the_interpreter_like_the_reference(searched):
    spec, cache, output, doc = searched
    program = superopt.load(spec)
    winner = superopt.serialize.from_json(doc["best"]["graph"])
    inputs = random_inputs(program, seed=5, scale=0.5)
    (out,) = compile(winner)(*(inputs[n] for n in program.inputs))
    ref = run(program, inputs, "float64")[0]
    assert relative_error(out, ref) < TOLERANCE["float16"]


def test_hit_says_so_and_runs_no_search(searched, monkeypatch):
    spec, cache, output, doc = searched

    def no_search(*args, **kwargs):
        raise AssertionError("a cache hit must not search")

    monkeypatch.setattr(pipeline, "search", no_search)
    result = CliRunner().invoke(search_command, [str(spec), "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    assert f"cache hit {doc['key'][:16]}" in result.output and "cache: 1 hit, 0 misses" in result.output
    assert "predicted us" in result.output and doc["best"]["hash"][:12] in result.output


def test_require_hit_exit_codes(searched, tmp_path):
    spec, cache, output, doc = searched
    runner = CliRunner()
    hit = runner.invoke(search_command, [str(spec), "--cache-dir", str(cache), "--require-hit"])
    assert hit.exit_code == 0 and "cache: 1 hit" in hit.output
    # another seed is another key: a miss, and with --require-hit no search and exit 1; every spec is reported
    miss = runner.invoke(
        search_command, [str(spec), str(spec), "--seed", "7", "--cache-dir", str(cache), "--require-hit"]
    )
    assert (
        miss.exit_code == 1 and "--require-hit: no search" in miss.output and "cache: 0 hits, 2 misses" in miss.output
    )
    empty = runner.invoke(search_command, [str(spec), "--cache-dir", str(tmp_path), "--require-hit"])
    assert empty.exit_code == 1 and not (tmp_path / "results").exists()
    bad = runner.invoke(search_command, [str(tmp_path / "missing.yaml"), "--require-hit"])
    assert bad.exit_code == 2 and "cannot read" in bad.output


def test_offline_miss_runs_the_unfused_program(searched, tmp_path, monkeypatch):
    spec, cache, output, doc = searched

    def no_search(*args, **kwargs):
        raise AssertionError("--offline must not search")

    monkeypatch.setattr(pipeline, "search", no_search)
    result = CliRunner().invoke(search_command, [str(spec), "--cache-dir", str(tmp_path), "--offline", "--json"])
    assert result.exit_code == 0, result.output
    assert "offline, so the unfused program" in result.output
    text = result.output[result.output.index("{") : result.output.rindex("}") + 1]
    offline = json.loads(text)
    assert offline["cache"]["status"] == "offline" and offline["best"]["source"] == "program"
    assert offline["best"]["status"] == "ok" and offline["best"]["error_vs_tolerance"] <= 1
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").glob("*.json"))
    # offline with the cache filled: the cached winner
    hit = CliRunner().invoke(search_command, [str(spec), "--cache-dir", str(cache), "--offline"])
    assert hit.exit_code == 0 and "cache hit" in hit.output


@pytest.mark.parametrize(
    "name, chunk",
    [
        ("rmsnorm_linear_bs1", "w[1] in 6144 chunks; x[0] in 2 chunks"),
        # one output of silu(x @ w1) * (x @ w2): fp16 rounding in silu's tail is a large relative error of that one
        # value, which the program itself makes in float16 too, so it is held to that, not to the dtype alone
        ("gated_mlp", "w1[1], w2[1] in 4096 chunks; x[0] in 8 chunks"),
    ],
)
def test_full_size_runs_on_one_chunk_and_says_so(tmp_path, name, chunk):
    spec = Path(__file__).resolve().parent.parent / "examples" / f"{name}.yaml"
    result = CliRunner().invoke(search_command, [str(spec), "--offline", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "timing needs a GPU" in result.output
    assert f"ran under the interpreter (one chunk: {chunk})" in result.output


def test_too_large_to_interpret_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "INTERPRETER_MAX_STEPS", 0)
    spec = Path(__file__).resolve().parent.parent / "examples" / "rmsnorm_linear_bs1.yaml"
    result = CliRunner().invoke(search_command, [str(spec), "--offline", "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "not run under the interpreter" in result.output and "block iterations" in result.output


def test_budget_bounds_the_whole_command(tmp_path):
    """`--budget 20` on the example whose full-size search takes longest (qknorm_gqa_bs8: its enumeration alone
    runs past 90 s here), through the console script: the whole command, Python's start and imports included,
    ends within 22 s, the budget says it cut the search, and the cache holds one whole entry."""
    cache = tmp_path / "cache"
    command = [sys.executable, "-m", "superopt.cli.main", "search", str(EXAMPLES / "qknorm_gqa_bs8.yaml")]
    command += ["--budget", "20", "--progress", "none", "--cache-dir", str(cache), "--json"]
    start = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"SUPEROPT_CACHE_DIR": str(cache)})
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert wall <= 22, f"{wall:.1f} s"
    assert doc["cut"] == ["time"] and doc["search"]["cut"] == ["time"] and doc["seconds"] <= 20
    assert doc["best"]["kernels"] < len(doc["program"]["ops"])  # the cut search still fused it
    files = sorted(p.name for p in (cache / "results").iterdir() if p.name != ".lock")
    assert files == [f"{doc['key']}.json", f"{doc['key']}.trials.jsonl"]


def test_states_gives_the_same_candidates_for_any_number_of_workers(tmp_path, monkeypatch):
    """`--states N` ends the enumeration at a count: two runs on one or two processes (the search takes the CPU
    count) rank the same candidates, cut by that budget alone."""
    docs = []
    for cpus in (1, 2):
        monkeypatch.setattr(api.os, "cpu_count", lambda n=cpus: n)
        cache = tmp_path / f"cache{cpus}"
        monkeypatch.setenv("SUPEROPT_CACHE_DIR", str(cache))
        args = [str(EXAMPLES / "lora.yaml"), "--states", "3000", "--progress", "none", "--json"]
        result = CliRunner().invoke(search_command, [*args, "--cache-dir", str(cache)])
        assert result.exit_code == 0, result.output
        docs.append(json.loads(result.stdout))
    assert [d["search"]["workers"] for d in docs] == [1, 2]
    for d in docs:
        assert d["cut"] == ["states"] and d["search"]["states"] == 3000 and d["settings"]["states"] == 3000
    assert [c["hash"] for c in docs[0]["candidates"]] == [c["hash"] for c in docs[1]["candidates"]]
    assert docs[0]["candidates_total"] == docs[1]["candidates_total"] > 2
    assert docs[0]["search"]["plans"] == docs[1]["search"]["plans"]


@pytest.mark.parametrize(
    "value, message",
    [
        ("0", "expected a whole number of states in 1..10^12, got 0"),
        ("10000000000000", "expected a whole number of states in 1..10^12, got 10000000000000"),
        ("1.5", "'1.5' is not a valid number of states"),
        ("many", "'many' is not a valid number of states"),
    ],
)
def test_bad_states_is_one_line_exit_2(tmp_path, value, message):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(SPEC)
    args = ["search", str(spec), "--states", value, "--cache-dir", str(tmp_path)]
    result = CliRunner().invoke(main, args, prog_name="superopt")
    assert (
        result.exit_code == 2 and result.output == f"error: superopt search: Invalid value for '--states': {message}\n"
    )
    assert not (tmp_path / "results").exists()


def test_gpu_timing_runs_only_what_fits_the_budget(monkeypatch):
    """The GPU stage on a simulated clock (no GPU here): the candidates' timing (one worker, measure_all, whose
    own deadline handling tests/test_kernels_timing.py shows) ends at the stage's deadline, what it skipped says
    so, torch.compile with too little left is skipped, and the stage reports the cut; with less than
    MEASURE_MIN_S left no worker starts."""
    clock = {"now": 0.0}
    calls = []

    def measure_all(graphs, reference, deadline, timeout_s, seed, **kwargs):
        calls.append(deadline)
        clock["now"] = deadline - 2.0
        return [Measurement("ok", median_us=10.0 + k) for k in range(3)] + [Measurement("skipped", message="why")]

    def no_compile(fn):
        raise AssertionError("torch.compile must not start with too little of the budget left")

    monkeypatch.setattr(pipeline, "time", SimpleNamespace(monotonic=lambda: clock["now"]))
    monkeypatch.setattr(pipeline, "measure_all", measure_all)
    monkeypatch.setattr(pipeline, "fresh_compile", no_compile)
    monkeypatch.setattr(pipeline, "bench", lambda fn, cuda_graph: SimpleNamespace(median_us=50.0))
    monkeypatch.setattr(pipeline, "random_device_inputs", lambda graph, seed, scale: random_inputs(graph, seed, scale))
    program = superopt.load(EXAMPLES / "rmsnorm_linear_bs1.yaml")
    tried = [dataclasses.replace(api.program_candidate(program, DEVICES["h100"]), hash=f"{k}" * 64) for k in range(4)]
    log = TrialLog(None, "0" * 64)
    baselines, trials, cut = pipeline._time_on_gpu(program, tried, 0, log, None, deadline=20.0)
    assert calls == [20.0]
    assert [trials[c.hash].status for c in tried] == ["ok", "ok", "ok", "skipped"]
    assert [trials[c.hash].measured_us for c in tried[:3]] == [10.0, 11.0, 12.0]
    assert baselines["eager"].status == "ok" and baselines["torch.compile"].status == "skipped"
    assert cut
    clock["now"] = 17.0
    baselines, trials, cut = pipeline._time_on_gpu(program, tried, 0, log, None, deadline=20.0)
    assert calls == [20.0] and cut
    assert {trials[c.hash].message for c in tried} == {"not timed: 3 s left of the budget, 5 s needed"}


# The GPU path end to end without a GPU: `on_gpu` says yes, the timing worker is a fake that follows the worker's
# protocol (kernels/timing.py main) on a clock scaled by SCALE, and what this process would run on the GPU (the
# eager baseline's inputs and timing) is stood in for. The budget and every estimate the pipeline plans with are
# scaled alike, so the plan is the one a `--budget 20` run makes (`_search_s` is linear in them), in a fifth of
# the time.
SCALE = 0.2

# `worker LOG START_S PER_S JOB OUT`: notes "start PID T" in LOG, sets up for START_S (torch, CUDA), waits for JOB
# ("job PID T"; orphaned, it ends), then takes PER_S per candidate, the k-th timed at 5 (k + 1) us.
GPU_WORKER = """
import json, os, sys, time
log_path, start_s, per_s, job_path, out_path = sys.argv[1:]
def note(what):
    with open(log_path, "a") as log:
        log.write(f"{what} {os.getpid()} {time.monotonic()}\\n")
note("start")
time.sleep(float(start_s))
while not os.path.exists(job_path):
    if os.getppid() != int(os.environ["SUPEROPT_TIMING_PARENT"]):
        sys.exit(0)  # orphaned, as the real worker ends
    time.sleep(0.01)
note("job")
job = json.load(open(job_path))
with open(out_path, "a") as out:
    for k, c in enumerate(job["candidates"]):
        time.sleep(float(per_s))
        out.write(json.dumps({"status": "ok", "median_us": 5.0 * (k + 1), "seconds": float(per_s)}) + "\\n")
        out.flush()
"""


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    """The GPU path on this machine: the fake worker, the estimates scaled, the eager baseline a sleep of its
    estimate; the Workers the pipeline starts (`workers`) and the fake's log (`events`: (what, pid, time))."""
    script, log = tmp_path / "gpu_worker.py", tmp_path / "worker.log"
    script.write_text(GPU_WORKER)
    log.touch()
    per_s = 0.8 * pipeline.MEASURE_MIN_S * SCALE  # a candidate takes a little less than the estimate
    command = (sys.executable, str(script), str(log), str(pipeline.WORKER_START_S * SCALE), str(per_s))
    workers = []

    class Recorded(pipeline.Worker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.created = time.monotonic()
            workers.append(self)

    def bench(fn, cuda_graph):  # the eager baseline: CUDA set-up here, its inputs, its timing
        time.sleep(pipeline.EAGER_S)  # scaled below
        return SimpleNamespace(median_us=50.0)

    def no_compile(fn):
        raise AssertionError("torch.compile must not start with too little of the budget left")

    monkeypatch.setattr(pipeline, "on_gpu", lambda: True)
    monkeypatch.setattr(pipeline, "TIMING_WORKER", command)
    monkeypatch.setattr(pipeline, "Worker", Recorded)
    monkeypatch.setattr(pipeline, "_measured_s", [])
    for name in ("WORKER_START_S", "EAGER_S", "MEASURE_MIN_S", "COMPILE_MIN_S"):
        monkeypatch.setattr(pipeline, name, getattr(pipeline, name) * SCALE)
    monkeypatch.setattr(pipeline, "bench", bench)
    monkeypatch.setattr(pipeline, "fresh_compile", no_compile)
    monkeypatch.setattr(pipeline, "random_device_inputs", lambda graph, seed, scale: random_inputs(graph, seed, scale))
    monkeypatch.setattr(pipeline.torch.cuda, "get_device_name", lambda: "fake GPU")

    def events():
        return [(what, int(pid), float(t)) for what, pid, t in (line.split() for line in log.read_text().splitlines())]

    return SimpleNamespace(workers=workers, events=events, per_s=per_s)


GPU_DIMS = {"B": 2, "D": 1024, "N": 256}


def _program_and_fused() -> tuple[superopt.KernelGraph, list[Candidate]]:
    """rmsnorm_linear_bs1 (small dims) and what a search of it finds: its one-kernel fused form, which the model
    ranks first, and the program itself."""
    program = superopt.load(EXAMPLES / "rmsnorm_linear_bs1.yaml", dims=GPU_DIMS)
    graph = import_fused().build("rmsnorm_linear_bs1", GPU_DIMS)
    h100 = DEVICES["h100"]
    found = Candidate.of(graph, predict(graph, h100).us, Verification("tested", tests=8), "search")
    unfused = api.program_candidate(program, h100)
    assert found.predicted_us < unfused.predicted_us and found.kernels < unfused.kernels
    return program, [found, unfused]


def _full_search(candidates, calls, fail=None):
    """A search that spends its whole budget (as a large example's does) and finds `candidates`."""

    def search(graph, budget_s, **kwargs):
        calls.append((time.monotonic(), budget_s))
        if fail is not None:
            time.sleep(0.5)  # a while into the search: the worker is setting up
            raise fail
        time.sleep(budget_s)
        calls.append((time.monotonic(), None))
        return SearchResult(list(candidates))

    return search


def _closed(w) -> bool:
    """The worker's process has ended (and was reaped) and its folder is gone."""
    return w.proc.returncode is not None and not Path(f"/proc/{w.proc.pid}").exists() and not w.job_path.parent.exists()


def test_a_search_that_uses_its_share_leaves_time_to_time_the_best_ranked_fused_candidate(fake_gpu, monkeypatch):
    """`--budget 20` (scaled) on a GPU: the worker starts before the search and sets up beside it, the search
    spends its whole share, and what is left times the eager baseline and the fused candidate the model ranked
    first, in that worker, which wins; the program's own timing is cut at the deadline, torch.compile skipped
    (it needs more than is left); the worker is gone when optimize_program returns."""
    program, candidates = _program_and_fused()
    calls = []
    monkeypatch.setattr(pipeline, "search", _full_search(candidates, calls))
    budget_s = 20 * SCALE
    begun = time.monotonic()
    outcome = pipeline.optimize_program(program, pipeline.Settings(budget_s=budget_s), None, progress="none")
    wall = time.monotonic() - begun
    result = outcome.result
    (searched, budget), (search_end, _) = calls
    assert budget == pytest.approx(pipeline.SEARCH_SHARE_GPU * budget_s, abs=0.1)  # the share, at 20 s
    rows = {row.hash: row for row in result.candidates}
    fused, unfused = candidates
    assert rows[fused.hash].rank == 0 and rows[fused.hash].trial.status == "ok"
    assert result.best.hash == fused.hash and result.best_trial.measured_us == 5.0
    assert rows[fused.hash].speedups == {"eager": 10.0}
    assert rows[unfused.hash].trial.status == "timeout" and rows[unfused.hash].trial.message == "the budget ended first"
    assert result.baselines["torch.compile"].status == "skipped" and result.cut == ("time",)
    assert wall <= budget_s + 0.3
    # one worker, started before the search and set up beside it, handed the job once the search had ended
    (worker,) = fake_gpu.workers
    (start, job) = fake_gpu.events()
    assert worker.created < searched and start[:2] == ("start", worker.proc.pid)
    assert start[2] + pipeline.WORKER_START_S < search_end < job[2] and job[1] == worker.proc.pid
    assert _closed(worker)
    assert pipeline.candidate_s() == pytest.approx(fake_gpu.per_s)  # learned from the candidate it timed


@pytest.mark.parametrize("how", ["search raises", "search interrupted", "eager inputs fail", "no time left"])
def test_the_timing_worker_is_killed_on_every_way_out(fake_gpu, monkeypatch, how):
    """Started before the search, the worker is gone after optimize_program on any way out: an error or Ctrl-C
    in the search, an error before the timing (the eager baseline's inputs), or a budget that leaves no time for
    timing (the worker then never gets a job)."""
    program, candidates = _program_and_fused()
    fail = {"search raises": RuntimeError("search failed"), "search interrupted": KeyboardInterrupt()}.get(how)
    monkeypatch.setattr(pipeline, "search", _full_search(candidates, [], fail))
    if how == "eager inputs fail":

        def no_inputs(graph, seed, scale):
            raise RuntimeError("CUDA error: out of memory")

        monkeypatch.setattr(pipeline, "random_device_inputs", no_inputs)
    # too small a budget to time even one candidate (the search keeps its share; timing is then skipped)
    settings = pipeline.Settings(budget_s=(5 if how == "no time left" else 20) * SCALE)
    if how == "no time left":
        result = pipeline.optimize_program(program, settings, None, progress="none").result
        assert {row.trial.status for row in result.candidates} == {"skipped"}
        assert [e[0] for e in fake_gpu.events()] == ["start"]  # never handed a job
    else:
        with pytest.raises((RuntimeError, KeyboardInterrupt)):
            pipeline.optimize_program(program, settings, None, progress="none")
    (worker,) = fake_gpu.workers
    assert fake_gpu.events()[0][:2] == ("start", worker.proc.pid) and _closed(worker)


def test_on_a_gpu_the_search_leaves_time_for_the_eager_baseline_and_one_candidate(monkeypatch):
    """`_search_s` at the real estimates: at 16 and 20 s the search ends early enough that the eager baseline and
    one candidate (the estimate, then the slowest measured) still fit, and the worker's start fits in the search;
    a budget too small for that keeps the search its share."""
    monkeypatch.setattr(pipeline, "on_gpu", lambda: True)
    monkeypatch.setattr(pipeline, "_measured_s", [])
    program = superopt.load(EXAMPLES / "rmsnorm_linear_bs1.yaml", dims=GPU_DIMS)
    usable = 1 - pipeline.END_S
    for budget_s, learned, expected in [(20, [], 10.0), (16, [], 7.2), (60, [], 30.0), (20, [2.0, 9.0], 7.0)]:
        monkeypatch.setattr(pipeline, "_measured_s", learned)
        search_s = pipeline._search_s(program, budget_s)
        assert search_s == pytest.approx(expected)
        assert search_s + pipeline.EAGER_S + pipeline.candidate_s() <= usable * budget_s + 1e-9
        assert search_s >= pipeline.WORKER_START_S
    monkeypatch.setattr(pipeline, "_measured_s", [])
    assert pipeline._search_s(program, 10) == pipeline.SEARCH_SHARE_GPU * 10
