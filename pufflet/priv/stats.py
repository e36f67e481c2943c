"""GetStats: what the node and each pod use, from the OS's own per-process
accounting (platform/linux_stats, platform/openbsd_stats).

Only the parent can do this: the agent runs as _pufflet and cannot see
other users' processes (nor /proc on OpenBSD, where there is none).

Attribution.  Every pod runs as its own uid, so "the pod" is every
process of that uid.  Containers and execs are spawned with setsid(2), so
each leads its own session, and a process belongs to a container when its
session is the container's (or one of the container's execs'): children,
process groups made by a shell, threads all stay in it.  A process that
calls setsid() itself leaves its container's figures but never its pod's.
Another uid's process is never counted, whatever its session.

Monotonic CPU.  A process's CPU time dies with it, so summing the live
processes would go backwards whenever one exits.  Each container (per
container_id: a restart starts a new count, as a new cgroup would) and
each pod keeps a CpuCounter: the last CPU time seen of each live process,
plus what the processes that have gone had when last seen.  CPU used
between the last sample and an exit is lost, and a process that lives
and dies between two samples is never seen: the agent samples every few
seconds (and at every scrape) to keep that small.  Counting the children's
times that the kernel adds to a parent at wait(2) would double count.

Disk.  A pod writes only to its /tmp and its volumes (podroot: the rest
of its root is root's), so its ephemeral usage is a du(1)-like walk of
those, bounded in entries and cached for DU_TTL seconds (the kubelet
measures volumes once a minute too), plus its container logs.
"""

from __future__ import annotations

import logging
import os
import stat as statmod
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

from pufflet.config import Config
from pufflet.logs.writer import container_log_dir
from pufflet.platform import procstat
from pufflet.platform.procstat import ProcSample
from pufflet.priv import podroot
from pufflet.priv.logger import pods_log_root
from pufflet.priv.volumes import VOLUMES
from pufflet.privsep.channel import Status

__all__ = ["CpuCounter", "StatsCollector", "collector_for", "du", "fs_usage"]

log = logging.getLogger("pufflet.priv.stats")

DU_TTL = 60.0
# Entries one walk may visit before it gives up and reports what it saw:
# a pod filling /tmp with millions of files must not stall the parent.
DU_MAX_ENTRIES = 200_000


class CpuCounter:
    """Cumulative CPU of a changing set of processes that never decreases."""

    def __init__(self) -> None:
        self.live: dict[tuple[int, str], int] = {}    # (pid, start) -> ns seen
        self.dead = 0

    def update(self, procs: list[ProcSample]) -> int:
        seen: dict[tuple[int, str], int] = {}
        for p in procs:
            key = (p.pid, p.start)
            # max(): a zombie's time is unknown (None) on OpenBSD, and
            # tick rounding must never take a process backwards.
            seen[key] = max(self.live.get(key, 0), p.cpu_ns or 0)
        for key, ns in self.live.items():
            if key not in seen:
                self.dead += ns
        self.live = seen
        return self.dead + sum(seen.values())


@dataclass
class _Du:
    at: float
    used: int
    inodes: int


def du(path: str, max_entries: int = DU_MAX_ENTRIES) -> tuple[int, int]:
    """(bytes allocated, inodes) under path, as du(1) counts: blocks, each
    hard-linked inode once, symlinks not followed, other file systems not
    entered.  A missing path is (0, 0)."""
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return 0, 0
    seen: set[int] = set()
    stack = [path] if statmod.S_ISDIR(top.st_mode) else []
    used, inodes, visited = top.st_blocks * 512, 1, 1
    while stack and visited < max_entries:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue        # removed meanwhile, or not ours to read
        with it:
            for e in it:
                visited += 1
                if visited >= max_entries:
                    log.warning("%s: more than %d entries; usage is a lower bound",
                                path, max_entries)
                    break
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_dev != top.st_dev:
                    continue
                if st.st_nlink > 1 and not statmod.S_ISDIR(st.st_mode):
                    if st.st_ino in seen:
                        continue
                    seen.add(st.st_ino)
                used += st.st_blocks * 512
                inodes += 1
                if statmod.S_ISDIR(st.st_mode):
                    stack.append(e.path)
    return used, inodes


