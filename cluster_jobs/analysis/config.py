"""`AnalyzeConfig`: the settings of one `ddm analyze` run, recorded in results.json.

`ddm analyze`'s options are generated from these fields, and `ddm submit --analyze` hands
the job the whole config as JSON (`--config`), so the run in the job is the run that was
checked before submitting. Light to import: the command line is built from it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_STRATEGIES = ["full", "top-1", "top-2", "threshold-0.2", "nearest-centroid", "uniform"]
# Small enough for CI on 2 cores: under 5 minutes on a tiny store. Not for conclusions.
QUICK_SETTINGS: dict[str, Any] = dict(
    n=64,
    steps=8,
    stability_n=16,
    alignment_n=16,
    disagreement_n=8,
    accuracy_n=32,
    train_per_cluster=50,
)


class AnalyzeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    store: str = Field(description="store URI with experts, router and featnet")
    out: str = Field(description="folder (or s3:// prefix) for results.json, report.md, plots")
    strategies: list[str] = Field(
        default_factory=lambda: list(DEFAULT_STRATEGIES),
        description="comma-separated routing strategies",
    )
    include_monolith: bool = Field(False, description="also score the monolith")
    n: int = Field(1000, ge=10, le=100_000, description="images per strategy and seed")
    steps: int = Field(50, ge=1, le=1000, description="Euler steps")
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1], min_length=1, description="comma-separated seeds"
    )
    stability_n: int = Field(200, ge=2, description="trajectories for stability")
    alignment_n: int = Field(200, ge=2, description="traced trajectories for alignment")
    disagreement_n: int = Field(64, ge=3, description="trajectories with every expert traced")
    accuracy_n: int = Field(256, ge=8, description="held-out images for expert errors")
    eps: float = Field(1e-3, gt=0, le=1, description="RMS per pixel of the perturbation δ")
    knn: int = Field(5, ge=1, description="neighbours for kNN cluster distances")
    train_per_cluster: int = Field(500, ge=10, description="training features per cluster")
    inception: str | None = Field(
        None,
        description="local TorchScript Inception-v3 (inception-2015-12-05.pt): also FID over "
        "its features",
    )
    quick: bool = Field(
        False,
        description="small settings for CI (n 64, 8 steps) where not given; not for conclusions",
    )

    @model_validator(mode="before")
    @classmethod
    def _quick_settings(cls, data: Any) -> Any:
        """--quick fills in the settings that were not given."""
        if isinstance(data, dict) and data.get("quick"):
            data = {**QUICK_SETTINGS, **data}
        return data

    @field_validator("strategies")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from router_service.policies import get_policy

        for name in v:
            policy = get_policy(name)  # RoutingError (a ValueError) names the forms
            if policy.needs == "oracle":
                raise ValueError("oracle needs true clusters; it is not a sampling strategy")
        return [get_policy(name).name for name in v]
