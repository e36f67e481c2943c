"""The node API's TLS: serving certificate and client CA.

Where the serving certificate comes from, as the kubelet's:

- 'tls certificate' and 'tls key' in pufflet.conf: root's files, so the
  agent builds its context from them before it drops root (an
  SSLContext keeps what it loaded in memory);
- otherwise a self-signed one the parent makes with openssl(1) at first
  start (GetServingCert, priv/pki.py) in <state_dir>/pki/serving.pem, the
  agent user's: read after the drop, inside the sandbox.

- 'tls certificate csr': one the cluster signs (signer
  kubernetes.io/kubelet-serving, agent/servingcert.py), installed by the
  parent as <state_dir>/pki/serving-current.pem; the self-signed one
  until the first is approved and issued, then each new one swapped into
  the running server (Server.set_context).

Client certificates are verified against 'tls client ca' when given:
optional at the TLS layer (a token may do instead), but a certificate that
is offered and does not verify (another CA, expired) fails the handshake.
"""

from __future__ import annotations

import os
import ssl

from pufflet.config import Config

SERVING = "serving.pem"     # priv/pki.py's names for them
CSR_CURRENT = "serving-current.pem"


def serving_path(cfg: Config) -> str:
    return os.path.join(cfg.state_dir, "pki", SERVING)


def csr_path(cfg: Config) -> str:
    return os.path.join(cfg.state_dir, "pki", CSR_CURRENT)


def self_signed(cfg: Config) -> bool:
    """Does the serving certificate live in the state directory?  (Either
    self-signed, or from a CSR with the self-signed one until then.)"""
    return not (cfg.tls_cert and cfg.tls_key)


def read_client_ca(cfg: Config) -> str | None:
    """The client CA bundle, read while still root."""
    if not cfg.tls_client_ca:
        return None
    with open(cfg.tls_client_ca, encoding="ascii") as f:
        return f.read()


def context(cert_file: str, key_file: str, client_ca: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # The kubelet's floor too: TLS 1.2.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    # HTTP/1.1 only: the streaming protocols are upgrades of it.
    ctx.set_alpn_protocols(["http/1.1"])
    if client_ca:
        ctx.load_verify_locations(cadata=client_ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def config_context(cfg: Config, client_ca: str | None) -> ssl.SSLContext | None:
    """The context from pufflet.conf's certificate, None when self-signed."""
    if self_signed(cfg):
        return None
    return context(cfg.tls_cert, cfg.tls_key, client_ca)
