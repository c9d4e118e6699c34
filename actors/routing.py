"""The route optimizer: a Serve deployment without HTTP routes (bound into the delivery
application), called through a handle by the fleet shards, to order a batched trip's drops,
and by the delivery ingress for ops (`POST /delivery/routes/optimize`).

OR-Tools' `SolveWithParameters` holds the GIL for its whole search (measured: a Python thread
beside a solve ran at 17% of its speed), so no solve runs in the replica. Each replica owns
`route_optimizer_portfolio` solver actors, processes of their own, started by its first solve
and kept while solves come (warm: a Ray task would start a new worker for most solves, since
Ray soon ends idle task workers when actors hold the node's worker slots, ~2-3 s each), one
solve at a time each; after `route_optimizer_solver_idle_seconds` without a solve they stop,
so an idle stack does not hold their memory, and the next solve starts them again. A
request runs each configuration of the portfolio on its own solver, side by side, and keeps
the best (`best_solution`); a small problem runs the default configuration on the least busy
solver. The budget runs from the request's arrival: a solve that waited for its solver searches
only what is left of it. Replicas, each with its solvers, scale on ongoing requests (serve.yaml;
on Kubernetes, solvers that do not fit make the Ray autoscaler add a worker pod).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from config import metrics
from config.loopback import serve_grpc_on_loopback
from config.settings import get_settings
from models.errors import ServiceUnavailable
from models.routing import (
    SOLVER_PORTFOLIO,
    HaversineTravelTimes,
    RoutingProblem,
    RoutingSolution,
    SolverConfig,
    best_solution,
    solve,
)

log = logging.getLogger("vurksha.routing")

APP, DEPLOYMENT = "delivery", "RouteOptimizer"
# Waiting for a solver beyond the budget: a solver started with the replica is warm within
# seconds; a warm one answers within milliseconds of its time limit.
_GRACE_S = 5.0
# Building the model is not search time either: measured here, ~1.2 us per travel-matrix cell
# and ~32 us per (stop, vehicle) pair (2,000 stops x 500 vehicles: 23 s), allowed twice over.
_BUILD_S_PER_CELL = 2.5e-6
_BUILD_S_PER_STOP_VEHICLE = 6.5e-5
# A solver process starts in ~2-3 s; under load allow far more before calling it failed.
_START_S = 20.0
# A solve that starts at or past its request's deadline (it waited for its solver) still
# searches this long: enough for a first solution of a store-sized problem.
_MIN_SEARCH_S = 0.05


@ray.remote(max_restarts=-1, max_task_retries=0)
class _Solver:
    def __init__(self) -> None:
        self.travel_times = HaversineTravelTimes(get_settings())

    def ready(self) -> bool:
        """Answers once the process is up (its imports done)."""
        return True

    def solve(self, problem: RoutingProblem, deadline: float, config: SolverConfig) -> RoutingSolution:
        """One configuration, searching until the request's `deadline` (epoch seconds)."""
        limit = max(deadline - time.time(), _MIN_SEARCH_S)
        return solve(problem, self.travel_times, time_limit_s=limit, config=config)


def _build_time(problem: RoutingProblem) -> float:
    """A generous bound on the time a solver spends building `problem`'s model."""
    nodes = len(problem.stops) + len(problem.vehicles) + 1
    profiles = len({v.vehicle_type for v in problem.vehicles})
    return _BUILD_S_PER_CELL * nodes * nodes * profiles + _BUILD_S_PER_STOP_VEHICLE * len(
        problem.stops
    ) * len(problem.vehicles)


class OptimizerFailed(ServiceUnavailable):
    """No configuration of the portfolio returned a solution in time."""

    code = "route_optimizer_unavailable"


