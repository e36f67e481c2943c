"""The privsep channel over real socketpairs: Client, Server, frames, fds."""

import gc
import logging
import os
import socket
import struct
import threading
import time

import msgpack
import pytest
import yaml

from pufflet.privsep import spec
from pufflet.privsep.channel import Client, FrameError, Server, Status
from pufflet.privsep.spec import Invalid, Unknown

HEADER = struct.Struct(">IB")
FACTS = {"hostname": "n1", "os_name": "OpenBSD", "os_release": "7.6",
         "os_image": "OpenBSD 7.6", "kernel_version": "GENERIC.MP#1",
         "machine": "amd64", "cpus": 4, "memory_bytes": 2 ** 33,
         "boot_id": "b", "machine_id": "m", "state_fs_bytes": 10,
         "state_fs_free_bytes": 5, "state_fs_inodes": 10,
         "state_fs_free_inodes": 5}


# NodeFacts as these tests know it: the shipped message grows as others add
# facts, and the channel's tests should not break when it does.
NODE_FACTS = {k: ({"type": "int", "min": 0, "max": 2 ** 63 - 1}
                  if type(v) is int else {"type": "str", "max_len": 255})
              for k, v in FACTS.items()}


@pytest.fixture(scope="module")
def test_spec(tmp_path_factory):
    """The shipped spec plus a method that takes an fd, added in YAML."""
    with open(os.path.join(os.path.dirname(spec.__file__), "spec.yaml")) as f:
        doc = yaml.safe_load(f)
    doc["messages"]["NodeFacts"] = NODE_FACTS
    doc["methods"]["ReadFd"] = {"request": "Empty", "response": "Ping",
                                "request_fds": ["src"]}
    doc["methods"]["Unserved"] = {"request": "Empty", "response": "Empty"}
    p = tmp_path_factory.mktemp("spec") / "spec.yaml"
    p.write_text(yaml.safe_dump(doc))
    return spec.load(str(p))


def ping(body, fds):
    if body["seq"] == 666:
        raise RuntimeError("boom")
    if body["seq"] == 667:
        return {"seq": -1, "payload": b""}          # invalid response
    if body["seq"] == 668:
        raise Status("NOT_FOUND", "no such thing")
    if body["seq"] == 669:
        time.sleep(0.3)
    return body


def open_log(body, fds):
    r, w = os.pipe()
    os.write(w, body["name"].encode())
    os.close(w)
    return {}, [r]


def read_fd(body, fds):
    return {"seq": 0, "payload": os.read(fds[0], 100)}


def ticks(body, fds):
    for n in range(body["count"]):
        yield {"n": n}


HANDLERS = {"Ping": ping, "GetNodeFacts": lambda b, f: dict(FACTS),
            "OpenLog": open_log, "ReadFd": read_fd, "WatchTicks": ticks}


class Running:
    """A Server serving one end of a socketpair on a thread."""

    def __init__(self, s):
        self.mine, theirs = socket.socketpair()
        self.server = Server(theirs, s, HANDLERS, logging.getLogger("test"))
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       daemon=True)
        self.thread.start()

    def stop(self):
        self.mine.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.fixture
def running(test_spec):
    r = Running(test_spec)
    yield r
    r.stop()


@pytest.fixture
def client(running, test_spec):
    c = Client(running.mine, test_spec)
    yield c


def nfds():
    """The open fds.  Compared as sets, "nothing new is left open": other
    tests' threads and garbage may close fds of theirs meanwhile, which a
    count would take for ours."""
    gc.collect()
    return set(os.listdir("/proc/self/fd"))


def frame(obj, nfds=0):
    data = obj if isinstance(obj, bytes) else msgpack.packb(obj)
    return HEADER.pack(len(data), nfds) + data


