"""Vurksha's service-level objectives and what is derived from them.

The numbers live in one file, `k8s/slo.yaml`: `load_slo()` reads it for the load test and for
`alert_rules()`, which builds the Prometheus Operator `PrometheusRule` that `vurksha alerts`
writes to `k8s/alerts.yaml` (committed; a unit test fails when it is stale).

`alert_metrics()` and `dashboard_metrics()` list the metric names the committed rules and the
Grafana dashboard (`k8s/grafana/vurksha.json`) refer to, so that tests can compare them with
`config.metrics.CATALOGUE` and with a real scrape: a panel or an alert on a name nobody
exports is silent, not red.

Every expression sums over the label sets Ray adds per process (WorkerId, NodeAddress, ...):
a counter recorded by four replicas is four series, and an alert must fire once per service,
not once per worker.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from config.metrics import CATALOGUE

ROOT = Path(__file__).resolve().parents[1]
SLO_FILE = ROOT / "k8s" / "slo.yaml"
ALERTS_FILE = ROOT / "k8s" / "alerts.yaml"
DASHBOARD_FILE = ROOT / "k8s" / "grafana" / "vurksha.json"
# Relative to the repository: Alertmanager shows it as is; point it at your Git host if you like.
RUNBOOK = "k8s/RUNBOOK.md"
RULE_NAME = "vurksha-slo"
# The rate window of every alert; `webhooks.failures_per_5m` is counted over the same window.
WINDOW = "5m"


# ------------------------------------------------------------------ the objectives


class _Strict(BaseModel):
    # A misspelt key must fail loudly, not leave an objective at a default nobody chose.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class RequestObjective(_Strict):
    p99_ms: float = Field(gt=0)
    error_rate: float = Field(gt=0, lt=1)  # share of requests answered 5xx


class LatencyObjective(_Strict):
    p99_ms: float = Field(gt=0)


class OutboxObjective(_Strict):
    lag_s: float = Field(gt=0)
    dead_letters: int = Field(ge=0)


class WebhookObjective(_Strict):
    failures_per_5m: int = Field(ge=0)


class Slo(_Strict):
    checkout: RequestObjective
    api: RequestObjective
    tracking: LatencyObjective
    outbox: OutboxObjective
    webhooks: WebhookObjective
    # A Prometheus duration, as PrometheusRule's `for` accepts it.
    alert_for: str = Field(pattern=r"^[1-9][0-9]*(ms|s|m|h)$")


def load_slo(path: Path = SLO_FILE) -> Slo:
    """The objectives in `path` (k8s/slo.yaml by default); unknown or missing keys are errors."""
    return Slo.model_validate(yaml.safe_load(path.read_text()))


# ------------------------------------------------------------------ alert rules


def _num(value: float) -> str:
    """A threshold as PromQL reads it: 1000 ms is `1`, not `1.0`."""
    return f"{value:g}"


def _p99(bucket: str, by: str = "le", selector: str = "") -> str:
    return f"histogram_quantile(0.99, sum by ({by}) (rate({bucket}{selector}[{WINDOW}])))"


# The relay reads the outbox every 15 s: eight missed reads are a stalled relay, not a slow one.
RELAY_STALLED_S = 120


def alert_rules(slo: Slo) -> dict[str, Any]:
    """The `PrometheusRule` for `slo`: one alert per objective, plus unhealthy Serve replicas.
    Each alert holds for `slo.alert_for` and links its runbook section (anchor: the alert's
    name in lower case)."""

    def alert(name: str, expr: str, severity: str, summary: str, description: str) -> dict[str, Any]:
        return {
            "alert": name,
            "expr": expr,
            "for": slo.alert_for,
            "labels": {"severity": severity},
            "annotations": {
                "summary": summary,
                "description": description,
                "runbook_url": f"{RUNBOOK}#{name.lower()}",
            },
        }

    checkouts = "ray_vurksha_checkouts_total"
    # Serve's ingress metrics (recorded from HAProxy's log) carry the application and its route
    # prefix only, not the path: /<app>/healthz cannot be told apart there (KubeRay probes Serve
    # at /-/healthz, application ""). Status 101 is a WebSocket, whose "latency" is the session.
    requests = "ray_serve_num_http_requests_total"
    http = 'application!=""'
    by_app = "sum by (application)"
    ratio_5xx = (
        f'{by_app} (rate({requests}{{{http},status_code=~"5.."}}[{WINDOW}]))'
        f" / {by_app} (rate({requests}{{{http}}}[{WINDOW}]))"
    )
    # Per cluster: during a zero-downtime upgrade the old and the new cluster are both scraped.
    replica_keys = "ray_io_cluster, application, deployment"
    groups = [
        {
            "name": "vurksha.checkout",
            "rules": [
                alert(
                    "CheckoutErrorRate",
                    f'sum(rate({checkouts}{{outcome="failed"}}[{WINDOW}])) / sum(rate({checkouts}[{WINDOW}]))'
                    f" > {_num(slo.checkout.error_rate)}",
                    "critical",
                    "Checkouts are failing (5xx)",
                    f"{{{{ $value | humanizePercentage }}}} of checkouts failed over {WINDOW} "
                    f"(objective: under {_num(slo.checkout.error_rate * 100)}%).",
                ),
                alert(
                    "CheckoutLatencyP99",
                    _p99("ray_vurksha_checkout_latency_seconds_bucket")
                    + f" > {_num(slo.checkout.p99_ms / 1000)}",
                    "warning",
                    "Checkout p99 latency is over its objective",
                    f"Checkout p99 is {{{{ $value | humanizeDuration }}}} over {WINDOW} "
                    f"(objective: {_num(slo.checkout.p99_ms)} ms).",
                ),
            ],
        },
        {
            "name": "vurksha.api",
            "rules": [
                alert(
                    "ApiErrorRate",
                    f"{ratio_5xx} > {_num(slo.api.error_rate)}",
                    "critical",
                    "{{ $labels.application }} answers 5xx",
                    f"{{{{ $value | humanizePercentage }}}} of {{{{ $labels.application }}}}'s requests were "
                    f"answered 5xx over {WINDOW} (objective: under {_num(slo.api.error_rate * 100)}%).",
                ),
                alert(
                    "ApiLatencyP99",
                    _p99(
                        "ray_serve_http_request_latency_ms_bucket",
                        "application, le",
                        f'{{{http},status_code!="101"}}',
                    )
                    + f" > {_num(slo.api.p99_ms)}",
                    "warning",
                    "{{ $labels.application }} p99 latency is over its objective",
                    f"{{{{ $labels.application }}}} p99 is {{{{ $value | humanize }}}} ms over {WINDOW} "
                    f"(objective: {_num(slo.api.p99_ms)} ms).",
                ),
                alert(
                    "ServeReplicaUnhealthy",
                    f"sum by ({replica_keys}) (ray_serve_deployment_replica_healthy)"
                    f" < max by ({replica_keys}) (ray_serve_autoscaling_target_replicas)",
                    "warning",
                    "{{ $labels.application }}/{{ $labels.deployment }}: too few healthy replicas",
                    "{{ $value }} healthy replica(s) of {{ $labels.application }}/{{ $labels.deployment }}, "
                    "below Serve's target: replicas failing health checks, crashing, or not schedulable.",
                ),
            ],
        },
        {
            "name": "vurksha.events",
            "rules": [
                alert(
                    "OutboxLag",
                    f"max(ray_vurksha_outbox_lag_seconds) > {_num(slo.outbox.lag_s)}",
                    "critical",
                    "Outbox events are not being delivered",
                    "The oldest pending outbox event is {{ $value | humanizeDuration }} old "
                    f"(objective: under {_num(slo.outbox.lag_s)} s).",
                ),
                alert(
                    "OutboxRelayStalled",
                    f"time() - max(ray_vurksha_outbox_checked_timestamp_seconds) > {RELAY_STALLED_S}",
                    "critical",
                    "The outbox relay has stopped reporting",
                    "The relay last read the outbox {{ $value | humanizeDuration }} ago (it does every "
                    "15 s): the lag and dead-letter figures are stale, events may not be delivered.",
                ),
                alert(
                    "OutboxDeadLetters",
                    f"max(ray_vurksha_outbox_dead_letters) > {slo.outbox.dead_letters}",
                    "critical",
                    "Outbox events were given up on (dead letters)",
                    "{{ $value }} outbox event(s) are dead: their subscribers never acknowledged them.",
                ),
                alert(
                    "WebhookVerificationFailures",
                    f"sum by (provider) (increase(ray_vurksha_webhook_verifications_failed_total[{WINDOW}]))"
                    f" > {slo.webhooks.failures_per_5m}",
                    "warning",
                    "{{ $labels.provider }} webhooks are refused for bad signatures",
                    f"{{{{ $value | humanize }}}} {{{{ $labels.provider }}}} webhook(s) refused in {WINDOW} "
                    f"(objective: at most {slo.webhooks.failures_per_5m}).",
                ),
            ],
        },
        {
            "name": "vurksha.delivery",
            "rules": [
                alert(
                    "TrackingLatencyP99",
                    _p99("ray_vurksha_tracking_latency_seconds_bucket")
                    + f" > {_num(slo.tracking.p99_ms / 1000)}",
                    "warning",
                    "Live tracking is slow",
                    "Partner position to customer socket p99 is {{ $value | humanizeDuration }} "
                    f"over {WINDOW} (objective: {_num(slo.tracking.p99_ms)} ms).",
                ),
            ],
        },
    ]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": RULE_NAME, "labels": {"app.kubernetes.io/part-of": "vurksha"}},
        "spec": {"groups": groups},
    }


ALERTS_HEADER = """\
# Generated from k8s/slo.yaml by `vurksha alerts` (config/slo.py): do not edit by hand, change the
# objectives there and run `vurksha alerts` (a unit test fails while this file is stale).
# Needs the Prometheus Operator CRDs, like monitoring.yaml; add whatever label your Prometheus'
# ruleSelector expects (kube-prometheus-stack: `release: <helm release name>`).
# What each alert means and what to do: k8s/RUNBOOK.md.
"""


def render_alerts(slo: Slo) -> str:
    """k8s/alerts.yaml's text: the header and the rules, one expression per line."""
    body = yaml.safe_dump(alert_rules(slo), sort_keys=False, width=1000, allow_unicode=True)
    return ALERTS_HEADER + body


