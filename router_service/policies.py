"""Routing policies: per sample and per step, which experts see x_t and with what weight.

A policy is chosen per request by a name string (`get_policy("top-2")`) and is data, not a
code path: a small pure function from what it consumes to a `RoutingDecision`, whose
per-sample weights sum to 1.

    full                  every expert, weights = router probabilities p(k | x_t, t)
                          (experts below MIN_WEIGHT skipped, the rest renormalised)
    top-K                 the K most probable experts, renormalised (top-1, top-2, ...)
    threshold-T           every expert with p >= T (0 < T <= 1), at least the top-1,
                          renormalised
    uniform               every expert, equal weights (the naive ensemble)
    nearest-centroid[-K]  no router: the K (default 1) clusters whose centroids lie closest
                          to the denoised estimate x̂_0 in the data set's feature space,
                          weights softmax(-distance / temperature) over those K; the
                          expert-data alignment principle used directly as a policy
    oracle                the cluster the held-out image behind x_t came from (analysis)
    NAME@T                a temperature T > 0 for any weighting policy: a router policy
                          routes on p_k^(1/T) renormalised (T < 1 sharpens the router's
                          probabilities, T > 1 flattens them; full@0.25, top-2@4);
                          nearest-centroid's softmax(-distance / T) (as `temperature=`)

`policy.needs` says what the policy consumes: "router" (probabilities), "features"
(distances to the cluster centroids), "oracle" (true clusters) or None (uniform). Ties
go to the lower expert id. Which x̂_0 nearest-centroid embeds, and what it does before any
velocity exists, is the sampler's business (see sampler.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch

from ddm_nodes.errors import DDMError

MIN_WEIGHT = 1e-6  # `full` skips experts whose router probability is below this
DEFAULT_TEMPERATURE = 1.0  # p^(1/T) for router policies, softmax(-d / T) for nearest-centroid
# below ~1e-300 log(p) / T and -d / T overflow to -inf and every weight turns NaN; 1e-3
# already routes like top-1, so nothing is lost by refusing what lies under it
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 1e6
NO_EXPERT = -1  # padding in RoutingDecision.ids
Needs = Literal["router", "features", "oracle"]
POLICY_FORMS = (
    "full",
    "uniform",
    "top-K",
    "threshold-T",
    "nearest-centroid",
    "nearest-centroid-K",
    "oracle",
    "NAME@T",
)


class RoutingError(DDMError, ValueError):
    """A policy name, option or routing input the caller can fix."""


def valid_forms(num_experts: int | None = None) -> str:
    """The policy grammar, for error messages (with K's range when K is known)."""
    k = f"1 <= K <= {num_experts}" if num_experts else "K >= 1, at most the number of experts"
    return (
        f"full, uniform, top-K ({k}), threshold-T (0 < T <= 1), nearest-centroid, "
        f"nearest-centroid-K ({k}), oracle; NAME@T gives a weighting policy temperature T > 0"
    )


@dataclass(frozen=True)
class RoutingDecision:
    """Selected experts and their weights, per sample; slot j of sample n is expert
    ids[n, j] with weight weights[n, j]. Empty slots hold NO_EXPERT and weight 0."""

    ids: torch.Tensor  # (N, m) long
    weights: torch.Tensor  # (N, m) float, each row sums to 1

    @property
    def selected(self) -> torch.Tensor:
        """(N, m) bool: the slots that hold an expert."""
        return self.ids != NO_EXPERT

    def counts(self) -> torch.Tensor:
        """(N,) how many experts each sample selected."""
        return self.selected.sum(dim=1)

    def experts(self) -> list[int]:
        """Every expert some sample selected, ascending."""
        return torch.unique(self.ids[self.selected]).tolist()

    def rows(self, expert_id: int) -> torch.Tensor:
        """(n_k,) indices of the samples that selected `expert_id`, ascending."""
        return (self.ids == expert_id).any(dim=1).nonzero().squeeze(1)

    def dense(self, num_experts: int) -> torch.Tensor:
        """(N, K) weights, 0 for unselected experts."""
        out = torch.zeros(self.ids.shape[0], num_experts, dtype=self.weights.dtype)
        slot = torch.where(self.selected, self.ids, 0)
        return out.scatter_add_(1, slot, torch.where(self.selected, self.weights, 0))


# --- the policies: pure functions of what they consume -----------------------------------


def _ranked(ids: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor) -> RoutingDecision:
    """Keep a prefix of each row of ranked (ids, weights), renormalise, trim empty columns."""
    keep = keep.clone()
    keep[:, 0] = True  # every sample keeps its best expert
    weights = torch.where(keep, weights, 0)
    weights = weights / weights.sum(dim=1, keepdim=True)
    width = int(keep.sum(dim=1).max())
    ids = torch.where(keep, ids, NO_EXPERT)
    return RoutingDecision(ids[:, :width].contiguous(), weights[:, :width].contiguous())


def _by_probability(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts ranked by decreasing probability, ties to the lower id: (ids, probs)."""
    ranked, ids = torch.sort(probs, dim=1, descending=True, stable=True)
    return ids, ranked


def full(probs: torch.Tensor) -> RoutingDecision:
    """Every expert, weighted by its router probability; those below MIN_WEIGHT skipped."""
    ids, ranked = _by_probability(probs)
    return _ranked(ids, ranked, ranked >= MIN_WEIGHT)


def top_k(probs: torch.Tensor, k: int) -> RoutingDecision:
    """The k most probable experts, probabilities renormalised over them."""
    ids, ranked = _by_probability(probs)
    keep = torch.zeros_like(ranked, dtype=torch.bool)
    keep[:, :k] = True
    return _ranked(ids, ranked, keep)


def threshold(probs: torch.Tensor, tau: float) -> RoutingDecision:
    """Every expert with probability >= tau (always at least the top-1), renormalised."""
    ids, ranked = _by_probability(probs)
    return _ranked(ids, ranked, ranked >= tau)


def uniform(num_samples: int, num_experts: int) -> RoutingDecision:
    """Every expert with weight 1/K: the naive ensemble."""
    ids = torch.arange(num_experts).expand(num_samples, num_experts).contiguous()
    return RoutingDecision(ids, torch.full((num_samples, num_experts), 1.0 / num_experts))


def nearest_centroid(distances: torch.Tensor, k: int, temperature: float) -> RoutingDecision:
    """The k clusters with the closest centroids, weights softmax(-distance / temperature)."""
    near, ids = torch.sort(distances.float(), dim=1, stable=True)
    near, ids = near[:, :k], ids[:, :k]
    return RoutingDecision(ids.contiguous(), torch.softmax(-near / temperature, dim=1))


def oracle(clusters: torch.Tensor) -> RoutingDecision:
    """The true cluster of each sample, weight 1."""
    ids = clusters.reshape(-1, 1).long()
    return RoutingDecision(ids.contiguous(), torch.ones(ids.shape, dtype=torch.float32))


# --- the parsed, per-request policy ------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """A parsed policy name; `select` turns what it `needs` into a RoutingDecision."""

    name: str
    kind: Literal["full", "uniform", "top", "threshold", "nearest-centroid", "oracle"]
    k: int | None = None
    tau: float | None = None
    temperature: float = DEFAULT_TEMPERATURE

    @property
    def needs(self) -> Needs | None:
        if self.kind in ("full", "top", "threshold"):
            return "router"
        if self.kind == "nearest-centroid":
            return "features"
        return "oracle" if self.kind == "oracle" else None

    def select(
        self,
        num_samples: int,
        num_experts: int,
        *,
        probs: torch.Tensor | None = None,
        distances: torch.Tensor | None = None,
        clusters: torch.Tensor | None = None,
        available: torch.Tensor | None = None,
    ) -> RoutingDecision:
        """The decision for `num_samples` samples over experts 0..num_experts-1, from the
        input this policy needs: probs (N, K), distances (N, K) or clusters (N,).

        `available` (K,) bool leaves experts out (an expert with no live replica): router
        probabilities are renormalised over the available experts and distances of the
        others become infinite before the policy runs, so `full` drops the missing experts
        and renormalises, and top-K / nearest-centroid-K take the K best available ones
        (K capped at how many are available). A missing expert is never selected."""
        self.check_experts(num_experts)
        k = self.k
        if available is not None:
            _check_shape(available, (num_experts,), "available")
            live = int(available.sum())
            if live == 0:
                raise RoutingError("no expert is available to route to")
            k = None if k is None else min(k, live)
        if self.needs is None:
            if available is None:
                return uniform(num_samples, num_experts)
            ids = available.nonzero().squeeze(1).expand(num_samples, -1).contiguous()
            return RoutingDecision(ids, torch.full(ids.shape, 1.0 / ids.shape[1]))
        given = {"router": probs, "features": distances, "oracle": clusters}[self.needs]
        what = {"router": "router probabilities", "features": "centroid distances"}
        if given is None:
            raise RoutingError(
                f"policy {self.name!r} needs {what.get(self.needs, 'the true clusters')}"
            )
        if self.needs == "oracle":
            _check_shape(given, (num_samples,), "clusters")
            if given.numel() and not 0 <= int(given.min()) <= int(given.max()) < num_experts:
                raise RoutingError(
                    f"oracle clusters must lie in 0..{num_experts - 1}, got "
                    f"{sorted(set(given.tolist()))}"
                )
            if available is not None and not bool(available[given.long()].all()):
                raise RoutingError("the oracle policy cannot route around a missing expert")
            return oracle(given)
        _check_shape(given, (num_samples, num_experts), what[self.needs])
        if self.needs == "router" and self.temperature != DEFAULT_TEMPERATURE:
            given = sharpen(given, self.temperature)
        if available is not None and self.needs == "router":
            given = given * available
            mass = given.sum(dim=1, keepdim=True)
            # a row whose available experts all underflowed to 0 falls back to uniform
            given = torch.where(mass > 0, given / mass.clamp_min(1e-30), available / live)
            given = torch.where(available, given, -1.0)  # ranks below every available one
        elif available is not None:
            given = torch.where(available, given.float(), math.inf)
        if self.kind == "full":
            return full(given)
        if self.kind == "top":
            return top_k(given, k)
        if self.kind == "threshold":
            return threshold(given, self.tau)
        return nearest_centroid(given, k, self.temperature)

    def check_experts(self, num_experts: int) -> None:
        """RoutingError when this policy selects more experts than there are."""
        if self.k is not None and self.k > num_experts:
            raise RoutingError(
                f"policy {self.name!r} selects {self.k} experts but there are only "
                f"{num_experts}; valid forms: {valid_forms(num_experts)}"
            )


def sharpen(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """p_k^(1/T) renormalised per row: softmax(logits / T) of the router's logits."""
    logp = torch.log(probs.double().clamp_min(1e-300)) / temperature
    return torch.softmax(logp, dim=-1).to(probs.dtype)


def _check_shape(x: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(x.shape) != shape:
        raise RoutingError(f"{what} have shape {tuple(x.shape)}, expected {shape} (N, K)")


# ASCII only: `\d`, int() and float() also take other scripts' digits ("top-٣"), and float()
# takes "1_0", "nan" and "inf"; a policy name is an identifier, not a number to be guessed at
_TOP = re.compile(r"top-([0-9]+)")
_THRESHOLD = re.compile(r"threshold-(.+)")
_NEAREST = re.compile(r"nearest-centroid(?:-([0-9]+))?")
_NUMBER = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[-+]?[0-9]+)?")


def _number(text: str) -> float:
    """A plain decimal number ("0.5", "2", "1e-2"), else nan."""
    return float(text) if _NUMBER.fullmatch(text) else math.nan


def get_policy(name: str, *, temperature: float | None = None) -> Policy:
    """Parse a policy name (see the module docstring); `temperature` (or a NAME@T suffix)
    is the weighting temperature of router policies and nearest-centroid, refused for
    uniform and oracle. K <= number of experts is checked when the policy is applied."""
    text = name.strip().lower() if isinstance(name, str) else ""
    text, at, suffix = text.partition("@")
    if at:
        if temperature is not None:
            raise RoutingError(f"{name!r} names a temperature; do not also pass temperature")
        temperature = _number(suffix)
        if math.isnan(temperature):
            raise RoutingError(f"temperature in {name!r} must be a positive number, as in full@0.5")
    policy = None
    if text in ("full", "uniform", "oracle"):
        policy = Policy(text, text)
    elif m := _TOP.fullmatch(text):
        policy = _with_k(name, "top", m.group(1))
    elif m := _THRESHOLD.fullmatch(text):
        tau = _number(m.group(1))
        if not 0 < tau <= 1:  # also refuses nan
            raise RoutingError(
                f"threshold in {name!r} must satisfy 0 < T <= 1; valid forms: {valid_forms()}"
            )
        policy = Policy(f"threshold-{tau:.12g}", "threshold", tau=tau)
    elif m := _NEAREST.fullmatch(text):
        policy = _with_k(name, "nearest-centroid", m.group(1) or "1")
    if policy is None:
        raise RoutingError(f"unknown routing policy {name!r}; valid forms: {valid_forms()}")
    if temperature is not None:
        if policy.needs not in ("router", "features"):
            raise RoutingError(
                f"temperature applies to router policies and nearest-centroid, not {name!r}"
            )
        if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:  # also refuses nan
            raise RoutingError(
                f"temperature must be a positive number from {MIN_TEMPERATURE:g} to "
                f"{MAX_TEMPERATURE:g}, got {temperature:g}"
            )
        temperature = float(temperature)
        # the name says the temperature, so a name is a policy: results, metrics, reports
        label = policy.name
        if temperature != DEFAULT_TEMPERATURE:
            label = f"{label}@{temperature:g}"
        policy = Policy(label, policy.kind, k=policy.k, tau=policy.tau, temperature=temperature)
    return policy


MAX_K_DIGITS = 9  # no store has a billion experts; int() of 4300+ digits raises ValueError


def _with_k(name: str, kind: str, digits: str) -> Policy:
    if len(digits.lstrip("0")) > MAX_K_DIGITS:
        raise RoutingError(
            f"K in {name!r} is far more than any number of experts; valid forms: {valid_forms()}"
        )
    k = int(digits)
    if k < 1:
        raise RoutingError(f"K in {name!r} must be at least 1; valid forms: {valid_forms()}")
    canonical = f"{kind}-{k}" if kind == "top" or k > 1 else kind
    return Policy(canonical, kind, k=k)


# --- bounded metric labels ---------------------------------------------------------------

LABELLED_TOP_K = 8  # top-1 .. top-8 keep a series each; a larger K shares "top-k"
STRATEGY_LABELS = frozenset(
    {"full", "uniform", "threshold", "nearest-centroid", "oracle", "top-k", "invalid"}
    | {f"top-{k}" for k in range(1, LABELLED_TOP_K + 1)}
)


def strategy_label(policy: Policy | str | None) -> str:
    """The `strategy` label of a metric: one of STRATEGY_LABELS, whatever the request named.
    Thresholds, temperatures and large K are free numbers from unauthenticated requests, and
    each distinct label value is a new Prometheus series; responses keep the full name."""
    if isinstance(policy, str) and policy in STRATEGY_LABELS:
        return policy
    if not isinstance(policy, Policy):
        try:
            policy = get_policy(policy)
        except RoutingError:
            return "invalid"
    if policy.kind == "top":
        return f"top-{policy.k}" if policy.k <= LABELLED_TOP_K else "top-k"
    return policy.kind  # full, uniform, threshold, nearest-centroid, oracle
