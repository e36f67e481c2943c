"""pods/{log,exec,attach,portforward}: the API server's proxy to the node.

As kube-apiserver does (pkg/registry/core/pod/rest/{log,subresources}.go,
pkg/registry/core/pod/strategy.go): the pod's container is checked or
defaulted, the node's address and port come from the Node object
(status.addresses in the order of --kubelet-preferred-address-types,
status.daemonEndpoints.kubeletEndpoint.Port), and the request goes to the
kubelet paths /containerLogs, /exec, /attach and /portForward over TLS with
the API server's own kubelet-client certificate (CN
kube-apiserver-kubelet-client), the caller's credentials stripped.  The
node's serving certificate is checked only when kubelet_ca is set, as with
--kubelet-certificate-authority.

Upgrades (SPDY/3.1, WebSocket) are passed through unchanged and the two
connections are spliced, which is what an API server does with SPDY
requests, and with WebSocket ones when its Translate* feature gates
(WebSocket -> SPDY, on by default since 1.30/1.31) are off.  Logs are
relayed as the node sends them, chunked, follow included.
"""
from __future__ import annotations

import socket
import ssl
import threading
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

from .errors import ApiError, bad_request

if TYPE_CHECKING:
    from .server import _Handler, _Info

# Query parameters the API server rebuilds for the kubelet (the rest, such
# as "container", go into the path or are dropped).
_LOG_PARAMS = ("follow", "previous", "timestamps", "sinceSeconds", "sinceTime", "limitBytes",
               "tailLines")
_STREAM_PARAMS = ("command", "stdin", "stdout", "stderr", "tty")
_PATHS = {"log": "containerLogs", "exec": "exec", "attach": "attach", "portforward": "portForward"}
# Caller headers a proxy must not pass on: its own credentials, hop-by-hop
# framing of the original request.
_DROP = {"authorization", "host", "content-length", "transfer-encoding", "keep-alive",
         "proxy-connection", "te", "trailer"}

SUBRESOURCES = frozenset(_PATHS)


def _container(pod: dict[str, Any], asked: str) -> str:
    spec = pod.get("spec") or {}
    names = [c["name"] for c in spec.get("containers") or []]
    inits = [c["name"] for c in spec.get("initContainers") or []]
    ephemeral = [c["name"] for c in spec.get("ephemeralContainers") or []]
    pname = pod["metadata"]["name"]
    if not asked:
        if len(names) == 1:
            return names[0]
        msg = (f"a container name must be specified for pod {pname}, "
               f"choose one of: [{' '.join(names)}]")
        if inits:
            msg += f" or one of the init containers: [{' '.join(inits)}]"
        raise bad_request(msg)
    if asked not in names + inits + ephemeral:
        raise bad_request(f"container {asked} is not valid for pod {pname}")
    return asked


def _node_location(handler: "_Handler", node_name: str) -> tuple[str, int]:
    api = handler.server.api
    node = api.store.try_get("nodes", "", node_name)
    if node is None:
        raise ApiError(404, "NotFound", f'nodes "{node_name}" not found',
                       {"name": node_name, "kind": "nodes"})
    status = node.get("status") or {}
    addrs = status.get("addresses") or []
    for kind in api.kubelet_address_types:
        for a in addrs:
            if a.get("type") == kind and a.get("address"):
                port = ((status.get("daemonEndpoints") or {}).get("kubeletEndpoint") or {}
                        ).get("Port") or 10250
                return a["address"], int(port)
    raise ApiError(500, "InternalError", f"Internal error occurred: no preferred addresses "
                   f"found; known addresses: {addrs}")


