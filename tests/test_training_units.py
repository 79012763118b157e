"""cluster_jobs/training without Ray: the config and its round trip through every process
boundary, tasks, data isolation, checkpoints, validate."""

from __future__ import annotations

import copy
import itertools
import json
import math
import shlex
import shutil
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import typer
from conftest import run_ddm_in_process
from pydantic import ValidationError

from cluster_jobs.data.prepare import PrepareConfig, prepare
from cluster_jobs.training.checkpoints import (
    LATEST,
    TrainState,
    find_resume_point,
    restore,
    save_training_checkpoint,
)
from cluster_jobs.training.config import TrainConfig
from cluster_jobs.training.tasks import (
    FlowTask,
    RouterTask,
    batch_stream,
    lr_at,
    make_task,
    training_clusters,
    validate,
)
from ddm_nodes import flow
from ddm_nodes.checkpoint import MANIFEST_FILE, load_model, read_manifest
from ddm_nodes.dataset_manifest import (
    FEATURES_KEY,
    MANIFEST_KEY,
    NULL_LABEL,
    DatasetManifest,
)
from ddm_nodes.errors import DDMError
from ddm_nodes.experts import Expert
from ddm_nodes.presets import EXPERT_PRESETS
from ddm_nodes.router_net import RouterNet
from ddm_nodes.store import LocalStore, open_store

K = 3
SIZE = 16


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[str, DatasetManifest]:
    """digits, 16x16, K=3, in a local store. Read-only: tests that change it copy it."""
    root = tmp_path_factory.mktemp("train-units") / "store"
    cfg = PrepareConfig(dataset="digits", clusters=K, store=str(root), image_size=SIZE, workers=1)
    return str(root), prepare(cfg).manifest


@pytest.fixture
def store_copy(prepared, tmp_path) -> str:
    dest = tmp_path / "store"
    shutil.copytree(prepared[0], dest)
    return str(dest)


def _cfg(store: str, kind: str = "expert", **kw) -> TrainConfig:
    if kind == "expert":
        kw.setdefault("cluster", 0)
    if kind == "router":
        kw.setdefault("preset", "router-tiny")
    return TrainConfig(kind=kind, store=store, **kw)


class RecordingStore(LocalStore):
    """A LocalStore that remembers every key it was asked to read."""

    def __init__(self, root):
        super().__init__(root)
        self.reads: list[str] = []

    def get_bytes(self, key: str) -> bytes:
        self.reads.append(key)
        return super().get_bytes(key)

    def get_verified(self, key: str, sha256: str) -> bytes:
        self.reads.append(key)
        return super().get_verified(key, sha256)

    def open(self, key: str):
        self.reads.append(key)
        return super().open(key)


def _spy_labels(expert: Expert) -> list[torch.Tensor]:
    """Class labels of every call into the expert's diffusers denoiser."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append(kwargs["class_labels"].clone())

    expert.denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(n, 1, SIZE, SIZE, generator=g) * 2 - 1,
        "label": torch.randint(0, 10, (n,), generator=g),
        "cluster": torch.randint(0, K, (n,), generator=g),
    }


# --- TrainConfig ------------------------------------------------------------------------


def test_an_expert_needs_a_cluster():
    with pytest.raises(ValidationError, match="--cluster"):
        TrainConfig(kind="expert", store="/s")


@pytest.mark.parametrize("kind", ["router", "monolith"])
def test_only_experts_take_a_cluster(kind):
    with pytest.raises(ValidationError, match="--cluster"):
        TrainConfig(kind=kind, store="/s", cluster=0)
    assert TrainConfig(kind=kind, store="/s").cluster is None


def test_fp16_needs_cuda():
    with pytest.raises(ValidationError, match="fp16"):
        _cfg("/s", mixed_precision="fp16")
    assert _cfg("/s", mixed_precision="fp16", device="cuda").mixed_precision == "fp16"
    assert _cfg("/s", mixed_precision="bf16").mixed_precision == "bf16"


def test_unknown_fields_are_refused():
    with pytest.raises(ValidationError, match="learning_rate"):
        _cfg("/s", learning_rate=0.1)


def test_negative_cluster_is_refused():
    with pytest.raises(ValidationError):
        _cfg("/s", cluster=-1)


def test_prefix_and_name():
    assert _cfg("/s", cluster=2).prefix == "experts/expert-002"
    assert _cfg("/s", cluster=2).name == "expert-002"
    assert _cfg("/s", "router").prefix == "router"
    assert _cfg("/s", "monolith").name == "monolith"


def test_config_hash_is_stable_for_equal_configs():
    a, b = _cfg("/s", steps=10), _cfg("/s", steps=10)
    assert a.config_hash() == b.config_hash()
    assert len(a.config_hash()) == 8
    int(a.config_hash(), 16)


@pytest.mark.parametrize("field,value", [("restart", True), ("log_every", 7), ("max_failures", 0)])
def test_config_hash_ignores_scheduling_fields(field, value):
    base = _cfg("/s")
    assert base.model_copy(update={field: value}).config_hash() == base.config_hash()
    assert _cfg("/s", **{field: value}).config_hash() == base.config_hash()


@pytest.mark.parametrize(
    "field,value", [("steps", 999), ("preset", "dit-tiny"), ("lr", 1e-3), ("cluster", 1)]
)
def test_config_hash_changes_with_what_determines_the_model(field, value):
    base = _cfg("/s")
    assert _cfg("/s", **{field: value}).config_hash() != base.config_hash()


# --- a config crosses every process boundary whole -----------------------------------------

# Every TrainConfig field at a value other than its default (for an expert: every field
# applies). The tests below fail when a field is added without being listed here.
NON_DEFAULT = dict(
    kind="expert",
    cluster=1,
    preset="dit-tiny",
    steps=77,
    batch_size=12,
    lr=7e-4,
    weight_decay=0.02,
    warmup_steps=3,
    grad_clip=0.5,
    ema_decay=0.99,
    label_dropout=0.25,
    unconditional=True,
    prediction="eps",
    workers=2,
    cpus_per_worker=0.5,
    loader_workers=3,
    device="cuda",
    mixed_precision="bf16",
    checkpoint_every=11,
    keep_checkpoints=3,
    shuffle_buffer=13,
    log_every=5,
    seed=9,
    max_failures=1,
    restart=True,
    lock_ttl_s=30.0,
)


def test_the_round_trip_covers_every_field_at_a_non_default_value():
    assert set(NON_DEFAULT) | {"store"} == set(TrainConfig.model_fields)
    default = TrainConfig(kind="expert", store="/s", cluster=0)
    for name, value in NON_DEFAULT.items():
        if name != "kind":
            assert getattr(default, name) != value, name


class _CapturingTrainer:
    """Stands in for Ray Train's TorchTrainer: keeps what it was given, trains nothing."""

    given: dict = {}

    def __init__(self, train_loop, *, train_loop_config, scaling_config, run_config):
        _CapturingTrainer.given = dict(
            loop=train_loop_config, scaling=scaling_config, run=run_config
        )

    def fit(self):
        return SimpleNamespace(metrics={})


