"""Route optimization (pure: no Ray, no HTTP, no I/O but the files passed in).

A vehicle routing problem with time windows (VRPTW) solved with OR-Tools' routing library
(`pywrapcp`), in two layers:

- a generic core, `solve_matrix`, over explicit integer travel-time matrices: time windows
  (hard, or soft with a lateness cost), service times, capacities, pickup-before-drop pairs,
  optional visits with a drop penalty. The delivery problem and the Solomon benchmark both go
  through it, so the benchmark measures the code dispatch runs;
- the delivery problem, `solve`: pydantic types that are also the REST schema (times in whole
  seconds from the problem's `origin`, capacity in items), travel times from a `TravelTimes`
  matrix (haversine x road factor / vehicle speed, as the delivery ETAs; an OSRM table can
  replace it), soft windows, and stops dropped only as a last resort, each with a reason.

One call runs one solver configuration, single-threaded, so the deployment can fan a
portfolio out (one solver actor per config) and keep the best (`best_solution`).

Reproducibility: OR-Tools routing has no random seed parameter; its single-threaded search is
deterministic for the same model and parameters. `seed` is passed to the CP solver
(`Solver.ReSeed`) for the parts that draw from it. What can still differ between runs is how far
a wall-clock `time_limit_s` lets the search go on a busy machine; `solution_limit` stops on a
count of solutions instead, which makes results identical run to run.

Portfolio, chosen by measurement (`python -m tests.bench.routes --sweep --seconds 1 --jobs 2`):
the 56 Solomon instances (hard windows, closed routes, no drops, checked independently), 1 s
wall per instance, one thread per config (two instances at a time on the 2 cores, ~1 CPU-s
each), OR-Tools 9.15. Mean gap to the best-known distance over the instances solved, and how
many were left unsolved. Stage 1: every start with guided local search; stage 2: the other
metaheuristics on the two best starts; stage 3: guided local search's penalty weight (lambda,
0.1 by default) on those two, where 0.3 did best (see `SOLVER_PORTFOLIO`).

    config                                              mean gap  unsolved
    SAVINGS + GUIDED_LOCAL_SEARCH                          7.28%     0
    SAVINGS + SIMULATED_ANNEALING                          7.29%     0
    SAVINGS + TABU_SEARCH                                  7.52%     0
    PARALLEL_CHEAPEST_INSERTION + GUIDED_LOCAL_SEARCH      7.61%     0
    SAVINGS + GREEDY_DESCENT                               7.99%     0
    SEQUENTIAL_CHEAPEST_INSERTION + GUIDED_LOCAL_SEARCH    8.08%     0
    PARALLEL_CHEAPEST_INSERTION + TABU_SEARCH              8.20%     0
    PARALLEL_CHEAPEST_INSERTION + SIMULATED_ANNEALING      8.21%     0
    LOCAL_CHEAPEST_INSERTION + GUIDED_LOCAL_SEARCH         8.41%     0
    LOCAL_CHEAPEST_COST_INSERTION + GUIDED_LOCAL_SEARCH    8.42%     0
    PARALLEL_CHEAPEST_INSERTION + GREEDY_DESCENT           9.11%     0
    CHRISTOFIDES + GUIDED_LOCAL_SEARCH                     8.43%     2
    PATH_MOST_CONSTRAINED_ARC + GUIDED_LOCAL_SEARCH        6.29%     7  (over the 49 solved)
    PATH_CHEAPEST_ARC + GUIDED_LOCAL_SEARCH (default)      6.89%     7  (over the 49 solved)

Side by side with SAVINGS + GUIDED_LOCAL_SEARCH (per instance, the better of the two):
+ PATH_MOST_CONSTRAINED_ARC + GLS 4.94%, + PATH_CHEAPEST_ARC + GLS 5.56%, + PARALLEL_CHEAPEST_
INSERTION + SIMULATED_ANNEALING 5.87%, + PARALLEL_CHEAPEST_INSERTION + GLS 5.88%; all solved.
The arc-by-arc starts are better where they find a solution; savings always finds one.
(A first sweep while another project's Ray workers held the cores, 0.2-0.4 CPU-s per run,
ranked SAVINGS + TABU_SEARCH first: fast-converging configs win when starved of CPU.)

Then OR-Tools' iterated local search (SISR ruin and recreate, `ILS` here), measured the same
way after the sweep: SAVINGS + ILS 4.89% with none unsolved, the best single configuration that
solves every instance, and with PATH_MOST_CONSTRAINED_ARC + ILS side by side 3.17% (see
`SOLVER_PORTFOLIO`). `DEFAULT_CONFIG` is the best single configuration; `SOLVER_PORTFOLIO` adds
its best partner.

Then the greedy descent inside ILS, the same way (the portfolio side by side, best of the two,
every variant in one session; run-to-run spread of that figure about 0.05 points): OR-Tools'
default neighborhoods 3.94-3.96%; without Lin-Kernighan, the expensive-chain relocation and the
path and visit-type LNS 4.19% (no better alone); also without the neighborhoods this model
cannot use (pickup-and-drop moves, making visits active or inactive: nothing is optional in
Solomon) 3.19%; with SISR removing ~20 visits instead of ~10, 2.84% (2.84, 2.84, 2.88 over
three runs). Not better, on top of that: ~15 or ~30 visits removed (3.05%, 3.00%), strings of up
to 15 (2.79-2.89%), other annealing temperatures (100 -> 0.01 is OR-Tools' default; 300 -> 1
2.83%, 30 -> 0.01 3.00%, automatic), a multi-armed bandit over the neighborhoods (2.77-2.81%),
recreating by sequential or local cheapest insertion (3.23%, 4.54%), the bypass factor 0.1
(2.84%); without the cross or or-opt moves (3.74%, 3.01%). Restricting every neighborhood to the
nearest 15-30% of nodes (`ls_operator_neighbors_ratio`) made it far worse (22%). Partners for
SAVINGS + ILS: PATH_MOST_CONSTRAINED_ARC still the best (PARALLEL_CHEAPEST_INSERTION 3.29%,
LOCAL_CHEAPEST_INSERTION 3.93%, SAVINGS + GLS 4.22%). ILS draws no randomness from `seed`
(the same solution at every seed), so a second seed is no partner.
"""

