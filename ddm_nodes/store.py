"""The store: one interface over a local directory or an S3 prefix, addressed by a URI.

`file:///abs/path` (or a plain path) and `s3://bucket/prefix` go through the same
operations: put (atomic), create (only if absent: S3's `If-None-Match: *`, a hard link
locally), get, exists, list, delete and open for streaming. Keys are relative,
'/'-separated paths under the store root, so a store can be copied from a directory to a
bucket and every manifest in it stays valid.

S3 goes through boto3 and so honours `AWS_ENDPOINT_URL` (MinIO, moto, Ceph...) and the
usual credential chain. Every failure becomes a `StoreError` whose message names the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from ddm_nodes.errors import IntegrityError, StoreError

TEMP_PREFIX = ".tmp-"  # in-flight local writes; never listed, never read


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(
    path: str | os.PathLike,
    data: bytes | None = None,
    *,
    source: str | os.PathLike | None = None,
    hint: str = "",
) -> Path:
    """Write `data` (or a copy of the file `source`) to `path` so that a reader sees the
    old file or the whole new one, never half: a temp file beside it, fsync, `os.replace`.
    The one atomic file write of ddm; a failure is a StoreError ending with `hint`."""
    path = Path(path).expanduser()
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{uuid.uuid4().hex}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if source is not None:
                shutil.copyfile(source, tmp)
                _fsync_path(tmp)
            else:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_path(path.parent)  # the rename itself survives a crash only once this is done
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        tail = f"; {hint}" if hint else ""
        raise StoreError(f"cannot write {path}: {e.strerror}{tail}") from e
    return path


def create_exclusive(path: str | os.PathLike, data: bytes, *, hint: str = "") -> bool:
    """Write `data` to `path` only if nothing is there: False when the file exists. The
    content is complete before the name appears (a temp file, fsync, then a hard link, which
    fails when the name is taken), so a reader never sees half of it."""
    path = Path(path).expanduser()
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{uuid.uuid4().hex}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            _fsync_path(path.parent)
            return True
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        tail = f"; {hint}" if hint else ""
        raise StoreError(f"cannot write {path}: {e.strerror}{tail}") from e


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store(ABC):
    """A flat key space under a root URI."""

    uri: str

    def url(self, key: str) -> str:
        """The absolute URI of `key` (what WebDataset or a user would open)."""
        return f"{self.uri.rstrip('/')}/{key}"

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write `data` so that readers see either the old object or the whole new one."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write `data` only if `key` does not exist (atomically: of two writers exactly one
        wins); False when it exists. What writer locks are made of."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys that start with `prefix`."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A streaming binary reader; the caller closes it."""

    @abstractmethod
    def delete(self, keys: Iterable[str]) -> None: ...

    @abstractmethod
    def check(self) -> None:
        """Fail fast, before any work, if the store cannot be reached."""

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        self.put_bytes(key, Path(path).read_bytes())

    def get_verified(self, key: str, sha256: str) -> bytes:
        """Read `key` whole and refuse it unless its sha256 is the one a manifest recorded."""
        data = self.get_bytes(key)
        actual = sha256_bytes(data)
        if actual != sha256:
            raise IntegrityError(
                f"{self.url(key)} is corrupted or was replaced: sha256 {actual[:12]}... does "
                f"not match the manifest's {sha256[:12]}...; re-run `ddm prepare --overwrite` "
                "or restore the original file"
            )
        return data

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class LocalStore(Store):
    """A directory; atomic puts are a temp file in the same directory, then `os.replace`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise StoreError(f"key {key!r} escapes the store root {self.uri}")
        return path

    def put_bytes(self, key: str, data: bytes) -> None:
        write_atomic(self._path(key), data, hint="check the --store path")

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        write_atomic(self._path(key), source=path, hint="check the --store path")

    def create(self, key: str, data: bytes) -> bool:
        return create_exclusive(self._path(key), data, hint="check the --store path")

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        # Walk only the directory the prefix names, then filter by the rest of it.
        base = self._path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _, filenames in os.walk(base):
            for name in filenames:
                if name.startswith(TEMP_PREFIX):
                    continue
                key = (Path(dirpath) / name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def open(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except FileNotFoundError as e:
            raise StoreError(f"{path} does not exist in store {self.uri}") from e
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}") from e

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def check(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store path {self.root} is a file; point --store at a directory")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store directory {self.root}: {e.strerror}") from e
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"store directory {self.root} is not writable by this user")


class S3Store(Store):
    """A bucket prefix through boto3. A single PUT is atomic in S3 by itself."""

    def __init__(self, bucket: str, prefix: str = ""):
        import boto3  # deferred: a local store never pays for botocore's import
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.client = boto3.client("s3", config=Config(retries={"max_attempts": 5}))

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        with self._errors(key):
            self.client.upload_file(str(path), self.bucket, self._key(key))

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            with self._errors(key, conflict_ok=True):
                self.client.put_object(
                    Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*"
                )
        except ClientError as e:  # only a 412 / 409 reaches here (conflict_ok)
            if _error_code(e) in _CONFLICT_CODES:
                return False
            raise
        return True

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as body:
            return body.read()

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            with self._errors(key, missing_ok=True):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:  # only a plain 404 reaches here (missing_ok)
            if _error_code(e) in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise
        return True

    def list(self, prefix: str = "") -> list[str]:
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        with self._errors(prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full
            ):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(keys)

    def open(self, key: str) -> BinaryIO:
        with self._errors(key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        for i in range(0, len(keys), 1000):  # the DeleteObjects limit
            batch = [{"Key": self._key(k)} for k in keys[i : i + 1000]]
            with self._errors(keys[i]):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})

    def check(self) -> None:
        with self._errors(""):
            self.client.head_bucket(Bucket=self.bucket)

    @contextlib.contextmanager
    def _errors(
        self, key: str, *, missing_ok: bool = False, conflict_ok: bool = False
    ) -> Iterator[None]:
        """Translate botocore's exceptions into one line that names the fix."""
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = self.url(key) if key else self.uri
        try:
            yield
        except (NoCredentialsError, PartialCredentialsError) as e:
            raise StoreError(
                f"no AWS credentials for {where}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            ) from e
        except EndpointConnectionError as e:
            raise StoreError(
                f"cannot reach the S3 endpoint for {where} ({e.kwargs.get('endpoint_url')}): "
                "check AWS_ENDPOINT_URL and that the server is running"
            ) from e
        except ClientError as e:
            code = _error_code(e)
            if conflict_ok and code in _CONFLICT_CODES:
                raise
            if code == "NotImplemented" and conflict_ok:
                raise StoreError(
                    f"the S3 server behind {where} does not support conditional writes "
                    "(If-None-Match), which ddm's writer locks need: use AWS S3, MinIO or "
                    "another server that does"
                ) from e
            if code in {"NoSuchBucket"} or (code in {"404", "NotFound"} and not key):
                raise StoreError(
                    f"bucket {self.bucket!r} does not exist: create it or fix --store {self.uri}"
                ) from e
            if code in {"403", "AccessDenied", "AllAccessDisabled"}:
                raise StoreError(
                    f"access denied to {where}: grant this identity s3:GetObject, "
                    "s3:PutObject and s3:ListBucket on it"
                ) from e
            if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch"}:
                raise StoreError(
                    f"the AWS credentials were rejected for {where}: check "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
                ) from e
            if code in {"NoSuchKey", "404", "NotFound"}:
                if missing_ok:
                    raise
                raise StoreError(f"{where} does not exist") from e
            raise StoreError(f"S3 error on {where}: {code}: {e}") from e


# PreconditionFailed: the key exists; ConditionalRequestConflict: a concurrent conditional
# write to the same key is in flight (AWS answers 409, the loser retries or gives way)
_CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def _error_code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


def open_store(uri: str | os.PathLike) -> Store:
    """The store a URI names: `s3://bucket[/prefix]`, `file:///abs/path` or a plain path."""
    text = os.fspath(uri)
    parsed = urlparse(text)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StoreError(f"store URI {text!r} names no bucket; expected s3://BUCKET/PREFIX")
        return S3Store(parsed.netloc, parsed.path)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"store URI {text!r} has a host; expected file:///ABSOLUTE/PATH")
        return LocalStore(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return LocalStore(text)
    raise StoreError(
        f"unsupported store URI {text!r}; expected a path, file:///ABSOLUTE/PATH or "
        "s3://BUCKET/PREFIX"
    )


def open_url(url: str) -> BinaryIO:
    """Stream one absolute URL (`s3://...`, `file://...` or a path) through the store."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc).open(parsed.path.lstrip("/"))
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else url)
    return LocalStore(path.parent).open(path.name)
