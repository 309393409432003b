"""Resident memory and CPU time of process trees and the machine they run on, from /proc
(Linux)."""

from __future__ import annotations

import itertools
import os
import platform
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (pool children, the multiprocessing tracker)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # Field 4 (ppid) comes after the command name, which may hold spaces and parentheses.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def rss_bytes(pid: int) -> int:
    """VmRSS of one process, 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss_bytes(pid: int) -> int:
    """Sum of VmRSS over the tree: shared pages count once per process (an upper bound)."""
    return sum(rss_bytes(p) for p in descendants(pid))


def machine() -> str:
    """One line naming the machine, for the table."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f", {int(line.split()[1]) / 1024 / 1024:.0f} GiB"
                break
    except OSError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load avg {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs ({cpu}){memory}, {platform.system()} {platform.release()}, "
        f"Python {sys.version.split()[0]}{load}"
    )


def _cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime of one process (its own and its reaped children's), 0 if
    it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    # After the command: state is field 3; utime, stime, cutime, cstime are fields 14-17.
    return sum(int(f) for f in fields[11:15])


def tree_cpu_seconds(pids: list[int]) -> float:
    """CPU time used so far by these processes, their live descendants and the descendants they
    reaped (a server's exited connections count in its cutime)."""
    ticks = sum(_cpu_ticks(p) for pid in pids for p in descendants(pid))
    return ticks / os.sysconf("SC_CLK_TCK")


# --- CPU accounting by party (issue #16 item 5) --------------------------------------------
#
# One walk of /proc reads every process's stat file once: its parent, its CPU ticks (own and
# reaped children's) and its resident pages. Each process is charged to the nearest ancestor
# (itself included) that is a party's root; the machine's busy time comes from /proc/stat, and
# what no party used is "rest of the machine" (other benchmarks, other sessions, the kernel's
# threads). Ticks are 1/CLK_TCK s (10 ms); a window of a few seconds reads to about 1%.


@dataclass(frozen=True)
class ProcStat:
    ppid: int
    #: utime + stime
    ticks: int
    #: cutime + cstime: the CPU of the children this process waited for (a server's exited
    #: connections)
    child_ticks: int
    rss_pages: int


def snapshot() -> dict[int, ProcStat]:
    """Every process's /proc/<pid>/stat, read once."""
    found: dict[int, ProcStat] = {}
    for name in (e.name for e in os.scandir("/proc")):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                raw = stat.read()
        except OSError:
            continue
        # After the command, which may hold spaces and parentheses: state is field 3, ppid 4,
        # utime..cstime 14-17, rss 24.
        fields = raw.rsplit(b")", 1)[1].split()
        found[int(name)] = ProcStat(
            ppid=int(fields[1]),
            ticks=int(fields[11]) + int(fields[12]),
            child_ticks=int(fields[13]) + int(fields[14]),
            rss_pages=int(fields[21]),
        )
    return found


def machine_busy_ticks() -> int:
    """Ticks every CPU of the machine spent busy (all but idle and iowait) since boot."""
    with open("/proc/stat") as stat:
        fields = [int(f) for f in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    return sum(fields[:8]) - fields[3] - fields[4]


def tree(snap: Mapping[int, ProcStat], root: int) -> list[int]:
    """``root`` and its live descendants in ``snap``."""
    children: dict[int, list[int]] = {}
    for pid, stat in snap.items():
        children.setdefault(stat.ppid, []).append(pid)
    found, todo = [], [root] if root in snap else []
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, ()))
    return found


def party_ticks(
    snap: Mapping[int, ProcStat],
    roots: Mapping[int, str],
    own_only: Iterable[int] = (),
    parties: Iterable[str] = (),
) -> dict[str, int]:
    """CPU ticks per party: every process is charged to the nearest of its ancestors (itself
    included) in ``roots`` (pid -> party), with the children it reaped, except the processes in
    ``own_only`` (a parent whose reaped children belong to another party or to another time,
    e.g. the bench process, which reaps whole worker runs). ``parties``: also present at 0 when
    no process belongs to them."""
    skip_children = set(own_only)
    used = dict.fromkeys([*parties, *roots.values()], 0)
    for pid, stat in snap.items():
        current, seen = pid, 0
        while current not in roots and current in snap and seen < 64:
            current, seen = snap[current].ppid, seen + 1
        party = roots.get(current)
        if party is not None:
            used[party] += stat.ticks + (0 if pid in skip_children else stat.child_ticks)
    return used


@dataclass(frozen=True)
class CpuSample:
    #: time.time() when the sample was taken
    at: float
    #: CPU seconds per party since the process started
    parties: Mapping[str, float]
    #: busy CPU seconds of the whole machine since boot
    machine: float


def cpu_sample(
    snap: Mapping[int, ProcStat],
    roots: Mapping[int, str],
    own_only: Iterable[int] = (),
    parties: Iterable[str] = (),
) -> CpuSample:
    """The parties' CPU seconds in ``snap`` (see :func:`party_ticks`) and the machine's."""
    tick = os.sysconf("SC_CLK_TCK")
    at = time.time()
    machine_seconds = machine_busy_ticks() / tick
    used = party_ticks(snap, roots, own_only, parties)
    return CpuSample(at, {k: v / tick for k, v in used.items()}, machine_seconds)


REST = "rest of the machine"
IDLE = "idle"


@dataclass(frozen=True)
class CpuWindow:
    """CPU seconds each party used in a window of wall time, the whole machine's busy CPU
    seconds, and the events the window committed."""

    seconds: float
    cores: int
    parties: Mapping[str, float]
    machine: float
    events: int = 0

    def shares(self) -> dict[str, float]:
        """Each party's share of the machine's cores over the window (1.0 = every core busy
        all the time), then the rest of the machine and idle; they sum to 1."""
        capacity = self.seconds * self.cores
        if capacity <= 0:
            return {}
        found = {k: v / capacity for k, v in self.parties.items()}
        found[REST] = max(0.0, self.machine - sum(self.parties.values())) / capacity
        found[IDLE] = max(0.0, 1.0 - self.machine / capacity)
        return found

    def per_event_us(self, party: str) -> float:
        return self.parties.get(party, 0.0) / self.events * 1e6 if self.events else 0.0


def _at(samples: Sequence[CpuSample], when: float) -> CpuSample:
    """The sample at ``when``, linearly between the two around it (the first or last outside
    the samples' span)."""
    if when <= samples[0].at:
        return samples[0]
    for before, after in itertools.pairwise(samples):
        if before.at <= when <= after.at:
            span = after.at - before.at
            part = (when - before.at) / span if span > 0 else 1.0
            parties = {
                k: v + (after.parties.get(k, v) - v) * part for k, v in before.parties.items()
            }
            machine = before.machine + (after.machine - before.machine) * part
            return CpuSample(when, parties, machine)
    return samples[-1]


def cpu_window(
    samples: Sequence[CpuSample], start: float, end: float, events: int = 0
) -> CpuWindow:
    """What each party used between ``start`` and ``end`` (time.time()), from samples taken
    around them."""
    if not samples or end <= start:
        raise ValueError("no samples, or an empty window")
    first, last = _at(samples, start), _at(samples, end)
    parties = {k: max(0.0, last.parties.get(k, 0.0) - v) for k, v in first.parties.items()}
    return CpuWindow(
        seconds=end - start,
        cores=os.cpu_count() or 1,
        parties=parties,
        machine=max(0.0, last.machine - first.machine),
        events=events,
    )
