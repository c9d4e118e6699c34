"""`vurksha`: run the backend, migrate, seed, handle dead-lettered events, or regenerate the
OpenAPI document."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading

from config.logging import setup_logging
from config.settings import get_settings


def _run() -> None:
    from deployments.launcher import backend

    # SIGINT and SIGTERM must unwind so that Ray and the embedded servers are stopped, even
    # when SIGINT was inherited as ignored (a background job of a non-interactive shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with backend() as settings:
        base = f"http://{settings.http_host}:{settings.http_port}"
        print(
            f"\nVurksha is up on {base}\n  API docs: {base}/<service>/docs, e.g. {base}/users/docs\n"
            f"  merged OpenAPI: openapi.json in the repository\n  Ctrl-C stops everything.\n",
            flush=True,
        )
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vurksha", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start embedded servers (if needed), migrate, seed and serve")
    sub.add_parser("migrate", help="upgrade the database schema to the latest revision")
    sub.add_parser("seed", help="load seed and demo data (idempotent)")
    dead = sub.add_parser("outbox", help="list dead-lettered outbox events, or requeue them")
    dead.add_argument("--requeue", nargs="*", type=int, metavar="ID", help="requeue these (no ids: all dead)")
    openapi = sub.add_parser("openapi", help="write the merged OpenAPI document")
    openapi.add_argument("--check", action="store_true", help="exit 1 if openapi.json is stale")
    args = parser.parse_args(argv)
    settings = get_settings()
    setup_logging(settings.log_level)

    if args.command == "run":
        _run()
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
    elif args.command == "openapi":
        from deployments.openapi import OPENAPI_FILE, render

        text = render()
        if args.check:
            sys.exit(0 if OPENAPI_FILE.exists() and OPENAPI_FILE.read_text() == text else 1)
        OPENAPI_FILE.write_text(text)
        print(f"wrote {OPENAPI_FILE}")


if __name__ == "__main__":
    main()
