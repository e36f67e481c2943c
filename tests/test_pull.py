"""Pulling through the real privsep channel into the real image store:
policies, shared downloads, resumes, backoff, lies, push and pull back.

The agent half (Puller, registry client) runs in the test process; the
parent half is Services serving the other end of a socketpair, as in the
daemon.  The registry is Debian's docker-registry (tests/registry.py).
"""

import logging
import os
import socket
import threading

import pytest

import registry as R
from pufflet import config
from pufflet.images import registry as reg
from pufflet.images.oci import Platform
from pufflet.images.privstore import PrivStore
from pufflet.images.puller import Backoff, PullError, Puller, push
from pufflet.priv.services import Services
from pufflet.privsep import spec as specmod
from pufflet.privsep.channel import Client, Server, Status

OPENBSD = Platform("openbsd", "amd64")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    r = R.Registry(tmp_path_factory.mktemp("reg"))
    yield r
    r.stop()


@pytest.fixture(scope="module")
def images(registry):
    """Pushed once for the module: an OCI image, a Docker one, an index."""
    small = R.Image([R.layer({"bin/sh": b"#!/bin/sh\n" * 100})])
    docker = R.Image([R.layer({"bin/ls": b"ls" * 500})], docker=True)
    linux = R.Image([R.layer({"bin/sh": b"linux"})], os_="linux")
    bsd = R.Image([R.layer({"bin/sh": b"openbsd"})])
    registry.push_image("puff/small", "1", small)
    registry.push_image("puff/docker", "v2", docker)
    index_digest = registry.push_index("puff/multi", "1", [linux, bsd])
    return {"small": small, "docker": docker, "linux": linux, "bsd": bsd,
            "index": index_digest}


class Parent:
    """Services on one end of a socketpair, served on a thread."""

    def __init__(self, state_dir):
        cfg = config.parse(f'node name n1\nstate directory "{state_dir}"\n')
        self.spec = specmod.load(os.path.join(os.path.dirname(specmod.__file__), "spec.yaml"))
        mine, theirs = socket.socketpair()
        self.services = Services(cfg, self.spec)
        self.server = Server(theirs, self.spec, self.services.table(),
                             logging.getLogger("test"))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.client = Client(mine, self.spec)
        self.client.call("Handshake", {"spec_version": self.spec.version,
                                       "spec_digest": self.spec.digest,
                                       "agent_version": "test"})
        self.store_dir = os.path.join(state_dir, "images")

    def stop(self):
        self.client.close()
        self.thread.join(5)


@pytest.fixture
def parent(tmp_path):
    p = Parent(tmp_path)
    yield p
    p.stop()


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make_puller(parent, hosts, clock=None, **kw):
    client = reg.Client(insecure=hosts)
    return Puller(PrivStore(parent.client), client, platform=OPENBSD,
                  backoff=Backoff(clock=clock) if clock else None, **kw)


def test_pull_by_tag_and_if_not_present(parent, registry, images):
    p = make_puller(parent, [registry.host])
    s = p.pull(f"{registry.host}/puff/small:1")
    assert s["digest"] == images["small"].digest
    assert f"{registry.host}/puff/small:1" in s["names"]
    assert (s["os"], s["architecture"]) == ("openbsd", "amd64")
    # Every blob was committed by the parent, under its digest.
    for b in images["small"].blobs:
        assert PrivStore(parent.client).has_blob(R.digest(b))
    # IfNotPresent does not go to the registry again: not even a manifest.
    p.client = None                     # any network use would fail
    assert p.pull(f"{registry.host}/puff/small:1")["digest"] == s["digest"]
    names = [i["name"] for i in PrivStore(parent.client).list_images()]
    assert f"{registry.host}/puff/small:1" in names


def test_pull_docker_media_types_and_by_digest(parent, registry, images):
    p = make_puller(parent, [registry.host])
    d = images["docker"].digest
    s = p.pull(f"{registry.host}/puff/docker@{d}", "Always")
    assert s["digest"] == d
    s2 = p.pull(f"{registry.host}/puff/docker:v2", "Always")
    assert s2["digest"] == d


def test_index_picks_our_platform(parent, registry, images):
    p = make_puller(parent, [registry.host])
    s = p.pull(f"{registry.host}/puff/multi:1")
    assert s["digest"] == images["bsd"].digest
    linux = p.pull(f"{registry.host}/puff/multi:1", "Always",
                   platform=Platform("linux", "amd64"))
    assert linux["digest"] == images["linux"].digest


