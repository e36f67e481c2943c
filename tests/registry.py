"""A real registry for the tests: Debian's docker-registry (distribution v2)
on 127.0.0.1, optionally behind htpasswd or token auth, plus the helpers
to build images and push them with raw HTTP, a token server that signs
JWTs with the openssl command, a proxy that counts and cuts blob
downloads, and a stub registry that lies.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import threading
import time
import urllib.parse
import warnings
from pathlib import Path

BINARY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
SERVICE = "pufflet-test-registry"
ISSUER = "pufflet-test-issuer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def bcrypt_hash(password: str) -> str:
    """htpasswd wants bcrypt.  libxcrypt (Debian's libcrypt) does it, and
    Python's crypt module (3.11, deprecated) reaches it; htpasswd(1) from
    apache2-utils is the fallback."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt
        h = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 4))
        if h and h.startswith("$2"):
            return h
    except (ImportError, ValueError, OSError):
        pass
    tool = shutil.which("htpasswd")
    if tool:
        out = subprocess.run([tool, "-nbB", "u", password], check=True,
                             capture_output=True, text=True).stdout
        return out.strip().split(":", 1)[1]
    raise RuntimeError("no bcrypt: need Python's crypt module or htpasswd(1)")


# ---------------------------------------------------------------------------
# images

