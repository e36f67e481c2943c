"""Run a real pufflet daemon for tests and read what it logs."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def write_config(tmp: Path, extra: str = "", user: str = "nobody") -> Path:
    cfg = tmp / "pufflet.conf"
    cfg.write_text(
        f'user "{user}"\n'
        f'state directory "{tmp}/state"\n'
        f'log directory "{tmp}/log"\n'
        f'node name "test-node"\n' + extra)
    return cfg


# Plays init for the daemon under it: a subreaper (prctl(2)
# PR_SET_CHILD_SUBREAPER) that reaps whatever is orphaned below it, as
# init does on a real machine (this machine's pid 1 reaps nothing, so a
# container outliving a killed pufflet would stay a zombie).  It prints
# pufflet's pid, and exits once nothing is left below it.
_REAPER = """
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
print(pid, flush=True)
signal.signal(signal.SIGTERM, lambda *a: os.kill(pid, signal.SIGTERM))
while True:
    try:
        os.wait()
    except ChildProcessError:
        sys.exit(0)
    except InterruptedError:
        pass
"""


class Daemon:
    """pufflet -d in a subprocess; stderr is collected line by line.
    subreaper: run it below a reaper that plays init (see _REAPER); pid
    is still pufflet's."""

    def __init__(self, cfg: Path, *flags: str, subreaper: bool = False) -> None:
        argv = [sys.executable, "-m", "pufflet", "-d", *flags, "-f", str(cfg)]
        if subreaper:
            argv = [sys.executable, "-c", _REAPER, *argv]
        self.proc = subprocess.Popen(
            argv, cwd=REPO, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if subreaper else subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        self._pid = int(self.proc.stdout.readline()) if subreaper else self.proc.pid
        self.reaper = self.proc.pid if subreaper else None
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self._pid

    def wait_for(self, pattern: str, timeout: float = 10.0, after: int = 0) -> re.Match:
        """First log line matching pattern at index >= after."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[after:]:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no log line matching {pattern!r}:\n" + "\n".join(self.lines))
                self._cond.wait(min(left, 0.2))

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def children(self) -> list[int]:
        return children(self.pid)

    def stop(self) -> int:
        if self.reaper is not None:
            # pufflet goes; what it leaves running (the logger, pods) is
            # init's again, as after a real stop.
            try:
                os.kill(self._pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            wait_until(lambda: not alive(self._pid), 10)
            self.proc.kill()
            return self.proc.wait()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def alive(pid: int) -> bool:
    try:
        st = status(pid)
    except FileNotFoundError:
        return False
    return not st["State"].startswith("Z")


def wait_until(pred, timeout: float = 5.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()
