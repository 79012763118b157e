"""The `ddm` command line. Each sub-command converts its options into a typed config and
calls one library function; a user-fixable problem prints one line and exits with code 2."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from cluster_jobs.analysis.command import COMMAND as ANALYZE
from cluster_jobs.ops.demo import DemoConfig
from cluster_jobs.options import ModelOptions, paragraphs, with_options
from cluster_jobs.training.commands import app as training_app
from cluster_jobs.training.commands import train_options
from cluster_jobs.training.config import preset_names
from cluster_jobs.user_errors import command_line, user_errors
from ddm_nodes.errors import DDMError
from ddm_nodes.names import expert_name
from ddm_nodes.presets import DEFAULT_ROUTER_LR, DEFAULT_ROUTER_PRESET

app = command_line("Decentralized Diffusion Models: experts trained apart, served together.")


@app.callback()
def _main() -> None:
    """Decentralized Diffusion Models: experts trained apart, served together."""


def command(on: typer.Typer, name: str | None = None, **settings: Any) -> Callable:
    """Register a function as a command of `on`: its docstring as help paragraphs, and a
    problem the user can fix as one `error:` line and exit 2."""

    def register(fn: Callable) -> Callable:
        on.command(name, help=paragraphs(fn.__doc__), **settings)(user_errors(fn))
        return fn

    return register


@command(app)
def prepare(
    store: Annotated[str, typer.Option(help="store URI: PATH, file:///PATH or s3://BUCKET/PREFIX")],
    dataset: Annotated[
        str,
        typer.Option(
            help="fashion-mnist | mnist-5k | digits | shapes | folder:PATH | wds:URL_PATTERN"
        ),
    ] = "fashion-mnist",
    count: Annotated[
        int | None,
        typer.Option(help="images: shapes generates N (default 4000); others: a seeded subset"),
    ] = None,
    clusters: Annotated[int, typer.Option(help="K: data clusters, one expert each")] = 8,
    features: Annotated[
        str,
        typer.Option(
            help="feature space for clustering: pca | pixels | dinov2:REF | clip:REF (REF: a "
            "save_pretrained folder or a hub id)"
        ),
    ] = "pca",
    feature_dims: Annotated[int, typer.Option(help="PCA dimensions")] = 64,
    metric: Annotated[
        Literal["euclidean", "cosine"] | None,
        typer.Option(
            help="k-means metric; cosine: L2-normalised features, spherical k-means "
            "(default: cosine for dinov2/clip, else euclidean)"
        ),
    ] = None,
    latents: Annotated[
        str | None,
        typer.Option(
            help="vae:REF: store the VAE latents the models train on (REF: a folder, a hub id, "
            "or 'store' for `ddm train vae`'s)"
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="where feature extractors and the VAE run")] = "cpu",
    batch_size: Annotated[int, typer.Option(help="images per feature / VAE batch")] = 64,
    shard_size: Annotated[int, typer.Option(help="samples per WebDataset shard")] = 2000,
    seed: Annotated[int, typer.Option(help="seeds PCA, k-means and the held-out split")] = 0,
    heldout: Annotated[float, typer.Option(help="held-out fraction, stratified by cluster")] = 0.1,
    image_size: Annotated[int | None, typer.Option(help="resize images to N x N")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace a dataset already in the store")] = False,
    engine: Annotated[
        Literal["local", "ray"],
        typer.Option(
            help="local: this process and a process pool; ray: Ray Data on the current Ray "
            "cluster (`ddm cluster up`, RAY_ADDRESS), else a local Ray"
        ),
    ] = "local",
    fit_sample: Annotated[
        int | None,
        typer.Option(
            help="images PCA and k-means are fitted on (default: 256 per cluster, at least "
            "4 per --feature-dims)"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Cluster a data set and write per-cluster WebDataset shards into a store, streaming:
    memory depends on batch, shard and fitting-sample sizes, not on the data set's."""
    from cluster_jobs.data.prepare import PrepareConfig
    from cluster_jobs.data.prepare import prepare as run_prepare

    cfg = PrepareConfig(
        dataset=dataset,
        count=count,
        clusters=clusters,
        store=store,
        features=features,
        feature_dims=feature_dims,
        metric=metric,
        latents=latents,
        device=device,
        batch_size=batch_size,
        shard_size=shard_size,
        seed=seed,
        heldout_fraction=heldout,
        image_size=image_size,
        overwrite=overwrite,
        engine=engine,
        fit_sample=fit_sample,
    )
    with _progress(disable=as_json or not sys.stderr.isatty()) as report:
        result = run_prepare(cfg, report)
    m = result.manifest
    summary = {
        "store": cfg.store,
        "source": m.source,
        "images": m.count,
        "image_shape": list(m.image_shape),
        "clusters": m.num_clusters,
        "train_counts": [c.count for c in m.train],
        "heldout_counts": [c.count for c in m.heldout],
        "largest_smallest_ratio": round(m.stats.largest_smallest_ratio, 3),
        "silhouette": None if m.stats.silhouette is None else round(m.stats.silhouette, 4),
        "features": m.features.model_dump(exclude={"sha256", "model"}),
        "latents": None
        if m.latents is None
        else {"vae": m.latents.vae.ref, "shape": list(m.latents.shape)},
        "shards": sum(len(c.shards) for c in m.train + m.heldout),
        "engine": cfg.engine,
        "parts": result.sizes["parts"],
        "write_nodes": result.sizes["write_nodes"],
        "seconds": result.seconds,
    }
    if as_json:
        print(json.dumps(summary))
    else:
        _print_cluster_table(summary)


