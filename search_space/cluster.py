"""The search on a Ray cluster (`superopt search --ray ADDRESS`, the optional extra `pip install superopt[ray]`).

Ray runs what the process pool runs on one machine: the enumeration's first-level choices (one actor a CPU of
the cluster, each with its own Searcher, results taken in the choices' order) and the verification of the sized
plans (one task a plan, results taken in the plans' order). Both merge exactly as the single-process search does
(search_space/api.py), so a search gives the same candidates on a cluster, a pool or one process. Every node
needs superopt, at the driver's version, importable by its workers.

ADDRESS is what `ray.init` takes: "auto" (the cluster this machine belongs to), "local" (a new cluster of this
machine's CPUs), host:port of a head node, or ray://host:port (Ray Client). A process that already joined a
cluster (ray.init in a notebook) searches on it whatever the address says.
"""

from __future__ import annotations

import re
import socket
import time
from collections import deque
from collections.abc import Generator, Iterable, Iterator
from typing import Any

from superopt.errors import SuperoptError
from superopt.ir import KernelGraph
from superopt.search_space.enumerator import Choice, Found, Plan, Problem, Searcher, make_problem
from superopt.search_space.presets import Preset

_ADDRESS = re.compile(r"(ray://)?([A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:]+\]):([0-9]{1,5})")
CONNECT_TIMEOUT_S = 5.0  # Ray itself retries an unreachable head for minutes


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SuperoptError("--ray needs Ray, which is not installed: pip install 'superopt[ray]'") from None
    return ray


def _reachable(address: str) -> None:
    """A one-line error unless `address` is auto, local, or a host:port that accepts a connection now."""
    if address in ("auto", "local"):
        return
    m = _ADDRESS.fullmatch(address)
    if m is None:
        raise SuperoptError(f"--ray {address!r}: not a Ray address (auto, local, host:port or ray://host:port)")
    host, port = m.group(2).strip("[]"), int(m.group(3))
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise SuperoptError(f"--ray {address}: no Ray head answers there ({e.strerror or e})") from None


def connect(address: str) -> int:
    """Joins the Ray cluster at `address` (see the module doc) unless this process already has; its CPU count."""
    ray = _ray()
    if not ray.is_initialized():
        _reachable(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise SuperoptError(f"--ray {address}: cannot join the Ray cluster: {str(e).splitlines()[0]}") from None
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


class _ChoiceRunner:
    """An actor's Searcher. Deadlines travel as wall-clock times: each node's monotonic clock has its own zero."""

    def __init__(self, graph: KernelGraph, preset: Preset, prune: bool, deadline_epoch: float) -> None:
        deadline = time.monotonic() + (deadline_epoch - time.time())
        self.searcher = Searcher(make_problem(graph), preset, deadline=deadline, prune=prune)

    def run(self, depth: int, root: Choice, limit: int) -> Found:
        return self.searcher.run(depth, root, limit)


class ChoicePool:
    """The enumeration's choices on the cluster's CPUs, with the interface api._enumerate uses of a process
    pool: `imap` yields each job's Found in the jobs' order."""

    def __init__(self, graph: KernelGraph, preset: Preset, prune: bool, deadline: float, actors: int) -> None:
        ray = _ray()
        from ray.util import ActorPool

        epoch = time.time() + (deadline - time.monotonic())
        runner = ray.remote(num_cpus=1)(_ChoiceRunner)
        self._actors = [runner.remote(graph, preset, prune, epoch) for _ in range(actors)]
        self._pool = ActorPool(self._actors)

    def imap(self, jobs: Iterable[tuple[int, Choice, int]]) -> Iterator[Found]:
        return self._pool.map(lambda actor, job: actor.run.remote(*job), list(jobs))

    def terminate(self) -> None:
        ray = _ray()
        for actor in self._actors:
            ray.kill(actor)


_PROBLEMS: dict[str, Problem] = {}  # a worker's problem, by the id of the graph's object in Ray's store


def _verify_remote(graph: KernelGraph, graph_id: str, plan: Plan, seed: int) -> Any:
    from superopt.search_space.api import verify_plan

    if graph_id not in _PROBLEMS:
        _PROBLEMS.clear()
        _PROBLEMS[graph_id] = make_problem(graph)
    return verify_plan(_PROBLEMS[graph_id], plan, seed)


def verified(graph: KernelGraph, jobs: list[tuple[Plan, int]], window: int) -> Generator[Any, None, None]:
    """Each (plan, seed)'s verification record (api.verify_plan), in order, at most `window` running at once;
    the tasks left when the caller stops reading are cancelled."""
    ray = _ray()
    task = ray.remote(num_cpus=1)(_verify_remote)
    ref = ray.put(graph)
    graph_id = ref.hex()
    todo, running = iter(jobs), deque[Any]()
    try:
        for plan, seed in todo:
            running.append(task.remote(ref, graph_id, plan, seed))
            if len(running) >= window:
                break
        while running:
            record = ray.get(running.popleft())
            nxt = next(todo, None)
            if nxt is not None:
                running.append(task.remote(ref, graph_id, *nxt))
            yield record
    finally:
        for pending in running:
            ray.cancel(pending)
