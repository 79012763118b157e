"""Nothing lost, no wrong model served: one writer per model, published versions behind an
atomic pointer, replicas pinned to the advertised hash, and models refused once their
clustering was replaced.

Crashes are real exceptions raised inside the store's own writes (a `BaseException`, which
no ddm code catches), so the store is left exactly as a process killed at that write
would leave it; the writer-lock races run in separate processes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from cluster_jobs.data.prepare import PrepareConfig, prepare
from cluster_jobs.training.config import TrainConfig
from cluster_jobs.training.launch import already_trained
from cluster_jobs.training.worker import Worker, train_local
from cluster_jobs.training.writer_lock import LockHolder, WriterLock, WriterLockHeld, lock_key
from ddm_nodes.checkpoint import (
    MANIFEST_FILE,
    POINTER_FILE,
    CheckpointManifest,
    open_checkpoint,
    save_checkpoint,
)
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import DDMError, IntegrityError, ManifestError
from ddm_nodes.experts import Expert, ExpertSpec
from ddm_nodes.names import expert_prefix
from ddm_nodes.store import LocalStore, S3Store, open_store
from router_service.local_experts import LocalExperts
from router_service.store_models import expert_card, load_expert
from tests.conftest import build_tiny_ddm, run_ddm

K, SIZE = 2, 16


class Killed(BaseException):
    """What a SIGKILL at this write would leave: nothing after it runs, no except catches it."""


@pytest.fixture(scope="module")
def tiny_ddm(tmp_path_factory) -> str:
    return build_tiny_ddm(tmp_path_factory.mktemp("integrity") / "store", K, SIZE)


@pytest.fixture
def store_copy(tiny_ddm, tmp_path) -> str:
    root = tmp_path / "store"
    shutil.copytree(tiny_ddm, root)
    return str(root)


def _expert_cfg(store: str, **kw) -> TrainConfig:
    common = dict(store=store, steps=3, batch_size=8, checkpoint_every=3, cpus_per_worker=1)
    return TrainConfig(kind="expert", cluster=0, preset="dit-tiny", **{**common, **kw})


def _kill_at(monkeypatch, when) -> None:
    """Raise Killed inside the LocalStore write for which `when(key)` is true."""
    put = LocalStore.put_bytes

    def dying(self, key, data):
        if when(key):
            raise Killed(key)
        return put(self, key, data)

    monkeypatch.setattr(LocalStore, "put_bytes", dying)


def _served_sha(store: str) -> str:
    """Sample with what the store serves; returns expert 0's advertised manifest hash."""
    experts = LocalExperts(store)
    x = torch.randn(2, *experts.state_shape)
    v = experts.predict(0, x, torch.full((2,), 0.5))
    assert torch.isfinite(v).all() and v.shape == x.shape
    return experts.cards[0].sha256


# --- the store's exclusive create ---------------------------------------------------------


def _race(store, key: str, n: int = 8) -> list[bool]:
    results: list[bool] = []
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait()
        results.append(store.create(key, f"writer {i}".encode()))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_local_create_has_exactly_one_winner(tmp_path):
    store = LocalStore(tmp_path)
    assert sorted(_race(store, "locks/a.json")) == [False] * 7 + [True]
    assert store.get_bytes("locks/a.json").startswith(b"writer ")
    assert store.list() == ["locks/a.json"]  # no temp file left behind


@pytest.mark.integration
def test_s3_create_is_a_conditional_put(bucket):
    store = S3Store(bucket, "runs")
    assert store.create("locks/a.json", b"first")
    assert not store.create("locks/a.json", b"second")
    assert store.get_bytes("locks/a.json") == b"first"
    assert sorted(_race(store, "locks/b.json")) == [False] * 7 + [True]


# --- the writer lock ----------------------------------------------------------------------


def _lock(store, ttl_s: float = 60.0, job: str | None = None) -> WriterLock:
    holder = LockHolder(job=job, config_hash="abcd1234", steps=10)
    return WriterLock(store, "experts/expert-000", holder, ttl_s, "expert-000")


