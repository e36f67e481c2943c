"""The unpacker against real tar layers, friendly and hostile."""

import gzip
import io
import os
import stat
import tarfile
import zlib

import pytest

from imagetools import layer
from pufflet.images import oci
from pufflet.images.oci import ImageError
from pufflet.priv import unpack


def run(tmp_path, *layers, limits=unpack.Limits(), media=oci.OCI_LAYER_GZIP):
    dest = tmp_path / "rootfs"
    ls = [unpack.Layer(io.BytesIO(l), media, oci.digest_of(l)) for l in layers]
    unpack.unpack(ls, str(dest), limits)
    return dest


def refused(tmp_path, *layers, match, **kw):
    outside = set(os.listdir(tmp_path))
    with pytest.raises(ImageError, match=match):
        run(tmp_path, *layers, **kw)
    # Nothing left behind: not even the destination.
    assert set(os.listdir(tmp_path)) == outside
    return True


def tree(root):
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = os.lstat(p)
    return out


def test_plain_and_gzip_layers(tmp_path):
    l = layer(("dir", "etc"), ("file", "etc/motd", "hi\n"), compress=False)
    d = run(tmp_path, l, media=oci.DOCKER_LAYER)
    assert (d / "etc/motd").read_text() == "hi\n"


def test_whiteouts_and_opaque_dirs(tmp_path):
    lower = layer(("dir", "etc"), ("file", "etc/a", "a"), ("file", "etc/b", "b"),
                  ("dir", "var"), ("file", "var/old", "o"), ("dir", "var/sub"),
                  ("file", "var/sub/deep", "d"), ("dir", "gone"), ("file", "gone/x", "x"))
    upper = layer(("file", "etc/.wh.a", ""), ("file", "new", "n"),
                  ("dir", "var"), ("file", "var/fresh", "f"), ("file", "var/.wh..wh..opq", ""),
                  ("file", ".wh.gone", ""), ("file", "etc/.wh.missing", ""),
                  # A whiteout never hides what its own layer adds.
                  ("file", "mine", "m"), ("file", ".wh.mine", ""))
    d = run(tmp_path, lower, upper)
    names = set(tree(d))
    assert names == {"etc", "etc/b", "var", "var/fresh", "new", "mine"}
    assert not any(".wh." in n for n in names)


def test_opaque_keeps_same_layer_subtree(tmp_path):
    lower = layer(("dir", "d"), ("dir", "d/s"), ("file", "d/s/old", "o"))
    upper = layer(("dir", "d"), ("dir", "d/s"), ("file", "d/s/new", "n"),
                  ("file", "d/.wh..wh..opq", ""))
    assert set(tree(run(tmp_path, lower, upper))) == {"d", "d/s", "d/s/new"}


def test_later_layer_replaces_types(tmp_path):
    lower = layer(("dir", "x"), ("file", "x/f", "1"), ("file", "y", "2"))
    upper = layer(("file", "x", "now a file"), ("dir", "y"), ("file", "y/z", "3"))
    d = run(tmp_path, lower, upper)
    assert (d / "x").read_text() == "now a file"
    assert (d / "y/z").read_text() == "3"


def test_modes_and_ownership(tmp_path):
    d = run(tmp_path, layer(
        ("dir", "w", 0o777), ("dir", "p", 0o700), ("file", "w/suid", "x", 0o4755),
        ("file", "w/sgid", "x", 0o2775), ("file", "w/world", "x", 0o666),
        ("file", "w/exec", "x", 0o777), ("file", "w/private", "x", 0o600),
        ("dir", "t", 0o1777), ("sym", "w/link", "/etc/passwd"),
        ("link", "w/hard", "w/exec")))
    modes = {n: stat.S_IMODE(st.st_mode) for n, st in tree(d).items() if n != "w/link"}
    assert modes == {"w": 0o755, "p": 0o700, "w/suid": 0o755, "w/sgid": 0o755,
                     "w/world": 0o644, "w/exec": 0o755, "w/private": 0o600, "t": 0o755,
                     "w/hard": 0o755}
    for st in tree(d).values():
        assert (st.st_uid, st.st_gid) == (0, 0)
    assert os.readlink(d / "w/link") == "/etc/passwd"
    assert os.stat(d / "w/hard").st_ino == os.stat(d / "w/exec").st_ino
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o755


def test_setuid_stripped_under_restrictive_umask(tmp_path):
    old = os.umask(0o077)
    try:
        d = run(tmp_path, layer(("file", "f", "x", 0o6755), ("dir", "d", 0o755)))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(d / "f").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(d / "d").st_mode) == 0o755


