"""`ddm serve`: the Serve application (router + one deployment per expert) on a Ray cluster,
in the foreground until Ctrl-C or SIGTERM, which delete the application again.

Ray: the head `ddm cluster up` started when there is one (its token auth is picked up),
else the cluster in RAY_ADDRESS (host:port of a GCS), else a local Ray inside this
process, bound to 127.0.0.1. Serve's HTTP proxy binds `--host` (default 127.0.0.1).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import urllib.request

from ddm_nodes.errors import DDMError
from router_service.app_config import AppArgs

READY_TIMEOUT_S = 600


def connect_ray() -> bool:
    """Join the cluster (see the module docstring); True when a local Ray was started."""
    from cluster_jobs.ops.local_cluster import use_local_cluster_auth

    info = use_local_cluster_auth()
    import ray

    if ray.is_initialized():
        return False
    env_address = os.environ.get("RAY_ADDRESS", "")
    if info is not None:
        address = info.gcs_address
    elif env_address and not env_address.startswith("http"):
        address = env_address
    else:
        address = None
    os.environ.pop("RAY_ADDRESS", None)  # a dashboard URL there would confuse ray.init
    if address is not None:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        return False
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
    )
    return True


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


def serve_forever(args: AppArgs, host: str, port: int, *, access_log: bool = True) -> None:
    from cluster_jobs.ops.local_cluster import use_local_cluster_auth

    use_local_cluster_auth()  # before Ray is imported: it reads RAY_AUTH_MODE once, then
    from ray import serve

    from router_service.app import APP_NAME, build_app

    app = build_app(args)  # checks the store before anything starts
    started_ray = connect_ray()
    url = f"http://{host}:{port}"

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)  # SIGTERM cleans up like Ctrl-C
    try:
        # One proxy, on the head, as infra/serve/ddm.yaml has it: the URL printed is the
        # head's. Proxies on every node would each bind --host:--port; on one machine's
        # loopback they share the port, and a lost node resets the connections its proxy held.
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        logging = {"enable_access_log": access_log}
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False, logging_config=logging)
        _wait_ready(url, APP_NAME, time.monotonic() + READY_TIMEOUT_S)
        print(f"serving {args.store} at {url} (Ctrl-C stops it)", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping the ddm application", file=sys.stderr, flush=True)
        try:
            serve.delete(APP_NAME)
            if started_ray:
                serve.shutdown()
        finally:
            import ray

            ray.shutdown()
