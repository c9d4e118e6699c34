"""k8s/overlays/<env> as `kubectl apply -k` would send them: rendered by tests/unit/kustomize.py, then
every document checked against the schema the API server would hold it to (KubeRay kinds against
the vendored KubeRay CRDs, monitoring.coreos.com kinds against the vendored prometheus-operator
CRDs, core kinds against Kubernetes' own through kubernetes-validate, all strict), and against what
each environment is meant to get: its namespace, its image, its sizes, disruption budgets that
select real pods, and a migration Job that reaches the same database as the app."""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.unit import kustomize
from tests.unit.kustomize import KustomizeError
from tests.unit.test_k8s import (
    APP_SECRET,
    CRD_FILES,
    CRDS,
    K8S,
    NOT_MANIFESTS,
    CrdValidator,
    Doc,
    _set,
    _walk,
    dashboard_exposures,
    groups,
    literal_secrets,
    ray_container,
    schema_errors,
    strict,
)

OVERLAYS = K8S / "overlays"
ENVS = ("dev", "staging", "production")
BUILDS = ("base", *ENVS)  # "base" is k8s/ itself (`kubectl apply -k k8s/ -n NAMESPACE`)
# The oldest Kubernetes the manifests target: PodDisruptionBudget's unhealthyPodEvictionPolicy is GA
# from 1.31 on. Validated against that version's schemas, strictly (unknown fields are errors).
KUBERNETES = "1.31"
MONITORING_CRD_FILES = {
    "PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
    "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml",
}
OUT_OF_BASE = {"recommender-retrain.yaml"}  # applying it starts a training run
SECRETS = {APP_SECRET, "vurksha-gcs-redis"}  # the same names in every namespace (README)
PROJECT_IMAGE = "vurksha/backend"  # the base's placeholder, which every overlay's `images` replaces
MIGRATE_JOB, WORKER_PDB_PREFIX = "vurksha-migrate", "vurksha-"
# What an overlay may change in the base; anything else means the environments drift apart.
ALLOWED_CHANGES = [
    re.compile(pattern)
    for pattern in (
        r"metadata\.namespace",
        r"metadata\.labels\.app\.kubernetes\.io/environment",
        r".*\.containers\.\d+\.image",
        r".*\.containers\.\d+\.resources(\..*)?",
        r"spec\.rayClusterConfig\.workerGroupSpecs\.\d+\.(replicas|minReplicas|maxReplicas)",
        r"spec\.minAvailable",
    )
]


@cache
def rendered(build: str) -> tuple[Doc, ...]:
    """Shared between tests: never mutate (use copy.deepcopy)."""
    return tuple(kustomize.build(K8S if build == "base" else OVERLAYS / build))


def kustomization(build: str) -> Doc:
    (k,) = kustomize.load_all(
        ((K8S if build == "base" else OVERLAYS / build) / "kustomization.yaml").read_text()
    )
    return k


def one(docs: tuple[Doc, ...] | list[Doc], kind: str, name: str) -> Doc:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def name_of(doc: Doc) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


# ------------------------------------------------------------------ schemas


def python_patterns(node: Any) -> Any:
    """The CRDs' `pattern`s are Go (RE2) regular expressions. The one construct Python reads
    differently here: a flag group after the start (`^(?i)(abort|warn)?$`), which Python refuses;
    at the top level it means the same at the front. Any other difference fails check_schema."""
    if isinstance(node, dict):
        out = {key: python_patterns(value) for key, value in node.items()}
        pattern = out.get("pattern")
        if isinstance(pattern, str) and pattern.startswith("^(?i)"):
            out["pattern"] = "(?i)^" + pattern.removeprefix("^(?i)")
        return out
    return [python_patterns(item) for item in node] if isinstance(node, list) else node


