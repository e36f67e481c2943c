"""The pod workers: what should run on this node, made to run, and told.

Sources of pods: the API server (informer.py: list+watch of the pods bound
to this node) and manifest files (staticpods.py).  Every change, every
container exit (the parent's WatchContainers stream), every probe result
that matters and every timer (back-offs, grace deadlines, the periodic
resync) queues the pod's uid on one WorkQueue, so that a pod is synced by
one worker at a time and each sync sees the latest of everything.  The
sync is the kubelet's syncPod / syncTerminatingPod, written anew and
simplified but truthful:

  running      admit (or fail the pod, with an Event), pull images, build
               the pod root (CreatePod), write the volumes (SetVolume),
               run init containers one by one, then the app containers,
               restarting them as the restart policy and the crash-loop
               back-off say, acting on liveness/startup failures; then
               compute the status and PATCH it when it changed.
  terminating  (deletionTimestamp set, or gone from its source) preStop
               hooks, the stop signal, SIGKILL at the grace deadline, and
               once nothing runs RemovePod and DELETE with grace 0.
  finished     (phase Succeeded or Failed) nothing more runs; the root is
               removed; the status stays.

Sync state per pod is written only by the worker that holds the pod:
exits and probe verdicts are handed over through small inboxes, so no
two threads ever change a pod's bookkeeping.

Timers, chosen and why: a running pod is synced again every RESYNC
seconds (10 s; the kubelet's syncFrequency is 1 min, but pufflet's sync
is cheap and a short resync bounds how stale a missed event can make the
status); files volumes are re-read every VOLUME_REFRESH (60 s, about what
the kubelet's configMap cache gives) and service account tokens at 80 %
of their life; a ConfigMap or Secret read for one pod serves the others
for OBJECT_TTL (5 s), so a burst of pods reads each object once.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import json
import logging
import re
import threading
import time
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from kubernetes import client as k8s
# The client loads its API classes on first use; the sandboxed agent
# cannot, so load them here, before the drop.
from kubernetes.client.api import core_v1_api  # noqa: F401

from pufflet.agent import events as ev
from pufflet.agent import admit, dns, envvars, expand, kube, podstatus, probes, volumedata
from pufflet.agent.informer import PodInformer
from pufflet.agent.runtime import Exit, Runtime
from pufflet.agent.staticpods import MIRROR_ANN, StaticPods
from pufflet.agent.workqueue import WorkQueue
from pufflet.config import Config
from pufflet.images import reference
from pufflet.images.puller import PullError, Puller
from pufflet.privsep.channel import Status

log = logging.getLogger("pufflet.agent.pods")

RESYNC = 10.0
VOLUME_REFRESH = 60.0
# The kubelet's crash-loop back-off: 10 s doubling to 5 min, forgotten
# after a container ran for 10 minutes.
BACKOFF_BASE = 10.0
BACKOFF_MAX = 300.0
BACKOFF_RESET = 600.0
# How long to wait for the processes after SIGKILL before giving up on
# them (RemovePod kills what is left anyway).
KILL_WAIT = 5.0
# The kubelet's minimumGracePeriodInSeconds: a container's stop signal is
# followed by at least this much time before SIGKILL (when the pod's grace
# is not 0), even when its preStop hook or its turn used the pod's grace up.
MIN_GRACE = 2.0
# How often emptyDir usage is held against sizeLimit: the kubelet's
# eviction manager looks every 10 s (the parent measures a volume at most
# once a minute, priv/stats.DU_TTL, as the kubelet's volume stats do).
EVICTION_INTERVAL = 10.0
# system-cluster-critical and above: like static pods, never evicted.
CRITICAL_PRIORITY = 2_000_000_000
TOKEN_DEFAULT_TTL = 3600
# Exits kept for pods without a worker yet: per pod, and pods.
MAX_PENDING_EXITS = 64
MAX_PENDING_PODS = 1000
# Services are listed again after this long (the kubelet watches them).
SERVICES_TTL = 30.0
# ConfigMaps and Secrets read for one pod serve the others of its
# namespace for this long: thirty pods of a ReplicaSet starting at once
# read their kube-root-ca.crt once, not thirty times (the kubelet shares
# one watch per object among its pods).  Short next to VOLUME_REFRESH.
OBJECT_TTL = 5.0
RESOLV_CONF = "/etc/resolv.conf"

SUCCEEDED, FAILED, RUNNING, PENDING = "Succeeded", "Failed", "Running", "Pending"

_SIGNALS = {"SIGTERM", "SIGKILL", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2",
            "SIGWINCH", "SIGSTOP", "SIGCONT"}
_LABEL_BAD = re.compile(r"[^a-z0-9-]")


def rfc3339(t: float | None = None) -> str:
    """metav1.Time: whole seconds, UTC."""
    return datetime.datetime.fromtimestamp(time.time() if t is None else t,
                                           datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------
# what a pod's containers are doing

@dataclass
class Instance:
    """One run of a container, as the parent reported it."""
    container_id: str
    restart_count: int
    started_at: float               # wall clock
    running: bool = True
    exit_code: int | None = None
    signal: int | None = None
    finished_at: float | None = None
    reason: str = ""                # the runtime's words for how it ended
    message: str = ""


@dataclass
class CState:
    """One container of a pod, across its runs."""
    name: str
    init: bool
    current: Instance | None = None
    last: Instance | None = None        # the run before current (lastState)
    waiting: tuple[str, str] = ("ContainerCreating", "")
    image: str = ""                     # the spec's image
    image_id: str = ""                  # repo@digest once pulled
    digest: str = ""                    # the manifest digest
    backoff: podstatus.Backoff | None = None   # the crash-loop back-off
    backoff_until: float = 0.0          # monotonic: when to look again
    kill_deadline: float | None = None  # SIGKILL due (monotonic)
    kill_reason: str = ""               # why we stopped it (a probe, a hook)
    env: list[str] = field(default_factory=list)
    working_dir: str = "/"
    stop_signal: str = "SIGTERM"
    adopted: bool = False               # env, working_dir, stop_signal not known yet
    sidecar: bool = False               # an init container with restartPolicy Always
    adopted_image: str = ""             # the digest the parent started it from

    @property
    def running(self) -> bool:
        return self.current is not None and self.current.running


@dataclass
class PodWork:
    uid: str
    pod: dict
    static: bool
    containers: dict[str, CState] = field(default_factory=dict)
    info: dict | None = None            # CreatePod's answer
    refusal: tuple[str, str] | None = None  # admission: (reason, message)
    admitted: bool = False
    volumes: dict[str, str] = field(default_factory=dict)   # name -> content hash
    volumes_due: float = 0.0
    volumes_ok: bool = False
    tokens: dict[tuple[str, str], tuple[str, float, float]] = field(default_factory=dict)
    terminating: bool = False
    grace: float = 0.0                  # the grace period it is being stopped with
    grace_deadline: float = 0.0
    completing: bool = False            # app containers done for good: sidecars stop
    hooks: dict[str, threading.Event] = field(default_factory=dict)  # preStop, set when done
    sigkilled: set[str] = field(default_factory=set)    # containers sent SIGKILL while stopping
    removed: bool = False
    terminated: bool = False            # stopped, removed, deleted: nothing left to do
    gone: bool = False                  # its source no longer has it
    phase: str = PENDING
    message: str = ""
    reason: str = ""
    last_status: dict | None = None     # the last status computed
    transitions: dict[str, tuple[str, str]] = field(default_factory=dict)
    posted: str | None = None
    logged: str | None = None
    exits: list[Exit] = field(default_factory=list)         # inbox, under lock
    kills: list[tuple[str, str, str]] = field(default_factory=list)  # inbox
    lock: threading.Lock = field(default_factory=threading.Lock)
    events_sent: set = field(default_factory=set)
    initialized: bool = False           # init containers done: app containers may run
    evicted: str | None = None          # why, once the eviction check said so (inbox)
    evicting: bool = False              # acted on: containers killed, Event sent


class PodManager:
    def __init__(self, cfg: Config, runtime: Runtime, puller: Puller, *,
                 api: k8s.ApiClient | None = None,
                 node_uid: Callable[[], str | None] = lambda: None,
                 host_ip: Callable[[], str | None] = lambda: None,
                 pod_cidr: Callable[[], str | None] = lambda: "",
                 allocatable: Callable[[], dict | None] = lambda: None,
                 stop: threading.Event | None = None,
                 resync: float = RESYNC, backoff_base: float = BACKOFF_BASE,
                 backoff_max: float = BACKOFF_MAX, static_interval: float | None = None,
                 workers: int = 8, node_os: str | None = None,
                 eviction_interval: float = EVICTION_INTERVAL) -> None:
        self.cfg = cfg
        self.node = cfg.node_name
        self.runtime = runtime
        self.puller = puller
        self.stop = stop or threading.Event()
        self.core = k8s.CoreV1Api(api) if api is not None else None
        self.node_uid = node_uid
        self.host_ip = host_ip
        # node.spec.podCIDR: None while the Node has not been read yet.
        self.pod_cidr = pod_cidr
        self.allocatable = allocatable
        self.node_os = node_os or os.uname().sysname.lower()
        self._svc: list[dict] | None = None
        self._svc_at = 0.0
        self.resync = resync
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.eviction_interval = eviction_interval
        self.recorder = ev.Recorder(self.core, self.node, self.stop)
        self.prober = probes.Prober(self._exec, self._probe_result,
                                    on_failure=self._probe_failed)
        self.queue = WorkQueue(self._sync_key, workers=workers)
        # Volume reads that overlap CreatePod (see _run): a small pool for
        # every pod, as the queue's.
        self._early = ThreadPoolExecutor(max_workers=2, thread_name_prefix="pod-volumes")
        self.lock = threading.Lock()
        self.works: dict[str, PodWork] = {}
        self.mirrors: dict[str, dict] = {}      # static uid -> its mirror pod
        self.informer = PodInformer(self.core, self.node, self._api_change, self.stop) \
            if self.core is not None else None
        self.static = StaticPods(cfg.static_pod_dir, self.node, self._static_change,
                                 self.stop, **({"interval": static_interval}
                                               if static_interval else {})) \
            if cfg.static_pod_dir else None
        self._adopted: dict[str, dict] = {}     # the parent's pods at start
        # Exits of pods that have no worker yet (adopted ones, until their
        # source has spoken), applied when the worker is made.
        self._pending_exits: dict[str, list[Exit]] = {}
        self._errors: dict[str, str] = {}
        # (kind, namespace, name) -> (monotonic time read, object); see _Lookups
        self._objects: dict[tuple[str, str, str], tuple[float, dict]] = {}
        self._reading: dict[tuple[str, str, str], futures.Future] = {}

    # -- starting and stopping ----------------------------------------------

    def start(self) -> None:
        runtime_exit = self.runtime.on_exit
        self.runtime.on_exit = self._exit if runtime_exit is None else runtime_exit
        # Exits first, then what runs: an exit after ListPods's answer is
        # then on the stream (and kept until the pod's worker exists).
        self.runtime.start()
        self._adopt()
        self.recorder.start()
        self.prober.start()
        self.queue.start()
        if self.static is not None:
            self.static.start()
        if self.informer is not None:
            self.informer.start()
        threading.Thread(target=self._sweep_orphans, name="pod-orphans", daemon=True).start()
        threading.Thread(target=self._watch_volumes, name="pod-evictions", daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.queue.close()
        self._early.shutdown(wait=False)
        self.prober.close()
        self.recorder.close()
        if self.informer is not None:
            self.informer.close()
        if self.static is not None:
            self.static.wake.set()

    def _adopt(self) -> None:
        """What the parent runs already (a restarted agent): take over its
        containers' states, so that nothing restarts needlessly."""
        try:
            pods = self.runtime.list_pods()
        except (Status, OSError) as e:
            log.warning("cannot list the pods the parent holds: %s", e)
            return
        for p in pods:
            self._adopted[p["pod_uid"]] = p
        if pods:
            log.info("the parent holds %d pods; adopting them", len(pods))

    def _sources_synced(self) -> bool:
        return all(src.synced.is_set() for src in (self.informer, self.static)
                   if src is not None)

    def _sweep_orphans(self) -> None:
        """Once every source has spoken, remove the pods the parent holds
        that no source wants any more."""
        for src in (self.informer, self.static):
            while src is not None and not src.synced.wait(1.0):
                if self.stop.is_set():
                    return
        for uid in list(self._adopted):
            self.queue.add(uid)

    # -- what the sources say -------------------------------------------------

    def _api_change(self, uid: str, pod: dict | None) -> None:
        if pod is not None and _is_mirror(pod):
            static_uid = pod["metadata"]["annotations"][MIRROR_ANN]
            with self.lock:
                self.mirrors[static_uid] = pod
            self.queue.add(static_uid)
            return
        if pod is None:
            with self.lock:
                for suid, m in list(self.mirrors.items()):
                    if m["metadata"]["uid"] == uid:
                        del self.mirrors[suid]
                        self.queue.add(suid)
        self.queue.add(uid)

    def _static_change(self, uid: str, pod: dict | None) -> None:
        self.queue.add(uid)

    def _desired(self, uid: str) -> tuple[dict | None, bool]:
        if self.static is not None:
            p = self.static.get(uid)
            if p is not None:
                return p, True
        if self.informer is not None:
            p = self.informer.get(uid)
            if p is not None and not _is_mirror(p):
                return p, False
        return None, False

    def _exit(self, ex: Exit) -> None:
        with self.lock:
            w = self.works.get(ex.pod_uid)
            if w is None:
                pending = self._pending_exits.setdefault(ex.pod_uid, [])
                pending[:] = pending[-(MAX_PENDING_EXITS - 1):] + [ex]
                while len(self._pending_exits) > MAX_PENDING_PODS:
                    del self._pending_exits[next(iter(self._pending_exits))]
        if w is not None:
            with w.lock:
                w.exits.append(ex)
        self.queue.add(ex.pod_uid)

    def _probe_result(self, uid: str, name: str, kind: str, ok: bool, msg: str) -> None:
        with self.lock:
            w = self.works.get(uid)
        if w is None:
            return
        if not ok:
            if kind in (probes.LIVENESS, probes.STARTUP):
                with w.lock:
                    w.kills.append((name, kind, msg))
        self.queue.add(uid)

    def _probe_failed(self, uid: str, name: str, kind: str, msg: str) -> None:
        """Every failed attempt is an Unhealthy event (counted by the
        recorder when it repeats), as the kubelet's prober records one."""
        with self.lock:
            w = self.works.get(uid)
        if w is not None:
            self.recorder.event(w.pod, ev.WARNING, "Unhealthy",
                                f"{kind.capitalize()} probe failed: {msg}", name)

    def _exec(self, uid: str, name: str, argv: list[str], timeout: float):
        with self.lock:
            w = self.works.get(uid)
        c = w.containers.get(name) if w is not None else None
        env = c.env if c is not None else []
        wd = c.working_dir if c is not None else "/"
        return self.runtime.exec(uid, name, argv, timeout, env=env, working_dir=wd)

    # -- one sync --------------------------------------------------------------

    def _sync_key(self, uid: str) -> None:
        try:
            self.sync(uid)
            self._errors.pop(uid, None)
        except Exception as e:     # noqa: BLE001 - retried at the next resync
            msg = kube.describe(e) if not isinstance(e, Status) else str(e)
            if self._errors.get(uid) != msg:
                log.warning("pod %s: sync: %s", self._name(uid), msg)
                log.debug("pod %s: sync", uid, exc_info=True)
            self._errors[uid] = msg
            self.queue.add_after(uid, min(self.resync, 5.0))

    def _name(self, uid: str) -> str:
        with self.lock:
            w = self.works.get(uid)
        if w is None:
            return uid
        m = w.pod["metadata"]
        return f"{m.get('namespace', 'default')}/{m['name']}"

    def sync(self, uid: str) -> None:
        desired, static = self._desired(uid)
        with self.lock:
            w = self.works.get(uid)
        if w is None:
            adopted = self._adopted.pop(uid, None)
            if desired is None:
                if adopted is not None and not self._sources_synced():
                    # Queued by an exit before the sources have spoken: not
                    # known to be unwanted yet (_sweep_orphans asks again).
                    self._adopted[uid] = adopted
                    if self._sources_synced():
                        self.queue.add(uid)     # they just did: the sweep may have passed
                    return
                if adopted is not None:
                    log.info("pod %s/%s (%s) is no longer wanted: removing it",
                             adopted["namespace"], adopted["name"], uid)
                    self.runtime.remove_pod(uid)
                return
            w = PodWork(uid, desired, static)
            # A terminal phase is never left (the kubelet's rule too): a pod
            # that finished before this agent started is not run again.
            api_phase = (desired.get("status") or {}).get("phase")
            if not static and api_phase in (SUCCEEDED, FAILED):
                w.phase = api_phase
            if adopted is not None:
                self._take_over(w, adopted)
            with self.lock:
                self.works[uid] = w
                w.exits.extend(self._pending_exits.pop(uid, ()))
        if w.terminated:
            # Stopped and deleted; forgotten once its source forgets it.
            if desired is None:
                with self.lock:
                    self.works.pop(uid, None)
            return
        if desired is not None:
            w.pod = desired
        else:
            w.gone = True
        self._drain(w)
        if w.gone or w.pod["metadata"].get("deletionTimestamp"):
            self._terminate(w)
            return
        with w.lock:
            evicted = w.evicted
        if evicted is not None and not w.evicting:
            self._evict(w, evicted)
        if w.evicting or w.phase in (SUCCEEDED, FAILED):
            self._finish(w)
            self._report(w)
            return
        if w.completing or self._apps_done(w):
            self._complete(w)
            self._report(w)
            return
        self._run(w)
        self._report(w)
        self.queue.add_after(uid, self._next_wake(w))

    def _take_over(self, w: PodWork, held: dict) -> None:
        w.info = {"pod_uid": held["pod_uid"], "uid": held["uid"], "dev_missing_reason": "",
                  "pod_ip": held.get("pod_ip", "")}
        for c in held["containers"]:
            inst = Instance(c["container_id"], c["restart_count"], c["started_at"],
                            c["running"], c.get("exit_code"), c.get("signal"),
                            c.get("finished_at"), c.get("reason", ""))
            init = any(ic.get("name") == c["name"]
                       for ic in w.pod["spec"].get("initContainers") or ())
            cs = w.containers.setdefault(c["name"], CState(c["name"], init))
            cs.sidecar = init and any(_is_sidecar(ic) for ic in
                                      w.pod["spec"].get("initContainers") or ()
                                      if ic.get("name") == c["name"])
            if cs.current is None or inst.restart_count >= cs.current.restart_count:
                cs.current = inst
                cs.waiting = ("", "")
                cs.adopted = True
                cs.adopted_image = c.get("image") or ""
        w.admitted = True

    def _drain(self, w: PodWork) -> None:
        """Apply the exits that came in since the last sync."""
        with w.lock:
            exits, w.exits = w.exits, []
        for ex in exits:
            c = w.containers.get(ex.name)
            if c is None or c.current is None or c.current.container_id != ex.container_id:
                continue
            cur = c.current
            cur.running = False
            cur.exit_code = ex.exit_code
            cur.signal = ex.signal
            cur.finished_at = ex.finished_at
            cur.reason = ex.reason
            c.kill_deadline = None
            log.info("pod %s: container %s exited (%s)", self._name(w.uid), c.name,
                     f"code {ex.exit_code}" if ex.exit_code is not None
                     else f"signal {ex.signal}")

    # -- running --------------------------------------------------------------

    def _run(self, w: PodWork) -> None:
        pod = w.pod
        if not w.admitted:
            refusal = self._admit(pod)
            if refusal is not None:
                w.refusal = refusal
                self.recorder.event(pod, ev.WARNING, refusal[0], refusal[1])
                return
            w.admitted = True
        spec = pod["spec"]
        inits = list(spec.get("initContainers") or ())
        all_specs = inits + list(spec["containers"])
        for i, cspec in enumerate(all_specs):
            c = w.containers.setdefault(cspec["name"], CState(cspec["name"], i < len(inits)))
            c.sidecar = c.init and _is_sidecar(cspec)
        if not self._pull(w, all_specs):
            return
        if w.info is None:
            req = self._create_request(w, all_specs)
            if req is None:
                return          # the pod network is not ready: the resync retries
            # The volumes' reads from the API server (a TokenRequest, the
            # kube-root-ca.crt ConfigMap: ~10 ms) overlap the parent's
            # building of the pod root instead of following it.  Only the
            # reads: the files are made after, when the pod's address
            # (downward API status.podIP) is known.  They land in w.tokens
            # and the shared object cache, where _volumes finds them.
            try:
                early = self._early.submit(self._prepare_volumes, w)
            except RuntimeError:
                return          # closing: the pool is shut down
            try:
                w.info = self.runtime.create_pod(req)
            except Status as e:
                # The kubelet's event for a sandbox it cannot make (a pod
                # network that cannot be set up, a CIDR that changed).
                self._event_once(w, ev.WARNING, "FailedCreatePodSandBox",
                                 f"Failed to create pod sandbox: {e.message}")
                raise
            finally:
                # Waited for even on failure: it writes w.tokens, and the
                # next sync of this pod must not race it.  What it could
                # not read, _volumes tries again and reports.
                futures.wait([early])
            if w.info.get("dev_missing_reason"):
                log.info("pod %s: no /dev: %s", self._name(w.uid), w.info["dev_missing_reason"])
        if not self._volumes(w):
            return
        self._act_on_kills(w)
        for cspec in all_specs:
            c = w.containers[cspec["name"]]
            if c.adopted and c.running:
                self._restore_context(w, c, cspec)
        if self._run_inits(w, inits):
            for cspec in spec["containers"]:
                c = w.containers[cspec["name"]]
                if c.running:
                    continue
                if c.current is not None and (
                        not podstatus.should_restart(pod, cspec, self._cview(w, c))
                        or not self._may_restart(w, c)):
                    continue
                self._start(w, c, cspec)
        self._update_probes(w)

    def _run_inits(self, w: PodWork, inits: list[dict]) -> bool:
        """Init containers, in order: each must succeed before the next
        starts; one that fails and may not restart fails the pod
        (podstatus.finished says so, and the phase follows).  A sidecar
        (restartPolicy Always) need only have started (its startup probe
        passed) before the next; it runs on beside the app containers and
        is restarted whenever it ends, without holding them back once the
        pod is initialized.  True when the app containers may run."""
        pod = w.pod
        for cspec in inits:
            c = w.containers[cspec["name"]]
            if c.sidecar:
                if not c.running and (c.current is None or self._may_restart(w, c)):
                    self._start(w, c, cspec)
                if w.initialized or self._sidecar_started(w, c, cspec):
                    continue
                return False
            if w.initialized:
                continue        # done once; never run again (the kubelet's rule)
            if c.running:
                return False
            cur = c.current
            if cur is not None and cur.exit_code == 0 and cur.signal is None \
                    and cur.reason != "StartError":
                continue
            if cur is not None and not podstatus.should_restart(pod, cspec, self._cview(w, c)):
                return False
            if cur is None or self._may_restart(w, c):
                self._start(w, c, cspec)
            return False
        w.initialized = True
        return True

    def _sidecar_started(self, w: PodWork, c: CState, cspec: dict) -> bool:
        """Running, and past its startup probe if it has one (its probes
        are set up here: the next init container waits on them)."""
        cur = c.current
        if not c.running or cur is None:
            return False
        if cspec.get("startupProbe") is None:
            return True
        self.prober.update(w.uid, cspec, cur.container_id, cur.started_at,
                           c.kill_deadline is None, self._pod_ip(w))
        return self.prober.result(w.uid, c.name, probes.STARTUP) is True

    def _admit(self, pod: dict) -> tuple[str, str] | None:
        """(reason, message) when pufflet cannot honour the pod.  pufflet
        is the node's only runtime, so the node counts as dedicated: a pod
        bound here without a runtimeClassName is pufflet's to run."""
        with self.lock:
            running = sum(1 for w in self.works.values()
                          if w.admitted and w.phase not in (SUCCEEDED, FAILED))
        lookup = _Lookups(self, pod) if self.core is not None else None
        return admit.admission_error(
            pod, node_is_dedicated=True, max_pods=self.cfg.max_pods, running_pods=running,
            lookup=lookup, hostpaths=self.cfg.hostpaths, node_name=self.node,
            node_os=self.node_os, allocatable=self.allocatable())

    def _pull(self, w: PodWork, specs: list[dict]) -> bool:
        """Every image of the pod, before its root is built (the root is
        the union of them).  False while any is missing."""
        ok = True
        secrets = self._pull_secrets(w.pod)
        for cspec in specs:
            c = w.containers[cspec["name"]]
            if c.digest:
                continue
            image = cspec.get("image") or ""
            policy = cspec.get("imagePullPolicy") or "IfNotPresent"
            c.image = image
            if policy != "Never":
                self.recorder.event(w.pod, ev.NORMAL, "Pulling",
                                    f'Pulling image "{image}"', c.name)
            t0 = time.monotonic()
            try:
                summary = self.puller.pull(image, policy, secrets)
            except PullError as e:
                ok = False
                c.waiting = (e.reason, e.message)
                etype = ev.NORMAL if e.reason == "ImagePullBackOff" else ev.WARNING
                reason = "BackOff" if e.reason == "ImagePullBackOff" else "Failed"
                self.recorder.event(w.pod, etype, reason, e.message, c.name)
                continue
            c.digest = summary["digest"]
            try:
                c.image_id = f"{reference.parse(summary['name']).name}@{c.digest}"
            except reference.ReferenceError:
                c.image_id = c.digest
            if c.waiting[0] in ("ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull"):
                c.waiting = ("ContainerCreating", "")
            if policy == "Never" or time.monotonic() - t0 < 0.05:
                msg = f'Container image "{image}" already present on machine'
            else:
                msg = (f'Successfully pulled image "{image}" in '
                       f'{time.monotonic() - t0:.3f}s. Image size: {summary["size"]} bytes.')
            self.recorder.event(w.pod, ev.NORMAL, "Pulled", msg, c.name)
        return ok

    def _pull_secrets(self, pod: dict) -> list:
        out = []
        if self.core is None:
            return out
        ns = pod["metadata"].get("namespace", "default")
        for ref in pod["spec"].get("imagePullSecrets") or ():
            try:
                s = json.loads(self.core.read_namespaced_secret(
                    ref["name"], ns, _preload_content=False).data)
                out.append(s)
            except Exception as e:     # noqa: BLE001 - the pull says what failed
                log.info("image pull secret %s/%s: %s", ns, ref.get("name"), kube.describe(e))
        return out

    def _create_request(self, w: PodWork, specs: list[dict]) -> dict | None:
        """CreatePod's request; None while the pod network waits for the
        Node's podCIDR (the kubelet's NetworkNotReady)."""
        pod = w.pod
        meta, spec = pod["metadata"], pod["spec"]
        host_net = bool(spec.get("hostNetwork"))
        cidr = None
        if not host_net and self.cfg.pod_network.cidr is None:
            cidr = self.pod_cidr()
            # 'pod network from node' said, and a Node that can get one:
            # no podCIDR yet means not yet (the controller manager
            # allocates it after registration).
            if cidr is None or (not cidr and self.cfg.pod_network.from_node
                                and self.core is not None):
                self._event_once(w, ev.WARNING, "NetworkNotReady",
                                 "network is not ready: the Node's podCIDR is not "
                                 "known yet")
                return None
            if not cidr:
                self._event_once(w, ev.WARNING, "NoPodCIDR",
                                 "the Node has no podCIDR and pufflet.conf sets no "
                                 "'pod network': the pod shares the node's network")
        hostname = pod_hostname(pod)
        hosts = [{"ip": "127.0.0.1", "names": ["localhost"]},
                 {"ip": "::1", "names": ["localhost", "ip6-localhost", "ip6-loopback"]}]
        names = [hostname]
        if spec.get("subdomain"):
            names.insert(0, f"{hostname}.{spec['subdomain']}.{meta.get('namespace', 'default')}"
                            f".svc.{self.cfg.cluster_domain}")
        own: list[str] = []
        if host_net:
            ip = self._host_ip()
            if ip and ip not in ("127.0.0.1", "::1"):
                hosts.append({"ip": ip, "names": names})
            else:
                hosts[0]["names"] += names
        else:
            own = names     # the parent maps them to the address it gives
        for alias in spec.get("hostAliases") or ():
            if alias.get("ip") and alias.get("hostnames"):
                hosts.append({"ip": alias["ip"], "names": list(alias["hostnames"])[:16]})
        digests = list(dict.fromkeys(w.containers[c["name"]].digest for c in specs))
        resolv, dns_events = dns.resolv_conf(pod, self.cfg.cluster_dns,
                                             self.cfg.cluster_domain, _host_resolv_conf())
        for reason, message in dns_events:
            self._event_once(w, ev.WARNING, reason, message)
        req = {"pod_uid": w.uid, "namespace": meta.get("namespace", "default"),
               "name": meta["name"], "hostname": hostname, "images": digests,
               "hosts": hosts[:64], "resolv_conf": resolv, "host_network": host_net,
               "own_names": own, "host_ports": [] if host_net else _host_ports(spec)}
        if cidr:
            req["pod_cidr"] = cidr
        return req

    def _event_once(self, w: PodWork, etype: str, reason: str, message: str) -> None:
        key = ("once", reason, message)
        if key not in w.events_sent:
            w.events_sent.add(key)
            self.recorder.event(w.pod, etype, reason, message)     # which logs it

    def _host_ip(self) -> str:
        return self.host_ip() or "127.0.0.1"

    def _pod_ip(self, w: PodWork | None = None) -> str:
        """The pod's address: its own once the parent gave it one, else
        the node's (hostNetwork pods, pods sharing the node's network)."""
        if w is not None and w.info is not None and w.info.get("pod_ip"):
            return w.info["pod_ip"]
        return self._host_ip()

    def _services(self) -> list[dict] | None:
        """Every Service, for the service link variables; read again after
        SERVICES_TTL.  None standalone or before the first read (envvars
        then refuses API pods, as the kubelet does)."""
        if self.core is None:
            return None
        if self._svc is None or time.monotonic() - self._svc_at > SERVICES_TTL:
            try:
                doc = json.loads(self.core.list_service_for_all_namespaces(
                    _preload_content=False).data)
                self._svc = doc.get("items") or []
                self._svc_at = time.monotonic()
            except Exception as e:     # noqa: BLE001 - the old list will do
                log.debug("listing services: %s", kube.describe(e))
        return self._svc

    # -- volumes ----------------------------------------------------------------

    def _volumes(self, w: PodWork) -> bool:
        """SetVolume for each volume whose content changed; files volumes
        are read again every VOLUME_REFRESH, tokens at 80 % of their life.
        False while a volume cannot be made (the pod waits, with an
        Event, as the kubelet's FailedMount)."""
        now = time.monotonic()
        if w.volumes_ok and now < w.volumes_due:
            return True
        prepared = self._prepare_volumes(w)
        ok = not prepared.failed
        for name, msg in prepared.failed:
            self.recorder.event(w.pod, ev.WARNING, "FailedMount",
                                f'MountVolume.SetUp failed for volume "{name}" : {msg}')
        for name, req in prepared.requests:
            key = hashlib.sha256(json.dumps(req, sort_keys=True, default=_bytes_key)
                                 .encode()).hexdigest()
            if w.volumes.get(name) == key:
                continue
            try:
                self.runtime.set_volume(req)
                w.volumes[name] = key
            except Status as e:
                ok = False
                self.recorder.event(w.pod, ev.WARNING, "FailedMount",
                                    f'MountVolume.SetUp failed for volume "{name}" : {e}')
        w.volumes_ok = ok
        w.volumes_due = prepared.due if ok else now + min(self.resync, 5.0)
        return ok

    def _prepare_volumes(self, w: PodWork) -> "_Prepared":
        """Every volume's SetVolume request, with what it needs from the
        API server (tokens, ConfigMaps, Secrets), and when to look again.
        Touches no PodWork state but w.tokens."""
        spec = w.pod["spec"]
        writable = _writable_volumes(spec)
        out = _Prepared(due=time.monotonic() + VOLUME_REFRESH)
        lookup = _Lookups(self, w.pod) if self.core is not None else None
        for vol in spec.get("volumes") or ():
            name = vol["name"]
            req = {"pod_uid": w.uid, "name": name, "writable": name in writable, "files": []}
            try:
                if "emptyDir" in vol:
                    req.update(kind="emptyDir", writable=True)
                    limit = (vol.get("emptyDir") or {}).get("sizeLimit")
                    if limit:
                        req["size_limit"] = int(quantity(limit))
                elif "hostPath" in vol:
                    req.update(kind="hostPath",
                               host_path=(vol.get("hostPath") or {}).get("path", ""))
                elif any(k in vol for k in volumedata.FILE_VOLUMES):
                    tokens, refresh = self._tokens(w, vol)
                    out.due = min(out.due, refresh)
                    files = volumedata.volume_files(
                        w.pod, vol, lookup=lookup, tokens=tokens,
                        host_ips=[self._host_ip()], pod_ips=[self._pod_ip(w)],
                        allocatable=self.allocatable())
                    req.update(kind="files", writable=False, files=[f.wire() for f in files])
                else:
                    continue        # admission refused what is not supported
            except (volumedata.VolumeError, k8s.ApiException, ValueError) as e:
                out.failed.append((name, kube.describe(e) if isinstance(e, k8s.ApiException)
                                   else str(e)))
                continue
            out.requests.append((name, req))
        return out

    def _tokens(self, w: PodWork, vol: dict) -> tuple[dict[str, str], float]:
        """The service account tokens a projected volume needs, by path,
        asked for with TokenRequest and kept until refresh_due; and when
        (monotonic) the first of them is due again."""
        tokens: dict[str, str] = {}
        due = float("inf")
        if self.core is None:
            return tokens, due
        ns = w.pod["metadata"].get("namespace", "default")
        for path, sa, body in volumedata.token_requests(w.pod, vol):
            key = (vol["name"], path)
            have = w.tokens.get(key)
            now = time.time()
            if have is None or volumedata.refresh_due(have[2], have[1], now):
                got = json.loads(self.core.create_namespaced_service_account_token(
                    sa, ns, body, _preload_content=False).data)
                # The life the API server gave, not the one asked for: it
                # may shorten it (--service-account-max-token-expiration),
                # and refreshing at 80 % of the asked-for life would then
                # ask again at every sync (the kubelet reads the answer too).
                ttl = (got.get("spec") or {}).get("expirationSeconds") \
                    or body["spec"]["expirationSeconds"]
                exp = _parse_time(got["status"].get("expirationTimestamp")) or now + ttl
                have = (got["status"]["token"], exp - ttl, exp)
                w.tokens[key] = have
            tokens[path] = have[0]
            # just past refresh_at (refresh_due is a strict >), at most once a second
            left = volumedata.refresh_at(have[2], have[1]) - now + 0.01
            due = min(due, time.monotonic() + max(1.0, left))
        return tokens, due

    # -- containers ---------------------------------------------------------------

    def _may_restart(self, w: PodWork, c: CState) -> bool:
        """The crash-loop back-off (podstatus.crashloop_backoff): False,
        with the container waiting in CrashLoopBackOff, while it runs."""
        cur = c.current
        assert cur is not None and not cur.running
        now = time.time()
        wait, entry = podstatus.crashloop_backoff(
            c.backoff, cur.finished_at or now, now,
            initial=self.backoff_base, cap=self.backoff_max)
        if wait > 0:
            if c.waiting[0] != podstatus.CRASH_LOOP_BACK_OFF:
                self.recorder.event(w.pod, ev.WARNING, "BackOff",
                                    podstatus.backoff_event_message(c.name, w.pod), c.name)
            c.waiting = (podstatus.CRASH_LOOP_BACK_OFF,
                         podstatus.backoff_message(entry.delay, c.name, w.pod))
            c.backoff_until = time.monotonic() + wait
            return False
        c.backoff = entry
        c.backoff_until = 0.0
        return True

    def _container_env(self, w: PodWork, cspec: dict, image_cfg) -> envvars.ContainerEnv:
        pod = w.pod
        return envvars.container_env(
            pod, cspec, lookup=_Lookups(self, pod) if self.core is not None else None,
            services=self._services(), host_ip=[self._host_ip()],
            pod_ips=[self._pod_ip(w)],
            image_env=image_cfg.env, hostname=pod_hostname(pod),
            allocatable=self.allocatable())

    def _restore_context(self, w: PodWork, c: CState, cspec: dict) -> None:
        """A container this agent took over: its env, working directory and
        stop signal, computed again as its start did (exec probes and hooks
        run with them, deletion sends the signal).  On failure the
        defaults stay, and the next sync tries again."""
        digest = c.digest or c.adopted_image
        if not digest:
            return
        try:
            image_cfg = self.runtime.image_config({"digest": digest})
            made = self._container_env(w, cspec, image_cfg)
        except (envvars.EnvError, k8s.ApiException, Status, OSError, ValueError) as e:
            log.info("pod %s: container %s: its env cannot be computed again: %s",
                     self._name(w.uid), c.name, e)
            return
        c.env = made.env
        c.working_dir = cspec.get("workingDir") or image_cfg.working_dir or "/"
        c.stop_signal = _stop_signal(image_cfg.stop_signal)
        c.adopted = False

    def _start(self, w: PodWork, c: CState, cspec: dict) -> None:
        pod = w.pod
        image_cfg = self.runtime.image_config({"digest": c.digest})
        try:
            made = self._container_env(w, cspec, image_cfg)
            argv = expand.command_args(cspec, image_cfg, made.variables)
        except (envvars.EnvError, expand.NoCommandError, k8s.ApiException) as e:
            # The kubelet's CreateContainerConfigError / CreateContainerError:
            # the container waits with the reason, the sync retries.
            reason = "CreateContainerError" if isinstance(e, expand.NoCommandError) \
                else "CreateContainerConfigError"
            msg = kube.describe(e) if isinstance(e, k8s.ApiException) else str(e)
            c.waiting = (reason, msg)
            self.recorder.event(pod, ev.WARNING, "Failed", f"Error: {msg}", c.name)
            return
        for reason, message in made.events:
            self.recorder.event(pod, ev.WARNING, reason, message, c.name)
        env_list = made.env
        c.env = env_list
        c.working_dir = cspec.get("workingDir") or image_cfg.working_dir or "/"
        c.stop_signal = _stop_signal(image_cfg.stop_signal)
        c.adopted = False
        restarts = 0 if c.current is None else c.current.restart_count + 1
        req = {"pod_uid": w.uid, "name": c.name, "restart_count": restarts,
               "image": c.digest, "argv": argv, "env": env_list,
               "working_dir": c.working_dir, "mounts": _mounts(cspec),
               "limits": _limits(cspec), "stdin": bool(cspec.get("stdin")),
               "tty": bool(cspec.get("tty")), "stdin_once": bool(cspec.get("stdinOnce"))}
        try:
            got = self.runtime.start_container(req)
        except Status as e:
            # The parent's words (a missing executable, a bad working
            # directory) are what the user needs to see.
            c.waiting = ("CreateContainerError" if e.code != "INVALID_ARGUMENT"
                         else "CreateContainerConfigError", e.message)
            self.recorder.event(pod, ev.WARNING, "Failed", f"Error: {e.message}", c.name)
            # Counted as a crash so that retries back off.
            c.last = c.current or c.last
            c.current = Instance("", restarts, time.time(), False, 128, None, time.time(),
                                 "StartError", e.message)
            c.backoff_until = 0.0
            return
        if c.current is not None:
            c.last = c.current
        c.current = Instance(got["container_id"], restarts, got["started_at"])
        c.waiting = ("", "")
        c.backoff_until = 0.0
        c.kill_reason = ""
        self.recorder.event(pod, ev.NORMAL, "Created", f"Created container: {c.name}", c.name)
        self.recorder.event(pod, ev.NORMAL, "Started", f"Started container {c.name}", c.name)
        hook = (cspec.get("lifecycle") or {}).get("postStart")
        if hook:
            out = probes.run_handler(hook, cspec, self._grace(w.pod), w.uid, self._exec,
                                     self._pod_ip(w))
            if not out.ok:
                self.recorder.event(pod, ev.WARNING, "FailedPostStartHook",
                                    f"PostStartHook failed: {out.message}", c.name)
                self._kill(w, c, "FailedPostStartHook",
                           f"postStart hook failed: {out.message}")

    def _kill(self, w: PodWork, c: CState, reason: str, message: str,
              grace: float | None = None) -> None:
        """Stop one container: its stop signal now, SIGKILL at the grace
        deadline (see _enforce_kills)."""
        if not c.running:
            return
        self.recorder.event(w.pod, ev.NORMAL, "Killing", message, c.name)
        c.kill_reason = reason
        g = self._grace(w.pod) if grace is None else grace
        c.kill_deadline = time.monotonic() + g
        if not self.runtime.signal(w.uid, c.name, c.stop_signal if g > 0 else "SIGKILL"):
            c.kill_deadline = None

    def _act_on_kills(self, w: PodWork) -> None:
        with w.lock:
            kills, w.kills = w.kills, []
        for name, kind, msg in kills:
            c = w.containers.get(name)
            if c is None or not c.running:
                continue
            cspec = _container_spec(w.pod, name) or {}
            probe = cspec.get(probes.KINDS[kind]) or {}
            grace = probe.get("terminationGracePeriodSeconds")
            self._kill(w, c, kind, f"Container {name} failed {kind} probe, will be restarted",
                       float(grace) if grace is not None else None)
        now = time.monotonic()
        for c in w.containers.values():
            if c.running and c.kill_deadline is not None and now >= c.kill_deadline:
                self.runtime.signal(w.uid, c.name, "SIGKILL")
                c.kill_deadline = now + KILL_WAIT

    def _update_probes(self, w: PodWork) -> None:
        host = self._pod_ip(w)
        spec = w.pod["spec"]
        sidecars = [c for c in spec.get("initContainers") or () if _is_sidecar(c)]
        for cspec in sidecars + list(spec["containers"]):
            c = w.containers[cspec["name"]]
            cur = c.current
            self.prober.update(w.uid, cspec, cur.container_id if cur else "",
                               cur.started_at if cur else 0.0,
                               c.running and c.kill_deadline is None, host)

    def _next_wake(self, w: PodWork) -> float:
        now = time.monotonic()
        wake = self.resync
        for c in w.containers.values():
            for t in (c.backoff_until, c.kill_deadline, w.volumes_due):
                if t and t > now:
                    wake = min(wake, t - now + 0.01)
        return wake

    # -- evictions -------------------------------------------------------------------

    def _watch_volumes(self) -> None:
        while not self.stop.wait(self.eviction_interval):
            try:
                self._check_volumes()
            except Exception as e:     # noqa: BLE001 - checked again next time
                log.warning("checking emptyDir sizes: %s", e)

    def _check_volumes(self) -> None:
        """The kubelet's emptyDir eviction: a pod whose emptyDir holds more
        than its sizeLimit is evicted (the sync does it: _evict)."""
        limits: dict[str, dict[str, tuple[str, float]]] = {}
        with self.lock:
            works = list(self.works.values())
        for w in works:
            if w.phase in (SUCCEEDED, FAILED) or w.terminating or w.evicted is not None:
                continue
            if w.static or (w.pod["spec"].get("priority") or 0) >= CRITICAL_PRIORITY:
                continue        # critical pods are never evicted (kubelet's IsCriticalPod)
            for vol in w.pod["spec"].get("volumes") or ():
                limit = (vol.get("emptyDir") or {}).get("sizeLimit") \
                    if "emptyDir" in vol else None
                try:
                    if limit:
                        limits.setdefault(w.uid, {})[vol["name"]] = (str(limit),
                                                                     quantity(limit))
                except ValueError:
                    continue
        if not limits:
            return
        for p in self.runtime.stats().get("pods") or ():
            mine = limits.get(p["pod_uid"])
            if not mine:
                continue
            for v in p.get("volumes") or ():
                limit = mine.get(v["name"])
                if limit is None or v["used_bytes"] <= limit[1]:
                    continue
                with self.lock:
                    w = self.works.get(p["pod_uid"])
                if w is None:
                    break
                with w.lock:
                    w.evicted = (f'Usage of EmptyDir volume "{v["name"]}" exceeds the '
                                 f'limit "{limit[0]}". ')
                self.queue.add(w.uid)
                break

    def _evict(self, w: PodWork, message: str) -> None:
        """The kubelet's evictPod: an Event, every container killed at
        once (local storage evictions have no grace), and the pod Failed
        with reason Evicted; it is not restarted and its object stays."""
        w.evicting = True
        log.info("pod %s: evicted: %s", self._name(w.uid), message)
        self.recorder.event(w.pod, ev.WARNING, "Evicted", message)
        self.prober.remove_pod(w.uid)
        for c in w.containers.values():
            if c.running:
                self._kill(w, c, "Evicted", f"Stopping container {c.name}", grace=0)

    # -- finishing -----------------------------------------------------------------

    def _finish(self, w: PodWork) -> None:
        """A pod that reached Succeeded or Failed: nothing runs any more,
        its root goes, its status stays."""
        self.prober.remove_pod(w.uid)
        running = [c for c in w.containers.values() if c.running]
        now = time.monotonic()
        for c in running:
            if c.kill_deadline is None:     # not being stopped already
                self._kill(w, c, "PodFinished", f"Stopping container {c.name}")
            elif now >= c.kill_deadline:    # its grace is over
                self.runtime.signal(w.uid, c.name, "SIGKILL")
                c.kill_deadline = now + KILL_WAIT
        if running:
            due = [c.kill_deadline for c in running if c.kill_deadline is not None]
            self.queue.add_after(w.uid, max(min(due, default=now + 1.0) - now, 0.0) + 0.1)
            return
        if not w.removed and w.info is not None:
            self.runtime.remove_pod(w.uid)
        w.removed = True

    def _apps_done(self, w: PodWork) -> bool:
        """Every app container has ended for good (a Never or OnFailure
        pod) while a sidecar still runs: the kubelet then kills the pod
        (computePodActions: nothing to keep running, nothing to start) and
        starts no sidecar again, so that the pod can complete."""
        if not any(c.sidecar and c.running for c in w.containers.values()):
            return False
        return podstatus.finished(w.pod, self._view(w))

    def _complete(self, w: PodWork) -> None:
        """Stop the sidecars of a pod whose app containers are done, as a
        deletion would (preStop hooks, reverse order, the pod's grace), and
        never restart them; once none runs, the phase is Succeeded or
        Failed by the app containers, and the next sync _finishes it."""
        if not w.completing:
            w.completing = True
            log.info("pod %s: app containers done: stopping its sidecars", self._name(w.uid))
            self._begin_stop(w, self._grace(w.pod))
        wake = self._stop_in_order(w)
        if wake is not None:
            self.queue.add_after(w.uid, max(wake - time.monotonic(), 0.0) + 0.01)
        elif any(c.running for c in w.containers.values()):
            self.queue.add_after(w.uid, self.resync)    # SIGKILL did not end it
        else:
            self.queue.add(w.uid)       # the next sync sees the terminal phase

    def _terminate(self, w: PodWork) -> None:
        """Deleted (or gone from its source): the containers stopped in the
        kubelet's order (_begin_stop, _stop_in_order), then RemovePod and
        DELETE with grace 0."""
        pod = w.pod
        self.prober.remove_pod(w.uid)
        if not w.terminating:
            w.terminating = True
            self._begin_stop(w, self._grace(pod))
        wake = self._stop_in_order(w)
        if wake is not None:
            self.queue.add_after(w.uid, max(wake - time.monotonic(), 0.0) + 0.01)
            return
        # Nothing runs any more, or what does was sent SIGKILL KILL_WAIT
        # ago: RemovePod kills what is left.
        if not w.removed and w.info is not None:
            self.runtime.remove_pod(w.uid)
        w.removed = True
        if not w.gone:
            self._report(w)
        self._delete(w)
        w.terminated = True
        if w.gone:
            with self.lock:
                self.works.pop(w.uid, None)
        log.info("pod %s/%s terminated", pod["metadata"].get("namespace", "default"),
                 pod["metadata"]["name"])

    def _begin_stop(self, w: PodWork, grace: float) -> None:
        """Start stopping every running container within grace seconds, as
        the kubelet's killPod does: a Killing event for each and every
        preStop hook started at once, sidecars' hooks too (KEP-753: they
        learn of the termination with the app containers; only their stop
        signal waits).  Hooks run in threads of their own, so that a slow
        one holds back only its own container; each wakes the pod's sync
        when done.  The signals are _stop_in_order's."""
        pod = w.pod
        w.grace = grace
        w.grace_deadline = time.monotonic() + grace
        for c in w.containers.values():
            if not c.running or c.name in w.hooks or c.kill_deadline is not None:
                continue        # not running, or already being stopped
            cspec = _container_spec(pod, c.name) or {}
            if c.adopted and cspec:
                self._restore_context(w, c, cspec)      # its stop signal, its env
            self.recorder.event(pod, ev.NORMAL, "Killing",
                                f"Stopping container {c.name}", c.name)
            hook = (cspec.get("lifecycle") or {}).get("preStop")
            if hook and grace > 0:      # the kubelet runs no hook with no grace
                done = threading.Event()
                w.hooks[c.name] = done
                threading.Thread(target=self._pre_stop, args=(w, c.name, cspec, hook, done),
                                 name=f"prestop-{c.name}", daemon=True).start()

    def _pre_stop(self, w: PodWork, name: str, cspec: dict, hook: dict,
                  done: threading.Event) -> None:
        """One preStop hook, given what is left of the grace period."""
        try:
            left = max(0.0, w.grace_deadline - time.monotonic())
            out = probes.run_handler(hook, cspec, left, w.uid, self._exec, self._pod_ip(w))
            if not out.ok:
                self.recorder.event(w.pod, ev.WARNING, "FailedPreStopHook",
                                    f"PreStopHook failed: {out.message}", name)
        except Exception as e:     # noqa: BLE001 - the container is stopped anyway
            log.warning("pod %s: container %s: preStop hook: %s", self._name(w.uid), name, e)
        finally:
            done.set()
            self.queue.add(w.uid)

    def _stop_turn(self, w: PodWork, c: CState) -> bool:
        """Whether c may be sent its stop signal now (the kubelet's
        terminationOrdering): once its preStop hook is done; a sidecar
        only once every app container and every sidecar declared after
        it have exited, so sidecars go last, in reverse order."""
        hook = w.hooks.get(c.name)
        if hook is not None and not hook.is_set():
            return False
        if not c.sidecar:
            return True
        sidecars = [ic["name"] for ic in w.pod["spec"].get("initContainers") or ()
                    if _is_sidecar(ic)]
        later = set(sidecars[sidecars.index(c.name) + 1:]) if c.name in sidecars else set()
        return not any(o.running for o in w.containers.values()
                       if not o.init or o.name in later)

    def _stop_in_order(self, w: PodWork) -> float | None:
        """One step of stopping a pod (after _begin_stop): the stop signal
        to each running container whose turn has come (_stop_turn), or to
        all of them once the grace period is over; SIGKILL to each whose
        own deadline passed.  When to look again (monotonic), or None when
        nothing is left to wait for: everything exited, or was sent SIGKILL
        KILL_WAIT ago and is still there."""
        now = time.monotonic()
        wake: list[float] = []
        for c in w.containers.values():
            if not c.running:
                continue
            if c.kill_deadline is None:
                if now < w.grace_deadline and not self._stop_turn(w, c):
                    wake.append(w.grace_deadline)
                    continue
                c.kill_reason = "Killing"
                if w.grace <= 0:
                    self.runtime.signal(w.uid, c.name, "SIGKILL")
                    w.sigkilled.add(c.name)
                    c.kill_deadline = now + KILL_WAIT
                else:
                    self.runtime.signal(w.uid, c.name, c.stop_signal)
                    c.kill_deadline = max(w.grace_deadline, now + MIN_GRACE)
            elif now >= c.kill_deadline:
                if c.name in w.sigkilled:
                    continue        # SIGKILL did not end it: given up on
                self.runtime.signal(w.uid, c.name, "SIGKILL")
                w.sigkilled.add(c.name)
                c.kill_deadline = now + KILL_WAIT
            wake.append(c.kill_deadline)
        return min(wake) if wake else None

    def _delete(self, w: PodWork) -> None:
        if self.core is None:
            return
        meta = w.pod["metadata"]
        ns = meta.get("namespace", "default")
        if w.static:
            with self.lock:
                mirror = self.mirrors.get(w.uid)
            if mirror is None or not w.gone:
                return
            name, uid = mirror["metadata"]["name"], mirror["metadata"]["uid"]
        elif w.gone:
            return          # already gone from the API server
        else:
            name, uid = meta["name"], meta["uid"]
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        try:
            self.core.delete_namespaced_pod(name, ns, body=body, _preload_content=False)
        except k8s.ApiException as e:
            if e.status not in (404, 409):
                raise

    def _grace(self, pod: dict) -> float:
        g = pod["metadata"].get("deletionGracePeriodSeconds")
        if g is None:
            g = pod["spec"].get("terminationGracePeriodSeconds", 30)
        return max(float(g), 0.0)

    # -- status -----------------------------------------------------------------------

    def _report(self, w: PodWork) -> None:
        """PATCH the status when it changed (the kubelet's status manager);
        standalone, log it when its summary changed."""
        st = self._status(w)
        summary = _summary(st)
        if summary != w.logged:
            log.info("pod %s: %s", self._name(w.uid), summary)
            w.logged = summary
        if self.core is None:
            return
        meta = w.pod["metadata"]
        ns = meta.get("namespace", "default")
        if w.static:
            mirror = self._mirror(w)
            if mirror is None:
                return
            name, uid = mirror["metadata"]["name"], mirror["metadata"]["uid"]
        else:
            name, uid = meta["name"], meta["uid"]
        # The target's uid is part of the key: a new mirror pod gets the
        # status even when the status did not change.
        key = uid + json.dumps(st, sort_keys=True)
        if key == w.posted:
            return
        # containerStatuses have no merge key: the lists are sent whole,
        # and a strategic merge patch replaces them.  The uid makes the
        # patch fail (409) on a pod of the same name that is not this one.
        patch = {"metadata": {"uid": uid}, "status": st}
        try:
            self.core.patch_namespaced_pod_status(name, ns, patch, _preload_content=False)
        except k8s.ApiException as e:
            if e.status in (404, 409):
                return          # deleted or replaced meanwhile: the watch says
            raise
        w.posted = key

    def _mirror(self, w: PodWork) -> dict | None:
        """The mirror pod of a static pod: created when missing, replaced
        when it mirrors another version of the file."""
        with self.lock:
            mirror = self.mirrors.get(w.uid)
        if mirror is not None and not mirror["metadata"].get("deletionTimestamp"):
            return mirror
        node_uid = self.node_uid()
        if node_uid is None:
            return None         # not registered yet: the next sync
        pod = json.loads(json.dumps(w.pod))
        meta = pod["metadata"]
        for k in ("uid", "resourceVersion", "creationTimestamp"):
            meta.pop(k, None)
        meta["annotations"][MIRROR_ANN] = w.uid
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": self.node,
                                    "uid": node_uid, "controller": True}]
        pod.pop("status", None)
        try:
            got = json.loads(self.core.create_namespaced_pod(
                meta.get("namespace", "default"), pod, _preload_content=False).data)
        except k8s.ApiException as e:
            if e.status != 409:
                raise
            return None     # an older mirror is still there; the watch brings it
        log.info("created mirror pod %s/%s", got["metadata"]["namespace"],
                 got["metadata"]["name"])
        with self.lock:
            self.mirrors[w.uid] = got
        return got

    def _status(self, w: PodWork) -> dict:
        """The PodStatus (podstatus.pod_status) from what the parent and
        the probes say; the phase it computes is the worker's from now on."""
        now = time.time()
        ip = self._host_ip()
        previous = w.last_status
        if w.refusal is not None:
            st = admit.rejection_status(w.pod, *w.refusal)
            st.update(hostIP=ip, hostIPs=[{"ip": ip}])
            st.setdefault("startTime", (previous or {}).get("startTime")
                          or podstatus.rfc3339(now))
        else:
            view = self._view(w)
            st = podstatus.pod_status(w.pod, view, now=now, previous=previous,
                                      host_ip=[ip], pod_ips=[self._pod_ip(w)])
            if w.evicting:
                _evicted_status(st, w.evicted or "", previous, now)
        w.phase = st["phase"]
        w.last_status = st
        return st

    def _view(self, w: PodWork) -> podstatus.PodView:
        views = {}
        for c in w.containers.values():
            v = self._cview(w, c)
            if v is not None:
                views[c.name] = v
        view = podstatus.PodView(sandbox_ready=w.info is not None and not w.removed,
                                 containers=views)
        terminal = podstatus.finished(w.pod, view) or (
            w.removed and not any(c.running for c in w.containers.values()))
        return podstatus.PodView(view.sandbox_ready, views, terminal)

    def _cview(self, w: PodWork, c: CState) -> podstatus.ContainerView | None:
        """One container as podstatus sees it; None when it never ran and
        waits for nothing in particular (podstatus fills in the default)."""
        cur = c.current
        last = c.last
        if cur is None:
            if c.waiting[0] in ("", "ContainerCreating"):
                return None
            return podstatus.ContainerView(c.name, podstatus.Waiting(*c.waiting), None, 0,
                                           False, False, image_id=c.image_id)
        ready = started = False
        if cur.running:
            state: Any = podstatus.Running(cur.started_at)
            if c.init and not c.sidecar:
                started = True
            else:
                started = self.prober.result(w.uid, c.name, probes.STARTUP) is True
                ready = started and c.kill_deadline is None and \
                    self.prober.result(w.uid, c.name, probes.READINESS) is True
        else:
            ended = _exit_state(cur)
            if c.waiting[0]:
                state, last = podstatus.Waiting(*c.waiting), cur
            else:
                state = ended
        last_state = _exit_state(last) if last is not None and not last.running else None
        return podstatus.ContainerView(c.name, state, last_state, cur.restart_count,
                                       ready, started, image_id=c.image_id,
                                       container_id=cur.container_id)