def layer(files: dict[str, bytes]) -> bytes:
    """A gzip'd tar of regular files, reproducible."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in sorted(files.items()):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o755, 0
            tf.addfile(ti, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)


class Image:
    """Blobs and a manifest, built in memory."""

    def __init__(self, layers: list[bytes], os_: str = "openbsd", arch: str = "amd64",
                 docker: bool = False, cmd: list[str] | None = None) -> None:
        self.docker = docker
        self.layers = layers
        diff_ids = [digest(gzip.decompress(l)) for l in layers]
        self.config = json.dumps({
            "architecture": arch, "os": os_,
            "config": {"Cmd": cmd or ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids}},
            sort_keys=True).encode()
        ctype, ltype, mtype = ((DOCKER_CONFIG, DOCKER_LAYER, DOCKER_MANIFEST) if docker
                               else (OCI_CONFIG, OCI_LAYER, OCI_MANIFEST))
        self.media_type = mtype
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": mtype,
            "config": {"mediaType": ctype, "digest": digest(self.config),
                       "size": len(self.config)},
            "layers": [{"mediaType": ltype, "digest": digest(l), "size": len(l)}
                       for l in layers]}, sort_keys=True).encode()
        self.digest = digest(self.manifest)
        self.platform = {"os": os_, "architecture": arch}

    @property
    def blobs(self) -> list[bytes]:
        return [self.config, *self.layers]


def index(images: list[Image], docker: bool = False) -> tuple[bytes, str]:
    mt = DOCKER_LIST if docker else OCI_INDEX
    doc = {"schemaVersion": 2, "mediaType": mt,
           "manifests": [{"mediaType": i.media_type, "digest": i.digest,
                          "size": len(i.manifest), "platform": i.platform}
                         for i in images]}
    return json.dumps(doc, sort_keys=True).encode(), mt


# ---------------------------------------------------------------------------
# the registry

class Registry:
    """docker-registry serving a fresh directory on a free port."""

    def __init__(self, root: Path, auth: str | None = None, tls: bool = False) -> None:
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.user, self.password = "puff", "s3cret"
        self.tls = tls
        self.token_server: TokenServer | None = None
        self.auth = auth
        root.mkdir(parents=True, exist_ok=True)
        cfg = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text",
                    "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(root / "data")},
                        "delete": {"enabled": True}},
            "http": {"addr": self.host, "secret": "pufflet-test"},
        }
        if auth == "basic":
            (root / "htpasswd").write_text(f"{self.user}:{bcrypt_hash(self.password)}\n")
            cfg["auth"] = {"htpasswd": {"realm": "pufflet-test", "path": str(root / "htpasswd")}}
        elif auth == "token":
            self.token_server = TokenServer(root, self.user, self.password)
            cfg["auth"] = {"token": {"realm": self.token_server.realm, "service": SERVICE,
                                     "issuer": ISSUER,
                                     "rootcertbundle": str(self.token_server.cert)}}
        if tls:
            self.ca = make_cert(root, "registry", san="IP:127.0.0.1")
            cfg["http"]["tls"] = {"certificate": str(root / "registry.crt"),
                                  "key": str(root / "registry.key")}
        (root / "config.yml").write_text(json.dumps(cfg))      # JSON is YAML
        self.log = open(root / "registry.log", "wb")
        self.proc = subprocess.Popen([BINARY, "serve", str(root / "config.yml")],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self._wait()

    def _wait(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("docker-registry exited:\n" +
                                   (self.root / "registry.log").read_text()[-2000:])
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("docker-registry did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        if self.token_server:
            self.token_server.stop()

    # -- raw HTTP, for fixtures ------------------------------------------------

    def _conn(self) -> http.client.HTTPConnection:
        if self.tls:
            import ssl
            ctx = ssl.create_default_context(cafile=str(self.root / "registry.crt"))
            return http.client.HTTPSConnection(self.host, context=ctx, timeout=30)
        return http.client.HTTPConnection(self.host, timeout=30)

    def _auth(self, repo: str) -> dict:
        if self.auth == "basic":
            raw = f"{self.user}:{self.password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        if self.auth == "token":
            return {"Authorization": "Bearer " + self.token_server.mint(
                self.user, f"repository:{repo}:pull,push")}
        return {}

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None, repo: str = "") -> tuple[int, dict, bytes]:
        c = self._conn()
        try:
            c.request(method, path, body=body, headers={**self._auth(repo), **(headers or {})})
            r = c.getresponse()
            return r.status, dict(r.headers), r.read()
        finally:
            c.close()

    def push_blob(self, repo: str, data: bytes) -> str:
        d = digest(data)
        st, h, _ = self.request("POST", f"/v2/{repo}/blobs/uploads/", b"", repo=repo)
        assert st == 202, st
        loc = urllib.parse.urlsplit(h["Location"])
        path = loc.path + "?" + (loc.query + "&" if loc.query else "") + \
            urllib.parse.urlencode({"digest": d})
        st, _, body = self.request("PUT", path, data,
                                   {"Content-Type": "application/octet-stream"}, repo=repo)
        assert st == 201, (st, body)
        return d

    def push_manifest(self, repo: str, ref: str, data: bytes, media_type: str) -> str:
        st, h, body = self.request("PUT", f"/v2/{repo}/manifests/{ref}", data,
                                   {"Content-Type": media_type}, repo=repo)
        assert st == 201, (st, body)
        return h.get("Docker-Content-Digest")

    def push_image(self, repo: str, tag: str | None, img: Image) -> str:
        for b in img.blobs:
            self.push_blob(repo, b)
        return self.push_manifest(repo, tag or img.digest, img.manifest, img.media_type)

    def push_index(self, repo: str, tag: str, images: list[Image], docker: bool = False) -> str:
        for i in images:
            self.push_image(repo, None, i)
        data, mt = index(images, docker)
        return self.push_manifest(repo, tag, data, mt)


def make_cert(root: Path, name: str, san: str | None = None) -> Path:
    """A self-signed RSA certificate and key, by openssl(1)."""
    cmd = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
           "-subj", f"/CN={name}", "-keyout", str(root / f"{name}.key"),
           "-out", str(root / f"{name}.crt")]
    if san:
        cmd += ["-addext", f"subjectAltName={san}"]
    subprocess.run(cmd, check=True, capture_output=True)
    return root / f"{name}.crt"


def _b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


class TokenServer:
    """The token service of Docker's token auth spec: Basic credentials
    in, a JWT out, signed RS256 by `openssl dgst` with a key whose
    self-signed certificate the registry trusts (sent in the x5c header)."""

    def __init__(self, root: Path, user: str, password: str) -> None:
        self.cert = make_cert(root, "token")
        self.key = root / "token.key"
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
                             check=True, capture_output=True).stdout
        self.x5c = base64.b64encode(der).decode()
        self.user, self.password = user, password
        self.requests: list[tuple[str, str | None]] = []     # (scope, user)
        self.expires_in = 300
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                scope = q.get("scope", [""])[0]
                user = None
                h = self.headers.get("Authorization", "")
                if h.startswith("Basic "):
                    u, _, p = base64.b64decode(h[6:]).decode().partition(":")
                    if (u, p) != (outer.user, outer.password):
                        self.send_response(401)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    user = u
                outer.requests.append((scope, user))
                # Anonymous users get a token with no access, as Docker
                # Hub does for private repositories.
                tok = outer.mint(user, scope if user else "")
                body = json.dumps({"token": tok, "expires_in": outer.expires_in}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def mint(self, user: str | None, scope: str) -> str:
        access = []
        if scope:
            typ, name, actions = scope.split(":", 2) if scope.count(":") >= 2 else ("", "", "")
            name, actions = scope[len(typ) + 1:].rsplit(":", 1)
            access = [{"type": typ, "name": name, "actions": actions.split(",")}]
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": ISSUER, "sub": user or "", "aud": SERVICE, "exp": now + 600,
                  "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(), "access": access}
        signing = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                   _b64url(json.dumps(claims, separators=(",", ":")).encode()))
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)],
                             input=signing.encode(), check=True, capture_output=True).stdout
        return signing + "." + _b64url(sig)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------------------
# a proxy that counts blob GETs and can cut one midway

class Proxy:
    """TCP proxy in front of a registry.  Each request is forwarded with
    'Connection: close', so one connection carries one exchange and the
    proxy can count and cut per request without parsing responses."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.host = f"127.0.0.1:{self.port}"
        self.blob_gets: list[str] = []     # request lines of blob GETs
        self.cut_after: int | None = None  # cut the next blob GET after n body-ish bytes
        self.delay = 0.0                   # seconds to hold each blob response
        self.lock = threading.Lock()
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                b = c.recv(65536)
                if not b:
                    return
                head += b
            head, _, rest = head.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            lines = [l for l in lines if not l.lower().startswith(b"connection:")]
            lines.append(b"Connection: close")
            reqline = lines[0].decode()
            cut = None
            if reqline.startswith("GET ") and "/blobs/sha256:" in reqline:
                with self.lock:
                    self.blob_gets.append(head.decode("latin-1"))
                    cut, self.cut_after = self.cut_after, None
                if self.delay:
                    time.sleep(self.delay)
            u = socket.create_connection(("127.0.0.1", self.upstream))
            u.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + rest)
            threading.Thread(target=_pipe, args=(c, u, None), daemon=True).start()
            _pipe(u, c, cut)
        finally:
            c.close()

    def count(self, dgst: str) -> int:
        with self.lock:
            return sum(dgst in l for l in self.blob_gets)

    def stop(self) -> None:
        self.stopped = True
        self.sock.close()


