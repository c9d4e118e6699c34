"""Helpers the benchmarks share: the environment they run the backend in, the niceness load
generators run at, the compiled HTTP load generator (`wrk`), the latency summary and its
printed line, a free port, and the OTP login through the dev outbox. Heavy imports stay inside the functions so that importing this module does
not read settings before `bench_environment()` has set them."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def bench_arguments(
    description: str | None, seconds: float, concurrency: int, **more: int
) -> argparse.Namespace:
    """Parse `--seconds`, `--concurrency` and one integer option per keyword (`min_products=4000`
    gives `--min-products`, default 4000) from the command line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seconds", type=float, default=seconds)
    parser.add_argument("--concurrency", type=int, default=concurrency)
    for name, default in more.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    return parser.parse_args()


def bench_environment() -> None:
    """The backend the benchmarks start: the test environment, data under .vurksha/bench, and
    rate limits high enough never to trigger (measure the route, not the limiter's verdicts)."""
    os.environ.setdefault("VURKSHA_ENV", "test")
    os.environ.setdefault("VURKSHA_DATA_DIR", str(ROOT / ".vurksha" / "bench"))
    os.environ["VURKSHA_RATE_LIMIT_PER_IP_PER_MINUTE"] = str(10**9)
    os.environ["VURKSHA_RATE_LIMIT_PER_USER_PER_MINUTE"] = str(10**9)


# Ray starts every worker (replicas, actors) at nice 15. A load generator or floor at nice 0 on
# the same two cores would take their CPU and measure the scheduler, not the code.
BENCH_NICENESS = 15


def at_bench_niceness() -> None:
    """Move this process (the in-process generators and floors, and every child it starts from
    now on) to Ray's workers' niceness. Call it once the backend runs: Ray's raylet must start
    at the caller's niceness, since it adds 15 to its own for each worker."""
    current = os.nice(0)
    if current < BENCH_NICENESS:
        os.nice(BENCH_NICENESS - current)
    print(f"(load generators and floors run at nice {os.nice(0)}, like Ray's workers)", flush=True)


def asyncpg_dsn(database_url: str) -> str:
    """The SQLAlchemy URL (`postgresql+asyncpg://...`) as asyncpg wants it."""
    return database_url.replace("postgresql+asyncpg://", "postgresql://")


