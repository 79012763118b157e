"""The three training commands (`ddm train expert|router|monolith`, and
`python -m cluster_jobs.train_expert|train_router|train_monolith`, which `ray job submit`
runs). Each turns its options into a `TrainConfig`, launches one Ray Train job and prints
the outcome as one JSON line. Options left out take TrainConfig's defaults."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Annotated, Any

import typer

from cluster_jobs.user_errors import user_errors

Store = Annotated[str, typer.Option(help="store URI holding the prepared dataset")]
Preset = Annotated[str | None, typer.Option(help="model preset (EXPERT_PRESETS/ROUTER_PRESETS)")]
Steps = Annotated[int | None, typer.Option(help="optimizer steps [1000]")]
BatchSize = Annotated[int | None, typer.Option(help="batch size per worker [64]")]
LR = Annotated[float | None, typer.Option(help="learning rate [3e-4]")]
Workers = Annotated[int | None, typer.Option(help="data-parallel workers in this job [1]")]
CpusPerWorker = Annotated[float | None, typer.Option(help="CPUs each worker reserves [1]")]
Device = Annotated[str | None, typer.Option(help="cpu | cuda [cpu]")]
Precision = Annotated[str | None, typer.Option(help="no | fp16 | bf16, through Accelerate [no]")]
CkptEvery = Annotated[int | None, typer.Option(help="steps between resumable checkpoints [200]")]
Keep = Annotated[int | None, typer.Option(help="step-numbered checkpoints kept [2]")]
Seed = Annotated[int | None, typer.Option(help="seed for weights, noise and shuffling [0]")]
MaxFailures = Annotated[int | None, typer.Option(help="worker-group restarts allowed [2]")]
Restart = Annotated[bool, typer.Option(help="discard existing checkpoints and start over")]


def _run(kind: str, options: dict[str, Any]) -> None:
    from cluster_jobs.train_config import TrainConfig
    from cluster_jobs.training import launch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    given = {k: v for k, v in options.items() if v is not None}
    outcome = launch(TrainConfig(kind=kind, **given))
    print(json.dumps(asdict(outcome)))


@user_errors
def expert(
    store: Store,
    cluster: Annotated[int, typer.Option(help="the data cluster this expert trains on")],
    preset: Preset = None,
    steps: Steps = None,
    batch_size: BatchSize = None,
    lr: LR = None,
    workers: Workers = None,
    cpus_per_worker: CpusPerWorker = None,
    device: Device = None,
    mixed_precision: Precision = None,
    checkpoint_every: CkptEvery = None,
    keep_checkpoints: Keep = None,
    seed: Seed = None,
    max_failures: MaxFailures = None,
    unconditional: Annotated[bool, typer.Option(help="ignore the data's labels")] = False,
    restart: Restart = False,
) -> None:
    """Train ONE expert on ONE cluster's shards (flow matching, Ray Train + Accelerate)."""
    _run("expert", locals())


@user_errors
def monolith(
    store: Store,
    preset: Preset = None,
    steps: Steps = None,
    batch_size: BatchSize = None,
    lr: LR = None,
    workers: Workers = None,
    cpus_per_worker: CpusPerWorker = None,
    device: Device = None,
    mixed_precision: Precision = None,
    checkpoint_every: CkptEvery = None,
    keep_checkpoints: Keep = None,
    seed: Seed = None,
    max_failures: MaxFailures = None,
    unconditional: Annotated[bool, typer.Option(help="ignore the data's labels")] = False,
    restart: Restart = False,
) -> None:
    """Train one model of the expert preset on ALL clusters (the monolithic baseline)."""
    _run("monolith", locals())


@user_errors
def router(
    store: Store,
    preset: Annotated[str, typer.Option(help="router preset (ROUTER_PRESETS)")] = "router-tiny",
    steps: Steps = None,
    batch_size: BatchSize = None,
    lr: Annotated[float, typer.Option(help="learning rate")] = 1e-3,
    workers: Workers = None,
    cpus_per_worker: CpusPerWorker = None,
    device: Device = None,
    mixed_precision: Precision = None,
    checkpoint_every: CkptEvery = None,
    keep_checkpoints: Keep = None,
    seed: Seed = None,
    max_failures: MaxFailures = None,
    restart: Restart = False,
) -> None:
    """Train the router p(cluster | x_t, t) on every cluster's shards."""
    _run("router", locals())


COMMANDS = {"expert": expert, "router": router, "monolith": monolith}


def main(kind: str) -> None:
    """Entry point of `python -m cluster_jobs.train_<kind>`."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(COMMANDS[kind])
    app()
