"""The expert registry in-process: `ddm experts list|add|remove` on real tiny stores, the
copy of an expert trained elsewhere (on another clustering of digits: other data), its
centroid re-derived from the source's shards, sampling over sparse ids, and the router
policies refusing or falling back when the router does not cover the set. The live
change under load through `ddm serve` is in test_serve.py."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import BindRecorder, build_tiny_ddm, run_ddm, run_ddm_in_process

from cluster_jobs.analysis.analyze import preflight
from cluster_jobs.analysis.config import AnalyzeConfig
from cluster_jobs.data.shards import cluster_dataset
from cluster_jobs.training.config import TrainConfig
from cluster_jobs.training.router_data import mixed_samples, router_data
from cluster_jobs.training.worker import train_local
from ddm_nodes.checkpoint import open_checkpoint
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import DDMError, ManifestError
from ddm_nodes.features import FeatureSpace
from ddm_nodes.names import expert_prefix
from ddm_nodes.registry import REGISTRY_KEY, load_registry, registry_sha256
from ddm_nodes.store import open_store
from router_service import planning
from router_service.app import build_app
from router_service.app_config import RouterConfig
from router_service.expert_set import ExpertCard
from router_service.local_experts import LocalExperts
from router_service.sampler import initial_noise, sample, time_grid
from router_service.schemas import Limits, RequestError, SampleRequest
from router_service.service import SamplingService

K, SIZE = 3, 8


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[str, str]:
    """A DDM of 3 experts and another store, clustered into 2, whose experts are the
    'trained elsewhere on new data' ones."""
    root = tmp_path_factory.mktemp("registry")
    return build_tiny_ddm(root / "home", K, SIZE), build_tiny_ddm(root / "other", 2, SIZE)


def _listing(store: str) -> dict:
    done = run_ddm_in_process("experts", "list", "--store", store, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _registry_bytes(store: str) -> bytes | None:
    path = Path(store) / REGISTRY_KEY
    return path.read_bytes() if path.exists() else None


def _fails(store: str, *args: str) -> str:
    """A bad `ddm experts` call: exit 2, one line naming the fix, the registry untouched."""
    before = _registry_bytes(store)
    done = run_ddm_in_process("experts", *args)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert _registry_bytes(store) == before
    return lines[0]


def names(k: int) -> list[str]:
    return [f"expert-{i:03d}" for i in range(k)]


def _deployed(store: str, monkeypatch, registry: str | None = None) -> list[ExpertCard]:
    """The expert deployments build_app binds, and check the router's user_config (the
    set it serves) is the registry's."""
    import router_service.app as app_module

    experts, roster, router = BindRecorder(), BindRecorder(), BindRecorder()
    for name, fake in (
        ("ExpertServer", experts),
        ("ExpertRoster", roster),
        ("RouterServer", router),
    ):
        monkeypatch.setattr(app_module, name, fake)
    app_module.build_app({"store": store, "registry": registry})
    served = RouterConfig.model_validate(router.bound[0][0]["user_config"])
    assert served.experts == LocalExperts(store).cards
    return [ExpertCard.model_validate_json(args[1]) for _, args in experts.bound]


def _sampled(experts: LocalExperts, request: SampleRequest, trace: bool = False):
    """Plan `request` against the store's current set and sample it in-process."""
    p = planning.plan(request, experts, experts.expert_set, Limits())
    return p, sample(
        experts,
        experts.router,
        p.policy,
        initial_noise(request.n, experts.state_shape, request.seed),
        time_grid(request.steps),
        features=p.experts.features,
        expert_ids=p.experts.ids,
        num_experts=p.experts.width,
        trace=trace,
    )


def _centroid_of(source: str, cluster: int, space: FeatureSpace) -> torch.Tensor:
    """Re-derived: the mean feature of every training image of the source cluster."""
    images = torch.stack([s["image"] for s in cluster_dataset(source, cluster, "train")])
    return space.embed(images).double().mean(0).float()


