"""OpenBSD: unveil(2) + pledge(2), sysctl(2), setproctitle(3).

Everything that talks to libc takes an optional `libc` so the tests (which
run on Linux) can pass a recording object and check the exact calls; the
arguments themselves are built by pure functions.
"""

from __future__ import annotations

import ctypes
import errno
import os
import uuid
from collections.abc import Sequence

from pufflet.platform import (SandboxError, check_paths, fs_facts,
                              uname_facts)


def _libc():
    # dlopen(NULL): the program and everything it links, libc included.
    return ctypes.CDLL(None, use_errno=True)


def _func(libc, name: str, restype, argtypes):
    """Look a symbol up; declare its C types when it comes from a real
    library (a test double gets the plain Python values)."""
    fn = getattr(libc, name)
    if isinstance(libc, ctypes.CDLL):
        fn.restype = restype
        if argtypes is not None:
            fn.argtypes = argtypes
    return fn


# ---- unveil(2), pledge(2) ------------------------------------------------

def unveil_calls(paths: Sequence[tuple[str, str]]) -> list[tuple[bytes | None, bytes | None]]:
    """The unveil(2) arguments, in order, ending with the (NULL, NULL) call
    that locks the list: "calling unveil() with NULL for both arguments
    prevents further calls to unveil() by the process" (unveil(2))."""
    calls: list[tuple[bytes | None, bytes | None]] = [
        (os.fsencode(path), perms.encode("ascii"))
        for path, perms in check_paths(paths)]
    calls.append((None, None))
    return calls


def pledge_args(promises: str, execpromises: str | None = None) -> tuple[bytes, bytes | None]:
    """pledge(2) arguments. execpromises NULL means "leave as is"
    (pledge(2): "If promises or execpromises are NULL, the current value
    is not changed"); unset, an execve(2) drops the pledge and the unveil
    list of the new image."""
    return (promises.encode("ascii"),
            None if execpromises is None else execpromises.encode("ascii"))


def sandbox(paths: Sequence[tuple[str, str]], promises: str,
            execpromises: str | None = None, *, libc=None) -> None:
    """unveil each path, lock the list, then pledge. Irreversible and
    inherited across fork(2).

    A SandboxError after the first unveil leaves the process partly
    restricted (the list is not locked, no pledge): on OpenBSD callers
    should treat it as fatal."""
    calls = unveil_calls(paths)
    uargs = pledge_args(promises, execpromises)
    libc = libc if libc is not None else _libc()
    # Resolve both symbols before the first call, so that on a system
    # without them we fail before restricting anything.
    try:
        unveil = _func(libc, "unveil", ctypes.c_int,
                       [ctypes.c_char_p, ctypes.c_char_p])
        pledge = _func(libc, "pledge", ctypes.c_int,
                       [ctypes.c_char_p, ctypes.c_char_p])
    except AttributeError as e:
        raise SandboxError(f"unveil/pledge not in libc (not OpenBSD?): {e}") from None

    for path, perms in calls:
        if unveil(path, perms) == -1:
            err = ctypes.get_errno()
            # unveil(2): ENOENT when a directory in path does not exist.
            # Skipped to match the Linux side, which cannot add a rule for
            # a missing path either: nothing will be visible there.
            if err == errno.ENOENT and path is not None:
                continue
            what = "NULL" if path is None else os.fsdecode(path)
            raise SandboxError(f"unveil {what}: {os.strerror(err)}")
    if pledge(*uargs) == -1:
        err = ctypes.get_errno()
        raise SandboxError(f"pledge {promises!r} {execpromises!r}: {os.strerror(err)}")


# ---- sysctl(2) -----------------------------------------------------------

# MIB numbers from <sys/sysctl.h>: CTL_KERN 1, CTL_VM 2, CTL_HW 6;
# KERN_MAXPROC 6, KERN_BOOTTIME 21, KERN_NPROCS 47; HW_UUID 18,
# HW_PHYSMEM64 19, HW_NCPUONLINE 25. From <uvm/uvmexp.h>: VM_UVMEXP 4.
_MIBS = {
    "kern.maxproc": (1, 6),     # int
    "kern.boottime": (1, 21),   # struct timeval
    "kern.nprocs": (1, 47),     # int
    "vm.uvmexp": (2, 4),        # struct uvmexp
    "hw.uuid": (6, 18),         # string; absent on machines without one
    "hw.physmem64": (6, 19),    # int64_t
    "hw.ncpuonline": (6, 25),   # int
}


def sysctl_mib(name: str) -> tuple[int, ...]:
    """The MIB for one of the names we use; KeyError for any other."""
    return _MIBS[name]


class _Timeval(ctypes.Structure):
    # <sys/time.h>: time_t is 64 bits on every OpenBSD platform since 5.5,
    # suseconds_t is a long.
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_usec", ctypes.c_long)]