def test_second_writer_is_refused_naming_the_first(tmp_path):
    store = LocalStore(tmp_path)
    with _lock(store, job="ddm-expert-000-abcd1234"):
        with pytest.raises(WriterLockHeld, match=r"job ddm-expert-000-abcd1234.*ray job stop"):
            _lock(store).acquire()
    assert not store.exists(lock_key("experts/expert-000"))  # released on the way out
    with _lock(store):  # and free again
        pass


def test_an_expired_lock_is_taken_over_and_a_live_one_is_refreshed(tmp_path):
    store = LocalStore(tmp_path)
    key = lock_key("experts/expert-000")
    dead = LockHolder(config_hash="00000000", steps=5, heartbeat_at=time.time() - 600)
    store.put_bytes(key, dead.model_dump_json().encode())
    lock = _lock(store, ttl_s=6.0)  # heartbeat every second
    lock.acquire()
    try:
        first = json.loads(store.get_bytes(key))
        assert first["token"] == lock.holder.token
        time.sleep(2.5)
        assert json.loads(store.get_bytes(key))["heartbeat_at"] > first["heartbeat_at"]
    finally:
        lock.release()
    # a lock another holder owns now is never deleted by the one it replaced
    other = LockHolder(config_hash="ffffffff", steps=1)
    store.put_bytes(key, other.model_dump_json().encode())
    lock.release()
    assert json.loads(store.get_bytes(key))["token"] == other.token


_WRITER = """
import sys
from cluster_jobs.training.config import TrainConfig
from cluster_jobs.training.worker import train_local
train_local(TrainConfig(kind="expert", cluster=0, preset="dit-tiny", store=sys.argv[1],
    steps=int(sys.argv[2]), batch_size=8, checkpoint_every=5, keep_checkpoints=2,
    cpus_per_worker=1, restart=True))
"""


