"""A pod's status as the kubelet reports it, from what the runtime knows.

The pod manager keeps, per container, a small view (ContainerView) of
what the parent and the probes say; pod_status() turns it into the
PodStatus to patch, following the kubelet's generateAPIPodStatus,
getPhase, convertToAPIContainerStatuses, the probe manager's ready and
started rules, status/generate.go's conditions and the status manager's
lastTransitionTime and startTime rules.  Also here: CrashLoopBackOff
timing and the kubelet's waiting/terminated reasons and messages.

Times are epoch seconds (floats) in, RFC 3339 strings (second
precision, as metav1.Time) out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Union

from pufflet.priv.rlimits import QuantityError, parse_quantity

__all__ = ["Waiting", "Running", "Terminated", "ContainerView", "PodView",
           "pod_status", "phase", "qos_class", "exit_state", "should_restart",
           "finished", "Backoff", "crashloop_backoff", "backoff_message",
           "backoff_event_message", "go_duration", "rfc3339", "pod_full_name",
           "container_id_uri",
           "CONTAINER_CREATING", "POD_INITIALIZING", "CRASH_LOOP_BACK_OFF",
           "ERR_IMAGE_PULL", "IMAGE_PULL_BACK_OFF", "CREATE_CONTAINER_CONFIG_ERROR",
           "CREATE_CONTAINER_ERROR", "RUN_CONTAINER_ERROR", "COMPLETED", "ERROR",
           "START_ERROR", "CONTAINER_STATUS_UNKNOWN"]

# Waiting reasons (kubelet, kuberuntime, images).
CONTAINER_CREATING = "ContainerCreating"
POD_INITIALIZING = "PodInitializing"
CRASH_LOOP_BACK_OFF = "CrashLoopBackOff"
ERR_IMAGE_PULL = "ErrImagePull"
IMAGE_PULL_BACK_OFF = "ImagePullBackOff"
INVALID_IMAGE_NAME = "InvalidImageName"
CREATE_CONTAINER_CONFIG_ERROR = "CreateContainerConfigError"
CREATE_CONTAINER_ERROR = "CreateContainerError"
RUN_CONTAINER_ERROR = "RunContainerError"
# Terminated reasons (as containerd sets them, and the kubelet's own).
COMPLETED = "Completed"
ERROR = "Error"
START_ERROR = "StartError"          # containerd: exec failed (runc's "ContainerCannotRun")
CONTAINER_STATUS_UNKNOWN = "ContainerStatusUnknown"

# Condition reasons (status/generate.go).
UNKNOWN_CONTAINER_STATUSES = "UnknownContainerStatuses"
POD_COMPLETED = "PodCompleted"
POD_FAILED = "PodFailed"
CONTAINERS_NOT_READY = "ContainersNotReady"
CONTAINERS_NOT_INITIALIZED = "ContainersNotInitialized"
READINESS_GATES_NOT_READY = "ReadinessGatesNotReady"

# Conditions the kubelet owns; any other is kept as the API has it.
KUBELET_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "Ready",
                      "ContainersReady", "PodScheduled", "PodResizePending",
                      "PodResizeInProgress")

BACKOFF_INITIAL = 10.0
BACKOFF_MAX = 300.0


# ---- the runtime's view ------------------------------------------------------

@dataclass(frozen=True)
class Waiting:
    reason: str
    message: str = ""


@dataclass(frozen=True)
class Running:
    started_at: float


@dataclass(frozen=True)
class Terminated:
    exit_code: int
    reason: str = ""                 # "": Completed for 0, Error otherwise
    message: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    signal: int | None = None
    container_id: str = ""


State = Union[Waiting, Running, Terminated]


@dataclass(frozen=True)
class ContainerView:
    """One container (app or init) as the manager knows it.  ready and
    started are the probes' verdicts (True when there is no probe);
    they count only while the container runs."""
    name: str
    state: State
    last_state: Terminated | None = None
    restart_count: int = 0
    ready: bool = True
    started: bool = True
    image: str = ""                  # "": the spec's image
    image_id: str = ""               # e.g. docker.io/library/x@sha256:...
    container_id: str = ""           # pufflet://<id>; a bare id gets the prefix


@dataclass(frozen=True)
class PodView:
    """sandbox_ready: the pod root (and its network) exist.  containers:
    by name, app and init; a container never created is absent.
    terminal: the pod will run nothing more (the kubelet's podIsTerminal:
    finished() for its restart policy, or deleted and stopped)."""
    sandbox_ready: bool
    containers: Mapping[str, ContainerView]
    terminal: bool = False


def container_id_uri(cid: str) -> str:
    return cid if not cid or "://" in cid else f"pufflet://{cid}"


def rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(t)))


def pod_full_name(pod: Mapping[str, Any]) -> str:
    """format.Pod: name_namespace(uid)."""
    m = pod.get("metadata") or {}
    return f"{m.get('name', '')}_{m.get('namespace', '')}({m.get('uid', '')})"


def exit_state(exit_code: int | None, signal: int | None, *, started_at: float | None,
               finished_at: float | None, reason: str = "", container_id: str = "") -> Terminated:
    """A Terminated from what the parent reports (ContainerState /
    ContainerEvent).  A signal death reads as 128+signal, as runc and
    containerd report it, with signal set too; with neither code nor
    signal (it ended while pufflet was down and the OS cannot tell) it is
    ContainerStatusUnknown with exit code 137, the kubelet's choice for a
    container it lost, and reason as the message."""
    if exit_code is None and signal is None:
        return Terminated(137, CONTAINER_STATUS_UNKNOWN, reason, started_at, finished_at,
                          None, container_id)
    code = exit_code if exit_code is not None else 128 + int(signal or 0)
    return Terminated(code, "", "", started_at, finished_at, signal, container_id)


# ---- container statuses ------------------------------------------------------

def _terminated_json(t: Terminated) -> dict[str, Any]:
    out: dict[str, Any] = {"exitCode": t.exit_code,
                           "reason": t.reason or (COMPLETED if t.exit_code == 0 else ERROR)}
    if t.signal:
        out["signal"] = t.signal
    if t.message:
        out["message"] = t.message
    out["startedAt"] = rfc3339(t.started_at) if t.started_at else None
    out["finishedAt"] = rfc3339(t.finished_at) if t.finished_at else None
    if t.container_id:
        out["containerID"] = container_id_uri(t.container_id)
    return out


def _state_json(s: State) -> dict[str, Any]:
    if isinstance(s, Running):
        return {"running": {"startedAt": rfc3339(s.started_at)}}
    if isinstance(s, Terminated):
        return {"terminated": _terminated_json(s)}
    w: dict[str, Any] = {"reason": s.reason} if s.reason else {}
    if s.message:
        w["message"] = s.message
    return {"waiting": w}


def _restartable(c: Mapping[str, Any]) -> bool:
    return c.get("restartPolicy") == "Always"


def _container_status(c: Mapping[str, Any], view: ContainerView | None,
                      old: Mapping[str, Any] | None, default_reason: str,
                      *, init: bool, deleting: bool) -> dict[str, Any]:
    name = c.get("name") or ""
    if view is None:
        # Never created: the default waiting state, keeping what the
        # previous status knew (convertToAPIContainerStatuses).
        if old is not None and "terminated" in (old.get("state") or {}):
            return dict(old)
        st: dict[str, Any] = {"name": name, "state": {"waiting": {"reason": default_reason}},
                              "lastState": {}, "ready": False, "restartCount": 0,
                              "image": c.get("image") or "", "imageID": "", "started": False}
        if old is not None:
            st["restartCount"] = old.get("restartCount", 0)
            st["lastState"] = old.get("lastState") or {}
            if "running" in (old.get("state") or {}) and "terminated" not in st["lastState"]:
                # It ran and has vanished: stopped, not "never started".
                st["lastState"] = {"terminated": {
                    "exitCode": 137, "reason": CONTAINER_STATUS_UNKNOWN,
                    "message": "The container could not be located when the pod was "
                               "deleted.  The container used to be Running",
                    "startedAt": None, "finishedAt": None}}
                if not deleting:
                    st["restartCount"] += 1
        return st
    running = isinstance(view.state, Running)
    if init and not _restartable(c):
        started = running
        ready = isinstance(view.state, Terminated) and view.state.exit_code == 0
    else:
        started = running and view.started
        ready = started and view.ready
    st = {"name": name, "state": _state_json(view.state),
          "lastState": _state_json(view.last_state) if view.last_state else {},
          "ready": ready, "restartCount": view.restart_count,
          "image": view.image or c.get("image") or "", "imageID": view.image_id,
          "started": started}
    if view.container_id:
        st["containerID"] = container_id_uri(view.container_id)
    return st


# ---- phase ---------------------------------------------------------------------

def _st(statuses: Mapping[str, Mapping[str, Any]], name: str) -> tuple[Mapping, Mapping] | None:
    s = statuses.get(name)
    if s is None:
        return None
    return s.get("state") or {}, s.get("lastState") or {}


def _any_regular_started(spec: Mapping[str, Any], statuses: Mapping[str, Mapping[str, Any]]) -> bool:
    """HasAnyRegularContainerStarted."""
    for c in spec.get("containers") or ():
        got = _st(statuses, c.get("name"))
        if got and ("running" in got[0] or "terminated" in got[0]):
            return True
    return False


def phase(pod: Mapping[str, Any], statuses: Mapping[str, Mapping[str, Any]],
          terminal: bool) -> str:
    """getPhase, over the API container statuses (init and app) by name."""
    spec = pod.get("spec") or {}
    policy = spec.get("restartPolicy") or "Always"
    pending_init = failed_init = 0
    for c in spec.get("initContainers") or ():
        if _restartable(c):
            continue
        got = _st(statuses, c.get("name"))
        if got is None:
            pending_init += 1
            continue
        state, last = got
        if "running" in state:
            pending_init += 1
        elif "terminated" in state:
            if state["terminated"].get("exitCode", 0) != 0:
                failed_init += 1
        elif "waiting" in state:
            if "terminated" in last:
                if last["terminated"].get("exitCode", 0) != 0:
                    failed_init += 1
            else:
                pending_init += 1
        else:
            pending_init += 1

    unknown = running = waiting = stopped = succeeded = 0
    for c in spec.get("initContainers") or ():
        if not _restartable(c):
            continue
        got = _st(statuses, c.get("name"))
        if got is None:
            unknown += 1
            continue
        state, last = got
        if "running" in state:
            if not statuses[c.get("name")].get("started"):
                pending_init += 1
            running += 1
        elif "terminated" in state:
            pass
        elif "waiting" in state:
            if "terminated" not in last:
                pending_init += 1
                waiting += 1
        else:
            pending_init += 1
            unknown += 1

    for c in spec.get("containers") or ():
        got = _st(statuses, c.get("name"))
        if got is None:
            unknown += 1
            continue
        state, last = got
        if "running" in state:
            running += 1
        elif "terminated" in state:
            stopped += 1
            if state["terminated"].get("exitCode", 0) == 0:
                succeeded += 1
        elif "waiting" in state:
            if "terminated" in last:
                stopped += 1
            else:
                waiting += 1
        else:
            unknown += 1

    if failed_init > 0 and policy == "Never":
        return "Failed"
    if (pending_init > 0 and not _any_regular_started(spec, statuses)) or waiting > 0:
        return "Pending"
    if running > 0 and unknown == 0:
        return "Running"
    if running == 0 and stopped > 0 and unknown == 0:
        # The kubelet does not give static pods a terminal phase (#116484).
        if terminal and not _is_static(pod):
            return "Succeeded" if stopped == succeeded else "Failed"
        if policy == "Always":
            return "Running"
        if stopped == succeeded:
            return "Succeeded"
        if policy == "Never":
            return "Failed"
        return "Running"
    return "Pending"


def _is_static(pod: Mapping[str, Any]) -> bool:
    src = ((pod.get("metadata") or {}).get("annotations") or {}).get("kubernetes.io/config.source")
    return src is not None and src != "api"


# ---- QoS ---------------------------------------------------------------------

def _q(v: Any) -> Fraction:
    try:
        return parse_quantity(str(v))
    except QuantityError:
        return Fraction(0)


def qos_class(pod: Mapping[str, Any]) -> str:
    """ComputePodQOS over cpu and memory of app and init containers, after
    the API server's defaulting (a limit without a request is the request;
    static pods are not defaulted by anyone else)."""
    spec = pod.get("spec") or {}
    requests: dict[str, Fraction] = {}
    limits: dict[str, Fraction] = {}
    guaranteed = True
    for c in list(spec.get("containers") or ()) + list(spec.get("initContainers") or ()):
        res = c.get("resources") or {}
        reqs = {**(res.get("limits") or {}), **(res.get("requests") or {})}
        for name, v in reqs.items():
            if name in ("cpu", "memory") and _q(v) > 0:
                requests[name] = requests.get(name, Fraction(0)) + _q(v)
        found = set()
        for name, v in (res.get("limits") or {}).items():
            if name in ("cpu", "memory") and _q(v) > 0:
                found.add(name)
                limits[name] = limits.get(name, Fraction(0)) + _q(v)
        if not {"cpu", "memory"} <= found:
            guaranteed = False
    if not requests and not limits:
        return "BestEffort"
    if guaranteed and all(limits.get(n) == v for n, v in requests.items()) \
            and len(requests) == len(limits):
        return "Guaranteed"
    return "Burstable"


# ---- conditions ----------------------------------------------------------------

def _go_list(names: Sequence[str]) -> str:
    return "[" + " ".join(names) + "]"


def _containers_ready(spec: Mapping[str, Any], statuses: Mapping[str, Mapping[str, Any]],
                      ph: str) -> dict[str, Any]:
    unknown, unready = [], []
    for c in [c for c in spec.get("initContainers") or () if _restartable(c)] + \
            list(spec.get("containers") or ()):
        s = statuses.get(c.get("name"))
        if s is None:
            unknown.append(c.get("name"))
        elif not s.get("ready"):
            unready.append(c.get("name"))
    if ph == "Succeeded" and not unknown:
        return {"type": "ContainersReady", "status": "False", "reason": POD_COMPLETED}
    if ph == "Failed":
        return {"type": "ContainersReady", "status": "False", "reason": POD_FAILED}
    msgs = []
    if unknown:
        msgs.append(f"containers with unknown status: {_go_list(unknown)}")
    if unready:
        msgs.append(f"containers with unready status: {_go_list(unready)}")
    if msgs:
        return {"type": "ContainersReady", "status": "False", "reason": CONTAINERS_NOT_READY,
                "message": ", ".join(msgs)}
    return {"type": "ContainersReady", "status": "True"}


def _ready(spec: Mapping[str, Any], conditions: Sequence[Mapping[str, Any]],
           containers_ready: Mapping[str, Any]) -> dict[str, Any]:
    if containers_ready["status"] != "True":
        out = {"type": "Ready", "status": containers_ready["status"]}
        for k in ("reason", "message"):
            if k in containers_ready:
                out[k] = containers_ready[k]
        return out
    msgs = []
    for gate in spec.get("readinessGates") or ():
        t = gate.get("conditionType")
        c = next((c for c in conditions if c.get("type") == t), None)
        if c is None:
            msgs.append(f'corresponding condition of pod readiness gate "{t}" does not exist.')
        elif c.get("status") != "True":
            msgs.append(f'the status of pod readiness gate "{t}" is not "True", '
                        f'but {c.get("status")}')
    if msgs:
        return {"type": "Ready", "status": "False", "reason": READINESS_GATES_NOT_READY,
                "message": ", ".join(msgs)}
    return {"type": "Ready", "status": "True"}


def _initialized(spec: Mapping[str, Any], statuses: Mapping[str, Mapping[str, Any]],
                 ph: str) -> dict[str, Any]:
    unknown, incomplete = [], []
    for c in spec.get("initContainers") or ():
        s = statuses.get(c.get("name"))
        if s is None:
            unknown.append(c.get("name"))
            continue
        ok = s.get("started") if _restartable(c) else s.get("ready")
        if not ok:
            incomplete.append(c.get("name"))
    if ph == "Succeeded" and not unknown:
        return {"type": "Initialized", "status": "True", "reason": POD_COMPLETED}
    if _any_regular_started(spec, statuses):
        return {"type": "Initialized", "status": "True"}
    msgs = []
    if unknown:
        msgs.append(f"containers with unknown status: {_go_list(unknown)}")
    if incomplete:
        msgs.append(f"containers with incomplete status: {_go_list(incomplete)}")
    if msgs:
        return {"type": "Initialized", "status": "False", "reason": CONTAINERS_NOT_INITIALIZED,
                "message": ", ".join(msgs)}
    return {"type": "Initialized", "status": "True"}


# ---- the status ----------------------------------------------------------------

def _ips(v: str | Sequence[str] | None) -> list[str]:
    if not v:
        return []
    return [v] if isinstance(v, str) else [ip for ip in v if ip]


def pod_status(pod: Mapping[str, Any], runtime: PodView, *, now: float,
               previous: Mapping[str, Any] | None = None,
               host_ip: str | Sequence[str] = (),
               pod_ips: Sequence[str] = ()) -> dict[str, Any]:
    """The PodStatus to patch.

    previous is the last status this agent patched, or the pod's status
    as the API has it (after a restart): it carries the transition times,
    startTime, qosClass, a terminal phase (never left), the phase's
    reason/message, conditions the kubelet does not own, and what is
    known of containers never seen by the runtime.  host_ip: the node's
    addresses (first is status.hostIP); pod_ips in the node's family
    order; a hostNetwork pod without pod_ips gets the node's."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    old = previous if previous is not None else (pod.get("status") or {})
    api_status = pod.get("status") or {}
    deleting = meta.get("deletionTimestamp") is not None
    has_init = bool(spec.get("initContainers"))
    default_reason = POD_INITIALIZING if has_init else CONTAINER_CREATING

    def statuses_for(containers: Sequence[Mapping[str, Any]], key: str,
                     init: bool) -> list[dict[str, Any]]:
        olds = {s.get("name"): s for s in old.get(key) or ()}
        return [_container_status(c, runtime.containers.get(c.get("name")),
                                  olds.get(c.get("name")), default_reason,
                                  init=init, deleting=deleting)
                for c in containers]

    init_statuses = statuses_for(spec.get("initContainers") or (), "initContainerStatuses", True)
    app_statuses = statuses_for(spec.get("containers") or (), "containerStatuses", False)
    # The kubelet sorts app container statuses by name; init stay in order.
    app_statuses.sort(key=lambda s: s["name"])
    by_name = {s["name"]: s for s in app_statuses + init_statuses}

    ph = phase(pod, by_name, runtime.terminal)
    if ph not in ("Failed", "Succeeded"):
        for earlier in (old.get("phase"), api_status.get("phase")):
            if earlier in ("Failed", "Succeeded"):
                ph = earlier
                break
    out: dict[str, Any] = {"phase": ph}
    if ph == old.get("phase"):
        reason = old.get("reason") or api_status.get("reason")
        message = old.get("message") or api_status.get("message")
        if reason:
            out["reason"] = reason
        if message:
            out["message"] = message

    # Conditions: those the kubelet does not own as the API has them,
    # then its own, in the kubelet's order.
    conditions = [dict(c) for c in (api_status.get("conditions") or ())
                  if c.get("type") not in KUBELET_CONDITIONS]
    conditions.append({"type": "PodReadyToStartContainers",
                       "status": "True" if runtime.sandbox_ready else "False"})
    conditions.append(_initialized(spec, by_name, ph))
    cready = _containers_ready(spec, by_name, ph)
    conditions.append(_ready(spec, conditions, cready))
    conditions.append(cready)
    conditions.append({"type": "PodScheduled", "status": "True"})
    olds = {c.get("type"): c for c in (old.get("conditions") or ())}
    gen = meta.get("generation")
    for c in conditions:
        if c["type"] not in KUBELET_CONDITIONS:
            continue
        prev = olds.get(c["type"])
        if prev is not None and prev.get("status") == c["status"] and prev.get("lastTransitionTime"):
            c["lastTransitionTime"] = prev["lastTransitionTime"]
        else:
            c["lastTransitionTime"] = rfc3339(now)
        c.setdefault("lastProbeTime", None)
        if gen is not None:
            c["observedGeneration"] = gen
    out["conditions"] = conditions

    hosts = _ips(host_ip)
    if hosts:
        out["hostIP"] = hosts[0]
        out["hostIPs"] = [{"ip": ip} for ip in hosts[:2]]
    ips = list(pod_ips) or (hosts[:2] if spec.get("hostNetwork") else [])
    if ips:
        out["podIP"] = ips[0]
        out["podIPs"] = [{"ip": ip} for ip in ips]
    out["startTime"] = old.get("startTime") or rfc3339(now)
    if init_statuses:
        out["initContainerStatuses"] = init_statuses
    out["containerStatuses"] = app_statuses
    out["qosClass"] = old.get("qosClass") or api_status.get("qosClass") or qos_class(pod)
    if gen is not None:
        out["observedGeneration"] = gen
    return out