def test_index_without_our_platform_names_what_it_offers(parent, registry, images):
    p = make_puller(parent, [registry.host])
    with pytest.raises(PullError) as e:
        p.pull(f"{registry.host}/puff/multi:1", platform=Platform("openbsd", "arm64"))
    assert e.value.reason == "ErrImagePull"
    assert "openbsd/arm64" in e.value.message
    assert "linux/amd64, openbsd/amd64" in e.value.message
    assert f"{registry.host}/puff/multi:1" in e.value.message


def test_never_policy(parent, registry, images):
    p = make_puller(parent, [registry.host])
    ref = f"{registry.host}/puff/small:1"
    with pytest.raises(PullError) as e:
        p.pull(ref, "Never")
    assert e.value.reason == "ErrImageNeverPull"
    assert p.state(ref)[0] == "ErrImageNeverPull"
    p.pull(ref)
    assert p.pull(ref, "Never")["digest"] == images["small"].digest
    assert p.state(ref) is None


def test_invalid_name(parent):
    p = make_puller(parent, [])
    with pytest.raises(PullError) as e:
        p.pull("docker.io/Bad/Name:1")
    assert e.value.reason == "InvalidImageName"


def test_backoff_states(parent, registry):
    clock = Clock()
    p = make_puller(parent, [registry.host], clock)
    ref = f"{registry.host}/puff/missing:1"
    with pytest.raises(PullError) as e:
        p.pull(ref)
    assert e.value.reason == "ErrImagePull"
    assert "not found" in e.value.message
    assert p.state(ref)[0] == "ImagePullBackOff"
    # Inside the backoff nothing is tried: the reason says so.
    with pytest.raises(PullError) as e:
        p.pull(ref)
    assert e.value.reason == "ImagePullBackOff"
    assert "Back-off pulling image" in e.value.message and "not found" in e.value.message
    assert p.backoff.waiting(ref).delay == 10
    # After 10 s it tries again, fails, and waits 20 s, then 40 s ... 300 s.
    delays = []
    for _ in range(7):
        clock.t += p.backoff.waiting(ref).delay
        with pytest.raises(PullError) as e:
            p.pull(ref)
        assert e.value.reason == "ErrImagePull"
        delays.append(p.backoff.waiting(ref).delay)
    assert delays == [20, 40, 80, 160, 300, 300, 300]
    # Long quiet: back to the initial delay.
    clock.t += 1000
    with pytest.raises(PullError):
        p.pull(ref)
    assert p.backoff.waiting(ref).delay == 10


def test_backoff_reset_on_success(parent, registry, images):
    clock = Clock()
    p = make_puller(parent, [registry.host], clock)
    ref = f"{registry.host}/puff/later:1"
    with pytest.raises(PullError):
        p.pull(ref)
    registry.push_image("puff/later", "1", images["small"])
    with pytest.raises(PullError) as e:
        p.pull(ref)
    assert e.value.reason == "ImagePullBackOff"
    clock.t += 10
    assert p.pull(ref)["digest"] == images["small"].digest
    assert p.state(ref) is None and p.backoff.waiting(ref) is None


def test_concurrent_pulls_share_one_download(parent, registry):
    proxy = R.Proxy(registry.port)
    proxy.delay = 0.2       # keep the first download in flight while others ask
    try:
        img = R.Image([R.layer({"bin/a": os.urandom(300_000)}),
                       R.layer({"bin/b": b"b" * 1000})])
        registry.push_image("puff/shared", "1", img)
        p = make_puller(parent, [proxy.host])
        results, errors = [], []

        def one():
            try:
                results.append(p.pull(f"{proxy.host}/puff/shared:1"))
            except Exception as e:          # pragma: no cover - reported below
                errors.append(e)
        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors
        assert {r["digest"] for r in results} == {img.digest}
        for b in img.blobs:
            assert proxy.count(R.digest(b)) == 1
    finally:
        proxy.stop()