def test_two_concurrent_writers_on_one_expert(store_copy, tmp_path):
    """A second job on the same expert with another config (`--steps`) is refused while the
    first runs, and the first's checkpoints and final model are intact."""
    store = open_store(store_copy)
    first = subprocess.Popen(
        [sys.executable, "-c", _WRITER, store_copy, "60"],
        cwd=Path(__file__).parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not store.exists(lock_key(expert_prefix(0))):
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() < deadline, "the first writer never took the lock"
            time.sleep(0.05)
        with pytest.raises(WriterLockHeld, match=r"expert-000 is being written by pid"):
            train_local(_expert_cfg(store_copy, steps=40, restart=True))
        out, _ = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, out
    ckpt = open_checkpoint(store, expert_prefix(0))
    assert ckpt.manifest.final and ckpt.manifest.step == 60
    assert load_expert(store, DatasetManifest.load(store), 0) is not None  # every sha256
    steps = sorted({k.split("/")[-2] for k in store.list(f"{expert_prefix(0)}/checkpoints/step-")})
    assert steps == ["step-000055", "step-000060"]  # its own pruning, nobody else's
    assert not store.exists(lock_key(expert_prefix(0)))


# --- publishing a model -------------------------------------------------------------------


@pytest.mark.parametrize("at", ["weights", "manifest", "pointer"])
def test_killed_while_publishing_keeps_the_previous_model_served(store_copy, monkeypatch, at):
    before = _served_sha(store_copy)
    version_file = {"weights": "diffusion_pytorch_model.safetensors", "manifest": MANIFEST_FILE}
    if at == "pointer":
        _kill_at(monkeypatch, lambda key: key == f"{expert_prefix(0)}/{POINTER_FILE}")
    else:
        name = version_file[at]
        _kill_at(monkeypatch, lambda key: "/versions/" in key and key.endswith(name))
    with pytest.raises(Killed):
        train_local(_expert_cfg(store_copy, steps=6))
    monkeypatch.undo()
    assert _served_sha(store_copy) == before
    # the next run over the debris publishes normally
    train_local(_expert_cfg(store_copy, steps=6))
    assert _served_sha(store_copy) != before
    assert open_checkpoint(open_store(store_copy), expert_prefix(0)).manifest.step == 6


def test_a_failed_retrain_keeps_the_old_model_servable(store_copy, monkeypatch):
    before = _served_sha(store_copy)

    def diverged(self, batch, gen):
        raise FloatingPointError("loss is nan")

    monkeypatch.setattr(Worker, "step", diverged)
    with pytest.raises(FloatingPointError):
        train_local(_expert_cfg(store_copy, steps=6, restart=True))  # `ddm submit --force`
    assert _served_sha(store_copy) == before


def test_replicas_load_the_pinned_version_or_refuse(store_copy):
    store = open_store(store_copy)
    manifest = DatasetManifest.load(store)
    card = expert_card(store, manifest, 0)
    old = load_expert(store, manifest, card)
    train_local(_expert_cfg(store_copy, steps=6))  # a new version is published
    assert expert_card(store, manifest, 0).sha256 != card.sha256
    again = load_expert(store, manifest, card)  # a replica restarting later
    for a, b in zip(old.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same file, bit for bit
    train_local(_expert_cfg(store_copy, steps=9))  # two versions on: the pinned one is gone
    with pytest.raises(IntegrityError, match="deploy again"):
        load_expert(store, manifest, card)
    listed = {k.split("/")[3] for k in store.list(f"{expert_prefix(0)}/versions/")}
    assert len(listed) == 2  # the current version and the one it replaced


def test_config_that_disagrees_with_the_recorded_spec_is_refused(store_copy):
    store = open_store(store_copy)
    manifest = DatasetManifest.load(store)
    h, w, c = manifest.model_shape
    recorded = ExpertSpec(preset="dit-tiny", image_size=h, channels=c)
    other = Expert.create(ExpertSpec(preset="unet-tiny", image_size=h, channels=c))
    training = {"model": recorded.model_dump(), "kind": "expert"}
    ckpt = CheckpointManifest(
        kind="expert",
        cluster=0,
        step=1,
        images_seen=1,
        data_store=store.uri,
        dataset_sha256=manifest.sha256,
        final=True,
    )
    save_checkpoint(store, expert_prefix(0), other.denoiser, training, ckpt)
    store.delete([f"{expert_prefix(0)}/{POINTER_FILE}"])  # the folder itself is the model
    with pytest.raises(ManifestError, match="disagrees with the model spec"):
        load_expert(store, manifest, 0)


# --- a clustering replaced under trained models -------------------------------------------


def _overwrite(store: str) -> PrepareConfig:
    return PrepareConfig(
        dataset="digits", clusters=K, store=store, image_size=SIZE, workers=1, seed=7,
        overwrite=True,
    )  # fmt: skip


def test_prepare_killed_before_its_manifest_keeps_the_old_data_set(store_copy, monkeypatch):
    store = open_store(store_copy)
    old = DatasetManifest.load(store)
    before = _served_sha(store_copy)
    _kill_at(monkeypatch, lambda key: key == "dataset.json")
    with pytest.raises(Killed):
        prepare(_overwrite(store_copy))
    monkeypatch.undo()
    assert DatasetManifest.load(store).sha256 == old.sha256
    for split in (old.train, old.heldout):
        for cluster in split:
            for shard in cluster.shards:  # every shard the old manifest lists is intact
                store.get_verified(shard.key, shard.sha256)
    assert _served_sha(store_copy) == before
    # a finished run replaces it and removes both the old and the killed run's files
    new = prepare(_overwrite(store_copy)).manifest
    listed = {s.key for split in (new.train, new.heldout) for c in split for s in c.shards}
    assert set(store.list("shards/") + store.list("heldout/")) == listed


def test_models_of_a_replaced_clustering_are_refused(store_copy, tmp_path):
    prepare(_overwrite(store_copy))
    out = str(tmp_path / "grid.png")
    sampled = run_ddm("sample", "--store", store_copy, "--n", "2", "--steps", "2", "--out", out)
    assert sampled.returncode == 2, sampled.stderr
    assert "trained on another clustering" in sampled.stderr
    assert "--force" in sampled.stderr and len(sampled.stderr.strip().splitlines()) == 1
    assert not Path(out).exists()
    with pytest.raises(DDMError, match="expert-000 .* another clustering"):
        already_trained(_expert_cfg(store_copy), open_store(store_copy))
    from router_service.app import build_app
    from router_service.app_config import AppArgs

    with pytest.raises(ManifestError, match="another clustering"):
        build_app(AppArgs(store=store_copy))  # `ddm serve` refuses before deploying
