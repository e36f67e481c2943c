"""Linux process identity and exit notification: /proc and pidfd_open(2).

Identity: a pid alone names a process only until it is reaped; then the
number is free for the next fork. What never repeats within one boot is
(pid, start time), and proc(5) gives the start time as field 22 of
/proc/<pid>/stat, "starttime: the time the process started after system
boot, in clock ticks". Joined with the boot id (/proc/sys/kernel/random/
boot_id, new at every boot) it names one process for good, across a
pufflet restart and across reboots.

Exit: pidfd_open(2) (Linux 5.3) gives an fd that "becomes readable when
the process terminates", for any process, not only our children. But the
exit status is reported only to the parent through wait(2); for a process
we re-adopted after a restart the parent is now init (or a subreaper), so
its status cannot be known here.
"""

from __future__ import annotations

import errno
import os
import select

# Why an adopted process's status is missing; shown in the pod's status.
ADOPTED_REASON = ("exit status unknown: the process was re-adopted after a "
                  "pufflet restart and Linux reports exit status only to a "
                  "process's parent")

_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str:
    with open(_BOOT_ID) as f:
        return f.read().strip()


def parse_stat(text: str) -> tuple[str, int]:
    """(state, starttime) from the text of /proc/<pid>/stat.

    Field 2 is the command name in parentheses and may itself contain
    spaces and parentheses, so fields are counted from the last ')':
    after it come field 3 (state) onwards; starttime is field 22."""
    rest = text[text.rindex(")") + 2:].split()
    return rest[0], int(rest[22 - 3])


def start_time(pid: int) -> str | None:
    """"linux:<boot id>:<starttime ticks>" for a live (or zombie)
    process, None when there is no such process."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    _, ticks = parse_stat(text)
    return f"linux:{boot_id()}:{ticks}"


def same_start(recorded: str, current: str) -> bool:
    return recorded == current


class ExitNotifier:
    """One epoll fd over a pidfd per watched process: readable when any of
    them has exited, so a selector loop registers a single fd."""

    status_known = False   # exit status comes only from waitpid

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._fds: dict[int, int] = {}      # pid -> pidfd
        self._pids: dict[int, int] = {}     # pidfd -> pid

    def fileno(self) -> int:
        return self._ep.fileno()

    def add(self, pid: int) -> bool:
        """Watch pid; False when it is already gone (reaped)."""
        if pid in self._fds:
            return True
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        self._fds[pid] = fd
        self._pids[fd] = pid
        self._ep.register(fd, select.EPOLLIN)
        return True

    def remove(self, pid: int) -> None:
        fd = self._fds.pop(pid, None)
        if fd is None:
            return
        del self._pids[fd]
        try:
            self._ep.unregister(fd)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise
        os.close(fd)

    def ready(self) -> list[tuple[int, int | None]]:
        """(pid, None) for each watched process that has exited; each is
        reported once and forgotten."""
        out = []
        for fd, _ in self._ep.poll(0):
            pid = self._pids.get(fd)
            if pid is not None:
                self.remove(pid)
                out.append((pid, None))
        return out

    def close(self) -> None:
        for pid in list(self._fds):
            self.remove(pid)
        self._ep.close()
