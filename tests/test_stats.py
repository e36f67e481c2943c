"""Stats: real pods burning real CPU, accounted by the parent's GetStats
through a real privsep channel; the agent's Summary and Prometheus text
checked field by field (the text by the Prometheus project's own parser,
prometheus_client, independent of ours); the OpenBSD sysctl calls and
struct layout golden."""

import ctypes
import errno
import json
import os
import re
import struct
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from test_pods_priv import (POD_A, UID_HI, create, env, layers, reaper,  # noqa: F401
                            start, wait_for)
from pufflet.nodeapi import stats as nstats
from pufflet.platform import linux_stats, openbsd_stats
from pufflet.platform.procstat import NodeSample, ProcSample
from pufflet.priv import stats as pstats

BURN = "while :; do :; done"


def get(p):
    return p.call("GetStats", {}).body


def pod_of(s, pod=POD_A):
    return next(x for x in s["pods"] if x["pod_uid"] == pod)


def cont(s, name, pod=POD_A):
    return next(c for c in pod_of(s, pod)["containers"] if c["name"] == name)


# ---- the parent, real processes -------------------------------------------------

def test_burning_container_counted_apart_from_an_idle_one(env):
    p = env.priv()
    create(p, env)
    start(p, env, ["sh", "-c", BURN], name="burn")
    start(p, env, ["sleep", "100"], name="idle")
    wait_for(lambda: cont(get(p), "burn")["cpu_usage_ns"] > 0)
    a = get(p)
    time.sleep(0.3)
    b = get(p)
    burn_a, burn_b = cont(a, "burn"), cont(b, "burn")
    idle_b = cont(b, "idle")
    assert burn_b["cpu_usage_ns"] > burn_a["cpu_usage_ns"]
    # ~0.3 s of one busy core, give or take scheduling and tick rounding
    assert burn_b["cpu_usage_ns"] - burn_a["cpu_usage_ns"] >= 100_000_000
    assert burn_b["memory_working_set_bytes"] > 0 and idle_b["memory_working_set_bytes"] > 0
    assert burn_b["processes"] == 1 and idle_b["processes"] == 1
    assert idle_b["cpu_usage_ns"] < 50_000_000
    pb = pod_of(b)
    assert pb["processes"] == 2
    assert pb["cpu_usage_ns"] >= burn_b["cpu_usage_ns"] + idle_b["cpu_usage_ns"]
    assert pb["memory_working_set_bytes"] == (burn_b["memory_working_set_bytes"]
                                              + idle_b["memory_working_set_bytes"])
    assert burn_b["container_id"] != idle_b["container_id"]
    n = b["node"]
    assert n["cpu_usage_ns"] > a["node"]["cpu_usage_ns"]
    assert 0 < n["memory_working_set_bytes"] <= n["memory_total_bytes"]
    assert n["memory_available_bytes"] == n["memory_total_bytes"] - n["memory_working_set_bytes"]

    # What metrics-server and kubectl top get from these real figures.
    # usageNanoCores is a rate: two samples, (a then b), 0.3 s apart.
    pending, clock = [a, b], Clock()
    src = nstats.StatsSource(lambda: pending.pop(0), "n", lambda uid: ("default", "web"), clock)
    src.sample()
    clock.t = nstats.MIN_INTERVAL
    summ = json.loads(nstats.summary_response(src, {"only_cpu_and_memory": ["true"]})[2])
    by = {c["name"]: c for c in summ["pods"][0]["containers"]}
    # the busy loop: a good part of one core and not more (tick rounding aside)
    assert 100_000_000 < by["burn"]["cpu"]["usageNanoCores"] <= 1_100_000_000
    assert by["idle"]["cpu"]["usageNanoCores"] < 100_000_000
    assert summ["node"]["cpu"]["usageNanoCores"] >= 0.8 * by["burn"]["cpu"]["usageNanoCores"]
    assert summ["pods"][0]["cpu"]["usageNanoCores"] >= by["burn"]["cpu"]["usageNanoCores"]
    for m in (summ["node"]["memory"], summ["pods"][0]["memory"], by["burn"]["memory"],
              by["idle"]["memory"]):
        assert m["workingSetBytes"] > 0
    # /metrics/resource: no zero for a live container, or metrics-server
    # drops its whole pod
    got = samples(nstats.resource_metrics(b, lambda uid: ("default", "web")))
    for c in ("burn", "idle"):
        lab = {"container": c, "pod": "web", "namespace": "default"}
        for name in ("container_cpu_usage_seconds_total", "container_memory_working_set_bytes",
                     "container_start_time_seconds"):
            (v,) = [x[2] for x in got if x[0] == name and x[1] == lab]
            assert v > 0, (name, c)


