"""The result cache: search results stored under a content-addressed key (docs/architecture.md, "Ranking, code
and results").

key = sha256 of the program's canonical hash (renaming-invariant; shapes, dtypes, attributes), the search
settings that change the answer (preset, seed, prune; not the budgets), the device class and the superopt,
torch and triton versions. An entry is the result JSON of superopt/pipeline.py at `results/<key>.json` under
the cache directory ($SUPEROPT_CACHE_DIR, default ~/.cache/superopt; generated Triton modules live in its
`triton/` folder), with the search's trial log beside it (`<key>.trials.jsonl`).

The cache never trusts its files: a cache folder may be shared (a CI cache) or imported, so an entry is checked
whenever it is read: field types, finite numbers, its key recomputed from its program, settings, device and
versions, its hashes recomputed from its graphs, and (by the caller's `check`: the pipeline re-verifies the
winner against the program) whatever the core cannot decide. An entry that fails is moved aside into
`results/quarantine/` with the reason beside it, one warning says so, and the read is a miss.

Entries written here carry an HMAC-SHA256 signature with a key kept in `<root>/.key` (never exported), so that
`cache ls` can tell local entries from imported ones; a signature tells origin only and never skips a check.

Writes are atomic (write_atomic) and serialized by a lock on the results folder, so two processes storing one
key leave one whole entry, the better one (`_rank`): an exhaustive result (one no budget cut: `Result.cut`) is
final and ranks above any cut one; between cut ones, larger budgets upgrade an entry, smaller ones leave it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch

from superopt.errors import SuperoptError, brief
from superopt.ir import KernelGraph
from superopt.result import Result, ResultError
from superopt.serialize import graph_hash, write_atomic

EXPORT_FORMAT = "superopt.cache-export/1"
KEY_SETTINGS = ("preset", "seed", "prune")  # what changes the answer; the budgets only decide how far it got
LOCK_NOTE_S = 2.0  # waiting this long for the lock is worth a line
LOCK_TIMEOUT_S = 120.0  # default of $SUPEROPT_LOCK_TIMEOUT_S
_HEX = re.compile(r"[0-9a-f]{1,64}")
Check = Callable[[Result], str | None]
T = TypeVar("T")


def package_version(name: str) -> str:
    """An installed package's version, from its metadata (without importing it); "none" if not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


def versions() -> dict[str, str]:
    """The versions a result depends on."""
    return {"superopt": package_version("superopt"), "torch": torch.__version__, "triton": package_version("triton")}


def cache_key(graph: KernelGraph, settings: dict[str, Any], device: str, vers: dict[str, str] | None = None) -> str:
    """The cache key of searching `graph` with `settings` for device class `device` (a DeviceSpec name)."""
    search = {k: settings.get(k) for k in KEY_SETTINGS}
    parts = ["superopt.cache/1", graph_hash(graph), search, device, vers or versions()]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def is_key(key: Any) -> bool:
    """Whether `key` is a cache key: the 64 lowercase hex digits cache_key makes (a file name, never a path)."""
    return isinstance(key, str) and len(key) == 64 and _HEX.fullmatch(key) is not None


def check_key(key: Any, what: str) -> str:
    """`key`, if it is a cache key; else a SuperoptError naming `what`."""
    if not is_key(key):
        raise SuperoptError(f"{what}: {brief(key)} is not a cache key (64 lowercase hex digits)")
    return key


