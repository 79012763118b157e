"""`ddm submit`: one Ray job per expert (plus the router, the monolith and the analysis'
feature network), and `ddm jobs`.

Each job is a command a user could `ray job submit` by hand, carrying the job's whole
config as JSON: `python -m cluster_jobs.training expert --config '{...}'` (the same as
`--store URI --cluster K ...` with every other field spelled out). Submission ids are
readable and tied to the config (`ddm-expert-003-<config hash>`), so submitting a finished
expert again with the same config is a no-op; a failed or stopped one is submitted again
under `<id>-r<N>` and resumes from its latest checkpoint. `ddm submit --analyze` submits
`ddm analyze` the same way (`AnalyzeJob`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster_jobs import PROJECT_ROOT
from cluster_jobs.analysis.command import entrypoint as analysis_entrypoint
from cluster_jobs.analysis.config import AnalyzeConfig
from cluster_jobs.training.commands import entrypoint as training_entrypoint
from cluster_jobs.training.config import CLASSIFIER_KINDS, TrainConfig, fields_for
from cluster_jobs.training.tasks import validate
from ddm_nodes.dataset_manifest import DatasetManifest
from ddm_nodes.errors import DDMError
from ddm_nodes.store import open_store

# What a job's working_dir holds: the Python sources of ddm's three packages and nothing
# else, so that what else lies in the source tree (a .env, a local store, demo output)
# never leaves the machine with a job.
UPLOADED_PACKAGES = ("cluster_jobs", "ddm_nodes", "router_service")
UPLOADED_SUFFIXES = (".py",)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass(frozen=True)
class AnalyzeJob:
    """`ddm analyze` as a Ray job; its config was checked by the caller
    (analysis.command.job_config)."""

    config: AnalyzeConfig
    kind: str = "analyze"
    name: str = "analyze"

    @property
    def store(self) -> str:
        return self.config.store

    def config_hash(self) -> str:
        text = json.dumps(self.config.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]


Job = TrainConfig | AnalyzeJob


def entrypoint(job: Job) -> str:
    """The exact shell command the Ray job runs: the job's whole config as JSON."""
    if isinstance(job, AnalyzeJob):
        return analysis_entrypoint(job.config)
    return training_entrypoint(job)


def submission_id(job: Job) -> str:
    return f"ddm-{job.name}-{job.config_hash()}"


@dataclass
class Submitted:
    name: str
    submission_id: str
    action: str  # submitted | resubmitted | skipped-finished | skipped-running
    entrypoint: str


def plan(
    store: str,
    clusters: str,
    options: dict[str, Any],
    *,
    router: bool = False,
    monolith: bool = False,
    featnet: bool = False,
    classifier_options: dict[str, Any] | None = None,
) -> list[TrainConfig]:
    """The configs to submit, validated against the store before anything is submitted.
    Each job takes the `options` that apply to its kind; the router and the featnet take
    `classifier_options` over them (their own preset and learning rate: TrainConfig's
    defaults for their kind unless given there)."""
    manifest = DatasetManifest.load(open_store(store))
    if clusters == "all":
        ids = list(range(manifest.num_clusters))
    elif clusters in ("", "none"):
        ids = []
    else:
        try:
            ids = sorted({int(c) for c in clusters.split(",")})
        except ValueError:
            raise DDMError(f"--clusters {clusters!r}: expected 'all' or ids like 0,2,5") from None
    wanted = [("expert", k) for k in ids]
    wanted += [(kind, None) for kind, on in (("monolith", monolith), ("router", router)) if on]
    wanted += [("featnet", None)] if featnet else []
    if not wanted:
        raise DDMError("nothing to submit: give --clusters, --router, --monolith or --featnet")
    configs = []
    for kind, k in wanted:
        given = dict(options)
        if kind in CLASSIFIER_KINDS:
            given = {n: v for n, v in given.items() if n not in ("preset", "lr")}
            given |= classifier_options or {}
        applies = set(fields_for(kind))
        given = {n: v for n, v in given.items() if n in applies}
        configs.append(TrainConfig(kind=kind, store=store, cluster=k, **given))
    for cfg in configs:
        validate(cfg)
    return configs


@contextlib.contextmanager
def staged_project(root: Path = PROJECT_ROOT) -> Iterator[Path]:
    """A temporary copy of the uploaded packages' sources under `root`, to be a job's
    working_dir: the job runs in it, so `python -m cluster_jobs...` imports this copy. Ray
    names an upload by a hash of its files' paths and contents, so the same sources are
    uploaded once, whatever the folder's name."""
    with tempfile.TemporaryDirectory(prefix="ddm-job-") as folder:
        staged = Path(folder)
        for package in UPLOADED_PACKAGES:
            if not (root / package / "__init__.py").is_file():
                raise DDMError(f"{root / package} is not a package: jobs need ddm's sources")
            for path in sorted((root / package).rglob("*")):
                rel = path.relative_to(root)
                if path.suffix not in UPLOADED_SUFFIXES or "__pycache__" in rel.parts:
                    continue
                if not path.is_file() or any(p.startswith(".") for p in rel.parts):
                    continue
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, staged / rel)
        yield staged


