"""`ddm demo` (what `make demo` runs): the whole mission on the embedded default.

A local Ray head on loopback; fashion-mnist prepared into K clusters in a local store; one
Ray job per expert plus the router and the feature network (`ddm submit`); a quick
`ddm analyze` as a Ray job; the Serve app (`ddm serve`) answering HTTP sampling requests
for top-2 and full; the local Prometheus (`ddm stack up`) scraping the head. Everything
lives under `--out` (the head's and the stack's state folders too, so a head or stack of
the user's own is never touched), runs on free loopback ports, and is stopped in reverse
order on success, failure or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from ddm_nodes.errors import DDMError
from ddm_nodes.presets import DEFAULT_EXPERT_PRESET

STRATEGIES = ("top-2", "full")


class DemoConfig(BaseModel):
    """`ddm demo`'s settings; its options are generated from these fields."""

    model_config = ConfigDict(extra="forbid")

    out: str = Field("demo-out", description="folder for everything the demo writes")
    dataset: str = Field("fashion-mnist", description="data set to prepare")
    clusters: int = Field(4, ge=2, le=16, description="K: clusters, one expert each")
    preset: str = Field(DEFAULT_EXPERT_PRESET, description="the experts' preset")
    # Few steps at a high rate with a short warm-up: the job defaults are made for long
    # runs (bench/schedules.py measures the choice through Ray jobs; docs/results/).
    expert_steps: int = Field(50, ge=1, description="optimizer steps per expert")
    expert_lr: float = Field(2e-3, gt=0, le=1, description="the experts' learning rate")
    warmup_steps: int = Field(10, ge=0, description="every demo job's learning-rate warm-up")
    router_steps: int = Field(200, ge=1, description="the router's and the featnet's steps")
    batch_size: int = Field(64, ge=1, description="every demo job's batch size")
    n: int = Field(16, ge=1, le=64, description="images per HTTP sampling request")
    sample_steps: int = Field(20, ge=1, le=200, description="Euler steps per request")
    image_size: int | None = Field(None, ge=4, description="resize images (smaller: faster)")
    keep: bool = Field(False, description="leave everything running until Ctrl-C")

    def expert_options(self) -> dict[str, Any]:
        """The TrainConfig fields of every demo expert job."""
        return dict(self._job(self.expert_steps), preset=self.preset, lr=self.expert_lr)

    def classifier_options(self) -> dict[str, Any]:
        """The TrainConfig fields of the demo's router and featnet jobs."""
        return self._job(self.router_steps)

    def _job(self, steps: int) -> dict[str, Any]:
        """A short job: one checkpoint, at its end."""
        return dict(
            steps=steps,
            checkpoint_every=steps,
            batch_size=self.batch_size,
            warmup_steps=self.warmup_steps,
        )


class _Progress:
    def __init__(self, total: int):
        self.start = time.monotonic()
        self.total = total
        self.done = 0

    def step(self, what: str) -> None:
        self.done += 1
        self.say(f"[{self.done}/{self.total}] {what}")

    def say(self, line: str) -> None:
        elapsed = time.monotonic() - self.start
        print(f"[demo {int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] {line}", flush=True)


def _ddm() -> str:
    exe = Path(sys.executable).with_name("ddm")
    return str(exe) if exe.exists() else "ddm"


