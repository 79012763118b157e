"""`ddm serve`: the Serve application (router + one deployment per expert) on a Ray cluster,
in the foreground until Ctrl-C or SIGTERM, which delete that application again. While it
runs it watches the store's expert registry and router: after `ddm experts add|remove` or a
router retrained it deploys the application built from the store as it is now, which Serve
applies in place (app.py).

Ray: the cluster in RAY_ADDRESS (host:port of a GCS), else the head `ddm cluster up`
started (its token auth is picked up), else a Ray inside this process on 127.0.0.1 with
token auth (`local_cluster.connect`). Serve's HTTP proxy binds `--host` (default 127.0.0.1);
an address beyond loopback needs an API key. Several `ddm serve` can share one Serve, each
with its own `--app-name` and `--route-prefix`, on the one HTTP address Serve was started
with: a request for another address, name or prefix is refused, not silently ignored.
"""

from __future__ import annotations

import ipaddress
import signal
import sys
import time
import urllib.request

from ddm_nodes.errors import DDMError
from router_service.app_config import AppArgs
from router_service.schemas import host_name

READY_TIMEOUT_S = 600
REGISTRY_POLL_S = 2.0  # how often a running `ddm serve` looks at the store's experts.json
DELETING_WAIT_S = 60  # an app of the same name Ctrl-C'd a moment ago may still be going
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}
# router_service.app.APP_NAME, whose module takes torch and diffusers to import; a test
# keeps the two equal
DEFAULT_APP_NAME = "ddm"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def check_exposure(host: str, args: AppArgs) -> None:
    """Refuse to serve beyond this machine without an API key."""
    if not is_loopback(host) and args.api_key is None:
        raise DDMError(
            f"--host {host} serves beyond this machine: give an API key (--api-key KEY or "
            "DDM_API_KEY), or bind a loopback address such as 127.0.0.1"
        )


def with_bound_host(args: AppArgs, host: str) -> AppArgs:
    """`args` answering the Host header clients use for `host` too."""
    # A wildcard is no name a client sends, and a browser sent to 0.0.0.0 reaches this
    # machine's loopback: answering Host 0.0.0.0 would reopen what allowed_hosts closes.
    if host in WILDCARD_HOSTS or "*" in args.allowed_hosts:
        return args
    if host_name(host) in {host_name(h) for h in args.allowed_hosts}:
        return args
    return AppArgs.model_validate(
        {**args.model_dump(), "allowed_hosts": [*args.allowed_hosts, host]}
    )


def check_route_prefix(route_prefix: str) -> None:
    if not route_prefix.startswith("/") or (route_prefix != "/" and route_prefix.endswith("/")):
        raise DDMError(
            f"--route-prefix {route_prefix!r}: give '/' or a path like /ddm (a leading '/', "
            "no trailing one)"
        )


