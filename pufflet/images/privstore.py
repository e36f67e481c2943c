"""The parent's image store as the agent sees it: privsep calls.

The agent never opens a file in the store: the parent opens it and hands
over the fd.  Everything the agent claims (a digest, a size) the parent
checks again before it believes it.
"""

from __future__ import annotations

import os

from pufflet.privsep.channel import Client, Status


class PrivStore:
    def __init__(self, client: Client, timeout: float | None = 600.0) -> None:
        self.client = client
        # Commits re-hash whole blobs in the parent: allow for big layers.
        self.timeout = timeout

    def _call(self, method: str, body: dict):
        return self.client.call(method, body, timeout=self.timeout)

    def has_blob(self, digest: str) -> bool:
        return self._call("BlobStatus", {"digest": digest}).body["present"]

    def open_blob(self, digest: str, size: int) -> tuple[int, int] | None:
        """(write fd, offset to resume from), or None if the blob is
        already committed.  The caller closes the fd."""
        try:
            r = self._call("OpenBlob", {"digest": digest, "size": size})
        except Status as e:
            if e.code == "ALREADY_EXISTS":
                return None
            raise
        return r.fds[0], r.body["offset"]

    def commit_blob(self, digest: str, size: int) -> None:
        self._call("CommitBlob", {"digest": digest, "size": size})

    def put_bytes(self, digest: str, data: bytes) -> None:
        """Store a small blob (a manifest) we hold in memory."""
        opened = self.open_blob(digest, len(data))
        if opened is None:
            return
        fd, offset = opened
        try:
            if offset:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        self.commit_blob(digest, len(data))

    def read_blob(self, digest: str) -> tuple[int, int]:
        """(read fd, size) of a committed blob."""
        r = self._call("ReadBlob", {"digest": digest})
        return r.fds[0], r.body["size"]

    def put_image(self, name: str, manifest_digest: str, media_type: str) -> dict:
        return self._call("PutImage", {"name": name, "manifest_digest": manifest_digest,
                                       "media_type": media_type}).body

    def get_image(self, ref: str) -> dict | None:
        try:
            return self._call("GetImage", {"ref": ref}).body
        except Status as e:
            if e.code == "NOT_FOUND":
                return None
            raise

    def list_images(self) -> list[dict]:
        return self._call("ListImages", {}).body["images"]
