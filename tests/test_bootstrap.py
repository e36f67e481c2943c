"""TLS bootstrap: the parent's key/CSR/certificate work (priv/pki.py) with
the real openssl(1), and the agent's side (agent/bootstrap.py) against the
API emulator over HTTPS."""

import base64
import logging
import os
import pwd
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s

from apiserver import ApiServer
from apiserver.pki import CA, make_csr, new_key
from daemon import REPO, Daemon, write_config
from pufflet import config
from pufflet.agent import bootstrap, kube
from pufflet.priv import pki
from pufflet.priv.services import Services
from pufflet.privsep import spec as specmod
from pufflet.privsep import drop
from pufflet.privsep.channel import Client, Server, Status
from pufflet.privsep.spec import Invalid

NOBODY = pwd.getpwnam("nobody")
NODE = "n1"


def openssl(*args: str, stdin: bytes | None = None) -> str:
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True,
                          check=True).stdout.decode()


def bootstrap_kubeconfig(path: Path, server: str, ca_pem: str, token: str = "t") -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {
            "server": server,
            "certificate-authority-data": base64.b64encode(ca_pem.encode()).decode()}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x"}))
    return path


def make_config(tmp: Path, extra: str = "") -> config.Config:
    text = (f'user "nobody"\nnode name "{NODE}"\n'
            f'state directory "{tmp}/state"\nlog directory "{tmp}/log"\n'
            f'kubeconfig "{tmp}/kubeconfig"\n'
            f'bootstrap kubeconfig "{tmp}/bootstrap.kubeconfig"\n' + extra)
    return config.parse(text)


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> CA:
    return CA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def parent(tmp_path, ca):
    """The parent's services, greeted, with pki/ prepared as at start."""
    cfg = make_config(tmp_path)
    bootstrap_kubeconfig(Path(cfg.bootstrap_kubeconfig), "https://127.0.0.1:6443", ca.pem)
    pki.prepare(cfg, drop.lookup("nobody"))
    spec = specmod.load()
    svc = Services(cfg, spec)
    table = svc.table()
    table["Handshake"]({"spec_version": spec.version, "spec_digest": spec.digest,
                        "agent_version": "test"}, [])

    def call(method: str, body: dict | None = None) -> dict:
        body = body or {}
        m = spec.methods[method]
        m.check_request(body, 0)            # what the channel checks first
        out = table[method](body, [])
        m.check_response(out, 0)
        return out
    call.cfg = cfg
    return call


def sign(ca: CA, csr: str, seconds: int = 3600, backdate: int = 300) -> str:
    return ca.sign(csr.encode(), seconds, ["digital signature", "client auth"],
                   backdate=backdate).decode()


def pki_files(cfg) -> set[str]:
    return set(os.listdir(pki.pki_dir(cfg)))


def test_csr_subject_and_pending_key(parent):
    cfg = parent.cfg
    csr = parent("CreateClientCSR")["csr_pem"]
    subj = openssl("req", "-noout", "-verify", "-subject", "-nameopt", "RFC2253",
                   stdin=csr.encode())
    assert subj.strip() == "subject=CN=system:node:n1,O=system:nodes"
    key = Path(pki.pki_dir(cfg)) / pki.PENDING
    st = key.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    assert "PRIVATE KEY" not in csr
    # the CSR is for the pending key
    assert "".join(openssl("req", "-noout", "-pubkey", stdin=csr.encode()).split()) == \
        "".join(openssl("pkey", "-in", str(key), "-pubout").split())
    d = Path(pki.pki_dir(cfg))
    assert (d.stat().st_mode & 0o777, d.stat().st_gid) == (0o750, NOBODY.pw_gid)
    assert (Path(cfg.state_dir).stat().st_mode & 0o777) == 0o710


