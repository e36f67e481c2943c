"""Fork the agent and take root away from it for good."""

import logging
import os
import pwd
import socket
from dataclasses import dataclass
from typing import Callable


class DropError(Exception):
    pass


@dataclass(frozen=True)
class Identity:
    name: str
    uid: int
    gid: int


def lookup(user: str) -> Identity:
    """The unprivileged identity the agent runs as; root is never acceptable."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise DropError(f"unknown user {user!r}: create it first") from None
    if pw.pw_uid == 0 or pw.pw_gid == 0:
        raise DropError(f"user {user!r} has uid or gid 0; pick an unprivileged user")
    return Identity(user, pw.pw_uid, pw.pw_gid)


def drop(ident: Identity) -> None:
    """setgroups, setresgid, setresuid (in that order: after setresuid we
    could no longer change groups), then prove there is no way back."""
    os.setgroups([ident.gid])
    os.setresgid(ident.gid, ident.gid, ident.gid)
    os.setresuid(ident.uid, ident.uid, ident.uid)
    verify(ident)


def verify(ident: Identity) -> None:
    if os.getresuid() != (ident.uid,) * 3 or os.getresgid() != (ident.gid,) * 3:
        raise DropError("ids did not change as asked")
    if os.getgroups() not in ([ident.gid], []):
        raise DropError(f"supplementary groups left: {os.getgroups()}")
    for regain in (lambda: os.setuid(0), lambda: os.seteuid(0), lambda: os.setgid(0)):
        try:
            regain()
        except PermissionError:
            continue
        raise DropError("could regain root after dropping privileges")


def spawn(target: Callable[[socket.socket], int]) -> tuple[int, socket.socket]:
    """socketpair + fork. The child runs target(its end) and never returns
    into the caller's code; the parent gets (pid, its end)."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            parent_end.close()
            code = target(child_end)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            logging.getLogger(__name__).exception("child process failed")
        finally:
            os._exit(code)
    child_end.close()
    return pid, parent_end
