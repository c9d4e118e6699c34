"""Autoscaling, seen to happen: the products ingress, redeployed with serve.yaml's autoscaling
config but short delays and a low target, goes from one replica to two under load and back to
one once the load stops, and no request fails on the way (a replica that starts or drains
must not cost a request).

serve.yaml's own delays (10 s up, 120 s down) would make the test minutes long; only the
delays and the target change here, the mechanism is the one production runs. (The rest of the
suite runs each ingress at its minimum: `deployments.launcher.deploy`.)"""

from __future__ import annotations

import copy
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from ray import serve

from config.settings import get_settings
from deployments.launcher import deploy, load_serve_config
from tests.conftest import Live, fake_ip

APP = "products"
FAST = {"upscale_delay_s": 1, "downscale_delay_s": 4, "target_ongoing_requests": 2, "max_replicas": 2}
IN_FLIGHT = 8  # requests kept in flight: four times the target, so the policy wants two
TIMEOUT_S = 45


def running_replicas() -> int:
    deployment = serve.status().applications[APP].deployments[APP]
    return int(deployment.replica_states.get("RUNNING", 0))


def _with(config: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    (app,) = [a for a in config["applications"] if a["name"] == APP]
    (deployment,) = [d for d in app["deployments"] if d["name"] == APP]
    deployment["autoscaling_config"] |= change
    return config


@pytest.fixture
def fast_autoscaling(live: Live) -> Iterator[None]:
    original = load_serve_config()
    deploy(get_settings(), _with(original, FAST), scaling=[APP])
    try:
        yield
    finally:
        deploy(get_settings(), original)


def test_a_loaded_deployment_scales_up_and_back_down_losing_nothing(live: Live, fast_autoscaling: None) -> None:
    assert running_replicas() == 1
    statuses: Counter[int | str] = Counter()
    stop = threading.Event()

    def customer() -> None:
        with live.client(ip=fake_ip()) as client:
            while not stop.is_set():
                try:
                    # A rate limit per address: a new one every request, as distinct phones.
                    response = client.get("/products/categories", headers={"X-Forwarded-For": fake_ip()})
                    statuses[response.status_code] += 1
                except Exception as exc:  # a dropped connection is a failed request too
                    statuses[type(exc).__name__] += 1

    workers = [threading.Thread(target=customer) for _ in range(IN_FLIGHT)]
    for worker in workers:
        worker.start()
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while running_replicas() < 2:
            assert time.monotonic() < deadline, f"no second replica after {TIMEOUT_S} s: {statuses}"
            time.sleep(0.5)
        time.sleep(3)  # requests reach both replicas
    finally:
        stop.set()
        for worker in workers:
            worker.join()

    deadline = time.monotonic() + TIMEOUT_S
    while running_replicas() > 1:
        assert time.monotonic() < deadline, f"still {running_replicas()} replicas {TIMEOUT_S} s after the load"
        time.sleep(0.5)
    assert set(statuses) == {200} and statuses[200] > 100, statuses
