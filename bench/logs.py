"""Benchmark: container log writer and reader against a plain copy.

A container's output (64 MiB of lines of a given length) is fed to
LogWriter in 64 KiB reads, as the parent's selector loop will, then read
back with read_logs as `kubectl logs` would, plain and with timestamps.
The baseline is a cat-like 64 KiB read/write copy of the same bytes in
the same run.  Best of 3; MiB/s are of container output (content bytes),
ratios against the copy.  Target: writer >= 100 MiB/s on short lines.

    python3 bench/logs.py [line_length ...]     (default: 16 80 1000)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pufflet.logs import LogWriter, read_logs  # noqa: E402

TOTAL = 64 << 20
READ = 65536


def best(f, n=3):
    t = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        t = min(t, time.perf_counter() - t0)
    return t


def run(length: int, tmp: str) -> None:
    line = (b"x" * (length - 1)) + b"\n"
    chunk = line * max(1, READ // length)
    src = os.path.join(tmp, "src")
    with open(src, "wb") as f:
        for _ in range(TOTAL // len(chunk)):
            f.write(chunk)
    size = os.path.getsize(src)
    logdir = os.path.join(tmp, "logs")

    def copy():
        with open(src, "rb", buffering=0) as f, open(os.path.join(tmp, "copy"), "wb",
                                                     buffering=0) as g:
            while b := f.read(READ):
                g.write(b)

    def write():
        shutil.rmtree(logdir, ignore_errors=True)
        w = LogWriter(logdir, 0, max_size=1 << 40)
        with open(src, "rb", buffering=0) as f:
            while b := f.read(READ):
                w.feed("stdout", b)
        w.close()

    def read(**kw):
        n = 0
        for b in read_logs([os.path.join(logdir, "0.log")], **kw):
            n += len(b)
        assert n >= size

    mib = size / 2**20
    base = mib / best(copy)
    wr = mib / best(write)
    rd = mib / best(read)
    rdt = mib / best(lambda: read(timestamps=True))
    rds = mib / best(lambda: read(stream="stdout"))
    print(f"lines of {length:5d} B: copy {base:6.0f} MiB/s | writer {wr:5.0f} ({wr / base:.2f}x) | "
          f"reader {rd:5.0f} ({rd / base:.2f}x) | +timestamps {rdt:5.0f} ({rdt / base:.2f}x) | "
          f"stream=stdout {rds:5.0f} ({rds / base:.2f}x)")


def main() -> None:
    lengths = [int(a) for a in sys.argv[1:]] or [16, 80, 1000]
    tmp = tempfile.mkdtemp(prefix="pufflet-bench-logs-")
    try:
        for n in lengths:
            run(n, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
