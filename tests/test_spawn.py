"""Starting container processes for real: real chroots, real pod uids, and
the kernel's own view of the result (/proc/<pid>/...) as the judge."""

import errno
import io
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest
from imagetools import host_libs

from pufflet.priv import proctrack, rlimits
from pufflet.priv.spawn import Spawn, SpawnError, Started, spawn

real = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0,
    reason="needs Linux /proc and root")

UID, GID, GROUP = 47101, 47102, 47103



@pytest.fixture
def root(public_tmp):
    """A pod root holding /bin/sh and the libraries it needs, owned by
    root as image files are, with an empty /work and a fifo."""
    r = public_tmp / "root"
    sh = os.path.realpath("/bin/sh")
    for f in {sh, *host_libs(sh)}:
        dest = r / ("bin/sh" if f == sh else f.lstrip("/"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(f), dest)
    (r / "work").mkdir()
    (r / "bin/noexec").write_text("#!/bin/sh\n")
    (r / "bin/noexec").chmod(0o644)
    os.mkfifo(r / "fifo")
    # dash opens /dev/null for background jobs; a plain empty file will do.
    (r / "dev").mkdir()
    (r / "dev/null").write_text("")
    for dirpath, dirs, _ in os.walk(r):
        for d in dirs:
            os.chmod(os.path.join(dirpath, d), 0o755)
    r.chmod(0o755)
    return r


def spec(root, *argv, **kw):
    kw.setdefault("env", ("PATH=/bin",))
    return Spawn(argv=argv, root=str(root), uid=UID, gid=GID, **kw)


def wait(pid, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            return status
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(f"pid {pid} did not exit")


def proc_field(pid, name):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].split()
    raise KeyError(name)


def idle_uid():
    """A uid with no processes at all, so that a process limit counts only
    what the test starts (an orphan reparented to an init that does not
    reap stays counted against its uid as a zombie)."""
    busy = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                busy.add(os.stat(f"/proc/{d}").st_uid)
            except OSError:
                pass
    return next(u for u in range(47200, 48000) if u not in busy)


def nofile_hard(want):
    """The hard limit a pod gets when it asks for want: a raise above ours
    needs CAP_SYS_RESOURCE (which root in a container may lack); without
    it, ours bounds the pod's."""
    import resource
    ours = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    cap_sys_resource = 1 << 24
    if int(proc_field("self", "CapEff")[0], 16) & cap_sys_resource:
        return want
    return want if ours == resource.RLIM_INFINITY else min(want, ours)


def zombies_of_mine():
    me, out = os.getpid(), []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                text = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            rest = text[text.rindex(")") + 2:].split()
            if rest[0] == "Z" and int(rest[1]) == me:
                out.append(int(d))
    return out


@real
def test_process_is_the_pod_uid_in_its_root_with_exact_env_limits_and_fds(root):
    plan = rlimits.plan({"memory": "64Mi", "ephemeral-storage": "1Mi", "cpu": "2"},
                        {"cpu": "100m"}, pids=50)
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    uid = idle_uid()
    s = Spawn(argv=("sh", "-c", "read x; pwd; exit 0"), root=str(root), uid=uid, gid=GID,
              env=("PATH=/bin", "A=b c", "A=last"), cwd="/work", groups=(GROUP,),
              rlimits=plan.rlimits, nice=plan.nice, stdin=r, stdout=out_w)
    os.environ["PUFFLET_LEAK_CHECK"] = "1"
    try:
        started = spawn(s)
    finally:
        del os.environ["PUFFLET_LEAK_CHECK"]
        os.close(r)
        os.close(out_w)
    pid = started.pid
    assert isinstance(started, Started) and started.pgid == pid
    try:
        assert proc_field(pid, "Uid") == [str(uid)] * 4
        assert proc_field(pid, "Gid") == [str(GID)] * 4
        assert proc_field(pid, "Groups") == [str(GROUP)]
        # Nothing blocked or ignored is handed on (Python ignores SIGPIPE).
        assert int(proc_field(pid, "SigBlk")[0], 16) == 0
        assert int(proc_field(pid, "SigIgn")[0], 16) & (1 << (signal.SIGPIPE - 1)) == 0
        assert os.readlink(f"/proc/{pid}/root") == str(root)
        assert os.readlink(f"/proc/{pid}/cwd") == str(root / "work")
        # Exactly the env asked for, the later A winning; nothing of ours.
        assert Path(f"/proc/{pid}/environ").read_bytes() == b"PATH=/bin\0A=last\0"
        assert sorted(os.listdir(f"/proc/{pid}/fd"), key=int) == ["0", "1", "2"]
        assert os.getpgid(pid) == pid and os.getsid(pid) == pid
        limits = Path(f"/proc/{pid}/limits").read_text()
        for name, soft, hard in [("Max data size", "67108864", "67108864"),
                                 ("Max resident set", "67108864", "67108864"),
                                 ("Max file size", "1048576", "1048576"),
                                 ("Max processes", "50", "50"),
                                 ("Max open files", "1024", str(nofile_hard(65536))),
                                 ("Max core file size", "0", "0")]:
            assert re.search(rf"^{name}\s+{soft}\s+{hard}\s", limits, re.M), (name, limits)
        nice = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
        assert nice == plan.nice == 10
        assert proctrack.is_same(pid, started.start_time)
    finally:
        os.write(w, b"go\n")
        os.close(w)
        status = wait(pid)
    assert os.waitstatus_to_exitcode(status) == 0
    with os.fdopen(out_r) as f:
        assert f.read() == "/work\n"


@real
def test_stdio_defaults_to_dev_null(root):
    # The host's /dev/null, opened before the chroot (the pod root's one
    # above is a plain file).
    started = spawn(spec(root, "/bin/sh", "-c", "read x < /fifo; exit 3"))
    try:
        for fd in "012":
            assert os.readlink(f"/proc/{started.pid}/fd/{fd}") == "/dev/null"
    finally:
        os.close(os.open(root / "fifo", os.O_WRONLY))   # lets the read end
    assert os.waitstatus_to_exitcode(wait(started.pid)) == 3


@real
def test_exec_failure_names_the_step_and_errno_and_leaves_no_zombie(root):
    with pytest.raises(SpawnError) as e:
        spawn(spec(root, "/bin/nope"))
    assert str(e.value) == "exec /bin/nope: No such file or directory"
    assert e.value.step == "exec" and e.value.errno == errno.ENOENT
    with pytest.raises(SpawnError, match=r"^exec nope: No such file or directory "
                                         r"\(searched PATH=/usr/bin:/bin inside"):
        spawn(spec(root, "nope", env=("PATH=/usr/bin:/bin",)))
    with pytest.raises(SpawnError, match="^exec /bin/noexec: Permission denied$"):
        spawn(spec(root, "/bin/noexec"))
    with pytest.raises(SpawnError, match="^exec noexec: Permission denied"):
        spawn(spec(root, "noexec"))
    assert zombies_of_mine() == []


@real
def test_missing_root_and_missing_workdir_are_reported(root, public_tmp):
    missing = public_tmp / "gone"
    with pytest.raises(SpawnError) as e:
        spawn(spec(missing, "/bin/sh"))
    assert str(e.value) == f"chroot {missing}: No such file or directory"
    assert e.value.step == "chroot"
    with pytest.raises(SpawnError, match=r"^chdir /nope \(inside the pod root\): "
                                         r"No such file or directory$"):
        spawn(spec(root, "/bin/sh", cwd="/nope"))
    assert zombies_of_mine() == []


@real
def test_root_ids_are_refused_before_any_fork(root, monkeypatch):
    def no_fork():
        raise AssertionError("forked")
    monkeypatch.setattr(os, "fork", no_fork)
    for kw in ({"uid": 0}, {"gid": 0}, {"groups": (5, 0)}, {"uid": -1}, {"uid": True}):
        args = {"uid": UID, "gid": GID, **kw}
        with pytest.raises(SpawnError, match="never run as 0"):
            Spawn(argv=("/bin/sh",), env=(), root=str(root), **args)
    # A Spawn altered after its checks is still refused by spawn() itself.
    s = spec(root, "/bin/sh")
    object.__setattr__(s, "uid", 0)
    with pytest.raises(SpawnError, match="refusing to run a pod process as root"):
        spawn(s)


@pytest.mark.parametrize("kw,fragment", [
    ({"argv": ()}, "argv"),
    ({"argv": ("a\0b",)}, "NUL"),
    ({"env": ("NOEQUALS",)}, "not KEY=value"),
    ({"env": ("=x",)}, "not KEY=value"),
    ({"root": "relative"}, "absolute"),
    ({"root": "/"}, "host's /"),
    ({"root": "/a/.."}, "host's /"),
    ({"cwd": "work"}, "absolute"),
    ({"nice": -5}, "nice"),
    ({"umask": 0o1000}, "umask"),
    ({"stdout": -1}, "bad fd"),
    ({"rlimits": (("RLIMIT_DATA", 1, 1),)}, "not an Rlimit"),
])
def test_bad_specs_are_refused(kw, fragment):
    args = {"argv": ("/bin/sh",), "env": (), "root": "/srv/pod", "uid": UID, "gid": GID, **kw}
    with pytest.raises(SpawnError, match=re.escape(fragment)):
        Spawn(**args)


@real
def test_enter_network_runs_first_as_root_and_its_failure_is_reported(root):
    r, w = os.pipe()

    def enter():
        # Still root, not yet chrooted: it can open what it needs.
        os.write(w, f"{os.getuid()} {os.path.exists(str(root / 'fifo'))}".encode())
    started = spawn(spec(root, "/bin/sh", "-c", "exit 0", enter_network=enter))
    os.close(w)
    assert os.read(r, 100) == b"0 True"
    os.close(r)
    wait(started.pid)

    def refuse():
        raise OSError(errno.EPERM, "setns")
    with pytest.raises(SpawnError, match="^enter network: Operation not permitted$"):
        spawn(spec(root, "/bin/sh", enter_network=refuse))


@real
def test_a_hard_limit_above_ours_that_cannot_be_raised_is_clamped(root):
    # Beyond the kernel's nr_open no one may raise RLIMIT_NOFILE, root
    # included: the pod gets pufflet's own hard limit instead of failing.
    import resource
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    ours = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    big = rlimits.Rlimit("RLIMIT_NOFILE", nr_open + 1024, nr_open + 1024)
    started = spawn(spec(root, "/bin/sh", "-c", "read x", rlimits=(big,)))
    try:
        limits = Path(f"/proc/{started.pid}/limits").read_text()
        assert re.search(rf"^Max open files\s+{ours}\s+{ours}\s", limits, re.M), limits
    finally:
        os.kill(started.pid, signal.SIGKILL)
        wait(started.pid)


@real
def test_the_pod_process_limit_counts_the_pods_uid(root):
    # Linux checks at setresuid whether the uid already has more processes
    # than the limit (the joining process not yet counted) and fails the
    # execve with EAGAIN: a pod over its limit cannot start a container.
    uid = idle_uid()
    running = [spawn(Spawn(argv=("/bin/sh", "-c", "read x < /fifo"), env=(), root=str(root),
                           uid=uid, gid=GID)) for _ in range(2)]
    try:
        with pytest.raises(SpawnError, match="^exec /bin/sh: Resource temporarily unavailable"):
            spawn(Spawn(argv=("/bin/sh",), env=(), root=str(root), uid=uid, gid=GID,
                        rlimits=rlimits.plan(pids=1).rlimits))
        third = spawn(Spawn(argv=("/bin/sh", "-c", "exit 0"), env=(), root=str(root),
                            uid=uid, gid=GID, rlimits=rlimits.plan(pids=2).rlimits))
        wait(third.pid)
    finally:
        for p in running:
            os.kill(p.pid, signal.SIGKILL)
            wait(p.pid)


@real
def test_signalling_the_process_group_kills_the_whole_container(root):
    # The shell starts a second process (a subshell blocked opening the
    # fifo) in the container's process group, then waits itself.
    r, w = os.pipe()
    started = spawn(spec(root, "/bin/sh", "-c", "(read a < /fifo) & read b", stdin=r))
    os.close(r)
    pid = started.pid

    def members():
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    rest = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(rest[2]) == pid and rest[0] != "Z":
                    out.append(int(d))
        return sorted(out)

    end = time.monotonic() + 5
    while len(members()) < 2 and time.monotonic() < end:
        time.sleep(0.01)
    group = members()
    assert len(group) == 2 and pid in group
    os.killpg(started.pgid, signal.SIGKILL)
    assert os.waitstatus_to_exitcode(wait(pid)) == -signal.SIGKILL
    end = time.monotonic() + 5
    while members() and time.monotonic() < end:
        time.sleep(0.01)
    assert members() == []
    os.close(w)


@real
def test_spawning_while_another_thread_logs_and_allocates(root):
    """Fork copies only the calling thread; whatever locks the other one
    held stay held in the child. The child must not need any of them."""
    stop = threading.Event()
    lock = threading.Lock()
    log = logging.getLogger("pufflet.test.busy")
    log.addHandler(logging.StreamHandler(io.StringIO()))
    log.setLevel(logging.INFO)
    log.propagate = False

    def busy():
        junk = []
        while not stop.is_set():
            with lock:
                log.info("busy %s", len(junk))
                junk.append([0] * 100)
                if len(junk) > 1000:
                    junk.clear()

    t = threading.Thread(target=busy)
    t.start()
    old = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("hung")))
    signal.alarm(60)
    try:
        pids = [spawn(spec(root, "/bin/sh", "-c", "exit 0")).pid for _ in range(200)]
        for pid in pids:
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        stop.set()
        t.join()


