"""`vurksha`: run the backend, migrate, seed, handle dead-lettered events, train and promote
recommender models, reset the authentication cache, print a running stack's memory
footprint, or regenerate the OpenAPI document and the alert rules."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

from config.logging import setup_logging
from config.settings import get_settings


def _wait_until_answering(base: str, prefixes: list[str], timeout: float = 60) -> None:
    """Every application's health route answers 200 through the ingress."""
    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base, timeout=5) as client:
        for prefix in prefixes:
            while True:
                try:
                    if client.get(f"{prefix}/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{base}{prefix}/healthz did not answer within {timeout:.0f} s")
                time.sleep(0.2)


def banner(base: str, prefixes: list[str], admin_phone: str, log_file: Path, seconds: float) -> str:
    """What a newcomer needs once everything answers: where, the docs, who to log in as, how."""
    from pipelines.seed import DEMO_CUSTOMERS

    customer = str(DEMO_CUSTOMERS[0]["phone"])
    lines = [
        "",
        f"Vurksha is up on {base} (started in {seconds:.0f} s)",
        "",
        "  API docs (Swagger UI) per service:",
        *(f"    {prefix.strip('/'):<16} {base}{prefix}/docs" for prefix in prefixes),
        "",
        "  Demo logins, by phone OTP (outside production the code lands in the dev outbox):",
        f"    admin       {admin_phone}",
        "    customers   " + ", ".join(f"{c['phone']} ({c['name']})" for c in DEMO_CUSTOMERS),
        f"    1. curl -s -X POST {base}/users/auth/otp -H 'content-type: application/json' \\",
        f'            -d \'{{"phone": "{customer}"}}\'',
        f"    2. curl -s '{base}/notifications/dev/outbox?to={quote(customer)}'   # the 6-digit code",
        f"    3. curl -s -X POST {base}/users/auth/verify -H 'content-type: application/json' \\",
        '            -d \'{"challenge_id": "<from 1>", "code": "<from 2>"}\'',
        "",
        f"  Logs: {log_file}",
        "  Ctrl-C stops everything (Serve, Ray and the embedded PostgreSQL and Redis).",
        "",
    ]
    return "\n".join(lines)


def _simulate_forever() -> None:
    from pipelines.simulate import main as simulate

    try:
        simulate(["--duration", str(10**9)])
    except Exception:
        logging.getLogger("vurksha.simulate").exception("the demo traffic stopped")


def _run(log_file: Path, simulate: bool = False) -> None:
    from deployments.launcher import backend, load_serve_config

    # SIGINT and SIGTERM must unwind so that Ray and the embedded servers are stopped, even
    # when SIGINT was inherited as ignored (a background job of a non-interactive shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    began = time.monotonic()
    with backend(worker_log=log_file) as settings:
        base = f"http://{settings.http_host}:{settings.http_port}"
        prefixes = [app["route_prefix"] for app in load_serve_config()["applications"]]
        _wait_until_answering(base, prefixes)
        print(banner(base, prefixes, settings.admin_phone, log_file, time.monotonic() - began), flush=True)
        if simulate:
            threading.Thread(target=_simulate_forever, name="simulate", daemon=True).start()
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("stopping…", flush=True)


async def _outbox(database_url: str, requeue: list[int] | None) -> None:
    """Show dead-lettered events; requeue them (all, or the ids given) once the cause is fixed."""
    from models import outbox
    from models.db import make_engine, make_sessionmaker

    engine = make_engine(database_url, pool_size=1, max_overflow=0)
    try:
        async with make_sessionmaker(engine)() as session:
            if requeue is not None:
                n = await outbox.requeue_dead(session, requeue or None)
                await session.commit()
                print(f"requeued {n} dead event(s)")
            for row in await outbox.dead_letters(session):
                print(
                    f"{row.id}\t{row.topic}\tattempts={row.attempts}\tpending={','.join(row.pending)}\t{row.last_error}"
                )
    finally:
        await engine.dispose()