# ---- restarts ------------------------------------------------------------------

def should_restart(pod: Mapping[str, Any], container: Mapping[str, Any],
                   view: ContainerView | None) -> bool:
    """ShouldContainerBeRestarted: never once the pod is being deleted;
    always if it never ran or is only waiting; if it ended, by the
    container's restartPolicy (init sidecars: Always), else the pod's."""
    if (pod.get("metadata") or {}).get("deletionTimestamp") is not None:
        return False
    if view is None:
        return True
    if isinstance(view.state, Running):
        return False
    last = view.state if isinstance(view.state, Terminated) else view.last_state
    if last is None:
        return True
    policy = container.get("restartPolicy") or (pod.get("spec") or {}).get("restartPolicy") or "Always"
    if policy == "Never":
        return False
    if policy == "OnFailure":
        return last.exit_code != 0
    return True


def finished(pod: Mapping[str, Any], runtime: PodView) -> bool:
    """Nothing runs and nothing will be started again, so the pod is
    terminal (PodView.terminal): when deleted, once no container runs;
    otherwise after a failed init container that will not be retried, or
    when every app container has terminated for good.  Init sidecars do
    not keep a pod alive."""
    spec = pod.get("spec") or {}
    views = runtime.containers
    if (pod.get("metadata") or {}).get("deletionTimestamp") is not None:
        return not any(isinstance(v.state, Running) for v in views.values())
    for c in spec.get("initContainers") or ():
        v = views.get(c.get("name"))
        if not _restartable(c) and v is not None and isinstance(v.state, Terminated) \
                and v.state.exit_code != 0 and not should_restart(pod, c, v):
            return True
    apps = list(spec.get("containers") or ())
    for c in apps:
        v = views.get(c.get("name"))
        if v is None or not isinstance(v.state, Terminated) or should_restart(pod, c, v):
            return False
    return bool(apps)


