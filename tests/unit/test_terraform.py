"""The AWS infrastructure in k8s/terraform (VPC, EKS with the KubeRay operator, RDS PostgreSQL,
ElastiCache Redis, Secrets Manager), one root module per environment over one shared module.

No terraform binary and no network: every file is parsed with python-hcl2 and checked for what
must hold, and checkov (its own virtual environment, .venv-checkov, built by
`make checkov-setup`: its pins would fight Ray's in .venv) must report no failed check, with a
reason for every skip."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TF = REPO / "k8s" / "terraform"
MODULE = TF / "modules" / "vurksha"
ENVS = ("dev", "staging", "production")
CHECKOV = REPO / ".venv-checkov" / "bin" / "checkov"

# Every setting an operator chooses per environment: each env states all of them.
OPERATOR_VARIABLES = {
    "region",
    "name",
    "vpc_cidr",
    "az_count",
    "api_public_access",
    "api_public_cidrs",
    "node_instance_type",
    "node_min_size",
    "node_desired_size",
    "node_max_size",
    "db_instance_class",
    "db_allocated_storage",
    "db_max_allocated_storage",
    "redis_node_type",
    "multi_az",
    "deletion_protection",
    "backup_retention_days",
}
PROVIDERS = ("aws", "helm", "kubernetes", "random")

# The checkov checks skipped, each inline next to what it is about, with its reason (and listed
# in k8s/terraform/README.md). A new skip must be added here on purpose.
EXPECTED_SKIPS = {"CKV_AWS_157", "CKV_AWS_293", "CKV2_AWS_50", "CKV2_AWS_57"}
# Checks that must not only not fail but be answered (PASSED) in every environment: checkov
# reports nothing for a check whose value it cannot evaluate, so an expression it cannot follow
# would otherwise turn one of these off without a word.
MUST_PASS = {
    "CKV_AWS_16",  # RDS encrypted at rest
    "CKV_AWS_17",  # RDS not publicly accessible
    "CKV_AWS_118",  # RDS enhanced monitoring
    "CKV_AWS_133",  # RDS backups
    "CKV_AWS_161",  # RDS IAM authentication
    "CKV_AWS_353",  # RDS Performance Insights
    "CKV2_AWS_69",  # RDS TLS only (rds.force_ssl)
    "CKV_AWS_29",  # Redis encrypted at rest
    "CKV_AWS_30",  # Redis encrypted in transit
    "CKV_AWS_31",  # Redis AUTH token
    "CKV_AWS_191",  # Redis customer-managed key
    "CKV_AWS_37",  # EKS control-plane logging
    "CKV_AWS_38",  # EKS API not open to 0.0.0.0/0
    "CKV_AWS_39",  # EKS API private
    "CKV_AWS_58",  # EKS secrets encryption
    "CKV_AWS_149",  # Secrets Manager with a customer-managed key
    "CKV_AWS_158",  # log groups encrypted
    "CKV_AWS_7",  # KMS key rotation
    "CKV2_AWS_11",  # VPC flow logs
    "CKV2_AWS_12",  # default security group closed
}

# python-hcl2's plain form: strings without their quotes, expressions as "${...}".
HCL_OPTIONS = hcl2.SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)

Doc = dict[str, Any]


# --- parsing -------------------------------------------------------------------------------------


@cache
def parse(path: Path) -> Doc:
    with path.open() as f:
        return hcl2.load(f, serialization_options=HCL_OPTIONS)


def tf_files() -> list[Path]:
    return sorted(TF.rglob("*.tf"))


def merged(directory: Path) -> Doc:
    """A Terraform module is the union of its .tf files: one doc with every top-level list joined."""
    doc: dict[str, list[Any]] = {}
    for path in sorted(directory.glob("*.tf")):
        for key, value in parse(path).items():
            doc.setdefault(key, []).extend(value)
    return doc


def blocks(doc: Doc, kind: str, type_: str | None = None) -> dict[str, Any]:
    """`resource "aws_db_instance" "main" {...}` as {"main": {...}} for kind resource, type
    aws_db_instance; `variable "x" {...}` / `module "x" {...}` as {"x": {...}} without a type."""
    found: dict[str, Any] = {}
    for entry in doc.get(kind, []):
        for key, body in entry.items():
            if type_ is None:
                found[key] = body
            elif key == type_:
                found.update(body)
    return found


def resources(doc: Doc, type_: str) -> dict[str, Doc]:
    return blocks(doc, "resource", type_)


def one(doc: Doc, type_: str) -> Doc:
    found = resources(doc, type_)
    assert len(found) == 1, f"expected one {type_}, found {sorted(found)}"
    return next(iter(found.values()))


def locals_of(doc: Doc) -> Doc:
    values: Doc = {}
    for entry in doc.get("locals", []):
        values.update(entry)
    return values


def first(block_list: Any) -> Doc:
    """A nested block (vpc_config { ... }) parses as a list of one dict."""
    assert isinstance(block_list, list) and len(block_list) == 1, block_list
    return block_list[0]


def env_dir(env: str) -> Path:
    return TF / "envs" / env


def tfvars(env: str) -> Doc:
    return parse(env_dir(env) / "terraform.tfvars")


@cache
def module_doc() -> Doc:
    return merged(MODULE)


# --- what must hold, as functions returning problems (so they can be shown to fail, below) -------


def rds_problems(doc: Doc) -> list[str]:
    db = one(doc, "aws_db_instance")
    problems = []
    if db.get("engine") != "postgres":
        problems.append(f"engine is {db.get('engine')!r}, not postgres")
    major = int(str(db.get("engine_version", "0")).split(".")[0])
    if major < 16:
        problems.append(f"PostgreSQL {major}: 16 or newer")
    expected = {
        "storage_encrypted": True,
        "publicly_accessible": False,
        "iam_database_authentication_enabled": True,
        "performance_insights_enabled": True,
        "auto_minor_version_upgrade": True,
        "copy_tags_to_snapshot": True,
        # The per-environment settings reach the instance.
        "multi_az": "${var.multi_az}",
        "deletion_protection": "${var.deletion_protection}",
        "backup_retention_period": "${var.backup_retention_days}",
    }
    problems += [
        f"{key} = {db.get(key)!r}, want {want!r}" for key, want in expected.items() if db.get(key) != want
    ]
    for key in ("kms_key_id", "performance_insights_kms_key_id"):
        if db.get(key) != "${aws_kms_key.main.arn}":
            problems.append(f"{key} is not the environment's KMS key")
    if not str(db.get("monitoring_interval", 0)).isdigit() or int(db["monitoring_interval"]) <= 0:
        problems.append("enhanced monitoring is off (monitoring_interval)")
    if db.get("password") != "${random_password.db.result}":
        problems.append("the master password is not a random_password")
    groups = resources(doc, "aws_db_parameter_group")
    group_name = str(db.get("parameter_group_name", ""))
    group = next(
        (g for name, g in groups.items() if group_name == f"${{aws_db_parameter_group.{name}.name}}"), None
    )
    if group is None:
        problems.append("no parameter group of this module")
    else:
        if group.get("family") != f"postgres{major}":
            problems.append(f"parameter group family {group.get('family')} for PostgreSQL {major}")
        params = {p["name"]: str(p["value"]) for p in group.get("parameter", [])}
        if params.get("rds.force_ssl") != "1":
            problems.append("rds.force_ssl is not 1: clients may connect without TLS")
    return problems


def redis_problems(doc: Doc) -> list[str]:
    redis = one(doc, "aws_elasticache_replication_group")
    problems = []
    if redis.get("engine") != "redis" or not str(redis.get("engine_version", "")).startswith("7"):
        problems.append(f"engine {redis.get('engine')} {redis.get('engine_version')}: want Redis 7")
    expected = {
        "at_rest_encryption_enabled": True,
        "transit_encryption_enabled": True,
        "kms_key_id": "${aws_kms_key.main.arn}",
        "auth_token": "${random_password.redis.result}",
        "multi_az_enabled": "${var.multi_az}",
        "automatic_failover_enabled": "${var.multi_az}",
    }
    problems += [
        f"{key} = {redis.get(key)!r}, want {want!r}"
        for key, want in expected.items()
        if redis.get(key) != want
    ]
    return problems


def ingress_problems(doc: Doc) -> list[str]:
    """RDS and Redis admit their one port from the EKS cluster security group, nothing else."""
    problems = []
    for name, group in resources(doc, "aws_security_group").items():
        for key in ("ingress", "egress"):
            if key in group:
                problems.append(f"aws_security_group.{name} has inline {key} rules")
    if resources(doc, "aws_vpc_security_group_egress_rule") or resources(doc, "aws_security_group_rule"):
        problems.append("egress rules / aws_security_group_rule: only the two ingress rules are expected")
    rules = resources(doc, "aws_vpc_security_group_ingress_rule")
    wanted = {"${aws_security_group.db.id}": 5432, "${aws_security_group.redis.id}": 6379}
    seen = {}
    for name, rule in rules.items():
        port = wanted.get(rule.get("security_group_id"))
        if port is None:
            problems.append(f"ingress rule {name} on an unexpected security group")
            continue
        seen[rule["security_group_id"]] = name
        if (rule.get("from_port"), rule.get("to_port"), rule.get("ip_protocol")) != (port, port, "tcp"):
            problems.append(f"ingress rule {name} is not tcp/{port} only")
        if rule.get("referenced_security_group_id") != "${local.eks_security_group_id}":
            problems.append(f"ingress rule {name} admits something other than the EKS cluster security group")
        if any(key in rule for key in ("cidr_ipv4", "cidr_ipv6", "prefix_list_id")):
            problems.append(f"ingress rule {name} admits an address range")
    problems += [f"no ingress rule for {group}" for group in wanted if group not in seen]
    return problems


def production_problems(settings: Doc) -> list[str]:
    problems = []
    if settings.get("multi_az") is not True:
        problems.append("production must be multi-AZ")
    if settings.get("deletion_protection") is not True:
        problems.append("production must have deletion protection")
    if not isinstance(settings.get("backup_retention_days"), int) or settings["backup_retention_days"] < 7:
        problems.append(f"production keeps backups {settings.get('backup_retention_days')} days: at least 7")
    if settings.get("api_public_access") is not False:
        problems.append("production's EKS API must be private")
    return problems


# Attributes whose value is a credential: in a .tf file each must come from somewhere (a
# random_password, a variable), never be written down.
SECRET_ATTRIBUTES = {
    "password",
    "auth_token",
    "secret_string",
    "master_password",
    "access_key",
    "secret_key",
    "token",
}
# Shapes of real credentials, wherever they appear in the text.
CREDENTIAL_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"rzp_(live|test)_[A-Za-z0-9]{8,}"),  # Razorpay key id
    re.compile(r"\bAC[0-9a-f]{32}\b"),  # Twilio-style account SID
]


def walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from walk(inner, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            yield from walk(inner, f"{path}[{index}]")
    else:
        yield path, value


def secret_literal_problems(doc: Doc, text: str, where: str) -> list[str]:
    problems = []
    for path, value in walk(doc):
        if (
            path.rsplit(".", 1)[-1].split("[")[0] in SECRET_ATTRIBUTES
            and isinstance(value, str)
            and "${" not in value
        ):
            problems.append(f"{where}: {path} is a literal value")
    for pattern in CREDENTIAL_PATTERNS:
        if pattern.search(text):
            problems.append(f"{where}: something shaped like a credential ({pattern.pattern})")
    return problems


SKIP_COMMENT = re.compile(r"checkov:skip=([^\s:]*)(?::(.*))?")


def skip_comments(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), (m.group(2) or "").strip()) for m in SKIP_COMMENT.finditer(text)]


def skip_problems(skips: list[tuple[str, str]], where: str) -> list[str]:
    problems = []
    for check, reason in skips:
        if not re.fullmatch(r"CKV2?_[A-Z]+_\d+", check):
            problems.append(f"{where}: skip of {check!r}, not a check id")
        # A reason says why, in words: more than a few characters.
        if len(reason) < 20:
            problems.append(f"{where}: skip of {check} without a reason")
    return problems


# --- the files -----------------------------------------------------------------------------------


def test_every_file_parses_and_the_layout_holds():
    files = tf_files()
    assert files, "no .tf files under k8s/terraform"
    for path in files:
        assert isinstance(parse(path), dict), path
    for path in files:
        rel = path.relative_to(TF)
        assert rel.parts[:2] == ("modules", "vurksha") or (rel.parts[0] == "envs" and rel.parts[1] in ENVS), (
            f"{rel}: every .tf file belongs to an environment or to the shared module"
        )
    for env in ENVS:
        for name in ("main.tf", "variables.tf", "outputs.tf", "terraform.tfvars", "backend.hcl.example"):
            assert (env_dir(env) / name).is_file(), f"envs/{env}/{name} is missing"
        parse(env_dir(env) / "terraform.tfvars")


def test_no_registry_modules_only_the_shared_one():
    """Plain aws_* resources: registry modules could not be downloaded here, and checkov would
    not see inside them."""
    assert not blocks(module_doc(), "module"), "the shared module calls other modules"
    for env in ENVS:
        calls = blocks(merged(env_dir(env)), "module")
        assert set(calls) == {"vurksha"}, f"{env}: modules {sorted(calls)}"
        assert calls["vurksha"]["source"] == "../../modules/vurksha"
        assert "version" not in calls["vurksha"]


def test_provider_versions_are_pinned():
    def constraints(doc: Doc) -> tuple[str, dict[str, Doc]]:
        terraform = first(doc["terraform"])
        return terraform.get("required_version", ""), first(terraform["required_providers"])

    version, providers = constraints(module_doc())
    assert re.fullmatch(r">= 1\.\d+, < 2\.0", version), version
    for name in PROVIDERS:
        assert providers[name]["source"] == f"hashicorp/{name}"
        # The module states a bounded range; the environments pin within it.
        assert re.fullmatch(r">= \d+\.\d+, < \d+\.0", providers[name]["version"]), providers[name]
    for env in ENVS:
        doc = merged(env_dir(env))
        env_version, env_providers = constraints(doc)
        assert env_version == version, f"{env}: required_version {env_version!r}"
        assert set(env_providers) == set(PROVIDERS), f"{env}: providers {sorted(env_providers)}"
        for name in PROVIDERS:
            pin = env_providers[name]["version"]
            match = re.fullmatch(r"~> (\d+)\.(\d+)", pin)
            assert match, f"{env}: {name} {pin!r} is not pinned to a minor series"
            low, high = (int(major) for major in re.findall(r"(\d+)\.\d+", providers[name]["version"]))
            assert low <= int(match.group(1)) < high, (
                f"{env}: {name} {pin} is outside the module's {providers[name]['version']}"
            )
            assert env_providers[name]["source"] == f"hashicorp/{name}"
        # Remote state: a partial S3 backend, filled in from backend.hcl.
        assert blocks(first(doc["terraform"]), "backend") == {"s3": {}}, f"{env}: no partial s3 backend"
        backend = parse(env_dir(env) / "backend.hcl.example")
        assert backend["key"] == f"vurksha/{env}/terraform.tfstate"
        assert backend["encrypt"] is True and backend.get("dynamodb_table")


def test_every_environment_sets_every_operator_variable():
    module_variables = set(blocks(module_doc(), "variable")) - {"environment"}
    assert module_variables == OPERATOR_VARIABLES
    for env in ENVS:
        doc = merged(env_dir(env))
        call = blocks(doc, "module")["vurksha"]
        assert call["environment"] == env
        passed = {key: value for key, value in call.items() if key not in ("source", "environment")}
        assert set(passed) == OPERATOR_VARIABLES, f"{env}: passes {sorted(set(passed) ^ OPERATOR_VARIABLES)}"
        for key, value in passed.items():
            assert value == f"${{var.{key}}}", f"{env}: {key} = {value!r}: set it in terraform.tfvars"
        declared = blocks(doc, "variable")
        assert set(declared) == OPERATOR_VARIABLES
        assert all("default" not in body for body in declared.values()), (
            f"{env}: defaults hide unset variables"
        )
        settings = tfvars(env)
        assert set(settings) == OPERATOR_VARIABLES, (
            f"{env}: tfvars {sorted(set(settings) ^ OPERATOR_VARIABLES)}"
        )
        assert settings["name"] == f"vurksha-{env}"
        assert settings["node_min_size"] <= settings["node_desired_size"] <= settings["node_max_size"]
        assert "0.0.0.0/0" not in settings["api_public_cidrs"]
    for name in ("variables.tf", "outputs.tf"):
        texts = {(env_dir(env) / name).read_text() for env in ENVS}
        assert len(texts) == 1, f"envs/*/{name} differ: keep them the same"
    cidrs = [tfvars(env)["vpc_cidr"] for env in ENVS]
    assert len(set(cidrs)) == len(cidrs), "environments share a VPC range (they could never be peered)"


def test_environments_differ_as_intended():
    dev, staging, production = (tfvars(env) for env in ENVS)
    assert production_problems(production) == []
    assert (
        production["backup_retention_days"]
        >= staging["backup_retention_days"]
        >= dev["backup_retention_days"]
        >= 1
    )
    assert production["az_count"] == 3
    assert staging["deletion_protection"] is True
    # dev is cheap: one database instance, one Redis node, nothing that blocks a teardown.
    assert dev["multi_az"] is False and dev["deletion_protection"] is False


def test_production_checks_can_fail():
    production = copy.deepcopy(tfvars("production"))
    production.update(
        multi_az=False, deletion_protection=False, backup_retention_days=1, api_public_access=True
    )
    assert len(production_problems(production)) == 4


def test_rds_is_encrypted_private_and_recoverable():
    assert rds_problems(module_doc()) == []
    subnets = one(module_doc(), "aws_db_subnet_group")["subnet_ids"]
    assert subnets == "${aws_subnet.private[*].id}"


def test_redis_is_encrypted_with_an_auth_token():
    assert redis_problems(module_doc()) == []


def test_only_eks_reaches_the_database_and_redis():
    assert ingress_problems(module_doc()) == []


def test_the_data_checks_can_fail():
    doc = copy.deepcopy(module_doc())
    db = one(doc, "aws_db_instance")
    db.update(storage_encrypted=False, publicly_accessible=True, password="hunter2")
    redis = one(doc, "aws_elasticache_replication_group")
    redis["transit_encryption_enabled"] = False
    rule = next(iter(resources(doc, "aws_vpc_security_group_ingress_rule").values()))
    rule["cidr_ipv4"] = "0.0.0.0/0"
    problems = rds_problems(doc)
    for needle in ("storage_encrypted", "publicly_accessible", "master password"):
        assert any(needle in problem for problem in problems), (needle, problems)
    assert any("transit_encryption_enabled" in p for p in redis_problems(doc))
    assert any("address range" in p for p in ingress_problems(doc))


def test_eks_is_private_encrypted_and_logged():
    doc = module_doc()
    cluster = one(doc, "aws_eks_cluster")
    vpc = first(cluster["vpc_config"])
    assert vpc["endpoint_private_access"] is True
    assert vpc["endpoint_public_access"] == "${var.api_public_access}"
    assert vpc["subnet_ids"] == "${aws_subnet.private[*].id}"
    encryption = first(cluster["encryption_config"])
    assert encryption["resources"] == ["secrets"]
    assert first(encryption["provider"])["key_arn"] == "${aws_kms_key.main.arn}"
    assert set(cluster["enabled_cluster_log_types"]) == {
        "api",
        "audit",
        "authenticator",
        "controllerManager",
        "scheduler",
    }
    nodes = one(doc, "aws_eks_node_group")
    assert nodes["subnet_ids"] == "${aws_subnet.private[*].id}"
    assert nodes["instance_types"] == ["${var.node_instance_type}"]
    metadata = first(one(doc, "aws_launch_template")["metadata_options"])
    assert metadata["http_tokens"] == "required" and metadata["http_put_response_hop_limit"] == 1
    # The VPC spreads over the AZs, with flow logs.
    assert one(doc, "aws_flow_log")["traffic_type"] == "ALL"
    assert resources(doc, "aws_subnet").keys() == {"public", "private"}
    assert all(subnet["count"] == "${var.az_count}" for subnet in resources(doc, "aws_subnet").values())
    # A Ray worker asks for 4 CPUs: a node must have more than that (8 vCPUs and up).
    for env in ENVS:
        size = tfvars(env)["node_instance_type"].split(".")[1]
        assert re.fullmatch(r"\d+xlarge", size) and int(size[:-6]) >= 2, (
            f"{env}: {size} cannot take a Ray worker"
        )


def kuberay_release_of_vendored_crds() -> str:
    source = (REPO / "k8s" / "crds" / "SOURCE.md").read_text()
    match = re.search(r"Release: \*\*KubeRay v(\d+\.\d+\.\d+)\*\*", source)
    assert match, "k8s/crds/SOURCE.md names no KubeRay release"
    return match.group(1)


def test_kuberay_chart_is_the_release_of_the_vendored_crds():
    doc = module_doc()
    release = one(doc, "helm_release")
    assert release["chart"] == "kuberay-operator"
    assert release["repository"] == "https://ray-project.github.io/kuberay-helm/"
    assert release["version"] == "${local.kuberay_version}"
    assert locals_of(doc)["kuberay_version"] == kuberay_release_of_vendored_crds()


def app_secret_keys() -> set[str]:
    """The keys of the Kubernetes Secret vurksha-secrets that the RayService reads."""
    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("secretKeyRef")
            if isinstance(ref, dict) and ref.get("name") == "vurksha-secrets":
                found.add(ref["key"])
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(yaml.safe_load((REPO / "k8s" / "rayservice.yaml").read_text()))
    assert found, "k8s/rayservice.yaml reads no key of vurksha-secrets"
    return found


def test_secrets_manager_holds_every_key_of_the_app_secret():
    doc = module_doc()
    local = locals_of(doc)
    generated = set(local["generated_secrets"])
    operator = set(local["operator_secrets"])
    assert generated == {"DATABASE_URL", "REDIS_URL"}
    assert not generated & operator
    assert generated | operator == app_secret_keys(), "Secrets Manager and k8s/rayservice.yaml disagree"
    secret = one(doc, "aws_secretsmanager_secret")
    assert secret["kms_key_id"] == "${aws_kms_key.main.arn}"
    assert secret["name"] == "${var.name}/${each.key}"
    # Values only for what Terraform generates; the operator fills in the rest.
    version = one(doc, "aws_secretsmanager_secret_version")
    assert version["for_each"] == "${local.generated_secrets}"
    assert "?ssl=require" in local["generated_secrets"]["DATABASE_URL"]
    assert local["generated_secrets"]["REDIS_URL"].startswith("rediss://")


def test_no_secret_values_in_the_files():
    problems = []
    for path in sorted(TF.rglob("*")):
        if path.suffix in (".tf", ".tfvars", ".example", ".md") and path.is_file():
            text = path.read_text()
            doc = parse(path) if path.suffix != ".md" else {}
            problems += secret_literal_problems(doc, text, str(path.relative_to(REPO)))
    assert problems == []


def test_the_secret_check_can_fail():
    doc = copy.deepcopy(module_doc())
    one(doc, "aws_elasticache_replication_group")["auth_token"] = "correct-horse-battery"
    problems = secret_literal_problems(doc, 'access_key = "AKIAABCDEFGHIJKLMNOP"', "mutated")
    assert len(problems) == 2, problems
    assert problems[0].endswith("aws_elasticache_replication_group.main.auth_token is a literal value")
    assert "shaped like a credential" in problems[1]


def test_every_skip_gives_its_reason():
    skips: list[tuple[str, str]] = []
    problems = []
    for path in sorted(TF.rglob("*.tf")):
        found = skip_comments(path.read_text())
        problems += skip_problems(found, str(path.relative_to(REPO)))
        skips += found
    assert problems == []
    assert {check for check, _ in skips} == EXPECTED_SKIPS
    config = TF / ".checkov.yaml"
    assert not config.exists(), "skips live inline, next to what they are about (README: Skips)"
    readme = (TF / "README.md").read_text()
    section = readme.split("## Skips", 1)[-1]
    assert all(check in section for check in EXPECTED_SKIPS), "k8s/terraform/README.md must list every skip"


def test_the_skip_check_can_fail():
    found = skip_comments("# checkov:skip=CKV_AWS_16\n#checkov:skip=CKV_AWS_17:ok\n")
    assert len(skip_problems(found, "x")) == 2


# --- checkov -------------------------------------------------------------------------------------


def checkov_binary() -> Path:
    if not CHECKOV.exists():
        pytest.fail(
            f"{CHECKOV.relative_to(REPO)} is missing: run `make checkov-setup` (`make test` builds it too)",
            pytrace=False,
        )
    return CHECKOV


def run_checkov(directory: Path) -> Doc:
    """checkov on one directory, offline, as JSON (passed checks included)."""
    env = {
        **os.environ,
        "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true",  # no PyPI round trip (30 s without a network)
        "BC_SKIP_MAPPING": "TRUE",  # no download of the Prisma guideline mapping
        "LOG_LEVEL": "WARNING",
    }
    args = [str(checkov_binary()), "-d", str(directory), "--framework", "terraform", "--output", "json"]
    args += ["--skip-download", "--download-external-modules", "false", "--compact"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, check=False)
    # 0: nothing failed, 1: something failed; anything else is checkov itself failing.
    assert done.returncode in (0, 1), f"checkov exited {done.returncode}:\n{done.stderr[-3000:]}"
    report = json.loads(done.stdout)
    if isinstance(report, list):  # one report per framework when there are several
        (report,) = [r for r in report if r.get("check_type") == "terraform"]
    return report


@pytest.fixture(scope="module")
def checkov_reports() -> dict[str, Doc]:
    """One run per environment, in parallel. A single run over k8s/terraform would merge the
    three `module.vurksha` instances into one (checkov keys results by resource address), so the
    per-environment values (dev's single AZ, production's protection) would not all be checked."""
    checkov_binary()
    with ThreadPoolExecutor(len(ENVS)) as pool:
        reports = dict(zip(ENVS, pool.map(run_checkov, [env_dir(env) for env in ENVS]), strict=True))
    return reports


def describe(check: Doc) -> str:
    lines = check.get("file_line_range") or ["?", "?"]
    return f"{check['check_id']} {check['check_name']}\n    {check['resource']} ({check['file_path']}:{lines[0]}-{lines[1]})"


@pytest.mark.parametrize("env", ENVS)
def test_checkov_finds_nothing(checkov_reports: dict[str, Doc], env: str):
    report = checkov_reports[env]
    results, summary = report["results"], report["summary"]
    assert summary["parsing_errors"] == 0, f"{env}: checkov could not parse: {results.get('parsing_errors')}"
    failed = results.get("failed_checks", [])
    assert not failed, f"{env}: checkov failed {len(failed)} checks:\n" + "\n".join(map(describe, failed))
    passed = {check["check_id"] for check in results.get("passed_checks", [])}
    assert MUST_PASS <= passed, f"{env}: not evaluated: {sorted(MUST_PASS - passed)}"
    for check in results.get("skipped_checks", []):
        assert check["check_id"] in EXPECTED_SKIPS, describe(check)
        reason = (check.get("check_result") or {}).get("suppress_comment") or ""
        assert len(reason) >= 20, f"{env}: {check['check_id']} skipped without a reason"


def test_checkov_is_the_pinned_version(checkov_reports: dict[str, Doc]):
    pinned = re.search(r"^CHECKOV_VERSION\s*:=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    assert pinned, "the Makefile pins no CHECKOV_VERSION"
    for env, report in checkov_reports.items():
        assert report["summary"]["checkov_version"] == pinned.group(1), env


def test_checkov_fails_an_insecure_database(tmp_path: Path):
    """The same run reports failures when there are some: an unencrypted, public RDS instance."""
    (tmp_path / "main.tf").write_text(
        'resource "aws_db_instance" "bad" {\n'
        '  engine              = "postgres"\n'
        '  instance_class      = "db.t4g.micro"\n'
        "  storage_encrypted   = false\n"
        "  publicly_accessible = true\n"
        "}\n"
    )
    report = run_checkov(tmp_path)
    failed = {check["check_id"] for check in report["results"].get("failed_checks", [])}
    assert {"CKV_AWS_16", "CKV_AWS_17"} <= failed, failed
