"""The node API's serving certificate from the cluster ('tls certificate
csr'): the parent's key, CSR and checks (priv/pki.py) with the real
openssl(1), the agent's rotator (agent/servingcert.py) against the API
emulator, and the certificate a TLS client is actually shown."""

import base64
import logging
import os
import pwd
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from apiserver import ApiServer
from apiserver.pki import CA, make_csr, new_key, verify
from pufflet import config
from pufflet.agent import bootstrap, kube, servingcert
from pufflet.nodeapi import app, auth, tls
from pufflet.priv import pki
from pufflet.priv.services import Services
from pufflet.privsep import drop, spec as specmod
from pufflet.privsep.channel import Client, Server, Status
from pufflet.privsep.spec import Invalid

NOBODY = pwd.getpwnam("nobody")
NODE = "n1"
HOST = os.uname().nodename.lower()
SERVING = ["digital signature", "server auth"]


def openssl(*args: str, stdin: bytes | None = None) -> str:
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True,
                          check=True).stdout.decode()


def make_config(tmp: Path) -> config.Config:
    return config.parse(f'user "nobody"\nnode name "{NODE}"\n'
                        f'state directory "{tmp}/state"\nlog directory "{tmp}/log"\n'
                        f'kubeconfig "{tmp}/kubeconfig"\ntls certificate csr\n')


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> CA:
    return CA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def parent(tmp_path):
    """The parent's services, greeted, with pki/ prepared as at start;
    every call checked against the spec both ways, as the channel does."""
    cfg = make_config(tmp_path)
    pki.prepare(cfg, drop.lookup("nobody"))
    spec = specmod.load()
    table = Services(cfg, spec).table()
    table["Handshake"]({"spec_version": spec.version, "spec_digest": spec.digest,
                        "agent_version": "test"}, [])

    def call(method: str, body: dict | None = None) -> dict:
        body = body or {}
        m = spec.methods[method]
        m.check_request(body, 0)
        out = table[method](body, [])
        m.check_response(out, 0)
        return out
    call.cfg = cfg
    return call


def sign(ca: CA, csr: str, seconds: int = 3600, usages=SERVING, backdate: int = 300) -> str:
    return ca.sign(csr.encode(), seconds, list(usages), backdate=backdate).decode()


def files(cfg) -> set[str]:
    return set(os.listdir(pki.pki_dir(cfg)))


def names(want_ips: list[str]) -> set[str]:
    return {f"DNS:{NODE}", f"DNS:{HOST}"} | {f"IP Address:{ip}" for ip in want_ips}


def san_set(text: str) -> set[str]:
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if "Subject Alternative Name" in line)
    return set(lines[i + 1].strip().split(", "))


# -- the parent ------------------------------------------------------------------

def test_serving_csr_subject_names_and_key(parent):
    cfg = parent.cfg
    csr = parent("CreateServingCSR", {"addresses": ["192.0.2.10", "2001:db8::1"]})["csr_pem"]
    assert "PRIVATE KEY" not in csr
    text = openssl("req", "-noout", "-verify", "-text", stdin=csr.encode())
    subj = openssl("req", "-noout", "-subject", "-nameopt", "RFC2253", stdin=csr.encode())
    assert subj.strip() == "subject=CN=system:node:n1,O=system:nodes"
    assert san_set(text) == {f"DNS:{NODE}", f"DNS:{HOST}", "IP Address:192.0.2.10",
                             "IP Address:2001:DB8:0:0:0:0:0:1"}
    # an EC key: signs, does not encipher
    assert "Digital Signature" in text and "Key Encipherment" not in text
    assert "TLS Web Server Authentication" in text
    key = Path(pki.pki_dir(cfg)) / pki.SERVING_PENDING
    st = key.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    assert "".join(openssl("req", "-noout", "-pubkey", stdin=csr.encode()).split()) == \
        "".join(openssl("pkey", "-in", str(key), "-pubout").split())
    # the client certificate's pending key is another file, untouched
    assert pki.PENDING not in files(cfg)
    # the agent names addresses only, and they must be addresses
    with pytest.raises((Status, Invalid)):
        parent("CreateServingCSR", {"addresses": ["1.2.3"]})
    with pytest.raises(Invalid):
        parent("CreateServingCSR", {"addresses": ["evil.example.com"]})


