"""TLS bootstrap and client certificate renewal, the agent's half.

The agent can neither exec openssl nor write a file, so the parent makes
the key and CSR (CreateClientCSR) and installs what the API server signs
(StoreClientCert); see priv/pki.py.  This side only talks to the API
server: submit the CSR, wait until it is signed, hand the certificate over.

As with the kubelet (--bootstrap-kubeconfig): the bootstrap credentials are
used only while there is no usable client certificate; afterwards the
current certificate asks for its own successor, at a random point between
70 % and 90 % of its life so a fleet of nodes does not renew at once.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import threading
import time
from typing import Callable

from kubernetes import client as k8s
# Imported by name now: kubernetes.client loads its API classes on first
# use, which the sandbox would refuse.  Bodies are plain JSON for the same
# reason (no model classes to load) and because it is simpler.
from kubernetes.client.api.certificates_v1_api import CertificatesV1Api
from kubernetes.client.exceptions import ApiException

from pufflet.agent import kube
from pufflet.config import Config
from pufflet.privsep.channel import Client, Status

log = logging.getLogger("pufflet.agent.bootstrap")

SIGNER = "kubernetes.io/kube-apiserver-client-kubelet"
# EC keys sign, they do not encipher: the kubelet asks "key encipherment"
# only for RSA keys, and the parent only makes EC P-256 keys.
USAGES = ["digital signature", "client auth"]
# A certificate with less than this left is not worth starting with.
MIN_LEFT = 60.0
RENEW_FROM, RENEW_TO = 0.7, 0.9
# How long one CSR is waited for before a new one is made (the kubelet
# waits an hour).  The watch is re-opened every WATCH_SLICE seconds, so a
# stop request is seen.
CSR_WAIT = 3600.0
WATCH_SLICE = 30
RETRY_MIN, RETRY_MAX = 2.0, 300.0


class BootstrapError(Exception):
    """The API server did not give us a certificate this time."""


class Backoff:
    """Doubling delays with jitter, so nodes retrying together spread out."""

    def __init__(self, low: float = RETRY_MIN, high: float = RETRY_MAX) -> None:
        self.low, self.high, self.next = low, high, low

    def delay(self) -> float:
        d = self.next
        self.next = min(self.next * 2, self.high)
        return d * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.next = self.low


def cert_info(priv: Client) -> tuple[int, int] | None:
    """(notBefore, notAfter) of the certificate in use, None without one."""
    info = priv.call("GetClientCertInfo", {}).body
    return (info["not_before"], info["not_after"]) if info["present"] else None


def _usable(info: tuple[int, int] | None, now: float) -> bool:
    if info is None:
        return False
    nb, na = info
    return now < na - min(MIN_LEFT, (na - nb) * 0.1)


def renew_at(not_before: int, not_after: int) -> float:
    """When to ask for the next certificate: 70-90 % into this one's life."""
    return not_before + (not_after - not_before) * random.uniform(RENEW_FROM, RENEW_TO)


def _failure(csr: dict) -> str | None:
    for c in (csr.get("status") or {}).get("conditions") or ():
        if c.get("type") in ("Denied", "Failed") and c.get("status") == "True":
            return (f"{c['type'].lower()} ({c.get('reason') or 'no reason'}: "
                    f"{c.get('message') or 'no message'})")
    return None


def _signed(csr: dict) -> str | None:
    cert = (csr.get("status") or {}).get("certificate")
    return base64.b64decode(cert).decode("ascii") if cert else None


def request_certificate(api: k8s.ApiClient, csr_pem: str,
                        stop: threading.Event | None = None,
                        wait: float = CSR_WAIT, *, signer: str = SIGNER,
                        usages: list[str] = USAGES, generate_name: str = "node-csr-",
                        submitted: Callable[[str], None] | None = None) -> str:
    """Submit csr_pem as a CertificateSigningRequest for signer and return
    the PEM the signer issues.  submitted(name) is called once it is
    created (to say who must approve it).  Raises BootstrapError if it is
    denied, fails or takes longer than wait seconds, ApiException for the
    API server's refusals."""
    certs = CertificatesV1Api(api)
    body = {"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"generateName": generate_name},
            "spec": {"request": base64.b64encode(csr_pem.encode()).decode(),
                     "signerName": signer, "usages": list(usages)}}
    resp = certs.create_certificate_signing_request(body, _preload_content=False)
    name = json.loads(resp.data)["metadata"]["name"]
    if submitted is not None:
        submitted(name)
    else:
        log.info("certificate signing request %s submitted; waiting for approval", name)
    deadline = time.monotonic() + wait
    while stop is None or not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            raise BootstrapError(f"certificate signing request {name} was not signed "
                                 f"within {wait:.0f}s")
        # No resourceVersion: the watch starts with the CSR as it is now,
        # so an approval that came before the watch is not missed.
        slice_ = max(1, int(min(left, WATCH_SLICE)))
        resp = certs.list_certificate_signing_request(
            field_selector=f"metadata.name={name}", watch=True, timeout_seconds=slice_,
            _preload_content=False, _request_timeout=(kube.CONNECT_TIMEOUT, slice_ + 30))
        try:
            for line in resp:
                ev = json.loads(line)
                obj = ev.get("object") or {}
                if ev.get("type") == "ERROR":
                    raise BootstrapError(f"watching {name}: {obj.get('message', 'error')}")
                if ev.get("type") == "DELETED":
                    raise BootstrapError(f"certificate signing request {name} was deleted")
                why = _failure(obj)
                if why:
                    raise BootstrapError(f"certificate signing request {name} was {why}")
                cert = _signed(obj)
                if cert:
                    log.info("certificate signing request %s signed", name)
                    return cert
                if stop is not None and stop.is_set():
                    break
        finally:
            resp.release_conn()
    raise BootstrapError("stopped")


