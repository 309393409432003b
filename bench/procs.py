"""Resident memory of a process tree and the machine it runs on, from /proc (Linux)."""

from __future__ import annotations

import os
import platform
import sys
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