def _evicted_status(st: dict, message: str, previous: dict | None, now: float) -> None:
    """What the kubelet's eviction manager sets on an evicted pod: phase
    Failed, reason Evicted, and the DisruptionTarget condition."""
    st.update(phase=FAILED, reason="Evicted", message=message)
    old = next((c for c in (previous or {}).get("conditions") or ()
                if c.get("type") == "DisruptionTarget"), None)
    cond = {"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
            "message": message,
            "lastTransitionTime": (old or {}).get("lastTransitionTime") or rfc3339(now)}
    st["conditions"] = [c for c in st.get("conditions") or ()
                        if c.get("type") != "DisruptionTarget"] + [cond]


def _is_sidecar(cspec: dict) -> bool:
    """An init container that runs beside the app containers (KEP-753)."""
    return cspec.get("restartPolicy") == "Always"


def _stop_signal(image_signal: str | None) -> str:
    """The image's StopSignal as SignalContainer names it; SIGTERM when
    unset or not one pufflet sends."""
    sig = (image_signal or "SIGTERM").upper()
    if not sig.startswith("SIG"):
        sig = "SIG" + sig
    return sig if sig in _SIGNALS else "SIGTERM"


def _exit_state(inst: Instance) -> podstatus.Terminated:
    if inst.reason == "StartError":
        return podstatus.Terminated(128, podstatus.START_ERROR, inst.message, inst.started_at,
                                    inst.finished_at, None, "")
    return podstatus.exit_state(inst.exit_code, inst.signal, started_at=inst.started_at,
                                finished_at=inst.finished_at, reason=inst.reason,
                                container_id=inst.container_id)