# ------------------------------------------------------------------ metric names in PromQL

# Functions (Prometheus 3): an identifier followed by `(` must be one of them or an aggregation.
FUNCTIONS = frozenset(
    """
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp
    clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year
    days_in_month deg delta deriv double_exponential_smoothing end exp floor histogram_avg
    histogram_count histogram_fraction histogram_quantile histogram_stddev histogram_stdvar
    histogram_sum holt_winters hour idelta increase info irate label_join label_replace
    last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month pi
    predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin
    sinh sort sort_by_label sort_by_label_desc sort_desc sqrt start stddev_over_time
    stdvar_over_time sum_over_time tan tanh time timestamp vector year
    """.split()
)
# Aggregations may put their `by (...)` / `without (...)` before the parentheses.
AGGREGATIONS = frozenset(
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio".split()
)
# Followed by a list of label names in parentheses (or, for group_*, possibly nothing).
LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"})

_STR = r""""(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`"""
_TOKENS = re.compile(
    rf"""
      (?P<string>{_STR})
    | (?P<braces>\{{(?:{_STR}|[^{{}}"'`])*\}})
    | (?P<variable>\$\{{[^}}]*\}}|\$\w+|\[\[\w+\]\])
    | (?P<brackets>\[[^\]]*\])
    | (?P<number>(?:\d+(?:ms|[smhdwy]))+\b|0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<comment>\#[^\n]*)
    | (?P<space>\s+)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_NAME_MATCHER = re.compile(rf"__name__\s*(=~|!~|!=|=)\s*({_STR})")


def promql_metrics(expr: str) -> set[str]:
    """The metric names `expr` selects. Strings, label matchers, ranges, numbers, durations,
    Grafana variables, keywords, function names and the label lists of by/without/on/ignoring
    are not names. ValueError on what cannot be checked: an unknown function (a typo, or a
    Grafana macro) or a metric name chosen by a regex."""
    tokens = [
        (m.lastgroup, m.group()) for m in _TOKENS.finditer(expr) if m.lastgroup not in ("space", "comment")
    ]
    names: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "braces":
            for op, value in _NAME_MATCHER.findall(text):
                if op != "=":
                    raise ValueError(f"metric name matched with {op} cannot be checked: {text}")
                names.add(value[1:-1])
        elif kind == "name":
            word = text.lower()
            if word in LABEL_LISTS:
                if following == "(":
                    i += 1
                    while i < len(tokens) and tokens[i][1] != ")":
                        i += 1
            elif word in KEYWORDS or (text in AGGREGATIONS and following.lower() in ("by", "without")):
                pass
            elif following == "(":
                if text not in FUNCTIONS | AGGREGATIONS:
                    raise ValueError(f"unknown PromQL function {text}() in: {expr}")
            else:
                names.add(text)
        i += 1
    return names


def exported_metrics() -> frozenset[str]:
    """Every name `config.metrics.CATALOGUE` puts in a scrape (a histogram's three series)."""
    names: set[str] = set()
    for metric in CATALOGUE:
        if metric.kind == "histogram":
            names.update(f"{metric.exported}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(metric.exported)
    return frozenset(names)


def rule_exprs(rules: dict[str, Any]) -> dict[str, str]:
    """Alert name -> expression, from a PrometheusRule."""
    return {r["alert"]: str(r["expr"]) for g in rules["spec"]["groups"] for r in g["rules"] if "alert" in r}


def alert_metrics(rules: dict[str, Any] | None = None) -> set[str]:
    """The metric names the alert rules refer to (by default k8s/alerts.yaml, as committed)."""
    if rules is None:
        rules = yaml.safe_load(ALERTS_FILE.read_text())
    return {name for expr in rule_exprs(rules).values() for name in promql_metrics(expr)}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel of a Grafana dashboard, including those inside collapsed rows."""
    found = []
    for panel in dashboard.get("panels", []):
        found.append(panel)
        found.extend(panels(panel))
    return found


# Grafana's template-variable query `label_values(metric{...}, label)`, which is not PromQL.
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<series>.+?)\s*,\s*\w+\s*\)\s*$", re.DOTALL)


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression in a dashboard: panel targets and query variables."""
    exprs = [t["expr"] for p in panels(dashboard) for t in p.get("targets", []) if t.get("expr")]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        match = _LABEL_VALUES.match(text)
        if match:
            exprs.append(match["series"])
        elif text.strip():
            raise ValueError(f"variable {variable.get('name')}: cannot check query {text!r}")
    return exprs


def dashboard_metrics(dashboard: dict[str, Any] | None = None) -> set[str]:
    """The metric names the Grafana dashboard refers to (by default k8s/grafana/vurksha.json)."""
    if dashboard is None:
        dashboard = json.loads(DASHBOARD_FILE.read_text())
    return {name for expr in dashboard_exprs(dashboard) for name in promql_metrics(expr)}


def referenced_metrics() -> set[str]:
    """Every metric name the committed alerts and dashboard refer to."""
    return alert_metrics() | dashboard_metrics()
