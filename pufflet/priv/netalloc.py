"""Pod addresses and routing domains, kept by the parent.

Each pod gets an IPv4 address from the pod CIDR (node.spec.podCIDR, or
the configured one) and a routing domain id.  The first usable address
of the CIDR is the node's gateway, on the node switch (vport(4) on
OpenBSD, the bridge on Linux); pods get the others.

Routing domain ids come from 1..255 (rdomain(4): "The highest ID that
can be used for an rdomain is 255").  A routing table cannot be
destroyed once made (rdomain(4), CAVEATS: "there is no command to
destroy an rtable"), so ids are reused and never leaked: the lowest free
one is given, which keeps the set of tables ever made as small as the
most pods run at once.  Addresses are given round-robin from after the
last one, so a released address rests as long as possible before
another pod gets it (peers' ARP caches and connection states age out).

The table is written (statefile: temp + fsync + rename) before the
caller acts on an allocation, so after a crash no address or rdomain
is given twice.  The key is the pod's metadata.uid.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from pufflet.priv import statefile
from pufflet.priv.statefile import StateError
from pufflet.priv.uids import UidError, check_pod_uid

__all__ = ["PodAddr", "NetPool", "NetAllocError", "StateError", "check_cidr",
           "gateway_of", "RDOMAINS"]

RDOMAINS = range(1, 256)
_VERSION = 1


class NetAllocError(Exception):
    """A pool cannot be made or cannot give an address; the message says why."""


@dataclass(frozen=True)
class PodAddr:
    """One pod's allocation."""
    pod_uid: str
    ip: str
    prefixlen: int
    gateway: str
    rdomain: int


def check_cidr(cidr: str) -> ipaddress.IPv4Network:
    """cidr as a network with room for a gateway and at least one pod."""
    try:
        net = ipaddress.IPv4Network(cidr, strict=True)
    except ValueError as e:
        raise NetAllocError(f"pod CIDR {cidr!r}: {e}") from None
    if net.prefixlen > 30:
        raise NetAllocError(f"pod CIDR {cidr} is too small: it needs a gateway and "
                            "at least one pod address (/30 or larger)")
    return net


def gateway_of(cidr: str) -> str:
    """The node's gateway address: the first usable one of the CIDR."""
    return str(check_cidr(cidr).network_address + 1)