# ---- resources.limits → rlimits ----------------------------------------------

@pytest.mark.parametrize("text,value", [
    ("128Mi", 134217728), ("1Ki", 1024), ("1.5Gi", 1610612736), ("1Ti", 2**40),
    ("1Pi", 2**50), ("1Ei", 2**60), ("0.5", Fraction(1, 2)), ("500m", Fraction(1, 2)),
    ("100m", Fraction(1, 10)), ("1G", 10**9), ("1k", 1000), ("2M", 2 * 10**6),
    ("1T", 10**12), ("1P", 10**15), ("1E", 10**18), ("1e3", 1000), ("1E3", 1000),
    ("1e-3", Fraction(1, 1000)), ("1E+2", 100), ("5n", Fraction(5, 10**9)),
    ("3u", Fraction(3, 10**6)), (".5", Fraction(1, 2)), ("1.", 1), ("0", 0),
    ("000", 0), ("Mi", 0), ("-1.5Mi", -1572864), ("+7", 7), ("0.1n", Fraction(1, 10**9)),
    ("1.0000000001", Fraction(1000000001, 10**9)),          # rounded up to 1n
    ("10Ei", 2**63 - 1), ("12345678901234567890", 2**63 - 1),   # capped
    ("100E", 10**20),              # apimachinery keeps this one exactly
])
def test_quantities_parse_as_apimachinery_does(text, value):
    assert rlimits.parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "1K", "1e", "1ee3", "1e3.5", " 1", "1 ",
                                  "1.5.5", "abc", "1Mi5", "1mi", "0x10",
                                  "1e99999", "１"])
