"""The result cache: search results stored under a content-addressed key (DESIGN.md "Results and cache").

key = sha256 of the program's canonical hash (renaming-invariant; shapes, dtypes, attributes), the search
settings that change the answer (preset, seed, prune; not the time budget), the device class and the superopt,
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
key leave one whole entry, the better one: a larger budget upgrades an entry, a smaller one leaves it alone.
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
from importlib import metadata
from pathlib import Path
from typing import Any

from superopt.errors import SuperoptError, brief
from superopt.ir import KernelGraph
from superopt.serialize import from_json, graph_hash, write_atomic

RESULT_FORMAT = "superopt.result/1"
EXPORT_FORMAT = "superopt.cache-export/1"
KEY_SETTINGS = ("preset", "seed", "prune")  # what changes the answer; the budget only decides how far it got
LOCK_NOTE_S = 2.0  # waiting this long for the lock is worth a line
LOCK_TIMEOUT_S = 120.0  # default of $SUPEROPT_LOCK_TIMEOUT_S
_HEX = re.compile(r"[0-9a-f]{1,64}")
NON_FINITE = ("inf", "-inf", "nan")  # how pipeline.jsonable writes what JSON has no number for

Check = Callable[[dict[str, Any]], str | None]


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


# The entry's schema: every field a reader uses, with its type. A checker takes (value, where) and says what is
# wrong, or None; a field name ending in "?" may be absent.
def _is(test: Callable[[Any], bool], what: str) -> Callable[[Any, str], str | None]:
    return lambda x, where: None if test(x) else f"{where} is {brief(x)}, not {what}"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


NUM = _is(_finite, "a finite number")
MEASURE = _is(lambda x: x is None or _finite(x) or x in NON_FINITE, "a number or null")
INT = _is(lambda x: isinstance(x, int) and not isinstance(x, bool), "an integer")
STR = _is(lambda x: isinstance(x, str), "a string")
BOOL = _is(lambda x: isinstance(x, bool), "true or false")
HASH = _is(is_key, "64 hex digits")
OBJECT = _is(lambda x: isinstance(x, dict), "an object")


def _maybe(check: Callable[[Any, str], str | None]) -> Callable[[Any, str], str | None]:
    return lambda x, where: None if x is None else check(x, where)


def _record(spec: dict[str, Callable[[Any, str], str | None]]) -> Callable[[Any, str], str | None]:
    def check(doc: Any, where: str) -> str | None:
        if not isinstance(doc, dict):
            return f"{where} is {brief(doc)}, not an object"
        for name, field_check in spec.items():
            key = name.rstrip("?")
            if key in doc:
                why = field_check(doc[key], f"{where}.{key}")
                if why is not None:
                    return why
            elif not name.endswith("?"):
                return f"{where}.{key} is missing"
        return None

    return check


def _each(check: Callable[[Any, str], str | None], kind: type) -> Callable[[Any, str], str | None]:
    """A list's items or a dict's values, each by `check`."""

    def each(doc: Any, where: str) -> str | None:
        if not isinstance(doc, kind):
            return f"{where} is {brief(doc)}, not {'a list' if kind is list else 'an object'}"
        items = enumerate(doc) if kind is list else doc.items()
        return next((why for k, x in items if (why := check(x, f"{where}[{k!r}]")) is not None), None)

    return each


_TRIAL = {  # what a candidate's trial adds (pipeline.py: _check_on_cpu, _time_on_gpu)
    "status?": STR,
    "measured_us?": MEASURE,
    "error_vs_tolerance?": MEASURE,
    "checked_on?": STR,
    "message?": STR,
}
_ENTRY = _record(
    {
        "key": HASH,
        "name": STR,
        "created": STR,
        "program": OBJECT,
        "program_hash": HASH,
        "settings": _record({"budget_s": NUM, "preset": _maybe(STR), "seed": INT, "prune": BOOL, "device": STR}),
        "device": STR,
        "gpu": _maybe(STR),
        "versions": _each(STR, dict),
        "measured": BOOL,
        "floor_us": NUM,
        "baselines": _each(_record({"status": STR, "median_us?": NUM, "message?": STR}), dict),
        "best": _record(
            {
                "graph": OBJECT,
                "hash": HASH,
                "source": _is(lambda x: x in ("program", "search"), '"program" or "search"'),
                "kernels": INT,
                "predicted_us": NUM,
                "verify": _record({"method?": STR, "bound?": NUM}),
                **_TRIAL,
            }
        ),
        "candidates": _each(
            _record(
                {
                    "rank": INT,
                    "hash": STR,
                    "source": STR,
                    "kernels": INT,
                    "predicted_us": NUM,
                    "speedup_vs_eager?": NUM,
                    "speedup_vs_torch.compile?": NUM,
                    "fraction_of_floor?": NUM,
                    **_TRIAL,
                }
            ),
            list,
        ),
        "candidates_total": INT,
        "seconds": NUM,
        "signature?": STR,
    }
)


def check_entry(entry: Any, key: str | None = None) -> str | None:
    """Why `entry` is not a usable result (None if it is): its schema; its key, which must be `key` (the file's)
    and the one its program, settings, device and versions make; its hashes, which must be its graphs'; and a
    winner from the "program" that is the program."""
    if not isinstance(entry, dict) or entry.get("format") != RESULT_FORMAT:
        return f'not a superopt result (expected "format": "{RESULT_FORMAT}")'
    why = _ENTRY(entry, "entry")
    if why is not None:
        return why
    if key is not None and entry["key"] != key:
        return f"its key {entry['key'][:16]} does not match its file name"
    try:
        program = from_json(entry["program"], "program")
        winner = from_json(entry["best"]["graph"], "best")
    except (SuperoptError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:  # crafted graph JSON
        return f"{type(e).__name__}: {e}"
    if graph_hash(program) != entry["program_hash"]:
        return "its program_hash is not the hash of its program"
    if cache_key(program, entry["settings"], entry["device"], entry["versions"]) != entry["key"]:
        return "its key is not the one its program, settings, device and versions make"
    if graph_hash(winner) != entry["best"]["hash"]:
        return "its winner's hash is not the hash of its winner graph"
    if entry["best"]["source"] == "program" and entry["best"]["hash"] != entry["program_hash"]:
        return 'its winner claims to be the program ("source": "program") but is another graph'
    return None


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
        self.kernel_dir = self.root / "triton"  # generated Triton modules (Triton compiles from a source file)

    def path(self, key: str) -> Path:
        return self.results / f"{check_key(key, 'cache key')}.json"

    def trial_log_path(self, key: str) -> Path:
        return self.results / f"{check_key(key, 'cache key')}.trials.jsonl"

    def _load(self, path: Path) -> tuple[bytes | None, dict[str, Any] | None, str | None]:
        """The file's bytes, its entry if it passes check_entry, else why not; (None, None, None) if absent."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None, None, None
        except OSError as e:
            raise SuperoptError(f"{path}: cannot read the cache entry: {e.strerror or e}") from None
        try:
            entry = json.loads(data, parse_constant=_no_constant)
        except json.JSONDecodeError as e:
            return data, None, f"truncated or not JSON ({e.msg} at line {e.lineno})"
        except (ValueError, RecursionError) as e:  # not UTF-8, NaN or Infinity, nested too deep
            return data, None, f"not a JSON result ({type(e).__name__}: {str(e)[:100]})"
        why = check_entry(entry, path.stem)
        return data, (entry if why is None else None), why

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

    def get(self, key: str, check: Check | None = None) -> dict[str, Any] | None:
        """The stored result for `key` (without its signature), or None: absent, or failing check_entry or
        `check` (which says why, or None), a miss that quarantines the entry with one warning."""
        path = self.path(key)
        data, entry, why = self._load(path)
        if entry is not None and check is not None:
            why = check(entry)
        if why is not None:
            self._reject(path, data, why)
            return None
        return _unsigned(entry) if entry is not None else None

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

    def origin(self, entry: dict[str, Any]) -> str:
        """ "local" (signed by this cache's key), "imported" (signed elsewhere, or tampered) or "unsigned"."""
        signature = entry.get("signature")
        if not isinstance(signature, str):
            return "unsigned"
        secret = self._secret(create=False)
        mine = secret is not None and hmac.compare_digest(signature, _sign(secret, entry))
        return "local" if mine else "imported"

    def put(self, entry: dict[str, Any], sign: bool = True) -> bool:
        """Stores `entry` unless the one stored under its key ranks higher (a larger budget, or the same budget
        measured on a GPU where `entry` was not); True if it was written. `sign`: signed with this cache's key
        (an import keeps the entry's own signature, if any, which tells its origin)."""
        why = check_entry(entry)
        if why is not None:
            raise SuperoptError(f"cannot store the result: {why}")
        key = entry["key"]
        path = self.path(key)
        with self._locked():
            try:
                if sign:
                    entry = _unsigned(entry) | {"signature": _sign(self._secret(create=True), entry)}
                text = json.dumps(entry, indent=1, allow_nan=False) + "\n"
            except ValueError:
                raise SuperoptError(f"cannot store the result {key[:16]}: it holds NaN or Infinity") from None
            data, old, why = self._load(path)
            if why is not None:
                self._reject(path, data, why, locked=True)
            elif old is not None and _rank(old) > _rank(entry):
                return False
            write_atomic(path, text)
        return True

    def entries(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Every entry file that passes check_entry with its entry as stored, oldest first; the others are
        quarantined as they are found."""
        if not self.results.is_dir():
            return
        paths = [p for p in self.results.glob("*.json") if is_key(p.stem)]
        for path in sorted(paths, key=lambda p: p.stat().st_mtime):
            data, entry, why = self._load(path)
            if why is not None:
                self._reject(path, data, why)
            elif entry is not None:
                yield path, entry

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

    def find(self, prefix: str) -> dict[str, Any]:
        """The one valid entry whose key starts with `prefix` (1 to 64 lowercase hex digits)."""
        if not _HEX.fullmatch(prefix):
            raise SuperoptError(f"{brief(prefix)} is not a key prefix (1 to 64 lowercase hex digits)")
        found = [e for p, e in self.entries() if p.stem.startswith(prefix)]
        if len(found) != 1:
            what = "no entry" if not found else f"{len(found)} entries"
            raise SuperoptError(f"{self.results}: {what} with a key starting '{prefix}'")
        return found[0]

    def export(self, path: str | os.PathLike) -> int:
        """Writes every valid entry (signatures kept, the signing key never) into one JSON file; returns how many."""
        entries = [e for _, e in self.entries()]
        doc = {"format": EXPORT_FORMAT, "exported": now(), "entries": entries}
        write_atomic(path, json.dumps(doc, allow_nan=False) + "\n")
        return len(entries)

    def import_(self, path: str | os.PathLike, check: Check | None = None) -> tuple[int, int]:
        """Stores the entries of an exported file by the same rule as `put`, unsigned here (reads check them
        again); returns (written, kept as they were). Every entry is checked (check_entry, then `check`) before
        any is written: one that fails refuses the whole file."""
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
        for k, entry in enumerate(doc["entries"]):
            where = f"{path}: entries[{k}]"
            check_key(entry.get("key") if isinstance(entry, dict) else entry, f"{where}: key")
            why = check_entry(entry) or (check(entry) if check is not None else None)
            if why is not None:
                raise SuperoptError(f"{where} (key {entry['key'][:16]}): {why}")
        written = sum(self.put(entry, sign=False) for entry in doc["entries"])
        return written, len(doc["entries"]) - written

    def clear(self, older_than_days: float | None = None) -> int:
        """Removes results (with their trial logs and quarantined entries) and generated kernel modules last
        written more than `older_than_days` ago, or all of them; returns how many files it removed."""
        if older_than_days is not None and not (math.isfinite(older_than_days) and older_than_days >= 0):
            raise SuperoptError(f"clear: the age must be a finite number of days >= 0, not {older_than_days:g}")
        cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
        removed = 0
        for folder in (self.results, self.quarantine, self.kernel_dir):
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.name == ".lock" or not path.is_file():
                    continue
                if cutoff is None or path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed


def _rank(entry: dict[str, Any]) -> tuple[float, bool]:
    """Which of two entries for one key to keep: the larger budget, then a measured one over a predicted one."""
    return float(entry["settings"]["budget_s"]), bool(entry.get("measured"))


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
