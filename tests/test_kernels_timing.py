"""On-device timing and isolation (GPU tests), the parts of it that run anywhere, and the peer benchmark's
CPU-side pieces."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from graphs import import_file, import_fused

import superopt
from superopt.kernels import timing
from superopt.kernels.timing import Measurement, bench, check, measure, relative_error
from superopt.serialize import to_json

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


fused = import_fused()
peers = import_file(ROOT / "benchmarks" / "peers.py", "benchmarks_peers")

DIMS = {"B": 2, "D": 1024, "N": 256}


def _spec(name: str = "rmsnorm_linear_bs1") -> superopt.KernelGraph:
    return superopt.load(EXAMPLES / f"{name}.yaml", dims=DIMS)


def test_relative_error():
    ref = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert relative_error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert relative_error(torch.tensor([3.0, float("nan")]), ref) == math.inf


def test_check_holds_a_candidate_to_the_programs_own_error_in_its_dtype():
    """Tolerance 5e-3 for float16; where the program itself, op by op in float16, is off by 1e-2, a candidate
    may be off by up to 4 times that, and no more."""
    g = superopt.Graph("g")
    g.output(g.exp(g.input("x", (4,), "float16")))
    ref = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    own = ref * (1 + 1e-2)
    assert check(g, ref * (1 + 4e-3), [ref]) == pytest.approx(0.8)
    assert check(g, ref * (1 + 3e-2), [ref]) > 1  # without the program's own error: the dtype's tolerance
    assert check(g, ref * (1 + 3e-2), [ref], [own]) == pytest.approx(0.75)
    assert check(g, (ref * (1 + 5e-2),), [ref], [own]) > 1


def test_timeout_is_recorded_against_the_candidate():
    spec = _spec()
    result = measure(fused.build("rmsnorm_linear_bs1", DIMS), spec, timeout_s=0.01)
    assert result == Measurement("timeout", message="no result within 0.01 s")


# A stand-in for `python -m superopt.kernels.timing` that follows its protocol, `worker [LOG] JOB OUT`: it notes
# its pid in LOG (if given), waits for JOB (a Worker started without a job gets it later; orphaned, it ends),
# then writes one JSON result line per candidate to OUT, behaving as each candidate's name says.
FAKE_WORKER = """
import json, os, sys, time
*_, job_path, out_path = sys.argv
if len(sys.argv) > 3:
    with open(sys.argv[1], "a") as log:
        log.write(f"{os.getpid()}\\n")
while not os.path.exists(job_path):
    if os.getppid() != int(os.environ["SUPEROPT_TIMING_PARENT"]):
        sys.exit(0)  # orphaned, as the real worker ends
    time.sleep(0.01)
job = json.load(open(job_path))
with open(out_path, "a") as out:
    for k, c in enumerate(job["candidates"]):
        name = c["name"]
        if name.startswith("crash"):
            os._exit(1)
        if name.startswith("hang"):
            time.sleep(60)
        status = "crash" if name.startswith("poison") else "ok"
        median = float(name[2:]) if status == "ok" and name[2:].isdigit() else None
        out.write(json.dumps({"status": status, "median_us": median, "seconds": 0.001}) + "\\n")
        out.flush()
        if name.startswith("poison"):
            sys.exit(3)
"""


@pytest.fixture
def fake(tmp_path):
    """The fake worker's command, and the pids of the processes started with it (read from its log)."""
    script, log = tmp_path / "worker.py", tmp_path / "pids"
    script.write_text(FAKE_WORKER)
    log.touch()
    return SimpleNamespace(command=(sys.executable, str(script), str(log)), pids=lambda: _pids(log))


def _pids(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()]


