"""The parent's pods, through a real privsep channel: real pod roots, real
processes chrooted there as real pod uids, logs written by the real logger
process, exits seen by the real process watcher."""

import ctypes
import grp
import json
import os
import pwd
import queue
import re
import select
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

import imagetools
from pufflet import config
from pufflet.priv import proctrack, uids
from pufflet.priv.imagestore import Store
from pufflet.priv.pods import PodRuntime
from pufflet.priv.services import Services
from pufflet.privsep import spec as specmod
from pufflet.privsep.channel import Client, Server, Status

UID_LO, UID_HI = 3_290_000, 3_290_199
POD_A = "0a0a0a0a-0000-4000-8000-00000000000a"
POD_B = "0b0b0b0b-0000-4000-8000-00000000000b"
PATH = ["PATH=/bin"]
PR_SET_CHILD_SUBREAPER = 36


def _shell_layer() -> bytes:
    """sh, sleep and cat from the host with their libraries: a runnable root."""
    return imagetools.host_tools_layer(("/bin/sh", "/bin/sleep", "/bin/cat"))


@pytest.fixture(scope="module")
def layers():
    return _shell_layer()


@pytest.fixture(scope="module", autouse=True)
def reaper():
    """Orphans (a container's children, the logger) come back to us, not to
    a pid 1 that may never reap them; the loop below reaps them."""
    used = {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    assert not used & set(range(UID_LO, UID_HI + 1)), "test uids in use on this host"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.fixture
def env(tmp_path, layers):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    cfg = config.parse(f'node name n\nuser "nobody"\nstate directory "{state}"\n'
                       f'log directory "{tmp_path / "log"}"\n'
                       f"pod uid range {UID_LO} {UID_HI}\n"
                       f'hostpath "/srv/data" read-only\n')
    store = Store(str(state / "images"))
    img = imagetools.add_image(store, "example.org/shell:1", [layers])
    extra = imagetools.add_image(store, "example.org/extra:1", [imagetools.layer(
        ("dir", "opt"), ("file", "opt/extra.txt", "extra\n"))])
    clash = imagetools.add_image(store, "example.org/clash:1", [imagetools.layer(
        ("dir", "bin"), ("file", "bin/sh", "#!not the same sh\n", 0o755))])
    e = Env(cfg, store, img.digest, extra.digest, clash.digest)
    yield e
    e.close()


class Env:
    def __init__(self, cfg, store, img, extra, clash):
        self.cfg, self.store = cfg, store
        self.img, self.extra, self.clash = img, extra, clash
        self.privs = []
        self.uid_of = {}

    def priv(self):
        p = Priv(self.cfg, self.store)
        self.privs.append(p)
        return p

    def log_file(self, pod, ns, name, container, restart=0):
        return Path(self.cfg.log_dir, "pods", f"{ns}_{name}_{pod}", container,
                    f"{restart}.log")

    def root(self, pod):
        return Path(self.cfg.state_dir, "pods", pod, "root")

    def close(self):
        loggers = {p.runtime.logger.pid for p in self.privs} - {0}
        for p in self.privs:
            p.stop()
        # The loggers came back to us (the subreaper): end them now rather
        # than let them linger into other tests as our children.
        for pid in loggers:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        # Nothing of the test's pods may outlive it.
        from pufflet.priv.pods import kill_uid
        for uid in self.uid_of.values():
            kill_uid(uid, uid)
        _reap_all()


def _reap_all(runtime=None):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if runtime is not None:
            runtime.child_exited(pid, status)


class Priv:
    """Services + PodRuntime behind a Server, driven by a loop shaped like
    the Supervisor's (watcher fd, reaping every child), on a thread."""

    def __init__(self, cfg, store):
        sp = specmod.load()
        self.runtime = PodRuntime(cfg, lambda: store)
        self.runtime.logger.connect()       # as Supervisor.start_pods does
        a, b = socket.socketpair()
        import logging
        self.server = Server(b, sp, Services(cfg, sp, self.runtime).table(),
                             logging.getLogger("test.priv"))
        self.runtime.waker = self.server.wake
        self.runtime.reaper = lambda: _reap_all(self.runtime)
        self.client = Client(a, sp)
        self._stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        self.call("Handshake", {"spec_version": sp.version, "spec_digest": sp.digest,
                                "agent_version": "test"})

    def _loop(self):
        p = select.poll()
        p.register(self.server.fileno(), select.POLLIN)
        p.register(self.runtime.fileno(), select.POLLIN)
        while not self._stop:
            ready = dict(p.poll(0 if self.server.busy() else 20))
            _reap_all(self.runtime)
            self.runtime.forwarder.expire()
            if self.runtime.fileno() in ready:
                self.runtime.poll()
            if self.server.fileno() in ready:
                if not self.server.on_readable():
                    break
            elif not self.server.on_idle():
                break

    def call(self, method, body, **kw):
        return self.client.call(method, body, timeout=20, **kw)

    def stop(self):
        if self._stop:
            return
        self._stop = True
        self.thread.join(5)
        self.client.close()
        self.server.close()
        self.runtime.close()


class Events:
    """WatchContainers, read on a thread into a queue."""

    def __init__(self, priv):
        self.q = queue.Queue()
        it = priv.client.stream("WatchContainers", {})
        threading.Thread(target=self._run, args=(it,), daemon=True).start()

    def _run(self, it):
        try:
            for r in it:
                self.q.put(r.body)
        except Exception as e:
            self.q.put(e)

    def wait(self, timeout=10, **match):
        deadline = time.monotonic() + timeout
        while True:
            ev = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(ev, Exception):
                raise ev
            if all(ev.get(k) == v for k, v in match.items()):
                return ev


def create(priv, env, pod=POD_A, images=None, name="web"):
    info = priv.call("CreatePod", {
        "pod_uid": pod, "namespace": "default", "name": name, "hostname": name,
        "images": images or [env.img], "hosts": [{"ip": "10.0.0.5", "names": ["db"]}],
        "resolv_conf": "nameserver 10.96.0.10\n", "host_network": False}).body
    env.uid_of[pod] = info["uid"]
    return info


def start(priv, env, argv, pod=POD_A, name="c", restart=0, mounts=(), limits=None):
    return priv.call("StartContainer", {
        "pod_uid": pod, "name": name, "restart_count": restart, "image": env.img,
        "argv": list(argv), "env": PATH, "working_dir": "/", "mounts": list(mounts),
        "limits": limits or {}, "stdin": False, "tty": False}).body


def wait_for(pred, timeout=10):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- pods and roots ----------------------------------------------------------------

def test_create_pod_union_idempotent_and_conflict(env):
    p = env.priv()
    info = create(p, env, images=[env.img, env.extra])
    assert UID_LO <= info["uid"] <= UID_HI and info["pod_uid"] == POD_A
    root = env.root(POD_A)
    assert (root / "bin" / "sh").exists() and (root / "opt" / "extra.txt").read_text() == "extra\n"
    assert "10.0.0.5\tdb" in (root / "etc" / "hosts").read_text()
    assert create(p, env, images=[env.img, env.extra]) == info       # idempotent
    assert json.loads(Path(env.cfg.state_dir, "uids.json").read_text())["pods"] == \
        {POD_A: info["uid"]}

    with pytest.raises(Status) as e:
        create(p, env, pod=POD_B, images=[env.img, env.clash])
    assert e.value.code == "FAILED_PRECONDITION"
    assert "images of this pod conflict at /bin/sh" in e.value.message
    assert not Path(env.cfg.state_dir, "pods", POD_B).exists()
    assert POD_B not in json.loads(Path(env.cfg.state_dir, "uids.json").read_text())["pods"]

    with pytest.raises(Status) as e:
        create(p, env, pod=POD_B, images=["sha256:" + "0" * 64])
    assert e.value.code == "NOT_FOUND"


def test_runtime_optional_in_services(env):
    sp = specmod.load()
    table = Services(env.cfg, sp).table()
    svc_greeted = Services(env.cfg, sp)
    svc_greeted.greeted = True
    with pytest.raises(Status) as e:
        svc_greeted.table()["ListPods"]({}, [])
    assert e.value.code == "UNAVAILABLE"
    assert "CreatePod" in table


# -- containers, logs, exits ---------------------------------------------------------

def test_container_logs_and_exit_code(env):
    p = env.priv()
    create(p, env)
    ev = Events(p)
    st = start(p, env, ["sh", "-c", "echo hi; echo err >&2; exit 3"])
    assert st["container_id"].startswith("pufflet://") and len(st["container_id"]) == 74
    got = ev.wait(container_id=st["container_id"])
    assert got["exit_code"] == 3 and "signal" not in got and got["name"] == "c"
    log = env.log_file(POD_A, "default", "web", "c")
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 2)
    lines = sorted(l.split(" ", 1)[1] for l in log.read_text().splitlines())
    assert lines == ["stderr F err", "stdout F hi"]
    c = p.call("ListPods", {}).body["pods"][0]["containers"][0]
    assert c["running"] is False and c["exit_code"] == 3 and c["pid"] == st["pid"]


