"""Pulling images for pods, agent side: pull policy, shared downloads,
and the kubelet's ErrImagePull / ImagePullBackOff bookkeeping.

A pull resolves the reference to one image manifest (choosing our
platform from an index), then streams each missing blob into a file the
parent opened for it, resuming from what is already there, and asks the
parent to commit it (the parent re-hashes).  The manifest itself is stored
as a blob too, so the parent reads it from its own disk rather than from a
frame, and finally PutImage records the name.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from pufflet.images import auth, oci, registry
from pufflet.images.oci import Platform, host_platform
from pufflet.images.reference import Reference, ReferenceError, parse
from pufflet.privsep.channel import Status

log = logging.getLogger("pufflet.images")

ALWAYS, IF_NOT_PRESENT, NEVER = "Always", "IfNotPresent", "Never"
POLICIES = (ALWAYS, IF_NOT_PRESENT, NEVER)

# The kubelet's image pull backoff (pkg/kubelet/kubelet.go: backOffPeriod
# and MaxContainerBackOff): 10 s doubling to 300 s.
BACKOFF_INITIAL = 10.0
BACKOFF_MAX = 300.0
# Attempts at one blob within one pull before giving up; each resumes.
BLOB_ATTEMPTS = 3


class PullError(Exception):
    """reason is what the container status shows as waiting.reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class Backoff:
    """Per-key exponential backoff, the way the kubelet's flowcontrol
    Backoff is used for image pulls: a failure starts (or doubles) a delay;
    while it runs, callers are told to back off instead of trying; a key
    left alone for twice the maximum starts over from the initial delay."""

    @dataclass
    class Entry:
        delay: float
        until: float
        last_failure: float
        message: str

    def __init__(self, initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.initial = initial
        self.maximum = maximum
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, Backoff.Entry] = {}

    def failed(self, key: str, message: str) -> float:
        """Record a failure; returns the delay now in force."""
        now = self.clock()
        with self._lock:
            e = self._entries.get(key)
            if e is None or now - e.last_failure > 2 * self.maximum:
                delay = self.initial
            else:
                delay = min(e.delay * 2, self.maximum)
            self._entries[key] = Backoff.Entry(delay, now + delay, now, message)
            return delay

    def waiting(self, key: str) -> Entry | None:
        """The entry if key is still inside its delay, else None."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or self.clock() >= e.until:
                return None
            return e

    def reset(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def gc(self) -> None:
        """Forget keys that have not failed for a long time."""
        now = self.clock()
        with self._lock:
            for k in [k for k, e in self._entries.items()
                      if now - e.last_failure > 2 * self.maximum]:
                del self._entries[k]


class Puller:
    """One per agent.  pull() may be called from many threads at once."""

    def __init__(self, store, client: registry.Client,
                 platform: Platform | None = None, backoff: Backoff | None = None,
                 blob_attempts: int = BLOB_ATTEMPTS) -> None:
        self.store = store              # a PrivStore, or anything alike
        self.client = client
        self.platform = platform or host_platform()
        self.backoff = backoff or Backoff()
        self.blob_attempts = blob_attempts
        self._lock = threading.Lock()
        self._inflight: dict[tuple, Future] = {}
        self._blob_locks: dict[str, threading.Lock] = {}
        self._states: dict[str, tuple[str, str]] = {}

    # -- the kubelet-facing side ------------------------------------------------

    def pull(self, image: str, policy: str = IF_NOT_PRESENT,
             pull_secrets: Iterable[Mapping | bytes | str] = (),
             platform: Platform | None = None) -> dict:
        """Make sure the image is stored; returns its summary (name, names,
        digest, size, os, architecture).  Raises PullError with the
        kubelet's reasons: InvalidImageName, ErrImageNeverPull,
        ImagePullBackOff, ErrImagePull."""
        if policy not in POLICIES:
            raise ValueError(f"unknown pull policy {policy!r}")
        try:
            ref = parse(image)
        except ReferenceError as e:
            raise PullError("InvalidImageName", str(e)) from None
        key = str(ref)
        if policy != ALWAYS:
            have = self.store.get_image(key)
            if have is not None:
                self._forget(key)
                return have
            if policy == NEVER:
                msg = f'Container image "{image}" is not present with pull policy of Never'
                self._set_state(key, "ErrImageNeverPull", msg)
                raise PullError("ErrImageNeverPull", msg)
        waiting = self.backoff.waiting(key)
        if waiting is not None:
            msg = f'Back-off pulling image "{image}": {waiting.message}'
            self._set_state(key, "ImagePullBackOff", msg)
            raise PullError("ImagePullBackOff", msg)
        try:
            keyring = auth.Keyring.from_secrets(pull_secrets)
        except auth.CredentialsError as e:
            raise PullError("ErrImagePull", f"image pull secret: {e}") from None
        try:
            summary = self._shared(ref, platform or self.platform, keyring)
        except (registry.RegistryError, Status, OSError) as e:
            msg = f'failed to pull image "{image}": {e}'
            self._set_state(key, "ErrImagePull", msg)
            raise PullError("ErrImagePull", msg) from None
        self.backoff.reset(key)
        self._forget(key)
        return summary

    def state(self, image: str) -> tuple[str, str] | None:
        """(reason, message) of the last failed pull of image, None once it
        succeeded: what a container's waiting state shows.  While a backoff
        runs the reason is ImagePullBackOff."""
        try:
            key = str(parse(image))
        except ReferenceError as e:
            return ("InvalidImageName", str(e))
        with self._lock:
            st = self._states.get(key)
        if st and st[0] == "ErrImagePull" and self.backoff.waiting(key):
            return ("ImagePullBackOff", f'Back-off pulling image "{image}": {st[1]}')
        return st

    def _set_state(self, key: str, reason: str, message: str) -> None:
        with self._lock:
            self._states[key] = (reason, message)

    def _forget(self, key: str) -> None:
        with self._lock:
            self._states.pop(key, None)

    # -- one download per reference ------------------------------------------------

    def _shared(self, ref: Reference, platform: Platform, keyring: auth.Keyring) -> dict:
        key = (str(ref), platform)
        with self._lock:
            fut = self._inflight.get(key)
            leader = fut is None
            if leader:
                fut = self._inflight[key] = Future()
        if not leader:
            return fut.result()
        try:
            result = self._pull(ref, platform, keyring)
        except BaseException as e:
            # Counted once, by the leader: the followers share its failure.
            self.backoff.failed(str(ref), str(e))
            fut.set_exception(e)
            raise
        else:
            fut.set_result(result)
            return result
        finally:
            with self._lock:
                del self._inflight[key]

    def _pull(self, ref: Reference, platform: Platform, keyring: auth.Keyring) -> dict:
        t0 = time.monotonic()
        repo = self.client.repository(ref, keyring)
        res = repo.resolve(platform)
        for desc in res.blobs:
            self._blob(repo, desc)
        self.store.put_bytes(res.digest, res.manifest)
        # The store checks that a name's digest is the manifest's: a pull
        # by an index's digest is recorded under the manifest it chose.
        name = str(ref) if ref.digest is None else f"{ref.name}@{res.digest}"
        summary = self.store.put_image(name, res.digest, res.media_type)
        log.info("pulled %s (%s, %d bytes) in %.1fs", ref, res.digest[:19], res.size,
                 time.monotonic() - t0)
        return summary

    def _blob_lock(self, digest: str) -> threading.Lock:
        with self._lock:
            return self._blob_locks.setdefault(digest, threading.Lock())

    def _blob(self, repo: registry.Repository, desc) -> None:
        """Fetch one blob unless stored; two pulls sharing a layer must not
        write the same incoming file at once, hence the lock."""
        with self._blob_lock(desc.digest):
            last: Exception | None = None
            for attempt in range(self.blob_attempts):
                opened = self.store.open_blob(desc.digest, desc.size)
                if opened is None:
                    return                      # committed already
                fd, offset = opened
                try:
                    repo.fetch_blob(desc, fd, offset)
                except registry.Incomplete as e:
                    # What arrived stays in the parent's incoming file: the
                    # next attempt (or the next pull) resumes from there.
                    last = e
                    log.info("%s; resuming (attempt %d)", e, attempt + 2)
                    continue
                except registry.VerifyError:
                    # Let the parent's check discard the bad bytes, so the
                    # next pull starts clean; its verdict is not news.
                    self._discard(desc)
                    raise
                finally:
                    os.close(fd)
                try:
                    self.store.commit_blob(desc.digest, desc.size)
                except Status as e:
                    if e.code == "DATA_LOSS":
                        raise registry.VerifyError(
                            f"blob {desc.digest[:19]}: {e.message}") from None
                    raise
                return
            assert last is not None
            raise last

    def _discard(self, desc) -> None:
        try:
            self.store.commit_blob(desc.digest, desc.size)
        except Status:
            pass


def push(store, client: registry.Client, image: str, dest: str,
         pull_secrets: Iterable[Mapping | bytes | str] = ()) -> str:
    """Push a stored image to dest; returns the manifest digest."""
    have = store.get_image(str(parse(image)))
    if have is None:
        raise registry.NotFound(f"{image}: no such image in the store")
    keyring = auth.Keyring.from_secrets(pull_secrets)
    repo = client.repository(dest, keyring, push=True)
    return repo.push(_StoredImage(store, have))


class _StoredImage:
    """A stored image as registry.Repository.push() wants it."""

    def __init__(self, store, summary: dict) -> None:
        self.store = store
        fd, size = store.read_blob(summary["digest"])
        try:
            self.manifest = _read_all(fd, registry.MAX_MANIFEST)
        finally:
            os.close(fd)
        if registry.sha256(self.manifest) != summary["digest"]:
            raise registry.VerifyError(f"stored manifest {summary['digest'][:19]} is corrupt")
        # The store keeps manifests as blobs; their own mediaType says
        # what they are (OCI makes it optional: then it is OCI's).
        try:
            mt = json.loads(self.manifest).get("mediaType") or oci.OCI_MANIFEST
        except (ValueError, AttributeError):
            raise registry.VerifyError(f"stored manifest {summary['digest'][:19]} is not JSON") from None
        self.media_type = mt
        m = oci.parse_manifest(self.manifest, mt)
        self._blobs = [(d.digest, d.size) for d in (m.config, *m.layers)]

    def blobs(self):
        return self._blobs

    def open_blob(self, digest: str) -> int:
        fd, _ = self.store.read_blob(digest)
        return fd


def _read_all(fd: int, cap: int) -> bytes:
    chunks, n = [], 0
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            return b"".join(chunks)
        n += len(b)
        if n > cap:
            raise registry.VerifyError(f"more than {cap} bytes")
        chunks.append(b)
