"""Pod volumes, inside the pod root, and the mounts that point at them.

OpenBSD has no bind mounts, so a volume cannot be mounted into a container:
it lives inside the pod root, at /.pufflet/volumes/<name>, and a mount is a
symlink at the mount path pointing there.  The target is absolute, so it
resolves inside the chroot when the pod uses it; from the host side this
code never follows any link a pod could have made: every step goes through
directory fds opened with O_NOFOLLOW.

- emptyDir: a directory owned by the pod uid (0750); its content survives
  container restarts and goes with the pod.
- files (configMap, secret, downwardAPI, projected): written as the
  kubelet's AtomicWriter does: into a new directory ..<timestamp>, then the
  symlink ..data is swapped to it with one rename(2), and each top-level
  name is a symlink <name> -> ..data/<name>.  A reader sees the old set or
  the new one, never a mix.  The files belong to root with the pod's group
  and carry the requested owner bits as group bits, less write: the pod
  reads (and runs) them, may not change them, and no other pod can reach
  them (the pod directory is root's, 0700), so a secret gets the same
  protection as a config map without pufflet needing to know which is which.
- hostPath: refused.  A host directory could only be shared with a pod by
  a bind mount, which OpenBSD lacks; copying or linking it in would not be
  the host path (writes would not show on the host, hard links cannot
  cover directories).  An allowed prefix gets UNIMPLEMENTED saying so, any
  other path PERMISSION_DENIED.

Per-container readOnly cannot be told apart either: the containers of a
pod share one root and so one symlink; a volume is writable by the pod if
SetVolume said so (the agent asks for writable when any container mounts
it read-write).
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
import time
from typing import Sequence

from pufflet.config import HostPath
from pufflet.priv import podroot

__all__ = ["VolumeError", "VOLUMES", "mkdirs", "set_empty_dir", "set_files", "check_host_path",
           "mount", "check_file_paths"]

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# Inside the pod root; the leading dot keeps it out of a casual ls.
VOLUMES = ".pufflet/volumes"
DATA = "..data"
_DATA_TMP = "..data_tmp"
_MAX_DEPTH = 32


class VolumeError(Exception):
    """A volume or mount cannot be made; code is the RPC status to give."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def mkdirs(top: int, parts: Sequence[str], mode: int = 0o755, gid: int = 0) -> int:
    """Open (making them root-owned if missing) the directories parts below
    the directory fd top, refusing symlinks.  Returns an fd of the last."""
    fd = os.dup(top)
    try:
        for i, name in enumerate(parts):
            try:
                os.mkdir(name, 0o700, dir_fd=fd)
                made = True
            except FileExistsError:
                made = False
            try:
                sub = os.open(name, _DIR, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise VolumeError("FAILED_PRECONDITION",
                                      f"/{'/'.join(parts[:i + 1])} is not a directory "
                                      "in the pod root") from None
                raise
            if made:
                os.fchown(sub, 0, gid)
                os.fchmod(sub, mode)
            os.close(fd)
            fd = sub
        return fd
    except BaseException:
        os.close(fd)
        raise


def _volumes_fd(root: str) -> int:
    rfd = os.open(root, _DIR)
    try:
        return mkdirs(rfd, VOLUMES.split("/"))
    finally:
        os.close(rfd)


def _volume_dir(vfd: int, name: str, uid: int, gid: int, mode: int) -> int:
    """The volume's directory (made if missing), owned and moded as asked."""
    try:
        os.mkdir(name, 0o700, dir_fd=vfd)
    except FileExistsError:
        pass
    fd = os.open(name, _DIR, dir_fd=vfd)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def set_empty_dir(root: str, name: str, uid: int, gid: int, writable: bool) -> None:
    """emptyDir: a directory of the pod's (or root's, read-only); what is
    in it stays."""
    vfd = _volumes_fd(root)
    try:
        if writable:
            os.close(_volume_dir(vfd, name, uid, gid, 0o750))
        else:
            os.close(_volume_dir(vfd, name, 0, gid, 0o750))
    finally:
        os.close(vfd)


def check_file_paths(paths: Sequence[str]) -> None:
    """Relative, no '..' or '.' or empty component, no duplicate, no file
    that is also another's directory; the first component may not start
    with '..' (those names are the writer's own)."""
    seen: set[str] = set()
    dirs: set[str] = set()
    for p in paths:
        parts = p.split("/")
        if p.startswith("/") or any(c in ("", ".", "..") for c in parts) or "\0" in p:
            raise VolumeError("INVALID_ARGUMENT", f"volume file path {p!r}: must be "
                              "relative, without '..', '.' or empty components")
        if parts[0].startswith(".."):
            raise VolumeError("INVALID_ARGUMENT",
                              f"volume file path {p!r}: may not start with '..'")
        if len(parts) > _MAX_DEPTH:
            raise VolumeError("INVALID_ARGUMENT", f"volume file path {p!r}: too deep")
        if p in seen or p in dirs:
            raise VolumeError("INVALID_ARGUMENT", f"volume file path {p!r} given twice "
                              "or both as a file and a directory")
        seen.add(p)
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d in seen:
                raise VolumeError("INVALID_ARGUMENT",
                                  f"volume file path {d!r} is both a file and a directory")
            dirs.add(d)


def file_mode(requested: int) -> int:
    """Owner bits (read, execute) given to the group, which is the pod's;
    no write, nothing for others: see the module's doc."""
    owner = requested & 0o500
    return owner | (owner >> 3)


def set_files(root: str, name: str, gid: int, files: Sequence[dict],
              now: float | None = None) -> None:
    """Write files ({path, data, mode}) as the volume's new content, swapped
    in atomically."""
    check_file_paths([f["path"] for f in files])
    vfd = _volumes_fd(root)
    try:
        dfd = _volume_dir(vfd, name, 0, gid, 0o750)
    finally:
        os.close(vfd)
    try:
        t = time.time() if now is None else now
        stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime(t))
        new = f"..{stamp}.{secrets.token_hex(4)}"
        os.mkdir(new, 0o700, dir_fd=dfd)
        try:
            tfd = os.open(new, _DIR, dir_fd=dfd)
            try:
                os.fchown(tfd, 0, gid)
                for f in files:
                    parts = f["path"].split("/")
                    pfd = mkdirs(tfd, parts[:-1], 0o750, gid)
                    try:
                        _write(pfd, parts[-1], f["data"], gid, file_mode(f["mode"]))
                    finally:
                        os.close(pfd)
                os.fchmod(tfd, 0o750)
            finally:
                os.close(tfd)
            old = _readlink(dfd, DATA)
            _unlink(dfd, _DATA_TMP)
            os.symlink(new, _DATA_TMP, dir_fd=dfd)
            os.rename(_DATA_TMP, DATA, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            _remove(dfd, new)
            raise
        # The new set is in; now the top-level names, then the old set.
        tops = {f["path"].split("/")[0] for f in files}
        for entry in os.listdir(dfd):
            if entry.startswith(".."):
                continue
            if entry not in tops:
                st = os.lstat(entry, dir_fd=dfd)
                if stat.S_ISLNK(st.st_mode):
                    os.unlink(entry, dir_fd=dfd)
        for top in sorted(tops):
            want = f"{DATA}/{top}"
            if _readlink(dfd, top) != want:
                _unlink(dfd, top)
                os.symlink(want, top, dir_fd=dfd)
        if old and old != new and old.startswith(".."):
            _remove(dfd, old)
    finally:
        os.close(dfd)


def _write(dfd: int, name: str, data: bytes, gid: int, mode: int) -> None:
    fd = os.open(name, _NEW, 0o600, dir_fd=dfd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchown(fd, 0, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _readlink(dfd: int, name: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=dfd)
    except OSError:
        return None


def _unlink(dfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except FileNotFoundError:
        pass


def _remove(dfd: int, name: str) -> None:
    podroot._remove_at(dfd, name)


def _normal(path: str) -> str:
    return "/" + "/".join(p for p in path.split("/") if p not in ("", "."))


def check_host_path(host_path: str | None, writable: bool,
                    allowed: Sequence[HostPath]) -> None:
    """Always raises: PERMISSION_DENIED outside pufflet.conf's hostpath
    prefixes (or writable under a read-only one), else UNIMPLEMENTED."""
    if not host_path or not host_path.startswith("/") or ".." in host_path.split("/"):
        raise VolumeError("INVALID_ARGUMENT",
                          f"hostPath {host_path!r}: want an absolute path without '..'")
    path = _normal(host_path)
    match = None
    for hp in allowed:
        prefix = _normal(hp.prefix)
        # Whole components: /data does not allow /database.
        if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
            if match is None or len(prefix) > len(_normal(match.prefix)):
                match = hp
    if match is None:
        raise VolumeError("PERMISSION_DENIED", f"hostPath {path} is not under a hostpath "
                          "prefix allowed in pufflet.conf")
    if writable and not match.writable:
        raise VolumeError("PERMISSION_DENIED", f"hostPath {path}: {match.prefix} is "
                          "allowed read-only in pufflet.conf")
    raise VolumeError("UNIMPLEMENTED", f"hostPath {path}: hostPath volumes need a bind "
                      "mount, which OpenBSD lacks (pufflet runs a pod in a root of its "
                      "own and cannot show a host directory inside it)")


def mount(root: str, volume: str, path: str) -> None:
    """Make path (absolute, inside the pod root) a symlink to the volume.
    Parents are made root-owned; what is at path may be replaced only if
    it is absent or an empty directory."""
    parts = [p for p in path.split("/") if p]
    if not path.startswith("/") or any(p in (".", "..") for p in parts) or not parts:
        raise VolumeError("INVALID_ARGUMENT", f"mount path {path!r}: want an absolute "
                          "path without '.' or '..', not /")
    if parts[0] == ".pufflet":
        raise VolumeError("INVALID_ARGUMENT", f"mount path {path!r}: /.pufflet is pufflet's")
    target = f"/{VOLUMES}/{volume}"
    rfd = os.open(root, _DIR)
    try:
        try:
            os.lstat(f"{VOLUMES}/{volume}", dir_fd=rfd)
        except FileNotFoundError:
            raise VolumeError("FAILED_PRECONDITION",
                              f"volume {volume} has not been set up") from None
        pfd = mkdirs(rfd, parts[:-1])
    finally:
        os.close(rfd)
    name = parts[-1]
    try:
        try:
            st = os.lstat(name, dir_fd=pfd)
        except FileNotFoundError:
            st = None
        if st is not None:
            if stat.S_ISLNK(st.st_mode) and _readlink(pfd, name) == target:
                return      # mounted before (a restart of the container)
            if stat.S_ISDIR(st.st_mode):
                try:
                    os.rmdir(name, dir_fd=pfd)
                except OSError as e:
                    if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                    raise VolumeError("FAILED_PRECONDITION", _busy(path)) from None
            else:
                raise VolumeError("FAILED_PRECONDITION", _busy(path))
        os.symlink(target, name, dir_fd=pfd)
    finally:
        os.close(pfd)


def _busy(path: str) -> str:
    return (f"mount path {path}: the pod root already has something there (an image "
            "file, a non-empty directory or another volume); pufflet mounts a volume "
            "by a symlink in the pod's one root (OpenBSD has no bind mounts)")