def test_child_counted_and_exited_cpu_kept(env):
    p = env.priv()
    create(p, env)
    # A child in the container's session burns until told to stop, then
    # exits; the container itself lives on.
    start(p, env, ["sh", "-c", 'sh -c "while [ ! -e /tmp/stop ]; do :; done"; exec sleep 100'],
          name="c")
    wait_for(lambda: cont(get(p), "c")["processes"] == 2
             and cont(get(p), "c")["cpu_usage_ns"] > 200_000_000)
    seen = [cont(get(p), "c")["cpu_usage_ns"]]
    (env.root(POD_A) / "tmp" / "stop").write_text("")
    wait_for(lambda: cont(get(p), "c")["processes"] == 1)
    for _ in range(5):
        seen.append(cont(get(p), "c")["cpu_usage_ns"])
        time.sleep(0.02)
    assert seen == sorted(seen), "the counter went backwards"
    assert seen[-1] >= seen[0] > 200_000_000
    assert pod_of(get(p))["cpu_usage_ns"] >= seen[-1]


def test_other_uids_never_counted(env):
    p = env.priv()
    create(p, env)
    start(p, env, ["sleep", "100"], name="c")
    # A busy process of another uid, in a session of its own.
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            os.setresgid(UID_HI, UID_HI, UID_HI)
            os.setresuid(UID_HI, UID_HI, UID_HI)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                pass
        finally:
            os._exit(0)
    try:
        time.sleep(0.3)
        s = get(p)
        assert pod_of(s)["processes"] == 1 and cont(s, "c")["processes"] == 1
        assert pod_of(s)["cpu_usage_ns"] < 100_000_000
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_disk_usage_of_tmp_volumes_and_logs(env):
    p = env.priv()
    create(p, env)
    p.call("SetVolume", {"pod_uid": POD_A, "name": "scratch", "kind": "emptyDir",
                         "files": [], "writable": True})
    start(p, env, ["sh", "-c", "echo hello; sleep 100"], name="c",
          mounts=[{"volume": "scratch", "path": "/scratch", "read_only": False}])
    (env.root(POD_A) / "tmp" / "f").write_bytes(b"x" * 100_000)
    vol = env.root(POD_A) / ".pufflet" / "volumes" / "scratch"
    (vol / "g").write_bytes(b"y" * 50_000)
    wait_for(lambda: cont(get(p), "c")["logs_used_bytes"] > 0)
    s = pod_of(get(p))
    assert s["rootfs_used_bytes"] >= 100_000 and s["rootfs_inodes_used"] >= 2
    assert s["volumes"] == [{"name": "scratch", "used_bytes": s["volumes"][0]["used_bytes"],
                             "inodes_used": 2}]
    assert s["volumes"][0]["used_bytes"] >= 50_000
    assert s["logs_used_bytes"] >= cont(get(p), "c")["logs_used_bytes"] > 0


# ---- accounting logic, with a stand-in OS ------------------------------------------