from __future__ import annotations

import enum
import math
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

from ortools.constraint_solver import pywrapcp, routing_enums_pb2, routing_ils_pb2
from ortools.util import optional_boolean_pb2
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from config.settings import Settings
from models import bodies
from models.delivery_rules import LatLng, TripRoute, Vehicle, haversine_m, speed_mps, travel_s

# ---------------------------------------------------------------- solver configurations


ILS = "ITERATED_LOCAL_SEARCH"


@dataclass(frozen=True, slots=True)
class SolverConfig:
    """A first-solution strategy and a local-search metaheuristic (OR-Tools enum names), and
    guided local search's penalty weight (OR-Tools' default 0.1). The metaheuristic `ILS` is
    OR-Tools' iterated local search: SISR ruin (string removals) and parallel cheapest insertion
    recreate, greedy descent after each, simulated-annealing acceptance (`SolveWithIterated
    LocalSearch`; `SolveWithParameters` never runs it)."""

    first_solution: str
    metaheuristic: str
    gls_lambda: float = 0.1

    def __post_init__(self) -> None:
        routing_enums_pb2.FirstSolutionStrategy.Value.Value(self.first_solution)  # raises if unknown
        if self.metaheuristic != ILS:
            routing_enums_pb2.LocalSearchMetaheuristic.Value.Value(self.metaheuristic)

    @property
    def label(self) -> str:
        gls = f"+lambda={self.gls_lambda:g}" if self.gls_lambda != 0.1 else ""
        return f"{self.first_solution}+{self.metaheuristic}{gls}"

    @classmethod
    def of(cls, label: str) -> SolverConfig:
        first, meta, *rest = label.split("+")
        return cls(first, meta, *(float(r.removeprefix("lambda=")) for r in rest))


# OR-Tools' usual defaults, the benchmark's baseline: no solution at all on 7 Solomon instances.
ORTOOLS_DEFAULT_CONFIG = SolverConfig("PATH_CHEAPEST_ARC", "GUIDED_LOCAL_SEARCH")
# All 56 at 1 s, two at once: SAVINGS + ILS 4.89%, PARALLEL_CHEAPEST_INSERTION + ILS 4.68%,
# PATH_MOST_CONSTRAINED_ARC + ILS 4.17% (7 unsolved), SAVINGS + GLS 6.17%, PATH_MOST_CONSTRAINED_
# ARC + GLS 5.37% (7 unsolved). Side by side with SAVINGS + ILS: PATH_MOST_CONSTRAINED_ARC + ILS
# 3.17%, + GLS 3.84%, PARALLEL_CHEAPEST_INSERTION + ILS 3.71%. GLS, where used, at lambda 0.3
# rather than 0.1 (SAVINGS 6.04% -> 5.53%; 0.2 and 0.5 did less; run-to-run noise at 1 s is
# about half a point). These figures are with OR-Tools' default neighborhoods in ILS's descent;
# with the leaner descent of `_iterated` the pair is at 2.84% (the module docstring).
SOLVER_PORTFOLIO: tuple[SolverConfig, ...] = (
    SolverConfig("SAVINGS", ILS),
    SolverConfig("PATH_MOST_CONSTRAINED_ARC", ILS),
)
DEFAULT_CONFIG = SOLVER_PORTFOLIO[0]


class SolverStats(BaseModel):
    """How a solution was found: what the REST answer and the trip record show."""

    first_solution_strategy: str
    metaheuristic: str
    seed: int
    wall_time_s: float
    # OR-Tools' objective (travel + lateness cost + drop penalties); None without a solution.
    objective: int | None
    status: str
    time_limit_reached: bool


# ---------------------------------------------------------------- the generic core


@dataclass(frozen=True, slots=True)
class MatrixVehicle:
    start: int  # node it leaves from
    end: int  # node it finishes at (a zero-cost sink node makes an open route)
    capacity: int
    ready: int  # earliest departure
    latest: int  # latest time at `end`
    profile: int = 0  # which travel matrix it uses


@dataclass(frozen=True, slots=True)
class MatrixProblem:
    """Nodes are matrix indices; every node that is no vehicle's start or end is a visit.

    `travel[profile][i][j]` is both the arc cost and the time from i to j; `service[i]` is
    spent at i before leaving. `windows` are hard. With `due`, a visit served after its due
    time costs `lateness_weight` per unit late. `demands` are signed loads (a pair's pickup
    +q, its drop -q) and the load stays within [0, capacity]. With `drop_penalty` every visit
    may be left out at that cost; without it every visit must be served.
    """

    travel: Sequence[Sequence[Sequence[int]]]
    demands: Sequence[int]
    windows: Sequence[tuple[int, int]]
    service: Sequence[int]
    vehicles: Sequence[MatrixVehicle]
    pairs: Sequence[tuple[int, int]] = ()
    due: Sequence[int] | None = None
    lateness_weight: int = 0
    drop_penalty: int | None = None

    def visits(self) -> list[int]:
        ends = {v.start for v in self.vehicles} | {v.end for v in self.vehicles}
        return [i for i in range(len(self.demands)) if i not in ends]


