"""Linux twin of the OpenBSD pod network: netns + veth + bridge + nftables.

The same netplan machinery as openbsd_net, executed for real here, so
rollback, teardown and sweep are tested on a live kernel:

    root netns                                     netns pufflet-<tag>
    egress ── nft masquerade / DNAT ── pufflet0 (gateway, a bridge)
                                         │
                                       pv<tag> ═══ veth ═══ eth0 (pod IP), lo

The OpenBSD pieces map one to one: rdomain -> network namespace (ip-netns(8)),
pair(4) -> veth(4), veb(4)+vport(4) -> a bridge with the gateway address
on it, pf anchor pufflet/<pod> -> per-pod chains pod-<tag> in the nftables
table "pufflet" (or iptables chains PUFFLET-<tag> where nft is missing).

Every name comes from netplan.tag(pod uid): the netns pufflet-<tag>, the
host end of the veth pv<tag> (12 bytes, within IFNAMSIZ 16), the chains
pod-<tag> and pod-<tag>-local.  sweep_plan() finds them by prefix.

A container process enters its pod's network with enter_netns() (setns(2)
on /run/netns/<name>), after fork and before chroot, as it would call
setrtable(2) on OpenBSD.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

from pufflet.priv import netplan
from pufflet.priv.netplan import (EXISTS, MISSING, OTHER, NetPlanError, Plan, PodNet,
                                  Runner, Step, StepError, tag)

IP = "ip"
NFT = "nft"
IPTABLES = "iptables"
SYSCTL = "@sysctl"      # a named primitive: the runner writes /proc/sys itself

NETNS_DIR = "/run/netns"        # ip-netns(8): where named namespaces are bound
CLONE_NEWNET = 0x40000000       # <linux/sched.h>


@dataclass(frozen=True)
class Names:
    """Name prefixes; tests use their own so they never touch a running
    pufflet's pods, and the other way round."""
    netns_prefix: str = "pufflet-"
    veth_prefix: str = "pv"
    bridge: str = "pufflet0"
    table: str = "pufflet"

    def __post_init__(self) -> None:
        if len(self.veth_prefix) + 10 > 15 or len(self.bridge) > 15:
            raise NetPlanError("interface names must fit in 15 bytes (IFNAMSIZ)")

    def netns(self, pod_uid: str) -> str:
        return self.netns_prefix + tag(pod_uid)

    def veth(self, pod_uid: str) -> str:
        return self.veth_prefix + tag(pod_uid)

    def chain(self, pod_uid: str) -> str:
        return "pod-" + tag(pod_uid)

    @property
    def ipt(self) -> str:
        """Prefix of the iptables chains."""
        return self.table.upper()


@dataclass(frozen=True)
class Node:
    """The node side: the bridge with the gateway, the way out."""
    cidr: str
    gateway: str
    egress: str | None = None        # None: masquerade whatever leaves the pod CIDR
    names: Names = field(default_factory=Names)
    firewall: str = "nft"            # "nft" or "iptables": see pick_firewall()
    # Networks reached without NAT: the cluster's pod network when other
    # nodes' pods are routed to ('pod routes'), so they see pod addresses.
    no_nat: tuple[str, ...] = ()

    @property
    def prefixlen(self) -> int:
        return int(self.cidr.split("/")[1])


def pick_firewall() -> str:
    """nft when installed, else iptables; an error naming both otherwise."""
    for tool in (NFT, IPTABLES):
        if shutil.which(tool):
            return tool
    raise NetPlanError("neither nft(8) nor iptables(8) is installed: pods need one "
                       "for NAT and hostPorts (Debian: apt-get install nftables)")


# ---- the node ------------------------------------------------------------------

def _nft_node(node: Node) -> str:
    t = f"inet {node.names.table}"
    if node.egress:
        match = f'ip saddr {node.cidr} oifname "{node.egress}"'
    else:
        match = f"ip saddr {node.cidr} ip daddr != {node.cidr}"
    match += "".join(f" ip daddr != {n}" for n in node.no_nat)
    # add is idempotent for the table and chains; the flush makes the
    # masquerade rule exactly one at every start.  Pod chains survive.
    return (f"add table {t}\n"
            f"add chain {t} postrouting {{ type nat hook postrouting priority srcnat; }}\n"
            f"flush chain {t} postrouting\n"
            f"add rule {t} postrouting {match} masquerade\n")


def _ipt(*args: str) -> tuple[str, ...]:
    return (IPTABLES, "-w", "-t", "nat", *args)


