"""The Linux platform, for real: Landlock in forked children, facts from /proc.

Each sandbox test forks, restricts the child for good, lets it try things
and sends back what happened through a pipe; the parent asserts. (Not
pytest-forked: its child reports through a temporary file that a sandboxed
child could no longer write.)
"""

import ctypes
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from pufflet import platform
from pufflet.platform import SandboxError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="Linux only")

if sys.platform.startswith("linux"):
    from pufflet.platform import linux


def landlock_abi():
    try:
        return linux.abi_version()
    except SandboxError:
        return 0


needs_landlock = pytest.mark.skipif(
    sys.platform.startswith("linux") and landlock_abi() < 1,
    reason="kernel without Landlock")


def attempt(fn):
    """'ok' (or fn's value if it returns one) or the exception's class name."""
    try:
        r = fn()
        return "ok" if r is None else r
    except OSError as e:
        return type(e).__name__


def read(path):
    with open(path) as f:
        return f.read()


def write(path, text="x"):
    with open(path, "w") as f:
        f.write(text)


def in_child(body):
    """Run body() in a forked child; return what it returns (JSON)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = {"result": body()}
        except BaseException as e:           # report everything, exit quietly
            out = {"error": f"{type(e).__name__}: {e}"}
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    out = json.loads(b"".join(chunks))
    return out


@pytest.fixture
def dirs():
    """allowed/ and other/, world-readable, in a tree nobody can reach."""
    top = Path(tempfile.mkdtemp(prefix="pufflet-ll-"))
    top.chmod(0o755)
    allowed, other = top / "allowed", top / "other"
    for d in (allowed, other):
        d.mkdir()
        d.chmod(0o755)
        (d / "f").write_text(f"in {d.name}\n")
        (d / "f").chmod(0o644)
    yield allowed, other
    shutil.rmtree(top, ignore_errors=True)


def test_current_is_linux():
    assert platform.current() is linux


# ---- pure mapping ------------------------------------------------------------

def test_handled_rights_follow_the_abi():
    assert linux.handled_fs(1) == (1 << 13) - 1
    assert linux.handled_fs(2) == (1 << 14) - 1          # + REFER
    assert linux.handled_fs(3) == (1 << 15) - 1          # + TRUNCATE
    assert linux.handled_fs(4) == (1 << 15) - 1          # network only
    assert linux.handled_fs(5) == (1 << 16) - 1          # + IOCTL_DEV
    assert linux.handled_fs(7) == (1 << 16) - 1


def test_unveil_letters_to_rights():
    a = linux.access_for
    assert a("r", 7, True) == linux.FS_READ_FILE | linux.FS_READ_DIR
    assert a("r", 7, False) == linux.FS_READ_FILE
    assert a("w", 7, True) == linux.FS_WRITE_FILE | linux.FS_TRUNCATE
    assert a("w", 2, True) == linux.FS_WRITE_FILE         # no TRUNCATE yet
    assert a("x", 7, False) == linux.FS_EXECUTE
    make = sum(1 << b for b in range(6, 13))
    remove = linux.FS_REMOVE_DIR | linux.FS_REMOVE_FILE
    assert a("c", 7, True) == make | remove | linux.FS_REFER
    assert a("c", 1, True) == make | remove
    assert a("c", 7, False) == 0                          # dir-only rights
    assert a("", 7, True) == 0
    assert a("rwxc", 7, True) & linux.FS_IOCTL_DEV == 0   # never granted


def test_struct_layout_matches_uapi():
    assert ctypes.sizeof(linux._PathBeneathAttr) == 12   # packed
    assert ctypes.sizeof(linux._RulesetAttr) == 8


def test_abi_is_queried_from_the_kernel():
    abi = landlock_abi()
    if abi == 0:
        pytest.skip("kernel without Landlock")
    assert abi >= 1


# ---- real sandbox in forked children ----------------------------------------

@needs_landlock
def test_read_only_dir(dirs):
    allowed, other = dirs

    def body():
        linux.sandbox([(str(allowed), "r")], "stdio rpath")
        return {
            "read": attempt(lambda: read(allowed / "f")),
            "list": attempt(lambda: sorted(os.listdir(allowed))),
            "other": attempt(lambda: read(other / "f")),
            "etc": attempt(lambda: read("/etc/passwd")),
            "write": attempt(lambda: write(allowed / "new")),
            "overwrite": attempt(lambda: write(allowed / "f")),
            "unlink": attempt(lambda: os.unlink(allowed / "f")),
        }

    out = in_child(body)
    assert out == {"result": {
        "read": "in allowed\n", "list": ["f"], "other": "PermissionError",
        "etc": "PermissionError", "write": "PermissionError",
        "overwrite": "PermissionError", "unlink": "PermissionError"}}
    # And nothing leaked out of the child.
    assert os.listdir(allowed) == ["f"]


@needs_landlock
def test_rwc_dir(dirs):
    allowed, other = dirs

    def body():
        linux.sandbox([(str(allowed), "rwc")], "stdio rpath wpath cpath")
        return {
            "create": attempt(lambda: write(allowed / "new", "hello")),
            "readback": attempt(lambda: read(allowed / "new")),
            "mkdir": attempt(lambda: os.mkdir(allowed / "sub")),
            "nested": attempt(lambda: write(allowed / "sub" / "g")),
            "rename": attempt(lambda: os.rename(allowed / "sub" / "g",
                                                allowed / "g")),
            "unlink": attempt(lambda: os.unlink(allowed / "f")),
            "other": attempt(lambda: write(other / "new")),
        }

    out = in_child(body)
    assert out == {"result": {
        "create": "ok", "readback": "hello", "mkdir": "ok", "nested": "ok",
        "rename": "ok", "unlink": "ok", "other": "PermissionError"}}
    assert sorted(os.listdir(allowed)) == ["g", "new", "sub"]
    assert os.listdir(other) == ["f"]


@needs_landlock
def test_single_file_entry(dirs):
    allowed, other = dirs
    (allowed / "g").write_text("sibling\n")

    def body():
        # A regular file: only file rights may be in its rule.
        linux.sandbox([(str(allowed / "f"), "r")], "stdio rpath")
        return {
            "read": attempt(lambda: read(allowed / "f")),
            "sibling": attempt(lambda: read(allowed / "g")),
            "list": attempt(lambda: os.listdir(allowed)),
            "write": attempt(lambda: write(allowed / "f")),
        }

    assert in_child(body) == {"result": {
        "read": "in allowed\n", "sibling": "PermissionError",
        "list": "PermissionError", "write": "PermissionError"}}


@needs_landlock
def test_file_entry_with_dir_letters_is_accepted(dirs):
    allowed, _ = dirs

    def body():
        # "rwc" on a file: c and the directory half of r are dropped
        # rather than failing with EINVAL.
        linux.sandbox([(str(allowed / "f"), "rwc")], "stdio")
        return {"write": attempt(lambda: write(allowed / "f", "new\n")),
                "read": attempt(lambda: read(allowed / "f"))}

    assert in_child(body) == {"result": {"write": "ok", "read": "new\n"}}


@needs_landlock
def test_unprivileged_child(dirs):
    allowed, other = dirs
    nobody = 65534

    def body():
        os.setgroups([])
        os.setresgid(nobody, nobody, nobody)
        os.setresuid(nobody, nobody, nobody)
        before = attempt(lambda: read(other / "f"))
        linux.sandbox([(str(allowed), "r")], "stdio rpath")
        return {
            "uid": os.getuid(), "before": before,
            "nnp": linux.no_new_privs(),
            "read": attempt(lambda: read(allowed / "f")),
            "other": attempt(lambda: read(other / "f")),
        }

    assert in_child(body) == {"result": {
        "uid": nobody, "before": "in other\n", "nnp": True,
        "read": "in allowed\n", "other": "PermissionError"}}


@needs_landlock
def test_missing_paths_are_skipped(dirs):
    allowed, other = dirs

    def body():
        linux.sandbox([(str(allowed / "nope"), "rwc"),
                       ("/nonexistent/deeper", "r"),
                       (str(allowed / "f" / "under-a-file"), "r"),
                       (str(allowed), "r")], "stdio rpath")
        return {"read": attempt(lambda: read(allowed / "f")),
                "create": attempt(lambda: write(allowed / "nope"))}

    assert in_child(body) == {"result": {
        "read": "in allowed\n", "create": "PermissionError"}}


@needs_landlock
def test_restriction_is_inherited_and_final(dirs):
    allowed, other = dirs

    def body():
        linux.sandbox([(str(allowed), "r")], "stdio rpath")
        # A second, wider sandbox cannot widen the first (rules stack).
        linux.sandbox([(str(allowed), "r"), (str(other), "r")], "stdio rpath")
        widened = attempt(lambda: read(other / "f"))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, attempt(lambda: read(other / "f")).encode())
            os._exit(0)
        os.close(w)
        got = os.read(r, 100).decode()
        os.waitpid(pid, 0)
        return {"widened": widened, "grandchild": got}

    assert in_child(body) == {"result": {
        "widened": "PermissionError", "grandchild": "PermissionError"}}


@needs_landlock
def test_refuses_with_threads(dirs):
    allowed, other = dirs

    def body():
        stop = threading.Event()
        t = threading.Thread(target=stop.wait)
        t.start()
        try:
            linux.sandbox([(str(allowed), "r")], "stdio")
        except SandboxError as e:
            return f"SandboxError: {e}"
        finally:
            stop.set()
            t.join()
        return "sandboxed"

    out = in_child(body)
    assert out["result"].startswith("SandboxError: landlock restricts the calling thread")


def test_bad_perms_fail_before_anything(dirs):
    allowed, other = dirs

    def body():
        try:
            linux.sandbox([(str(allowed), "rq")], "stdio")
        except SandboxError as e:
            return {"error": str(e), "other": attempt(lambda: read(other / "f"))}
        return "sandboxed"

    out = in_child(body)["result"]
    assert "bad permissions 'rq'" in out["error"]
    assert out["other"] == "in other\n"


# ---- node facts, process title ----------------------------------------------

KEYS = {
    "hostname": str, "os_name": str, "os_release": str, "os_image": str,
    "kernel_version": str, "machine": str, "cpus": int, "memory_bytes": int,
    "boot_id": str, "machine_id": str, "state_fs_bytes": int,
    "state_fs_free_bytes": int, "state_fs_inodes": int,
    "state_fs_free_inodes": int,
    "memory_available_bytes": int,
    "processes": int,
    "max_processes": int,
}


def test_node_facts(tmp_path):
    facts = linux.node_facts(str(tmp_path))
    assert {k: type(v) for k, v in facts.items()} == KEYS
    u = os.uname()
    assert facts["hostname"] == u.nodename
    assert facts["os_name"] == "Linux"
    assert (facts["os_release"], facts["kernel_version"], facts["machine"]) == \
        (u.release, u.version, u.machine)
    assert facts["os_image"]
    assert facts["cpus"] >= 1 and facts["cpus"] == os.cpu_count()
    meminfo = dict(line.split(":", 1) for line in read("/proc/meminfo").splitlines())
    assert facts["memory_bytes"] == int(meminfo["MemTotal"].split()[0]) * 1024
    assert facts["boot_id"] == read("/proc/sys/kernel/random/boot_id").strip()
    assert len(facts["boot_id"]) == 36
    if os.path.exists("/etc/machine-id"):
        assert facts["machine_id"] == read("/etc/machine-id").strip()


def test_dynamic_facts(tmp_path):
    facts = linux.node_facts(str(tmp_path))
    assert 0 < facts["memory_available_bytes"] <= facts["memory_bytes"]
    # at least this process, and no more than the kernel allows
    assert 1 <= facts["processes"] <= facts["max_processes"]
    assert facts["max_processes"] <= int(read("/proc/sys/kernel/pid_max"))
    total = int(read("/proc/loadavg").split()[3].split("/")[1])
    assert abs(facts["processes"] - total) < 50


def test_meminfo_parsing():
    text = "MemTotal:       16314000 kB\nMemAvailable:    8000000 kB\n" \
           "HugePages_Total:       0\nbogus line\n"
    assert linux.meminfo(text) == {"MemTotal": 16314000 * 1024,
                                   "MemAvailable": 8000000 * 1024,
                                   "HugePages_Total": 0}


def test_other_platform_fallback(tmp_path):
    from pufflet.platform import other
    with pytest.raises(SandboxError, match=f"no sandbox on {sys.platform}"):
        other.sandbox([(str(tmp_path), "r")], "stdio")
    facts = other.node_facts(str(tmp_path))
    assert {k: type(v) for k, v in facts.items()} == KEYS
    assert facts["cpus"] == os.cpu_count()
    assert facts["memory_bytes"] > 0
    other.set_title("x")            # no setproctitle(3) in glibc: a no-op


def test_os_image_from_os_release():
    text = read("/etc/os-release") if os.path.exists("/etc/os-release") else ""
    pretty = [l.split("=", 1)[1].strip('"') for l in text.splitlines()
              if l.startswith("PRETTY_NAME=")]
    want = pretty[0] if pretty else None
    if want:
        assert linux.os_image("Linux", "x") == want


def statvfs_facts(path):
    st = os.statvfs(path)
    return {"state_fs_bytes": st.f_blocks * st.f_frsize,
            "state_fs_free_bytes": st.f_bavail * st.f_frsize,
            "state_fs_inodes": st.f_files,
            "state_fs_free_inodes": st.f_ffree}


def test_state_fs_facts(tmp_path):
    want = statvfs_facts(tmp_path)
    got = {k: v for k, v in linux.node_facts(str(tmp_path)).items()
           if k.startswith("state_fs_")}
    assert got["state_fs_bytes"] == want["state_fs_bytes"]
    assert got["state_fs_inodes"] == want["state_fs_inodes"]
    # Free space may move between the two calls if something else writes.
    assert abs(got["state_fs_free_bytes"] - want["state_fs_free_bytes"]) <= 1 << 24
    assert abs(got["state_fs_free_inodes"] - want["state_fs_free_inodes"]) <= 64


def test_state_dir_not_created_yet(tmp_path):
    missing = tmp_path / "var" / "db" / "pufflet"
    got = linux.node_facts(str(missing))
    assert not missing.exists()
    assert got["state_fs_bytes"] == statvfs_facts(tmp_path)["state_fs_bytes"]


def test_set_title():
    def body():
        linux.set_title("pufflet-agent-with-a-long-name")
        return read("/proc/self/comm").strip()

    assert in_child(body) == {"result": "pufflet-agent-w"}
