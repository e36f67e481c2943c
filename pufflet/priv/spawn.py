"""Start one container process: fork, sandbox, drop to the pod's uid, exec.

The parent (root) calls spawn() with a Spawn it has validated and built
itself: the pod root path comes from its own bookkeeping, never from the
agent. The child, between fork and execve, does exactly this:

    setsid                  own session and process group: the container
                            is signalled as -pgid, pufflet's terminal and
                            process group never reach it
    signals                 every handler back to SIG_DFL, mask emptied
                            (ignored signals and the mask survive execve;
                            Python ignores SIGPIPE, the kernel would not)
    enter_network()         setns(2) / setrtable(2), given by the caller;
                            first, while its fds are still open
    stdio                   the given fds (or /dev/null, opened by the
                            parent before any chroot) on 0, 1, 2; the
                            error pipe on 3; every other fd closed
    chroot(root), chdir(cwd)
    privileged limits       hard limits above pufflet's own raised (or, if
                            refused, clamped to ours), the process limit
                            and nice set: all need root
    setgroups, setresgid, setresuid
    verify                  ids are what we asked, root cannot be regained
    umask, setrlimit        the remaining limits, memory last (below what
                            this Python child already uses, it could not
                            allocate again: only execve comes after)
    execve                  argv[0] looked up in PATH inside the root

A failure in any step is written to a close-on-exec pipe as (step, errno)
and the child exits; spawn() reads the pipe until EOF (EOF alone means
execve succeeded), reaps the child and raises SpawnError("chroot
/var/db/...: No such file or directory"). That message is what the pod
status shows for a container that could not start.

Why os.fork and not subprocess or os.posix_spawn: neither can chroot.
subprocess.Popen has user=, group=, extra_groups=, umask=,
process_group=/start_new_session=, but the chroot and the rlimits would
have to go in preexec_fn, which runs Python after fork in any case, is
documented as unsafe with threads, and runs *after* Popen's own id
changes, so chroot would happen as the pod uid and fail. posix_spawn has
no chroot, setrlimit or setgroups at all. So we fork ourselves and keep
the child to a short, fixed sequence of os calls on values computed
before the fork: no locks, no logging, no imports, no threads.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import signal
from dataclasses import dataclass, field
from typing import Callable

from pufflet.priv import proctrack
from pufflet.priv.rlimits import Rlimit

__all__ = ["Spawn", "Started", "SpawnError", "spawn", "EXIT_SETUP_FAILED",
           "EXIT_STILL_ROOT", "DEFAULT_PATH"]

# Exit codes of a child that never reached execve. The parent learns the
# reason from the pipe; these tell it apart in ps(1) and in the wait status.
EXIT_SETUP_FAILED = 120
EXIT_STILL_ROOT = 121

# What runc and containerd search when a container's env has no PATH
# (containerd adds this PATH to the env; we only search it: the env the
# caller gives is passed on exactly).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

UID_MAX = 2**31 - 1

# The steps, in order; the number is what crosses the pipe.
_STEPS = ("setsid", "signals", "enter network", "stdio", "chroot", "chdir",
          "limits", "setgroups", "setresgid", "setresuid", "verify ids",
          "umask", "setrlimit", "exec")
(_SETSID, _SIGNALS, _NETWORK, _STDIO, _CHROOT, _CHDIR, _PRIVLIMITS,
 _SETGROUPS, _SETRESGID, _SETRESUID, _VERIFY, _UMASK, _SETRLIMIT,
 _EXEC) = range(len(_STEPS))

_RESET_SIGNALS = tuple(s for s in sorted(signal.valid_signals())
                       if s not in (signal.SIGKILL, signal.SIGSTOP))


class SpawnError(Exception):
    """The container process could not be started; str() says which step
    failed and why. step and errno are None for refusals before fork."""

    def __init__(self, message: str, step: str | None = None, errno_: int | None = None):
        super().__init__(message)
        self.step = step
        self.errno = errno_


def _nul_free(what: str, s: str) -> None:
    if not isinstance(s, str) or "\0" in s:
        raise SpawnError(f"{what}: must be a string without NUL bytes: {s!r}")


@dataclass(frozen=True)
class Spawn:
    argv: tuple[str, ...]
    env: tuple[str, ...]          # "KEY=value", exactly what the process gets
    root: str                     # absolute host path of the pod root
    uid: int
    gid: int
    cwd: str = "/"                # absolute, inside the root
    groups: tuple[int, ...] = ()  # supplementary groups, exactly these
    rlimits: tuple[Rlimit, ...] = ()
    nice: int = 0
    umask: int = 0o022
    stdin: int | None = None      # None: /dev/null
    stdout: int | None = None
    stderr: int | None = None
    # Runs first in the child, as root: joins the pod's network.
    enter_network: Callable[[], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Checked here, not with assert: these hold with python -O too.
        if not isinstance(self.argv, tuple) or not self.argv or not self.argv[0]:
            raise SpawnError("argv: want a non-empty tuple with a program name")
        for a in self.argv:
            _nul_free("argv", a)
        if not isinstance(self.env, tuple):
            raise SpawnError("env: want a tuple of KEY=value")
        for e in self.env:
            _nul_free("env", e)
            if "=" not in e or e.startswith("="):
                raise SpawnError(f"env: {e!r} is not KEY=value")
        for what, p in (("root", self.root), ("cwd", self.cwd)):
            _nul_free(what, p)
            if not p.startswith("/"):
                raise SpawnError(f"{what} {p!r}: must be an absolute path")
        if os.path.normpath(self.root) == "/":
            raise SpawnError("root: refusing to run a container in the host's /")
        for what, v in (("uid", self.uid), ("gid", self.gid),
                        *(("group", g) for g in self.groups)):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= UID_MAX:
                raise SpawnError(f"{what} {v!r}: pod processes never run as 0 "
                                 f"and need an id in 1..{UID_MAX}")
        if not isinstance(self.nice, int) or not 0 <= self.nice <= 19:
            raise SpawnError(f"nice {self.nice!r}: want 0..19")
        if not isinstance(self.umask, int) or not 0 <= self.umask <= 0o777:
            raise SpawnError(f"umask {self.umask!r}: want 0..0o777")
        for what, fd in (("stdin", self.stdin), ("stdout", self.stdout),
                         ("stderr", self.stderr)):
            if fd is not None and (not isinstance(fd, int) or fd < 0):
                raise SpawnError(f"{what}: bad fd {fd!r}")
        for r in self.rlimits:
            if not isinstance(r, Rlimit):
                raise SpawnError(f"rlimits: {r!r} is not an Rlimit")


@dataclass(frozen=True)
class Started:
    pid: int
    pgid: int          # == pid: the container leads its own group
    start_time: str    # proctrack token; with pid, names this process for good


def _env_map(env: tuple[str, ...]) -> dict[str, str]:
    # A later entry overrides an earlier one, as in the kubelet's env.
    out: dict[str, str] = {}
    for e in env:
        k, _, v = e.partition("=")
        out.pop(k, None)
        out[k] = v
    return out


def _candidates(argv0: str, env: dict[str, str]) -> tuple[list[str], str | None]:
    """Paths to try, and the PATH searched (None: argv0 has a '/').
    Like the kubelet's runtimes, PATH is the container's, searched inside
    its root; empty and relative entries are skipped (runc's Go LookPath
    refuses results relative to the working directory as well)."""
    if "/" in argv0:
        return [argv0], None
    path = env.get("PATH", DEFAULT_PATH)
    return [f"{d.rstrip('/')}/{argv0}" for d in path.split(":") if d.startswith("/")], path


def _fd_ceiling() -> int:
    """One past the highest fd this process can hold. On Linux
    os.closerange is one close_range(2); elsewhere it is a close() loop,
    so the bound matters."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = max(v for v in (soft, hard, os.sysconf("SC_OPEN_MAX"), 256)
              if v != resource.RLIM_INFINITY)
    return min(top, 1 << 20)


