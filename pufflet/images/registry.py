"""OCI distribution (registry v2) client, agent side.

Everything here faces the network and trusts nothing it reads: manifests
are size-capped before parsing and hashed against the digest we asked for
(or the one the registry claimed); descriptor sizes are capped before a
byte of a blob is fetched, so a "manifest bomb" is refused up front; blob
bodies are counted and hashed as they stream into a file descriptor the
parent opened.  The parent hashes every blob again before it uses it.

No file is opened here: blobs go into fds the caller hands us, which is
what lets the agent run with pledge "stdio rpath inet dns recvfd".

Plain HTTP is spoken only to registries the configuration lists as
insecure; everything else is HTTPS verified against the system CA store.
Credentials are never sent over plain HTTP to a host that is not listed,
and never follow a redirect to another host (blob storage).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

from pufflet.images import auth as _auth, oci
from pufflet.images.oci import Descriptor, ImageError, Platform
from pufflet.images.reference import DEFAULT_REGISTRY, Reference, parse

IMAGE_TYPES = frozenset(oci.MANIFEST_TYPES)
INDEX_TYPES = frozenset(oci.INDEX_TYPES)
# Registries pick by what the manifest is, not by our order, so no q-values.
ACCEPT = ", ".join(oci.MANIFEST_TYPES + oci.INDEX_TYPES)

# containerd caps manifests at 4 MiB too; real ones are a few KiB.
MAX_MANIFEST = oci.MAX_MANIFEST
# Defaults for the manifest-bomb checks; the Puller may pass tighter ones.
MAX_BLOB = 16 << 30
MAX_IMAGE = 32 << 30
MAX_REDIRECTS = 5
MAX_ERROR_BODY = 4096
CHUNK = 1 << 20
# Docker Hub's API lives on another host than its name.
_ENDPOINTS = {DEFAULT_REGISTRY: "registry-1.docker.io"}



class RegistryError(Exception):
    """A pull or push failed; the message is meant for kubectl describe."""


class AuthError(RegistryError):
    pass


class NotFound(RegistryError):
    pass


class VerifyError(RegistryError):
    """Bytes that do not match their digest or declared size."""


class Incomplete(RegistryError):
    """A transfer stopped early; what arrived is kept and can be resumed."""


# ---------------------------------------------------------------------------
# manifests

@dataclass
class Resolved:
    """An image manifest, verified, with the blobs it needs."""
    ref: Reference
    digest: str                 # of the image manifest
    media_type: str
    manifest: bytes
    config: Descriptor
    layers: tuple[Descriptor, ...]
    index_digest: str | None = None     # when chosen from an index

    @property
    def blobs(self) -> list[Descriptor]:
        return [self.config, *self.layers]

    @property
    def size(self) -> int:
        return sum(d.size for d in self.blobs)


def sha256(data: bytes) -> str:
    return oci.digest_of(data)


def _media_type(data: bytes, header: str | None, what: str) -> str:
    """The manifest's own mediaType is what was hashed; the Content-Type
    header is a hint, used when the document names none (OCI allows that)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise RegistryError(f"{what}: not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"{what}: not a JSON object")
    own = doc.get("mediaType")
    hdr = (header or "").split(";")[0].strip() or None
    if doc.get("schemaVersion") == 1:
        raise RegistryError(f"{what}: Docker schema 1 manifests are not supported")
    if isinstance(own, str) and own:
        return own
    if hdr in IMAGE_TYPES | INDEX_TYPES:
        return hdr
    # Neither says: the shape decides, as containerd does.
    return oci.OCI_INDEX if "manifests" in doc else oci.OCI_MANIFEST


def check_sizes(m: oci.Manifest, max_blob: int, max_image: int, what: str) -> None:
    """Refuse a manifest bomb before downloading a byte of it."""
    for d in (m.config, *m.layers):
        if d.size > max_blob:
            raise VerifyError(f"{what}: blob {d.digest} declares {d.size} bytes, "
                              f"more than the {max_blob} a blob may have")
    total = m.config.size + sum(d.size for d in m.layers)
    if total > max_image:
        raise VerifyError(f"{what}: declares {total} bytes of blobs, more than "
                          f"the {max_image} an image may have")



# ---------------------------------------------------------------------------
# HTTP

class _Response:
    """A response whose connection goes back to the pool once read."""

    def __init__(self, client: "Client", key: tuple, conn: http.client.HTTPConnection,
                 resp: http.client.HTTPResponse, url: str) -> None:
        self._client, self._key, self._conn, self.raw = client, key, conn, resp
        self.status = resp.status
        self.headers = resp.headers
        self.url = url

    def read(self, cap: int, what: str) -> bytes:
        """The whole body, refusing more than cap bytes."""
        n = self.raw.length
        if n is not None and n > cap:
            self.close(reuse=False)
            raise VerifyError(f"{what}: {n} bytes, more than the {cap} allowed")
        try:
            data = self.raw.read(cap + 1)
        except (OSError, http.client.HTTPException) as e:
            self.close(reuse=False)
            raise Incomplete(f"{what}: {_why(e)}") from None
        if len(data) > cap:
            self.close(reuse=False)
            raise VerifyError(f"{what}: more than the {cap} bytes allowed")
        self.close()
        return data

    def drain(self) -> None:
        try:
            self.raw.read(MAX_ERROR_BODY)
        except (OSError, http.client.HTTPException):
            pass
        self.close(reuse=self.raw.isclosed())

    def error_text(self) -> str:
        """The registry's error message, for humans (OCI error JSON)."""
        try:
            body = self.raw.read(MAX_ERROR_BODY)
        except (OSError, http.client.HTTPException):
            body = b""
        self.close(reuse=False)
        try:
            errs = json.loads(body).get("errors") or []
            msg = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}" for e in errs[:3])
        except (ValueError, AttributeError, UnicodeDecodeError):
            msg = ""
        return msg or f"HTTP {self.status} {self.raw.reason}"[:200]

    def close(self, reuse: bool = True) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        if reuse and self.raw.isclosed() and not self.raw.will_close:
            self._client._release(self._key, conn)
        else:
            conn.close()


