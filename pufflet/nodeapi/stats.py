"""/stats/summary, /metrics/resource and /metrics.

The figures come from the parent's GetStats (priv/stats.py), which reads
the OS's per-process accounting; here they become the kubelet's shapes:

- /stats/summary: the Summary of k8s.io/kubelet/pkg/apis/stats/v1alpha1
  (JSON; times are RFC 3339 to the second, as metav1.Time marshals).
- /metrics/resource: the series metrics-server reads (kubectl top), in
  the Prometheus text exposition format 0.0.4, with the kubelet's names,
  labels, types, "[STABLE]" help and millisecond timestamps.
- /metrics: pufflet's own process.

usageNanoCores is a rate: it needs two samples, so the last one is kept
and rates are computed when a new one arrives (not more often than
MIN_INTERVAL, so two scrapes a moment apart share one sample instead of
dividing noise by a tiny interval).  Without a previous sample the field
is left out, as the kubelet does.

metrics-server drops a whole pod when any of its containers shows zero
CPU or zero memory (decode.go, checkContainerMetrics).  A process that
has just started has used some CPU, but less than the OS's accounting
resolution (a clock tick), so its counter reads 0; reporting 1 ns there is
the honest lower bound, not an invention.  A container with no live
process (between its exit and its status) has no working set at all: it
is left out of /metrics/resource rather than sink its pod with a zero.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

from pufflet import __version__

log = logging.getLogger("pufflet.nodeapi.stats")

MIN_INTERVAL = 1.0
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

PodLookup = Callable[[str], "tuple[str, str] | None"]    # pod_uid -> (namespace, name)


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(int(t), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class StatsSource:
    """Samples GetStats and remembers the previous sample for rates.

    get_stats() is the privsep call (client.call("GetStats", {}).body).
    Thread-safe: the server has a thread per connection."""

    def __init__(self, get_stats: Callable[[], dict], node_name: str,
                 pod_lookup: PodLookup | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._get = get_stats
        self.node_name = node_name
        self.pod_lookup = pod_lookup
        self.clock = clock
        self._lock = threading.Lock()
        self._sample: dict | None = None
        self._at = 0.0
        self._rates: dict[tuple, int] = {}

    def sample(self) -> tuple[dict, dict[tuple, int]]:
        """The current sample and its rates (nanocores by key)."""
        with self._lock:
            now = self.clock()
            if self._sample is not None and now - self._at < MIN_INTERVAL:
                return self._sample, self._rates
            new = self._get()
            self._rates = rates(self._sample, new) if self._sample is not None else {}
            self._sample, self._at = new, now
            return new, self._rates

    def run(self, stop: threading.Event, interval: float = 10.0) -> None:
        """Sample every interval until stop: processes that exit between
        two scrapes keep the CPU they were last seen with (priv/stats)."""
        while not stop.wait(interval):
            try:
                self.sample()
            except Exception as e:      # noqa: BLE001 - a failed sample is retried
                log.warning("stats: %s", e)


def _counters(s: dict) -> dict[tuple, tuple[float, int]]:
    t = s["node"]["time"]
    out = {("node",): (t, s["node"]["cpu_usage_ns"])}
    for p in s["pods"]:
        out[("pod", p["pod_uid"])] = (t, p["cpu_usage_ns"])
        for c in p["containers"]:
            out[("container", c["container_id"])] = (t, c["cpu_usage_ns"])
    return out


def rates(old: dict, new: dict) -> dict[tuple, int]:
    """Nanocores (ns of CPU per s) between two samples, per counter present
    in both.  A counter that went backwards (a reboot, a new count) has no
    rate this time."""
    a, b = _counters(old), _counters(new)
    out = {}
    for key, (t1, v1) in b.items():
        if key not in a:
            continue
        t0, v0 = a[key]
        if t1 > t0 and v1 >= v0:
            out[key] = int((v1 - v0) / (t1 - t0))
    return out


# ---- /stats/summary -----------------------------------------------------

def _fs(u: dict, t: str, used: int | None = None, inodes_used: int | None = None) -> dict:
    """FsStats: capacity and free of the file system, usage of the thing."""
    return {"time": t, "availableBytes": u["available_bytes"],
            "capacityBytes": u["capacity_bytes"],
            "usedBytes": u["used_bytes"] if used is None else used,
            "inodesFree": u["inodes_free"], "inodes": u["inodes"],
            "inodesUsed": u["inodes_used"] if inodes_used is None else inodes_used}


def _cpu(t: str, total: int, rate: int | None) -> dict:
    out: dict[str, Any] = {"time": t}
    if rate is not None:
        out["usageNanoCores"] = rate
    out["usageCoreNanoSeconds"] = total
    return out


def _mem(t: str, working: int, rss: int | None, usage: int | None = None,
         available: int | None = None) -> dict:
    out: dict[str, Any] = {"time": t}
    if available is not None:
        out["availableBytes"] = available
    out["usageBytes"] = working if usage is None else usage
    out["workingSetBytes"] = working
    if rss is not None:
        out["rssBytes"] = rss
    return out


def _ref(p: dict, pod_lookup: PodLookup | None) -> tuple[str, str]:
    if pod_lookup is not None:
        got = pod_lookup(p["pod_uid"])
        if got is not None:
            return got
    # The names the agent gave the parent at CreatePod.
    return p["namespace"], p["name"]


def summary(sample: dict, rate: dict[tuple, int], node_name: str,
            pod_lookup: PodLookup | None = None, only_cpu_and_memory: bool = False) -> dict:
    n = sample["node"]
    t = rfc3339(n["time"])
    node: dict[str, Any] = {"nodeName": node_name, "startTime": rfc3339(n["boot_time"]),
                            "cpu": _cpu(t, n["cpu_usage_ns"], rate.get(("node",))),
                            "memory": _mem(t, n["memory_working_set_bytes"],
                                           n.get("memory_rss_bytes"),
                                           usage=n["memory_usage_bytes"],
                                           available=n["memory_available_bytes"])}
    if not only_cpu_and_memory:
        node["fs"] = _fs(n["fs"], t)
        node["runtime"] = {"imageFs": _fs(n["image_fs"], t)}
    pods = []
    for p in sample["pods"]:
        ns, name = _ref(p, pod_lookup)
        containers = []
        for c in p["containers"]:
            cs: dict[str, Any] = {
                "name": c["name"], "startTime": rfc3339(c["start_time"]),
                "cpu": _cpu(t, c["cpu_usage_ns"], rate.get(("container", c["container_id"]))),
                "memory": _mem(t, c["memory_working_set_bytes"], c["memory_rss_bytes"])}
            if not only_cpu_and_memory:
                # No rootfs: the containers of a pod share its root, whose
                # writable part is counted once, in ephemeral-storage.
                cs["logs"] = _fs(n["log_fs"], t, c["logs_used_bytes"], c["logs_inodes_used"])
            containers.append(cs)
        ps: dict[str, Any] = {"podRef": {"name": name, "namespace": ns, "uid": p["pod_uid"]},
                              "startTime": rfc3339(p.get("start_time") or n["time"]),
                              "containers": containers,
                              "cpu": _cpu(t, p["cpu_usage_ns"], rate.get(("pod", p["pod_uid"]))),
                              "memory": _mem(t, p["memory_working_set_bytes"],
                                             p["memory_rss_bytes"])}
        if not only_cpu_and_memory:
            vols = [{**_fs(n["fs"], t, v["used_bytes"], v["inodes_used"]), "name": v["name"]}
                    for v in p["volumes"]]
            if vols:
                ps["volume"] = vols
            used = (p["rootfs_used_bytes"] + p["logs_used_bytes"]
                    + sum(v["used_bytes"] for v in p["volumes"]))
            inodes = (p["rootfs_inodes_used"] + p["logs_inodes_used"]
                      + sum(v["inodes_used"] for v in p["volumes"]))
            ps["ephemeral-storage"] = _fs(n["fs"], t, used, inodes)
            ps["process_stats"] = {"process_count": p["processes"]}
        pods.append(ps)
    return {"node": node, "pods": pods}


# ---- Prometheus text ----------------------------------------------------

def _escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class Exposition:
    """Builds one exposition: each family's HELP and TYPE once, then its
    samples, families in the order first declared."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def family(self, name: str, kind: str, help_: str) -> None:
        self._families.setdefault(name, (kind, help_, []))

    def add(self, name: str, value: float, labels: dict[str, str] | None = None,
            ts_ms: int | None = None) -> None:
        lab = ""
        if labels:
            # Sorted by name, as the Go client writes them.
            lab = "{" + ",".join(f'{k}="{_escape_label(str(labels[k]))}"'
                                 for k in sorted(labels)) + "}"
        line = f"{name}{lab} {_num(value)}"
        if ts_ms is not None:
            line += f" {ts_ms}"
        self._families[name][2].append(line)

    def text(self) -> str:
        out = []
        for name, (kind, help_, lines) in self._families.items():
            out.append(f"# HELP {name} {_escape_help(help_)}")
            out.append(f"# TYPE {name} {kind}")
            out += lines
        return "\n".join(out) + "\n"


