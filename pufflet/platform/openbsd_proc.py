"""OpenBSD process identity and exit notification: sysctl(2) KERN_PROC and
kqueue(2) EVFILT_PROC.

Identity: sysctl(2) {CTL_KERN, KERN_PROC, KERN_PROC_PID, pid,
sizeof(struct kinfo_proc), 1} returns the process's struct kinfo_proc
(<sys/sysctl.h>), zombies included; p_ustart_sec/p_ustart_usec is its start
time. The kernel computes that as boot time + start uptime at the moment
of the query, so a clock step moves it; kern.boottime moves with it, and
their difference (the uptime at which the process started, in
microseconds) does not. That difference is the start token: pids are
randomised on OpenBSD, so (pid, start uptime to the microsecond) never
names two processes, not even across a reboot.

Exit: kqueue(2) EVFILT_PROC with NOTE_EXIT works for any process we may
see, not only our children, and "the exit status will be stored in data"
(the wait(2) status, W_EXITCODE(xexit, xsig) in kern_event.c filt_proc).
So on OpenBSD even a container re-adopted after a restart reports how it
ended. A process that has already exited cannot be registered (ESRCH).

The structs are declared with ctypes for LP64 (amd64, arm64, the
platforms pufflet supports); everything that calls libc takes an optional
`libc` so tests on Linux can check the exact calls (as platform/openbsd.py
does). The standard library's select.kqueue would also do, but exists only
on BSD builds of Python, so its use could not be tested anywhere else.
"""

from __future__ import annotations

import ctypes
import errno
import os

from pufflet.platform import openbsd

ADOPTED_REASON = ""   # the status is known, nothing to explain

# ---- sysctl(2) KERN_PROC -------------------------------------------------

# <sys/sysctl.h>: CTL_KERN 1, KERN_PROC 66, KERN_PROC_PID 1.
CTL_KERN = 1
KERN_PROC = 66
KERN_PROC_PID = 1
# <sys/proc.h>: p_stat of a process that has exited and not been reaped.
SZOMB = 5


class KinfoProc(ctypes.Structure):
    """The head of struct kinfo_proc (<sys/sysctl.h>), up to the start
    time. Every member has a fixed width there ("so that it can be used by
    both 32 and 64 bit binaries"), so the offsets are the same on every
    platform. sysctl_doproc() copies out only elem_size bytes, and any
    elem_size up to the full struct is accepted, so asking for this head
    keeps working when later releases add members at the end."""
    _fields_ = [
        ("p_forw", ctypes.c_uint64), ("p_back", ctypes.c_uint64),
        ("p_paddr", ctypes.c_uint64), ("p_addr", ctypes.c_uint64),
        ("p_fd", ctypes.c_uint64), ("p_stats", ctypes.c_uint64),
        ("p_limit", ctypes.c_uint64), ("p_vmspace", ctypes.c_uint64),
        ("p_sigacts", ctypes.c_uint64), ("p_sess", ctypes.c_uint64),
        ("p_tsess", ctypes.c_uint64), ("p_ru", ctypes.c_uint64),
        ("p_eflag", ctypes.c_int32), ("p_exitsig", ctypes.c_int32),
        ("p_flag", ctypes.c_int32), ("p_pid", ctypes.c_int32),
        ("p_ppid", ctypes.c_int32), ("p_sid", ctypes.c_int32),
        ("p__pgid", ctypes.c_int32), ("p_tpgid", ctypes.c_int32),
        ("p_uid", ctypes.c_uint32), ("p_ruid", ctypes.c_uint32),
        ("p_gid", ctypes.c_uint32), ("p_rgid", ctypes.c_uint32),
        ("p_groups", ctypes.c_uint32 * 16),            # KI_NGROUPS
        ("p_ngroups", ctypes.c_int16), ("p_jobc", ctypes.c_int16),
        ("p_tdev", ctypes.c_uint32),
        ("p_estcpu", ctypes.c_uint32), ("p_rtime_sec", ctypes.c_uint32),
        ("p_rtime_usec", ctypes.c_uint32), ("p_cpticks", ctypes.c_int32),
        ("p_pctcpu", ctypes.c_uint32), ("p_swtime", ctypes.c_uint32),
        ("p_slptime", ctypes.c_uint32), ("p_schedflags", ctypes.c_int32),
        ("p_uticks", ctypes.c_uint64), ("p_sticks", ctypes.c_uint64),
        ("p_iticks", ctypes.c_uint64),
        ("p_tracep", ctypes.c_uint64), ("p_traceflag", ctypes.c_int32),
        ("p_holdcnt", ctypes.c_int32),
        ("p_siglist", ctypes.c_int32), ("p_sigmask", ctypes.c_uint32),
        ("p_sigignore", ctypes.c_uint32), ("p_sigcatch", ctypes.c_uint32),
        ("p_stat", ctypes.c_int8), ("p_priority", ctypes.c_uint8),
        ("p_usrpri", ctypes.c_uint8), ("p_nice", ctypes.c_uint8),
        ("p_xstat", ctypes.c_uint16), ("p_acflag", ctypes.c_uint16),
        ("p_comm", ctypes.c_char * 24),                # KI_MAXCOMLEN
        ("p_wmesg", ctypes.c_char * 8),                # KI_WMESGLEN
        ("p_wchan", ctypes.c_uint64),
        ("p_login", ctypes.c_char * 32),               # KI_MAXLOGNAME
        ("p_vm_rssize", ctypes.c_int32), ("p_vm_tsize", ctypes.c_int32),
        ("p_vm_dsize", ctypes.c_int32), ("p_vm_ssize", ctypes.c_int32),
        ("p_uvalid", ctypes.c_int64),
        ("p_ustart_sec", ctypes.c_uint64),
        ("p_ustart_usec", ctypes.c_uint32),
        ("p_uutime_sec", ctypes.c_uint32),   # ends the head on an 8-byte boundary
    ]


