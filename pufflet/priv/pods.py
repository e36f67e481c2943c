"""The parent's pods: their roots, uids, volumes and processes, and the
handlers of the spec's pod methods.

One PodRuntime per daemon (not per agent connection): pods outlive any
agent.  Everything here runs on the parent's single selector thread.

State that must survive a restart is in <state_dir>/pods.json (see
statefile), rewritten on every change before the answer goes out:

    {"version": 1, "pods": {pod_uid: {namespace, name, uid, hostname, images,
        host_network, dev_missing_reason, volumes: {name: {kind, writable,
        size_limit}}, containers: {name: {container_id, restart_count,
        image, pid, start_time, started_at, running, exit_code, signal,
        finished_at, reason, rlimits, nice}}}}}

A container process is named by (pid, start_time token): see proctrack.
On start the runtime re-adopts every container the file says is running
and still is; one that ended meanwhile is recorded as exited, with the
status if the OS could tell (OpenBSD's kqueue can, Linux cannot).

Execs are not recorded in the file: they are the node API's sessions,
which do not outlive the agent that carries them; RemovePod still kills
them, as it kills every process of the pod's uid.

Container output never passes through this process: the pipes go to the
logger (priv/logger.py), which outlives us.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import secrets
import signal
import termios
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

from pufflet.config import Config
from pufflet.priv import podroot, proctrack, rlimits, statefile, volumes
from pufflet.priv.netplan import HostPort, NetPlanError
from pufflet.priv.podnet import NetError, PodNetworks
from pufflet.priv.podroutes import PodRoutes
from pufflet.priv.portforward import PortForwarder
from pufflet.priv.logger import LoggerClient, LoggerError
from pufflet.priv.proctrack import Exited, ProcessWatcher
from pufflet.priv.rlimits import Rlimit
from pufflet.priv.spawn import Spawn, SpawnError, spawn
from pufflet.priv.statefile import StateError
from pufflet.priv.uids import UidError, UidPool
from pufflet.privsep import drop
from pufflet.privsep.channel import Status

__all__ = ["PodRuntime", "kill_uid"]

log = logging.getLogger("pufflet.priv.pods")

_VERSION = 1
# Events kept per watcher while nobody reads them; beyond, the oldest go
# (ListPods still tells the outcome: state is the truth, events the hint).
MAX_QUEUED = 10000
# RemovePod: how long to wait for SIGKILLed processes to be gone.
KILL_WAIT = 5.0
# An image's last use (for the image GC's LRU order) is written to the
# store at most this often: each write is a locked, fsynced rewrite of the
# store's table, and a burst of pods from one image would otherwise pay
# it twice a pod.  GC runs every 5 minutes and spares images in use.
TOUCH_EVERY = 60.0

_SIGNALS = {name: getattr(signal, name) for name in (
    "SIGTERM", "SIGKILL", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2",
    "SIGWINCH", "SIGSTOP", "SIGCONT")}


@dataclass
class _Proc:
    """A process we watch: a container's, or an exec's."""
    pod_uid: str
    name: str
    container_id: str
    start_time: str
    exec_id: str | None = None


def kill_uid(uid: int, gid: int, rounds: int = 3) -> None:
    """SIGKILL every process running as uid.

    A process that is the uid may signal exactly the processes of that uid
    (kill(2): the sender's real or effective uid must match the target's
    real or saved uid; OpenBSD's kill(-1) likewise), so a child that drops
    to uid and calls kill(-1, SIGKILL) reaches every process of the pod and
    nothing else, on any system, without a process table to scan.  Rounds
    catch processes forked while the first kill went round.  Whether any
    is left cannot be told from kill(-1)'s answer (Linux returns success
    when it signalled none): ask the uid pool's busy()."""
    if uid <= 0 or gid <= 0:
        raise ValueError("refusing to kill as root")
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            for _ in range(rounds):
                try:
                    os.kill(-1, signal.SIGKILL)
                except ProcessLookupError:
                    break
        finally:
            os._exit(0)
    while True:
        try:
            os.waitpid(pid, 0)
            return
        except ChildProcessError:       # reaped by the daemon's waitpid(-1)
            return
        except InterruptedError:
            continue