# The kubelet's resource metrics (pkg/kubelet/metrics/collectors).
_RESOURCE = [
    ("container_cpu_usage_seconds_total", "counter",
     "[STABLE] Cumulative cpu time consumed by the container in core-seconds"),
    ("container_memory_working_set_bytes", "gauge",
     "[STABLE] Current working set of the container in bytes"),
    ("container_start_time_seconds", "gauge",
     "[STABLE] Start time of the container since unix epoch in seconds"),
    ("node_cpu_usage_seconds_total", "counter",
     "[STABLE] Cumulative cpu time consumed by the node in core-seconds"),
    ("node_memory_working_set_bytes", "gauge",
     "[STABLE] Current working set of the node in bytes"),
    ("pod_cpu_usage_seconds_total", "counter",
     "[STABLE] Cumulative cpu time consumed by the pod in core-seconds"),
    ("pod_memory_working_set_bytes", "gauge",
     "[STABLE] Current working set of the pod in bytes"),
    ("resource_scrape_error", "gauge",
     "[STABLE] 1 if there was an error while getting container metrics, 0 otherwise"),
]


def resource_metrics(sample: dict | None, pod_lookup: PodLookup | None = None) -> str:
    """The exposition; sample None means the parent could not be asked:
    only resource_scrape_error 1, as the kubelet answers then."""
    e = Exposition()
    for name, kind, help_ in _RESOURCE:
        e.family(name, kind, help_)
    if sample is None:
        e.add("resource_scrape_error", 1)
        return e.text()
    n = sample["node"]
    ts = round(n["time"] * 1000)
    e.add("node_cpu_usage_seconds_total", n["cpu_usage_ns"] / 1e9, ts_ms=ts)
    e.add("node_memory_working_set_bytes", n["memory_working_set_bytes"], ts_ms=ts)
    for p in sample["pods"]:
        ns, name = _ref(p, pod_lookup)
        for c in p["containers"]:
            if c["processes"] == 0 or c["memory_working_set_bytes"] == 0:
                continue        # nothing alive to measure: see the module's comment
            labels = {"container": c["name"], "pod": name, "namespace": ns}
            e.add("container_cpu_usage_seconds_total", max(c["cpu_usage_ns"], 1) / 1e9,
                  labels, ts)
            e.add("container_memory_working_set_bytes", c["memory_working_set_bytes"],
                  labels, ts)
            e.add("container_start_time_seconds", float(c["start_time"]), labels)
        if p["processes"] and p["memory_working_set_bytes"]:
            labels = {"pod": name, "namespace": ns}
            e.add("pod_cpu_usage_seconds_total", max(p["cpu_usage_ns"], 1) / 1e9, labels, ts)
            e.add("pod_memory_working_set_bytes", p["memory_working_set_bytes"], labels, ts)
    e.add("resource_scrape_error", 0)
    return e.text()


