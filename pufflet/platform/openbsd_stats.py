"""OpenBSD resource accounting: sysctl(2) KERN_PROC, kern.cp_time2,
kern.clockrate and vm.uvmexp.

Per process, sysctl(2) {CTL_KERN, KERN_PROC, KERN_PROC_RUID, uid,
sizeof(struct kinfo_proc), count} returns a struct kinfo_proc
(<sys/sysctl.h>) for every process whose real uid is uid, zombies
included, filtered by the kernel.  Of it we read:

    p_pid, p_ppid, p_sid, p__pgid, p_ruid, p_stat
    p_uvalid             "following p_u* members from struct user are
                         valid": zero for zombies, whose times we keep
                         from the last sample instead
    p_uutime_*/p_ustime_*  user and system time, as ps(1) adds them for
                         its TIME column
    p_vm_rssize          resident pages
    p_ustart_*           the start token (platform/openbsd_proc)

The kernel copies out min(elem_size, sizeof(struct kinfo_proc)) bytes per
process, so KinfoProcTimes, the head of the struct up to the times,
keeps working when later releases grow it at the end.

For the node: kern.cp_time2.<cpu> (KERN_CPTIME2) is one CPU's array of
u_int64_t statclock ticks per state (CP_USER ... CP_IDLE, the idle state
last; <sys/sched.h>); kern.cp_time is not used because the kernel divides
it by the number of CPUs.  Ticks become time through kern.clockrate's
stathz.  Memory comes from vm.uvmexp (platform/openbsd.uvmexp_head).

Everything that calls libc takes an optional `libc`, as platform/openbsd
does, so the exact calls are checked by tests on any system.
"""

from __future__ import annotations

import ctypes
import errno
import os

from pufflet.platform import openbsd, openbsd_proc
from pufflet.platform.procstat import NodeSample, ProcSample

# <sys/sysctl.h>
CTL_KERN = 1
CTL_HW = 6
KERN_CLOCKRATE = 12
KERN_PROC = 66
KERN_PROC_ALL = 0
KERN_PROC_RUID = 6
KERN_CPTIME2 = 71
HW_NCPU = 3
# <sys/proc.h>
SZOMB = openbsd_proc.SZOMB
# Enough for a struct clockinfo of any release (4 or 5 ints) and for
# cp_time2 with any CPUSTATES we may meet (5 before CP_SPIN, 6 since).
_ASK_SMALL = 128
# A pod's processes per query before we ask again with room for more.
_FIRST_COUNT = 64
_MAX_COUNT = 1 << 20


class KinfoProcTimes(openbsd_proc.KinfoProc):
    """struct kinfo_proc up to the user and system times, plus the
    u_int64_t that follows them (p_uru_maxrss), which makes the size a
    multiple of 8 as the kernel lays the array out."""
    _fields_ = [
        ("p_uutime_usec", ctypes.c_uint32),
        ("p_ustime_sec", ctypes.c_uint32),
        ("p_ustime_usec", ctypes.c_uint32),
        ("p_uru_maxrss", ctypes.c_uint64),
    ]


def _sysctl(libc):
    return openbsd._func(libc, "sysctl", ctypes.c_int,
                         [ctypes.POINTER(ctypes.c_int), ctypes.c_uint,
                          ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                          ctypes.c_void_p, ctypes.c_size_t])


def sysctl_read(mib: tuple[int, ...], size: int, *, libc=None) -> bytes:
    """One sysctl(2) read of at most size bytes; OSError as the kernel says."""
    libc = libc if libc is not None else openbsd._libc()
    fn = _sysctl(libc)
    cmib = (ctypes.c_int * len(mib))(*mib)
    buf = ctypes.create_string_buffer(size)
    oldlen = ctypes.c_size_t(size)
    if fn(cmib, len(mib), buf, ctypes.pointer(oldlen), None, 0) == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"sysctl {'.'.join(map(str, mib))}: {os.strerror(err)}")
    return buf.raw[:oldlen.value]


def procs_mib(uid: int, count: int, op: int = KERN_PROC_RUID) -> tuple[int, ...]:
    return (CTL_KERN, KERN_PROC, op, uid, ctypes.sizeof(KinfoProcTimes), count)


