"""checkpoint.py: the one checkpoint format, written and verified through a LocalStore."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ddm_nodes.checkpoint import (
    CHECKPOINT_FORMAT,
    CONFIG_FILE,
    MANIFEST_FILE,
    MODEL_CLASSES,
    STATE_FILE,
    TRAINING_FILE,
    WEIGHTS_FILE,
    CheckpointManifest,
    load_model,
    load_state,
    open_checkpoint,
    optimizer_from_tensors,
    optimizer_to_tensors,
    read_manifest,
    save_checkpoint,
)
from ddm_nodes.errors import IntegrityError, ManifestError
from ddm_nodes.experts import Expert, ExpertSpec
from ddm_nodes.router_net import RouterNet
from ddm_nodes.store import LocalStore

PREFIX = "experts/expert-001"
TRAINING = {"config": {"preset": "x", "steps": 3}, "model": {"channels": 1}}

# A model loaded from a checkpoint holds the saved weights bit for bit (checked bitwise), but
# it is another object: another allocation or layout may take another GEMM/conv path, so its
# outputs may differ in the last bits. Through a few layers that stays ~1e-6 on outputs of
# O(1) (measured: running the same models one sample at a time instead of batched), while
# two differently seeded models differ by ~0.1 or more.
SAME_WEIGHTS = dict(rtol=1e-5, atol=1e-5)


def _manifest(kind: str = "expert", cluster: int | None = 1) -> CheckpointManifest:
    return CheckpointManifest(
        kind=kind,
        cluster=cluster,
        step=3,
        images_seen=24,
        loss=0.5,
        data_store="file:///data",
        final=True,
    )


def _expert(preset: str, seed: int = 0) -> Expert:
    torch.manual_seed(seed)
    spec = ExpertSpec(preset=preset, image_size=16, channels=1, num_classes=10)
    return Expert.create(spec).eval()


def _inputs(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.rand(n, generator=g)


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture(scope="module")
def router() -> RouterNet:
    torch.manual_seed(0)
    return RouterNet.from_preset("router-tiny", 1, 3).eval()


def _saved_router(store: LocalStore, router: RouterNet, prefix: str = "router", **kw) -> str:
    save_checkpoint(store, prefix, router, TRAINING, _manifest("router", None), **kw)
    return prefix


def _file(store: LocalStore, prefix: str, name: str) -> Path:
    return store.root / prefix / name


def _assert_same_weights(loaded: torch.nn.Module, saved: torch.nn.Module) -> None:
    """Bitwise: the loaded tensors are the bytes saved."""
    got, want = loaded.state_dict(), saved.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


# --- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["unet-tiny", "dit-tiny"])
def test_expert_round_trip_gives_identical_outputs(store, preset):
    expert = _expert(preset)
    save_checkpoint(store, PREFIX, expert.denoiser, TRAINING, _manifest())
    loaded = load_model(store, PREFIX, kind="expert")
    assert type(loaded.model) is type(expert.denoiser)
    assert not loaded.model.training
    assert loaded.training == TRAINING
    assert loaded.manifest.kind == "expert" and loaded.manifest.cluster == 1
    assert (loaded.manifest.step, loaded.manifest.images_seen) == (3, 24)
    _assert_same_weights(loaded.model, expert.denoiser)
    again = Expert(loaded.model, expert.spec)
    x, t = _inputs()
    y = torch.tensor([4, -1])
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, y), expert(x, t, y), **SAME_WEIGHTS)
    other = _expert(preset, seed=1)
    with torch.no_grad():  # the comparison can tell other weights apart
        assert not torch.allclose(other(x, t, y), expert(x, t, y), **SAME_WEIGHTS)


def test_router_round_trip_gives_identical_outputs(store, router):
    _saved_router(store, router)
    loaded = load_model(store, "router", kind="router")
    assert isinstance(loaded.model, RouterNet)
    _assert_same_weights(loaded.model, router)
    x, t = _inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, t), router(x, t), **SAME_WEIGHTS)


def test_load_model_refuses_the_wrong_kind(store, router):
    _saved_router(store, router)
    with pytest.raises(ManifestError, match="not a expert"):
        load_model(store, "router", kind="expert")


def test_the_manifest_lists_the_sha256_of_every_file(store, router):
    state = {"model.w": torch.arange(6.0).reshape(2, 3)}
    done = save_checkpoint(
        store, "router", router, TRAINING, _manifest("router", None), state, {"step": 3}
    )
    on_disk = sorted(p.name for p in (store.root / "router").iterdir())
    assert on_disk == sorted([CONFIG_FILE, WEIGHTS_FILE, TRAINING_FILE, STATE_FILE, MANIFEST_FILE])
    manifest = read_manifest(store, "router")
    assert manifest == done
    assert set(manifest.files) == set(on_disk) - {MANIFEST_FILE}
    for name, sha in manifest.files.items():
        assert sha == hashlib.sha256(_file(store, "router", name).read_bytes()).hexdigest(), name
    assert manifest.sha256 == manifest.files[WEIGHTS_FILE]
    assert manifest.format_version == CHECKPOINT_FORMAT


def test_saving_again_replaces_the_checkpoint(store, router):
    _saved_router(store, router)
    torch.manual_seed(5)
    other = RouterNet.from_preset("router-tiny", 1, 3).eval()
    _saved_router(store, other)
    loaded = load_model(store, "router")
    _assert_same_weights(loaded.model, other)
    x, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x, t), other(x, t), **SAME_WEIGHTS)


# --- integrity ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [WEIGHTS_FILE, CONFIG_FILE, TRAINING_FILE])
def test_one_flipped_byte_is_refused(store, router, name):
    _saved_router(store, router)
    path = _file(store, "router", name)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match"):
        load_model(store, "router")


def test_a_newer_format_version_asks_for_an_upgrade(store, router):
    _saved_router(store, router)
    path = _file(store, "router", MANIFEST_FILE)
    raw = json.loads(path.read_text())
    raw["format_version"] = CHECKPOINT_FORMAT + 1
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="upgrade"):
        load_model(store, "router")


@pytest.mark.parametrize("class_name", ["UNet2DConditionModel", "os.system", ""])
def test_a_model_class_outside_the_allow_list_is_refused(store, router, class_name):
    _saved_router(store, router)
    config_path = _file(store, "router", CONFIG_FILE)
    config = json.loads(config_path.read_text())
    assert config["_class_name"] == "RouterNet"
    config["_class_name"] = class_name
    config_path.write_bytes(json.dumps(config).encode())
    # keep the manifest consistent, so that only the class check can fail
    manifest_path = _file(store, "router", MANIFEST_FILE)
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][CONFIG_FILE] = hashlib.sha256(config_path.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestError) as err:
        load_model(store, "router")
    for allowed in MODEL_CLASSES:
        assert allowed in str(err.value)


def test_a_missing_manifest_is_refused(store, router):
    _saved_router(store, router)
    _file(store, "router", MANIFEST_FILE).unlink()
    with pytest.raises(ManifestError, match=MANIFEST_FILE):
        load_model(store, "router")
    with pytest.raises(ManifestError):
        load_model(store, "never-written")


@pytest.mark.parametrize("version", ["2", None, [1]])
def test_a_malformed_format_version_is_a_manifest_error(store, router, version):
    """A manifest is user-fixable input: a format_version of the wrong type must give a
    ManifestError (as dataset.json's reader does), not a TypeError from comparing it."""
    _saved_router(store, router)
    path = _file(store, "router", MANIFEST_FILE)
    raw = json.loads(path.read_text())
    raw["format_version"] = version
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError):
        read_manifest(store, "router")