def _agent_gid(cfg: Config) -> int | None:
    """The agent's group, which reads container logs for the node API."""
    try:
        return drop.lookup(cfg.user).gid
    except drop.DropError:
        return None


class PodRuntime:
    def __init__(self, cfg: Config, store_opener: Callable[[], object],
                 watcher: ProcessWatcher | None = None,
                 logger: LoggerClient | None = None,
                 uids: UidPool | None = None,
                 net: PodNetworks | None = None) -> None:
        self.cfg = cfg
        self._open_store = store_opener
        self._store = None
        self._touched: dict[str, float] = {}    # digest -> monotonic time of last touch
        self.watcher = watcher if watcher is not None else ProcessWatcher()
        self.logger = logger if logger is not None else LoggerClient(
            cfg.state_dir, cfg.log_dir, gid=_agent_gid(cfg))
        self.pods_dir = os.path.join(cfg.state_dir, "pods")
        os.makedirs(self.pods_dir, 0o700, exist_ok=True)
        self.state_path = os.path.join(cfg.state_dir, "pods.json")
        self.uids = uids if uids is not None else UidPool(
            os.path.join(cfg.state_dir, "uids.json"), cfg.pod_uid_min, cfg.pod_uid_max)
        self.pods: dict[str, dict] = self._load()
        # Pod networks (priv/podnet.py): set up the node side again now,
        # so that re-adopted pods keep working.
        self.net = net if net is not None else PodNetworks(
            cfg.state_dir, cfg.pod_network.cidr, cfg.pod_network.egress,
            no_nat=[c for c in cfg.pod_routes if ":" not in c])
        # Routes to other nodes' pods ('pod routes'): removed here when
        # the configuration no longer asks for them.
        self.routes = PodRoutes(cfg.state_dir, cfg.pod_routes, self.net.backend,
                                lambda: self.net.cidr(None))
        self.procs: dict[int, _Proc] = {}
        # container_id -> its stdin as attach writes to it: the write end of
        # its stdin pipe (stdin: true) or its pty master (tty: true).  Held
        # here for the container's life, so that its stdin stays open
        # between attaches, as the kubelet's runtimes keep it; not in the
        # state file (an fd does not survive a restart of pufflet).
        self.attach_fds: dict[str, _Attach] = {}
        self._subscribers: list[deque] = []
        # Called when an event is queued: the Supervisor wakes parked streams.
        self.waker: Callable[[], None] | None = None
        # The daemon's waitpid(-1) loop (it hands our children back through
        # child_exited): RemovePod runs it while it waits for processes,
        # since a zombie still counts as a process of the pod's uid.
        self.reaper: Callable[[], None] | None = None
        # kubectl port-forward's dialers: our children too, so their exits
        # come through child_exited, and the daemon's loop runs expire().
        self.forwarder = PortForwarder(self)
        self._adopt()
        removed = podroot.sweep(self.pods_dir, self.pods)
        for name in removed:
            log.info("removed leftover pod directory %s", name)
        # Uids of pods we no longer know (a crash between steps of a
        # removal): released, since nothing of theirs is left to run.
        for pod_uid in set(self.uids.allocated()) - set(self.pods):
            self.uids.release(pod_uid)
        # Likewise networks: a crash between the plan and pods.json, or a
        # teardown that failed, leaves interfaces and an allocation.
        self.net.sweep(self.pods)

    # -- state ----------------------------------------------------------------

    def _load(self) -> dict:
        st = statefile.read_json(self.state_path, None)
        if st is None:
            return {}
        if not isinstance(st, dict) or st.get("version") != _VERSION \
                or not isinstance(st.get("pods"), dict):
            raise StateError(f"{self.state_path}: not a version {_VERSION} pod table")
        return st["pods"]

    def _save(self) -> None:
        statefile.write_json(self.state_path, {"version": _VERSION, "pods": self.pods})

    def _adopt(self) -> None:
        """Follow again every container the state says runs."""
        for pod_uid, pod in self.pods.items():
            for name, c in pod["containers"].items():
                if not c.get("running"):
                    continue
                self.procs[c["pid"]] = _Proc(pod_uid, name, c["container_id"],
                                             c["start_time"])
                self.watcher.watch(c["pid"], c["start_time"], own_child=False)
        self.poll()     # those already gone are recorded now

    def private_fds(self) -> list[int]:
        """fds a forked agent must close: the logger's socket, the watcher."""
        fds = [self.watcher.fileno()]
        if self.logger.fileno() >= 0:
            fds.append(self.logger.fileno())
        fds += [a.fd for a in self.attach_fds.values()]
        return fds

    def close(self) -> None:
        """Let go of fds (the processes keep running)."""
        self.watcher.close()
        self.logger.close()
        for cid in list(self.attach_fds):
            self._drop_attach(cid)

    def _drop_attach(self, container_id: str) -> None:
        a = self.attach_fds.pop(container_id, None)
        if a is not None:
            os.close(a.fd)

    def _store_get(self):
        if self._store is None:
            self._store = self._open_store()
        return self._store

    def _touch(self, digest: str) -> None:
        """Note a use of the image in the store, unless done in the last
        TOUCH_EVERY seconds."""
        now = time.monotonic()
        if now - self._touched.get(digest, -TOUCH_EVERY) < TOUCH_EVERY:
            return
        self._store_get().touch(digest)
        self._touched[digest] = now

    def images_in_use(self) -> set[str]:
        return {d for pod in self.pods.values() for d in pod["images"]}

    def _pod(self, pod_uid: str) -> dict:
        pod = self.pods.get(pod_uid)
        if pod is None:
            raise Status("NOT_FOUND", f"no pod {pod_uid}")
        return pod

    def _pod_dir(self, pod_uid: str) -> str:
        return os.path.join(self.pods_dir, pod_uid)

    def _root(self, pod_uid: str) -> str:
        return os.path.join(self._pod_dir(pod_uid), podroot.ROOT)

    # -- exits and events -------------------------------------------------------

    def fileno(self) -> int:
        """Readable when a watched process may have ended: call poll()."""
        return self.watcher.fileno()

    def poll(self) -> None:
        for ex in self.watcher.reap():
            self._exited(ex)

    def child_exited(self, pid: int, status: int) -> None:
        """A child reaped by someone else's waitpid(-1) (the Supervisor's)."""
        p = self.procs.get(pid)
        if p is None:
            # A port-forward dialer (its stream is waiting for this), or
            # the logger's first fork, a killer: nothing to report.
            self.forwarder.child_exited(pid, status)
            return
        self.watcher.unwatch(pid)
        self._exited(Exited(pid, p.start_time, status, ""))

    def _exited(self, ex: Exited) -> None:
        p = self.procs.pop(ex.pid, None)
        if p is None:
            return
        now = time.time()
        if ex.status is None:
            code = sig = None
            reason = ex.reason or "exit status unknown"
        else:
            code, sig = ex.exit_code, ex.signal
            reason = (f"killed by signal {sig}" if sig is not None
                      else f"exited with status {code}")
        ev = {"pod_uid": p.pod_uid, "name": p.name, "container_id": p.container_id,
              "finished_at": now, "reason": reason}
        if code is not None:
            ev["exit_code"] = code
        if sig is not None:
            ev["signal"] = sig
        if p.exec_id is not None:
            ev["exec_id"] = p.exec_id
        else:
            # Its stdin goes with it (a pty master: the logger has its own).
            self._drop_attach(p.container_id)
            c = self.pods.get(p.pod_uid, {}).get("containers", {}).get(p.name)
            if c is not None and c["container_id"] == p.container_id:
                c.update(running=False, finished_at=now, reason=reason)
                c.pop("exit_code", None)
                c.pop("signal", None)
                c.update({k: ev[k] for k in ("exit_code", "signal") if k in ev})
                self._save()
        log.info("pod %s container %s%s: %s", p.pod_uid, p.name,
                 f" exec {p.exec_id}" if p.exec_id else "", reason)
        self._emit(ev)

    def _emit(self, ev: dict) -> None:
        for q in self._subscribers:
            q.append(ev)
            if len(q) > MAX_QUEUED:
                q.popleft()
        if self._subscribers and self.waker is not None:
            self.waker()

    # -- handlers -------------------------------------------------------------

    def table(self) -> dict[str, Callable]:
        return {"CreatePod": self.create_pod, "SetVolume": self.set_volume,
                "StartContainer": self.start_container,
                "SignalContainer": self.signal_container, "RemovePod": self.remove_pod,
                "ListPods": self.list_pods, "WatchContainers": self.watch_containers,
                "StartExec": self.start_exec, "SignalExec": self.signal_exec,
                "AttachContainer": self.attach_container,
                "SetPodRoutes": self.routes.set_pod_routes}

    def create_pod(self, body: dict, fds: list[int]) -> dict:
        pod_uid = body["pod_uid"]
        images = list(dict.fromkeys(body["images"]))
        pod = self.pods.get(pod_uid)
        if pod is not None:
            if pod["images"] != images:
                raise Status("FAILED_PRECONDITION", f"pod {pod_uid} exists with other "
                             "images; remove it first")
            return self._pod_info(pod_uid, pod)
        if not images:
            raise Status("INVALID_ARGUMENT", "a pod needs at least one image")
        store = self._store_get()
        rootfs = []
        for digest in images:
            img = store.get(digest)
            if img is None:
                raise Status("NOT_FOUND", f"image {digest} is not in the store")
            rootfs.append(img.rootfs)
        try:
            uid = self.uids.allocate(pod_uid)
        except UidError as e:
            raise Status("RESOURCE_EXHAUSTED", str(e)) from None
        pod_dir = self._pod_dir(pod_uid)
        host_ports: list[HostPort] = []
        addr = None
        try:
            podroot.remove(pod_dir)     # a build cut short before it was recorded
            # The network first: /etc/hosts maps the pod's names to its address.
            if not body["host_network"]:
                host_ports = [HostPort(h["host_port"], h["container_port"], h["protocol"],
                                       h.get("host_ip")) for h in body.get("host_ports", ())]
                addr = self.net.setup(pod_uid, body.get("pod_cidr"), host_ports)
            hosts = [(h["ip"], h["names"]) for h in body["hosts"]]
            if body.get("own_names"):
                hosts.append((addr.ip if addr is not None else "127.0.0.1",
                              body["own_names"]))
            pr = podroot.build(rootfs, pod_dir, uid, uid, hostname=body["hostname"],
                               hosts_entries=hosts, resolv_conf=body["resolv_conf"])
            for digest in images:
                self._touch(digest)
            pod = {"namespace": body["namespace"], "name": body["name"], "uid": uid,
                   "hostname": body["hostname"], "images": images,
                   "host_network": body["host_network"],
                   "pod_ip": addr.ip if addr is not None else "",
                   "host_ports": [[h.host_port, h.container_port, h.protocol, h.host_ip]
                                  for h in host_ports],
                   "dev_missing_reason": pr.dev_missing_reason or "",
                   "volumes": {}, "containers": {}}
            self.pods[pod_uid] = pod
            self._save()
        except (podroot.PodRootError, NetError, NetPlanError) as e:
            self._undo_create(pod_uid, pod_dir)
            code = (e.code if isinstance(e, NetError) else
                    "INVALID_ARGUMENT" if isinstance(e, NetPlanError) else
                    "FAILED_PRECONDITION")
            raise Status(code, str(e)) from None
        except BaseException:
            self._undo_create(pod_uid, pod_dir)
            raise
        log.info("pod %s/%s (%s): root built, uid %d%s", body["namespace"], body["name"],
                 pod_uid, uid, f", address {addr.ip}" if addr is not None else "")
        return self._pod_info(pod_uid, pod)

    def _undo_create(self, pod_uid: str, pod_dir: str) -> None:
        """Take back a CreatePod that failed halfway: the record, the
        network (rolled back already if its own setup failed), the root,
        the uid."""
        if self.pods.pop(pod_uid, None) is not None:
            try:
                self._save()
            except StateError as e:
                log.error("pod %s: %s", pod_uid, e)
        try:
            self.net.teardown(pod_uid)
        except NetError as e:
            log.error("%s; the next start sweeps it", e)
        try:
            podroot.remove(pod_dir)
        finally:
            self.uids.release(pod_uid)

    @staticmethod
    def _pod_info(pod_uid: str, pod: dict) -> dict:
        return {"pod_uid": pod_uid, "uid": pod["uid"],
                "dev_missing_reason": pod["dev_missing_reason"],
                "pod_ip": pod.get("pod_ip", "")}

    def network_entry(self, pod_uid: str) -> Callable[[], None] | None:
        """What a process forked for pod_uid calls first, as root, to join
        the pod's network: setns(2) into its netns on Linux, setrtable(2)
        into its rdomain on OpenBSD.  None for pods on the node's network
        (hostNetwork, or no pod CIDR).  Made here, in the parent, so that
        the forked child only makes the system call."""
        pod = self._pod(pod_uid)
        if pod.get("host_network") or not pod.get("pod_ip"):
            return None
        entry = self.net.entry(pod_uid)
        if entry is None:
            raise Status("INTERNAL", f"pod {pod_uid} has address {pod['pod_ip']} "
                         "but no network")
        return entry

    def enter_pod_network(self, pod_uid: str) -> None:
        """Move the calling process into pod_uid's network; for a child
        forked by the parent (port-forward's dialer), never the parent
        itself.  Raises Status NOT_FOUND for an unknown pod."""
        entry = self.network_entry(pod_uid)
        if entry is not None:
            entry()

    def set_volume(self, body: dict, fds: list[int]) -> dict:
        pod_uid, name, kind = body["pod_uid"], body["name"], body["kind"]
        pod = self._pod(pod_uid)
        had = pod["volumes"].get(name)
        if had is not None and had["kind"] != kind:
            raise Status("FAILED_PRECONDITION", f"volume {name} is a {had['kind']} "
                         f"volume, not {kind}")
        root, uid = self._root(pod_uid), pod["uid"]
        try:
            if kind == "hostPath":
                volumes.check_host_path(body.get("host_path"), body["writable"],
                                        self.cfg.hostpaths)
            elif kind == "emptyDir":
                volumes.set_empty_dir(root, name, uid, uid, body["writable"])
            else:
                volumes.set_files(root, name, uid, body["files"])
        except volumes.VolumeError as e:
            raise Status(e.code, str(e)) from None
        pod["volumes"][name] = {"kind": kind, "writable": body["writable"],
                                "size_limit": body.get("size_limit")}
        self._save()
        return {}

    def start_container(self, body: dict, fds: list[int]) -> dict:
        pod_uid, name = body["pod_uid"], body["name"]
        pod = self._pod(pod_uid)
        if not body["argv"] or not body["argv"][0]:
            raise Status("INVALID_ARGUMENT", "argv is empty: nothing to run")
        if body["image"] not in pod["images"]:
            raise Status("INVALID_ARGUMENT", f"image {body['image']} is not one of the "
                         "pod's (CreatePod names them all)")
        old = pod["containers"].get(name)
        if old is not None and old["running"]:
            if old["restart_count"] == body["restart_count"]:
                return {"container_id": old["container_id"], "pid": old["pid"],
                        "started_at": old["started_at"]}   # a retried request
            raise Status("FAILED_PRECONDITION", f"container {name} is still running "
                         f"(pid {old['pid']}): stop it first")
        root, uid = self._root(pod_uid), pod["uid"]
        assert uid > 0
        try:
            for m in body["mounts"]:
                if m["volume"] not in pod["volumes"]:
                    raise volumes.VolumeError("FAILED_PRECONDITION",
                                              f"volume {m['volume']} has not been set up")
                volumes.mount(root, m["volume"], m["path"])
            _workdir(root, body["working_dir"])
        except volumes.VolumeError as e:
            raise Status(e.code, str(e)) from None
        plan = _plan(body["limits"])
        container_id = "pufflet://" + secrets.token_hex(32)
        started = self._spawn_logged(pod_uid, pod, name, body["restart_count"],
                                     container_id, Spawn(
            argv=tuple(body["argv"]), env=tuple(body["env"]), root=root, uid=uid,
            gid=uid, cwd=body["working_dir"], rlimits=plan.rlimits, nice=plan.nice,
            enter_network=self.network_entry(pod_uid)), body["stdin"], body["tty"],
            body.get("stdin_once", False))
        now = time.time()
        pod["containers"][name] = {
            "container_id": container_id, "restart_count": body["restart_count"],
            "image": body["image"], "pid": started.pid, "start_time": started.start_time,
            "started_at": now, "running": True, "reason": "",
            "rlimits": [[r.name, r.soft, r.hard] for r in plan.rlimits],
            "nice": plan.nice}
        self.procs[started.pid] = _Proc(pod_uid, name, container_id, started.start_time)
        self.watcher.watch(started.pid, started.start_time, own_child=True)
        self._save()
        try:
            self._touch(body["image"])
        except Exception as e:      # LRU bookkeeping only: never fails a start
            log.warning("image %s: cannot note its use: %s", body["image"], e)
        log.info("pod %s container %s started, pid %d", pod_uid, name, started.pid)
        return {"container_id": container_id, "pid": started.pid, "started_at": now}

    def _spawn_logged(self, pod_uid: str, pod: dict, name: str, restart: int,
                      container_id: str, spec: Spawn, stdin: bool = False,
                      tty: bool = False, stdin_once: bool = False):
        """spawn with its output on pipes whose read ends the logger holds.

        stdin: false: /dev/null.  stdin: true: a pipe whose write end we
        keep for attach (the container sees EOF only when it ends).
        tty: true: a pty, the container's controlling terminal on its
        stdin, stdout and stderr, as runc gives one; the logger reads the
        master (so everything is stdout, as the kubelet logs a tty) and we
        keep the master for attach's input and window size."""
        here: list[int] = []        # closed when we return
        keep = -1                   # attach's, on success
        try:
            if tty:
                keep, slave = os.openpty()
                here.append(slave)
                out_r = os.dup(keep)
                err_r, err_w = os.pipe()
                os.close(err_w)     # a terminal has one output: stderr ends at once
                child = dict(stdin=slave, stdout=slave, stderr=slave,
                             enter_network=functools.partial(_tty_and_network, slave,
                                                             spec.enter_network))
            else:
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                here += [out_w, err_w]
                child = dict(stdout=out_w, stderr=err_w)
                if stdin:
                    in_r, keep = os.pipe()
                    here.append(in_r)
                    child["stdin"] = in_r
            try:
                self.logger.add(container_id, pod["namespace"], pod["name"], pod_uid,
                                name, restart, out_r, err_r)
            except LoggerError as e:
                raise Status("UNAVAILABLE", f"container logs: {e}") from None
            finally:
                os.close(out_r)
                os.close(err_r)
            try:
                started = spawn(Spawn(**{**_fields(spec), **child}))
            except SpawnError as e:
                raise Status("FAILED_PRECONDITION", str(e)) from None
        except BaseException:
            if keep >= 0:
                os.close(keep)
            raise
        finally:
            for fd in here:
                os.close(fd)
        if keep >= 0:
            self.attach_fds[container_id] = _Attach(keep, tty, stdin, stdin_once)
        return started

    def _running(self, pod_uid: str, name: str) -> dict:
        c = self._pod(pod_uid)["containers"].get(name)
        if c is None or not c["running"] or c["pid"] not in self.procs \
                or not proctrack.is_same(c["pid"], c["start_time"]):
            raise Status("NOT_FOUND", f"container {name} of pod {pod_uid} is not running")
        return c

    def signal_container(self, body: dict, fds: list[int]) -> dict:
        c = self._running(body["pod_uid"], body["name"])
        try:
            # The container leads its own process group (spawn's setsid).
            os.kill(-c["pid"], _SIGNALS[body["signal"]])
        except ProcessLookupError:
            raise Status("NOT_FOUND", f"container {body['name']} is not running") from None
        return {}

    def remove_pod(self, body: dict, fds: list[int]) -> dict:
        pod_uid = body["pod_uid"]
        pod = self.pods.get(pod_uid)
        uid = pod["uid"] if pod is not None else self.uids.allocated().get(pod_uid)
        if uid is not None:
            self._kill_pod(pod_uid, uid)
        for c in (pod or {}).get("containers", {}).values():
            self._drop_attach(c["container_id"])
        try:
            # After the kill: no process of the pod holds its netns now.
            self.net.teardown(pod_uid)
        except NetError as e:
            raise Status(e.code, str(e)) from None
        try:
            podroot.remove(self._pod_dir(pod_uid))
        except podroot.PodRootError as e:
            raise Status("INTERNAL", str(e)) from None
        if pod is not None:
            del self.pods[pod_uid]
            self._save()
        self.uids.release(pod_uid)
        if pod is not None:
            log.info("pod %s/%s (%s) removed", pod["namespace"], pod["name"], pod_uid)
        return {}

    def _kill_pod(self, pod_uid: str, uid: int) -> None:
        """SIGKILL the pod's process groups, then every process of its uid,
        and wait (bounded) until they are gone."""
        for pid, p in list(self.procs.items()):
            if p.pod_uid == pod_uid and proctrack.is_same(pid, p.start_time):
                try:
                    os.kill(-pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + KILL_WAIT
        while True:
            kill_uid(uid, uid)
            # Our own children stay zombies until reaped, and a zombie is
            # still a process of the uid: reap them (this records exits).
            if self.reaper is not None:
                self.reaper()
            self.poll()
            mine = [pid for pid, p in self.procs.items() if p.pod_uid == pod_uid]
            busy = self.uids.busy(uid)
            if (not busy and not mine) or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        if mine or busy:
            log.warning("pod %s: processes of uid %d still there %.0fs after SIGKILL "
                        "(zombies nobody reaps?); removing the pod anyway", pod_uid, uid,
                        KILL_WAIT)
            for pid in mine:
                self.watcher.unwatch(pid)
                self.procs.pop(pid, None)

    def list_pods(self, body: dict, fds: list[int]) -> dict:
        out = []
        for pod_uid, pod in self.pods.items():
            cs = []
            for name, c in pod["containers"].items():
                running = bool(c["running"]) and proctrack.is_same(c["pid"],
                                                                   c["start_time"])
                st = {"name": name, "container_id": c["container_id"],
                      "restart_count": c["restart_count"], "pid": c["pid"],
                      "started_at": c["started_at"], "running": running,
                      "reason": c.get("reason", "")}
                for k in ("exit_code", "signal", "finished_at", "image"):
                    if c.get(k) is not None:
                        st[k] = c[k]
                cs.append(st)
            out.append({"pod_uid": pod_uid, "namespace": pod["namespace"],
                        "name": pod["name"], "uid": pod["uid"],
                        "pod_ip": pod.get("pod_ip", ""), "containers": cs})
        return {"pods": out}

    def watch_containers(self, body: dict, fds: list[int]) -> Iterator[dict | None]:
        q: deque = deque()
        self._subscribers.append(q)
        return self._events(q)

    def _events(self, q: deque) -> Iterator[dict | None]:
        try:
            while True:
                # None parks the stream until _emit wakes it.
                yield q.popleft() if q else None
        finally:
            self._subscribers.remove(q)

    def start_exec(self, body: dict, fds: list[int]) -> tuple[dict, list[int]]:
        pod_uid, name = body["pod_uid"], body["name"]
        pod = self._pod(pod_uid)
        c = self._running(pod_uid, name)
        if not body["argv"] or not body["argv"][0]:
            raise Status("INVALID_ARGUMENT", "argv is empty: nothing to run")
        uid = pod["uid"]
        assert uid > 0
        net = self.network_entry(pod_uid)
        spec = dict(argv=tuple(body["argv"]), env=tuple(body["env"]),
                    root=self._root(pod_uid), uid=uid, gid=uid, cwd=body["working_dir"],
                    rlimits=tuple(Rlimit(*r) for r in c["rlimits"]), nice=c["nice"],
                    enter_network=net)
        ours: list[int] = []        # fds that stay here, closed below
        back: list[int] = []        # fds for the agent
        try:
            if body["tty"]:
                master, slave = os.openpty()
                ours.append(slave)
                back += [master, os.dup(master), os.dup(master)]
                spec.update(stdin=slave, stdout=slave, stderr=slave,
                            # Runs in the child right after setsid: the pty
                            # becomes its controlling terminal, so ^C works.
                            enter_network=functools.partial(_tty_and_network, slave, net))
            else:
                in_r, in_w = os.pipe()
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                ours += [in_r, out_w, err_w]
                back += [in_w, out_r, err_r]
                spec.update(stdin=in_r, stdout=out_w, stderr=err_w)
            try:
                started = spawn(Spawn(**spec))
            except SpawnError as e:
                raise Status("FAILED_PRECONDITION", str(e)) from None
        except BaseException:
            for fd in back:
                os.close(fd)
            raise
        finally:
            for fd in ours:
                os.close(fd)
        exec_id = secrets.token_hex(16)
        self.procs[started.pid] = _Proc(pod_uid, name, c["container_id"],
                                        started.start_time, exec_id)
        self.watcher.watch(started.pid, started.start_time, own_child=True)
        log.info("pod %s container %s: exec %s pid %d", pod_uid, name, exec_id, started.pid)
        return {"exec_id": exec_id, "pid": started.pid}, back


    def signal_exec(self, body: dict, fds: list[int]) -> dict:
        """An exec's process group (spawn's setsid made the exec its
        leader), so that what it started goes too: an exec probe past its
        timeout must not linger, as the kubelet's ExecSync kills it."""
        for pid, p in self.procs.items():
            if p.exec_id == body["exec_id"] and p.pod_uid == body["pod_uid"]:
                if not proctrack.is_same(pid, p.start_time):
                    break
                try:
                    os.kill(-pid, _SIGNALS[body["signal"]])
                except ProcessLookupError:
                    break
                return {}
        raise Status("NOT_FOUND", f"exec {body['exec_id']} of pod {body['pod_uid']} "
                     "is not running")
    def attach_container(self, body: dict, fds: list[int]) -> tuple[dict, list[int]]:
        """A dup of the running container's stdin (pipe write end or pty
        master) for kubectl attach."""
        pod_uid, name = body["pod_uid"], body["name"]
        c = self._running(pod_uid, name)
        a = self.attach_fds.get(c["container_id"])
        if a is None:
            raise Status("FAILED_PRECONDITION", f"container {name} has no stdin and no "
                         "tty to attach to (stdin: false and tty: false in its spec, "
                         "stdinOnce and attached once already, or pufflet restarted "
                         "since it started)")
        if a.stdin_once:
            # stdinOnce: this attach gets our fd itself (the channel closes
            # our number once it is sent): when the attach ends, no write
            # end is left and the container reads EOF, as `kubectl run -i`
            # expects.  A later attach gets the output only.
            del self.attach_fds[c["container_id"]]
            return {"tty": a.tty, "stdin": a.stdin, "stdin_once": True}, [a.fd]
        return {"tty": a.tty, "stdin": a.stdin, "stdin_once": False}, [os.dup(a.fd)]


@dataclass(frozen=True)
class _Attach:
    fd: int
    tty: bool
    stdin: bool
    stdin_once: bool = False


def _tty_and_network(tty: int, net: Callable[[], None] | None) -> None:
    fcntl.ioctl(tty, termios.TIOCSCTTY, 0)
    if net is not None:
        net()


def _fields(spec: Spawn) -> dict:
    return {f: getattr(spec, f) for f in spec.__dataclass_fields__}


def _plan(limits: dict) -> rlimits.Plan:
    """The spec's Limits (numbers) as rlimits.plan takes them (quantities)."""
    lim = {}
    if limits.get("memory_bytes"):
        lim["memory"] = str(limits["memory_bytes"])
    if limits.get("ephemeral_bytes"):
        lim["ephemeral-storage"] = str(limits["ephemeral_bytes"])
    if limits.get("cpu_millis") is not None:
        lim["cpu"] = f"{limits['cpu_millis']}m"
    return rlimits.plan(lim, None, pids=limits.get("pids"))


def _workdir(root: str, path: str) -> None:
    """Make a missing working directory (root-owned, 0755), as runc does;
    one the image has is left as it is."""
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise volumes.VolumeError("INVALID_ARGUMENT",
                                  f"working dir {path!r}: no '.' or '..' please")
    if not parts:
        return
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            os.close(volumes.mkdirs(fd, parts))
        except volumes.VolumeError:
            pass    # through a symlink of the image: chdir in the chroot decides
    finally:
        os.close(fd)