def _pipe(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
    sent = 0
    try:
        while True:
            b = src.recv(65536)
            if not b:
                break
            if limit is not None and sent + len(b) >= limit:
                dst.sendall(b[:limit - sent])
                # Cut: RST rather than FIN, the way a dying link looks.
                dst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                break
            dst.sendall(b)
            sent += len(b)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if limit is not None:
            dst.close()


# ---------------------------------------------------------------------------
# a registry that lies

class Stub:
    """Serves fixed bytes at registry paths, whatever they hash to.
    routes: path -> (status, headers, body); blobs honour Range."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict, bytes]] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.no_range: set[str] = set()     # paths that ignore Range
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _answer(self, send_body: bool):
                outer.requests.append((self.command, self.path, dict(self.headers)))
                path = urllib.parse.urlsplit(self.path).path
                st, hdrs, body = outer.routes.get(path, (404, {}, b'{"errors":[]}'))
                rng = self.headers.get("Range")
                if st == 200 and rng and "/blobs/" in path and path not in outer.no_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    total = len(body)
                    body = body[start:]
                    st = 206
                    hdrs = {**hdrs, "Content-Range": f"bytes {start}-{total - 1}/{total}"}
                self.send_response(st)
                for k, v in hdrs.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def do_GET(self):
                self._answer(True)

            def do_HEAD(self):
                self._answer(False)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def manifest(self, repo: str, ref: str, data: bytes, media_type: str,
                 headers: dict | None = None) -> None:
        self.routes[f"/v2/{repo}/manifests/{ref}"] = (
            200, {"Content-Type": media_type, **(headers or {})}, data)

    def blob(self, repo: str, dgst: str, data: bytes) -> None:
        self.routes[f"/v2/{repo}/blobs/{dgst}"] = (
            200, {"Content-Type": "application/octet-stream"}, data)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