def test_store_installs_cert_key_and_kubeconfig(parent, ca):
    cfg = parent.cfg
    assert parent("GetClientCertInfo") == {"present": False, "not_before": 0, "not_after": 0}
    csr = parent("CreateClientCSR")["csr_pem"]
    cert = sign(ca, csr)
    out = parent("StoreClientCert", {"cert_pem": cert})
    assert out["not_after"] - out["not_before"] == 3600 + 300
    assert parent("GetClientCertInfo") == {"present": True, **out}

    d = Path(pki.pki_dir(cfg))
    cur = d / pki.CURRENT
    assert cur.is_symlink() and not os.readlink(cur).startswith("/")
    st = cur.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (NOBODY.pw_uid, NOBODY.pw_gid, 0o600)
    pem = cur.read_text()
    assert pem.startswith(cert) and "PRIVATE KEY" in pem
    assert not (d / pki.PENDING).exists()

    kc = Path(cfg.kubeconfig)
    st = kc.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (NOBODY.pw_uid, 0o600)
    doc = yaml.safe_load(kc.read_text())
    cluster = doc["clusters"][0]["cluster"]
    assert cluster["server"] == "https://127.0.0.1:6443"
    assert base64.b64decode(cluster["certificate-authority-data"]).decode() == ca.pem
    user = doc["users"][0]["user"]
    assert user == {"client-certificate": str(cur), "client-key": str(cur)}
    assert "token" not in kc.read_text()

    # A renewal swaps the link and leaves the kubeconfig (same inode) alone.
    ino = kc.stat().st_ino
    first = os.readlink(cur)
    csr2 = parent("CreateClientCSR")["csr_pem"]
    out2 = parent("StoreClientCert", {"cert_pem": sign(ca, csr2, 7200)})
    assert out2["not_after"] > out["not_after"]
    assert os.readlink(cur) != first and kc.stat().st_ino == ino
    # a third one prunes the first: current and previous are kept
    parent("StoreClientCert", {"cert_pem": sign(ca, parent("CreateClientCSR")["csr_pem"])})
    certs = {n for n in pki_files(cfg) if n.startswith("client-") and n != pki.CURRENT}
    assert len(certs) == 2 and first not in certs


def refused(parent, cert: str, code: str = "INVALID_ARGUMENT") -> str:
    cfg = parent.cfg
    before = pki_files(cfg)
    kc_before = os.path.exists(cfg.kubeconfig)
    with pytest.raises((Status, Invalid)) as e:
        parent("StoreClientCert", {"cert_pem": cert})
    if isinstance(e.value, Status):
        assert e.value.code == code
    assert pki_files(cfg) == before, "a refusal must leave nothing behind"
    assert os.path.exists(cfg.kubeconfig) == kc_before
    return str(e.value)