@dataclass(frozen=True, slots=True)
class Schedule:
    """A route timed as early as possible: arrival (= start of service) at each visit."""

    arrivals: tuple[int, ...]
    end_time: int  # arrival at the vehicle's end node
    travel: int
    lateness: int
    time_ok: bool  # every hard window and the vehicle's latest end hold
    load_ok: bool  # the load stays within [0, capacity]


def schedule(problem: MatrixProblem, vehicle: int, nodes: Sequence[int]) -> Schedule:
    """Time `nodes` on `vehicle`: leave at its ready time, wait for a window when early."""
    v = problem.vehicles[vehicle]
    matrix = problem.travel[v.profile]
    t, here, travel, lateness, load = v.ready, v.start, 0, 0, 0
    time_ok = load_ok = True
    arrivals = []
    for node in nodes:
        leg = matrix[here][node]
        travel += leg
        t = max(t + problem.service[here] + leg, problem.windows[node][0])
        time_ok &= t <= problem.windows[node][1]
        if problem.due is not None:
            lateness += max(0, t - problem.due[node])
        load += problem.demands[node]
        load_ok &= 0 <= load <= v.capacity
        arrivals.append(t)
        here = node
    leg = matrix[here][v.end]
    t += problem.service[here] + leg
    time_ok &= t <= v.latest
    return Schedule(tuple(arrivals), t, travel + leg, lateness, time_ok, load_ok)


@dataclass(frozen=True, slots=True)
class MatrixSolution:
    routes: tuple[tuple[int, ...], ...]  # visits per vehicle, in order (empty when unused)
    dropped: tuple[int, ...]
    stats: SolverStats

    @property
    def found(self) -> bool:
        return self.stats.objective is not None


_TIME_LIMIT_STATUSES = {"ROUTING_PARTIAL_SUCCESS_LOCAL_OPTIMUM_NOT_REACHED", "ROUTING_FAIL_TIMEOUT"}


def solve_matrix(
    problem: MatrixProblem,
    *,
    time_limit_s: float,
    config: SolverConfig = DEFAULT_CONFIG,
    seed: int = 0,
    solution_limit: int | None = None,
) -> MatrixSolution:
    """Solve with one configuration, single-threaded, within `time_limit_s` of search.

    Never raises on an infeasible problem: without a solution (only possible when visits are
    mandatory, or when the search stops before a first solution) `found` is False and every
    visit is in `dropped`.
    """
    started = time.perf_counter()
    vehicles = problem.vehicles
    n = len(problem.demands)
    manager = pywrapcp.RoutingIndexManager(
        n, len(vehicles), [v.start for v in vehicles], [v.end for v in vehicles]
    )
    routing = pywrapcp.RoutingModel(manager)
    routing.solver().ReSeed(seed)

    profiles = sorted({v.profile for v in vehicles})
    cost = {p: routing.RegisterTransitMatrix([list(row) for row in problem.travel[p]]) for p in profiles}
    transit = {
        p: routing.RegisterTransitMatrix(
            [[leg + problem.service[i] for leg in row] for i, row in enumerate(problem.travel[p])]
        )
        for p in profiles
    }
    for k, v in enumerate(vehicles):
        routing.SetArcCostEvaluatorOfVehicle(cost[v.profile], k)

    horizon = max([v.latest for v in vehicles] + [hi for _, hi in problem.windows])
    routing.AddDimensionWithVehicleTransits(
        [transit[v.profile] for v in vehicles], horizon, horizon, False, "time"
    )
    times = routing.GetDimensionOrDie("time")
    visits = problem.visits()
    for node in visits:
        index = manager.NodeToIndex(node)
        times.CumulVar(index).SetRange(*problem.windows[node])
        if problem.due is not None and problem.lateness_weight > 0:
            times.SetCumulVarSoftUpperBound(index, problem.due[node], problem.lateness_weight)
        if problem.drop_penalty is not None:
            routing.AddDisjunction([index], problem.drop_penalty)
    # Reported times come from `schedule` (earliest arrivals along each route), not from the
    # solver's cumul values, so no finalizer is needed to tighten them.
    solver = routing.solver()
    for k, v in enumerate(vehicles):
        latest = max(v.ready, v.latest)
        times.CumulVar(routing.Start(k)).SetRange(v.ready, latest)
        times.CumulVar(routing.End(k)).SetRange(v.ready, latest)
        if v.latest < v.ready:  # a shift that ends before it can start: the vehicle stays idle
            solver.Add(routing.ActiveVehicleVar(k) == 0)

    demand = routing.RegisterUnaryTransitVector(list(problem.demands))
    routing.AddDimensionWithVehicleCapacity(demand, 0, [v.capacity for v in vehicles], True, "load")

    for pickup, drop in problem.pairs:
        p, d = manager.NodeToIndex(pickup), manager.NodeToIndex(drop)
        routing.AddPickupAndDelivery(p, d)
        solver.Add(routing.VehicleVar(p) == routing.VehicleVar(d))
        solver.Add(routing.ActiveVar(p) == routing.ActiveVar(d))
        solver.Add(times.CumulVar(p) <= times.CumulVar(d))

    params = pywrapcp.DefaultRoutingSearchParameters()
    params.first_solution_strategy = routing_enums_pb2.FirstSolutionStrategy.Value.Value(
        config.first_solution
    )
    if config.metaheuristic == ILS:
        _iterated(params, problem)
    else:
        params.local_search_metaheuristic = routing_enums_pb2.LocalSearchMetaheuristic.Value.Value(
            config.metaheuristic
        )
    params.guided_local_search_lambda_coefficient = config.gls_lambda
    params.time_limit.FromMilliseconds(max(1, round(time_limit_s * 1000)))
    if solution_limit is not None:
        params.solution_limit = solution_limit
    searching = time.perf_counter()
    if config.metaheuristic == ILS:
        assignment = routing.SolveWithIteratedLocalSearch(params)
        # It never sets the model's status (OR-Tools 9.15).
        status = "ROUTING_SUCCESS" if assignment is not None else "ROUTING_FAIL"
    else:
        assignment = routing.SolveWithParameters(params)
        status = routing_enums_pb2.RoutingSearchStatus.Value.Name(routing.status())
    searched = time.perf_counter() - searching

    routes: list[tuple[int, ...]] = []
    if assignment is not None:
        for k in range(len(vehicles)):
            route, index = [], assignment.Value(routing.NextVar(routing.Start(k)))
            while not routing.IsEnd(index):
                route.append(manager.IndexToNode(index))
                index = assignment.Value(routing.NextVar(index))
            routes.append(tuple(route))
    served = {node for route in routes for node in route}
    return MatrixSolution(
        routes=tuple(routes) if routes else tuple(() for _ in vehicles),
        dropped=tuple(node for node in visits if node not in served),
        stats=SolverStats(
            first_solution_strategy=config.first_solution,
            metaheuristic=config.metaheuristic,
            seed=seed,
            wall_time_s=round(time.perf_counter() - started, 3),
            objective=None if assignment is None else assignment.ObjectiveValue(),
            status=status,
            # Guided local search never stops by itself and still reports ROUTING_SUCCESS
            # when the clock stops it (OR-Tools 9.15): the elapsed search time tells.
            time_limit_reached=status in _TIME_LIMIT_STATUSES or searched >= 0.98 * time_limit_s,
        ),
    )


