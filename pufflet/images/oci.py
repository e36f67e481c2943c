"""OCI and Docker image formats: media types, digests, manifests, configs.

Everything here parses bytes that came from outside (a registry, an archive
an admin was handed) so every parser bounds its input first, checks types
field by field and raises ImageError naming what is wrong.  Nothing here
touches the network or writes files.
"""

import hashlib
import json
import platform as _platform
import re
import sys
from dataclasses import dataclass
from typing import Any

# Media types ------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
# Layer media type -> compression ("" for a plain tar).
LAYER_TYPES = {
    OCI_LAYER: "", OCI_LAYER_ND: "", DOCKER_LAYER: "",
    OCI_LAYER_GZIP: "gzip", OCI_LAYER_ND_GZIP: "gzip",
    DOCKER_LAYER_GZIP: "gzip", DOCKER_LAYER_FOREIGN: "gzip",
    OCI_LAYER_ZSTD: "zstd", OCI_LAYER_ND_ZSTD: "zstd",
}

# Bounds ------------------------------------------------------------------
# containerd refuses manifests above 4 MiB too; real ones are a few KiB.
MAX_MANIFEST = 4 << 20
MAX_INDEX = 4 << 20
MAX_CONFIG = 8 << 20
MAX_LAYERS = 256
MAX_INDEX_ENTRIES = 1024
# The hard cap on any one blob the store accepts.
MAX_BLOB = 16 << 30
MAX_STRING = 64 << 10

_HEX = re.compile(r"[0-9a-f]{64}")


class ImageError(Exception):
    """What is wrong with which image, blob or archive entry."""


# Digests -------------------------------------------------------------------

def check_digest(digest: Any) -> str:
    """Return the hex part of a "sha256:<64 hex>" digest or raise ImageError.

    Only sha256: the hex part becomes a file name, so anything looser
    would let a digest name a path."""
    if not isinstance(digest, str) or not digest.startswith("sha256:") \
            or not _HEX.fullmatch(digest[7:]):
        raise ImageError(f"invalid digest {str(digest)[:80]!r}: want sha256:<64 lowercase hex>")
    return digest[7:]


def is_digest(s: Any) -> bool:
    try:
        check_digest(s)
        return True
    except ImageError:
        return False


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# Platforms -----------------------------------------------------------------

# uname -m / Python's platform.machine() -> GOARCH (and variant).
_GOARCH = {
    "x86_64": ("amd64", None), "amd64": ("amd64", None),
    "i386": ("386", None), "i486": ("386", None), "i586": ("386", None),
    "i686": ("386", None),
    "aarch64": ("arm64", None), "arm64": ("arm64", None),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "armv7": ("arm", "v7"),
    "riscv64": ("riscv64", None), "ppc64le": ("ppc64le", None),
    "powerpc64": ("ppc64", None), "s390x": ("s390x", None),
    "mips64": ("mips64", None), "mips64el": ("mips64le", None),
    "octeon": ("mips64", None), "loongson": ("mips64le", None),
    "sparc64": ("sparc64", None),
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        s = f"{self.os}/{self.architecture}"
        return s + f"/{self.variant}" if self.variant else s

    def matches(self, other: "Platform") -> bool:
        """Does an image for `other` run here?  A missing variant on
        either side is a match, as containerd's default matcher does."""
        return (self.os == other.os and self.architecture == other.architecture
                and (not self.variant or not other.variant or self.variant == other.variant))


def parse_platform(s: str) -> Platform:
    """"os/arch[/variant]", e.g. "openbsd/amd64" or "linux/arm/v7"."""
    parts = s.split("/")
    if not 2 <= len(parts) <= 3 or not all(re.fullmatch(r"[a-z0-9_]+", p) for p in parts):
        raise ImageError(f"invalid platform {s!r}: want os/arch[/variant]")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def host_platform() -> Platform:
    """This machine, in Go's GOOS/GOARCH names as image indexes use them."""
    osname = re.sub(r"[0-9.]+$", "", sys.platform)   # "openbsd7" -> "openbsd"
    machine = _platform.machine().lower()
    arch, variant = _GOARCH.get(machine, (machine, None))
    return Platform(osname, arch, variant)


# Descriptors, manifests, indexes ---------------------------------------------

@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: tuple[tuple[str, str], ...] = ()

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]


def _load_json(data: bytes, limit: int, what: str) -> dict:
    if len(data) > limit:
        raise ImageError(f"{what} is {len(data)} bytes, more than the {limit} allowed")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise ImageError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ImageError(f"{what} is not a JSON object")
    return doc


