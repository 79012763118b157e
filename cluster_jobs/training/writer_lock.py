"""One writer per model: a lock object in the store, `locks/<model prefix>.json`, created
only if absent (`Store.create`: S3's `If-None-Match: *`, a hard link locally), so of two
jobs that start together exactly one trains and the other exits naming it.

The holder refreshes the lock's heartbeat from a thread every `ttl / 6` seconds and deletes
it when it stops (finishing, failing, or stopped by SIGTERM, which `ray job stop` sends).
A holder that died without that (SIGKILL, a lost node) leaves a lock whose heartbeat stops
ageing; once it is older than the TTL the next job takes it over. A lock refreshed by
another holder is never touched: the heartbeat rewrites it only while it still carries this
holder's token.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field

from cluster_jobs.training.config import TrainConfig
from ddm_nodes.errors import DDMError
from ddm_nodes.store import Store

log = logging.getLogger("ddm.train")
LOCKS_FOLDER = "locks"


class WriterLockHeld(DDMError):
    """Another job is writing this model."""


class LockHolder(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(default_factory=lambda: uuid.uuid4().hex)
    job: str | None = Field(None, description="the Ray job's submission id, when in a job")
    host: str = Field(default_factory=socket.gethostname)
    pid: int = Field(default_factory=os.getpid)
    config_hash: str
    steps: int
    started_at: float = Field(default_factory=time.time)
    heartbeat_at: float = Field(default_factory=time.time)

    def describe(self) -> str:
        who = f"job {self.job}" if self.job else f"pid {self.pid} on {self.host}"
        since = datetime.fromtimestamp(self.started_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{who} (config {self.config_hash}, {self.steps} steps, since {since})"


def lock_key(prefix: str) -> str:
    return f"{LOCKS_FOLDER}/{prefix}.json"


def current_job_id() -> str | None:
    """The submission id of the Ray job this driver runs in (the job supervisor hands the
    job's metadata to its driver in RAY_JOB_CONFIG_JSON_ENV_VAR)."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    except json.JSONDecodeError:
        return None
    return (config.get("metadata") or {}).get("job_submission_id")


class WriterLock:
    """`with WriterLock(store, prefix, holder, ttl_s):` holds `prefix` for the block."""

    def __init__(self, store: Store, prefix: str, holder: LockHolder, ttl_s: float, name: str):
        self.store, self.key, self.holder = store, lock_key(prefix), holder
        self.ttl_s, self.name = ttl_s, name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        if self.store.create(self.key, self._payload()):
            return self._start_heartbeat()
        other = self._read()
        if other is not None and time.time() - other.heartbeat_at <= self.ttl_s:
            raise WriterLockHeld(
                f"{self.name} is being written by {other.describe()}, last heartbeat "
                f"{time.time() - other.heartbeat_at:.0f} s ago: wait for it to finish or stop "
                f"it (`ray job stop {other.job or 'ID'}`); a lock whose holder died expires "
                f"{self.ttl_s:.0f} s after its last heartbeat ({self.store.url(self.key)})"
            )
        if other is not None:
            log.warning(
                "%s: taking over the writer lock of %s, silent for %.0f s",
                self.name,
                other.describe(),
                time.time() - other.heartbeat_at,
            )
        # Expired (or unreadable): remove it and race for it again; one of the racers wins.
        self.store.delete([self.key])
        if not self.store.create(self.key, self._payload()):
            winner = self._read()
            raise WriterLockHeld(
                f"{self.name}: another job took the expired writer lock first"
                + (f": {winner.describe()}" if winner else "")
            )
        self._start_heartbeat()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._ours():
            self.store.delete([self.key])

    def _payload(self) -> bytes:
        return self.holder.model_dump_json(indent=2).encode()

    def _read(self) -> LockHolder | None:
        try:
            return LockHolder.model_validate_json(self.store.get_bytes(self.key))
        except (DDMError, ValueError):  # gone meanwhile, or not a lock ddm wrote
            return None

    def _ours(self) -> bool:
        found = self._read()
        return found is not None and found.token == self.holder.token

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="ddm-writer-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 6):
            try:
                if not self._ours():
                    log.error("%s: the writer lock was taken over by another job", self.name)
                    return
                self.holder.heartbeat_at = time.time()
                self.store.put_bytes(self.key, self._payload())
            except DDMError as e:  # a store hiccup: the next beat tries again
                log.warning("%s: could not refresh the writer lock: %s", self.name, e)

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def writer_lock(cfg: TrainConfig, store: Store) -> WriterLock:
    """The lock every process training `cfg`'s model holds while it writes."""
    holder = LockHolder(job=current_job_id(), config_hash=cfg.config_hash(), steps=cfg.steps)
    return WriterLock(store, cfg.prefix, holder, cfg.lock_ttl_s, cfg.name)