def test_container_runs_as_pod_uid_and_cannot_write_image(env):
    p = env.priv()
    uid = create(p, env)["uid"]
    ev = Events(p)
    before = (env.root(POD_A) / "bin" / "sh").read_bytes()
    st = start(p, env, ["sh", "-c", 'echo "id $(cat /proc/self/status 2>/dev/null | '
                        'head -1)"; echo pwned >> /bin/sh'])
    got = ev.wait(container_id=st["container_id"])
    assert got["exit_code"] != 0                    # the shell could not open it
    assert (env.root(POD_A) / "bin" / "sh").read_bytes() == before
    log = env.log_file(POD_A, "default", "web", "c")
    wait_for(lambda: log.exists() and "Permission denied" in log.read_text())
    # and the process was the pod's uid, in its own session
    st2 = start(p, env, ["sleep", "5"], name="s")
    status = Path(f"/proc/{st2['pid']}/status").read_text()
    assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s+{uid}\s+{uid}$", status, re.M)
    assert os.getsid(st2["pid"]) == st2["pid"]
    assert os.readlink(f"/proc/{st2['pid']}/root") == str(env.root(POD_A))


def test_a_pod_cannot_reach_another_pods_root_or_processes(env):
    """Escape attempts through the real spawn path: pod A's container,
    as A's uid in A's root, goes for pod B's."""
    p = env.priv()
    create(p, env)
    create(p, env, pod=POD_B, name="other")
    ev = Events(p)
    victim = start(p, env, ["sh", "-c", "echo b-secret > /tmp/secret; sleep 60"], pod=POD_B)
    secret = env.root(POD_B) / "tmp" / "secret"
    wait_for(secret.exists)
    b_root = str(env.root(POD_B))
    # Every attempt prints its outcome; the shell goes on after a failure.
    script = (f'kill -9 {victim["pid"]} 2>/dev/null; echo "kill $?"; '
              f'kill -0 {victim["pid"]} 2>/dev/null; echo "probe $?"; '
              f'cat {b_root}/tmp/secret 2>/dev/null; echo "host path $?"; '
              f'cat ../../../../{b_root}/tmp/secret 2>/dev/null; echo "dotdot $?"; '
              f'cat /proc/{victim["pid"]}/root/tmp/secret 2>/dev/null; echo "proc $?"; '
              'echo x 2>/dev/null >> /bin/cat; echo "image $?"')
    st = start(p, env, ["sh", "-c", script], name="attacker")
    assert ev.wait(container_id=st["container_id"])["exit_code"] == 0
    log = env.log_file(POD_A, "default", "web", "attacker")
    wait_for(lambda: log.exists() and "image" in log.read_text())
    out = [line.split(" ", 3)[3] for line in log.read_text().splitlines()]
    assert out == ["kill 1", "probe 1", "host path 1", "dotdot 1", "proc 1", "image 2"], out
    assert "b-secret" not in log.read_text()
    # B's process lives on, its secret untouched.
    assert os.waitpid(victim["pid"], os.WNOHANG) == (0, 0)
    assert secret.read_text() == "b-secret\n"


