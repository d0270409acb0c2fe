"""Kubernetes manifests in deploy/k8s, validated offline.

- Every core resource is validated against the Kubernetes OpenAPI schemas that the `kubernetes-validate` package
  ships, in strict mode (unknown fields are errors), for the oldest and newest versions we support.
- KEDA's ScaledObject and TriggerAuthentication are custom resources outside those schemas: a JSON schema here
  covers the fields this repository uses (unknown fields are errors too) and the cross-references are checked.
- Invariants: one GPU per gpu-worker pod in limits, a grace period longer than the documented shard budget,
  probes that read a heartbeat file (never the broker, never the task) and really fail only on a stale heartbeat,
  secrets referenced and never inlined, every $(VAR) defined before use, names that point at real objects.
- `kubectl kustomize` builds the whole set where kubectl is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml

from tests.deploy.tools import need

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
#: Oldest Kubernetes these manifests target (Indexed Jobs, pod failure handling, KEDA 2.x all need >= 1.27).
K8S_VERSIONS = ("1.29.0", "latest")
SECRET_NAME = "orch-secrets"
CREDENTIAL = re.compile(r"PASSWORD|AUTH|SECRET|TOKEN|ACCESS_KEY")
#: uid of the `orch` user in both Dockerfiles.
IMAGE_UID = 10001


def _kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _applied() -> list[dict]:
    """Every object `kubectl apply -k deploy/k8s` creates (before kustomize's transformations)."""
    return [d for name in _kustomization()["resources"] for d in _docs(K8S / name)]


def _all_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def _all_docs() -> list[tuple[str, dict]]:
    return [(str(p.relative_to(K8S)), d) for p in _all_files() for d in _docs(p)]


def _get(kind: str, name: str, docs: list[dict] | None = None) -> dict:
    matches = [d for d in (docs or _applied()) if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def _pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            out.append((f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"]))
    return out


def _containers(docs: list[dict]) -> list[tuple[str, dict, dict]]:
    return [
        (f"{owner}/{c['name']}", c, spec)
        for owner, spec in _pod_specs(docs)
        for c in spec.get("initContainers", []) + spec["containers"]
    ]


def _worker_containers() -> list[tuple[str, dict, dict]]:
    return [(n, c, s) for n, c, s in _containers(_applied()) if c.get("args", [None])[0] == "worker"]


def _example_docs() -> list[dict]:
    return [d for p in sorted((K8S / "examples").glob("*.yaml")) for d in _docs(p)]


# -- the set of files -------------------------------------------------------------------------------------------------


def test_kustomization_applies_every_manifest_but_the_secret_and_the_examples():
    resources = _kustomization()["resources"]
    for name in resources:
        assert (K8S / name).is_file(), name
    top = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) == top - {"secret.example.yaml"}
    assert _kustomization()["namespace"] == "orch"
    assert not [d for d in _applied() if d["kind"] == "Secret"], "no credential lives in git"


# -- schemas --------------------------------------------------------------------------------------------------------

_CORE = [(f, d) for f, d in _all_docs() if not d["apiVersion"].startswith("keda.sh/")]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "doc", [d for _, d in _CORE], ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in _CORE]
)
def test_manifest_matches_the_kubernetes_schema(doc, version):
    kv = need("kubernetes_validate")
    if version == "latest":
        version = kv.latest_version()
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as e:
        pytest.fail(f"{'/'.join(map(str, e.path))}: {e.message}")


def test_strict_schema_check_is_not_vacuous():
    kv = need("kubernetes_validate")
    doc = _get("Deployment", "gpu-worker")
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["exec"]["comand"] = ["true"]
    with pytest.raises(kv.ValidationError, match="comand"):
        kv.validate(doc, "1.29.0", strict=True)


_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_NAME_REF = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string", "minLength": 1}},
}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}

