"""The typed arguments of the Serve application, shared by `ddm serve`, `serve run
router_service.app:build_app key=value ...` and the Serve config YAML under infra/serve/.

Lax on types (Serve passes `key=value` command-line args as strings) but strict on names:
an unknown argument is refused.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ddm_nodes.names import expert_name
from router_service.expert_set import ExpertCard, RouterPin
from router_service.policies import get_policy
from router_service.schemas import DEFAULT_ALLOWED_HOSTS, Limits
from router_service.step_batcher import DEFAULT_MAX_ROWS, DEFAULT_WINDOW_S

# a DNS name, an IPv4 address or a bracketed or bare IPv6 address, optionally with :port
_HOST = re.compile(
    r"\*|[A-Za-z0-9._-]{1,253}(:[0-9]{1,5})?|\[?[0-9A-Fa-f:.]{2,45}\]?(:[0-9]{1,5})?"
)


class Autoscaling(BaseModel):
    """Serve autoscaling for every expert deployment (replaces `replicas`)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(4, gt=0, description="per replica")

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError("autoscaling.max_replicas must be >= min_replicas")
        return self


class BatchConfig(BaseModel):
    """An expert replica's `@serve.batch` settings: its `user_config`, so `serve deploy`
    with new values reconfigures running replicas without restarting them."""

    model_config = ConfigDict(extra="forbid")

    max_batch: int = Field(64, ge=1, le=65536, description="most samples per forward pass")
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, le=10, description="how long a forward waits to fill its batch"
    )


