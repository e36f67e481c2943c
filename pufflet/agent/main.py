"""The unprivileged agent: everything that faces the network lives here.

Order matters and is the same as in OpenBSD daemons: load every module the
agent will ever need while we may still read them, drop to the configured
user, confine with unveil+pledge (Landlock on Linux), and only then speak.
"""

import logging
import os
import signal
import socket
import sys
import threading

from pufflet import __version__, log as plog, platform
from pufflet.config import Config
from pufflet.platform import SandboxError
from pufflet.privsep import drop
from pufflet.privsep.channel import Client
from pufflet.privsep.spec import Spec

log = logging.getLogger("pufflet.agent")

# pledge(2) promises: stdio for syslog(3)/sendsyslog(2) and the channel;
# rpath for the kubeconfig and CA files; inet and dns to reach the API
# server and registries; recvfd for pipes and sockets the parent opens
# inside pods. Nothing that can write files, exec or change ids.
PROMISES = "stdio rpath inet dns recvfd"

# How often the agent checks that the parent is still there when idle.
PARENT_CHECK = 0.5
PING_EVERY = 10.0


def sandbox_paths(cfg: Config) -> list[tuple[str, str]]:
    """What the agent may read: name resolution, the CA store, its
    credentials. Not the state or log directories: those are the parent's."""
    paths = [("/etc/resolv.conf", "r"), ("/etc/hosts", "r"), ("/etc/ssl", "r")]
    for p in (cfg.kubeconfig, cfg.bootstrap_kubeconfig):
        if p:
            paths.append((p, "r"))
    return paths


def confine(cfg: Config) -> None:
    """Apply the sandbox. On OpenBSD failing to pledge is fatal; elsewhere a
    missing mechanism is worth a warning, not a refusal to run."""
    try:
        platform.current().sandbox(sandbox_paths(cfg), PROMISES)
    except SandboxError as e:
        if sys.platform.startswith("openbsd"):
            raise
        log.warning("no sandbox applied to the agent: %s", e)


def _watch_parent(parent: int) -> None:
    """The agent can do nothing alone: leave as soon as the parent is gone."""
    while True:
        if os.getppid() != parent:
            os._exit(0)
        threading.Event().wait(PARENT_CHECK)


def main(sock: socket.socket, cfg: Config, spec: Spec, ident: drop.Identity) -> int:
    plog.set_role("agent")
    platform.current().set_title("pufflet: agent")
    parent = os.getppid()
    drop.drop(ident)
    confine(cfg)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    client = Client(sock, spec)
    hello = client.call("Handshake", {"spec_version": spec.version, "spec_digest": spec.digest,
                                      "agent_version": __version__}).body
    facts = client.call("GetNodeFacts", {}).body
    log.info("agent ready: node %s, %s %s %s, %d cpus, %d MiB, uid %d",
             hello["node_name"], facts["os_name"], facts["os_release"], facts["machine"],
             facts["cpus"], facts["memory_bytes"] >> 20, os.getuid())
    if not cfg.kubeconfig:
        log.info("no kubeconfig: standalone mode")
    seq = 0
    while not stop.wait(PING_EVERY):
        seq += 1
        client.call("Ping", {"seq": seq, "payload": b""}, timeout=PING_EVERY)
    log.info("agent stopping")
    client.close()
    return 0