def run_demo(cfg: DemoConfig) -> dict[str, str]:
    """Run the demo; returns the paths and URLs it printed. Stops all it started."""
    from cluster_jobs import submit as jobs
    from cluster_jobs.analysis.config import AnalyzeConfig
    from cluster_jobs.analysis.sampling import run_remote_sample, sample_request
    from cluster_jobs.data.prepare import PrepareConfig, prepare
    from cluster_jobs.ops import local_cluster, stack
    from ddm_nodes.pixels import grid_png
    from ddm_nodes.store import write_atomic

    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The demo's own head and stack: `ddm cluster down` / `ddm stack down` elsewhere
    # never stop them, and they never stop the user's.
    os.environ["DDM_CLUSTER_DIR"] = str(out / "cluster")
    os.environ["DDM_STACK_DIR"] = str(out / "stack")
    progress = _Progress(total=7)
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up like Ctrl-C

    with ExitStack() as cleanup:
        progress.step("starting a local Ray head on 127.0.0.1")
        head = local_cluster.up(
            num_cpus=os.cpu_count() or 2,
            port=local_cluster.free_port(),
            dashboard_port=local_cluster.free_port(),
            metrics_export_port=local_cluster.free_port(),
        )
        cleanup.callback(_stopping, progress, "Ray head", local_cluster.down)
        local_cluster.use_local_cluster_auth()
        progress.say(f"Ray dashboard (job API) {head.dashboard_url}")

        progress.step("starting Prometheus (`ddm stack up`) on the head's metrics port")
        prom = stack.up(
            port=local_cluster.free_port(), metrics_export_port=head.metrics_export_port
        )
        cleanup.callback(_stopping, progress, "Prometheus", stack.down)
        progress.say(f"Prometheus at {prom.url} (training and serving metrics)")

        progress.step(f"preparing {cfg.dataset} into {cfg.clusters} clusters")
        store = str(out / "store")
        prepared = prepare(
            PrepareConfig(
                store=store,
                dataset=cfg.dataset,
                clusters=cfg.clusters,
                image_size=cfg.image_size,
                overwrite=True,
            )
        )
        m = prepared.manifest
        progress.say(f"{m.count} images, {m.num_clusters} clusters at {store}")

        progress.step(
            f"training {cfg.clusters} experts ({cfg.preset}, {cfg.expert_steps} steps), the "
            f"router and the feature network ({cfg.router_steps} steps) as Ray jobs"
        )
        configs = jobs.plan(store, "all", cfg.expert_options())
        configs += jobs.plan(store, "none", cfg.classifier_options(), router=True, featnet=True)
        _run_jobs(jobs, head.dashboard_url, configs, progress)

        # The analysis runs while Serve starts and answers: Serve's start-up mostly waits
        # on its controller and replicas, and the analysis uses that CPU.
        progress.step("quick analysis (`ddm analyze --quick`) as a Ray job, in the background")
        analysis = out / "analysis"
        quick = AnalyzeConfig(
            store=store, out=str(analysis), quick=True, strategies=["full", "top-1", "top-2"]
        )
        analyze_job = jobs.submit(head.dashboard_url, [jobs.AnalyzeJob(quick)])

        progress.step("starting the Serve app (`ddm serve`)")
        url = _serve(store, local_cluster.free_port(), out / "serve.log", cleanup, progress)

        progress.step(f"HTTP sampling requests: {', '.join(STRATEGIES)}")
        written = {}
        for strategy in STRATEGIES:
            request = sample_request(strategy, cfg.n, cfg.sample_steps, seed=0)
            run = run_remote_sample(url, request)
            path = out / f"samples-{strategy}.png"
            write_atomic(path, grid_png(run.images))
            written[f"samples-{strategy}"] = str(path)
            progress.say(
                f"{strategy}: {cfg.n} images in {run.seconds:.1f} s (beside the analysis), "
                f"{run.experts_per_step:.2f} experts per step -> {path}"
            )

        progress.say("waiting for the quick analysis")
        _wait_jobs(jobs, head.dashboard_url, analyze_job, progress)
        progress.say(f"report: {analysis / 'report.md'}")

        requests_seen = _wait_for_series(prom.url, "ray_ddm_serve_requests_total")
        progress.say(
            f"Prometheus {prom.url} scrapes Ray's metrics at "
            f"http://127.0.0.1:{head.metrics_export_port}/metrics and has seen "
            f"{requests_seen:g} sampling requests; e.g. "
            f"{prom.url}/graph?g0.expr=ray_ddm_serve_requests_total"
        )
        result = {
            **written,
            "report": str(analysis / "report.md"),
            "serve_url": url,
            "prometheus_url": prom.url,
            "ray_metrics_url": f"http://127.0.0.1:{head.metrics_export_port}/metrics",
            "ray_dashboard_url": head.dashboard_url,
        }
        write_atomic(out / "endpoints.json", json.dumps(result, indent=2).encode())
        if cfg.keep:
            progress.say("everything is running; Ctrl-C stops it all")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        progress.say("done; stopping everything the demo started")
    progress.say(f"finished in {time.monotonic() - progress.start:.0f} s")
    return result


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stopping(progress: _Progress, what: str, stop) -> None:
    progress.say(f"stopping {what}")
    stop()


def _run_jobs(jobs, address: str, configs: list, progress: _Progress) -> None:
    """In waves of one job per CPU: a pending job's driver and Ray Train controller take
    CPU while they wait, so more jobs at once only contend (docs/decisions.md)."""
    wave = max(1, os.cpu_count() or 1)
    for i in range(0, len(configs), wave):
        _wait_jobs(jobs, address, jobs.submit(address, configs[i : i + wave]), progress)


def _wait_jobs(jobs, address: str, submitted: list, progress: _Progress) -> None:
    states = jobs.wait(
        address,
        [s.submission_id for s in submitted],
        poll_s=2.0,
        on_change=lambda sid, st: progress.say(f"  {st:9s} {sid}"),
    )
    failed = [sid for sid, st in states.items() if st != "SUCCEEDED"]
    if failed:
        tail = jobs.logs(address, failed[0]).strip().splitlines()[-5:]
        raise DDMError(
            f"{len(failed)} Ray job(s) did not succeed ({', '.join(failed)}); the last lines "
            f"of {failed[0]}: {' | '.join(tail)}"
        )


def _serve(store: str, port: int, log_path: Path, cleanup: ExitStack, progress: _Progress) -> str:
    """`ddm serve` as a child process (what a user runs), stopped with SIGTERM."""
    url = f"http://127.0.0.1:{port}"
    log = open(log_path, "w")
    cleanup.callback(log.close)
    proc = subprocess.Popen(
        [_ddm(), "serve", "--store", store, "--port", str(port), "--no-access-log"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches the demo, which stops it in order
    )
    cleanup.callback(_stop_serve, proc, progress)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DDMError(f"`ddm serve` exited with code {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"{url}/v1/experts", timeout=5).status_code == 200:
                progress.say(f"serving at {url} (log {log_path})")
                return url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise DDMError(f"`ddm serve` did not answer at {url} within 300 s; see {log_path}")


def _stop_serve(proc: subprocess.Popen, progress: _Progress) -> None:
    if proc.poll() is not None:
        return
    progress.say("stopping the Serve app")
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_for_series(prom_url: str, expr: str, timeout_s: float = 60) -> float:
    """The summed value of `expr` once Prometheus has scraped it (0 after the timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            reply = httpx.get(f"{prom_url}/api/v1/query", params={"query": f"sum({expr})"})
            result = reply.json()["data"]["result"]
            if result:
                return float(result[0]["value"][1])
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(1)
    return 0.0