async def _reset_auth(redis_url: str) -> None:
    from deployments.common import AuthCache
    from models.db import make_redis

    redis = make_redis(redis_url, max_connections=1)
    try:
        await AuthCache(redis, ttl_s=1).reset()
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vurksha", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start embedded servers (if needed), migrate, seed and serve")
    run.add_argument(
        "--simulate", action="store_true", help="once up, run demo traffic (vurksha simulate) until stopped"
    )
    sub.add_parser("simulate", help="demo traffic against a running backend (see --help)", add_help=False)
    sub.add_parser(
        "recommender", help="train, evaluate, promote, list or roll back models (see --help)", add_help=False
    )
    sub.add_parser("migrate", help="upgrade the database schema to the latest revision")
    sub.add_parser("seed", help="load seed and demo data (idempotent)")
    dead = sub.add_parser("outbox", help="list dead-lettered outbox events, or requeue them")
    dead.add_argument("--requeue", nargs="*", type=int, metavar="ID", help="requeue these (no ids: all dead)")
    auth = sub.add_parser(
        "auth", help="reset: forget every cached session (after changing users by hand in SQL)"
    )
    auth.add_argument("action", choices=["reset"])
    footprint = sub.add_parser(
        "footprint", help="the memory (PSS) of a running stack's processes on this machine, by role"
    )
    footprint.add_argument("--pid", type=int, nargs="*", help="the launcher(s); default: every `vurksha run`")
    openapi = sub.add_parser("openapi", help="write the merged OpenAPI document and the WebSockets' schemas")
    openapi.add_argument("--check", action="store_true", help="exit 1 if openapi.json is stale")
    alerts = sub.add_parser("alerts", help="write k8s/alerts.yaml (Prometheus alert rules) from k8s/slo.yaml")
    alerts.add_argument("--check", action="store_true", help="exit 1 if k8s/alerts.yaml is stale")
    args, rest = parser.parse_known_args(argv)
    if args.command == "simulate":
        from pipelines.simulate import main as simulate

        sys.exit(simulate(rest))
    if args.command == "recommender":
        from pipelines.recommender.cli import main as recommender

        sys.exit(recommender(rest))
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    settings = get_settings()
    # `run` keeps the terminal for its steps, warnings and errors; the rest goes to a file.
    log_file = settings.data_dir.resolve() / "logs" / "vurksha.log" if args.command == "run" else None
    setup_logging(settings.log_level, log_file, settings.log_format)

    if args.command == "run":
        assert log_file is not None
        _run(log_file, args.simulate)
    elif args.command in ("migrate", "seed", "outbox"):
        if not settings.database_url:
            parser.error("DATABASE_URL is not set (use `vurksha run` for the embedded servers)")
        if args.command == "outbox":
            asyncio.run(_outbox(settings.database_url, args.requeue))
        elif args.command == "migrate":
            from models.migrate import upgrade

            upgrade(settings.database_url)
        else:
            from pipelines.seed import seed

            asyncio.run(seed(settings))
    elif args.command == "auth":
        if not settings.redis_url:
            parser.error("REDIS_URL is not set (the embedded Redis lives only while `vurksha run` does)")
        asyncio.run(_reset_auth(settings.redis_url))
        print("every cached session will be read from PostgreSQL again")
    elif args.command == "footprint":
        from deployments.footprint import launchers, measure

        roots = args.pid or launchers()
        if not roots:
            parser.error("no `vurksha run` is running here (give the launcher's --pid)")
        print(measure(roots, settings.data_dir).render())
    elif args.command == "openapi":
        from deployments.openapi import OPENAPI_FILE, WEBSOCKETS_FILE, render, render_websockets

        documents = {OPENAPI_FILE: render(), WEBSOCKETS_FILE: render_websockets()}
        if args.check:
            sys.exit(0 if all(f.exists() and f.read_text() == t for f, t in documents.items()) else 1)
        for path, text in documents.items():
            path.write_text(text)
            print(f"wrote {path}")
    elif args.command == "alerts":
        from config.slo import ALERTS_FILE, load_slo, render_alerts

        rules = render_alerts(load_slo())
        if args.check:
            sys.exit(0 if ALERTS_FILE.exists() and ALERTS_FILE.read_text() == rules else 1)
        ALERTS_FILE.write_text(rules)
        print(f"wrote {ALERTS_FILE}")


if __name__ == "__main__":
    main()
