"""infra/kuberay manifests and the RayJobs `render_rayjobs` writes validate against KubeRay's
own v1 CRD schemas (infra/kuberay/schemas/) and use no field the CRDs do not declare; a
rendered RayJob runs exactly `ddm submit`'s command on a copy of raycluster.yaml's cluster;
local stores are refused; the RayService serves infra/serve/ddm.yaml's application.

The hardening: Ray token auth from a Secret in every Ray pod and the job submitter; each
cluster's NetworkPolicy, evaluated here by Kubernetes' rules against the labels KubeRay gives
the pods; pods without privileges, root or a service-account token (the autoscaler's own
token aside); images by digest; each Secret only in the containers that read it; Serve traffic
gated on the router's /readyz. One integration test runs Ray, a training job and the Serve
app on a read-only root as the manifests' user."""

from __future__ import annotations

import copy
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import build_tiny_ddm, free_port
from kuberay_schema import crd_errors, crd_schema, network_policy_errors

from cluster_jobs.analysis.config import AnalyzeConfig
from cluster_jobs.kuberay import MAX_NAME_LENGTH, render_rayjobs
from cluster_jobs.submit import AnalyzeJob, entrypoint, submission_id
from cluster_jobs.training.config import TrainConfig
from ddm_nodes.errors import DDMError

ROOT = Path(__file__).parents[1]
KUBERAY = ROOT / "infra" / "kuberay"
DOCKERFILE = KUBERAY / "Dockerfile"
MANIFESTS = ["raycluster.yaml", "rayjob-expert.yaml", "rayservice.yaml"]
# where each cluster's NetworkPolicy is: beside it, or, for the RayJobs, which are rendered
# one per file, in a file of its own
POLICY_FILE = {
    "raycluster.yaml": "raycluster.yaml",
    "rayjob-expert.yaml": "networkpolicy-rayjobs.yaml",
    "rayservice.yaml": "rayservice.yaml",
}
S3_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"}
TOKEN_SECRET = "ddm-ray-auth"
TOKEN_KEY = "auth_token"  # the key KubeRay reads from authOptions.secretName's Secret
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
PINNED = "registry.example/ddm:1@sha256:" + "a" * 64
PINNED_GPU = "registry.example/ddm:1-gpu@sha256:" + "b" * 64
RENDERED = "rendered RayJob"
HARDENED = [*MANIFESTS, RENDERED]


def documents(name: str) -> list[dict]:
    return list(yaml.safe_load_all((KUBERAY / name).read_text()))


def load(name: str) -> dict:
    """The file's ray.io document."""
    (doc,) = [d for d in documents(name) if d["apiVersion"] == "ray.io/v1"]
    return doc


def network_policy(name: str) -> dict:
    """The NetworkPolicy that fences the cluster of manifest `name`."""
    (doc,) = [d for d in documents(POLICY_FILE[name]) if d["kind"] == "NetworkPolicy"]
    return doc


def cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def pod_groups(doc: dict) -> list[tuple[dict, dict]]:
    """(rayStartParams, pod spec) of the head and of every worker group."""
    spec = cluster_spec(doc)
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [(g["rayStartParams"], g["template"]["spec"]) for g in groups]


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(role, pod template) of the head, every worker group and a RayJob's submitter."""
    spec = cluster_spec(doc)
    templates = [("head", spec["headGroupSpec"]["template"])]
    templates += [("worker", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    if doc["kind"] == "RayJob":
        templates.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    return templates


def containers(pod_spec: dict) -> list[dict]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def training_configs() -> list[TrainConfig]:
    store = "s3://bucket/ddm"
    return [
        TrainConfig(kind="expert", store=store, cluster=3, preset="unet-tiny", steps=10),
        TrainConfig(kind="expert", store=store, cluster=12, steps=10, workers=2, seed=7),
        TrainConfig(kind="router", store=store, preset="router-tiny", lr=1e-3, steps=10),
        TrainConfig(kind="monolith", store=store, steps=10, unconditional=True),
    ]


def hardened(name: str, tmp_path: Path) -> dict:
    """A manifest's ray.io document, or a RayJob rendered with digest-pinned images."""
    if name != RENDERED:
        return load(name)
    (path,) = render_rayjobs(training_configs()[:1], tmp_path, PINNED, gpu_image=PINNED_GPU)
    return yaml.safe_load(path.read_text())


def image_user() -> tuple[int, int]:
    """The uid and gid of the Dockerfile's last USER directive."""
    users = re.findall(r"^USER\s+(\S+)\s*$", DOCKERFILE.read_text(), re.MULTILINE)
    uid, _, gid = users[-1].partition(":")
    return int(uid), int(gid)


def secret_refs(container: dict) -> dict[str, dict]:
    return {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifests_use_only_crd_fields(name):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert crd_errors(doc) == []


@pytest.mark.parametrize("name", sorted({*MANIFESTS, *POLICY_FILE.values()}))
def test_every_document_is_a_valid_ray_resource_or_network_policy(name):
    kinds = []
    for doc in documents(name):
        kinds.append(doc["kind"])
        errors = network_policy_errors(doc) if doc["kind"] == "NetworkPolicy" else crd_errors(doc)
        assert errors == [], doc["kind"]
    assert kinds.count("NetworkPolicy") == list(POLICY_FILE.values()).count(name)


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
            lambda d: d["spec"]["autoscalerOptions"].update(idleTimeoutSecond=60),
            [f"RayCluster.spec.autoscalerOptions.idleTimeoutSecond: {PRUNED}"],
        ),
        (
            lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="two"),
            ["RayCluster.spec.workerGroupSpecs[0].replicas: 'two' is not of type 'integer'"],
        ),
        (
            lambda d: d["spec"]["authOptions"].update(mode="Token"),
            ["RayCluster.spec.authOptions.mode: 'Token' is not one of ['disabled', 'token']"],
        ),
    ],
    ids=[
        "misspelled",
        "wrong-level",
        "nested-typo",
        "int-start-param",
        "deep-typo",
        "type",
        "auth-enum",
    ],
)
def test_validator_rejects_what_the_crd_would(mutate, expected):
    doc = copy.deepcopy(load("raycluster.yaml"))
    mutate(doc)
    assert crd_errors(doc) == expected


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda s: s.update(podSelectr=s.pop("podSelector")),
            [
                "NetworkPolicy.spec.podSelectr: no such field",
                "NetworkPolicy.spec.podSelector: required (an empty {} selects every pod)",
            ],
        ),
        (
            lambda s: s.update(policyTypes=["ingress"]),
            ["NetworkPolicy.spec.policyTypes: ['ingress']: a list of Ingress, Egress"],
        ),
        (
            lambda s: s["ingress"][1]["ports"][0].update(protocol="tcp"),
            [
                "NetworkPolicy.spec.ingress[1].ports[0].protocol: 'tcp': "
                "one of ['SCTP', 'TCP', 'UDP']"
            ],
        ),
        (
            lambda s: s["ingress"][0].update(to=s["ingress"][0].pop("from")),
            ["NetworkPolicy.spec.ingress[0].to: no such field"],
        ),
        (
            lambda s: s["ingress"][2]["from"][0]["podSelector"].update(matchLabel={}),
            ["NetworkPolicy.spec.ingress[2].from[0].podSelector.matchLabel: no such field"],
        ),
    ],
    ids=["misspelled", "enum-case", "protocol-case", "wrong-direction", "selector-typo"],
)
def test_network_policy_checker_rejects_what_the_api_server_would(mutate, expected):
    doc = copy.deepcopy(network_policy("raycluster.yaml"))
    mutate(doc["spec"])
    assert network_policy_errors(doc) == expected


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
        images = [c["image"] for _, t in pod_templates(doc) for c in t["spec"]["containers"]]
        # head, CPU workers, GPU workers (the tag's CUDA build), submitter
        assert images == ["registry.example/ddm:1"] * 2 + ["registry.example/ddm:1-gpu"] + [
            "registry.example/ddm:1"
        ]
        labels = [t["metadata"]["labels"] for role, t in pod_templates(doc) if role != "submitter"]
        assert all(lab["ddm/rayjob"] == sid for lab in labels)
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
    expected = load("raycluster.yaml")["spec"]
    cpu_image = expected["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    (gpu,) = [g for g in expected["workerGroupSpecs"] if g["groupName"] == "gpu"]
    gpu_image = gpu["template"]["spec"]["containers"][0]["image"]
    jobs = training_configs()[:1]
    (path,) = render_rayjobs(jobs, tmp_path, image=cpu_image, gpu_image=gpu_image)
    doc = yaml.safe_load(path.read_text())
    # the one difference: the label the RayJobs' NetworkPolicy selects (ray.io/cluster is
    # unknown until KubeRay names the job's cluster)
    for role, template in pod_templates(doc):
        if role != "submitter":
            assert template["metadata"]["labels"].pop("ddm/rayjob") == submission_id(jobs[0])
    assert doc["spec"]["rayClusterSpec"] == expected


def test_a_digest_pinned_image_needs_its_gpu_build_named(tmp_path):
    # -gpu after a digest would name no image; the CUDA build has a digest of its own
    with pytest.raises(DDMError, match="pinned by digest.*CUDA build's own reference"):
        render_rayjobs(training_configs()[:1], tmp_path / "k8s", image=PINNED)
    assert not (tmp_path / "k8s").exists()


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
def test_every_pod_exports_metrics_and_the_job_api_listens_on_the_pod_ip(name):
    for params, pod in pod_groups(load(name)):
        (container,) = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == int(params["metrics-export-port"])
    head_params, _ = pod_groups(load(name))[0]
    assert head_params["dashboard-host"] == "0.0.0.0"


# --- images ---------------------------------------------------------------------------------

# a digest, or the manifests' placeholder for the one `docker push` prints, which no node can
# pull; a tag alone (or `latest`, or no tag) can be pushed over
_PINNED_REF = re.compile(
    r"(?:[\w.-]+(?::\d+)?/)?[\w./-]+"  # [registry[:port]/]path
    r"(?::(?P<tag>\w[\w.-]{0,127}))?@sha256:(?:[0-9a-f]{64}|<digest>)"
)


def pinned(image: str) -> bool:
    match = _PINNED_REF.fullmatch(image)
    return match is not None and match["tag"] != "latest"


@pytest.mark.parametrize(
    "image, ok",
    [
        ("ddm:0.1.0", False),
        ("ddm", False),
        ("REGISTRY/ddm:latest", False),
        ("REGISTRY/ddm:latest@sha256:" + "c" * 64, False),
        ("REGISTRY/ddm@sha256:" + "c" * 63, False),
        ("REGISTRY/ddm:0.1.0@sha256:<digest> ", False),
        ("REGISTRY/ddm:0.1.0@sha256:<digest>", True),
        ("ghcr.io/owner/ddm@sha256:" + "c" * 64, True),
        ("localhost:5000/ddm:0.1.0-gpu@sha256:" + "c" * 64, True),
    ],
)
def test_the_digest_check_refuses_mutable_references(image, ok):
    assert pinned(image) is ok


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayservice.yaml", RENDERED])
def test_images_are_pinned_by_digest(name, tmp_path):
    doc = hardened(name, tmp_path)
    images = [c["image"] for _, t in pod_templates(doc) for c in containers(t["spec"])]
    autoscaler = cluster_spec(doc)["autoscalerOptions"]
    images += [autoscaler["image"]] if "image" in autoscaler else []  # else the head's
    assert images and all(pinned(i) for i in images), images


# --- pods without privileges ----------------------------------------------------------------


@pytest.mark.parametrize("name", HARDENED)
def test_every_pod_runs_unprivileged_on_a_read_only_root(name, tmp_path):
    uid, gid = image_user()
    doc = hardened(name, tmp_path)
    for role, template in pod_templates(doc):
        pod = template["spec"]
        assert pod["automountServiceAccountToken"] is False, role
        assert pod["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": gid,
            "seccompProfile": {"type": "RuntimeDefault"},
        }, role
        scratch = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for c in containers(pod):
            assert c["securityContext"] == {
                "runAsNonRoot": True,
                "runAsUser": uid,
                "runAsGroup": gid,
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
                "readOnlyRootFilesystem": True,
            }, (role, c["name"])
            # what Ray (and `ray job submit`) write goes to emptyDirs, the only writable paths
            writable = {m["mountPath"] for m in c["volumeMounts"] if m["name"] in scratch}
            assert "/tmp" in writable, (role, c["name"])
            if role != "submitter":
                assert "/dev/shm" in writable, role  # Ray's object store
    # the autoscaler, which KubeRay adds to the head pod, gets its securityContext from here
    autoscaler = cluster_spec(doc)["autoscalerOptions"]["securityContext"]
    assert autoscaler["runAsNonRoot"] is True and autoscaler["runAsUser"] == uid
    assert autoscaler["allowPrivilegeEscalation"] is False
    assert autoscaler["capabilities"] == {"drop": ["ALL"]}
    assert "readOnlyRootFilesystem" in autoscaler  # decided, not defaulted (see the manifest)


@pytest.mark.parametrize("name", HARDENED)
def test_only_the_autoscaler_holds_an_api_token(name, tmp_path):
    # where Ray's KubeRay autoscaler reads the API server's credentials
    from ray.autoscaler._private.kuberay.node_provider import (
        IN_CLUSTER_CA_CERT_PATH,
        IN_CLUSTER_TOKEN_PATH,
    )

    doc = hardened(name, tmp_path)
    spec = cluster_spec(doc)
    head = spec["headGroupSpec"]["template"]["spec"]
    folder = os.path.dirname(IN_CLUSTER_TOKEN_PATH)
    assert os.path.dirname(IN_CLUSTER_CA_CERT_PATH) == folder
    (mount,) = [m for m in spec["autoscalerOptions"]["volumeMounts"] if m["mountPath"] == folder]
    assert mount["readOnly"] is True
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    sources = volume["projected"]["sources"]
    tokens = [s["serviceAccountToken"]["path"] for s in sources if "serviceAccountToken" in s]
    assert tokens == [os.path.basename(IN_CLUSTER_TOKEN_PATH)]
    (ca,) = [s["configMap"] for s in sources if "configMap" in s]
    assert ca["name"] == "kube-root-ca.crt"  # every namespace has it (Kubernetes >= 1.21)
    assert ca["items"] == [{"key": "ca.crt", "path": os.path.basename(IN_CLUSTER_CA_CERT_PATH)}]
    # no Ray container (where job code runs) and no other pod gets the token
    for role, template in pod_templates(doc):
        for c in containers(template["spec"]):
            assert all(m["name"] != mount["name"] for m in c["volumeMounts"]), (role, c["name"])
            assert all(m["mountPath"] != folder for m in c["volumeMounts"]), (role, c["name"])


def test_the_image_runs_as_the_manifests_user_and_bakes_in_no_secret():
    uid, gid = image_user()
    assert uid > 0 and gid > 0
    text = DOCKERFILE.read_text()
    instructions = re.findall(r"^(ARG|ENV)\s+([A-Za-z_][A-Za-z0-9_]*)", text, re.MULTILINE)
    names = {name for _, name in instructions}
    assert names == {"BASE", "TORCH_INDEX"}  # no credential travels as a build input
    assert ":latest" not in text


# --- Ray token auth and where each Secret goes -----------------------------------------------


@pytest.mark.parametrize("name", HARDENED)
def test_ray_token_auth_in_every_pod_from_a_secret(name, tmp_path):
    from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR

    doc = hardened(name, tmp_path)
    # KubeRay >= 1.5.1: the operator puts the token into the containers it adds (autoscaler,
    # wait-gcs-ready) and uses it for its own calls to the job API
    assert cluster_spec(doc)["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET}
    roles = []
    for role, template in pod_templates(doc):
        for c in template["spec"]["containers"]:
            env = {e["name"]: e for e in c["env"]}
            assert env[AUTH_MODE_ENV_VAR] == {"name": AUTH_MODE_ENV_VAR, "value": "token"}
            assert env["RAY_AUTH_TOKEN"] == {
                "name": "RAY_AUTH_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": TOKEN_SECRET, "key": TOKEN_KEY}},
            }
            assert "RAY_AUTH_TOKEN_PATH" not in env  # it would lose to RAY_AUTH_TOKEN
            roles.append(role)
    expected = {"head", "worker", "submitter"} if doc["kind"] == "RayJob" else {"head", "worker"}
    assert set(roles) == expected
    autoscaler_env = {e["name"] for e in cluster_spec(doc)["autoscalerOptions"].get("env", [])}
    assert not autoscaler_env & {AUTH_MODE_ENV_VAR, "RAY_AUTH_TOKEN"}  # KubeRay's to set


