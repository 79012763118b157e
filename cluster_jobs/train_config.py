"""`TrainConfig`: everything one training job needs, saved in training.json beside the
weights. `kind` says what is trained:

    expert    flow matching on ONE cluster's shards (the DDM's isolated experts)
    monolith  flow matching on every cluster's shards (the paper's "Monolithic" row)
    router    cross-entropy p(cluster | x_t, t) on every cluster's shards
    featnet   a classifier of clean images (class labels, else clusters) on every
              cluster's shards: the analysis' feature network for FID, KID, precision
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ddm_nodes.checkpoint import (
    FEATNET_PREFIX,
    MONOLITH_PREFIX,
    ROUTER_PREFIX,
    expert_prefix,
)

Kind = Literal["expert", "router", "monolith", "featnet"]
DEFAULT_EXPERT_PRESET = "unet-tiny"
DEFAULT_ROUTER_PRESET = "router-tiny"
# How a run is carried out, not what it trains: left out of the config hash.
SCHEDULING_FIELDS = {
    "restart",
    "max_failures",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "cpus_per_worker",
}


class TrainConfig(BaseModel):
    """Everything one training job needs; saved in training.json beside the weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind
    store: str = Field(description="store URI holding the prepared dataset")
    cluster: int | None = Field(None, ge=0, description="the expert's cluster (experts only)")
    preset: str = Field(DEFAULT_EXPERT_PRESET, description="EXPERT_PRESETS / ROUTER_PRESETS")
    steps: int = Field(1000, ge=1, le=10_000_000)
    batch_size: int = Field(64, ge=1, le=65_536, description="per worker")
    lr: float = Field(3e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    label_dropout: float = Field(0.1, ge=0, le=1, description="to the null label, for CFG")
    unconditional: bool = Field(False, description="ignore labels even when the data has them")
    workers: int = Field(1, ge=1, le=1024, description="data-parallel workers in this job")
    cpus_per_worker: float = Field(1.0, gt=0)
    device: Literal["cpu", "cuda"] = "cpu"
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1, description="step-numbered checkpoints retained")
    shuffle_buffer: int = Field(2000, ge=0)
    log_every: int = Field(50, ge=1)
    seed: int = Field(0, ge=0)
    max_failures: int = Field(2, ge=0, description="worker-group restarts Ray Train allows")
    restart: bool = Field(False, description="discard existing checkpoints and start over")

    @model_validator(mode="after")
    def _cluster_iff_expert(self) -> TrainConfig:
        if (self.kind == "expert") != (self.cluster is not None):
            raise ValueError("--cluster is required for experts and only for experts")
        if self.mixed_precision == "fp16" and self.device == "cpu":
            raise ValueError("fp16 needs --device cuda; use bf16 or no on the CPU")
        return self

    @property
    def prefix(self) -> str:
        if self.kind == "expert":
            return expert_prefix(self.cluster)
        return {"router": ROUTER_PREFIX, "featnet": FEATNET_PREFIX}.get(self.kind, MONOLITH_PREFIX)

    @property
    def name(self) -> str:
        return f"expert-{self.cluster:03d}" if self.kind == "expert" else self.kind

    def config_hash(self) -> str:
        """Short hash of what determines the trained model (not how it is scheduled)."""
        fields = self.model_dump(exclude=SCHEDULING_FIELDS)
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