@cache
def monitoring_validator(kind: str, version: str) -> Any:
    crd = yaml.safe_load((CRDS / MONITORING_CRD_FILES[kind]).read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    # strict (test_k8s): unknown fields are errors, as `kubectl apply` makes them.
    schema = strict(python_patterns(served["schema"]["openAPIV3Schema"]))
    CrdValidator.check_schema(schema)
    return CrdValidator(schema)


def validation_errors(doc: Doc) -> list[str]:
    """What the API server would refuse in `doc`, by the schema of its kind; a kind with no schema
    here is itself an error (vendor its CRD), never a pass."""
    group, _, version = doc["apiVersion"].rpartition("/")
    if group == "ray.io" and doc["kind"] in CRD_FILES:
        return schema_errors(doc)
    if group == "monitoring.coreos.com":
        if doc["kind"] not in MONITORING_CRD_FILES:
            return [f"no vendored prometheus-operator CRD for {doc['kind']} (k8s/crds/SOURCE.md)"]
        errors = monitoring_validator(doc["kind"], version).iter_errors(doc)
        return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)
    if "." in group and not group.endswith(".k8s.io"):
        return [f"no schema for {doc['apiVersion']} {doc['kind']} (vendor its CRD into k8s/crds)"]
    try:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"]
    return []


@pytest.mark.parametrize("build", BUILDS)
def test_every_rendered_document_matches_its_schema(build):
    errors = {name_of(doc): validation_errors(doc) for doc in rendered(build)}
    assert {name: e for name, e in errors.items() if e} == {}


@pytest.mark.parametrize(
    "kind, mutate, why",
    [
        ("Job", _set("spec.backofLimit", 2), "'backofLimit' was unexpected"),
        ("Job", _set("spec.template.spec.containers.0.command", "vurksha migrate"), "is not of type 'array'"),
        ("PodDisruptionBudget", _set("spec.maxUnavailible", 1), "'maxUnavailible' was unexpected"),
        ("Deployment", _set("spec.replicas", "one"), "is not of type 'integer'"),
        ("PodMonitor", _set("spec.podMetricsEndpoints.0.portt", "metrics"), "'portt' was unexpected"),
        ("RayService", _set("spec.rayClusterConfig.workerGroupSpecs.0.minReplica", 1), "not allowed"),
    ],
    ids=["job-typo", "job-type", "pdb-typo", "deployment-type", "podmonitor-typo", "rayservice-typo"],
)
def test_schema_checks_reject_a_broken_document(kind, mutate, why):
    """Deliberate breakage, one per schema source: if these passed, the check above proves nothing."""
    broken = copy.deepcopy(next(d for d in rendered("production") if d["kind"] == kind))
    mutate(broken)
    assert any(why in e for e in validation_errors(broken)), validation_errors(broken)


def test_prometheus_rules_are_checked_against_their_crd():
    """alerts.yaml's kind: a pattern of its CRD (durations) is enforced, not only the field names."""
    rule: Doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "r"},
        "spec": {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "up == 0", "for": "5m"}]}]},
    }
    assert validation_errors(rule) == []
    rule["spec"]["groups"][0]["rules"][0]["for"] = "5 minutes"
    assert any("does not match" in e for e in validation_errors(rule)), validation_errors(rule)


def test_a_kind_without_a_schema_is_an_error():
    assert validation_errors({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}})
    assert validation_errors(
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "Probe", "metadata": {"name": "p"}}
    )


def test_the_base_deploys_every_manifest_in_k8s():
    """A manifest added to k8s/ but not to kustomization.yaml would never reach a cluster."""
    manifests = set()
    for path in K8S.glob("*.yaml"):
        docs = kustomize.load_all(path.read_text())
        if path.name not in NOT_MANIFESTS and docs and all("apiVersion" in d and "kind" in d for d in docs):
            manifests.add(path.name)
    assert set(kustomization("base")["resources"]) == manifests - OUT_OF_BASE


# ------------------------------------------------------------------ per environment


@pytest.mark.parametrize("env", ENVS)
def test_every_document_lands_in_the_environments_namespace(env):
    for doc in rendered(env):
        assert doc["metadata"]["namespace"] == f"vurksha-{env}", name_of(doc)
        assert doc["metadata"]["labels"]["app.kubernetes.io/environment"] == env, name_of(doc)


def containers(node: Any, key: str = "") -> Iterator[Doc]:
    """Every container and init container at any depth (where kustomize's `images` looks too)."""
    if isinstance(node, dict):
        for child_key, child in node.items():
            yield from containers(child, child_key)
    elif isinstance(node, list):
        for item in node:
            if key in ("containers", "initContainers") and isinstance(item, dict):
                yield item
            yield from containers(item)


