"""deploy/: the Kubernetes manifests against Kubernetes' own schemas
(kubernetes-validate), the HAProxy configuration against HAProxy itself,
and the compose file, Prometheus and Grafana files against what the server
really has (its settings, endpoints and metric names)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from runtime.settings import load_settings
from tests.cluster_parts import require

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "kubernetes"
K8S_VERSION = "1.31.0"


def k8s_documents() -> list[tuple[str, dict]]:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    return [(name, doc) for name in listed for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def our_metric_names() -> set[str]:
    """Every series name the server's processes register (counters with their _total)."""
    import batching.metrics  # noqa: F401 - registers its metrics
    import engine.metrics  # noqa: F401
    import server.metrics  # noqa: F401
    from prometheus_client import REGISTRY

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {family.name + suffix for family in REGISTRY.collect() for suffix in suffixes.get(family.type, ("",))}


def test_every_manifest_is_listed_and_valid_kubernetes():
    import kubernetes_validate

    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    kinds = set()
    for name, doc in k8s_documents():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        kinds.add(doc["kind"])
    assert {"Deployment", "Service", "PodDisruptionBudget", "StatefulSet", "HorizontalPodAutoscaler", "ConfigMap"} <= kinds


def test_a_broken_manifest_is_caught():
    import kubernetes_validate

    deployment = next(doc for _, doc in k8s_documents() if doc["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = {"not": "a port"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_the_nodes_probe_real_endpoints_and_drain_within_their_grace_period():
    from app import create_app
    from runtime.settings import Settings

    paths = {route.path.strip("/") for route in create_app(Settings(), engine=_NoEngine()).router.routes}
    deployment = next(doc for _, doc in k8s_documents() if doc["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"].strip("/") in paths
    config = next(doc for _, doc in k8s_documents() if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "lam-a2e")
    settings = load_settings([], config["data"])  # every variable is one the server takes
    assert settings.shared_state and settings.state.startswith("redis://")
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop + settings.graceful_shutdown_s < pod["terminationGracePeriodSeconds"]


def test_the_autoscaler_scales_on_a_metric_we_export_through_the_adapter_rule():
    hpa = next(doc for _, doc in k8s_documents() if doc["kind"] == "HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in our_metric_names()
    rules = next(doc for _, doc in k8s_documents() if doc["metadata"]["name"] == "lam-a2e-prometheus-adapter")
    rule = yaml.safe_load(rules["data"]["config.yaml"])["rules"][0]
    assert metric in rule["seriesQuery"] and rule["name"]["as"] == metric


def test_haproxy_accepts_the_cluster_configuration():
    haproxy = require("haproxy")
    check = subprocess.run([haproxy, "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    text = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    assert "httpchk GET /api/ready" in text and "balance hdr(X-Session-Id)" in text


def test_the_compose_cluster_wires_three_nodes_redis_haproxy_prometheus_and_grafana():
    compose = yaml.safe_load((DEPLOY / "compose.cluster.yaml").read_text())
    services = compose["services"]
    nodes = [name for name in services if name.startswith("node")]
    assert len(nodes) == 3 and {"redis", "haproxy", "prometheus", "grafana"} <= set(services)
    env = services["node1"]["environment"]
    settings = load_settings([], {k: str(v) for k, v in env.items() if k.startswith("A2E_")})
    assert settings.state == "redis://redis:6379/0"
    assert "--appendonly" in services["redis"]["command"]
    for service in services.values():  # every mounted file is in the repository
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source
    haproxy_servers = re.findall(r"server (node\d) \1:8000", (DEPLOY / "haproxy" / "haproxy.cfg").read_text())
    assert sorted(haproxy_servers) == sorted(nodes)
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert sorted(t.split(":")[0] for t in scrape["static_configs"][0]["targets"]) == sorted(nodes)


def test_the_tls_override_mounts_what_the_repository_has_and_loads_tls_cfg_after_the_cluster_file():
    # What the shipped tls.cfg does is tested live (tests/test_tls.py, HAProxy terminating TLS).
    haproxy = yaml.safe_load((DEPLOY / "compose.tls.yaml").read_text())["services"]["haproxy"]
    command = haproxy["command"]
    assert command.index("/usr/local/etc/haproxy/haproxy.cfg") < command.index("/usr/local/etc/haproxy/tls.cfg")
    mounts = dict(volume.split(":")[:2] for volume in haproxy["volumes"])
    assert all((DEPLOY / source).exists() for source in mounts), mounts
    assert mounts["./haproxy/certs"] == "/usr/local/etc/haproxy/certs"
    assert "/usr/local/etc/haproxy/certs/lam-a2e.pem" in (DEPLOY / "haproxy" / "tls.cfg").read_text()
    assert {"8443:8443", "52443:52443"} <= set(haproxy["ports"])


def test_the_dashboard_asks_for_metrics_we_export():
    import json

    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "lam-a2e.json").read_text())
    names = our_metric_names()
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    asked = {m for e in exprs for m in re.findall(r"\b(a2e_[a-z_]+)", e)}
    assert asked and asked <= names, asked - names
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("sessions", "chunks per second", "latency", "batch size", "queue depth", "state store"):
        assert topic in titles


class _NoEngine:
    """Enough of an engine for building the app's routes (no model)."""

    ready = False
    not_ready_reason = "none"
    num_identities = 0

    def __init__(self) -> None:
        from engine.protocol import Limits
        from runtime.settings import Settings

        self.settings = Settings()
        self.limits = Limits(600.0, 10.0)
