"""The unprivileged agent: everything that faces the network lives here.

Order matters and is the same as in OpenBSD daemons: load every module the
agent will ever need while we may still read them, drop to the configured
user, confine with unveil+pledge (Landlock on Linux), and only then speak.
"""

import logging
import os
import signal
import socket
import threading
import time

from pufflet import __version__, log as plog, platform
from pufflet.config import Config
from pufflet.platform import SandboxUnavailable
from pufflet.privsep import drop
from pufflet.privsep.channel import Client, Status
from pufflet.images import auth as image_auth, registry
from pufflet.images.privstore import PrivStore
from pufflet.images.puller import Puller
from pufflet.privsep.spec import Spec

log = logging.getLogger("pufflet.agent")

# pledge(2) promises: stdio for syslog(3)/sendsyslog(2) and the channel;
# rpath for the kubeconfig and CA files; inet and dns to reach the API
# server and registries; recvfd for pipes and sockets the parent opens
# inside pods; tty for TIOCSWINSZ on the pty master of a `kubectl exec -t`
# (the window size the client's resize stream sends). Nothing that can
# write files, exec or change ids.
PROMISES = "stdio rpath inet dns recvfd tty"

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
    # The client certificate pufflet bootstraps and renews (priv/pki.py):
    # the directory, as each renewal adds a file and moves a symlink.
    # Also the node API's self-signed serving certificate, made there by
    # the parent.  Otherwise the agent has no business there.
    serving = (cfg.kubeconfig or cfg.node_api_open) and not (cfg.tls_cert and cfg.tls_key)
    if cfg.kubeconfig and cfg.bootstrap_kubeconfig or serving:
        paths.append((os.path.join(cfg.state_dir, "pki"), "r"))
    # Container logs, for kubectl logs (nodeapi/logs.py); the parent
    # makes the directory before the agent starts.
    paths.append((os.path.join(cfg.log_dir, "pods"), "r"))
    # Static pod manifests (agent/staticpods.py), read again every 20 s.
    if cfg.static_pod_dir:
        paths.append((cfg.static_pod_dir, "r"))
    return paths


def confine(cfg: Config) -> None:
    """Apply the sandbox. A system without a mechanism (no Landlock in this
    kernel, not OpenBSD nor Linux) is worth a warning; a mechanism that is
    there but fails is fatal, since half a sandbox is worse than a clear
    refusal to run."""
    try:
        platform.current().sandbox(sandbox_paths(cfg), PROMISES)
    except SandboxUnavailable as e:
        log.warning("no sandbox applied to the agent: %s", e)


def registry_client(cfg: Config) -> registry.Client:
    """The agent's registry client: node credentials from the file named
    by 'registry credentials', plain HTTP only for 'insecure registry'."""
    keyring = image_auth.Keyring()
    if cfg.registry_credentials:
        keyring = image_auth.Keyring.from_file(cfg.registry_credentials)
    return registry.Client(insecure=cfg.insecure_registries, keyring=keyring)