def sysctl_raw(name: str, size: int, *, libc=None) -> bytes:
    """Read one sysctl(2) value of at most size bytes.

    int sysctl(const int *name, u_int namelen, void *oldp, size_t *oldlenp,
               void *newp, size_t newlen);"""
    mib = sysctl_mib(name)
    libc = libc if libc is not None else _libc()
    try:
        fn = _func(libc, "sysctl", ctypes.c_int,
                   [ctypes.POINTER(ctypes.c_int), ctypes.c_uint,
                    ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                    ctypes.c_void_p, ctypes.c_size_t])
    except AttributeError:
        raise OSError(errno.ENOSYS, f"sysctl {name}: no sysctl(2) in libc") from None
    cmib = (ctypes.c_int * len(mib))(*mib)
    buf = ctypes.create_string_buffer(size)
    oldlen = ctypes.c_size_t(size)
    if fn(cmib, len(mib), buf, ctypes.pointer(oldlen), None, 0) == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"sysctl {name}: {os.strerror(err)}")
    return buf.raw[:oldlen.value]


def _sysctl_int(name: str, ctype, libc) -> int:
    raw = sysctl_raw(name, ctypes.sizeof(ctype), libc=libc)
    return ctype.from_buffer_copy(raw.ljust(ctypes.sizeof(ctype), b"\0")).value


def boottime(*, libc=None) -> tuple[int, int]:
    raw = sysctl_raw("kern.boottime", ctypes.sizeof(_Timeval), libc=libc)
    tv = _Timeval.from_buffer_copy(raw.ljust(ctypes.sizeof(_Timeval), b"\0"))
    return tv.tv_sec, tv.tv_usec


# vm.uvmexp (sysctl(2): VM_UVMEXP "returns the uvmexp structure"; the
# counters are described in uvm_init(9), uvm(9) before 7.x) starts with these ints,
# in this order, on every release and platform: pagesize, pagemask,
# pageshift, npages, free, active, inactive.  The rest of the struct grows
# over releases, so we ask for more than it holds and read only the head.
_UVMEXP_HEAD = 7
_UVMEXP_ASK = 4096


def uvmexp_head(*, libc=None) -> dict[str, int]:
    raw = sysctl_raw("vm.uvmexp", _UVMEXP_ASK, libc=libc)
    n = ctypes.sizeof(ctypes.c_int) * _UVMEXP_HEAD
    if len(raw) < n:
        raise OSError(errno.EINVAL, f"sysctl vm.uvmexp: {len(raw)} bytes, want {n}")
    head = (ctypes.c_int * _UVMEXP_HEAD).from_buffer_copy(raw[:n])
    names = ("pagesize", "pagemask", "pageshift", "npages", "free",
             "active", "inactive")
    return dict(zip(names, head))


def memory_available(*, libc=None) -> int:
    """Free plus inactive pages: the inactive ones are clean or cleanable
    and are what the page daemon gives back first, as MemAvailable on
    Linux counts reclaimable cache (top(1) shows the same two figures)."""
    u = uvmexp_head(libc=libc)
    return max(u["free"] + u["inactive"], 0) * u["pagesize"]


# A fixed namespace so the same boot always gives the same id.
_BOOT_NS = uuid.UUID("cd1d48af-1448-42a4-8c51-20cac52c285b")


def boot_id(sec: int, usec: int, hostname: str) -> str:
    """OpenBSD has no boot id; kern.boottime changes at every boot and
    only then, so a name-based UUID of it (and the hostname, to tell apart
    machines booted in the same microsecond) serves the same purpose."""
    return str(uuid.uuid5(_BOOT_NS, f"{hostname}\n{sec}.{usec:06d}"))


def node_facts(state_dir: str, *, libc=None, uname=None) -> dict:
    libc = libc if libc is not None else _libc()
    u = uname if uname is not None else os.uname()
    facts = uname_facts(u)
    facts["os_image"] = f"{u.sysname} {u.release}"
    try:
        facts["cpus"] = _sysctl_int("hw.ncpuonline", ctypes.c_int, libc)
    except OSError:
        # hw.ncpuonline appeared in 6.4; count all CPUs before that.
        facts["cpus"] = os.cpu_count() or 1
    facts["memory_bytes"] = _sysctl_int("hw.physmem64", ctypes.c_int64, libc)
    sec, usec = boottime(libc=libc)
    facts["boot_id"] = boot_id(sec, usec, u.nodename)
    try:
        # A UUID is 36 characters; 64 leaves room and the NUL.
        raw = sysctl_raw("hw.uuid", 64, libc=libc)
        facts["machine_id"] = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    except OSError:
        facts["machine_id"] = ""   # no SMBIOS/firmware UUID on this machine
    facts.update(fs_facts(state_dir))
    facts["memory_available_bytes"] = memory_available(libc=libc)
    facts["processes"] = _sysctl_int("kern.nprocs", ctypes.c_int, libc)
    facts["max_processes"] = _sysctl_int("kern.maxproc", ctypes.c_int, libc)
    return facts


# ---- setproctitle(3) -----------------------------------------------------

def set_title(name: str, *, libc=None) -> None:
    """setproctitle(3) with "%s" so a '%' in name is not a format; libc
    prefixes the program name ("pufflet: agent")."""
    libc = libc if libc is not None else _libc()
    try:
        fn = _func(libc, "setproctitle", None, None)   # variadic: no argtypes
    except AttributeError:
        return
    fn(b"%s", name.encode("utf-8", "replace"))