class NetPool:
    """Addresses of cidr and rdomain ids for pods; the table lives at path."""

    def __init__(self, path: str, cidr: str, rdomains: Iterable[int] = RDOMAINS) -> None:
        self.path = path
        self.net = check_cidr(cidr)
        self.cidr = str(self.net)
        self.gateway = gateway_of(self.cidr)
        self.rdomains = sorted(set(rdomains))
        if not self.rdomains or self.rdomains[0] < 1 or self.rdomains[-1] > 255:
            raise NetAllocError(f"rdomain ids {self.rdomains[:1]}..{self.rdomains[-1:]} "
                                "must lie in 1..255 (rdomain 0 is the host's)")
        # Offsets from the network address: 1 is the gateway, the last one
        # the broadcast address.
        self._first = 2
        self._last = self.net.num_addresses - 2
        self._pods: dict[str, tuple[int, int]] = {}     # uid -> (offset, rdomain)
        self._next = self._first
        self._load()

    # -- the table -------------------------------------------------------------

    def _load(self) -> None:
        st = statefile.read_json(self.path, None)
        if st is None:
            return

        def bad(why: str) -> NetAllocError:
            return NetAllocError(f"{self.path}: corrupt pod network table: {why}")

        if not isinstance(st, dict) or st.get("version") != _VERSION:
            raise bad(f"not a version {_VERSION} table")
        cidr, pods, nxt = st.get("cidr"), st.get("pods"), st.get("next")
        if not isinstance(cidr, str) or not isinstance(pods, dict) or not isinstance(nxt, int):
            raise bad("'cidr', 'pods' or 'next' missing")
        if cidr != self.cidr and pods:
            # Running pods have addresses of the old CIDR and routes via its
            # gateway; renumbering them under their feet breaks them.
            raise NetAllocError(
                f"{self.path}: pod CIDR changed from {cidr} to {self.cidr} while "
                f"{len(pods)} pods hold addresses of it: stop those pods (or "
                "restore the old CIDR) first")
        ips: dict[int, str] = {}
        rds: dict[int, str] = {}
        for pod, entry in pods.items():
            try:
                check_pod_uid(pod)
            except UidError as e:
                raise bad(str(e)) from None
            if (not isinstance(entry, dict) or not isinstance(entry.get("ip"), str)
                    or not isinstance(entry.get("rdomain"), int)):
                raise bad(f"pod {pod}: entry {entry!r}")
            try:
                addr = ipaddress.IPv4Address(entry["ip"])
            except ValueError:
                raise bad(f"pod {pod}: address {entry['ip']!r}") from None
            off = int(addr) - int(self.net.network_address)
            if not self._first <= off <= self._last:
                raise bad(f"pod {pod}: {addr} is not a pod address of {self.cidr}")
            rd = entry["rdomain"]
            if not 1 <= rd <= 255:
                raise bad(f"pod {pod}: rdomain {rd}")
            if off in ips:
                raise bad(f"{addr} given to both {ips[off]} and {pod}")
            if rd in rds:
                raise bad(f"rdomain {rd} given to both {rds[rd]} and {pod}")
            ips[off], rds[rd] = pod, pod
            self._pods[pod] = (off, rd)
        # rdomain ids outside a (changed) pool stay with their pods; they
        # are not given again once released.
        if cidr == self.cidr and self._first <= nxt <= self._last:
            self._next = nxt

    def _save(self) -> None:
        pods = {p: {"ip": str(self.net.network_address + off), "rdomain": rd}
                for p, (off, rd) in self._pods.items()}
        statefile.write_json(self.path, {"version": _VERSION, "cidr": self.cidr,
                                         "next": self._next, "pods": pods})

    def _addr(self, pod: str, off: int, rd: int) -> PodAddr:
        return PodAddr(pod, str(self.net.network_address + off), self.net.prefixlen,
                       self.gateway, rd)

    # -- the interface -----------------------------------------------------------

    def allocate(self, pod_uid: str) -> PodAddr:
        """pod_uid's address and rdomain, given now if it has none yet."""
        try:
            check_pod_uid(pod_uid)
        except UidError as e:
            raise NetAllocError(str(e)) from None
        if pod_uid in self._pods:
            return self._addr(pod_uid, *self._pods[pod_uid])
        used_rd = {rd for _, rd in self._pods.values()}
        rd = next((r for r in self.rdomains if r not in used_rd), None)
        if rd is None:
            raise NetAllocError(f"no free routing domain: all {len(self.rdomains)} "
                                "are in use (at most one pod per rdomain id 1..255)")
        used_ip = {off for off, _ in self._pods.values()}
        size = self._last - self._first + 1
        off = None
        # Bounded by the CIDR; the first free candidate wins unless the
        # CIDR is nearly full.
        for i in range(size):
            cand = self._first + (self._next - self._first + i) % size
            if cand not in used_ip:
                off = cand
                break
        if off is None:
            raise NetAllocError(f"pod CIDR {self.cidr} is exhausted: "
                                f"{len(used_ip)} addresses in use")
        old_next = self._next
        self._pods[pod_uid] = (off, rd)
        self._next = self._first + (off - self._first + 1) % size
        try:
            self._save()
        except BaseException:
            del self._pods[pod_uid]
            self._next = old_next
            raise
        return self._addr(pod_uid, off, rd)

    def release(self, pod_uid: str) -> None:
        """Forget pod_uid's address and rdomain.  Call it once its network
        is torn down."""
        entry = self._pods.pop(pod_uid, None)
        if entry is None:
            return
        try:
            self._save()
        except BaseException:
            self._pods[pod_uid] = entry
            raise

    def get(self, pod_uid: str) -> PodAddr | None:
        entry = self._pods.get(pod_uid)
        return self._addr(pod_uid, *entry) if entry else None

    def allocated(self) -> dict[str, PodAddr]:
        """pod uid -> allocation, a copy."""
        return {p: self._addr(p, *e) for p, e in self._pods.items()}
