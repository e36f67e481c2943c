"""The node API's serving certificate from the cluster ('tls certificate
csr'), the agent's half.

As the kubelet with serverTLSBootstrap: a CertificateSigningRequest for the
signer kubernetes.io/kubelet-serving, CN system:node:<name>, O
system:nodes, SANs the node's names and addresses.  The parent makes the
key and the CSR (CreateServingCSR) and checks and installs what comes back
(StoreServingCert); see priv/pki.py.  This side submits, waits, and swaps
the new certificate into the running server.

kube-controller-manager approves only client certificates of nodes: a
serving CSR waits for an admin's `kubectl certificate approve`.  Meanwhile
the node API keeps serving the certificate it has, the self-signed one at
first (the kubelet serves nothing until approval; a node that answers
`kubectl logs` of an API server that does not check kubelet certificates,
the default, is more useful).

A new certificate is asked for at a random point between 70 % and 90 % of
the current one's life (as client-go's certificate manager), and when the
node's address is no longer among its names.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from kubernetes import client as k8s

from pufflet.agent import bootstrap
from pufflet.privsep.channel import Client

log = logging.getLogger("pufflet.agent.servingcert")

SIGNER = "kubernetes.io/kubelet-serving"
# The parent makes EC keys: they sign, they do not encipher, so no "key
# encipherment" (the kubelet asks for it only with RSA keys, and the
# signer accepts exactly these two sets).
USAGES = ["digital signature", "server auth"]
# How long one CSR is waited for before a new one is made: client-go's
# certificate manager waits 15 minutes.
CSR_WAIT = 900.0
# How often the node's addresses are compared with the certificate's
# names (client-go checks its template every second; addresses here come
# from a 30 s cache anyway).
POLL = 10.0


def info(priv: Client) -> dict | None:
    """The installed certificate's validity and names, None without one."""
    out = priv.call("GetServingCertInfo", {}).body
    return out if out["present"] else None


def usable(cert: dict | None, now: float) -> bool:
    return cert is not None and cert["not_before"] <= now < cert["not_after"]


class ServingRotator(threading.Thread):
    """Gets a serving certificate from the cluster and keeps it fresh;
    on_cert() is called after each one is installed, to load it."""

    def __init__(self, priv: Client, api: k8s.ApiClient,
                 addresses: Callable[[], list[str]], on_cert: Callable[[], None],
                 stop: threading.Event, *, backoff: bootstrap.Backoff | None = None,
                 wait: float = CSR_WAIT, poll: float = POLL,
                 serving: str = "self-signed") -> None:
        super().__init__(name="serving-cert", daemon=True)
        self.priv, self.api = priv, api
        self.addresses, self.on_cert, self.stop = addresses, on_cert, stop
        self.backoff = backoff or bootstrap.Backoff()
        self.wait, self.poll = wait, poll
        self.rotations = 0
        self._due: tuple[int, float] | None = None     # (not_after, renew at)
        self._serving = serving     # what the server presents, for the log
        self._unloaded = False      # installed by the parent, not yet served
        self._said_no_address = False

    def run(self) -> None:
        while not self.stop.is_set():
            if self._unloaded and not self._load():
                self.stop.wait(self.poll)
                continue
            try:
                cert = info(self.priv)
                want = sorted(set(self.addresses()))
            except Exception as e:      # noqa: BLE001 - logged and retried
                d = self.backoff.delay()
                log.error("serving certificate: %s; retrying in %.0fs", e, d)
                self.stop.wait(d)
                continue
            why = self.reason(cert, want, time.time())
            if why is None:
                self.stop.wait(self.poll)
                continue
            if not want:
                # The kubelet does not ask without addresses either: the
                # API server reaches a node by its address.
                if not self._said_no_address:
                    log.warning("serving certificate: %s, but no node address is known yet",
                                why)
                    self._said_no_address = True
                self.stop.wait(self.poll)
                continue
            log.info("serving certificate: %s; asking the cluster (signer %s)", why, SIGNER)
            try:
                self._obtain(want)
            except Exception as e:      # noqa: BLE001 - logged and retried
                if self.stop.is_set():
                    return
                d = self.backoff.delay()
                log.error("serving certificate: %s; serving the %s certificate, "
                          "retrying in %.0fs", bootstrap.describe_failure(e), self._serving, d)
                self.stop.wait(d)
                continue
            self.backoff.reset()

    def reason(self, cert: dict | None, want: list[str], now: float) -> str | None:
        """Why a new certificate is needed, None if it is not."""
        if cert is None:
            return "none issued yet"
        if now >= cert["not_after"]:
            return "expired"
        if want and sorted(cert["addresses"]) != want:
            return (f"node addresses changed ({', '.join(cert['addresses']) or 'none'} "
                    f"-> {', '.join(want)})")
        if self._due is None or self._due[0] != cert["not_after"]:
            # Drawn once per certificate, not at every poll.
            self._due = (cert["not_after"],
                         bootstrap.renew_at(cert["not_before"], cert["not_after"]))
            log.info("serving certificate renewal due at %s",
                     time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self._due[1])))
        if now >= self._due[1]:
            return "due for renewal"
        return None

    def _submitted(self, name: str) -> None:
        log.warning("serving certificate signing request %s waits for approval: "
                    "kube-controller-manager does not approve %s requests; approve it "
                    "with 'kubectl certificate approve %s'. Serving the %s certificate "
                    "meanwhile", name, SIGNER, name, self._serving)

    def _obtain(self, want: list[str]) -> None:
        csr = self.priv.call("CreateServingCSR", {"addresses": want}).body["csr_pem"]
        pem = bootstrap.request_certificate(self.api, csr, self.stop, self.wait,
                                            signer=SIGNER, usages=USAGES,
                                            generate_name="csr-", submitted=self._submitted)
        out = self.priv.call("StoreServingCert", {"cert_pem": pem}).body
        log.info("serving certificate from the cluster installed for %s, valid until %s",
                 ", ".join(out["dns_names"] + out["addresses"]),
                 time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(out["not_after"])))
        self._load()

    def _load(self) -> bool:
        """Swap the installed certificate into the server.  A failure is
        tried again at the next poll: the certificate is the parent's now,
        and asking for another would need another approval."""
        try:
            self.on_cert()
        except Exception as e:      # noqa: BLE001 - the thread must go on
            log.error("serving certificate: cannot load it: %s; trying again in %.0fs",
                      e, self.poll)
            self._unloaded = True
            return False
        self._unloaded = False
        self.rotations += 1
        self._serving = "cluster-issued"
        log.info("serving certificate from the cluster in use")
        return True
