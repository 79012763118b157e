"""The store: one interface over a local directory and an S3 prefix (moto on loopback)."""

from __future__ import annotations

import hashlib
import os

import pytest

from ddm_nodes.errors import IntegrityError, StoreError
from ddm_nodes.store import TEMP_PREFIX, LocalStore, S3Store, open_store, open_url

KEYS = {
    "dataset.json": b"{}",
    "shards/cluster-000/shard-000000.tar": b"zero",
    "shards/cluster-001/shard-000000.tar": b"one",
    "shards/cluster-001/shard-000001.tar": b"one-b",
    "heldout/cluster-000/shard-000000.tar": b"held",
}


def _fill(store) -> None:
    for key, data in KEYS.items():
        store.put_bytes(key, data)


def _exercise(store) -> None:
    """The operations every store answers the same way, whatever is behind it."""
    store.check()
    assert store.list() == []
    _fill(store)

    for key, data in KEYS.items():
        assert store.exists(key)
        assert store.get_bytes(key) == data
        with store.open(key) as f:
            assert f.read() == data
    assert not store.exists("shards/cluster-000/shard-000009.tar")
    assert not store.exists("nothing")

    assert store.list() == sorted(KEYS)
    assert store.list("shards/") == sorted(k for k in KEYS if k.startswith("shards/"))
    assert store.list("shards/cluster-001/") == [
        "shards/cluster-001/shard-000000.tar",
        "shards/cluster-001/shard-000001.tar",
    ]
    assert store.list("shards/cluster-001/shard-000001") == ["shards/cluster-001/shard-000001.tar"]
    assert store.list("sh") == sorted(k for k in KEYS if k.startswith("sh"))
    assert store.list("missing/") == []

    # overwrite replaces the whole object
    store.put_bytes("dataset.json", b'{"v": 2}')
    assert store.get_bytes("dataset.json") == b'{"v": 2}'

    # verified reads
    data = KEYS["shards/cluster-000/shard-000000.tar"]
    good = hashlib.sha256(data).hexdigest()
    assert store.get_verified("shards/cluster-000/shard-000000.tar", good) == data
    with pytest.raises(IntegrityError, match="sha256"):
        store.get_verified("shards/cluster-000/shard-000000.tar", hashlib.sha256(b"x").hexdigest())

    with pytest.raises(StoreError, match="does not exist"):
        store.get_bytes("shards/cluster-009/shard-000000.tar")

    store.delete(["shards/cluster-001/shard-000000.tar", "heldout/cluster-000/shard-000000.tar"])
    store.delete(["never/was/here"])  # deleting what is absent is not an error
    assert store.list() == sorted(
        set(KEYS) - {"shards/cluster-001/shard-000000.tar", "heldout/cluster-000/shard-000000.tar"}
    )
    assert not store.exists("heldout/cluster-000/shard-000000.tar")


# --- LocalStore ----------------------------------------------------------------------------


def test_local_store_operations(tmp_path):
    store = LocalStore(tmp_path / "root")
    _exercise(store)
    # keys are plain files under the root
    assert (tmp_path / "root/shards/cluster-000/shard-000000.tar").read_bytes() == b"zero"
    assert store.url("a/b") == (tmp_path / "root").as_uri() + "/a/b"


def test_local_put_file(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    store = LocalStore(tmp_path / "root")
    store.put_file("deep/dir/x.bin", src)
    assert store.get_bytes("deep/dir/x.bin") == b"payload"
    assert store.list() == ["deep/dir/x.bin"]


def test_local_temp_files_are_not_listed(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes("shards/a.tar", b"a")
    (tmp_path / "shards" / f"{TEMP_PREFIX}b.tar.123").write_bytes(b"in flight")
    assert store.list() == ["shards/a.tar"]
    assert store.list("shards/") == ["shards/a.tar"]


def _leftovers(directory) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)]


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_local_put_is_atomic(tmp_path, monkeypatch, failing):
    """A write that fails half-way leaves the old object whole and no temp file behind."""
    store = LocalStore(tmp_path)
    store.put_bytes("dir/key.bin", b"old content")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(StoreError, match="No space left on device"):
        store.put_bytes("dir/key.bin", b"new content that never lands" * 100)
    monkeypatch.undo()

    assert store.get_bytes("dir/key.bin") == b"old content"
    assert _leftovers(tmp_path / "dir") == []
    assert store.list() == ["dir/key.bin"]