def _why(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or e}"
    if isinstance(e, socket.timeout):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


class BlobSource(Protocol):
    """What push() needs from a stored image."""
    manifest: bytes
    media_type: str

    def blobs(self) -> Sequence[tuple[str, int]]: ...
    def open_blob(self, digest: str) -> int: ...      # a read fd, ours to close


@dataclass
class Client:
    """One per agent: holds the connection pool, the token cache, the node's
    own credentials and the list of registries allowed plain HTTP."""
    insecure: Iterable[str] = ()
    ssl_context: ssl.SSLContext | None = None
    keyring: _auth.Keyring = field(default_factory=_auth.Keyring)
    timeout: float = 60.0
    max_blob: int = MAX_BLOB
    max_image: int = MAX_IMAGE
    user_agent: str = "pufflet"

    def __post_init__(self) -> None:
        self.insecure = frozenset(h.lower() for h in self.insecure)
        if self.ssl_context is None:
            # Built now, not at first use: the sandboxed agent may no longer
            # read the CA store by then.
            self.ssl_context = ssl.create_default_context()
        self.tokens = _auth.TokenCache()
        self._pool: dict[tuple, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def repository(self, ref: Reference | str, keyring: _auth.Keyring | None = None,
                   push: bool = False) -> "Repository":
        if isinstance(ref, str):
            ref = parse(ref)
        creds = ((keyring or _auth.Keyring()) + self.keyring).lookup(
            ref.registry, ref.repository)
        return Repository(self, ref, creds[0] if creds else None, push)

    def resolve(self, ref: Reference | str, platform: Platform,
                keyring: _auth.Keyring | None = None) -> Resolved:
        return self.repository(ref, keyring).resolve(platform)

    # -- connections -------------------------------------------------------

    def _connect(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        if scheme == "https":
            conn = http.client.HTTPSConnection(netloc, timeout=self.timeout,
                                               context=self.ssl_context)
        else:
            conn = http.client.HTTPConnection(netloc, timeout=self.timeout)
        conn.blocksize = CHUNK      # for uploads from a file
        return conn

    def _release(self, key: tuple, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._pool.setdefault(key, [])
            if len(idle) < 4:
                idle.append(conn)
                return
        conn.close()

    def _take(self, key: tuple) -> http.client.HTTPConnection | None:
        with self._lock:
            idle = self._pool.get(key)
            return idle.pop() if idle else None

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, {}
        for conns in pool.values():
            for c in conns:
                c.close()

    def send(self, method: str, url: str, headers: dict, body=None) -> _Response:
        """One request, on a pooled connection when one is idle.  A pooled
        connection the server has meanwhile closed is retried once on a
        fresh one; nothing else is retried here."""
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.netloc:
            raise RegistryError(f"refusing URL {url[:200]!r}")
        if u.scheme == "http" and u.netloc.lower() not in self.insecure:
            raise RegistryError(f"{u.netloc}: refusing plain HTTP to a registry "
                                "not listed as 'insecure registry'")
        key = (u.scheme, u.netloc.lower())
        target = urllib.parse.urlunsplit(("", "", u.path or "/", u.query, ""))
        headers = {"User-Agent": self.user_agent, **headers}
        for attempt in (0, 1):
            conn = self._take(key) if attempt == 0 else None
            reused = conn is not None
            conn = conn or self._connect(*key)
            try:
                conn.request(method, target, body=body, headers=headers)
                resp = conn.getresponse()
            except ssl.SSLError as e:
                conn.close()
                hint = ""
                if "WRONG_VERSION_NUMBER" in str(e) or "wrong version" in str(e):
                    hint = (f"; is it a plain-HTTP registry? then list it with "
                            f"'insecure registry \"{u.netloc}\"' in pufflet.conf")
                raise RegistryError(f"{u.netloc}: TLS failed: {e.reason or e}{hint}") from None
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError) as e:
                conn.close()
                if reused and (body is None or isinstance(body, bytes)):
                    continue
                raise Incomplete(f"{u.netloc}: {_why(e)}") from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise RegistryError(f"{u.netloc}: {_why(e)}") from None
            return _Response(self, key, conn, resp, url)
        raise AssertionError("unreachable")


class Repository:
    """One repository of one registry, with the credentials that apply."""

    def __init__(self, client: Client, ref: Reference, creds: _auth.Basic | None,
                 push: bool) -> None:
        self.client = client
        self.ref = ref
        self.creds = creds
        host = _ENDPOINTS.get(ref.registry, ref.registry)
        self.scheme = "http" if ref.registry.lower() in client.insecure else "https"
        self.base = f"{self.scheme}://{host}"
        self.host = host.lower()
        self.scope = f"repository:{ref.repository}:{'pull,push' if push else 'pull'}"
        self._auth: str | None = None       # the Authorization header to send

    # -- requests ------------------------------------------------------------

    def request(self, method: str, path: str, headers: dict | None = None,
                body=None, follow: bool = True) -> _Response:
        """Send with our credentials, answering one 401 challenge; follow
        redirects for GET and HEAD, dropping Authorization off-host."""
        url = path if "://" in path else self.base + path
        for attempt in (0, 1):
            h = dict(headers or {})
            if self._auth:
                h["Authorization"] = self._auth
            resp = self._follow(method, url, h, body, follow)
            if resp.status != 401 or attempt == 1:
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.drain()
            self._answer(challenge)
            if body is not None and not isinstance(body, bytes):
                # A streamed body cannot be sent twice; callers make sure a
                # cheap request authenticated first.
                raise AuthError(f"{self.ref.registry}: authentication needed mid-upload")
        raise AssertionError("unreachable")

    def _follow(self, method: str, url: str, headers: dict, body,
                follow: bool) -> _Response:
        for _ in range(MAX_REDIRECTS + 1):
            resp = self.client.send(method, url, headers, body)
            if not follow or method not in ("GET", "HEAD") or \
                    resp.status not in (301, 302, 303, 307, 308):
                return resp
            loc = resp.headers.get("Location")
            resp.drain()
            if not loc:
                raise RegistryError(f"{self.ref.registry}: redirect without Location")
            new = urllib.parse.urljoin(url, loc)
            old_u, new_u = urllib.parse.urlsplit(url), urllib.parse.urlsplit(new)
            if old_u.scheme == "https" and new_u.scheme != "https":
                raise RegistryError(f"{self.ref.registry}: refusing redirect "
                                    f"from HTTPS to {new_u.scheme}://{new_u.netloc}")
            if new_u.netloc.lower() != old_u.netloc.lower():
                # Blob storage (S3, a CDN) gets a signed URL, not our token.
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = new
        raise RegistryError(f"{self.ref.registry}: more than {MAX_REDIRECTS} redirects")

    def _answer(self, header: str) -> None:
        reg = self.ref.registry
        challenges = _auth.parse_challenges(header)
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        basic = next((c for c in challenges if c.scheme == "basic"), None)
        if bearer is not None and bearer.params.get("realm"):
            self._auth = "Bearer " + self._token(bearer.params)
        elif basic is not None:
            if self.creds is None:
                raise AuthError(f"{reg}: the registry wants a user name and "
                                "password and none is configured for it")
            self._check_private()
            self._auth = self.creds.header()
        else:
            raise AuthError(f"{reg}: unauthorized, and no usable challenge "
                            f"({header[:100]!r})")

    def _check_private(self, url: str | None = None) -> None:
        u = urllib.parse.urlsplit(url or self.base)
        if u.scheme != "https" and u.netloc.lower() not in self.client.insecure:
            raise AuthError(f"{self.ref.registry}: refusing to send credentials "
                            f"over plain HTTP to {u.netloc}")

    def _token(self, params) -> str:
        realm = params["realm"]
        service = params.get("service", "")
        user = self.creds.username if self.creds else ""
        key = (realm, service, self.scope, user)
        cached = self.client.tokens.get(key)
        if cached:
            return cached
        q = {"scope": self.scope}
        if service:
            q["service"] = service
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(q)
        headers = {"Accept": "application/json"}
        if self.creds is not None:
            self._check_private(url)
            headers["Authorization"] = self.creds.header()
        resp = self._follow("GET", url, headers, None, True)
        if resp.status in (401, 403):
            resp.drain()
            raise AuthError(f"{self.ref.registry}: token server refused "
                            f"{'the configured credentials' if self.creds else 'anonymous access'}"
                            f" for {self.scope}")
        if resp.status != 200:
            raise AuthError(f"{self.ref.registry}: token server: {resp.error_text()}")
        try:
            token, life = _auth.parse_token_reply(resp.read(1 << 20, "token"))
        except ValueError as e:
            raise AuthError(f"{self.ref.registry}: {e}") from None
        self.client.tokens.put(key, token, life)
        return token

    def _fail(self, resp: _Response, what: str) -> RegistryError:
        text = resp.error_text()
        if resp.status == 404:
            return NotFound(f"{what}: not found ({text})")
        if resp.status in (401, 403):
            return AuthError(f"{what}: access denied ({text})")
        return RegistryError(f"{what}: {text}")

    # -- pull ------------------------------------------------------------------

    def manifest(self, reference: str, expect: str | None) -> tuple[bytes, str | None, str]:
        """(bytes, Content-Type, digest) of one manifest, verified."""
        what = f"{self.ref.name}@{reference}" if reference.startswith("sha256:") \
            else f"{self.ref.name}:{reference}"
        resp = self.request("GET", f"/v2/{self.ref.repository}/manifests/{reference}",
                            {"Accept": ACCEPT})
        if resp.status != 200:
            raise self._fail(resp, what)
        claimed = resp.headers.get("Docker-Content-Digest")
        ctype = resp.headers.get("Content-Type")
        data = resp.read(MAX_MANIFEST, f"manifest {what}")
        got = sha256(data)
        want = expect or (claimed if claimed and claimed.startswith("sha256:") else None)
        if want is not None and got != want:
            raise VerifyError(f"manifest {what}: content is {got}, expected {want}")
        return data, ctype, got

    def resolve(self, platform: Platform) -> Resolved:
        ref = self.ref
        what = str(ref)
        data, ctype, digest = self.manifest(ref.digest or ref.tag, ref.digest)
        mt = _media_type(data, ctype, f"manifest {what}")
        index_digest = None
        try:
            if mt in INDEX_TYPES:
                index = oci.parse_index(data, mt)
                try:
                    entry = oci.select_platform(index, platform)
                except ImageError as e:
                    raise NotFound(f"{what}: {e}") from None
                index_digest = digest
                data, ctype, digest = self.manifest(entry.digest, entry.digest)
                mt = _media_type(data, ctype or entry.media_type, f"manifest {what}")
            m = oci.parse_manifest(data, mt)
        except ImageError as e:
            raise RegistryError(f"{what}: {e}") from None
        check_sizes(m, self.client.max_blob, self.client.max_image, what)
        return Resolved(ref, digest, mt, data, m.config, m.layers, index_digest)

    def fetch_blob(self, desc: Descriptor, fd: int, offset: int = 0) -> int:
        """Stream a blob into fd, from offset on when the registry honours
        Range.  Returns the size.  Raises Incomplete when the transfer stops
        early (what was written stays for a later resume), VerifyError for
        too many bytes or, when the whole blob went through us, a wrong
        digest."""
        what = f"blob {desc.digest[:19]} of {self.ref.name}"
        if offset >= desc.size:
            offset = 0 if offset > desc.size else offset
            if offset == desc.size:
                return desc.size
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self.request("GET", f"/v2/{self.ref.repository}/blobs/{desc.digest}", headers)
        if resp.status == 206 and offset:
            start = _range_start(resp.headers.get("Content-Range", ""))
            if start != offset:
                resp.close(reuse=False)
                raise RegistryError(f"{what}: asked for bytes from {offset}, "
                                    f"got a range from {start}")
        elif resp.status == 200:
            if offset:
                # The server ignored Range: start the file over.
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                offset = 0
        elif resp.status == 416 and offset:
            resp.drain()
            raise Incomplete(f"{what}: registry refused to resume at {offset}")
        else:
            raise self._fail(resp, what)
        return _stream(resp, desc, fd, offset, what)

    # -- push ------------------------------------------------------------------

    def has_blob(self, digest: str) -> bool:
        resp = self.request("HEAD", f"/v2/{self.ref.repository}/blobs/{digest}")
        resp.drain()
        if resp.status == 200:
            return True
        if resp.status == 404:
            return False
        raise RegistryError(f"HEAD blob {digest[:19]} of {self.ref.name}: HTTP {resp.status}")

    def upload_blob(self, digest: str, size: int, fd: int) -> None:
        """POST then one monolithic PUT, streamed from fd."""
        what = f"upload of {digest[:19]} to {self.ref.name}"
        resp = self.request("POST", f"/v2/{self.ref.repository}/blobs/uploads/",
                            {"Content-Length": "0"}, body=b"", follow=False)
        if resp.status != 202:
            raise self._fail(resp, what)
        loc = resp.headers.get("Location")
        resp.drain()
        if not loc:
            raise RegistryError(f"{what}: no upload Location")
        url = urllib.parse.urljoin(self.base + "/", loc)
        if urllib.parse.urlsplit(url).netloc.lower() != urllib.parse.urlsplit(self.base).netloc.lower():
            raise RegistryError(f"{what}: upload location on another host")
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode({"digest": digest})
        f = os.fdopen(os.dup(fd), "rb", buffering=0)
        try:
            resp = self.request("PUT", url, {"Content-Type": "application/octet-stream",
                                             "Content-Length": str(size)},
                                body=_Bounded(f, size), follow=False)
        finally:
            f.close()
        if resp.status != 201:
            raise self._fail(resp, what)
        resp.drain()

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> str:
        what = f"manifest {self.ref.name}:{reference}"
        resp = self.request("PUT", f"/v2/{self.ref.repository}/manifests/{reference}",
                            {"Content-Type": media_type}, body=data, follow=False)
        if resp.status != 201:
            raise self._fail(resp, what)
        claimed = resp.headers.get("Docker-Content-Digest")
        resp.drain()
        digest = sha256(data)
        if claimed and claimed != digest:
            raise VerifyError(f"{what}: registry stored {claimed}, we sent {digest}")
        return digest

    def push(self, image: BlobSource) -> str:
        """Upload the blobs the registry lacks, then the manifest under our
        reference's tag (or digest).  Returns the manifest digest."""
        for digest, size in image.blobs():
            if self.has_blob(digest):
                continue
            fd = image.open_blob(digest)
            try:
                self.upload_blob(digest, size, fd)
            finally:
                os.close(fd)
        return self.put_manifest(self.ref.digest or self.ref.tag, image.manifest,
                                 image.media_type)


class _Bounded:
    """A file object that yields exactly n bytes, so Content-Length is
    honest even if the file grew."""

    def __init__(self, f, n: int) -> None:
        self.f, self.left = f, n

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        size = self.left if size < 0 else min(size, self.left)
        data = self.f.read(size)
        if not data:
            raise VerifyError("stored blob shorter than its size")
        self.left -= len(data)
        return data


def _range_start(value: str) -> int | None:
    m = re.match(r"bytes (\d+)-\d+/(?:\d+|\*)\Z", value.strip())
    return int(m.group(1)) if m else None


def _stream(resp: _Response, desc: Descriptor, fd: int, offset: int, what: str) -> int:
    """Copy the body into fd; count, and hash when we see every byte."""
    h = hashlib.sha256() if offset == 0 else None
    length = resp.raw.length
    if length is not None and offset + length > desc.size:
        resp.close(reuse=False)
        raise VerifyError(f"{what}: registry sends {offset + length} bytes, "
                          f"the manifest says {desc.size}")
    done = offset
    try:
        while True:
            try:
                # read1, not readinto: one recv per call, so a connection
                # that dies mid-way loses at most that recv, not a buffer
                # full of bytes we could have kept for the resume.
                data = resp.raw.read1(CHUNK)
            except (OSError, http.client.HTTPException) as e:
                raise Incomplete(f"{what}: stopped at {done} of {desc.size} "
                                 f"bytes: {_why(e)}") from None
            n = len(data)
            if not n:
                break
            if done + n > desc.size:
                raise VerifyError(f"{what}: more than the {desc.size} bytes "
                                  "the manifest declares")
            if h is not None:
                h.update(data)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            done += n
    except BaseException:
        resp.close(reuse=False)
        raise
    resp.close()
    if done < desc.size:
        raise Incomplete(f"{what}: truncated: got {done} of {desc.size} bytes")
    if h is not None and "sha256:" + h.hexdigest() != desc.digest:
        raise VerifyError(f"{what}: content is sha256:{h.hexdigest()}, "
                          f"expected {desc.digest}")
    return done