# ---- /metrics: pufflet's own --------------------------------------------

_STARTED = time.time()


class RequestCounter:
    """Requests by route and status code, for /metrics; the server (or a
    wrapper around each handler) calls inc()."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[tuple[str, str, int], int] = {}

    def inc(self, method: str, route: str, code: int) -> None:
        with self._lock:
            key = (method, route, code)
            self.counts[key] = self.counts.get(key, 0) + 1

    def items(self) -> list[tuple[tuple[str, str, int], int]]:
        with self._lock:
            return sorted(self.counts.items())


def own_metrics(requests: RequestCounter | None = None, started: float = _STARTED) -> str:
    e = Exposition()
    e.family("process_start_time_seconds", "gauge",
             "Start time of the process since unix epoch in seconds.")
    e.add("process_start_time_seconds", started)
    t = os.times()
    e.family("process_cpu_seconds_total", "counter",
             "Total user and system CPU time spent in seconds.")
    e.add("process_cpu_seconds_total", t.user + t.system)
    # getrusage(2) works under pledge "stdio"; ru_maxrss is KiB on both
    # Linux and OpenBSD.
    e.family("process_max_resident_memory_bytes", "gauge",
             "Largest resident set size of the process in bytes.")
    e.add("process_max_resident_memory_bytes",
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    e.family("pufflet_build_info", "gauge",
             "A metric with a constant '1' value labelled by the pufflet version.")
    e.add("pufflet_build_info", 1, {"version": __version__})
    if requests is not None:
        e.family("pufflet_nodeapi_requests_total", "counter",
                 "Node API requests by method, route and HTTP status code.")
        for (method, route, code), n in requests.items():
            e.add("pufflet_nodeapi_requests_total", n,
                  {"method": method, "route": route, "code": str(code)})
    return e.text()


# ---- handlers -----------------------------------------------------------

Response = tuple[int, str, bytes]


def summary_response(source: StatsSource, query: dict[str, list[str]]) -> Response:
    only = (query.get("only_cpu_and_memory") or ["false"])[0].lower() == "true"
    try:
        sample, rate = source.sample()
    except Exception as e:      # noqa: BLE001 - the parent's answer, whatever it is
        log.warning("stats: %s", e)
        return 500, "text/plain; charset=utf-8", f"Internal Error: {e}\n".encode()
    body = summary(sample, rate, source.node_name, source.pod_lookup, only)
    return 200, "application/json", json.dumps(body, indent=2).encode()


def resource_response(source: StatsSource) -> Response:
    try:
        sample, _ = source.sample()
    except Exception as e:      # noqa: BLE001 - reported as resource_scrape_error
        log.warning("stats: %s", e)
        sample = None
    return 200, PROMETHEUS_TEXT, resource_metrics(sample, source.pod_lookup).encode()


def metrics_response(requests: RequestCounter | None = None) -> Response:
    return 200, PROMETHEUS_TEXT, own_metrics(requests).encode()


def add_routes(server, source: StatsSource, requests: RequestCounter | None = None) -> None:
    """On nodeapi/server.py's Server, with the kubelet's authorization
    subresources: /stats/* is nodes/stats, /metrics* nodes/metrics."""

    def reply(req, r: Response) -> None:
        status, ctype, body = r
        req.send(status, body, ctype)

    server.add_route("GET", r"/stats/summary/?", "stats",
                     lambda req, m: reply(req, summary_response(source, req.query)))
    server.add_route("GET", r"/metrics/resource/?", "metrics",
                     lambda req, m: reply(req, resource_response(source)))
    server.add_route("GET", r"/metrics/?", "metrics",
                     lambda req, m: reply(req, metrics_response(requests)))


def lookup_from_manager(mgr: Any) -> PodLookup:
    """pod_lookup over agent/pods.py's PodManager (its works by pod uid)."""

    def lookup(pod_uid: str) -> tuple[str, str] | None:
        with mgr.lock:
            w = mgr.works.get(pod_uid)
        if w is None:
            return None
        md = w.pod.get("metadata", {})
        return md.get("namespace", "default"), md.get("name", "")

    return lookup
