"""podroot: pod root trees built from an image with hard links, checked
from the inside by real processes chrooted there as real pod uids."""

import errno
import grp
import json
import os
import pwd
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from pufflet.priv import podroot
from pufflet.priv.podroot import PodRootError

UID_A, UID_B = 3_180_001, 3_180_002
RESOLV = "nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local\n"
TOOL = b"#!/bin/sh\necho tool\n"


@pytest.fixture(autouse=True)
def free_uids():
    used = {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    assert not {UID_A, UID_B} & used, "test uids are in use on this host"


def make_image(root: Path, *, sh: bool = True) -> Path:
    """A small image tree as unpack.py leaves one: root-owned, nothing
    writable but by root, with nesting, a symlink and an /etc."""
    img = root / "rootfs"
    (img / "bin").mkdir(parents=True)
    (img / "bin" / "tool").write_bytes(TOOL)
    (img / "bin" / "tool").chmod(0o755)
    if sh:
        (img / "bin" / "busybox").write_bytes(b"\x7fELF")
        (img / "bin" / "busybox").chmod(0o755)
        os.symlink("/bin/busybox", img / "bin" / "sh")      # resolved in the chroot
    (img / "usr" / "share" / "doc" / "a" / "b").mkdir(parents=True)
    (img / "usr" / "share" / "doc" / "a" / "b" / "c.txt").write_text("deep\n")
    os.symlink("usr/share", img / "share")
    (img / "etc").mkdir()
    (img / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                        "pod:x:77:77:impostor:/:/bin/sh\n")
    (img / "etc" / "group").write_text("root:x:0:\nwheel:x:10:root\n")
    (img / "etc" / "hosts").write_text("6.6.6.6 evil\n")
    (img / "etc" / "os-release").write_text("ID=test\n")
    (img / "var" / "empty").mkdir(parents=True)
    (img / "opt").mkdir(mode=0o775)
    (img / "opt").chmod(0o775)      # group-writable in the image: masked
    (img / "locked").mkdir()
    (img / "locked" / "inside").write_text("x")
    (img / "locked").chmod(0o500)   # filled before its mode is set
    (img / "tmp").mkdir()
    (img / "tmp" / "seed").write_text("from the image\n")
    img.chmod(0o755)
    return img


def build(img, pod_dir, uid=UID_A, **kw):
    kw.setdefault("hostname", "web-0")
    kw.setdefault("resolv_conf", RESOLV)
    Path(pod_dir).parent.mkdir(parents=True, exist_ok=True)    # the pods directory
    return podroot.build(str(img), str(pod_dir), uid, uid, **kw)


@pytest.fixture
def image(public_tmp):
    return make_image(public_tmp)


@pytest.fixture
def tmpfs(tmp_path):
    """A nodev tmpfs, mounted for the test."""
    d = tmp_path / "nodev"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "nodev,size=16m", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=True)


# -- the tree ---------------------------------------------------------------------

def test_build_links_files_and_makes_dirs(image, public_tmp):
    pr = build(image, public_tmp / "pods" / "a")
    root = Path(pr.path)
    assert root == public_tmp / "pods" / "a" / "root"
    assert not (public_tmp / "pods" / "a" / "root.tmp").exists()
    assert (pr.uid, pr.gid, pr.user_name, pr.copied) == (UID_A, UID_A, "pod", 0)

    # regular files: the image's very inodes
    for rel in ("bin/tool", "bin/busybox", "usr/share/doc/a/b/c.txt", "etc/os-release",
                "locked/inside", "tmp/seed"):
        assert os.lstat(root / rel).st_ino == os.lstat(image / rel).st_ino, rel
    assert pr.linked == 6
    # directories: new, root-owned, the image's modes without group/other write
    for rel, mode in (("bin", 0o755), ("usr/share/doc/a", 0o755), ("opt", 0o755),
                      ("locked", 0o500), ("var/empty", 0o755), ("", 0o755)):
        st, ist = os.lstat(root / rel), os.lstat(image / rel)
        assert stat.S_ISDIR(st.st_mode) and st.st_ino != ist.st_ino, rel
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, mode), rel
    # symlinks: targets verbatim
    assert os.readlink(root / "share") == "usr/share"
    assert os.readlink(root / "bin" / "sh") == "/bin/busybox"
    # /tmp: the image's content, root-owned 1777
    st = os.lstat(root / "tmp")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o1777)
    # the pod dir: root only
    st = os.lstat(public_tmp / "pods" / "a")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)


