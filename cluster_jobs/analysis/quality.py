"""Sample quality in the feature network's space (the store's `featnet`, trained on the data
set itself: Inception weights cannot be downloaded here, and small grey images are not
what Inception sees anyway).

    FID        Fréchet distance between Gaussians fitted to real and generated features
               (torchmetrics' FrechetInceptionDistance over our features)
    KID        unbiased polynomial-kernel MMD^2 (torchmetrics' KernelInceptionDistance)
    precision  share of generated samples inside the k-NN ball of some real sample
    recall     share of real samples inside the k-NN ball of some generated sample
               (Kynkäänniemi et al. 2019)
    density    expected count of real k-NN balls holding a generated sample, / k
    coverage   share of real samples whose k-NN ball holds a generated sample
               (Naeem et al. 2020); k = PRDC_K

Per sample: the distance to the nearest real (held-out) feature and the feature network's
confidence (max softmax), for correlating quality with per-sample routing statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ddm_nodes.checkpoint import has_checkpoint, load_model
from ddm_nodes.errors import DDMError
from ddm_nodes.names import FEATNET_PREFIX
from ddm_nodes.router_net import RouterNet
from ddm_nodes.store import Store

PRDC_K = 5


class _Given(nn.Module):
    """Features already computed: what torchmetrics' metrics call their "feature" net."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@dataclass
class FeatNet:
    """The store's feature network and its held-out accuracy."""

    net: RouterNet
    heldout_accuracy: float | None

    @classmethod
    def check_present(cls, store: Store) -> None:
        if not has_checkpoint(store, FEATNET_PREFIX):
            raise DDMError(
                f"store {store.uri} has no feature network: train it with "
                f"`ddm train featnet --store {store.uri}`"
            )

    @classmethod
    def load(cls, store: Store) -> FeatNet:
        cls.check_present(store)
        loaded = load_model(store, FEATNET_PREFIX, kind="featnet")
        accuracy = loaded.training.get("evaluation", {}).get("heldout_accuracy")
        return cls(loaded.model.eval(), accuracy)

    @property
    def dims(self) -> int:
        return int(self.net.config.widths[-1])

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, C, H, W) in [-1, 1] -> (features (N, D) float64, confidence (N,))."""
        feats, conf = [], []
        for x in images.split(batch):
            f = self.net.features(x.float(), torch.zeros(x.shape[0]))
            feats.append(f.double())
            conf.append(torch.softmax(self.net.out(f), dim=-1).max(dim=-1).values)
        return torch.cat(feats), torch.cat(conf)


@dataclass
class Inception:
    """A local TorchScript Inception-v3 for standard FID on RGB data (`--inception PATH`).

    The contract is NVIDIA's `inception-2015-12-05.pt` (stylegan2-ada-pytorch's metrics
    detector): `net(images, return_features=True)` takes uint8-valued images (N, 3, H, W)
    in [0, 255], resizes them itself and returns pool features (N, 2048). Grey images are
    repeated to 3 channels. A TorchScript file can run arbitrary ops: load only a file
    from a source you trust.
    """

    net: torch.jit.ScriptModule
    path: str

    @classmethod
    def load(cls, path: str) -> Inception:
        local = Path(path).expanduser()
        if not local.is_file():
            raise DDMError(
                f"--inception {path}: no such file; give the path of a local copy of "
                "NVIDIA's inception-2015-12-05.pt (nothing is downloaded)"
            )
        try:
            net = torch.jit.load(str(local), map_location="cpu").eval()
        except (OSError, RuntimeError, ValueError) as e:
            raise DDMError(
                f"--inception {path}: not a TorchScript file torch.jit.load can read "
                f"({e.__class__.__name__}); give NVIDIA's inception-2015-12-05.pt"
            ) from None
        return cls(net, path)

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch: int = 100) -> torch.Tensor:
        """images (N, C, H, W) in [-1, 1] -> features (N, D) float64."""
        feats = []
        for x in images.split(batch):
            x = ((x.float().clamp(-1, 1) + 1) * 127.5).round()
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            try:
                f = self.net(x.to(torch.uint8), return_features=True)
            except RuntimeError as e:
                raise DDMError(
                    f"--inception {self.path}: calling net(images, return_features=True) "
                    f"failed ({str(e).splitlines()[0][:200]}); give NVIDIA's "
                    "inception-2015-12-05.pt"
                ) from None
            feats.append(f.reshape(len(x), -1).double())
        return torch.cat(feats)


def fid_kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 50) -> tuple[float, float]:
    """(FID, KID mean) between feature sets (N, D), through torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    given = _Given(real.shape[1])
    fid = FrechetInceptionDistance(feature=given, normalize=False)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    size = min(len(real), len(fake), 1000)
    kid = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=subsets, subset_size=size)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    kid_mean, _ = kid.compute()
    return float(fid.compute()), float(kid_mean)


def _kth_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row."""
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the row itself at distance 0


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = PRDC_K) -> dict[str, float]:
    """Precision, recall, density and coverage of `fake` against `real` (N, D) features."""
    if min(len(real), len(fake)) <= k:
        raise DDMError(f"precision/recall need more than k={k} samples on each side")
    real_r, fake_r = _kth_radius(real, k), _kth_radius(fake, k)
    d = torch.cdist(real, fake)  # (N_real, N_fake)
    inside_real = d < real_r[:, None]
    return {
        "precision": float(inside_real.any(dim=0).double().mean()),
        "recall": float((d < fake_r[None, :]).any(dim=1).double().mean()),
        "density": float(inside_real.double().sum() / (k * len(fake))),
        "coverage": float((d.min(dim=1).values < real_r).double().mean()),
    }


def nearest_real_distance(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """(N_fake,) distance of each generated sample to its nearest real feature."""
    return torch.cdist(fake, real).min(dim=1).values