def test_store_refuses_what_is_not_ours(parent, ca, tmp_path):
    csr = parent("CreateClientCSR")["csr_pem"]
    # garbage: caught by the spec's pattern, or by openssl
    refused(parent, "hello")
    refused(parent, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    # a certificate for another key, with the right subject
    other = new_key(tmp_path / "other.key")
    wrong_key = sign(ca, make_csr(other, "system:node:n1", ["system:nodes"]).decode())
    assert "pending key" in refused(parent, wrong_key)
    # the right key, the wrong subject: sign a CSR made from the pending key
    pending = str(Path(pki.pki_dir(parent.cfg)) / pki.PENDING)
    for cn, orgs in (("system:node:n2", ["system:nodes"]), ("system:node:n1", ["system:masters"]),
                     ("system:node:n1", ["system:nodes", "system:masters"])):
        bad = sign(ca, make_csr(Path(pending), cn, orgs).decode())
        assert "subject" in refused(parent, bad)
    # expired, and not yet valid
    assert "not valid now" in refused(parent, sign(ca, csr, seconds=-60, backdate=120))
    assert "not valid now" in refused(parent, sign(ca, csr, seconds=600, backdate=-300))
    # after all that, the real one still goes in
    parent("StoreClientCert", {"cert_pem": sign(ca, csr)})
    # and only once: its pending key is gone
    assert "no CSR pending" in refused(parent, sign(ca, csr), "FAILED_PRECONDITION")


def test_store_needs_a_usable_bootstrap_kubeconfig(parent, ca):
    cfg = parent.cfg
    csr = parent("CreateClientCSR")["csr_pem"]
    Path(cfg.bootstrap_kubeconfig).write_text("clusters: [")
    refused(parent, sign(ca, csr), "FAILED_PRECONDITION")
    # a CA given as a file (relative to the kubeconfig) is inlined
    Path(cfg.bootstrap_kubeconfig).write_text(yaml.safe_dump({
        "clusters": [{"name": "c", "cluster": {"server": "https://k:6443",
                                               "certificate-authority": "ca.crt"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x", "users": [{"name": "u", "user": {"token": "t"}}]}))
    (Path(cfg.bootstrap_kubeconfig).parent / "ca.crt").write_text(ca.pem)
    parent("StoreClientCert", {"cert_pem": sign(ca, csr)})
    cluster = yaml.safe_load(Path(cfg.kubeconfig).read_text())["clusters"][0]["cluster"]
    assert cluster["server"] == "https://k:6443"
    assert base64.b64decode(cluster["certificate-authority-data"]).decode() == ca.pem


# -- the agent's side, against the emulator over HTTPS ------------------------

BOOT_TOKEN = "abcdef.0123456789abcdef"


def bind_node_bootstrapper(api: ApiServer) -> None:
    """What `kubectl create clusterrolebinding kubelet-bootstrap
    --clusterrole=system:node-bootstrapper --group=system:bootstrappers`
    grants: the ClusterRole's rules (bootstrappolicy's NodeBootstrapper)."""
    for verb in ("create", "get", "list", "watch"):
        api.allow("group:system:bootstrappers", verb, "certificatesigningrequests",
                  group="certificates.k8s.io")


class Agent:
    """The parent's Services on a thread, and the agent's Client to them."""

    def __init__(self, cfg) -> None:
        spec = specmod.load()
        mine, theirs = socket.socketpair()
        self.server = Server(theirs, spec, Services(cfg, spec).table(),
                             logging.getLogger("test.priv"))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.sock = mine
        self.priv = Client(mine, spec)
        self.priv.call("Handshake", {"spec_version": spec.version, "spec_digest": spec.digest,
                                     "agent_version": "test"})

    def close(self) -> None:
        self.priv.close()
        self.thread.join(5)


@pytest.fixture
def node(tmp_path):
    """A cluster that signs kubelet client certificates, and a node config
    with a bootstrap token of group system:bootstrappers."""
    api = ApiServer(tmp_path / "api", csr_duration=8)
    api.start()
    api.add_token(BOOT_TOKEN, "system:bootstrap:abcdef", ["system:bootstrappers"])
    cfg = make_config(tmp_path)
    bootstrap_kubeconfig(Path(cfg.bootstrap_kubeconfig), api.url, api.ca.pem, BOOT_TOKEN)
    pki.prepare(cfg, drop.lookup("nobody"))
    agent = Agent(cfg)
    yield api, cfg, agent
    agent.close()
    api.stop()
    assert not api.bugs


def whoami(api: ApiServer, client: k8s.ApiClient) -> str:
    k8s.CertificatesV1Api(client).list_certificate_signing_request()
    return api.request_log[-1].user


def csrs(api: ApiServer) -> list[dict]:
    return sorted(api.store.all_objects("certificatesigningrequests"),
                  key=lambda o: int(o["metadata"]["resourceVersion"]))


def approver(api: ApiServer, stop: threading.Event, deny_first: int = 0) -> threading.Thread:
    """The CSR approving controller (or an admin): approves what comes in,
    after denying the first deny_first requests."""
    def run() -> None:
        seen: set[str] = set()
        while not stop.wait(0.05):
            for o in csrs(api):
                name = o["metadata"]["name"]
                if name in seen:
                    continue
                seen.add(name)
                if len(seen) <= deny_first:
                    api.deny_csr(name)
                else:
                    api.approve_csr(name)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_bootstrap_with_token_gives_a_node_certificate(node):
    api, cfg, agent = node
    bind_node_bootstrapper(api)
    stop = threading.Event()
    approver(api, stop)
    try:
        path = bootstrap.ensure_client_credentials(cfg, agent.priv, stop=stop, wait=10)
    finally:
        stop.set()
    assert path == cfg.kubeconfig
    (csr,) = csrs(api)
    assert csr["metadata"]["name"].startswith("node-csr-")
    assert csr["spec"]["signerName"] == "kubernetes.io/kube-apiserver-client-kubelet"
    assert csr["spec"]["username"] == "system:bootstrap:abcdef"
    assert sorted(csr["spec"]["usages"]) == ["client auth", "digital signature"]
    c = kube.api_client(kube.load_kubeconfig(path))
    assert whoami(api, c) == "system:node:n1"
    # with a usable certificate the next start does not ask again
    assert bootstrap.ensure_client_credentials(cfg, agent.priv, wait=10) == path
    assert len(csrs(api)) == 1


def test_denied_csr_is_reported_and_retried(node, caplog):
    api, cfg, agent = node
    bind_node_bootstrapper(api)
    stop = threading.Event()
    approver(api, stop, deny_first=1)
    try:
        bootstrap.ensure_client_credentials(cfg, agent.priv, stop=stop, wait=10,
                                            backoff=bootstrap.Backoff(0.1, 0.5))
    finally:
        stop.set()
    first, second = csrs(api)
    assert any(f"certificate signing request {first['metadata']['name']} was denied "
               "(TestDeny: denied by the test); retrying" in r.getMessage()
               for r in caplog.records)
    assert whoami(api, kube.api_client(kube.load_kubeconfig(cfg.kubeconfig))) == "system:node:n1"


def test_api_server_down_during_bootstrap_is_retried(node, caplog):
    api, cfg, agent = node
    bind_node_bootstrapper(api)
    api.pause()
    stop = threading.Event()
    approver(api, stop)
    threading.Timer(1.0, api.resume).start()
    try:
        bootstrap.ensure_client_credentials(cfg, agent.priv, stop=stop, wait=10,
                                            backoff=bootstrap.Backoff(0.1, 0.3))
    finally:
        stop.set()
    assert any("TLS bootstrap: API server: cannot connect; retrying" in r.getMessage()
               for r in caplog.records)
    assert whoami(api, kube.api_client(kube.load_kubeconfig(cfg.kubeconfig))) == "system:node:n1"


def test_forbidden_bootstrap_is_reported(node, caplog):
    api, cfg, agent = node          # no binding for system:bootstrappers
    stop = threading.Event()
    t = threading.Thread(target=lambda: pytest.raises(
        bootstrap.BootstrapError, bootstrap.ensure_client_credentials, cfg, agent.priv,
        stop=stop, wait=5, backoff=bootstrap.Backoff(0.1, 0.2)), daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any("403" in r.getMessage() for r in caplog.records):
        time.sleep(0.05)
    stop.set()
    t.join(5)
    msgs = [r.getMessage() for r in caplog.records if "TLS bootstrap" in r.getMessage()]
    assert msgs and 'API server answered 403 Forbidden: certificatesigningrequests.certificates.k8s.io ' \
        'is forbidden: User "system:bootstrap:abcdef" cannot create resource' in msgs[0]
    assert not os.path.exists(pki.current_path(cfg))


def test_certificate_is_renewed_with_itself(node):
    api, cfg, agent = node
    bind_node_bootstrapper(api)
    stop = threading.Event()
    approver(api, stop)
    try:
        bootstrap.ensure_client_credentials(cfg, agent.priv, stop=stop, wait=10)
        first = bootstrap.cert_info(agent.priv)
        c = kube.api_client(kube.load_kubeconfig(cfg.kubeconfig))
        assert whoami(api, c) == "system:node:n1"
        rotated = threading.Event()
        r = bootstrap.Rotator(cfg, agent.priv,
                              lambda p: (bootstrap.swap_credentials(c, p), rotated.set()),
                              stop, wait=5, backoff=bootstrap.Backoff(0.1, 0.5))
        r.start()
        life = first[1] - first[0]
        assert rotated.wait(first[1] - time.time() + 1), "no renewal before expiry"
        now = time.time()
        assert first[0] + 0.7 * life - 1 <= now <= first[1]
        second = bootstrap.cert_info(agent.priv)
        assert second[1] > first[1]
        # the renewal was asked for by the node itself
        assert [o["spec"]["username"] for o in csrs(api)] == \
            ["system:bootstrap:abcdef", "system:node:n1"]
        # once the first certificate has expired, the swapped client still works
        time.sleep(max(0.0, first[1] + 1 - time.time()))
        assert whoami(api, c) == "system:node:n1"
    finally:
        stop.set()


# -- the real daemon: bootstrap after the drop, inside the sandbox ----------------

def test_daemon_bootstraps_and_renews(public_tmp):
    api = ApiServer(public_tmp / "api", auto_approve_csr=True, csr_duration=8)
    api.start()
    try:
        api.add_token(BOOT_TOKEN, "system:bootstrap:abcdef", ["system:bootstrappers"])
        bind_node_bootstrapper(api)
        boot = bootstrap_kubeconfig(public_tmp / "bootstrap.kubeconfig", api.url, api.ca.pem,
                                    BOOT_TOKEN)
        boot.chmod(0o600)           # root's: the agent reads it before the drop
        kc = public_tmp / "kubeconfig"
        cfg = write_config(public_tmp, f'kubeconfig "{kc}"\nbootstrap kubeconfig "{boot}"\n')
        d = Daemon(cfg)
        try:
            d.wait_for(r"agent: using kubeconfig", timeout=15)
            d.wait_for(r"client certificate for system:node:test-node valid until")
            st = kc.stat()
            assert (st.st_uid, st.st_mode & 0o777) == (NOBODY.pw_uid, 0o600)
            c = kube.api_client(kube.load_kubeconfig(str(kc)))
            assert whoami(api, c) == "system:node:test-node"
            # the renewal loads the new pair after the drop, in the sandbox
            d.wait_for(r"client certificate renewed", timeout=15)
            assert not any("cannot load the new certificate" in line for line in d.lines)
            assert [o["spec"]["username"] for o in csrs(api)] == \
                ["system:bootstrap:abcdef", "system:node:test-node"]
            assert not any("PRIVATE KEY" in line or BOOT_TOKEN in line for line in d.lines)
        finally:
            assert d.stop() == 0
    finally:
        api.stop()
    assert not api.bugs


# -- the RuntimeClass example ---------------------------------------------------

def test_runtimeclass_example_matches_pufflet_nodes(tmp_path):
    rc = yaml.safe_load((REPO / "examples" / "runtimeclass.yaml").read_text())
    assert (rc["apiVersion"], rc["kind"], rc["metadata"]["name"], rc["handler"]) == \
        ("node.k8s.io/v1", "RuntimeClass", "pufflet", "pufflet")
    assert rc["scheduling"]["nodeSelector"] == {"kubernetes.io/os": "openbsd"}
    t = config.DEFAULT_TAINT
    assert rc["scheduling"]["tolerations"] == [
        {"key": t.key, "operator": "Equal", "value": t.value, "effect": t.effect}]
    readme = (REPO / "README.md").read_text()
    assert "kubectl apply -f examples/runtimeclass.yaml" in readme
    # the API server takes it, and a node may read it
    with ApiServer(tmp_path / "api") as api:
        admin = kube.api_client(kube.load_kubeconfig(str(api.kubeconfig("admin"))))
        k8s.NodeV1Api(admin).create_runtime_class(rc)
        n = kube.api_client(kube.load_kubeconfig(str(api.kubeconfig("system:node:n1"))))
        got = k8s.NodeV1Api(n).read_runtime_class("pufflet")
        assert got.handler == "pufflet"
        assert got.scheduling.tolerations[0].key == t.key
