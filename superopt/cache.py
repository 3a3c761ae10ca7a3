"""The result cache: search results stored under a content-addressed key (DESIGN.md "Results and cache").

key = sha256 of the program's canonical hash (renaming-invariant; shapes, dtypes, attributes), the search
settings that change the answer (preset, seed, prune; not the time budget), the device class and the superopt,
torch and triton versions. An entry is the result JSON of superopt/pipeline.py at `results/<key>.json` under
the cache directory ($SUPEROPT_CACHE_DIR, default ~/.cache/superopt; generated Triton modules live in its
`triton/` folder), with the search's trial log beside it (`<key>.trials.jsonl`).

Writes are atomic (write_atomic) and serialized by a lock on the results folder, so two processes storing one
key leave one whole entry, the better one: a larger budget upgrades an entry, a smaller one leaves it alone.
A corrupt or truncated entry reads as a miss with one warning, and the next store rewrites it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from superopt.errors import SuperoptError
from superopt.ir import KernelGraph
from superopt.serialize import from_json, graph_hash, write_atomic

RESULT_FORMAT = "superopt.result/1"
EXPORT_FORMAT = "superopt.cache-export/1"
KEY_SETTINGS = ("preset", "seed", "prune")  # what changes the answer; the budget only decides how far it got
_warned: set[str] = set()


def versions() -> dict[str, str]:
    """The versions a result depends on (triton's read from its metadata, without importing it)."""
    import torch

    import superopt

    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = "none"
    return {"superopt": superopt.__version__, "torch": torch.__version__, "triton": triton}


def cache_key(graph: KernelGraph, settings: dict[str, Any], device: str, vers: dict[str, str] | None = None) -> str:
    """The cache key of searching `graph` with `settings` for device class `device` (a DeviceSpec name)."""
    search = {k: settings.get(k) for k in KEY_SETTINGS}
    parts = ["superopt.cache/1", graph_hash(graph), search, device, vers or versions()]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def default_dir() -> Path:
    root = os.environ.get("SUPEROPT_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "superopt"


def _rank(entry: dict[str, Any]) -> tuple[float, bool]:
    """Which of two entries for one key to keep: the larger budget, then a measured one over a predicted one."""
    return float(entry["settings"]["budget_s"]), bool(entry.get("measured"))


def check_entry(entry: Any, key: str | None = None) -> str | None:
    """Why `entry` is not a usable result (None if it is): the fields a reader needs, and a winner that loads."""
    if not isinstance(entry, dict) or entry.get("format") != RESULT_FORMAT:
        return f'not a superopt result (expected "format": "{RESULT_FORMAT}")'
    if key is not None and entry.get("key") != key:
        return f"its key {str(entry.get('key'))[:16]} does not match its file name"
    try:
        float(entry["settings"]["budget_s"])
        from_json(entry["program"], "program")
        from_json(entry["best"]["graph"], "best")
    except (KeyError, TypeError, ValueError, SuperoptError) as e:
        return f"{type(e).__name__}: {e}"
    return None


class Cache:
    """A result cache rooted at `root` (default: $SUPEROPT_CACHE_DIR or ~/.cache/superopt)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_dir()
        self.results = self.root / "results"

    def path(self, key: str) -> Path:
        return self.results / f"{key}.json"

    def trial_log_path(self, key: str) -> Path:
        return self.results / f"{key}.trials.jsonl"

    def _read(self, path: Path, key: str | None) -> dict[str, Any] | None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SuperoptError(f"{path}: cannot read the cache entry: {e.strerror or e}") from None
        try:
            entry = json.loads(text)
            why = check_entry(entry, key)
        except json.JSONDecodeError as e:
            why = f"truncated or not JSON ({e.msg} at line {e.lineno})"
        if why is None:
            return entry
        if str(path) not in _warned:  # once per entry and process: a search loop must not repeat it
            _warned.add(str(path))
            warnings.warn(f"cache entry {path} is corrupt: {why}; treating it as a miss", stacklevel=3)
        return None

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored result for `key`, or None (absent, or corrupt: a miss with one warning)."""
        return self._read(self.path(key), key)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.results.mkdir(parents=True, exist_ok=True)
        with open(self.results / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def put(self, entry: dict[str, Any]) -> bool:
        """Stores `entry` unless the one stored under its key ranks higher (a larger budget, or the same budget
        measured on a GPU where `entry` was not); True if it was written."""
        why = check_entry(entry)
        if why is not None:
            raise SuperoptError(f"cannot store the result: {why}")
        key = entry["key"]
        with self._locked():
            old = self._read(self.path(key), key)
            if old is not None and _rank(old) > _rank(entry):
                return False
            write_atomic(self.path(key), json.dumps(entry, indent=1) + "\n")
        return True

    def entries(self) -> Iterator[tuple[Path, dict[str, Any] | None]]:
        """Every entry file with its result (None where corrupt), oldest first."""
        if not self.results.is_dir():
            return
        paths = [p for p in self.results.glob("*.json") if not p.name.startswith(".")]
        for path in sorted(paths, key=lambda p: p.stat().st_mtime):
            yield path, self._read(path, path.stem)

    def find(self, prefix: str) -> dict[str, Any]:
        """The one valid entry whose key starts with `prefix`."""
        found = [e for p, e in self.entries() if p.stem.startswith(prefix) and e is not None] if prefix else []
        if len(found) != 1:
            what = "no entry" if not found else f"{len(found)} entries"
            raise SuperoptError(f"{self.results}: {what} with a key starting '{prefix}'")
        return found[0]

    def export(self, path: str | os.PathLike) -> int:
        """Writes every valid entry into one JSON file; returns how many."""
        entries = [e for _, e in self.entries() if e is not None]
        doc = {"format": EXPORT_FORMAT, "exported": now(), "entries": entries}
        write_atomic(path, json.dumps(doc) + "\n")
        return len(entries)

    def import_(self, path: str | os.PathLike) -> tuple[int, int]:
        """Stores the entries of an exported file by the same rule as `put`; returns (written, kept as they were)."""
        try:
            doc = json.loads(Path(path).read_text())
        except OSError as e:
            raise SuperoptError(f"{path}: cannot read: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise SuperoptError(f"{path}:{e.lineno}: not a cache export: {e.msg}") from None
        if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT or not isinstance(doc.get("entries"), list):
            raise SuperoptError(f'{path}: not a cache export (expected "format": "{EXPORT_FORMAT}")')
        for k, entry in enumerate(doc["entries"]):
            why = check_entry(entry)
            if why is not None:
                raise SuperoptError(f"{path}: entries[{k}]: {why}")
        written = sum(self.put(entry) for entry in doc["entries"])
        return written, len(doc["entries"]) - written

    def clear(self, older_than_days: float | None = None) -> int:
        """Removes results (with their trial logs) and generated kernel modules last written more than
        `older_than_days` ago, or all of them; returns how many files it removed."""
        cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
        removed = 0
        for folder in (self.results, self.root / "triton"):
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.name == ".lock" or not path.is_file():
                    continue
                if cutoff is None or path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class TrialLog:
    """The JSON-lines log of one search, one line per candidate event (hash, status, predicted and measured
    microseconds), written to a file of this process and moved beside the entry when the search ends."""

    def __init__(self, cache: Cache | None, key: str) -> None:
        self.path = cache.trial_log_path(key) if cache is not None else None
        self.started = time.time()
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._part = self.path.with_name(f".{self.path.name}.{os.getpid()}.part")
            self._file = open(self._part, "w")  # closed by close(), after the search

    def write(self, **event: Any) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"t": round(time.time() - self.started, 3), **event}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            os.replace(self._part, self.path)
            self._file = None