def test_store_serving_cert_installs_and_rotates(parent, ca):
    cfg = parent.cfg
    assert parent("GetServingCertInfo")["present"] is False
    csr = parent("CreateServingCSR", {"addresses": ["192.0.2.10"]})["csr_pem"]
    cert = sign(ca, csr)
    out = parent("StoreServingCert", {"cert_pem": cert})
    assert out["not_after"] - out["not_before"] == 3600 + 300
    assert sorted(out["dns_names"]) == sorted({NODE, HOST}) and out["addresses"] == ["192.0.2.10"]
    assert parent("GetServingCertInfo") == out
    d = Path(pki.pki_dir(cfg))
    cur = d / pki.SERVING_CURRENT
    assert cur.is_symlink() and not os.readlink(cur).startswith("/")
    st = cur.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (NOBODY.pw_uid, 0o600)
    pem = cur.read_text()
    assert pem.startswith(cert) and "PRIVATE KEY" in pem
    assert not {pki.SERVING_PENDING, pki.SERVING_PENDING_CSR} & files(cfg)
    # the pair loads as a server context, as the agent does
    tls.context(str(cur), str(cur), None)
    # new addresses: a new key, and the third certificate prunes the first
    first = os.readlink(cur)
    for ips in (["192.0.2.11"], ["192.0.2.12", "192.0.2.13"]):
        csr = parent("CreateServingCSR", {"addresses": ips})["csr_pem"]
        got = parent("StoreServingCert", {"cert_pem": sign(ca, csr)})
        assert got["addresses"] == ips
    kept = {n for n in files(cfg) if n.startswith("serving-") and n != pki.SERVING_CURRENT}
    assert len(kept) == 2 and first not in kept


def refused(parent, cert: str, code: str = "INVALID_ARGUMENT") -> str:
    before = files(parent.cfg)
    with pytest.raises((Status, Invalid)) as e:
        parent("StoreServingCert", {"cert_pem": cert})
    if isinstance(e.value, Status):
        assert e.value.code == code
    assert files(parent.cfg) == before, "a refusal must leave nothing behind"
    return str(e.value)


