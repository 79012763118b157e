"""How a command-line entry point reports a problem the user can fix: one line, exit 2."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer
import typer.core
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
            fail(validation_message(e))

    return wrapper


def validation_message(e: ValidationError) -> str:
    """A config's first validation error, named by its option: `--seeds (item 2): ...`."""
    first = e.errors()[0]
    names = [str(p) for p in first["loc"] if isinstance(p, str)]
    items = [str(p + 1) for p in first["loc"] if isinstance(p, int)]
    flag = f"--{'-'.join(names).replace('_', '-')}" if names else ""
    where = f"{flag} (item {', '.join(items)})" if flag and items else flag
    return f"{where}: {first['msg']}" if where else first["msg"]


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(EXIT_USAGE)


class _OneLineUsage:
    """Typer's own usage errors (an unknown option, a value that is not one of the choices)
    as one `error:` line with exit 2 too, instead of a framed box; `ddm` with no arguments
    still prints its help."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except typer.TyperException as e:  # typer's click: UsageError, BadParameter...
            if type(e).__name__ == "NoArgsIsHelpError":
                e.show()
            else:
                ctx = getattr(e, "ctx", None)
                hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
                print(f"error: {' '.join(e.format_message().split())}{hint}", file=sys.stderr)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


def command_line(help: str) -> typer.Typer:
    """A Typer app of sub-commands whose every problem is one `error:` line and exit 2."""
    return typer.Typer(
        cls=UsageGroup,
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        help=help,
    )


class UsageGroup(_OneLineUsage, typer.core.TyperGroup):
    """A Typer app's group (`typer.Typer(cls=UsageGroup)`) with one-line usage errors."""


class UsageCommand(_OneLineUsage, typer.core.TyperCommand):
    """A single command (`app.command(cls=UsageCommand)`) with one-line usage errors."""