def test_signal_container(env):
    p = env.priv()
    create(p, env)
    ev = Events(p)
    st = start(p, env, ["sleep", "100"])
    p.call("SignalContainer", {"pod_uid": POD_A, "name": "c", "signal": "SIGTERM"})
    got = ev.wait(container_id=st["container_id"])
    assert got["signal"] == 15 and got["exit_code"] == 128 + 15
    with pytest.raises(Status) as e:
        p.call("SignalContainer", {"pod_uid": POD_A, "name": "c", "signal": "SIGTERM"})
    assert e.value.code == "NOT_FOUND"


def test_spawn_failure_is_clear(env):
    p = env.priv()
    create(p, env)
    with pytest.raises(Status) as e:
        start(p, env, ["/bin/nope"])
    assert e.value.code == "FAILED_PRECONDITION"
    assert e.value.message == "exec /bin/nope: No such file or directory"
    with pytest.raises(Status) as e:
        start(p, env, ["nope"])
    assert "searched PATH=/bin inside the pod root" in e.value.message


def test_remove_pod_leaves_nothing(env):
    p = env.priv()
    uid = create(p, env)["uid"]
    ev = Events(p)
    st = start(p, env, ["sh", "-c", "sleep 100 & sleep 100"])
    wait_for(lambda: uids.proc_busy(uid))
    p.call("RemovePod", {"pod_uid": POD_A})
    assert not Path(env.cfg.state_dir, "pods", POD_A).exists()
    assert json.loads(Path(env.cfg.state_dir, "uids.json").read_text())["pods"] == {}
    assert ev.wait(container_id=st["container_id"])["signal"] == 9
    wait_for(lambda: not uids.proc_busy(uid), timeout=5)
    assert p.call("ListPods", {}).body["pods"] == []
    p.call("RemovePod", {"pod_uid": POD_A})      # idempotent