def test_store_serving_cert_refuses_what_is_not_ours(parent, ca, tmp_path):
    csr = parent("CreateServingCSR", {"addresses": ["192.0.2.10"]})["csr_pem"]
    pending = Path(pki.pki_dir(parent.cfg)) / pki.SERVING_PENDING
    ok_names = {"dns": [NODE, HOST] if HOST != NODE else [NODE], "ips": ["192.0.2.10"]}
    refused(parent, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    # the right names and subject, another key
    other = new_key(tmp_path / "other.key")
    bad = sign(ca, make_csr(other, "system:node:n1", ["system:nodes"], **ok_names).decode())
    assert "pending serving key" in refused(parent, bad)
    # the pending key, a wrong subject
    for cn, orgs in (("system:node:n2", ["system:nodes"]), ("system:node:n1", ["system:masters"])):
        bad = sign(ca, make_csr(pending, cn, orgs, **ok_names).decode())
        assert "subject" in refused(parent, bad)
    # the pending key and subject, names it did not ask for, or fewer
    for dns, ips in (([NODE, "api.example.com"], ["192.0.2.10"]), ([NODE], ["192.0.2.99"]),
                     ([NODE], [])):
        bad = sign(ca, make_csr(pending, "system:node:n1", ["system:nodes"],
                                dns=dns, ips=ips).decode())
        assert "the request" in refused(parent, bad)
    # a client certificate is not a serving one
    assert "server auth" in refused(parent, sign(ca, csr, usages=["digital signature",
                                                                  "client auth"]))
    # expired, not yet valid
    assert "not valid now" in refused(parent, sign(ca, csr, seconds=-60, backdate=120))
    assert "not valid now" in refused(parent, sign(ca, csr, seconds=600, backdate=-300))
    # then the real one goes in, once
    parent("StoreServingCert", {"cert_pem": sign(ca, csr)})
    assert "no serving CSR pending" in refused(parent, sign(ca, csr), "FAILED_PRECONDITION")


# -- the agent's rotator against the emulator, and what a TLS client sees --------------

class Priv:
    """The parent's Services on a thread, and the agent's Client to them."""

    def __init__(self, cfg) -> None:
        spec = specmod.load()
        mine, theirs = socket.socketpair()
        self.server = Server(theirs, spec, Services(cfg, spec).table(),
                             logging.getLogger("test.priv"))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.client = Client(mine, spec)
        self.client.call("Handshake", {"spec_version": spec.version,
                                       "spec_digest": spec.digest, "agent_version": "test"})

    def close(self) -> None:
        self.client.close()
        self.thread.join(5)


def served(port: int) -> str:
    """The certificate the node API presents, as any TLS client sees it."""
    return ssl.get_server_certificate(("127.0.0.1", port), timeout=5)


def csrs(api: ApiServer) -> list[dict]:
    return sorted(api.store.all_objects("certificatesigningrequests"),
                  key=lambda o: int(o["metadata"]["resourceVersion"]))


def wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def node(tmp_path):
    """A node API server started as agent/main.py does with 'tls
    certificate csr', a rotator speaking to the emulator as system:node:n1,
    and the parent's real services."""
    api = ApiServer(tmp_path / "api", csr_duration=8).start()
    cfg = make_config(tmp_path)
    pki.prepare(cfg, drop.lookup("nobody"))
    priv = Priv(cfg)
    prep = app.Prepared(None, None)
    addresses = ["127.0.0.1"]

    def serving_cert():
        priv.client.call("GetServingCert", {"addresses": addresses})
    ctx, what = app.initial_context(
        cfg, prep, serving_cert,
        lambda: servingcert.usable(servingcert.info(priv.client), time.time()))
    assert what == "self-signed"
    s = app.build(cfg, ctx, auth.Gate(NODE, open=True), lambda ns, n: None, lambda: [])
    port = s.listen("127.0.0.1", 0)[1]
    s.start()
    k = kube.api_client(kube.load_kubeconfig(str(api.kubeconfig(f"system:node:{NODE}"))))
    stop = threading.Event()
    rot = servingcert.ServingRotator(priv.client, k, lambda: list(addresses),
                                     lambda: app.reload_csr_cert(cfg, prep, s), stop,
                                     backoff=bootstrap.Backoff(0.2, 0.5), wait=20, poll=0.2)
    rot.port, rot.addresses_list, rot.emu = port, addresses, api
    yield rot
    stop.set()
    rot.join(5)
    s.close()
    priv.close()
    api.stop()
    assert not api.bugs


def test_issued_served_rotated_and_readdressed(node, caplog):
    caplog.set_level(logging.INFO, logger="pufflet")
    api, port = node.emu, node.port
    self_signed = served(port)
    assert not verify(api.ca.cert, self_signed.encode())
    node.start()
    (first,) = wait(lambda: csrs(api), 10, "a serving CSR")
    name = first["metadata"]["name"]
    assert name.startswith("csr-")
    spec = first["spec"]
    assert spec["signerName"] == "kubernetes.io/kubelet-serving"
    assert sorted(spec["usages"]) == ["digital signature", "server auth"]
    assert spec["username"] == "system:node:n1"
    req = base64.b64decode(spec["request"])
    assert san_set(openssl("req", "-noout", "-text", stdin=req)) == names(["127.0.0.1"])
    # not approved: said loudly, and the self-signed certificate still served
    wait(lambda: any(f"kubectl certificate approve {name}" in r.getMessage()
                     for r in caplog.records), 5, "the approval hint")
    time.sleep(0.5)
    assert served(port) == self_signed

    api.approve_csr(name)
    wait(lambda: node.rotations == 1, 10, "the first certificate")
    issued = served(port)
    assert issued != self_signed and verify(api.ca.cert, issued.encode())
    # A client that trusts only the cluster CA and checks the address works.
    ctx = ssl.create_default_context(cafile=str(api.ca.cert))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as t:
        t.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert t.recv(4096).startswith(b"HTTP/1.1 200")

    # short lifetime (8 s + 4 s backdate): renewed at 70-90 % of it, by itself
    info = servingcert.info(node.priv)
    second = wait(lambda: len(csrs(api)) == 2 and csrs(api)[1], 15, "a renewal CSR")
    renew_t = time.time()
    life = info["not_after"] - info["not_before"]
    assert info["not_before"] + 0.7 * life - 1 <= renew_t <= info["not_after"]
    api.approve_csr(second["metadata"]["name"])
    wait(lambda: node.rotations == 2, 10, "the renewed certificate")
    renewed = served(port)
    assert renewed not in (issued, self_signed) and verify(api.ca.cert, renewed.encode())

    # a new node address: a new CSR with it, before the renewal is due
    node.addresses_list.append("127.0.0.2")
    third = wait(lambda: len(csrs(api)) == 3 and csrs(api)[2], 5, "a CSR for the new address")
    assert san_set(openssl("req", "-noout", "-text", stdin=base64.b64decode(
        third["spec"]["request"]))) == names(["127.0.0.1", "127.0.0.2"])
    assert any("node addresses changed (127.0.0.1 -> 127.0.0.1, 127.0.0.2)" in r.getMessage()
               for r in caplog.records)


def test_denied_and_failed_requests_are_reported(node, caplog):
    api, port = node.emu, node.port
    self_signed = served(port)
    node.start()
    (first,) = wait(lambda: csrs(api), 10, "a serving CSR")
    api.deny_csr(first["metadata"]["name"])
    wait(lambda: any(f"certificate signing request {first['metadata']['name']} was denied "
                     "(TestDeny: denied by the test)" in r.getMessage()
                     for r in caplog.records), 5, "the denial in the log")
    assert served(port) == self_signed
    # then the signer refuses one (as it would a malformed request): Failed
    second = wait(lambda: len(csrs(api)) == 2 and csrs(api)[1], 5, "a new CSR")
    obj = api.store.get("certificatesigningrequests", "", second["metadata"]["name"])
    obj.setdefault("status", {})["conditions"] = [{
        "type": "Failed", "status": "True", "reason": "SignerValidationFailure",
        "message": "usages did not match"}]
    api.store.update("certificatesigningrequests", obj, subresource="status")
    wait(lambda: any("was failed (SignerValidationFailure: usages did not match); serving the "
                     "self-signed certificate" in r.getMessage() for r in caplog.records),
         5, "the failure in the log")
    assert served(port) == self_signed
    assert node.rotations == 0


def test_a_failed_load_is_retried_without_a_new_request(node, caplog):
    api, port = node.emu, node.port
    load, calls = node.on_cert, []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk on fire")
        load()
    node.on_cert = flaky
    node.start()
    (first,) = wait(lambda: csrs(api), 10, "a serving CSR")
    api.approve_csr(first["metadata"]["name"])
    wait(lambda: node.rotations == 1, 10, "the certificate loaded on the second try")
    assert len(calls) == 2 and len(csrs(api)) == 1
    assert verify(api.ca.cert, served(port).encode())
    assert any("cannot load it: disk on fire; trying again" in r.getMessage()
               for r in caplog.records)


def test_parent_refuses_serving_csrs_unless_configured(tmp_path):
    cfg = config.parse(f'user "nobody"\nnode name "{NODE}"\nstate directory "{tmp_path}/s"\n'
                       f'kubeconfig "{tmp_path}/kc"\n')
    pki.prepare(cfg, drop.lookup("nobody"))
    spec = specmod.load()
    table = Services(cfg, spec).table()
    table["Handshake"]({"spec_version": spec.version, "spec_digest": spec.digest,
                        "agent_version": "test"}, [])
    for method, body in (("CreateServingCSR", {"addresses": ["192.0.2.1"]}),
                         ("StoreServingCert", {"cert_pem": "x"})):
        with pytest.raises(Status) as e:
            table[method](body, [])
        assert e.value.code == "FAILED_PRECONDITION" and "not configured" in e.value.message
    assert not {pki.SERVING_PENDING, pki.SERVING_PENDING_CSR} & files(cfg)


def test_config_statement():
    cfg = config.parse('kubeconfig "/k"\ntls certificate csr\n')
    assert cfg.tls_csr and cfg.tls_cert is None and tls.self_signed(cfg)
    for bad, why in (('tls certificate csr\n', "needs a 'kubeconfig'"),
                     ('kubeconfig "/k"\ntls certificate csr\ntls key "/x"\n',
                      "'tls key' given with 'tls certificate csr'")):
        with pytest.raises(config.ConfigError) as e:
            config.parse(bad)
        assert why in str(e.value)
    assert config.parse('tls certificate "/c"\ntls key "/k"\n').tls_csr is False


def test_daemon_swaps_in_the_issued_certificate(public_tmp):
    """The real daemon: the sandboxed agent submits the CSR, keeps serving
    the self-signed certificate, and after approval loads the new one from
    the parent's file without a restart."""
    from daemon import Daemon, write_config
    api = ApiServer(public_tmp / "api").start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kc = api.kubeconfig("system:node:test-node")
    cfg = write_config(public_tmp, f'kubeconfig "{kc}"\nlisten on 127.0.0.1 port {port}\n'
                                   'node address 127.0.0.1\ntls certificate csr\n')
    d = Daemon(cfg)
    try:
        m = d.wait_for(r"certificate approve (csr-\w+)", timeout=20)
        assert not verify(api.ca.cert, served(port).encode())
        api.approve_csr(m.group(1))
        d.wait_for(r"serving certificate from the cluster installed for test-node", timeout=10)
        d.wait_for(r"serving certificate from the cluster in use", timeout=5)
        pem = served(port)
        assert verify(api.ca.cert, pem.encode())
        assert openssl("x509", "-noout", "-subject", "-nameopt", "RFC2253",
                       stdin=pem.encode()).strip() == \
            "subject=CN=system:node:test-node,O=system:nodes"
        assert not [line for line in d.lines if "Traceback" in line or "PRIVATE KEY" in line]
    finally:
        assert d.stop() == 0
        api.stop()
    assert not api.bugs