def _ipt_node(node: Node) -> list[Step]:
    post, hp = f"{node.names.ipt}-POST", f"{node.names.ipt}-HOSTPORTS"
    if node.egress:
        match = ("-s", node.cidr, "-o", node.egress)
    else:
        match = ("-s", node.cidr, "!", "-d", node.cidr)
    local = ("-m", "addrtype", "--dst-type", "LOCAL")
    # iptables takes one "! -d" per rule: networks without NAT return first.
    steps = [Step(_ipt("-N", post), exists_ok=True),
             Step(_ipt("-F", post)),
             *(Step(_ipt("-A", post, "-s", node.cidr, "-d", n, "-j", "RETURN"))
               for n in node.no_nat),
             Step(_ipt("-A", post, *match, "-j", "MASQUERADE")),
             Step(_ipt("-N", hp), exists_ok=True)]
    # Delete, then append: exactly one jump whatever the last run left.
    for chain, spec in (("POSTROUTING", ("-j", post)),
                        ("PREROUTING", (*local, "-j", hp)),
                        ("OUTPUT", (*local, "-j", hp))):
        steps += [Step(_ipt("-D", chain, *spec), missing_ok=True),
                  Step(_ipt("-A", chain, *spec))]
    return steps


def node_plan(node: Node) -> Plan:
    """Make the bridge with the gateway, the NAT rules, and turn on
    forwarding.  Safe to run at every start: what exists is kept."""
    br = node.names.bridge
    steps = [
        Step((IP, "link", "add", br, "type", "bridge"), undo=(IP, "link", "del", br),
             exists_ok=True),
        Step((IP, "addr", "replace", f"{node.gateway}/{node.prefixlen}", "dev", br)),
        Step((IP, "link", "set", br, "up")),
    ]
    if node.firewall == NFT:
        steps.append(Step((NFT, "-f", "-"), stdin=_nft_node(node),
                          undo=(NFT, "delete", "table", "inet", node.names.table)))
    else:
        steps += _ipt_node(node)
    # Forwarding is host-wide and others may rely on it: never undone.
    steps.append(Step((SYSCTL, "net.ipv4.ip_forward", "1")))
    return tuple(steps)


def node_teardown(node: Node) -> Plan:
    """Remove the bridge and the NAT rules (pufflet stopped for good)."""
    steps = []
    if node.firewall == NFT:
        steps.append(Step((NFT, "delete", "table", "inet", node.names.table),
                          missing_ok=True))
    else:
        post, hp = f"{node.names.ipt}-POST", f"{node.names.ipt}-HOSTPORTS"
        local = ("-m", "addrtype", "--dst-type", "LOCAL")
        for chain, spec in (("POSTROUTING", ("-j", post)),
                            ("PREROUTING", (*local, "-j", hp)),
                            ("OUTPUT", (*local, "-j", hp))):
            steps.append(Step(_ipt("-D", chain, *spec), missing_ok=True))
        for c in (post, hp):
            steps += [Step(_ipt("-F", c), missing_ok=True),
                      Step(_ipt("-X", c), missing_ok=True)]
    steps.append(Step((IP, "link", "del", node.names.bridge), missing_ok=True))
    return tuple(steps)


# ---- one pod -----------------------------------------------------------------

def _dnat_match(hp) -> str:
    # A hostPort answers on the node's own addresses (fib ... local), or
    # on the one hostIP.
    dst = f"ip daddr {hp.host_ip}" if hp.host_ip else "fib daddr type local"
    return f"{dst} {hp.proto} dport {hp.host_port}"


def nft_pod(node: Node, pod: PodNet) -> str:
    """The pod's hostPort chains.  DNAT must be in prerouting for packets
    from elsewhere and in output for connections the node itself makes
    to its own address: those never pass prerouting."""
    t = f"inet {node.names.table}"
    c = node.names.chain(pod.pod_uid)
    out = [f"add chain {t} {c} {{ type nat hook prerouting priority dstnat; }}",
           f"add chain {t} {c}-local {{ type nat hook output priority -100; }}"]
    for hp in pod.host_ports:
        rule = f"{_dnat_match(hp)} dnat ip to {pod.ip}:{hp.container_port}"
        out += [f"add rule {t} {c} {rule}", f"add rule {t} {c}-local {rule}"]
    return "\n".join(out) + "\n"


def _nft_drop_chains(node: Node, chains: Iterable[str]) -> str:
    # "add" first makes "delete" succeed whether or not the chain is
    # there; deleting a chain removes its rules with it.
    t = f"inet {node.names.table}"
    return "".join(f"add chain {t} {c}\ndelete chain {t} {c}\n" for c in chains)


