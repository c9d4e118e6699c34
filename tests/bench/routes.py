"""Benchmark (not a test): route quality on the 56 Solomon VRPTW instances.

As the literature poses them (hard time windows, closed routes from the depot, at most the
instance's vehicles, no customer dropped), scaled x10 to integers under the truncated
one-decimal convention of `pipelines/data/solomon/SOURCE.md`. Every solver's routes go through
the same independent checker (`models.routing.check_solomon`: each customer once, capacity,
every window, distance recomputed from the coordinates); a drop, a violation or no solution
counts as unsolved. Gap = (distance - best known) / best known, over solved instances.

Solvers, in the same run:
- `ours`: `models.routing.solve_matrix` with `DEFAULT_CONFIG` (one thread), or with
  `--portfolio` the best of `SOLVER_PORTFOLIO` run side by side (one process each; its CPU is
  the sum, its wall time the slowest);
- `ortools-default`: the same model with PATH_CHEAPEST_ARC + GUIDED_LOCAL_SEARCH, one thread;
- `vroom` (pyvroom): the same x10 integer matrix as durations and costs, run once at its own
  speed (no time limit), `--vroom-threads` threads (default 2) at exploration level 5.

Each instance gets `--seconds` of wall time per solver and limit; CPU-seconds are measured in
the process that solves (`time.process_time`, all its threads). `--jobs 2` solves two instances
at once (one per core) to halve the bench's own duration; nothing else should run then.

    python -m tests.bench.routes --seconds 1,10 [--instances C1,R101] [--quick] [--jobs 2]
    python -m tests.bench.routes --sweep --seconds 1 --jobs 2   # the portfolio measurement

Output ends with one line per solver:
`<solver> mean_gap_1s=<pct> mean_gap_10s=<pct> unsolved=<n>` (unsolved: at the longest limit).
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from models.routing import (
    DEFAULT_CONFIG,
    ORTOOLS_DEFAULT_CONFIG,
    SOLVER_PORTFOLIO,
    InfeasibleRoutes,
    SolomonInstance,
    SolverConfig,
    check_solomon,
    load_bks,
    load_solomon,
    solomon_problem,
    solve_matrix,
)
from tests.bench.common import ROOT

SOLOMON = ROOT / "pipelines" / "data" / "solomon"
QUICK = ["C101", "C204", "R101", "R112", "R205", "RC105", "RC207"]
VROOM_EXPLORATION = 5
# The sweep's candidates: every first-solution strategy that suits time windows with OR-Tools'
# recommended metaheuristic, then the other metaheuristics on the two best starts.
SWEEP_FIRST = [
    "PARALLEL_CHEAPEST_INSERTION",
    "LOCAL_CHEAPEST_INSERTION",
    "SEQUENTIAL_CHEAPEST_INSERTION",
    "LOCAL_CHEAPEST_COST_INSERTION",
    "SAVINGS",
    "CHRISTOFIDES",
    "PATH_MOST_CONSTRAINED_ARC",
    "PATH_CHEAPEST_ARC",
]
SWEEP_META = ["SIMULATED_ANNEALING", "TABU_SEARCH", "GREEDY_DESCENT", "ITERATED_LOCAL_SEARCH"]
# ... and guided local search's penalty weight on those two (OR-Tools' default is 0.1).
SWEEP_LAMBDA = [0.2, 0.3, 0.5]


@dataclass(frozen=True)
class Task:
    solver: str  # "vroom" or a SolverConfig label
    instance: str
    seconds: float | None  # None: VROOM, no limit


@dataclass(frozen=True)
class Outcome:
    task: Task
    distance: float | None  # None: unsolved
    vehicles: int
    wall_s: float
    cpu_s: float
    note: str = ""


def _vroom_routes(instance: SolomonInstance, threads: int) -> list[list[int]]:
    import vroom

    problem = solomon_problem(instance)
    matrix = problem.travel[0]
    solver = vroom.Input()
    solver.set_durations_matrix("car", matrix)
    solver.set_costs_matrix("car", matrix)
    for c in range(1, len(instance.x)):
        lo, hi = problem.windows[c]
        solver.add_job(
            vroom.Job(
                id=c,
                location=c,
                default_service=problem.service[c],
                delivery=[instance.demand[c]],
                time_windows=[vroom.TimeWindow(lo, hi)],
            )
        )
    horizon = vroom.TimeWindow(*problem.windows[0])
    for k in range(instance.vehicles):
        solver.add_vehicle(
            vroom.Vehicle(id=k, start=0, end=0, capacity=[instance.capacity], time_window=horizon)
        )
    solution = solver.solve(exploration_level=VROOM_EXPLORATION, nb_threads=threads)
    routes: dict[int, list[int]] = defaultdict(list)
    for step in solution.to_dict()["routes"]:
        for s in step["steps"]:
            if s["type"] == "job":
                routes[step["vehicle"]].append(int(s["id"]))
    return list(routes.values())


def run(task: Task, vroom_threads: int = 2) -> Outcome:
    """Solve one instance with one solver and check the result (runs in a worker process)."""
    instance = load_solomon(SOLOMON / f"{task.instance}.txt")
    cpu, wall = time.process_time(), time.perf_counter()
    note = ""
    if task.solver == "vroom":
        routes: Sequence[Sequence[int]] | None = _vroom_routes(instance, vroom_threads)
    else:
        assert task.seconds is not None
        result = solve_matrix(
            solomon_problem(instance), time_limit_s=task.seconds, config=SolverConfig.of(task.solver)
        )
        routes = result.routes if result.found and not result.dropped else None
        note = "" if result.found else f"no solution ({result.stats.status})"
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if routes is None:
        return Outcome(task, None, 0, wall, cpu, note)
    try:
        distance = check_solomon(instance, routes)
    except InfeasibleRoutes as exc:
        return Outcome(task, None, 0, wall, cpu, f"check failed: {exc}")
    return Outcome(task, distance, sum(1 for r in routes if r), wall, cpu)


def run_all(tasks: Sequence[Task], jobs: int, vroom_threads: int) -> list[Outcome]:
    """All tasks, `jobs` at a time (in submission order), with a progress line each."""
    outcomes = []
    if jobs <= 1:
        results: Iterable[Outcome] = (run(t, vroom_threads) for t in tasks)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=jobs)
        results = pool.map(run, tasks, [vroom_threads] * len(tasks))
    for i, outcome in enumerate(results, 1):
        t = outcome.task
        figure = "unsolved" if outcome.distance is None else f"{outcome.distance:.1f}"
        print(
            f"  [{i}/{len(tasks)}] {t.instance:<6} {t.solver:<52} {t.seconds or '-':>4}s "
            f"{figure:>9} wall {outcome.wall_s:5.2f}s cpu {outcome.cpu_s:5.2f}s {outcome.note}",
            flush=True,
        )
        outcomes.append(outcome)
    if pool is not None:
        pool.shutdown()
    return outcomes


def gap(distance: float | None, best: float) -> float | None:
    return None if distance is None else 100 * (distance - best) / best


def _mean(values: Iterable[float | None]) -> float | None:
    solved = [v for v in values if v is not None]
    return statistics.fmean(solved) if solved else None


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def _combine(outcomes: Sequence[Outcome], name: str) -> Outcome:
    """A portfolio run side by side: the best checked distance, CPU summed, wall the slowest."""
    solved = [o for o in outcomes if o.distance is not None]
    best = min(solved, key=lambda o: o.distance or 0.0) if solved else outcomes[0]
    return Outcome(
        Task(name, best.task.instance, best.task.seconds),
        best.distance,
        best.vehicles,
        max(o.wall_s for o in outcomes),
        sum(o.cpu_s for o in outcomes),
        best.note,
    )


def sweep(names: list[str], seconds: float, jobs: int, bks: dict[str, tuple[int, float]]) -> None:
    """Measure first-solution strategies and metaheuristics: mean gap, unsolved; then how well
    each config complements the best one when run side by side."""

    def measure(configs: list[str]) -> dict[str, dict[str, float | None]]:
        tasks = [Task(c, n, seconds) for c in configs for n in names]
        table: dict[str, dict[str, float | None]] = defaultdict(dict)
        for o in run_all(tasks, jobs, 1):
            table[o.task.solver][o.task.instance] = gap(o.distance, bks[o.task.instance][1])
        return table

    def score(gaps: dict[str, float | None]) -> tuple[int, float]:
        mean = _mean(gaps.values())
        return sum(g is None for g in gaps.values()), float("inf") if mean is None else mean

    def row(label: str, gaps: dict[str, float | None]) -> None:
        unsolved, mean = score(gaps)
        print(f"{label:<62} mean gap {mean:6.2f}%  unsolved {unsolved}")

    table = measure([f"{first}+GUIDED_LOCAL_SEARCH" for first in SWEEP_FIRST])
    firsts = [c.split("+")[0] for c in sorted(table, key=lambda c: score(table[c]))[:2]]
    table |= measure([f"{first}+{meta}" for first in firsts for meta in SWEEP_META])
    table |= measure(
        [f"{first}+GUIDED_LOCAL_SEARCH+lambda={lam:g}" for first in firsts for lam in SWEEP_LAMBDA]
    )
    print(f"\nSweep at {seconds:g} s per instance, {len(names)} instances (one thread per config):")
    for c in sorted(table, key=lambda c: score(table[c])):
        row(c, table[c])
    best = min(table, key=lambda c: score(table[c]))
    print(f"\nbest single: {best}; side by side with it (per-instance best of the two):")
    for c in sorted(table, key=lambda c: score(table[c])):
        if c != best:
            pair = {
                n: min((g for g in (table[best][n], table[c][n]) if g is not None), default=None)
                for n in names
            }
            row(f"+ {c}", pair)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", default="1,10", help="per-instance time limits, comma-separated")
    parser.add_argument("--instances", default="", help="comma-separated name prefixes (C1,R101,...)")
    parser.add_argument(
        "--quick", action="store_true", help=f"1 s on {len(QUICK)} instances: {','.join(QUICK)}"
    )
    parser.add_argument("--solvers", default="ours,ortools-default,vroom")
    parser.add_argument("--portfolio", action="store_true", help="ours = SOLVER_PORTFOLIO side by side")
    parser.add_argument("--jobs", type=int, default=1, help="processes solving at once")
    parser.add_argument("--vroom-threads", type=int, default=2)
    parser.add_argument("--sweep", action="store_true", help="measure configurations for the portfolio")
    args = parser.parse_args()

    bks = load_bks(SOLOMON / "bks.csv")
    names = sorted(bks)
    if args.quick:
        names, args.seconds = QUICK, "1"
    if args.instances:
        prefixes = tuple(p.strip().upper() for p in args.instances.split(","))
        names = [n for n in names if n.startswith(prefixes)]
    limits = [float(s) for s in args.seconds.split(",")]
    print(
        f"Solomon VRPTW: {len(names)} instances, limits {limits} s, {args.jobs} job(s) at once, "
        f"OR-Tools {_ortools_version()}, Python {platform.python_version()}",
        flush=True,
    )
    if args.sweep:
        sweep(names, limits[0], args.jobs, bks)
        return

    solvers = [s.strip() for s in args.solvers.split(",")]
    ours = [c.label for c in SOLVER_PORTFOLIO] if args.portfolio else [DEFAULT_CONFIG.label]
    label = {ORTOOLS_DEFAULT_CONFIG.label: "ortools-default"}
    tasks = []
    for seconds in limits:
        for n in names:
            if "ours" in solvers:
                tasks += [Task(c, n, seconds) for c in ours]
            if "ortools-default" in solvers:
                tasks.append(Task(ORTOOLS_DEFAULT_CONFIG.label, n, seconds))
    if "vroom" in solvers:
        tasks += [Task("vroom", n, None) for n in names]
    print(
        f"ours = {' | '.join(ours)}; vroom: {args.vroom_threads} threads, exploration level {VROOM_EXPLORATION}"
    )
    outcomes = run_all(tasks, args.jobs, args.vroom_threads)

    # (solver, limit) -> instance -> outcome; `ours` and the baseline may share a config.
    results: dict[tuple[str, float | None], dict[str, Outcome]] = defaultdict(dict)
    by_ours: dict[tuple[float | None, str], list[Outcome]] = defaultdict(list)
    for o in outcomes:
        t = o.task
        if t.solver in ours and "ours" in solvers:
            by_ours[(t.seconds, t.instance)].append(o)
        if t.solver in label and "ortools-default" in solvers:
            results[("ortools-default", t.seconds)][t.instance] = o
        if t.solver == "vroom":
            results[("vroom", None)][t.instance] = o
    for (limit, instance), group in by_ours.items():
        results[("ours", limit)][instance] = _combine(group, "ours")

    columns = [(s, lim) for s in solvers for lim in ([None] if s == "vroom" else limits)]
    print("\ngap to best known % (vehicles used; best known's in brackets); '-' unsolved")
    print(
        f"{'instance':<8} {'bks':>8} "
        + " ".join(f"{s + ('' if lim is None else f'@{lim:g}s'):>22}" for s, lim in columns)
    )
    for n in names:
        cells = []
        for col in columns:
            o = results[col][n]
            g = gap(o.distance, bks[n][1])
            cells.append(f"{'-' if g is None else f'{g:.2f} ({o.vehicles})':>22}")
        print(f"{n:<8} {bks[n][1]:>8.1f} ({bks[n][0]:>2}) " + " ".join(cells))

    print()
    for col in columns:
        row = results[col]
        gaps = [gap(o.distance, bks[n][1]) for n, o in row.items()]
        cpu = sum(o.cpu_s for o in row.values())
        wall = sum(o.wall_s for o in row.values())
        print(
            f"{col[0]:<16} {'once' if col[1] is None else f'{col[1]:g} s':>5}: mean gap {_pct(_mean(gaps))} "
            f"over {sum(g is not None for g in gaps)} solved, {sum(g is None for g in gaps)} unsolved; "
            f"mean vehicles {_mean(o.vehicles if o.distance else None for o in row.values()) or 0:.2f}; "
            f"wall {wall:.1f} s, CPU {cpu:.1f} s ({cpu / len(row):.2f} s per instance)"
        )
    usage = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        f"(whole bench CPU, this process and its workers: {sum(u.ru_utime + u.ru_stime for u in usage):.1f} s)"
    )
    print()
    for s in solvers:
        if s == "vroom":
            row = results[("vroom", None)]
            once = _pct(_mean(gap(o.distance, bks[n][1]) for n, o in row.items()))
            unsolved = sum(o.distance is None for o in row.values())
            mean_time = statistics.fmean(o.wall_s for o in row.values())
            print(
                f"vroom mean_gap_1s={once} mean_gap_10s={once} unsolved={unsolved} mean_time_s={mean_time:.2f}"
            )
            continue
        by_limit = {
            lim: _pct(_mean(gap(o.distance, bks[n][1]) for n, o in results[(s, lim)].items()))
            for lim in limits
        }
        unsolved = sum(o.distance is None for o in results[(s, max(limits))].values())
        print(
            f"{s} mean_gap_1s={by_limit.get(1.0, 'n/a')} mean_gap_10s={by_limit.get(10.0, 'n/a')} unsolved={unsolved}"
        )


def _ortools_version() -> str:
    import ortools

    return str(ortools.__version__)


if __name__ == "__main__":
    main()