#: The parts of KEDA 2.x's CRDs (keda.sh/v1alpha1) this repository uses; additionalProperties=false catches typos.
KEDA_SCHEMAS = {
    "TriggerAuthentication": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": "TriggerAuthentication"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["secretTargetRef"],
                "additionalProperties": False,
                "properties": {
                    "secretTargetRef": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["parameter", "name", "key"],
                            "additionalProperties": False,
                            "properties": {
                                "parameter": {"type": "string"},
                                "name": {"type": "string"},
                                "key": {"type": "string"},
                            },
                        },
                    }
                },
            },
        },
    },
    "ScaledObject": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "keda.sh/v1alpha1"},
            "kind": {"const": "ScaledObject"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "name": {"type": "string"},
                            "envSourceContainerName": {"type": "string"},
                        },
                    },
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "idleReplicaCount": {"type": "integer", "minimum": 0},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "advanced": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "restoreToOriginalReplicaCount": {"type": "boolean"},
                            "horizontalPodAutoscalerConfig": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"name": {"type": "string"}, "behavior": {"type": "object"}},
                            },
                        },
                    },
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "additionalProperties": False,
                            "properties": {
                                "type": {"type": "string"},
                                "name": {"type": "string"},
                                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                "useCachedMetrics": {"type": "boolean"},
                                # KEDA reads trigger metadata as map[string]string: numbers must be quoted.
                                "metadata": _STRING_MAP,
                                "authenticationRef": _NAME_REF,
                            },
                        },
                    },
                },
            },
        },
    },
}
#: Metadata keys of KEDA's `redis` (lists) scaler.
REDIS_SCALER_KEYS = {
    "address",
    "host",
    "port",
    "listName",
    "listLength",
    "activationListLength",
    "databaseIndex",
    "enableTLS",
    "unsafeSsl",
    "addressFromEnv",
    "hostFromEnv",
    "portFromEnv",
    "usernameFromEnv",
    "passwordFromEnv",
}


def _keda_docs() -> list[dict]:
    return [d for d in _applied() if d["apiVersion"].startswith("keda.sh/")]


def test_keda_objects_match_their_schema():
    jsonschema = need("jsonschema")
    kinds = sorted(d["kind"] for d in _keda_docs())
    assert kinds == ["ScaledObject", "TriggerAuthentication"]
    for doc in _keda_docs():
        jsonschema.Draft202012Validator(KEDA_SCHEMAS[doc["kind"]]).validate(doc)
    broken = json.loads(json.dumps(_get("ScaledObject", "gpu-worker")))
    broken["spec"]["triggers"][0]["metadata"]["listLength"] = 1
    broken["spec"]["cooldownperiod"] = 600
    errors = list(jsonschema.Draft202012Validator(KEDA_SCHEMAS["ScaledObject"]).iter_errors(broken))
    assert len(errors) == 2


