"""Linux resource accounting from /proc (proc(5)).

Per process:
  /proc/<pid>/status   Uid: (real, effective, saved, fs), VmRSS, RssAnon.
                       The uid is read here and not from the owner of
                       /proc/<pid>, which is root for a process that is not
                       "dumpable" (prctl(PR_SET_DUMPABLE, 0), execute-only
                       binaries): a pod could hide from its own accounting.
  /proc/<pid>/stat     ppid (4), pgrp (5), session (6), utime (14) and
                       stime (15) in clock ticks, starttime (22).
                       Both count every thread of the process.

Node:
  /proc/stat           "cpu" line: ticks per state summed over CPUs; busy
                       is everything but idle and iowait, and without guest
                       and guest_nice, which user and nice already include.
                       btime: boot time.
  /proc/meminfo        The kubelet (through cAdvisor) takes working set =
                       usage - inactive_file, with the root cgroup's usage;
                       here usage = MemTotal - MemFree (page cache
                       included, as a cgroup's usage is) and inactive_file
                       is Inactive(file).  Available = MemTotal - working
                       set, which is what the kubelet reports and evicts on.
"""

from __future__ import annotations

import os

from pufflet.platform.linux_proc import boot_id
from pufflet.platform.procstat import NodeSample, ProcSample

_TICK = os.sysconf("SC_CLK_TCK")


def parse_stat(text: str) -> dict[str, int]:
    """The fields we use of /proc/<pid>/stat.  comm (field 2) may hold
    spaces and parentheses: count from the last ')'."""
    rest = text[text.rindex(")") + 2:].split()
    f = lambda n: int(rest[n - 3])      # noqa: E731  field n of proc(5)
    return {"ppid": f(4), "pgid": f(5), "sid": f(6), "utime": f(14), "stime": f(15),
            "starttime": f(22)}


def parse_status(text: str) -> dict[str, int]:
    """Real uid and the resident sizes (bytes) from /proc/<pid>/status;
    a zombie has no Vm lines: zero."""
    out = {"uid": -1, "rss": 0, "anon": 0}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key == "Uid":
            out["uid"] = int(rest.split()[0])
        elif key == "VmRSS":
            out["rss"] = int(rest.split()[0]) * 1024
        elif key == "RssAnon":
            out["anon"] = int(rest.split()[0]) * 1024
    return out


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None         # gone since we listed /proc


def processes(uids: set[int], proc: str = "/proc") -> list[ProcSample]:
    if not uids:
        return []
    boot = boot_id()
    out = []
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        status = _read(f"{proc}/{name}/status")
        if status is None:
            continue
        st = parse_status(status)
        if st["uid"] not in uids:
            continue
        text = _read(f"{proc}/{name}/stat")
        if text is None:
            continue
        s = parse_stat(text)
        pid = int(name)
        out.append(ProcSample(
            pid=pid, ppid=s["ppid"], pgid=s["pgid"], sid=s["sid"], uid=st["uid"],
            start=f"linux:{boot}:{s['starttime']}",
            cpu_ns=(s["utime"] + s["stime"]) * 1_000_000_000 // _TICK,
            rss_bytes=st["rss"], anon_bytes=st["anon"] or st["rss"]))
    return out


def parse_cpu_line(text: str) -> int:
    """Busy ticks from /proc/stat's aggregate "cpu" line."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            v = [int(x) for x in line.split()[1:]] + [0] * 10
            user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
            return user + nice + system + irq + softirq + steal
    raise ValueError("no cpu line in /proc/stat")


def parse_btime(text: str) -> int:
    for line in text.splitlines():
        if line.startswith("btime "):
            return int(line.split()[1])
    raise ValueError("no btime in /proc/stat")


def node_from(stat: str, meminfo: dict[str, int]) -> NodeSample:
    total = meminfo["MemTotal"]
    usage = max(total - meminfo.get("MemFree", 0), 0)
    working = max(usage - meminfo.get("Inactive(file)", 0), 0)
    return NodeSample(cpu_ns=parse_cpu_line(stat) * 1_000_000_000 // _TICK,
                      memory_total=total, memory_usage=usage, memory_working_set=working,
                      memory_available=max(total - working, 0),
                      memory_rss=meminfo.get("AnonPages"),
                      boot_time=float(parse_btime(stat)))


def node() -> NodeSample:
    from pufflet.platform.linux import meminfo
    with open("/proc/stat") as f:
        stat = f.read()
    with open("/proc/meminfo") as f:
        mem = meminfo(f.read())
    return node_from(stat, mem)
