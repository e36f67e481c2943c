"""Reaching the API server: kubeconfig → credentials in memory → ApiClient.

The agent reads its kubeconfig and the files it names while it is still
root (they are usually 0600) and keeps only an ssl.SSLContext and maybe a
bearer token: after the drop it could not read them again, and it writes
no files.  The kubernetes client's own loader is not used because it
writes the *-data fields of a kubeconfig to temporary files.

Only what a node's kubeconfig uses is understood: server,
certificate-authority(-data), insecure-skip-tls-verify, tls-server-name,
client-certificate(-data), client-key(-data), token and tokenFile.  exec
and auth-provider plugins would need to run programs: refused.
"""

from __future__ import annotations

import base64
import json
import os
import random
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import urllib3
import yaml
from kubernetes import client as k8s

from pufflet import __version__

T = TypeVar("T")

# How long one request may take; the kubelet's heartbeat client uses the
# status interval (10 s) in the same way.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 10.0


class KubeconfigError(Exception):
    """The kubeconfig is missing, unreadable or not usable by pufflet."""


@dataclass(frozen=True)
class KubeAccess:
    """Everything needed to talk to the API server, held in memory."""
    server: str                     # https://host:port
    ssl_context: ssl.SSLContext
    token: str | None = None        # bearer token, if no client certificate
    tls_server_name: str | None = None
    source: str = ""                # the kubeconfig's path, for messages

    def __repr__(self) -> str:      # never print the token
        return f"KubeAccess(server={self.server!r}, source={self.source!r})"


def load_kubeconfig(path: str, context: str | None = None) -> KubeAccess:
    """Read path (and the files it names) now, while we may.

    Relative file names are relative to the kubeconfig's directory, as
    client-go takes them.  Raises KubeconfigError with the reason."""
    try:
        with open(path, "rb") as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise KubeconfigError(f"{path}: {_why(e)}") from None
    if not isinstance(doc, dict):
        raise KubeconfigError(f"{path}: not a kubeconfig")
    base = os.path.dirname(os.path.abspath(path))
    name = context or doc.get("current-context")
    ctx = _named(doc, "contexts", "context", name, path) if name else \
        _only(doc, "contexts", "context", path)
    cluster = _named(doc, "clusters", "cluster", ctx.get("cluster"), path)
    user = _named(doc, "users", "user", ctx.get("user"), path) if ctx.get("user") else {}
    for plugin in ("exec", "auth-provider"):
        if plugin in user:
            raise KubeconfigError(f"{path}: user {plugin} plugins are not "
                                  "supported; use a client certificate or a token")

    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith("https://"):
        raise KubeconfigError(f"{path}: cluster server must be an https:// URL, "
                              f"got {server!r}")

    sslctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    sslctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cluster.get("insecure-skip-tls-verify"):
        sslctx.check_hostname = False
        sslctx.verify_mode = ssl.CERT_NONE
    else:
        ca = _pem(cluster, "certificate-authority", base, path)
        try:
            if ca is not None:
                sslctx.load_verify_locations(cadata=ca.decode("ascii", "replace"))
            else:
                sslctx.load_default_certs()
        except (ssl.SSLError, ValueError) as e:
            raise KubeconfigError(f"{path}: certificate authority: {_why(e)}") from None

    cert = _pem(user, "client-certificate", base, path)
    key = _pem(user, "client-key", base, path)
    if (cert is None) != (key is None):
        raise KubeconfigError(f"{path}: client certificate and key go together")
    if cert is not None:
        _load_cert_chain(sslctx, cert, key, path)

    token = user.get("token")
    if not token and user.get("tokenFile"):
        token = _read(_resolve(base, user["tokenFile"]), path).decode().strip()
    if cert is None and not token:
        raise KubeconfigError(f"{path}: user has no client certificate and no token")
    return KubeAccess(server=server.rstrip("/"), ssl_context=sslctx,
                      token=token or None,
                      tls_server_name=cluster.get("tls-server-name") or None,
                      source=path)


def api_client(access: KubeAccess, *, connect_timeout: float = CONNECT_TIMEOUT,
               read_timeout: float = READ_TIMEOUT) -> k8s.ApiClient:
    """A kubernetes ApiClient that speaks TLS with access.ssl_context.

    urllib3 does no retries of its own (we retry with backoff, knowing
    which errors are worth it) and uses no proxy from the environment."""
    cfg = k8s.Configuration(host=access.server)
    cfg.proxy = None
    if access.token:
        cfg.api_key = {"BearerToken": access.token}
        cfg.api_key_prefix = {"BearerToken": "Bearer"}
    api = k8s.ApiClient(cfg)
    api.user_agent = f"pufflet/{__version__}"
    extra: dict[str, Any] = {}
    if access.tls_server_name:
        extra["server_hostname"] = access.tls_server_name
    api.rest_client.pool_manager = urllib3.PoolManager(
        num_pools=2, maxsize=4, ssl_context=access.ssl_context, retries=False,
        timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
        **extra)
    return api


# ---------------------------------------------------------------------------
# retrying

