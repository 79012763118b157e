"""Every user-fixable problem: exit code 2 and exactly one line on stderr, through the CLI.

Each case runs the real `ddm` console script. The runs of a module fixture go two at a time
(this machine's cores) since each one spends seconds importing; the tests then judge them.
"""

from __future__ import annotations

import io
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import free_port, run_ddm_in_process

from cluster_jobs.ops.local_cluster import ClusterInfo
from ddm_nodes.dataset_manifest import MANIFEST_KEY


def _run_all(ddm, cases: dict[str, tuple[list[str], dict | None]]) -> dict:
    with ThreadPoolExecutor(2) as pool:
        futures = {name: pool.submit(ddm, *args, env=env) for name, (args, env) in cases.items()}
        return {name: f.result() for name, f in futures.items()}


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _bad_shards(where: Path) -> dict[str, Path]:
    shards = {}
    shards["png-not-an-image"] = where / "png-not-an-image.tar"
    _tar(shards["png-not-an-image"], {"000.png": b"these bytes are not a PNG", "000.cls": b"1"})
    whole = where / "whole.tar"
    _tar(whole, {"000.png": b"x" * 2000, "000.cls": b"1"})
    shards["not-a-tar"] = where / "not-a-tar.tar"
    shards["not-a-tar"].write_bytes(b"garbage " * 100)
    shards["truncated"] = where / "truncated.tar"
    shards["truncated"].write_bytes(whole.read_bytes()[:700])
    return shards