def _str(v: Any, what: str, limit: int = MAX_STRING) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise ImageError(f"{what} must be a string of at most {limit} characters")
    return v


def _descriptor(d: Any, what: str, max_size: int = MAX_BLOB) -> Descriptor:
    if not isinstance(d, dict):
        raise ImageError(f"{what} is not an object")
    mt = _str(d.get("mediaType"), f"{what} mediaType", 255)
    try:
        check_digest(d.get("digest"))
    except ImageError as e:
        raise ImageError(f"{what}: {e}") from None
    size = d.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{what} size must be a non-negative integer")
    if size > max_size:
        raise ImageError(f"{what} {d['digest']} declares {size} bytes, more than the "
                         f"{max_size} allowed")
    plat = None
    if d.get("platform") is not None:
        p = d["platform"]
        if not isinstance(p, dict):
            raise ImageError(f"{what} platform is not an object")
        variant = p.get("variant")
        plat = Platform(_str(p.get("os"), f"{what} platform os", 64),
                        _str(p.get("architecture"), f"{what} platform architecture", 64),
                        _str(variant, f"{what} platform variant", 64) if variant else None)
    ann = d.get("annotations") or {}
    if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in ann.items()):
        raise ImageError(f"{what} annotations must map strings to strings")
    return Descriptor(mt, d["digest"], size, plat, tuple(sorted(ann.items())))


def _check_schema(doc: dict, media_type: str, what: str) -> None:
    if doc.get("schemaVersion") != 2:
        raise ImageError(f"{what}: schemaVersion {doc.get('schemaVersion')!r} is not supported")
    # OCI makes mediaType optional in the document; when present it must
    # agree with what the registry or the parent descriptor said.
    if "mediaType" in doc and doc["mediaType"] != media_type:
        raise ImageError(f"{what}: mediaType {str(doc['mediaType'])[:100]!r} does not match "
                         f"{media_type!r}")


def parse_manifest(data: bytes, media_type: str) -> Manifest:
    """An image manifest (OCI or Docker schema 2), sizes bounded."""
    if media_type not in MANIFEST_TYPES:
        if media_type in INDEX_TYPES:
            raise ImageError(f"{media_type} is an index: pick a platform's manifest first")
        raise ImageError(f"unsupported manifest media type {media_type[:100]!r}")
    doc = _load_json(data, MAX_MANIFEST, "manifest")
    _check_schema(doc, media_type, "manifest")
    config = _descriptor(doc.get("config"), "manifest config", MAX_CONFIG)
    if config.media_type not in CONFIG_TYPES:
        raise ImageError(f"manifest config has media type {config.media_type!r}: "
                         "not a container image")
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ImageError("manifest layers must be a list")
    if len(layers) > MAX_LAYERS:
        raise ImageError(f"manifest has {len(layers)} layers, more than the {MAX_LAYERS} allowed")
    descs = tuple(_descriptor(l, f"layer {i}") for i, l in enumerate(layers))
    for i, l in enumerate(descs):
        if l.media_type not in LAYER_TYPES:
            raise ImageError(f"layer {i} {l.digest}: unsupported layer media type "
                             f"{l.media_type[:100]!r}")
    total = sum(l.size for l in descs) + config.size
    if total > MAX_BLOB:
        raise ImageError(f"manifest declares {total} bytes of blobs, more than the "
                         f"{MAX_BLOB} allowed")
    return Manifest(media_type, config, descs)


def parse_index(data: bytes, media_type: str = OCI_INDEX) -> Index:
    """An OCI image index or a Docker manifest list."""
    if media_type not in INDEX_TYPES:
        raise ImageError(f"unsupported index media type {media_type[:100]!r}")
    doc = _load_json(data, MAX_INDEX, "index")
    _check_schema(doc, media_type, "index")
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise ImageError("index manifests must be a list")
    if len(entries) > MAX_INDEX_ENTRIES:
        raise ImageError(f"index has {len(entries)} entries, more than {MAX_INDEX_ENTRIES}")
    return Index(media_type, tuple(_descriptor(e, f"index entry {i}", MAX_MANIFEST)
                                   for i, e in enumerate(entries)))


def select_platform(index: Index, want: Platform) -> Descriptor:
    """The index entry for `want`; the error lists what the index offers."""
    offered = []
    for d in index.manifests:
        if d.platform is None:
            continue
        # Attestations (buildkit's "unknown/unknown") are not images.
        if d.platform.os == "unknown":
            continue
        offered.append(str(d.platform))
        if d.media_type in MANIFEST_TYPES and want.matches(d.platform):
            return d
    raise ImageError(f"no image for {want} in the index; it offers: "
                     + (", ".join(offered) or "no platform-specific images"))


