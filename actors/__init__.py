"""Stateful Ray actors. Every one is a named, detached actor in one namespace, created by
whichever process asks for it first (`named`)."""

from __future__ import annotations

import threading
from typing import Any

from ray.actor import ActorHandle

NAMESPACE = "vurksha"

_handles: dict[str, ActorHandle] = {}
_lock = threading.Lock()


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
