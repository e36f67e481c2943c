"""The parent's pod networks: an address and routing domain per pod
(netalloc.NetPool) plumbed by the platform's plans (openbsd_net on
OpenBSD, linux_net on the Linux twin) through netplan.

Where the pod CIDR comes from: pufflet.conf's `pod network CIDR`, else
node.spec.podCIDR, which only the agent sees (it watches its Node) and
sends with CreatePod.  The agent may thus choose the CIDR only when the
configuration leaves it to the node, and never while pods hold
addresses of another one (NetPool refuses).  With neither, pods share
the node's network, as they did before pod networks existed: logged,
and the agent says so in an event.

Order, so that a crash at any point leaves nothing that the next start
cannot find: the allocation is written first (netalloc), then the plan
runs (netplan.apply undoes a half setup), then the pod is recorded
(pods.json).  At start, allocations of pods that pods.json does not
know are released and everything named for them is swept.

The OpenBSD checks (pf enabled, the pufflet anchor in the main ruleset,
forwarding on) run at start, and again when the node side is set up (at
start when the CIDR is known, else at the first pod).  Failing checks are
logged at start, and every networked CreatePod answers with them until
they pass; no restart needed once the admin has fixed pf.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence

from pufflet.priv import netplan, statefile
from pufflet.priv.netalloc import NetAllocError, NetPool, PodAddr, check_cidr
from pufflet.priv.netplan import HostPort, NetPlanError, PodNet, StepError

__all__ = ["PodNetworks", "NetError", "LinuxBackend", "OpenBSDBackend", "TABLE"]

log = logging.getLogger("pufflet.priv.podnet")

TABLE = "network.json"


class NetError(Exception):
    """A pod network cannot be set up or taken down; code is the status."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _why(e: BaseException) -> str:
    msg = str(e)
    undo = getattr(e, "undo_errors", None)
    if undo:
        msg += f" (and undoing: {'; '.join(map(str, undo))}: the next start sweeps it)"
    return msg


# ---- platforms ------------------------------------------------------------------

class LinuxBackend:
    """netns + veth + bridge + nftables (linux_net)."""

    def __init__(self, egress: str | None = None, names=None,
                 firewall: str | None = None, route_proto: int | None = None,
                 no_nat: Sequence[str] = ()) -> None:
        from pufflet.platform import linux_net
        self.L = linux_net
        self.names = names or linux_net.Names()
        self.route_proto = route_proto or linux_net.ROUTE_PROTO
        self.no_nat = tuple(no_nat)
        self.egress = egress
        self.firewall = firewall
        self.run = linux_net.runner()
        self.node = None

    def check(self) -> list[str]:
        problems = []
        if not shutil.which(self.L.IP):
            problems.append("ip(8) is not installed: pods need it for their network "
                            "namespaces (Debian: apt-get install iproute2)")
        try:
            self.firewall = self.firewall or self.L.pick_firewall()
        except NetPlanError as e:
            problems.append(str(e))
        return problems

    def node_up(self, cidr: str, gateway: str) -> None:
        self.node = self.L.Node(cidr, gateway, self.egress, self.names, self.firewall,
                                self.no_nat)
        netplan.apply(self.L.node_plan(self.node), self.run)

    def node_down(self) -> None:
        if self.node is not None:
            netplan.teardown(self.L.node_teardown(self.node), self.run)

    def pod_up(self, pod: PodNet) -> None:
        netplan.apply(self.L.pod_plan(self.node, pod), self.run)

    def pod_down(self, addr: PodAddr) -> list[StepError]:
        return netplan.teardown(self.L.pod_teardown(self.node, addr.pod_uid), self.run)

    def sweep(self, live: dict[str, PodAddr]) -> list[StepError]:
        return self.L.sweep(self.node, live, self.run)

    def entry(self, addr: PodAddr) -> Callable[[], None]:
        return functools.partial(self.L.enter_netns, self.names.netns(addr.pod_uid))

    def netns(self, pod_uid: str) -> str:
        return self.names.netns(pod_uid)

    # Routes to other nodes' pods (priv/podroutes.py).
    def route_set(self, cidr: str, gateway: str) -> None:
        self.run(self.L.route_set(cidr, gateway, self.route_proto))

    def route_delete(self, cidr: str, gateway: str) -> list[StepError]:
        return netplan.teardown([self.L.route_delete(cidr, self.route_proto)], self.run)