app.add_typer(training_app(), name="train")


experts_app = typer.Typer(
    no_args_is_help=True, help="The DDM's experts, by stable id: list, add, remove."
)
app.add_typer(experts_app, name="experts")
StoreOption = Annotated[
    str, typer.Option(help="store URI: PATH, file:///PATH or s3://BUCKET/PREFIX")
]


@command(experts_app, "list")
def experts_list(
    store: StoreOption,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """The experts of the store's DDM: id, cluster, version, architecture, prediction type,
    centroid and provenance (a store without experts.json has one per cluster)."""
    from cluster_jobs.ops.experts import list_experts

    listing = list_experts(store)
    if as_json:
        print(json.dumps(listing))
        return
    print(f"{listing['store']} (registry: {listing['registry']}, sha256 {listing['sha256']})")
    for row in listing["experts"]:
        where = row["provenance"].get("uri", "trained here")
        version = row.get("sha256", row.get("error", ""))[:12]
        print(
            f"  {row['name']}  cluster {row['cluster']}  {row.get('arch', '?')}/"
            f"{row.get('prediction', '?')}  {version}  centroid: {row['centroid']}  {where}"
        )
    for row in listing["removed"]:
        print(f"  {row['name']}  removed {row['removed_at']}")


@command(experts_app, "add")
def experts_add(
    store: StoreOption,
    source: Annotated[
        str,
        typer.Option(
            "--from", help="a trained expert's folder: STORE/experts/expert-NNN (another store)"
        ),
    ],
    centroid_samples: Annotated[
        int, typer.Option(min=1, help="source training images its centroid is the mean of")
    ] = 2048,
) -> None:
    """Copy a trained expert (verified) into the DDM under the next unused id, with its
    data's centroid in this store's feature space; a running `ddm serve` picks it up."""
    from cluster_jobs.ops.experts import add_from

    card, used = add_from(store, source, centroid_samples)
    print(
        f"added {card.name} ({card.arch}/{card.prediction}, manifest {card.sha256[:12]}...) "
        f"from {source}; centroid from {used} of its training images"
    )
    _registry_changed(store)


def _registry_changed(store: str) -> None:
    from ddm_nodes.registry import registry_sha256
    from ddm_nodes.store import open_store

    print(
        f"registry sha256 {registry_sha256(open_store(store))}: a running `ddm serve` picks "
        "it up; with a Serve config, set args.registry to it and `serve deploy`"
    )


@command(experts_app, "remove")
def experts_remove(
    store: StoreOption,
    expert: Annotated[str, typer.Argument(help="expert-NNN or its id")],
) -> None:
    """Take an expert out of the DDM (its files stay, its id is never reused); a running
    `ddm serve` stops routing to it and retires its deployment once requests drain."""
    from cluster_jobs.ops.experts import remove

    entry = remove(store, expert)
    print(f"removed {entry.name} from the DDM (its checkpoint stays in the store)")
    _registry_changed(store)


cluster_app = typer.Typer(no_args_is_help=True, help="A local Ray head on loopback.")
app.add_typer(cluster_app, name="cluster")
Address = Annotated[
    str | None,
    typer.Option(help="Ray job API (dashboard) URL (default: from `ddm cluster up`, else :8265)"),
]


def _address(address: str | None) -> str:
    from cluster_jobs.ops.local_cluster import use_local_cluster_auth

    info = use_local_cluster_auth()
    return address or (info.dashboard_url if info else "http://127.0.0.1:8265")


@command(cluster_app, "up")
def cluster_up(
    num_cpus: Annotated[
        int | None, typer.Option(help="CPUs Ray may schedule (default: all)")
    ] = None,
    port: Annotated[int, typer.Option(help="GCS port")] = 6379,
    dashboard_port: Annotated[int, typer.Option(help="dashboard / job API port")] = 8265,
    metrics_export_port: Annotated[int, typer.Option(help="Prometheus export port")] = 8080,
    dashboard_agent_listen_port: Annotated[
        int | None, typer.Option(help="the job agent's HTTP port (default: a free one)")
    ] = None,
    nodes: Annotated[
        int,
        typer.Option(
            help="nodes: the head and N-1 worker nodes (separate raylets on loopback, each "
            "with --num-cpus CPUs and the resource ddm-node-<i>)"
        ),
    ] = 1,
) -> None:
    """Start a local Ray head (127.0.0.1, token auth), and with --nodes N worker nodes
    beside it; prints the addresses as JSON."""
    from cluster_jobs.ops.local_cluster import up

    info = up(
        num_cpus, port, dashboard_port, metrics_export_port,
        dashboard_agent_listen_port=dashboard_agent_listen_port, nodes=nodes,
    )  # fmt: skip
    print(info.model_dump_json())


@command(cluster_app, "down")
def cluster_down() -> None:
    """Stop the local Ray head (and worker nodes) that `ddm cluster up` started, by their
    recorded PIDs: a PID that no longer runs the `ray start` ddm launched is left alone."""
    from cluster_jobs.ops.local_cluster import down

    done = down()
    if done is None:
        print("no local cluster was running")
        return
    for note in done.notes:
        print(f"note: {note}", file=sys.stderr)
    print("stopped" if done.stopped else "nothing of it was running; forgot the cluster")


@command(cluster_app, "env")
def cluster_env() -> None:
    """Print the exports raw `ray` commands need (eval "$(ddm cluster env)")."""
    from cluster_jobs.ops.local_cluster import env_lines

    print("\n".join(env_lines()))


@command(cluster_app, "status")
def cluster_status() -> None:
    """Whether the local head answers, and its addresses, as JSON."""
    from cluster_jobs.ops.local_cluster import status

    print(json.dumps(status()))


stack_app = typer.Typer(
    no_args_is_help=True, help="The local observability stack: Prometheus on 127.0.0.1."
)
app.add_typer(stack_app, name="stack")


@command(stack_app, "up")
def stack_up(
    port: Annotated[int, typer.Option(help="Prometheus' port on 127.0.0.1")] = 9090,
    metrics_export_port: Annotated[
        int | None, typer.Option(help="Ray metrics port to scrape (default: from `ddm cluster up`)")
    ] = None,
) -> None:
    """Start Prometheus (Debian package) with infra/prometheus' config and alert rules,
    scraping the local Ray head; prints its address as JSON."""
    from cluster_jobs.ops import stack

    print(stack.up(port, metrics_export_port).model_dump_json())


@command(stack_app, "down")
def stack_down() -> None:
    """Stop the Prometheus that `ddm stack up` started (by its PID)."""
    from cluster_jobs.ops import stack

    print("stopped" if stack.down() else "no stack was running")


@command(stack_app, "status")
def stack_status() -> None:
    """Whether the stack's Prometheus runs, and its addresses, as JSON."""
    from cluster_jobs.ops import stack

    print(json.dumps(stack.status()))


SUBMIT_OPTIONS = train_options("expert", exclude=("store", "cluster", "restart"))
DEFAULT_MAX_RETRIES = 2  # a lost node costs one; a job failing on its own fails again


def submit(
    ctx: typer.Context,
    store: Annotated[str, typer.Option(help="store URI holding the prepared dataset")],
    address: Address = None,
    clusters: Annotated[str, typer.Option(help="all | none | ids like 0,2,5")] = "all",
    router: Annotated[bool, typer.Option(help="also train the router")] = False,
    monolith: Annotated[bool, typer.Option(help="also train the monolith")] = False,
    featnet: Annotated[bool, typer.Option(help="also train the analysis' featnet")] = False,
    router_preset: Annotated[
        Literal[tuple(preset_names("router"))] | None,
        typer.Option(
            help=f"the router's and the featnet's preset (default: {DEFAULT_ROUTER_PRESET})"
        ),
    ] = None,
    router_lr: Annotated[
        float | None,
        typer.Option(
            help=f"the router's and the featnet's learning rate (default: {DEFAULT_ROUTER_LR})"
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="retrain finished jobs from scratch")] = False,
    wait: Annotated[bool, typer.Option(help="wait until every job has finished")] = False,
    max_retries: Annotated[
        int | None,
        typer.Option(
            help="with --wait: submit a job that FAILED again as <id>-rN, resuming from its "
            f"checkpoint, up to this many times (default: {DEFAULT_MAX_RETRIES})"
        ),
    ] = None,
    analyze: Annotated[
        bool, typer.Option(help="submit `ddm analyze` with the arguments after `--` instead")
    ] = False,
    emit: Annotated[
        str | None, typer.Option(help="kuberay: write RayJob manifests to --out, submit nothing")
    ] = None,
    out: Annotated[str | None, typer.Option(help="folder for --emit's manifests")] = None,
    image: Annotated[
        str | None, typer.Option(help="container image for --emit kuberay (default: ddm:VERSION)")
    ] = None,
    gpu_image: Annotated[
        str | None,
        typer.Option(
            help="the GPU workers' image for --emit kuberay (default: --image's -gpu tag)"
        ),
    ] = None,
    **training: Any,
) -> None:
    """Submit one Ray job per expert (and the router / monolith / featnet), or, with
    `--analyze -- ARGS`, the analysis of a trained store as one Ray job.

    Every training option (`--steps`, `--warmup-steps`, ...) is a field of the jobs'
    TrainConfig, which each job receives whole; the router and the featnet take
    `--router-preset` and `--router-lr` instead of `--preset` and `--lr`."""
    from cluster_jobs import submit as jobs
    from ddm_nodes.store import open_store

    url = _address(address)
    # Jobs run in a copy of the project: a relative store path must not resolve there.
    store = open_store(store).uri
    if ctx.args and not analyze:
        raise DDMError(f"unexpected arguments {' '.join(ctx.args)}: only --analyze takes `-- ARGS`")
    if max_retries is not None and (max_retries < 0 or not wait):
        fix = "give 0 or more" if max_retries < 0 else "it applies to --wait only; add --wait"
        raise DDMError(f"--max-retries {max_retries}: {fix}")
    if emit not in (None, "kuberay"):
        raise DDMError(f"--emit {emit!r}: the one target is kuberay")
    if emit and not out:
        raise DDMError("--emit kuberay needs --out DIR for the manifests")
    if analyze:
        from cluster_jobs.analysis.command import job_config

        if router or monolith or featnet:
            raise DDMError("--analyze needs finished models: submit training separately")
        to_submit = [jobs.AnalyzeJob(job_config(store, ctx.args))]
    else:
        classifier = {"preset": router_preset, "lr": router_lr}
        to_submit = jobs.plan(
            store,
            clusters,
            SUBMIT_OPTIONS.values(training),
            router=router,
            monolith=monolith,
            featnet=featnet,
            classifier_options={k: v for k, v in classifier.items() if v is not None},
        )
    if emit:
        from cluster_jobs.kuberay import DEFAULT_IMAGE, render_rayjobs

        for path in render_rayjobs(to_submit, out, image or DEFAULT_IMAGE, gpu_image):
            print(f"wrote {path}")
        return
    done = jobs.submit(url, to_submit, force=force)
    for s in done:
        print(f"{s.action:17s} {s.submission_id}")
    if wait:
        ids = [s.submission_id for s in done]
        retries = DEFAULT_MAX_RETRIES if max_retries is None else max_retries
        resubmit = jobs.retrying(
            url,
            to_submit,
            retries,
            on_retry=lambda old, new: print(f"{'resubmitted':17s} {new} (after {old})", flush=True),
        )
        states = jobs.wait(
            url,
            ids,
            on_change=lambda sid, st: print(f"{st:9s} {sid}", flush=True),
            resubmit=resubmit,
        )
        failed = [sid for sid, st in states.items() if st != "SUCCEEDED"]
        if failed:
            print(
                f"error: {len(failed)} job(s) did not succeed: {', '.join(failed)}; "
                f"see `ray job logs <id>`",
                file=sys.stderr,
            )
            raise typer.Exit(1)


command(app, context_settings={"allow_extra_args": True})(with_options(submit, SUBMIT_OPTIONS))


@command(app)
def jobs(
    address: Address = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List ddm's Ray jobs and their states."""
    from cluster_jobs.submit import list_jobs

    rows = list_jobs(_address(address))
    if as_json:
        print(json.dumps(rows))
        return
    for r in rows:
        print(f"{r['status']:10s} {r['submission_id']}")


@command(app, "sample")
def sample_command(
    out: Annotated[str, typer.Option(help="PNG image grid to write")],
    store: Annotated[
        str | None, typer.Option(help="store URI with trained experts: sample in-process")
    ] = None,
    url: Annotated[
        str | None, typer.Option(help="a running `ddm serve`, e.g. http://127.0.0.1:8000")
    ] = None,
    strategy: Annotated[
        str, typer.Option(help="full | uniform | top-K | threshold-T | nearest-centroid[-K]")
    ] = "top-2",
    n: Annotated[int, typer.Option(help="images to sample")] = 64,
    steps: Annotated[int, typer.Option(help="ODE steps from noise to data")] = 50,
    solver: Annotated[str, typer.Option(help="euler | heun")] = "euler",
    seed: Annotated[int, typer.Option(help="seed of the initial noise")] = 0,
    label: Annotated[str | None, typer.Option(help="class name or id (conditional)")] = None,
    guidance: Annotated[float, typer.Option(help="classifier-free guidance scale")] = 1.0,
    npy: Annotated[str | None, typer.Option(help="also write the raw (N,C,H,W) array")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda (in-process)")] = "cpu",
    api_key: Annotated[
        str | None, typer.Option(envvar="DDM_API_KEY", help="bearer key of the service (--url)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Sample images with per-step routing, in-process (--store) or from a running service
    (--url); the same request either way. Prints how often each expert ran."""
    from cluster_jobs.analysis.sampling import run_remote_sample, run_sample, sample_request
    from ddm_nodes.pixels import grid_png, npy_bytes
    from ddm_nodes.store import write_atomic

    if (store is None) == (url is None):
        raise DDMError("give exactly one of --store (in-process) and --url (a running service)")
    if url is not None:
        request = sample_request(strategy, n, steps, solver, seed, label, guidance)
        run = run_remote_sample(url, request, api_key)
    else:
        from router_service.local_experts import LocalExperts

        experts = LocalExperts(store, device=device)
        options = dict(solver=solver, seed=seed, label=label, guidance=guidance)
        run = run_sample(experts, strategy, n, steps, **options)
    write_atomic(out, grid_png(run.images), hint="check --out")
    if npy:
        write_atomic(npy, npy_bytes(run.images), hint="check --npy")
    summary = {
        "out": out,
        "npy": npy,
        "backend": url or "in-process",
        "strategy": strategy,
        "n": n,
        "steps": steps,
        "solver": solver,
        "seed": seed,
        "expert_calls": run.expert_calls,
        "experts_per_step": round(run.experts_per_step, 3),
        "seconds": round(run.seconds, 2),
        "degraded": run.degraded,
        "missing_experts": run.missing_experts,
    }
    if as_json:
        print(json.dumps(summary))
        return
    calls = "  ".join(f"{expert_name(k)}: {c}" for k, c in enumerate(run.expert_calls))
    print(
        f"{strategy}: {n} images, {steps} {solver} steps in {run.seconds:.1f} s; "
        f"{run.experts_per_step:.2f} experts per sample per step\ncalls  {calls}\nwrote {out}"
        + (f" and {npy}" if npy else "")
    )


@command(app, "serve")
def serve_command(
    store: Annotated[str, typer.Option(help="store URI with trained experts (and router)")],
    host: Annotated[
        str,
        typer.Option(
            help="address the HTTP proxy binds; beyond loopback it needs --api-key, and "
            "clients' Host names beyond it go in --config's allowed_hosts"
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    app_name: Annotated[
        str | None,
        typer.Option(
            help="the Serve application's name (default: ddm); another `ddm serve` on the "
            "same cluster needs another"
        ),
    ] = None,
    route_prefix: Annotated[
        str,
        typer.Option(help="the path the application answers under (one per application)"),
    ] = "/",
    replicas: Annotated[
        int | None, typer.Option(help="replicas per expert deployment (default: 1)")
    ] = None,
    strategy: Annotated[
        str | None, typer.Option(help="default routing strategy (default: top-2)")
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(help="most samples per expert forward (default: 64)")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="DDM_API_KEY", help="require this bearer key on /v1/*")
    ] = None,
    device: Annotated[
        Literal["cpu", "cuda"] | None, typer.Option(help="where experts run (default: cpu)")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(help="JSON file of app arguments (AppArgs fields); options given override"),
    ] = None,
    access_log: Annotated[bool, typer.Option(help="Serve's per-request access log")] = True,
) -> None:
    """Serve the DDM over HTTP with Ray Serve: a router ingress and one deployment per
    expert; runs in the foreground until Ctrl-C, which deletes this application only.

    Every application argument
    (`router_service.app_config.AppArgs`) can be set in `--config`; the options here
    override the file's values when given."""
    from cluster_jobs.ops.serving import serve_forever
    from router_service.app_config import AppArgs

    extra = {}
    if config is not None:
        try:
            extra = json.loads(Path(config).read_text())
        except (OSError, ValueError) as e:
            raise DDMError(f"--config {config}: {e}") from None
        if not isinstance(extra, dict):
            raise DDMError(f"--config {config}: expected a JSON object of AppArgs fields")
    given = dict(
        store=store,
        replicas=replicas,
        default_strategy=strategy,
        max_batch=max_batch,
        api_key=api_key,
        device=device,
    )
    args = AppArgs.model_validate({**extra, **{k: v for k, v in given.items() if v is not None}})
    serve_forever(
        args, host, port, access_log=access_log, app_name=app_name, route_prefix=route_prefix
    )


app.command("analyze", help=ANALYZE.__doc__)(ANALYZE)
DEMO_OPTIONS = ModelOptions(DemoConfig, choices={"preset": preset_names("expert")})


def demo(**fields: Any) -> None:
    """The whole mission on the embedded default: a local Ray head, K experts + router as
    Ray jobs, a quick analysis, the Serve app answering HTTP, Prometheus; then stops it all."""
    from cluster_jobs.ops.demo import run_demo

    try:
        result = run_demo(DEMO_OPTIONS.build(None, fields))
    except KeyboardInterrupt:
        print("interrupted; everything the demo started was stopped", file=sys.stderr)
        raise typer.Exit(130) from None
    print(json.dumps(result, indent=2))


command(app)(with_options(demo, DEMO_OPTIONS))


def _print_cluster_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary['source']} -> {summary['clusters']} clusters")
    for col in ("cluster", "train", "held-out", "share"):
        table.add_column(col, justify="right")
    for k, (tr, ho) in enumerate(
        zip(summary["train_counts"], summary["heldout_counts"], strict=True)
    ):
        table.add_row(str(k), str(tr), str(ho), f"{(tr + ho) / summary['images']:.1%}")
    console = Console()
    console.print(table)
    sil = summary["silhouette"]
    console.print(
        f"images {summary['images']} {tuple(summary['image_shape'])}  "
        f"largest/smallest {summary['largest_smallest_ratio']:.2f}  "
        f"silhouette {'n/a' if sil is None else f'{sil:.3f}'}  "
        f"features {summary['features']['method']}-{summary['features']['dims']}  "
        + (f"latents {tuple(summary['latents']['shape'])}  " if summary.get("latents") else "")
        + f"shards {summary['shards']}  in {summary['seconds']['total']:.1f} s\n"
        f"wrote {summary['store']}"
    )


class _progress:
    """A rich progress bar fed by (what, done, total) callbacks, on stderr."""

    def __init__(self, *, disable: bool = False):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=disable,
            transient=True,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> Callable[[str, int, int], None]:
        self.bar.start()
        return self.report

    def __exit__(self, *exc: Any) -> None:
        self.bar.stop()

    def report(self, what: str, done: int, total: int) -> None:
        if what not in self.tasks:
            self.tasks[what] = self.bar.add_task(what, total=total)
        self.bar.update(self.tasks[what], completed=done, total=total)


if __name__ == "__main__":
    app()
