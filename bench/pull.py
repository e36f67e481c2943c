"""Benchmark: pulling a blob from a local registry against curl(1).

A ~100 MiB incompressible blob is pushed to Debian's docker-registry on
127.0.0.1 (started here, as the tests do), then fetched by pufflet's
registry client into a file descriptor, sha256 verified on the way, and
by `curl -s -o file` of the same URL, in the same run.  Best of 3 each;
prints MiB/s and the ratio (target >= 0.8).

Run alone (python3 bench/pull.py) or as the "pull" section of
bench/unpack.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import registry as testregistry  # noqa: E402  (tests/registry.py)
from pufflet.images import registry  # noqa: E402
from pufflet.images.oci import Descriptor  # noqa: E402

RUNS = 3
BLOB_MIB = 100


def best(fn, runs: int = RUNS) -> float:
    return min(fn() for _ in range(runs))


def bench_pull() -> None:
    if not shutil.which("curl"):
        sys.exit("bench pull: curl is not installed (apt-get install curl)")
    work = Path(tempfile.mkdtemp(prefix="pufflet-bench-pull-"))
    reg = testregistry.Registry(work / "registry")
    try:
        data = os.urandom(BLOB_MIB << 20)
        digest = reg.push_blob("bench/blob", data)
        size = len(data)
        del data
        url = f"http://{reg.host}/v2/bench/blob/blobs/{digest}"
        client = registry.Client(insecure=[reg.host])
        repo = client.repository(f"{reg.host}/bench/blob:1")
        desc = Descriptor("application/octet-stream", digest, size)
        out = work / "out"

        def ours() -> float:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                t = time.perf_counter()
                repo.fetch_blob(desc, fd)       # hashes and checks the digest
                t = time.perf_counter() - t
            finally:
                os.close(fd)
            return t

        def curl() -> float:
            t = time.perf_counter()
            subprocess.run(["curl", "-s", "-f", "-o", str(out), url], check=True)
            return time.perf_counter() - t

        ours(), curl()      # warm the registry's page cache and our code
        t_ours, t_curl = best(ours), best(curl)
        mib = size / (1 << 20)
        print(f"blob: {mib:.0f} MiB from docker-registry on {reg.host}")
        print(f"pull_mib_s={mib / t_ours:.1f} curl_mib_s={mib / t_curl:.1f} "
              f"ratio={t_curl / t_ours:.2f}")
    finally:
        client.close()
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    bench_pull()
