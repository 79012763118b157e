"""Does `ddm prepare` stay in bounded memory as the data grows? Generates a WebDataset of N
RGB 64x64 `shapes` images (PNG + class) on a moto S3 server on loopback, then runs `ddm
prepare --engine E` (a subprocess, as a user runs it) on the first N/4 and on all N images,
for each engine. Prints JSON: images/s per phase (from the command's own `seconds`), the peak
RSS of every process (sampled with psutil: the command and its descendants and, for `ray`,
the Ray head that `ddm cluster up` started for the run and everything under it), and how much
the driver's and the biggest worker's peaks grow from N/4 to N (the answer should be ~1x).

moto holds every object in its own memory; its RSS is reported apart, it is not ours.
`--features pca` (the command's default) fits PCA on the fitting sample (256 images per
cluster), whatever N is.

    python bench/prepare_scale.py [--n 200000] [--engines local,ray] [--clusters 8]
        [--features pca] [--keep] [--out FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from cluster_jobs.ops import s3_server
from cluster_jobs.ops.s3_server import free_port

ENGINES = ("local", "ray")
IMAGE_SIZE = 64
MAX_INPUT_SHARD = 5000  # images per input tar: bounds what the generator holds at once
SAMPLE_EVERY_S = 0.2
MIB = 1024 * 1024
S3_KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
AWS_CREDENTIAL_VARS = (  # dropped from the environment: nothing may reach a real account
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
)
WORKER_ROLES = ("pool worker", "ray worker")
DDM = Path(sys.executable).with_name("ddm")  # the console script, as conftest's run_ddm


def log(message: str) -> None:
    print(f"[prepare_scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the S3 server and the input data ---------------------------------------------------


@contextmanager
def moto_server(logs: Path) -> Iterator[tuple[psutil.Process, dict[str, str]]]:
    """moto's S3 server on a free loopback port; yields it and the environment (test keys,
    no profile, no instance metadata) every subprocess gets, so nothing leaves loopback."""
    with s3_server.moto_server(logs / "moto.log") as (proc, endpoint):
        env = {k: v for k, v in os.environ.items() if k not in AWS_CREDENTIAL_VARS}
        env |= S3_KEYS | {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        yield psutil.Process(proc.pid), env


def s3_client(env: dict[str, str]):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def input_shard_size(n: int) -> int:
    """Images per input tar: at most MAX_INPUT_SHARD, and N/4 a whole number of tars so the
    small run reads exactly the first quarter of them."""
    if n < 4 or n % 4:
        raise ValueError(f"--n {n}: N must be a positive multiple of 4 (the small run is N/4)")
    quarter = n // 4
    per_quarter = math.ceil(quarter / MAX_INPUT_SHARD)
    if quarter % per_quarter:
        size = per_quarter * MAX_INPUT_SHARD * 4
        raise ValueError(
            f"--n {n}: N/4 = {quarter} does not split into {per_quarter} equal tars of at most "
            f"{MAX_INPUT_SHARD}; try --n {size}"
        )
    return quarter // per_quarter


def shard_pattern(bucket: str, shards: int) -> str:
    """Brace notation for the first `shards` input tars, as `ddm prepare --dataset wds:`."""
    return f"s3://{bucket}/input/shard-{{{0:06d}..{shards - 1:06d}}}.tar"


def tar_bytes(samples: list[dict[str, bytes | str]]) -> bytes:
    import webdataset as wds

    buf = io.BytesIO()
    # ustar with an integer mtime, as the store's own shards (shards.py `_put_shard`).
    with wds.TarWriter(
        buf, encoder=False, mtime=0, user="ddm", group="ddm", format=tarfile.USTAR_FORMAT
    ) as sink:
        for sample in samples:
            sink.write(sample)
    return buf.getvalue()


def generate(client, bucket: str, n: int, shard_size: int) -> dict:
    """Render, encode and upload one tar at a time (each with its own seed), so the generator
    holds one shard, never the data set."""
    from cluster_jobs.data.shapes import shapes
    from ddm_nodes.pixels import png_bytes

    start = time.perf_counter()
    total_bytes = 0
    shards = n // shard_size
    for i in range(shards):
        chunk = shapes(shard_size, IMAGE_SIZE, seed=1000 + i)
        samples = [
            {
                "__key__": f"{i:06d}-{j:05d}",
                "png": png_bytes(image, compress_level=1),
                "cls": str(int(label)).encode(),
            }
            for j, (image, label) in enumerate(zip(chunk.images, chunk.labels, strict=True))
        ]
        data = tar_bytes(samples)
        client.put_object(Bucket=bucket, Key=f"input/shard-{i:06d}.tar", Body=data)
        total_bytes += len(data)
        if (i + 1) % max(1, shards // 10) == 0 or i + 1 == shards:
            log(f"generated {(i + 1) * shard_size}/{n} images")
    seconds = time.perf_counter() - start
    return {
        "images": n,
        "shards": shards,
        "images_per_shard": shard_size,
        "mib": round(total_bytes / MIB, 1),
        "seconds": round(seconds, 1),
        "images_per_s": round(n / seconds, 1),
    }


def delete_prefix(client, bucket: str, prefix: str) -> None:
    """Drop a run's output: moto keeps objects in memory and the next run should not pay."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


