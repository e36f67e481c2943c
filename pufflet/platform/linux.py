"""Linux: Landlock for unveil(2), /proc for node facts, prctl for the title.

Landlock (landlock(7), <linux/landlock.h>) is the nearest thing Linux has to
unveil: an unprivileged, irreversible, inherited restriction of filesystem
access to chosen hierarchies. The differences that matter:

- Rules add up along a path: a rule on a subdirectory can widen, never
  narrow, what a rule on its parent grants. unveil(2) takes the most
  specific path instead, so ("/a", "rw") + ("/a/b", "r") leaves /a/b
  writable here.
- Landlock does not hide paths: stat(2), chdir(2), readlink(2), chmod(2),
  chown(2) and friends still work everywhere; open, exec, create, remove,
  rename and truncate are what it restricts.
- It restricts the calling thread only (and its later children), as does
  PR_SET_NO_NEW_PRIVS, so sandbox() refuses to run while the process has
  other threads: they would stay unrestricted.
- pledge(2) promises have no equivalent. They filter system calls by
  family; on Linux that is seccomp-bpf, and a filter that keeps CPython,
  OpenSSL and the kubernetes client working is long, per-architecture and
  breaks with libc updates. So the promises are accepted and ignored: on
  Linux the sandbox is the filesystem part only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Sequence

from pufflet.platform import (SandboxError, SandboxUnavailable, check_paths, fs_facts,
                              uname_facts)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# ---- Landlock constants, <linux/landlock.h> --------------------------------

LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13        # ABI 2 (5.19): link/rename across directories
FS_TRUNCATE = 1 << 14     # ABI 3 (6.2)
FS_IOCTL_DEV = 1 << 15    # ABI 5 (6.10)
# ABI 4 (6.7) added TCP bind/connect, ABI 6 (6.12) signal and abstract
# socket scoping, ABI 7 (6.15) audit flags: none of them filesystem rights.

_ABI1_FS = (1 << 13) - 1  # EXECUTE .. MAKE_SYM

# The rights that apply to a file itself; any other right in a rule on a
# non-directory is refused by landlock_add_rule(2) with EINVAL.
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV

# unveil(2) letters to Landlock rights.
_PERM_RIGHTS = {
    "r": FS_READ_FILE | FS_READ_DIR,
    "w": FS_WRITE_FILE | FS_TRUNCATE,
    "x": FS_EXECUTE,
    "c": (FS_MAKE_CHAR | FS_MAKE_DIR | FS_MAKE_REG | FS_MAKE_SOCK
          | FS_MAKE_FIFO | FS_MAKE_BLOCK | FS_MAKE_SYM
          | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_REFER),
}
# FS_IOCTL_DEV is handled but never granted: unveil does not filter
# ioctl(2), pledge does, and "stdio" alone allows no device ioctl either.
# Fds opened before sandbox() (a tty on stdin) keep their rights.

# Syscall numbers: 444..446 in the unified table (asm-generic/unistd.h,
# arch/x86/entry/syscalls/syscall_{32,64}.tbl, arm, powerpc, s390, ...);
# alpha is offset by 110 (arch/alpha/kernel/syscalls/syscall.tbl); mips has
# per-ABI bases we do not try to guess.
_NR_BASE = 554 if os.uname().machine.startswith("alpha") else 444
_NR_CREATE_RULESET = _NR_BASE
_NR_ADD_RULE = _NR_BASE + 1
_NR_RESTRICT_SELF = _NR_BASE + 2

# <linux/prctl.h>
PR_SET_NAME = 15
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39


class _RulesetAttr(ctypes.Structure):
    # Only handled_access_fs: the kernel accepts any size from
    # offsetofend(handled_access_fs) on, so this works on every ABI.
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1    # __attribute__((packed)) in the uapi header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64),
                ("parent_fd", ctypes.c_int32)]


def handled_fs(abi: int) -> int:
    """Every filesystem right the running ABI knows: handled means denied
    unless a rule grants it. Newer bits would make create_ruleset EINVAL."""
    rights = _ABI1_FS
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


def access_for(perms: str, abi: int, is_dir: bool) -> int:
    """Landlock rights for unveil(2) permission letters on one path."""
    rights = 0
    for p in perms:
        rights |= _PERM_RIGHTS[p]
    rights &= handled_fs(abi)
    if not is_dir:
        rights &= FILE_RIGHTS
    return rights


def _syscall(nr: int, *args) -> int:
    r = _libc.syscall(ctypes.c_long(nr), *args)
    if r == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


def abi_version() -> int:
    """Landlock ABI of the running kernel; SandboxError if there is none."""
    if os.uname().machine.startswith("mips"):
        raise SandboxUnavailable("landlock unavailable: syscall numbers for mips not known")
    try:
        return _syscall(_NR_CREATE_RULESET, ctypes.c_void_p(None),
                        ctypes.c_size_t(0),
                        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    except OSError as e:
        # ENOSYS: not built in; EOPNOTSUPP: built in, not enabled (lsm=).
        raise SandboxUnavailable(f"landlock unavailable: {e.strerror}") from None


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading
        return threading.active_count()


def _prctl(option: int, arg: int = 0) -> int:
    r = _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg),
                    ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if r == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


def sandbox(paths: Sequence[tuple[str, str]], promises: str,
            execpromises: str | None = None) -> None:
    """Allow only paths (with their unveil perms) for good; see the module
    comment for what this does not cover. promises and execpromises are
    ignored. Paths that do not exist are skipped: nothing is reachable
    there, as under unveil. With no paths at all every handled access is
    denied (stricter than unveil, which then restricts nothing)."""
    paths = check_paths(paths)
    if _threads() > 1:
        raise SandboxError("landlock restricts the calling thread only: "
                           "sandbox before starting threads")
    abi = abi_version()
    attr = _RulesetAttr(handled_access_fs=handled_fs(abi))
    try:
        ruleset = _syscall(_NR_CREATE_RULESET, ctypes.byref(attr),
                           ctypes.c_size_t(ctypes.sizeof(attr)),
                           ctypes.c_uint32(0))
    except OSError as e:
        raise SandboxError(f"landlock_create_ruleset: {e.strerror}") from None
    try:
        for path, perms in paths:
            _add_rule(ruleset, path, perms, abi)
        try:
            # Required for an unprivileged caller, and what keeps a setuid
            # binary exec'd later from regaining rights (landlock(7)).
            _prctl(PR_SET_NO_NEW_PRIVS, 1)
        except OSError as e:
            raise SandboxError(f"prctl(PR_SET_NO_NEW_PRIVS): {e.strerror}") from None
        try:
            _syscall(_NR_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0))
        except OSError as e:
            raise SandboxError(f"landlock_restrict_self: {e.strerror}") from None
    finally:
        os.close(ruleset)


def _add_rule(ruleset: int, path: str, perms: str, abi: int) -> None:
    try:
        # O_PATH: a handle on the inode that needs no read permission.
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        # Missing, or out of reach of this uid anyway: there is nothing
        # to grant, as unveil(2) of such a path grants nothing usable.
        return
    except OSError as e:
        raise SandboxError(f"{path}: {e.strerror}") from None
    try:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        rights = access_for(perms, abi, is_dir)
        if not rights:
            return      # "" hides the path: no rule is exactly that
        rule = _PathBeneathAttr(allowed_access=rights, parent_fd=fd)
        try:
            _syscall(_NR_ADD_RULE, ctypes.c_int(ruleset),
                     ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                     ctypes.byref(rule), ctypes.c_uint32(0))
        except OSError as e:
            raise SandboxError(f"landlock_add_rule {path} {perms!r}: {e.strerror}") from None
    finally:
        os.close(fd)


def no_new_privs() -> bool:
    return _prctl(PR_GET_NO_NEW_PRIVS) == 1


# ---- node facts ------------------------------------------------------------

def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def os_image(sysname: str, release: str) -> str:
    # os-release(5): /etc/os-release, else /usr/lib/os-release.
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            text = _read(path)
        except OSError:
            continue
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "PRETTY_NAME":
                value = value.strip()
                if value[:1] in "\"'" and value[-1:] == value[:1]:
                    value = value[1:-1]
                if value:
                    return value
    return f"{sysname} {release}"


def memtotal() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            # proc(5): "MemTotal: <n> kB", kB meaning KiB.
            return int(line.split()[1]) * 1024
    raise OSError(errno.ENOENT, "no MemTotal in /proc/meminfo")


def meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes by field; proc(5): "<n> kB" means KiB."""
    out = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        words = rest.split()
        if sep and words and words[0].isdigit():
            out[key] = int(words[0]) * (1024 if words[1:] == ["kB"] else 1)
    return out


