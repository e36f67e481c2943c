"""Process identity and exit notification: real processes on Linux, and
golden tests of the OpenBSD sysctl/kqueue calls (run anywhere)."""

import ctypes
import errno
import os
import select
import signal
import struct
import sys
import time

import pytest

from pufflet.platform import openbsd_proc
from pufflet.priv import proctrack
from pufflet.priv.proctrack import Exited, ProcessWatcher, decode_status

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc, pidfd")


def sh(script: str, stdin: int | None = None) -> int:
    """A child of ours running /bin/sh -c script."""
    pid = os.fork()
    if pid == 0:
        try:
            if stdin is not None:
                os.dup2(stdin, 0)
            os.execv("/bin/sh", ["sh", "-c", script])
        finally:
            os._exit(127)
    return pid


def wait_ready(w: ProcessWatcher, timeout: float = 5.0) -> list[Exited]:
    end = time.monotonic() + timeout
    got: list[Exited] = []
    while time.monotonic() < end:
        select.select([w.fileno()], [], [], 0.2)
        got += w.reap()
        if got:
            return got
    raise AssertionError("no exit reported")


def test_decode_status():
    assert decode_status(7 << 8) == (7, None)
    assert decode_status(signal.SIGKILL) == (None, signal.SIGKILL)
    assert decode_status(signal.SIGSEGV | 0x80) == (None, signal.SIGSEGV)   # core
    assert decode_status(0x137F) == (None, None)                          # stopped
    e = Exited(1, "t", signal.SIGTERM, "")
    assert e.exit_code == 143 and e.signal == signal.SIGTERM
    assert Exited(1, "t", None, "why").exit_code is None


# ---- Linux: identity ----------------------------------------------------------

@linux
def test_parse_stat_counts_fields_after_the_last_paren():
    from pufflet.platform import linux_proc
    fields = " ".join(str(n) for n in range(4, 53))
    text = f"42 (a) b) (c) S {fields}\n"
    state, start = linux_proc.parse_stat(text)
    assert state == "S" and start == 22


@linux
def test_start_time_names_one_process_and_notices_pid_reuse():
    me = proctrack.start_time(os.getpid())
    boot = open("/proc/sys/kernel/random/boot_id").read().strip()
    assert me.startswith(f"linux:{boot}:")
    assert proctrack.is_same(os.getpid(), me)
    # Same pid, another start: a recycled pid is not our process.
    ticks = int(me.rsplit(":", 1)[1])
    assert not proctrack.is_same(os.getpid(), me.rsplit(":", 1)[0] + f":{ticks + 1}")
    # Another boot.
    assert not proctrack.is_same(os.getpid(), f"linux:{'0' * 8}-x:{ticks}")

    pid = sh("exit 0")
    token = proctrack.start_time(pid)
    os.waitpid(pid, 0)
    assert proctrack.start_time(pid) is None or proctrack.start_time(pid) != token
    assert not proctrack.is_same(pid, token)
    assert proctrack.start_time(-1) is None and proctrack.start_time(0) is None


# ---- Linux: exit notification -------------------------------------------------------

@linux
def test_own_child_exit_status_through_the_watcher():
    w = ProcessWatcher()
    try:
        r, wr = os.pipe()
        a = sh("read x; exit 7", stdin=r)
        b = sh("kill -TERM $$")
        for pid in (a, b):
            w.watch(pid, proctrack.start_time(pid), own_child=True)
        assert w.watching() == sorted([a, b])
        got = {e.pid: e for e in wait_ready(w)}
        assert set(got) == {b}
        assert got[b].signal == signal.SIGTERM and got[b].exit_code == 143
        assert got[b].reason == ""
        os.close(wr)
        os.close(r)
        got = {e.pid: e for e in wait_ready(w)}
        assert got[a].exit_code == 7 and got[a].signal is None
        assert w.watching() == []
        # Reaped by the watcher: nothing left to wait for.
        with pytest.raises(ChildProcessError):
            os.waitpid(a, os.WNOHANG)
    finally:
        w.close()


@linux
def test_own_child_that_ended_before_watch_is_still_reported():
    w = ProcessWatcher()
    try:
        pid = sh("exit 5")
        token = proctrack.start_time(pid)
        time.sleep(0.1)                   # a zombie by now
        w.watch(pid, token, own_child=True)
        [e] = wait_ready(w)
        assert (e.pid, e.start_time, e.exit_code) == (pid, token, 5)
    finally:
        w.close()


