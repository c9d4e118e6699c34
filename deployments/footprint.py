"""The memory footprint of a running stack on this machine: the proportional set size (PSS:
each shared page split between the processes that map it, so the figures add up) of every
process of the stack, grouped by role.

The stack is the launcher (`vurksha run`, or any driver given by pid) with everything below it
(Ray's GCS, raylet, dashboard and workers; Serve's controller and replicas; HAProxy; our
actors), and the embedded PostgreSQL and Redis, which daemonize and are found by their data
directory. Linux only: it reads /proc.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    cmdline: str
    cwd: str


def _processes() -> list[Process]:
    out = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            raw = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        try:
            cwd = str((entry / "cwd").readlink())
        except OSError:
            cwd = ""
        # The command name in stat is parenthesized and may hold spaces: ppid follows the last ')'.
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        cmdline = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        out.append(Process(int(entry.name), ppid, cmdline, cwd))
    return out


def pss_bytes(pid: int) -> int | None:
    """None when the process is gone or its memory map is not ours to read."""
    try:
        rollup = (PROC / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return None
    match = re.search(r"^Pss:\s+(\d+) kB", rollup, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def launchers() -> list[int]:
    """Running `vurksha run` processes."""
    return [p.pid for p in _processes() if re.search(r"(^|/)vurksha run\b", p.cmdline)]


def stack_processes(roots: list[int], data_dir: Path) -> list[Process]:
    """The roots, the embedded servers of `data_dir` (PostgreSQL names it in its command
    line, Redis runs in it), and all their descendants."""
    procs = _processes()
    marker = str(data_dir.resolve())
    selected = set(roots) | {p.pid for p in procs if marker in p.cmdline or p.cwd.startswith(marker)}
    children: dict[int, list[int]] = defaultdict(list)
    for p in procs:
        children[p.ppid].append(p.pid)
    todo = list(selected)
    while todo:
        for child in children[todo.pop()]:
            if child not in selected:
                selected.add(child)
                todo.append(child)
    return [p for p in procs if p.pid in selected]


def role(p: Process, roots: list[int]) -> str:
    """What a process is, for grouping: a replica by application and deployment, an actor by
    class, Ray's own daemons, HAProxy, PostgreSQL, Redis or the launcher."""
    cmd = p.cmdline
    if cmd.startswith("ray::ServeReplica:"):
        return "replica " + cmd.removeprefix("ray::ServeReplica:").split(".")[0].split()[0]
    if cmd.startswith("ray::"):
        return "actor " + cmd.removeprefix("ray::").split(".")[0].split()[0]
    # The program: its executable, or the script a Python runs (PostgreSQL's backends retitle
    # themselves "postgres: ...").
    words = cmd.split() or [""]
    program = Path(words[0]).name
    if program.startswith("python"):
        program = Path(next((w for w in words[1:] if not w.startswith("-")), program)).name
    for prefix, name in (
        ("haproxy", "HAProxy"),
        ("postgres", "PostgreSQL"),
        ("redis-server", "Redis"),
        ("gcs_server", "Ray GCS"),
        ("raylet", "Ray raylet"),
        ("dashboard.py", "Ray dashboard"),
        ("monitor.py", "Ray monitors"),
        ("log_monitor.py", "Ray monitors"),
    ):
        if program.startswith(prefix):
            return name
    return "launcher" if p.pid in roots else "other " + program


@dataclass(frozen=True)
class Footprint:
    groups: dict[str, tuple[int, int]]  # role -> (processes, PSS bytes)

    @property
    def total(self) -> int:
        return sum(pss for _, pss in self.groups.values())

    def render(self) -> str:
        lines = [f"{'role':48} {'procs':>5} {'PSS MB':>9}"]
        for name, (n, pss) in sorted(self.groups.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"{name:48} {n:5d} {pss / 2**20:9.1f}")
        n = sum(count for count, _ in self.groups.values())
        lines.append(f"{'total':48} {n:5d} {self.total / 2**20:9.1f}  ({self.total / 1e9:.2f} GB)")
        return "\n".join(lines)


def measure(roots: list[int], data_dir: Path) -> Footprint:
    groups: dict[str, tuple[int, int]] = {}
    for p in stack_processes(roots, data_dir):
        pss = pss_bytes(p.pid)
        if pss is None:
            continue
        name = role(p, roots)
        n, total = groups.get(name, (0, 0))
        groups[name] = (n + 1, total + pss)
    return Footprint(groups)
