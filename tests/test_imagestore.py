"""The image store on a real directory: blobs, images, names, GC."""

import json
import os
import stat

import pytest

from imagetools import add_image, image_blobs, layer, put_blob
from pufflet.images import oci
from pufflet.images.oci import ImageError
from pufflet.priv.imagestore import Store


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "images"))
    yield s
    s.close()


def leftovers(store):
    """Temp dirs, partial downloads, unpacked trees that are not images."""
    out = [os.path.join("incoming", n) for n in os.listdir(store.incoming)]
    images = {d[7:] for d in json.load(open(store.refs_path))["images"]}
    out += [n for n in os.listdir(store.unpacked) if n not in images]
    return out


def test_layout(store):
    for d in (store.root, store.blobs, store.incoming, store.unpacked):
        st = os.stat(d)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == 0
    assert os.path.exists(store.refs_path)


def test_blob_resume_and_commit(store):
    data = os.urandom(10000)
    digest = oci.digest_of(data)
    fd, have = store.open_blob(digest, len(data))
    assert have == 0
    os.write(fd, data[:4000])
    os.close(fd)
    fd, have = store.open_blob(digest, len(data))
    assert have == 4000
    os.write(fd, data[have:])
    os.close(fd)
    store.commit_blob(digest, len(data))
    assert store.has_blob(digest)
    assert stat.S_IMODE(os.stat(store._blob(digest)).st_mode) == 0o444
    assert store.read_blob(digest, 10000) == data
    with pytest.raises(ImageError, match="more than the 100 allowed"):
        store.read_blob(digest, 100)
    assert leftovers(store) == []


def test_one_writer_per_blob(store):
    digest = oci.digest_of(b"x")
    fd, _ = store.open_blob(digest, 1)
    with pytest.raises(ImageError, match="already in progress"):
        store.open_blob(digest, 1)
    os.close(fd)
    fd, _ = store.open_blob(digest, 1)
    os.close(fd)


def test_truncated_blob(store):
    data = b"a" * 1000
    digest = oci.digest_of(data)
    fd, _ = store.open_blob(digest, len(data))
    os.write(fd, data[:999])
    os.close(fd)
    with pytest.raises(ImageError, match=f"blob {digest}: truncated: 999 bytes, expected 1000"):
        store.commit_blob(digest, len(data))
    assert not store.has_blob(digest) and leftovers(store) == []


def test_blob_digest_lie(store):
    digest = oci.digest_of(b"what was promised")
    fd, _ = store.open_blob(digest, 5)
    os.write(fd, b"other")
    os.close(fd)
    with pytest.raises(ImageError, match="digest mismatch: content hashes to sha256:"):
        store.commit_blob(digest, 5)
    assert not store.has_blob(digest) and leftovers(store) == []


@pytest.mark.parametrize("digest", ["sha256:../../etc/passwd", "sha512:" + "a" * 128,
                                    "sha256:" + "A" * 64, "md5:x"])
def test_bad_digests(store, digest):
    with pytest.raises(ImageError, match="invalid digest"):
        store.open_blob(digest, 1)


def test_blob_size_cap(tmp_path):
    s = Store(str(tmp_path / "i"), max_blob=1000)
    with pytest.raises(ImageError, match="more than the 1000 allowed"):
        s.open_blob(oci.digest_of(b""), 1001)
    assert os.listdir(s.incoming) == []


def test_put_manifest_and_config(store):
    cfg = {"Entrypoint": ["/bin/ksh"], "Cmd": ["-c", "echo hi"], "Env": ["PATH=/bin"],
           "WorkingDir": "/root", "User": "nobody", "StopSignal": "SIGINT",
           "ExposedPorts": {"80/tcp": {}}, "Labels": {"a": "b"}}
    img = add_image(store, "example.com/shell:1", [layer(("file", "bin/ksh", "#!", 0o755))],
                    config=cfg, os_arch=("openbsd", "amd64"))
    assert img.names == ("example.com/shell:1",)
    assert (img.os, img.architecture) == ("openbsd", "amd64")
    c = img.config
    assert c.entrypoint == ("/bin/ksh",) and c.cmd == ("-c", "echo hi")
    assert c.env == ("PATH=/bin",) and c.working_dir == "/root" and c.user == "nobody"
    assert c.stop_signal == "SIGINT" and c.exposed_ports == ("80/tcp",)
    assert c.labels == (("a", "b"),)
    assert open(os.path.join(img.rootfs, "bin/ksh")).read() == "#!"
    assert store.get("example.com/shell:1") == img
    assert store.get(img.digest) == img
    assert store.get("example.com/shell@" + img.digest) == img
    assert store.get("example.com/shell:2") is None
    assert store.list() == [img]
    assert img.size > 0


def test_docker_media_types_and_normalised_names(store):
    img = add_image(store, "busybox", [layer(("file", "x", "y"))], docker=True)
    assert img.names == ("docker.io/library/busybox:latest",)
    assert store.get("docker.io/library/busybox") == img
    assert store.get("index.docker.io/library/busybox:latest") == img


def test_same_image_unpacked_once(store):
    l = [layer(("file", "x", "y"))]
    a = add_image(store, "a", l)
    mark = os.path.join(a.rootfs, "x")
    ino = os.stat(mark).st_ino
    b = add_image(store, "b", l)
    assert a.digest == b.digest and os.stat(mark).st_ino == ino
    assert b.names == ("docker.io/library/a:latest", "docker.io/library/b:latest")


def test_missing_blob(store):
    man, mt, blobs = image_blobs([layer(("file", "x", "y"))])
    with pytest.raises(ImageError, match="is not in the store"):
        store.put_manifest("x", man, mt)