class OpenBSDBackend:
    """rdomain + pair + veb + pf (openbsd_net)."""

    def __init__(self, egress: str | None = None, libc=None,
                 no_nat: Sequence[str] = ()) -> None:
        from pufflet.platform import openbsd_net
        self.B = openbsd_net
        self.egress = egress or "egress"
        self.no_nat = no_nat[0] if no_nat else None
        self.run = openbsd_net.runner()
        self.libc = libc
        self.node = None

    def _output(self, argv: Sequence[str]) -> str:
        # A missing group or an empty anchor is a non-zero exit: no output.
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("%s: %s", " ".join(argv), e)
            return ""
        return p.stdout if p.returncode == 0 else ""

    def check(self) -> list[str]:
        return self.B.check_problems({k: self._output(argv)
                                      for k, argv in self.B.CHECKS.items()})

    def node_up(self, cidr: str, gateway: str) -> None:
        self.node = self.B.Node(gateway, int(cidr.split("/")[1]), self.egress,
                                no_nat=self.no_nat)
        existing = self.B.parse_ifnames(self._output((self.B.IFCONFIG, self.B.GROUP)))
        netplan.apply(self.B.node_plan(self.node, existing), self.run)

    def node_down(self) -> None:
        if self.node is not None:
            netplan.teardown(self.B.node_teardown(self.node), self.run)

    def pod_up(self, pod: PodNet) -> None:
        netplan.apply(self.B.pod_plan(self.node, pod), self.run)

    def pod_down(self, addr: PodAddr) -> list[StepError]:
        return netplan.teardown(self.B.pod_teardown(addr.pod_uid, addr.ip, addr.rdomain),
                                self.run)

    def sweep(self, live: dict[str, PodAddr]) -> list[StepError]:
        ifs, anchors = (self._output(argv) for argv in self.B.sweep_commands())
        plan = self.B.sweep_plan(ifs, anchors, {u: a.rdomain for u, a in live.items()})
        return netplan.teardown(plan, self.run)

    def entry(self, addr: PodAddr) -> Callable[[], None]:
        return self.B.rdomain_entry(addr.rdomain, self.libc)

    def netns(self, pod_uid: str) -> str | None:
        return None

    # Routes to other nodes' pods (priv/podroutes.py).
    def route_set(self, cidr: str, gateway: str) -> None:
        try:
            self.run(self.B.route_add(cidr, gateway))
        except StepError as e:
            if e.kind != netplan.EXISTS:
                raise
            self.run(self.B.route_change(cidr, gateway))

    def route_delete(self, cidr: str, gateway: str) -> list[StepError]:
        return netplan.teardown([self.B.route_delete(cidr, gateway)], self.run)


def default_backend(egress: str | None, no_nat: Sequence[str] = ()):
    """no_nat: IPv4 networks pods reach without NAT (the 'pod routes' one)."""
    if sys.platform.startswith("openbsd"):
        return OpenBSDBackend(egress, no_nat=no_nat)
    if sys.platform.startswith("linux"):
        return LinuxBackend(egress, no_nat=no_nat)
    return None


# ---- the networks -----------------------------------------------------------------

