"""The training commands: `ddm train KIND` and `python -m cluster_jobs.training KIND`, which
is what `ray job submit` runs. KIND is expert, monolith, router, featnet or vae.

Each command has one option per `TrainConfig` field that applies to its kind, generated
from the model (`--warmup-steps`, `--weight-decay`, ...), plus `--config JSON`: a whole
TrainConfig, which is how `ddm submit` hands a job its config; options given beside it
override its fields. The command builds the TrainConfig, launches one Ray Train job with it
and prints the outcome as one JSON line.
"""

from __future__ import annotations

import json
import logging
import shlex
from dataclasses import asdict

import typer

from cluster_jobs.options import ModelOptions
from cluster_jobs.training.config import TrainConfig, fields_for, preset_names
from cluster_jobs.user_errors import command_line

MODULE = "cluster_jobs.training"
DOCS = {
    "expert": "Train ONE expert on ONE cluster's shards (flow matching, Ray Train + Accelerate).",
    "monolith": "Train one model of the expert preset on ALL clusters (the monolithic baseline).",
    "router": "Train the router p(cluster | x_t, t) on every cluster's shards.",
    "featnet": "Train the analysis' feature network: a classifier of clean images (class "
    "labels, else clusters) whose features FID, KID and precision/recall use.",
    "vae": "Train a small AutoencoderKL on the store's images (reports its held-out "
    "reconstruction error); `ddm prepare --latents vae:store` then trains the DDM on its "
    "latents.",
}


def train_options(kind: str, *, exclude: tuple[str, ...] = ()) -> ModelOptions:
    """The options of a `kind` job: every field that applies to it, presets as choices."""
    applies = set(fields_for(kind))
    skip = {"kind", *exclude, *(n for n in TrainConfig.model_fields if n not in applies)}
    return ModelOptions(TrainConfig, exclude=skip, choices={"preset": preset_names(kind)})


def entrypoint(cfg: TrainConfig) -> str:
    """The shell command a Ray job runs to train `cfg`: the whole config as JSON."""
    return f"python -m {MODULE} {cfg.kind} --config {shlex.quote(cfg.model_dump_json())}"


def _launch(cfg: TrainConfig) -> None:
    from cluster_jobs.training.launch import launch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(json.dumps(asdict(launch(cfg))))


def command(kind: str):
    """The `kind` training command: `train_options(kind)` and `--config`."""
    return train_options(kind).command(_launch, name=kind, doc=DOCS[kind], kind=kind)


COMMANDS = {kind: command(kind) for kind in DOCS}


def app() -> typer.Typer:
    """`ddm train` and `python -m cluster_jobs.training`: one sub-command per kind."""
    kinds = command_line(
        "Train an expert, the monolith, the router, the featnet or a VAE as a Ray job."
    )
    for kind, train in COMMANDS.items():
        kinds.command(kind, help=train.__doc__)(train)
    return kinds


def main() -> None:
    """`python -m cluster_jobs.training KIND [OPTIONS]`."""
    app()()