# --- peak RSS of process trees ------------------------------------------------------------

RAY_SYSTEM = {  # a substring of the command line -> the label it gets
    "raylet": "raylet",
    "gcs_server": "gcs_server",
    "dashboard/agent.py": "dashboard agent",
    "runtime_env/agent": "runtime env agent",
    "dashboard/dashboard.py": "dashboard",
    "log_monitor.py": "log monitor",
    "autoscaler/_private/monitor.py": "autoscaler monitor",
    "ray.util.client.server": "ray client server",
    "ray start": "ray start",
    "scripts.py start": "ray start",
}
# Ray's own actors also retitle themselves `ray::<class>`: they are not the job's workers.
RAY_SYSTEM_ACTORS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def classify(proc: psutil.Process, tree: str, driver: int | None) -> tuple[str, str]:
    """(role, short label) of one process of `tree` ("prepare" or "ray head" or "moto"),
    from its command line: Ray workers retitle themselves `ray::<task>`, the dashboard's
    modules `ray-dashboard-<module>`; everything else keeps the command it was started with."""
    cmd = proc.cmdline()
    line = " ".join(cmd)
    title = cmd[0] if cmd else proc.name()
    if tree == "moto":
        return "moto", "moto S3 server"
    if proc.pid == driver:
        return "driver", "prepare"
    if title.startswith("ray::"):
        return ("ray system" if title in RAY_SYSTEM_ACTORS else "ray worker"), title[:60]
    if "default_worker.py" in line:
        return "ray worker", "ray worker (starting)"
    if title.startswith("ray-dashboard-"):
        return "ray system", title[:60]
    for needle, label in RAY_SYSTEM.items():
        if needle in line:
            return "ray system", label
    if tree == "prepare":
        return "pool worker", "pool worker"  # the driver's process pool (fork or spawn)
    script = next((Path(a).name for a in cmd[1:] if a.endswith(".py")), "")
    return "ray system", f"{Path(title).name} {script}".strip()


@dataclass
class Peak:
    pid: int
    role: str
    label: str
    rss: int = 0
    titles: set[str] = field(default_factory=set)


