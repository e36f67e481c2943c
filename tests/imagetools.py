"""Build real layers, images and archives for the image tests."""

import gzip
import io
import json
import os
import re
import subprocess
import tarfile
from pathlib import Path

from pufflet.images import oci


def layer(*entries, compress: bool = True, fmt=tarfile.PAX_FORMAT) -> bytes:
    """A tar of entries: ("file", name, data[, mode]), ("dir", name[, mode]),
    ("sym", name, target), ("link", name, target), ("fifo", name),
    ("chr", name), ("blk", name)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt) as tf:
        for e in entries:
            kind, name = e[0], e[1]
            ti = tarfile.TarInfo(name)
            ti.mtime = 1700000000
            data = None
            if kind == "file":
                data = e[2] if isinstance(e[2], bytes) else e[2].encode()
                ti.size = len(data)
                ti.mode = e[3] if len(e) > 3 else 0o644
            elif kind == "dir":
                ti.type, ti.mode = tarfile.DIRTYPE, e[2] if len(e) > 2 else 0o755
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, e[2]
            elif kind == "link":
                ti.type, ti.linkname = tarfile.LNKTYPE, e[2]
            elif kind == "fifo":
                ti.type = tarfile.FIFOTYPE
            elif kind == "chr":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
            elif kind == "blk":
                ti.type = tarfile.BLKTYPE
            else:
                raise ValueError(kind)
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    b = raw.getvalue()
    return gzip.compress(b, mtime=0) if compress else b


def host_libs(binary: str) -> list[str]:
    """The shared libraries ldd(1) says binary needs, the loader included."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    return re.findall(r"(/\S+) \(0x", out)


def host_tools_layer(binaries) -> bytes:
    """A runnable root from the host's own files: each binary in /bin (the
    pods' PATH), its libraries at their own paths, /tmp and /etc."""
    files = {}
    for b in binaries:
        files["/bin/" + os.path.basename(b)] = b
        for lib in host_libs(b):
            files[lib] = lib
    entries, dirs = [], set()
    for dest, src in sorted(files.items()):
        parts = dest.strip("/").split("/")
        for i in range(1, len(parts)):
            dirs.add("/".join(parts[:i]))
        entries.append(("file", dest.strip("/"), Path(os.path.realpath(src)).read_bytes(),
                        0o755))
    entries += [("dir", d) for d in sorted(dirs)] + [("dir", "tmp", 0o1777), ("dir", "etc")]
    return layer(*sorted(entries, key=lambda e: (e[0] != "dir", e[1])))


def put_blob(store, data: bytes) -> str:
    """Through the same calls the pull flow makes."""
    digest = oci.digest_of(data)
    fd, have = store.open_blob(digest, len(data))
    try:
        os.write(fd, data[have:])
    finally:
        os.close(fd)
    store.commit_blob(digest, len(data))
    return digest


def image_blobs(layers: list[bytes], config: dict | None = None, gz: bool = True,
                os_arch=("linux", "amd64"), docker: bool = False):
    """(manifest bytes, media type, {digest: blob}) for these layers."""
    cfg = {"architecture": os_arch[1], "os": os_arch[0],
           "config": config if config is not None else {"Cmd": ["/bin/sh"]},
           "rootfs": {"type": "layers",
                      "diff_ids": [oci.digest_of(gzip.decompress(l) if gz else l)
                                   for l in layers]}}
    cfg_b = json.dumps(cfg).encode()
    blobs = {oci.digest_of(cfg_b): cfg_b}
    lt = (oci.DOCKER_LAYER_GZIP if docker else oci.OCI_LAYER_GZIP) if gz else oci.OCI_LAYER
    descs = []
    for l in layers:
        blobs[oci.digest_of(l)] = l
        descs.append({"mediaType": lt, "digest": oci.digest_of(l), "size": len(l)})
    mt = oci.DOCKER_MANIFEST if docker else oci.OCI_MANIFEST
    man = {"schemaVersion": 2, "mediaType": mt,
           "config": {"mediaType": oci.DOCKER_CONFIG if docker else oci.OCI_CONFIG,
                      "digest": oci.digest_of(cfg_b), "size": len(cfg_b)},
           "layers": descs}
    return json.dumps(man).encode(), mt, blobs


def add_image(store, name: str, layers: list[bytes], **kw):
    man, mt, blobs = image_blobs(layers, **kw)
    for b in blobs.values():
        put_blob(store, b)
    return store.put_manifest(name, man, mt)
