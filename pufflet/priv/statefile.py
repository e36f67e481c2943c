"""State that must survive a crash: small JSON files under the state dir.

Only the root parent writes these.  A write goes to a new temp file in
the same directory, is fsync(2)ed, renamed over the old file, and the
directory is fsync(2)ed too: after a crash (of pufflet or of the
machine) the file holds the old state or the new one, never half of
either.  A temp file left by a crash is swept on the next read.

A missing file is normal (first start) and yields the caller's default.
A file that does not parse is not: guessing would hand a running pod's
uid to another pod, so reading it fails loudly, naming the file.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from typing import Any

__all__ = ["StateError", "write_json", "read_json"]

# State files hold allocation tables, not data: anything this big is not
# ours, and reading it whole would be a way to exhaust memory.
MAX_SIZE = 16 << 20

_TMP_MARK = ".tmp-"


class StateError(Exception):
    """A state file cannot be read or written; the message names it."""


def _tmp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}{_TMP_MARK}"


def fsync_dir(path: str) -> None:
    """Make a rename or create in path durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str, obj: Any) -> None:
    """Replace path with obj as JSON, atomically and durably (mode 0600)."""
    try:
        # Compact, on one line: json only uses its C encoder without
        # indent, and the pod table is written at every container start
        # and exit, whole -- pretty-printed, 100 pods cost ~10 ms a write.
        data = (json.dumps(obj, sort_keys=True, separators=(",", ":"),
                           allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise StateError(f"{path}: cannot encode state: {e}") from None
    d = os.path.dirname(path) or "."
    # The pid says whose it is (see _sweep); the random part keeps two
    # writers of one pid (a forked child, say) apart.
    tmp = os.path.join(d, f"{_tmp_prefix(path)}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StateError(f"{path}: cannot write state: {e.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)        # whatever the umask said
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise StateError(f"{path}: cannot write state: {e.strerror}") from None
        raise
    try:
        fsync_dir(d)
    except OSError as e:
        raise StateError(f"{path}: written, but syncing {d} failed: {e.strerror}") from None


def read_json(path: str, default: Any) -> Any:
    """The state in path, or default when there is none yet.

    Leftover temp files of path from dead writers are removed first."""
    _sweep(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return default
    except OSError as e:
        raise StateError(f"{path}: cannot read state: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StateError(f"{path}: state file is not a regular file")
        if st.st_size > MAX_SIZE:
            raise StateError(f"{path}: state file is {st.st_size} bytes, more than "
                             f"the {MAX_SIZE} a state file may be")
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except OSError as e:
        raise StateError(f"{path}: cannot read state: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:
        # Never start afresh on our own: the file says which uids running
        # pods have, and forgetting that would hand them out again.
        raise StateError(f"{path}: state file is corrupt ({e}); it was not "
                         "written by pufflet or the disk damaged it: move it "
                         "away only once no pod it describes is running") from None


def _sweep(path: str) -> None:
    """Remove temp files of path whose writer is gone."""
    d = os.path.dirname(path) or "."
    prefix = _tmp_prefix(path)
    try:
        names = [n for n in os.listdir(d) if n.startswith(prefix)]
    except FileNotFoundError:
        return
    for name in names:
        pid = name[len(prefix):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue        # another live writer is in the middle of it
        try:
            os.unlink(os.path.join(d, name))
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
