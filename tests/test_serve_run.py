"""README: Serve's own CLI against a `ddm cluster up` head (loopback, token auth):
`eval "$(ddm cluster env)"` then `serve run infra/serve/ddm.yaml`, and `serve shutdown`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import build_tiny_ddm, free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def _bash(script: str, env: dict, **kw) -> subprocess.Popen:
    bindir = Path(sys.executable).parent
    return subprocess.Popen(
        ["bash", "-c", f'export PATH="{bindir}:$PATH"; eval "$(ddm cluster env)"; {script}'],
        cwd=ROOT,
        env=env,
        **kw,
    )


def _run_bash(script: str, env: dict) -> tuple[str, str]:
    proc = _bash(script, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (script, err[-2000:])
    return out, err


def _get(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def test_readme_serve_run_of_the_config_file_joins_the_token_auth_head(ray_head, tmp_path):
    store = build_tiny_ddm(tmp_path / "store", 2, 8)
    # The shipped config, with this test's store and a free port: nothing else changed.
    config = yaml.safe_load((ROOT / "infra/serve/ddm.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["store"] = store
    copy = tmp_path / "ddm.yaml"
    copy.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{port}"

    # A Serve instance left on the cluster (by `ddm serve`, which deletes only its own
    # application) keeps its HTTP port and would ignore the file's: README says shut it down.
    # RAY_DASHBOARD_ADDRESS from `ddm cluster env` is what `serve shutdown|status` read.
    out, err = _run_bash("serve shutdown -y", ray_head)
    assert "Unable" not in out + err, out + err

    log_path = tmp_path / "serve-run.log"
    with open(log_path, "w") as log:
        proc = _bash(
            f"exec serve run {copy}",
            ray_head,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "serve run: no answer within 240 s"
            try:
                experts = _get(f"{url}/v1/experts")
                if all(e["healthy"] for e in experts["experts"]):
                    break
            except OSError:
                pass
            time.sleep(1)
        assert [e["name"] for e in experts["experts"]] == ["expert-000", "expert-001"]
        body = json.dumps({"n": 2, "steps": 2, "strategy": "top-1", "seed": 0}).encode()
        request = urllib.request.Request(
            f"{url}/v1/samples", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
        assert len(answer["images"]) == 2 and answer["degraded"] is False
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: serve run deletes the application
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    out, _ = _run_bash("serve status", ray_head)
    assert "ddm" not in (yaml.safe_load(out).get("applications") or {}), out