S3_SECRETS = {k: ("ddm-s3", k) for k in S3_ENV}
TOKEN_SECRETS = {"RAY_AUTH_TOKEN": (TOKEN_SECRET, TOKEN_KEY)}
API_KEY_SECRETS = {"DDM_API_KEY": ("ddm-api", "DDM_API_KEY")}
# the env vars from Secrets each container gets: S3 keys wherever Ray may run a job driver,
# a Train worker, Serve's application build or a replica; DDM_API_KEY only in the service's
# cluster (read where the build runs, which may be any node); the submitter only the token
SECRETS_BY_ROLE = {
    ("RayCluster", "head"): S3_SECRETS | TOKEN_SECRETS,
    ("RayCluster", "worker"): S3_SECRETS | TOKEN_SECRETS,
    ("RayJob", "head"): S3_SECRETS | TOKEN_SECRETS,
    ("RayJob", "worker"): S3_SECRETS | TOKEN_SECRETS,
    ("RayJob", "submitter"): TOKEN_SECRETS,
    ("RayService", "head"): S3_SECRETS | TOKEN_SECRETS | API_KEY_SECRETS,
    ("RayService", "worker"): S3_SECRETS | TOKEN_SECRETS | API_KEY_SECRETS,
}
OPTIONAL_SECRETS = {"AWS_ENDPOINT_URL", "DDM_API_KEY"}  # unset: AWS itself, or no bearer key