def proxy(handler: "_Handler", info: "_Info") -> int:
    """Answer one pods/<sub> request by relaying it to the pod's node."""
    api = handler.server.api
    pod = api.store.get(info.res, info.namespace, info.name)
    q = handler.q
    sub = info.subresource
    node = (pod.get("spec") or {}).get("nodeName")
    if sub == "log":
        container = _container(pod, q.get("container", ""))
        if not node:
            # LogLocation: no host yet, so nothing to read; an empty answer.
            handler._send(200, b"", {"Content-Type": "text/plain"})
            return 200
        path = f"/containerLogs/{info.namespace}/{info.name}/{container}"
        params = [(k, q[k]) for k in _LOG_PARAMS if k in q]
    else:
        if not node:
            raise bad_request(f"pod {info.name} does not have a host assigned")
        path = f"/{_PATHS[sub]}/{info.namespace}/{info.name}"
        params = []
        if sub != "portforward":
            path += "/" + _container(pod, q.get("container", ""))
            params = [(k, v) for k, vs in handler.multi_q.items() if k in _STREAM_PARAMS
                      for v in vs]
        else:
            # PodPortForwardOptions.ports: repeated or comma-separated
            # (Convert_Slice_string_To_Slice_int32), sent on as "port".
            params = [("port", p) for v in handler.multi_q.get("ports", [])
                      for p in v.split(",") if p]
    host, port = _node_location(handler, node)
    target = quote(path) + ("?" + urlencode(params) if params else "")
    return _relay(handler, host, port, target)


def _connect(handler: "_Handler", host: str, port: int) -> ssl.SSLSocket:
    api = handler.server.api
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if api.kubelet_ca:
        ctx.load_verify_locations(cafile=str(api.kubelet_ca))
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    key, crt = api.kubelet_client_cert
    ctx.load_cert_chain(str(crt), str(key))
    raw = socket.create_connection((host, port), timeout=10)
    try:
        tls = ctx.wrap_socket(raw, server_hostname=host)
    except BaseException:
        raw.close()
        raise
    tls.settimeout(None)
    return tls


def _relay(handler: "_Handler", host: str, port: int, target: str) -> int:
    url = f"https://{host}:{port}{target}"
    try:
        upstream = _connect(handler, host, port)
    except (OSError, ssl.SSLError) as e:
        raise ApiError(500, "InternalError",
                       f'Get "{url}": dial tcp {host}:{port}: {e}') from None
    upgrade = "upgrade" in handler.headers.get("Connection", "").lower()
    lines = [f"{handler.command} {target} HTTP/1.1", f"Host: {host}:{port}"]
    for k, v in handler.headers.items():
        if k.lower() not in _DROP and (upgrade or k.lower() not in ("connection", "upgrade")):
            lines.append(f"{k}: {v}")
    if not upgrade:
        lines.append("Connection: close")
    try:
        upstream.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        first = _read_head(upstream)
    except OSError as e:
        upstream.close()
        raise ApiError(500, "InternalError", f'Get "{url}": {e}') from None
    try:
        code = int(first.split(b" ", 2)[1])
    except (IndexError, ValueError):
        code = 502
    handler._record(code)
    handler.close_connection = True
    client = handler.connection
    done = threading.Event()

    def up() -> None:
        # Bytes the client sent after its request head may already sit in
        # rfile's buffer: read1 hands those over first.
        try:
            while not done.is_set():
                data = handler.rfile.read1(65536)
                if not data:
                    break
                upstream.sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            done.set()
            _shut(upstream)

    t = threading.Thread(target=up, name="nodeproxy-up", daemon=True)
    t.start()
    try:
        client.sendall(first)
        while True:
            data = upstream.recv(65536)
            if not data:
                break
            client.sendall(data)
    except OSError:
        pass
    finally:
        done.set()
        _shut(client)
        _shut(upstream)
        t.join(timeout=5)
        upstream.close()
    return code


def _read_head(sock: ssl.SSLSocket) -> bytes:
    """The response head, byte by byte so nothing after it is consumed
    here (it is relayed as it comes)."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        b = sock.recv(1)
        if not b:
            raise ConnectionResetError("node closed the connection before answering")
        head += b
        if len(head) > 65536:
            raise ConnectionResetError("node answered with an oversized head")
    return head


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