def _limit_plan(rlimits: tuple[Rlimit, ...]) -> list[tuple]:
    """Each limit as a tuple of plain values the child can apply without
    thinking: (index in rlimits, resource, wanted (soft, hard), clamped
    (soft, hard), our soft, raise first?, set while root?).

    A hard limit above ours can only be raised while root, and only with
    the right to (Linux: CAP_SYS_RESOURCE, which a container's root may
    lack; OpenBSD: root). If the raise is refused the child falls back to
    the clamped pair: pufflet's own hard limit bounds its pods.
    RLIMIT_NPROC is set while root as well: on Linux the limit in force at
    setresuid(2) is the one checked, and execve then fails with EAGAIN if
    the pod uid already had more processes than that (the new one not yet
    counted), so a pod over its limit cannot start another container."""
    inf = resource.RLIM_INFINITY
    out = []
    for i, r in enumerate(rlimits):
        res = r.resource()
        soft, hard = r.values()
        cur_soft, cur_hard = resource.getrlimit(res)
        above = cur_hard != inf and (hard == inf or hard > cur_hard)
        clamped = ((cur_hard if soft == inf or (cur_hard != inf and soft > cur_hard)
                    else soft, cur_hard) if above else (soft, hard))
        out.append((i, res, (soft, hard), clamped, cur_soft, above,
                    r.name == "RLIMIT_NPROC"))
    return out