@pytest.mark.parametrize("entries,match", [
    ([("file", "../x", "x")], r"'\.\.' component"),
    ([("file", "a/../../x", "x")], r"'\.\.' component"),
    ([("file", "/etc/x", "x")], "absolute name"),
    ([("sym", "a", "/etc"), ("file", "a/passwd", "x")], "through symlink 'a'"),
    ([("sym", "a", "../../.."), ("dir", "a/b")], "through symlink 'a'"),
    ([("file", "f", "x"), ("file", "f/g", "x")], "not a directory"),
    ([("link", "h", "/etc/passwd")], "absolute hard link target"),
    ([("link", "h", "../outside")], r"'\.\.' component"),
    ([("link", "h", "missing")], "hard link to missing file"),
    ([("sym", "s", "/etc/passwd"), ("link", "h", "s")], "not a regular file"),
    ([("dir", "d"), ("link", "h", "d")], "not a regular file"),
    ([("sym", "s", "/etc"), ("link", "h", "s/passwd")], "through symlink 's'"),
    ([("fifo", "p")], "fifo: refused"),
    ([("chr", "null")], "character device: refused"),
    ([("blk", "sda")], "block device: refused"),
], ids=["dotdot", "dotdot-nested", "absolute", "symlink-escape", "symlink-dir-escape",
        "file-as-dir", "hardlink-absolute", "hardlink-dotdot", "hardlink-missing",
        "hardlink-to-symlink", "hardlink-to-dir", "hardlink-through-symlink", "fifo",
        "chardev", "blockdev"])
def test_hostile_entries_refused(tmp_path, entries, match):
    assert refused(tmp_path, layer(("dir", "ok"), ("file", "ok/f", "x"), *entries),
                   match=match)
    assert not os.path.exists("/outside")


def test_symlink_escape_across_layers(tmp_path):
    assert refused(tmp_path, layer(("sym", "etc", "/etc")), layer(("file", "etc/passwd", "x")),
                   match="layer 1 .*through symlink 'etc'")


def test_digest_lie(tmp_path):
    l = layer(("file", "f", "x"))
    other = layer(("file", "f", "y"))
    ls = [unpack.Layer(io.BytesIO(l), oci.OCI_LAYER_GZIP, oci.digest_of(other))]
    with pytest.raises(ImageError, match="digest mismatch"):
        unpack.unpack(ls, str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()


def test_too_many_entries(tmp_path):
    l = layer(*[("file", f"f{i}", "") for i in range(20)])
    assert refused(tmp_path, l, match="more than 10 entries",
                   limits=unpack.Limits(max_entries=10))


def test_gzip_bomb_stopped_at_cap(tmp_path):
    ti = tarfile.TarInfo("zeros")
    ti.size = 256 << 20
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [z.compress(ti.tobuf(format=tarfile.PAX_FORMAT))]
    zeros = bytes(1 << 20)
    parts += [z.compress(zeros) for _ in range(ti.size >> 20)]
    bomb = b"".join(parts) + z.compress(bytes(1024)) + z.flush()
    assert len(bomb) < 1_000_000
    assert refused(tmp_path, bomb, match="expands beyond",
                   limits=unpack.Limits(max_bytes=8 << 20))


def test_huge_pax_header_refused_before_reading(tmp_path):
    hdr = tarfile.TarInfo("././@PaxHeader")
    hdr.type, hdr.size = tarfile.XHDTYPE, 1 << 30
    l = gzip.compress(hdr.tobuf(format=tarfile.USTAR_FORMAT) + b"x" * 1024)
    assert refused(tmp_path, l, match="extended header")


def test_long_names_bounded(tmp_path):
    assert refused(tmp_path, layer(("file", "a" * 300, "x")), match="longer than 255")
    assert refused(tmp_path, layer(("file", "a/" * 2100 + "x", "x")), match="longer than 4096")


def test_zstd_without_module(tmp_path):
    try:
        import zstandard  # noqa: F401
        pytest.skip("zstandard is installed")
    except ImportError:
        pass
    assert refused(tmp_path, b"\x28\xb5\x2f\xfd", media=oci.OCI_LAYER_ZSTD,
                   match="unsupported layer media type .*zstd")


def test_not_a_tar(tmp_path):
    assert refused(tmp_path, gzip.compress(b"hello" * 200), match="not a valid tar")
    assert refused(tmp_path, b"\x1f\x8b\x08garbage", match="gzip")