def submit(
    address: str,
    jobs: list[Job],
    *,
    force: bool = False,
    entrypoint_num_cpus: float = 0.0,
) -> list[Submitted]:
    from ray.job_submission import JobSubmissionClient

    client = _client(address, JobSubmissionClient)
    existing = {j.submission_id: j for j in client.list_jobs() if j.submission_id}
    with staged_project() as working_dir:
        return [
            _submit_one(client, cfg, existing, working_dir, force, entrypoint_num_cpus)
            for cfg in jobs
        ]


def _submit_one(
    client, cfg: Job, existing: dict, working_dir: Path, force: bool, entrypoint_num_cpus: float
) -> Submitted:
    base = submission_id(cfg)
    tries = sorted(
        (sid for sid in existing if sid == base or sid.startswith(base + "-r")),
        key=lambda s: existing[s].start_time or 0,
    )
    latest = existing[tries[-1]] if tries else None
    status = str(latest.status.value if latest else "")
    if latest and status in ("PENDING", "RUNNING"):
        return Submitted(cfg.name, latest.submission_id, "skipped-running", latest.entrypoint)
    if latest and status == "SUCCEEDED" and not force:
        return Submitted(cfg.name, latest.submission_id, "skipped-finished", latest.entrypoint)
    if force and isinstance(cfg, TrainConfig):
        cfg = cfg.model_copy(update={"restart": True})
    cmd = entrypoint(cfg)
    sid = base if not tries else f"{base}-r{len(tries)}"
    _submit_with_retry(
        client,
        entrypoint=cmd,
        submission_id=sid,
        runtime_env={"working_dir": str(working_dir)},
        entrypoint_num_cpus=entrypoint_num_cpus,
        entrypoint_num_gpus=0,
        metadata={
            "ddm_kind": cfg.kind,
            "ddm_name": cfg.name,
            "ddm_config_hash": cfg.config_hash(),
        },
    )
    return Submitted(cfg.name, sid, "resubmitted" if tries else "submitted", cmd)


def _submit_with_retry(client, attempts: int = 30, **kwargs: Any) -> None:
    """A head that just started may answer before its job agent is up ("No available
    agent"): retry that for up to `attempts` seconds, nothing else."""
    quiet = ["ray", *[n for n in logging.root.manager.loggerDict if n.startswith("ray.")]]
    for name in quiet:  # packaging the working dir logs a line per ignored file
        logging.getLogger(name).setLevel(logging.ERROR)
    for attempt in range(attempts):
        try:
            client.submit_job(**kwargs)
            return
        except RuntimeError as e:
            if "No available agent" not in str(e) or attempt == attempts - 1:
                raise DDMError(f"the Ray job API refused {kwargs['submission_id']}: {e}") from e
            time.sleep(1)


def wait(
    address: str,
    ids: list[str],
    poll_s: float = 2.0,
    timeout_s: float | None = None,
    on_change=None,
    resubmit=None,
) -> dict[str, str]:
    """Poll until every job is terminal; returns {submission id: status}. `resubmit(sid)`:
    called as soon as a job ends FAILED; the id it returns (its `-rN`) is waited for in its
    place, None leaves the failure standing."""
    from ray.job_submission import JobSubmissionClient

    client = _client(address, JobSubmissionClient)
    ids = list(ids)
    states: dict[str, str] = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        for i, sid in enumerate(ids):
            status = str(client.get_job_status(sid).value)
            if states.get(sid) != status and on_change:
                on_change(sid, status)
            states[sid] = status
            again = resubmit(sid) if status == "FAILED" and resubmit else None
            if again is not None:
                ids[i] = again
                states[again] = "PENDING"
        states = {sid: states[sid] for sid in ids}
        if all(s in TERMINAL for s in states.values()):
            return states
        if deadline is not None and time.monotonic() > deadline:
            raise DDMError(f"jobs still running after {timeout_s:.0f} s: {states}")
        time.sleep(poll_s)


def retrying(address: str, jobs: list[Job], max_retries: int, on_retry=None):
    """A `wait(resubmit=...)` that submits a FAILED job again, up to `max_retries` times per
    job: `submit` names it `<id>-rN` and, not forced, it resumes from its latest checkpoint
    in the store (a job whose node was lost, say). `on_retry(old, new)` is told of each."""
    by_base = {submission_id(job): job for job in jobs}
    tries: dict[str, int] = {}

    def resubmit(sid: str) -> str | None:
        base = next((b for b in by_base if sid == b or sid.startswith(b + "-r")), None)
        if base is None or tries.get(base, 0) >= max_retries:
            return None
        tries[base] = tries.get(base, 0) + 1
        (again,) = submit(address, [by_base[base]])
        if on_retry:
            on_retry(sid, again.submission_id)
        return again.submission_id

    return resubmit


def list_jobs(address: str) -> list[dict[str, Any]]:
    from ray.job_submission import JobSubmissionClient

    client = _client(address, JobSubmissionClient)
    rows = []
    for j in client.list_jobs():
        if not (j.submission_id or "").startswith("ddm-"):
            continue
        rows.append(
            {
                "submission_id": j.submission_id,
                "status": str(j.status.value),
                "start_time": j.start_time,
                "end_time": j.end_time,
                "entrypoint": j.entrypoint,
            }
        )
    return sorted(rows, key=lambda r: r["start_time"] or 0)


def logs(address: str, sid: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return _client(address, JobSubmissionClient).get_job_logs(sid)


def _client(address: str, cls):
    try:
        return cls(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise DDMError(
            f"cannot reach the Ray job API at {address}: start one with `ddm cluster up` or "
            f"pass --address ({e.__class__.__name__})"
        ) from e
