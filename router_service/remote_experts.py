"""The sampler's backends over Ray Serve: one DeploymentHandle per expert, and the VAE
decoder's handle in a latent dataset (`RemoteDecoder`).

`predict(k, x_t, t, y)` sends the sub-batch to a replica of expert k's deployment and
awaits its velocity. Faults, per call:
- a replica that dies mid-call (actor died / unavailable) is retried, `retries` times with
  a short back-off; Serve's handle routes the retry to another live replica of that
  expert, so a request succeeds while any replica remains;
- when no replica answers within `timeout_s` (none alive), its deployment failed, or all
  retries failed, the expert is marked down for `down_for_s` and `ExpertUnavailable` is
  raised: the request fails (503) or, with on_unavailable="renormalize", routes around it.
  While marked down, calls fail at once instead of waiting out the timeout again; a call
  after that window probes it again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from router_service.metrics import RouterMetrics
from router_service.sampler import DecoderUnavailable, ExpertUnavailable


def _retryable() -> tuple[type[BaseException], ...]:
    """A replica died or went away: another replica of the same expert may answer."""
    from ray.exceptions import ActorUnavailableError, RayActorError
    from ray.serve.exceptions import ReplicaUnavailableError

    return (RayActorError, ActorUnavailableError, ReplicaUnavailableError)


def _deployment_failed() -> type[BaseException]:
    from ray.serve.exceptions import DeploymentUnavailableError

    return DeploymentUnavailableError


class RemoteExperts:
    """Expert k's calls go to `handles[k]`; an id it has no handle for is looked up once by
    `lookup(k)` (the router's: the deployment of that name in its app), so experts added to
    a running service are reached without rebuilding the router."""

    def __init__(
        self,
        handles: Sequence[Any] | Mapping[int, Any] = (),
        timeout_s: float = 30.0,
        retries: int = 2,
        down_for_s: float = 5.0,
        metrics: RouterMetrics | None = None,
        lookup: Callable[[int], Any] | None = None,
    ):
        self.handles: dict[int, Any] = (
            dict(handles) if isinstance(handles, Mapping) else dict(enumerate(handles))
        )
        self.lookup = lookup
        self.timeout_s = timeout_s
        self.retries = retries
        self.down_for_s = down_for_s
        self.metrics = metrics
        self._down_until: dict[int, float] = {}
        self._why: dict[int, str] = {}

    @property
    def num_experts(self) -> int:
        return max(self.handles, default=-1) + 1

    def handle(self, k: int) -> Any:
        if k not in self.handles:
            if self.lookup is None:
                raise ExpertUnavailable(k, "this router has no handle for it")
            self.handles[k] = self.lookup(k)
        return self.handles[k]

    def healthy(self, k: int) -> bool:
        return time.monotonic() >= self._down_until.get(k, 0.0)

    def _count(self, k: int, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.expert_call(k, outcome)

    def _down(self, k: int, why: str) -> ExpertUnavailable:
        self._down_until[k] = time.monotonic() + self.down_for_s
        self._why[k] = why
        self._count(k, "unavailable")
        return ExpertUnavailable(k, why)

    async def predict(
        self, k: int, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor:
        if not self.healthy(k):
            self._count(k, "unavailable")
            raise ExpertUnavailable(k, f"{self._why.get(k)} (marked down for {self.down_for_s} s)")
        args = (
            x_t.detach().cpu().numpy(),
            t.detach().cpu().numpy(),
            None if y is None else y.detach().cpu().numpy(),
        )
        failure = ""
        handle = self.handle(k)
        for attempt in range(self.retries + 1):
            response = handle.predict.remote(*args)
            try:
                v = await asyncio.wait_for(_awaited(response), self.timeout_s)
            except TimeoutError:
                response.cancel()
                raise self._down(k, f"no replica answered within {self.timeout_s} s") from None
            except _deployment_failed():
                raise self._down(k, "its deployment failed to deploy") from None
            except _retryable() as e:
                self._count(k, "retried")
                first_line = (str(e).splitlines() or [""])[0]
                failure = f"{type(e).__name__}: {first_line[:200]}"
                await asyncio.sleep(0.05 * (attempt + 1))
                continue
            self._count(k, "ok")
            return torch.from_numpy(v).to(x_t.device)
        raise self._down(k, f"{self.retries + 1} attempts failed, the last with {failure}")


async def _awaited(response: Any) -> Any:
    return await response


class RemoteDecoder:
    """The sampler's `decoder` over the DecoderServer deployment: latents -> images."""

    def __init__(self, handle: Any, timeout_s: float = 30.0):
        self.handle, self.timeout_s = handle, timeout_s

    async def decode(self, latents: torch.Tensor) -> torch.Tensor:
        response = self.handle.decode.remote(latents.detach().cpu().numpy())
        try:
            images = await asyncio.wait_for(_awaited(response), self.timeout_s)
        except TimeoutError:
            response.cancel()
            raise DecoderUnavailable(
                f"no decoder replica answered within {self.timeout_s} s"
            ) from None
        return torch.from_numpy(images).to(latents.device)