def test_interrupted_download_resumes_from_parents_offset(parent, registry):
    proxy = R.Proxy(registry.port)
    try:
        big = R.layer({"big": os.urandom(3 << 20)})     # incompressible
        img = R.Image([big])
        registry.push_image("puff/resume", "1", img)
        clock = Clock()
        p = make_puller(parent, [proxy.host], clock, blob_attempts=1)
        ref = f"{proxy.host}/puff/resume:1"
        layer = R.digest(big)
        # Fetch the config first so that the pull's only blob GET is the
        # layer's, which the proxy cuts after 1 MiB.
        repo = p.client.repository(ref)
        p._blob(repo, repo.resolve(OPENBSD).config)
        proxy.cut_after = 1 << 20
        with pytest.raises(PullError) as e:
            p.pull(ref)
        assert e.value.reason == "ErrImagePull", e.value.message
        partial = os.path.join(parent.store_dir, "blobs", "incoming", layer[7:])
        have = os.path.getsize(partial)
        assert 0 < have < len(big)
        clock.t += 10
        s = p.pull(ref)
        assert s["digest"] == img.digest
        gets = [h for h in proxy.blob_gets if layer in h]
        assert len(gets) == 2
        assert "Range: bytes=" not in gets[0]
        assert f"Range: bytes={have}-" in gets[1]
        assert not os.path.exists(partial)
    finally:
        proxy.stop()


def test_interrupted_download_retries_within_one_pull(parent, registry):
    proxy = R.Proxy(registry.port)
    try:
        big = R.layer({"big": os.urandom(2 << 20)})
        img = R.Image([big])
        registry.push_image("puff/retry", "1", img)
        p = make_puller(parent, [proxy.host])
        repo = p.client.repository(f"{proxy.host}/puff/retry:1")
        res = repo.resolve(OPENBSD)
        p._blob(repo, res.config)
        proxy.cut_after = 500_000
        assert p.pull(f"{proxy.host}/puff/retry:1")["digest"] == img.digest
        gets = [h for h in proxy.blob_gets if R.digest(big) in h]
        assert len(gets) == 2 and "Range: bytes=" in gets[1]
    finally:
        proxy.stop()


def test_push_then_pull_back(parent, registry, images, tmp_path):
    p = make_puller(parent, [registry.host])
    p.pull(f"{registry.host}/puff/docker:v2")
    digest = push(PrivStore(parent.client), p.client, f"{registry.host}/puff/docker:v2",
                  f"{registry.host}/puff/copy:pushed")
    assert digest == images["docker"].digest
    # A second store pulls it back: the same digest.
    other = Parent(tmp_path / "other")
    try:
        q = make_puller(other, [registry.host])
        assert q.pull(f"{registry.host}/puff/copy:pushed")["digest"] == digest
    finally:
        other.stop()
    # Pushing again finds every blob there (HEAD) and uploads nothing.
    assert push(PrivStore(parent.client), p.client, f"{registry.host}/puff/docker:v2",
                f"{registry.host}/puff/copy:again") == digest


def test_push_unknown_image(parent, registry):
    p = make_puller(parent, [registry.host])
    with pytest.raises(reg.NotFound):
        push(PrivStore(parent.client), p.client, "nothing/here:1", f"{registry.host}/x/y:1")


# --- the parent does not take the agent's word ----------------------------------

def test_parent_rehashes_on_commit(parent):
    store = PrivStore(parent.client)
    data = b"the real thing"
    d = R.digest(data)
    fd, off = store.open_blob(d, len(data))
    os.write(fd, b"something else")
    os.close(fd)
    with pytest.raises(Status) as e:
        store.commit_blob(d, len(data))
    assert e.value.code == "DATA_LOSS" and "digest mismatch" in e.value.message
    assert not store.has_blob(d)
    # The bad bytes are gone: a fresh open starts at 0.
    fd, off = store.open_blob(d, len(data))
    os.close(fd)
    assert off == 0


def test_parent_refuses_manifest_naming_missing_blobs(parent, images):
    store = PrivStore(parent.client)
    m = images["small"].manifest
    store.put_bytes(R.digest(m), m)
    with pytest.raises(Status) as e:
        store.put_image("x/y:1", R.digest(m), R.OCI_MANIFEST)
    assert e.value.code == "FAILED_PRECONDITION" and "not in the store" in e.value.message


def test_parent_validates_fields(parent):
    with pytest.raises(Exception):
        parent.client.call("OpenBlob", {"digest": "sha256:../../etc/passwd", "size": 1})
    with pytest.raises(Status) as e:
        parent.client.call("ReadBlob", {"digest": "sha256:" + "0" * 64})
    assert e.value.code == "NOT_FOUND"
    with pytest.raises(Status) as e:
        parent.client.call("PutImage", {"name": "a/b:c", "manifest_digest": "sha256:" + "0" * 64,
                                        "media_type": R.OCI_MANIFEST})
    assert e.value.code == "FAILED_PRECONDITION"
    with pytest.raises(Status) as e:
        parent.client.call("GetImage", {"ref": "no/such:image"})
    assert e.value.code == "NOT_FOUND"