def test_what_the_worker_receives_equals_what_was_submitted(prepared, monkeypatch):
    """`ddm submit`'s job command (the whole config as JSON) -> `python -m
    cluster_jobs.training expert` -> the launcher -> Ray Train's loop config -> the rank."""
    import ray
    import ray.train.torch

    from cluster_jobs.submit import entrypoint
    from cluster_jobs.training.commands import main
    from cluster_jobs.training.worker import config_of

    submitted = TrainConfig(store=prepared[0], **NON_DEFAULT)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", _CapturingTrainer)
    monkeypatch.setattr(ray, "init", lambda **kw: None)
    command = shlex.split(entrypoint(submitted))
    assert command[:3] == ["python", "-m", "cluster_jobs.training"]

    def run_job(*args: str) -> TrainConfig:
        monkeypatch.setattr(sys, "argv", ["python -m cluster_jobs.training", *args])
        with pytest.raises(SystemExit) as done:
            main()
        assert done.value.code == 0
        return config_of(_CapturingTrainer.given["loop"])

    assert run_job(*command[3:]) == submitted
    scaling = _CapturingTrainer.given["scaling"]
    assert (scaling.num_workers, scaling.use_gpu) == (2, True)
    assert scaling.resources_per_worker == {"CPU": 0.5 + 3}  # the rank and its loader workers
    assert _CapturingTrainer.given["run"].failure_config.max_failures == 1
    # options given beside --config override it; the rest is kept
    overridden = run_job(*command[3:], "--steps", "5", "--no-restart")
    assert overridden == submitted.model_copy(update={"steps": 5, "restart": False})


@pytest.mark.parametrize(
    "device,workers,loader_workers", [("cuda", 2, 7), ("cuda", 1, 8), ("cuda", 8, 1), ("cpu", 2, 0)]
)
def test_launch_reserves_cpus_for_the_loader_workers_it_decides(
    prepared, monkeypatch, device, workers, loader_workers
):
    """Auto loader workers on a node of 16 CPUs and 8 GPUs (beside a CPU-only head), shared
    by `workers` ranks: the ranks run with the number Ray reserved CPUs for."""
    import ray
    import ray.train.torch

    from cluster_jobs.training.launch import launch
    from cluster_jobs.training.worker import config_of

    nodes = [
        {"Alive": True, "Resources": {"CPU": 4.0}},
        {"Alive": True, "Resources": {"CPU": 16.0, "GPU": 8.0}},
        {"Alive": False, "Resources": {"CPU": 96.0, "GPU": 8.0}},
    ]
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", _CapturingTrainer)
    monkeypatch.setattr(ray, "init", lambda **kw: None)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    cfg = _cfg(prepared[0], workers=workers, device=device, preset="dit-tiny")
    launch(cfg)
    ran = config_of(_CapturingTrainer.given["loop"])
    assert ran == cfg.model_copy(update={"loader_workers": loader_workers})
    cpus = _CapturingTrainer.given["scaling"].resources_per_worker
    assert cpus == {"CPU": cfg.cpus_per_worker + loader_workers}


