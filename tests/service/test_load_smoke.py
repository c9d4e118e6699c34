"""The load test's smoke run: ten seconds of every journey (customers ordering and paying,
partners delivering, staff packing, the admin watching) against the test backend, through the
same runner as `make load`: nothing may fail and every journey must get through. (Ten seconds
give no step the 100 requests the runner judges a p99 on: latency is `make load`'s.) Locust
runs in a subprocess: its gevent patches the standard library, which this process must not have."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from config.settings import get_settings
from tests.conftest import ROOT, Live
from tests.load import KEY_STEPS


def warm(live: Live, session_file: Path) -> None:
    """The first cart and fleet calls after a deploy start their shard actors (about 4 s on
    this machine), which would take the time the first orders need to reach the doorstep. The
    seeded admin does it, and hands the run its session (the admin's OTP sends are capped)."""
    admin = live.login(get_settings().admin_phone)
    store = min(admin.request("GET", "/products/stores").json(), key=lambda s: s["code"])
    assert admin.request("GET", "/carts/me").status_code == 200
    assert admin.request("GET", f"/delivery/stores/{store['id']}/board").status_code == 200
    session_file.write_text(json.dumps({live.base_url: {"refresh_token": admin.tokens["refresh_token"]}}))


def test_ten_seconds_of_every_journey_fail_nothing(live: Live, tmp_path: Path):
    warm(live, tmp_path / "admin-session.json")
    report = tmp_path / "load.json"
    command = [
        sys.executable, "-m", "tests.load.run", "--host", live.base_url,
        # One staff member, the admin, three customers and a partner, all started at once.
        "--users", "6", "--spawn-rate", "6", "--duration", "10s", "--stop-timeout", "15",
        "--out", str(tmp_path / "locust"), "--json", str(report),
        "--admin-session-file", str(tmp_path / "admin-session.json"),
    ]  # fmt: skip
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(report.read_text())
    steps = {step["name"]: step for step in result["steps"]}
    assert result["passed"] and not result["failures"] and not result["exceptions"], run.stdout
    assert sum(step["failures"] for step in steps.values()) == 0, run.stdout
    unexercised = {
        journey: [name for name in names if steps.get(name, {}).get("requests", 0) < 1]
        for journey, names in KEY_STEPS.items()
    }
    assert not any(unexercised.values()), (unexercised, run.stdout)
