"""Benchmark (not a test): `GET /users/me` with a valid token, through Ray Serve (HAProxy
ingress, one replica) and, in the same run, the same FastAPI app under plain uvicorn (one
worker) against the same PostgreSQL and Redis. Prints req/s, p50/p99 and Serve/uvicorn.

    make bench            # or: python -m tests.bench.users_me --seconds 15 --concurrency 32

The load generator is one asyncio process (aiohttp) on the same 2-core machine, so both
targets are measured with the same, CPU-competing client: compare the ratio, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[2]


async def load(url: str, headers: dict[str, str], seconds: float, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def worker() -> None:
            nonlocal errors
            while (start := time.perf_counter()) < deadline:
                async with session.get(url) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - start)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "errors": errors,
        "rps": n / elapsed,
        "p50_ms": latencies[n // 2] * 1000,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000,
    }


def login(base: str) -> str:
    with httpx.Client(base_url=base, timeout=30) as client:
        phone = "+919000000777"
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def report(name: str, r: dict[str, float]) -> None:
    print(
        f"{name:<28} {r['rps']:>9.0f} req/s   p50 {r['p50_ms']:>6.1f} ms   p99 {r['p99_ms']:>6.1f} ms"
        f"   ({int(r['requests'])} requests, {int(r['errors'])} non-200)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    os.environ.setdefault("VURKSHA_ENV", "test")
    os.environ.setdefault("VURKSHA_DATA_DIR", str(ROOT / ".vurksha" / "bench"))
    # Measure the route, not the limiter's verdicts: limits high enough never to trigger.
    os.environ["VURKSHA_RATE_LIMIT_PER_IP_PER_MINUTE"] = str(10**9)
    os.environ["VURKSHA_RATE_LIMIT_PER_USER_PER_MINUTE"] = str(10**9)

    from deployments.launcher import backend

    with backend(reset=True) as settings:
        serve_base = f"http://{settings.http_host}:{settings.http_port}"
        token = login(serve_base)
        headers = {"Authorization": f"Bearer {token}"}
        port = free_port()
        uvicorn = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "deployments.users:api",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-access-log",
                "--log-level",
                "warning",
                "--root-path",
                "/users",
            ],
            cwd=ROOT,
            env=os.environ.copy(),
        )
        try:
            for _ in range(100):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        break
                except httpx.ConnectError:
                    time.sleep(0.2)
            results = {}
            for name, url in (
                ("Serve (HAProxy ingress)", f"{serve_base}/users/me"),
                ("uvicorn (bare, 1 worker)", f"http://127.0.0.1:{port}/me"),
            ):
                asyncio.run(load(url, headers, 2, args.concurrency))  # warm up pools and caches
                results[name] = asyncio.run(load(url, headers, args.seconds, args.concurrency))
        finally:
            uvicorn.terminate()
            uvicorn.wait(timeout=10)

    print(f"\nGET /users/me, {args.concurrency} concurrent clients, {args.seconds:.0f} s each")
    for name, r in results.items():
        report(name, r)
    serve_r, bare_r = results.values()
    print(f"ratio Serve/uvicorn: {serve_r['rps'] / bare_r['rps']:.2f} (goal >= 0.5)")


if __name__ == "__main__":
    main()