def expected_image(env: str) -> str:
    (entry,) = [i for i in kustomization(env)["images"] if i["name"] == PROJECT_IMAGE]
    return (
        entry["newName"]
        + (f":{entry['newTag']}" if "newTag" in entry else "")
        + (f"@{entry['digest']}" if "digest" in entry else "")
    )


def image_problems(docs: tuple[Doc, ...] | list[Doc], image: str) -> list[str]:
    """Every container of ours (all but the GCS Redis) runs `image`, and none kept the placeholder."""
    found = []
    for doc in docs:
        if doc["metadata"]["name"] == "vurksha-gcs-redis":
            continue
        for container in containers(doc):
            if container["image"] != image:
                found.append(f"{name_of(doc)}: {container['name']} runs {container['image']}")
    return found


@pytest.mark.parametrize("env", ENVS)
def test_our_containers_run_the_overlays_image(env):
    image = expected_image(env)
    assert not image.startswith(f"{PROJECT_IMAGE}:"), "an overlay names its registry"
    assert image_problems(rendered(env), image) == []


def test_image_check_catches_a_container_left_on_the_placeholder():
    docs = copy.deepcopy(list(rendered("dev")))
    ray_container(groups(one(docs, "RayService", "vurksha"))[1])["image"] = f"{PROJECT_IMAGE}:0.1.0"
    assert len(image_problems(docs, expected_image("dev"))) == 1