# Neighborhoods the greedy descent of iterated local search leaves out, by measurement (see the
# module docstring): the costly ones that do not pay for themselves within a second (Lin-
# Kernighan, the expensive-chain relocation, the path and visit-type LNS), and those that
# cannot change a solution of the model at hand (pickup-and-drop moves without pairs; making
# visits active or inactive when every visit is mandatory): those find no move, yet are
# still tried at every step of the descent.
_COSTLY_OPERATORS = (
    "use_lin_kernighan",
    "use_relocate_expensive_chain",
    "use_global_cheapest_insertion_path_lns",
    "use_local_cheapest_insertion_path_lns",
    "use_global_cheapest_insertion_visit_types_lns",
    "use_local_cheapest_insertion_visit_types_lns",
)
_PAIR_OPERATORS = (
    "use_relocate_pair",
    "use_light_relocate_pair",
    "use_exchange_pair",
    "use_relocate_subtrip",
    "use_exchange_subtrip",
)
_OPTIONAL_VISIT_OPERATORS = (
    "use_make_active",
    "use_make_inactive",
    "use_make_chain_inactive",
    "use_swap_active",
    "use_shortest_path_swap_active",
    "use_swap_active_chain",
    "use_relocate_path_global_cheapest_insertion_insert_unperformed",
)


def _iterated(params: Any, problem: MatrixProblem) -> None:
    """Iterated local search: SISR ruin (Christiaens and Vanden Berghe's string removals, ~20
    visits in strings of up to 10), recreate by parallel cheapest insertion, greedy descent on
    each perturbed solution over the neighborhoods that can move this model, simulated-annealing
    acceptance (OR-Tools' default temperatures)."""
    params.use_iterated_local_search = True
    params.local_search_metaheuristic = routing_enums_pb2.LocalSearchMetaheuristic.GREEDY_DESCENT
    ils = params.iterated_local_search_parameters
    ils.perturbation_strategy = routing_ils_pb2.PerturbationStrategy.RUIN_AND_RECREATE
    ruin_recreate = ils.ruin_recreate_parameters
    del ruin_recreate.ruin_strategies[:]
    sisr = ruin_recreate.ruin_strategies.add().sisr
    sisr.max_removed_sequence_size = 10
    sisr.avg_num_removed_visits = 20
    sisr.bypass_factor = 0.01
    ruin_recreate.recreate_strategy.heuristic = (
        routing_enums_pb2.FirstSolutionStrategy.PARALLEL_CHEAPEST_INSERTION
    )
    ils.improve_perturbed_solution = True
    off = [*_COSTLY_OPERATORS]
    if not problem.pairs:
        off += _PAIR_OPERATORS
    if problem.drop_penalty is None:
        off += _OPTIONAL_VISIT_OPERATORS
    for name in off:
        setattr(params.local_search_operators, name, optional_boolean_pb2.BOOL_FALSE)


# ---------------------------------------------------------------- why a visit was dropped


class DropReason(enum.StrEnum):
    # No vehicle, even with nothing else to do, reaches it within its window (and its maximum
    # lateness) and still finishes its shift in time.
    window_unreachable = "window_unreachable"
    # Some vehicle could reach it in time, but every such vehicle lacks the capacity, alone
    # or with the load of its planned route.
    capacity = "capacity"
    # It fits a vehicle alone, but no planned route can take it in time: too many stops for
    # the vehicles' time.
    no_vehicle = "no_vehicle"
    # It could have been inserted into a planned route: the search stopped before finding it.
    solver_limit = "solver_limit"


