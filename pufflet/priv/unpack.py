"""Unpack image layers into a root file system, treating every layer as hostile.

Python's tarfile "data" filter is the floor here, not the ceiling.  The
rules, and why:

- Never follow a symlink while extracting.  Every parent directory is
  reached from the root by openat(2) one component at a time with
  O_NOFOLLOW|O_DIRECTORY, so an earlier entry "a -> /etc" makes a later
  "a/passwd" fail instead of writing /etc/passwd.  Symlinks themselves are
  fine as entries: their targets are resolved inside the pod's chroot.
- No absolute names and no ".." components: refused, not rewritten, since
  a layer that tries either is not one we want to run.
- Hard links must name a regular file already inside the root (reached the
  same careful way): no links to symlinks, directories or missing files.
- No device nodes, fifos, sparse files or other unusual types: the whole
  layer is refused.  A pod root gets its /dev from pufflet, never from an
  image.
- Files belong to root (uid 0, gid 0: whoever unpacks, as root) and
  nothing is group or world writable: pods run as unprivileged uids and
  their roots hard-link these files, so a writable file would let one pod
  change another's binaries.  setuid, setgid and sticky bits are dropped.
  xattrs (file capabilities among them) are ignored.
- Everything is bounded: bytes written, entries, name lengths, and the pax
  and GNU long-name headers tarfile would otherwise read whole into memory.
- Failure leaves nothing: the caller's destination is removed.

Layers stream through tarfile's "r|" mode from the blob file, which is
hashed on the way so the digest check costs no second read.
"""

import collections
import hashlib
import os
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass
from typing import Iterable

from pufflet.images import oci
from pufflet.images.oci import ImageError

CHUNK = 1 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_ALLOWED = {tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.DIRTYPE,
            tarfile.SYMTYPE, tarfile.LNKTYPE}
_KIND = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
         tarfile.FIFOTYPE: "fifo", tarfile.GNUTYPE_SPARSE: "sparse file"}


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 32 << 30       # file data across all layers of an image
    max_entries: int = 1_000_000    # entries across all layers of an image
    max_path: int = 4096            # bytes in an entry's name or link target
    max_component: int = 255        # bytes in one path component
    max_meta: int = 1 << 20         # a pax or GNU long-name header's payload
    max_fds: int = 128              # parent directories kept open


@dataclass
class Layer:
    """A layer blob: an open file positioned at 0, its media type and the
    digest it must hash to (None only for callers that verified it)."""
    file: object
    media_type: str
    digest: str | None


@dataclass
class Stats:
    bytes: int = 0
    entries: int = 0


def unpack(layers: Iterable[Layer], dest: str, limits: Limits = Limits()) -> Stats:
    """Create `dest` and apply the layers to it in order.  On any error
    `dest` is removed and ImageError says which layer and entry."""
    os.mkdir(dest, 0o755)
    try:
        os.chmod(dest, 0o755)
        if os.geteuid() == 0:
            # New entries take their group from the directory on BSD.
            os.chown(dest, 0, 0)
        stats = Stats()
        tree = _Tree(dest, limits)
        try:
            for n, layer in enumerate(layers):
                _apply(tree, layer, n, stats, limits)
        finally:
            tree.close()
        return stats
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


# -- the compressed stream -------------------------------------------------