def pod_plan(node: Node, pod: PodNet) -> Plan:
    """Create the pod's network namespace, link and hostPort rules."""
    ns, veth = node.names.netns(pod.pod_uid), node.names.veth(pod.pod_uid)
    # Everything inside the new netns is one `ip -batch` (one process):
    # nothing there needs undoing, the namespace goes as a whole.
    inside = (f"addr add {pod.ip}/{pod.prefixlen} dev eth0\n"
              "link set eth0 up\n"
              "link set lo up\n"
              f"route add default via {pod.gateway} dev eth0\n")
    steps = [
        Step((IP, "netns", "add", ns), undo=(IP, "netns", "del", ns)),
        Step((IP, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
              "netns", ns), undo=(IP, "link", "del", veth)),
        Step((IP, "link", "set", veth, "master", node.names.bridge, "up")),
        Step((IP, "-n", ns, "-batch", "-"), stdin=inside),
    ]
    if pod.host_ports:
        c = node.names.chain(pod.pod_uid)
        if node.firewall == NFT:
            steps.append(Step((NFT, "-f", "-"), stdin=nft_pod(node, pod),
                              undo=(NFT, "-f", "-"),
                              undo_stdin=_nft_drop_chains(node, (c, c + "-local"))))
        else:
            steps += _ipt_pod(node, pod)
    return tuple(steps)


def _ipt_pod(node: Node, pod: PodNet) -> list[Step]:
    c = f"{node.names.ipt}-{tag(pod.pod_uid)}"
    hp_chain = f"{node.names.ipt}-HOSTPORTS"
    steps = [Step(_ipt("-N", c), undo=_ipt("-X", c))]
    for hp in pod.host_ports:
        dst = ("-d", hp.host_ip) if hp.host_ip else ()
        steps.append(Step(_ipt("-A", c, *dst, "-p", hp.proto, "--dport", str(hp.host_port),
                               "-j", "DNAT", "--to-destination",
                               f"{pod.ip}:{hp.container_port}"),
                          undo=_ipt("-F", c)))
    steps.append(Step(_ipt("-A", hp_chain, "-j", c), undo=_ipt("-D", hp_chain, "-j", c)))
    return steps


def pod_teardown(node: Node, pod_uid: str, host_ports: bool = True) -> Plan:
    """Remove a pod's network; everything may be gone already.

    The veth is not deleted here: `ip link del` waits for the kernel's
    RCU grace periods (15-50 ms each, measured), while the namespace, once
    unmounted and held by no process, is destroyed by the kernel in the
    background with the veth pair in it (ip-netns(8) delete).  The pod's
    address is removed first, synchronously and cheaply, so that even a
    leftover process holding the namespace cannot answer for an address
    that a later pod may get; the next sweep deletes such a veth by name.
    host_ports False: the pod had none, skip the firewall (one process)."""
    ns = node.names.netns(pod_uid)
    steps = []
    if host_ports:
        steps += _drop_rules(node, [tag(pod_uid)])
    steps += [Step((IP, "-n", ns, "-batch", "-"), missing_ok=True,
                   stdin="link set eth0 down\naddr flush dev eth0\n"),
              Step((IP, "netns", "del", ns), missing_ok=True)]
    return tuple(steps)


def _drop_rules(node: Node, tags: list[str]) -> list[Step]:
    if not tags:
        return []
    if node.firewall == NFT:
        chains = [f"pod-{t}{s}" for t in tags for s in ("", "-local")]
        return [Step((NFT, "-f", "-"), stdin=_nft_drop_chains(node, chains),
                     missing_ok=True)]
    steps = []
    for t in tags:
        c = f"{node.names.ipt}-{t}"
        steps += [Step(_ipt("-D", f"{node.names.ipt}-HOSTPORTS", "-j", c), missing_ok=True),
                  Step(_ipt("-F", c), missing_ok=True),
                  Step(_ipt("-X", c), missing_ok=True)]
    return steps


# ---- sweep -------------------------------------------------------------------

def sweep_commands(node: Node) -> dict[str, tuple[str, ...]]:
    """What sweep_plan wants to know; run them and pass their output."""
    fw = ((NFT, "list", "table", "inet", node.names.table) if node.firewall == NFT
          else _ipt("-S"))
    return {"netns": (IP, "netns", "list"),
            "links": (IP, "-o", "link", "show"),
            "rules": fw}


