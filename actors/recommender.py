"""The recommender: a Serve deployment without HTTP routes (bound into the search application),
called through a handle by the search ingress. Each replica holds the production model in
memory (a `Scorer`) and ranks candidates for a customer's history, a product or a basket; the
ingress then keeps what the store can sell now.

Hot swap: every replica watches the registry in PostgreSQL (`recommender_poll_seconds`), so a
promotion reaches every replica on every pod whoever owns the Serve config (on KubeRay, ops).
A new version is loaded and its `Scorer` built off to the side, then swapped in with one
assignment; a request reads the reference once, so it is ranked wholly by the old or wholly by
the new model, never a half-loaded one. `user_config` may pin a version (`{"version": 7}`),
e.g. to hold one back while the registry moves on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from threadpoolctl import threadpool_limits

from actors import steady_gc
from config import metrics
from config.loopback import serve_grpc_on_loopback
from config.settings import get_settings
from models import recommender
from models.db import make_engine, make_sessionmaker
from models.recommender import ModelArtifact, Ranked, Scorer

log = logging.getLogger("vurksha.recommender")

APP, DEPLOYMENT = "search", "Recommender"


@serve.deployment(
    name=DEPLOYMENT,
    ray_actor_options={"num_cpus": 0.05},
    max_ongoing_requests=64,
    logging_config={"enable_access_log": False},
)
class Recommender:
    async def __init__(self) -> None:  # type: ignore[misc]  # Serve awaits an async constructor
        # One BLAS thread: a request's few small products gain nothing from more, and OpenBLAS'
        # spinning helper threads, descheduled on a busy node, made each one wait ~1 ms.
        threadpool_limits(1)
        serve_grpc_on_loopback()
        self.settings = get_settings()
        assert self.settings.database_url
        self._engine = make_engine(self.settings.database_url, pool_size=1, max_overflow=1)
        self._sessions = make_sessionmaker(self._engine)
        self._scorer: Scorer | None = None
        self._pinned: int | None = None
        self._poll_s = self.settings.recommender_poll_seconds
        # The production model is in memory before the replica takes its first request.
        await self._refresh()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        steady_gc()

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """`user_config`: `version` pins one (null follows the registry), `poll_seconds`."""
        self._pinned = config.get("version")
        self._poll_s = float(config.get("poll_seconds") or self.settings.recommender_poll_seconds)
        await self._refresh()

    async def _refresh(self) -> None:
        async with self._sessions() as session:
            wanted = self._pinned or await recommender.production_version(session)
            if wanted is None or (self._scorer is not None and self._scorer.version == wanted):
                return
            data = await recommender.load_artifact(session, wanted)
        scorer = await asyncio.to_thread(_load, data, wanted)
        self._scorer = scorer  # the swap: one assignment
        metrics.RECOMMENDER_VERSION.set(wanted)
        log.info("recommender: serving model v%d (%d items)", wanted, len(scorer.index))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self._refresh()
            except Exception:
                log.warning("recommender: could not check the registry", exc_info=True)

    async def for_you(
        self, product_ids: list[str], quantities: list[int], ages_s: list[float], store_id: str, k: int
    ) -> Ranked:
        """`k` candidates for a customer with this history (their own delivered lines)."""
        return self._rank(lambda m: m.for_you(m.history(product_ids, quantities, ages_s), store_id, k))

    async def similar(self, product_id: str, store_id: str, k: int) -> Ranked:
        return self._rank(lambda m: m.similar(product_id, store_id, k))

    async def basket(self, product_ids: list[str], store_id: str, k: int) -> Ranked:
        return self._rank(lambda m: m.basket(product_ids, store_id, k))

    def _rank(self, rank: Callable[[Scorer], Ranked]) -> Ranked:
        """Rank with the model served now (none yet: the callers fall back to popular)."""
        scorer = self._scorer
        if scorer is None:
            return Ranked([], [], "popular")
        started = time.perf_counter()
        try:
            return rank(scorer)
        finally:
            metrics.RECOMMENDER_LATENCY.observe(time.perf_counter() - started)

    async def check_health(self) -> None:
        if self._watcher.done():
            raise RuntimeError("the registry watcher stopped")

    async def __del__(self) -> None:
        self._watcher.cancel()
        await self._engine.dispose()


def _load(data: bytes, version: int) -> Scorer:
    return Scorer(ModelArtifact.from_bytes(data), version=version)


_handle: DeploymentHandle | None = None


async def recommender_handle() -> DeploymentHandle:
    """A handle to the recommender (bound into the search application)."""
    global _handle
    if _handle is None:
        _handle = await asyncio.to_thread(serve.get_deployment_handle, DEPLOYMENT, APP)
    return _handle
