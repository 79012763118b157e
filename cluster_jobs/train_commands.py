"""The three training commands (`ddm train expert|router|monolith`, and
`python -m cluster_jobs.train_expert|train_router|train_monolith`, which `ray job submit`
runs). Each turns its options into a `TrainConfig`, launches one Ray Train job and prints
the outcome as one JSON line. Options left out take TrainConfig's defaults.

All three share one option list (`_options`); each command is that list less what does
not apply to it, so the option names cannot drift apart.
"""

import inspect
import json
import logging
from dataclasses import asdict
from typing import Annotated, Any

import typer

from cluster_jobs.user_errors import user_errors


def _options(
    store: Annotated[str, typer.Option(help="store URI holding the prepared dataset")],
    cluster: Annotated[int, typer.Option(help="the data cluster this expert trains on")],
    preset: Annotated[str | None, typer.Option(help="model preset [experts: unet-tiny]")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps [1000]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="batch size per worker [64]")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate [experts: 3e-4]")] = None,
    workers: Annotated[int | None, typer.Option(help="data-parallel workers [1]")] = None,
    cpus_per_worker: Annotated[float | None, typer.Option(help="CPUs per worker [1]")] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda [cpu]")] = None,
    mixed_precision: Annotated[
        str | None, typer.Option(help="no | fp16 | bf16, through Accelerate [no]")
    ] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="steps between resumable checkpoints [200]")
    ] = None,
    keep_checkpoints: Annotated[
        int | None, typer.Option(help="step-numbered checkpoints kept [2]")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="seed of weights, noise, shuffling [0]")] = None,
    max_failures: Annotated[
        int | None, typer.Option(help="worker-group restarts allowed [2]")
    ] = None,
    unconditional: Annotated[bool, typer.Option(help="ignore the data's labels")] = False,
    restart: Annotated[bool, typer.Option(help="discard checkpoints and start over")] = False,
) -> None:
    """The option list every training command is cut from (never called)."""


def _command(kind: str, doc: str, drop: tuple[str, ...] = (), **defaults: Any):
    params = []
    for name, p in inspect.signature(_options).parameters.items():
        if name in drop:
            continue
        params.append(p.replace(default=defaults[name]) if name in defaults else p)

    def command(**options: Any) -> None:
        from cluster_jobs.train_config import TrainConfig
        from cluster_jobs.training import launch

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        given = {k: v for k, v in options.items() if v is not None}
        print(json.dumps(asdict(launch(TrainConfig(kind=kind, **given)))))

    command.__signature__ = inspect.Signature(params)
    command.__name__, command.__doc__ = kind, doc
    return user_errors(command)


COMMANDS = {
    "expert": _command(
        "expert",
        "Train ONE expert on ONE cluster's shards (flow matching, Ray Train + Accelerate).",
    ),
    "monolith": _command(
        "monolith",
        "Train one model of the expert preset on ALL clusters (the monolithic baseline).",
        drop=("cluster",),
    ),
    "router": _command(
        "router",
        "Train the router p(cluster | x_t, t) on every cluster's shards.",
        drop=("cluster", "unconditional"),
        preset="router-tiny",
        lr=1e-3,
    ),
    "featnet": _command(
        "featnet",
        "Train the analysis' feature network: a classifier of clean images (class labels, "
        "else clusters) whose features FID, KID and precision/recall use.",
        drop=("cluster", "unconditional"),
        preset="router-tiny",
        lr=1e-3,
    ),
}


def main(kind: str) -> None:
    """Entry point of `python -m cluster_jobs.train_<kind>`."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(COMMANDS[kind])
    app()
