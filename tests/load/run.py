"""Run the load test headless against a running backend and judge it against k8s/slo.yaml.

    python -m tests.load.run --users 50 --duration 5m --host http://127.0.0.1:8000

Locust runs in a subprocess (its gevent patches the standard library: never import it here or
in pytest), at the niceness of Ray's workers (nice 15: a generator at nice 0 on the same cores
takes the replicas' CPU). Its CSV stats are read back and printed as one row per step with
p50/p95/p99, requests and failures, then the verdict: each step's p99 against its section of
the SLO file (`checkout` for placing and paying, `tracking` for the tracking socket, `api` for
everything else), each section's 5xx rate against its error objective. Exits 0 only when every
objective is met and nothing failed at all (a 4xx the journey did not expect is a failure too).
A step of fewer than 100 requests is not judged on p99: that would be its slowest request.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tests.load import JOURNEYS, journey, tier

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
NICENESS = 15
# A p99 of fewer requests is their maximum (one slow request of a cold start decides it): such
# steps are shown but not judged on latency. Their failures and 5xx count regardless.
MIN_SAMPLES = 100
DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+s)?$")


@dataclass
class Step:
    journey: str
    type: str
    name: str
    tier: str
    requests: int
    failures: int
    server_errors: int  # 5xx, or no answer at all: what the SLO's error rate counts
    p50_ms: float
    p95_ms: float
    p99_ms: float


def duration(text: str) -> str:
    """Locust's run time: `300` (seconds), `30s`, `5m`, `1h30m`."""
    text = text.strip()
    if text.isdigit():
        return f"{text}s"
    if not text or not DURATION.match(text):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 300, 30s, 5m, 1h30m)")
    return text


def seconds(run_time: str) -> int:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([hms])", run_time))


def read_steps(report: Path) -> tuple[list[Step], list[dict[str, Any]], list[dict[str, Any]]]:
    """Steps, failures and exceptions from the locustfile's final report."""
    data = json.loads(report.read_text())
    server_errors: dict[tuple[str, str], int] = {}
    for failure in data["failures"]:
        # The locustfile words HTTP failures "HTTP <status> <code>"; anything else (no answer,
        # a socket closed or silent) is the server's doing too.
        if not re.search(r"\bHTTP 4\d\d\b", failure["error"]):
            key = (failure["type"], failure["name"])
            server_errors[key] = server_errors.get(key, 0) + failure["count"]
    order = [step for steps in JOURNEYS.values() for step in steps]
    steps = [
        Step(
            journey=journey(row["name"]),
            type=row["type"],
            name=row["name"],
            tier=tier(row["name"]),
            requests=row["requests"],
            failures=row["failures"],
            server_errors=server_errors.get((row["type"], row["name"]), 0),
            p50_ms=math.nan if row["p50_ms"] is None else row["p50_ms"],
            p95_ms=math.nan if row["p95_ms"] is None else row["p95_ms"],
            p99_ms=math.nan if row["p99_ms"] is None else row["p99_ms"],
        )
        for row in data["steps"]
    ]
    steps.sort(key=lambda s: (order.index(s.name) if s.name in order else len(order), s.name))
    return steps, data["failures"], data["exceptions"]


def judge(steps: list[Step]) -> dict[str, dict[str, Any]]:
    """Each SLO section: its objectives, the worst judged step's p99 (steps of at least
    `MIN_SAMPLES` requests), the 5xx rate over all its requests, met or not."""
    from config.slo import load_slo

    slo = load_slo()
    sections: dict[str, Any] = {"checkout": slo.checkout, "api": slo.api, "tracking": slo.tracking}
    verdict = {}
    for section, objective in sections.items():
        mine = [s for s in steps if s.tier == section and s.requests]
        requests = sum(s.requests for s in mine)
        errors = sum(s.server_errors for s in mine)
        judged = [s for s in mine if s.requests >= MIN_SAMPLES]
        worst = max(judged, key=lambda s: s.p99_ms, default=None)
        error_rate = errors / requests if requests else 0.0
        limit = getattr(objective, "error_rate", None)
        slow = [s.name for s in judged if s.p99_ms > objective.p99_ms]
        verdict[section] = {
            "p99_ms": objective.p99_ms,
            "error_rate": limit,
            "requests": requests,
            "worst_step": worst.name if worst else None,
            "worst_p99_ms": worst.p99_ms if worst else None,
            "measured_error_rate": error_rate,
            "slow_steps": slow,
            "unjudged_steps": [s.name for s in mine if s.requests < MIN_SAMPLES],
            "met": not slow and (limit is None or error_rate <= limit),
        }
    return verdict


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN (a step without a percentile): null instead."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def _cell(ms: float) -> str:
    return "-" if math.isnan(ms) else f"{ms:.0f}"


