"""What differs between operating systems: the sandbox, node facts, the
process title.

Every platform module (openbsd, linux, other) provides the same three
functions:

    sandbox(paths, promises, execpromises=None)   restrict this process for good
    node_facts(state_dir) -> dict                 facts for the Node object
    set_title(name)                               process title for ps(1)

Callers pick the module with current() and never test sys.platform
themselves.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from types import ModuleType

# The unveil(2) permission letters: read, write, execute, create/remove.
PERMS = "rwxc"


class SandboxError(Exception):
    """The sandbox could not be applied (or not completely)."""


class SandboxUnavailable(SandboxError):
    """This system has no sandbox mechanism we can use: nothing was applied."""


def current() -> ModuleType:
    """The platform module for the system we run on."""
    if sys.platform.startswith("openbsd"):
        name = "openbsd"
    elif sys.platform.startswith("linux"):
        name = "linux"
    else:
        name = "other"
    # Imported lazily: each module may load libc symbols only its OS has.
    return importlib.import_module(f"{__name__}.{name}")


def check_paths(paths: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Validate (path, perms) pairs before any of them is applied, so a
    typo fails cleanly instead of leaving a half-built sandbox."""
    out = []
    for path, perms in paths:
        if not isinstance(path, str) or not path or "\0" in path:
            raise SandboxError(f"bad sandbox path {path!r}")
        if not isinstance(perms, str) or set(perms) - set(PERMS):
            raise SandboxError(f"{path}: bad permissions {perms!r}, "
                               f"want letters from {PERMS!r}")
        out.append((path, perms))
    return out


def fs_facts(state_dir: str) -> dict:
    """Size and free space of the filesystem holding state_dir.

    state_dir may not exist yet (first start): then we measure its nearest
    existing ancestor, which is where it will be created."""
    path = os.path.abspath(state_dir)
    while True:
        try:
            st = os.statvfs(path)
            break
        except (FileNotFoundError, NotADirectoryError):
            parent = os.path.dirname(path)
            if parent == path:
                raise
            path = parent
    return {
        "state_fs_bytes": st.f_blocks * st.f_frsize,
        # f_bavail, not f_bfree: what a non-root writer can still use.
        "state_fs_free_bytes": st.f_bavail * st.f_frsize,
        "state_fs_inodes": st.f_files,
        # f_ffree, as the kubelet reports inodesFree.
        "state_fs_free_inodes": st.f_ffree,
    }


def uname_facts(u: os.uname_result) -> dict:
    """The facts every platform reads from uname(3)."""
    return {
        "hostname": u.nodename,
        "os_name": u.sysname,
        "os_release": u.release,
        "kernel_version": u.version,
        "machine": u.machine,
    }