class RouterConfig(BaseModel):
    """The router's `user_config`: the expert set and router version build_app found, which
    `serve deploy` of a changed registry (or a retrained router) replaces in place."""

    model_config = ConfigDict(extra="forbid")

    experts: list[ExpertCard] = Field(min_length=1)
    registry: str = Field("", description="sha256 of experts.json ('': the default registry)")
    router: RouterPin | None = Field(None, description="the router version (None: none)")


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store: str = Field(description="store URI with a prepared data set and trained experts")
    replicas: int = Field(1, ge=1, le=64, description="replicas per expert deployment")
    expert_replicas: dict[int, int] = Field(
        default_factory=dict, description="per-expert replica counts overriding `replicas`"
    )
    autoscaling: Autoscaling | None = Field(None, description="autoscale experts instead")
    device: Literal["cpu", "cuda"] = Field("cpu", description="where experts run")
    # Ray's CPU accounting only places replicas; small shares let K=8 experts, the router
    # and a training job fit a 2-CPU head (the OS shares the cores among busy replicas).
    expert_num_cpus: float = Field(0.1, ge=0, description="Ray CPUs per expert replica")
    max_replicas_per_node: int | None = Field(
        None,
        ge=1,
        description="most replicas of one expert on one node: 1 spreads an expert's replicas "
        "over nodes, so losing a node leaves every expert a replica (default: no limit)",
    )
    router_resources: dict[str, float] = Field(
        default_factory=dict,
        description='custom Ray resources of the router replica, e.g. {"ddm-node-0": 0.01} '
        "keeps the ingress on the head, whose HTTP proxy the clients call",
    )
    expert_num_gpus: float = Field(0.0, ge=0, description="Ray GPUs per expert replica")
    router_num_cpus: float = Field(0.1, ge=0, description="Ray CPUs of the router replica")
    torch_threads: int = Field(1, ge=1, le=256, description="torch threads per replica")
    router_torch_threads: int = Field(
        2,
        ge=1,
        le=256,
        description="torch threads of the router replica: its network runs once per tick "
        "while the experts wait for its decision",
    )
    max_batch: int = BatchConfig.model_fields["max_batch"]
    batch_wait_timeout_s: float = BatchConfig.model_fields["batch_wait_timeout_s"]
    expert_max_ongoing_requests: int = Field(
        64, ge=1, description="concurrent calls a replica accepts (batching needs several)"
    )
    default_strategy: str = Field("top-2", description="strategy when a request names none")
    step_window_s: float = Field(
        DEFAULT_WINDOW_S,
        ge=0,
        le=1,
        description="how long the router's step batcher waits for in-flight requests' "
        "evaluations to join a tick (it starts at once when every request is waiting)",
    )
    step_max_rows: int = Field(
        DEFAULT_MAX_ROWS, ge=1, le=65536, description="most samples in one step-batcher tick"
    )
    limits: Limits = Field(default_factory=Limits)
    max_concurrent_requests: int = Field(8, ge=1, description="requests sampling at once")
    max_queued_requests: int = Field(32, ge=0, description="requests waiting; beyond: 503")
    expert_timeout_s: float = Field(30, gt=0, description="no answer by then: unavailable")
    expert_retries: int = Field(2, ge=0, le=10, description="retries after a replica died")
    expert_down_for_s: float = Field(5, ge=0, description="how long an expert stays down")
    health_check_period_s: float = Field(10, gt=0, description="Serve replica health checks")
    registry: str | None = Field(
        None,
        pattern=r"^(default|[0-9a-f]{64})$",
        description="the expert registry to deploy: the sha256 `ddm experts add|remove` "
        "print ('default': no experts.json); any other registry is refused. In a Serve "
        "config, changing it is what makes `serve deploy` build the app again",
    )
    retire_after_s: float = Field(
        900,
        ge=0,
        description="how long a removed expert's deployment stays up for requests admitted "
        "before its removal (a deploy after that stops it); at least limits.request_timeout_s",
    )
    api_key: str | None = Field(
        None, min_length=8, description="bearer key for /v1/* (default: $DDM_API_KEY)"
    )
    allowed_hosts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED_HOSTS),
        min_length=1,
        max_length=64,
        description="Host header values /v1/* answer (ports ignored; '[::1]' or '::1'; '*' "
        "answers any): the names and addresses clients use, against DNS rebinding; other "
        "hosts get 421. `ddm serve --host H` adds H",
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _plain_hosts(cls, hosts: list[str]) -> list[str]:
        for h in hosts:
            if not _HOST.fullmatch(h):
                raise ValueError(
                    f"allowed_hosts entry {h[:100]!r} is not a host name or address (optionally "
                    "with :port), e.g. 'ddm.example.org', '10.0.0.5', '[::1]', or '*' for any"
                )
        return hosts

    @model_validator(mode="after")
    def _defaults_from_env(self) -> AppArgs:
        get_policy(self.default_strategy)  # a RoutingError (a ValueError) names the forms
        if self.api_key is None and os.environ.get("DDM_API_KEY"):
            self.api_key = os.environ["DDM_API_KEY"]
            if len(self.api_key) < 8:
                raise ValueError("DDM_API_KEY must be at least 8 characters")
        if self.retire_after_s < self.limits.request_timeout_s:
            raise ValueError(
                f"retire_after_s ({self.retire_after_s:g}) must be at least "
                f"limits.request_timeout_s ({self.limits.request_timeout_s:g}): a removed "
                "expert's deployment must outlive the requests admitted with it"
            )
        if self.device == "cuda" and self.expert_num_gpus == 0:
            self.expert_num_gpus = 1.0
        return self

    @property
    def batch(self) -> BatchConfig:
        return BatchConfig(max_batch=self.max_batch, batch_wait_timeout_s=self.batch_wait_timeout_s)

    def expert_options(self, k: int) -> dict:
        """Serve deployment options of expert k's deployment."""
        options = {
            "name": expert_name(k),
            "ray_actor_options": {
                "num_cpus": self.expert_num_cpus,
                "num_gpus": self.expert_num_gpus,
            },
            "user_config": self.batch.model_dump(),
            "max_ongoing_requests": self.expert_max_ongoing_requests,
            "health_check_period_s": self.health_check_period_s,
        }
        if self.max_replicas_per_node is not None:
            options["max_replicas_per_node"] = self.max_replicas_per_node
        if self.autoscaling is not None and k not in self.expert_replicas:
            options["autoscaling_config"] = self.autoscaling.model_dump()
        else:
            options["num_replicas"] = self.expert_replicas.get(k, self.replicas)
        return options

    def decoder_options(self) -> dict:
        """The VAE decoder of a latent dataset: one replica with an expert replica's CPUs and
        GPUs (it decodes every request's final batch at full resolution)."""
        return {
            "name": "decoder",
            "num_replicas": 1,
            "ray_actor_options": {
                "num_cpus": self.expert_num_cpus,
                "num_gpus": self.expert_num_gpus,
            },
            "health_check_period_s": self.health_check_period_s,
        }

    def roster_options(self) -> dict:
        return {"name": "experts", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0}}

    def router_options(self, config: RouterConfig | None = None) -> dict:
        """The ingress's options; `config`, the expert set, is its user_config."""
        return {
            **({} if config is None else {"user_config": config.model_dump(mode="json")}),
            "name": "router",
            "num_replicas": 1,
            "ray_actor_options": {
                "num_cpus": self.router_num_cpus,
                **({"resources": self.router_resources} if self.router_resources else {}),
            },
            # admitted + queued + room for probes: Admission answers 503 past its own bound,
            # and Serve's proxy-side queue is bounded too, so nothing piles up unbounded
            "max_ongoing_requests": self.max_concurrent_requests + self.max_queued_requests + 16,
            "max_queued_requests": 64,
            "health_check_period_s": self.health_check_period_s,
        }
