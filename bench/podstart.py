"""Pod start and stop latency, and pufflet's memory per running pod.

The real daemon (root parent, sandboxed agent as "nobody", the container
logger) runs against the API emulator (tests/apiserver) over real HTTPS,
with an image built offline by examples/mkimage.sh.  Everything is seen
from the outside, through the kubernetes client, as a user would:

1. create -> Running for one pod, as a watch on the pods sees it, --one
   times one after the other: p50 and p90 (target: p50 <= 100 ms);
   delete -> gone (the pod object removed) for each of them.
2. --burst pods created at once -> all of them Running (target <= 3 s for
   30), then all deleted at once -> all gone.
3. PSS (/proc/<pid>/smaps_rollup) of pufflet's own processes -- the
   parent, the agent and the container logger, not the containers, which
   are the pods' -- with 0 pods (after the runs above, so that what the
   first pods load once is not counted per pod; the figure at start is
   printed too) and with --many pods running: the overhead per pod
   (target <= 0.5 MiB).  With it, for the --many pods: each process's
   threads (a thread per pod would show), its CPU time per pod started,
   and the node's API calls per pod started.

Pods are what a ReplicaSet would make: one container, /bin/sleep, which
exits on SIGTERM, with terminationGracePeriodSeconds 5 (so delete -> gone
is not a grace period waited out), the emulator's default service
account volume (a TokenRequest and the kube-root-ca.crt ConfigMap per
pod), imagePullPolicy Never, on a node configured with a cluster DNS.
The Node has no podCIDR, so pods share the node's network (one NoPodCIDR
event each): per-pod network setup is bench/net.py's, and the Linux
twin's pod networks use fixed interface names other runs may hold.

Baseline, in the same run: fork+exec of the same command with subprocess
(what it costs at the least to start the process), printed as a ratio;
and, for scale, the kubelet with containerd on this 2-core machine: about
0.7 s for one pod, 22 s for 30, 3.6 MiB PSS per pod.

    python3 bench/podstart.py [--one 15] [--burst 30] [--many 100]

Needs Linux and root (real chroots as real pod uids).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from kubernetes import client as k8s, config as k8sconfig  # noqa: E402

from apiserver import ApiServer                              # noqa: E402
from daemon import Daemon, children, wait_until              # noqa: E402

NODE = "bench-node"
IMAGE = "local/bench:1"
NS = "default"
UID_MIN = 3_900_000
COMMAND = ["/bin/sleep", "3600"]
GRACE = 5


# ---------------------------------------------------------------------------
# the watch: when each pod was first seen Running, and gone

class PodWatch:
    """One watch on the namespace's pods, read raw (the generated models
    would make the reading, not pufflet, the thing measured)."""

    def __init__(self, core: k8s.CoreV1Api) -> None:
        self.core = core
        self.cond = threading.Condition()
        self.running: dict[str, float] = {}
        self.gone: dict[str, float] = {}
        rv = json.loads(core.list_namespaced_pod(NS, _preload_content=False).data)[
            "metadata"]["resourceVersion"]
        self.resp = core.list_namespaced_pod(NS, watch=True, resource_version=rv,
                                             timeout_seconds=3600, _preload_content=False)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self.resp:
                now = time.perf_counter()
                if not line.strip():
                    continue
                ev = json.loads(line)
                obj = ev.get("object") or {}
                name = (obj.get("metadata") or {}).get("name")
                with self.cond:
                    if ev.get("type") == "DELETED":
                        self.gone.setdefault(name, now)
                    elif (obj.get("status") or {}).get("phase") == "Running":
                        self.running.setdefault(name, now)
                    self.cond.notify_all()
        except Exception:       # noqa: BLE001 - closed at the end of the run
            pass

    def wait(self, table: str, names: list[str], timeout: float) -> dict[str, float]:
        got = getattr(self, table)
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(n in got for n in names):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [n for n in names if n not in got]
                    raise SystemExit(f"pods not {table} after {timeout:.0f}s: {missing[:5]}")
                self.cond.wait(left)
            return {n: got[n] for n in names}

    def close(self) -> None:
        try:
            self.resp.shutdown()
        except Exception:       # noqa: BLE001
            pass


def pod(name: str) -> dict:
    return {"metadata": {"name": name, "labels": {"app": "bench"}},
            "spec": {"nodeName": NODE, "terminationGracePeriodSeconds": GRACE,
                     "containers": [{"name": "app", "image": IMAGE,
                                     "imagePullPolicy": "Never", "command": COMMAND}]}}


def create(core: k8s.CoreV1Api, name: str) -> float:
    t = time.perf_counter()
    core.create_namespaced_pod(NS, pod(name), _preload_content=False)
    return t


def delete(core: k8s.CoreV1Api, name: str) -> float:
    t = time.perf_counter()
    core.delete_namespaced_pod(name, NS, _preload_content=False)
    return t


# ---------------------------------------------------------------------------
# memory

def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for row in f:
            if row.startswith("Pss:"):
                return int(row.split()[1])
    raise RuntimeError("no Pss in smaps_rollup")


def pufflet_pids(daemon: Daemon, state_dir: str) -> dict[str, int]:
    """The parent, the agent (its child running Python, not a container)
    and the logger (a session of its own, found by its argv)."""
    exe = os.path.realpath(sys.executable)
    out = {"priv": daemon.pid}
    for pid in children(daemon.pid):
        try:
            if os.path.realpath(f"/proc/{pid}/exe") == exe:
                out["agent"] = pid
        except OSError:
            pass
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pufflet.priv.logger" in argv and state_dir.encode() in argv:
            out["logger"] = int(d)
    return out


def pss_total(pids: dict[str, int]) -> dict[str, float]:
    return {k: pss_kib(p) / 1024 for k, p in pids.items()}


def threads(pids: dict[str, int]) -> str:
    """Threads per process: a thread per pod would show here."""
    out = []
    for k, pid in sorted(pids.items()):
        for row in Path(f"/proc/{pid}/status").read_text().splitlines():
            if row.startswith("Threads:"):
                out.append(f"{k}={row.split()[1]}")
    return " ".join(out)


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """utime + stime of each process (and of this one: the emulator)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for k, pid in {**pids, "bench+emulator": os.getpid()}.items():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out[k] = (int(fields[11]) + int(fields[12])) / tick
    return out


