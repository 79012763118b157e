"""Command-line options generated from a pydantic model's fields.

Every field becomes an option (`warmup_steps` -> `--warmup-steps`) whose help is the
field's description and default, so a field added to a config is settable on every command
built from it, and none can be forgotten on the way. An option left out is None and the
model's default applies; `values` turns what was given into field values (a list field
takes comma-separated items).
"""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from cluster_jobs.user_errors import user_errors
from ddm_nodes.errors import DDMError


def paragraphs(doc: str | None) -> str:
    """A docstring as help text: lines joined inside each paragraph, so the terminal wraps
    them (hard-wrapped source lines otherwise break mid-sentence in `--help`)."""
    text = inspect.cleandoc(doc or "")
    return "\n\n".join(" ".join(p.split()) for p in text.split("\n\n") if p.strip())


def field_option(name: str, info: FieldInfo, *, choices: Iterable[str] | None = None) -> Any:
    """The `Annotated[type | None, typer.Option]` of one field."""
    kind = _option_type(info.annotation)
    # "(default: x)", not "[x]": rich, which renders typer's help, reads "[cpu]" as markup
    if info.is_required():
        default = " (required)"
    else:
        shown = info.get_default(call_default_factory=True)
        default = "" if shown is None else f" (default: {_show(shown)})"
    help_text = f"{info.description or name.replace('_', ' ')}{default}"
    flag = f"--{name.replace('_', '-')}"
    if kind is bool:
        return Annotated[bool | None, typer.Option(f"{flag}/--no-{flag[2:]}", help=help_text)]
    if choices is not None:
        kind = typing.Literal[tuple(choices)]
    return Annotated[kind | None, typer.Option(flag, help=help_text)]


def _option_type(annotation: Any) -> Any:
    """int | None -> int; list[int] -> str (comma-separated); Literal stays a Literal."""
    annotation = _unwrap(annotation)
    return str if typing.get_origin(annotation) is list else annotation


def _unwrap(annotation: Any) -> Any:
    """`T | None` -> T."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


class ModelOptions:
    """The options of `model`'s fields, less `exclude`; `choices` narrows str fields."""

    def __init__(
        self,
        model: type[BaseModel],
        *,
        exclude: Iterable[str] = (),
        choices: dict[str, Iterable[str]] | None = None,
    ):
        self.model = model
        self.fields = {k: f for k, f in model.model_fields.items() if k not in set(exclude)}
        self.choices = {k: list(v) for k, v in (choices or {}).items()}

    def parameters(self) -> list[inspect.Parameter]:
        return [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=field_option(name, info, choices=self.choices.get(name)),
            )
            for name, info in self.fields.items()
        ]

    def values(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options that were given (not None), as field values."""
        out = {}
        for name, value in options.items():
            if name not in self.fields or value is None:
                continue
            if typing.get_origin(_unwrap(self.fields[name].annotation)) is list:
                value = [v.strip() for v in str(value).split(",") if v.strip()]
            out[name] = value
        return out

    def build(self, config: str | None, options: dict[str, Any], **fixed: Any) -> Any:
        """The model of `--config JSON` (if any) with the given options over it; `fixed`
        fields are the command's own (a training command's kind)."""
        base: dict[str, Any] = {}
        what = self.model.__name__
        if config is not None:
            try:
                base = json.loads(config)
            except ValueError as e:
                raise DDMError(f"--config is not JSON ({e}); pass a {what}'s JSON") from None
            if not isinstance(base, dict):
                raise DDMError(f"--config is not a {what}: expected a JSON object")
            for name, value in fixed.items():
                if base.get(name, value) != value:
                    raise DDMError(f"--config has {name} {base[name]!r}, this command {value!r}")
        return self.model.model_validate({**base, **self.values(options), **fixed})

    def command(
        self, run: Callable[[Any], Any], *, name: str, doc: str, **fixed: Any
    ) -> Callable[..., Any]:
        """A typer command `name`: an option per field plus `--config`; `run` receives the
        model built from them. Problems the user can fix exit 2 with one line."""

        def command(**options: Any) -> Any:
            return run(self.build(options.pop("config"), options, **fixed))

        config = inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[
                str | None,
                typer.Option(
                    help=f"a whole {self.model.__name__} as JSON (what `ddm submit` passes "
                    "its job); options given beside it override its fields"
                ),
            ],
        )
        command.__signature__ = inspect.Signature([*self.parameters(), config])
        command.__name__, command.__doc__ = name, paragraphs(doc)
        return user_errors(command)


def with_options(fn: Callable[..., Any], options: ModelOptions) -> Callable[..., Any]:
    """`fn(..., **fields)` presented to typer with its own parameters and then one option
    per field of `options` (which arrive in `**fields`)."""
    own = inspect.signature(fn, eval_str=True).parameters.values()  # typer needs real types
    kept = [p for p in own if p.kind is not p.VAR_KEYWORD]
    fn.__signature__ = inspect.Signature([*kept, *options.parameters()])
    return fn
