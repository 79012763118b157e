"""`TrainConfig`: everything one training job needs, saved in training.json beside the
weights. `kind` says what is trained:

    expert    flow matching on ONE cluster's shards (the DDM's isolated experts)
    monolith  flow matching on every cluster's shards (the paper's "Monolithic" row)
    router    cross-entropy p(cluster | x_t, t) on every cluster's shards
    featnet   a classifier of clean images (class labels, else clusters) on every
              cluster's shards: the analysis' feature network for FID, KID, precision
    vae       a small AutoencoderKL on every cluster's images, for `ddm prepare
              --latents vae:store` (latent DDMs without downloaded weights)

The config crosses every process boundary whole, as its own JSON (`ddm submit` -> the job's
`--config` -> the Ray Train workers), and every command-line option of a job is generated
from these fields (cluster_jobs/options.py). What a field is for is said on the field
itself: `scheduling` fields say how a run is carried out, not what it trains (left out of
the config hash); `kinds` lists the kinds a field applies to (all when absent).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ddm_nodes.names import Kind, expert_name, model_prefix
from ddm_nodes.presets import (
    DEFAULT_EXPERT_LR,
    DEFAULT_EXPERT_PRESET,
    DEFAULT_ROUTER_LR,
    DEFAULT_ROUTER_PRESET,
    DEFAULT_VAE_LR,
    DEFAULT_VAE_PRESET,
    EXPERT_PRESETS,
    ROUTER_PRESETS,
    VAE_PRESETS,
)

FLOW_KINDS = ("expert", "monolith")  # flow matching: denoisers of the expert presets
CLASSIFIER_KINDS = ("router", "featnet")  # classifiers of the router presets
SCHEDULING = {"scheduling": True}
# (preset, learning rate) of a kind when the config leaves them out; else the expert's
KIND_DEFAULTS = {
    **{kind: (DEFAULT_ROUTER_PRESET, DEFAULT_ROUTER_LR) for kind in CLASSIFIER_KINDS},
    "vae": (DEFAULT_VAE_PRESET, DEFAULT_VAE_LR),
}


def _kinds(*kinds: str) -> dict[str, Any]:
    return {"kinds": list(kinds)}


class TrainConfig(BaseModel):
    """Everything one training job needs; saved in training.json beside the weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind = Field(description="what is trained: expert | monolith | router | featnet | vae")
    store: str = Field(description="store URI holding the prepared dataset")
    cluster: int | None = Field(
        None,
        ge=0,
        description="the data cluster this expert trains on",
        json_schema_extra=_kinds("expert"),
    )
    preset: str = Field(
        None,
        description=f"model preset (default: {DEFAULT_EXPERT_PRESET}; router and featnet: "
        f"{DEFAULT_ROUTER_PRESET}; vae: {DEFAULT_VAE_PRESET})",
        validate_default=True,
    )
    steps: int = Field(1000, ge=1, le=10_000_000, description="optimizer steps")
    batch_size: int = Field(64, ge=1, le=65_536, description="batch size per worker")
    lr: float = Field(
        None,
        gt=0,
        le=1,
        description=f"peak learning rate (default: {DEFAULT_EXPERT_LR}; router and featnet: "
        f"{DEFAULT_ROUTER_LR}; vae: {DEFAULT_VAE_LR})",
        validate_default=True,
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(100, ge=0, description="linear learning-rate warm-up steps")
    grad_clip: float = Field(1.0, gt=0, description="gradient norm clip")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="decay of the EMA weights saved")
    label_dropout: float = Field(
        0.1,
        ge=0,
        le=1,
        description="share of labels dropped to the null label, for classifier-free guidance",
        json_schema_extra=_kinds(*FLOW_KINDS),
    )
    unconditional: bool = Field(
        False,
        description="ignore labels even when the data has them",
        json_schema_extra=_kinds(*FLOW_KINDS),
    )
    prediction: Literal["v", "eps", "x0"] = Field(
        "v",
        description="what the denoiser predicts: v (velocity, flow matching), eps (the noise, "
        "DDPM-style) or x0 (the data); sampling converts every type to velocity",
        json_schema_extra=_kinds(*FLOW_KINDS),
    )
    workers: int = Field(1, ge=1, le=1024, description="data-parallel workers in this job")
    cpus_per_worker: float = Field(
        1.0,
        gt=0,
        description="CPUs per worker (also its torch threads)",
        json_schema_extra=SCHEDULING,
    )
    loader_workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="data-loader processes per worker that decode its batches; the batches "
        "are the same for any number (default: 0 on --device cpu, where the training threads "
        "already use the cores; on cuda min(8, the CPUs a worker has beyond "
        "--cpus-per-worker), as one process decodes too few images/s to keep a GPU busy)",
        json_schema_extra=SCHEDULING,
    )
    device: Literal["cpu", "cuda"] = Field("cpu", description="where the workers train")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="mixed precision through Accelerate (fp16 needs cuda)"
    )
    checkpoint_every: int = Field(
        200, ge=1, description="steps between resumable checkpoints", json_schema_extra=SCHEDULING
    )
    keep_checkpoints: int = Field(
        2, ge=1, description="step-numbered checkpoints retained", json_schema_extra=SCHEDULING
    )
    shuffle_buffer: int = Field(2000, ge=0, description="samples in the shuffle buffer")
    log_every: int = Field(
        50,
        ge=1,
        description="steps between progress lines and metrics",
        json_schema_extra=SCHEDULING,
    )
    seed: int = Field(0, ge=0, description="seed of weights, noise and shuffling")
    max_failures: int = Field(
        2, ge=0, description="worker-group restarts Ray Train allows", json_schema_extra=SCHEDULING
    )
    restart: bool = Field(
        False,
        description="discard the resumable checkpoints and start over (the published model "
        "stays servable until the new one replaces it)",
        json_schema_extra=SCHEDULING,
    )
    lock_ttl_s: float = Field(
        120,
        ge=5,
        le=86400,
        description="the model's writer lock expires this long after its holder's last "
        "heartbeat (a job that died without releasing it)",
        json_schema_extra=SCHEDULING,
    )

    @model_validator(mode="before")
    @classmethod
    def _defaults_of_kind(cls, data: Any) -> Any:
        """The preset and learning rate a field left out takes depend on the kind."""
        if isinstance(data, dict):
            preset, lr = KIND_DEFAULTS.get(
                data.get("kind"), (DEFAULT_EXPERT_PRESET, DEFAULT_EXPERT_LR)
            )
            data = dict(data)
            if data.get("preset") is None:
                data["preset"] = preset
            if data.get("lr") is None:
                data["lr"] = lr
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if (self.kind == "expert") != (self.cluster is not None):
            raise ValueError("--cluster is required for experts and only for experts")
        if self.mixed_precision == "fp16" and self.device == "cpu":
            raise ValueError("fp16 needs --device cuda; use bf16 or no on the CPU")
        return self

    @property
    def prefix(self) -> str:
        return model_prefix(self.kind, self.cluster)

    @property
    def name(self) -> str:
        return expert_name(self.cluster) if self.kind == "expert" else self.kind

    def config_hash(self) -> str:
        """Short hash of what determines the trained model (not how it is scheduled)."""
        fields = self.model_dump(exclude=scheduling_fields())
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]


def _extra(name: str) -> dict[str, Any]:
    extra = TrainConfig.model_fields[name].json_schema_extra
    return extra if isinstance(extra, dict) else {}


def scheduling_fields() -> set[str]:
    """Fields that say how a run is carried out, not what it trains."""
    return {name for name in TrainConfig.model_fields if _extra(name).get("scheduling")}


def fields_for(kind: str) -> list[str]:
    """The fields that apply to a job of `kind` (`kind` itself included)."""
    return [n for n in TrainConfig.model_fields if kind in _extra(n).get("kinds", [kind])]


def preset_names(kind: str) -> list[str]:
    """The presets a model of `kind` can be built from (registry order)."""
    if kind == "vae":
        return list(VAE_PRESETS)
    return list(ROUTER_PRESETS if kind in CLASSIFIER_KINDS else EXPERT_PRESETS)