def _wait(condition, within: float = 10.0) -> bool:
    end = time.monotonic() + within
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def _gone(pid: int) -> bool:
    """The process has ended (a zombie nobody reaped yet counts: it runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _closed(w: timing.Worker) -> bool:
    return w.proc.returncode is not None and _gone(w.proc.pid) and not w.job_path.parent.exists()


# a command that must not run: where measure_all should use the started worker, a fresh one would crash each
NO_FRESH_WORKER = (sys.executable, "-c", "raise SystemExit(9)")


def _named(name: str) -> superopt.KernelGraph:
    g = superopt.Graph(name)
    g.output(g.exp(g.input("x", (4,))))
    return g


@pytest.mark.parametrize("prestarted", [False, True])
def test_measure_all_blames_each_fault_on_its_candidate_and_goes_on(fake, prestarted):
    """One worker times the candidates while they behave; a crash, a hang past the timeout or a poisoned
    context costs the candidate it happened in, the rest are timed by a fresh worker; so too where the first
    worker was started before the job was known."""
    names = ["ok1", "crash", "ok2", "hang", "ok3", "poison", "ok4"]
    started = timing.Worker(fake.command) if prestarted else None
    got = timing.measure_all(
        [_named(n) for n in names], _named("ref"), timeout_s=1.0, worker=fake.command, started=started
    )
    assert [m.status for m in got] == ["ok", "crash", "ok", "timeout", "ok", "crash", "ok"]
    assert [m.median_us for m in got] == [1.0, None, 2.0, None, 3.0, None, 4.0]
    assert "exit code 1" in got[1].message and got[3].message == "no result within 1 s"
    pids = fake.pids()
    assert len(pids) == 4 and all(_gone(p) for p in pids)  # one worker, then one after each fault
    if prestarted:
        assert pids[0] == started.proc.pid and _closed(started)


def test_measure_all_skips_what_the_deadline_leaves_no_time_for(fake):
    graphs = [_named(n) for n in ["ok1", "hang", "ok2"]]
    deadline = time.monotonic() + 1.0
    got = timing.measure_all(graphs, _named("ref"), deadline, timeout_s=30, worker=fake.command)
    assert [m.status for m in got] == ["ok", "timeout", "skipped"]
    assert got[1].message == "the budget ended first" and time.monotonic() < deadline + 1.0


def test_a_started_worker_gets_the_job_and_its_results_come_back_in_order(fake):
    started = timing.Worker(fake.command)
    assert _wait(lambda: fake.pids() == [started.proc.pid])  # running, before any job exists
    assert started.waiting() and not started.job_path.exists()
    got = timing.measure_all(
        [_named(f"ok{k}") for k in (3, 1, 2)], _named("ref"), worker=NO_FRESH_WORKER, started=started
    )
    assert [(m.status, m.median_us, m.seconds) for m in got] == [
        ("ok", 3.0, 0.001),
        ("ok", 1.0, 0.001),
        ("ok", 2.0, 0.001),
    ]
    assert fake.pids() == [started.proc.pid] and _closed(started)


def test_a_started_worker_that_died_waiting_is_replaced(fake):
    started = timing.Worker((sys.executable, "-c", "raise SystemExit(5)"))
    assert _wait(lambda: not started.running()) and not started.waiting()
    got = timing.measure_all([_named("ok1"), _named("ok2")], _named("ref"), worker=fake.command, started=started)
    assert [m.status for m in got] == ["ok", "ok"] and len(fake.pids()) == 1 and _closed(started)


def test_a_started_worker_never_handed_a_job_is_closed(fake):
    """The deadline passed before the timing began, or there was nothing to time: no job, the worker killed."""
    for graphs, deadline in [([_named("ok1")], time.monotonic() - 1), ([], float("inf"))]:
        started = timing.Worker(fake.command)
        got = timing.measure_all(graphs, _named("ref"), deadline, worker=NO_FRESH_WORKER, started=started)
        assert [m.status for m in got] == ["skipped"] * len(graphs) and _closed(started)


def test_a_started_worker_is_closed_when_measure_all_raises(fake):
    """Ctrl-C while a candidate runs: measure_all raises, and the worker it was handed is gone with its folder."""
    started = timing.Worker(fake.command)
    interrupt = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    interrupt.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            timing.measure_all(
                [_named("ok1"), _named("hang")], _named("ref"), time.monotonic() + 20, 20, started=started
            )
    finally:
        interrupt.cancel()
    assert started.submitted and _closed(started)


def test_submit_hands_over_one_job():
    with timing.Worker(NO_FRESH_WORKER) as w:
        w.submit({"candidates": []})
        assert json.loads(w.job_path.read_text()) == {"candidates": []} and not w.waiting()
        with pytest.raises(RuntimeError, match="already has its job"):
            w.submit({"candidates": []})
    with timing.Worker(NO_FRESH_WORKER, {"candidates": []}) as w, pytest.raises(RuntimeError):
        w.submit({"candidates": []})
    assert _closed(w)


ORPHAN = """
import os, sys, time
from superopt.kernels.timing import Worker
w = Worker()
print(w.proc.pid, flush=True)
time.sleep(float(sys.argv[1]))
os._exit(0)  # killed, say: nothing closes the worker
"""


@pytest.mark.parametrize("after_s", [0.0, 2.5])
def test_the_worker_ends_when_the_process_that_started_it_dies(after_s):
    """The real worker (`python -m superopt.kernels.timing`, which on this machine finds no GPU to set up), its
    parent gone while it waits for its job: at once (the worker still importing torch) or once it waits."""
    proc = subprocess.run([sys.executable, "-c", ORPHAN, str(after_s)], capture_output=True, text=True, timeout=60)
    pid = int(proc.stdout)
    try:
        assert _wait(lambda: _gone(pid), within=20), "the orphaned worker still runs"
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_eager_program_is_the_spec():
    spec = _spec()
    inputs = superopt.random_inputs(spec, seed=0)
    got = peers.eager(spec)(*(inputs[n].double() for n in spec.inputs))
    (want,) = superopt.run(spec, inputs, precision="float64")
    torch.testing.assert_close(got, want)


def test_peer_table_ratios():
    ok = {"status": "ok", "median_us": 10.0}
    row = {
        "name": "w",
        "floor_us": 4.0,
        "superopt_graph": "fused",
        "predicted_us": 6.0,
        "results": {"eager": {"status": "ok", "median_us": 40.0}, "compile": {"status": "ok", "median_us": 20.0}}
        | {"max-autotune": {"status": "wrong"}, "superopt": ok},
    }
    line = peers.table([row]).splitlines()[2]
    assert line == "| w | 4.0 | 40.0 |  | 20.0 | wrong | 10.0 |  | fused | 6.0 | 2.00x | 0.40 |"


def test_peer_table_names_where_a_hand_fused_form_beats_the_search_by_more_than_3_percent():
    def row(name: str, hand_us: float) -> dict:
        results = {
            "superopt": {"status": "ok", "median_us": 10.0},
            "hand-fused": {"status": "ok", "median_us": hand_us},
        }
        return {"name": name, "floor_us": 1.0, "superopt_graph": "search", "predicted_us": 1.0, "results": results}

    text = peers.table([row("close", 9.8), row("behind", 9.0)])
    assert "| close | 1.0 |  |  |  |  | 10.0 | 9.8 |" in text
    assert text.splitlines()[-1] == "A hand-fused µGraph faster than superopt's pick by more than 3%: behind."


def test_peer_table_counts_wins_and_geometric_mean():
    def row(name: str, peer_us: float, ours_us: float) -> dict:
        results = {
            "compile": {"status": "ok", "median_us": peer_us},
            "superopt": {"status": "ok", "median_us": ours_us},
        }
        return {"name": name, "floor_us": 1.0, "superopt_graph": "fused", "predicted_us": 1.0, "results": results}

    last = peers.table([row("a", 40.0, 10.0), row("b", 10.0, 20.0)]).splitlines()[-1]
    assert last == "superopt beats the best peer on 1 of 2 workloads; geometric mean of best peer / superopt: 1.41x."


def _tile_sweep():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # tile_sweep imports its neighbour peers.py
    try:
        return import_file(ROOT / "benchmarks" / "tile_sweep.py", "benchmarks_tile_sweep")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_sweep_takes_each_workloads_candidates_from_the_last_search_file_that_has_it(tmp_path):
    def graph(name: str, n: int) -> superopt.KernelGraph:
        g = superopt.Graph(name)
        g.output(g.exp(g.input("x", (n, 16))))
        return g

    def results(path: Path, rows: dict[str, list[int]]) -> Path:
        tops = [{"workload": w, "top": [{"mugraph": to_json(graph(w, n))} for n in ns]} for w, ns in rows.items()]
        path.write_text(json.dumps({"rows": tops}))
        return path

    first = results(tmp_path / "a.json", {"a": [1, 2], "b": [3]})
    later = results(tmp_path / "b.json", {"b": [4, 5]})
    sweep = _tile_sweep()
    shapes = {w: [g.tensors["x"].shape[0] for _, _, g in sweep.searched([first, later], w)] for w in "abc"}
    assert shapes == {"a": [1, 2], "b": [4, 5], "c": []}
    assert [k for _, k, _ in sweep.searched([first], "a")] == [{"rank": 0}, {"rank": 1}]


def test_sweep_picks_the_fastest_of_the_models_top_five():
    sweep = _tile_sweep()
    # (predicted, measured): the model's top 5 are the first five; the fastest of all is the sixth
    times = [(1, 9.0), (2, 8.0), (3, 7.0), (4, 9.5), (5, 7.5), (6, 5.0), (7, 30.0)]
    rows = [
        {"workload": "w", "source": "fused", "knobs": {"k": i}, "status": "ok", "floor_us": 1.0}
        | {"predicted_us": p, "measured_us": m, "hash": str(i)}
        for i, (p, m) in enumerate(times)
    ]
    text, stats = sweep.summary(rows)
    assert stats["w"]["pick"]["hash"] == "2" and stats["w"]["best_us"] == 5.0 and not stats["w"]["best_in_top5"]
    # measured ranks 4 3 1 5 2 0 6 against predicted 0..6: sum of squared differences 54, 1 - 6 * 54 / (7 * 48)
    assert stats["w"]["spearman"] == pytest.approx(1 - 6 * 54 / (7 * 48))
    assert "Measured-best in the model's top 5: 0 of 1 workloads." in text


@gpu
@needs_gpu
def test_bench_orders_work():
    small = torch.empty(2**20, device="cuda")
    large = torch.empty(2**28, device="cuda")
    t_small = bench(lambda: small.mul_(1.0), reps=30)
    t_large = bench(lambda: large.mul_(1.0), reps=30)
    assert 0 < t_small.p20_us <= t_small.median_us <= t_small.p80_us
    assert t_large.median_us > 20 * t_small.median_us  # 256x the bytes
    # 2 GiB read and written at no more than 10 TB/s
    assert t_large.median_us > 2 * 2**30 / 10e12 * 1e6


@gpu
@needs_gpu
def test_measure_outcomes():
    spec = _spec()
    candidate = fused.build("rmsnorm_linear_bs1", DIMS)
    ok = measure(candidate, spec)
    assert ok.status == "ok" and ok.median_us > 0 and ok.error_vs_tolerance <= 1, ok
    # a different program on the same inputs: rejected by the float64 check
    plain = superopt.Graph("rmsnorm_linear")
    plain.output(plain.matmul(plain.input("x", spec.tensors["x"].shape), plain.input("w", spec.tensors["w"].shape)))
    wrong = measure(candidate, plain)
    assert wrong.status == "wrong" and wrong.error_vs_tolerance > 1, wrong
    # a graph the code generator cannot express: a rank-4 product
    g = superopt.Graph("rank4")
    g.output(g.matmul(g.input("a", (2, 2, 16, 16)), g.input("b", (2, 2, 16, 16))))
    failed = measure(g, g)
    assert failed.status == "compile_error" and "rank 4" in failed.message, failed


@gpu
@needs_gpu
@pytest.mark.parametrize("name", sorted(fused.FUSED))
def test_fused_examples_full_size_on_gpu(name):
    spec = superopt.load(EXAMPLES / f"{name}.yaml")
    result = measure(fused.build(name), spec, reps=20)
    assert result.status == "ok", result
