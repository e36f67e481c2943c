"""What the per-OS accounting modules (linux_stats, openbsd_stats) return,
and which of them runs here.

Each provides:

    processes(uids) -> list[ProcSample]   every process whose real uid is
                                          in uids (zombies included)
    node() -> NodeSample                  the node as a whole
"""

from __future__ import annotations

import errno
import sys
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class ProcSample:
    pid: int
    ppid: int
    pgid: int
    sid: int
    uid: int               # real uid
    start: str             # proctrack's start token: (pid, start) names it for good
    cpu_ns: int | None     # user + system time; None when the OS no longer says
    rss_bytes: int         # resident
    anon_bytes: int        # resident and anonymous (rss_bytes where unknown)


@dataclass(frozen=True)
class NodeSample:
    cpu_ns: int                  # cumulative non-idle time of all CPUs
    memory_total: int
    memory_usage: int            # in use, page cache included
    memory_working_set: int      # usage less what is cheaply reclaimed
    memory_available: int        # total - working set, as the kubelet does
    memory_rss: int | None       # anonymous memory, where the OS counts it
    boot_time: float             # seconds since the epoch


def current() -> ModuleType:
    if sys.platform.startswith("linux"):
        from pufflet.platform import linux_stats
        return linux_stats
    if sys.platform.startswith("openbsd"):
        from pufflet.platform import openbsd_stats
        return openbsd_stats
    raise OSError(errno.ENOSYS, f"resource accounting is not implemented on {sys.platform}")