def test_bad_quantities_are_refused(text):
    with pytest.raises(rlimits.QuantityError):
        rlimits.parse_quantity(text)


def test_plan_maps_kubernetes_resources():
    p = rlimits.plan({"memory": "1Gi", "ephemeral-storage": "2G", "cpu": "4"},
                     {"cpu": "250m", "memory": "100Mi"}, pids=64)
    got = {r.name: (r.soft, r.hard) for r in p.rlimits}
    assert got == {"RLIMIT_CORE": (0, 0), "RLIMIT_NOFILE": (1024, 65536),
                   "RLIMIT_NPROC": (64, 64), "RLIMIT_FSIZE": (2 * 10**9,) * 2,
                   "RLIMIT_RSS": (2**30,) * 2, "RLIMIT_DATA": (2**30,) * 2}
    assert p.rlimits[-1].name == "RLIMIT_DATA"          # applied last
    assert p.nice == 6                                  # shares 256
    # No request: the limit is the request (API defaulting); none: BestEffort.
    assert rlimits.plan({"cpu": "1"}).nice == 0
    assert rlimits.plan().nice == 19
    assert rlimits.plan({"memory": "0"}).rlimits == rlimits.plan().rlimits
    assert [rlimits.nice_for_cpu(Fraction(m, 1000)) for m in (2000, 1000, 500, 100, 10)] \
        == [0, 0, 3, 10, 19]
    with pytest.raises(rlimits.QuantityError, match="limits.memory"):
        rlimits.plan({"memory": "lots"})
    with pytest.raises(rlimits.QuantityError, match="negative"):
        rlimits.plan({"memory": "-1"})
    with pytest.raises(ValueError):
        rlimits.plan(pids=0)
    with pytest.raises(ValueError, match="above hard"):
        rlimits.Rlimit("RLIMIT_NOFILE", 10, 5)
