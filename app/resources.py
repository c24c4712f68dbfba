"""What a process may use and how it holds memory: usable cores, garbage-collector tuning, RSS.

Shared by the front and the model workers (and by benchmarks, to size their load).
"""

from __future__ import annotations

import gc
import math
import os
from pathlib import Path

GC_YOUNG_THRESHOLD = 10_000  # net new container objects between young collections (see tune_gc)


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by the cgroup CPU quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), or None."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """The cores this process may use: its CPU affinity, capped by the cgroup quota (rounded down,
    at least 1: a 1.5-CPU quota throttles a second busy process)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, math.floor(limit))
    return max(1, cpus)


def tune_gc() -> None:
    """Set the garbage collector up for serving; call once loading is done.

    * Put everything loaded so far (torch, spaCy, the vocabulary, the web framework: hundreds of
      thousands of long-lived objects) out of its reach (``gc.freeze``). Without it every full
      collection walks them all: in the front that stopped the event loop for ~150 ms several times
      a minute under load (measured), which was the worst of the latency tail.
    * Collect the young generation after 10,000 net new container objects instead of 700: the front
      makes and frees many short-lived ones per request, and at 700 it ran ~50 young collections a
      second (~1.5 % of a core); at 10,000, about one in 15 s at 64 clients (2.7 ms), and the front's
      CPU per request fell ~13 % (measured). Objects made later are still collected as usual.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def resident_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process, from /proc (0 if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
