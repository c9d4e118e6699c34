"""The alert rules, the Grafana dashboard and the runbook, checked without a cluster: the rules
are generated from k8s/slo.yaml and not stale, every threshold is the objective's, every panel
and alert refers only to metrics that are exported (our CATALOGUE, or Serve's own as a running
stack exports them), every alert has its runbook section. tests/service/test_metrics.py checks
the same names against a real scrape."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from config.metrics import CATALOGUE
from config.slo import (
    ALERTS_FILE,
    DASHBOARD_FILE,
    RUNBOOK,
    SLO_FILE,
    alert_metrics,
    alert_rules,
    dashboard_exprs,
    dashboard_metrics,
    exported_metrics,
    load_slo,
    panels,
    promql_metrics,
    render_alerts,
    rule_exprs,
)

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_RULE_CRD = REPO / "k8s" / "crds" / "monitoring.coreos.com_prometheusrules.yaml"

# Serve's own metrics the rules and panels use, as a local stack with HAProxy ingress exports them
# (Ray 2.60). Anything else must come from config.metrics.CATALOGUE.
SERVE_METRICS = frozenset(
    {
        "ray_serve_num_http_requests_total",
        "ray_serve_http_request_latency_ms_bucket",
        "ray_serve_deployment_processing_latency_ms_bucket",
        "ray_serve_deployment_replica_healthy",
        "ray_serve_autoscaling_target_replicas",
        "ray_serve_autoscaling_desired_replicas",
        "ray_serve_num_ongoing_requests_at_replicas",
        "ray_serve_replica_processing_queries",
        "ray_serve_replica_utilization_percent",
    }
)
ALLOWED = exported_metrics() | SERVE_METRICS

ALERTS = {
    "CheckoutErrorRate",
    "CheckoutLatencyP99",
    "ApiErrorRate",
    "ApiLatencyP99",
    "ServeReplicaUnhealthy",
    "OutboxLag",
    "OutboxRelayStalled",
    "OutboxDeadLetters",
    "WebhookVerificationFailures",
    "TrackingLatencyP99",
}


def committed_rules() -> dict[str, Any]:
    return yaml.safe_load(ALERTS_FILE.read_text())


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text())


def all_rules(rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for g in rules["spec"]["groups"] for r in g["rules"]]


def unknown(names: set[str]) -> set[str]:
    return names - ALLOWED


# ------------------------------------------------------------------ generated, and in step with slo.yaml


def test_alerts_yaml_is_generated_from_slo_yaml():
    assert ALERTS_FILE.exists(), "k8s/alerts.yaml is missing: run `vurksha alerts`"
    assert ALERTS_FILE.read_text() == render_alerts(load_slo()), (
        "k8s/alerts.yaml is stale: run `vurksha alerts`"
    )
    assert committed_rules() == alert_rules(load_slo())


def test_vurksha_alerts_check_agrees():
    from deployments.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["alerts", "--check"])
    assert exit_.value.code == 0


def test_the_rule_is_the_one_the_issue_asks_for():
    rules = committed_rules()
    assert rules["apiVersion"] == "monitoring.coreos.com/v1" and rules["kind"] == "PrometheusRule"
    assert rules["metadata"] == {"name": "vurksha-slo", "labels": {"app.kubernetes.io/part-of": "vurksha"}}
    names = [r["alert"] for r in all_rules(rules)]
    assert len(names) == len(set(names))
    assert set(names) == ALERTS


def test_every_alert_holds_for_alert_for_and_says_what_and_how_bad():
    slo = load_slo()
    for rule in all_rules(committed_rules()):
        assert rule["for"] == slo.alert_for, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def _threshold(expr: str) -> float:
    match = re.search(r"\s>\s*([0-9.e+-]+)\s*$", expr)
    assert match, f"no trailing `> threshold` in {expr}"
    return float(match[1])


def test_every_threshold_is_the_objective_in_slo_yaml():
    """Read back from the expressions, in each metric's unit (seconds for our histograms,
    milliseconds for Serve's), against slo.yaml as plain YAML (not through config.slo)."""
    raw = yaml.safe_load(SLO_FILE.read_text())
    expected = {
        "CheckoutErrorRate": raw["checkout"]["error_rate"],
        "CheckoutLatencyP99": raw["checkout"]["p99_ms"] / 1000,
        "ApiErrorRate": raw["api"]["error_rate"],
        "ApiLatencyP99": raw["api"]["p99_ms"],
        "OutboxLag": raw["outbox"]["lag_s"],
        "OutboxDeadLetters": raw["outbox"]["dead_letters"],
        "WebhookVerificationFailures": raw["webhooks"]["failures_per_5m"],
        "TrackingLatencyP99": raw["tracking"]["p99_ms"] / 1000,
    }
    exprs = rule_exprs(committed_rules())
    assert {name: _threshold(exprs[name]) for name in expected} == pytest.approx(expected)