def test_etc_files_are_new_and_right(image, public_tmp):
    pr = build(image, public_tmp / "a", hosts_entries=[("10.244.1.7", ["web-0.web"]),
                                                       ("2001:db8::1", ["db", "db.local"])])
    etc = Path(pr.path) / "etc"
    for name in ("hosts", "resolv.conf", "passwd", "group"):
        st = os.lstat(etc / name)
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1, name
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o644), name
    assert (etc / "resolv.conf").read_text() == RESOLV
    hosts = (etc / "hosts").read_text().splitlines()
    assert "127.0.0.1\tlocalhost web-0" in hosts
    assert "10.244.1.7\tweb-0.web" in hosts and "2001:db8::1\tdb db.local" in hosts
    assert not any("evil" in h for h in hosts)
    passwd = (etc / "passwd").read_text().splitlines()
    # the image's "pod" user made way for the real one
    assert passwd == ["root:x:0:0:root:/root:/bin/sh",
                      f"pod:x:{UID_A}:{UID_A}:pufflet pod:/tmp:/bin/sh"]
    assert (etc / "group").read_text().splitlines() == [
        "root:x:0:", "wheel:x:10:root", f"pod:x:{UID_A}:"]
    # the image's files are untouched
    assert "impostor" in (image / "etc" / "passwd").read_text()
    assert (image / "etc" / "hosts").read_text() == "6.6.6.6 evil\n"


def test_hostname_named_by_an_entry_is_not_on_loopback(image, public_tmp):
    pr = build(image, public_tmp / "a", hostname="web-0",
               hosts_entries=[("10.244.1.7", ["web-0"])])
    hosts = (Path(pr.path) / "etc" / "hosts").read_text()
    assert "127.0.0.1\tlocalhost\n" in hosts and "10.244.1.7\tweb-0\n" in hosts


def test_no_shell_means_nologin_and_no_etc_is_made(public_tmp):
    img = public_tmp / "img"
    (img / "app").mkdir(parents=True)
    (img / "app" / "server").write_bytes(b"\x7fELF")
    pr = build(img, public_tmp / "a", user_name="app")
    etc = Path(pr.path) / "etc"
    assert stat.S_IMODE(os.lstat(etc).st_mode) == 0o755
    assert (etc / "passwd").read_text() == \
        f"app:x:{UID_A}:{UID_A}:pufflet pod:/tmp:/sbin/nologin\n"
    assert (etc / "group").read_text() == f"app:x:{UID_A}:\n"
    assert stat.S_IMODE(os.lstat(Path(pr.path) / "tmp").st_mode) == 0o1777


def test_dev_nodes_are_the_hosts_devices(image, public_tmp):
    pr = build(image, public_tmp / "a")
    if pr.dev_missing_reason:
        pytest.skip(f"device nodes do not work here: {pr.dev_missing_reason}")
    dev = Path(pr.path) / "dev"
    assert set(pr.devices) >= {"null", "zero", "random", "urandom"}
    assert sorted(os.listdir(dev)) == sorted(pr.devices)
    for name in pr.devices:
        st, host = os.lstat(dev / name), os.stat(f"/dev/{name}")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == host.st_rdev, name
        assert st.st_uid == 0
    assert (dev / "zero").open("rb").read(4) == b"\0\0\0\0"
    assert len((dev / "urandom").open("rb").read(16)) == 16
    st = os.lstat(dev)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)