def test_manifest_bomb_huge_layer_refused_before_reading(store):
    huge = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
            "config": {"mediaType": oci.OCI_CONFIG, "digest": oci.digest_of(b"{}"), "size": 2},
            "layers": [{"mediaType": oci.OCI_LAYER_GZIP, "digest": oci.digest_of(b"l"),
                        "size": 1 << 50}]}
    with pytest.raises(ImageError, match="declares 1125899906842624 bytes"):
        store.put_manifest("x", json.dumps(huge).encode(), oci.OCI_MANIFEST)
    many = dict(huge, layers=[huge["layers"][0] | {"size": 1}] * 1000)
    with pytest.raises(ImageError, match="1000 layers"):
        store.put_manifest("x", json.dumps(many).encode(), oci.OCI_MANIFEST)
    with pytest.raises(ImageError, match="more than the 4194304 allowed"):
        store.put_manifest("x", b" " * (5 << 20), oci.OCI_MANIFEST)


def test_manifest_digest_must_match_name(store):
    man, mt, blobs = image_blobs([layer(("file", "x", "y"))])
    for b in blobs.values():
        put_blob(store, b)
    with pytest.raises(ImageError, match="manifest hashes to"):
        store.put_manifest("x@" + oci.digest_of(b"other"), man, mt)


def test_index_is_not_an_image(store):
    with pytest.raises(ImageError, match="is an index"):
        store.put_manifest("x", b"{}", oci.OCI_INDEX)


def test_tampered_layer_and_hostile_layer_leave_nothing(store):
    good = layer(("file", "x", "y"))
    man, mt, blobs = image_blobs([good])
    for b in blobs.values():
        put_blob(store, b)
    path = store._blob(oci.digest_of(good))
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:      # same size, other bytes
        f.seek(len(good) - 5)
        f.write(b"\0\0\0\0\0")
    with pytest.raises(ImageError, match="layer 0 .*digest mismatch|corrupt gzip"):
        store.put_manifest("x", man, mt)
    assert leftovers(store) == [] and store.list() == []

    with pytest.raises(ImageError, match=r"image evil: layer 1 \(sha256:\w+\): "
                                         r"entry 'a/passwd': path goes through symlink 'a'"):
        add_image(store, "evil", [layer(("sym", "a", "/etc")),
                                  layer(("file", "a/passwd", "root::0:0::/:/bin/sh"))])
    assert leftovers(store) == [] and store.list() == []


def test_tag_and_remove(store):
    img = add_image(store, "a:1", [layer(("file", "x", "y"))])
    other = add_image(store, "b:1", [layer(("file", "x", "z"))])
    store.tag("a:1", "registry.local/a:prod")
    assert store.get("registry.local/a:prod").digest == img.digest
    store.remove("a:1")                         # another name is left: untag only
    assert store.get("registry.local/a:prod").names == ("registry.local/a:prod",)
    with pytest.raises(ImageError, match="in use"):
        store.remove("registry.local/a:prod", in_use={img.digest})
    store.remove("registry.local/a:prod", in_use={other.digest})
    assert store.get(img.digest) is None
    assert not os.path.exists(img.rootfs)
    # Its own blobs are gone, the other image's stay.
    assert store.has_blob(other.digest)
    names = set(os.listdir(store.blobs))
    assert img.digest[7:] not in names
    with pytest.raises(ImageError, match="not in the store"):
        store.remove("a:1")
    store.remove(other.digest)
    assert os.listdir(store.blobs) == [] and leftovers(store) == []


def test_shared_layer_survives_removal(store):
    shared = layer(("file", "lib", "shared"))
    a = add_image(store, "a", [shared])
    b = add_image(store, "b", [shared, layer(("file", "app", "b"))])
    store.remove("a")
    assert store.has_blob(oci.digest_of(shared))
    assert os.path.exists(os.path.join(b.rootfs, "lib"))
    assert store.get(a.digest) is None


def test_gc_lru_and_in_use(store):
    imgs = [add_image(store, f"i{n}", [layer(("file", "f", str(n)))]) for n in range(4)]
    for n, img in enumerate(imgs):
        store.touch(img.digest, now=1000.0 + n)
    now = 5000.0
    # Not above the high threshold: nothing happens.
    assert store.gc(100, 0, set(), now=now) == []
    # Always above 0% and never below 0%: every unused image goes, oldest first.
    removed = store.gc(0, 0, {imgs[1].digest, "i3"}, now=now)
    assert removed == [imgs[0].digest, imgs[2].digest]
    assert [i.digest for i in store.list()] == [imgs[1].digest, imgs[3].digest]
    # Freshly used images are spared (kubelet's minimum age).
    store.touch("i1", now=now - 10)
    assert store.gc(0, 0, set(), now=now) == [imgs[3].digest]


def test_gc_stops_below_low(store):
    used, total = store.usage()
    assert 0 < used <= total
    pct = used * 100 / total
    for n in range(3):
        add_image(store, f"i{n}", [layer(("file", "f", str(n)))])
    # Above high but already below low: the check happens before each
    # removal, so nothing goes.
    assert store.gc(0, int(pct) + 2, set(), now=1e12) == []
    assert len(store.gc(0, 0, set(), now=1e12)) == 3


def test_sweeps_temp_dirs_of_dead_writers(tmp_path):
    s = Store(str(tmp_path / "i"))
    os.mkdir(os.path.join(s.unpacked, ".tmp-999999999-abc"))
    os.mkdir(os.path.join(s.unpacked, f".tmp-{os.getpid()}-abc"))
    s.close()
    s = Store(str(tmp_path / "i"))
    assert os.listdir(s.unpacked) == [f".tmp-{os.getpid()}-abc"]
