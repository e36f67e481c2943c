"""The parent's answers to the agent, one function per spec method.

Every body arrives already validated against the spec; what the spec cannot
say (which file a name may open, whether the handshake happened) is checked
here. Paths are always computed from the configuration, never taken from
the agent.
"""

import os
from typing import Callable, Iterator

from pufflet import __version__, platform
from pufflet.config import Config
from pufflet.priv import pki, stats
from pufflet.privsep import drop
from pufflet.priv.images_rpc import ImageRPC
from pufflet.privsep.channel import Status
from pufflet.privsep.spec import Spec


POD_METHODS = ("CreatePod", "SetVolume", "StartContainer", "SignalContainer",
               "RemovePod", "ListPods", "WatchContainers", "StartExec", "SignalExec",
               "AttachContainer", "PortForward", "SetPodRoutes")


def _unavailable(body: dict, fds: list[int]):
    raise Status("UNAVAILABLE", "this parent runs no pods")


class Services:
    """One instance per agent connection: a new agent must greet again."""

    def __init__(self, cfg: Config, spec: Spec, pods=None) -> None:
        self.cfg = cfg
        self.spec = spec
        self.greeted = False
        self.images = ImageRPC(self._open_image_store)
        # The daemon's one PodRuntime (priv/pods.py), shared by every agent
        # connection; None where nothing runs pods (some tests).
        self.pods = pods
        # One per daemon, not per connection: its counters keep CPU
        # monotonic across agent restarts.
        self.stats = stats.collector_for(cfg, pods, self._image_bytes)

    def table(self) -> dict[str, Callable]:
        gated = {
            "Ping": self.ping,
            "GetNodeFacts": self.node_facts,
            "OpenLog": self.open_log,
            "WatchTicks": self.ticks,
            "CreateClientCSR": self.create_client_csr,
            "StoreClientCert": self.store_client_cert,
            "GetClientCertInfo": self.client_cert_info,
            "GetServingCert": self.serving_cert,
            "CreateServingCSR": self.create_serving_csr,
            "StoreServingCert": self.store_serving_cert,
            "GetServingCertInfo": self.serving_cert_info,
            "GetStats": self.stats.get_stats,
        }
        gated.update(self.images.table())
        gated.update(self.pods.table() if self.pods is not None else
                     {name: _unavailable for name in POD_METHODS})
        if self.pods is not None:
            # kubectl port-forward: connections into the pods' networks,
            # made by the runtime's forwarder (whose dialers it reaps).
            gated.update(self.pods.forwarder.table())
        table = {name: self._after_handshake(fn) for name, fn in gated.items()}
        table["Handshake"] = self.handshake
        return table

    def _after_handshake(self, fn: Callable) -> Callable:
        def wrapper(body: dict, fds: list[int]):
            if not self.greeted:
                raise Status("FAILED_PRECONDITION", "handshake first")
            return fn(body, fds)
        return wrapper

    def handshake(self, body: dict, fds: list[int]) -> dict:
        if (body["spec_version"], body["spec_digest"]) != (self.spec.version, self.spec.digest):
            raise Status("FAILED_PRECONDITION",
                         f"spec mismatch: priv has version {self.spec.version} "
                         f"digest {self.spec.digest[:12]}")
        self.greeted = True
        return {"spec_version": self.spec.version, "priv_version": __version__,
                "node_name": self.cfg.node_name}

    def _open_image_store(self):
        # Imported here: the store pulls in the unpacker, which only the
        # parent needs, and only once images are asked for.
        from pufflet.priv.imagestore import Store
        return Store(os.path.join(self.cfg.state_dir, "images"))

    def _image_bytes(self) -> int:
        return sum(img.size for img in self.images.store.list())

    def ping(self, body: dict, fds: list[int]) -> dict:
        return body

    def node_facts(self, body: dict, fds: list[int]) -> dict:
        return platform.current().node_facts(self.cfg.state_dir)

    def open_log(self, body: dict, fds: list[int]) -> tuple[dict, list[int]]:
        # The spec's pattern keeps the name to [a-z][a-z0-9-]*: no '/' and no
        # '..', so the path stays inside the log directory.
        path = os.path.join(self.cfg.log_dir, body["name"] + ".log")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o640)
        except OSError as e:
            raise Status("UNAVAILABLE", f"{path}: {e.strerror}") from None
        return {}, [fd]

    def ticks(self, body: dict, fds: list[int]) -> Iterator[dict]:
        for n in range(body["count"]):
            yield {"n": n}

    # -- TLS bootstrap: see priv/pki.py --------------------------------------

    def create_client_csr(self, body: dict, fds: list[int]) -> dict:
        return {"csr_pem": pki.create_csr(self.cfg)}

    def store_client_cert(self, body: dict, fds: list[int]) -> dict:
        try:
            owner = drop.lookup(self.cfg.user)
        except drop.DropError as e:
            raise Status("FAILED_PRECONDITION", str(e)) from None
        info = pki.store_cert(self.cfg, owner, body["cert_pem"])
        return {"not_before": info.not_before, "not_after": info.not_after}

    def client_cert_info(self, body: dict, fds: list[int]) -> dict:
        info = pki.current_info(self.cfg)
        if info is None:
            return {"present": False, "not_before": 0, "not_after": 0}
        return {"present": True, "not_before": info.not_before, "not_after": info.not_after}

    def serving_cert(self, body: dict, fds: list[int]) -> dict:
        try:
            owner = drop.lookup(self.cfg.user)
        except drop.DropError as e:
            raise Status("FAILED_PRECONDITION", str(e)) from None
        info = pki.serving_cert(self.cfg, owner, body["addresses"])
        return {"not_before": info.not_before, "not_after": info.not_after}

    # -- the serving certificate from the cluster ('tls certificate csr') ---

    def _want_serving_csr(self) -> None:
        # Only when the admin asked for it: an agent cannot start asking
        # the cluster for certificates in the node's name on its own.
        if not self.cfg.tls_csr:
            raise Status("FAILED_PRECONDITION", "'tls certificate csr' is not configured")

    def create_serving_csr(self, body: dict, fds: list[int]) -> dict:
        self._want_serving_csr()
        return {"csr_pem": pki.create_serving_csr(self.cfg, body["addresses"])}

    def store_serving_cert(self, body: dict, fds: list[int]) -> dict:
        self._want_serving_csr()
        try:
            owner = drop.lookup(self.cfg.user)
        except drop.DropError as e:
            raise Status("FAILED_PRECONDITION", str(e)) from None
        return _serving_reply(pki.store_serving_cert(self.cfg, owner, body["cert_pem"]))

    def serving_cert_info(self, body: dict, fds: list[int]) -> dict:
        return _serving_reply(pki.serving_info(self.cfg))


def _serving_reply(info: "pki.ServingInfo | None") -> dict:
    if info is None:
        return {"present": False, "not_before": 0, "not_after": 0, "dns_names": [],
                "addresses": []}
    return {"present": True, "not_before": info.not_before, "not_after": info.not_after,
            "dns_names": list(info.dns_names), "addresses": list(info.ips)}