# (slo.yaml key path, new value, the alert that must change, its new threshold as in the expr)
CHANGES = [
    (("checkout", "error_rate"), 0.05, "CheckoutErrorRate", 0.05),
    (("checkout", "p99_ms"), 1500, "CheckoutLatencyP99", 1.5),
    (("api", "error_rate"), 0.02, "ApiErrorRate", 0.02),
    (("api", "p99_ms"), 250, "ApiLatencyP99", 250),
    (("tracking", "p99_ms"), 3000, "TrackingLatencyP99", 3),
    (("outbox", "lag_s"), 120, "OutboxLag", 120),
    (("outbox", "dead_letters"), 3, "OutboxDeadLetters", 3),
    (("webhooks", "failures_per_5m"), 20, "WebhookVerificationFailures", 20),
]


def _edited_slo(tmp_path: Path, path: tuple[str, ...], value: Any) -> Path:
    raw = yaml.safe_load(SLO_FILE.read_text())
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    out = tmp_path / "slo.yaml"
    out.write_text(yaml.safe_dump(raw))
    return out


@pytest.mark.parametrize("path, value, alert, threshold", CHANGES, ids=[".".join(c[0]) for c in CHANGES])
def test_changing_an_objective_changes_exactly_its_alert(tmp_path, path, value, alert, threshold):
    before = rule_exprs(alert_rules(load_slo()))
    after = rule_exprs(alert_rules(load_slo(_edited_slo(tmp_path, path, value))))
    assert {name for name in before if before[name] != after[name]} == {alert}
    assert _threshold(after[alert]) == pytest.approx(threshold)
    assert render_alerts(load_slo(_edited_slo(tmp_path, path, value))) != ALERTS_FILE.read_text()


def test_changing_alert_for_changes_every_alert(tmp_path):
    rules = alert_rules(load_slo(_edited_slo(tmp_path, ("alert_for",), "10m")))
    assert {r["for"] for r in all_rules(rules)} == {"10m"}


@pytest.mark.parametrize(
    "path, value",
    [
        (("checkout", "p99_msec"), 1000),  # unknown key
        (("extra",), 1),  # unknown section
        (("api", "error_rate"), 1.5),  # not a share
        (("api", "p99_ms"), "fast"),
        (("outbox", "dead_letters"), -1),
        (("alert_for",), "five minutes"),
    ],
    ids=["unknown-key", "unknown-section", "rate-above-1", "not-a-number", "negative", "bad-duration"],
)
def test_slo_yaml_rejects_what_it_does_not_know(tmp_path, path, value):
    with pytest.raises(ValidationError):
        load_slo(_edited_slo(tmp_path, path, value))


