"""How every `superopt` command reports failure: one line on stderr and an exit code, never a traceback.

Exit codes: 2 bad input (a file, an option, a path that cannot be written, stdout closed under us), 130
interrupted, 70 a bug in superopt. 1 and 3 are a command's own answers ("not equivalent", "cache miss",
"undecided"). Option values are checked by the types below as click parses them, before any work starts.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from superopt.errors import IRError, SuperoptError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 70


def one_line(text: str) -> str:
    """`text` with control characters (and lone surrogates) escaped: a message quoting a hostile file stays one
    printable line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def fail(message: str, code: int) -> NoReturn:
    click.echo(one_line(message), err=True)
    sys.exit(code)


def _stdout_closed() -> NoReturn:
    # As Python's docs advise ("Note on SIGPIPE"): point stdout at devnull, so that the flush at exit does not
    # fail again and print "Exception ignored ... BrokenPipeError".
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    fail("error: stdout was closed before the output was written (broken pipe)", EXIT_BAD_INPUT)


def reports_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turns SuperoptError and a closed stdout into one line on stderr and exit 2, Ctrl-C into "interrupted" and
    exit 130, any other exception into one line and exit 70 (SUPEROPT_DEBUG=1 shows its traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            try:
                return fn(*args, **kwargs)
            finally:
                sys.stdout.flush()  # a closed pipe shows here, while it can still be reported
        except SuperoptError as e:
            fail(f"error: {e}", EXIT_BAD_INPUT)
        except BrokenPipeError:
            _stdout_closed()
        except KeyboardInterrupt:
            fail("interrupted", EXIT_INTERRUPTED)
        except Exception as e:
            if os.environ.get("SUPEROPT_DEBUG"):
                raise
            fail(f"internal error: {type(e).__name__}: {e} (set SUPEROPT_DEBUG=1 for the traceback)", EXIT_INTERNAL)

    return wrapper


class Group(click.Group):
    """A command group whose own errors (a bad option value, a missing argument, Ctrl-C while parsing) are one
    line too, with the exit codes above; click alone prints usage lines and exits 1 on Ctrl-C."""

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> NoReturn:
        extra.pop("standalone_mode", None)
        try:
            try:
                code = super().main(args, prog_name, standalone_mode=False, **extra)
            finally:
                sys.stdout.flush()
        except click.ClickException as e:
            where = f"{e.ctx.command_path}: " if getattr(e, "ctx", None) else ""
            fail(f"error: {where}{e.format_message()}", EXIT_BAD_INPUT)
        except click.Abort:
            fail("interrupted", EXIT_INTERRUPTED)
        except BrokenPipeError:
            _stdout_closed()
        sys.exit(code if isinstance(code, int) else 0)


class Checked(click.ParamType):
    """An option value parsed by `parse` (int, float) and checked by `check`, which raises IRError saying what
    is wrong (the checks of superopt.spec, shared with the spec's `search:` section)."""

    def __init__(self, name: str, parse: Callable[[str], Any], check: Callable[[Any], Any]) -> None:
        self.name, self.parse, self.check = name, parse, check

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return self.check(self.parse(value) if isinstance(value, str) else value)
        except ValueError:
            self.fail(f"{value!r} is not a valid {self.name}", param, ctx)
        except IRError as e:
            self.fail(str(e), param, ctx)


class OutputFile(click.Path):
    """A file to write: its folder must exist and be writable, checked before the command does any work."""

    def __init__(self) -> None:
        super().__init__(dir_okay=False, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        path = super().convert(value, param, ctx)
        folder = path.parent
        if not folder.is_dir():
            self.fail(f"{folder}: no such folder", param, ctx)
        if not os.access(folder, os.W_OK | os.X_OK):
            self.fail(f"{folder}: folder not writable", param, ctx)
        return path


class Folder(click.Path):
    """A folder to write into (a cache, an emit folder): created with its parents if missing, before any work."""

    def __init__(self) -> None:
        super().__init__(file_okay=False, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        path = super().convert(value, param, ctx)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.fail(f"{path}: cannot create the folder: {e.strerror or e}", param, ctx)
        if not os.access(path, os.W_OK | os.X_OK):
            self.fail(f"{path}: folder not writable", param, ctx)
        return path
