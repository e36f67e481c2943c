"""/portForward/{namespace}/{pod}: kubectl port-forward, over SPDY/3.1
(portforward.k8s.io: a data and an error stream per connection, paired by
requestID) or WebSocket (v4.channel.k8s.io: two channels per port named
in the query, each opened with the port in 2 bytes).

The connection into the pod is made by the parent (privsep PortForward),
inside the pod's network, and handed to us as an fd: the agent never
touches another network namespace or routing domain.  We copy bytes both
ways and, when the parent could not connect, say why on the error stream
in the kubelet's words.
"""

from __future__ import annotations

import logging
import socket
import threading

from . import spdy, streamproto as sp, wsstream
from .server import Request
from .streaming import Backend, ExecError, Target, bad_request, close_quietly, upgrade

log = logging.getLogger("pufflet.nodeapi.portforward")

ROUTE = r"/portForward/(?P<namespace>[^/]+)/(?P<pod>[^/]+)(?:/(?P<uid>[^/]+))?"
READ_SIZE = 64 * 1024


def error_message(target: Target, port: int, err: BaseException) -> str:
    """As the kubelet's stream handlers word it (the pod being the
    runtime's sandbox id there, and uid empty: the CRI streaming server's
    call)."""
    return f"error forwarding port {port} to pod {target.pod_uid}, uid : {err}"


def _connect(backend: Backend, target: Target, port: int) -> socket.socket | str:
    try:
        return backend.port_forward(target, port)
    except (OSError, ExecError) as e:
        msg = error_message(target, port, e)
        log.info("%s/%s: %s", target.namespace, target.pod, msg)
        return msg


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


# -- SPDY ----------------------------------------------------------------------

def _forward_spdy(backend: Backend, target: Target, port: int,
                  data: spdy.Stream, error: spdy.Stream) -> None:
    sock = _connect(backend, target, port)
    if isinstance(sock, str):
        try:
            error.write(sock.encode())
        except spdy.SpdyError:
            pass
        data.close()
        error.close()
        return

    def upstream() -> None:
        try:
            while chunk := data.read(READ_SIZE):
                sock.sendall(chunk)
            _shutdown(sock, socket.SHUT_WR)     # the client's EOF, passed on
        except spdy.StreamReset:
            _shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            # The pod's side is gone: drop what the client still sends
            # rather than let it pile up in the session.
            data.reset()

    up = threading.Thread(target=upstream, name=f"pf-up-{port}", daemon=True)
    up.start()
    try:
        while chunk := sock.recv(READ_SIZE):
            data.write(chunk)
        data.close()
    except (OSError, spdy.SpdyError):
        data.reset()
    error.close()
    up.join()
    sock.close()


def serve_spdy(session: spdy.Session, backend: Backend, target: Target) -> None:
    pairs = sp.PortForwardPairs()
    while (st := session.accept()) is not None:
        try:
            got = pairs.add(st)
        except ValueError as e:
            log.info("port-forward %s/%s: %s", target.namespace, target.pod, e)
            st.reset(spdy.PROTOCOL_ERROR)
            continue
        try:
            st.reply()
        except spdy.SpdyError:
            continue
        if got is not None:
            port, data, error = got
            threading.Thread(target=_forward_spdy, args=(backend, target, port, data, error),
                             name=f"pf-{port}", daemon=True).start()
    for st in pairs.pending():
        st.reset()
    session.close(linger=0.5)


# -- WebSocket -----------------------------------------------------------------

def _forward_ws(backend: Backend, target: Target, conn: wsstream.ChannelConn,
                index: int, port: int) -> None:
    d, e = sp.portforward_channels(index)
    sock = _connect(backend, target, port)
    if isinstance(sock, str):
        try:
            conn.write(e, sock.encode())
        except (OSError, wsstream.WebSocketError):
            pass
        return

    def upstream() -> None:
        try:
            while chunk := conn.read(d):
                sock.sendall(chunk)
        except OSError:
            pass
        _shutdown(sock, socket.SHUT_WR)

    up = threading.Thread(target=upstream, name=f"pf-ws-up-{port}", daemon=True)
    up.start()
    try:
        while chunk := sock.recv(READ_SIZE):
            conn.write(d, chunk)
    except (OSError, wsstream.WebSocketError):
        pass
    # No per-channel EOF in this protocol: the connection to the port is
    # over for this session; the client learns when the session closes.
    if conn.closed.is_set():
        _shutdown(sock, socket.SHUT_RDWR)
    up.join()
    sock.close()


def serve_ws(ws: wsstream.WebSocket, protocol: str, ports: list[int], backend: Backend,
             target: Target) -> None:
    data_channels = [sp.portforward_channels(i)[0] for i in range(len(ports))]
    conn = wsstream.ChannelConn(ws, protocol, 2 * len(ports), readable=data_channels)
    try:
        for i, port in enumerate(ports):
            for ch in sp.portforward_channels(i):
                conn.write(ch, sp.port_prefix(port))
    except (OSError, wsstream.WebSocketError):
        conn.close(wait=0.5)
        return
    workers = [threading.Thread(target=_forward_ws, args=(backend, target, conn, i, port),
                                name=f"pf-ws-{port}", daemon=True)
               for i, port in enumerate(ports)]
    for t in workers:
        t.start()
    # Until the client leaves, or every port's connection has ended.
    while not conn.closed.wait(0.2):
        if not any(t.is_alive() for t in workers):
            break
    conn.close(wait=2.0)
    for t in workers:
        t.join(5)


# -- the handler -------------------------------------------------------------------

def serve(req: Request, match, backend: Backend) -> None:
    params = match.groupdict()
    ports: list[int] = []
    if wsstream.is_websocket_request(req.headers):
        try:
            ports = sp.parse_ports(req.query)
        except ValueError as e:
            raise bad_request(str(e)) from None
    target = backend.resolve(params["namespace"], params["pod"], None, params.get("uid"))
    up = upgrade(req, sp.SPDY_PORTFORWARD_PROTOCOLS, sp.WS_PORTFORWARD_PROTOCOLS, "portforward")
    if up is None:
        return
    try:
        if up.ws is not None:
            serve_ws(up.ws, up.protocol, ports, backend, target)
        else:
            serve_spdy(up.session, backend, target)
    except Exception:       # noqa: BLE001 - the connection is ours: log, close
        log.exception("port-forward %s/%s: failed", target.namespace, target.pod)
    finally:
        close_quietly(up.sock)


def register(server, backend: Backend) -> None:
    for method in ("GET", "POST"):
        server.add_route(method, ROUTE, "proxy", lambda req, m: serve(req, m, backend))