def _url(host: str, port: int, route_prefix: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{route_prefix.rstrip('/')}"


def _wait_ready(url: str, app_name: str, deadline: float) -> None:
    """Until /readyz answers 200; Serve's messages about deployments that cannot start
    (no resources for a replica, a constructor failing) are printed as they come, and a
    failed deployment ends the wait with its message."""
    from ray import serve

    seen: set[str] = set()
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        app = serve.status().applications.get(app_name)
        for name, d in (app.deployments if app else {}).items():
            if d.message and d.message not in seen:
                seen.add(d.message)
                print(f"{name}: {d.message}", file=sys.stderr, flush=True)
            if d.status == "DEPLOY_FAILED":
                raise DDMError(f"deployment {name} failed: {d.message.splitlines()[0][:300]}")
        time.sleep(1)
    raise DDMError(f"the service at {url} did not become ready within {READY_TIMEOUT_S} s")


def registry_state(args: AppArgs) -> tuple[str | None, str | None, tuple[int, ...]]:
    """What the app is built from that changes while it serves: experts.json's hash, the
    router's published version and the removed experts whose deployments still run (a
    change in any: build it again)."""
    from ddm_nodes.checkpoint import POINTER_FILE
    from ddm_nodes.dataset_manifest import DatasetManifest
    from ddm_nodes.names import ROUTER_PREFIX
    from ddm_nodes.registry import load_registry, registry_sha256
    from ddm_nodes.store import open_store, sha256_bytes

    store = open_store(args.store)
    pointer = f"{ROUTER_PREFIX}/{POINTER_FILE}"
    router = sha256_bytes(store.get_bytes(pointer)) if store.exists(pointer) else None
    try:
        registry = load_registry(store, DatasetManifest.load(store))
    except DDMError:  # half-written by hand, say: the build after it reports the error
        return ("unreadable", router, ())
    retiring = tuple(e.id for e in registry.retiring(args.retire_after_s))
    return registry_sha256(store), router, retiring


def serve_running(host: str, port: int, app_name: str, route_prefix: str) -> bool:
    """Whether Serve already runs on the cluster; if it does, check that it has this HTTP
    address and no application named `app_name` or under `route_prefix` yet."""
    # Serve's public API has no reader of the running HTTP options (serve.start logs a
    # warning and keeps the old ones); the controller's client holds them (Ray 2.60).
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return False
    running = client.http_config
    if (running.host, running.port) != (host, port):
        raise DDMError(
            f"Serve already runs on this cluster with its HTTP proxy on "
            f"{running.host}:{running.port}, which it cannot move: pass --host {running.host} "
            f"--port {running.port}, or stop every application with `serve shutdown`"
        )
    deadline = time.monotonic() + DELETING_WAIT_S
    while True:
        apps = client.get_serve_details().get("applications", {})
        mine = apps.get(app_name)
        if mine is None:
            break
        if mine.get("status") != "DELETING" or time.monotonic() > deadline:
            raise DDMError(
                f"a Serve application named {app_name!r} already runs on this cluster: stop "
                "the `ddm serve` that deployed it, or pass --app-name NAME"
            )
        time.sleep(1)
    for name, app in apps.items():
        if app.get("route_prefix") == route_prefix:
            raise DDMError(
                f"route prefix {route_prefix} is taken by the Serve application {name!r}: "
                "pass --route-prefix /NAME"
            )
    return True


def serve_forever(
    args: AppArgs,
    host: str,
    port: int,
    *,
    access_log: bool = True,
    app_name: str | None = None,
    route_prefix: str = "/",
) -> None:
    from cluster_jobs.ops.local_cluster import connect, driver_target

    check_exposure(host, args)
    check_route_prefix(route_prefix)
    args = with_bound_host(args, host)
    app_name = app_name or DEFAULT_APP_NAME
    ray_init = {"logging_level": "WARNING", "log_to_driver": False}
    # Which Ray, and its token auth, before Ray is imported (it reads RAY_AUTH_MODE then);
    # a GCS that does not answer fails here, in seconds.
    driver_target()
    from ray import serve

    from router_service.app import build_app

    app = build_app(args)  # checks the store before anything is deployed
    started_ray = connect(**ray_init)
    url = _url(host, port, route_prefix)

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)  # SIGTERM cleans up like Ctrl-C
    deployed = False
    try:
        if not serve_running(host, port, app_name, route_prefix):
            # One proxy, on the head, as infra/serve/ddm.yaml has it: the URL printed is the
            # head's. Proxies on every node would each bind --host:--port; on one machine's
            # loopback they share the port, and a lost node resets the connections its
            # proxy held.
            serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        logging = {"enable_access_log": access_log}
        deployed = True  # from here the name is ours: nothing else had it a moment ago
        serve.run(
            app, name=app_name, route_prefix=route_prefix, blocking=False, logging_config=logging
        )
        ready_url = _url("127.0.0.1" if host in WILDCARD_HOSTS else host, port, route_prefix)
        _wait_ready(ready_url, app_name, time.monotonic() + READY_TIMEOUT_S)
        print(f"serving {args.store} at {url} (Ctrl-C stops it)", flush=True)
        watched = registry_state(args)
        while True:
            time.sleep(REGISTRY_POLL_S)
            now = registry_state(args)
            if now == watched:
                continue
            watched = now
            try:
                app = build_app(args)
            except DDMError as e:  # keep serving what runs; say why the change is not served
                print(f"error: the changed registry is not served: {e}", file=sys.stderr)
                continue
            print("the expert registry or router changed: updating the application", flush=True)
            try:
                serve.run(
                    app,
                    name=app_name,
                    route_prefix=route_prefix,
                    blocking=False,
                    logging_config=logging,
                )
            except Exception as e:  # e.g. an added expert's replica cannot load its weights
                # the router keeps the set it serves until every expert of a new one runs
                first = (str(e).strip().splitlines() or [""])[0][:300]
                print(
                    f"error: the update did not deploy ({type(e).__name__}: {first}); the "
                    "set served before stays served",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            print(f"serving the updated registry at {url}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            if deployed:
                print(f"stopping the Serve application {app_name!r}", file=sys.stderr, flush=True)
                serve.delete(app_name)
            if started_ray:
                serve.shutdown()
        finally:
            import ray

            ray.shutdown()
