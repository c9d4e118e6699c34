"""Benchmark (not a test): `GET /users/me` with a valid token, through Ray Serve (HAProxy
ingress, one replica) and, in the same run, the same FastAPI app under plain uvicorn (one
worker) against the same PostgreSQL and Redis. Prints req/s, p50/p99 and Serve/uvicorn.

    make bench            # or: python -m tests.bench.users_me --seconds 15 --concurrency 32

The load generator is `wrk` at nice 15 (Ray's workers' niceness) on the same 2-core machine,
and the uvicorn baseline runs at nice 15 too, so both targets are measured with the same,
CPU-competing client: compare the ratio, not absolutes.
"""

from __future__ import annotations

from tests.bench.common import (
    at_bench_niceness,
    bare_uvicorn,
    bench_arguments,
    bench_environment,
    login,
    report,
    wrk,
)


def main() -> None:
    args = bench_arguments(__doc__, seconds=15, concurrency=32)

    bench_environment()

    from deployments.launcher import backend

    with backend(reset=True) as settings:
        serve_base = f"http://{settings.http_host}:{settings.http_port}"
        token = login(serve_base)
        headers = {"Authorization": f"Bearer {token}"}
        at_bench_niceness()  # the uvicorn baseline inherits it
        results = {}
        with bare_uvicorn("deployments.users:api", "/users") as bare_base:
            for name, url in (
                ("Serve (HAProxy ingress)", f"{serve_base}/users/me"),
                ("uvicorn (bare, 1 worker)", f"{bare_base}/me"),
            ):
                wrk([("GET", url, headers, None)], 2, args.concurrency)  # warm up pools and caches
                results[name] = wrk([("GET", url, headers, None)], args.seconds, args.concurrency)

    print(f"\nGET /users/me, {args.concurrency} concurrent clients, {args.seconds:.0f} s each")
    for name, r in results.items():
        report(name, r)
    serve_r, bare_r = results.values()
    print(f"ratio Serve/uvicorn: {serve_r['rps'] / bare_r['rps']:.2f} (goal >= 0.5)")


if __name__ == "__main__":
    main()