def _insertions(route: Sequence[int], visit: Sequence[int]) -> Iterable[list[int]]:
    """`route` with one visit, or a pickup-and-drop pair in order, inserted at every place."""
    if len(visit) == 1:
        for i in range(len(route) + 1):
            yield [*route[:i], visit[0], *route[i:]]
        return
    for i in range(len(route) + 1):
        for j in range(i, len(route) + 1):
            yield [*route[:i], visit[0], *route[i:j], visit[1], *route[j:]]


def drop_reason(problem: MatrixProblem, routes: Sequence[Sequence[int]], visit: Sequence[int]) -> DropReason:
    """Why `visit` (a node, or a pickup and its drop) is not served by `routes`: a cheap check
    of the visit alone on each vehicle, then of its insertion into each planned route."""
    alone = [schedule(problem, k, visit) for k in range(len(problem.vehicles))]
    if not any(s.time_ok for s in alone):
        return DropReason.window_unreachable
    if not any(s.time_ok and s.load_ok for s in alone):
        return DropReason.capacity
    time_fits = False
    for k, route in enumerate(routes):
        if not (alone[k].time_ok and alone[k].load_ok):
            continue
        for candidate in _insertions(route, visit):
            s = schedule(problem, k, candidate)
            if s.time_ok and s.load_ok:
                return DropReason.solver_limit
            time_fits |= s.time_ok
    return DropReason.capacity if time_fits else DropReason.no_vehicle


# ---------------------------------------------------------------- the delivery problem


class _Strict(bodies.Strict):
    model_config = ConfigDict(frozen=True)


Id = str
# Numbers in a problem are JSON numbers: "600" is a 422, not 600.
Seconds = Annotated[int, Strict()]
# Times in a problem stay within 30 days of its origin: every cost the solver adds up (the
# drop penalty is horizon x lateness cost x stops) then fits OR-Tools' 64-bit integers.
HORIZON_MAX_S = 30 * 24 * 3600
Moment = Annotated[Seconds, Field(ge=0, le=HORIZON_MAX_S)]


def _invalid(loc: tuple[str | int, ...], kind: str, message: str, value: Any) -> ValidationError:
    """A validation error on a field deep in the problem (a 422 that names it)."""
    return ValidationError.from_exception_data(
        "RoutingProblem",
        [InitErrorDetails(type=PydanticCustomError(kind, message), loc=loc, input=value)],
    )


class Point(_Strict):
    lat: float = Field(ge=-90, le=90, strict=True)
    lng: float = Field(ge=-180, le=180, strict=True)

    @property
    def latlng(self) -> LatLng:
        return LatLng(self.lat, self.lng)


class Depot(_Strict):
    """The store: vehicles starting there leave once it is open."""

    location: Point
    opens_s: Moment = 0


class RouteVehicle(_Strict):
    """A partner: where they are (None: at the store), what they carry, until when they work."""

    id: Id = Field(min_length=1, max_length=64)
    start: Point | None = None
    capacity: int = Field(ge=1, le=10_000, strict=True)
    shift_end_s: Moment
    vehicle_type: Vehicle = Vehicle.scooter


class RouteStop(_Strict):
    """A place to serve: `demand` items handed over, service starting within the window."""

    id: Id = Field(min_length=1, max_length=64)
    location: Point
    demand: int = Field(default=1, ge=0, le=10_000, strict=True)
    earliest_s: Moment = 0
    latest_s: Moment
    service_s: Seconds = Field(default=0, ge=0, le=24 * 3600)

    @field_validator("latest_s")
    @classmethod
    def _after_earliest(cls, latest: int, info: ValidationInfo) -> int:
        if latest < info.data.get("earliest_s", 0):
            raise PydanticCustomError("window_order", "latest_s is before earliest_s")
        return latest


class PickupDrop(_Strict):
    """The drop's items are loaded at the pickup, by the same vehicle, before the drop."""

    pickup: Id
    drop: Id


class RoutingProblem(_Strict):
    """Times are whole seconds from `origin`; capacities and demands are items.

    Routes are open (they end at their last stop) or closed (back to the depot). A stop is
    served late rather than dropped: lateness costs `lateness_cost_per_s` travel-seconds per
    second, up to `max_lateness_s` (None: up to the vehicle's shift end; 0: hard windows).
    A stop is dropped only when no vehicle can serve it; each dropped stop comes with a reason.
    """

    origin: bodies.Timestamp | None = None
    depot: Depot
    vehicles: list[RouteVehicle] = Field(min_length=1, max_length=500)
    stops: list[RouteStop] = Field(max_length=2000)
    pairs: list[PickupDrop] = Field(default_factory=list)
    open_routes: bool = Field(default=False, strict=True)
    lateness_cost_per_s: int = Field(default=10, ge=0, le=10_000, strict=True)
    max_lateness_s: Moment | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RoutingProblem:
        for field, ids in (
            ("vehicles", [v.id for v in self.vehicles]),
            ("stops", [s.id for s in self.stops]),
        ):
            seen: set[str] = set()
            for i, item_id in enumerate(ids):
                if item_id in seen:
                    raise _invalid((field, i, "id"), "duplicate_id", f"duplicate id {item_id!r}", item_id)
                seen.add(item_id)
        index = {s.id: i for i, s in enumerate(self.stops)}
        paired: set[str] = set()
        for i, pair in enumerate(self.pairs):
            for end in ("pickup", "drop"):
                stop_id = getattr(pair, end)
                if stop_id not in index:
                    raise _invalid(("pairs", i, end), "unknown_stop", f"no stop with id {stop_id!r}", stop_id)
                if stop_id in paired:
                    raise _invalid(("pairs", i, end), "paired_twice", f"{stop_id!r} is in two pairs", stop_id)
                paired.add(stop_id)
            pickup = self.stops[index[pair.pickup]]
            if pickup.demand:
                raise _invalid(
                    ("stops", index[pair.pickup], "demand"),
                    "pickup_demand",
                    "a pickup loads its drop's demand: give the pickup demand 0",
                    pickup.demand,
                )
        # Loads are modelled one way per problem: items on board from the start and handed out
        # (no pairs), or loaded at pickups and unloaded at drops (pairs).
        if self.pairs:
            for i, stop in enumerate(self.stops):
                if stop.demand and stop.id not in paired:
                    raise _invalid(
                        ("stops", i, "demand"),
                        "unpaired_demand",
                        "with pickup-and-drop pairs, a stop outside a pair carries no items (demand 0)",
                        stop.demand,
                    )
        largest = max(v.capacity for v in self.vehicles)
        for i, stop in enumerate(self.stops):
            if stop.demand > largest:
                raise _invalid(
                    ("stops", i, "demand"),
                    "over_capacity",
                    f"demand {stop.demand} exceeds every vehicle's capacity (largest {largest})",
                    stop.demand,
                )
        return self