@serve.deployment(
    name=DEPLOYMENT,
    ray_actor_options={"num_cpus": 0.05},
    max_ongoing_requests=16,
    logging_config={"enable_access_log": False},
)
class RouteOptimizer:
    def __init__(self) -> None:
        serve_grpc_on_loopback()
        self.settings = get_settings()
        self._solvers: list[Any] = []
        self._busy: list[int] = []
        self._last_solve = time.monotonic()
        self._idle_watch: asyncio.Task[None] | None = None
        self._warm: asyncio.Future[Any] | None = None

    def _start_solvers(self) -> asyncio.Future[Any]:
        """The solvers, started if they are not running: a future that ends once they are up."""
        if self._solvers and self._warm is not None:
            return self._warm
        width = self.settings.route_optimizer_portfolio
        options = cast(Any, _Solver).options(num_cpus=self.settings.route_optimizer_solver_cpus)
        self._solvers = [options.remote() for _ in range(width)]
        self._busy = [0] * width
        self._warm = asyncio.ensure_future(asyncio.gather(*(s.ready.remote() for s in self._solvers)))
        if self._idle_watch is None:
            self._idle_watch = asyncio.get_running_loop().create_task(self._stop_solvers_when_idle())
        return self._warm

    async def _stop_solvers_when_idle(self) -> None:
        idle = self.settings.route_optimizer_solver_idle_seconds
        while True:
            await asyncio.sleep(min(idle, 30.0))
            starting = self._warm is not None and not self._warm.done()
            idle_for = time.monotonic() - self._last_solve
            if self._solvers and not starting and not any(self._busy) and idle_for >= idle:
                for solver in self._solvers:
                    ray.kill(solver)
                self._solvers, self._busy, self._warm = [], [], None
                log.info("route optimizer: solvers stopped after %.0f s without a solve", idle)

    def _assign(self, problem: RoutingProblem) -> list[tuple[int, SolverConfig]]:
        """(solver, configuration) pairs: the whole portfolio on a large problem, else the
        default configuration on the least busy solver."""
        if len(problem.stops) > self.settings.route_optimizer_portfolio_min_stops:
            return list(enumerate(SOLVER_PORTFOLIO[: len(self._solvers)]))
        return [(self._busy.index(min(self._busy)), SOLVER_PORTFOLIO[0])]

    async def _run(
        self, index: int, problem: RoutingProblem, deadline: float, config: SolverConfig
    ) -> RoutingSolution:
        self._busy[index] += 1
        try:
            solution: RoutingSolution = await self._solvers[index].solve.remote(problem, deadline, config)
            return solution
        finally:
            self._busy[index] -= 1
            self._last_solve = time.monotonic()

    def _budget(self, time_limit_s: float | None) -> float:
        """The search time of a request (its own, capped, or the default)."""
        limit = time_limit_s or self.settings.route_optimizer_time_limit_seconds
        return min(limit, self.settings.route_optimizer_max_time_limit_seconds)

    async def solve(self, problem: RoutingProblem, time_limit_s: float | None = None) -> RoutingSolution:
        """Plan `problem` within `time_limit_s` of search (each configuration side by side),
        returning the best solution found: `stats.time_limit_reached` says whether the clock
        stopped the search. Raises `OptimizerFailed` if no configuration answered."""
        started = time.monotonic()
        outcome = "failed"
        try:
            solution = await self._solve(problem, self._budget(time_limit_s))
            outcome = "solved"
            return solution
        finally:
            metrics.ROUTE_SOLVE.observe(time.monotonic() - started, outcome=outcome)

    async def _solve(self, problem: RoutingProblem, limit: float) -> RoutingSolution:
        self._last_solve = time.monotonic()
        try:
            # Starting the solvers is not search time: under load a cold start took longer than
            # a request's whole grace, and the first solve after a quiet spell failed.
            await asyncio.wait_for(asyncio.shield(self._start_solvers()), timeout=_START_S)
        except TimeoutError:
            raise OptimizerFailed(f"the solvers did not start within {_START_S:.0f} s") from None
        except Exception:  # a solver died while starting: start afresh on the next request
            log.warning("route optimizer: solvers failed to start", exc_info=True)
            self._solvers, self._busy, self._warm = [], [], None
            raise OptimizerFailed("the solvers failed to start") from None
        self._last_solve = time.monotonic()  # the idle watch counts from now, not the start
        deadline = time.time() + limit
        runs = [asyncio.ensure_future(self._run(i, problem, deadline, c)) for i, c in self._assign(problem)]
        wait = limit + _GRACE_S + _build_time(problem)
        done, _ = await asyncio.wait(runs, timeout=wait)
        solutions = []
        for future in done:
            if future.exception() is None:
                solutions.append(future.result())
            else:
                log.warning("route optimizer: a solve failed", exc_info=future.exception())
        if not solutions:
            raise OptimizerFailed(f"no solution within {wait:.1f} s")
        return best_solution(solutions)

    async def ping(self) -> bool:
        """For callers to set up their handle (its router finds the replicas) before they
        need an answer in time."""
        return True


_handle: DeploymentHandle | None = None


async def optimizer() -> DeploymentHandle:
    """A handle to the optimizer, from any process of the cluster (replicas, actors). Raises
    if the delivery application (which binds it) is not running."""
    global _handle
    if _handle is None:
        _handle = await asyncio.to_thread(serve.get_deployment_handle, DEPLOYMENT, APP)
    return _handle


async def warm_up(attempts: int = 30, every_s: float = 2.0) -> bool:
    """Resolve the handle and reach a replica once (a first call through a new handle waits
    for its router to learn the replicas, ~1-2 s), retrying while the application starts."""
    for _ in range(attempts):
        try:
            return bool(await (await optimizer()).ping.remote())
        except Exception:
            await asyncio.sleep(every_s)
    log.warning("route optimizer: not reachable after %d attempts", attempts)
    return False