def summary(latencies: list[float], errors: int, elapsed: float) -> dict[str, float]:
    latencies.sort()
    n = len(latencies)
    if not n:  # nothing came back: infinitely slow, not a crash of the bench
        return {"requests": 0, "errors": errors, "rps": 0.0, "p50_ms": float("inf"), "p99_ms": float("inf")}
    return {
        "requests": n,
        "errors": errors,
        "rps": n / elapsed,
        "p50_ms": latencies[n // 2] * 1000,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000,
    }


# One HTTP request for wrk: method, absolute URL, headers, body.
WrkRequest = tuple[str, str, Mapping[str, str], str | None]

_WRK_SCRIPT = """
local counter = 0
function setup(thread) thread:set("id", counter); counter = counter + 1 end
local reqs, n, i = {}, 0, 0
function init(args)
  for k, s in ipairs(specs) do reqs[k] = wrk.format(s[1], s[2], s[3], s[4]) end
  n = #reqs
  i = (id or 0) * math.floor(n / 2)
end
function request() i = i % n + 1; return reqs[i] end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\n{"requests": %d, "duration_us": %d, "status_errors": %d, "socket_errors": %d, "p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def _lua(value: str | None) -> str:
    if value is None:
        return "nil"
    return (
        '"'
        + "".join(chr(b) if 32 <= b < 127 and chr(b) not in '"\\' else f"\\{b}" for b in value.encode())
        + '"'
    )


def wrk(
    requests: Sequence[WrkRequest], seconds: float, concurrency: int, threads: int = 2
) -> dict[str, float]:
    """Run Debian's compiled `wrk` at Ray's workers' niceness against one host, cycling through
    `requests` (each thread starts half-way apart); a status of 400 or more, or a socket error,
    counts as an error. Returns the same figures as `summary`."""
    binary = shutil.which("wrk")
    if binary is None:
        raise SystemExit("wrk not found: `make bench` installs it (apt-get install wrk)")
    target = re.match(r"^(https?://[^/]+)", requests[0][1])
    assert target
    specs = []
    for method, url, headers, body in requests:
        assert url.startswith(target.group(1)), "wrk runs against one host"
        fields = dict(headers) | ({"Content-Type": "application/json"} if body is not None else {})
        lua_headers = "{" + ", ".join(f"[{_lua(k)}] = {_lua(v)}" for k, v in fields.items()) + "}"
        specs.append(
            f"{{{_lua(method)}, {_lua(url[len(target.group(1)) :] or '/')}, {lua_headers}, {_lua(body)}}}"
        )
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write("specs = {\n" + ",\n".join(specs) + "\n}\n" + _WRK_SCRIPT)
        script.flush()
        command = [binary, f"-t{min(threads, concurrency)}", f"-c{concurrency}", f"-d{seconds:.0f}s"]
        command += ["--timeout", "30s", "-s", script.name, target.group(1)]
        out = subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=True,
            preexec_fn=lambda: os.nice(max(0, BENCH_NICENESS - os.nice(0))),
        ).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    return {
        "requests": figures["requests"],
        "errors": figures["status_errors"] + figures["socket_errors"],
        "rps": figures["requests"] / (figures["duration_us"] / 1e6),
        "p50_ms": figures["p50_us"] / 1000,
        "p99_ms": figures["p99_us"] / 1000,
    }


def report(name: str, r: dict[str, float], name_width: int = 28, rps_width: int = 9, digits: int = 1) -> None:
    print(
        f"{name:<{name_width}} {r['rps']:>{rps_width}.0f} req/s"
        f"   p50 {r['p50_ms']:>6.{digits}f} ms   p99 {r['p99_ms']:>6.{digits}f} ms"
        f"   ({int(r['requests'])} requests, {int(r['errors'])} non-200)"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def bare_uvicorn(app: str, root_path: str) -> Iterator[str]:
    """One service's FastAPI app (`deployments.<name>:api`) alone under plain uvicorn (one
    worker, no access log) at this process's niceness, against the backend's PostgreSQL and
    Redis (the environment the launcher exported, the dev signing key included, so the same
    tokens work): the baseline for the same route through Serve. Yields its base URL once
    healthy."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--no-access-log", "--log-level", "warning", "--root-path", root_path]
    server = subprocess.Popen(command, cwd=ROOT, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.ConnectError:
                time.sleep(0.2)
        else:
            raise SystemExit(f"{app} did not become healthy under uvicorn")
        yield base
    finally:
        server.terminate()
        server.wait(timeout=10)


def login(base: str, phone: str = "+919000000777") -> str:
    """An access token for `phone`: request an OTP, read it from the dev outbox, verify it."""
    import httpx

    with httpx.Client(base_url=base, timeout=30) as client:
        challenge = client.post("/users/auth/otp", json={"phone": phone})
        if challenge.status_code == 429:  # a recent run sent one: wait out the resend window
            time.sleep(int(challenge.headers["retry-after"]))
            challenge = client.post("/users/auth/otp", json={"phone": phone})
        challenge.raise_for_status()
        body = client.get("/notifications/dev/outbox", params={"to": phone}).json()[0]["body"]
        code = re.match(r"^(\d{6})", body)
        assert code
        tokens = client.post(
            "/users/auth/verify",
            json={"challenge_id": challenge.json()["challenge_id"], "code": code.group(1)},
        )
        tokens.raise_for_status()
        return str(tokens.json()["access_token"])


def known_customers(n: int) -> list[str]:
    """Phones of `n` customers the seed gave a purchase history (the demo customers first, then
    the imported Online Retail histories): customers the recommender knows."""
    from pipelines.history import history_phone
    from pipelines.seed import DEMO_CUSTOMERS

    phones = [str(d["phone"]) for d in DEMO_CUSTOMERS][:n]
    return phones + [history_phone(i) for i in range(len(phones), n)]


async def their_stores(session: Any, phones: Sequence[str]) -> dict[str, str]:
    """Each customer's store: the store of their latest order."""
    from sqlalchemy import text

    rows = await session.execute(
        text(
            "SELECT DISTINCT ON (u.phone) u.phone, o.store_id::text FROM users u"
            " JOIN orders o ON o.user_id = u.id WHERE u.phone = ANY(:p) ORDER BY u.phone, o.created_at DESC"
        ),
        {"p": list(phones)},
    )
    return {phone: store for phone, store in rows}