def spawn(spec: Spawn) -> Started:
    """Fork and exec the container process described by spec.

    Returns once execve has succeeded; raises SpawnError (with the child
    reaped) if any step before it failed."""
    if not isinstance(spec, Spawn):
        raise SpawnError("spawn: want a Spawn")
    # Again, right before the fork: nothing below may run as root.
    if spec.uid <= 0 or spec.gid <= 0 or 0 in spec.groups:
        raise SpawnError("refusing to run a pod process as root")

    env = _env_map(spec.env)
    paths, searched = _candidates(spec.argv[0], env)
    argv = list(spec.argv)
    limits = _limit_plan(spec.rlimits)
    ceiling = _fd_ceiling()
    groups = list(spec.groups)

    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    stdio = [devnull if fd is None else fd for fd in (spec.stdin, spec.stdout, spec.stderr)]
    rfd, wfd = os.pipe()           # both close-on-exec
    # No signal handler of ours may run in the child: block everything
    # across the fork, and let the child reset before it unblocks.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    pid = -1
    try:
        pid = os.fork()
        if pid == 0:
            _child(spec, env, argv, paths, limits, groups, stdio, wfd, ceiling)
            os._exit(EXIT_SETUP_FAILED)   # not reached
    finally:
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            os.close(wfd)
            os.close(devnull)
            if pid < 0:
                os.close(rfd)
    try:
        report = b""
        while chunk := os.read(rfd, 256):
            report += chunk
    finally:
        os.close(rfd)
    if not report:
        token = proctrack.start_time(pid) or ""
        return Started(pid, pid, token)

    _, status = os.waitpid(pid, 0)
    raise _error(spec, report, status, searched)


def _error(spec: Spawn, report: bytes, status: int, searched: str | None) -> SpawnError:
    try:
        step, err, extra = (int(x) for x in report.split())
        name = _STEPS[step]
    except (ValueError, IndexError):
        return SpawnError(f"container process failed before exec: {report[:100]!r}")
    why = os.strerror(err) if err else "failed"
    if step == _VERIFY or os.waitstatus_to_exitcode(status) == EXIT_STILL_ROOT:
        msg = "ids did not change as asked or root could be regained: refusing to exec"
    elif step == _CHROOT:
        msg = f"chroot {spec.root}: {why}"
    elif step == _CHDIR:
        msg = f"chdir {spec.cwd} (inside the pod root): {why}"
    elif step in (_SETRLIMIT, _PRIVLIMITS) and extra < len(spec.rlimits):
        r = spec.rlimits[extra]
        msg = f"{name} {r.name} {r.soft}/{r.hard}: {why}"
    elif step == _EXEC:
        msg = f"exec {spec.argv[0]}: {why}"
        if searched is not None:
            msg += f" (searched PATH={searched} inside the pod root)"
    else:
        msg = f"{name}: {why}"
    return SpawnError(msg, name, err or None)


