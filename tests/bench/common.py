"""Helpers the benchmarks share: the environment they run the backend in, the aiohttp load
generator, the latency summary and its printed line, a free port, and the OTP login through
the dev outbox. Heavy imports stay inside the functions so that importing this module does
not read settings before `bench_environment()` has set them."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]

# One HTTP request made on the session; returns the response status.
Request = Callable[[aiohttp.ClientSession], Awaitable[int]]


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


def asyncpg_dsn(database_url: str) -> str:
    """The SQLAlchemy URL (`postgresql+asyncpg://...`) as asyncpg wants it."""
    return database_url.replace("postgresql+asyncpg://", "postgresql://")


def summary(latencies: list[float], errors: int, elapsed: float) -> dict[str, float]:
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "errors": errors,
        "rps": n / elapsed,
        "p50_ms": latencies[n // 2] * 1000,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000,
    }


def get(url: str | Callable[[], str]) -> Request:
    """A GET of `url` (or of a fresh `url()` each time) that reads the whole body."""

    async def request(session: aiohttp.ClientSession) -> int:
        async with session.get(url() if callable(url) else url) as response:
            await response.read()
            return response.status

    return request


async def load(
    request: Request, seconds: float, concurrency: int, headers: dict[str, str] | None = None
) -> dict[str, float]:
    """Run `request` from `concurrency` workers for `seconds` on one session (sending `headers`
    on every request); a status other than 200 counts as an error."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def worker() -> None:
            nonlocal errors
            while (start := time.perf_counter()) < deadline:
                if await request(session) != 200:
                    errors += 1
                latencies.append(time.perf_counter() - start)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return summary(latencies, errors, elapsed)


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