def test_image_use_noted_at_most_once_a_minute(env, monkeypatch):
    """The image GC's LRU stamp: written at the first use, not again for
    every pod of a burst (each write rewrites the store's table)."""
    from pufflet.priv import pods as privpods
    p = env.priv()
    before = time.time()
    create(p, env)
    first = env.store.get(env.img).last_used
    assert first >= before
    create(p, env, pod=POD_B, name="other")
    start(p, env, ["/bin/sh", "-c", "exit 0"], pod=POD_B)
    assert env.store.get(env.img).last_used == first
    monkeypatch.setattr(privpods, "TOUCH_EVERY", 0.0)
    start(p, env, ["/bin/sh", "-c", "exit 0"], pod=POD_B, name="d")
    assert env.store.get(env.img).last_used > first


# -- volumes -----------------------------------------------------------------------

def set_volume(p, name, kind, files=(), writable=True, **kw):
    return p.call("SetVolume", {"pod_uid": POD_A, "name": name, "kind": kind,
                                "files": list(files), "writable": writable, **kw})


def test_volumes_empty_dir_and_atomic_files(env):
    p = env.priv()
    uid = create(p, env)["uid"]
    ev = Events(p)
    set_volume(p, "scratch", "emptyDir", size_limit=1 << 20)
    set_volume(p, "cfg", "files", [{"path": "a.txt", "data": b"one\n", "mode": 0o644},
                                   {"path": "sub/b.txt", "data": b"bee\n", "mode": 0o600}])
    mounts = [{"volume": "scratch", "path": "/data", "read_only": False},
              {"volume": "cfg", "path": "/etc/cfg", "read_only": True}]
    st = start(p, env, ["sh", "-c", "echo made > /data/x && cat /etc/cfg/a.txt "
                        "/etc/cfg/sub/b.txt && ! echo no > /etc/cfg/a.txt"],
               mounts=mounts)
    assert ev.wait(container_id=st["container_id"])["exit_code"] == 0
    vol = env.root(POD_A) / ".pufflet" / "volumes"
    assert os.stat(vol / "scratch" / "x").st_uid == uid
    assert os.readlink(env.root(POD_A) / "data") == "/.pufflet/volumes/scratch"
    log = env.log_file(POD_A, "default", "web", "c")
    wait_for(lambda: log.exists() and "bee" in log.read_text())
    assert "stdout F one" in log.read_text()
    a = vol / "cfg" / "a.txt"
    st_a = os.stat(a)
    assert (st_a.st_uid, st_a.st_gid, st_a.st_mode & 0o777) == (0, uid, 0o440)
    first = os.readlink(vol / "cfg" / "..data")

    # An update: new content through the same names, the old set gone.
    set_volume(p, "cfg", "files", [{"path": "a.txt", "data": b"two\n", "mode": 0o644}])
    assert a.read_text() == "two\n"
    assert not (vol / "cfg" / "sub").exists() and not (vol / "cfg" / first).exists()
    assert os.readlink(vol / "cfg" / "a.txt") == "..data/a.txt"
    st = start(p, env, ["cat", "/etc/cfg/a.txt"], restart=1, mounts=mounts)
    assert ev.wait(container_id=st["container_id"])["exit_code"] == 0
    log1 = env.log_file(POD_A, "default", "web", "c", restart=1)
    wait_for(lambda: log1.exists() and "stdout F two" in log1.read_text())

    for bad in ("../x", "a//b", "a/../b", "..data/x", "a/./b"):
        with pytest.raises(Status) as e:
            set_volume(p, "cfg", "files", [{"path": bad, "data": b"", "mode": 0o644}])
        assert e.value.code == "INVALID_ARGUMENT", bad
    assert a.read_text() == "two\n"           # a refused update changes nothing
    with pytest.raises(Status) as e:
        set_volume(p, "h", "hostPath", host_path="/etc", writable=False)
    assert e.value.code == "PERMISSION_DENIED"
    with pytest.raises(Status) as e:
        set_volume(p, "h", "hostPath", host_path="/srv/data/x", writable=False)
    assert e.value.code == "UNIMPLEMENTED" and "bind mount" in e.value.message
    with pytest.raises(Status) as e:
        set_volume(p, "h", "hostPath", host_path="/srv/database", writable=False)
    assert e.value.code == "PERMISSION_DENIED"
    # A mount over an image file is refused.
    with pytest.raises(Status) as e:
        start(p, env, ["true"], name="d", mounts=[
            {"volume": "scratch", "path": "/bin/sh", "read_only": False}])
    assert e.value.code == "FAILED_PRECONDITION"


