"""infra/serve/ddm.yaml is a valid Ray Serve config whose application args are AppArgs and
whose import path is the app builder; the builder refuses a bad store with a message."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from ddm_nodes.errors import DDMError
from router_service.app import build_app
from router_service.app_config import AppArgs
from router_service.schemas import Limits

CONFIG = Path(__file__).parents[1] / "infra" / "serve" / "ddm.yaml"


def test_serve_config_parses_and_its_args_are_app_args():
    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    assert config.http_options.host == "127.0.0.1"
    (app,) = config.applications
    module, attr = app.import_path.split(":")
    assert getattr(importlib.import_module(module), attr) is build_app
    args = AppArgs.model_validate(app.args)
    assert args.expert_options(3)["name"] == "expert-003"
    assert args.expert_options(3)["user_config"] == {
        "max_batch": args.max_batch,
        "batch_wait_timeout_s": args.batch_wait_timeout_s,
    }
    # the address the proxy binds is a Host the API answers, else every /v1/* call is a 421
    assert config.http_options.host in args.allowed_hosts
    assert args.limits == Limits()  # the file spells out the defaults, nothing else


def test_builder_refuses_bad_args_and_stores(tmp_path):
    with pytest.raises(ValidationError, match="replicaz"):
        build_app({"store": str(tmp_path), "replicaz": 2})
    with pytest.raises(DDMError, match="dataset"):
        build_app({"store": str(tmp_path / "nowhere")})


def test_ddm_serve_with_a_bad_store_exits_2_with_one_line(ddm, tmp_path):
    done = ddm("serve", "--store", str(tmp_path / "nowhere"), "--port", "1")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "dataset" in done.stderr


def test_ddm_sample_url_errors_exit_2_with_one_line(ddm, tmp_path):
    out = str(tmp_path / "x.png")
    down = ddm("sample", "--url", "http://127.0.0.1:9", "--out", out, "--n", "1")
    assert down.returncode == 2 and "cannot reach" in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1
    both = ddm("sample", "--url", "http://127.0.0.1:9", "--store", str(tmp_path), "--out", out)
    assert both.returncode == 2 and "exactly one of --store" in both.stderr
