"""OpenBSD pod networks as argv plans: rdomain(4) + pair(4) + veb(4) + pf(4).

Pure: every function here returns commands or parses their output; the
parent runs them (netplan.apply) with runner().  The shape:

    rdomain 0 (host)                               rdomain R (one pod)
    egress ── pf nat-to/rdr-to ── vport1000 (gw)
                                      │ veb1000 (the node switch)
                                  pair2000+R ═══ patch ═══ pair1000+R (pod IP)
                                                            lo R (127.0.0.1)

- pair(4): "All packets that are sent on the first interface are
  received on the second interface"; ifconfig(8) PAIR: patch "makes it
  possible to interconnect two routing domains locally".
- veb(4), not bridge(4): veb "takes over the operation of the interfaces
  that are added as ports"; the host stack joins it through a vport
  interface that "acts as a normal interface ... and can be configured
  with addresses": the gateway.  Ports are plain layer 2, so pod to pod
  traffic is switched without pf (veb link1 would turn pf on for it).
- rdomain(4): "When an interface is assigned to a non-existent rdomain
  it gets created automatically.  At the same time an rtable with the
  same ID and a lo(4) interface with a unit number equals to ID get
  created": so `ifconfig pairN rdomain R` makes loR; we give it
  127.0.0.1/8 and add the localhost reject route of its EXAMPLES.  loR
  and rtable R outlive the pod (an rtable cannot be destroyed): that is
  why rdomain ids are reused (netalloc).
- Unit numbers are derived from the rdomain id so a sweep can find them
  without state: the pod end is pair(1000+R), the host end pair(2000+R);
  pairs 1001-1255 and 2001-2255 are pufflet's, as are veb1000/vport1000.
  They also carry the group "pufflet" (ifconfig(8) group: `ifconfig
  pufflet` lists them) and the pod uid as description, for people.
- pf: one anchor per pod, pufflet/<pod uid>, loaded with `pfctl -a ... -f
  -` (pfctl(8) -a) and flushed with -F all, which in an anchor clears its
  rules and tables only.  The main ruleset must call them with
  anchor "pufflet/*" (pf.conf(5) ANCHORS): checked by check_problems().
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from pufflet.priv.netplan import (EXISTS, MISSING, OTHER, Plan, PodNet, Runner, Step,
                                  StepError)

GROUP = "pufflet"                 # ifconfig(8): no digit at the end, <= 15 chars
ANCHOR = "pufflet"
NODE_UNIT = 1000
POD_END_BASE = 1000               # pair(1000+R): in rdomain R, holds the pod IP
HOST_END_BASE = 2000              # pair(2000+R): in rdomain 0, a port of the veb
VEB_MAXADDR = 512                 # ifconfig(8) VEB: "The default is 100 entries"

IFCONFIG = "/sbin/ifconfig"
ROUTE = "/sbin/route"
PFCTL = "/sbin/pfctl"
SYSCTL = "/sbin/sysctl"

ANCHOR_LINE = f'anchor "{ANCHOR}/*"'


@dataclass(frozen=True)
class Node:
    """The node side: the switch, its gateway address, the way out."""
    gateway: str
    prefixlen: int
    egress: str = "egress"        # an interface or group; ifconfig(8): "egress" is
                                  # the group of interfaces the default route uses
    unit: int = NODE_UNIT
    # The cluster's IPv4 pod network when other nodes' pods are routed to
    # ('pod routes'): traffic to it keeps the pod's address, no NAT.
    no_nat: str | None = None

    @property
    def veb(self) -> str:
        return f"veb{self.unit}"

    @property
    def vport(self) -> str:
        return f"vport{self.unit}"


def pod_end(rdomain: int) -> str:
    return f"pair{POD_END_BASE + rdomain}"


def host_end(rdomain: int) -> str:
    return f"pair{HOST_END_BASE + rdomain}"


def anchor(pod_uid: str) -> str:
    return f"{ANCHOR}/{pod_uid}"


def _ifc(*args: str) -> tuple[str, ...]:
    return (IFCONFIG, *args)


def _label(ifname: str, what: str) -> Step:
    # description takes one word of argv; ifconfig(8) descr[iption] value.
    return Step(_ifc(ifname, "group", GROUP, "description", f"pufflet {what}"))


# ---- the node ------------------------------------------------------------------

def node_plan(node: Node, existing: Iterable[str] = ()) -> Plan:
    """Make the node switch with the gateway on it.  existing: interface
    names there already (parse_ifnames of `ifconfig pufflet`): at a
    restart the switch is up with pods on it and must be left alone; only
    the gateway address is set again, which is idempotent."""
    have = set(existing)
    steps: list[Step] = []
    if node.veb not in have:
        steps += [Step(_ifc(node.veb, "create"), undo=_ifc(node.veb, "destroy")),
                  _label(node.veb, "node switch")]
    if node.vport not in have:
        steps += [Step(_ifc(node.vport, "create"), undo=_ifc(node.vport, "destroy")),
                  _label(node.vport, "node gateway")]
    steps.append(Step(_ifc(node.vport, "inet", f"{node.gateway}/{node.prefixlen}", "up")))
    if node.vport not in have or node.veb not in have:
        steps.append(Step(_ifc(node.veb, "add", node.vport)))
    steps.append(Step(_ifc(node.veb, "maxaddr", str(VEB_MAXADDR), "up")))
    return tuple(steps)


def node_teardown(node: Node) -> Plan:
    """Remove the switch and gateway (pufflet stopped for good)."""
    return (Step(_ifc(node.vport, "destroy"), missing_ok=True),
            Step(_ifc(node.veb, "destroy"), missing_ok=True))


# ---- one pod -----------------------------------------------------------------

def pf_rules(node: Node, pod: PodNet) -> str:
    """The pod's anchor, pf.conf(5) syntax.

    - NAT: `match` so the translation applies whatever rule passes the
      packet ("match ... nat-to": pf.conf(5) TRANSLATION); (egress:0) is
      the first address of the egress interface, re-read when it changes
      (the parentheses) without its aliases (:0).
    - hostPort: `pass in ... rdr-to` for packets to the node's own
      addresses ((egress), or the hostIP) on the hostPort, plus a pass out
      on the vport so a `block` default of the main ruleset does not stop
      the redirected connection on its way to the pod.
    - no_nat: `to ! <network>` (pf.conf(5) PARAMETERS: "Addresses can be
      specified ... negated"); a single network, because a negated list
      `{ !a, !b }` matches every address.
    Packets from the node itself to its own address use lo0, not egress:
    such hostPort connections are not redirected (a known limit)."""
    to = f"! {node.no_nat}" if node.no_nat else "any"
    out = [f"# pod {pod.pod_uid}",
           f"match out on {node.egress} inet from {pod.ip} to {to} nat-to ({node.egress}:0)"]
    for hp in pod.host_ports:
        dst = hp.host_ip or f"({node.egress})"
        out.append(f"pass in on {node.egress} inet proto {hp.proto} to {dst} "
                   f"port {hp.host_port} rdr-to {pod.ip} port {hp.container_port}")
        out.append(f"pass out on {node.vport} inet proto {hp.proto} to {pod.ip} "
                   f"port {hp.container_port}")
    return "\n".join(out) + "\n"


def pod_plan(node: Node, pod: PodNet) -> Plan:
    """Create the pod's network; see the module comment for the shape."""
    r = pod.rdomain
    p, h, lo = pod_end(r), host_end(r), f"lo{r}"
    a = anchor(pod.pod_uid)
    return (
        Step(_ifc(p, "create"), undo=_ifc(p, "destroy")),
        _label(p, pod.pod_uid),
        # rdomain(4): creates rdomain R, rtable R and loR when R is new.
        Step(_ifc(p, "rdomain", str(r))),
        Step(_ifc(lo, "inet", "127.0.0.1/8", "up")),
        Step(_ifc(p, "inet", f"{pod.ip}/{pod.prefixlen}", "up")),
        Step(_ifc(h, "create"), undo=_ifc(h, "destroy")),
        _label(h, pod.pod_uid),
        Step(_ifc(p, "patch", h)),
        Step(_ifc(node.veb, "add", h)),
        Step(_ifc(h, "up")),
        # route(8) -T: the pod's table; rdomain(4) EXAMPLES.  The reject
        # route stays with loR when the pod goes, hence exists_ok.
        Step((ROUTE, "-T", str(r), "-qn", "add", "-net", "127", "127.0.0.1", "-reject"),
             exists_ok=True),
        Step((ROUTE, "-T", str(r), "-qn", "add", "default", pod.gateway)),
        Step((PFCTL, "-a", a, "-f", "-"), stdin=pf_rules(node, pod),
             undo=(PFCTL, "-a", a, "-F", "all")),
    )


def pod_teardown(pod_uid: str, ip: str | None, rdomain: int) -> Plan:
    """Remove a pod's network, in reverse; everything may be gone already.
    The default route goes with the pod end (routes through a destroyed
    interface are removed with it); loR and rtable R stay for the next pod.
    ip None (a sweep that knows no address): states are left to expire."""
    a = anchor(pod_uid)
    steps = [Step((PFCTL, "-a", a, "-F", "all"), missing_ok=True)]
    if ip is not None:
        # pfctl(8) -k: states from the pod, then to it (a reused address
        # must not meet the old pod's connections).
        steps += [Step((PFCTL, "-k", ip), missing_ok=True),
                  Step((PFCTL, "-k", "0.0.0.0/0", "-k", ip), missing_ok=True)]
    steps += [Step(_ifc(host_end(rdomain), "destroy"), missing_ok=True),
              Step(_ifc(pod_end(rdomain), "destroy"), missing_ok=True)]
    return tuple(steps)


# ---- sweep -------------------------------------------------------------------

_IFLINE = re.compile(r"^([a-z]+[0-9]+): flags=", re.M)
_ANCHORLINE = re.compile(rf"^\s*{ANCHOR}/(\S+)\s*$", re.M)


def sweep_commands() -> tuple[tuple[str, ...], ...]:
    """What sweep_plan wants to know, to be run and parsed by the caller:
    every pair(4) (ifconfig(8): a driver name shows all its interfaces)
    and the pod anchors (pfctl(8) -s Anchors with -a: those below it)."""
    return (_ifc("pair"), (PFCTL, "-a", ANCHOR, "-s", "Anchors"))


def parse_ifnames(text: str) -> list[str]:
    """Interface names in ifconfig(8) output."""
    return _IFLINE.findall(text)


def parse_anchors(text: str) -> list[str]:
    """Pod uids of the anchors in `pfctl -a pufflet -s Anchors` output."""
    return _ANCHORLINE.findall(text)


def sweep_plan(ifconfig_out: str, anchors_out: str,
               live: Mapping[str, int]) -> Plan:
    """Teardown of everything pufflet made for pods not in live (pod uid ->
    rdomain): pairs in pufflet's unit ranges whose rdomain is no live
    pod's, and anchors of pods not live.  A half-made pod (crash before
    its description was set) is found by its unit number alone."""
    live_rd = set(live.values())
    dead_rd: set[int] = set()
    for name in parse_ifnames(ifconfig_out):
        m = re.fullmatch(r"pair([0-9]+)", name)
        if not m:
            continue
        unit = int(m.group(1))
        for base in (POD_END_BASE, HOST_END_BASE):
            if 1 <= unit - base <= 255 and unit - base not in live_rd:
                dead_rd.add(unit - base)
    steps: list[Step] = []
    for uid in sorted(set(parse_anchors(anchors_out)) - set(live)):
        steps.append(Step((PFCTL, "-a", anchor(uid), "-F", "all"), missing_ok=True))
    for r in sorted(dead_rd):
        steps += [Step(_ifc(host_end(r), "destroy"), missing_ok=True),
                  Step(_ifc(pod_end(r), "destroy"), missing_ok=True)]
    return tuple(steps)


# ---- routes to other nodes' pods ---------------------------------------------

# route(8): "-label label: Add a descriptive label to the route"; `route
# -n show -label pufflet` lists the routes pufflet keeps to other nodes'
# podCIDRs (priv/podroutes.py).  They live in rdomain 0, the host's
# table, which pods reach through their default route via the gateway.
ROUTE_LABEL = "pufflet"


def _family(cidr: str) -> str:
    return "-inet6" if ":" in cidr else "-inet"


def route_add(cidr: str, gateway: str) -> Step:
    """route(8) add: the gateway must be on a directly connected network,
    else the kernel answers "Network is unreachable"."""
    return Step((ROUTE, "-qn", "add", _family(cidr), "-label", ROUTE_LABEL, cidr, gateway))


def route_change(cidr: str, gateway: str) -> Step:
    """route(8) change: a new gateway for a route that exists."""
    return Step((ROUTE, "-qn", "change", _family(cidr), "-label", ROUTE_LABEL, cidr,
                 gateway))


def route_delete(cidr: str, gateway: str) -> Step:
    """Naming the gateway deletes only the route through it, never
    another one to the same network; "not in table" when it is gone."""
    return Step((ROUTE, "-qn", "delete", _family(cidr), cidr, gateway), missing_ok=True)


# ---- checks ------------------------------------------------------------------

CHECKS = {
    "pf": (PFCTL, "-s", "info"),
    "anchor": (PFCTL, "-s", "rules"),
    "forwarding": (SYSCTL, "-n", "net.inet.ip.forwarding"),
}


def check_problems(outputs: Mapping[str, str]) -> list[str]:
    """What keeps pods' networks from working, from the output of the
    CHECKS commands (by key); [] when all is well."""
    problems = []
    info = outputs.get("pf", "")
    if not re.search(r"^Status: Enabled", info, re.M):
        problems.append("pf is disabled (pfctl -s info): pods need it for NAT and "
                        "hostPorts; enable it with 'pfctl -e' and keep pf=YES in "
                        "rc.conf.local(8)")
    rules = outputs.get("anchor", "")
    if not any(line.strip().startswith(ANCHOR_LINE) for line in rules.splitlines()):
        problems.append(f"the pf ruleset has no pufflet anchor (pfctl -s rules): add "
                        f"the line\n    {ANCHOR_LINE}\nto /etc/pf.conf after your block "
                        "rules, then load it with 'pfctl -f /etc/pf.conf'")
    if outputs.get("forwarding", "").strip() != "1":
        problems.append("net.inet.ip.forwarding is not 1: pods cannot reach past the "
                        "node; run 'sysctl net.inet.ip.forwarding=1' and add "
                        "net.inet.ip.forwarding=1 to /etc/sysctl.conf")
    return problems


# ---- running -----------------------------------------------------------------

def classify(stderr: str) -> str:
    """The kind of failure (netplan.EXISTS/MISSING/OTHER) from the message
    of ifconfig(8), route(8) or pfctl(8)."""
    if "File exists" in stderr:
        return EXISTS
    if re.search(r"no such interface|No such process|does not exist|"
                 r"No such file or directory|not in table", stderr):
        return MISSING
    return OTHER


def runner(timeout: float = 30.0) -> Runner:
    """A netplan runner that executes steps with subprocess."""
    def run(step: Step) -> None:
        try:
            p = subprocess.run(step.argv, input=step.stdin, capture_output=True,
                               text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise StepError(step, -1, str(e)) from None
        if p.returncode != 0:
            raise StepError(step, p.returncode, p.stderr, classify(p.stderr))
    return run



# ---- entering a pod's routing domain ------------------------------------------

# setrtable(2), int setrtable(int rtableid): sets the routing table of the
# calling process, which its children inherit; only root may change it,
# and a table that does not exist is EINVAL.  A process's routing domain
# is that of its rtable (rdomain(4)), so the pod's processes bind,
# listen and connect in rdomain R and cannot see rdomain 0.  Called in
# the forked child, as root, before chroot(2) and before the ids are
# dropped (priv/spawn.py), so the pod can never change it back.  Python
# has no binding: ctypes, with the symbol resolved in the parent.

def setrtable_args(rdomain: int) -> tuple[ctypes.c_int]:
    """The exact arguments of the setrtable(2) call for rdomain: one C int."""
    if not isinstance(rdomain, int) or isinstance(rdomain, bool) or not 1 <= rdomain <= 255:
        raise ValueError(f"rdomain {rdomain!r} is not a pod rdomain (1..255)")
    return (ctypes.c_int(rdomain),)


def rdomain_entry(rdomain: int, libc=None) -> Callable[[], None]:
    """What a forked child calls to move itself into rdomain.  Everything
    (the check, the argument, the libc symbol) is prepared here, in the
    parent, so the child only makes the call.  libc: for tests; a
    ctypes.CDLL with use_errno, or an object with setrtable and errno."""
    args = setrtable_args(rdomain)
    if libc is None:
        libc = ctypes.CDLL(None, use_errno=True)
    call = libc.setrtable        # AttributeError here on a system without it
    get_errno = getattr(libc, "get_errno", ctypes.get_errno)

    def enter() -> None:
        if call(*args) != 0:
            err = get_errno()
            raise OSError(err, f"setrtable {rdomain}: {os.strerror(err)}")
    return enter