def memavailable() -> int:
    """MemAvailable: the kernel's estimate of memory a new workload can get
    without swapping (page cache and reclaimable slab included), which is
    what memory.available means to the kubelet's eviction too."""
    info = meminfo(_read("/proc/meminfo"))
    if "MemAvailable" in info:
        return info["MemAvailable"]
    # Before 3.14 there was no estimate: free plus page cache is close.
    return info.get("MemFree", 0) + info.get("Cached", 0)


def processes() -> int:
    """Tasks in existence: the total after the '/' in /proc/loadavg's
    fourth field (proc(5)). Threads count, as each takes a pid from
    pid_max; this is the figure the kubelet's pid.available compares."""
    field = _read("/proc/loadavg").split()[3]
    return int(field.partition("/")[2])


def max_processes() -> int:
    """The most tasks the kernel will create: the lower of pid_max and
    threads-max, as the kubelet's pidlimit takes it (proc_sys_kernel(5))."""
    limits = []
    for path in ("/proc/sys/kernel/pid_max", "/proc/sys/kernel/threads-max"):
        try:
            limits.append(int(_read(path).strip()))
        except (OSError, ValueError):
            continue
    return min(limits) if limits else 0


def machine_id() -> str:
    # machine-id(5); dbus kept its own copy before systemd.
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            mid = _read(path).strip()
        except OSError:
            continue
        if mid:
            return mid
    return ""


def node_facts(state_dir: str) -> dict:
    u = os.uname()
    facts = uname_facts(u)
    facts["os_image"] = os_image(u.sysname, u.release)
    facts["cpus"] = os.sysconf("SC_NPROCESSORS_ONLN")
    facts["memory_bytes"] = memtotal()
    facts["boot_id"] = _read("/proc/sys/kernel/random/boot_id").strip()
    facts["machine_id"] = machine_id()
    facts.update(fs_facts(state_dir))
    facts["memory_available_bytes"] = memavailable()
    facts["processes"] = processes()
    facts["max_processes"] = max_processes()
    return facts


def set_title(name: str) -> None:
    """prctl(PR_SET_NAME): the comm of the calling thread, 15 bytes plus
    the NUL; what ps -o comm and top show. Cosmetic: errors are ignored."""
    buf = ctypes.create_string_buffer(name.encode("utf-8", "replace")[:15])
    _libc.prctl(ctypes.c_int(PR_SET_NAME), buf, ctypes.c_ulong(0),
                ctypes.c_ulong(0), ctypes.c_ulong(0))
