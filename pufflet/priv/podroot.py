"""Pod root directories, built from an unpacked image the OpenBSD way.

OpenBSD has no bind mounts, overlay or nullfs, so a pod's root is a
directory tree of its own, <pod_dir>/root:

- directories are made anew, owned by root, with the image's modes less
  any write bit for group or others: the pod cannot add, remove or
  rename anything in them;
- regular files are hard links to the image's files.  That costs one
  directory entry per file and is safe because image files belong to
  root and nobody else may write them (unpack.py sees to it, and every
  file is checked again here before it is linked): the pod uid can read
  and run them, never change them, and no pod sees another's writes;
- symlinks are made again with the same target, which resolves inside
  the chroot when the pod runs;
- /tmp is the one writable place: root-owned, 1777, as programs expect.
  The pod's processes all run as one uid, so the sticky bit protects
  nothing from another pod; root ownership keeps the pod from changing
  the directory itself;
- /etc/hosts, /etc/resolv.conf, /etc/passwd and /etc/group are new
  files written here, never links: writing to a linked file would change
  the image and every pod made from it;
- /dev holds null, zero, full, random and urandom, made with the host's
  device numbers, when the file system lets device nodes work (OpenBSD
  mounts /var nodev by default: then /dev stays empty and PodRoot says
  why).

Hard links cannot cross file systems, so the image store and the pods
directory must share one: build() refuses otherwise rather than copy,
since a silent copy would cost each pod the image's full size on disk and
make starting 30 pods take seconds instead of milliseconds.  The one
exception is a file with too many links already (EMLINK: busybox-style
images link one binary hundreds of times, and FFS allows 32767 links per
file): it is copied once into the pod and its other names there are
linked to the copy.

A build goes to <pod_dir>/root.tmp and is renamed to root when complete;
any failure removes what it made.  remove() and sweep() delete trees
through directory fds, never following a symlink, since a pod's /tmp is
the pod's to fill with whatever links it likes.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["PodRoot", "PodRootError", "ImageConflict", "build", "remove", "sweep"]

log = logging.getLogger("pufflet.priv.podroot")

# O_NONBLOCK: should a name turn out to be a fifo, fail with ENOTDIR, never wait.
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

ROOT = "root"
BUILDING = "root.tmp"

# Image trees are bounded by unpack.Limits; this bounds the fds and the
# recursion a build holds open (two fds per level).
MAX_DEPTH = 200
# Beyond this depth remove() moves a directory up to the top rather than
# descend, so a pod that made a very deep tree in /tmp cannot exhaust our
# fds or the Python stack.
_REMOVE_DEPTH = 64
_MAX_ETC = 1 << 20      # an image's passwd or group file
_MAX_RESOLV = 64 << 10

# name, mode.  Each is made only if the host has it (OpenBSD has no full).
DEVICES = (("null", 0o666), ("zero", 0o666), ("full", 0o666),
           ("random", 0o644), ("urandom", 0o644))

# Written by build(), never taken from the image.
_ETC_OWN = frozenset({"hosts", "resolv.conf", "passwd", "group"})

_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,30}\Z")


class PodRootError(Exception):
    """A pod root cannot be built or removed; the message says why."""


class ImageConflict(PodRootError):
    """Two images of one pod provide one path with different content."""


@dataclass(frozen=True)
class PodRoot:
    path: str                       # <pod_dir>/root: what the pod chroots into
    uid: int
    gid: int
    user_name: str
    devices: tuple[str, ...]        # the nodes made in /dev
    dev_missing_reason: str | None  # why /dev is empty, when it is
    linked: int                     # image files hard-linked
    copied: int                     # image files copied (EMLINK)


def build(image_rootfs: str | Sequence[str], pod_dir: str, uid: int, gid: int, *,
          hostname: str, hosts_entries: Sequence[tuple[str, Sequence[str]]] = (),
          resolv_conf: str, user_name: str = "pod", dev: bool = True) -> PodRoot:
    """Build <pod_dir>/root from image_rootfs (one unpacked image, or a
    list: every container image of the pod) for a pod running as uid:gid.

    A pod runs in one root, since OpenBSD has no bind mounts to give each
    container its own: the root is the union of the images.  Directories
    merge; a path two images provide must be the very same file (the same
    inode: a shared layer) or the same symlink, else ImageConflict.  The
    first image that has /etc/passwd (or group) gives the base of the
    pod's own.

    hosts_entries are (address, names) pairs for /etc/hosts (the pod's
    own address, hostAliases); hostname resolves to the loopback
    addresses unless an entry names it.  pod_dir is made (root, 0700) if
    missing: nothing but root needs to reach it, the pod runs chrooted
    below it."""
    for what, v in (("uid", uid), ("gid", gid)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 2**31:
            raise PodRootError(f"pod {what} {v!r}: must be a number above 0")
    if not _USER.match(user_name):
        raise PodRootError(f"invalid pod user name {user_name!r}")
    hosts = _hosts_file(hostname, hosts_entries)
    images = [image_rootfs] if isinstance(image_rootfs, str) else list(image_rootfs)
    # Two containers of one image: one pass over it is enough.
    images = list(dict.fromkeys(os.path.realpath(i) for i in images))
    if not images:
        raise PodRootError("a pod root needs at least one image")
    if not isinstance(resolv_conf, str) or "\0" in resolv_conf \
            or len(resolv_conf) > _MAX_RESOLV:
        raise PodRootError("resolv.conf: not text, or too long")

    pfd = _open_pod_dir(pod_dir)
    made = False
    try:
        try:
            os.lstat(ROOT, dir_fd=pfd)
            raise PodRootError(f"{pod_dir}: already has a root; remove it first")
        except FileNotFoundError:
            pass
        sfds: list[int] = []
        try:
            for image in images:
                try:
                    sfds.append(os.open(image, _DIR))
                except OSError as e:
                    raise PodRootError(f"image root {image}: {e.strerror}") from None
                if os.fstat(sfds[-1]).st_dev != os.fstat(pfd).st_dev:
                    raise PodRootError(
                        f"image root {image} and {pod_dir} are on different file "
                        "systems: pod roots hard-link image files, so the image store "
                        "and the pods directory must be on one file system (put both "
                        "under the state directory)")
            _clear_stale(pfd, BUILDING)
            os.mkdir(BUILDING, 0o700, dir_fd=pfd)
            made = True
            rfd = os.open(BUILDING, _DIR, dir_fd=pfd)
            try:
                # First: on BSD everything made below takes this group.
                os.fchown(rfd, 0, 0)
                b = _Builder(images[0], rfd)
                for image, sfd in zip(images, sfds):
                    b.image = image
                    b.tree(sfd, rfd, "", 0)
                b.tmp(rfd)
                reason, devices = _dev(rfd, pod_dir, dev)
                b.etc(sfds, rfd, hosts, resolv_conf, uid, gid, user_name)
                os.fchmod(rfd, 0o755)       # whatever the image said: pods must enter /
            finally:
                os.close(rfd)
        finally:
            for sfd in sfds:
                os.close(sfd)
        os.rename(BUILDING, ROOT, src_dir_fd=pfd, dst_dir_fd=pfd)
        made = False
    except OSError as e:
        raise PodRootError(f"{pod_dir}: building the pod root failed: {e}") from None
    finally:
        if made:
            _clear_stale(pfd, BUILDING)
        os.close(pfd)
    return PodRoot(os.path.join(pod_dir, ROOT), uid, gid, user_name, tuple(devices),
                   None if devices else reason, b.linked, b.copied)


def remove(pod_dir: str) -> None:
    """Delete pod_dir and everything in it, whole or half built.  Symlinks
    inside are removed, never followed; pod_dir itself must not be one."""
    try:
        st = os.lstat(pod_dir)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise PodRootError(f"{pod_dir}: is a symlink, not removing it")
    if not stat.S_ISDIR(st.st_mode):
        raise PodRootError(f"{pod_dir}: is not a directory, not removing it")
    parent, name = os.path.split(os.path.abspath(pod_dir))
    try:
        pfd = os.open(parent, _DIR)
        try:
            _remove_at(pfd, name)
        finally:
            os.close(pfd)
    except OSError as e:
        # On OpenBSD a pod may chflags(2) its own files uchg; root can clear
        # that, but only by path, which this code will not follow.  Say so.
        raise PodRootError(f"{pod_dir}: cannot remove: {e}") from None


def sweep(pods_root: str, keep: Iterable[str]) -> list[str]:
    """Remove every entry of pods_root not named in keep (leftovers of pods
    that ended while pufflet was down).  Returns the names removed; one
    that cannot be removed is logged and left."""
    keep = set(keep)
    try:
        fd = os.open(pods_root, _DIR)
    except FileNotFoundError:
        return []
    removed = []
    try:
        for name in sorted(os.listdir(fd)):
            if name not in keep:
                try:
                    _remove_at(fd, name)
                except OSError as e:
                    # One stuck leftover must not keep the others, or the
                    # daemon, from starting: say so and go on.
                    log.warning("%s/%s: cannot remove leftover pod dir: %s",
                                pods_root, name, e)
                    continue
                removed.append(name)
    finally:
        os.close(fd)
    return removed


# -- building --------------------------------------------------------------------

class _Builder:
    def __init__(self, image_rootfs: str, root_fd: int) -> None:
        self.image = image_rootfs
        self.root_fd = root_fd
        self.linked = 0
        self.copied = 0
        # (st_dev, st_ino) of an image file that hit EMLINK -> the path of
        # its copy in this pod, relative to the pod root.
        self.copies: dict[tuple[int, int], str] = {}

    def tree(self, sfd: int, dfd: int, rel: str, depth: int) -> None:
        """Copy the directory sfd (the image's rel) into dfd."""
        if depth >= MAX_DEPTH:
            raise PodRootError(f"image {self.image}: /{rel} is more than "
                               f"{MAX_DEPTH} directories deep")
        with os.scandir(sfd) as it:
            entries = list(it)
        for e in entries:
            name = e.name
            if depth == 0 and name == "dev":
                continue        # ours; images bring no devices anyway
            if depth == 1 and rel == "etc" and name in _ETC_OWN:
                continue
            path = f"{rel}/{name}" if rel else name
            # d_type tells dirs and symlinks apart without a stat.
            if e.is_symlink():
                target = os.readlink(name, dir_fd=sfd)
                try:
                    os.symlink(target, name, dir_fd=dfd)
                except FileExistsError:
                    # An earlier image of the pod made it: fine if it is
                    # the same link.
                    if not _is_link_to(dfd, name, target):
                        raise self.conflict(path) from None
            elif e.is_dir(follow_symlinks=False):
                mode = stat.S_IMODE(e.stat(follow_symlinks=False).st_mode) & 0o755
                try:
                    os.mkdir(name, 0o700, dir_fd=dfd)
                    new = True
                except FileExistsError:
                    new = False     # merged: the first image's mode stays
                try:
                    cfd = os.open(name, _DIR, dir_fd=dfd)
                except OSError as err:
                    if err.errno in (errno.ENOTDIR, errno.ELOOP):
                        raise self.conflict(path) from None
                    raise
                try:
                    sub = os.open(name, _DIR, dir_fd=sfd)
                    try:
                        self.tree(sub, cfd, path, depth + 1)
                    finally:
                        os.close(sub)
                    if new:
                        os.fchmod(cfd, mode)    # last: 0500 dirs get filled too
                finally:
                    os.close(cfd)
            else:
                self.file(e, sfd, dfd, path)

    def conflict(self, path: str) -> ImageConflict:
        return ImageConflict(
            f"images of this pod conflict at /{path}: pufflet runs a pod in one "
            "root (OpenBSD has no bind mounts)")

    def file(self, e: os.DirEntry, sfd: int, dfd: int, path: str) -> None:
        st = e.stat(follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise PodRootError(f"image {self.image}: /{path} is not a regular file, "
                               "directory or symlink")
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH
                                           | stat.S_ISUID | stat.S_ISGID):
            # Linking it would let a pod write to the image (and to every
            # other pod), or gain another id.
            raise PodRootError(
                f"image {self.image}: /{path} is owned by uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):04o}: image files must belong to root, "
                "be writable by nobody else and carry no setuid/setgid bit")
        key = (st.st_dev, st.st_ino)
        copy = self.copies.get(key)
        try:
            if copy is not None:
                os.link(copy, e.name, src_dir_fd=self.root_fd, dst_dir_fd=dfd,
                        follow_symlinks=False)
                return
            try:
                os.link(e.name, e.name, src_dir_fd=sfd, dst_dir_fd=dfd,
                        follow_symlinks=False)
                self.linked += 1
            except OSError as err:
                if err.errno != errno.EMLINK:
                    raise
                _copy_file(sfd, dfd, e.name, stat.S_IMODE(st.st_mode))
                self.copies[key] = path
                self.copied += 1
        except FileExistsError:
            # An earlier image of the pod has this path: only the very
            # same file (a layer both share) is no conflict.
            have = os.lstat(e.name, dir_fd=dfd)
            if (have.st_dev, have.st_ino) == key or (
                    copy is not None and
                    os.path.samestat(have, os.lstat(copy, dir_fd=self.root_fd))):
                return
            raise self.conflict(path) from None

    def tmp(self, rfd: int) -> None:
        """/tmp: whatever the image had there, as a root-owned 1777 dir."""
        try:
            st = os.lstat("tmp", dir_fd=rfd)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink("tmp", dir_fd=rfd)    # a symlink (to /var/tmp, say)
                raise FileNotFoundError
        except FileNotFoundError:
            os.mkdir("tmp", 0o700, dir_fd=rfd)
        fd = os.open("tmp", _DIR, dir_fd=rfd)
        try:
            os.fchmod(fd, 0o1777)
        finally:
            os.close(fd)

    def etc(self, sfds: Sequence[int], rfd: int, hosts: bytes, resolv: str, uid: int,
            gid: int, user: str) -> None:
        try:
            st = os.lstat("etc", dir_fd=rfd)
        except FileNotFoundError:
            os.mkdir("etc", 0o700, dir_fd=rfd)
            fd = os.open("etc", _DIR, dir_fd=rfd)
            os.fchmod(fd, 0o755)
            os.close(fd)
        else:
            if not stat.S_ISDIR(st.st_mode):
                raise PodRootError(f"image {self.image}: /etc is not a directory: "
                                   "no place for the pod's hosts and passwd files")
        efd = os.open("etc", _DIR, dir_fd=rfd)
        try:
            shell = "/bin/sh" if _runnable(rfd, "/bin/sh") else "/sbin/nologin"
            passwd = _amend(self.first_etc(sfds, "passwd"), user, uid,
                            f"{user}:x:{uid}:{gid}:pufflet pod:/tmp:{shell}")
            group = _amend(self.first_etc(sfds, "group"), user, gid,
                           f"{user}:x:{gid}:")
            _write_new(efd, "hosts", hosts)
            _write_new(efd, "resolv.conf", resolv.encode())
            _write_new(efd, "passwd", passwd)
            _write_new(efd, "group", group)
        finally:
            os.close(efd)


    def first_etc(self, sfds: Sequence[int], name: str) -> bytes:
        for sfd in sfds:
            text = _image_etc(sfd, name, self.image)
            if text:
                return text
        return b""


def _is_link_to(dfd: int, name: str, target: str) -> bool:
    try:
        return os.readlink(name, dir_fd=dfd) == target
    except OSError:
        return False


def _copy_file(sfd: int, dfd: int, name: str, mode: int) -> None:
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
    try:
        dst = os.open(name, _NEW, 0o600, dir_fd=dfd)
        try:
            while chunk := os.read(src, 1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(dst, view):]
            os.fchmod(dst, mode)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _write_new(dfd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(name, _NEW, 0o600, dir_fd=dfd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _image_etc(sfd: int, name: str, image: str) -> bytes:
    """The image's /etc/<name>, or nothing if it has none (or only a
    symlink, which could point anywhere on the host from here)."""
    try:
        efd = os.open("etc", _DIR, dir_fd=sfd)
    except OSError:
        return b""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=efd)
    except OSError:
        return b""
    finally:
        os.close(efd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return b""
        if st.st_size > _MAX_ETC:
            raise PodRootError(f"image {image}: /etc/{name} is larger than {_MAX_ETC} bytes")
        return os.read(fd, _MAX_ETC)
    finally:
        os.close(fd)


def _amend(text: bytes, name: str, ident: int, line: str) -> bytes:
    """An image's passwd or group file with the pod's entry appended, and
    any entry with the same name or number dropped so lookups of either
    find the pod's."""
    out = []
    for ln in text.splitlines():
        f = ln.split(b":")
        if len(f) > 2 and (f[0] == name.encode() or f[2] == str(ident).encode()):
            continue
        out.append(ln)
    out.append(line.encode())
    return b"\n".join(out) + b"\n"


def _runnable(rfd: int, path: str) -> bool:
    """Whether path names an executable file inside the root rfd, resolving
    symlinks as the chroot will (absolute targets from the pod root)."""
    todo = [p for p in path.split("/") if p]
    done: list[str] = []
    hops = 0
    st = None
    while todo:
        name = todo.pop(0)
        if name == ".":
            continue
        if name == "..":
            if done:
                done.pop()
            continue
        rel = "/".join(done + [name])
        try:
            # Every component of rel was checked to be a directory: the
            # kernel follows no symlink on the way.
            st = os.lstat(rel, dir_fd=rfd)
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                target = os.readlink(rel, dir_fd=rfd)
                if hops > 32:
                    return False
                if target.startswith("/"):
                    done = []
                todo = [p for p in target.split("/") if p] + todo
                continue
        except OSError:
            return False
        if todo and not stat.S_ISDIR(st.st_mode):
            return False
        done.append(name)
    return st is not None and stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)


def _hosts_file(hostname: str, entries: Sequence[tuple[str, Sequence[str]]]) -> bytes:
    if not isinstance(hostname, str) or not _HOSTNAME.match(hostname):
        raise PodRootError(f"invalid pod hostname {hostname!r}")
    lines = []
    named = False
    for entry in entries:
        try:
            addr, names = entry
            addr = str(ipaddress.ip_address(addr))
        except (TypeError, ValueError):
            raise PodRootError(f"/etc/hosts entry {entry!r}: not (address, names)") from None
        if isinstance(names, str) or not names or \
                not all(isinstance(n, str) and _HOSTNAME.match(n) for n in names):
            raise PodRootError(f"/etc/hosts entry for {addr}: invalid names {names!r}")
        named = named or hostname in names
        lines.append(f"{addr}\t{' '.join(names)}")
    own = "" if named else f" {hostname}"
    head = ["# Kubernetes-managed hosts file (pufflet).",
            f"127.0.0.1\tlocalhost{own}",
            f"::1\tlocalhost ip6-localhost ip6-loopback{own}"]
    return ("\n".join(head + lines) + "\n").encode()


def _dev(rfd: int, pod_dir: str, nodes: bool) -> tuple[str | None, tuple[str, ...]]:
    """Make /dev and, if asked and device nodes work here, its nodes.
    Returns why there are none (or None) and the names made."""
    os.mkdir("dev", 0o700, dir_fd=rfd)
    dfd = os.open("dev", _DIR, dir_fd=rfd)
    try:
        os.fchmod(dfd, 0o755)
        if not nodes:
            return "no /dev nodes were asked for", ()
        # Linux reports nodev in statvfs; OpenBSD's statvfs(3) carries only
        # ST_RDONLY and ST_NOSUID, so there the probe below is what tells.
        nodev = getattr(os, "ST_NODEV", 0)
        if nodev and os.fstatvfs(dfd).f_flag & nodev:
            return (f"the file system of {pod_dir} is mounted nodev: pods get no "
                    "/dev (null, zero, random...); move the pods directory to a "
                    "file system mounted without nodev"), ()
        made = []
        for name, mode in DEVICES:
            try:
                host = os.stat(f"/dev/{name}")
            except FileNotFoundError:
                continue
            if not stat.S_ISCHR(host.st_mode):
                continue
            try:
                os.mknod(name, stat.S_IFCHR | 0o600, host.st_rdev, dir_fd=dfd)
            except OSError as e:
                _empty(dfd, made)
                return f"cannot make device nodes in {pod_dir}: {e.strerror}", ()
            made.append(name)
            os.chmod(name, mode, dir_fd=dfd)
        if "null" in made:
            try:
                os.close(os.open("null", os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 dir_fd=dfd))
            except OSError as e:
                _empty(dfd, made)
                return (f"device nodes do not work on the file system of {pod_dir} "
                        f"({e.strerror}; is it mounted nodev?): pods get no /dev"), ()
        return None, tuple(made)
    finally:
        os.close(dfd)


def _empty(dfd: int, names: list[str]) -> None:
    for n in names:
        os.unlink(n, dir_fd=dfd)


def _open_pod_dir(pod_dir: str) -> int:
    try:
        os.mkdir(pod_dir, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise PodRootError(f"{pod_dir}: cannot create: {e.strerror}") from None
    try:
        fd = os.open(pod_dir, _DIR)
    except OSError as e:
        raise PodRootError(f"{pod_dir}: {e.strerror} (a symlink?)") from None
    st = os.fstat(fd)
    if st.st_uid != 0 or stat.S_IMODE(st.st_mode) & 0o077:
        # Only root may reach a pod's files from the host side: a pod uid
        # that could would read other pods' /tmp through it.
        os.fchown(fd, 0, 0)
        os.fchmod(fd, 0o700)
    return fd


def _clear_stale(pfd: int, name: str) -> None:
    try:
        _remove_at(pfd, name)
    except FileNotFoundError:
        pass


# -- removing --------------------------------------------------------------------

def _remove_at(pfd: int, name: str) -> None:
    """Remove pfd/name, whatever it is, without following symlinks."""
    try:
        fd = os.open(name, _DIR, dir_fd=pfd)
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        _unlink(pfd, name)      # a file or a symlink
        return
    try:
        _clear(fd)
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=pfd)
    except FileNotFoundError:
        pass


def _unlink(dfd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except FileNotFoundError:
        pass


def _clear(top: int) -> None:
    """Empty the directory top.  Iterative, one fd per level down to
    _REMOVE_DEPTH; deeper directories are renamed up into top and emptied
    from there."""
    # Each level: its fd, its name in the level above, entries left to do
    # as (name, is a directory by d_type).
    stack: list[tuple[int, str, list[tuple[str, bool]]]] = [(top, "", _list(top))]
    try:
        while stack:
            fd, dname, todo = stack[-1]
            if not todo:
                stack.pop()
                if stack:
                    os.close(fd)
                    _rmdir(stack[-1][0], dname)
                continue
            name, is_dir = todo.pop()
            if not is_dir:
                # d_type saves a syscall per file; should it be stale (the
                # name now a directory), unlink fails and we descend.
                try:
                    os.unlink(name, dir_fd=fd)
                    continue
                except FileNotFoundError:
                    continue
                except OSError as e:
                    if e.errno not in (errno.EISDIR, errno.EPERM):
                        raise
            try:
                sub = os.open(name, _DIR, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError as e:
                if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                _unlink(fd, name)
                continue
            if len(stack) >= _REMOVE_DEPTH:
                os.close(sub)
                up = f".deep-{secrets.token_hex(8)}"
                os.rename(name, up, src_dir_fd=fd, dst_dir_fd=top)
                stack[0][2].append((up, True))
                continue
            stack.append((sub, name, _list(sub)))
    finally:
        for level in stack[1:]:
            os.close(level[0])


def _list(fd: int) -> list[tuple[str, bool]]:
    with os.scandir(fd) as it:
        return [(e.name, e.is_dir(follow_symlinks=False)) for e in it]


def _rmdir(dfd: int, name: str) -> None:
    try:
        os.rmdir(name, dir_fd=dfd)
    except FileNotFoundError:
        pass
