"""deploy/k8s validates against the Kubernetes API schemas (offline, bundled by kubernetes-validate),
the CRD objects (KEDA, Prometheus Operator) against structural schemas of the fields we use, and the
manifests agree with fluxfleet's own settings (grace above the time limit, queue names, readiness file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from fluxfleet.keys import queue_name
from fluxfleet.settings import DEFAULT_PRESETS_DIR

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install 'fluxfleet[dev]'")

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
# The oldest and newest Kubernetes minor versions whose schemas the package bundles here.
K8S_VERSIONS = ("1.28", kubernetes_validate.utils.latest_version())

STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
LABEL_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": STRING_MAP},
    "required": ["matchLabels"],
}
# Structural schemas of the custom resources, written from their CRDs: required fields, types, no unknown keys.
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "required": ["scaleTargetRef", "triggers"],
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name"],
                        "properties": {
                            n: {"type": "string"} for n in ("name", "kind", "apiVersion", "envSourceContainerName")
                        },
                    },
                    **{
                        n: {"type": "integer", "minimum": 0}
                        for n in (
                            "pollingInterval",
                            "cooldownPeriod",
                            "minReplicaCount",
                            "maxReplicaCount",
                            "idleReplicaCount",
                        )
                    },
                    "advanced": {"type": "object"},
                    "fallback": {"type": "object"},
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": {"type": "string"},
                                "name": {"type": "string"},
                                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                "metadata": STRING_MAP,
                                "authenticationRef": {"type": "object", "required": ["name"]},
                            },
                        },
                    },
                },
            }
        },
    },
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "properties": {
                    "selector": LABEL_SELECTOR,
                    "endpoints": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["port"]}},
                },
            }
        },
    },
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "required": ["selector", "podMetricsEndpoints"],
                "properties": {
                    "selector": LABEL_SELECTOR,
                    "podMetricsEndpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "object", "required": ["port"]},
                    },
                },
            }
        },
    },
}
# The Redis scaler's metadata keys (KEDA docs); a typo here would silently fall back to defaults.
REDIS_SCALER_KEYS = {
    "address",
    "addressFromEnv",
    "host",
    "hostFromEnv",
    "port",
    "portFromEnv",
    "listName",
    "listLength",
    "activationListLength",
    "databaseIndex",
    "enableTLS",
    "unsafeSsl",
}


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{p.relative_to(K8S)}#{i}", doc)
        for p in sorted(K8S.rglob("*.yaml"))
        if p.name != "kustomization.yaml"
        for i, doc in enumerate(load_all(p))
    ]


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def config() -> dict[str, str]:
    (cm,) = [d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "fluxfleet-config"]
    return cm["data"]


def workers() -> list[dict[str, Any]]:
    return [
        d
        for d in of_kind("Deployment")
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "fluxfleet-worker"
    ]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


@pytest.mark.parametrize(("where", "doc"), manifests(), ids=[w for w, _ in manifests()])
def test_every_manifest_validates(where: str, doc: dict[str, Any]) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        jsonschema.validate(doc, CRD_SCHEMAS[key])
        return
    for version in K8S_VERSIONS:
        # strict: unknown fields (a misspelt key Kubernetes would silently drop) fail too.
        kubernetes_validate.validate(doc, version, strict=True)


def test_kustomizations_list_every_manifest() -> None:
    listed: set[Path] = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        doc = yaml.safe_load(kustomization.read_text())
        assert doc["kind"] == "Kustomization"
        for resource in doc["resources"]:
            target = (kustomization.parent / resource).resolve()
            assert target.exists(), f"{kustomization}: {resource} does not exist"
            listed.add(target)
    files = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files <= listed, f"not in any kustomization: {sorted(map(str, files - listed))}"


def test_worker_deployments_match_presets_and_settings() -> None:
    settings = config()
    time_limit = int(settings["FLUXFLEET_WORKER__TASK_TIME_LIMIT_S"])
    assert int(settings["FLUXFLEET_BROKER__VISIBILITY_TIMEOUT_S"]) > time_limit
    assert workers(), "no worker Deployment"
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s for s in of_kind("ScaledObject")}
    for deployment in workers():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        preset = container["args"][container["args"].index("--preset") + 1]
        assert (DEFAULT_PRESETS_DIR / f"{preset}.toml").is_file(), f"unknown preset {preset}"
        # One GPU per pod, and a stopping pod may finish its longest task.
        assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
        assert pod["terminationGracePeriodSeconds"] > time_limit
        # Ready only when the worker has written its ready file (after warm-up).
        env = env_of(container)
        assert container["readinessProbe"]["exec"]["command"] == ["test", "-f", env["FLUXFLEET_WORKER__READY_FILE"]]
        # The compile cache lives on the shared volume.
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        cache_mount = next(p for p in mounts if env["TORCHINDUCTOR_CACHE_DIR"].startswith(p + "/"))
        assert "persistentVolumeClaim" in volumes[mounts[cache_mount]]
        # Metrics scraped where the worker serves them.
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == env["FLUXFLEET_WORKER__METRICS_PORT"]
        # KEDA scales this Deployment on this preset's queue.
        (trigger,) = scaled[deployment["metadata"]["name"]]["spec"]["triggers"]
        assert trigger["type"] == "redis"
        assert set(trigger["metadata"]) <= REDIS_SCALER_KEYS
        assert trigger["metadata"]["listName"] == queue_name(preset)


def test_redis_keeps_queued_work() -> None:
    (redis_config,) = [d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "redis-config"]
    lines = set(redis_config["data"]["redis.conf"].splitlines())
    assert {"appendonly yes", "maxmemory-policy noeviction"} <= lines
    (statefulset,) = of_kind("StatefulSet")
    assert statefulset["spec"]["volumeClaimTemplates"], "AOF on a volume, or a restart loses the queue"


def test_exporter_runs_fluxfleet_exporter() -> None:
    (exporter,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "fluxfleet-exporter"]
    (container,) = exporter["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["fluxfleet", "exporter"]