def fs_usage(path: str) -> dict:
    """The file system holding path, as the kubelet's FsStats counts it."""
    st = os.statvfs(path)
    cap = st.f_blocks * st.f_frsize
    return {"capacity_bytes": cap, "available_bytes": st.f_bavail * st.f_frsize,
            "used_bytes": max(cap - st.f_bfree * st.f_frsize, 0),
            "inodes": st.f_files, "inodes_free": st.f_ffree,
            "inodes_used": max(st.f_files - st.f_ffree, 0)}


def _existing(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


@dataclass
class _Sums:
    cpu: list[ProcSample] = field(default_factory=list)
    rss: int = 0
    anon: int = 0


class StatsCollector:
    """One per daemon (collector_for): the counters must outlive an agent."""

    def __init__(self, cfg: Config, runtime=None, *, plat=None,
                 image_bytes: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.plat = plat
        self.image_bytes = image_bytes
        self.clock = clock
        self.containers: dict[str, CpuCounter] = {}    # container_id ->
        self.pods: dict[str, CpuCounter] = {}          # pod_uid ->
        self._du: dict[str, _Du] = {}

    def _plat(self):
        if self.plat is None:
            self.plat = procstat.current()
        return self.plat

    def _du_cached(self, path: str, now: float) -> tuple[int, int]:
        c = self._du.get(path)
        if c is None or now - c.at >= DU_TTL:
            used, inodes = du(path)
            c = self._du[path] = _Du(now, used, inodes)
        return c.used, c.inodes

    def get_stats(self, body: dict, fds: list[int]) -> dict:
        plat = self._plat()
        try:
            n = plat.node()
        except (OSError, ValueError, KeyError) as e:
            raise Status("UNAVAILABLE", f"node accounting: {e}") from None
        now = self.clock()
        node = {"time": now, "boot_time": n.boot_time, "cpu_usage_ns": n.cpu_ns,
                "memory_total_bytes": n.memory_total, "memory_usage_bytes": n.memory_usage,
                "memory_working_set_bytes": n.memory_working_set,
                "memory_available_bytes": n.memory_available,
                "fs": fs_usage(_existing(self.cfg.state_dir)),
                "image_fs": fs_usage(_existing(os.path.join(self.cfg.state_dir, "images"))),
                "log_fs": fs_usage(_existing(self.cfg.log_dir))}
        if n.memory_rss is not None:
            node["memory_rss_bytes"] = n.memory_rss
        if self.image_bytes is not None:
            try:
                node["image_fs"]["used_bytes"] = self.image_bytes()
            except Exception as e:      # the store is a nicety here, never fatal
                log.warning("image store size: %s", e)
        pods = self._pods(plat, now) if self.runtime is not None else []
        return {"node": node, "pods": pods}

    def _pods(self, plat, now: float) -> list[dict]:
        rt = self.runtime
        by_uid = {pod["uid"]: uid for uid, pod in rt.pods.items()}
        try:
            procs = plat.processes(set(by_uid))
        except OSError as e:
            raise Status("UNAVAILABLE", f"process accounting: {e}") from None
        per_pod: dict[str, list[ProcSample]] = {}
        for p in procs:
            pod_uid = by_uid.get(p.uid)
            if pod_uid is not None:
                per_pod.setdefault(pod_uid, []).append(p)
        # Sessions: a running container's pid, and its execs', name it.
        sessions: dict[tuple[str, int], str] = {}
        for pid, pr in list(rt.procs.items()):
            c = rt.pods.get(pr.pod_uid, {}).get("containers", {}).get(pr.name)
            if c is not None and c.get("running") and c["container_id"] == pr.container_id:
                sessions[(pr.pod_uid, pid)] = c["container_id"]
        out, live_ids = [], set()
        for pod_uid, pod in rt.pods.items():
            mine = per_pod.get(pod_uid, [])
            by_cid: dict[str, list[ProcSample]] = {}
            for p in mine:
                cid = sessions.get((pod_uid, p.sid))
                if cid is not None:
                    by_cid.setdefault(cid, []).append(p)
            containers = []
            for name, c in pod["containers"].items():
                if not c.get("running"):
                    continue
                cid = c["container_id"]
                live_ids.add(cid)
                cp = by_cid.get(cid, [])
                counter = self.containers.setdefault(cid, CpuCounter())
                ldir = container_log_dir(pods_log_root(self.cfg.log_dir), pod["namespace"],
                                         pod["name"], pod_uid, name)
                lused, linodes = du(ldir, 10_000)
                containers.append({
                    "name": name, "container_id": cid, "start_time": c["started_at"],
                    "cpu_usage_ns": counter.update(cp),
                    "memory_working_set_bytes": sum(p.rss_bytes for p in cp),
                    "memory_rss_bytes": sum(p.anon_bytes for p in cp),
                    "processes": len(cp),
                    "logs_used_bytes": lused, "logs_inodes_used": linodes})
            root = os.path.join(rt.pods_dir, pod_uid, podroot.ROOT)
            rused, rinodes = self._du_cached(os.path.join(root, "tmp"), now)
            vols = []
            for vname, v in pod.get("volumes", {}).items():
                if v.get("kind") == "hostPath":
                    continue        # the host's, not the pod's ephemeral storage
                used, inodes = self._du_cached(os.path.join(root, VOLUMES, vname), now)
                vols.append({"name": vname, "used_bytes": used, "inodes_used": inodes})
            pdir = os.path.dirname(container_log_dir(pods_log_root(self.cfg.log_dir),
                                                     pod["namespace"], pod["name"],
                                                     pod_uid, "x"))
            pused, pinodes = du(pdir, 10_000)
            starts = [c["started_at"] for c in pod["containers"].values()
                      if c.get("started_at")]
            entry = {"pod_uid": pod_uid, "namespace": pod["namespace"], "name": pod["name"],
                     "cpu_usage_ns": self.pods.setdefault(pod_uid, CpuCounter()).update(mine),
                     "memory_working_set_bytes": sum(p.rss_bytes for p in mine),
                     "memory_rss_bytes": sum(p.anon_bytes for p in mine),
                     "processes": len(mine), "containers": containers, "volumes": vols,
                     "rootfs_used_bytes": rused, "rootfs_inodes_used": rinodes,
                     "logs_used_bytes": pused, "logs_inodes_used": pinodes}
            if starts:
                entry["start_time"] = min(starts)
            out.append(entry)
        # Forget what ended: a container that runs again has a new id.
        for cid in set(self.containers) - live_ids:
            del self.containers[cid]
        for pod_uid in set(self.pods) - set(rt.pods):
            del self.pods[pod_uid]
        for path in [p for p, c in self._du.items() if now - c.at >= 4 * DU_TTL]:
            del self._du[path]
        return out


# One collector per PodRuntime (so per daemon), whichever agent asks.
_COLLECTORS: "weakref.WeakKeyDictionary[object, StatsCollector]" = weakref.WeakKeyDictionary()
_NO_PODS: dict[str, StatsCollector] = {}


def collector_for(cfg: Config, runtime, image_bytes: Callable[[], int] | None = None
                  ) -> StatsCollector:
    if runtime is None:
        return _NO_PODS.setdefault(cfg.state_dir, StatsCollector(cfg, None,
                                                                 image_bytes=image_bytes))
    c = _COLLECTORS.get(runtime)
    if c is None:
        c = _COLLECTORS[runtime] = StatsCollector(cfg, runtime, image_bytes=image_bytes)
    return c