def test_a_manifest_that_is_not_json_is_refused(store, router):
    _saved_router(store, router)
    _file(store, "router", MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(store, "router")


def test_a_manifest_with_unknown_fields_is_refused(store, router):
    _saved_router(store, router)
    path = _file(store, "router", MANIFEST_FILE)
    raw = json.loads(path.read_text())
    raw["surprise"] = 1
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="not a valid checkpoint manifest"):
        read_manifest(store, "router")


# --- resumable state ----------------------------------------------------------------------


def test_load_state_round_trip(store, router):
    state = {
        "model.a": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),
        "optim.0.step": torch.tensor(5.0),
        "optim.0.exp_avg": torch.arange(4, dtype=torch.float64),
        "ints": torch.tensor([1, 2, 3], dtype=torch.int64),
    }
    meta = {"step": 5, "images_seen": 40, "optimizer": {"param_groups": [{"lr": 0.1}]}}
    _saved_router(store, router, state=state, state_meta=meta)
    tensors, got_meta = load_state(store, open_checkpoint(store, "router"))
    assert got_meta == meta
    assert set(tensors) == set(state)
    for k, v in state.items():
        assert tensors[k].dtype == v.dtype and torch.equal(tensors[k], v), k


def test_load_state_without_meta_gives_empty_meta(store, router):
    _saved_router(store, router, state={"x": torch.ones(2)})
    tensors, meta = load_state(store, open_checkpoint(store, "router"))
    assert meta == {}
    assert torch.equal(tensors["x"], torch.ones(2))


