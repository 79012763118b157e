"""`ddm analyze` and `python -m cluster_jobs.analysis` (what `ddm submit --analyze` runs):
one option per `AnalyzeConfig` field, generated from the model, plus `--config JSON`.

`job_config` is how `ddm submit --store URI --analyze -- ARGS` turns ARGS into the config
its job receives: parsed as `ddm analyze`'s own arguments, checked against the store before
anything is submitted, and a local `--out` made absolute (the job runs in a copy of the
project, on the head's machine).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import typer

from cluster_jobs.analysis.config import AnalyzeConfig
from cluster_jobs.options import ModelOptions
from cluster_jobs.user_errors import UsageCommand
from ddm_nodes.errors import DDMError

MODULE = "cluster_jobs.analysis"
OPTIONS = ModelOptions(AnalyzeConfig)


def _run(cfg: AnalyzeConfig) -> None:
    from cluster_jobs.analysis.analyze import run_analysis

    report = run_analysis(cfg)
    print(json.dumps({"out": cfg.out, "seconds": round(report["seconds"], 1)}))


COMMAND = OPTIONS.command(
    _run,
    name="analyze",
    doc="""Reproduce the paper's analyses: quality (FID, KID, precision/recall), stability
    (trajectory sensitivity, Δ_refine) and expert-data alignment, with a report.""",
)


def app() -> typer.Typer:
    """The analyze command alone, as `python -m cluster_jobs.analysis` runs it."""
    one = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    one.command(cls=UsageCommand, help=COMMAND.__doc__)(COMMAND)
    return one


def entrypoint(cfg: AnalyzeConfig) -> str:
    """The shell command a Ray job runs for `cfg`: the whole config as JSON."""
    return f"python -m {MODULE} --config {shlex.quote(cfg.model_dump_json())}"


def job_config(store: str, args: list[str]) -> AnalyzeConfig:
    """The config of `ddm submit --store STORE --analyze -- ARGS`, checked (see the module
    docstring); a problem is a DDMError naming the argument."""
    from cluster_jobs.analysis.analyze import preflight
    from ddm_nodes.store import open_store

    if any(a == "--store" or a.startswith("--store=") for a in args):
        raise DDMError("give the store once, as `ddm submit --store URI --analyze -- ARGS`")
    command = typer.main.get_command(app())
    try:
        parsed = command.make_context("ddm submit --analyze --", ["--store", store, *args])
    except typer.Exit:  # --help, already printed
        raise DDMError("`ddm analyze --help` lists the arguments --analyze takes") from None
    except typer.TyperException as e:  # typer's own click: its usage errors
        raise DDMError(f"--analyze: {e.format_message()}") from None
    params = dict(parsed.params)
    cfg = OPTIONS.build(params.pop("config"), params)
    preflight(cfg, open_store(store))
    if "://" in cfg.out:  # a store URI is left as given
        return cfg
    return cfg.model_copy(update={"out": str(Path(cfg.out).expanduser().resolve())})