def test_keda_scales_the_gpu_worker_on_the_gpu_queue():
    from shared import constants as C

    so = _get("ScaledObject", "gpu-worker")["spec"]
    target = _get("Deployment", so["scaleTargetRef"]["name"])
    assert so["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert "replicas" not in target["spec"], "KEDA owns the replica count; an apply must not reset it"
    assert so["minReplicaCount"] == 0 and so["cooldownPeriod"] >= 60 and so["maxReplicaCount"] >= 1
    (trigger,) = so["triggers"]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    assert set(meta) <= REDIS_SCALER_KEYS, set(meta) - REDIS_SCALER_KEYS
    assert meta["listName"] == C.QUEUE_GPU, "kombu's Redis list for a queue is named after the queue"
    assert int(meta["listLength"]) >= 1 and int(meta.get("activationListLength", "0")) >= 0
    # The operator runs in KEDA's namespace: the address must name the Service with its namespace.
    host, port = meta["address"].rsplit(":", 1)
    svc = _get("Service", "redis")
    assert host == f"redis.{_kustomization()['namespace']}.svc.cluster.local"
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
    auth = _get("TriggerAuthentication", trigger["authenticationRef"]["name"])["spec"]["secretTargetRef"]
    assert auth == [{"parameter": "password", "name": SECRET_NAME, "key": "REDIS_PASSWORD"}]


# -- GPU workers ----------------------------------------------------------------------------------------------------


def test_gpu_worker_asks_for_one_gpu_in_limits():
    (container,) = _get("Deployment", "gpu-worker")["spec"]["template"]["spec"]["containers"]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources.get("requests", {}).get("nvidia.com/gpu", 1) == 1
    args = container["args"]
    assert args[args.index("--queues") + 1] == "gpu" and args[args.index("--gpus") + 1] == "0"


def test_gpu_worker_grace_period_covers_a_shard():
    dep = _get("Deployment", "gpu-worker")
    budget = int(dep["metadata"]["annotations"]["m3fd-orchestrator/shard-budget-seconds"])
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert budget >= 600, "the budget is a real bound for a shard, not a token"
    assert grace >= budget + 120, "room to upload and record after the last image"
    assert "preStop" not in str(dep), "exec-form entrypoint: SIGTERM reaches Celery without a preStop hook"
    # the compose file gives the same shard the same room
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["gpu-worker"]["stop_grace_period"] == f"{grace // 60}m"


def test_train_worker_takes_eight_gpus_and_a_memory_backed_shm():
    spec = _get("Deployment", "train-worker")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["args"] == ["worker", "--queues", "train", "--gpus", "all"]
    shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert len(shm) == 1
    (vol,) = [v for v in spec["volumes"] if v["name"] == shm[0]["name"]]
    assert vol["emptyDir"]["medium"] == "Memory"
    assert _get("Deployment", "train-worker")["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("owner", ["gpu-worker", "train-worker", "cpu-worker"])
def test_worker_probes_read_the_heartbeat_and_never_the_broker(owner):
    (container,) = _get("Deployment", owner)["spec"]["template"]["spec"]["containers"]
    assert "startupProbe" in container, "a cold start (torch import, model load) must not count as a hang"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if probe is None:
            continue
        command = " ".join(probe["exec"]["command"])
        assert "ORCH_HEARTBEAT_FILE" in command, (kind, command)
        assert not re.search(r"celery|inspect|redis|ping|curl", command), (kind, command)
    live = container["livenessProbe"]
    # A restart needs minutes of silence: far longer than the heartbeat period of the Celery main process.
    assert live["periodSeconds"] * live["failureThreshold"] >= 300
    assert live["timeoutSeconds"] >= 5


def _run_probe(command: list[str], heartbeat: Path) -> int:
    env = {**os.environ, "ORCH_HEARTBEAT_FILE": str(heartbeat)}
    return subprocess.run(command, env=env, capture_output=True, timeout=10).returncode


def test_liveness_probe_fails_only_on_a_stale_heartbeat(tmp_path):
    """Run the probe commands as the kubelet would (they are plain sh + GNU find/test, as in the images)."""
    (container,) = _get("Deployment", "gpu-worker")["spec"]["template"]["spec"]["containers"]
    startup, ready, live = (
        container[k]["exec"]["command"] for k in ("startupProbe", "readinessProbe", "livenessProbe")
    )
    beat = tmp_path / "heartbeat"
    assert _run_probe(startup, beat) != 0 and _run_probe(live, beat) != 0
    beat.touch()  # the main process beats; the pool child may be busy for half an hour, it does not matter
    assert _run_probe(startup, beat) == 0 and _run_probe(ready, beat) == 0 and _run_probe(live, beat) == 0
    aged = time.time() - 200
    os.utime(beat, (aged, aged))
    assert _run_probe(ready, beat) != 0, "not ready after 2 minutes of silence"
    assert _run_probe(live, beat) == 0, "but not restarted yet"
    aged = time.time() - 400
    os.utime(beat, (aged, aged))
    assert _run_probe(live, beat) != 0


def test_heartbeat_file_is_set_in_the_images():
    for image in ("Dockerfile.worker", "Dockerfile.orchestrator"):
        text = (ROOT / "deploy" / "docker" / image).read_text()
        assert re.search(r"ORCH_HEARTBEAT_FILE=/run/orch/heartbeat", text), image
        assert "chown orch:orch /data/artifacts /run/orch" in text, image


def test_workers_see_storage_inputs_and_models_at_the_configured_paths():
    config = _get("ConfigMap", "orch-config")["data"]
    assert config["HF_HUB_OFFLINE"] == "1"
    for owner, c, spec in _worker_containers():
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {
            m["mountPath"]: (claims.get(m["name"]), m.get("readOnly", False)) for m in c["volumeMounts"]
        }
        assert mounts[config["ORCH_STORAGE"]] == ("artifacts", False), owner
        assert mounts[config["HF_HOME"]] == ("hf-cache", True), owner
        if "/data/in" in mounts or owner.startswith(("Deployment/gpu-worker", "Deployment/train-worker")):
            assert mounts["/data/in"] == ("datasets", True), owner
    for claim in ("artifacts", "hf-cache", "datasets"):
        assert _get("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"], claim


# -- secrets and variables ------------------------------------------------------------------------------------------


def _configmap_keys(name: str) -> set[str]:
    return set(_get("ConfigMap", name)["data"])


def test_secrets_are_referenced_never_inlined():
    referenced: set[str] = set()
    for owner, c, _ in _containers(_applied() + _example_docs()):
        for e in c.get("env", []):
            if CREDENTIAL.search(e["name"]) and e["name"] != "FLOWER_UNAUTHENTICATED_API":
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                assert ref and ref["name"] == SECRET_NAME, f"{owner}: {e['name']} must come from the Secret"
                referenced.add(ref["key"])
            if "value" in e:
                assert not re.search(r"://[^/:@]*:[^$@/][^@/]*@", e["value"]), (
                    f"{owner}: literal password in {e}"
                )
        for env_from in c.get("envFrom", []):
            assert "secretRef" not in env_from or env_from["secretRef"]["name"] == SECRET_NAME
    for d in _applied():
        if d["kind"] == "ConfigMap":
            for key in d["data"]:
                assert not CREDENTIAL.search(key), f"ConfigMap {d['metadata']['name']} holds {key}"
    example = _get("Secret", SECRET_NAME, _docs(K8S / "secret.example.yaml"))
    assert set(example["stringData"]) == referenced | {"REDIS_PASSWORD"}
    assert all("REPLACE" in v for v in example["stringData"].values()), "placeholders only"


def test_every_variable_reference_is_defined_before_use():
    """Kubernetes leaves an undefined $(VAR) as literal text, which would become a wrong password or host."""
    ref = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
    for owner, c, _ in _containers(_applied() + _example_docs()):
        defined: set[str] = set()
        for env_from in c.get("envFrom", []):
            if "configMapRef" in env_from:
                defined |= _configmap_keys(env_from["configMapRef"]["name"])
        for e in c.get("env", []):
            for name in ref.findall(e.get("value", "")):
                assert name in defined, f"{owner}: {e['name']} uses $({name}) before it is defined"
            defined.add(e["name"])
        for arg in c.get("command", []) + c.get("args", []):
            for name in ref.findall(arg):
                assert name in defined, f"{owner}: argument uses undefined $({name})"


def test_connection_urls_use_the_secret_passwords():
    for name, c, _ in _worker_containers() + [("flower", *_get_container("Deployment", "flower"))]:
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["ORCH_BROKER_URL"] == "redis://:$(REDIS_PASSWORD)@$(REDIS_HOST):6379/0", name
        assert (
            env["ORCH_DATABASE_URL"]
            == "postgresql+psycopg2://orch:$(POSTGRES_PASSWORD)@$(POSTGRES_HOST):5432/orch"
        )


def _get_container(kind: str, name: str) -> tuple[dict, dict]:
    spec = _get(kind, name)["spec"]["template"]["spec"]
    return spec["containers"][0], spec


def test_redis_requires_the_password_from_the_secret():
    c, _ = _get_container("StatefulSet", "redis")
    args = c["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    (pw,) = [e for e in c["env"] if e["name"] == "REDIS_PASSWORD"]
    assert pw["valueFrom"]["secretKeyRef"] == {"name": SECRET_NAME, "key": "REDIS_PASSWORD"}


def test_flower_always_asks_for_credentials():
    c, _ = _get_container("Deployment", "flower")
    args = c["args"]
    assert args[0] == "flower" and args[args.index("--basic-auth") + 1] == "$(FLOWER_BASIC_AUTH)"
    env = {e["name"]: e for e in c["env"]}
    assert env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]["key"] == "FLOWER_BASIC_AUTH"
    assert env["FLOWER_UNAUTHENTICATED_API"]["value"] == "false"
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/healthcheck", "the one page Flower serves without credentials"


def test_migrations_run_once_as_a_job():
    job = _get("Job", "orch-migrate")
    c, spec = _get_container("Job", "orch-migrate")
    assert c["args"] == ["db", "upgrade"]
    assert spec["restartPolicy"] in ("OnFailure", "Never")
    assert job["spec"]["backoffLimit"] >= 3, "PostgreSQL may still be starting"
    assert job["spec"]["ttlSecondsAfterFinished"] > 0, "so the next apply re-runs the (idempotent) upgrade"


def test_postgres_keeps_its_data_on_a_claim():
    sts = _get("StatefulSet", "postgres")
    c, _ = _get_container("StatefulSet", "postgres")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert any(
        m["name"] == claim["metadata"]["name"] and m["mountPath"] == "/var/lib/postgresql/data"
        for m in c["volumeMounts"]
    )
    env = {e["name"]: e for e in c["env"]}
    assert env["PGDATA"]["value"].startswith("/var/lib/postgresql/data/")
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == SECRET_NAME


# -- names that point at real objects -----------------------------------------------------------------------------


def test_references_resolve():
    docs = _applied()
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    for owner, spec in _pod_specs(docs):
        for vol in spec.get("volumes", []):
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in claims, (owner, vol)
            if "configMap" in vol:
                assert vol["configMap"]["name"] in configmaps, (owner, vol)
        mounted = {v["name"] for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            for m in c.get("volumeMounts", []):
                templates = {
                    t["metadata"]["name"]
                    for d in docs
                    if d["kind"] == "StatefulSet" and d["spec"]["template"]["spec"] is spec
                    for t in d["spec"].get("volumeClaimTemplates", [])
                }
                assert m["name"] in mounted | templates, (owner, m)
            for env_from in c.get("envFrom", []):
                if "configMapRef" in env_from:
                    assert env_from["configMapRef"]["name"] in configmaps
    for svc in (d for d in docs if d["kind"] == "Service"):
        selected = [
            spec
            for d in docs
            if d["kind"] in ("Deployment", "StatefulSet")
            for spec in [d["spec"]["template"]]
            if all(spec["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items())
        ]
        assert len(selected) == 1, f"Service {svc['metadata']['name']} selects {len(selected)} workloads"
    for sts in (d for d in docs if d["kind"] == "StatefulSet"):
        _get("Service", sts["spec"]["serviceName"])
    config = _get("ConfigMap", "orch-config")["data"]
    assert config["REDIS_HOST"] == "redis" and config["POSTGRES_HOST"] == "postgres"
    _get("Service", config["REDIS_HOST"])
    _get("Service", config["POSTGRES_HOST"])


def test_orchestrator_pods_run_as_the_image_user():
    for owner, spec in _pod_specs(_applied() + _example_docs()):
        images = {c["image"].split(":")[0] for c in spec["containers"]}
        if not any(i.startswith("m3fd-orchestrator/") for i in images):
            continue
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == IMAGE_UID, owner
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, owner
        writes_artifacts = any(
            v.get("persistentVolumeClaim", {}).get("claimName") == "artifacts"
            for v in spec.get("volumes", [])
        )
        if writes_artifacts:
            assert sc.get("fsGroup") == IMAGE_UID, f"{owner}: fsGroup makes the shared volume writable"


def test_kustomize_images_are_the_ones_the_manifests_use():
    declared = {i["name"] for i in _kustomization()["images"]}
    used = {
        c["image"].split(":")[0]
        for _, c, _ in _containers(_applied())
        if c["image"].startswith("m3fd-orchestrator/")
    }
    assert used == declared == {"m3fd-orchestrator/worker", "m3fd-orchestrator/orchestrator"}


# -- the multi-node DDP example -----------------------------------------------------------------------------------


def test_multinode_example_rendezvous_is_wired_to_the_headless_service():
    docs = _example_docs()
    job = _get("Job", "ddp-ncsn", docs)
    svc = _get("Service", "ddp-ncsn", docs)
    spec = job["spec"]
    (c,) = spec["template"]["spec"]["containers"]
    args = dict(a.split("=", 1) for a in c["args"] if a.startswith("--") and "=" in a)
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(args["--nnodes"]) == 2
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert spec["template"]["spec"]["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    host, port = args["--rdzv-endpoint"].rsplit(":", 1)
    # Indexed Job pods are named JOB-INDEX; pod 0's stable name under the headless Service hosts the store.
    assert host == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
    assert args["--rdzv-backend"] == "c10d"
    assert c["command"][-1] == "torchrun"
    assert int(args["--nproc-per-node"]) == c["resources"]["limits"]["nvidia.com/gpu"]
    module = c["args"][c["args"].index("-m") + 1]
    assert find_spec(module) is not None, module
    config_path = Path(c["args"][c["args"].index("--config") + 1])
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    config = json.loads(cm["data"][config_path.name])
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts[str(config_path.parent)] == "config"
    assert any(config["run_dir"].startswith(path + "/") for path in mounts if mounts[path] == "artifacts")
    grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < grace


# -- kubectl (where installed) --------------------------------------------------------------------------------------


def test_kustomize_builds_the_set_into_one_namespace():
    kubectl = shutil.which("kubectl") or (Path(sys.executable).parent / "kubectl")
    if not Path(kubectl).exists():
        pytest.skip("kubectl not installed")
    out = subprocess.run([str(kubectl), "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(built) == len(_applied())
    for d in built:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "orch", d["metadata"]["name"]
    images = {c["image"] for _, c, _ in _containers(built) if "m3fd-orchestrator/" in c["image"]}
    assert images == {"m3fd-orchestrator/worker:latest", "m3fd-orchestrator/orchestrator:latest"}
