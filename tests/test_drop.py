"""Dropping root for real, in forked children."""

import os

import pytest

from pufflet.privsep import drop


def in_child(fn) -> int:
    """Run fn in a forked child; its return value (0..255) is the exit code."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = fn()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_lookup_refuses_root_and_unknown():
    with pytest.raises(drop.DropError, match="uid or gid 0"):
        drop.lookup("root")
    with pytest.raises(drop.DropError, match="unknown user"):
        drop.lookup("no_such_user_x")


def test_verify_notices_root_kept():
    with pytest.raises(drop.DropError):
        drop.verify(drop.lookup("nobody"))


def test_drop_is_final(tmp_path):
    secret = tmp_path / "root-only"
    secret.write_text("key")
    secret.chmod(0o600)
    ident = drop.lookup("nobody")

    def child() -> int:
        drop.drop(ident)
        if os.getresuid() != (ident.uid,) * 3 or os.getgroups() != [ident.gid]:
            return 1
        try:
            open(secret).read()
            return 2
        except PermissionError:
            pass
        for regain in (lambda: os.setresuid(0, 0, 0), lambda: os.setegid(0),
                       lambda: os.setgroups([0])):
            try:
                regain()
                return 3
            except PermissionError:
                pass
        return 0

    assert in_child(child) == 0


def test_spawn_gives_child_its_end():
    def target(sock) -> int:
        sock.sendall(b"hi from %d" % os.getpid())
        return 7

    pid, sock = drop.spawn(target)
    assert sock.recv(64) == b"hi from %d" % pid
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7