def proc_mib(pid: int) -> tuple[int, ...]:
    return (CTL_KERN, KERN_PROC, KERN_PROC_PID, pid, ctypes.sizeof(KinfoProc), 1)


def kinfo_proc(pid: int, *, libc=None) -> KinfoProc | None:
    """The kinfo_proc head of pid, None when there is no such process."""
    libc = libc if libc is not None else openbsd._libc()
    fn = openbsd._func(libc, "sysctl", ctypes.c_int,
                       [ctypes.POINTER(ctypes.c_int), ctypes.c_uint,
                        ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                        ctypes.c_void_p, ctypes.c_size_t])
    mib = proc_mib(pid)
    cmib = (ctypes.c_int * len(mib))(*mib)
    kp = KinfoProc()
    size = ctypes.c_size_t(ctypes.sizeof(kp))
    if fn(cmib, len(mib), ctypes.byref(kp), ctypes.pointer(size), None, 0) == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"sysctl kern.proc.pid.{pid}: {os.strerror(err)}")
    # No match is not an error: the kernel copies out nothing.
    if size.value < ctypes.sizeof(kp) or kp.p_pid != pid:
        return None
    return kp


def start_token(kp: KinfoProc, boot_sec: int, boot_usec: int) -> str:
    up = (kp.p_ustart_sec * 1_000_000 + kp.p_ustart_usec
          - boot_sec * 1_000_000 - boot_usec)
    return f"openbsd:{up}"


def start_time(pid: int, *, libc=None) -> str | None:
    if pid <= 0:
        return None
    kp = kinfo_proc(pid, libc=libc)
    if kp is None:
        return None
    return start_token(kp, *openbsd.boottime(libc=libc))


def same_start(recorded: str, current: str) -> bool:
    """Equal up to one microsecond: the two sysctl values are truncated
    to microseconds separately, so a clock step between the start and now
    can move their difference by one."""
    try:
        a = int(recorded.removeprefix("openbsd:"))
        b = int(current.removeprefix("openbsd:"))
    except ValueError:
        return False
    return recorded.startswith("openbsd:") and abs(a - b) <= 1


# ---- kqueue(2) -----------------------------------------------------------

# <sys/event.h>
EVFILT_PROC = -5
EV_ADD = 0x0001
EV_DELETE = 0x0002
EV_ENABLE = 0x0004
EV_ONESHOT = 0x0010
EV_ERROR = 0x4000
EV_EOF = 0x8000
NOTE_EXIT = 0x80000000