@pytest.mark.parametrize("name", HARDENED)
def test_each_secret_only_in_the_containers_that_read_it(name, tmp_path):
    doc = hardened(name, tmp_path)
    for role, template in pod_templates(doc):
        for c in containers(template["spec"]):
            assert "envFrom" not in c  # would bring a whole Secret, keys nobody named
            refs = secret_refs(c)
            expected = SECRETS_BY_ROLE[doc["kind"], role]
            assert {k: (r["name"], r["key"]) for k, r in refs.items()} == expected, role
            for var, ref in refs.items():
                assert ref.get("optional", False) is (var in OPTIONAL_SECRETS), (role, var)
            # a credential never as a literal value
            literals = {e["name"] for e in c["env"] if "value" in e}
            assert not literals & {*S3_ENV, "RAY_AUTH_TOKEN", "DDM_API_KEY"}, role
    autoscaler = cluster_spec(doc)["autoscalerOptions"]
    assert "env" not in autoscaler and "envFrom" not in autoscaler  # it reads no store


# --- NetworkPolicies --------------------------------------------------------------------------

NAMESPACE = "ddm"  # where the manifests are applied


@dataclass
class Peer:
    """A pod that opens a connection: its namespace and labels."""

    namespace: str
    labels: dict


def selects(selector: dict, labels: dict) -> bool:
    """Kubernetes' LabelSelector: every matchLabels pair and every expression holds."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, values = e["key"], e.get("values", [])
        holds = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[e["operator"]]
        if not holds:
            return False
    return True


def admitted(policy: dict, peer: Peer, port: int) -> bool:
    """Whether `policy` (in NAMESPACE, selecting the destination pod, restricting ingress)
    lets `peer` open TCP `port`: some rule matches both the port (no ports: all) and the
    peer (no `from`: anyone; a podSelector alone: pods of the policy's namespace)."""
    for rule in policy["spec"].get("ingress", []):
        ports = rule.get("ports") or [{}]
        if not any(
            p.get("protocol", "TCP") == "TCP"
            and ("port" not in p or p["port"] <= port <= p.get("endPort", p["port"]))
            for p in ports
        ):
            continue
        if not rule.get("from"):
            return True
        for source in rule["from"]:
            if "ipBlock" in source:
                continue  # pod-to-pod traffic here
            namespaces = source.get("namespaceSelector")
            in_namespace = (
                peer.namespace == NAMESPACE
                if namespaces is None
                else selects(namespaces, {"kubernetes.io/metadata.name": peer.namespace})
            )
            if in_namespace and selects(source.get("podSelector", {}), peer.labels):
                return True
    return False


def kuberay_labels(doc: dict, role: str, template: dict, cluster: str | None = None) -> dict:
    """The labels KubeRay gives a pod made from `template` (ray-operator's labelPod, and the
    submitter labels of getSubmitterTemplate); a RayJob's or RayService's cluster is named
    <name>-<5 random characters>."""
    name = doc["metadata"]["name"]
    own = template.get("metadata", {}).get("labels", {})
    if role == "submitter":
        return {
            **own,
            "ray.io/originated-from-cr-name": name,
            "ray.io/originated-from-crd": doc["kind"],
            "app.kubernetes.io/created-by": "kuberay-operator",
        }
    cluster = cluster or (name if doc["kind"] == "RayCluster" else f"{name}-x7k2p")
    fixed = {"ray.io/cluster": cluster, "ray.io/node-type": role, "ray.io/group": role}
    base = {
        "ray.io/is-ray-node": "yes",
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
    }
    return {**base, **own, **fixed}  # a template cannot override the fixed three


PORTS = {
    "GCS": 6379,
    "job API": 8265,
    "Ray Client": 10001,
    "Serve": 8000,
    "metrics": 8080,
    "a worker's own": 10234,
}
ALL_PORTS = set(PORTS.values())
OPERATOR = Peer("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"})
PROMETHEUS = Peer("monitoring", {"app.kubernetes.io/name": "prometheus"})
INGRESS = Peer("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
STRANGER = Peer(NAMESPACE, {"app": "web"})
GRAFANA = Peer("monitoring", {"app.kubernetes.io/name": "grafana"})
OTHER_CLUSTER = {  # a pod of another ddm cluster in the namespace
    "raycluster.yaml": "rayservice.yaml",
    "rayjob-expert.yaml": "raycluster.yaml",
    "rayservice.yaml": "raycluster.yaml",
}


def a_worker(name: str, tmp_path: Path, cluster: str | None = None) -> dict:
    doc = hardened(RENDERED if name == "rayjob-expert.yaml" else name, tmp_path)
    (role, template), *_ = [(r, t) for r, t in pod_templates(doc) if r == "worker"]
    return kuberay_labels(doc, role, template, cluster)


@pytest.mark.parametrize("name", MANIFESTS)
def test_network_policy_admits_only_the_listed_peers(name, tmp_path):
    doc = hardened(RENDERED if name == "rayjob-expert.yaml" else name, tmp_path)
    policy = network_policy(name)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    others = [network_policy(n) for n in MANIFESTS if POLICY_FILE[n] != POLICY_FILE[name]]
    pods = {}
    for role, template in pod_templates(doc):
        labels = kuberay_labels(doc, role, template)
        # the policy fences the head and every worker, no other of ours adds to what it
        # admits (Kubernetes admits what any selecting policy admits); the submitter only
        # calls out
        assert selects(policy["spec"]["podSelector"], labels) is (role != "submitter"), role
        assert not any(selects(o["spec"]["podSelector"], labels) for o in others), role
        if role != "submitter":
            pods.setdefault(role, labels)
    assert set(pods) == {"head", "worker"}
    expected = [
        ("a pod of the same cluster", Peer(NAMESPACE, pods["worker"]), ALL_PORTS),
        ("the KubeRay operator", OPERATOR, {PORTS["job API"]}),
        ("Prometheus", PROMETHEUS, {PORTS["metrics"]}),
        ("the ingress", INGRESS, {PORTS["Serve"]} if doc["kind"] == "RayService" else set()),
        ("another pod of the namespace", STRANGER, set()),
        ("another pod of Prometheus' namespace", GRAFANA, set()),
        ("another pod of the ingress' namespace", Peer(INGRESS.namespace, STRANGER.labels), set()),
        ("the ingress' label here", Peer(NAMESPACE, INGRESS.labels), set()),
        ("Prometheus' label here", Peer(NAMESPACE, PROMETHEUS.labels), set()),
        ("a look-alike in another namespace", Peer("elsewhere", pods["worker"]), set()),
        ("another ddm cluster", Peer(NAMESPACE, a_worker(OTHER_CLUSTER[name], tmp_path)), set()),
    ]
    if doc["kind"] == "RayJob":
        (submitter,) = [t for r, t in pod_templates(doc) if r == "submitter"]
        submitter_pod = kuberay_labels(doc, "submitter", submitter)
        expected.append(("the submitter", Peer(NAMESPACE, submitter_pod), {PORTS["job API"]}))
    if doc["kind"] == "RayService":  # the cluster an upgrade brings up beside the old one
        upgrade = Peer(NAMESPACE, a_worker(name, tmp_path, cluster="ddm-n3w4c"))
        expected.append(("the next cluster of an upgrade", upgrade, ALL_PORTS))
    # one policy fences the head and the workers alike
    for who, peer, ports in expected:
        assert {p for p in ALL_PORTS if admitted(policy, peer, p)} == ports, who


# --- Serve ------------------------------------------------------------------------------------


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
    for _, pod in pod_groups(service):
        ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
        assert config["http_options"] == {"host": "0.0.0.0", "port": ports["serve"]}


def test_serve_traffic_waits_for_readyz():
    from router_service.http_api import make_api

    service = load("rayservice.yaml")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    # the Service's endpoints are the workers, each with a proxy of its own that the probe
    # asks; the head is left out of it
    assert config["proxy_location"] == "EveryNode"
    assert service["spec"]["excludeHeadPodFromServeSvc"] is True
    routes = {(r.path, m) for r in make_api(lambda: None).routes for m in r.methods}
    (_, head), *workers = pod_templates(service)
    for c in head["spec"]["containers"]:
        # KubeRay deploys the application only once the head is Ready
        assert "readinessProbe" not in c and "livenessProbe" not in c
    assert workers
    for _, template in workers:
        (c,) = template["spec"]["containers"]
        probe = c["readinessProbe"]["httpGet"]
        assert (probe["path"], "GET") in routes and probe["path"] == "/readyz"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports[probe["port"]] == config["http_options"]["port"]
        assert "livenessProbe" not in c  # KubeRay's, on this pod's raylet, stays


# --- the read-only root, for real -------------------------------------------------------------

_INNER = """\
set -u
export PATH={bin}:/usr/bin:/bin HOME=/ RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN={token}
cd /
echo "USER $(id -u):$(id -g)"
if touch /ddm-probe 2>/dev/null; then echo ROOT_WRITABLE; else echo ROOT_READ_ONLY; fi
ray start --head --num-cpus=2 --port={gcs} --dashboard-host=127.0.0.1 \\
  --dashboard-port={dashboard} --metrics-export-port={metrics} \\
  --ray-client-server-port={client} --dashboard-agent-listen-port={agent} \\
  --disable-usage-stats > /tmp/stage/start.log 2>&1 || tail -20 /tmp/stage/start.log
URL=http://127.0.0.1:{dashboard}
ray job submit --address $URL -- sh /tmp/stage/entrypoint > /tmp/stage/job.log 2>&1
echo "JOB_RC=$?"; tail -5 /tmp/stage/job.log
env -u RAY_AUTH_MODE -u RAY_AUTH_TOKEN ray job list --address $URL > /dev/null 2>&1
echo "UNAUTHENTICATED_CLI_RC=$?"
python -c '
import urllib.error, urllib.request
try:
    urllib.request.urlopen("'$URL'/api/jobs/", timeout=10)
    print("UNAUTHENTICATED_HTTP=200")
except urllib.error.HTTPError as e:
    print(f"UNAUTHENTICATED_HTTP={{e.code}}")
'
serve deploy /tmp/stage/serve.yaml -a $URL > /tmp/stage/deploy.log 2>&1
echo "DEPLOY_RC=$?"; tail -3 /tmp/stage/deploy.log
python -c '
import time, urllib.request
deadline, code = time.monotonic() + 240, None
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen("http://127.0.0.1:{serve}/readyz", timeout=5) as r:
            code = r.status
            break
    except Exception as e:
        code = getattr(e, "code", repr(e))
        time.sleep(2)
print(f"READYZ={{code}}")
'
echo "READ_ONLY_ERRORS=$(grep -rhi 'read-only file system' /tmp/ray/session_latest/logs | wc -l)"
grep -rhi 'read-only file system' /tmp/ray/session_latest/logs | sort | uniq -c | head
"""


def _hidden_prefixes(paths: list[str]) -> dict[str, list[str]]:
    """For each path, the topmost ancestor others cannot enter (like /root for a pyenv
    Python): the chroot shows such an ancestor as an empty folder with only the path in it."""
    hidden: dict[str, list[str]] = {}
    for path in paths:
        parts = Path(path).parts
        for i in range(2, len(parts)):
            ancestor = str(Path(*parts[:i]))
            if not os.stat(ancestor).st_mode & 0o001:
                hidden.setdefault(ancestor, []).append(path)
                break
    return hidden


@pytest.mark.integration
def test_ray_runs_on_a_read_only_root_as_the_manifests_user(tmp_path):
    """A Ray head, a Ray Train expert run submitted through the token-guarded job API, and
    the Serve app until /readyz answers 200, as the manifests' uid and gid, without
    capabilities or new privileges, on a read-only root where only the manifests' emptyDir
    paths (/tmp, /dev/shm) are writable: what readOnlyRootFilesystem: true asks of Ray."""
    tools = [shutil.which(t) for t in ("unshare", "chroot", "setpriv")]
    if os.geteuid() != 0 or None in tools:
        pytest.skip("needs root and unshare, chroot, setpriv for a read-only root")
    if subprocess.run(["unshare", "--mount", "--pid", "--fork", "true"]).returncode != 0:
        pytest.skip("no mount and PID namespaces here")
    head = load("raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]
    (ray,) = head["containers"]
    uid, gid = ray["securityContext"]["runAsUser"], ray["securityContext"]["runAsGroup"]
    scratch = {v["name"] for v in head["volumes"] if "emptyDir" in v}
    writable = sorted(m["mountPath"] for m in ray["volumeMounts"] if m["name"] in scratch)
    assert writable == ["/dev/shm", "/tmp"]

    build_tiny_ddm(tmp_path / "store", clusters=2, image_size=8)
    stage = tmp_path / "stage"
    stage.mkdir()
    cfg = TrainConfig(
        kind="expert",
        store="/tmp/store",
        cluster=0,
        preset="dit-tiny",
        steps=6,  # 3 more than build_tiny_ddm's: a resumed run that writes a checkpoint
        batch_size=8,
        checkpoint_every=3,
        cpus_per_worker=1,
    )
    (stage / "entrypoint").write_text(entrypoint(cfg))
    ports = {k: free_port() for k in ("gcs", "dashboard", "metrics", "client", "agent", "serve")}
    serve = {
        "http_options": {"host": "127.0.0.1", "port": ports["serve"]},
        "applications": [
            {
                "name": "ddm",
                "route_prefix": "/",
                "import_path": "router_service.app:build_app",
                "args": {"store": "/tmp/store", "expert_num_cpus": 0.1, "router_num_cpus": 0.1},
            }
        ],
    }
    (stage / "serve.yaml").write_text(yaml.safe_dump(serve))
    bin_dir = str(Path(sys.executable).parent)
    inner = _INNER.format(bin=bin_dir, token=secrets.token_hex(16), **ports)
    (stage / "inner.sh").write_text(inner)

    new_root = tmp_path / "root"
    new_root.mkdir()
    r = shlex.quote(str(new_root))
    lines = [
        "set -e",
        f"mount --bind / {r}",
        f"mount -o remount,bind,ro {r}",
        f"mount -t proc proc {r}/proc",  # this PID namespace's processes only
        f"mount --rbind /sys {r}/sys",
        f"mount --rbind /dev {r}/dev",
    ]
    lines += [f"mount -t tmpfs -o mode=1777 tmpfs {r}{p}" for p in writable]
    for ancestor, paths in _hidden_prefixes([sys.base_prefix, sys.prefix, str(ROOT)]).items():
        lines.append(f"mount -t tmpfs -o mode=755 tmpfs {r}{ancestor}")
        for p in paths:
            lines += [
                f"mkdir -p {r}{p}",
                f"mount --bind {p} {r}{p}",
                f"mount -o remount,bind,ro {r}{p}",
            ]
        lines.append(f"mount -o remount,ro {r}{ancestor}")
    lines += [
        f"cp -a {tmp_path / 'store'} {stage} {r}/tmp/",
        f"chown -R {uid}:{gid} {r}/tmp/store {r}/tmp/stage",
        f"exec chroot {r} setpriv --reuid={uid} --regid={gid} --clear-groups --no-new-privs"
        " --bounding-set=-all --inh-caps=-all bash /tmp/stage/inner.sh",
    ]
    # a PID namespace of its own: when the script ends, every Ray process it started ends too
    done = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "bash", "-c", "\n".join(lines)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = done.stdout
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"USER {uid}:{gid}" in out and "ROOT_READ_ONLY" in out, out
    assert "JOB_RC=0" in out, out
    assert "UNAUTHENTICATED_HTTP=401" in out and "UNAUTHENTICATED_CLI_RC=0" not in out, out
    assert "DEPLOY_RC=0" in out and "READYZ=200" in out, out
    assert "READ_ONLY_ERRORS=0" in out, out
