"""puffletctl on a real store: build, import each archive format, list,
tag, remove; and a host-files image that really runs in a chroot."""

import contextlib
import gzip
import io
import json
import os
import subprocess
import tarfile

import pytest

from imagetools import host_libs, image_blobs, layer
from pufflet import ctl
from pufflet.images import oci
from pufflet.priv.imagestore import Store


@pytest.fixture
def conf(tmp_path):
    p = tmp_path / "pufflet.conf"
    p.write_text(f'state directory "{tmp_path / "state"}"\n')
    return str(p)


def run(conf, *args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = ctl.main(["-f", conf, *args])
    return rc, out.getvalue(), err.getvalue()


def store_of(tmp_path):
    return Store(str(tmp_path / "state" / "images"))


def leftovers(tmp_path):
    s = store_of(tmp_path)
    images = {d[7:] for d in json.load(open(s.refs_path))["images"]}
    return os.listdir(s.incoming) + [n for n in os.listdir(s.unpacked) if n not in images]


def test_usage(conf):
    assert run(conf)[0] == 1
    rc, out, err = run(conf, "image", "frobnicate")
    assert rc == 1 and err.startswith("usage: puffletctl")
    assert run(conf, "image", "build", "somedir")[0] == 1      # no -t
    rc, _, err = run(conf, "image", "rm", "nothere")
    assert rc == 1 and "image nothere: not in the store" in err


def test_build_dir_list_tag_rm(conf, tmp_path):
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin/tool").write_text("#!/bin/sh\n")
    (src / "bin/tool").chmod(0o4777)
    (src / "etc").mkdir()
    (src / "etc/conf").write_text("x")
    (src / "etc/conf").chmod(0o666)
    os.symlink("conf", src / "etc/link")
    os.link(src / "etc/conf", src / "etc/hard")
    rc, out, err = run(conf, "image", "build", "-t", "local/app:1", "--cmd", "/bin/tool -v",
                       "--env", "A=b", "--workdir", "/etc", "--user", "1000",
                       "--entrypoint", '["/bin/tool"]', str(src))
    assert rc == 0, err
    img = store_of(tmp_path).get("local/app:1")
    assert img.config.cmd == ("/bin/tool", "-v") and img.config.entrypoint == ("/bin/tool",)
    assert img.config.env == ("A=b",) and img.config.working_dir == "/etc"
    assert img.config.user == "1000"
    r = img.rootfs
    assert os.stat(f"{r}/bin/tool").st_mode & 0o7777 == 0o755
    assert os.stat(f"{r}/etc/conf").st_mode & 0o7777 == 0o644
    assert os.readlink(f"{r}/etc/link") == "conf"
    assert os.stat(f"{r}/etc/hard").st_ino == os.stat(f"{r}/etc/conf").st_ino

    assert run(conf, "image", "tag", "local/app:1", "local/app:2")[0] == 0
    rc, out, _ = run(conf, "image", "list")
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "DIGEST", "SIZE"]
    assert [l.split()[0] for l in lines[1:]] == ["docker.io/local/app:1", "docker.io/local/app:2"]
    assert lines[1].split()[1] == img.digest[:19]
    assert run(conf, "image", "rm", "local/app:1", "local/app:2")[0] == 0
    assert run(conf, "image", "list")[1].splitlines()[1:] == []
    assert leftovers(tmp_path) == []



def test_build_from_host_files_runs_in_chroot(conf, tmp_path):
    files = ["/bin/sh", *host_libs("/bin/sh")]
    listfile = tmp_path / "files"
    listfile.write_text("# a shell\n" + "\n".join(files[1:]) + "\n")
    rc, out, err = run(conf, "image", "build", "-t", "shell", "--file", files[0],
                       "--files", str(listfile), "--cmd", "/bin/sh")
    assert rc == 0, err
    img = store_of(tmp_path).get("shell")
    r = subprocess.run(["chroot", img.rootfs, "/bin/sh", "-c", "echo ok from $0"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "ok from /bin/sh\n", r.stderr
    # The image holds exactly what was asked, no more than a handful of files.
    count = sum(len(f) for _, _, f in os.walk(img.rootfs))
    assert count <= 6


def _oci_layout(root, images, index_platforms=False, name=None):
    """An OCI layout with the given images (list of (layers, os_arch))."""
    (root / "blobs/sha256").mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    entries = []
    for layers, os_arch in images:
        man, mt, blobs = image_blobs(layers, os_arch=os_arch)
        blobs[oci.digest_of(man)] = man
        for d, b in blobs.items():
            (root / "blobs/sha256" / d[7:]).write_bytes(b)
        entries.append({"mediaType": mt, "digest": oci.digest_of(man), "size": len(man),
                        "platform": {"os": os_arch[0], "architecture": os_arch[1]}})
    if index_platforms:
        top = entries
    else:
        idx = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX,
                          "manifests": entries}).encode()
        (root / "blobs/sha256" / oci.digest_of(idx)[7:]).write_bytes(idx)
        top = [{"mediaType": oci.OCI_INDEX, "digest": oci.digest_of(idx), "size": len(idx)}]
        if name:
            top[0]["annotations"] = {"io.containerd.image.name": name,
                                     "org.opencontainers.image.ref.name": "1"}
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": top}))


def _tar_dir(root, out):
    with tarfile.open(out, "w") as tf:
        for n in sorted(os.listdir(root)):
            tf.add(root / n, n)


MULTI = [([layer(("file", "os", "openbsd"))], ("openbsd", "amd64")),
         ([layer(("file", "os", "linux"))], ("linux", "amd64"))]