def _obtain(priv: Client, api: k8s.ApiClient, stop: threading.Event | None,
            wait: float) -> tuple[int, int]:
    """One round: new key and CSR from the parent, signed by the API
    server, installed by the parent."""
    csr = priv.call("CreateClientCSR", {}).body["csr_pem"]
    cert = request_certificate(api, csr, stop, wait)
    out = priv.call("StoreClientCert", {"cert_pem": cert}).body
    return out["not_before"], out["not_after"]


def describe_failure(e: Exception) -> str:
    if isinstance(e, (BootstrapError, Status)):
        return str(e)
    if isinstance(e, ApiException):
        return "API server answered " + kube.describe(e)
    return "API server: " + kube.describe(e)


def ensure_client_credentials(cfg: Config, priv: Client, *,
                              bootstrap: "kube.KubeAccess | None" = None,
                              stop: threading.Event | None = None,
                              backoff: Backoff | None = None,
                              wait: float = CSR_WAIT) -> str:
    """The kubeconfig to use, bootstrapping a client certificate first if
    there is no usable one.  bootstrap is the bootstrap kubeconfig, loaded
    before the agent dropped root (it is root's file); without it, it is
    read here.  Retries until it succeeds or stop is set."""
    if not cfg.kubeconfig:
        raise BootstrapError("no 'kubeconfig' configured")
    if not cfg.bootstrap_kubeconfig:
        return cfg.kubeconfig           # credentials are the admin's business
    info = cert_info(priv)
    if _usable(info, time.time()):
        return cfg.kubeconfig
    if bootstrap is None:
        bootstrap = kube.load_kubeconfig(cfg.bootstrap_kubeconfig)
    api = kube.api_client(bootstrap)
    backoff = backoff or Backoff()
    log.info("no usable client certificate: bootstrapping with %s", cfg.bootstrap_kubeconfig)
    try:
        while stop is None or not stop.is_set():
            try:
                nb, na = _obtain(priv, api, stop, wait)
            except Exception as e:      # noqa: BLE001 - logged and retried
                if stop is not None and stop.is_set():
                    break
                d = backoff.delay()
                log.error("TLS bootstrap: %s; retrying in %.0fs", describe_failure(e), d)
                if stop is not None:
                    stop.wait(d)
                else:
                    time.sleep(d)
                continue
            log.info("client certificate for system:node:%s valid until %s", cfg.node_name,
                     time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(na)))
            return cfg.kubeconfig
    finally:
        api.close()
    raise BootstrapError("stopped before a client certificate was obtained")


def swap_credentials(api: k8s.ApiClient, path: str) -> None:
    """Make api open its next connections with the kubeconfig at path (a
    renewed certificate).  Requests in flight finish on their connections;
    idle ones are closed so none is reused with the old certificate."""
    fresh = kube.api_client(kube.load_kubeconfig(path))
    old = api.rest_client.pool_manager
    api.rest_client.pool_manager = fresh.rest_client.pool_manager
    old.clear()


class Rotator(threading.Thread):
    """Renews the client certificate with itself, then calls on_rotated
    with the kubeconfig path so the API clients pick up the new pair (they
    load it for new connections; connections already open stay
    authenticated as they are, the old certificate being still valid)."""

    def __init__(self, cfg: Config, priv: Client, on_rotated: Callable[[str], None],
                 stop: threading.Event, *, backoff: Backoff | None = None,
                 wait: float = CSR_WAIT) -> None:
        super().__init__(name="cert-rotator", daemon=True)
        self.cfg, self.priv, self.on_rotated, self.stop = cfg, priv, on_rotated, stop
        self.backoff = backoff or Backoff()
        self.wait = wait
        self.rotations = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                info = cert_info(self.priv)
            except (Status, OSError) as e:
                log.error("certificate renewal: cannot read the certificate: %s", e)
                return
            if info is None:
                log.error("certificate renewal: no client certificate to renew")
                return
            when = renew_at(*info)
            log.info("client certificate renewal due at %s",
                     time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when)))
            if self.stop.wait(max(0.0, when - time.time())):
                return
            self._renew()

    def _renew(self) -> None:
        while not self.stop.is_set():
            api = None
            try:
                # The current certificate asks for its successor.
                api = kube.api_client(kube.load_kubeconfig(self.cfg.kubeconfig))
                nb, na = _obtain(self.priv, api, self.stop, self.wait)
            except Exception as e:      # noqa: BLE001 - logged and retried
                if self.stop.is_set():
                    return
                d = self.backoff.delay()
                log.error("certificate renewal: %s; retrying in %.0fs", describe_failure(e), d)
                self.stop.wait(d)
                continue
            finally:
                if api is not None:
                    api.close()
            self.backoff.reset()
            self.rotations += 1
            log.info("client certificate renewed, valid until %s",
                     time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(na)))
            try:
                self.on_rotated(self.cfg.kubeconfig)
            except Exception as e:      # noqa: BLE001 - the thread must go on
                log.error("certificate renewal: cannot load the new certificate: %s", e)
            return