@pytest.fixture(scope="module")
def local_runs(ddm, prepared_digits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-errors")
    cfg, _ = prepared_digits
    manifest = Path(cfg.store) / MANIFEST_KEY
    before = manifest.read_bytes()

    def prepare(*args: str, store: str | None = None):
        return (["prepare", *args, "--store", store or str(tmp / "store")], None)

    cases = {
        "unknown-dataset": prepare("--dataset", "imagenet-1k"),
        "one-cluster": prepare("--dataset", "digits", "--clusters", "1"),
        "too-many-clusters": prepare("--dataset", "digits", "--clusters", "5000"),
        "unreadable-folder": prepare("--dataset", "folder:/nonexistent"),
        "rerun": prepare("--dataset", "digits", "--clusters", "4", store=cfg.store),
    }
    shards = _bad_shards(tmp)
    for kind, path in shards.items():
        cases[f"shard-{kind}"] = prepare("--dataset", f"wds:{path}")
    runs = _run_all(ddm, cases)
    runs["manifest-unchanged"] = manifest.read_bytes() == before
    runs["shards"] = shards
    return runs


@pytest.fixture(scope="module")
def s3_runs(ddm, aws_envs):
    return _run_all(
        ddm,
        {
            "missing-bucket": (
                ["prepare", "--dataset", "digits", "--store", "s3://no-such-bucket-xyz/p"],
                aws_envs["s3"],
            ),
            "no-credentials": (
                ["prepare", "--dataset", "digits", "--store", "s3://some-bucket/p"],
                aws_envs["no_credentials"],
            ),
        },
    )


@pytest.fixture(scope="module")
def serve_env(tmp_path_factory) -> dict[str, str]:
    """No API key, no RAY_ADDRESS, no cluster.json; `dead-cluster/` holds a cluster.json
    whose GCS port is closed."""
    tmp = tmp_path_factory.mktemp("serve-errors")
    env = {k: v for k, v in os.environ.items() if k not in ("DDM_API_KEY", "RAY_ADDRESS")}
    env["DDM_CLUSTER_DIR"] = str(tmp / "no-cluster")
    (tmp / "dead-cluster").mkdir()
    (tmp / "dead-cluster" / "cluster.json").write_text(
        ClusterInfo(
            gcs_address=f"127.0.0.1:{free_port()}", dashboard_url="http://127.0.0.1:1",
            metrics_export_port=1, token_path=str(tmp / "dead-cluster" / "auth_token"),
            num_cpus=1,
        ).model_dump_json()
    )  # fmt: skip
    env["DEAD_CLUSTER_DIR"] = str(tmp / "dead-cluster")
    env["STORE"] = str(tmp / "store")
    return env


@pytest.fixture(scope="module")
def serve_runs(ddm, serve_env):
    """`ddm serve` refused before any Ray starts, through the console script: no API key
    beyond loopback; a RAY_ADDRESS where no GCS answers (instead of a hang)."""
    serve = ["serve", "--store", serve_env["STORE"]]
    closed = f"127.0.0.1:{free_port()}"
    return _run_all(
        ddm,
        {
            "host-without-key": ([*serve, "--host", "0.0.0.0"], serve_env),
            "closed-port": (serve, {**serve_env, "RAY_ADDRESS": closed}),
        },
    )


@pytest.fixture
def in_process_serve(serve_env, monkeypatch):
    """`ddm serve ARGS` in this process with `serve_env` and `env`; the variables the command
    sets for Ray (token auth) are put back afterwards."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "DDM_API_KEY"):
        monkeypatch.setenv(name, "")  # makes monkeypatch restore it, set or not
        monkeypatch.delenv(name)
    monkeypatch.setenv("DDM_CLUSTER_DIR", serve_env["DDM_CLUSTER_DIR"])

    def run(*args: str, **env: str):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return run_ddm_in_process("serve", "--store", serve_env["STORE"], *args)

    return run


def assert_one_line_error(proc, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("error: ") and line[len("error: ") :].strip()
    for fragment in fragments:
        assert fragment in line
    assert proc.stdout == ""
    return line


def test_unknown_dataset(local_runs):
    assert_one_line_error(
        local_runs["unknown-dataset"], "imagenet-1k", "fashion-mnist", "mnist-5k", "folder:PATH"
    )


def test_one_cluster(local_runs):
    assert_one_line_error(local_runs["one-cluster"], "--clusters")


def test_more_clusters_than_images(local_runs, digits_set):
    assert_one_line_error(local_runs["too-many-clusters"], "--clusters 5000", str(len(digits_set)))


def test_unreadable_folder(local_runs):
    assert_one_line_error(local_runs["unreadable-folder"], "/nonexistent")


@pytest.mark.parametrize("kind", ["not-a-tar", "truncated", "png-not-an-image"])
def test_corrupted_shard(local_runs, kind):
    assert_one_line_error(local_runs[f"shard-{kind}"], str(local_runs["shards"][kind]))


def test_rerun_without_overwrite(local_runs):
    assert_one_line_error(local_runs["rerun"], "--overwrite")
    assert local_runs["manifest-unchanged"]  # the refused run changed nothing


@pytest.mark.integration
def test_missing_bucket(s3_runs):
    assert_one_line_error(s3_runs["missing-bucket"], "no-such-bucket-xyz", "does not exist")


@pytest.mark.integration
def test_no_credentials(s3_runs, aws_envs):
    assert "AWS_ACCESS_KEY_ID" not in aws_envs["no_credentials"]
    assert_one_line_error(s3_runs["no-credentials"], "no AWS credentials", "AWS_ACCESS_KEY_ID")


def test_serve_beyond_loopback_needs_an_api_key(serve_runs):
    assert_one_line_error(
        serve_runs["host-without-key"], "--host 0.0.0.0", "--api-key", "DDM_API_KEY"
    )


def test_serve_refuses_a_bad_route_prefix(in_process_serve):
    assert_one_line_error(in_process_serve("--route-prefix", "ddm/"), "'ddm/'", "/ddm")


def test_serve_names_a_ray_address_without_a_gcs(serve_runs, in_process_serve):
    assert_one_line_error(serve_runs["closed-port"], "no Ray GCS answers at", "RAY_ADDRESS")
    # an address that never answers, or (behind a proxy that accepts every connection)
    # answers anything but a GCS: refused after GCS_PROBE_S at most
    never = in_process_serve(RAY_ADDRESS="10.255.255.1:6379")
    assert_one_line_error(never, "no Ray GCS answers at 10.255.255.1:6379", "RAY_ADDRESS")


def test_serve_refuses_a_url_in_ray_address(in_process_serve):
    done = in_process_serve(RAY_ADDRESS="http://127.0.0.1:8265")
    assert_one_line_error(done, "RAY_ADDRESS=http://", "host:port")


def test_serve_names_ddm_cluster_up_for_a_dead_head(in_process_serve, serve_env):
    done = in_process_serve(DDM_CLUSTER_DIR=serve_env["DEAD_CLUSTER_DIR"])
    assert_one_line_error(done, "cluster.json", "`ddm cluster up`")