class _Source:
    """Reads a layer blob, hashing every byte and decompressing it with a
    bound on what comes out (a gzip bomb meets the bound, not our memory)."""

    def __init__(self, layer: Layer, limit: int) -> None:
        self.raw = layer.file
        self.want = layer.digest
        self.hash = hashlib.sha256()
        self.limit = limit
        self.out = 0
        compression = oci.LAYER_TYPES.get(layer.media_type)
        if compression is None:
            raise ImageError(f"unsupported layer media type {layer.media_type!r}")
        self.gz = None
        self.zst = None
        self.tail = b""
        if compression == "gzip":
            self.gz = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif compression == "zstd":
            try:
                import zstandard
            except ImportError:
                raise ImageError(f"unsupported layer media type {layer.media_type!r}: "
                                 "zstd needs the zstandard module") from None
            self.zst = zstandard.ZstdDecompressor().stream_reader(_Hashing(self))

    def _raw(self, n: int) -> bytes:
        b = self.raw.read(n)
        self.hash.update(b)
        return b

    def read(self, size: int = CHUNK) -> bytes:
        if size is None or size < 0:
            size = CHUNK
        if self.zst is not None:
            out = self.zst.read(size)
        elif self.gz is not None:
            out = self._gunzip(size)
        else:
            out = self._raw(size)
        self.out += len(out)
        if self.out > self.limit:
            raise ImageError(f"expands beyond {self.limit} bytes")
        return out

    def _gunzip(self, size: int) -> bytes:
        gz = self.gz
        while True:
            if self.tail:
                data, self.tail = self.tail, b""
            elif gz.eof:
                # Concatenated gzip members are one stream (RFC 1952 2.2).
                rest = gz.unused_data
                if not rest:
                    rest = self._raw(CHUNK)
                    if not rest:
                        return b""
                gz = self.gz = zlib.decompressobj(16 + zlib.MAX_WBITS)
                data = rest
            else:
                data = self._raw(CHUNK)
                if not data:
                    raise ImageError("truncated gzip stream")
            try:
                out = gz.decompress(data, size)
            except zlib.error as e:
                raise ImageError(f"corrupt gzip stream: {e}") from None
            self.tail = gz.unconsumed_tail
            if out:
                return out

    def finish(self) -> None:
        """Hash what the tar reader did not need and compare digests."""
        while self._raw(CHUNK):
            pass
        if self.want is not None:
            got = "sha256:" + self.hash.hexdigest()
            if got != self.want:
                raise ImageError(f"digest mismatch: blob hashes to {got}")


class _Hashing:
    """The raw side of a zstd reader, through _Source's hash."""

    def __init__(self, src: _Source) -> None:
        self.src = src

    def read(self, n: int = CHUNK) -> bytes:
        return self.src._raw(n if n and n > 0 else CHUNK)


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a pax or GNU long-name header's payload into memory in
    one piece whatever size it declares; refuse big ones before that."""
    max_meta = Limits.max_meta

    def _proc_member(self, tf):
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                         tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK) \
                and self.size > self.max_meta:
            raise ImageError(f"extended header of {self.size} bytes, more than "
                             f"{self.max_meta} allowed")
        return super()._proc_member(tf)


# -- the tree being built ----------------------------------------------------

class _NotFound(Exception):
    pass


class _Tree:
    """The root being unpacked, with a small cache of open parent
    directories: each was reached without following a symlink, so a cached
    fd stays trustworthy until we remove that directory ourselves."""

    def __init__(self, root: str, limits: Limits) -> None:
        self.limits = limits
        self.root = os.open(root, _DIR_FLAGS)
        self.fds: collections.OrderedDict[str, int] = collections.OrderedDict()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        os.close(self.root)

    def dir(self, parts: tuple[str, ...], create: bool) -> int:
        """An fd for the directory at `parts`, each component a real
        directory; missing ones are made (0755) when `create`."""
        if not parts:
            return self.root
        key = "/".join(parts)
        fd = self.fds.get(key)
        if fd is not None:
            self.fds.move_to_end(key)
            return fd
        pfd = self.dir(parts[:-1], create)
        name = parts[-1]
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except FileNotFoundError:
            if not create:
                raise _NotFound(key) from None
            os.mkdir(name, 0o755, dir_fd=pfd)
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except OSError:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise ImageError(f"path goes through symlink {key!r}") from None
            raise ImageError(f"path goes through {key!r}, which is not a directory") from None
        self.fds[key] = fd
        if len(self.fds) > self.limits.max_fds:
            os.close(self.fds.popitem(last=False)[1])
        return fd

    def forget(self, key: str) -> None:
        """`key` is being removed: its fd and its descendants' go too."""
        prefix = key + "/"
        for k in [k for k in self.fds if k == key or k.startswith(prefix)]:
            os.close(self.fds.pop(k))

    def remove(self, pfd: int, name: str, key: str) -> None:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            self.forget(key)
            # rmtree with dir_fd walks by fd and never follows symlinks.
            shutil.rmtree(name, dir_fd=pfd)
        else:
            os.unlink(name, dir_fd=pfd)