def _orphan(script: str) -> int:
    """Start script in a grandchild whose parent exits at once: the
    grandchild is reparented (to init) and is not our child."""
    r, wr = os.pipe()
    mid = os.fork()
    if mid == 0:
        try:
            os.close(r)
            gc = os.fork()
            if gc == 0:
                os.close(wr)
                os.execv("/bin/sh", ["sh", "-c", script])
            os.write(wr, str(gc).encode())
        finally:
            os._exit(0)
    os.close(wr)
    pid = int(os.read(r, 32))
    os.close(r)
    os.waitpid(mid, 0)
    return pid


@linux
def test_adopted_process_exit_is_seen_without_a_status():
    from pufflet.platform import linux_proc
    pid = _orphan("read x < /proc/self/fd/0; while :; do read x; done")
    token = proctrack.start_time(pid)
    w = ProcessWatcher()
    try:
        w.watch(pid, token, own_child=False)
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)         # truly not ours
        assert w.reap() == []
        os.kill(pid, signal.SIGKILL)
        [e] = wait_ready(w)
        assert e == Exited(pid, token, None, linux_proc.ADOPTED_REASON)
        assert "re-adopted" in e.reason and e.exit_code is None
    finally:
        w.close()


@linux
def test_adopted_process_that_is_gone_or_someone_else_is_reported_at_once():
    w = ProcessWatcher()
    try:
        pid = sh("exit 0")
        token = proctrack.start_time(pid)
        os.waitpid(pid, 0)
        w.watch(pid, token, own_child=False)          # no such process now
        # A live process whose start token is not the recorded one: the pid
        # was recycled, ours ended while we were away.
        other = _orphan("while :; do read x; done")
        w.watch(other, "linux:not-this-boot:1", own_child=False)
        got = {e.pid: e for e in w.reap()}
        assert got[pid].status is None and "ended before" in got[pid].reason
        assert got[other].status is None and "another process" in got[other].reason
        assert w.watching() == []
        os.kill(other, signal.SIGKILL)
    finally:
        w.close()


@linux
def test_unwatch_and_refusals():
    w = ProcessWatcher()
    try:
        pid = sh("read x")
        w.watch(pid, proctrack.start_time(pid), own_child=True)
        w.unwatch(pid)
        assert w.watching() == []
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert w.reap() == []
        with pytest.raises(ValueError):
            w.watch(0, "x", own_child=True)
    finally:
        w.close()


# ---- OpenBSD, golden ---------------------------------------------------------------
# kinfo_proc and kevent as <sys/sysctl.h> and <sys/event.h> lay them out on
# amd64/arm64; sysctl(2) KERN_PROC, kqueue(2) EVFILT_PROC NOTE_EXIT.

def test_kinfo_proc_head_layout():
    K = openbsd_proc.KinfoProc
    assert K.p_eflag.offset == 96            # after 12 64-bit pointers
    assert K.p_pid.offset == 108
    assert K.p_groups.offset == 144 and K.p_ngroups.offset == 208
    assert K.p_uticks.offset == 248
    assert K.p_stat.offset == 304 and K.p_comm.offset == 312
    assert K.p_login.offset == 352 and K.p_uvalid.offset == 400
    assert K.p_ustart_sec.offset == 408 and K.p_ustart_usec.offset == 416
    assert ctypes.sizeof(K) == 424
    assert openbsd_proc.proc_mib(4321) == (1, 66, 1, 4321, 424, 1)


def test_kevent_layout_and_the_exit_change():
    K = openbsd_proc.Kevent
    assert ctypes.sizeof(K) == 32
    assert [K.ident.offset, K.filter.offset, K.flags.offset, K.fflags.offset,
            K.data.offset, K.udata.offset] == [0, 8, 10, 12, 16, 24]
    assert bytes(openbsd_proc.exit_change(4321)) == struct.pack(
        "=QhHIqQ", 4321, -5, 0x0001 | 0x0004, 0x80000000, 0, 0)
    assert bytes(openbsd_proc.exit_change(4321, delete=True)) == struct.pack(
        "=QhHIqQ", 4321, -5, 0x0002, 0x80000000, 0, 0)