def test_every_field_is_an_option_of_the_job_and_of_ddm_submit():
    """Generated from the model: a field added later is settable at once."""
    from cluster_jobs.cli import app

    def flags(command) -> set[str]:
        return {o for p in command.params for o in [*p.opts, *p.secondary_opts]}

    ddm = typer.main.get_command(app)
    train = ddm.get_command(None, "train").get_command(None, "expert")
    submit = ddm.get_command(None, "submit")
    for name in TrainConfig.model_fields:
        flag = "--" + name.replace("_", "-")
        if name != "kind":
            assert flag in flags(train), flag
        if name not in ("kind", "cluster", "restart"):  # submit: --clusters, --force
            assert flag in flags(submit), flag
    assert {"--config", "--unconditional", "--no-unconditional"} <= flags(train)
    router = ddm.get_command(None, "train").get_command(None, "router")
    assert "--cluster" not in flags(router) and "--label-dropout" not in flags(router)
    preset = next(p for p in train.params if "--preset" in p.opts)
    assert typing.get_args(preset.type_descriptor.annotation) == tuple(EXPERT_PRESETS)


def test_ddm_submit_options_reach_every_job_config(prepared, monkeypatch):
    """`ddm submit` with every option it takes: each job's config has them (the router and
    the featnet: --router-preset/--router-lr instead of --preset/--lr; fields of
    flow-matching jobs only go to those), checked without Ray."""
    from cluster_jobs import submit as jobs
    from cluster_jobs.training.config import fields_for
    from ddm_nodes.store import open_store

    seen: list[TrainConfig] = []
    monkeypatch.setattr(jobs, "submit", lambda url, to_submit, **kw: seen.extend(to_submit) or [])
    args = []
    for name, value in NON_DEFAULT.items():
        if name in ("kind", "cluster", "restart"):
            continue
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    router = ["--router", "--router-preset", "router-s", "--router-lr", "0.005"]
    done = run_ddm_in_process(
        "submit", "--store", prepared[0], "--clusters", "1", *router, *args,
        "--address", "http://127.0.0.1:9",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    uri = open_store(prepared[0]).uri
    expert, routed = seen
    assert expert == TrainConfig(store=uri, **{**NON_DEFAULT, "restart": False})
    common = {k: v for k, v in NON_DEFAULT.items() if k in fields_for("router")}
    common |= {"kind": "router", "preset": "router-s", "lr": 0.005, "restart": False}
    assert routed == TrainConfig(store=uri, **common)


# --- learning rate ----------------------------------------------------------------------


def test_lr_warms_up_linearly_then_stays_constant():
    cfg = _cfg("/s", lr=1e-3, warmup_steps=10)
    lrs = [lr_at(cfg, s) for s in range(30)]
    for s in range(10):
        assert lrs[s] == pytest.approx(1e-3 * (s + 1) / 10)
    steps = [b - a for a, b in itertools.pairwise(lrs[:10])]
    assert all(d == pytest.approx(1e-4) for d in steps)
    assert all(lr == pytest.approx(1e-3) for lr in lrs[9:])
    assert max(lrs) == pytest.approx(1e-3)


@pytest.mark.parametrize("warmup", [0, 1])
def test_no_warmup_means_full_lr_from_the_first_step(warmup):
    cfg = _cfg("/s", lr=2e-4, warmup_steps=warmup)
    assert lr_at(cfg, 0) == pytest.approx(2e-4)
    assert lr_at(cfg, 500) == pytest.approx(2e-4)


# --- tasks and data ---------------------------------------------------------------------


@pytest.mark.parametrize("cluster", range(K))
def test_an_expert_trains_on_its_own_cluster_only(prepared, cluster):
    store, manifest = prepared
    assert training_clusters(_cfg(store, cluster=cluster), manifest) == [cluster]


@pytest.mark.parametrize("kind", ["router", "monolith"])
def test_router_and_monolith_train_on_every_cluster(prepared, kind):
    store, manifest = prepared
    assert training_clusters(_cfg(store, kind), manifest) == list(range(K))


def test_make_task_picks_the_task(prepared):
    store, manifest = prepared
    assert isinstance(make_task(_cfg(store), manifest), FlowTask)
    assert isinstance(make_task(_cfg(store, "monolith"), manifest), FlowTask)
    assert isinstance(make_task(_cfg(store, "router"), manifest), RouterTask)
    with pytest.raises(DDMError, match="out of range"):
        make_task(_cfg(store, cluster=K), manifest)


def test_flow_task_spec_comes_from_the_data(prepared):
    store, manifest = prepared
    task = FlowTask(_cfg(store, preset="dit-tiny"), manifest)
    assert task.spec.model_dump() == {
        "preset": "dit-tiny",
        "image_size": SIZE,
        "channels": 1,
        "num_classes": 10,
        "prediction": "v",
    }
    assert FlowTask(_cfg(store, unconditional=True), manifest).spec.num_classes == 0
    assert FlowTask(_cfg(store, prediction="eps"), manifest).spec.prediction == "eps"


@pytest.mark.parametrize("prediction", ["v", "eps", "x0"])
def test_flow_task_regresses_the_target_of_its_prediction_type(prepared, prediction):
    """The loss is the network's own output against its type's target (ε, x_0 or v), not
    the converted velocity against v."""
    store, manifest = prepared
    task = FlowTask(_cfg(store, preset="dit-tiny", prediction=prediction), manifest)
    model = task.build()
    x0 = torch.rand(4, 1, SIZE, SIZE) * 2 - 1
    batch = {"image": x0, "label": torch.zeros(4, dtype=torch.long)}
    loss = task.loss(model, batch, torch.Generator().manual_seed(5))
    # the same draws the task makes: labels dropped, then t, then the noise
    g = torch.Generator().manual_seed(5)
    drop = torch.rand(4, generator=g) < task.cfg.label_dropout
    y = torch.where(drop, NULL_LABEL, batch["label"])
    t = flow.logit_normal_t(4, generator=g)
    path = flow.interpolate(x0, torch.randn(x0.shape, generator=g), t)
    with torch.no_grad():
        out = model(path.x_t, t, y, native=True)
    expected = (out - flow.target(path, prediction)).pow(2).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cluster", range(K))
def test_batch_stream_of_an_expert_reads_only_its_own_cluster(prepared, cluster):
    root, manifest = prepared
    store = RecordingStore(root)
    cfg = _cfg(root, cluster=cluster, batch_size=8, shuffle_buffer=50)
    stream = batch_stream(cfg, store, manifest)
    for _ in range(3):
        batch = next(stream)
        assert set(batch) == {"image", "label", "cluster"}
        assert batch["image"].shape == (8, 1, SIZE, SIZE)
        assert batch["image"].dtype == torch.float32
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        assert batch["label"].shape == (8,) and batch["label"].dtype == torch.long
        assert batch["label"].min() >= 0 and batch["label"].max() < 10
        assert batch["cluster"].tolist() == [cluster] * 8
    own = f"shards/cluster-{cluster:03d}/"
    assert any(k.startswith(own) for k in store.reads)  # it did read data
    outside = [
        k for k in store.reads if not k.startswith(own) and k not in (MANIFEST_KEY, FEATURES_KEY)
    ]
    assert outside == []


def test_batch_stream_isolation_holds_when_the_stream_loads_the_manifest(prepared):
    """The same check with the manifest read through the recording store too."""
    root, _ = prepared
    store = RecordingStore(root)
    manifest = DatasetManifest.load(store)
    next(batch_stream(_cfg(root, cluster=1, batch_size=4, shuffle_buffer=0), store, manifest))
    assert MANIFEST_KEY in store.reads
    assert all(
        k in (MANIFEST_KEY, FEATURES_KEY) or k.startswith("shards/cluster-001/")
        for k in store.reads
    )


def test_a_cluster_smaller_than_a_batch_gives_whole_epoch_batches(prepared):
    root, manifest = prepared
    count = manifest.train[2].count
    cfg = _cfg(root, cluster=2, batch_size=count + 100, shuffle_buffer=0)
    stream = batch_stream(cfg, LocalStore(root), manifest)
    first, second = next(stream), next(stream)  # the second is the next epoch
    assert first["image"].shape[0] == second["image"].shape[0] == count
    assert set(first["cluster"].tolist()) == {2}


def test_router_batches_carry_their_clusters(prepared):
    root, manifest = prepared
    cfg = _cfg(root, "router", batch_size=64, shuffle_buffer=0)
    batch = next(batch_stream(cfg, LocalStore(root), manifest))
    assert batch["image"].shape == (64, 1, SIZE, SIZE)
    assert set(batch["cluster"].tolist()) <= set(range(K))


@pytest.mark.parametrize("preset", ["unet-tiny", "dit-tiny"])
def test_flow_task_loss_is_a_finite_scalar_with_gradients(prepared, preset):
    root, manifest = prepared
    task = FlowTask(_cfg(root, preset=preset), manifest)
    torch.manual_seed(0)
    model = task.build()
    loss = task.loss(model, _batch(), torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and math.isfinite(loss.item()) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum().item() for g in grads) > 0


def test_flow_task_loss_is_the_velocity_mse_at_logit_normal_t(prepared):
    root, manifest = prepared
    task = FlowTask(_cfg(root, label_dropout=0.0), manifest)
    torch.manual_seed(0)
    model = task.build().eval()
    batch = _batch(3)
    with torch.no_grad():
        got = task.loss(model, batch, torch.Generator().manual_seed(11))
        # the same draws, in the same order: t = sigmoid(z), then the noise
        g = torch.Generator().manual_seed(11)
        t = torch.sigmoid(torch.randn(3, generator=g))
        noise = torch.randn(batch["image"].shape, generator=g)
        x0 = batch["image"]
        x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        pred = model(x_t, t, batch["label"])
        expected = ((pred - (noise - x0)) ** 2).mean()
    # the job's own code path to the same float32 mean: rel 1e-5 ~ 100 ulps, room for another
    # order of the operations
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("preset", ["unet-tiny", "dit-tiny"])
def test_full_label_dropout_sends_only_the_null_label(prepared, preset):
    root, manifest = prepared
    task = FlowTask(_cfg(root, preset=preset, label_dropout=1.0), manifest)
    model = task.build()
    seen = _spy_labels(model)
    given: list[torch.Tensor] = []  # what the job hands the expert: y, before the mapping
    model.register_forward_pre_hook(lambda mod, args: given.append(args[2].clone()))
    with torch.no_grad():
        task.loss(model, _batch(6), torch.Generator().manual_seed(0))
    assert len(seen) == len(given) == 1
    assert given[0].tolist() == [NULL_LABEL] * 6
    assert seen[0].tolist() == [model.null_index] * 6
    assert model.null_index == 10


def test_no_label_dropout_sends_the_real_labels(prepared):
    root, manifest = prepared
    task = FlowTask(_cfg(root, label_dropout=0.0), manifest)
    model = task.build()
    seen = _spy_labels(model)
    batch = _batch(6)
    with torch.no_grad():
        task.loss(model, batch, torch.Generator().manual_seed(0))
    assert seen[0].tolist() == batch["label"].tolist()


def test_partial_label_dropout_drops_some_and_keeps_others(prepared):
    root, manifest = prepared
    task = FlowTask(_cfg(root, preset="dit-tiny", label_dropout=0.5), manifest)
    model = task.build()
    seen = _spy_labels(model)
    batch = _batch(64)
    with torch.no_grad():
        task.loss(model, batch, torch.Generator().manual_seed(0))
    got = seen[0]
    dropped = got == 10
    assert 0 < dropped.sum() < 64
    assert torch.equal(got[~dropped], batch["label"][~dropped])


def test_an_unconditional_dit_task_sends_only_the_null_label(prepared):
    root, manifest = prepared
    task = FlowTask(_cfg(root, preset="dit-tiny", unconditional=True, label_dropout=0.0), manifest)
    model = task.build()
    seen = _spy_labels(model)
    with torch.no_grad():
        task.loss(model, _batch(4), torch.Generator().manual_seed(0))
    assert seen[0].tolist() == [model.null_index] * 4


def test_router_task_loss_is_cross_entropy_on_the_cluster_ids(prepared):
    root, manifest = prepared
    task = RouterTask(_cfg(root, "router"), manifest)
    torch.manual_seed(0)
    model = task.build().eval()
    assert isinstance(model, RouterNet)
    assert model.config.num_clusters == K and model.config.in_channels == 1
    batch = _batch(5)
    with torch.no_grad():
        got = task.loss(model, batch, torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(3)
        t = torch.rand(5, generator=g)
        noise = torch.randn(batch["image"].shape, generator=g)
        tb = t[:, None, None, None]
        logits = model((1 - tb) * batch["image"] + tb * noise, t)
        log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        expected = -log_p[torch.arange(5), batch["cluster"]].mean()
    # cross_entropy's fused log-softmax against the formula: float32 rounding differs
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    model.train()
    loss = task.loss(model, batch, torch.Generator().manual_seed(3))
    loss.backward()
    assert model.out.weight.grad.abs().sum() > 0


# --- checkpoints ------------------------------------------------------------------------


def _trained(task, cfg: TrainConfig, steps: int = 2):
    """A model, its EMA and an AdamW after a few real steps (so all three are non-trivial)."""
    torch.manual_seed(cfg.seed)
    model = task.build()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(0)
    for i in range(steps):
        loss = task.loss(model, _batch(2, seed=i), gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        flow.ema_update(ema, model, cfg.ema_decay)
    return model, ema, opt


def _fresh(task, seed: int = 123):
    torch.manual_seed(seed)
    model = task.build()
    ema = copy.deepcopy(model).requires_grad_(False)
    return model, ema, torch.optim.AdamW(model.parameters(), lr=0.5)


def _assert_same_state(a: dict, b: dict, **tolerance) -> None:
    """Bitwise by default: for tensors restored from the bytes saved. With rtol/atol: for
    tensors two model objects computed."""
    assert set(a) == set(b)
    for k in a:
        if tolerance:
            torch.testing.assert_close(a[k], b[k], **tolerance, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind,preset", [("expert", "unet-tiny"), ("router", "router-tiny")])
def test_save_then_restore_resumes_exactly(prepared, tmp_path, kind, preset):
    root, manifest = prepared
    store = LocalStore(tmp_path / "out")
    cfg = _cfg(root, kind, preset=preset, lr=1e-3, ema_decay=0.5, weight_decay=0.01)
    task = make_task(cfg, manifest)
    model, ema, opt = _trained(task, cfg)
    state = TrainState(step=2, images_seen=16)

    prefix = save_training_checkpoint(
        cfg, task, store, model, ema, opt, state, 0.25, final=False, dataset=manifest
    )
    assert prefix == f"{cfg.prefix}/checkpoints/step-000002"
    assert json.loads(store.get_bytes(f"{cfg.prefix}/{LATEST}"))["prefix"] == prefix

    model2, ema2, opt2 = _fresh(task)
    assert not torch.equal(
        next(iter(model2.state_dict().values())), next(iter(model.state_dict().values()))
    )
    got = restore(cfg, task, store, prefix, model2, ema2, opt2, manifest)

    assert (got.step, got.images_seen) == (2, 16)
    _assert_same_state(model2.state_dict(), model.state_dict())
    _assert_same_state(ema2.state_dict(), ema.state_dict())
    # EMA and model really are different weights, so both were restored separately
    assert any(
        not torch.equal(a, b) for a, b in zip(ema.parameters(), model.parameters(), strict=True)
    )
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert set(s1["state"]) == set(s2["state"])
    for idx in s1["state"]:
        _assert_same_state(s1["state"][idx], s2["state"][idx])
    assert json.loads(json.dumps(s1["param_groups"])) == json.loads(json.dumps(s2["param_groups"]))

    # the next step from the restored state is the step the original would have taken, up to
    # float32 rounding: two model objects compute the gradients (another allocation may take
    # another GEMM path); one AdamW step of lr 1e-3 turns their last-bit differences into
    # rounding-sized changes of the weights, while a step without the restored state moves
    # them by ~lr
    for m, o in ((model, opt), (model2, opt2)):
        task.loss(m, _batch(2, seed=9), torch.Generator().manual_seed(9)).backward()
        o.step()
    _assert_same_state(model2.state_dict(), model.state_dict(), rtol=1e-5, atol=1e-6)


def test_the_checkpoint_weights_are_the_ema_weights(prepared, tmp_path):
    root, manifest = prepared
    store = LocalStore(tmp_path / "out")
    cfg = _cfg(root, "router", ema_decay=0.5)
    task = make_task(cfg, manifest)
    model, ema, opt = _trained(task, cfg)
    prefix = save_training_checkpoint(
        cfg, task, store, model, ema, opt, TrainState(2, 16), None, final=True, dataset=manifest
    )
    assert prefix == "router"
    loaded = load_model(store, prefix, kind="router")
    _assert_same_state(loaded.model.state_dict(), ema.state_dict())
    assert loaded.training["config_hash"] == cfg.config_hash()
    assert loaded.manifest.final and loaded.manifest.step == 2
    assert not store.exists(f"router/{LATEST}")  # a final checkpoint moves no pointer


@pytest.mark.parametrize(
    "change", [{"preset": "dit-tiny"}, {"unconditional": True}], ids=["preset", "labels"]
)
def test_restore_with_another_model_spec_asks_for_restart(prepared, tmp_path, change):
    root, manifest = prepared
    store = LocalStore(tmp_path / "out")
    cfg = _cfg(root)
    task = make_task(cfg, manifest)
    model, ema, opt = _trained(task, cfg, steps=1)
    prefix = save_training_checkpoint(
        cfg, task, store, model, ema, opt, TrainState(1, 2), None, final=False, dataset=manifest
    )
    other_cfg = _cfg(root, **change)
    other = make_task(other_cfg, manifest)
    m2, e2, o2 = _fresh(other)
    with pytest.raises(DDMError, match="--restart"):
        restore(other_cfg, other, store, prefix, m2, e2, o2, manifest)


def _router_checkpoints(prepared, tmp_path, steps, keep):
    root, manifest = prepared
    store = LocalStore(tmp_path / "out")
    cfg = _cfg(root, "router", keep_checkpoints=keep, steps=10_000_000)
    task = make_task(cfg, manifest)
    model, ema, opt = _trained(task, cfg, steps=1)
    for s in steps:
        save_training_checkpoint(
            cfg,
            task,
            store,
            model,
            ema,
            opt,
            TrainState(s, s * 2),
            None,
            final=False,
            dataset=manifest,
        )
    folders = sorted({Path(k).parent.name for k in store.list("router/checkpoints/step-")})
    return cfg, store, folders


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_prune_keeps_only_the_newest_checkpoints(prepared, tmp_path, keep):
    cfg, store, folders = _router_checkpoints(prepared, tmp_path, [10, 20, 30, 40], keep)
    assert folders == [f"step-{s:06d}" for s in [10, 20, 30, 40][-keep:]]
    latest = json.loads(store.get_bytes(f"router/{LATEST}"))
    assert latest == {"prefix": "router/checkpoints/step-000040", "step": 40}
    assert read_manifest(store, latest["prefix"]).step == 40


@pytest.mark.parametrize("keep", [1, 2])
def test_prune_keeps_the_newest_checkpoints_past_a_million_steps(prepared, tmp_path, keep):
    """`steps` may go up to 10M, but step folders are zero-padded to 6 digits, so
    "step-1000000" sorts before "step-999800" as text."""
    steps = [999_600, 999_800, 1_000_000]
    cfg, store, folders = _router_checkpoints(prepared, tmp_path, steps, keep)
    latest = json.loads(store.get_bytes(f"router/{LATEST}"))["prefix"]
    assert store.exists(f"{latest}/{MANIFEST_FILE}"), "latest.json points at a pruned checkpoint"
    assert sorted(folders) == sorted(f"step-{s:06d}" for s in steps[-keep:])


def test_find_resume_point_outside_ray(prepared, tmp_path):
    root, manifest = prepared
    store = LocalStore(tmp_path / "out")
    cfg = _cfg(root, cluster=1)
    assert find_resume_point(cfg, store) is None
    store.put_bytes(f"{cfg.prefix}/{LATEST}", json.dumps({"prefix": "p/q", "step": 7}).encode())
    assert find_resume_point(cfg, store) == "p/q"
    # and after a real save it is that checkpoint
    task = make_task(cfg, manifest)
    model, ema, opt = _trained(task, cfg, steps=1)
    prefix = save_training_checkpoint(
        cfg, task, store, model, ema, opt, TrainState(5, 10), None, final=False, dataset=manifest
    )
    assert find_resume_point(cfg, store) == prefix == "experts/expert-001/checkpoints/step-000005"
    assert find_resume_point(_cfg(root, cluster=2), store) is None  # another expert's is not ours


# --- validate ---------------------------------------------------------------------------


def test_validate_accepts_a_good_config(prepared):
    root, manifest = prepared
    store, got = validate(_cfg(root, cluster=2))
    assert got == manifest
    assert store.uri == LocalStore(root).uri
    validate(_cfg(root, "router"))
    validate(_cfg(root, "monolith", preset="dit-tiny"))


def test_validate_refuses_a_cluster_out_of_range(prepared):
    with pytest.raises(DDMError, match="out of range"):
        validate(_cfg(prepared[0], cluster=K))


@pytest.mark.parametrize("kind,preset", [("expert", "dit-huge"), ("router", "unet-tiny")])
def test_validate_refuses_an_unknown_preset(prepared, kind, preset):
    with pytest.raises(DDMError, match="unknown"):
        validate(_cfg(prepared[0], kind, preset=preset))


@pytest.fixture(scope="module")
def prepared18(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("train-units-18") / "store"
    prepare(PrepareConfig(dataset="digits", clusters=K, store=str(root), image_size=18, workers=1))
    return str(root)


@pytest.mark.parametrize("preset", ["dit-tiny", "unet-tiny"])
def test_validate_refuses_an_image_size_the_preset_cannot_take(prepared18, preset):
    with pytest.raises(DDMError, match="not divisible"):
        validate(_cfg(prepared18, preset=preset))


def test_validate_refuses_a_missing_shard_of_its_clusters(store_copy, prepared):
    _, manifest = prepared
    victim = manifest.shards("train", 1)[0].key
    (Path(store_copy) / victim).unlink()
    with pytest.raises(DDMError, match="missing"):
        validate(_cfg(store_copy, cluster=1))
    with pytest.raises(DDMError, match="missing"):
        validate(_cfg(store_copy, "router"))
    validate(_cfg(store_copy, cluster=0))  # isolation: another cluster's shard is not checked


def test_the_newer_of_ray_and_store_pointers_wins(prepared, tmp_path):
    """Ray only knows reported checkpoints; the store may be ahead (or behind)."""
    root, _ = prepared
    store = LocalStore(tmp_path / "out")
    cfg = _cfg(root, cluster=1)
    store.put_bytes(f"{cfg.prefix}/{LATEST}", json.dumps({"prefix": "store", "step": 40}).encode())
    store.put_bytes("ray/manifest.json", b"{}")  # Ray's pointer names a checkpoint that exists
    assert find_resume_point(cfg, store, {"prefix": "ray", "step": 20}) == "store"
    assert find_resume_point(cfg, store, {"prefix": "ray", "step": 60}) == "ray"
    empty = LocalStore(tmp_path / "empty")
    empty.put_bytes("ray/manifest.json", b"{}")
    assert find_resume_point(cfg, empty, {"prefix": "ray", "step": 5}) == "ray"


def test_train_local_trains_checkpoints_and_continues(store_copy):
    """The Ray-free worker: 6 steps with a checkpoint every 4, then continued to 9 steps
    from the step-6 checkpoint (not from scratch)."""
    from cluster_jobs.training.worker import train_local

    cfg = _cfg(
        store_copy,
        cluster=0,
        preset="dit-tiny",
        batch_size=8,
        steps=6,
        checkpoint_every=4,
        cpus_per_worker=1,
    )
    first = train_local(cfg)
    store = open_store(store_copy)
    assert first["final"] and first["step"] == 6 and first["images_seen"] == 6 * 8
    assert read_manifest(store, cfg.prefix).step == 6
    pointer = json.loads(store.get_bytes(f"{cfg.prefix}/{LATEST}"))
    assert pointer["step"] == 6  # the final step is resumable too
    more = train_local(cfg.model_copy(update={"steps": 9}))
    assert more["step"] == 9 and more["images_seen"] == 9 * 8
    assert load_model(store, cfg.prefix, kind="expert").manifest.step == 9


@pytest.mark.parametrize("kind", ["router", "monolith"])
def test_router_and_monolith_jobs_run_and_save_their_kind(store_copy, kind):
    from cluster_jobs.training.worker import train_local

    preset = "router-tiny" if kind == "router" else "dit-tiny"
    cfg = _cfg(store_copy, kind=kind, preset=preset, batch_size=8, steps=4, checkpoint_every=2)
    result = train_local(cfg)
    assert result["final"] and result["step"] == 4
    loaded = load_model(open_store(store_copy), cfg.prefix, kind=kind)
    assert loaded.manifest.cluster is None and loaded.training["kind"] == kind
    assert isinstance(loaded.model, RouterNet) == (kind == "router")


def test_a_ray_pointer_to_a_checkpoint_the_store_lost_is_ignored(tmp_path):
    """Ray Train's run storage outlives a store prepared again under the same path: its
    pointer must not make the job fail; the store's own latest.json decides."""
    import json as _json

    from cluster_jobs.training.checkpoints import LATEST, find_resume_point
    from cluster_jobs.training.config import TrainConfig
    from ddm_nodes.store import open_store

    store = open_store(tmp_path)
    cfg = TrainConfig(kind="expert", store=str(tmp_path), cluster=1, steps=10)
    gone = {"prefix": f"{cfg.prefix}/checkpoints/step-000400", "step": 400}
    assert find_resume_point(cfg, store, gone) is None
    store.put_bytes(f"{cfg.prefix}/checkpoints/step-000400/manifest.json", b"{}")
    assert find_resume_point(cfg, store, gone) == gone["prefix"]
    store.put_bytes(f"{cfg.prefix}/{LATEST}", _json.dumps({"prefix": "p", "step": 500}).encode())
    assert find_resume_point(cfg, store, gone) == "p"


@pytest.mark.parametrize(
    "endpoint,scheme,netloc",
    [
        ("http://127.0.0.1:9000", "http", "127.0.0.1:9000"),
        ("https://s3.example.org", "https", "s3.example.org"),
    ],
)
def test_ray_train_run_storage_is_in_the_s3_store_on_its_endpoint(
    monkeypatch, endpoint, scheme, netloc
):
    """No node reads another's disk: Ray Train's run storage is a folder of the store, on
    the S3 endpoint boto3 uses, and no credential is baked into what Ray pickles."""
    from cluster_jobs.training.launch import RUN_STORAGE, run_storage
    from ddm_nodes.store import open_store

    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "never-pickled")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-pickled-either")
    path, fs = run_storage(open_store("s3://bkt/runs/ddm-a"))
    assert path == f"bkt/runs/ddm-a/{RUN_STORAGE}"
    options = fs.__reduce__()[1][0]
    assert options["scheme"] == scheme
    assert options["endpoint_override"] == netloc
    assert options["region"] == "eu-west-3"
    assert options["access_key"] is None and options["secret_key"] is None


def test_ray_train_run_storage_of_a_directory_store_is_inside_it(tmp_path):
    from cluster_jobs.training.launch import RUN_STORAGE, run_storage
    from ddm_nodes.store import open_store

    path, fs = run_storage(open_store(tmp_path.as_uri()))
    assert path == str(tmp_path.resolve() / RUN_STORAGE) and fs is None


def test_restart_also_forgets_the_ray_train_run(store_copy, monkeypatch):
    """--restart empties the model's folder and Ray's run of the same name (else Ray would
    hand the new ranks the old run's checkpoint pointer); other runs stay."""
    import ray
    import ray.train.torch

    from cluster_jobs.training.launch import RUN_STORAGE, launch
    from ddm_nodes.store import open_store

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", _CapturingTrainer)
    monkeypatch.setattr(ray, "init", lambda **kw: None)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    cfg = _cfg(store_copy, preset="dit-tiny", restart=True)
    store = open_store(cfg.store)
    mine = f"{RUN_STORAGE}/ddm-{cfg.name}-{cfg.config_hash()}/checkpoint_0/pointer.json"
    other = f"{RUN_STORAGE}/ddm-expert-999-00000000/checkpoint_0/pointer.json"
    for key in (mine, other, f"{cfg.prefix}/checkpoints/latest.json"):
        store.put_bytes(key, b"{}")
    launch(cfg)
    assert not store.exists(mine) and store.exists(other)
    assert store.list(cfg.prefix + "/") == []
    run = _CapturingTrainer.given["run"]
    assert run.storage_path == str(store.root / RUN_STORAGE)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--max-retries", "-1", "--wait"], "error: --max-retries -1: give 0 or more"),
        (
            ["--max-retries", "3"],
            "error: --max-retries 3: it applies to --wait only; add --wait",
        ),
    ],
)
def test_ddm_submit_max_retries_bad_input_exits_2(prepared, args, message):
    """Refused before anything is submitted (the address below answers nothing)."""
    done = run_ddm_in_process(
        "submit", "--store", prepared[0], *args, "--address", "http://127.0.0.1:9"
    )
    assert done.returncode == 2
    assert done.stderr.strip() == message