def test_dev_not_asked_for(image, public_tmp):
    pr = build(image, public_tmp / "a", dev=False)
    assert pr.devices == () and "asked" in pr.dev_missing_reason
    assert os.listdir(Path(pr.path) / "dev") == []


def test_nodev_filesystem_is_reported_and_gets_no_nodes(tmpfs):
    img = make_image(tmpfs)
    pr = build(img, tmpfs / "pods" / "a")
    assert pr.devices == ()
    assert "nodev" in pr.dev_missing_reason and str(tmpfs) in pr.dev_missing_reason
    assert os.listdir(Path(pr.path) / "dev") == []
    assert os.lstat(Path(pr.path) / "bin" / "tool").st_ino == os.lstat(img / "bin" / "tool").st_ino


def test_image_on_another_filesystem_is_refused(tmpfs, image):
    with pytest.raises(PodRootError, match="different file systems"):
        build(image, tmpfs / "a")
    assert os.listdir(tmpfs / "a") == []


@pytest.mark.parametrize("mode,owner,what", [
    (0o664, 0, "group writable"), (0o646, 0, "world writable"),
    (0o4755, 0, "setuid"), (0o2755, 0, "setgid"), (0o644, UID_B, "not root's")])
def test_unsafe_image_file_is_refused_and_nothing_left(image, public_tmp, mode, owner, what):
    bad = image / "usr" / "share" / "doc" / "a" / "bad"
    bad.write_text("x")
    os.chown(bad, owner, 0)
    bad.chmod(mode)
    with pytest.raises(PodRootError, match=r"/usr/share/doc/a/bad is owned by uid "
                                           rf"{owner}, mode {mode:04o}"):
        build(image, public_tmp / "a")
    assert os.listdir(public_tmp / "a") == []


def test_fifo_in_image_refused(image, public_tmp):
    os.mkfifo(image / "bin" / "pipe")
    with pytest.raises(PodRootError, match="/bin/pipe is not a regular file"):
        build(image, public_tmp / "a")
    assert os.listdir(public_tmp / "a") == []


def test_etc_symlink_in_image_refused(public_tmp):
    img = public_tmp / "img"
    img.mkdir()
    os.symlink("/etc", img / "etc")
    with pytest.raises(PodRootError, match="/etc is not a directory"):
        build(img, public_tmp / "a")
    assert os.listdir(public_tmp / "a") == []


@pytest.mark.parametrize("kw", [
    {"hostname": "a\n6.6.6.6 evil"}, {"hostname": ""}, {"hostname": "-x"},
    {"hosts_entries": [("10.0.0.1", ["ok", "bad name"])]},
    {"hosts_entries": [("10.0.0.300", ["x"])]}, {"hosts_entries": [("10.0.0.1", "x")]},
    {"hosts_entries": [("10.0.0.1", [])]}, {"resolv_conf": "x\0y"},
    {"user_name": "root:x:0:0"}, {"user_name": "Pod"}])
def test_bad_arguments_refused(image, public_tmp, kw):
    with pytest.raises(PodRootError):
        build(image, public_tmp / "a", **kw)


@pytest.mark.parametrize("uid", [0, -1, True, 2**31])
def test_bad_ids_refused(image, public_tmp, uid):
    with pytest.raises(PodRootError, match="uid"):
        build(image, public_tmp / "a", uid=uid)


def test_build_twice_refused_and_stale_tmp_replaced(image, public_tmp):
    pod = public_tmp / "a"
    (pod / "root.tmp" / "junk").mkdir(parents=True)     # a crash mid-build
    build(image, pod)
    assert sorted(os.listdir(pod)) == ["root"]
    with pytest.raises(PodRootError, match="already has a root"):
        build(image, pod)