class PlannedVisit(_Strict):
    stop_id: Id
    arrival_s: Seconds  # when the vehicle is there (service starts; becomes the stop's ETA)
    departure_s: Seconds
    lateness_s: Seconds
    load_after: int  # items still aboard when leaving


class PlannedRoute(_Strict):
    vehicle_id: Id
    visits: list[PlannedVisit]
    start_s: Seconds
    end_s: Seconds  # back at the depot (closed) or done at the last stop (open)
    travel_s: Seconds
    lateness_s: Seconds


class DroppedStop(_Strict):
    stop_id: Id
    reason: DropReason


class RoutingSolution(_Strict):
    routes: list[PlannedRoute]  # one per vehicle that has stops, in the problem's order
    dropped: list[DroppedStop]
    travel_s: Seconds
    lateness_s: Seconds
    stats: SolverStats


class TravelTimes(Protocol):
    """Whole seconds between every pair of points for a vehicle type (row: from, column: to)."""

    def matrix(self, points: Sequence[LatLng], vehicle: Vehicle) -> list[list[int]]: ...


@dataclass(frozen=True)
class HaversineTravelTimes:
    """The delivery ETA's model (`models.delivery_rules.travel_s`: haversine x road factor /
    the vehicle type's speed), rounded up to whole seconds."""

    settings: Settings

    def matrix(self, points: Sequence[LatLng], vehicle: Vehicle) -> list[list[int]]:
        return [
            [0 if a == b else math.ceil(travel_s(haversine_m(a, b), vehicle, self.settings)) for b in points]
            for a in points
        ]


def _matrix_problem(problem: RoutingProblem, travel_times: TravelTimes) -> MatrixProblem:
    """Nodes: the stops (node i is `stops[i]`), then the depot when a route starts or ends
    there, then each vehicle's own start, then (open routes) a sink every route ends at for
    free. A node that is no route's start or end would be a visit to the solver."""
    stops, vehicles = problem.stops, problem.vehicles
    points = [s.location.latlng for s in stops]
    depot = len(points)
    if not problem.open_routes or any(v.start is None for v in vehicles):
        points.append(problem.depot.location.latlng)
    start_node = {}
    for k, v in enumerate(vehicles):
        if v.start is not None:
            start_node[k] = len(points)
            points.append(v.start.latlng)
    sink = len(points) if problem.open_routes else depot
    size = len(points) + (1 if problem.open_routes else 0)

    types = list(dict.fromkeys(v.vehicle_type for v in vehicles))
    travel = []
    for vehicle_type in types:
        matrix = travel_times.matrix(points, vehicle_type)
        if problem.open_routes:
            matrix = [[*row, 0] for row in matrix] + [[0] * size]
        travel.append(matrix)

    index = {s.id: i for i, s in enumerate(stops)}
    pairs = [(index[p.pickup], index[p.drop]) for p in problem.pairs]
    demands = [s.demand for s in stops] + [0] * (size - len(stops))
    for pickup, drop in pairs:
        demands[pickup], demands[drop] = demands[drop], -demands[drop]
    horizon = max([v.shift_end_s for v in vehicles] + [s.latest_s for s in stops] + [problem.depot.opens_s])
    slack = horizon if problem.max_lateness_s is None else problem.max_lateness_s
    windows = [(s.earliest_s, min(horizon, s.latest_s + slack)) for s in stops]
    windows += [(0, horizon)] * (size - len(stops))
    due = [s.latest_s for s in stops] + [horizon] * (size - len(stops))
    service = [s.service_s for s in stops] + [0] * (size - len(stops))

    matrix_vehicles = [
        MatrixVehicle(
            start=start_node.get(k, depot),
            end=sink,
            capacity=v.capacity,
            ready=problem.depot.opens_s if v.start is None else 0,
            latest=v.shift_end_s,
            profile=types.index(v.vehicle_type),
        )
        for k, v in enumerate(vehicles)
    ]
    # Serving any one stop costs less than this (travel and lateness are bounded by the
    # horizon, for it and for every stop after it), so a stop is dropped only if no route can
    # take it.
    drop_penalty = (1 + problem.lateness_cost_per_s) * (horizon + 1) * (len(stops) + 2)
    return MatrixProblem(
        travel=travel,
        demands=demands,
        windows=windows,
        service=service,
        vehicles=matrix_vehicles,
        pairs=pairs,
        due=due,
        lateness_weight=problem.lateness_cost_per_s,
        drop_penalty=drop_penalty,
    )