# Image configuration ---------------------------------------------------------

@dataclass(frozen=True)
class ImageConfig:
    entrypoint: tuple[str, ...] | None
    cmd: tuple[str, ...] | None
    env: tuple[str, ...]
    working_dir: str
    user: str
    stop_signal: str | None
    exposed_ports: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]

    def to_json(self) -> dict:
        return {"Entrypoint": list(self.entrypoint) if self.entrypoint is not None else None,
                "Cmd": list(self.cmd) if self.cmd is not None else None,
                "Env": list(self.env), "WorkingDir": self.working_dir, "User": self.user,
                "StopSignal": self.stop_signal,
                "ExposedPorts": {p: {} for p in self.exposed_ports},
                "Labels": dict(self.labels)}


EMPTY_CONFIG = ImageConfig(None, None, (), "", "", None, (), ())


@dataclass(frozen=True)
class ConfigInfo:
    """What the store keeps from an image config blob."""
    config: ImageConfig
    platform: Platform
    diff_ids: tuple[str, ...]


def _strlist(v: Any, what: str) -> tuple[str, ...] | None:
    if v is None:
        return None
    if not isinstance(v, list) or len(v) > 4096:
        raise ImageError(f"image config {what} must be a list of strings")
    return tuple(_str(s, f"image config {what} entry") for s in v)


def _strmap(v: Any, what: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, dict) or len(v) > 4096:
        raise ImageError(f"image config {what} must be an object")
    return v


def parse_config(data: bytes) -> ConfigInfo:
    doc = _load_json(data, MAX_CONFIG, "image config")
    c = doc.get("config")
    if c is None:
        c = {}
    if not isinstance(c, dict):
        raise ImageError("image config 'config' is not an object")
    env = _strlist(c.get("Env"), "Env") or ()
    for e in env:
        if "=" not in e or "\0" in e:
            raise ImageError(f"image config Env entry {e[:80]!r} is not NAME=value")
    labels = _strmap(c.get("Labels"), "Labels")
    labels_t = tuple(sorted((_str(k, "label name", 1024), _str(v, "label value"))
                            for k, v in labels.items()))
    ports = tuple(sorted(_str(p, "exposed port", 64)
                         for p in _strmap(c.get("ExposedPorts"), "ExposedPorts")))
    stop = c.get("StopSignal")
    cfg = ImageConfig(
        entrypoint=_strlist(c.get("Entrypoint"), "Entrypoint"),
        cmd=_strlist(c.get("Cmd"), "Cmd"),
        env=env,
        working_dir=_str(c.get("WorkingDir") or "", "WorkingDir", 4096),
        user=_str(c.get("User") or "", "User", 256),
        stop_signal=_str(stop, "StopSignal", 32) if stop else None,
        exposed_ports=ports,
        labels=labels_t)
    variant = doc.get("variant")
    plat = Platform(_str(doc.get("os") or "", "os", 64),
                    _str(doc.get("architecture") or "", "architecture", 64),
                    _str(variant, "variant", 64) if variant else None)
    rootfs = doc.get("rootfs")
    diff_ids: tuple[str, ...] = ()
    if rootfs is not None:
        if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
            raise ImageError("image config rootfs must be {\"type\": \"layers\", ...}")
        ids = rootfs.get("diff_ids")
        if not isinstance(ids, list) or len(ids) > MAX_LAYERS:
            raise ImageError("image config rootfs.diff_ids must be a list")
        for d in ids:
            check_digest(d)
        diff_ids = tuple(ids)
    return ConfigInfo(cfg, plat, diff_ids)


def config_json(cfg: ImageConfig, plat: Platform, diff_ids: list[str],
                created: str | None = None) -> bytes:
    """An OCI image config blob, for images built or imported here."""
    doc: dict[str, Any] = {"architecture": plat.architecture, "os": plat.os}
    if plat.variant:
        doc["variant"] = plat.variant
    if created:
        doc["created"] = created
    c = {k: v for k, v in cfg.to_json().items() if v not in (None, "", [], {})}
    doc["config"] = c
    doc["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def manifest_json(config: Descriptor, layers: list[Descriptor],
                  annotations: dict[str, str] | None = None) -> bytes:
    """An OCI image manifest for the given blobs."""
    def desc(d: Descriptor) -> dict:
        return {"mediaType": d.media_type, "digest": d.digest, "size": d.size}
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": desc(config), "layers": [desc(l) for l in layers]}
    if annotations:
        doc["annotations"] = annotations
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