@dataclass(frozen=True)
class Backoff:
    """A container's crash-loop back-off, kept by the manager per
    container (pod uid + name) between restarts."""
    delay: float          # the current back-off period
    updated: float        # when it was last stepped (the last restart)


def crashloop_backoff(entry: Backoff | None, finished_at: float, now: float, *,
                      initial: float = BACKOFF_INITIAL,
                      cap: float = BACKOFF_MAX) -> tuple[float, Backoff | None]:
    """Whether an exited container may restart now: (seconds still to
    wait, entry to keep).  The kubelet's doBackOff with flowcontrol.Backoff:
    the first restart is immediate and starts a 10 s period; each later
    one waits for the period since finished_at, then doubles it up to
    5 min.  A container that ran more than twice the cap (10 min) since
    the last restart starts again from 10 s.  When the wait is positive
    report CrashLoopBackOff with backoff_message(entry.delay, ...)."""
    expired = entry is None or finished_at - entry.updated > 2 * cap
    if not expired:
        wait = entry.delay - (now - finished_at)
        if wait > 0:
            return wait, entry
        return 0.0, Backoff(min(entry.delay * 2, cap), now)
    return 0.0, Backoff(initial, now)


def go_duration(seconds: float) -> str:
    """time.Duration.String for whole seconds: 10s, 1m20s, 5m0s, 1h0m0s."""
    s = int(math.floor(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s}s"
    h, m = divmod(m, 60)
    return f"{h}h{m}m{s}s"


def backoff_message(delay: float, container: str, pod: Mapping[str, Any]) -> str:
    """The CrashLoopBackOff waiting message."""
    return (f"back-off {go_duration(delay)} restarting failed container={container} "
            f"pod={pod_full_name(pod)}")


def backoff_event_message(container: str, pod: Mapping[str, Any]) -> str:
    """The BackOff event's message."""
    return f"Back-off restarting failed container {container} in pod {pod_full_name(pod)}"