def test_emlink_falls_back_to_one_copy(image, public_tmp):
    """A file at its link limit is copied once; its other names link to the copy."""
    tool = image / "bin" / "tool"
    os.link(tool, image / "bin" / "tool2")
    spare = public_tmp / "spare"
    spare.mkdir()
    fd = os.open(spare, os.O_RDONLY)
    try:
        for i in range(70_000):
            try:
                os.link(str(tool), str(i), dst_dir_fd=fd)
            except OSError as e:
                if e.errno != errno.EMLINK:
                    raise
                break
        else:
            pytest.skip("this file system has no small link limit")
        # tool is at its limit: no room for even one more link
        pr = build(image, public_tmp / "a")
        root = Path(pr.path)
        assert pr.copied == 1
        st1, st2 = os.lstat(root / "bin" / "tool"), os.lstat(root / "bin" / "tool2")
        assert st1.st_ino == st2.st_ino != os.lstat(tool).st_ino
        assert st1.st_nlink == 2
        assert (root / "bin" / "tool").read_bytes() == TOOL
        assert (root / "bin" / "tool2").read_bytes() == TOOL
        assert st1.st_uid == 0 and stat.S_IMODE(st1.st_mode) == 0o755
    finally:
        for name in os.listdir(fd):
            os.unlink(name, dir_fd=fd)
        os.close(fd)


# -- remove and sweep -------------------------------------------------------------

def test_remove_leaves_nothing(image, public_tmp):
    pod = public_tmp / "pods" / "a"
    pr = build(image, pod)
    (Path(pr.path) / "tmp" / "made-by-pod").write_text("x")
    podroot.remove(str(pod))
    assert os.listdir(public_tmp / "pods") == []
    assert (image / "bin" / "tool").read_bytes() == TOOL
    assert os.lstat(image / "bin" / "tool").st_nlink == 1
    podroot.remove(str(pod))        # already gone: fine


def test_remove_half_built_tree_never_follows_symlinks(public_tmp):
    outside = public_tmp / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    pod = public_tmp / "pods" / "a"
    tmp = pod / "root.tmp"
    (tmp / "usr" / "lib").mkdir(parents=True)
    (tmp / "usr" / "lib" / "x").write_text("x")
    os.symlink(outside, tmp / "usr" / "escape")          # to a dir outside
    os.symlink(outside / "precious", tmp / "file-link")
    os.mkfifo(tmp / "fifo")
    (tmp / "usr" / "lib").chmod(0o000)
    podroot.remove(str(pod))
    assert not pod.exists()
    assert (outside / "precious").read_text() == "keep me"


def test_remove_deep_tree(public_tmp):
    pod = public_tmp / "a"
    deep = pod / "root" / "tmp" / ("d/" * 300)
    deep.mkdir(parents=True)
    (deep / "f").write_text("x")
    podroot.remove(str(pod))
    assert not pod.exists()


def test_remove_refuses_symlinked_pod_dir(public_tmp):
    target = public_tmp / "target"
    target.mkdir()
    (target / "f").write_text("x")
    os.symlink(target, public_tmp / "link")
    with pytest.raises(PodRootError, match="symlink"):
        podroot.remove(str(public_tmp / "link"))
    assert (target / "f").read_text() == "x"


def test_sweep_removes_leftovers_and_keeps_the_listed(image, public_tmp):
    pods = public_tmp / "pods"
    for name in ("keep1", "gone1", "gone2", "keep2"):
        build(image, pods / name)
    (pods / "stray-file").write_text("x")
    os.symlink(image, pods / "stray-link")          # removed, not followed
    (pods / "half" / "root.tmp" / "bin").mkdir(parents=True)
    removed = podroot.sweep(str(pods), {"keep1", "keep2", "not-there"})
    assert removed == ["gone1", "gone2", "half", "stray-file", "stray-link"]
    assert sorted(os.listdir(pods)) == ["keep1", "keep2"]
    assert (image / "bin" / "tool").read_bytes() == TOOL
    assert podroot.sweep(str(public_tmp / "none"), set()) == []