# ---------------------------------------------------------------------------

def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def baseline_spawn(n: int) -> list[float]:
    """fork+exec of the same command: Popen returns once execve is done."""
    times, procs = [], []
    for _ in range(n):
        t = time.perf_counter()
        procs.append(subprocess.Popen(COMMAND))
        times.append(time.perf_counter() - t)
    for p in procs:
        p.terminate()
        p.wait()
    return times


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ready(core: k8s.CoreV1Api) -> bool:
    try:
        n = json.loads(core.read_node(NODE, _preload_content=False).data)
    except k8s.ApiException:
        return False
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in n.get("status", {}).get("conditions") or ())


def run(args: argparse.Namespace, tmp: Path) -> None:
    api = ApiServer(tmp / "api").start()
    kc = api.kubeconfig(f"system:node:{NODE}")
    state = tmp / "state"
    most = max(args.many, args.burst) + 10
    cfg = tmp / "pufflet.conf"
    cfg.write_text(
        f'user "nobody"\nnode name "{NODE}"\nkubeconfig "{kc}"\n'
        f'state directory "{state}"\nlog directory "{tmp}/log"\n'
        f'listen on 127.0.0.1 port {free_port()}\ncluster dns 10.96.0.10\n'
        f'pod uid range {UID_MIN} {UID_MIN + 2 * most}\n'
        f'max pods {most}\n')
    subprocess.run(["sh", "examples/mkimage.sh", "-f", str(cfg), "-t", IMAGE], cwd=REPO,
                   env={**os.environ, "PUFFLETCTL": f"{sys.executable} -m pufflet.ctl"},
                   check=True, stdout=subprocess.DEVNULL)
    core = k8s.CoreV1Api(k8sconfig.new_client_from_config(
        config_file=str(api.kubeconfig("admin"))))
    daemon = Daemon(cfg)
    watch = None
    try:
        if not wait_until(lambda: node_ready(core), 30, 0.1):
            raise SystemExit("the node never became Ready:\n" + "\n".join(daemon.lines))
        time.sleep(1.0)
        pids = pufflet_pids(daemon, str(state))
        cold = pss_total(pids)
        watch = PodWatch(core)

        base = baseline_spawn(args.one)
        b50 = statistics.median(base) * 1000
        print(f"baseline fork+exec of {' '.join(COMMAND)}: p50={b50:.2f} ms "
              f"p90={pct(base, 90) * 1000:.2f} ms")

        # 1. one pod at a time
        up, down = [], []
        for i in range(args.one):
            name = f"one-{i}"
            t = create(core, name)
            up.append(watch.wait("running", [name], 30)[name] - t)
            t = delete(core, name)
            down.append(watch.wait("gone", [name], 30)[name] - t)
        u50, d50 = statistics.median(up) * 1000, statistics.median(down) * 1000
        print(f"one pod, {args.one} times: create->Running p50={u50:.0f} ms "
              f"p90={pct(up, 90) * 1000:.0f} ms (target p50 <= 100 ms; "
              f"kubelet ~700 ms) ratio to fork+exec={u50 / b50:.0f}")
        print(f"  delete->gone p50={d50:.0f} ms p90={pct(down, 90) * 1000:.0f} ms")

        # 2. a burst
        names = [f"burst-{i}" for i in range(args.burst)]
        t0 = time.perf_counter()
        for n in names:
            create(core, n)
        created = time.perf_counter() - t0
        seen = watch.wait("running", names, 120)
        all_up = max(seen.values()) - t0
        t0 = time.perf_counter()
        for n in names:
            delete(core, n)
        gone = watch.wait("gone", names, 120)
        all_down = max(gone.values()) - t0
        print(f"{args.burst} pods at once (created in {created * 1000:.0f} ms): all Running "
              f"in {all_up:.2f} s (target <= 3 s; kubelet ~22 s for 30), "
              f"all gone {all_down:.2f} s after the deletes")

        # 3. memory: idle after the runs above, then MANY pods running
        assert wait_until(lambda: not _pods(core), 30)
        time.sleep(1.0)
        idle = pss_total(pids)
        idle_threads = threads(pids)
        names = [f"many-{i}" for i in range(args.many)]
        cpu0 = cpu_seconds(pids)
        mark = len(api.request_log)
        t0 = time.perf_counter()
        for n in names:
            create(core, n)
        seen = watch.wait("running", names, 300)
        many_up = max(seen.values()) - t0
        cpu1 = cpu_seconds(pids)
        calls = collections.Counter(
            f"{r.verb} {_resource(r.path)}" for r in api.request_log[mark:]
            if r.user == f"system:node:{NODE}")
        time.sleep(2.0)
        full = pss_total(pids)
        full_threads = threads(pids)
        per_pod = (sum(full.values()) - sum(idle.values())) / args.many
        fmt = lambda d: " ".join(f"{k}={v:.1f}" for k, v in sorted(d.items()))  # noqa: E731
        print(f"PSS MiB at start: {fmt(cold)} total={sum(cold.values()):.1f}")
        print(f"PSS MiB, 0 pods:  {fmt(idle)} total={sum(idle.values()):.1f}")
        print(f"PSS MiB, {args.many} pods: {fmt(full)} total={sum(full.values()):.1f} "
              f"(all Running {many_up:.2f} s after the first create)")
        print(f"per-pod overhead: {per_pod:.3f} MiB PSS (target <= 0.5; kubelet ~3.6)")
        print(f"  threads, 0 pods: {idle_threads}; {args.many} pods: {full_threads}")
        print("  CPU ms per pod started: " + " ".join(
            f"{k}={(cpu1[k] - cpu0[k]) * 1000 / args.many:.1f}" for k in sorted(cpu1)))
        print(f"  API calls per pod started: {sum(calls.values()) / args.many:.1f} (" + ", ".join(
            f"{k} {n / args.many:.2f}" for k, n in calls.most_common()) + ")")
        t0 = time.perf_counter()
        for n in names:
            delete(core, n)
        watch.wait("gone", names, 300)
        print(f"  {args.many} pods all gone {time.perf_counter() - t0:.2f} s after the deletes")
    finally:
        if watch is not None:
            watch.close()
        rc = daemon.stop()
        bad = [ln for ln in daemon.lines if "Traceback" in ln or "ERROR" in ln]
        if bad or rc:
            print(f"daemon exit {rc}; suspicious log lines:\n" + "\n".join(bad[:20]))
        api.stop()
        if api.bugs:
            print("emulator bugs:\n" + "\n".join(api.bugs))
        _kill_leftovers(tmp, UID_MIN + 2 * most)


