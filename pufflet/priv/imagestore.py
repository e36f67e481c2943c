"""The image store: verified blobs, images unpacked once, names, GC.

Layout under <state_dir>/images (root only, 0700):

    lock                 flock(2)ed by every writer: the daemon and puffletctl
    refs.json            names -> manifest digests, and each image's last use
    blobs/sha256/<hex>   verified blobs, read-only
    blobs/incoming/<hex> downloads in progress (resumable)
    unpacked/<hex>/      one per image manifest: rootfs/ and image.json

Blobs arrive from the agent, which faces the network and may be
compromised: the parent hands it an fd to append to, then hashes the file
itself before anything uses it.  Layers are hashed again as they are
unpacked, so a blob changed on disk after commit is caught too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from typing import Iterator

from pufflet.images import oci, reference
from pufflet.images.oci import ImageConfig, ImageError
from pufflet.priv import unpack

__all__ = ["Store", "Image", "ImageConfig", "ImageError"]

# kubelet's ImageMinimumGCAge: a just-pulled image is not collected before
# a pod had the chance to start from it.
GC_MIN_AGE = 120.0
# kubelet's imageGCHighThresholdPercent and imageGCLowThresholdPercent.
GC_HIGH_PCT = 85
GC_LOW_PCT = 80
_TMP = ".tmp-"


@dataclass(frozen=True)
class Image:
    digest: str
    names: tuple[str, ...]
    size: int
    rootfs: str
    config: ImageConfig
    os: str
    architecture: str
    variant: str | None
    last_used: float


class Store:
    def __init__(self, root: str, *, max_blob: int = oci.MAX_BLOB,
                 limits: unpack.Limits = unpack.Limits(),
                 gc_min_age: float = GC_MIN_AGE) -> None:
        self.root = root
        self.max_blob = max_blob
        self.limits = limits
        self.gc_min_age = gc_min_age
        self.blobs = os.path.join(root, "blobs", "sha256")
        self.incoming = os.path.join(root, "blobs", "incoming")
        self.unpacked = os.path.join(root, "unpacked")
        self.refs_path = os.path.join(root, "refs.json")
        for d in (root, os.path.dirname(self.blobs), self.blobs, self.incoming, self.unpacked):
            os.makedirs(d, mode=0o700, exist_ok=True)
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                raise ImageError(f"{d}: must be a directory owned by uid {os.geteuid()}")
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.chmod(d, 0o700)
        self._lockfd = os.open(os.path.join(root, "lock"),
                               os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self._depth = 0
        with self.lock():
            if not os.path.exists(self.refs_path):
                self._save({"names": {}, "images": {}})
            self._sweep()

    def close(self) -> None:
        os.close(self._lockfd)

    # -- locking and the refs file -------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive over every process using this store; re-entrant here."""
        if self._depth == 0:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                fcntl.flock(self._lockfd, fcntl.LOCK_UN)

    def _load(self) -> dict:
        with open(self.refs_path, "rb") as f:
            refs = json.load(f)
        refs.setdefault("names", {})
        refs.setdefault("images", {})
        return refs

    def _save(self, refs: dict) -> None:
        tmp = f"{self.refs_path}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with open(fd, "w") as f:
            json.dump(refs, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.refs_path)

    def _sweep(self) -> None:
        """Temp files and dirs of processes that died mid-way."""
        for d in (self.unpacked, self.incoming):
            for name in os.listdir(d):
                if not name.startswith(_TMP):
                    continue
                try:
                    os.kill(int(name[len(_TMP):].split("-")[0]), 0)
                    continue        # its writer is alive
                except (ValueError, ProcessLookupError):
                    pass
                except PermissionError:
                    continue
                path = os.path.join(d, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)

    # -- blobs -----------------------------------------------------------------

    def _blob(self, digest: str) -> str:
        return os.path.join(self.blobs, oci.check_digest(digest))

    def has_blob(self, digest: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self._blob(digest)).st_mode)
        except FileNotFoundError:
            return False

    def _check_size(self, digest: str, size: int) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"blob {digest}: invalid size {size!r}")
        if size > self.max_blob:
            raise ImageError(f"blob {digest}: {size} bytes is more than the "
                             f"{self.max_blob} allowed")

    def open_blob(self, digest: str, size: int) -> tuple[int, int]:
        """An fd to append the blob's bytes to, and how many are there
        already (the offset to resume from).  The caller owns the fd and
        must close it before commit_blob.  One writer per blob: the fd
        carries a flock held as long as any copy of it is open."""
        hexd = oci.check_digest(digest)
        self._check_size(digest, size)
        fd = os.open(os.path.join(self.incoming, hexd),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ImageError(f"blob {digest}: a download is already in progress") from None
            have = os.fstat(fd).st_size
            if have > size:
                os.ftruncate(fd, 0)
                have = 0
            return fd, have
        except BaseException:
            os.close(fd)
            raise

    def commit_blob(self, digest: str, size: int) -> None:
        """Verify a finished download and move it into the store."""
        hexd = oci.check_digest(digest)
        self._check_size(digest, size)
        path = os.path.join(self.incoming, hexd)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if self.has_blob(digest):
                return
            raise ImageError(f"blob {digest}: nothing was downloaded") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                os.unlink(path)
                what = "truncated" if st.st_size < size else "longer than declared"
                raise ImageError(f"blob {digest}: {what}: {st.st_size} bytes, "
                                 f"expected {size}")
            got = _hash_fd(fd)
            if got != digest:
                os.unlink(path)
                raise ImageError(f"blob {digest}: digest mismatch: content hashes to {got}")
            os.fchmod(fd, 0o444)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(path, self._blob(digest))

    def put_blob(self, data: bytes) -> str:
        """Store a small blob made here (a manifest or config); its digest."""
        digest = oci.digest_of(data)
        if not self.has_blob(digest):
            with self.blob_writer() as w:
                w.write(data)
        return digest

    def blob_writer(self) -> "BlobWriter":
        """A file to write a new blob of unknown digest into (built layers)."""
        return BlobWriter(self)

    def read_blob(self, digest: str, max_size: int) -> bytes:
        """A small blob, its size checked before reading, re-verified."""
        try:
            fd = os.open(self._blob(digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ImageError(f"blob {digest}: not in the store") from None
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(fd).st_size
            if size > max_size:
                raise ImageError(f"blob {digest}: {size} bytes, more than the "
                                 f"{max_size} allowed")
            data = f.read(max_size + 1)
        if len(data) > max_size or oci.digest_of(data) != digest:
            raise ImageError(f"blob {digest}: content in the store does not match its digest")
        return data

    # -- images ----------------------------------------------------------------

    def put_manifest(self, name: str, manifest_bytes: bytes, media_type: str) -> Image:
        """Verify an image manifest and its blobs, unpack it (once) and
        tag it `name` ("" for none; "repo@digest" must match)."""
        ref = self._parse(name) if name else None
        if len(manifest_bytes) > oci.MAX_MANIFEST:
            raise ImageError(f"manifest is {len(manifest_bytes)} bytes, more than the "
                             f"{oci.MAX_MANIFEST} allowed")
        m = oci.parse_manifest(manifest_bytes, media_type)
        digest = oci.digest_of(manifest_bytes)
        where = f"image {name or digest}"
        if ref is not None and ref.digest is not None and ref.digest != digest:
            raise ImageError(f"{where}: manifest hashes to {digest}")
        for d in (m.config, *m.layers):
            try:
                have = os.lstat(self._blob(d.digest)).st_size
            except FileNotFoundError:
                raise ImageError(f"{where}: blob {d.digest} is not in the store") from None
            if have != d.size:
                raise ImageError(f"{where}: blob {d.digest} is {have} bytes, "
                                 f"the manifest says {d.size}")
        try:
            info = oci.parse_config(self.read_blob(m.config.digest, oci.MAX_CONFIG))
        except ImageError as e:
            raise ImageError(f"{where}: config: {e}") from None
        if info.diff_ids and len(info.diff_ids) != len(m.layers):
            raise ImageError(f"{where}: config lists {len(info.diff_ids)} layers, "
                             f"the manifest {len(m.layers)}")
        final = os.path.join(self.unpacked, digest[7:])
        if not os.path.isdir(final):
            self._unpack(digest, m, info, manifest_bytes, where)
        with self.lock():
            for d in (m.config, *m.layers):
                # A concurrent remove may have taken a shared blob.
                if not self.has_blob(d.digest):
                    raise ImageError(f"{where}: blob {d.digest} was removed meanwhile; retry")
            self.put_blob(manifest_bytes)
            refs = self._load()
            refs["images"].setdefault(digest, {"last_used": time.time()})
            if ref is not None:
                refs["names"][_ref_name(ref, digest)] = digest
            self._save(refs)
            return self._image(digest, refs)

    def _unpack(self, digest: str, m: oci.Manifest, info: oci.ConfigInfo,
                manifest_bytes: bytes, where: str) -> None:
        tmp = os.path.join(self.unpacked,
                           f"{_TMP}{os.getpid()}-{digest[7:19]}-{secrets.token_hex(4)}")
        os.mkdir(tmp, 0o700)
        try:
            files = []
            try:
                layers = []
                for d in m.layers:
                    f = open(self._blob(d.digest), "rb", buffering=0)
                    files.append(f)
                    layers.append(unpack.Layer(f, d.media_type, d.digest))
                try:
                    stats = unpack.unpack(layers, os.path.join(tmp, "rootfs"), self.limits)
                except ImageError as e:
                    raise ImageError(f"{where}: {e}") from None
            finally:
                for f in files:
                    f.close()
            meta = {"digest": digest, "media_type": m.media_type,
                    "config_digest": m.config.digest,
                    "layers": [d.digest for d in m.layers],
                    "size": len(manifest_bytes) + m.config.size + sum(d.size for d in m.layers),
                    "unpacked_bytes": stats.bytes,
                    "os": info.platform.os, "architecture": info.platform.architecture,
                    "variant": info.platform.variant,
                    "config": info.config.to_json()}
            with open(os.path.join(tmp, "image.json"), "w") as f:
                json.dump(meta, f, indent=1, sort_keys=True)
            with self.lock():
                final = os.path.join(self.unpacked, digest[7:])
                if os.path.isdir(final):
                    shutil.rmtree(tmp)      # another process was quicker
                else:
                    os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _parse(self, name: str) -> reference.Reference:
        try:
            return reference.parse(name)
        except reference.ReferenceError as e:
            raise ImageError(str(e)) from None

    def _meta(self, digest: str) -> dict | None:
        try:
            with open(os.path.join(self.unpacked, digest[7:], "image.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def _image(self, digest: str, refs: dict) -> Image | None:
        meta = self._meta(digest)
        entry = refs["images"].get(digest)
        if meta is None or entry is None:
            return None
        c = meta["config"]
        cfg = ImageConfig(
            entrypoint=tuple(c["Entrypoint"]) if c.get("Entrypoint") is not None else None,
            cmd=tuple(c["Cmd"]) if c.get("Cmd") is not None else None,
            env=tuple(c.get("Env") or ()), working_dir=c.get("WorkingDir") or "",
            user=c.get("User") or "", stop_signal=c.get("StopSignal"),
            exposed_ports=tuple(sorted(c.get("ExposedPorts") or ())),
            labels=tuple(sorted((c.get("Labels") or {}).items())))
        names = tuple(sorted(n for n, d in refs["names"].items() if d == digest))
        return Image(digest, names, meta["size"],
                     os.path.join(self.unpacked, digest[7:], "rootfs"), cfg,
                     meta["os"], meta["architecture"], meta.get("variant"),
                     entry.get("last_used", 0.0))

    def _resolve(self, ref: str, refs: dict) -> str | None:
        if ref.startswith("sha256:"):
            oci.check_digest(ref)
            return ref if ref in refs["images"] else None
        r = self._parse(ref)
        if r.digest is not None:
            return r.digest if r.digest in refs["images"] else None
        return refs["names"].get(str(r))

    def get(self, ref: str) -> Image | None:
        """By name ("alpine" means docker.io/library/alpine:latest), by
        digest "sha256:…" or by name@digest (the digest decides)."""
        refs = self._load()
        digest = self._resolve(ref, refs)
        return self._image(digest, refs) if digest else None

    def list(self) -> list[Image]:
        refs = self._load()
        images = (self._image(d, refs) for d in refs["images"])
        return sorted((i for i in images if i is not None), key=lambda i: (i.names, i.digest))

    def source(self, ref: str) -> "StoredImage":
        """What a push needs: the manifest and its blobs, re-verified."""
        refs = self._load()
        digest = self._resolve(ref, refs)
        meta = self._meta(digest) if digest else None
        if meta is None:
            raise ImageError(f"image {ref}: not in the store")
        blobs = []
        for d in (meta["config_digest"], *meta["layers"]):
            try:
                blobs.append((d, os.lstat(self._blob(d)).st_size))
            except FileNotFoundError:
                raise ImageError(f"image {ref}: blob {d} is missing") from None
        return StoredImage(self, self.read_blob(digest, oci.MAX_MANIFEST),
                           meta["media_type"], blobs)

    def touch(self, ref: str, now: float | None = None) -> None:
        """Note a use (a container started from it) for LRU collection."""
        with self.lock():
            refs = self._load()
            digest = self._resolve(ref, refs)
            if digest is None:
                raise ImageError(f"image {ref}: not in the store")
            refs["images"][digest]["last_used"] = time.time() if now is None else now
            self._save(refs)

    def tag(self, src: str, dst: str) -> Image:
        to = self._parse(dst)
        if to.digest is not None:
            raise ImageError(f"{dst}: a tag cannot carry a digest")
        with self.lock():
            refs = self._load()
            digest = self._resolve(src, refs)
            if digest is None:
                raise ImageError(f"image {src}: not in the store")
            refs["names"][str(to)] = digest
            self._save(refs)
            return self._image(digest, refs)

    def _in_use(self, in_use, refs: dict) -> set[str]:
        out = set()
        for r in in_use:
            d = self._resolve(r, refs)
            if d:
                out.add(d)
        return out

    def remove(self, ref: str, in_use: set[str] = frozenset()) -> None:
        """Untag a name; when no name is left (or `ref` is a digest) delete
        the image and the blobs no other image needs.  Refused for an
        image in use (`in_use`: digests or names of running images)."""
        with self.lock():
            refs = self._load()
            digest = self._resolve(ref, refs)
            if digest is None:
                raise ImageError(f"image {ref}: not in the store")
            by_digest = ref.startswith("sha256:") or "@" in ref
            names = [n for n, d in refs["names"].items() if d == digest]
            if not by_digest and len(names) > 1:
                del refs["names"][str(self._parse(ref))]
                self._save(refs)
                return
            if digest in self._in_use(in_use, refs):
                raise ImageError(f"image {ref}: in use by a container")
            self._delete(digest, refs)
            self._save(refs)

    def _delete(self, digest: str, refs: dict) -> None:
        meta = self._meta(digest) or {}
        for n in [n for n, d in refs["names"].items() if d == digest]:
            del refs["names"][n]
        refs["images"].pop(digest, None)
        final = os.path.join(self.unpacked, digest[7:])
        if os.path.isdir(final):
            # Out of sight first, so a crash mid-way leaves a temp dir that
            # the next start sweeps, not half an image.
            doomed = os.path.join(self.unpacked, f"{_TMP}{os.getpid()}-del-{digest[7:19]}")
            os.rename(final, doomed)
            shutil.rmtree(doomed)
        keep = set()
        for other in refs["images"]:
            m = self._meta(other) or {}
            keep.update([other, m.get("config_digest"), *m.get("layers", ())])
        for b in [digest, meta.get("config_digest"), *meta.get("layers", ())]:
            if b and b not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._blob(b))

    def gc(self, high_pct: int, low_pct: int, in_use: set[str],
           now: float | None = None) -> list[str]:
        """kubelet's image GC: when the store's file system is more than
        high_pct full, remove unused images, least recently used first,
        until it is below low_pct.  Images used within gc_min_age of `now`
        stay.  Returns the digests removed."""
        now = time.time() if now is None else now
        removed: list[str] = []
        if self._pct() <= high_pct:
            return removed
        with self.lock():
            refs = self._load()
            busy = self._in_use(in_use, refs)
            victims = sorted((e.get("last_used", 0.0), d) for d, e in refs["images"].items()
                             if d not in busy and e.get("last_used", 0.0) <= now - self.gc_min_age)
            for _, digest in victims:
                if self._pct() < low_pct:
                    break
                self._delete(digest, refs)
                self._save(refs)
                removed.append(digest)
        return removed

    def _pct(self) -> float:
        used, total = self.usage()
        return used * 100.0 / total if total else 0.0

    def usage(self) -> tuple[int, int]:
        """(used, total) bytes of the file system holding the store, as
        the kubelet counts them: used is what non-root users cannot have."""
        st = os.statvfs(self.root)
        total = st.f_blocks * st.f_frsize
        return total - st.f_bavail * st.f_frsize, total


class StoredImage:
    """A stored image as registry.Repository.push() wants it."""

    def __init__(self, store: Store, manifest: bytes, media_type: str,
                 blobs: list[tuple[str, int]]) -> None:
        self.store = store
        self.manifest = manifest
        self.media_type = media_type
        self._blobs = blobs

    def blobs(self) -> list[tuple[str, int]]:
        return self._blobs

    def open_blob(self, digest: str) -> int:
        return os.open(self.store._blob(digest), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


class BlobWriter:
    """Write a blob whose digest is known only at the end (layers built
    here); commit() hashes what was written and moves it into the store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.path = os.path.join(store.incoming, f"{_TMP}{os.getpid()}-{secrets.token_hex(8)}")
        self.f = open(self.path, "xb")
        self.hash = hashlib.sha256()
        self.size = 0
        self.digest: str | None = None

    def write(self, b) -> int:
        self.hash.update(b)
        self.size += len(b)
        if self.size > self.store.max_blob:
            raise ImageError(f"blob larger than the {self.store.max_blob} bytes allowed")
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()

    def commit(self) -> tuple[str, int]:
        self.f.flush()
        os.fchmod(self.f.fileno(), 0o444)
        os.fsync(self.f.fileno())
        self.f.close()
        self.digest = "sha256:" + self.hash.hexdigest()
        os.rename(self.path, self.store._blob(self.digest))
        return self.digest, self.size

    def abort(self) -> None:
        self.f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> "BlobWriter":
        return self

    def __exit__(self, typ, *exc) -> None:
        if typ is None and self.digest is None:
            self.commit()
        elif typ is not None:
            self.abort()


def _hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            return "sha256:" + h.hexdigest()
        h.update(b)


def _ref_name(ref: reference.Reference, digest: str) -> str:
    """The name a reference tags: "reg/repo:tag", or "reg/repo@digest"
    when it has no tag."""
    if ref.tag is not None:
        return f"{ref.name}:{ref.tag}"
    return f"{ref.name}@{digest}"