def test_build_of_2000_files_is_fast(public_tmp):
    img = public_tmp / "big"
    for d in range(100):
        sub = img / "usr" / "lib" / f"d{d}"
        sub.mkdir(parents=True)
        for f in range(20):
            (sub / f"f{f}").write_text("x")
    t = time.perf_counter()
    pr = build(img, public_tmp / "a")
    took = time.perf_counter() - t
    assert pr.linked == 2000
    # The real number is ~25 ms on the dev VM; this only catches a blunder.
    assert took < 1.0, f"building a 2000-file pod root took {took:.3f}s"


# -- from the inside ---------------------------------------------------------------

def as_uid(uid, fn, chroot=None):
    """Run fn in a child that chroots (if asked) and becomes uid:uid with
    no other groups, as pod processes will; fn's JSON result comes back."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(r)
            if chroot:
                os.chroot(chroot)
                os.chdir("/")
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            out = json.dumps(fn()).encode()
            status = 0
        except BaseException as e:      # noqa: B902 - report anything
            out = json.dumps({"crash": repr(e)}).encode()
        while out:
            out = out[os.write(w, out):]
        os._exit(status)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    res = json.loads(data)
    assert not (isinstance(res, dict) and "crash" in res), res
    return res


def attempt(f, *args):
    try:
        f(*args)
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]


def write(path, flags=os.O_WRONLY):
    os.close(os.open(path, flags, 0o644))


def sleeper(root, uid):
    """A process of a pod: chrooted, as uid, sleeping."""
    pid = os.fork()
    if pid == 0:
        try:
            os.chroot(root)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            time.sleep(60)
        finally:
            os._exit(0)
    return pid


def test_escape_attempts_as_the_pod_uid_fail(image, public_tmp):
    pods = public_tmp / "pods"
    a = build(image, pods / "a", uid=UID_A)
    b = build(image, pods / "b", uid=UID_B)
    tool_before = (os.lstat(image / "bin" / "tool"), TOOL)
    secret_host_path = str(Path(b.path) / "tmp" / "secret")

    # Pod b keeps a secret in its /tmp, created with the usual umask.
    def keep_secret():
        with open("/tmp/secret", "w") as f:
            f.write("b's secret")
        return oct(os.stat("/tmp/secret").st_mode & 0o777)
    assert as_uid(UID_B, keep_secret, chroot=b.path) == "0o644"

    victim = sleeper(b.path, UID_B)
    try:
        def inside_a():
            return {
                "write image file": attempt(write, "/bin/tool"),
                "append image file": attempt(write, "/bin/tool", os.O_WRONLY | os.O_APPEND),
                "truncate image file": attempt(os.truncate, "/bin/tool", 0),
                "chmod image file": attempt(os.chmod, "/bin/tool", 0o777),
                "unlink image file": attempt(os.unlink, "/bin/tool"),
                "rename image file": attempt(os.rename, "/bin/tool", "/bin/x"),
                "write /etc/passwd": attempt(write, "/etc/passwd"),
                "create in /": attempt(write, "/new", os.O_WRONLY | os.O_CREAT),
                "create in /etc": attempt(write, "/etc/new", os.O_WRONLY | os.O_CREAT),
                "create in /usr": attempt(write, "/usr/new", os.O_WRONLY | os.O_CREAT),
                "create in /dev": attempt(write, "/dev/new", os.O_WRONLY | os.O_CREAT),
                "mkdir in /": attempt(os.mkdir, "/new"),
                "chmod /tmp": attempt(os.chmod, "/tmp", 0o777),
                "create in /tmp": attempt(write, "/tmp/mine", os.O_WRONLY | os.O_CREAT),
                "write /dev/null": attempt(write, "/dev/null"),
                "read b's secret by host path": attempt(open, secret_host_path),
                "parent of / is /": os.listdir("/..") == os.listdir("/"),
                "signal b's process": attempt(os.kill, victim, signal.SIGKILL),
                "probe b's process": attempt(os.kill, victim, 0),
                "who": [os.getuid(), os.geteuid(), os.getgid(), os.getgroups()],
            }
        got = as_uid(UID_A, inside_a, chroot=a.path)
        if a.dev_missing_reason:
            got["write /dev/null"] = "ok"
        assert got == {
            "write image file": "EACCES", "append image file": "EACCES",
            "truncate image file": "EACCES", "chmod image file": "EPERM",
            "unlink image file": "EACCES", "rename image file": "EACCES",
            "write /etc/passwd": "EACCES", "create in /": "EACCES",
            "create in /etc": "EACCES", "create in /usr": "EACCES",
            "create in /dev": "EACCES", "mkdir in /": "EACCES", "chmod /tmp": "EPERM",
            "create in /tmp": "ok", "write /dev/null": "ok",
            "read b's secret by host path": "ENOENT",      # not in a's world at all
            "parent of / is /": True,
            "signal b's process": "EPERM", "probe b's process": "EPERM",
            "who": [UID_A, UID_A, UID_A, []],
        }
        assert os.waitpid(victim, os.WNOHANG) == (0, 0)      # b's process lives on

        # Second line of defence, from the host side as a's uid: b's secret
        # is mode 0644 and its /tmp is 1777, yet unreachable, because b's
        # pod dir is root's, 0700.
        assert stat.S_IMODE(os.lstat(pods / "b").st_mode) == 0o700
        assert as_uid(UID_A, lambda: [attempt(open, secret_host_path),
                                      attempt(os.listdir, str(pods / "b"))]) \
            == ["EACCES", "EACCES"]
    finally:
        os.kill(victim, signal.SIGKILL)
        os.waitpid(victim, 0)

    st = os.lstat(image / "bin" / "tool")
    assert (image / "bin" / "tool").read_bytes() == TOOL
    assert (st.st_mode, st.st_uid, st.st_mtime_ns, st.st_nlink) == \
        (tool_before[0].st_mode, 0, tool_before[0].st_mtime_ns, 3)
    assert (Path(a.path) / "tmp" / "mine").exists()


def test_pod_user_is_who_the_pod_is(image, public_tmp):
    pr = build(image, public_tmp / "a", user_name="app")

    def lookup():
        # The chroot's /etc/passwd, read as a pod's libc would.
        with open("/etc/passwd") as f:
            users = {ln.split(":")[2]: ln.split(":")[0] for ln in f}
        return [users.get(str(os.getuid())), os.access("/tmp", os.W_OK),
                os.access("/bin/tool", os.X_OK), os.access("/bin/tool", os.W_OK)]
    assert as_uid(UID_A, lookup, chroot=pr.path) == ["app", True, True, False]


def test_unremovable_leftover_is_reported_and_others_swept(public_tmp, caplog):
    """The stand-in for a file a pod made immutable (chflags uchg on OpenBSD):
    chattr +i here.  remove() says which pod dir; sweep() goes on."""
    pods = public_tmp / "pods"
    stuck = pods / "stuck" / "root" / "tmp"
    stuck.mkdir(parents=True)
    (stuck / "f").write_text("x")
    (pods / "gone" / "root").mkdir(parents=True)
    if subprocess.run(["chattr", "+i", str(stuck / "f")], capture_output=True).returncode:
        pytest.skip("cannot make a file immutable here")
    try:
        with pytest.raises(PodRootError, match=f"{pods / 'stuck'}: cannot remove"):
            podroot.remove(str(pods / "stuck"))
        with caplog.at_level("WARNING", logger="pufflet.priv.podroot"):
            assert podroot.sweep(str(pods), set()) == ["gone"]
        assert "stuck: cannot remove leftover pod dir" in caplog.text
    finally:
        subprocess.run(["chattr", "-i", str(stuck / "f")], check=True)
    assert podroot.sweep(str(pods), set()) == ["stuck"]
