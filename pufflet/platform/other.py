"""Any other POSIX system: no sandbox, facts from what POSIX offers."""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Sequence

from pufflet.platform import SandboxUnavailable, check_paths, fs_facts, uname_facts


def sandbox(paths: Sequence[tuple[str, str]], promises: str,
            execpromises: str | None = None) -> None:
    check_paths(paths)
    raise SandboxUnavailable(f"no sandbox on {sys.platform}")


def _sysconf(name: str) -> int:
    try:
        return max(os.sysconf(name), 0)
    except (ValueError, OSError):
        return 0


def node_facts(state_dir: str) -> dict:
    u = os.uname()
    facts = uname_facts(u)
    facts["os_image"] = f"{u.sysname} {u.release}"
    facts["cpus"] = _sysconf("SC_NPROCESSORS_ONLN") or os.cpu_count() or 1
    # SC_PHYS_PAGES is not POSIX but most systems have it; 0 when unknown.
    facts["memory_bytes"] = _sysconf("SC_PHYS_PAGES") * _sysconf("SC_PAGE_SIZE")
    facts["boot_id"] = ""
    facts["machine_id"] = ""
    facts.update(fs_facts(state_dir))
    # SC_AVPHYS_PAGES (free pages, caches not counted) is the closest
    # portable figure; processes and their limit are unknown here: 0, so
    # no PID pressure is ever reported.
    facts["memory_available_bytes"] = _sysconf("SC_AVPHYS_PAGES") * _sysconf("SC_PAGE_SIZE")
    facts["processes"] = 0
    facts["max_processes"] = 0
    return facts


def set_title(name: str) -> None:
    # FreeBSD, NetBSD and DragonFly have setproctitle(3) in libc too.
    try:
        fn = ctypes.CDLL(None).setproctitle
    except (AttributeError, OSError):
        return
    fn.restype = None
    fn(b"%s", name.encode("utf-8", "replace"))