def test_import_oci_layout_picks_platform(conf, tmp_path):
    lay = tmp_path / "layout"
    _oci_layout(lay, MULTI, name="example.com/multi:1")
    rc, out, err = run(conf, "image", "import", "-p", "openbsd/amd64", str(lay))
    assert rc == 0, err
    img = store_of(tmp_path).get("example.com/multi:1")
    assert open(os.path.join(img.rootfs, "os")).read() == "openbsd"
    assert img.os == "openbsd"

    rc, _, err = run(conf, "image", "import", "-p", "openbsd/arm64", str(lay))
    assert rc == 1
    assert "no image for openbsd/arm64 in the index; it offers: openbsd/amd64, linux/amd64" in err


def test_import_oci_archive_with_name(conf, tmp_path):
    lay = tmp_path / "layout"
    _oci_layout(lay, MULTI, index_platforms=True)
    _tar_dir(lay, tmp_path / "img.tar")
    rc, _, err = run(conf, "image", "import", "-p", "linux/amd64", str(tmp_path / "img.tar"))
    assert rc == 1 and "give NAME" in err
    rc, _, err = run(conf, "image", "import", "-p", "linux/amd64", str(tmp_path / "img.tar"),
                     "mine:latest")
    assert rc == 0, err
    img = store_of(tmp_path).get("mine")
    assert open(os.path.join(img.rootfs, "os")).read() == "linux"


def test_import_docker_save(conf, tmp_path):
    l1 = layer(("dir", "etc"), ("file", "etc/a", "1"), compress=False)
    l2 = layer(("file", "etc/.wh.a", ""), ("file", "etc/b", "2"), compress=False)
    cfg = json.dumps({"os": "linux", "architecture": "amd64",
                      "config": {"Cmd": ["/bin/true"]},
                      "rootfs": {"type": "layers",
                                 "diff_ids": [oci.digest_of(l1), oci.digest_of(l2)]}}).encode()
    save = tmp_path / "save.tar"
    with tarfile.open(save, "w") as tf:
        def add(name, data=None, link=None):
            ti = tarfile.TarInfo(name)
            if link:
                ti.type, ti.linkname = tarfile.SYMTYPE, link
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        add("c0ffee.json", cfg)
        add("aaa/layer.tar", l1)
        add("bbb/layer.tar", link="../aaa/layer.tar")   # docker links duplicates
        add("ccc/layer.tar", l2)
        add("manifest.json", json.dumps([{
            "Config": "c0ffee.json", "RepoTags": ["app:v1", "app:latest"],
            "Layers": ["bbb/layer.tar", "ccc/layer.tar"]}]).encode())
    rc, out, err = run(conf, "-f", conf, "image", "import", "-p", "linux/amd64", str(save))
    assert rc == 0, err
    img = store_of(tmp_path).get("app:v1")
    assert img.names == ("docker.io/library/app:latest", "docker.io/library/app:v1")
    assert os.listdir(os.path.join(img.rootfs, "etc")) == ["b"]
    assert img.config.cmd == ("/bin/true",)


def test_import_refuses_hostile_layer_and_lying_blob(conf, tmp_path):
    lay = tmp_path / "layout"
    _oci_layout(lay, [([layer(("file", "../../escape", "x"))], ("linux", "amd64"))],
                name="evil:1")
    rc, _, err = run(conf, "image", "import", "-p", "linux/amd64", str(lay))
    assert rc == 1 and "'..' component" in err
    assert not (tmp_path / "escape").exists() and not os.path.exists("/escape")
    assert leftovers(tmp_path) == [] and store_of(tmp_path).list() == []

    lay2 = tmp_path / "layout2"
    good = layer(("file", "f", "x"))
    _oci_layout(lay2, [([good], ("linux", "amd64"))], name="liar:1")
    (lay2 / "blobs/sha256" / oci.digest_of(good)[7:]).write_bytes(
        gzip.compress(b"\0" * (len(good) - 20))[:len(good)].ljust(len(good), b"\0"))
    rc, _, err = run(conf, "image", "import", "-p", "linux/amd64", str(lay2))
    assert rc == 1 and "digest mismatch" in err
    assert leftovers(tmp_path) == [] and store_of(tmp_path).list() == []


def test_import_wrong_platform(conf, tmp_path):
    lay = tmp_path / "layout"
    _oci_layout(lay, [([layer(("file", "f", "x"))], ("openbsd", "amd64"))],
                index_platforms=True)
    rc, _, err = run(conf, "image", "import", "-p", "linux/arm64", str(lay), "x")
    assert rc == 1 and "x is for openbsd/amd64, this node wants linux/arm64" in err


def test_push_then_pull_round_trip(tmp_path):
    """puffletctl push to a real docker-registry, then pull into a fresh store."""
    from registry import Registry
    reg = Registry(tmp_path / "registry")
    try:
        def conf_for(state):
            p = tmp_path / f"{state}.conf"
            p.write_text(f'state directory "{tmp_path / state}"\n'
                         f'insecure registry "{reg.host}"\n')
            return str(p)
        a, b = conf_for("a"), conf_for("b")
        src = tmp_path / "src"
        src.mkdir()
        (src / "hello").write_text("world")
        ref = f"{reg.host}/test/hello:1"
        assert run(a, "image", "build", "-t", "hello", "--cmd", "/hello", str(src))[0] == 0
        rc, out, err = run(a, "image", "push", "hello", ref)
        assert rc == 0, err
        rc, out, err = run(b, "image", "pull", ref)
        assert rc == 0, err
        s = Store(str(tmp_path / "b" / "images"))
        img = s.get(ref)
        assert open(os.path.join(img.rootfs, "hello")).read() == "world"
        assert img.digest == Store(str(tmp_path / "a" / "images")).get("hello").digest
    finally:
        reg.stop()