def read_frame(sock):
    """One response frame, read by hand: (obj, fds)."""
    buf = b""
    fds = []
    while len(buf) < 5:
        data, anc, _, _ = sock.recvmsg(5 - len(buf), socket.CMSG_SPACE(64))
        assert data, "channel closed"
        buf += data
        for _, _, cdata in anc:
            fds += list(struct.unpack(f"{len(cdata) // 4}i", cdata))
    n, k = HEADER.unpack(buf)
    payload = b""
    while len(payload) < n:
        chunk = sock.recv(n - len(payload))
        assert chunk
        payload += chunk
    assert len(fds) == k
    return msgpack.unpackb(payload), fds


def req(rid, method, body):
    return {"id": rid, "method": method, "body": body}


def test_call(client):
    r = client.call("Ping", {"seq": 7, "payload": b"hello"})
    assert r.body == {"seq": 7, "payload": b"hello"} and r.fds == []
    assert client.call("GetNodeFacts", {}).body == FACTS


def test_stream(client):
    got = [r.body["n"] for r in client.stream("WatchTicks", {"count": 5})]
    assert got == [0, 1, 2, 3, 4]
    # abandoned halfway: the rest is dropped and the channel still works
    it = client.stream("WatchTicks", {"count": 100})
    assert next(it).body == {"n": 0}
    it.close()
    assert client.call("Ping", {"seq": 1, "payload": b""}).body["seq"] == 1


def test_response_fd(client):
    before = nfds()
    r = client.call("OpenLog", {"name": "pod-a"})
    assert len(r.fds) == 1
    assert os.get_inheritable(r.fds[0]) is False
    assert os.read(r.fds[0], 100) == b"pod-a"
    os.close(r.fds[0])
    assert nfds() - before == set()


def test_request_fd(client):
    r, w = os.pipe()
    os.write(w, b"through a pipe")
    before = nfds()
    reply = client.call("ReadFd", {}, fds=[r])
    assert reply.body["payload"] == b"through a pipe"
    os.close(r)
    os.close(w)
    assert nfds() - before == set()       # the server closed its copy


def test_invalid_request_is_not_sent(client, running):
    with pytest.raises(Invalid, match="body.seq"):
        client.call("Ping", {"seq": -1, "payload": b""})
    with pytest.raises(Unknown):
        client.call("Nope", {})
    with pytest.raises(Invalid, match="fds"):
        client.call("ReadFd", {})
    with pytest.raises(ValueError):
        client.call("WatchTicks", {"count": 1})
    assert client.call("Ping", {"seq": 2, "payload": b""}).body["seq"] == 2


def test_errors_from_handlers(client):
    with pytest.raises(Status) as e:
        client.call("Ping", {"seq": 666, "payload": b""})
    assert e.value.code == "INTERNAL" and "RuntimeError" in e.value.message
    with pytest.raises(Status) as e:
        client.call("Ping", {"seq": 667, "payload": b""})
    assert e.value.code == "INTERNAL"
    with pytest.raises(Status) as e:
        client.call("Ping", {"seq": 668, "payload": b""})
    assert (e.value.code, e.value.message) == ("NOT_FOUND", "no such thing")
    with pytest.raises(Status) as e:
        client.call("Unserved", {})
    assert e.value.code == "UNIMPLEMENTED"
    assert client.call("Ping", {"seq": 3, "payload": b""}).body["seq"] == 3


def test_timeout(client):
    with pytest.raises(Status) as e:
        client.call("Ping", {"seq": 669, "payload": b""}, timeout=0.05)
    assert e.value.code == "DEADLINE_EXCEEDED"
    # the late answer is dropped; the next call gets its own
    assert client.call("Ping", {"seq": 4, "payload": b""}).body["seq"] == 4


def test_concurrent_calls(client):
    errors = []

    def worker(t):
        try:
            for i in range(200):
                seq = t * 1000 + i
                payload = os.urandom(t + i % 50)
                r = client.call("Ping", {"seq": seq, "payload": payload})
                assert r.body == {"seq": seq, "payload": payload}
                if i % 50 == 0:
                    got = [x.body["n"] for x in
                           client.stream("WatchTicks", {"count": 3})]
                    assert got == [0, 1, 2]
        except Exception as e:      # reported below; threads can't fail tests
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors


def test_server_rejects_handler_not_in_spec(test_spec):
    a, b = socket.socketpair()
    with pytest.raises(ValueError, match="Bogus"):
        Server(b, test_spec, {"Bogus": ping}, logging.getLogger())
    a.close()
    b.close()


# -- raw frames into the server --------------------------------------------

def test_partial_reads(running):
    data = frame(req(5, "Ping", {"seq": 5, "payload": b"slow"}))
    for i in range(len(data)):
        running.mine.send(data[i:i + 1])
        time.sleep(0.002)
    obj, _ = read_frame(running.mine)
    assert obj == {"id": 5, "code": "OK", "message": "",
                   "body": {"seq": 5, "payload": b"slow"}}


def test_many_frames_in_one_write(running):
    running.mine.sendall(b"".join(
        frame(req(i, "Ping", {"seq": i, "payload": b"x" * i}))
        for i in range(1, 51)))
    for i in range(1, 51):
        obj, _ = read_frame(running.mine)
        assert obj["id"] == i and obj["body"]["seq"] == i


@pytest.mark.parametrize("bad,rid,code", [
    (b"\xc1", 0, "INVALID_ARGUMENT"),                       # not msgpack
    (b"", 0, "INVALID_ARGUMENT"),
    (msgpack.packb([1, 2]), 0, "INVALID_ARGUMENT"),         # not a map
    (msgpack.packb({"method": "Ping", "body": {}}), 0, "INVALID_ARGUMENT"),
    (msgpack.packb({"id": -1, "method": "Ping", "body": {}}), 0,
     "INVALID_ARGUMENT"),
    (msgpack.packb({"id": True, "method": "Ping", "body": {}}), 0,
     "INVALID_ARGUMENT"),
    (msgpack.packb(req(9, "Ping", {"seq": "x", "payload": b""})), 9,
     "INVALID_ARGUMENT"),
    (msgpack.packb(dict(req(9, "Ping", {}), x=1)), 9, "INVALID_ARGUMENT"),
    (msgpack.packb(req(9, "Nope", {})), 9, "UNIMPLEMENTED"),
    (msgpack.packb(req(9, "__init__", {})), 9, "UNIMPLEMENTED"),
    (msgpack.packb(req(9, 17, {})), 9, "UNIMPLEMENTED"),
    (msgpack.packb(req(9, "GetNodeFacts", [])), 9, "INVALID_ARGUMENT"),
    (b"\x91" * 5000 + b"\xc0", 0, "INVALID_ARGUMENT"),       # too deep
])
def test_bad_frames_are_answered(running, bad, rid, code):
    running.mine.sendall(frame(bad))
    obj, fds = read_frame(running.mine)
    assert (obj["id"], obj["code"], obj["body"], fds) == (rid, code, {}, [])
    running.mine.sendall(frame(req(1, "Ping", {"seq": 1, "payload": b""})))
    assert read_frame(running.mine)[0]["code"] == "OK"


def test_wrong_fd_count_closes_fds(running):
    before = nfds()
    for _ in range(20):
        r, w = os.pipe()
        running.mine.sendmsg([frame(req(3, "Ping", {"seq": 1, "payload": b""}),
                                    2)],
                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                               struct.pack("2i", r, w))])
        os.close(r)
        os.close(w)
        obj, _ = read_frame(running.mine)
        assert (obj["id"], obj["code"]) == (3, "INVALID_ARGUMENT")
        assert "fds" in obj["message"]
    # fds attached but not declared are closed as well
    r, w = os.pipe()
    running.mine.sendmsg([frame(req(4, "Ping", {"seq": 1, "payload": b""}))],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                           struct.pack("2i", r, w))])
    os.close(r)
    os.close(w)
    assert read_frame(running.mine)[0]["code"] == "OK"
    assert nfds() - before == set()


def test_oversize_header_closes_channel(running, test_spec):
    running.mine.sendall(HEADER.pack(test_spec.limits.max_frame + 1, 0))
    assert running.mine.recv(10) == b""          # the server hung up
    running.thread.join(5)
    assert not running.thread.is_alive()