def test_slo_yaml_rejects_a_missing_objective(tmp_path):
    raw = yaml.safe_load(SLO_FILE.read_text())
    del raw["tracking"]
    (tmp_path / "slo.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ValidationError):
        load_slo(tmp_path / "slo.yaml")


# ------------------------------------------------------------------ PromQL metric names


@pytest.mark.parametrize(
    "expr, names",
    [
        ("up", {"up"}),
        (
            'sum by (application, le) (rate(a_bucket{application=~"$service",le!="+Inf"}[$__rate_interval]))',
            {"a_bucket"},
        ),
        ("histogram_quantile(0.99, sum(rate(a_bucket[5m])) by (le)) > 1.5e3", {"a_bucket"}),
        (
            "sum without (WorkerId) (x_total offset 1h30m) / ignoring(code) group_left(route) y",
            {"x_total", "y"},
        ),
        ("max by (ray_io_cluster) (g) < bool on (ray_io_cluster) max(h) and absent(i)", {"g", "h", "i"}),
        ('label_replace(z, "dst", "$1", "src", "(.*)") unless count_values("v", w)', {"z", "w"}),
        (
            'x{route!~".*/healthz|{weird}"} or {__name__="named_by_matcher", job="a"}',
            {"x", "named_by_matcher"},
        ),
        ("topk($n, rate(q[5m] @ start())) # a comment naming not_a_metric", {"q"}),
        ("sum(rate(by_total[5m])) by (instance)", {"by_total"}),
    ],
)
def test_promql_metrics_finds_the_names_and_only_the_names(expr, names):
    assert promql_metrics(expr) == names


@pytest.mark.parametrize("expr", ["sume(rate(x[5m]))", '{__name__=~"ray_vurksha_.*"}'], ids=["typo", "regex"])
def test_promql_metrics_refuses_what_it_cannot_check(expr):
    with pytest.raises(ValueError):
        promql_metrics(expr)


def test_alerts_refer_only_to_exported_metrics():
    assert unknown(alert_metrics()) == set()


def test_dashboard_refers_only_to_exported_metrics():
    assert unknown(dashboard_metrics()) == set()


def test_the_check_catches_a_made_up_metric():
    """If these passed, the two checks above would prove nothing."""
    rules = copy.deepcopy(committed_rules())
    rules["spec"]["groups"][0]["rules"][0]["expr"] = "sum(rate(ray_vurksha_made_up_total[5m])) > 0"
    assert unknown(alert_metrics(rules)) == {"ray_vurksha_made_up_total"}

    board = copy.deepcopy(dashboard())
    target = next(p for p in panels(board) if p.get("targets"))["targets"][0]
    target["expr"] = "histogram_quantile(0.99, sum by (le) (rate(ray_vurksha_checkout_latency_seconds[5m])))"
    # a histogram's own name is not a series: only _bucket, _sum and _count are
    assert unknown(dashboard_metrics(board)) == {"ray_vurksha_checkout_latency_seconds"}

    board = copy.deepcopy(dashboard())
    board["templating"]["list"][1]["query"]["query"] = "label_values(ray_serve_made_up_total, application)"
    assert unknown(dashboard_metrics(board)) == {"ray_serve_made_up_total"}


def test_every_serve_metric_allowed_is_used():
    """SERVE_METRICS lists what is used, not what might be: an unused entry would let a typo in."""
    assert SERVE_METRICS <= alert_metrics() | dashboard_metrics()


def test_every_catalogue_metric_has_a_panel():
    used = dashboard_metrics()
    missing = [
        m.exported
        for m in CATALOGUE
        if not ({m.exported} | {f"{m.exported}{s}" for s in ("_bucket", "_sum", "_count")}) & used
    ]
    assert missing == [], "add a panel to k8s/grafana/vurksha.json for these"


# ------------------------------------------------------------------ runbook


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives headings: lower case, punctuation dropped, spaces to dashes."""
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", markdown, re.MULTILINE):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors


def test_every_alert_links_a_runbook_section_that_exists():
    text = (REPO / RUNBOOK).read_text()
    anchors = github_anchors(text)
    for rule in all_rules(committed_rules()):
        url = rule["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == RUNBOOK and (REPO / path).exists(), url
        assert anchor == rule["alert"].lower() and anchor in anchors, f"{rule['alert']}: no section {url}"


def test_every_runbook_section_says_what_it_means_what_to_check_and_what_to_do():
    text = (REPO / RUNBOOK).read_text()
    sections = dict(re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL))
    for alert in ALERTS:
        assert alert in sections, f"RUNBOOK.md has no section ## {alert}"
        for part in ("**Means.**", "**Check.**", "**Do.**"):
            assert part in sections[alert], f"## {alert} lacks {part}"


def test_runbook_links_resolve_and_commands_exist():
    text = (REPO / RUNBOOK).read_text()
    anchors = github_anchors(text)
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in anchors, anchor
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (REPO / "k8s" / target).exists(), target
    from deployments.cli import main

    for command in set(re.findall(r"\bvurksha (\w+)", text)):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0, f"`vurksha {command}` does not exist"


# ------------------------------------------------------------------ dashboard


def test_dashboard_is_valid_and_well_formed():
    board = dashboard()
    assert board["uid"] and board["title"]
    assert 36 <= board["schemaVersion"] <= 41
    all_panels = panels(board)
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in all_panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no target"
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"] == panel["datasource"], panel["title"]


def test_dashboard_variables():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    service = variables["service"]
    assert service["type"] == "query"
    assert service["datasource"]["uid"] == "${datasource}"
    assert service["query"]["query"] == "label_values(ray_serve_num_http_requests_total, application)"


def test_dashboard_has_the_rows_the_issue_asks_for():
    rows = [p["title"] for p in dashboard()["panels"] if p["type"] == "row"]
    assert rows == [
        "Golden signals per service",
        "Checkout & payments",
        "Events",
        "Auth & abuse",
        "Live delivery",
        "Recommender",
        "Notifications",
        "Carts",
    ]


def test_golden_signals_follow_the_service_variable():
    golden = []
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            if golden:
                break
            golden.append(panel)
            continue
        golden.append(panel)
    exprs = [t["expr"] for p in golden[1:] for t in p["targets"]]
    assert exprs and all('application=~"$service"' in e for e in exprs)
    assert all(name.startswith("ray_serve_") for e in exprs for name in promql_metrics(e))
    assert len(dashboard_exprs(dashboard())) > len(exprs)


# ------------------------------------------------------------------ the PrometheusRule CRD


def test_alerts_match_the_prometheus_rule_crd():
    from tests.unit.test_k8s import CrdValidator, strict

    crd = yaml.safe_load(PROMETHEUS_RULE_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    validator = CrdValidator(strict(version["schema"]["openAPIV3Schema"]))

    def errors(doc: dict[str, Any]) -> list[str]:
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]

    assert errors(committed_rules()) == []
    broken = copy.deepcopy(committed_rules())
    broken["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"
    broken["spec"]["groups"][0]["rules"][1]["severity"] = "critical"  # belongs under labels
    found = errors(broken)
    assert any(e.startswith("spec.groups.0.rules.0.for:") for e in found), found
    assert any(e.startswith("spec.groups.0.rules.1:") and "Additional properties" in e for e in found), found
