"""Per-pod uids: one uid per pod, used as its gid too, from the configured range.

A pod's uid is what keeps it from every other pod (their files, their
processes), so the pool guards three things:

- it never hands out 0, a uid outside [lo, hi], or a uid or gid the
  system already uses (checked once, when the pool is made: a range that
  overlaps /etc/passwd or /etc/group is refused, naming the clash);
- it never hands one uid to two pods: the table is written to the state
  dir (see statefile) on every change, before the caller acts on it;
- it never hands a new pod a uid that still has processes: a released
  pod may have left one behind (a daemonised child, a zombie not yet
  reaped), and a new pod with that uid could signal it or trace it.
  Uids are handed out round-robin from after the last one given, so a
  released uid rests as long as possible, and every candidate is checked
  with busy(uid) before it is given.

The key is the pod's metadata.uid, the one name of a pod that never
refers to another pod, not even to a later one with the same name.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import sys
from typing import Callable

from pufflet.priv import statefile
from pufflet.priv.statefile import StateError

__all__ = ["UidPool", "UidError", "StateError", "proc_busy", "check_pod_uid"]

# Kubernetes uids are UUIDs; the kubelet names static pods by a hex md5
# without dashes.  Either is a safe file name and map key.
_POD_UID = re.compile(r"[0-9a-fA-F]{8}(-?)[0-9a-fA-F]{4}\1[0-9a-fA-F]{4}\1"
                      r"[0-9a-fA-F]{4}\1[0-9a-fA-F]{12}\Z")
# (uid_t)-1 means "unchanged" to setresuid(2); stay well below it and
# below anything a signed 32-bit uid would mangle.
UID_MAX = 2**31 - 1
_VERSION = 1


class UidError(Exception):
    """A pool cannot be made or cannot give a uid; the message says why."""


def check_pod_uid(pod_uid: object) -> str:
    """pod_uid, if it looks like a Kubernetes metadata.uid."""
    if not isinstance(pod_uid, str) or not _POD_UID.match(pod_uid):
        raise UidError(f"invalid pod uid {pod_uid!r}: expected a UUID")
    return pod_uid


def proc_busy(uid: int) -> bool:
    """Whether any process has uid (or gid) as its real, effective, saved
    or filesystem id, from /proc (Linux).  Every id counts, not only the
    real one: a process holding the uid as saved id can switch back to it.

    Runs at every pod's creation over every process of the node, so it
    reads with os.read and looks for the two lines in the bytes: half the
    cost of reading text and walking all the lines."""
    want = str(uid).encode()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except FileNotFoundError:
        raise UidError("/proc is not mounted: cannot tell which uids have "
                       "processes; give UidPool a busy() check") from None
    for pid in pids:
        try:
            fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError):
            continue        # gone while we looked: not busy
        try:
            # Uid: and Gid: are among the first lines, well inside a page.
            data = os.read(fd, 4096)
        except ProcessLookupError:
            continue
        finally:
            os.close(fd)
        for key in (b"\nUid:", b"\nGid:"):
            i = data.find(key)
            if i >= 0 and want in data[i + len(key):data.find(b"\n", i + 1)].split():
                return True
    return False


def default_busy() -> Callable[[int], bool]:
    """The system's check: /proc on Linux, sysctl(2) KERN_PROC on OpenBSD."""
    if sys.platform.startswith("openbsd"):
        from pufflet.platform import openbsd_stats
        return openbsd_stats.uid_busy
    return proc_busy