def proc(pid, sid, uid, cpu, rss=4096, start="t"):
    return ProcSample(pid=pid, ppid=1, pgid=sid, sid=sid, uid=uid, start=start,
                      cpu_ns=cpu, rss_bytes=rss, anon_bytes=rss // 2)


def test_cpu_counter_is_monotonic_across_exits_and_pid_reuse():
    c = pstats.CpuCounter()
    assert c.update([proc(10, 10, 5, 100), proc(11, 10, 5, 50)]) == 150
    assert c.update([proc(10, 10, 5, 120)]) == 170                  # 11 gone: kept
    assert c.update([proc(10, 10, 5, None)]) == 170                 # zombie: no figure
    assert c.update([proc(10, 10, 5, 5, start="u")]) == 175         # pid reused
    assert c.update([]) == 175


class FakePlat:
    def __init__(self, procs):
        self.procs = procs
        self.asked = None

    def node(self):
        return NodeSample(cpu_ns=10**12, memory_total=8 << 30, memory_usage=4 << 30,
                          memory_working_set=3 << 30, memory_available=5 << 30,
                          memory_rss=1 << 30, boot_time=1_700_000_000.0)

    def processes(self, uids):
        self.asked = set(uids)
        return [p for p in self.procs if p.uid in uids]


class FakeRuntime:
    def __init__(self, tmp):
        from pufflet.priv.pods import _Proc
        self.pods_dir = str(tmp / "pods")
        self.pods = {POD_A: {"namespace": "ns", "name": "web", "uid": 5000, "volumes": {},
                             "containers": {
            "a": {"container_id": "pufflet://a", "running": True, "pid": 100,
                  "started_at": 1_700_000_100.0},
            "b": {"container_id": "pufflet://b", "running": True, "pid": 200,
                  "started_at": 1_700_000_200.0},
            "old": {"container_id": "pufflet://o", "running": False, "pid": 300,
                    "started_at": 1_700_000_000.0}}}}
        self.procs = {100: _Proc(POD_A, "a", "pufflet://a", "t"),
                      200: _Proc(POD_A, "b", "pufflet://b", "t"),
                      # an exec into container a, in a session of its own
                      400: _Proc(POD_A, "a", "pufflet://a", "t", exec_id="e1")}


def collector(tmp_path, procs):
    from pufflet import config
    cfg = config.parse(f'node name n\nuser "nobody"\nstate directory "{tmp_path}"\n'
                       f'log directory "{tmp_path}"\n')
    plat = FakePlat(procs)
    return pstats.StatsCollector(cfg, FakeRuntime(tmp_path), plat=plat,
                                 clock=lambda: 1_700_001_000.0), plat


def test_attribution_by_session_and_uid(tmp_path):
    procs = [proc(100, 100, 5000, 1000), proc(101, 100, 5000, 10),      # a + child
             proc(401, 400, 5000, 7),                                   # a's exec
             proc(200, 200, 5000, 300),                                 # b
             proc(500, 500, 5000, 5),                                   # setsid'd away
             proc(600, 100, 6000, 10**9), proc(700, 200, 0, 10**9)]     # other uids
    col, plat = collector(tmp_path, procs)
    s = col.get_stats({}, [])
    assert plat.asked == {5000}
    pod = s["pods"][0]
    by = {c["name"]: c for c in pod["containers"]}
    assert set(by) == {"a", "b"}                    # not the exited one
    assert by["a"]["cpu_usage_ns"] == 1017 and by["a"]["processes"] == 3
    assert by["b"]["cpu_usage_ns"] == 300 and by["b"]["processes"] == 1
    assert by["a"]["memory_working_set_bytes"] == 3 * 4096
    assert by["a"]["memory_rss_bytes"] == 3 * 2048
    assert pod["cpu_usage_ns"] == 1322 and pod["processes"] == 5    # the stray too
    assert pod["start_time"] == 1_700_000_000.0
    # Through the spec's validation too.
    from pufflet.privsep import spec
    spec.load().check_response("GetStats", s, 0)


# ---- the agent's shapes --------------------------------------------------------------

FS = {"capacity_bytes": 1000, "available_bytes": 600, "used_bytes": 400, "inodes": 100,
      "inodes_free": 70, "inodes_used": 30}


def sample(t, node_cpu, cpu_a, cpu_pod, procs=1, mem=8192):
    return {"node": {"time": t, "boot_time": 1_700_000_000.5, "cpu_usage_ns": node_cpu,
                     "memory_total_bytes": 8000, "memory_usage_bytes": 5000,
                     "memory_working_set_bytes": 3000, "memory_available_bytes": 5000,
                     "memory_rss_bytes": 1000, "fs": FS,
                     "image_fs": {**FS, "used_bytes": 123}, "log_fs": FS},
            "pods": [{"pod_uid": POD_A, "namespace": "ns0", "name": "web0",
                      "start_time": 1_700_000_100.0, "cpu_usage_ns": cpu_pod,
                      "memory_working_set_bytes": mem, "memory_rss_bytes": mem // 2,
                      "processes": procs,
                      "containers": [{"name": "a", "container_id": "pufflet://a",
                                      "start_time": 1_700_000_100.25, "cpu_usage_ns": cpu_a,
                                      "memory_working_set_bytes": mem,
                                      "memory_rss_bytes": mem // 2, "processes": procs,
                                      "logs_used_bytes": 10, "logs_inodes_used": 2}],
                      "volumes": [{"name": "v", "used_bytes": 20, "inodes_used": 3}],
                      "rootfs_used_bytes": 40, "rootfs_inodes_used": 4,
                      "logs_used_bytes": 11, "logs_inodes_used": 2}]}


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def test_summary_field_by_field():
    samples = [sample(1_700_001_000.0, 10**12, 2 * 10**9, 3 * 10**9),
               sample(1_700_001_002.0, 10**12 + 4 * 10**9, 3 * 10**9, 4 * 10**9)]
    clock = Clock()
    src = nstats.StatsSource(lambda: samples.pop(0), "node-1",
                             lambda uid: ("default", "web") if uid == POD_A else None, clock)
    status, ctype, body = nstats.summary_response(src, {})
    first = json.loads(body)
    assert status == 200 and ctype == "application/json"
    assert "usageNanoCores" not in first["node"]["cpu"]     # one sample: no rate yet
    clock.t = 0.5
    assert json.loads(nstats.summary_response(src, {})[2]) == first    # shared sample
    clock.t = 2.0
    s = json.loads(nstats.summary_response(src, {})[2])
    t = "2023-11-14T22:30:02Z"
    assert s["node"] == {
        "nodeName": "node-1", "startTime": "2023-11-14T22:13:20Z",
        "cpu": {"time": t, "usageNanoCores": 2 * 10**9, "usageCoreNanoSeconds": 10**12 + 4 * 10**9},
        "memory": {"time": t, "availableBytes": 5000, "usageBytes": 5000,
                   "workingSetBytes": 3000, "rssBytes": 1000},
        "fs": {"time": t, "availableBytes": 600, "capacityBytes": 1000, "usedBytes": 400,
               "inodesFree": 70, "inodes": 100, "inodesUsed": 30},
        "runtime": {"imageFs": {"time": t, "availableBytes": 600, "capacityBytes": 1000,
                                "usedBytes": 123, "inodesFree": 70, "inodes": 100,
                                "inodesUsed": 30}}}
    (pod,) = s["pods"]
    assert pod["podRef"] == {"name": "web", "namespace": "default", "uid": POD_A}
    assert pod["startTime"] == "2023-11-14T22:15:00Z"
    assert pod["cpu"] == {"time": t, "usageNanoCores": 5 * 10**8, "usageCoreNanoSeconds": 4 * 10**9}
    assert pod["memory"] == {"time": t, "usageBytes": 8192, "workingSetBytes": 8192,
                             "rssBytes": 4096}
    (c,) = pod["containers"]
    assert c == {"name": "a", "startTime": "2023-11-14T22:15:00Z",
                 "cpu": {"time": t, "usageNanoCores": 5 * 10**8, "usageCoreNanoSeconds": 3 * 10**9},
                 "memory": {"time": t, "usageBytes": 8192, "workingSetBytes": 8192,
                            "rssBytes": 4096},
                 "logs": {"time": t, "availableBytes": 600, "capacityBytes": 1000,
                          "usedBytes": 10, "inodesFree": 70, "inodes": 100, "inodesUsed": 2}}
    assert pod["volume"] == [{"time": t, "availableBytes": 600, "capacityBytes": 1000,
                              "usedBytes": 20, "inodesFree": 70, "inodes": 100,
                              "inodesUsed": 3, "name": "v"}]
    assert pod["ephemeral-storage"]["usedBytes"] == 40 + 11 + 20
    assert pod["ephemeral-storage"]["inodesUsed"] == 4 + 2 + 3
    assert pod["process_stats"] == {"process_count": 1}
    # only_cpu_and_memory, as metrics-server's older summary scraper asked
    clock.t = 2.1
    small = json.loads(nstats.summary_response(src, {"only_cpu_and_memory": ["true"]})[2])
    assert "fs" not in small["node"] and "volume" not in small["pods"][0]
    assert "logs" not in small["pods"][0]["containers"][0]


def test_summary_falls_back_to_the_parents_names_and_reports_errors():
    def boom():
        raise OSError("parent gone")
    src = nstats.StatsSource(lambda: sample(1.0e9, 1, 1, 1), "n", lambda uid: None)
    assert json.loads(nstats.summary_response(src, {})[2])["pods"][0]["podRef"]["name"] == "web0"
    status, _, body = nstats.summary_response(nstats.StatsSource(boom, "n"), {})
    assert status == 500 and b"parent gone" in body
    text = nstats.resource_response(nstats.StatsSource(boom, "n"))[2].decode()
    assert families(text)["resource_scrape_error"] == (
        "gauge", "[STABLE] 1 if there was an error while getting container metrics, 0 otherwise",
        [("resource_scrape_error", {}, 1.0, None)])


# ---- Prometheus text, read by the Prometheus project's own Python parser -----------
# prometheus_client is laxer than Prometheus' Go parser: a sample before its
# family's TYPE line, or a family declared twice, does not fail; it comes
# out as an extra (untyped) family.  So every test compares whole families,
# and families() refuses a name seen twice.

def families(text: str) -> dict[str, tuple[str, str, list[tuple[str, dict, float, float | None]]]]:
    """{family name: (type, help, [(sample name, labels, value, timestamp s)])}.
    Counters lose their _total in the family name, as the parser has it."""
    assert text.endswith("\n"), "the last line must end with a newline"
    out: dict = {}
    for f in text_string_to_metric_families(text):
        assert f.name not in out, f"family {f.name} declared twice or split"
        out[f.name] = (f.type, f.documentation,
                       [(x.name, x.labels, x.value, x.timestamp) for x in f.samples])
    return out


def samples(text: str) -> list[tuple[str, dict, float, float | None]]:
    return [x for _, _, xs in families(text).values() for x in xs]


def test_resource_metrics_parse_and_match_the_kubelets_series():
    src = nstats.StatsSource(lambda: sample(1_700_001_000.123, 5 * 10**12, 0, 0), "n",
                             lambda uid: ("default", 'we"b\\n'))
    status, ctype, body = nstats.resource_response(src)
    assert status == 200 and ctype == "text/plain; version=0.0.4; charset=utf-8"
    got = families(body.decode())
    assert {name: f[0] for name, f in got.items()} == {
        "container_cpu_usage_seconds": "counter",
        "container_memory_working_set_bytes": "gauge",
        "container_start_time_seconds": "gauge",
        "node_cpu_usage_seconds": "counter", "node_memory_working_set_bytes": "gauge",
        "pod_cpu_usage_seconds": "counter", "pod_memory_working_set_bytes": "gauge",
        "resource_scrape_error": "gauge"}
    assert all(f[1].startswith("[STABLE] ") for f in got.values())
    ts = 1_700_001_000.123
    lab = {"container": "a", "pod": 'we"b\\n', "namespace": "default"}
    plab = {"pod": 'we"b\\n', "namespace": "default"}
    assert [x for _, _, xs in got.values() for x in xs] == [
        ("container_cpu_usage_seconds_total", lab, 1e-9, ts),   # 0 read: 1 ns, see module
        ("container_memory_working_set_bytes", lab, 8192.0, ts),
        ("container_start_time_seconds", lab, 1_700_000_100.25, None),
        ("node_cpu_usage_seconds_total", {}, 5000.0, ts),
        ("node_memory_working_set_bytes", {}, 3000.0, ts),
        ("pod_cpu_usage_seconds_total", plab, 1e-9, ts),
        ("pod_memory_working_set_bytes", plab, 8192.0, ts),
        ("resource_scrape_error", {}, 0.0, None)]
    # metrics-server's rule: uint64(value * 1e9) must not be 0
    assert all(int(v * 1e9) > 0 for n, _, v, _ in samples(body.decode()) if "cpu" in n)


def test_container_without_live_processes_is_left_out():
    text = nstats.resource_metrics(sample(1.0e9, 10**9, 10**9, 10**9, procs=0, mem=0))
    names = {n for n, *_ in samples(text)}
    assert names == {"node_cpu_usage_seconds_total", "node_memory_working_set_bytes",
                     "resource_scrape_error"}


def test_own_metrics_and_routes():
    reqs = nstats.RequestCounter()
    reqs.inc("GET", "/stats/summary", 200)
    reqs.inc("GET", "/stats/summary", 200)
    got = families(nstats.own_metrics(reqs))
    by = {(n, tuple(sorted(l.items()))): v for n, l, v, _ in samples(nstats.own_metrics(reqs))}
    assert by[("pufflet_nodeapi_requests_total",
               (("code", "200"), ("method", "GET"), ("route", "/stats/summary")))] == 2
    assert got["process_cpu_seconds"][0] == "counter"
    assert got["pufflet_nodeapi_requests"][0] == "counter"
    assert 0 < by[("process_start_time_seconds", ())] <= time.time()
    assert by[("pufflet_build_info", (("version", __import__("pufflet").__version__),))] == 1

    class Srv:
        routes = []

        def add_route(self, method, regex, sub, handler):
            self.routes.append((method, re.compile(regex), sub, handler))

    class Req:
        query = {}

        def send(self, status, body, ctype):
            self.sent = (status, body, ctype)

    srv = Srv()
    src = nstats.StatsSource(lambda: sample(1.0e9, 1, 1, 1), "n")
    nstats.add_routes(srv, src, reqs)
    for path, sub, ctype in (("/stats/summary", "stats", "application/json"),
                             ("/metrics/resource", "metrics", nstats.PROMETHEUS_TEXT),
                             ("/metrics", "metrics", nstats.PROMETHEUS_TEXT)):
        (route,) = [r for r in srv.routes if r[1].fullmatch(path)]
        assert route[0] == "GET" and route[2] == sub
        req = Req()
        route[3](req, None)
        assert req.sent[0] == 200 and req.sent[2] == ctype


# ---- Linux parsers ------------------------------------------------------------------

def test_linux_parsers():
    stat = "42 (a) b (c)) S 1 40 41 0 -1 4194560 1 0 0 0 250 50 9 9 20 0 1 0 777 0 0"
    assert linux_stats.parse_stat(stat) == {"ppid": 1, "pgid": 40, "sid": 41, "utime": 250,
                                            "stime": 50, "starttime": 777}
    st = linux_stats.parse_status("Name:\tx\nUid:\t1000\t1001\t1001\t1001\n"
                                  "VmRSS:\t   2048 kB\nRssAnon:\t    512 kB\n")
    assert st == {"uid": 1000, "rss": 2 << 20, "anon": 512 << 10}
    assert linux_stats.parse_status("Name:\tz\nUid:\t7\t7\t7\t7\n")["rss"] == 0  # zombie
    procstat = ("cpu  100 20 30 1000 50 5 6 7 40 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n"
                "btime 1700000000\n")
    # user nice system irq softirq steal; not idle, iowait, guest (inside user)
    assert linux_stats.parse_cpu_line(procstat) == 100 + 20 + 30 + 5 + 6 + 7
    n = linux_stats.node_from(procstat, {"MemTotal": 1000, "MemFree": 300,
                                         "Inactive(file)": 200, "AnonPages": 150})
    assert (n.memory_usage, n.memory_working_set, n.memory_available, n.memory_rss) == \
        (700, 500, 500, 150)
    assert n.boot_time == 1_700_000_000.0


# ---- OpenBSD, golden -------------------------------------------------------------

def test_kinfo_proc_layout_matches_sys_sysctl_h():
    # Offsets counted by hand from struct kinfo_proc in <sys/sysctl.h> for
    # LP64: 12 u_int64_t pointers (96), ... p_login[32] ends at 384.
    K = openbsd_stats.KinfoProcTimes
    assert [(f, getattr(K, f).offset) for f in (
        "p_pid", "p_ppid", "p_sid", "p__pgid", "p_uid", "p_ruid", "p_stat",
        "p_vm_rssize", "p_uvalid", "p_ustart_sec", "p_ustart_usec", "p_uutime_sec",
        "p_uutime_usec", "p_ustime_sec", "p_ustime_usec", "p_uru_maxrss")] == [
        ("p_pid", 108), ("p_ppid", 112), ("p_sid", 116), ("p__pgid", 120),
        ("p_uid", 128), ("p_ruid", 132), ("p_stat", 304), ("p_vm_rssize", 384),
        ("p_uvalid", 400), ("p_ustart_sec", 408), ("p_ustart_usec", 416),
        ("p_uutime_sec", 420), ("p_uutime_usec", 424), ("p_ustime_sec", 428),
        ("p_ustime_usec", 432), ("p_uru_maxrss", 440)]
    assert ctypes.sizeof(K) == 448
    # sysctl(2): KERN_PROC_RUID "processes with real user id uid"
    assert openbsd_stats.procs_mib(3000, 64) == (1, 66, 6, 3000, 448, 64)


class FakeLibc:
    """sysctl(2) by MIB: bytes, an errno, or a callable(size) -> either."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def sysctl(self, name, namelen, oldp, oldlenp, newp, newlen):
        mib = tuple(name[i] for i in range(namelen))
        size = oldlenp.contents.value
        self.calls.append((mib, size))
        data = self.table.get(mib, errno.EOPNOTSUPP)
        if callable(data):
            data = data(mib, size)
        if isinstance(data, int):
            ctypes.set_errno(data)
            return -1
        if len(data) > size:
            ctypes.set_errno(errno.ENOMEM)
            return -1
        ctypes.memmove(oldp, data, len(data))
        oldlenp.contents.value = len(data)
        return 0


def kp(pid, sid, ruid, ut, st, rss_pages, zombie=False):
    k = openbsd_stats.KinfoProcTimes()
    k.p_pid, k.p_ppid, k.p_sid, k.p__pgid, k.p_ruid, k.p_uid = pid, 1, sid, sid, ruid, ruid
    k.p_stat = openbsd_stats.SZOMB if zombie else 2
    k.p_uvalid = 0 if zombie else 1
    k.p_ustart_sec, k.p_ustart_usec = 1_700_000_100, 5
    k.p_uutime_sec, k.p_uutime_usec = ut
    k.p_ustime_sec, k.p_ustime_usec = st
    k.p_vm_rssize = rss_pages
    return bytes(k)


BOOT = struct.pack("<qq", 1_700_000_000, 0)
UVMEXP = struct.pack("<7i", 4096, 4095, 12, 1000, 100, 500, 300) + b"\0" * 200


def test_openbsd_processes_golden():
    procs = [kp(10, 10, 3000, (1, 500), (0, 250), 3), kp(11, 10, 3000, (0, 0), (0, 0), 0, True)]
    many = procs * 40       # more than the first ask holds: ENOMEM, then more room

    def answer(mib, size):
        return b"".join(many) if mib[3] == 3000 else b""
    libc = FakeLibc({(1, 21): BOOT, (2, 4): UVMEXP,
                     (1, 66, 6, 3000, 448, 64): answer, (1, 66, 6, 3000, 448, 256): answer})
    got = openbsd_stats.processes({3000}, libc=libc)
    assert [c[0] for c in libc.calls if c[0][1] == 66] == [(1, 66, 6, 3000, 448, 64),
                                                          (1, 66, 6, 3000, 448, 256)]
    assert len(got) == 80
    a, z = got[0], got[1]
    assert (a.pid, a.sid, a.pgid, a.uid, a.cpu_ns, a.rss_bytes) == \
        (10, 10, 10, 3000, 1_000_750_000, 3 * 4096)
    assert a.start == "openbsd:100000005"
    assert z.cpu_ns is None and z.rss_bytes == 0        # a zombie's times are not filled


def test_openbsd_node_golden():
    # kern.cp_time2.<n>: six u_int64_t states, CP_IDLE last; cpu 1 offline.
    cp0 = struct.pack("<6Q", 100, 10, 50, 0, 5, 10_000)
    cp2 = struct.pack("<6Q", 200, 0, 100, 1, 4, 9_000)
    for clock in (struct.pack("<4i", 100, 10000, 100, 0),          # hz tick stathz profhz
                  struct.pack("<5i", 100, 10000, 0, 100, 0)):      # with tickadj
        libc = FakeLibc({(6, 3): struct.pack("<i", 3), (1, 71, 0): cp0,
                         (1, 71, 1): errno.ENODEV, (1, 71, 2): cp2, (1, 12): clock,
                         (2, 4): UVMEXP, (1, 21): BOOT})
        n = openbsd_stats.node(libc=libc)
        busy = (100 + 10 + 50 + 0 + 5) + (200 + 0 + 100 + 1 + 4)
        assert n.cpu_ns == busy * 10_000_000                # stathz 100: 10 ms a tick
        assert n.memory_total == 1000 * 4096
        assert n.memory_usage == 900 * 4096
        assert n.memory_working_set == 600 * 4096           # less the inactive pages
        assert n.memory_available == 400 * 4096 and n.memory_rss is None
        assert n.boot_time == 1_700_000_000.0
        assert ((1, 71, 1), 128) in libc.calls


def test_openbsd_errors_are_oserrors():
    libc = FakeLibc({(1, 12): struct.pack("<2i", 1, 2)})
    with pytest.raises(OSError):
        openbsd_stats.stathz(libc=libc)
    libc = FakeLibc({(1, 66, 6, 5, 448, 64): errno.EPERM})
    with pytest.raises(OSError) as e:
        openbsd_stats.kinfo_procs(5, libc=libc)
    assert e.value.errno == errno.EPERM


# ---- through the real HTTPS server -------------------------------------------------

def test_served_over_https(tmp_path):
    import http.client
    import ssl
    import subprocess
    from pufflet.nodeapi import auth, tls
    from pufflet.nodeapi.server import Server
    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=n", "-keyout", str(key), "-out", str(crt)],
                   check=True, capture_output=True)
    srv = Server(tls.context(str(crt), str(key), None), auth.Gate("n", open=True))
    src = nstats.StatsSource(lambda: sample(1_700_001_000.0, 10**12, 10**9, 10**9), "n")
    nstats.add_routes(srv, src)
    host, port = srv.listen("127.0.0.1", 0)
    srv.start()
    try:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=10)
        conn.request("GET", "/metrics/resource")
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Content-Type") == nstats.PROMETHEUS_TEXT
        got = samples(r.read().decode())
        assert ("container_cpu_usage_seconds_total",
                {"container": "a", "pod": "web0", "namespace": "ns0"}, 1.0,
                1_700_001_000.0) in got
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Content-Type") == nstats.PROMETHEUS_TEXT
        own = families(r.read().decode())
        assert own["pufflet_build_info"][2] == [
            ("pufflet_build_info", {"version": __import__("pufflet").__version__}, 1.0, None)]
        conn.request("GET", "/stats/summary")
        r = conn.getresponse()
        assert r.status == 200
        assert json.loads(r.read())["node"]["nodeName"] == "n"
    finally:
        srv.close()


def test_openbsd_uid_busy_golden():
    """The pod uid pool's check on OpenBSD: every process (KERN_PROC_ALL,
    sysctl(2)), a uid counted as real or effective uid or gid."""
    def proc(pid, ruid, euid, rgid, egid):
        k = openbsd_stats.KinfoProcTimes()
        k.p_pid, k.p_ruid, k.p_uid, k.p_rgid, k.p_gid = pid, ruid, euid, rgid, egid
        return bytes(k)
    table = b"".join([proc(1, 0, 0, 0, 0), proc(2, 4000, 0, 0, 0), proc(3, 0, 4001, 0, 0),
                      proc(4, 0, 0, 4002, 0), proc(5, 0, 0, 0, 4003)])
    libc = FakeLibc({(1, 66, 0, 0, 448, 64): table})
    assert [openbsd_stats.uid_busy(u, libc=libc) for u in (4000, 4001, 4002, 4003, 4004)] \
        == [True, True, True, True, False]
    assert {c[0] for c in libc.calls} == {(1, 66, 0, 0, 448, 64)}


def test_uid_pool_asks_the_systems_own_check(monkeypatch):
    from pufflet.priv import uids
    assert uids.default_busy() is uids.proc_busy
    monkeypatch.setattr(uids.sys, "platform", "openbsd7")
    assert uids.default_busy() is openbsd_stats.uid_busy
