"""Import images from archives into the store (puffletctl image import).

The archive's blobs are copied through the same open_blob/commit_blob
calls a pull uses, so each is hashed by the store; its manifest goes
through put_manifest, so layers meet the same unpacker.  Nothing in an
archive is trusted more than a registry's answer.
"""

from __future__ import annotations

import json
import shutil

from pufflet.images import archive, oci, reference
from pufflet.images.oci import ImageError, Platform
from pufflet.priv.imagestore import Image, Store

NAME_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
MAX_DOCKER_MANIFEST = 1 << 20


def import_image(store: Store, path: str, name: str | None, want: Platform) -> list[Image]:
    """Import what `path` holds; `name` tags the image (required when the
    archive does not name it, and then the archive must hold one image)."""
    src = archive.open_source(path)
    try:
        if src.exists("oci-layout") and src.exists("index.json"):
            return _oci(store, src, name, want)
        if src.exists("manifest.json"):
            return _docker(store, src, name, want)
        raise ImageError(f"{path}: neither an OCI image layout (oci-layout, index.json) "
                         "nor a docker save archive (manifest.json)")
    finally:
        src.close()


def _copy_blob(store: Store, src: archive.Source, desc: oci.Descriptor) -> None:
    if store.has_blob(desc.digest):
        return
    f, size = src.open(f"blobs/sha256/{oci.check_digest(desc.digest)}")
    with f:
        if size != desc.size:
            raise ImageError(f"blob {desc.digest}: {size} bytes in the archive, "
                             f"descriptor says {desc.size}")
        fd, have = store.open_blob(desc.digest, desc.size)
        with open(fd, "wb", closefd=True) as out:
            if have:
                out.truncate(0)
            shutil.copyfileobj(f, out, 1 << 20)
    store.commit_blob(desc.digest, desc.size)


def _read_blob(src: archive.Source, desc: oci.Descriptor, limit: int) -> bytes:
    data = src.read(f"blobs/sha256/{oci.check_digest(desc.digest)}", limit)
    if oci.digest_of(data) != desc.digest:
        raise ImageError(f"blob {desc.digest}: content in the archive does not match")
    return data


def _check_platform(info: oci.ConfigInfo, want: Platform, what: str) -> None:
    if not want.matches(info.platform):
        raise ImageError(f"{what} is for {info.platform}, this node wants {want} "
                         "(choose with -p os/arch)")


def _entry_name(d: oci.Descriptor) -> str | None:
    for key in NAME_ANNOTATIONS:
        v = d.annotation(key)
        if v:
            try:
                # A bare tag ("latest") in ref.name names no repository.
                if "/" in v or ":" in v:
                    return str(reference.parse(v))
            except reference.ReferenceError:
                pass
    return None


def _oci(store: Store, src: archive.Source, name: str | None, want: Platform) -> list[Image]:
    try:
        layout = json.loads(src.read("oci-layout", 4096))
    except ValueError:
        raise ImageError("oci-layout is not valid JSON") from None
    if not isinstance(layout, dict) or not str(layout.get("imageLayoutVersion", "")).startswith("1."):
        raise ImageError("oci-layout: unsupported imageLayoutVersion")
    top = oci.parse_index(src.read("index.json", oci.MAX_INDEX), oci.OCI_INDEX)
    entries = list(top.manifests)
    if not entries:
        raise ImageError("index.json lists no images")
    chosen: list[tuple[oci.Descriptor, str | None]]
    if name is not None:
        wanted = str(reference.parse(name))
        named = [d for d in entries if _entry_name(d) == wanted]
        if named:
            chosen = [(named[0], name)]
        elif len(entries) == 1:
            chosen = [(entries[0], name)]
        elif all(d.platform for d in entries):
            # index.json is itself a multi-platform index.
            chosen = [(oci.select_platform(top, want), name)]
        else:
            raise ImageError(f"the layout holds {len(entries)} images, none named {wanted}")
    else:
        chosen = [(d, _entry_name(d)) for d in entries]
        if any(n is None for _, n in chosen):
            if all(d.platform for d in entries):
                raise ImageError("the layout's images carry no name: give NAME")
            raise ImageError("the layout's images carry no full name: give NAME")
    return [_oci_one(store, src, d, n, want) for d, n in chosen]


def _oci_one(store: Store, src: archive.Source, d: oci.Descriptor, name: str | None,
             want: Platform) -> Image:
    what = name or d.digest
    if d.media_type in oci.INDEX_TYPES:
        index = oci.parse_index(_read_blob(src, d, oci.MAX_INDEX), d.media_type)
        try:
            d = oci.select_platform(index, want)
        except ImageError as e:
            raise ImageError(f"{what}: {e}") from None
    data = _read_blob(src, d, oci.MAX_MANIFEST)
    m = oci.parse_manifest(data, d.media_type)
    info = oci.parse_config(_read_blob(src, m.config, oci.MAX_CONFIG))
    _check_platform(info, want, what)
    for blob in (m.config, *m.layers):
        _copy_blob(store, src, blob)
    return store.put_manifest(name or "", data, d.media_type)


def _layer_type(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return oci.OCI_LAYER_GZIP
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return oci.OCI_LAYER_ZSTD
    return oci.OCI_LAYER


def _ingest(store: Store, src: archive.Source, member: str) -> oci.Descriptor:
    """A docker save file whose digest nobody told us: hash it on the way in."""
    f, size = src.open(member)
    with f, store.blob_writer() as w:
        head = f.read(4)
        w.write(head)
        shutil.copyfileobj(f, w, 1 << 20)
        digest, size = w.commit()
    return oci.Descriptor(_layer_type(head), digest, size)


def _docker(store: Store, src: archive.Source, name: str | None, want: Platform) -> list[Image]:
    try:
        doc = json.loads(src.read("manifest.json", MAX_DOCKER_MANIFEST))
    except ValueError:
        raise ImageError("manifest.json is not valid JSON") from None
    if not isinstance(doc, list) or not doc:
        raise ImageError("manifest.json lists no images")
    if name is not None and len(doc) > 1:
        raise ImageError(f"the archive holds {len(doc)} images: import it without NAME")
    images = []
    for n, e in enumerate(doc):
        if not isinstance(e, dict) or not isinstance(e.get("Config"), str) \
                or not isinstance(e.get("Layers"), list) \
                or not all(isinstance(l, str) for l in e["Layers"]):
            raise ImageError(f"manifest.json entry {n}: want Config and Layers")
        if len(e["Layers"]) > oci.MAX_LAYERS:
            raise ImageError(f"manifest.json entry {n}: too many layers")
        tags = [name] if name else [t for t in e.get("RepoTags") or () if isinstance(t, str)]
        if not tags:
            raise ImageError(f"manifest.json entry {n} has no RepoTags: give NAME")
        cfg = src.read(e["Config"], oci.MAX_CONFIG)
        info = oci.parse_config(cfg)
        _check_platform(info, want, tags[0])
        config = oci.Descriptor(oci.OCI_CONFIG, store.put_blob(cfg), len(cfg))
        layers = [_ingest(store, src, l) for l in e["Layers"]]
        man = oci.manifest_json(config, layers)
        img = store.put_manifest(tags[0], man, oci.OCI_MANIFEST)
        for t in tags[1:]:
            img = store.tag(img.digest, t)
        images.append(img)
    return images