class Backoff:
    """Exponential backoff with jitter: each delay is drawn between half
    and all of base * 2^n, capped.  The kubelet's lease controller starts
    at 100 ms and caps at 7 s; pufflet uses the same by default.  The
    jitter keeps a fleet of nodes from retrying in step after an outage."""

    def __init__(self, base: float = 0.1, cap: float = 7.0,
                 rand: Callable[[], float] = random.random) -> None:
        self.base, self.cap, self.rand = base, cap, rand
        self.failures = 0

    def next(self) -> float:
        d = min(self.cap, self.base * (2 ** min(self.failures, 30)))
        self.failures += 1
        return d / 2 + d / 2 * self.rand()

    def reset(self) -> None:
        self.failures = 0


def status_of(e: BaseException) -> int | None:
    """The HTTP status of an API error, None for a transport error."""
    return e.status if isinstance(e, k8s.ApiException) else None


def is_transient(e: BaseException) -> bool:
    """Worth retrying as is: no answer, or the server says later."""
    code = status_of(e)
    if code is None:
        return isinstance(e, (urllib3.exceptions.HTTPError, OSError))
    return code == 429 or code >= 500


def describe(e: BaseException) -> str:
    """One line for the log: what the API server said, or what failed."""
    if isinstance(e, k8s.ApiException):
        msg = ""
        if e.body:
            try:
                msg = json.loads(e.body).get("message", "")
            except (ValueError, AttributeError):
                msg = str(e.body)[:200]
        return f"{e.status} {e.reason}" + (f": {msg}" if msg else "")
    if isinstance(e, urllib3.exceptions.NewConnectionError):
        return "cannot connect"
    return f"{type(e).__name__}: {e}"


def retry(fn: Callable[[], T], stop: threading.Event, *,
          backoff: Backoff | None = None, what: str = "",
          log: Any = None, attempts: int | None = None) -> T | None:
    """Call fn until it returns, sleeping backoff.next() after each error
    (on stop, give up and return None).  Every error is retried: a 403
    may be lifted by an RBAC change, and the agent has nothing better to
    do; each is logged once per change of message."""
    backoff = backoff or Backoff()
    last = None
    n = 0
    while not stop.is_set():
        try:
            return fn()
        except Exception as e:     # noqa: BLE001 - logged, never fatal
            n += 1
            msg = describe(e)
            if log is not None and msg != last:
                log.warning("%s: %s; retrying", what, msg)
            last = msg
            if attempts is not None and n >= attempts:
                raise
            stop.wait(backoff.next())
    return None


# ---------------------------------------------------------------------------
# kubeconfig details

def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _named(doc: dict, section: str, key: str, name: Any, path: str) -> dict:
    for entry in doc.get(section) or ():
        if isinstance(entry, dict) and entry.get("name") == name:
            body = entry.get(key)
            if isinstance(body, dict):
                return body
    raise KubeconfigError(f"{path}: no {key} named {name!r}")


def _only(doc: dict, section: str, key: str, path: str) -> dict:
    entries = doc.get(section) or ()
    if len(entries) == 1 and isinstance(entries[0], dict):
        return entries[0].get(key) or {}
    raise KubeconfigError(f"{path}: no current-context")


def _resolve(base: str, name: str) -> str:
    return name if os.path.isabs(name) else os.path.join(base, name)


def _read(name: str, path: str) -> bytes:
    try:
        with open(name, "rb") as f:
            return f.read()
    except OSError as e:
        raise KubeconfigError(f"{path}: {name}: {_why(e)}") from None


def _pem(section: dict, field: str, base: str, path: str) -> bytes | None:
    """The PEM text of field-data (base64) or of the file field names."""
    data = section.get(field + "-data")
    if data:
        try:
            return base64.b64decode(data, validate=True)
        except ValueError:
            raise KubeconfigError(f"{path}: {field}-data is not base64") from None
    name = section.get(field)
    if name:
        return _read(_resolve(base, name), path)
    return None


# A pipe holds at least this much on every system we run on (Linux 64 KiB,
# OpenBSD 16 KiB), so writing it whole before reading never blocks.
_PIPE_SAFE = 16384


def _load_cert_chain(sslctx: ssl.SSLContext, cert: bytes, key: bytes,
                     path: str) -> None:
    """load_cert_chain() takes file names only.  Rather than write the
    key to a file, hand OpenSSL a pipe through /dev/fd (fd(4) on OpenBSD,
    /proc/self/fd on Linux): the key never touches a disk."""
    if len(cert) > _PIPE_SAFE or len(key) > _PIPE_SAFE:
        raise KubeconfigError(f"{path}: client certificate or key too large")
    fds: list[int] = []
    try:
        names = []
        for data in (cert, key):
            r, w = os.pipe()
            fds += [r, w]
            os.write(w, data)
            os.close(w)
            fds.remove(w)
            names.append(f"/dev/fd/{r}")
        sslctx.load_cert_chain(names[0], names[1])
    except (ssl.SSLError, OSError) as e:
        raise KubeconfigError(f"{path}: client certificate and key: {_why(e)}") from None
    finally:
        for fd in fds:
            os.close(fd)
