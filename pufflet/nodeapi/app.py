"""The node API put together: TLS context, gate, routes.

agent/main.py calls prepare() while still root (it reads root's files)
and start() once confined; the streaming and stats routes are added to
the returned Server by their own modules' add_routes.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from typing import Any, Callable

from pufflet.config import Config
from pufflet.nodeapi import auth, logs, pods, tls
from pufflet.nodeapi.server import Server

log = logging.getLogger("pufflet.nodeapi")


@dataclass
class Prepared:
    """What must be read before the drop."""
    client_ca: str | None
    ctx: ssl.SSLContext | None      # None: the self-signed one, made later


def wanted(cfg: Config) -> bool:
    """Serve only where a caller can be checked (the API server answers
    TokenReview and SubjectAccessReview), or where checks are explicitly off."""
    return bool(cfg.kubeconfig) or cfg.node_api_open


def prepare(cfg: Config) -> Prepared:
    """Call as root, before the sandbox."""
    if cfg.kubeconfig and not cfg.node_api_open:
        auth.preload()
    client_ca = tls.read_client_ca(cfg)
    return Prepared(client_ca, tls.config_context(cfg, client_ca))


def pods_log_root(cfg: Config) -> str:
    return os.path.join(cfg.log_dir, "pods")


def gate(cfg: Config, api: Any) -> auth.Gate:
    if cfg.node_api_open:
        # Loud on purpose, at every start: anyone who reaches the port
        # can read every log and run commands in every pod.
        for _ in range(3):
            log.warning("NODE API AUTHENTICATION IS OFF ('node api authentication none'): "
                        "anyone reaching %s:%d may exec into any pod",
                        cfg.listen_address, cfg.listen_port)
        return auth.Gate(cfg.node_name, open=True)
    if not cfg.tls_client_ca:
        log.warning("no 'tls client ca': the node API accepts only bearer tokens, "
                    "and the API server's own requests will be refused")
    if api is None:
        return auth.Gate(cfg.node_name)
    token_review, access_review = auth.kube_reviewers(api)
    return auth.Gate(cfg.node_name, token_review, access_review)


def build(cfg: Config, ctx: ssl.SSLContext, g: auth.Gate, pod_lookup: pods.PodLookup,
          pods_list: pods.PodsList, **kw: Any) -> Server:
    s = Server(ctx, g, **kw)
    pods.add_routes(s, pods_list)
    logs.add_routes(s, pods_log_root(cfg), pod_lookup)
    return s


def initial_context(cfg: Config, prep: Prepared, serving_cert: Callable[[], None],
                    csr_cert_usable: Callable[[], bool]) -> tuple[ssl.SSLContext, str]:
    """The context to start with, and what it serves ("configured",
    "cluster-issued" or "self-signed").  With 'tls certificate csr', a
    certificate the cluster issued earlier if it is still valid, else the
    self-signed one until a new one is issued."""
    if prep.ctx is not None:
        return prep.ctx, "configured"
    if cfg.tls_csr and csr_cert_usable():
        path = tls.csr_path(cfg)
        return tls.context(path, path, prep.client_ca), "cluster-issued"
    serving_cert()
    path = tls.serving_path(cfg)
    if cfg.tls_csr:
        log.info("node API: serving the self-signed certificate until the cluster "
                 "signs one ('tls certificate csr')")
    return tls.context(path, path, prep.client_ca), "self-signed"


def reload_csr_cert(cfg: Config, prep: Prepared, s: Server) -> None:
    """Swap the certificate the cluster just issued into the running server."""
    path = tls.csr_path(cfg)
    s.set_context(tls.context(path, path, prep.client_ca))


def start(cfg: Config, prep: Prepared, api: Any, ctx: ssl.SSLContext,
          pod_lookup: pods.PodLookup, pods_list: pods.PodsList) -> Server:
    """Listen on 'listen on' with ctx (initial_context)."""
    s = build(cfg, ctx, gate(cfg, api), pod_lookup, pods_list)
    host, port = s.listen(cfg.listen_address, cfg.listen_port)
    s.start()
    log.info("node API listening on %s:%d", host, port)
    return s