def _cached(fn, ttl: float):
    """fn's answer, asked again after ttl seconds: the node's address is
    wanted at every pod status and costs a connect(2) to find."""
    state: dict = {}

    def get():
        now = time.monotonic()
        if "at" not in state or now - state["at"] > ttl:
            state["value"], state["at"] = fn(), now
        return state["value"]
    return get


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
    if cfg.kubeconfig:
        # Imported here, not at the top of this file: the parent imports
        # this module and must never load the kubernetes client; and now,
        # before the drop and the sandbox, while its files are readable.
        import encodings.idna  # noqa: F401 - for a DNS name in a server URL
        from pufflet.agent import bootstrap, kube, node, podroutes, servingcert
    # The pod workers, in every mode: static pods run standalone too.  Like
    # everything the agent uses, imported before the drop.
    from pufflet.agent import pods
    from pufflet.agent.runtime import Runtime
    from pufflet.nodeapi import app as nodeapi, pods as nodeapi_pods, stats as nodeapi_stats
    from pufflet.nodeapi import agentbackend, portforward as nodeapi_portforward, remotecommand
    # The node API's certificate, key and client CA may be root's: read
    # them now.
    prepared = None
    if nodeapi.wanted(cfg):
        try:
            prepared = nodeapi.prepare(cfg)
        except (OSError, ValueError) as e:       # ssl.SSLError is an OSError
            log.error("node API TLS: %s", e)
            return 1
    # The bootstrap kubeconfig holds root's token: read it while we still may.
    boot = None
    if cfg.kubeconfig and cfg.bootstrap_kubeconfig:
        try:
            boot = kube.load_kubeconfig(cfg.bootstrap_kubeconfig)
        except kube.KubeconfigError as e:
            log.error("bootstrap kubeconfig: %s", e)
            return 1
    # Without bootstrap, the kubeconfig and the certificate, key and CA it
    # names (root's, 0600) are read now, into memory.
    access = None
    if cfg.kubeconfig and boot is None:
        try:
            access = kube.load_kubeconfig(cfg.kubeconfig)
        except kube.KubeconfigError as e:
            log.error("kubeconfig: %s", e)
            return 1
    # Registry credentials are root's (mode 0600) and the CA store may be
    # out of reach once confined: read both now.
    try:
        registries = registry_client(cfg)
    except (OSError, image_auth.CredentialsError) as e:
        log.error("registry credentials: %s", e)
        return 1
    drop.drop(ident)
    confine(cfg)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    client = Client(sock, spec)
    # Pods pull through this (agent/pods.py).
    images = Puller(PrivStore(client), registries)
    hello = client.call("Handshake", {"spec_version": spec.version, "spec_digest": spec.digest,
                                      "agent_version": __version__}).body
    facts = client.call("GetNodeFacts", {}).body
    log.info("agent ready: node %s, %s %s %s, %d cpus, %d MiB, uid %d",
             hello["node_name"], facts["os_name"], facts["os_release"], facts["machine"],
             facts["cpus"], facts["memory_bytes"] >> 20, os.getuid())
    if not cfg.kubeconfig:
        log.info("no kubeconfig: standalone mode")
    api = None
    if boot is not None:
        # TLS bootstrap (agent/bootstrap.py): blocks until there is a client
        # certificate; the kubeconfig the parent wrote names it, and both
        # are this user's files, so they are read after the drop.
        try:
            path = bootstrap.ensure_client_credentials(cfg, client, bootstrap=boot, stop=stop)
            api = kube.api_client(kube.load_kubeconfig(path))
        except (bootstrap.BootstrapError, kube.KubeconfigError) as e:
            if not stop.is_set():
                log.error("TLS bootstrap: %s", e)
                return 1
        else:
            log.info("using kubeconfig %s", path)
            bootstrap.Rotator(cfg, client, lambda p: bootstrap.swap_credentials(api, p),
                              stop).start()
    if access is not None:
        api = kube.api_client(access)
    agent = None
    if api is not None:
        log.info("joining the cluster at %s as node %s", api.configuration.host,
                 cfg.node_name)
        agent = node.NodeAgent(cfg, api, lambda: client.call("GetNodeFacts", {}).body,
                               api.configuration.host, stop,
                               lambda: client.call("ListImages", {}).body["images"])
        agent.start()
    keeper = None
    if api is not None and cfg.pod_routes:
        # Routes to other nodes' pods (agent/podroutes.py).
        keeper = podroutes.RouteKeeper(
            api, cfg.node_name, cfg.pod_routes,
            lambda routes: client.call("SetPodRoutes", {"routes": routes},
                                       timeout=120).body, stop)
        keeper.start()
    manager = pods.PodManager(
        cfg, Runtime(client, None, stop), images, api=api,
        node_uid=(lambda: agent.uid) if agent is not None else (lambda: None),
        host_ip=_cached(agent.address, 30.0) if agent is not None else (lambda: None),
        pod_cidr=(lambda: agent.pod_cidr) if agent is not None else (lambda: ""),
        stop=stop, node_os=facts["os_name"].lower())
    manager.start()
    server = None
    if prepared is not None:
        lookup, listing = nodeapi_pods.from_manager(manager)

        address = _cached(lambda: cfg.node_address or (
            agent.address() if agent is not None else None), 30.0)

        def serving_cert() -> None:
            addr = address()
            client.call("GetServingCert", {"addresses": [addr] if addr else []})

        def csr_cert_usable() -> bool:
            return servingcert.usable(servingcert.info(client), time.time())
        try:
            ctx, serving = nodeapi.initial_context(cfg, prepared, serving_cert, csr_cert_usable)
            server = nodeapi.start(cfg, prepared, api, ctx, lookup, listing)
        except (OSError, ValueError, Status) as e:
            log.error("node API: %s", e)
            manager.close()
            return 1
        if cfg.tls_csr and api is not None:
            # 'tls certificate csr' needs a kubeconfig (config.py), so api
            # is None only when TLS bootstrap was stopped.
            servingcert.ServingRotator(
                client, api, lambda: [a] if (a := address()) else [],
                lambda: nodeapi.reload_csr_cert(cfg, prepared, server), stop,
                serving=serving).start()
        # kubectl top: /stats/summary and /metrics/resource from the
        # parent's accounting, sampled in the background too so that CPU
        # of processes that end between scrapes is not missed.
        source = nodeapi_stats.StatsSource(lambda: client.call("GetStats", {}).body,
                                           cfg.node_name,
                                           nodeapi_stats.lookup_from_manager(manager))
        nodeapi_stats.add_routes(server, source)
        # kubectl exec, attach and port-forward: the processes, stdins and
        # connections are the parent's (StartExec, AttachContainer,
        # PortForward), handed to us as fds.
        streams = agentbackend.AgentBackend(manager, cfg.log_dir)
        remotecommand.register(server, streams)
        nodeapi_portforward.register(server, streams)
        threading.Thread(target=source.run, args=(stop,), daemon=True,
                         name="stats").start()
    seq = 0
    while not stop.wait(PING_EVERY):
        seq += 1
        client.call("Ping", {"seq": seq, "payload": b""}, timeout=PING_EVERY)
    log.info("agent stopping")
    if server is not None:
        server.close()
    manager.close()
    if keeper is not None:
        keeper.close()
    if agent is not None:
        agent.close()
    client.close()
    return 0
