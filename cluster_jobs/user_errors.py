"""How a command-line entry point reports a problem the user can fix: one line, exit 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer
from pydantic import ValidationError

from ddm_nodes.errors import DDMError

EXIT_USAGE = 2


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn DDMError and config validation errors into one line on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DDMError as e:
            fail(str(e))
        except ValidationError as e:
            first = e.errors()[0]
            loc = "-".join(str(p) for p in first["loc"]).replace("_", "-")
            fail(f"--{loc}: {first['msg']}" if loc else first["msg"])

    return wrapper


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(EXIT_USAGE)