def solve(
    problem: RoutingProblem,
    travel_times: TravelTimes,
    *,
    time_limit_s: float,
    config: SolverConfig = DEFAULT_CONFIG,
    seed: int = 0,
    solution_limit: int | None = None,
) -> RoutingSolution:
    """Plan routes for `problem` with one solver configuration (see `solve_matrix`).

    Arrival times are the earliest the planned order allows (waiting when early); a stop is
    late when it is served after its `latest_s`. Stops that no route serves are listed in
    `dropped` with a `DropReason`; pairs are dropped (and listed) together.
    """
    if not problem.stops:
        stats = SolverStats(
            first_solution_strategy=config.first_solution,
            metaheuristic=config.metaheuristic,
            seed=seed,
            wall_time_s=0.0,
            objective=0,
            status="ROUTING_OPTIMAL",
            time_limit_reached=False,
        )
        return RoutingSolution(routes=[], dropped=[], travel_s=0, lateness_s=0, stats=stats)
    mp = _matrix_problem(problem, travel_times)
    result = solve_matrix(
        mp, time_limit_s=time_limit_s, config=config, seed=seed, solution_limit=solution_limit
    )

    routes = []
    for k, nodes in enumerate(result.routes):
        if not nodes:
            continue
        s = schedule(mp, k, nodes)
        # Without pairs the route's items are on board from the start; with pairs, none are.
        aboard = 0 if mp.pairs else sum(mp.demands[n] for n in nodes)
        visits = []
        for node, arrival in zip(nodes, s.arrivals, strict=True):
            stop = problem.stops[node]
            aboard += mp.demands[node] if mp.pairs else -mp.demands[node]
            visits.append(
                PlannedVisit(
                    stop_id=stop.id,
                    arrival_s=arrival,
                    departure_s=arrival + stop.service_s,
                    lateness_s=max(0, arrival - stop.latest_s),
                    load_after=aboard,
                )
            )
        routes.append(
            PlannedRoute(
                vehicle_id=problem.vehicles[k].id,
                visits=visits,
                start_s=mp.vehicles[k].ready,
                end_s=s.end_time,
                travel_s=s.travel,
                lateness_s=s.lateness,
            )
        )

    pair_of = {node: pair for pair in mp.pairs for node in pair}
    dropped, seen = [], set()
    for node in result.dropped:
        if node in seen:
            continue
        visit = pair_of.get(node, (node,))
        reason = drop_reason(mp, result.routes, visit)
        for n in visit:
            seen.add(n)
            dropped.append(DroppedStop(stop_id=problem.stops[n].id, reason=reason))
    return RoutingSolution(
        routes=routes,
        dropped=dropped,
        travel_s=sum(r.travel_s for r in routes),
        lateness_s=sum(r.lateness_s for r in routes),
        stats=result.stats,
    )


def best_solution(solutions: Iterable[RoutingSolution]) -> RoutingSolution:
    """The best of several runs (a portfolio): fewest dropped stops, then lowest objective."""
    return min(
        solutions,
        key=lambda s: (len(s.dropped), s.stats.objective is None, s.stats.objective or 0),
    )


# ---------------------------------------------------------------- a dispatch trip


def trip_problem(
    start: LatLng,
    store: LatLng,
    drops: Sequence[tuple[uuid.UUID, LatLng]],
    vehicle: Vehicle,
    settings: Settings,
) -> RoutingProblem:
    """One partner's trip as an open route: from `start` to the store (a fixed leg: the route
    opens when they have the orders in hand, one handover later), then every drop, each with
    a handover and a soft window ending `delivery_batch_max_added_delay_seconds` after the
    time it would reach its customer alone. The ETA model is the delivery one
    (`route_etas_s`), so planned and live ETAs agree."""
    handover = math.ceil(settings.delivery_handover_seconds)
    at_store = math.ceil(travel_s(haversine_m(start, store), vehicle, settings)) + handover
    delay = math.ceil(settings.delivery_batch_max_added_delay_seconds)
    stops = [
        RouteStop(
            id=str(order_id),
            location=Point(lat=drop.lat, lng=drop.lng),
            latest_s=at_store + math.ceil(travel_s(haversine_m(store, drop), vehicle, settings)) + delay,
            service_s=handover,
        )
        for order_id, drop in drops
    ]
    return RoutingProblem(
        depot=Depot(location=Point(lat=store.lat, lng=store.lng), opens_s=at_store),
        vehicles=[
            RouteVehicle(
                id="partner", capacity=len(stops), shift_end_s=at_store + 4 * 3600, vehicle_type=vehicle
            )
        ],
        stops=stops,
        open_routes=True,
    )


def trip_route(solution: RoutingSolution) -> TripRoute | None:
    """The optimizer's order and ETAs for a `trip_problem`, or None if it left a drop out."""
    if solution.dropped or len(solution.routes) != 1:
        return None
    visits = solution.routes[0].visits
    return TripRoute(
        order_ids=tuple(uuid.UUID(v.stop_id) for v in visits),
        etas_s=tuple(v.departure_s for v in visits),
        planner="optimizer",
    )