def _child(spec: Spawn, env: dict[str, str], argv: list[str], paths: list[str],
           limits: list[tuple], groups: list[int], stdio: list[int], ew: int,
           ceiling: int) -> None:
    """Runs in the forked child and never returns: execve or _exit."""
    step = extra = 0
    try:
        step = _SETSID
        os.setsid()

        step = _SIGNALS
        for sig in _RESET_SIGNALS:
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass      # not settable on this system
        signal.pthread_sigmask(signal.SIG_SETMASK, ())

        step = _NETWORK
        if spec.enter_network is not None:
            spec.enter_network()

        step = _STDIO
        # First lift every source above 3, so no dup2 below can overwrite
        # a source another one still needs; then 0-2 and the pipe on 3.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 4) for fd in (*stdio, ew)]
        for target in (0, 1, 2):
            os.dup2(high[target], target)           # inheritable
        os.dup2(high[3], 3, inheritable=False)
        ew = 3
        os.closerange(4, ceiling)

        step = _CHROOT
        os.chroot(spec.root)
        step = _CHDIR
        os.chdir(spec.cwd)

        step = _PRIVLIMITS
        refused = []
        for extra, res, wanted, clamped, cur_soft, above, early in limits:
            if above:
                try:
                    resource.setrlimit(res, (cur_soft, wanted[1]))
                except (ValueError, OSError):
                    refused.append(extra)
            if early:
                resource.setrlimit(res, clamped if extra in refused else wanted)
        extra = 0
        if spec.nice:
            os.setpriority(os.PRIO_PROCESS, 0, spec.nice)

        step = _SETGROUPS
        os.setgroups(groups)
        step = _SETRESGID
        os.setresgid(spec.gid, spec.gid, spec.gid)
        step = _SETRESUID
        os.setresuid(spec.uid, spec.uid, spec.uid)

        step = _VERIFY
        if (os.getresuid() != (spec.uid,) * 3 or os.getresgid() != (spec.gid,) * 3
                or 0 in os.getgroups() or not _cannot_regain_root()):
            _report(ew, step, errno.EPERM, 0)
            os._exit(EXIT_STILL_ROOT)

        step = _UMASK
        os.umask(spec.umask)
        step = _SETRLIMIT
        for extra, res, wanted, clamped, _, _, _ in limits:
            resource.setrlimit(res, clamped if extra in refused else wanted)
        extra = 0

        step = _EXEC
        err = errno.ENOENT
        for path in paths:
            try:
                os.execve(path, argv, env)
            except OSError as e:
                if e.errno == errno.EACCES:
                    err = e.errno           # remembered, as execvp does
                elif e.errno not in (errno.ENOENT, errno.ENOTDIR):
                    err = e.errno
                    break
        raise OSError(err, "exec")
    except BaseException as e:
        err = e.errno if isinstance(e, OSError) and e.errno else 0
        _report(ew, step, err, extra)
    finally:
        os._exit(EXIT_SETUP_FAILED)


def _cannot_regain_root() -> bool:
    for regain in (os.setuid, os.seteuid, os.setgid, os.setegid):
        try:
            regain(0)
        except PermissionError:
            continue
        return False
    return True


def _report(ew: int, step: int, err: int, extra: int) -> None:
    try:
        os.write(ew, b"%d %d %d" % (step, err, extra))
    except OSError:
        pass
