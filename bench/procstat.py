"""CPU time and resident memory of processes, read from /proc."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_ms(pid: int) -> float:
    """utime + stime of one process, in milliseconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: split after its closing one.
    fields = text[text.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) * 1000.0 / CLOCK_TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2:].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def group_cpu_ms(pids: list[int]) -> float:
    return sum(cpu_ms(pid) for pid in pids)


def group_rss_mib(pids: list[int]) -> float:
    return sum(rss_mib(pid) for pid in pids)


def open_fds(pid: int) -> int:
    """How many file descriptors the process has open (entries of /proc/<pid>/fd)."""
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