def table(steps: list[Step], verdict: dict[str, dict[str, Any]]) -> str:
    rows = [("journey", "step", "slo", "requests", "failures", "p50 ms", "p95 ms", "p99 ms", "")]
    for s in steps:
        if s.requests < MIN_SAMPLES:
            note = f"(n<{MIN_SAMPLES})"
        else:
            note = "over p99" if s.p99_ms > verdict[s.tier]["p99_ms"] else ""
        name = s.name if s.type != "WS" else f"{s.name} (WS)"
        rows.append(
            (
                s.journey,
                name,
                s.tier,
                str(s.requests),
                str(s.failures),
                _cell(s.p50_ms),
                _cell(s.p95_ms),
                _cell(s.p99_ms),
                note,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {3, 4, 5, 6, 7}
    return "\n".join(
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    )


def verdict_lines(verdict: dict[str, dict[str, Any]], failures: int, exceptions: int) -> list[str]:
    lines = []
    for section, v in verdict.items():
        goal = f"p99 <= {v['p99_ms']:g} ms"
        if v["error_rate"] is not None:
            goal += f", 5xx <= {v['error_rate']:.1%}"
        if not v["requests"]:
            lines.append(f"  {section:<9} {goal}: no requests")
            continue
        if v["worst_step"]:
            seen = f"worst p99 {_cell(v['worst_p99_ms'])} ms ({v['worst_step']})"
        else:
            seen = f"no step of {MIN_SAMPLES}+ requests to judge p99 on"
        if v["error_rate"] is not None:
            seen += f", 5xx {v['measured_error_rate']:.2%} of {v['requests']}"
        status = (
            "met"
            if v["met"]
            else "MISSED" + (f" (over: {', '.join(v['slow_steps'])})" if v["slow_steps"] else "")
        )
        lines.append(f"  {section:<9} {goal}: {seen}: {status}")
    lines.append(f"  failures  {failures} request(s), {exceptions} exception(s)")
    return lines


def main(argv: list[str] | None = None) -> int:
    from config.settings import get_settings

    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m tests.load.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=50, help="simulated people at the peak")
    parser.add_argument("--duration", type=duration, default="60s", help="300, 30s, 5m, 1h30m")
    parser.add_argument("--host", default=f"http://{settings.http_host}:{settings.http_port}")
    parser.add_argument("--spawn-rate", type=float, help="users started per second (default: all in 10 s)")
    parser.add_argument("--stores", type=int, default=1, help="dark stores to spread the journeys over")
    parser.add_argument(
        "--stop-timeout", type=int, default=30, help="seconds journeys in flight get to finish at the end"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / ".vurksha" / "load-report" / "locust",
        help="prefix of locust's log, CSV files (with the stats history) and final report; overwritten each run",
    )
    parser.add_argument("--json", type=Path, help="write the steps and the verdict here as JSON")
    parser.add_argument(
        "--admin-session-file",
        type=Path,
        help="where the admin's session is kept between runs (see the locustfile)",
    )
    args = parser.parse_args(argv)
    if args.users < args.stores + 2:
        parser.error(
            f"--users must be at least {args.stores + 2}: one staff per store, the admin, a customer"
        )

    run_time = args.duration
    spawn_rate = args.spawn_rate or max(1.0, args.users / 10)
    prefix: Path = args.out
    prefix.parent.mkdir(parents=True, exist_ok=True)
    log_path, report = Path(f"{prefix}.log"), Path(f"{prefix}.json")
    report.unlink(missing_ok=True)  # never judge an earlier run's figures
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--host", args.host, "--users", str(args.users), "--spawn-rate", f"{spawn_rate:g}",
        "--run-time", run_time, "--stop-timeout", str(args.stop_timeout), "--stores", str(args.stores),
        "--csv", str(prefix), "--report", str(report), "--only-summary",
    ]  # fmt: skip
    if args.admin_session_file:
        command += ["--admin-session-file", str(args.admin_session_file)]
    print(
        f"load test: {args.users} users ({spawn_rate:g}/s), {run_time}, against {args.host} "
        f"(locust at nice {NICENESS}; its log: {log_path})",
        flush=True,
    )

    def at_niceness() -> None:
        current = os.nice(0)
        if current < NICENESS:
            os.nice(NICENESS - current)

    began = time.monotonic()
    tail: list[str] = []
    with open(log_path, "w") as log:
        # Locust's own tables go to its log; its progress and warnings reach the terminal as
        # they come (among them the generator's own CPU above 90%: every figure is then
        # pessimistic, as the generator, not the backend, was the limit).
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=at_niceness,
        )
        watchdog = threading.Timer(seconds(run_time) + args.stop_timeout + 180, proc.kill)
        watchdog.start()
        try:
            assert proc.stderr
            for line in proc.stderr:
                log.write(line)
                tail = [*tail[-40:], line]
                if re.search(r"/(WARNING|ERROR|CRITICAL)/|Ramping|All users spawned|run-time limit", line):
                    print(line.rstrip(), file=sys.stderr, flush=True)
            returncode = proc.wait()
        finally:
            watchdog.cancel()
    if not report.exists():
        print(f"locust exited with {returncode} and no stats:\n{''.join(tail)}", file=sys.stderr)
        return 2
    steps, failures, exceptions = read_steps(report)
    verdict = judge(steps)
    failed = sum(s.failures for s in steps)
    thrown = sum(e["count"] for e in exceptions)
    passed = all(v["met"] for v in verdict.values()) and not failed and not thrown and returncode == 0
    print(f"\nran {time.monotonic() - began:.0f} s\n")
    print(table(steps, verdict))
    print("\nSLO (k8s/slo.yaml):")
    print("\n".join(verdict_lines(verdict, failed, thrown)))
    for f in sorted(failures, key=lambda f: -f["count"])[:10]:
        print(f"  failed: {f['name']}: {f['error']} x{f['count']}")
    for e in exceptions[:5]:
        print(f"  exception x{e['count']}: {e['message']}\n{e['traceback']}")
    if returncode not in (0, 1):  # 1: locust saw failures, reported above
        print(f"  locust exited with {returncode} (see {log_path})")
    print(f"\nverdict: {'PASS' if passed else 'FAIL'}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "users": args.users,
                    "duration": run_time,
                    "host": args.host,
                    "passed": passed,
                    "steps": [_plain(asdict(s)) for s in steps],
                    "slo": verdict,
                    "failures": failures,
                    "exceptions": exceptions,
                },
                indent=2,
            )
        )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