def queue_problem(
    store: LatLng,
    partners: Sequence[tuple[str, LatLng, Vehicle]],
    orders: Sequence[tuple[str, LatLng]],
    settings: Settings,
) -> RoutingProblem:
    """A store's queue over its partners (a what-if plan): every order is a pickup at the
    store (`pickup:<id>`, no service time) before its drop (a handover), each partner an open
    route from where they are carrying at most `delivery_batch_max_orders`. A drop's soft
    window ends `delivery_batch_max_added_delay_seconds` after the earliest any partner could
    bring it alone."""
    handover = math.ceil(settings.delivery_handover_seconds)
    delay = math.ceil(settings.delivery_batch_max_added_delay_seconds)
    here = Point(lat=store.lat, lng=store.lng)
    to_store = min(travel_s(haversine_m(at, store), vehicle, settings) for _, at, vehicle in partners)
    fastest = max(partners, key=lambda p: speed_mps(p[2], settings))[2]
    horizon = 4 * 3600
    stops, pairs = [], []
    for order_id, drop in orders:
        alone = to_store + travel_s(haversine_m(store, drop), fastest, settings)
        stops += [
            RouteStop(id=f"pickup:{order_id}", location=here, demand=0, latest_s=horizon),
            RouteStop(
                id=order_id,
                location=Point(lat=drop.lat, lng=drop.lng),
                latest_s=math.ceil(alone) + delay,
                service_s=handover,
            ),
        ]
        pairs.append(PickupDrop(pickup=f"pickup:{order_id}", drop=order_id))
    return RoutingProblem(
        depot=Depot(location=here),
        vehicles=[
            RouteVehicle(
                id=partner_id,
                start=Point(lat=at.lat, lng=at.lng),
                capacity=settings.delivery_batch_max_orders,
                shift_end_s=horizon,
                vehicle_type=vehicle,
            )
            for partner_id, at, vehicle in partners
        ],
        stops=stops,
        pairs=pairs,
        open_routes=True,
    )


# ---------------------------------------------------------------- Solomon VRPTW instances


@dataclass(frozen=True, slots=True)
class SolomonInstance:
    """Row 0 is the depot; coordinates and times as in the file (integers)."""

    name: str
    vehicles: int
    capacity: int
    x: tuple[int, ...]
    y: tuple[int, ...]
    demand: tuple[int, ...]
    ready: tuple[int, ...]
    due: tuple[int, ...]
    service: tuple[int, ...]


def load_solomon(path: Path) -> SolomonInstance:
    """Parse a Solomon text file (whitespace-separated, CRLF tolerated)."""
    lines = [line.split() for line in path.read_text().splitlines()]
    vehicles, capacity = next((int(ln[0]), int(ln[1])) for ln in lines if len(ln) == 2 and ln[0].isdigit())
    rows = [[int(float(x)) for x in ln] for ln in lines if len(ln) == 7 and ln[0].isdigit()]
    columns = list(zip(*rows, strict=True))
    if list(columns[0]) != list(range(len(rows))):
        raise ValueError(f"{path.name}: customer numbers are not 0..{len(rows) - 1}")
    return SolomonInstance(
        path.stem, vehicles, capacity, columns[1], columns[2], columns[3], columns[4], columns[5], columns[6]
    )


def load_bks(path: Path) -> dict[str, tuple[int, float]]:
    """`bks.csv`: instance -> (vehicles, distance) of the best-known (proven optimal) solution."""
    best = {}
    for line in path.read_text().splitlines()[1:]:
        name, vehicles, distance = line.strip().split(",")
        best[name] = (int(vehicles), float(distance))
    return best


def solomon_problem(instance: SolomonInstance) -> MatrixProblem:
    """The instance as the literature poses it, scaled x10 to integers: arcs are the Euclidean
    distance truncated to one decimal (`floor(10 d)`, exact with integer square roots), travel
    time equals distance, hard windows, closed routes from the depot, no drops."""
    n = len(instance.x)
    matrix = [
        [
            math.isqrt(100 * ((instance.x[i] - instance.x[j]) ** 2 + (instance.y[i] - instance.y[j]) ** 2))
            for j in range(n)
        ]
        for i in range(n)
    ]
    end = 10 * instance.due[0]
    return MatrixProblem(
        travel=[matrix],
        demands=list(instance.demand),
        windows=[(10 * r, 10 * d) for r, d in zip(instance.ready, instance.due, strict=True)],
        service=[10 * s for s in instance.service],
        vehicles=[MatrixVehicle(0, 0, instance.capacity, 10 * instance.ready[0], end)] * instance.vehicles,
    )


class InfeasibleRoutes(ValueError):
    """A claimed Solomon solution breaks a rule (what the checker found first)."""


def check_solomon(instance: SolomonInstance, routes: Sequence[Sequence[int]]) -> float:
    """The distance of `routes` (customer numbers, depot left out), checked from the raw
    instance and nothing else: every customer once, at most the instance's vehicles, capacity,
    every window under the truncated-one-decimal convention (service starts by the due date;
    back at the depot by its due date). Raises `InfeasibleRoutes`."""

    def arc(i: int, j: int) -> int:  # tenths, truncated
        return math.floor(10 * math.hypot(instance.x[i] - instance.x[j], instance.y[i] - instance.y[j]))

    used = [r for r in routes if r]
    if len(used) > instance.vehicles:
        raise InfeasibleRoutes(f"{len(used)} routes, only {instance.vehicles} vehicles")
    visited = sorted(c for r in used for c in r)
    if visited != list(range(1, len(instance.x))):
        raise InfeasibleRoutes("customers are not each visited exactly once")
    total = 0
    for r in used:
        if sum(instance.demand[c] for c in r) > instance.capacity:
            raise InfeasibleRoutes(f"route {list(r)} exceeds the capacity {instance.capacity}")
        t, here = 10 * instance.ready[0], 0
        for c in [*r, 0]:
            total += arc(here, c)
            t = max(t + 10 * instance.service[here] + arc(here, c), 10 * instance.ready[c])
            if t > 10 * instance.due[c]:
                raise InfeasibleRoutes(
                    f"customer {c} served at {t / 10} after its due date {instance.due[c]}"
                )
            here = c
    return total / 10