def _resource(path: str) -> str:
    """pods, pods/status, events, serviceaccounts/token... of an API path."""
    parts = path.split("?")[0].strip("/").split("/")
    if "namespaces" in parts and len(parts) > parts.index("namespaces") + 2:
        parts = parts[parts.index("namespaces") + 2:]
    else:
        parts = parts[2:] if parts[0] == "api" else parts[3:]
    return "/".join(parts[0:1] + parts[2:3])


def _pods(core: k8s.CoreV1Api) -> list[dict]:
    return json.loads(core.list_namespaced_pod(NS, _preload_content=False).data)["items"]


def _kill_leftovers(tmp: Path, uid_max: int) -> None:
    """The daemon leaves pods running when it stops (by design); the
    benchmark removes what is left: its pods' processes (by uid) and its
    container logger (by the state directory in its argv)."""
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            st = Path(f"/proc/{d}/status").read_text()
            argv = Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        uid = int(next(ln.split()[1] for ln in st.splitlines() if ln.startswith("Uid:")))
        if UID_MIN <= uid <= uid_max or str(tmp).encode() + b"/" in argv:
            try:
                os.kill(int(d), 9)
            except OSError:
                pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--one", type=int, default=15, help="single-pod runs")
    ap.add_argument("--burst", type=int, default=30, help="pods created at once")
    ap.add_argument("--many", type=int, default=100, help="pods running for the PSS figure")
    args = ap.parse_args()
    if os.geteuid() != 0 or not sys.platform.startswith("linux"):
        print("needs Linux and root", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="pufflet-podstart-"))
    tmp.chmod(0o755)
    try:
        run(args, tmp)
    finally:
        time.sleep(0.5)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
