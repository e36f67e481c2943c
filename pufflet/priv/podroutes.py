"""Routes to other nodes' pods, kept by the parent (pufflet.conf 'pod routes').

In a flat layer 2 cluster a pod on another node is reached through that
node: a route to its podCIDR via its InternalIP.  The agent watches the
Nodes and sends the whole set it wants (SetPodRoutes); the parent checks
every route against the configuration and makes the host's routing table
match: adds, changes and removes routes, its own only.

What the parent refuses, whatever the agent says (it may be compromised):
- a network outside the configured 'pod routes' networks, or one of
  them whole (no default route, no route to the API server's network);
- a network overlapping this node's pod network, or another accepted
  route (two nodes claiming one network: the first by node name wins);
- a gateway that is not a unicast address of the route's family, or that
  lies in a pod network (pods are never gateways).
The kernel refuses a gateway that is not on a directly connected network
(route(8) "Network is unreachable"; Linux "Nexthop has invalid gateway"):
that refusal is reported with the route, and the others still go in.

Which routes are pufflet's: the gateways it may have set are written to
routes.json (statefile) before the routing table is touched, so after a
crash or a restart it knows what to remove.  Routes also carry a mark
(Linux: protocol number 80; OpenBSD: label "pufflet") so that a removal
never takes an admin's route to the same network.  At start the routes
stay until the agent's first sync, which removes those of nodes gone
meanwhile; without 'pod routes' in the configuration they are removed
at start.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from pufflet.priv import statefile
from pufflet.priv.netplan import StepError
from pufflet.privsep.channel import Status

__all__ = ["PodRoutes", "RouteError", "TABLE", "MAX_ROUTES"]

log = logging.getLogger("pufflet.priv.podroutes")

TABLE = "routes.json"
MAX_ROUTES = 1000       # as the spec's SetPodRoutesRequest
REASON_LEN = 256        # as the spec's RefusedRoute.reason
REFRESH = 300.0         # seconds between settings of every route
_VERSION = 1

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


class RouteError(Exception):
    """One route is refused; the message says why."""


class PodRoutes:
    def __init__(self, state_dir: str, clusters: Iterable[str], backend: Any,
                 own: Callable[[], str | None], refresh: float = REFRESH) -> None:
        """clusters: the 'pod routes' networks; backend: podnet's
        LinuxBackend or OpenBSDBackend (None: no routes on this OS);
        own: this node's pod CIDR, if known."""
        self.path = os.path.join(state_dir, TABLE)
        self.clusters: list[Net] = [ipaddress.ip_network(c) for c in clusters]
        self.backend = backend
        self.own = own
        # cidr -> gateways it may have in the kernel: the file.
        self.recorded: dict[str, list[str]] = self._load()
        # cidr -> gateway set in the kernel by this process.
        self.applied: dict[str, str] = {}
        # Routes are set again, changed or not, once per refresh: a route
        # someone removed by hand comes back within that time.
        self.refresh = refresh
        self.refreshed = time.monotonic()
        if self.recorded and not self.clusters and backend is not None:
            log.info("'pod routes' is not configured: removing the %d routes to "
                     "other nodes' pods", len(self.recorded))
            self._remove(list(self.recorded))

    # -- the table -------------------------------------------------------------

    def _load(self) -> dict[str, list[str]]:
        try:
            st = statefile.read_json(self.path, None)
        except statefile.StateError as e:
            log.error("%s: %s; starting without it", self.path, e)
            return {}
        if st is None:
            return {}
        if (not isinstance(st, dict) or st.get("version") != _VERSION
                or not isinstance(st.get("routes"), dict)):
            log.error("%s: not a version %d route table; starting without it",
                      self.path, _VERSION)
            return {}
        out = {}
        for cidr, gws in st["routes"].items():
            try:
                net = ipaddress.ip_network(cidr)
                gws = [str(ipaddress.ip_address(g)) for g in gws]
            except (TypeError, ValueError):
                log.error("%s: bad entry %r: %r; ignored", self.path, cidr, gws)
                continue
            out[str(net)] = gws
        return out

    def _save(self) -> None:
        statefile.write_json(self.path, {"version": _VERSION, "routes": self.recorded})

    # -- checks ---------------------------------------------------------------

    def check(self, cidr: str, gateway: str) -> tuple[Net, str]:
        """The route as (network, gateway) if the configuration allows it."""
        try:
            net = ipaddress.ip_network(cidr, strict=True)
        except ValueError as e:
            raise RouteError(str(e)) from None
        if not any(net.version == c.version and net.subnet_of(c) and net != c
                   for c in self.clusters):
            raise RouteError(f"{net} is not a network inside 'pod routes' "
                             f"{' '.join(map(str, self.clusters))}")
        own = self._own()
        if own is not None and own.version == net.version and own.overlaps(net):
            raise RouteError(f"{net} overlaps this node's pod network {own}")
        try:
            gw = ipaddress.ip_address(gateway)
        except ValueError as e:
            raise RouteError(f"gateway: {e}") from None
        if gw.version != net.version:
            raise RouteError(f"gateway {gw} is not an IPv{net.version} address")
        if (gw.is_multicast or gw.is_loopback or gw.is_unspecified or gw.is_link_local
                or gw.is_reserved):
            raise RouteError(f"gateway {gw} is not a unicast address")
        for pods in self.clusters + ([own] if own is not None else []):
            if gw.version == pods.version and gw in pods:
                raise RouteError(f"gateway {gw} is in the pod network {pods}: "
                                 "pods are never gateways")
        return net, str(gw)

    def _own(self) -> Net | None:
        try:
            own = self.own()
            return ipaddress.ip_network(own) if own else None
        except ValueError:
            return None

    # -- the service ------------------------------------------------------------

    def set_pod_routes(self, body: dict, fds: list[int]) -> dict:
        """SetPodRoutes: make the routing table hold exactly the allowed
        routes of body["routes"] among pufflet's own."""
        if self.backend is None:
            raise Status("UNIMPLEMENTED", "routes to other nodes' pods are not "
                         "implemented on this system")
        if not self.clusters:
            raise Status("FAILED_PRECONDITION", "pufflet.conf has no 'pod routes'")
        if time.monotonic() - self.refreshed >= self.refresh:
            self.applied.clear()
            self.refreshed = time.monotonic()
        want, refused = self._accept(body["routes"])
        self._remove([c for c in self.recorded if c not in want])
        installed = self._install(want, refused)
        for r in refused:
            r["reason"] = r["reason"][:REASON_LEN]
        return {"installed": installed, "refused": refused[:MAX_ROUTES]}

    def _accept(self, routes: list[dict]) -> tuple[dict[str, tuple[str, str]], list[dict]]:
        """(cidr -> (gateway, node) of the routes allowed, refusals)."""
        refused: list[dict] = []
        ok: list[tuple[Net, str, str]] = []
        for r in sorted(routes, key=lambda r: (r["node"], r["cidr"])):
            try:
                net, gw = self.check(r["cidr"], r["gateway"])
            except RouteError as e:
                refused.append({"cidr": r["cidr"], "node": r["node"], "reason": str(e)})
                continue
            ok.append((net, gw, r["node"]))
        # Two nodes claiming overlapping networks: the node first by name
        # keeps its route.  Plain pairs of integers; at most 1000 routes.
        kept: list[tuple[int, int, int, Net, str]] = []
        want: dict[str, tuple[str, str]] = {}
        for net, gw, node in ok:
            lo, hi = int(net.network_address), int(net.broadcast_address)
            clash = next((k for k in kept if k[0] == net.version
                          and k[1] <= hi and lo <= k[2]), None)
            if clash is not None:
                refused.append({"cidr": str(net), "node": node,
                                "reason": f"{net} overlaps {clash[3]} of node {clash[4]}"})
                continue
            kept.append((net.version, lo, hi, net, node))
            want[str(net)] = (gw, node)
        return want, refused

    def _remove(self, cidrs: list[str]) -> None:
        if not cidrs:
            return
        for cidr in cidrs:
            errors = []
            for gw in self.recorded[cidr]:
                errors += self.backend.route_delete(cidr, gw)
            if errors:
                # Kept: tried again at the next sync.
                log.warning("route to %s: %s", cidr, "; ".join(map(str, errors)))
                continue
            del self.recorded[cidr]
            self.applied.pop(cidr, None)
            log.info("route to %s removed", cidr)
        self._save()

    def _install(self, want: dict[str, tuple[str, str]], refused: list[dict]) -> int:
        todo = {c: gw for c, (gw, _) in want.items() if self.applied.get(c) != gw}
        if todo:
            # Written before the kernel is touched: a crash in between
            # leaves a route the next start knows is pufflet's.
            before = {c: list(self.recorded.get(c, ())) for c in todo}
            for c, gw in todo.items():
                if gw not in self.recorded.setdefault(c, []):
                    self.recorded[c].append(gw)
            self._save()
            for c, gw in todo.items():
                try:
                    self.backend.route_set(c, gw)
                except StepError as e:
                    log.warning("route to %s via %s: %s", c, gw, e)
                    refused.append({"cidr": c, "node": want[c][1],
                                    "reason": f"the kernel refused it: {e.stderr or e}"})
                    # What may be in the kernel: the old gateway, if any.
                    if before[c]:
                        self.recorded[c] = before[c]
                    else:
                        del self.recorded[c]
                    self.applied.pop(c, None)
                    continue
                self.recorded[c] = [gw]
                self.applied[c] = gw
                log.info("route to %s via %s", c, gw)
            self._save()
        return sum(1 for c, (gw, _) in want.items() if self.applied.get(c) == gw)