def diff_paths(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for key in a.keys() | b.keys() for p in diff_paths(a.get(key), b.get(key), f"{path}.{key}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b, strict=True)) for p in diff_paths(x, y, f"{path}.{i}")]
    return [] if a == b else [path.lstrip(".")]


@pytest.mark.parametrize("env", ENVS)
def test_overlays_change_only_namespace_labels_image_and_sizes(env):
    """Env vars, probes, the Serve config (one source: serve.yaml), secrets and the rest stay the
    base's, so what staging tested is what production runs."""
    base = {name_of(d): d for d in rendered("base")}
    changed = {name_of(d): diff_paths(base[name_of(d)], d) for d in rendered(env)}
    assert set(changed) == set(base)
    unexpected = {
        name: [p for p in paths if not any(rx.fullmatch(p) for rx in ALLOWED_CHANGES)]
        for name, paths in changed.items()
    }
    assert {name: paths for name, paths in unexpected.items() if paths} == {}


@pytest.mark.parametrize("build", BUILDS)
def test_secrets_are_the_documented_ones_and_never_literal(build):
    docs = rendered(build)
    refs = {node["secretKeyRef"]["name"] for doc in docs for node in _walk(doc) if "secretKeyRef" in node}
    assert refs == SECRETS
    readme = (K8S / "README.md").read_text()
    assert all(f"secret generic {name}" in readme for name in SECRETS), "README tells how to create them"
    items = [(f"{build}.yaml", doc) for doc in docs]
    assert literal_secrets(items) == []
    assert dashboard_exposures(items) == []


# ------------------------------------------------------------------ disruption budgets


def ray_pod_labels(group: Doc, head: bool) -> dict[str, str]:
    """The labels of a group's pods: KubeRay's (labelPod in ray-operator/controllers/ray/common/pod.go,
    v1.7.0), overridden by the template's, except the three KubeRay does not let a template set."""
    cluster, node_type = "vurksha-x7k2p", "head" if head else "worker"  # the cluster name is generated
    labels = {
        "ray.io/is-ray-node": "yes",
        "ray.io/identifier": f"{cluster}-{node_type}",
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
        **group["template"]["metadata"].get("labels", {}),
    }
    group_name = "headgroup" if head else group["groupName"]
    return labels | {"ray.io/cluster": cluster, "ray.io/node-type": node_type, "ray.io/group": group_name}


def pods(docs: tuple[Doc, ...] | list[Doc]) -> dict[str, dict[str, str]]:
    """Every kind of pod the documents make, by a name for messages, with its labels."""
    found = {}
    for doc in docs:
        if doc["kind"] in CRD_FILES:
            for i, group in enumerate(groups(doc)):
                found[f"{name_of(doc)}/{group.get('groupName', 'head')}"] = ray_pod_labels(group, head=i == 0)
        elif doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            found[name_of(doc)] = doc["spec"]["template"]["metadata"].get("labels", {})
    return found


def pdb_problems(docs: tuple[Doc, ...] | list[Doc]) -> list[str]:
    """Budgets that would not do their job: one selecting no pod (a typo in a group name), a pod under
    two (the eviction API then refuses to evict it), a worker group without one, a form Kubernetes
    cannot compute for RayCluster-owned pods (they have no scale subresource: only an integer
    minAvailable works), or a minAvailable that would block drains (not below minReplicas, or
    NotReady workers held by the default unhealthyPodEvictionPolicy; see k8s/pdb.yaml)."""
    found, all_pods = [], pods(docs)
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    covering: dict[str, list[str]] = {pod: [] for pod in all_pods}
    for pdb in budgets:
        spec, name = pdb["spec"], name_of(pdb)
        selector = spec["selector"].get("matchLabels", {})
        if set(spec["selector"]) != {"matchLabels"} or "ray.io/cluster" in selector:
            found.append(f"{name}: select by matchLabels, never by the generated ray.io/cluster")
        for pod, labels in all_pods.items():
            if selector.items() <= labels.items():
                covering[pod].append(name)
        if not any(name in names for names in covering.values()):
            found.append(f"{name}: selects no pods")
    found += [
        f"{pod}: under {len(names)} budgets {names}" for pod, names in covering.items() if len(names) > 1
    ]
    for doc in docs:
        if doc["kind"] != "RayService":
            continue
        for group in groups(doc)[1:]:
            pod = f"{name_of(doc)}/{group['groupName']}"
            if not covering[pod]:
                found.append(f"{pod}: no budget")
                continue
            spec = one(budgets, "PodDisruptionBudget", covering[pod][0].partition("/")[2])["spec"]
            available = spec.get("minAvailable")
            if "maxUnavailable" in spec or not isinstance(available, int):
                found.append(f"{pod}: needs an integer minAvailable, not {spec}")
            elif not 0 <= available <= max(group["minReplicas"] - 1, 0):
                found.append(f"{pod}: minAvailable {available} blocks drains at {group['minReplicas']} pods")
            if spec.get("unhealthyPodEvictionPolicy") != "AlwaysAllow":
                found.append(f"{pod}: NotReady workers (HeadOnly) would block drains")
    return found


@pytest.mark.parametrize("build", BUILDS)
def test_every_worker_group_has_one_working_disruption_budget(build):
    assert pdb_problems(rendered(build)) == []


def _with_budget(env: str, **spec: Any) -> list[Doc]:
    docs = copy.deepcopy(list(rendered(env)))
    pdb = one(docs, "PodDisruptionBudget", f"{WORKER_PDB_PREFIX}workers")
    for key, value in spec.items():
        if value is None:
            pdb["spec"].pop(key)
        elif key == "group":
            pdb["spec"]["selector"]["matchLabels"]["ray.io/group"] = value
        else:
            pdb["spec"][key] = value
    return docs


def test_budget_check_catches_a_budget_for_a_group_that_does_not_exist():
    problems = pdb_problems(_with_budget("production", group="worker"))
    assert "PodDisruptionBudget/vurksha-workers: selects no pods" in problems
    assert "RayService/vurksha/workers: no budget" in problems


def test_budget_check_catches_overlapping_and_blocking_budgets():
    docs = _with_budget("production", minAvailable=3, unhealthyPodEvictionPolicy=None)
    catch_all = copy.deepcopy(one(docs, "PodDisruptionBudget", "vurksha-workers"))
    catch_all["metadata"]["name"] = "vurksha-everything"
    catch_all["spec"]["selector"] = {"matchLabels": {"app.kubernetes.io/part-of": "vurksha"}}
    problems = pdb_problems([*docs, catch_all])
    assert any("under 2 budgets" in p for p in problems), problems
    assert any("minAvailable 3 blocks drains at 3 pods" in p for p in problems), problems
    assert any("NotReady workers" in p for p in problems), problems
    assert any("integer minAvailable" in p for p in pdb_problems(_with_budget("staging", minAvailable="50%")))


# ------------------------------------------------------------------ the migration Job


@pytest.mark.parametrize("build", BUILDS)
def test_migrate_job_runs_vurksha_migrate_with_the_ray_pods_image_and_database(build):
    docs = rendered(build)
    job, rayservice = one(docs, "Job", MIGRATE_JOB), one(docs, "RayService", "vurksha")
    ray = [ray_container(g) for g in groups(rayservice)]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["vurksha", "migrate"]
    assert {container["image"]} == {c["image"] for c in ray}
    database_url = {json.dumps(v) for c in ray for v in c["env"] if v["name"] == "DATABASE_URL"}
    assert [json.dumps(v) for v in container["env"]] == list(database_url), "DATABASE_URL only, as the app's"

    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and spec["backoffLimit"] >= 1
    assert spec["activeDeadlineSeconds"] > 0 and spec["ttlSecondsAfterFinished"] > 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"]
    # README: `kubectl apply -k ... -l app.kubernetes.io/component=migrate` must pick the Job alone.
    assert [d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/component") == "migrate"] == [
        job
    ]


def test_migrate_is_a_vurksha_command():
    from deployments.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["migrate", "--help"])
    assert exited.value.code == 0


def test_the_jobs_env_is_all_vurksha_migrate_needs(monkeypatch):
    """`vurksha migrate` builds the settings (whose guard would refuse a half-configured
    VURKSHA_ENV=production) and insists on DATABASE_URL: the Job's env passes both."""
    from config.settings import Settings

    for name in list(os.environ):
        if name.startswith("VURKSHA_") or name in ("DATABASE_URL", "REDIS_URL"):
            monkeypatch.delenv(name)
    (container,) = one(rendered("production"), "Job", MIGRATE_JOB)["spec"]["template"]["spec"]["containers"]
    for var in container["env"]:
        monkeypatch.setenv(var["name"], var.get("value", "postgresql://placeholder@db/vurksha"))
    assert Settings().database_url


# ------------------------------------------------------------------ sizes


def sizes(env: str) -> dict[str, Any]:
    rayservice = one(rendered(env), "RayService", "vurksha")
    (workers,) = groups(rayservice)[1:]
    pdb = one(rendered(env), "PodDisruptionBudget", f"{WORKER_PDB_PREFIX}{workers['groupName']}")
    return {
        "min": workers["minReplicas"],
        "max": workers["maxReplicas"],
        "replicas": workers["replicas"],
        "min_available": pdb["spec"]["minAvailable"],
        "head_cpu": int(ray_container(groups(rayservice)[0])["resources"]["limits"]["cpu"]),
        "worker_cpu": int(ray_container(workers)["resources"]["limits"]["cpu"]),
    }


def test_environments_grow_from_dev_to_production():
    dev, staging, production = (sizes(env) for env in ENVS)
    for key in ("min", "max", "min_available"):
        assert dev[key] < staging[key] < production[key], key
    assert dev["head_cpu"] <= staging["head_cpu"] < production["head_cpu"]
    assert dev["worker_cpu"] < staging["worker_cpu"] == production["worker_cpu"]
    assert production["min"] >= 3, "losing a node still leaves two workers"
    for env, size in zip(ENVS, (dev, staging, production), strict=True):
        assert size["min"] <= size["replicas"] <= size["max"], env
        # Drains take one worker at a time where there is more than one to keep.
        assert size["min_available"] == size["min"] - 1, env


@pytest.mark.parametrize("env", ENVS)
def test_ray_containers_keep_rays_sizing_rules_after_patching(env):
    """Memory request == limit (Ray sizes its object store from it) and whole CPUs, as in the base."""
    for group in groups(one(rendered(env), "RayService", "vurksha")):
        resources = ray_container(group)["resources"]
        assert resources["requests"] == resources["limits"]
        assert re.fullmatch(r"[1-9][0-9]*", resources["limits"]["cpu"])


# ------------------------------------------------------------------ the renderer itself


def test_rendering_is_deterministic_and_leaves_the_base_alone():
    def dump(docs: list[Doc]) -> str:
        return yaml.safe_dump_all(docs, sort_keys=False)

    base = dump(kustomize.build(K8S))
    for env in ENVS:
        assert dump(kustomize.build(OVERLAYS / env)) == dump(kustomize.build(OVERLAYS / env))
    assert dump(kustomize.build(K8S)) == base
    assert dump(list(rendered("base"))) == base


def test_yaml_is_read_as_kustomize_reads_it():
    assert kustomize.load_all("a: yes\nb: on\nc: true\nd: False\n") == [
        {"a": "yes", "b": "on", "c": True, "d": False}
    ]
    with pytest.raises(KustomizeError, match="repeated key"):
        kustomize.load_all("env: 1\nenv: 2\n")


CONFIG_MAP = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: {a: b}\n"


def _kustomization(tmp_path: Path, text: str, **files: str) -> Path:
    (tmp_path / "kustomization.yaml").write_text(
        f"apiVersion: {kustomize.API_VERSION}\nkind: Kustomization\n{text}"
    )
    (tmp_path / "cm.yaml").write_text(CONFIG_MAP)
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    return tmp_path


@pytest.mark.parametrize(
    "text, why",
    [
        ("commonAnnotations: {a: b}\n", "not implemented here: ['commonAnnotations']"),
        ("commonLabels: {a: b}\n", "not implemented here: ['commonLabels']"),
        ("resources: [cm.yaml]\nreplicas: [{name: x, count: 2}]\n", "['replicas']"),
        ("resources: [../outside.yaml]\n", "outside the kustomization's folder"),
        ("resources: [https://github.com/x/y]\n", "remote resource"),
        ("resources: [cm.yaml]\nlabels: [{pairs: {a: b}, includeSelectors: true}]\n", "selectors/templates"),
        ("resources: [cm.yaml]\nimages: [{name: x, newTag: 1.10}]\n", "must be a (quoted) string"),
        ("resources: [cm.yaml]\nimages: [{name: x, tagSuffix: -rc}]\n", "['tagSuffix']"),
        ("configMapGenerator: [{name: g, files: [cm.yaml]}]\n", "disableNameSuffixHash"),
        ("resources: [cm.yaml]\npatches: [{patch: 'metadata: {name: cm}'}]\n", "only JSON6902"),
        ("resources: [cm.yaml]\npatches: [{patch: '[]'}]\n", "expected a mapping"),
        ("resources: [cm.yaml, cm.yaml]\n", "resource ids repeat"),
        (
            "resources: [cm.yaml]\npatches: [{patch: '[]', target: {kind: ConfigMap, labelSelector: a=b}}]\n",
            "['labelSelector']",
        ),
        ("resources: [cm.yaml]\npatches: [{patch: '[]', target: {name: 'c.*'}}]\n", "regular expressions"),
    ],
    ids=[
        "unknown-field",
        "commonLabels",
        "replicas",
        "file-outside-root",
        "remote",
        "label-selectors",
        "unquoted-tag",
        "tag-suffix",
        "hashed-config-map",
        "strategic-merge",
        "json-patch-without-target",
        "duplicate",
        "label-target",
        "regex-target",
    ],
)
def test_renderer_refuses_what_it_does_not_implement(tmp_path, text, why):
    (tmp_path / "k").mkdir()
    (tmp_path / "outside.yaml").write_text(CONFIG_MAP)
    with pytest.raises(KustomizeError) as raised:
        kustomize.build(_kustomization(tmp_path / "k", text))
    assert why in str(raised.value)


def test_renderer_refuses_a_wrong_api_version(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("apiVersion: v1\nkind: Kustomization\n")
    with pytest.raises(KustomizeError, match="apiVersion/kind"):
        kustomize.build(tmp_path)


def _overlay(tmp_path: Path, patches: str) -> Path:
    """An overlay of k8s/ like the real ones, with these patches."""
    return _kustomization(tmp_path, f"resources: [{os.path.relpath(K8S, tmp_path)}]\npatches:\n{patches}")


RAYSERVICE_TARGET = "  - target: {group: ray.io, kind: RayService, name: %s}\n    patch: '[%s]'\n"


@pytest.mark.parametrize(
    "name, op, why",
    [
        ("vurksha-typo", "{op: remove, path: /spec/serveConfigV2}", "matches no resource"),
        (
            "vurksha",
            "{op: test, path: /spec/rayClusterConfig/workerGroupSpecs/0/groupName, value: workerz}",
            "'workers' != 'workerz'",
        ),
        ("vurksha", "{op: replace, path: /spec/rayClusterConfig/minReplicas, value: 2}", "no such field"),
        (
            "vurksha",
            "{op: replace, path: /spec/rayClusterConfig/workerGroupSpecs/1/maxReplicas, value: 2}",
            "no list index '1'",
        ),
        ("vurksha", "{op: move, from: /a, path: /b}", "not implemented here: ['from']"),
    ],
    ids=["no-target", "failed-test-op", "missing-field", "missing-index", "unsupported-op"],
)
def test_a_broken_patch_raises(tmp_path, name, op, why):
    with pytest.raises(KustomizeError) as raised:
        kustomize.build(_overlay(tmp_path, RAYSERVICE_TARGET % (name, op)))
    assert why in str(raised.value)


def test_patch_operations_do_what_json6902_says(tmp_path):
    ops = (
        "{op: add, path: /metadata/annotations, value: {a~1b: x}},"
        "{op: add, path: /metadata/annotations/c~0d, value: y},"
        "{op: add, path: /spec/rayClusterConfig/workerGroupSpecs/-, value: {groupName: extra}},"
        "{op: add, path: /spec/rayClusterConfig/workerGroupSpecs/0, value: {groupName: first}},"
        "{op: remove, path: /spec/rayClusterConfig/autoscalerOptions}"
    )
    (rayservice,) = [
        d
        for d in kustomize.build(_overlay(tmp_path, RAYSERVICE_TARGET % ("vurksha", ops)))
        if d["kind"] == "RayService"
    ]
    assert rayservice["metadata"]["annotations"] == {"a~1b": "x", "c~d": "y"}
    names = [g["groupName"] for g in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    assert names == ["first", "workers", "extra"]
    assert "autoscalerOptions" not in rayservice["spec"]["rayClusterConfig"]


def test_config_map_generator_renders_files_into_the_namespace(tmp_path):
    """What k8s/grafana's dashboard will use: a file per key, the overlay's namespace and labels."""
    k = _kustomization(
        tmp_path,
        "namespace: vurksha-dev\nlabels: [{pairs: {app.kubernetes.io/environment: dev}}]\n"
        "configMapGenerator:\n  - name: vurksha-dashboards\n    files: [grafana/ray.json, overview.json=other.json]\n"
        "    options: {disableNameSuffixHash: true, labels: {grafana_dashboard: '1'}}\n",
        **{"other.json": '{"title": "overview"}\n'},
    )
    (k / "grafana").mkdir()
    (k / "grafana" / "ray.json").write_text('{"title": "ray"}\n')
    (cm,) = kustomize.build(k)
    assert cm == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "vurksha-dashboards",
            "labels": {"grafana_dashboard": "1", "app.kubernetes.io/environment": "dev"},
            "namespace": "vurksha-dev",
        },
        "data": {"overview.json": '{"title": "overview"}\n', "ray.json": '{"title": "ray"}\n'},
    }
    assert validation_errors(cm) == []


@pytest.mark.parametrize(
    "value, image, expected",
    [
        ("vurksha/backend:0.1.0", {"newTag": "0.2.0"}, "vurksha/backend:0.2.0"),
        ("vurksha/backend:0.1.0", {"newName": "reg.io/v/backend"}, "reg.io/v/backend:0.1.0"),
        ("vurksha/backend:0.1.0", {"digest": "sha256:ab12"}, "vurksha/backend@sha256:ab12"),
        ("vurksha/backend@sha256:ab12", {"newTag": "1"}, "vurksha/backend:1"),
        ("vurksha/backend", {"newTag": "1", "digest": "sha256:ab12"}, "vurksha/backend:1@sha256:ab12"),
        ("vurksha/backend-cli:0.1.0", {"newTag": "9"}, "vurksha/backend-cli:0.1.0"),
        ("mirror/vurksha/backend:0.1.0", {"newTag": "9"}, "mirror/vurksha/backend:0.1.0"),
    ],
)
def test_images_are_retagged_as_kustomize_retags_them(value, image, expected):
    assert kustomize.new_image(value, {"name": "vurksha/backend", **image}) == expected
    port = {"name": "localhost:5000/vurksha/backend", "newTag": "3"}
    assert kustomize.new_image("localhost:5000/vurksha/backend:2", port) == "localhost:5000/vurksha/backend:3"