def default_dir() -> Path:
    root = os.environ.get("SUPEROPT_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "superopt"


def lock_timeout() -> float:
    """$SUPEROPT_LOCK_TIMEOUT_S, else LOCK_TIMEOUT_S: how long to wait for another process's cache lock."""
    text = os.environ.get("SUPEROPT_LOCK_TIMEOUT_S")
    if text is None:
        return LOCK_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise SuperoptError(f"SUPEROPT_LOCK_TIMEOUT_S={text!r} is not a number of seconds >= 0")
    return seconds


def read_entry(doc: Any, key: str | None = None) -> Result:
    """The result an entry's JSON holds (Result.from_json checks its fields and hashes), if its key is `key` (the
    file's) and the one its program, settings, device and versions make; ResultError saying why not."""
    result = Result.from_json(doc)
    if key is not None and result.key != key:
        raise ResultError(f"its key {result.key[:16]} does not match its file name")
    if cache_key(result.program, result.settings, result.device, result.versions) != result.key:
        raise ResultError("its key is not the one its program, settings, device and versions make")
    return result


@dataclass(frozen=True)
class Stored:
    """An entry as read back: its file, the result, and the JSON document (signature included)."""

    path: Path
    result: Result
    doc: dict[str, Any]


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a finite number")


def _unsigned(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "signature"}


class Cache:
    """A result cache rooted at `root` (default: $SUPEROPT_CACHE_DIR or ~/.cache/superopt)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_dir()
        self.results = self.root / "results"
        self.quarantine = self.results / "quarantine"
        self.plans = self.root / "plans"  # models' plans (superopt/model_search.py), apart from the results
        self.kernel_dir = self.root / "triton"  # generated Triton modules (Triton compiles from a source file)

    def path(self, key: str) -> Path:
        return self.results / f"{check_key(key, 'cache key')}.json"

    def trial_log_path(self, key: str) -> Path:
        return self.results / f"{check_key(key, 'cache key')}.trials.jsonl"

    def _read_json(self, path: Path) -> tuple[bytes | None, Any, str | None]:
        """The file's bytes and its JSON document, or why it has none; (None, None, None) if absent."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None, None, None
        except OSError as e:
            raise SuperoptError(f"{path}: cannot read the cache entry: {e.strerror or e}") from None
        try:
            return data, json.loads(data, parse_constant=_no_constant), None
        except json.JSONDecodeError as e:
            return data, None, f"truncated or not JSON ({e.msg} at line {e.lineno})"
        except (ValueError, RecursionError) as e:  # not UTF-8, NaN or Infinity, nested too deep
            return data, None, f"not a JSON result ({type(e).__name__}: {str(e)[:100]})"

    def _load(self, path: Path) -> tuple[bytes | None, Stored | None, str | None]:
        """The file's bytes, the entry if it passes read_entry, else why not; (None, None, None) if absent."""
        data, doc, why = self._read_json(path)
        if doc is None:
            return data, None, why
        try:
            return data, Stored(path, read_entry(doc, path.stem), doc), None
        except ResultError as e:
            return data, None, str(e)

    def _move_aside(self, path: Path, data: bytes, why: str) -> Path | None:
        """Moves the entry file `path` into the quarantine folder, with `why` beside it, unless it no longer
        holds `data` (another process rewrote it since); never over an earlier quarantined file. The caller holds
        the lock."""
        try:
            if path.read_bytes() != data:
                return None
        except FileNotFoundError:
            return None
        self.quarantine.mkdir(parents=True, exist_ok=True)
        n = 0
        while (dest := self.quarantine / (f"{path.stem}.{n}.json" if n else path.name)).exists():
            n += 1
        os.replace(path, dest)
        write_atomic(dest.with_suffix(".reason"), why + "\n")
        return dest

    def _reject(self, path: Path, data: bytes, why: str, locked: bool = False) -> None:
        """Quarantines an entry that failed a check, with one warning naming it."""
        with contextlib.nullcontext() if locked else self._locked():
            dest = self._move_aside(path, data, why)
        moved = f"moved to {dest}; " if dest is not None else ""
        warnings.warn(
            f"cache entry {path.stem[:16]} ({path}) is corrupt or untrusted: {why}; {moved}treating it as a miss",
            stacklevel=3,
        )

    def get(self, key: str, check: Check | None = None) -> Result | None:
        """The stored result for `key`, or None: absent, or failing read_entry or `check` (which says why, or
        None), a miss that quarantines the entry with one warning."""
        path = self.path(key)
        data, stored, why = self._load(path)
        if stored is not None and check is not None:
            why = check(stored.result)
        if why is not None:
            self._reject(path, data, why)
            return None
        return stored.result if stored is not None else None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The results folder's lock, polled: one line after LOCK_NOTE_S, a SuperoptError after lock_timeout()."""
        timeout = lock_timeout()
        self.results.mkdir(parents=True, exist_ok=True)
        path = self.results / ".lock"
        with open(path, "w") as lock:
            start, noted = time.monotonic(), False
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    waited = time.monotonic() - start
                if waited >= timeout:
                    raise SuperoptError(
                        f"{path}: still held by another superopt process after {timeout:g} s "
                        "(SUPEROPT_LOCK_TIMEOUT_S sets how long to wait)"
                    )
                if waited >= LOCK_NOTE_S and not noted:
                    noted = True
                    warnings.warn(f"waiting for the cache lock {path} (held by another superopt process)", stacklevel=4)
                time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _secret(self, create: bool) -> bytes | None:
        """This cache's signing key (`<root>/.key`, mode 0600), made on first use if `create`."""
        path = self.root / ".key"
        with contextlib.suppress(FileNotFoundError):
            return path.read_bytes()
        if not create:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return path.read_bytes()
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        return path.read_bytes()

    def origin(self, doc: dict[str, Any]) -> str:
        """ "local" (signed by this cache's key), "imported" (signed elsewhere, or tampered) or "unsigned"."""
        signature = doc.get("signature")
        if not isinstance(signature, str):
            return "unsigned"
        secret = self._secret(create=False)
        mine = secret is not None and hmac.compare_digest(signature, _sign(secret, doc))
        return "local" if mine else "imported"

    def put(self, result: Result) -> bool:
        """Stores `result`, signed with this cache's key, unless the one stored under its key ranks higher
        (`_rank`); True if it was written."""
        if cache_key(result.program, result.settings, result.device, result.versions) != result.key:
            raise SuperoptError(f"cannot store the result {result.key[:16]}: its key is not its program's")
        return self._store(result, result.to_json(), sign=True)

    def _store(self, result: Result, doc: dict[str, Any], sign: bool) -> bool:
        """Writes `doc`, the JSON of `result` (signed here if `sign`), by put's rule."""
        path = self.path(result.key)
        text = self._text(doc, sign, f"the result {result.key[:16]}")
        with self._locked():
            data, old, why = self._load(path)
            if why is not None:
                self._reject(path, data, why, locked=True)
            elif old is not None and _rank(old.result) > _rank(result):
                return False
            write_atomic(path, text)
        return True

    def plan_path(self, key: str) -> Path:
        return self.plans / f"{check_key(key, 'plan key')}.json"

    def get_plan(self, key: str, read: Callable[[Any], T]) -> T | None:
        """The model plan stored under `key`, as `read` makes it of the stored document (read checks it and
        raises ResultError saying why not); None if absent or failing, which quarantines it with one warning."""
        path = self.plan_path(key)
        data, doc, why = self._read_json(path)
        if doc is not None:
            try:
                return read(doc)
            except ResultError as e:
                why = str(e)
        if why is not None:
            self._reject(path, data, why)
        return None

    def put_plan(self, key: str, doc: dict[str, Any]) -> None:
        """Stores a model plan's document under `key`, signed like a result."""
        text = self._text(doc, True, f"the plan {key[:16]}")
        with self._locked():
            self.plans.mkdir(parents=True, exist_ok=True)
            write_atomic(self.plan_path(key), text)

    def _text(self, doc: dict[str, Any], sign: bool, what: str) -> str:
        """The stored text of `doc`, signed with this cache's key if `sign`; SuperoptError naming `what` if it
        holds NaN or Infinity (JSON has neither)."""
        try:
            signed = doc | {"signature": _sign(self._secret(create=True), doc)} if sign else doc
            return json.dumps(signed, indent=1, allow_nan=False) + "\n"
        except ValueError:
            raise SuperoptError(f"cannot store {what}: it holds NaN or Infinity") from None

    def entries(self) -> Iterator[Stored]:
        """Every entry that passes read_entry, oldest first; the others are quarantined as they are found."""
        if not self.results.is_dir():
            return
        paths = [p for p in self.results.glob("*.json") if is_key(p.stem)]
        for path in sorted(paths, key=lambda p: p.stat().st_mtime):
            data, stored, why = self._load(path)
            if why is not None:
                self._reject(path, data, why)
            elif stored is not None:
                yield stored

    def quarantined(self) -> list[tuple[Path, str]]:
        """The quarantined entry files, oldest first, with why each was moved aside."""
        if not self.quarantine.is_dir():
            return []
        found = []
        for path in sorted(self.quarantine.glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                found.append((path, path.with_suffix(".reason").read_text().strip()))
            except (FileNotFoundError, UnicodeDecodeError):
                found.append((path, "(no reason recorded)"))
        return found

    def find(self, prefix: str) -> Result:
        """The one valid entry whose key starts with `prefix` (1 to 64 lowercase hex digits)."""
        if not _HEX.fullmatch(prefix):
            raise SuperoptError(f"{brief(prefix)} is not a key prefix (1 to 64 lowercase hex digits)")
        found = [e.result for e in self.entries() if e.path.stem.startswith(prefix)]
        if len(found) != 1:
            what = "no entry" if not found else f"{len(found)} entries"
            raise SuperoptError(f"{self.results}: {what} with a key starting '{prefix}'")
        return found[0]

    def export(self, path: str | os.PathLike) -> int:
        """Writes every valid entry (signatures kept, the signing key never) into one JSON file; returns how many."""
        entries = [e.doc for e in self.entries()]
        doc = {"format": EXPORT_FORMAT, "exported": now(), "entries": entries}
        write_atomic(path, json.dumps(doc, allow_nan=False) + "\n")
        return len(entries)

    def import_(self, path: str | os.PathLike, check: Check | None = None) -> tuple[int, int]:
        """Stores the entries of an exported file by the same rule as `put`, each with the signature it came with
        (which tells its origin; reads check it again); returns (written, kept as they were). Every entry is
        checked (read_entry, then `check`) before any is written: one that fails refuses the whole file."""
        try:
            doc = json.loads(Path(path).read_text(), parse_constant=_no_constant)
        except OSError as e:
            raise SuperoptError(f"{path}: cannot read: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise SuperoptError(f"{path}:{e.lineno}: not a cache export: {e.msg}") from None
        except (ValueError, RecursionError) as e:
            raise SuperoptError(f"{path}: not a cache export: {type(e).__name__}: {str(e)[:100]}") from None
        if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT or not isinstance(doc.get("entries"), list):
            raise SuperoptError(f'{path}: not a cache export (expected "format": "{EXPORT_FORMAT}")')
        checked = []
        for k, entry in enumerate(doc["entries"]):
            where = f"{path}: entries[{k}]"
            key = check_key(entry.get("key") if isinstance(entry, dict) else entry, f"{where}: key")
            try:
                result = read_entry(entry)
            except ResultError as e:
                raise SuperoptError(f"{where} (key {key[:16]}): {e}") from None
            why = check(result) if check is not None else None
            if why is not None:
                raise SuperoptError(f"{where} (key {key[:16]}): {why}")
            checked.append((result, entry))
        written = sum(self._store(result, entry, sign=False) for result, entry in checked)
        return written, len(checked) - written

    def clear(self, older_than_days: float | None = None) -> int:
        """Removes results (with their trial logs and quarantined entries) and generated kernel modules last
        written more than `older_than_days` ago, or all of them; returns how many files it removed."""
        if older_than_days is not None and not (math.isfinite(older_than_days) and older_than_days >= 0):
            raise SuperoptError(f"clear: the age must be a finite number of days >= 0, not {older_than_days:g}")
        cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
        removed = 0
        for folder in (self.results, self.quarantine, self.plans, self.kernel_dir):
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.name == ".lock" or not path.is_file():
                    continue
                if cutoff is None or path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed


def _rank(result: Result) -> tuple[bool, float, float, bool]:
    """Which of two entries for one key to keep: an exhaustive one; else the larger of each budget that cut it
    (one that did not cut it counts as unbounded); then a measured one over a predicted one."""
    budget = float(result.settings["budget_s"]) if "time" in result.cut else math.inf
    states = float(result.settings.get("states") or 0) if "states" in result.cut else math.inf
    return result.exhaustive, budget, states, result.measured


def _sign(secret: bytes, entry: dict[str, Any]) -> str:
    """The HMAC-SHA256 of the entry's canonical JSON without its signature."""
    body = json.dumps(_unsigned(entry), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


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