def sweep_plan(node: Node, outputs: dict[str, str], live: Iterable[str]) -> Plan:
    """Teardown of every namespace, veth and chain named for a pod that is
    not in live (pod uids), from the output of sweep_commands()."""
    n = node.names
    live_tags = {tag(u) for u in live}
    hexre = "([0-9a-f]{10})"
    ns_tags = set(re.findall(rf"^{re.escape(n.netns_prefix)}{hexre}\b",
                             outputs.get("netns", ""), re.M))
    veth_tags = set(re.findall(rf"^\d+:\s+{re.escape(n.veth_prefix)}{hexre}[@:]",
                               outputs.get("links", ""), re.M))
    if node.firewall == NFT:
        rule_tags = set(re.findall(rf"^\s*chain pod-{hexre}(?:-local)? \{{",
                                   outputs.get("rules", ""), re.M))
    else:
        rule_tags = set(re.findall(rf"^-N {re.escape(n.ipt)}-{hexre}$",
                                   outputs.get("rules", ""), re.M))
    steps = _drop_rules(node, sorted(rule_tags - live_tags))
    for t in sorted(veth_tags - live_tags):
        steps.append(Step((IP, "link", "del", n.veth_prefix + t), missing_ok=True))
    for t in sorted(ns_tags - live_tags):
        steps.append(Step((IP, "netns", "del", n.netns_prefix + t), missing_ok=True))
    return tuple(steps)


def sweep(node: Node, live: Iterable[str], run: Runner | None = None) -> list[StepError]:
    """List what exists, remove what belongs to no live pod; returns what
    could not be removed."""
    outputs = {}
    for key, argv in sweep_commands(node).items():
        p = subprocess.run(argv, capture_output=True, text=True)
        # A missing table means no chains: nothing to sweep there.
        outputs[key] = p.stdout if p.returncode == 0 else ""
    return netplan.teardown(sweep_plan(node, outputs, live), run or runner())


# ---- routes to other nodes' pods ---------------------------------------------

# The routes pufflet keeps to other nodes' podCIDRs (priv/podroutes.py)
# carry this protocol number, which /etc/iproute2/rt_protos gives to no
# one: `ip route show proto 80` lists them, and a delete that names it
# can only remove pufflet's route, never an admin's one to the same
# prefix (ip-route(8): "proto RTPROTO ... the routing protocol identifier
# of this route").  Tests use another number.
ROUTE_PROTO = 80


def route_set(cidr: str, gateway: str, proto: int = ROUTE_PROTO) -> Step:
    """Add the route, or change its gateway: `replace` does either in one
    step (ip-route(8): "change or add new one")."""
    return Step((IP, "route", "replace", cidr, "via", gateway, "proto", str(proto)))


def route_delete(cidr: str, proto: int = ROUTE_PROTO) -> Step:
    return Step((IP, "route", "del", cidr, "proto", str(proto)), missing_ok=True)


# ---- running -----------------------------------------------------------------

# "No such process" (ESRCH) is what rtnetlink answers for a route that
# is not there.
_MISSING = re.compile(r"Cannot find device|No such file or directory|does not exist|"
                      r"No chain/target/match|Bad rule|Cannot open network namespace|"
                      r"No such process")


def classify(stderr: str) -> str:
    if "File exists" in stderr or "Chain already exists" in stderr:
        return EXISTS
    if _MISSING.search(stderr):
        return MISSING
    return OTHER


def _sysctl(step: Step) -> None:
    _, name, value = step.argv
    path = "/proc/sys/" + name.replace(".", "/")
    try:
        with open(path, "w") as f:
            f.write(value + "\n")
    except OSError as e:
        raise StepError(step, -1, f"{path}: {e.strerror}") from None


def runner(timeout: float = 30.0) -> Runner:
    """A netplan runner: subprocess for commands, /proc/sys for @sysctl."""
    def run(step: Step) -> None:
        if step.argv[0] == SYSCTL:
            return _sysctl(step)
        try:
            p = subprocess.run(step.argv, input=step.stdin, capture_output=True,
                               text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise StepError(step, -1, str(e)) from None
        if p.returncode != 0:
            raise StepError(step, p.returncode, p.stderr, classify(p.stderr))
    return run


def default_egress() -> str | None:
    """The interface of the default route, if there is one."""
    p = subprocess.run((IP, "-o", "route", "show", "default"), capture_output=True,
                       text=True)
    m = re.search(r"\bdev (\S+)", p.stdout)
    return m.group(1) if m else None


# ---- entering a pod's network ----------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(name: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"bad network namespace name {name!r}")
    return os.path.join(NETNS_DIR, name)


def enter_netns(name: str) -> None:
    """Move the calling thread into the named network namespace (setns(2)).
    For a freshly forked, single-threaded child of the parent: call it
    before chroot, which hides /run/netns."""
    fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)
