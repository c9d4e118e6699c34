"""The Kubernetes manifests ops apply (k8s/): valid against the KubeRay CRD schemas, in step with
serve.yaml, the app's settings and each other, and not leaking the dashboard or secrets.
No cluster and no network: the CRDs are vendored in k8s/crds (see its SOURCE.md)."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import tomllib
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from jsonschema.exceptions import ValidationError

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CRDS = K8S / "crds"
CRD_FILES = {
    "RayService": "ray.io_rayservices.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
}

DASHBOARD_PORT = 8265
SECRET_MARKERS = ("KEY", "TOKEN", "PEPPER", "PASSWORD", "URL", "SECRET")
APP_SECRET = "vurksha-secrets"
APP_SECRET_ENV = (
    "DATABASE_URL",
    "REDIS_URL",
    "VURKSHA_OTP_PEPPER",
    "VURKSHA_CURSOR_SECRET",
    "VURKSHA_JWT_PRIVATE_KEY",
    "VURKSHA_SMS_ACCOUNT_SID",
    "VURKSHA_SMS_AUTH_TOKEN",
    "VURKSHA_ADMIN_PHONE",
    "VURKSHA_RAZORPAY_KEY_ID",
    "VURKSHA_RAZORPAY_KEY_SECRET",
    "VURKSHA_RAZORPAY_WEBHOOK_SECRET",
    "VURKSHA_FCM_SERVICE_ACCOUNT",
    "VURKSHA_SMTP_HOST",
    "VURKSHA_SMTP_USERNAME",
    "VURKSHA_SMTP_PASSWORD",
)
APP_PLAIN_ENV = {
    "VURKSHA_ENV": "production",
    "VURKSHA_SMS_PROVIDER": "http",
    "VURKSHA_LOG_FORMAT": "json",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "VURKSHA_RAZORPAY_BASE_URL": "https://api.razorpay.com",
    "VURKSHA_FCM_BASE_URL": "https://fcm.googleapis.com",
}
# Names that look secret (a URL) but are public: the providers' API addresses hold no credentials.
NOT_SECRET = {"VURKSHA_RAZORPAY_BASE_URL", "VURKSHA_FCM_BASE_URL"}

Doc = dict[str, Any]


# YAML in k8s/ that is not a manifest: the Kustomize base (tests/unit/test_overlays.py renders it).
NOT_MANIFESTS = {"kustomization.yaml", "slo.yaml"}  # slo.yaml: the objectives, read by config/slo.py


def load_documents() -> list[tuple[str, Doc]]:
    docs = []
    for path in sorted(p for p in K8S.glob("*.yaml") if p.name not in NOT_MANIFESTS):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


DOCS = load_documents()


def doc_id(item: tuple[str, Doc]) -> str:
    name, doc = item
    return f"{name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def only(kind: str) -> list[Doc]:
    return [doc for _, doc in DOCS if doc.get("kind") == kind]


@pytest.fixture(scope="module")
def rayservice() -> Doc:
    found = [doc for doc in only("RayService") if doc["metadata"]["name"] == "vurksha"]
    assert len(found) == 1, "k8s/ must hold exactly one RayService named vurksha"
    return found[0]


@pytest.fixture(scope="module")
def retrain_job() -> Doc:
    found = [doc for doc in only("RayJob") if doc["metadata"]["name"] == "vurksha-recommender-retrain"]
    assert len(found) == 1, "k8s/ must hold exactly one RayJob named vurksha-recommender-retrain"
    return found[0]


def cluster_of(doc: Doc) -> Doc:
    """The RayCluster spec of a RayService (rayClusterConfig), a RayJob (rayClusterSpec) or a
    RayCluster (its spec)."""
    spec = doc["spec"]
    return spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec


def groups(doc: Doc) -> list[Doc]:
    """Head group first, then every worker group."""
    cluster = cluster_of(doc)
    return [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]


def ray_container(group: Doc) -> Doc:
    # KubeRay takes the first container of a group's pod template as the Ray container.
    return group["template"]["spec"]["containers"][0]


def serve_yaml() -> Doc:
    return yaml.safe_load((REPO / "serve.yaml").read_text())


def serve_config_v2(rayservice: Doc) -> Doc:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


# ------------------------------------------------------------------ CRD schema validation


def strict(schema: Doc) -> Doc:
    """A CRD's openAPIV3Schema as JSON Schema, checked the way `kubectl apply` is by default
    (strict field validation): unknown fields are errors, and `nullable` admits null. Without
    this, jsonschema would accept any misspelt field, since CRD schemas never close objects."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict(sub) for sub in out[key]]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _list_type(validator: Any, list_type: str, instance: Any, schema: Doc) -> Iterator[ValidationError]:
    """x-kubernetes-list-type: the API server rejects duplicate keys in `map` lists (container
    ports, ...) and duplicate items in `set` lists; plain JSON Schema knows neither."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen: list[Any] = []
        for item in instance:
            if item in seen:
                yield ValidationError(f"duplicate item {item!r} in a set-type list")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        props = schema.get("items", {}).get("properties", {})
        seen_keys: set[str] = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = json.dumps([item.get(k, props.get(k, {}).get("default")) for k in keys])
            if key in seen_keys:
                yield ValidationError(f"duplicate entry for list-map keys {keys} = {key}")
            seen_keys.add(key)


CrdValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type}
)


@cache
def crd(kind: str) -> Doc:
    path = CRDS / CRD_FILES[kind]
    # The CRDs are ~1 MB of YAML: the libyaml loader (when PyYAML has it) is ten times faster.
    if yaml.__with_libyaml__:
        return yaml.load(path.read_bytes(), Loader=yaml.CSafeLoader)
    return yaml.safe_load(path.read_bytes())


@cache
def crd_validator(kind: str, version: str) -> Any:
    versions = {v["name"]: v for v in crd(kind)["spec"]["versions"] if v.get("served")}
    assert version in versions, f"{kind} {version} is not served by the CRD (served: {sorted(versions)})"
    schema = strict(versions[version]["schema"]["openAPIV3Schema"])
    CrdValidator.check_schema(schema)
    return CrdValidator(schema)


def schema_errors(doc: Doc) -> list[str]:
    group, _, version = doc["apiVersion"].partition("/")
    assert group == crd(doc["kind"])["spec"]["group"], doc["apiVersion"]
    errors = crd_validator(doc["kind"], version).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def test_k8s_holds_the_expected_documents():
    kinds = sorted((name, doc["kind"]) for name, doc in DOCS)
    assert ("rayservice.yaml", "RayService") in kinds
    assert ("redis-gcs.yaml", "Deployment") in kinds
    assert ("redis-gcs.yaml", "Service") in kinds
    assert ("monitoring.yaml", "PodMonitor") in kinds
    assert ("recommender-retrain.yaml", "RayJob") in kinds
    assert ("pdb.yaml", "PodDisruptionBudget") in kinds
    assert ("migrate-job.yaml", "Job") in kinds


@pytest.mark.parametrize("item", DOCS, ids=doc_id)
def test_every_document_is_namespace_agnostic_and_named(item):
    _, doc = item
    assert doc.get("apiVersion") and doc.get("kind")
    assert doc.get("metadata", {}).get("name")
    # The overlays (or `kubectl apply -k k8s/ -n NAMESPACE`) set it; a hard-coded one would defeat both.
    assert "namespace" not in doc["metadata"]


KUBERAY_DOCS = [item for item in DOCS if item[1].get("kind") in CRD_FILES]


@pytest.mark.parametrize("item", KUBERAY_DOCS, ids=doc_id)
def test_kuberay_documents_match_the_crd_schema(item):
    _, doc = item
    assert schema_errors(doc) == []


_DELETE = object()


def _set(path: str, value: Any) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


def _duplicate_head_port(doc: Doc) -> None:
    ports = ray_container(groups(doc)[0])["ports"]
    ports.append({"name": "again", "containerPort": ports[0]["containerPort"]})


W0 = "spec.rayClusterConfig.workerGroupSpecs.0"
HEAD = "spec.rayClusterConfig.headGroupSpec"


@pytest.mark.parametrize(
    "mutate, where, why",
    [
        (_set(f"{W0}.replicas", "two"), f"{W0}.replicas", "is not of type 'integer'"),
        (_set(f"{W0}.minReplica", 1), W0, "Additional properties are not allowed"),
        (_set(f"{W0}.groupName", _DELETE), W0, "'groupName' is a required property"),
        (_set(f"{HEAD}.rayStartParams.num-cpus", 0), f"{HEAD}.rayStartParams.num-cpus", "not of type"),
        (
            _set(f"{W0}.template.spec.containers.0.resources.limits.memory", "lots"),
            f"{W0}.template.spec.containers.0.resources.limits.memory",
            "does not match",
        ),
        (
            _set("spec.rayClusterConfig.gcsFaultToleranceOptions.backend", "etcd"),
            "spec.rayClusterConfig.gcsFaultToleranceOptions.backend",
            "is not one of",
        ),
        (_duplicate_head_port, f"{HEAD}.template.spec.containers.0.ports", "duplicate entry"),
    ],
    ids=[
        "wrong-type",
        "unknown-field",
        "missing-required",
        "int-start-param",
        "bad-quantity",
        "bad-enum",
        "duplicate-port",
    ],
)
def test_schema_check_rejects_a_broken_manifest(rayservice, mutate, where, why):
    """Deliberate breakage: if these passed, the schema test above would prove nothing."""
    broken = copy.deepcopy(rayservice)
    mutate(broken)
    errors = schema_errors(broken)
    assert any(e.startswith(f"{where}:") and why in e for e in errors), errors


@cache
def embedded_core_validator(what: str) -> Any:
    """Core Kubernetes schemas without a cluster: the RayService CRD embeds the full PodTemplateSpec
    (group templates) and Service (serveService) schemas, which also fit redis-gcs.yaml."""
    (v1,) = [v for v in crd("RayService")["spec"]["versions"] if v["name"] == "v1"]
    spec = v1["schema"]["openAPIV3Schema"]["properties"]["spec"]
    schema = {
        "PodTemplateSpec": spec["properties"]["rayClusterConfig"]["properties"]["headGroupSpec"][
            "properties"
        ]["template"],
        "Service": spec["properties"]["serveService"],
    }[what]
    return CrdValidator(strict(schema))


CORE_DOCS = [item for item in DOCS if item[1].get("kind") in ("Deployment", "Service")]


@pytest.mark.parametrize("item", CORE_DOCS, ids=doc_id)
def test_core_documents_match_the_schemas_kuberay_embeds(item):
    _, doc = item
    if doc["kind"] == "Deployment":
        target, validator = doc["spec"]["template"], embedded_core_validator("PodTemplateSpec")
    else:
        target, validator = doc, embedded_core_validator("Service")
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(target)]
    assert errors == []


# ------------------------------------------------------------------ serve config vs serve.yaml


def test_serve_config_v2_has_the_same_applications_as_serve_yaml(rayservice):
    def routes(config: Doc) -> list[tuple[str, str, str]]:
        return [(a["name"], a["route_prefix"], a["import_path"]) for a in config["applications"]]

    assert routes(serve_config_v2(rayservice)) == routes(serve_yaml())


def test_serve_config_v2_is_serve_yaml_listening_on_the_pod_network(rayservice):
    """Identical apart from http_options.host (loopback locally, the pod network in a cluster),
    so overrides such as num_replicas or autoscaling_config cannot be set in only one of them."""
    in_cluster = serve_config_v2(rayservice)
    assert in_cluster["http_options"]["host"] == "0.0.0.0"
    local = serve_yaml()
    local["http_options"]["host"] = "0.0.0.0"
    assert in_cluster == local


def test_serve_config_v2_is_a_valid_serve_deploy_config(rayservice):
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config_v2(rayservice))


def test_serve_port_is_the_head_containers_serve_port(rayservice):
    ports = {p["name"]: p["containerPort"] for p in ray_container(groups(rayservice)[0])["ports"]}
    assert ports["serve"] == serve_config_v2(rayservice)["http_options"]["port"]


def test_ray_version_is_the_installed_ray(rayservice):
    import ray

    assert cluster_of(rayservice)["rayVersion"] == ray.__version__


def test_every_ray_pod_runs_the_project_image_of_this_version(rayservice):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    images = {ray_container(g)["image"] for g in groups(rayservice)}
    assert images == {f"vurksha/backend:{version}"}


# ------------------------------------------------------------------ dashboard exposure


EXPOSED_SERVICE_TYPES = {"LoadBalancer", "NodePort"}
ROUTE_KINDS = {"Ingress", "HTTPRoute", "GRPCRoute", "TCPRoute", "TLSRoute", "Route"}


def _exposes_dashboard(ports: list[Doc]) -> bool:
    return any(
        DASHBOARD_PORT in (p.get("port"), p.get("targetPort"), p.get("nodePort"))
        or p.get("targetPort") == "dashboard"
        for p in ports
    )


def dashboard_exposures(docs: list[tuple[str, Doc]]) -> list[str]:
    found = []
    for name, doc in docs:
        where = doc_id((name, doc))
        kind = doc.get("kind")
        if kind == "Service":
            spec = doc.get("spec", {})
            if spec.get("type") in EXPOSED_SERVICE_TYPES and _exposes_dashboard(spec.get("ports", [])):
                found.append(f"{where}: {spec['type']} Service publishes {DASHBOARD_PORT}")
        elif kind in ROUTE_KINDS:
            text = json.dumps(doc)
            if str(DASHBOARD_PORT) in text or "head-svc" in text or '"dashboard"' in text:
                found.append(f"{where}: routes to the Ray head/dashboard")
        elif kind in CRD_FILES:
            spec = doc["spec"]
            head = cluster_of(doc).get("headGroupSpec", {})
            if head.get("serviceType") in EXPOSED_SERVICE_TYPES:
                found.append(f"{where}: head Service (with the dashboard) is {head['serviceType']}")
            if head.get("enableIngress"):
                found.append(f"{where}: KubeRay creates an Ingress for the dashboard")
            if head.get("headService", {}).get("spec", {}).get("type") in EXPOSED_SERVICE_TYPES:
                found.append(f"{where}: headService is {head['headService']['spec']['type']}")
            serve_svc = spec.get("serveService", {}).get("spec", {})
            if _exposes_dashboard(serve_svc.get("ports", [])):
                found.append(f"{where}: serveService carries the dashboard port")
    return found


def test_the_dashboard_is_not_exposed_outside_the_cluster():
    assert dashboard_exposures(DOCS) == []


def test_dashboard_check_catches_a_nodeport(rayservice, retrain_job):
    nodeport = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "oops"},
        "spec": {"type": "NodePort", "ports": [{"port": 80, "targetPort": DASHBOARD_PORT}]},
    }
    public_head = copy.deepcopy(rayservice)
    cluster_of(public_head)["headGroupSpec"]["serviceType"] = "LoadBalancer"
    public_job = copy.deepcopy(retrain_job)
    cluster_of(public_job)["headGroupSpec"]["serviceType"] = "NodePort"
    found = dashboard_exposures([("x.yaml", nodeport), ("y.yaml", public_head), ("z.yaml", public_job)])
    assert len(found) == 3, found


# ------------------------------------------------------------------ secrets


def _walk(node: Any) -> Iterator[Doc]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _from_secret(source: Doc) -> bool:
    return "value" not in source and "secretKeyRef" in source.get("valueFrom", {})


def literal_secrets(docs: list[tuple[str, Doc]]) -> list[str]:
    """Every env var (any container, init container or the autoscaler) whose name looks secret
    and is not read from a Secret; and the GCS Redis credentials, which KubeRay takes as
    value/valueFrom in the same shape."""
    found = []
    for name, doc in docs:
        for node in _walk(doc):
            for var in node.get("env", []) if isinstance(node.get("env"), list) else []:
                looks_secret = any(m in var["name"].upper() for m in SECRET_MARKERS)
                if looks_secret and var["name"] not in NOT_SECRET and not _from_secret(var):
                    found.append(f"{doc_id((name, doc))}: env {var['name']} is not from a secretKeyRef")
            gcs = node.get("gcsFaultToleranceOptions") or {}
            for field in ("redisPassword", "redisUsername"):
                if field in gcs and not _from_secret(gcs[field]):
                    found.append(f"{doc_id((name, doc))}: gcsFaultToleranceOptions.{field} is a literal")
    return found


def test_secret_looking_values_come_from_secrets():
    assert literal_secrets(DOCS) == []


def test_secret_check_catches_literals(rayservice):
    leaky = copy.deepcopy(rayservice)
    ray_container(groups(leaky)[1])["env"].append({"name": "VURKSHA_OTP_PEPPER", "value": "hunter2"})
    cluster_of(leaky)["gcsFaultToleranceOptions"]["redisPassword"] = {"value": "hunter2"}
    assert len(literal_secrets([("x.yaml", leaky)])) == 2


def test_head_and_workers_get_the_app_env_from_vurksha_secrets(rayservice):
    envs = [ray_container(g)["env"] for g in groups(rayservice)]
    assert all(env == envs[0] for env in envs), "head and worker env must be identical"
    by_name = {var["name"]: var for var in envs[0]}
    assert len(by_name) == len(envs[0]), "duplicate env names"
    for var, value in APP_PLAIN_ENV.items():
        assert by_name[var].get("value") == value, var
    for var in APP_SECRET_ENV:
        assert by_name[var]["valueFrom"]["secretKeyRef"] == {"name": APP_SECRET, "key": var}, var


def test_manifest_env_satisfies_the_production_settings_guard(rayservice, monkeypatch):
    """The env the pods get (secrets stood in for by placeholders) passes the guard that makes
    `VURKSHA_ENV=production` refuse to start: the manifest cannot miss or misspell a variable."""
    from config.settings import Settings

    for name in list(os.environ):
        if name.startswith("VURKSHA_") or name in ("DATABASE_URL", "REDIS_URL"):
            monkeypatch.delenv(name)
    for var in ray_container(groups(rayservice)[0])["env"]:
        monkeypatch.setenv(var["name"], var.get("value", f"placeholder-for-{var['name'].lower()}"))
    settings = Settings()
    assert settings.env == "production"
    assert settings.sms_provider == "http"
    assert settings.database_url and settings.redis_url
    assert "127.0.0.1" not in settings.trusted_proxies  # the pod network, not loopback


# ------------------------------------------------------------------ GCS fault tolerance


def test_gcs_fault_tolerance_uses_the_redis_of_redis_gcs_yaml(rayservice):
    gcs = cluster_of(rayservice)["gcsFaultToleranceOptions"]
    host, _, port = gcs["redisAddress"].partition(":")
    services = {s["metadata"]["name"]: s for s in only("Service")}
    assert host in services, f"{host} is not a Service in k8s/"
    assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]]

    redis = next(d for d in only("Deployment") if d["metadata"]["name"] == host)
    selector = services[host]["spec"]["selector"]
    assert selector.items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    redis_env = {v["name"]: v for v in redis["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (
        gcs["redisPassword"]["valueFrom"]["secretKeyRef"]
        == redis_env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    )


def test_kuberay_operator_rules(rayservice):
    """Checks the KubeRay operator makes at reconcile time (utils.ValidateRayServiceSpec), which
    no schema can express; breaking them leaves the RayService stuck in ValidationFailed."""
    name = rayservice["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47
    cluster = cluster_of(rayservice)
    head = cluster["headGroupSpec"]
    assert "name" not in head.get("headService", {}).get("metadata", {})
    head_env = {v["name"] for v in ray_container(head).get("env", [])}
    if "gcsFaultToleranceOptions" in cluster:
        assert not head_env & {"REDIS_PASSWORD", "RAY_REDIS_ADDRESS", "REDIS_USERNAME"}
        assert not {"redis-password", "redis-username"} & head.get("rayStartParams", {}).keys()
        assert "ray.io/ft-enabled" not in rayservice["metadata"].get("annotations", {})
    for group in groups(rayservice):
        assert group["template"]["spec"]["containers"], "every group needs a Ray container"
        start = group.get("rayStartParams", {})
        if start.keys() & {"num-cpus", "num-gpus", "memory", "resources"}:
            assert not group.get("resources"), "resources in both rayStartParams and resources"
        assert "labels" not in start


def test_worker_groups_autoscale_within_bounds(rayservice):
    cluster = cluster_of(rayservice)
    assert cluster["enableInTreeAutoscaling"] is True
    workers = cluster["workerGroupSpecs"]
    assert workers
    for group in workers:
        assert (
            0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        )
        assert group["minReplicas"] < group["maxReplicas"], f"{group['groupName']} cannot scale"


def test_ray_containers_set_memory_request_equal_to_limit(rayservice):
    """Ray sizes its object store and OOM handling from the limit; a lower request lets the
    scheduler overcommit the node and the kernel kill Ray mid-request."""
    for group in groups(rayservice):
        resources = ray_container(group)["resources"]
        assert resources["requests"]["memory"] == resources["limits"]["memory"]


# ------------------------------------------------------------------ monitoring


def test_pod_monitor_scrapes_the_metrics_port_of_every_ray_pod(rayservice):
    (monitor,) = only("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert endpoints and all(e.get("port") == "metrics" for e in endpoints)

    selector = monitor["spec"]["selector"]["matchLabels"]
    added_by_kuberay = {"ray.io/is-ray-node": "yes"}
    for group in groups(rayservice):
        labels = {**group["template"]["metadata"].get("labels", {}), **added_by_kuberay}
        assert selector.items() <= labels.items(), f"PodMonitor misses {group.get('groupName', 'head')}"
        ports = {p["name"]: p["containerPort"] for p in ray_container(group)["ports"]}
        assert ports.get("metrics") == 8080

    for deployment in only("Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert not selector.items() <= labels.items(), "PodMonitor must select Ray pods only"


def test_the_route_optimizer_autoscales_from_one_replica_on_ongoing_requests():
    """Its serve.yaml entry, read by Serve's own schemas (the RayService embeds it verbatim,
    see above): at least one replica, scaling on ongoing requests, and named as the code
    that looks it up names it."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from actors.routing import APP, DEPLOYMENT

    config = ServeDeploySchema.model_validate(serve_yaml())
    app = next(a for a in config.applications if a.name == APP)
    entry = next(d for d in app.deployments if d.name == DEPLOYMENT)
    autoscaling = AutoscalingConfig.model_validate(entry.autoscaling_config)
    assert 1 <= autoscaling.min_replicas < autoscaling.max_replicas
    assert autoscaling.target_ongoing_requests is not None and autoscaling.target_ongoing_requests > 0


