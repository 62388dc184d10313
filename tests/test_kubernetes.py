"""The Ray Serve config and the Kubernetes manifests, checked offline.

- ``deploy/ray/serve.yaml``: Ray's own ``ServeDeploySchema``; its deployments are the ones the
  application builds (the ingress and one ``model-<name>`` per bundled model), and its ``args``
  are what the builder accepts.
- ``deploy/kubernetes/``: every document of a core kind against Kubernetes' published schemas
  (kubernetes-validate, strict: unknown fields fail). The KubeRay ``RayService``: its
  ``serveConfigV2`` is the text of ``deploy/ray/serve.yaml`` (one config, two places) and passes
  Ray's schema; its head and worker pod templates pass as core ``PodTemplateSpec``s. The
  CRDs of the Prometheus Operator are checked for what they must point at.
- The wiring: probes on the routes that answer them, the GPU limit, the Service and monitors
  selecting the pods they are meant for, the HPA reading a metric the service exports and the
  adapter rule serves, every ``SEG_*`` variable being a setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from service.core.config import REPO_MODELS, Settings
from service.core.telemetry import ServiceMetrics
from service.segmentation.registry import find_model_files

kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[1]
KUBE = REPO / "deploy" / "kubernetes"
SERVE_YAML = REPO / "deploy" / "ray" / "serve.yaml"
CORE_GROUPS = ("v1", "apps/v1", "autoscaling/v2", "policy/v1", "networking.k8s.io/v1")


def documents(name: str) -> list[dict[str, Any]]:
    """The YAML documents of one manifest file."""
    return [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d]


def of_kind(kind: str) -> list[dict[str, Any]]:
    """Every document of ``kind`` in deploy/kubernetes/."""
    return [d for f in sorted(KUBE.glob("*.yaml")) for d in documents(f.name) if d["kind"] == kind]


def one(kind: str) -> dict[str, Any]:
    (doc,) = of_kind(kind)
    return doc


def validate_core(doc: dict[str, Any]) -> None:
    """Kubernetes' own schema for the newest version kubernetes-validate knows (strict)."""
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def validate_pod_template(template: dict[str, Any], name: str) -> None:
    """A pod template as a core PodTemplateSpec (inside a v1 PodTemplate object)."""
    validate_core(
        {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": name},
            "template": template,
        }
    )


def ray_service() -> dict[str, Any]:
    return one("RayService")


# --- the Serve config ---------------------------------------------------------------------------


def test_the_serve_config_passes_rays_schema_and_names_what_the_app_builds() -> None:
    from ray.serve.schema import ServeDeploySchema

    from service.rayserve.app import INGRESS, METRICS_HUB, AppArgs, model_deployment_name

    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_YAML.read_text()))
    (app,) = config.applications
    assert app.import_path == "service.rayserve.app:build_app"
    AppArgs.model_validate(app.args)  # extra="forbid": a misspelt argument fails here
    named = {d.name for d in app.deployments}
    models = {model_deployment_name(m) for m in find_model_files(REPO_MODELS)}
    assert named == {INGRESS, METRICS_HUB} | models
    for d in app.deployments:
        if d.name == METRICS_HUB:
            assert d.num_replicas == 1  # one place that holds every replica's metrics
            continue
        assert d.max_queued_requests not in (None, -1), f"{d.name}: an unbounded queue"
        assert d.backpressure_config.retry_after_s == 2, d.name  # as the standalone's 503s
        assert d.autoscaling_config is not None, d.name
    env = app.runtime_env["env_vars"]
    assert all(k.removeprefix("SEG_").lower() in Settings.model_fields for k in env)
    # Serve's queue refuses before the ingress's own gate does.
    ingress = next(d for d in app.deployments if d.name == INGRESS)
    gate_limit = int(env["SEG_INFERENCE_WORKERS"]) + int(env["SEG_MAX_QUEUE"])
    assert gate_limit >= ingress.max_ongoing_requests


def test_the_builder_makes_one_model_deployment_per_model() -> None:
    from service.rayserve.app import build_app

    app = build_app({"model_dir": str(REPO_MODELS)})
    ingress = app._bound_deployment  # the graph's root: the ingress, bound to its handles
    models = ingress.init_args[0]
    assert sorted(models) == sorted(find_model_files(REPO_MODELS))
    with pytest.raises(ValueError, match="not in"):
        build_app({"model_dir": str(REPO_MODELS), "models": ["nuclei", "no-such-model"]})
    with pytest.raises(ValueError, match="max_batch_tile"):
        build_app({"max_batch_tile": 8})


# --- the RayService ----------------------------------------------------------------------------


def test_the_rayservice_runs_the_same_serve_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    text = ray_service()["spec"]["serveConfigV2"]
    assert text == SERVE_YAML.read_text(), (
        "serveConfigV2 in deploy/kubernetes/rayservice.yaml must be deploy/ray/serve.yaml "
        "verbatim (indented under `serveConfigV2: |`)"
    )
    ServeDeploySchema.model_validate(yaml.safe_load(text))


