"""How every `superopt` command reports failure: one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from superopt.errors import SuperoptError

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 70


def reports_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turns SuperoptError into one line on stderr and exit 2; any other exception into one line and exit 70
    (SUPEROPT_DEBUG=1 shows its traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SuperoptError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except Exception as e:
            if os.environ.get("SUPEROPT_DEBUG"):
                raise
            click.echo(f"internal error: {type(e).__name__}: {e} (set SUPEROPT_DEBUG=1 for the traceback)", err=True)
            sys.exit(EXIT_INTERNAL)

    return wrapper
