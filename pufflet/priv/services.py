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
from pufflet.privsep.channel import Status
from pufflet.privsep.spec import Spec


class Services:
    """One instance per agent connection: a new agent must greet again."""

    def __init__(self, cfg: Config, spec: Spec) -> None:
        self.cfg = cfg
        self.spec = spec
        self.greeted = False

    def table(self) -> dict[str, Callable]:
        gated = {
            "Ping": self.ping,
            "GetNodeFacts": self.node_facts,
            "OpenLog": self.open_log,
            "WatchTicks": self.ticks,
        }
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