# ---------------------------------------------------------------------------
# lookups for env and volumes: ConfigMaps, Secrets, tokens

@dataclass
class _Prepared:
    """A pod's SetVolume requests, the volumes that could not be made
    (name, why), and when (monotonic) to read them all again."""
    due: float
    requests: list[tuple[str, dict]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


class _Lookups:
    """What envvars and volumedata may need from the API server, fetched
    at most once per sync, and shared with other pods' syncs for
    OBJECT_TTL (what is missing is asked again: it may come); standalone,
    nothing is found."""

    def __init__(self, mgr: PodManager, pod: dict) -> None:
        self.mgr = mgr
        self.pod = pod
        self.ns = pod["metadata"].get("namespace", "default")
        self.refresh: float | None = None
        self._cache: dict[tuple[str, str], dict | None] = {}

    def _get(self, kind: str, name: str) -> dict | None:
        key = (kind, name)
        if key in self._cache:
            return self._cache[key]
        got = None
        if self.mgr.core is not None:
            got = self._shared(kind, name)
        self._cache[key] = got
        return got

    def _shared(self, kind: str, name: str) -> dict | None:
        """The object from the manager's cache, or read once however many
        syncs ask for it at the same time (the others wait for that read)."""
        mgr = self.mgr
        key = (kind, self.ns, name)
        with mgr.lock:
            had = mgr._objects.get(key)
            if had is not None and time.monotonic() - had[0] < OBJECT_TTL:
                return had[1]
            reading = mgr._reading.get(key)
            mine = reading is None
            if mine:
                reading = mgr._reading[key] = futures.Future()
        if not mine:
            return reading.result()
        now = time.monotonic()
        got = None
        try:
            fn = mgr.core.read_namespaced_config_map if kind == "configmap" \
                else mgr.core.read_namespaced_secret
            try:
                got = json.loads(fn(name, self.ns, _preload_content=False).data)
            except k8s.ApiException as e:
                if e.status != 404:
                    raise
        except BaseException as e:
            reading.set_exception(e)
            raise
        finally:
            with mgr.lock:
                del mgr._reading[key]
                if got is not None:
                    for k in [k for k, (t, _) in mgr._objects.items()
                              if now - t >= OBJECT_TTL]:
                        del mgr._objects[k]
                    mgr._objects[key] = (now, got)
        reading.set_result(got)
        return got

    def __call__(self, kind: str, namespace: str, name: str) -> dict | None:
        """envvars' lookup: kind "configmaps" or "secrets"."""
        return self._get("configmap" if kind == "configmaps" else "secret", name)

    def config_map(self, name: str) -> dict | None:
        return self._get("configmap", name)

    def secret(self, name: str) -> dict | None:
        return self._get("secret", name)

    def pod_ip(self) -> str:
        with self.mgr.lock:
            w = self.mgr.works.get((self.pod.get("metadata") or {}).get("uid", ""))
        return self.mgr._pod_ip(w)

    def host_ip(self) -> str:
        return self.mgr._host_ip()

    def node_name(self) -> str:
        return self.mgr.node


# ---------------------------------------------------------------------------
# small pure helpers

def _is_mirror(pod: dict) -> bool:
    return MIRROR_ANN in ((pod.get("metadata") or {}).get("annotations") or {})


def pod_hostname(pod: dict) -> str:
    """spec.hostname, else the pod's name cut to a DNS label (63 chars,
    no trailing '-'), as the kubelet does."""
    name = pod["spec"].get("hostname") or pod["metadata"]["name"]
    name = _LABEL_BAD.sub("-", name.lower())[:63].strip("-")
    return name or "pod"


def _host_ports(spec: dict) -> list[dict]:
    """Every containerPort with a hostPort, for the parent's rules; the
    same hostPort twice (admission refuses conflicts) is sent once."""
    out: dict[tuple, dict] = {}
    for c in [*(spec.get("initContainers") or ()), *(spec.get("containers") or ())]:
        for p in c.get("ports") or ():
            if not p.get("hostPort"):
                continue
            proto = p.get("protocol") or "TCP"
            if proto not in ("TCP", "UDP"):
                continue        # SCTP: pf has no rdr-to for it; not mapped
            hp = {"host_port": int(p["hostPort"]), "container_port": int(p["containerPort"]),
                  "protocol": proto}
            if p.get("hostIP") and p["hostIP"] not in ("0.0.0.0", "::"):
                hp["host_ip"] = p["hostIP"]
            out.setdefault((hp["host_port"], proto, hp.get("host_ip")), hp)
    return list(out.values())[:64]


def _host_resolv_conf() -> str:
    """The node's resolv.conf, for dnsPolicy Default and the host's search list."""
    try:
        with open(RESOLV_CONF, encoding="utf-8", errors="replace") as f:
            text = f.read(4096)
    except OSError:
        return ""
    return text if len(text) < 4096 else text[:text.rfind("\n", 0, 4096) + 1]


def _parse_time(t: str | None) -> float | None:
    if not t:
        return None
    try:
        return datetime.datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _container_spec(pod: dict, name: str) -> dict | None:
    spec = pod["spec"]
    for c in list(spec.get("initContainers") or ()) + list(spec.get("containers") or ()):
        if c.get("name") == name:
            return c
    return None


def _writable_volumes(spec: dict) -> set[str]:
    out = set()
    for c in list(spec.get("initContainers") or ()) + list(spec.get("containers") or ()):
        for m in c.get("volumeMounts") or ():
            if not m.get("readOnly"):
                out.add(m.get("name"))
    return out


def _mounts(cspec: dict) -> list[dict]:
    return [{"volume": m["name"], "path": m["mountPath"], "read_only": bool(m.get("readOnly"))}
            for m in cspec.get("volumeMounts") or ()][:64]


_SUFFIX = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50,
           "Ei": 2 ** 60, "n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6,
           "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_QUANTITY = re.compile(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?")