class RssSampler:
    """Every SAMPLE_EVERY_S, the RSS of each root's whole tree (children come and go); keeps
    each process's peak and the peak of the sum of ours (everything but moto)."""

    def __init__(self, roots: Callable[[], list[tuple[int, str]]], driver: int | None = None):
        self._roots = roots  # re-read: a root may appear only after sampling starts
        self.driver = driver
        self.peaks: dict[int, Peak] = {}
        self.peak_ours = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_EVERY_S)

    def sample(self) -> None:
        ours = 0
        seen: set[int] = set()
        for root, tree in self._roots():
            try:
                top = psutil.Process(root)
                members = [top, *top.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for proc in members:
                if proc.pid in seen:
                    continue
                seen.add(proc.pid)
                try:
                    with proc.oneshot():
                        rss = proc.memory_info().rss
                        role, label = classify(proc, tree, self.driver)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                peak = self.peaks.setdefault(proc.pid, Peak(proc.pid, role, label))
                if label != "ray::IDLE":  # a worker's most telling title is its task
                    peak.label = label
                peak.titles.add(label)
                peak.rss = max(peak.rss, rss)
                if role != "moto":
                    ours += rss
        self.peak_ours = max(self.peak_ours, ours)
        self.samples += 1

    def report(self) -> dict:
        """Ours by process and by role; moto (holding the objects) only as one figure."""
        rows = sorted(self.peaks.values(), key=lambda p: -p.rss)
        moto = max((p.rss for p in rows if p.role == "moto"), default=0)
        rows = [p for p in rows if p.role != "moto"]
        by_role: dict[str, dict] = {}
        for p in rows:
            role = by_role.setdefault(p.role, {"processes": 0, "max_peak_mib": 0.0})
            role["processes"] += 1
            role["max_peak_mib"] = max(role["max_peak_mib"], mib(p.rss))
        return {
            "samples": self.samples,
            "peak_sum_of_ours_mib": mib(self.peak_ours),
            "moto_peak_rss_mib": mib(moto),
            "by_role": by_role,
            "processes": [
                {"pid": p.pid, "role": p.role, "label": p.label, "peak_rss_mib": mib(p.rss)}
                | ({"titles": sorted(p.titles)} if len(p.titles) > 1 else {})
                for p in rows
            ],
        }


def mib(n: int) -> float:
    return round(n / MIB, 1)


# --- one `ddm prepare` run ------------------------------------------------------------------


def prepare_command(
    pattern: str, store: str, engine: str, clusters: int, features: str
) -> list[str]:
    """The one place the command line is built: what a user would type."""
    return [
        str(DDM), "prepare",
        "--dataset", f"wds:{pattern}",
        "--store", store,
        "--clusters", str(clusters),
        "--features", features,
        "--engine", engine,
        "--seed", "0",
        "--json",
    ]  # fmt: skip


@contextmanager
def ray_cluster(env: dict[str, str], workdir: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """A fresh head for one run (`ddm cluster up` on free ports, its state in `workdir`), so
    no worker carries memory over from the previous run; yields the head's PID and the
    client environment `ddm cluster env` prints. The head inherits the S3 environment:
    Ray's workers read the store too."""
    env = env | {"DDM_CLUSTER_DIR": str(workdir / "cluster")}
    ports = ["--port", str(free_port()), "--dashboard-port", str(free_port())]
    ports += ["--metrics-export-port", str(free_port())]
    up = subprocess.run(
        [str(DDM), "cluster", "up", "--num-cpus", "2", *ports],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    try:
        if up.returncode:
            raise RuntimeError(f"ddm cluster up failed: {up.stderr[-2000:]}")
        info = json.loads(up.stdout)
        lines = subprocess.run(
            [str(DDM), "cluster", "env"], capture_output=True, text=True, env=env, check=True
        ).stdout.splitlines()
        client = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in lines)
        yield info["pid"], env | client
    finally:
        subprocess.run([str(DDM), "cluster", "down"], capture_output=True, env=env, timeout=300)


@dataclass(frozen=True)
class RunSpec:
    """One `ddm prepare` run: which engine, on how many images, from where to where."""

    engine: str
    n: int
    pattern: str
    store: str
    clusters: int
    features: str


def run_prepare(spec: RunSpec, env: dict[str, str], logs: Path, moto: psutil.Process) -> dict:
    """One `ddm prepare` subprocess with its RSS sampled; returns its phases and peaks."""
    engine, n = spec.engine, spec.n
    name = f"{engine}-{n}"
    out_path, err_path = logs / f"prepare-{name}.json", logs / f"prepare-{name}.log"
    with ray_cluster(env, logs / name) if engine == "ray" else _no_cluster(env) as (head, env):
        roots: list[tuple[int, str]] = [(moto.pid, "moto")]
        if head is not None:
            roots.append((head, "ray head"))
        sampler = RssSampler(lambda: roots)
        with open(out_path, "wb") as out, open(err_path, "wb") as err, sampler:
            start = time.perf_counter()
            proc = subprocess.Popen(
                prepare_command(spec.pattern, spec.store, engine, spec.clusters, spec.features),
                stdout=out,
                stderr=err,
                env=env,
            )
            sampler.driver = proc.pid
            roots.append((proc.pid, "prepare"))
            # wait4, not wait: the kernel's own peak for the driver and the children it reaped
            # (its pool), which a 0.2 s sampler can miss.
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            seconds = time.perf_counter() - start
    if proc.returncode:
        tail = err_path.read_text()[-3000:]
        raise RuntimeError(f"ddm prepare ({name}) exited {proc.returncode}: {tail}")
    summary = json.loads(out_path.read_text().strip().splitlines()[-1])
    images = summary["images"]
    phases = summary.get("seconds") or {}
    rss = sampler.report()
    return {
        "engine": engine,
        "n": n,
        "images": images,
        "shards_written": summary.get("shards"),
        "train_counts": summary.get("train_counts"),
        "wall_seconds": round(seconds, 1),
        "images_per_s": round(images / seconds, 1),
        "phase_seconds": phases,
        "phase_images_per_s": {
            phase: round(images / sec, 1) if sec > 0 else None for phase, sec in phases.items()
        },
        "driver_kernel_peak_rss_mib": mib(usage.ru_maxrss * 1024),  # ru_maxrss is in KiB
        "rss": rss,
    }


@contextmanager
def _no_cluster(env: dict[str, str]) -> Iterator[tuple[None, dict[str, str]]]:
    yield None, env


# --- growth --------------------------------------------------------------------------------


def role_peak(run: dict, *roles: str) -> float | None:
    """The biggest peak among a run's processes of these roles; None: it had none."""
    by_role = run["rss"]["by_role"]
    peaks = [by_role[r]["max_peak_mib"] for r in roles if r in by_role]
    return max(peaks) if peaks else None


def growth(small: dict, large: dict) -> dict:
    """Each peak at N/4 and at N: bounded memory means a ratio near 1, not near 4."""
    measures = {
        "driver_peak_mib": lambda r: role_peak(r, "driver"),
        "biggest_worker_peak_mib": lambda r: role_peak(r, *WORKER_ROLES),
        "ray_system_peak_mib": lambda r: role_peak(r, "ray system"),
        "peak_sum_of_ours_mib": lambda r: r["rss"]["peak_sum_of_ours_mib"],
    }
    out = {}
    for name, measure in measures.items():
        a, b = measure(small), measure(large)
        if a is None or b is None:
            continue
        out[name] = {
            f"n={small['n']}": a,
            f"n={large['n']}": b,
            "growth_mib": round(b - a, 1),
            "ratio": round(b / a, 3) if a else None,
        }
    return out


# --- main ----------------------------------------------------------------------------------


def parse_engines(text: str) -> list[str]:
    engines = [e.strip() for e in text.split(",") if e.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown or not engines:
        raise SystemExit(f"error: --engines {text!r}: expected a comma list of {ENGINES}")
    return engines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=200_000, help="images (the small run uses N/4)")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma list: local,ray")
    ap.add_argument("--clusters", type=int, default=8)
    ap.add_argument(
        "--features",
        default="pca",
        help="ddm prepare --features (pca: exact PCA of 12288 pixel dims, a fixed cost in N)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, outputs)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    engines = parse_engines(args.engines)
    try:
        shard_size = input_shard_size(args.n)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    sizes = [args.n // 4, args.n]
    # `kill PID` should still stop moto and the Ray head: turn SIGTERM into an exit that
    # runs the finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    workdir = Path(tempfile.mkdtemp(prefix="ddm-bench-scale-"))
    report: dict = {
        "benchmark": "prepare_scale",
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "parameters": {
            "n": args.n,
            "sizes": sizes,
            "engines": engines,
            "clusters": args.clusters,
            "features": args.features,
            "image_size": IMAGE_SIZE,
            "rss_sample_every_s": SAMPLE_EVERY_S,
        },
        "workdir": str(workdir) if args.keep else None,
    }
    try:
        with moto_server(workdir) as (moto, env):
            client = s3_client(env)
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            client.create_bucket(Bucket=bucket)
            log(f"generating {args.n} images in tars of {shard_size} on {bucket}")
            report["generation"] = generate(client, bucket, args.n, shard_size)
            specs = [
                RunSpec(
                    engine,
                    n,
                    shard_pattern(bucket, n // shard_size),
                    f"s3://{bucket}/out-{engine}-{n}",
                    args.clusters,
                    args.features,
                )
                for n in sizes  # N/4 first: growth() reads runs in this order
                for engine in engines
            ]
            runs = []
            for spec in specs:
                log(f"ddm prepare --engine {spec.engine} on {spec.n} images ({spec.pattern})")
                runs.append(run_prepare(spec, env, workdir, moto))
                log(f"  {runs[-1]['wall_seconds']} s, {runs[-1]['images_per_s']} images/s")
                delete_prefix(client, bucket, spec.store.split("/", 3)[3] + "/")
            report["runs"] = runs
            report["moto_peak_rss_mib"] = max(r["rss"]["moto_peak_rss_mib"] for r in runs)
            report["growth"] = {
                engine: growth(
                    *(r for r in runs if r["engine"] == engine)  # N/4 ran first
                )
                for engine in engines
            }
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