def kinfo_procs(uid: int, *, op: int = KERN_PROC_RUID, libc=None) -> list[KinfoProcTimes]:
    """Every process whose real uid is uid (KERN_PROC_ALL: every process,
    uid ignored).  ENOMEM means more processes than room (they may fork
    between two calls): ask again with more."""
    size = ctypes.sizeof(KinfoProcTimes)
    count = _FIRST_COUNT
    while True:
        try:
            raw = sysctl_read(procs_mib(uid, count, op), size * count, libc=libc)
            break
        except OSError as e:
            if e.errno != errno.ENOMEM or count >= _MAX_COUNT:
                raise
            count *= 4
    return [KinfoProcTimes.from_buffer_copy(raw, i * size)
            for i in range(len(raw) // size)]


def uid_busy(uid: int, *, libc=None) -> bool:
    """Whether any process has uid as its real or effective uid or gid
    (p_ruid, p_uid, p_rgid, p_gid of every process, KERN_PROC_ALL): the
    pod uid pool's check before it gives a uid out again.  The saved ids
    (p_svuid, p_svgid) lie beyond the head of kinfo_proc read here; a pod
    uid is never held only as a saved id, since spawn sets all three with
    setresuid(2)."""
    return any(uid in (kp.p_ruid, kp.p_uid, kp.p_rgid, kp.p_gid)
               for kp in kinfo_procs(0, op=KERN_PROC_ALL, libc=libc))


def cpu_ns(kp: KinfoProcTimes) -> int | None:
    """User plus system time in ns; None when the kernel did not fill
    them in (a zombie)."""
    if not kp.p_uvalid or kp.p_stat == SZOMB:
        return None
    usec = ((kp.p_uutime_sec + kp.p_ustime_sec) * 1_000_000
            + kp.p_uutime_usec + kp.p_ustime_usec)
    return usec * 1000


def proc_sample(kp: KinfoProcTimes, boot: tuple[int, int], pagesize: int) -> ProcSample:
    rss = 0 if kp.p_stat == SZOMB else max(kp.p_vm_rssize, 0) * pagesize
    return ProcSample(pid=kp.p_pid, ppid=kp.p_ppid, pgid=kp.p__pgid, sid=kp.p_sid,
                      uid=kp.p_ruid, start=openbsd_proc.start_token(kp, *boot),
                      cpu_ns=cpu_ns(kp), rss_bytes=rss,
                      # OpenBSD tells resident pages, not which are anonymous.
                      anon_bytes=rss)


def processes(uids: set[int], *, libc=None) -> list[ProcSample]:
    libc = libc if libc is not None else openbsd._libc()
    boot = openbsd.boottime(libc=libc)
    pagesize = openbsd.uvmexp_head(libc=libc)["pagesize"]
    out = []
    for uid in sorted(uids):
        out += [proc_sample(kp, boot, pagesize) for kp in kinfo_procs(uid, libc=libc)
                if kp.p_ruid == uid]
    return out


def stathz(*, libc=None) -> int:
    """struct clockinfo is {hz, tick, tickadj, stathz, profhz} on older
    releases and {hz, tick, stathz, profhz} since tickadj went; stathz is
    the last but one int in both."""
    raw = sysctl_read((CTL_KERN, KERN_CLOCKRATE), _ASK_SMALL, libc=libc)
    n = len(raw) // 4
    if n < 4:
        raise OSError(errno.EINVAL, f"kern.clockrate: {len(raw)} bytes")
    ints = (ctypes.c_int * n).from_buffer_copy(raw[:4 * n])
    if ints[n - 2] <= 0:
        raise OSError(errno.EINVAL, f"kern.clockrate: stathz {ints[n - 2]}")
    return ints[n - 2]


def busy_ticks(*, libc=None) -> int:
    """Statclock ticks every CPU spent out of the idle state, summed."""
    # hw.ncpu counts every CPU, online or not; an offline one says ENODEV.
    raw = sysctl_read((CTL_HW, HW_NCPU), 4, libc=libc)
    ncpu = ctypes.c_int.from_buffer_copy(raw.ljust(4, b"\0")).value
    total = 0
    for cpu in range(max(ncpu, 1)):
        try:
            raw = sysctl_read((CTL_KERN, KERN_CPTIME2, cpu), _ASK_SMALL, libc=libc)
        except OSError as e:
            if e.errno == errno.ENODEV:     # an offline CPU: nothing to add
                continue
            raise
        n = len(raw) // 8
        states = (ctypes.c_uint64 * n).from_buffer_copy(raw[:8 * n])
        total += sum(states[:n - 1])        # all but CP_IDLE, the last
    return total


def node(*, libc=None) -> NodeSample:
    """The node as a whole.  There is no page-cache split like Linux's
    Inactive(file): inactive pages, which the page daemon reclaims first,
    play its part, so working set = in use - inactive = active + wired
    and the rest."""
    libc = libc if libc is not None else openbsd._libc()
    u = openbsd.uvmexp_head(libc=libc)
    page = u["pagesize"]
    total = u["npages"] * page
    usage = max(u["npages"] - u["free"], 0) * page
    working = max(usage - u["inactive"] * page, 0)
    ns = busy_ticks(libc=libc) * 1_000_000_000 // stathz(libc=libc)
    sec, usec = openbsd.boottime(libc=libc)
    return NodeSample(cpu_ns=ns, memory_total=total, memory_usage=usage,
                      memory_working_set=working,
                      memory_available=max(total - working, 0),
                      memory_rss=None,    # no anonymous-page count to give
                      boot_time=sec + usec / 1e6)
