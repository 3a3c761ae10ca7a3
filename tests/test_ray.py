"""The search on a local Ray cluster (`--ray`, search_space/cluster.py) finds what the single-process search
finds: the same candidates in the same order, the same state counts; and a cluster that is not there is a
one-line error."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import superopt
from superopt.errors import SuperoptError
from superopt.search_space import search
from superopt.search_space.cluster import connect

ray = pytest.importorskip("ray")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _same(a, b) -> None:
    assert [c.hash for c in a.candidates] == [c.hash for c in b.candidates]
    assert [c.verify.tests for c in a.candidates] == [c.verify.tests for c in b.candidates]
    for key in ("states", "plans", "sized", "rejected", "pruned_abstract", "pruned_shape", "depth", "cut"):
        assert getattr(a.stats, key) == getattr(b.stats, key), key


def test_ray_search_equals_the_single_process_search(cluster):
    graph = superopt.load(EXAMPLES / "lora.yaml")  # 16 plans, two depths, several first-level choices each
    alone = search(graph, workers=1, progress="none")
    on_ray = search(graph, ray="auto", progress="none")
    assert on_ray.stats.workers == 2 and len(alone.candidates) > 2
    _same(alone, on_ray)


def test_ray_search_under_a_states_budget_equals_the_single_process_search(cluster):
    graph = superopt.load(EXAMPLES / "lora.yaml")
    alone = search(graph, states=6_000, workers=1, progress="none")
    on_ray = search(graph, states=6_000, ray="auto", progress="none")
    assert on_ray.stats.cut == ["states"] and on_ray.stats.states == 6_000
    _same(alone, on_ray)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "address, message",
    [("127.0.0.1:{port}", "no Ray head answers there"), ("not an address!", "not a Ray address")],
)
def test_an_absent_cluster_is_a_one_line_error(address, message):
    if ray.is_initialized():
        ray.shutdown()
    with pytest.raises(SuperoptError, match=message):
        connect(address.format(port=_closed_port()))


def test_cli_ray_local_gives_the_single_process_result(tmp_path):
    """`superopt search --ray local` starts a cluster of this machine's CPUs: its result JSON, the timings and
    the cluster aside, is the one a search without it writes."""
    spec = EXAMPLES / "lora.yaml"

    def run(cache: str, *extra: str) -> dict:
        cmd = [sys.executable, "-c", "from superopt.cli.main import main; main()", "search", str(spec), "--json"]
        cmd += ["--states", "6000", "--device", "h100", "--cache-dir", str(tmp_path / cache), *extra]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    alone, on_ray = run("alone"), run("ray", "--ray", "local")
    assert "ray" not in on_ray["settings"]
    assert [c["hash"] for c in on_ray["candidates"]] == [c["hash"] for c in alone["candidates"]]
    assert on_ray["best"]["hash"] == alone["best"]["hash"]


def test_cli_ray_without_ray_installed_is_a_one_line_error(tmp_path):
    code = (
        "import sys; sys.modules['ray'] = None; from superopt.cli.main import main; "
        f"sys.argv = ['superopt', 'search', {str(EXAMPLES / 'lora.yaml')!r}, '--ray', 'auto', '--cache-dir', "
        f"{str(tmp_path)!r}]; main()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "pip install 'superopt[ray]'" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
