"""Real images in-process: RGB `shapes`, learned feature extractors (tiny DINOv2 and CLIP
saved with save_pretrained: the real transformers loaders on small weights), spherical
k-means, VAE latents in the shards, `ddm train vae` and `--latents vae:store`, and the bad
inputs (an unloadable or tampered REF, a VAE for other channels, an expert of another
shape) refused with one line and nothing written."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_ddm_in_process
from tiny_models import save_clip, save_dinov2, save_vae

from cluster_jobs.data.clustering import spherical_kmeans
from cluster_jobs.data.prepare import PrepareConfig, prepare
from cluster_jobs.data.shards import cluster_dataset
from cluster_jobs.training.config import TrainConfig
from cluster_jobs.training.worker import train_local
from ddm_nodes.checkpoint import load_model, read_manifest
from ddm_nodes.dataset_manifest import MANIFEST_KEY, DatasetManifest
from ddm_nodes.errors import DDMError, IntegrityError, ManifestError
from ddm_nodes.features import FeatureSpace
from ddm_nodes.latents import LatentCodec
from ddm_nodes.learned_features import DINOv2Features
from ddm_nodes.store import open_store
from router_service.local_experts import LocalExperts

SIZE, K = 32, 4


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrained")
    return {
        "dinov2": save_dinov2(root / "dinov2", SIZE),
        "clip": save_clip(root / "clip", SIZE),
        "vae": save_vae(root / "vae", channels=3),
        "vae-grey": save_vae(root / "vae-grey", channels=1),
    }


def _prepare(store: Path, **kw) -> DatasetManifest:
    cfg = dict(dataset="shapes", count=320, image_size=SIZE, clusters=K, workers=1)
    return prepare(PrepareConfig(store=str(store), **{**cfg, **kw})).manifest


@pytest.fixture(scope="module")
def latent_store(tmp_path_factory, models) -> Path:
    """shapes RGB 32x32, K=4, clustered on tiny-DINOv2 features, with tiny-VAE latents."""
    store = tmp_path_factory.mktemp("latent") / "store"
    _prepare(store, features=f"dinov2:{models['dinov2']}", latents=f"vae:{models['vae']}")
    return store


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_learned_features_are_pinned_in_the_store_and_reproduce_the_clustering(
    latent_store, models
):
    store = open_store(latent_store)
    m = DatasetManifest.load(store)
    assert (m.image_shape, m.channels) == ((SIZE, SIZE, 3), 3)
    spec = m.features
    assert (spec.method, spec.metric, spec.dims) == ("dinov2", "cosine", 32)
    weights = _sha(models["dinov2"] / "model.safetensors")
    assert spec.model.ref == str(models["dinov2"]) and spec.model.weights_sha256 == weights
    assert spec.params["weights_sha256"] == weights
    assert set(spec.model.files) == {"config.json", "model.safetensors", "preprocessor_config.json"}

    # the store's copy embeds exactly as the user's folder does (float tolerance 1e-5)
    space = FeatureSpace.load(store, m)
    assert torch.allclose(space.centroids.norm(dim=1), torch.ones(K), atol=1e-5)
    samples = [s for k in range(K) for s in cluster_dataset(store, k)]
    x = torch.stack([s["image"] for s in samples])
    fresh = DINOv2Features.load_ref(str(models["dinov2"]))
    z_fresh = torch.nn.functional.normalize(fresh.embed(x), dim=-1)
    assert torch.allclose(space.embed(x), z_fresh, atol=1e-5)
    # spherical k-means converged: (nearly) every image's nearest centroid is its cluster
    nearest = space.distances(x).argmin(dim=1)
    clusters = torch.tensor([s["cluster"] for s in samples])
    assert (nearest == clusters).float().mean() >= 0.98


def test_clip_features_with_the_euclidean_metric(tmp_path, models):
    clip = f"clip:{models['clip']}"
    m = _prepare(tmp_path / "store", count=200, features=clip, metric="euclidean")
    assert (m.features.method, m.features.metric, m.features.dims) == ("clip", "euclidean", 32)
    space = FeatureSpace.load(open_store(tmp_path / "store"), m)
    assert space.metric == "euclidean" and not torch.allclose(
        space.centroids.norm(dim=1), torch.ones(K)
    )


def test_spherical_kmeans_finds_directions_whatever_their_length():
    rng = np.random.default_rng(0)
    axes = np.eye(3)
    labels = rng.integers(0, 3, 300)
    # rows along three axes, lengths 0.1..10: Euclidean k-means would split by length
    z = axes[labels] * rng.uniform(0.1, 10, (300, 1)) + rng.normal(0, 0.05, (300, 3))
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    centers, found, inertia = spherical_kmeans(unit, 3, seed=0, restarts=2)
    assert np.allclose(np.linalg.norm(centers, axis=1), 1)
    # the same partition up to renaming
    pairs = {(int(a), int(b)) for a, b in zip(labels, found, strict=True)}
    assert len(pairs) == 3 and inertia < 0.05 * len(z)


def test_tampered_or_missing_extractor_weights_are_refused(latent_store, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(latent_store, copy)
    store = open_store(copy)
    m = DatasetManifest.load(store)
    weights = copy / "pretrained/features/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors is corrupted or was replaced"):
        FeatureSpace.load(store, m)
    weights.unlink()
    with pytest.raises(ManifestError, match="is missing.*re-run `ddm prepare --overwrite`"):
        FeatureSpace.load(store, m)
    # a manifest that pins other weights than the clustering was computed with
    other = m.features.model.model_copy(update={"files": {**m.features.model.files}})
    other.files["model.safetensors"] = "0" * 64
    with pytest.raises(ManifestError, match="clusters were computed with"):
        FeatureSpace.from_bytes((copy / "features.safetensors").read_bytes(), store, other)


def test_shards_hold_the_vae_latents_of_their_images(latent_store, models):
    store = open_store(latent_store)
    m = DatasetManifest.load(store)
    assert m.latents.shape == (16, 16, 4) and m.model_shape == (16, 16, 4)
    assert m.latents.vae.ref == str(models["vae"])
    assert m.latents.scaling_factor == pytest.approx(0.18215)
    codec = LatentCodec.load(store, m.latents)
    both = frozenset({"image", "latent"})
    samples = list(cluster_dataset(store, 1, "heldout", manifest=m, fields=both))
    z = torch.stack([s["latent"] for s in samples])
    x = torch.stack([s["image"] for s in samples])
    assert z.shape == (len(samples), 4, 16, 16)
    assert torch.allclose(codec.encode(x), z, atol=1e-4)
    assert codec.decode(z).shape == x.shape  # one decode gives images back


def test_bad_refs_exit_2_with_one_line_and_leave_the_dataset_untouched(
    latent_store, tmp_path, models, monkeypatch, ddm
):
    copy = tmp_path / "store"
    shutil.copytree(latent_store, copy)
    before = (copy / MANIFEST_KEY).read_bytes()
    base = ["prepare", "--store", str(copy), "--dataset", "shapes", "--count", "64"]
    base += ["--image-size", str(SIZE), "--clusters", "2", "--overwrite"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id fails fast, as on an offline machine
    cases = [
        (["--features", "dinov2:/no/such/folder"], "'/no/such/folder': no such folder"),
        (["--features", "clip:openai/no-such-model"], "'openai/no-such-model'"),
        (["--features", "dinov2"], "dinov2:FOLDER or dinov2:HUB_ID"),
        (["--latents", f"vae:{tmp_path / 'missing'}"], "no such folder"),
        (["--latents", f"vae:{models['vae-grey']}"], "takes 1-channel images but the data has 3"),
        (["--latents", "gan:x"], "expected vae:FOLDER"),
        (["--latents", f"vae:{models['dinov2']}"], "cannot load VAE"),
    ]
    for i, (args, message) in enumerate(cases):
        run = ddm if i == 0 else run_ddm_in_process  # the console script once, then in-process
        done = run(*base, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, done.stderr)
        assert message in lines[0], (args, lines[0])
        assert (copy / MANIFEST_KEY).read_bytes() == before
    assert (copy / "pretrained/vae/diffusion_pytorch_model.safetensors").exists()


def test_ddm_train_vae_then_latents_from_the_store(tmp_path):
    root = tmp_path / "store"
    _prepare(root, count=240, clusters=2)
    common = dict(store=str(root), batch_size=16, checkpoint_every=40, cpus_per_worker=1)
    train_local(TrainConfig(kind="vae", steps=40, **common))
    store = open_store(root)
    vae = load_model(store, "vae", kind="vae")
    ev = vae.training["evaluation"]
    assert ev["latent_shape"] == [16, 16, 4] and ev["heldout_images"] > 0
    assert 0 < ev["heldout_reconstruction_mse"] < 4 and np.isfinite(ev["heldout_psnr_db"])
    assert vae.model.config.scaling_factor == pytest.approx(1 / ev["latent_std"], rel=1e-6)
    assert vae.model.config.shift_factor == pytest.approx(ev["latent_mean"], rel=1e-6)

    # an expert of the pixel dataset, then the dataset prepared again on the VAE's latents
    train_local(TrainConfig(kind="expert", cluster=0, preset="dit-tiny", steps=2, **common))
    m = _prepare(root, count=240, clusters=2, latents="vae:store", overwrite=True)
    assert m.latents.vae.ref == "store" and m.latents.shape == (16, 16, 4)
    ckpt = read_manifest(store, "vae")
    assert m.latents.vae.files["diffusion_pytorch_model.safetensors"] == ckpt.sha256
    assert m.latents.scaling_factor == pytest.approx(1 / ev["latent_std"], rel=1e-6)
    train_local(TrainConfig(kind="expert", cluster=1, preset="dit-tiny", steps=2, **common))
    # expert 0 was trained on the pixel data set the latents replaced: refused, naming the fix
    with pytest.raises(ManifestError, match="expert-000 .* another clustering.*--force"):
        LocalExperts(root)
    from router_service.app import build_app

    with pytest.raises(ManifestError, match="another clustering"):
        build_app({"store": str(root)})  # `ddm serve` refuses before deploying anything

    for k in range(2):  # --restart: the pixel expert's checkpoints are of another shape
        cfg = TrainConfig(kind="expert", cluster=k, preset="dit-tiny", steps=2, **common)
        train_local(cfg.model_copy(update={"restart": True}))
    local = LocalExperts(root)
    assert local.state_shape == (4, 16, 16) and local.image_shape == (3, SIZE, SIZE)
    from cluster_jobs.analysis.sampling import run_sample

    run = run_sample(local, "nearest-centroid", n=3, steps=3)
    assert run.images.shape == (3, 3, SIZE, SIZE)
    assert run.images.min() >= -1 and run.images.max() <= 1


def test_vae_preset_must_divide_the_image(tmp_path):
    root = tmp_path / "store"
    _prepare(root, count=64, clusters=2, image_size=18)
    with pytest.raises(DDMError, match="not divisible by the 4x downsampling of VAE preset vae-s"):
        train_local(TrainConfig(kind="vae", store=str(root), steps=1, preset="vae-s"))


def test_readme_says_which_preset_to_use_where():
    """Every expert preset is in README's tables, and the "which preset where" table names
    only presets that exist."""
    import re

    from ddm_nodes.presets import EXPERT_PRESETS, VAE_PRESETS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("Which preset where", 1)[1].split("\n\n", 2)[1]
    named = set(re.findall(r"`([a-z0-9-]+)`", table))
    assert named and named <= set(EXPERT_PRESETS) | set(VAE_PRESETS), named
    assert all(f"`{name}`" in readme for name in EXPERT_PRESETS)