def quantity(q: Any) -> float:
    """A resource.Quantity ("16Mi", "500m", "1e3", 2) as a number."""
    if isinstance(q, (int, float)):
        return float(q)
    m = _QUANTITY.fullmatch(str(q).strip())
    if not m:
        raise ValueError(f"not a quantity: {q!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2) or ""]


def _limits(cspec: dict) -> dict:
    lim = (cspec.get("resources") or {}).get("limits") or {}
    out: dict[str, int] = {}
    try:
        if "memory" in lim:
            out["memory_bytes"] = int(quantity(lim["memory"]))
        if "cpu" in lim:
            out["cpu_millis"] = max(1, int(round(quantity(lim["cpu"]) * 1000)))
        if "ephemeral-storage" in lim:
            out["ephemeral_bytes"] = int(quantity(lim["ephemeral-storage"]))
    except ValueError:
        pass        # the API server validates quantities; a file pod may lie
    return out


def _bytes_key(o: Any) -> str:
    if isinstance(o, (bytes, bytearray)):
        return hashlib.sha256(o).hexdigest()
    raise TypeError(type(o).__name__)


def _summary(st: dict) -> str:
    parts = [st.get("phase", "?")]
    for c in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
        state = c.get("state") or {}
        kind = next(iter(state), "?")
        detail = (state.get(kind) or {}).get("reason") or ""
        parts.append(f"{c['name']}={kind}{'(' + detail + ')' if detail else ''}"
                     f"{' ready' if c.get('ready') else ''}")
    return " ".join(parts)