# -- exec --------------------------------------------------------------------------

def _read_until(fd, want: bytes, timeout=10) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while want not in buf:
        r, _, _ = select.select([fd], [], [], max(0, deadline - time.monotonic()))
        assert r, f"timed out, got {buf!r}"
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        buf += chunk
    return buf


def test_exec_pipes_and_tty(env):
    p = env.priv()
    create(p, env)
    ev = Events(p)
    start(p, env, ["sleep", "30"])
    r = p.call("StartExec", {"pod_uid": POD_A, "name": "c", "argv": [
        "sh", "-c", "read x; echo got $x; echo e >&2; exit 4"], "env": PATH,
        "working_dir": "/tmp", "tty": False})
    stdin, stdout, stderr = r.fds
    os.write(stdin, b"hello\n")
    os.close(stdin)
    assert _read_until(stdout, b"got hello\n") == b"got hello\n"
    assert _read_until(stderr, b"e\n") == b"e\n"
    os.close(stdout)
    os.close(stderr)
    got = ev.wait(exec_id=r.body["exec_id"])
    assert got["exit_code"] == 4 and got["name"] == "c"

    r = p.call("StartExec", {"pod_uid": POD_A, "name": "c", "argv": [
        "sh", "-c", "test -t 0 && echo istty"], "env": PATH, "working_dir": "/",
        "tty": True})
    assert os.path.samestat(os.fstat(r.fds[0]), os.fstat(r.fds[1]))
    # Read until the shell is gone (EIO once the slave closes): closing
    # the master earlier would hang it up.
    assert b"istty" in _read_until(r.fds[1], b"never")
    for fd in r.fds:
        os.close(fd)
    assert ev.wait(exec_id=r.body["exec_id"])["exit_code"] == 0

    with pytest.raises(Status) as e:
        p.call("StartExec", {"pod_uid": POD_A, "name": "nope", "argv": ["sh"],
                             "env": PATH, "working_dir": "/", "tty": False})
    assert e.value.code == "NOT_FOUND"


