"""Stateful Ray actors. Every one is a named, detached actor in one namespace, created by
whichever process asks for it first (`named`)."""

from __future__ import annotations

import gc
import hashlib
import threading
import uuid
from typing import Any

from ray.actor import ActorHandle
from ray.exceptions import RayActorError, RayTaskError

from models.errors import AppError, ServiceUnavailable

NAMESPACE = "vurksha"

_handles: dict[str, ActorHandle] = {}
_lock = threading.Lock()


def steady_gc() -> None:
    """For a long-running server process (a replica, an actor), once it has loaded what it
    serves with: far fewer young-generation collections, and what is loaded so far (modules,
    routes, settings: most of the heap) frozen out of every later collection's scan.

    At Python's default (a collection every 700 net allocations) objects that live a few tens
    of milliseconds (a request in flight, a batch of positions) are promoted to the old
    generation, whose full collections then paused the delivery replica for 0.3-0.9 s every
    few seconds under 2,000 sockets (measured with gc.callbacks in the tracking benchmark);
    on the search replica serving recommendations this cut the CPU of a request from 2.1 to
    1.7 ms (tests/bench/hot_paths)."""
    gc.set_threshold(50_000, 20, 100)
    gc.freeze()


def named(actor_class: Any, name: str, *args: Any) -> ActorHandle:
    """The handle to actor `name`, creating it if it does not exist yet. Replicas of several
    applications may race to create it; get_if_exists makes them agree on one. Cached per
    process: a blocking GCS round trip only the first time."""
    with _lock:
        handle = _handles.get(name)
        if handle is None:
            handle = _handles[name] = actor_class.options(
                name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
            ).remote(*args)
        return handle


def shard_index(key: uuid.UUID, shards: int) -> int:
    """The shard of `key`: stable across processes and restarts (unlike Python's salted `hash`)."""
    digest = hashlib.blake2b(key.bytes, digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


async def call(ref: Any, *, unavailable: str, code: str) -> Any:
    """Await an actor call, turning its failures into our errors: an AppError raised in the
    actor comes back as itself (Ray wraps it), a dead or restarting actor as a 503 with
    `unavailable` and `code`."""
    try:
        return await ref
    except RayTaskError as exc:
        if isinstance(exc.cause, AppError):
            raise exc.cause from None
        raise
    except RayActorError as exc:  # includes ActorUnavailableError
        raise ServiceUnavailable(unavailable, code=code) from exc
