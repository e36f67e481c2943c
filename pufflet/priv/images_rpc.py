"""The parent's image methods: thin checks around the image store.

The spec already bounds every field (digests are sha256 and 64 hex
digits, so they cannot name a path); what is left to check here is what
the spec cannot say: that a reference parses, that a size matches what is
on disk.  Blob bytes never come through here: the agent writes into an fd
we opened, and CommitBlob re-hashes the file before the store keeps it.
"""

from __future__ import annotations

import os

from pufflet.images import oci
from pufflet.images.oci import ImageError
from pufflet.images.reference import ReferenceError, parse
from pufflet.privsep.channel import Status

MAX_LIST = 1024


class ImageRPC:
    def __init__(self, open_store) -> None:
        # Made on first use: a parent that never serves images (or a test
        # with no state directory) never creates the store's directories.
        self._open_store = open_store
        self._store = None

    @property
    def store(self):
        if self._store is None:
            self._store = self._open_store()
        return self._store

    def table(self) -> dict:
        return {"BlobStatus": self.blob_status, "OpenBlob": self.open_blob,
                "CommitBlob": self.commit_blob, "ReadBlob": self.read_blob,
                "PutImage": self.put_image, "GetImage": self.get_image,
                "ListImages": self.list_images}

    def blob_status(self, body: dict, fds: list[int]) -> dict:
        return {"present": bool(self.store.has_blob(body["digest"]))}

    def open_blob(self, body: dict, fds: list[int]) -> tuple[dict, list[int]]:
        digest, size = body["digest"], body["size"]
        if self.store.has_blob(digest):
            raise Status("ALREADY_EXISTS", f"{digest} is stored")
        try:
            fd, offset = self.store.open_blob(digest, size)
        except ImageError as e:
            raise Status("INVALID_ARGUMENT", str(e)) from None
        except OSError as e:
            raise Status("UNAVAILABLE", f"{digest[:19]}: {e.strerror or e}") from None
        return {"offset": offset}, [fd]

    def commit_blob(self, body: dict, fds: list[int]) -> dict:
        digest, size = body["digest"], body["size"]
        try:
            self.store.commit_blob(digest, size)
        except ImageError as e:
            # The store removed the bad bytes; the agent may start over.
            raise Status("DATA_LOSS", str(e)) from None
        except FileNotFoundError:
            raise Status("NOT_FOUND", f"{digest[:19]}: nothing to commit") from None
        except OSError as e:
            raise Status("UNAVAILABLE", f"{digest[:19]}: {e.strerror or e}") from None
        return {"size": size}

    def read_blob(self, body: dict, fds: list[int]) -> tuple[dict, list[int]]:
        digest = body["digest"]
        if not self.store.has_blob(digest):
            raise Status("NOT_FOUND", f"{digest} is not stored")
        try:
            fd = os.open(os.path.join(self.store.blobs, oci.check_digest(digest)),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise Status("UNAVAILABLE", f"{digest[:19]}: {e.strerror or e}") from None
        return {"size": os.fstat(fd).st_size}, [fd]

    def put_image(self, body: dict, fds: list[int]) -> dict:
        try:
            ref = parse(body["name"])
        except ReferenceError as e:
            raise Status("INVALID_ARGUMENT", str(e)) from None
        digest = body["manifest_digest"]
        if not self.store.has_blob(digest):
            raise Status("FAILED_PRECONDITION", f"manifest {digest} is not stored")
        try:
            data = self.store.read_blob(digest, oci.MAX_MANIFEST)
            image = self.store.put_manifest(str(ref), data, body["media_type"])
        except ImageError as e:
            raise Status("FAILED_PRECONDITION", str(e)) from None
        return summary(image)

    def get_image(self, body: dict, fds: list[int]) -> dict:
        image = self._get(body["ref"])
        if image is None:
            raise Status("NOT_FOUND", f"no image {body['ref'][:200]}")
        return summary(image)

    def _get(self, ref: str):
        try:
            return self.store.get(ref)
        except (ImageError, ReferenceError, KeyError, FileNotFoundError):
            return None

    def list_images(self, body: dict, fds: list[int]) -> dict:
        images = list(self.store.list())[:MAX_LIST]
        return {"images": [summary(i) for i in images]}


def summary(image) -> dict:
    """The spec's ImageSummary of a store Image."""
    names = list(image.names)[:64]
    return {"name": names[0] if names else "", "names": names,
            "digest": image.digest, "size": int(image.size),
            "os": image.os[:64], "architecture": image.architecture[:64]}