def test_local_put_file_is_atomic(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "root")
    store.put_bytes("k", b"old")
    src = tmp_path / "src"
    src.write_bytes(b"new")

    def boom(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(StoreError):
        store.put_file("k", src)
    monkeypatch.undo()
    assert store.get_bytes("k") == b"old"
    assert _leftovers(tmp_path / "root") == []


@pytest.mark.parametrize("key", ["../outside", "a/../../outside", "/etc/passwd"])
def test_local_key_escaping_root_is_refused(tmp_path, key):
    store = LocalStore(tmp_path / "root")
    with pytest.raises(StoreError, match="escapes the store root"):
        store.put_bytes(key, b"x")
    with pytest.raises(StoreError, match="escapes the store root"):
        store.get_bytes(key)
    assert not (tmp_path / "outside").exists()


def test_local_check(tmp_path):
    LocalStore(tmp_path / "new" / "root").check()
    assert (tmp_path / "new" / "root").is_dir()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        LocalStore(tmp_path / "afile").check()


def test_open_url_reads_local_paths_and_file_uris(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"abc")
    for url in (str(tmp_path / "x.bin"), (tmp_path / "x.bin").as_uri()):
        with open_url(url) as f:
            assert f.read() == b"abc"


# --- open_store ----------------------------------------------------------------------------


def test_open_store_plain_path(tmp_path):
    store = open_store(str(tmp_path / "a"))
    assert isinstance(store, LocalStore)
    assert store.root == (tmp_path / "a").resolve()
    assert isinstance(open_store(tmp_path), LocalStore)  # a PathLike too


def test_open_store_file_uri(tmp_path):
    store = open_store((tmp_path / "with space").as_uri())
    assert isinstance(store, LocalStore)
    assert store.root == (tmp_path / "with space").resolve()
    assert isinstance(open_store(f"file://localhost{tmp_path}"), LocalStore)


def test_open_store_s3_uri(s3_env):
    store = open_store("s3://my-bucket/some/prefix/")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix) == ("my-bucket", "some/prefix")
    assert store.uri == "s3://my-bucket/some/prefix"
    assert store.url("dataset.json") == "s3://my-bucket/some/prefix/dataset.json"
    bare = open_store("s3://my-bucket")
    assert (bare.bucket, bare.prefix, bare.uri) == ("my-bucket", "", "s3://my-bucket")


@pytest.mark.parametrize(
    "uri", ["http://example.com/store", "gs://bucket/prefix", "s3:///no-bucket", "file://host/x"]
)
def test_open_store_bad_uri(uri):
    with pytest.raises(StoreError):
        open_store(uri)


# --- S3Store against moto on loopback ------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("prefix", ["runs/one", ""])
def test_s3_store_operations(bucket, prefix):
    store = S3Store(bucket, prefix)
    _exercise(store)
    # the keys really sit under the prefix in the bucket
    raw = store.client.list_objects_v2(Bucket=bucket)["Contents"]
    expected = [f"{prefix}/{k}" if prefix else k for k in store.list()]
    assert sorted(o["Key"] for o in raw) == sorted(expected)


@pytest.mark.integration
def test_s3_prefixes_do_not_see_each_other(bucket):
    a, b = S3Store(bucket, "a"), S3Store(bucket, "ab")
    a.put_bytes("x", b"1")
    b.put_bytes("y", b"2")
    assert a.list() == ["x"]
    assert b.list() == ["y"]


@pytest.mark.integration
def test_s3_put_file_and_open_url(bucket, tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(b"file body" * 1000)
    store = open_store(f"s3://{bucket}/p")
    store.put_file("dir/f.bin", src)
    assert store.get_bytes("dir/f.bin") == src.read_bytes()
    with open_url(f"s3://{bucket}/p/dir/f.bin") as f:
        assert f.read() == src.read_bytes()


@pytest.mark.integration
def test_s3_missing_bucket(s3_env):
    store = open_store("s3://no-such-bucket-xyz/p")
    with pytest.raises(StoreError, match="does not exist"):
        store.check()
    with pytest.raises(StoreError, match="does not exist"):
        store.put_bytes("k", b"x")
    with pytest.raises(StoreError, match="does not exist"):
        store.list()


@pytest.mark.integration
def test_s3_no_credentials(no_aws_credentials):
    store = open_store("s3://any-bucket/p")
    with pytest.raises(StoreError, match="no AWS credentials"):
        store.check()
    with pytest.raises(StoreError, match="no AWS credentials"):
        store.put_bytes("k", b"x")
