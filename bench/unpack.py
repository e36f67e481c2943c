"""Benchmark: image layer unpacking and pulling against the system tools.

Unpack: a ~100 MiB (uncompressed) gzip layer of mixed file sizes, content
deterministic and only partly compressible, unpacked by pufflet's hostile-
input-safe unpacker (digest check included) and by `tar -xzf` in the same
run.  Best of 3 each; prints MiB/s of tar stream and the ratio
(target >= 0.8).

Each section is a function in SECTIONS; run one with its name as argument.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pufflet.images import oci  # noqa: E402
from pufflet.priv import unpack  # noqa: E402

RUNS = 3
LAYER_MIB = 100


def make_layer(path: str, total: int = LAYER_MIB << 20, seed: int = 1) -> int:
    """Write a gzip tar of about `total` bytes of files; returns the tar size."""
    rng = random.Random(seed)
    noise = rng.randbytes(12 << 20)
    words = [rng.randbytes(rng.randint(2, 9)).hex().encode() for _ in range(2000)]
    text = b" ".join(rng.choices(words, k=1_200_000))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        done, n = 0, 0
        while done < total:
            d = f"usr/share/d{n // 50:03d}"
            if n % 50 == 0:
                ti = tarfile.TarInfo(d)
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(ti)
            r = rng.random()
            size = (rng.randint(100, 16 << 10) if r < 0.80 else
                    rng.randint(64 << 10, 1 << 20) if r < 0.97 else
                    rng.randint(2 << 20, 8 << 20))
            pool = noise if rng.random() < 0.3 else text
            off = rng.randrange(0, len(pool) - size)
            ti = tarfile.TarInfo(f"{d}/f{n:05d}")
            ti.size, ti.mode, ti.mtime = size, 0o644 if n % 7 else 0o755, 1700000000
            tf.addfile(ti, io.BytesIO(pool[off:off + size]))
            done += size
            n += 1
    with open(path, "wb") as f:
        f.write(gzip.compress(raw.getvalue(), compresslevel=6, mtime=0))
    return raw.tell()


def best(fn, runs: int = RUNS) -> float:
    times = []
    for _ in range(runs):
        t = fn()
        times.append(t)
    return min(times)


def bench_unpack() -> None:
    work = tempfile.mkdtemp(prefix="pufflet-bench-")
    try:
        layer = os.path.join(work, "layer.tar.gz")
        tar_bytes = make_layer(layer)
        with open(layer, "rb") as f:
            digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
        mib = tar_bytes / (1 << 20)
        print(f"layer: {mib:.1f} MiB tar, {os.path.getsize(layer) / (1 << 20):.1f} MiB gzip")

        def ours() -> float:
            dest = os.path.join(work, "ours")
            with open(layer, "rb", buffering=0) as f:
                t = time.perf_counter()
                unpack.unpack([unpack.Layer(f, oci.OCI_LAYER_GZIP, digest)], dest)
                t = time.perf_counter() - t
            shutil.rmtree(dest)
            return t

        def tar() -> float:
            dest = os.path.join(work, "tar")
            os.mkdir(dest)
            t = time.perf_counter()
            subprocess.run(["tar", "-xzf", layer, "-C", dest], check=True)
            t = time.perf_counter() - t
            shutil.rmtree(dest)
            return t

        ours(), tar()       # warm the page cache and the code
        t_ours, t_tar = best(ours), best(tar)
        print(f"unpack_mib_s={mib / t_ours:.1f} tar_mib_s={mib / t_tar:.1f} "
              f"ratio={t_tar / t_ours:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)




def bench_pull() -> None:
    # Lives in bench/pull.py (it starts a registry); imported only when run.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import pull
    pull.bench_pull()


SECTIONS = {"unpack": bench_unpack, "pull": bench_pull}


def main() -> None:
    names = sys.argv[1:] or list(SECTIONS)
    for name in names:
        SECTIONS[name]()


if __name__ == "__main__":
    main()