def test_load_state_of_a_final_checkpoint_is_refused(store, router):
    _saved_router(store, router)  # no state
    with pytest.raises(ManifestError, match=STATE_FILE):
        load_state(store, open_checkpoint(store, "router"))


def test_a_corrupted_state_file_is_refused(store, router):
    _saved_router(store, router, state={"x": torch.ones(64)})
    path = _file(store, "router", STATE_FILE)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match"):
        load_state(store, open_checkpoint(store, "router"))


def _tiny_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


# Resumed training runs on another model object (a deepcopy): its gradients may differ from
# the original's in the last bits (another allocation, possibly another GEMM path). Three
# AdamW steps at lr 1e-2 keep that at a few float32 ulps of weights ~0.5 (measured: a 1-ulp
# nudge of every weight ends 3 steps <= 6e-8 away), while taking the steps without the
# restored optimizer state moves the weights by ~1e-2 (the next test).
RESUMED = dict(rtol=1e-5, atol=1e-6)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, i: int) -> None:
    g = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
    opt.zero_grad()
    (model(x) - y).pow(2).mean().backward()
    opt.step()


def test_optimizer_tensors_round_trip_resumes_adamw_exactly():
    model = _tiny_net(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, betas=(0.8, 0.95))
    for i in range(3):
        _step(model, opt, i)

    tensors, meta = optimizer_to_tensors(opt.state_dict())
    assert tensors and all(k.startswith("optim.") for k in tensors)
    # through the same formats a checkpoint uses: safetensors bytes and JSON
    tensors = load_safetensors(save_safetensors(tensors))
    meta = json.loads(json.dumps(meta))

    resumed = copy.deepcopy(model)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1.0)  # hyperparameters come from the state
    opt2.load_state_dict(optimizer_from_tensors(tensors, meta))

    original_state = opt.state_dict()["state"]
    restored_state = opt2.state_dict()["state"]
    assert set(original_state) == set(restored_state)
    for idx, slots in original_state.items():
        assert set(slots) == set(restored_state[idx])
        for name, value in slots.items():  # the bytes saved, read back: bitwise
            assert torch.equal(torch.as_tensor(restored_state[idx][name]), torch.as_tensor(value))
    assert opt2.param_groups[0]["lr"] == 1e-2
    assert tuple(opt2.param_groups[0]["betas"]) == (0.8, 0.95)

    for i in range(3, 6):
        _step(model, opt, i)
        _step(resumed, opt2, i)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(b, a, **RESUMED)


def test_a_fresh_optimizer_would_have_taken_different_steps():
    """The round-trip test above can fail: without the restored state the steps differ."""
    model = _tiny_net(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(3):
        _step(model, opt, i)
    fresh_model = copy.deepcopy(model)
    fresh_opt = torch.optim.AdamW(fresh_model.parameters(), lr=1e-2)
    _step(model, opt, 3)
    _step(fresh_model, fresh_opt, 3)
    assert any(
        not torch.allclose(b, a, **RESUMED)
        for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True)
    )


def test_optimizer_from_tensors_ignores_the_model_weights():
    tensors = {"model.w": torch.ones(2), "optim.0.exp_avg": torch.zeros(2)}
    meta = {"param_groups": [{"params": [0]}], "scalars": {"0.step": 4}}
    state = optimizer_from_tensors(tensors, meta)
    assert set(state["state"]) == {0}
    assert state["state"][0]["step"] == 4
    assert torch.equal(state["state"][0]["exp_avg"], torch.zeros(2))
    assert state["param_groups"] == [{"params": [0]}]