# -- entries -----------------------------------------------------------------

def _split(name: str, limits: Limits, what: str = "name") -> tuple[str, ...]:
    if "\0" in name:
        raise ImageError(f"{what} contains a NUL byte")
    if len(os.fsencode(name)) > limits.max_path:
        raise ImageError(f"{what} longer than {limits.max_path} bytes")
    if name.startswith("/"):
        raise ImageError(f"absolute {what} {name!r}")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise ImageError(f"{what} {name!r} has a '..' component")
    for p in parts:
        if len(os.fsencode(p)) > limits.max_component:
            raise ImageError(f"{what} has a component longer than {limits.max_component} bytes")
    return parts


def file_mode(mode: int, is_dir: bool) -> int:
    """0755 at most; plain files 0644 at most unless the owner may execute.
    No setuid, setgid or sticky bit; nothing group or world writable."""
    m = mode & 0o755
    if not is_dir and not m & 0o100:
        m &= 0o644
    return m


def _apply(tree: _Tree, layer: Layer, n: int, stats: Stats, limits: Limits) -> None:
    what = f"layer {n}" + (f" ({layer.digest})" if layer.digest else "")
    src = _Source(layer, limits.max_bytes - stats.bytes + limits.max_entries * 1024)
    ap = _Applier(tree, stats, limits)
    name = None
    try:
        info = type("TarInfo", (_BoundedTarInfo,), {"max_meta": limits.max_meta})
        tf = tarfile.open(fileobj=src, mode="r|", bufsize=CHUNK, tarinfo=info, errorlevel=2)
        while True:
            ti = tf.next()
            if ti is None:
                break
            name = ti.name
            ap.entry(tf, ti)
            # Stream mode keeps every member it has seen; we need none.
            tf.members.clear()
        name = None
        src.finish()
    except ImageError as e:
        raise ImageError(f"{what}: " + (f"entry {name!r}: " if name is not None else "")
                         + str(e)) from None
    except (tarfile.TarError, EOFError) as e:
        raise ImageError(f"{what}: not a valid tar stream"
                         + (f" after entry {name!r}" if name else "") + f": {e}") from None
    except OSError as e:
        raise ImageError(f"{what}: " + (f"entry {name!r}: " if name is not None else "")
                         + f"{e.strerror or e}") from None