def test_the_rayservice_pod_templates_are_valid_pod_template_specs() -> None:
    import ray

    spec = ray_service()["spec"]["rayClusterConfig"]
    assert spec["rayVersion"] == ray.__version__  # the image's Ray (the scale extra's pin)
    groups = {"head": spec["headGroupSpec"]} | {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"head", "cpu", "gpu"}
    for name, group in groups.items():
        template = group["template"]
        validate_pod_template(template, f"segment-{name}")
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), name
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        # The models come from the shared volume, where SEG_MODEL_DIR says.
        claim = volumes[mounts[env["SEG_MODEL_DIR"]]]["persistentVolumeClaim"]
        assert claim["claimName"] == one("PersistentVolumeClaim")["metadata"]["name"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == int(group["rayStartParams"]["metrics-export-port"])
        assert ports["serve"] == 8000
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpus is not None) == (name == "gpu"), name
    # The model replicas ask for a GPU share, so they land on the GPU group.
    serve_config = yaml.safe_load(SERVE_YAML.read_text())
    for d in serve_config["applications"][0]["deployments"]:
        if d["name"] == "model-nuclei":
            assert 0 < d["ray_actor_options"]["num_gpus"] <= 1


def test_prometheus_scrapes_rays_metrics_everywhere_and_the_services_once() -> None:
    monitors = {m["metadata"]["name"]: m for m in of_kind("PodMonitor")}
    spec = ray_service()["spec"]["rayClusterConfig"]
    templates = [spec["headGroupSpec"]["template"]] + [
        g["template"] for g in spec["workerGroupSpecs"]
    ]

    def selected(monitor: dict[str, Any]) -> list[dict[str, Any]]:
        wanted = monitor["spec"]["selector"]["matchLabels"].items()
        return [t for t in templates if wanted <= t["metadata"]["labels"].items()]

    def ports(template: dict[str, Any]) -> set[str]:
        return {p["name"] for c in template["spec"]["containers"] for p in c["ports"]}

    ray_monitor, service_monitor = monitors["segment-ray"], monitors["segment-service"]
    assert selected(ray_monitor) == templates  # Ray's metrics: every node's agent
    assert [e["port"] for e in ray_monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    # The service's /metrics is already the whole service's (merged over the ingress
    # replicas): scraped through one pod's proxy only, the head's.
    assert selected(service_monitor) == [spec["headGroupSpec"]["template"]]
    (endpoint,) = service_monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] in ports(templates[0])


# --- the plain manifests -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in KUBE.glob("*.yaml")))
def test_every_core_object_passes_kubernetes_schemas(name: str) -> None:
    docs = documents(name)
    assert docs
    for doc in docs:
        if doc["apiVersion"] in CORE_GROUPS:
            validate_core(doc)


def test_the_validator_refuses_a_wrong_manifest() -> None:
    """The check above really checks: an unknown field and a wrong type both fail."""
    deployment = one("Deployment")
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(bad)
    bad = yaml.safe_load(yaml.safe_dump(deployment))
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(bad)


def test_the_deployment_has_a_gpu_probes_on_the_right_routes_and_the_models_volume() -> None:
    deployment = one("Deployment")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert ports["http"] == Settings.model_fields["port"].default
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[env["SEG_MODEL_DIR"]]["readOnly"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in mounts  # uploads spool there
    # Longer than uvicorn's 60 s graceful shutdown, as compose's stop_grace_period.
    assert pod["spec"]["terminationGracePeriodSeconds"] > 60
    assert all(k.removeprefix("SEG_").lower() in Settings.model_fields for k in env)
    assert (
        deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )


def test_the_service_and_its_monitor_reach_the_deployments_pods() -> None:
    deployment, service, monitor = one("Deployment"), one("Service"), one("ServiceMonitor")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    container_ports = {
        p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c["ports"]
    }
    assert port["targetPort"] in container_ports
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"


def test_the_hpa_scales_the_deployment_on_a_metric_the_service_exports() -> None:
    hpa, deployment = one("HorizontalPodAutoscaler"), one("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name == "segment_requests_in_flight"
    exported = {
        s.name
        for family in ServiceMetrics(CollectorRegistry()).registry.collect()
        for s in family.samples
    }
    assert name in exported
    # prometheus-adapter serves it per pod under that name.
    values = yaml.safe_load((KUBE / "prometheus-adapter" / "values.yaml").read_text())
    rules = values["rules"]["custom"]
    assert any(
        name in r["seriesQuery"]
        and r["name"]["as"] == name
        and set(r["resources"]["overrides"]) == {"namespace", "pod"}
        for r in rules
    )
    # Below the point where a pod refuses (workers + queue), so pods are added before 503s.
    env = {
        e["name"]: int(e["value"])
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"] in ("SEG_INFERENCE_WORKERS", "SEG_MAX_QUEUE")
    }
    assert float(metric["pods"]["target"]["averageValue"]) < sum(env.values())