class PodNetworks:
    def __init__(self, state_dir: str, cidr: str | None, egress: str | None = None,
                 backend=None, no_nat: Sequence[str] = ()) -> None:
        self.path = os.path.join(state_dir, TABLE)
        self.cfg_cidr = cidr
        self.backend = (backend if backend is not None
                        else default_backend(egress, no_nat))
        self.pool: NetPool | None = None
        self.problem: str | None = None     # why the node side is not up
        self._warned = False
        stored = self._stored_cidr()
        if self.backend is None:
            if cidr or stored:
                log.warning("pod networks are not implemented on %s: pods share the "
                            "node's network", sys.platform)
            return
        # At start: the pods of the last run keep their addresses, so the
        # table's CIDR wins over a changed node.spec.podCIDR (NetPool
        # refuses a changed configured one while pods hold addresses).
        want = cidr or stored
        if want:
            try:
                self._open(want)
            except NetError as e:
                self.problem = str(e)
                log.error("pod network: %s", e)
        else:
            # The CIDR comes later with the Node; what would stop pod
            # networks (pf, the anchor, forwarding) is said now, at start,
            # and checked again at the first pod.
            problems = self.backend.check()
            if problems:
                # A warning: the node may never get a CIDR.
                self.problem = "pod networks cannot work: " + "; ".join(problems)
                log.warning("%s", self.problem)

    def _stored_cidr(self) -> str | None:
        try:
            st = statefile.read_json(self.path, None)
        except statefile.StateError:
            return None         # NetPool says what is wrong when it reads it
        return st.get("cidr") if isinstance(st, dict) else None

    def _open(self, cidr: str) -> None:
        """The pool of cidr and the node side (switch, gateway, NAT)."""
        problems = self.backend.check()
        if problems:
            raise NetError("FAILED_PRECONDITION", "pod networks cannot work: " +
                           "; ".join(problems))
        try:
            pool = NetPool(self.path, cidr)
        except NetAllocError as e:
            raise NetError("FAILED_PRECONDITION", str(e)) from None
        if self.pool is not None and self.pool.cidr != pool.cidr:
            # No pod holds an address of the old CIDR (else NetPool
            # refused): its gateway goes with the old node side.
            self.backend.node_down()
        try:
            self.backend.node_up(pool.cidr, pool.gateway)
        except (StepError, NetPlanError) as e:
            raise NetError("UNAVAILABLE", f"node network for {pool.cidr}: {_why(e)}") from None
        self.pool = pool
        self.problem = None
        log.info("pod network %s, gateway %s", pool.cidr, pool.gateway)

    def cidr(self, hint: str | None) -> str | None:
        """The CIDR pods get addresses from, given node.spec.podCIDR."""
        return self.cfg_cidr or hint or (self.pool.cidr if self.pool else None)

    def setup(self, pod_uid: str, cidr_hint: str | None,
              host_ports: Iterable[HostPort] = ()) -> PodAddr | None:
        """Allocate and plumb pod_uid's network; None when pods share the
        node's network (no CIDR known, or no backend)."""
        if self.backend is None:
            return None
        cidr = self.cidr(cidr_hint)
        if cidr is None:
            if not self._warned:
                log.warning("no pod CIDR: node.spec.podCIDR is empty and pufflet.conf "
                            "has no 'pod network': pods share the node's network")
                self._warned = True
            return None
        try:
            cidr = str(check_cidr(cidr))
        except NetAllocError as e:
            raise NetError("FAILED_PRECONDITION", str(e)) from None
        if self.pool is None or self.pool.cidr != cidr:
            self._open(cidr)
        assert self.pool is not None
        try:
            addr = self.pool.allocate(pod_uid)
            pod = PodNet(pod_uid, addr.ip, addr.prefixlen, addr.gateway, addr.rdomain,
                         tuple(host_ports))
        except (NetAllocError, NetPlanError) as e:
            if self.pool.get(pod_uid) is not None:
                self.pool.release(pod_uid)
            code = "RESOURCE_EXHAUSTED" if isinstance(e, NetAllocError) \
                else "INVALID_ARGUMENT"
            raise NetError(code, str(e)) from None
        try:
            self.backend.pod_up(pod)
        except (StepError, NetPlanError) as e:
            # apply() undid what it made; nothing holds the address now.
            self.pool.release(pod_uid)
            raise NetError("UNAVAILABLE", f"pod network: {_why(e)}") from None
        except BaseException:
            self.pool.release(pod_uid)
            raise
        log.info("pod %s: address %s, rdomain %d", pod_uid, addr.ip, addr.rdomain)
        return addr

    def get(self, pod_uid: str) -> PodAddr | None:
        return self.pool.get(pod_uid) if self.pool is not None else None

    def teardown(self, pod_uid: str) -> None:
        """Remove pod_uid's network and release its allocation.  When a step
        fails the allocation is kept (its address must not go to another
        pod while the old one may still answer) and NetError raised: the
        caller retries, and the next start sweeps."""
        addr = self.get(pod_uid)
        if addr is None:
            return
        errors = self.backend.pod_down(addr)
        if errors:
            raise NetError("INTERNAL", f"pod {pod_uid} network teardown: " +
                           "; ".join(map(str, errors)))
        self.pool.release(pod_uid)
        log.info("pod %s: network removed, %s released", pod_uid, addr.ip)

    def sweep(self, live: Iterable[str]) -> None:
        """At start: release the allocations of pods not in live and remove
        everything named for a pod that holds no allocation."""
        if self.pool is None:
            return
        live = set(live)
        for pod_uid, addr in self.pool.allocated().items():
            if pod_uid not in live:
                errors = self.backend.pod_down(addr)
                if errors:
                    log.warning("pod %s: leftover network: %s", pod_uid,
                                "; ".join(map(str, errors)))
                    continue
                self.pool.release(pod_uid)
                log.info("released the network of gone pod %s (%s)", pod_uid, addr.ip)
        for e in self.backend.sweep(self.pool.allocated()):
            log.warning("sweeping pod networks: %s", e)

    def entry(self, pod_uid: str) -> Callable[[], None] | None:
        """What a forked child runs to enter pod_uid's network (setns(2)
        on Linux, setrtable(2) on OpenBSD), or None: the node's network."""
        addr = self.get(pod_uid)
        return self.backend.entry(addr) if addr is not None else None