class UidPool:
    """Uids [lo, hi] for pods, the table kept in the state file at path."""

    def __init__(self, path: str, lo: int, hi: int,
                 busy: Callable[[int], bool] | None = None) -> None:
        for what, v in (("lowest", lo), ("highest", hi)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise UidError(f"pod uid range: {what} uid {v!r} is not a number")
        if lo <= 0:
            raise UidError(f"pod uid range {lo}-{hi} includes 0 or less: pods "
                           "must never run as root")
        if hi < lo or hi > UID_MAX:
            raise UidError(f"pod uid range {lo}-{hi} is empty or goes past {UID_MAX}")
        self.path = path
        self.lo = lo
        self.hi = hi
        self.busy = busy if busy is not None else default_busy()
        _check_unused(lo, hi)
        self._pods: dict[str, int] = {}
        self._next = lo
        self._load()

    # -- the table -----------------------------------------------------------

    def _load(self) -> None:
        st = statefile.read_json(self.path, None)
        if st is None:
            return

        def bad(why: str) -> UidError:
            return UidError(f"{self.path}: corrupt pod uid table: {why}")

        if not isinstance(st, dict) or st.get("version") != _VERSION:
            raise bad(f"not a version {_VERSION} table")
        pods, nxt = st.get("pods"), st.get("next")
        if not isinstance(pods, dict) or not isinstance(nxt, int):
            raise bad("'pods' or 'next' missing")
        seen: dict[int, str] = {}
        for pod, uid in pods.items():
            if not isinstance(pod, str) or not _POD_UID.match(pod):
                raise bad(f"invalid pod uid {pod!r}")
            if not isinstance(uid, int) or isinstance(uid, bool) or not 0 < uid <= UID_MAX:
                raise bad(f"pod {pod}: invalid uid {uid!r}")
            if uid in seen:
                raise bad(f"uid {uid} given to both {seen[uid]} and {pod}")
            seen[uid] = pod
        # Uids outside a (changed) range stay allocated: their pods may be
        # running.  They are never handed out again; see out_of_range().
        self._pods = dict(pods)
        self._next = nxt if self.lo <= nxt <= self.hi else self.lo

    def _save(self) -> None:
        statefile.write_json(self.path, {"version": _VERSION, "next": self._next,
                                         "pods": self._pods})

    # -- the interface ---------------------------------------------------------

    def allocate(self, pod_uid: str) -> int:
        """The uid of pod_uid, given now if it has none yet."""
        check_pod_uid(pod_uid)
        if pod_uid in self._pods:
            return self._pods[pod_uid]
        taken = set(self._pods.values())
        size = self.hi - self.lo + 1
        busy = 0
        # Bounded by the range; in practice the first free candidate wins,
        # since the range is far larger than the pods a node runs.
        for i in range(size):
            uid = self.lo + (self._next - self.lo + i) % size
            if uid in taken:
                continue
            if self.busy(uid):
                busy += 1
                continue
            self._pods[pod_uid] = uid
            self._next = self.lo + (uid - self.lo + 1) % size
            try:
                self._save()
            except BaseException:
                del self._pods[pod_uid]
                raise
            return uid
        why = f"; {busy} free ones still have processes" if busy else ""
        raise UidError(f"pod uid range {self.lo}-{self.hi} is exhausted: "
                       f"{len(taken)} uids in use{why}")

    def release(self, pod_uid: str) -> None:
        """Forget pod_uid's uid.  Call it once the pod's processes are gone;
        the uid is not given again while busy() says it has processes."""
        check_pod_uid(pod_uid)
        uid = self._pods.pop(pod_uid, None)
        if uid is None:
            return
        try:
            self._save()
        except BaseException:
            self._pods[pod_uid] = uid
            raise

    def owner(self, uid: int) -> str | None:
        """The pod that has uid, if any."""
        for pod, u in self._pods.items():
            if u == uid:
                return pod
        return None

    def allocated(self) -> dict[str, int]:
        """pod uid -> uid, a copy."""
        return dict(self._pods)

    def out_of_range(self) -> dict[str, int]:
        """Pods whose uid lies outside [lo, hi]: the range was changed
        under them.  The caller decides their fate (stop, then release)."""
        return {p: u for p, u in self._pods.items() if not self.lo <= u <= self.hi}


def _check_unused(lo: int, hi: int) -> None:
    """Refuse a range holding a uid of /etc/passwd or a gid of /etc/group:
    a pod would own that user's files, or get that group's access."""
    clashes = [f"user {p.pw_name} (uid {p.pw_uid})" for p in pwd.getpwall()
               if lo <= p.pw_uid <= hi]
    clashes += [f"group {g.gr_name} (gid {g.gr_gid})" for g in grp.getgrall()
                if lo <= g.gr_gid <= hi]
    if clashes:
        more = f" and {len(clashes) - 3} more" if len(clashes) > 3 else ""
        raise UidError(f"pod uid range {lo}-{hi} overlaps "
                       f"{', '.join(clashes[:3])}{more}: choose a range no "
                       "account uses")