class FakeLibc:
    """Stands in for OpenBSD's libc: records sysctl and kevent calls."""

    def __init__(self, procs=None, boottime=(1700000000, 100)):
        self.calls = []
        self.procs = procs or {}                   # pid -> (sec, usec)
        self.boottime = boottime
        self.exits = []                            # (pid, status) to deliver
        self.gone = set()                          # pids that give ESRCH
        self.closed = []

    def sysctl(self, name, namelen, oldp, oldlenp, newp, newlen):
        mib = tuple(name[i] for i in range(namelen))
        self.calls.append(("sysctl", mib, oldlenp.contents.value))
        if mib == (1, 21):
            raw = struct.pack("=ql", *self.boottime)
        elif mib[:3] == (1, 66, 1):
            if mib[3] not in self.procs:
                oldlenp.contents.value = 0
                return 0
            kp = openbsd_proc.KinfoProc(p_pid=mib[3], p_stat=2)
            kp.p_ustart_sec, kp.p_ustart_usec = self.procs[mib[3]]
            raw = bytes(kp)[:mib[4]]
        else:
            ctypes.set_errno(errno.EOPNOTSUPP)
            return -1
        ctypes.memmove(oldp, raw, len(raw))
        oldlenp.contents.value = len(raw)
        return 0

    def kqueue(self):
        self.calls.append(("kqueue",))
        return 7

    def kevent(self, kq, changes, nchanges, events, nevents, timeout):
        if nchanges:
            kev = changes._obj
            self.calls.append(("kevent", kq, bytes(kev), nchanges, events, nevents, timeout))
            if kev.ident in self.gone:
                ctypes.set_errno(errno.ESRCH)
                return -1
            return 0
        ts = timeout._obj
        self.calls.append(("kevent-wait", kq, nevents, (ts.tv_sec, ts.tv_nsec)))
        n = 0
        while self.exits and n < nevents:
            pid, status = self.exits.pop(0)
            events[n] = openbsd_proc.Kevent(
                ident=pid, filter=-5, flags=0x8000 | 0x0010, fflags=0x80000000,
                data=status, udata=None)
            n += 1
        return n

    def close(self, fd):
        self.closed.append(fd)


def test_openbsd_start_token_is_start_uptime():
    libc = FakeLibc(procs={4321: (1700000100, 250)}, boottime=(1700000000, 100))
    assert openbsd_proc.start_time(4321, libc=libc) == "openbsd:100000150"
    assert libc.calls[0] == ("sysctl", (1, 66, 1, 4321, 424, 1), 424)
    assert libc.calls[1][:2] == ("sysctl", (1, 21))
    assert openbsd_proc.start_time(99, libc=libc) is None
    # A clock step moves both by the same amount: the token stays.
    stepped = FakeLibc(procs={4321: (1700000130, 250)}, boottime=(1700000030, 100))
    assert openbsd_proc.start_time(4321, libc=stepped) == "openbsd:100000150"
    assert openbsd_proc.same_start("openbsd:100000150", "openbsd:100000151")
    assert not openbsd_proc.same_start("openbsd:100000150", "openbsd:100000152")
    assert not openbsd_proc.same_start("linux:x:1", "openbsd:1")


def test_openbsd_exit_notifier_calls_and_status():
    libc = FakeLibc()
    n = openbsd_proc.ExitNotifier(libc=libc)
    assert n.fileno() == 7 and n.status_known
    assert n.add(4321) is True
    assert libc.calls[-1] == ("kevent", 7, bytes(openbsd_proc.exit_change(4321)),
                              1, None, 0, None)
    libc.gone.add(999)
    assert n.add(999) is False                    # exited already: ESRCH
    libc.exits.append((4321, 3 << 8))
    assert n.ready() == [(4321, 0x300)]
    assert libc.calls[-1] == ("kevent-wait", 7, 64, (0, 0))   # never blocks
    assert n.ready() == []
    n.add(55)
    n.remove(55)
    assert libc.calls[-1][2] == bytes(openbsd_proc.exit_change(55, delete=True))
    n.close()
    assert libc.closed == [7]


@linux
def test_watcher_with_the_openbsd_notifier_reports_an_adopted_status():
    # Identity is checked with this system's /proc; the exit comes from the
    # (fake) kqueue, with the status OpenBSD gives even for a non-child.
    libc = FakeLibc()
    w = ProcessWatcher(notifier=openbsd_proc.ExitNotifier(libc=libc))
    me = os.getpid()
    w.watch(me, proctrack.start_time(me), own_child=False)
    libc.exits.append((me, signal.SIGKILL))
    [e] = w.reap()
    assert (e.pid, e.status, e.reason, e.exit_code) == (me, signal.SIGKILL, "", 137)
