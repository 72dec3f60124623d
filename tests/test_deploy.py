"""The deployment files in ``deploy/``, the ``Dockerfile`` and ``docs/deploy.md`` agree with the code.

- Serve configs pass Ray's own schema (``ServeDeploySchema``, ``AutoscalingConfig``), their ``args`` pass
  ``ServiceConfig``, and the application builder they name builds an app with the deployments they tune.
- The KubeRay manifests are checked structurally: ``serveConfigV2`` is ``deploy/serve_config.yaml``, the GPU
  worker asks for GPUs, the weights land where the config loads them, the Services select the head pod.
- Every PromQL query of the Grafana dashboard and of the alert rules names only series the service really
  exports (read from a live ``ServiceMetrics`` exposition) or documented Ray metrics. Without ``promtool``
  this is a structural check with a small regex extractor (tested below), not a PromQL parser; with
  ``promtool`` on PATH (Debian package ``prometheus``) the queries are also parsed and the alert rules
  unit-tested on synthetic series (``deploy/prometheus/alerts_test.yml``).
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

from cellsam_core.weights import cached_weights_path
from serving.config import ServiceConfig
from serving.metrics import METRIC_NAMES, ServiceMetrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SERVE_CONFIGS = ("serve_config.yaml", "serve_config.local.yaml")
ZMQ_PORTS = {5555, 5556}
METRICS_PORT = 9464
HTTP_PORT = 8000
HEAD_RESOURCE = "cellsam_ingress"

#: Ray metrics the dashboard may use, with the Ray source file that defines each (without the ``ray_``
#: prefix Ray's exporter adds). A test checks they exist in the installed Ray.
RAY_METRICS = {
    "ray_node_gpus_utilization": "dashboard/modules/reporter/reporter_agent.py",
    "ray_node_gram_used": "dashboard/modules/reporter/reporter_agent.py",
    "ray_node_gram_available": "dashboard/modules/reporter/reporter_agent.py",
    "ray_serve_deployment_replica_healthy": "serve/_private/deployment_state.py",
}
#: Series Prometheus itself makes for every target.
PROMETHEUS_SERIES = {"up"}


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _rayservice() -> dict[str, Any]:
    (doc,) = _load_all(DEPLOY / "kuberay" / "rayservice.yaml")
    return doc


def _serve_config(name: str) -> dict[str, Any]:
    if name == "rayservice":
        return yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    return _load(DEPLOY / name)


def _deployments(app: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in app["deployments"]}


# --------------------------------------------------------------------------------------- Serve configs


@pytest.mark.parametrize("name", [*SERVE_CONFIGS, "rayservice"])
def test_serve_config_passes_ray_schema(name: str) -> None:
    config = _serve_config(name)
    schema = ServeDeploySchema.model_validate(config)
    assert len(schema.applications) == 1
    (app,) = config["applications"]
    deployments = _deployments(app)
    assert set(deployments) == {"Ingress", "Encoder", "Decoder"}
    for dep in deployments.values():
        # ServeDeploySchema keeps autoscaling_config as a plain dict; Serve validates it at deploy time.
        if "autoscaling_config" in dep:
            AutoscalingConfig(**dep["autoscaling_config"])
            assert dep.get("num_replicas") in (None, "auto"), f"{dep['name']}: num_replicas and autoscaling"
    assert deployments["Ingress"]["num_replicas"] == 1, "the Ingress binds the ZeroMQ ports: one replica"


@pytest.mark.parametrize("name", [*SERVE_CONFIGS, "rayservice"])
def test_serve_config_args_are_a_service_config(name: str) -> None:
    (app,) = _serve_config(name)["applications"]
    config = ServiceConfig.model_validate(app["args"])
    encoder = _deployments(app)["Encoder"]
    # The live-tunable batching equals what the app starts with.
    assert encoder["user_config"] == {
        "max_batch_size": config.encoder.max_batch_size,
        "batch_wait_timeout_s": config.encoder.batch_wait_timeout_s,
    }
    for dep_name, settings in (("Encoder", config.encoder), ("Decoder", config.decoder)):
        actor = _deployments(app)[dep_name]["ray_actor_options"]
        assert actor.get("num_gpus", 0) == settings.num_gpus, f"{dep_name}: args and ray_actor_options differ"


@pytest.mark.parametrize("name", SERVE_CONFIGS)
def test_serve_config_builds_an_app_with_the_configured_deployments(name: str) -> None:
    # Private Serve helpers, but exactly what `serve deploy` does before it places anything: import the
    # builder, call it with `args`, and collect the deployments of the bound graph. No Ray cluster needed.
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app

    (app,) = _serve_config(name)["applications"]
    module_name, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module_name), attr)
    application = call_user_app_builder_with_args_if_necessary(builder, app["args"])
    built = build_app(application, name=app["name"])
    assert {d.name for d in built.deployments} >= set(_deployments(app))
    assert built.ingress_deployment_name == "Ingress"


def test_gpu_serve_config_places_work_on_gpus_and_the_ingress_on_the_head() -> None:
    (app,) = _serve_config("serve_config.yaml")["applications"]
    deps = _deployments(app)
    config = ServiceConfig.model_validate(app["args"])
    assert config.model.device.startswith("cuda")
    assert not config.model.random_weights
    assert deps["Ingress"]["ray_actor_options"]["resources"] == {HEAD_RESOURCE: 1}
    for dep_name in ("Encoder", "Decoder"):
        assert 0 < deps[dep_name]["ray_actor_options"]["num_gpus"] <= 1
        assert "autoscaling_config" in deps[dep_name]
    assert deps["Encoder"]["ray_actor_options"]["num_gpus"] < 1, "fractional GPUs: replicas share a GPU"
    # The Ingress caps the frames in flight, so it caps what the encoder autoscaler can ever see.
    scaling = deps["Encoder"]["autoscaling_config"]
    assert config.ingest.max_concurrent >= scaling["max_replicas"] * scaling["target_ongoing_requests"]
    # Reachable from the microscope and from Prometheus.
    assert config.ingest.endpoint == "tcp://0.0.0.0:5555"
    assert config.results.endpoint == "tcp://0.0.0.0:5556"
    assert (config.metrics.host, config.metrics.port) == ("0.0.0.0", METRICS_PORT)


@pytest.mark.parametrize("name", ["serve_config.yaml", "rayservice"])
def test_cluster_config_authenticates_everything_it_exposes(name: str) -> None:
    config_doc = _serve_config(name)
    (app,) = config_doc["applications"]
    security = ServiceConfig.model_validate(app["args"]).security
    assert security.expose and not security.allow_unauthenticated
    assert security.curve, "ZeroMQ on 0.0.0.0 needs CURVE"
    assert config_doc["http_options"]["host"] == "0.0.0.0"
    assert security.http_token, "HTTP on 0.0.0.0 needs a bearer token"


def test_local_serve_config_is_a_cpu_smoke_test_on_loopback() -> None:
    config_doc = _serve_config("serve_config.local.yaml")
    (app,) = config_doc["applications"]
    config = ServiceConfig.model_validate(app["args"])
    assert (config.model.device, config.model.random_weights, config.model.name) == ("cpu", True, "tiny")
    assert config.ingest.endpoint.startswith("tcp://127.0.0.1:")
    assert config.results.endpoint.startswith("tcp://127.0.0.1:")
    assert config.metrics.host == "127.0.0.1"
    assert config_doc["http_options"]["host"] == "127.0.0.1"
    for dep in app["deployments"]:
        options = dep.get("ray_actor_options", {})
        assert options.get("num_gpus", 0) == 0
        assert "resources" not in options, "a custom resource would never be satisfied on one machine"


# --------------------------------------------------------------------------------------- Kubernetes


def _head_template() -> dict[str, Any]:
    return _rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]


def _gpu_groups() -> list[dict[str, Any]]:
    return _rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def _containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_rayservice_embeds_the_gpu_serve_config() -> None:
    doc = _rayservice()
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    assert isinstance(doc["spec"]["serveConfigV2"], str), "serveConfigV2 is a YAML string"
    assert _serve_config("rayservice") == _serve_config("serve_config.yaml")


def test_rayservice_head_declares_the_ingress_resource_and_ports() -> None:
    head = _rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]
    # rayStartParams values are strings passed to `ray start --resources='...'`: a quoted JSON object.
    resources = json.loads(json.loads(head["rayStartParams"]["resources"]))
    assert resources == {HEAD_RESOURCE: 1}
    (container,) = head["template"]["spec"]["containers"]
    ports = {p["containerPort"] for p in container["ports"]}
    assert ports >= ZMQ_PORTS | {METRICS_PORT, HTTP_PORT}


def test_rayservice_takes_every_secret_from_kubernetes_secrets() -> None:
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    # Ray's own token: KubeRay puts it in every Ray container and uses it for its dashboard calls.
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["authOptions"]["secretName"]
    (app,) = _serve_config("rayservice")["applications"]
    security = ServiceConfig.model_validate(app["args"]).security
    template = _head_template()
    (head,) = template["spec"]["containers"]
    env = {e["name"]: e for e in head.get("env", [])}
    assert security.http_token_env is not None
    assert "secretKeyRef" in env[security.http_token_env]["valueFrom"], "the HTTP token comes from a Secret"
    secret_volumes = {v["name"] for v in template["spec"]["volumes"] if "secret" in v}
    mounts = {m["mountPath"]: m["name"] for m in head["volumeMounts"]}
    assert security.curve_secret_key is not None and security.curve_clients is not None
    assert mounts[str(Path(security.curve_secret_key).parent)] in secret_volumes
    assert mounts[security.curve_clients] in secret_volumes


def test_rayservice_gpu_workers_request_gpus_and_fetch_the_weights_the_config_loads() -> None:
    (app,) = _serve_config("rayservice")["applications"]
    config = ServiceConfig.model_validate(app["args"])
    groups = _gpu_groups()
    assert groups
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        template = group["template"]
        (worker,) = template["spec"]["containers"]
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        (fetch,) = template["spec"]["initContainers"]
        command = fetch["command"]
        assert command[:3] == ["cellsam-stream", "weights", "fetch"]
        cache = Path(command[command.index("--cache-dir") + 1])
        assert config.model.weights == str(cached_weights_path(cache=cache)), "weights path != fetched file"
        token = {e["name"]: e for e in fetch["env"]}["DEEPCELL_ACCESS_TOKEN"]
        assert "secretKeyRef" in token["valueFrom"], "the token comes from a Secret, never inline"
        mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
        assert mounts[str(cache)] == {m["mountPath"]: m["name"] for m in fetch["volumeMounts"]}[str(cache)]


def test_rayservice_mounts_the_shared_output_volume_on_every_pod() -> None:
    (app,) = _serve_config("rayservice")["applications"]
    output = ServiceConfig.model_validate(app["args"]).output.directory
    (pvc,) = _load_all(DEPLOY / "kuberay" / "storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for template in [_head_template(), *(g["template"] for g in _gpu_groups())]:
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        (container,) = template["spec"]["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        claim = volumes[mounts[output]]["persistentVolumeClaim"]["claimName"]
        assert claim == pvc["metadata"]["name"]


def test_rayservice_uses_one_image_and_runs_as_non_root() -> None:
    templates = [_head_template(), *(g["template"] for g in _gpu_groups())]
    images = {c["image"] for t in templates for c in _containers(t)}
    assert len(images) == 1
    for template in templates:
        security = template["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] != 0


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_expose_zeromq_and_metrics_from_the_head_pod_only() -> None:
    services = _load_all(DEPLOY / "kuberay" / "service.yaml")
    assert {s["kind"] for s in services} == {"Service"}
    head_labels = _head_template()["metadata"]["labels"]
    (head_container,) = _head_template()["spec"]["containers"]
    named_ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    exposed: dict[int, str] = {}
    for service in services:
        selector = service["spec"]["selector"]
        assert _labels_match(selector, head_labels), f"{service['metadata']['name']} misses the head pod"
        for group in _gpu_groups():
            assert not _labels_match(selector, group["template"]["metadata"]["labels"])
        for port in service["spec"]["ports"]:
            assert named_ports[port["targetPort"]] == port["port"]
            exposed[port["port"]] = service["spec"]["type"]
    assert set(exposed) == ZMQ_PORTS | {METRICS_PORT}
    assert exposed[METRICS_PORT] == "ClusterIP", "metrics stay inside the cluster"
    assert {exposed[p] for p in ZMQ_PORTS} <= {"LoadBalancer", "NodePort"}


def test_network_policy_selects_the_head_and_opens_only_zeromq_to_the_microscope() -> None:
    (policy,) = _load_all(DEPLOY / "kuberay" / "networkpolicy.yaml")
    assert policy["kind"] == "NetworkPolicy"
    assert _labels_match(policy["spec"]["podSelector"]["matchLabels"], _head_template()["metadata"]["labels"])
    external = [r for r in policy["spec"]["ingress"] if any("ipBlock" in f for f in r["from"])]
    assert external
    for rule in external:
        assert {p["port"] for p in rule["ports"]} <= ZMQ_PORTS


# --------------------------------------------------------------------------------------- Docker


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_installs_the_package_exposes_the_ports_and_drops_root() -> None:
    text = _dockerfile()
    exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", text, re.M) for p in line.split()}
    assert exposed >= ZMQ_PORTS | {METRICS_PORT, HTTP_PORT}
    assert re.search(r"pip install\b[^\n]*\s\.(\s|$)", text), "the package itself is installed"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT\s+\["cellsam-stream"\]', text, re.M)
    (ray_version,) = re.findall(r"^ARG RAY_VERSION=(\S+)", text, re.M)
    assert _rayservice()["spec"]["rayClusterConfig"]["rayVersion"] == ray_version


def test_dockerignore_keeps_the_build_context_small_but_complete() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()}
    assert {".git", ".venv"} <= ignored
    copied = set(re.findall(r"^COPY\s+(\S+)", _dockerfile(), re.M)) | {"pyproject.toml", "README.md"}
    assert not (copied & ignored), "the Dockerfile copies something .dockerignore leaves out"


# --------------------------------------------------------------------------------------- PromQL

_VARIABLE = re.compile(r"\$\{?\w+\}?")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
_KEYWORDS |= {"and", "or", "unless", "offset", "inf", "nan"}


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """Metric names and grouping labels of a PromQL expression (structural, not a parser).

    Grafana variables, strings, label matchers and range selectors are removed; identifiers followed by
    ``(`` are functions or aggregations; label lists after ``by``/``on``/... are the grouping labels.
    """
    text = _STRING.sub("", _VARIABLE.sub("", expr))
    text = _RANGE.sub("", _MATCHERS.sub("", text))
    labels = {name.strip() for group in _GROUPING.findall(text) for name in group.split(",") if name.strip()}
    text = _GROUPING.sub(" ", text)
    metrics = {
        m.group(1)
        for m in _IDENTIFIER.finditer(text)
        if m.group(2) is None and m.group(1).lower() not in _KEYWORDS
    }
    return metrics, labels


@dataclass(frozen=True)
class Case:
    name: str
    expr: str
    metrics: set[str]
    labels: set[str]


PROMQL_CASES = [
    Case("plain", "cellsam_queue_depth", {"cellsam_queue_depth"}, set()),
    Case(
        "quantile",
        'histogram_quantile(0.99, sum by (le, stage) (rate(x_bucket{job="a", s=~"e.*"}[$__rate_interval])))',
        {"x_bucket"},
        {"le", "stage"},
    ),
    Case("binary", "sum(rate(a_total[5m])) > 1.05 * (sum(b) or vector(0))", {"a_total", "b"}, set()),
    Case(
        "matching",
        "sum by (reason) (rate(r_total[5m])) / ignoring(reason) group_left sum(rate(t_total[5m])) > 0.01",
        {"r_total", "t_total"},
        {"reason"},
    ),
    Case("and-on", "max(a) > 0 and on() sum(increase(b_total[5m])) == 0", {"a", "b_total"}, set()),
    Case("variable", "vector($camera_fps)", set(), set()),
    Case("offset", "rate(a_total[5m] offset 1h)", {"a_total"}, set()),
]


@pytest.mark.parametrize("case", PROMQL_CASES, ids=lambda c: c.name)
def test_promql_extractor(case: Case) -> None:
    assert promql_names(case.expr) == (case.metrics, case.labels)


def _exported_series() -> dict[str, set[str]]:
    """Sample names the service exports, with their label names, from a real exposition.

    A labelled metric exports no sample until a child exists, so one child per labelled metric is made
    (through the collectors' label names: prometheus_client's ``_labelnames``).
    """
    metrics = ServiceMetrics()
    metrics.set_model(name="tiny", sha256="0" * 64, source="random", device="cpu", dtype="float32")
    for collector in list(metrics.registry._collector_to_names):
        names = getattr(collector, "_labelnames", ())
        if names:
            collector.labels(**{n: "x" for n in names})  # type: ignore[attr-defined]
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def test_exported_series_cover_every_declared_metric() -> None:
    series = _exported_series()
    suffixes = ("", "_total", "_bucket", "_info")
    for name in METRIC_NAMES:
        assert any(name + s in series or name.removesuffix("_total") + s in series for s in suffixes), name


@pytest.mark.parametrize("name", sorted(RAY_METRICS))
def test_documented_ray_metrics_exist_in_this_ray(name: str) -> None:
    import ray

    source = Path(ray.__file__).parent / RAY_METRICS[name]
    assert f'"{name.removeprefix("ray_")}"' in source.read_text()


def _dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "cellsam-stream.json").read_text())


def _dashboard_queries() -> list[tuple[str, str]]:
    return [
        (f"panel {p['title']!r} {t['refId']}", t["expr"])
        for p in _dashboard()["panels"]
        if p["type"] != "row"
        for t in p["targets"]
    ]


def _alert_rules() -> list[dict[str, Any]]:
    return [
        rule for group in _load(DEPLOY / "prometheus" / "alerts.yml")["groups"] for rule in group["rules"]
    ]


def _all_queries() -> list[Any]:
    queries = [*_dashboard_queries(), *((f"alert {r['alert']}", r["expr"]) for r in _alert_rules())]
    return [pytest.param(where, expr, id=where) for where, expr in queries]


@pytest.mark.parametrize(("where", "expr"), _all_queries())
def test_queries_name_only_exported_metrics(where: str, expr: str) -> None:
    series = _exported_series()
    metrics, labels = promql_names(expr)
    # Only a reference line drawn from a dashboard variable, vector($camera_fps), names no metric.
    assert metrics or _VARIABLE.search(expr), f"{where}: no metric found in {expr!r}"
    unknown = metrics - set(series) - set(RAY_METRICS) - PROMETHEUS_SERIES
    assert not unknown, (
        f"{where}: {sorted(unknown)} are not exported by the service nor documented Ray metrics"
    )
    if metrics <= set(series):
        known = set().union(*(series[m] for m in metrics)) | {"instance", "job"}
        assert labels <= known, f"{where}: grouping by {sorted(labels - known)}, which no metric here has"


def test_dashboard_shows_what_operators_need() -> None:
    used: set[str] = set()
    for _, expr in _dashboard_queries():
        used |= promql_names(expr)[0]
    required = {
        "cellsam_frames_received_total",
        "cellsam_frames_segmented_total",
        "cellsam_frames_written_total",
        "cellsam_stage_seconds_bucket",
        "cellsam_end_to_end_seconds_bucket",
        "cellsam_frames_failed_total",
        "cellsam_frames_rejected_total",
        "cellsam_frames_dropped_total",
        "cellsam_queue_depth",
        "cellsam_frames_in_flight",
        "cellsam_encoder_batch_size_bucket",
        "cellsam_cells_per_frame_bucket",
        "cellsam_model_info",
        "ray_node_gpus_utilization",
    }
    assert required <= used, sorted(required - used)
    quantiles = {
        q
        for _, expr in _dashboard_queries()
        if "cellsam_stage_seconds_bucket" in expr
        for q in re.findall(r"histogram_quantile\(([\d.]+)", expr)
    }
    assert quantiles == {"0.5", "0.9", "0.99"}


def test_dashboard_is_grafana_shaped() -> None:
    dash = _dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["expr"].strip()
            assert target["datasource"]["uid"] == "${datasource}"
        for var in re.findall(r"\$(\w+)", json.dumps(panel["targets"])):
            assert var.startswith("__") or var in variables, f"{panel['title']}: unknown variable ${var}"


# --------------------------------------------------------------------------------------- Prometheus


def test_prometheus_config_scrapes_the_service_and_ray() -> None:
    config = _load(DEPLOY / "prometheus" / "prometheus.yml")
    for rule_file in config["rule_files"]:
        assert (DEPLOY / "prometheus" / rule_file).is_file()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for sc in jobs["cellsam-stream"]["static_configs"] for t in sc["targets"]]
    assert targets and all(t.endswith(f":{METRICS_PORT}") for t in targets)
    assert jobs["cellsam-stream"].get("metrics_path", "/metrics") == "/metrics"
    assert "ray" in jobs


def _github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_alert_rules_are_complete_and_have_a_runbook() -> None:
    rules = _alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    docs = (ROOT / "docs" / "deploy.md").read_text()
    anchors = {_github_anchor(h) for h in re.findall(r"^#+\s+(.+)$", docs, re.M)}
    for rule in rules:
        assert {"alert", "expr", "for", "labels", "annotations"} <= set(rule), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "docs/deploy.md"
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in docs/deploy.md"
    # The conditions operators asked for are all covered.
    exprs = " ".join(r["expr"] for r in rules)
    for needle in (
        "cellsam_frames_accepted_total",
        "cellsam_queue_depth",
        "cellsam_frames_failed_total",
        "cellsam_frames_rejected_total",
        "cellsam_acquisitions_active",
        "cellsam_end_to_end_seconds_bucket",
    ):
        assert needle in exprs


# --------------------------------------------------------------------------------------- promtool

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not on PATH (Debian: prometheus)")


def _promtool(*args: str, cwd: Path) -> None:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_accepts_config_and_rules() -> None:
    _promtool("check", "config", "--syntax-only", "prometheus.yml", cwd=DEPLOY / "prometheus")
    _promtool("check", "rules", "alerts.yml", cwd=DEPLOY / "prometheus")


@needs_promtool
def test_promtool_alert_unit_tests_pass() -> None:
    _promtool("test", "rules", "alerts_test.yml", cwd=DEPLOY / "prometheus")


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    # Grafana variables get a value Prometheus accepts; each query becomes a recording rule to be parsed.
    substitutions = {"$__rate_interval": "5m", "$camera_fps": "1"}
    rules = []
    for i, (_, expr) in enumerate(_dashboard_queries()):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query{i}", "expr": expr})
    (tmp_path / "dashboard.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    _promtool("check", "rules", "dashboard.yml", cwd=tmp_path)
