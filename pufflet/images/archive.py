"""Read image archives an admin brings: OCI layouts and `docker save` tars.

Three shapes, one reader interface: an OCI image layout directory
(oci-layout, index.json, blobs/), the same tarred (an "oci-archive"), and
`docker save` output (manifest.json, config JSON and layer tars; Docker 25
and later also write an OCI layout beside it, which is preferred).

Archive member names are data, not paths: they are normalised and looked
up, never used to create anything, so a hostile archive can at worst name
a blob it does not hold.  The blobs themselves go through the store's
checks and the unpacker like any pulled image.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
from typing import BinaryIO

from pufflet.images.oci import ImageError


def _norm(name: str) -> str:
    """A member name as a lookup key; names that leave the archive are refused."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts or name.startswith("/"):
        raise ImageError(f"archive path {name[:200]!r} leaves the archive")
    return "/".join(parts)


class Source:
    """Files of an archive or layout, by relative name."""

    def open(self, name: str) -> tuple[BinaryIO, int]:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def read(self, name: str, limit: int) -> bytes:
        f, size = self.open(name)
        with f:
            if size > limit:
                raise ImageError(f"{name}: {size} bytes, more than the {limit} allowed")
            return f.read(limit + 1)[:limit + 1]

    def close(self) -> None:
        pass


class DirSource(Source):
    def __init__(self, root: str) -> None:
        self.root = root

    def _path(self, name: str) -> str:
        return os.path.join(self.root, _norm(name))

    def exists(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def open(self, name: str) -> tuple[BinaryIO, int]:
        try:
            f = open(self._path(name), "rb")
        except FileNotFoundError:
            raise ImageError(f"{name}: not in {self.root}") from None
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            f.close()
            raise ImageError(f"{name}: not a regular file")
        return f, st.st_size


class TarSource(Source):
    MAX_HOPS = 8

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.tf = tarfile.open(path, "r:*")
            self.members = {}
            for m in self.tf.getmembers():
                try:
                    self.members[_norm(m.name)] = m
                except ImageError:
                    continue    # never looked up, so never used
        except tarfile.TarError as e:
            raise ImageError(f"{path}: not a tar archive: {e}") from None

    def close(self) -> None:
        self.tf.close()

    def _member(self, name: str) -> tarfile.TarInfo:
        key = _norm(name)
        for _ in range(self.MAX_HOPS):
            m = self.members.get(key)
            if m is None:
                raise ImageError(f"{name}: not in {self.path}")
            if m.isreg():
                return m
            if m.islnk():
                key = _norm(m.linkname)
            elif m.issym():
                # docker save links identical layers; follow inside the archive.
                key = _norm(posixpath.normpath(posixpath.join(posixpath.dirname(key), m.linkname)))
            else:
                raise ImageError(f"{name}: not a regular file in {self.path}")
        raise ImageError(f"{name}: too many symlinks in {self.path}")

    def exists(self, name: str) -> bool:
        try:
            self._member(name)
            return True
        except ImageError:
            return False

    def open(self, name: str) -> tuple[BinaryIO, int]:
        m = self._member(name)
        f = self.tf.extractfile(m)
        if f is None:
            raise ImageError(f"{name}: cannot read it from {self.path}")
        return f, m.size


def open_source(path: str) -> Source:
    if os.path.isdir(path):
        return DirSource(path)
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such file or directory")
    return TarSource(path)
