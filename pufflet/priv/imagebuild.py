"""Build single-layer images from a directory or from host files.

On OpenBSD /bin and /sbin are static, so "/bin/ksh /bin/ls" is a working
shell image; a dynamic program needs its libraries and /usr/libexec/ld.so
listed too.  Host files keep their paths; a symlink on the way (Debian's
/bin -> usr/bin) goes in as a symlink, with what it points to, so the
image looks like the host.

Entries are written owned by root with the unpacker's mode rules applied
already, and the image then goes through put_manifest like any other: the
build never writes into an image root itself.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import tarfile
import time

from pufflet.images import oci
from pufflet.images.oci import ImageConfig, ImageError, Platform
from pufflet.priv.imagestore import Image, Store
from pufflet.priv.unpack import file_mode

MAX_LINKS = 40


class _Hashing:
    """Between tarfile and gzip: hashes the uncompressed layer (diff_id)."""

    def __init__(self, f) -> None:
        self.f = f
        self.hash = hashlib.sha256()

    def write(self, b) -> int:
        self.hash.update(b)
        return self.f.write(b)


class Layer:
    """The entries of a layer being assembled, by path in the image."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, str]] = {}   # image path -> (kind, host path)

    def add_tree(self, top: str) -> None:
        """Everything under `top` at the root of the image."""
        top = os.path.abspath(top)
        if not os.path.isdir(top):
            raise ImageError(f"{top}: not a directory")
        for dirpath, dirs, files in os.walk(top, onerror=_raise):
            dirs.sort()
            rel = os.path.relpath(dirpath, top)
            for n in sorted(dirs) + sorted(files):
                host = os.path.join(dirpath, n)
                self._add(os.path.normpath(os.path.join(rel, n)), host)

    def add_host_path(self, path: str, depth: int = 0, whole: bool = True) -> str:
        """`path` at its own place in the image, with the symlinks on the
        way; returns its symlink-free path.  A directory comes with its
        contents when `whole`, which a directory that is only on the way
        (a symlink's target) is not."""
        if depth > MAX_LINKS:
            raise ImageError(f"{path}: too many levels of symbolic links")
        if not path.startswith("/"):
            raise ImageError(f"{path}: host files must be absolute paths")
        cur = "/"
        parts = [p for p in os.path.normpath(path).split("/") if p]
        for i, comp in enumerate(parts):
            cand = os.path.join(cur, comp)
            try:
                st = os.lstat(cand)
            except OSError as e:
                raise ImageError(f"{cand}: {e.strerror}") from None
            last = i == len(parts) - 1
            if stat.S_ISLNK(st.st_mode):
                self._add(cand[1:], cand)
                target = os.path.normpath(os.path.join(cur, os.readlink(cand)))
                cur = self.add_host_path(target, depth + 1, whole and last)
            elif last and whole and stat.S_ISDIR(st.st_mode):
                self._add(cand[1:], cand)
                for dirpath, dirs, files in os.walk(cand, onerror=_raise):
                    for n in sorted(dirs) + sorted(files):
                        h = os.path.join(dirpath, n)
                        self._add(h[1:], h)
                cur = cand
            elif stat.S_ISDIR(st.st_mode):
                self._add(cand[1:], cand)
                cur = cand
            elif last:
                self._add(cand[1:], cand)
                cur = cand
            else:
                raise ImageError(f"{cand}: not a directory")
        return cur

    def _add(self, name: str, host: str) -> None:
        st = os.lstat(host)
        if stat.S_ISDIR(st.st_mode):
            kind = "dir"
        elif stat.S_ISREG(st.st_mode):
            kind = "file"
        elif stat.S_ISLNK(st.st_mode):
            kind = "sym"
        else:
            raise ImageError(f"{host}: only files, directories and symlinks go in an image")
        self.entries[name] = (kind, host)

    def write(self, out) -> str:
        """Write the layer as a tar to `out`; returns its diff_id."""
        h = _Hashing(out)
        seen: dict[tuple[int, int], str] = {}
        with tarfile.open(fileobj=h, mode="w|", format=tarfile.PAX_FORMAT) as tf:
            for name in sorted(self.entries, key=lambda n: n.split("/")):
                kind, host = self.entries[name]
                parent = os.path.dirname(name)
                if parent and parent not in self.entries:
                    self._implicit_dirs(tf, parent)
                st = os.lstat(host)
                ti = tarfile.TarInfo(name)
                ti.uid = ti.gid = 0
                ti.uname, ti.gname = "root", "wheel"
                ti.mtime = int(st.st_mtime)
                if kind == "dir":
                    ti.type, ti.mode = tarfile.DIRTYPE, file_mode(st.st_mode, True)
                    tf.addfile(ti)
                elif kind == "sym":
                    ti.type, ti.linkname, ti.mode = tarfile.SYMTYPE, os.readlink(host), 0o777
                    tf.addfile(ti)
                elif (st.st_dev, st.st_ino) in seen:
                    ti.type, ti.linkname = tarfile.LNKTYPE, seen[(st.st_dev, st.st_ino)]
                    ti.mode = file_mode(st.st_mode, False)
                    tf.addfile(ti)
                else:
                    fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                    with os.fdopen(fd, "rb") as f:
                        st = os.fstat(fd)
                        ti.size, ti.mode = st.st_size, file_mode(st.st_mode, False)
                        tf.addfile(ti, f)
                    if st.st_nlink > 1:
                        seen[(st.st_dev, st.st_ino)] = name
        return "sha256:" + h.hash.hexdigest()

    def _implicit_dirs(self, tf: tarfile.TarFile, path: str) -> None:
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d in self.entries:
                continue
            self.entries[d] = ("dir", "")
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
            ti.uname, ti.gname = "root", "wheel"
            tf.addfile(ti)


def _raise(e: OSError) -> None:
    raise ImageError(f"{e.filename}: {e.strerror}")


def build(store: Store, name: str, layer: Layer, cfg: ImageConfig, plat: Platform) -> Image:
    """Write `layer` gzipped into the store, add config and manifest, and
    let put_manifest check and unpack it."""
    if not layer.entries:
        raise ImageError("nothing to put in the image")
    with store.blob_writer() as w:
        with gzip.GzipFile(fileobj=w, mode="wb", compresslevel=6, mtime=0) as gz:
            diff_id = layer.write(gz)
        digest, size = w.commit()
    ldesc = oci.Descriptor(oci.OCI_LAYER_GZIP, digest, size)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cfg_b = oci.config_json(cfg, plat, [diff_id], created)
    cdesc = oci.Descriptor(oci.OCI_CONFIG, store.put_blob(cfg_b), len(cfg_b))
    man = oci.manifest_json(cdesc, [ldesc])
    return store.put_manifest(name, man, oci.OCI_MANIFEST)