class _Applier:
    def __init__(self, tree: _Tree, stats: Stats, limits: Limits) -> None:
        self.tree = tree
        self.stats = stats
        self.limits = limits
        # Entries of this layer: whiteouts hide lower layers only.
        self.here: set[str] = set()
        mask = os.umask(0o022)
        os.umask(mask)
        self.umask = mask

    def entry(self, tf: tarfile.TarFile, ti: tarfile.TarInfo) -> None:
        st, lim = self.stats, self.limits
        st.entries += 1
        if st.entries > lim.max_entries:
            raise ImageError(f"more than {lim.max_entries} entries")
        # Every entry's declared size counts, written or skipped: skipping
        # still means decompressing it.
        st.bytes += ti.size
        if st.bytes > lim.max_bytes:
            raise ImageError(f"expands beyond {lim.max_bytes} bytes")
        if ti.type not in _ALLOWED or ti.sparse is not None:
            kind = _KIND.get(ti.type, f"unusual entry type {ti.type!r}")
            if ti.sparse is not None:
                kind = "sparse file"
            raise ImageError(f"{kind}: refused")
        parts = _split(ti.name, lim)
        if not parts:
            if ti.isdir():
                return          # "./": the root stays 0755 root:wheel
            raise ImageError("names the root but is not a directory")
        base = parts[-1]
        if base.startswith(".wh."):
            self.whiteout(parts)
            return
        key = "/".join(parts)
        self.here.add(key)
        pfd = self.tree.dir(parts[:-1], True)
        if ti.isreg():
            self.file(tf, ti, pfd, base, key)
        elif ti.isdir():
            self.mkdir(pfd, base, key, file_mode(ti.mode, True))
        elif ti.issym():
            target = ti.linkname
            if not target or "\0" in target or len(os.fsencode(target)) > lim.max_path:
                raise ImageError("bad symlink target")
            self.replace(pfd, base, key, lambda: os.symlink(target, base, dir_fd=pfd))
        else:
            self.hardlink(ti, pfd, base, key)

    def replace(self, pfd: int, name: str, key: str, make) -> None:
        try:
            make()
        except FileExistsError:
            self.tree.remove(pfd, name, key)
            make()

    def file(self, tf, ti, pfd: int, name: str, key: str) -> None:
        mode = file_mode(ti.mode, False)
        try:
            fd = os.open(name, _FILE_FLAGS, mode, dir_fd=pfd)
        except FileExistsError:
            self.tree.remove(pfd, name, key)
            fd = os.open(name, _FILE_FLAGS, mode, dir_fd=pfd)
        try:
            if ti.size:
                left = ti.size
                f = tf.fileobj
                # Read the member's bytes straight off the stream (next()
                # skips the padding): no buffered wrapper per file.
                while left:
                    buf = f.read(min(left, CHUNK))
                    if not buf:
                        raise ImageError("truncated file data")
                    left -= len(buf)
                    mv = memoryview(buf)
                    while mv:
                        mv = mv[os.write(fd, mv):]
            if mode & self.umask:
                os.fchmod(fd, mode)
            os.utime(fd, (ti.mtime, ti.mtime))
        finally:
            os.close(fd)

    def mkdir(self, pfd: int, name: str, key: str, mode: int) -> None:
        try:
            os.mkdir(name, mode, dir_fd=pfd)
            if not mode & self.umask:
                return
        except FileExistsError:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                self.tree.remove(pfd, name, key)
                os.mkdir(name, mode, dir_fd=pfd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def hardlink(self, ti, pfd: int, name: str, key: str) -> None:
        tparts = _split(ti.linkname, self.limits, "hard link target")
        if not tparts:
            raise ImageError("hard link to the root")
        try:
            tpfd = self.tree.dir(tparts[:-1], False)
            st = os.stat(tparts[-1], dir_fd=tpfd, follow_symlinks=False)
        except (_NotFound, FileNotFoundError):
            raise ImageError(f"hard link to missing file {ti.linkname!r}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"hard link to {ti.linkname!r}, which is not a regular file")
        if "/".join(tparts) == key:
            return
        self.replace(pfd, name, key, lambda: os.link(
            tparts[-1], name, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False))

    def whiteout(self, parts: tuple[str, ...]) -> None:
        base = parts[-1]
        try:
            pfd = self.tree.dir(parts[:-1], False)
        except _NotFound:
            return
        pkey = "/".join(parts[:-1])
        if base == ".wh..wh..opq":
            self.prune(pfd, pkey)
        elif base.startswith(".wh..wh."):
            return          # aufs bookkeeping (.wh..wh.plnk, ...): no meaning here
        else:
            name = base[4:]
            if name in ("", ".", ".."):
                raise ImageError("whiteout of an invalid name")
            key = f"{pkey}/{name}" if pkey else name
            if key not in self.here:
                self.tree.remove(pfd, name, key)

    def prune(self, dfd: int, dkey: str) -> None:
        """Opaque directory: drop what lower layers put under it, keep what
        this layer did."""
        for name in os.listdir(dfd):
            key = f"{dkey}/{name}" if dkey else name
            if key not in self.here:
                self.tree.remove(dfd, name, key)
                continue
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                self.prune(self.tree.dir(tuple(key.split("/")), False), key)