def test_experts_add_from_remove_and_sampling_over_sparse_ids(stores, tmp_path, monkeypatch):
    home, other = stores
    listing = _listing(home)
    assert listing["registry"] == "default"
    assert [(r["name"], r["cluster"], r["centroid"]) for r in listing["experts"]] == [
        (f"expert-{k:03d}", k, f"cluster {k}") for k in range(K)
    ]

    # --- bad input first: each exit 2 with one line, nothing written -------------------
    assert "STORE/experts/expert-NNN" in _fails(home, "add", "--store", home, "--from", other)
    assert "no trained expert" in _fails(
        home, "add", "--store", home, "--from", f"{other}/experts/expert-007"
    )
    assert "is not an expert of this DDM" in _fails(home, "remove", "--store", home, "expert-009")

    # --- add: expert 1 of the other store (its cluster 1 of 2), through the console script
    source = f"{other}/experts/expert-001"
    added = run_ddm("experts", "add", "--store", home, "--from", source)
    assert added.returncode == 0, added.stderr
    assert "added expert-003" in added.stdout
    manifest = DatasetManifest.load(open_store(home))
    other_manifest = DatasetManifest.load(open_store(other))
    registry = load_registry(open_store(home), manifest)
    new = registry.entry(3)
    assert registry.ids == [0, 1, 2, 3] and new.cluster == 1
    assert new.provenance.source == "copied" and new.provenance.uri.endswith("expert-001")
    assert new.provenance.dataset_sha256 == other_manifest.sha256 != manifest.sha256
    # byte for byte: the copy's manifest is the source's
    src_ckpt = open_checkpoint(open_store(other), expert_prefix(1))
    assert new.provenance.manifest_sha256 == src_ckpt.manifest_sha256
    space = FeatureSpace.load(open_store(home), manifest)
    want = _centroid_of(other, 1, space)
    assert torch.allclose(torch.tensor(new.centroid), want, atol=1e-4)
    listed = {r["name"]: r for r in _listing(home)["experts"]}
    assert listed["expert-003"]["centroid"] == f"{space.centroids.shape[1]}-d"
    assert listed["expert-003"]["sha256"] == src_ckpt.manifest_sha256

    # a Serve config pins the registry it deploys: the sha256 `ddm experts add` printed
    sha = registry_sha256(open_store(home))
    assert f"registry sha256 {sha}" in added.stdout
    with pytest.raises(ManifestError, match=r"args.registry.*ddm experts list"):
        build_app({"store": home, "registry": "default"})
    assert [c.name for c in _deployed(home, monkeypatch, sha)] == [*names(4)]

    experts = LocalExperts(home)
    assert experts.expert_set.ids == [0, 1, 2, 3] and not experts.expert_set.router_covers
    # the copy answers as its source does (float tolerance: two loads, one CPU)
    x, t = torch.randn(4, 1, SIZE, SIZE), torch.rand(4)
    theirs = LocalExperts(other).predict(1, x, t)
    assert torch.allclose(experts.predict(3, x, t), theirs, atol=1e-6)

    # nearest-centroid reaches it: the first step is uniform over all four, later ones
    # route by distances whose column 3 is the distance to its stored centroid
    _, result = _sampled(
        experts, SampleRequest(n=6, steps=4, strategy="nearest-centroid", seed=3), trace=True
    )
    assert result.expert_calls[3] >= 1 and result.trace[0].decision.counts().tolist() == [4] * 6
    later = result.trace[2]
    x0 = later.x_t - later.t * result.trace[1].velocity
    expect = torch.cdist(space.embed(x0), torch.tensor([new.centroid]))[:, 0]
    assert torch.allclose(later.distances[:, 3], expect, atol=1e-4)

    # the router was trained on experts 0..2: router policies refuse, or fall back
    with pytest.raises(RequestError, match=r"ddm submit --router.*router_fallback") as e:
        planning.plan(SampleRequest(strategy="top-2"), experts, experts.expert_set, Limits())
    assert e.value.field == "strategy" and "expert-003" in str(e.value)
    fallback = planning.plan(
        SampleRequest(strategy="top-2", router_fallback="nearest-centroid"),
        experts,
        experts.expert_set,
        Limits(),
    )
    assert (fallback.policy.name, fallback.fallback_from) == ("nearest-centroid", "top-2")
    with pytest.raises(DDMError, match="pairs expert k with cluster k"):
        preflight(AnalyzeConfig(store=home, out=str(tmp_path)), open_store(home))

    # --- remove: ids stay, the gap is never routed to -----------------------------------
    removed = run_ddm_in_process("experts", "remove", "--store", home, "expert-001")
    assert removed.returncode == 0, removed.stderr
    experts = LocalExperts(home)
    assert experts.expert_set.ids == [0, 2, 3] and experts.expert_set.absent == {1}
    _, out = _sampled(experts, SampleRequest(n=2, steps=3, strategy="uniform", seed=1))
    assert out.expert_calls == [3, 0, 3, 3] and out.experts_per_step == 3
    registry = load_registry(open_store(home), manifest)
    assert [r.id for r in registry.removed] == [1] and registry.next_id == 4
    # the removed expert's deployment stays for retire_after_s, then the next build drops it
    assert [c.name for c in _deployed(home, monkeypatch)] == names(4)
    later = registry.removed[0].removed_at + timedelta(seconds=901)
    assert [e.id for e in registry.retiring(900)] == [1] and not registry.retiring(900, later)

    # without the copied expert the router covers the set again: top-2 over experts 0 and 2
    assert run_ddm_in_process("experts", "remove", "--store", home, "3").returncode == 0
    experts = LocalExperts(home)
    assert experts.expert_set.router_covers and experts.expert_set.width == K
    _, routed = _sampled(experts, SampleRequest(n=3, steps=3, strategy="top-2", seed=2), trace=True)
    assert routed.expert_calls[1] == 0
    for step in routed.trace:  # both others on every row, weighted by renormalised probs
        probs = step.probs[:, [0, 2]] / step.probs[:, [0, 2]].sum(1, keepdim=True)
        dense = step.decision.dense(K)
        assert torch.allclose(dense[:, [0, 2]], probs, atol=1e-5)
        assert dense[:, 1].abs().max() == 0

    # --- a router trained on the current set: every expert's own data, labelled by id ---
    again = run_ddm_in_process(
        "experts", "add", "--store", home, "--from", f"{other}/experts/expert-000"
    )
    assert again.returncode == 0 and "added expert-004" in again.stdout  # ids never reused
    assert not LocalExperts(home).expert_set.router_covers
    data = router_data(open_store(home), manifest)
    assert data.own == [0, 2] and [(d.expert_id, d.cluster) for d in data.copied] == [(4, 0)]
    epoch = list(
        mixed_samples(
            data, open_store(home), manifest, "train", shuffle=0, seed=0, rank=0, world_size=1
        )
    )
    counts = Counter(s["cluster"] for s in epoch)
    want = {0: manifest.train[0].count, 2: manifest.train[2].count}
    assert counts == {**want, 4: other_manifest.train[0].count}
    theirs = {s["key"] for s in cluster_dataset(other, 0, "train")}
    assert {s["key"] for s in epoch if s["cluster"] == 4} == theirs
    assert len({s["cluster"] for s in epoch[:32]}) > 1  # mixed, not one source after another
    train_local(
        TrainConfig(
            kind="router",
            preset="router-tiny",
            store=home,
            steps=3,
            batch_size=8,
            checkpoint_every=3,
            cpus_per_worker=1,
            restart=True,
        )
    )
    experts = LocalExperts(home)
    served = experts.expert_set
    assert served.router_covers and served.router.ids == {0, 2, 4} and served.width == 5
    p, routed = _sampled(experts, SampleRequest(n=4, steps=3, strategy="top-2", seed=4), trace=True)
    assert p.fallback_from is None and p.policy.name == "top-2"
    assert (
        routed.trace[0].probs.shape == (4, 5)
        and routed.expert_calls[1] == routed.expert_calls[3] == 0
    )

    assert run_ddm_in_process("experts", "remove", "--store", home, "0").returncode == 0
    assert run_ddm_in_process("experts", "remove", "--store", home, "2").returncode == 0
    assert "last expert" in _fails(home, "remove", "--store", home, "expert-004")


def test_a_changed_set_is_served_once_its_replicas_run(stores):
    """`offer`ed sets wait for a running replica of each expert; requests that look at
    the same moment (each awaiting the replica counts) all get the new set, none an error."""
    _, other = stores
    experts = LocalExperts(other)
    counts = {"expert-000": 1, "expert-001": 0}

    async def replica_counts() -> dict[str, int]:
        await asyncio.sleep(0.01)
        return dict(counts)

    service = SamplingService(experts, experts, replica_counts=replica_counts)
    before, changed = service.expert_set, experts.expert_set_of(experts.cards, "a" * 64)
    service.offer(changed)

    async def look():
        waiting = await service.current_set()
        counts["expert-001"] = 1
        return waiting, await asyncio.gather(*(service.current_set() for _ in range(4)))

    waiting, seen = asyncio.run(look())
    assert waiting is before and all(s is changed for s in seen) and service.pending is None
    service.offer(experts.expert_set_of(experts.cards, "a" * 64))  # the same set: no change
    assert service.pending is None