class Kevent(ctypes.Structure):
    """struct kevent (<sys/event.h>, OpenBSD >= 6.5 where data became
    __int64_t): 32 bytes on LP64."""
    _fields_ = [("ident", ctypes.c_size_t),     # __uintptr_t
                ("filter", ctypes.c_short),
                ("flags", ctypes.c_ushort),
                ("fflags", ctypes.c_uint),
                ("data", ctypes.c_int64),
                ("udata", ctypes.c_void_p)]


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_long)]


def exit_change(pid: int, delete: bool = False) -> Kevent:
    """The change that asks for pid's exit (kqueue(2): "NOTE_EXIT The
    process has exited. The exit status will be stored in data."), or
    drops that request. NOTE_EXIT knotes are one-shot by themselves."""
    return Kevent(ident=pid, filter=EVFILT_PROC,
                  flags=EV_DELETE if delete else EV_ADD | EV_ENABLE,
                  fflags=NOTE_EXIT, data=0, udata=None)


class ExitNotifier:
    """The kqueue holds one knote per watched pid; its fd is readable
    (poll(2)) while events are pending, so a selector loop registers it."""

    status_known = True
    _BATCH = 64

    def __init__(self, *, libc=None) -> None:
        self._libc = libc if libc is not None else openbsd._libc()
        self._kqueue = openbsd._func(self._libc, "kqueue", ctypes.c_int, [])
        self._kevent = openbsd._func(
            self._libc, "kevent", ctypes.c_int,
            [ctypes.c_int, ctypes.POINTER(Kevent), ctypes.c_int,
             ctypes.POINTER(Kevent), ctypes.c_int, ctypes.POINTER(Timespec)])
        kq = self._kqueue()
        if kq == -1:
            err = ctypes.get_errno()
            raise OSError(err, f"kqueue: {os.strerror(err)}")
        self._kq = kq
        if isinstance(self._libc, ctypes.CDLL):
            # Not inherited by fork(2) anyway (kqueue(2)); keep it from execs.
            os.set_inheritable(kq, False)
        self._pids: set[int] = set()

    def fileno(self) -> int:
        return self._kq

    def _change(self, kev: Kevent) -> int:
        if self._kevent(self._kq, ctypes.byref(kev), 1, None, 0, None) == -1:
            return ctypes.get_errno()
        return 0

    def add(self, pid: int) -> bool:
        """Watch pid; False when it no longer runs (it exited, even if not
        yet reaped: "exiting processes can't be specified")."""
        if pid in self._pids:
            return True
        err = self._change(exit_change(pid))
        if err == errno.ESRCH:
            return False
        if err:
            raise OSError(err, f"kevent EVFILT_PROC {pid}: {os.strerror(err)}")
        self._pids.add(pid)
        return True

    def remove(self, pid: int) -> None:
        if pid in self._pids:
            self._pids.discard(pid)
            err = self._change(exit_change(pid, delete=True))
            if err not in (0, errno.ENOENT, errno.ESRCH):
                raise OSError(err, f"kevent EV_DELETE {pid}: {os.strerror(err)}")

    def ready(self) -> list[tuple[int, int | None]]:
        """(pid, wait status) for each watched process that has exited."""
        events = (Kevent * self._BATCH)()
        zero = Timespec(0, 0)
        out = []
        while True:
            n = self._kevent(self._kq, None, 0, events, self._BATCH, ctypes.byref(zero))
            if n == -1:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                raise OSError(err, f"kevent: {os.strerror(err)}")
            for ev in events[:n]:
                if ev.filter != EVFILT_PROC or ev.flags & EV_ERROR:
                    continue
                if ev.fflags & NOTE_EXIT and ev.ident in self._pids:
                    self._pids.discard(ev.ident)
                    out.append((int(ev.ident), int(ev.data)))
            if n < self._BATCH:
                return out

    def close(self) -> None:
        self._pids.clear()
        if isinstance(self._libc, ctypes.CDLL):
            os.close(self._kq)
        else:
            self._libc.close(self._kq)
