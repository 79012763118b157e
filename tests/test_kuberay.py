"""infra/kuberay manifests and the RayJobs `render_rayjobs` writes validate against KubeRay's
own v1 CRD schemas (infra/kuberay/schemas/) and use no field the CRDs do not declare; a
rendered RayJob runs exactly `ddm submit`'s command on a copy of raycluster.yaml's cluster;
local stores are refused; the RayService serves infra/serve/ddm.yaml's application."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml
from kuberay_schema import crd_errors, crd_schema

from cluster_jobs.analysis.config import AnalyzeConfig
from cluster_jobs.kuberay import DEFAULT_IMAGE, MAX_NAME_LENGTH, render_rayjobs
from cluster_jobs.submit import AnalyzeJob, entrypoint, submission_id
from cluster_jobs.training.config import TrainConfig
from ddm_nodes.errors import DDMError

ROOT = Path(__file__).parents[1]
KUBERAY = ROOT / "infra" / "kuberay"
MANIFESTS = ["raycluster.yaml", "rayjob-expert.yaml", "rayservice.yaml"]
S3_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def load(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def pod_groups(doc: dict) -> list[tuple[dict, dict]]:
    """(rayStartParams, pod spec) of the head and of every worker group."""
    spec = cluster_spec(doc)
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [(g["rayStartParams"], g["template"]["spec"]) for g in groups]


def training_configs() -> list[TrainConfig]:
    store = "s3://bucket/ddm"
    return [
        TrainConfig(kind="expert", store=store, cluster=3, preset="unet-tiny", steps=10),
        TrainConfig(kind="expert", store=store, cluster=12, steps=10, workers=2, seed=7),
        TrainConfig(kind="router", store=store, preset="router-tiny", lr=1e-3, steps=10),
        TrainConfig(kind="monolith", store=store, steps=10, unconditional=True),
    ]


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_use_only_crd_fields(name):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert crd_errors(doc) == []


PRUNED = "the CRD has no such field (Kubernetes prunes it)"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda d: d["spec"].update(headGroupSpecs=d["spec"].pop("headGroupSpec")),
            [
                "RayCluster.spec: 'headGroupSpec' is a required property",
                f"RayCluster.spec.headGroupSpecs: {PRUNED}",
            ],
        ),
        (
            lambda d: d["spec"]["headGroupSpec"].update(groupName="head"),
            [f"RayCluster.spec.headGroupSpec.groupName: {PRUNED}"],
        ),
        (
            lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(
                imagePullPolicyy="Always"
            ),
            [
                "RayCluster.spec.workerGroupSpecs[0].template.spec.containers[0].imagePullPolicyy: "
                + PRUNED
            ],
        ),
        (
            lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
            ["RayCluster.spec.headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'"],
        ),
        (
            lambda d: d["spec"].update(autoscalerOptions={"idleTimeoutSecond": 60}),
            [f"RayCluster.spec.autoscalerOptions.idleTimeoutSecond: {PRUNED}"],
        ),
        (
            lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="two"),
            ["RayCluster.spec.workerGroupSpecs[0].replicas: 'two' is not of type 'integer'"],
        ),
    ],
    ids=["misspelled", "wrong-level", "nested-typo", "int-start-param", "deep-typo", "type"],
)
def test_validator_rejects_what_the_crd_would(mutate, expected):
    doc = copy.deepcopy(load("raycluster.yaml"))
    mutate(doc)
    assert crd_errors(doc) == expected


def test_the_schemas_are_kuberays_v1_crds():
    for kind in ("RayCluster", "RayJob", "RayService"):
        schema = crd_schema(kind)
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(schema["properties"])
    assert "Apache License 2.0" in (KUBERAY / "schemas" / "README.md").read_text()


def test_render_writes_one_rayjob_per_job_with_the_exact_entrypoint(tmp_path):
    configs = training_configs()
    analyze = AnalyzeJob(
        AnalyzeConfig(store="s3://bucket/ddm", out="s3://bucket/report", quick=True)
    )
    paths = render_rayjobs([*configs, analyze], tmp_path / "k8s", image="registry.example/ddm:1")
    names = ["expert-003", "expert-012", "router", "monolith", "analyze"]
    assert paths == [tmp_path / "k8s" / f"rayjob-{n}.yaml" for n in names]
    assert sorted(p.name for p in (tmp_path / "k8s").iterdir()) == sorted(p.name for p in paths)
    for job, path in zip([*configs, analyze], paths, strict=True):
        text = path.read_text()
        assert "${" not in text
        doc = yaml.safe_load(text)
        assert crd_errors(doc) == []
        assert doc["spec"]["entrypoint"] == entrypoint(job)
        sid = submission_id(job)
        assert doc["metadata"]["name"] == doc["spec"]["jobId"] == sid
        assert DNS_1035.fullmatch(sid) and len(sid) <= MAX_NAME_LENGTH
        assert doc["metadata"]["labels"]["ddm/name"] == job.name
        assert doc["metadata"]["labels"]["ddm/config-hash"] == job.config_hash()
        assert doc["spec"]["metadata"] == {
            "ddm_kind": job.kind,
            "ddm_name": job.name,
            "ddm_config_hash": job.config_hash(),
        }
        images = [c["image"] for _, pod in pod_groups(doc) for c in pod["containers"]]
        assert images == ["registry.example/ddm:1"] * 2 + ["registry.example/ddm:1-gpu"]
    rendered = shlex.split(yaml.safe_load(paths[1].read_text())["spec"]["entrypoint"])
    assert TrainConfig.model_validate_json(rendered[-1]) == configs[1]  # expert 12, whole
    rendered = shlex.split(yaml.safe_load(paths[-1].read_text())["spec"]["entrypoint"])
    assert rendered[:4] == ["python", "-m", "cluster_jobs.analysis", "--config"]
    assert AnalyzeConfig.model_validate_json(rendered[-1]) == analyze.config


def test_an_entrypoint_with_quotes_colons_and_hashes_stays_one_string(tmp_path):
    cfg = TrainConfig(kind="expert", store="s3://bucket/it's: a #test", cluster=0, steps=10)
    (path,) = render_rayjobs([cfg], tmp_path)
    command = yaml.safe_load(path.read_text())["spec"]["entrypoint"]
    assert command == entrypoint(cfg)
    assert TrainConfig.model_validate_json(shlex.split(command)[-1]).store == cfg.store


def test_the_rayjob_cluster_is_raycluster_yaml(tmp_path):
    (path,) = render_rayjobs(training_configs()[:1], tmp_path, image=DEFAULT_IMAGE)
    rendered = yaml.safe_load(path.read_text())["spec"]["rayClusterSpec"]
    assert rendered == load("raycluster.yaml")["spec"]


@pytest.mark.parametrize("store", ["/data/ddm", "file:///data/ddm", "demo-out/store"])
def test_a_local_store_is_refused_before_anything_is_written(tmp_path, store):
    jobs = [*training_configs(), TrainConfig(kind="expert", store=store, cluster=0, steps=10)]
    with pytest.raises(DDMError, match="KubeRay pods cannot read a local path: prepare into an s3"):
        render_rayjobs(jobs, tmp_path / "k8s")
    assert not (tmp_path / "k8s").exists()


def test_an_analysis_writing_into_its_pod_is_refused(tmp_path):
    job = AnalyzeJob(AnalyzeConfig(store="s3://bucket/ddm", out="results/run1"))
    with pytest.raises(DDMError, match="give --out s3://"):
        render_rayjobs([job], tmp_path)


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_pod_reads_the_store_and_exports_metrics(name):
    for params, pod in pod_groups(load(name)):
        (container,) = pod["containers"]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
        assert S3_ENV <= set(refs)
        assert all(refs[k]["name"] == "ddm-s3" and refs[k]["key"] == k for k in S3_ENV)
        assert refs["AWS_ENDPOINT_URL"]["optional"] is True
        assert not refs["AWS_ACCESS_KEY_ID"].get("optional")
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == int(params["metrics-export-port"])
    head_params, _ = pod_groups(load(name))[0]
    assert head_params["dashboard-host"] == "0.0.0.0"


def test_rayservice_serves_the_app_of_the_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from router_service.app_config import AppArgs

    service = load("rayservice.yaml")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    (local,) = yaml.safe_load((ROOT / "infra" / "serve" / "ddm.yaml").read_text())["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert app[key] == local[key], key
    # The builder names the deployments (router, expert-000...) from the store's K; both
    # configs size them through args, and a `deployments:` override would name one that
    # may not exist.
    assert "deployments" not in app and "deployments" not in local
    assert set(app["args"]) == set(local["args"])
    args = AppArgs.model_validate(app["args"])
    assert args.store.startswith("s3://")
    (_, head), *_ = pod_groups(service)
    ports = {p["name"]: p["containerPort"] for p in head["containers"][0]["ports"]}
    assert config["http_options"] == {"host": "0.0.0.0", "port": ports["serve"]}
    assert config["proxy_location"] == "HeadOnly"
