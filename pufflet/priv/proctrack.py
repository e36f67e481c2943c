"""Which container processes are still ours, and how they ended.

Every container process is recorded as (pid, start token): the pid is
what we signal, the start token (read from the OS: platform/linux_proc,
platform/openbsd_proc) is what makes sure the pid still names the process
we started, since a pid is recycled once its process is reaped. After a
pufflet restart the parent reloads those pairs from its state and
re-adopts each process whose token still matches.

Exits are learnt from one fd a single-threaded selector loop registers
(ProcessWatcher.fileno()): an epoll of pidfds on Linux, a kqueue on
OpenBSD. It covers both kinds of process:

- our own children (spawned by this parent): the notification wakes us,
  waitpid(WNOHANG) reaps the zombie and gives the exit status. No SIGCHLD
  handler is needed: a handler would need the process-wide wakeup fd,
  which the loop may already use for other signals.
- adopted processes (started by a previous pufflet, now children of
  init): they cannot be waited for. OpenBSD's kqueue still hands us their
  exit status; Linux cannot, and the reason says so.
"""

from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass
from types import ModuleType

__all__ = ["Exited", "ProcessWatcher", "start_time", "is_same", "decode_status"]


def _platform() -> ModuleType:
    if sys.platform.startswith("linux"):
        from pufflet.platform import linux_proc
        return linux_proc
    if sys.platform.startswith("openbsd"):
        from pufflet.platform import openbsd_proc
        return openbsd_proc
    raise OSError(errno.ENOSYS, f"process tracking is not implemented on {sys.platform}")


def start_time(pid: int) -> str | None:
    """The start token of a live or zombie process; None if pid is free."""
    return _platform().start_time(pid)


def is_same(pid: int, token: str) -> bool:
    """Whether pid still names the process that had this start token."""
    plat = _platform()
    current = plat.start_time(pid)
    return current is not None and plat.same_start(token, current)


def decode_status(status: int) -> tuple[int | None, int | None]:
    """(exit code, signal) of a wait(2) status. The encoding (low 7 bits
    the signal, the next 8 the code) is the same on Linux and OpenBSD and
    is what OpenBSD's kqueue stores, so this is decoded by hand rather
    than by os.W* of the system the tests run on."""
    sig = status & 0x7F
    if sig == 0:
        return (status >> 8) & 0xFF, None
    if sig == 0x7F:          # stopped, not ended: never reported here
        return None, None
    return None, sig


@dataclass(frozen=True)
class Exited:
    pid: int
    start_time: str
    status: int | None       # the wait(2) status; None when it cannot be known
    reason: str              # why status is None ("" when it is known)

    @property
    def exit_code(self) -> int | None:
        """The container's exitCode as the kubelet reports it: the code,
        or 128 + the signal for a process killed by one."""
        if self.status is None:
            return None
        code, sig = decode_status(self.status)
        return code if sig is None else 128 + sig

    @property
    def signal(self) -> int | None:
        return None if self.status is None else decode_status(self.status)[1]


GONE_BEFORE_WATCH = ("exit status unknown: the process had ended before pufflet "
                     "watched it again after a restart")
NOT_SAME = ("exit status unknown: the pid now belongs to another process (or "
            "none), so ours ended while pufflet was not running")
REAPED_ELSEWHERE = "exit status unknown: the process was reaped by someone else"


class ProcessWatcher:
    """Exit notification for container processes, for one selector loop.

        w.watch(started.pid, started.start_time, own_child=True)
        sel.register(w.fileno(), EVENT_READ)
        ... when readable (or on SIGCHLD, or from time to time):
        for ex in w.reap(): ...

    reap() never blocks."""

    def __init__(self, notifier=None) -> None:
        self._plat = _platform() if notifier is None else None
        self._notifier = notifier if notifier is not None else self._plat.ExitNotifier()
        self._watched: dict[int, tuple[str, bool]] = {}   # pid -> (token, own child)
        self._done: list[Exited] = []

    def fileno(self) -> int:
        return self._notifier.fileno()

    def watch(self, pid: int, start_time: str, own_child: bool) -> None:
        """Follow pid until it ends. An adopted process is first checked
        against its start token; if it is no longer there, or the pid is
        someone else's, its end is reported by the next reap()."""
        if pid <= 0:
            raise ValueError(f"bad pid {pid}")
        if pid in self._watched:
            return
        # Register before checking identity: once the notification is set
        # up it follows the process that held the pid at that moment, so a
        # token that still matches afterwards means that process is ours.
        registered = self._notifier.add(pid)
        if own_child:
            # Still a zombie at worst (we have not reaped it): reap() finds
            # it with waitpid whether or not the notifier took it.
            self._watched[pid] = (start_time, True)
            return
        if not registered:
            self._done.append(Exited(pid, start_time, None, GONE_BEFORE_WATCH))
            return
        plat = self._plat or _platform()
        current = plat.start_time(pid)
        if current is None or not plat.same_start(start_time, current):
            self._notifier.remove(pid)
            self._done.append(Exited(pid, start_time, None, NOT_SAME))
            return
        self._watched[pid] = (start_time, False)

    def unwatch(self, pid: int) -> None:
        """Stop following pid (an own child stays unreaped: the caller
        takes that over)."""
        if self._watched.pop(pid, None) is not None:
            self._notifier.remove(pid)

    def watching(self) -> list[int]:
        return sorted(self._watched)

    def reap(self) -> list[Exited]:
        out, self._done = self._done, []
        for pid, status in self._notifier.ready():
            entry = self._watched.get(pid)
            if entry is None:
                continue
            token, own = entry
            if own:
                continue            # waitpid below gives the real status
            del self._watched[pid]
            reason = "" if status is not None else self._adopted_reason()
            out.append(Exited(pid, token, status, reason))
        # Own children: cheap to ask each one, and it also catches an exit
        # the notifier could not register (OpenBSD refuses exiting ones).
        for pid, (token, own) in list(self._watched.items()):
            if not own:
                continue
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got, status = pid, None
            if got == 0:
                continue
            del self._watched[pid]
            self._notifier.remove(pid)
            out.append(Exited(pid, token, status,
                              "" if status is not None else REAPED_ELSEWHERE))
        return out

    def _adopted_reason(self) -> str:
        plat = self._plat or _platform()
        return plat.ADOPTED_REASON or "exit status unknown"

    def close(self) -> None:
        self._watched.clear()
        self._notifier.close()