# ------------------------------------------------------------------ recommender retraining (RayJob)


def test_retrain_job_trains_and_promotes_the_recommender(retrain_job):
    argv = shlex.split(retrain_job["spec"]["entrypoint"])
    assert argv[:3] == ["vurksha", "recommender", "train"]
    assert "--promote" in argv
    assert "--force" not in argv, "a scheduled run must not promote a model worse than production"


def test_retrain_job_runs_the_rayservice_image_and_ray_version(rayservice, retrain_job):
    (image,) = {ray_container(g)["image"] for g in groups(rayservice)}
    submitter = retrain_job["spec"].get("submitterPodTemplate")
    containers = [ray_container(g) for g in groups(retrain_job)]
    containers += submitter["spec"]["containers"] if submitter else []
    assert {c["image"] for c in containers} == {image}
    assert cluster_of(retrain_job)["rayVersion"] == cluster_of(rayservice)["rayVersion"]


def test_retrain_job_gets_the_same_env_as_the_rayservice(rayservice, retrain_job):
    """DATABASE_URL and the rest from the same Secret, and the same production settings guard
    (checked on the RayService's env above) as the app."""
    for group in groups(retrain_job):
        assert ray_container(group)["env"] == ray_container(groups(rayservice)[0])["env"]


def test_retrain_job_runs_on_its_own_short_lived_cluster(retrain_job):
    """Not on the serving cluster (no clusterSelector), torn down when the job ends, and bounded
    in time; the checks KubeRay makes at reconcile time (utils.ValidateRayJobSpec/Metadata)."""
    name, spec = retrain_job["metadata"]["name"], retrain_job["spec"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47
    assert "rayClusterSpec" in spec and not spec.get("clusterSelector")
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec.get("ttlSecondsAfterFinished", 0) >= 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    assert not spec.get("suspend")
    submitter = spec.get("submitterPodTemplate")
    if submitter:
        assert submitter["spec"]["restartPolicy"] in ("Never", "OnFailure"), "a Job's pods"
    for group in groups(retrain_job):
        start = group.get("rayStartParams", {})
        assert start.get("num-cpus") != "0", "a head-only cluster must run the training itself"
        resources = ray_container(group)["resources"]
        assert resources["requests"]["memory"] == resources["limits"]["memory"]
        assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == "2"


@pytest.mark.parametrize(
    "mutate, where, why",
    [
        (_set("spec.schedule", "0 3 * * *"), "spec", "Additional properties are not allowed"),
        (_set("spec.shutdownAfterJobFinishes", "yes"), "spec.shutdownAfterJobFinishes", "not of type"),
        (
            _set("spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.resources.limits.cpu", "two"),
            "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0.resources.limits.cpu",
            "does not match",
        ),
    ],
    ids=["no-schedule-in-this-release", "wrong-type", "bad-quantity"],
)
def test_schema_check_rejects_a_broken_retrain_job(retrain_job, mutate, where, why):
    broken = copy.deepcopy(retrain_job)
    mutate(broken)
    errors = schema_errors(broken)
    assert any(e.startswith(f"{where}:") and why in e for e in errors), errors