def test_too_many_fds_closes_channel(running, test_spec):
    running.mine.sendall(HEADER.pack(10, test_spec.limits.max_fds + 1))
    assert running.mine.recv(10) == b""


def test_missing_fds_close_channel(running):
    running.mine.sendall(frame(req(1, "ReadFd", {}), 1))
    assert running.mine.recv(10) == b""


def test_max_outstanding(running, test_spec):
    n = test_spec.limits.max_outstanding
    running.mine.sendall(b"".join(
        frame(req(i, "WatchTicks", {"count": 3})) for i in range(1, n + 2)))
    finals = {}
    more = 0
    while len(finals) < n + 1:
        obj, _ = read_frame(running.mine)
        if obj.get("more"):
            more += 1
        else:
            finals[obj["id"]] = obj["code"]
    assert finals[n + 1] == "RESOURCE_EXHAUSTED"
    assert all(finals[i] == "OK" for i in range(1, n + 1))
    assert more == 3 * n


def test_duplicate_id_of_stream(running):
    running.mine.sendall(frame(req(7, "WatchTicks", {"count": 1000})) +
                         frame(req(7, "WatchTicks", {"count": 1})))
    while True:
        obj, _ = read_frame(running.mine)
        if not obj.get("more"):
            break
    assert (obj["id"], obj["code"]) == (7, "INVALID_ARGUMENT")


# -- a broken priv, seen from the client -----------------------------------

def test_client_oversize_header(test_spec):
    a, b = socket.socketpair()
    c = Client(a, test_spec)

    def fake_priv():
        read_frame_request(b)
        b.sendall(HEADER.pack(test_spec.limits.max_frame + 1, 0))
    t = threading.Thread(target=fake_priv)
    t.start()
    with pytest.raises(FrameError):
        c.call("Ping", {"seq": 1, "payload": b""})
    t.join()
    with pytest.raises(FrameError):         # the channel stays down
        c.call("Ping", {"seq": 1, "payload": b""})
    b.close()
    c.close()


def test_client_invalid_response_and_eof(test_spec):
    a, b = socket.socketpair()
    c = Client(a, test_spec)

    def fake_priv():
        obj = read_frame_request(b)
        b.sendall(frame({"id": obj["id"], "code": "OK", "message": "",
                         "body": {"seq": "not an int", "payload": b""}}))
        read_frame_request(b)
        b.close()
    t = threading.Thread(target=fake_priv)
    t.start()
    with pytest.raises(Status) as e:
        c.call("Ping", {"seq": 1, "payload": b""})
    assert e.value.code == "INTERNAL" and "body.seq" in e.value.message
    with pytest.raises(ConnectionError):
        c.call("Ping", {"seq": 2, "payload": b""})
    t.join()
    c.close()


def read_frame_request(sock):
    return read_frame(sock)[0]


def test_parked_stream_waits_for_wake(test_spec):
    """An event feed yields None when it has nothing: the stream parks, the
    server is not busy (its loop may sleep), and wake() resumes it."""
    events: list[int] = []

    def feed(body, fds):
        sent = 0
        while sent < body["count"]:
            if sent < len(events):
                yield {"n": events[sent]}
                sent += 1
            else:
                yield None

    mine, theirs = socket.socketpair()
    server = Server(theirs, test_spec, {"WatchTicks": feed}, logging.getLogger("t"))
    client = Client(mine, test_spec)
    got: list[int] = []
    reader = threading.Thread(
        target=lambda: got.extend(r.body["n"] for r in client.stream("WatchTicks", {"count": 2})))
    reader.start()
    assert wait_for(lambda: server.on_readable() and server._streams)
    server.on_idle()
    assert not server.busy() and got == []
    events.append(7)
    server.on_idle()
    assert got == [], "a parked stream must not be polled before wake()"
    server.wake()
    assert server.busy()
    server.on_idle()
    events.append(8)
    server.wake()
    server.on_idle()
    server.on_idle()        # the final frame
    reader.join(5)
    assert got == [7, 8] and not server._streams
    client.close()
    server.close()


def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False