def test_signal_exec_kills_its_process_group(env):
    p = env.priv()
    create(p, env)
    ev = Events(p)
    start(p, env, ["sleep", "30"])
    # The exec's shell starts a child and waits: both must go.
    r = p.call("StartExec", {"pod_uid": POD_A, "name": "c", "argv": [
        "sh", "-c", "sleep 30 & echo $!; wait"], "env": PATH, "working_dir": "/",
        "tty": False})
    child = int(_read_until(r.fds[1], b"\n"))
    for fd in r.fds:
        os.close(fd)
    exec_id = r.body["exec_id"]
    for bad in ({"pod_uid": POD_B, "exec_id": exec_id}, {"pod_uid": POD_A, "exec_id": "0" * 32}):
        with pytest.raises(Status) as e:
            p.call("SignalExec", {**bad, "signal": "SIGKILL"})
        assert e.value.code == "NOT_FOUND"
    p.call("SignalExec", {"pod_uid": POD_A, "exec_id": exec_id, "signal": "SIGKILL"})
    assert ev.wait(exec_id=exec_id)["signal"] == 9
    wait_for(lambda: not os.path.exists(f"/proc/{child}")
             or Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z")
    with pytest.raises(Status) as e:
        p.call("SignalExec", {"pod_uid": POD_A, "exec_id": exec_id, "signal": "SIGKILL"})
    assert e.value.code == "NOT_FOUND"


# -- restarts ----------------------------------------------------------------------

def _old_priv(env, out_w):
    """A parent that starts two containers and dies, in a process whose
    own parent (a subreaper) reaps what it leaves: then the containers are
    not the new parent's children, as after a real restart."""
    rt = PodRuntime(env.cfg, lambda: env.store)
    body = {"pod_uid": POD_A, "namespace": "default", "name": "web", "hostname": "web",
            "images": [env.img], "hosts": [], "resolv_conf": "", "host_network": False}
    uid = rt.create_pod(body, [])["uid"]
    base = {"pod_uid": POD_A, "restart_count": 0, "image": env.img, "env": PATH,
            "working_dir": "/", "mounts": [], "limits": {}, "stdin": False, "tty": False}
    long = rt.start_container({**base, "name": "long", "argv": [
        "sh", "-c", "echo before; while [ ! -e /tmp/go ]; do sleep 0.05; done; "
        "echo after"]}, [])
    rt.start_container({**base, "name": "quick", "argv": ["sh", "-c", "exit 7"]}, [])
    os.write(out_w, json.dumps({"uid": uid, "long": long, "logger": rt.logger.pid}).encode())


def test_readoption_and_logger_survive_a_restart(env):
    r, w = os.pipe()
    reaper = os.fork()
    if reaper == 0:
        code = 1
        try:
            ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
            os.close(r)
            old = os.fork()
            if old == 0:
                try:
                    _old_priv(env, w)
                finally:
                    os._exit(0)     # dies: no cleanup, as a crash
            os.close(w)
            while True:         # reap whatever is left to us, until killed
                try:
                    os.wait()
                except ChildProcessError:
                    time.sleep(0.05)
        finally:
            os._exit(code)
    os.close(w)
    try:
        data = b""
        while chunk := os.read(r, 65536):
            data += chunk
        os.close(r)
        old = json.loads(data)
        env.uid_of[POD_A] = old["uid"]
        pid = old["long"]["pid"]
        log = env.log_file(POD_A, "default", "web", "long")
        wait_for(lambda: log.exists() and "before" in log.read_text())
        wait_for(lambda: proctrack.start_time(pid) is not None
                 and os.path.exists(f"/proc/{pid}") and _ppid(pid) != os.getpid())

        p = env.priv()
        ev = Events(p)
        assert p.runtime.logger.pid == old["logger"]        # the same logger
        cs = {c["name"]: c for c in p.call("ListPods", {}).body["pods"][0]["containers"]}
        assert cs["long"]["running"] and cs["long"]["pid"] == pid
        assert not cs["quick"]["running"] and "exit status unknown" in cs["quick"]["reason"]
        assert "exit_code" not in cs["quick"]

        (env.root(POD_A) / "tmp" / "go").write_text("")
        got = ev.wait(container_id=old["long"]["container_id"])
        assert "exit_code" not in got and "exit status unknown" in got["reason"]
        wait_for(lambda: "after" in log.read_text())
        lines = [l.split(" ", 1)[1] for l in log.read_text().splitlines()]
        assert lines == ["stdout F before", "stdout F after"]
        p.call("RemovePod", {"pod_uid": POD_A})
    finally:
        os.kill(reaper, signal.SIGKILL)
        os.waitpid(reaper, 0)


def _ppid(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_valid_but_hostile_requests_to_every_pod_method(env):
    """The real pod handlers, as a compromised agent could call them: every
    pod method with bodies its spec accepts (specgen: its pod uids include
    POD_A, which runs container "c" here, and unknown ones; images not in
    the pod or the store, routes nobody configured, ports, signals...).
    Each gets a deliberate status, never INTERNAL (an unexpected
    exception); the parent keeps serving and, once POD_A is removed, holds
    no pod."""
    import random

    import specgen
    from pufflet.priv.services import POD_METHODS
    d = specgen.doc()
    r = random.Random(11)
    priv = env.priv()
    create(priv, env)
    start(priv, env, ["sleep", "60"])
    seen = {}
    # RemovePod last, so that the others meet a live pod.
    for method in sorted(POD_METHODS, key=lambda m: m == "RemovePod"):
        if method == "WatchContainers":
            continue            # a stream that waits for exits by design
        for _ in range(25):
            body = specgen.request(d, method, r)
            nfds = len(d["methods"][method].get("request_fds") or ())
            fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(nfds)]
            try:
                if d["methods"][method].get("stream"):
                    for reply in priv.client.stream(method, body, fds=fds):
                        for fd in reply.fds:
                            os.close(fd)
                else:
                    for fd in priv.call(method, body, fds=fds).fds:
                        os.close(fd)
                code = "OK"
            except Status as e:
                code = e.code
            finally:
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            assert code != "INTERNAL", (method, body)
            seen.setdefault(method, set()).add(code)
    assert set(seen) == set(POD_METHODS) - {"WatchContainers"}
    try:
        priv.call("RemovePod", {"pod_uid": POD_A})
    except Status as e:
        assert e.code == "NOT_FOUND"        # a generated RemovePod was first
    assert priv.call("ListPods", {}).body["pods"] == []
