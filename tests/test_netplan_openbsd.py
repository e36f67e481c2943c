"""OpenBSD pod network plans, pinned argv by argv (golden), and the
machinery under them that no OS is needed for: plans, rollback,
teardown, the address and rdomain pool.

The commands follow ifconfig(8) (PAIR, VEB, group, description,
rdomain), pair(4), veb(4)/vport(4), rdomain(4) (loR made with the
domain; its EXAMPLES for the routes), route(8) -T, pfctl(8) -a/-f/-F/-k/-s
and pf.conf(5) (match ... nat-to, pass ... rdr-to, anchor "name/*").
"""

from __future__ import annotations

import json

import pytest

from pufflet.platform import openbsd_net as B
from pufflet.priv import netalloc, netplan
from pufflet.priv.netplan import HostPort, NetPlanError, PodNet, Step, StepError

UID = "0f1e2d3c-4b5a-4697-8877-665544332211"
UID2 = "11111111-2222-4333-8444-555555555555"
NODE = B.Node(gateway="10.251.0.1", prefixlen=24)
POD = PodNet(UID, "10.251.0.5", 24, "10.251.0.1", 5)
POD_HP = PodNet(UID, "10.251.0.5", 24, "10.251.0.1", 5,
                (HostPort(8080, 80), HostPort(5353, 53, "UDP", host_ip="192.0.2.10")))

IFC, ROUTE, PFCTL = "/sbin/ifconfig", "/sbin/route", "/sbin/pfctl"


def argvs(plan):
    return [" ".join(s.argv) for s in plan]


# ---- node ----------------------------------------------------------------------

def test_node_plan_fresh():
    plan = B.node_plan(NODE)
    assert argvs(plan) == [
        f"{IFC} veb1000 create",
        f"{IFC} veb1000 group pufflet description pufflet node switch",
        f"{IFC} vport1000 create",
        f"{IFC} vport1000 group pufflet description pufflet node gateway",
        f"{IFC} vport1000 inet 10.251.0.1/24 up",
        f"{IFC} veb1000 add vport1000",
        f"{IFC} veb1000 maxaddr 512 up",
    ]
    # The description is one argv element, never split by a shell.
    assert plan[1].argv[-1] == "pufflet node switch"
    assert [s.undo for s in plan if s.undo] == [(IFC, "veb1000", "destroy"),
                                                (IFC, "vport1000", "destroy")]


def test_node_plan_after_restart_keeps_the_switch():
    existing = B.parse_ifnames(
        "veb1000: flags=3<UP,BROADCAST>\n\tindex 7 llprio 3\n"
        "vport1000: flags=8943<UP,BROADCAST,RUNNING,PROMISC,SIMPLEX,MULTICAST> mtu 1500\n")
    assert existing == ["veb1000", "vport1000"]
    assert argvs(B.node_plan(NODE, existing)) == [
        f"{IFC} vport1000 inet 10.251.0.1/24 up",
        f"{IFC} veb1000 maxaddr 512 up",
    ]


def test_node_teardown():
    assert argvs(B.node_teardown(NODE)) == [f"{IFC} vport1000 destroy",
                                            f"{IFC} veb1000 destroy"]


# ---- one pod -----------------------------------------------------------------

CREATE = [
    f"{IFC} pair1005 create",
    f"{IFC} pair1005 group pufflet description pufflet {UID}",
    f"{IFC} pair1005 rdomain 5",
    f"{IFC} lo5 inet 127.0.0.1/8 up",
    f"{IFC} pair1005 inet 10.251.0.5/24 up",
    f"{IFC} pair2005 create",
    f"{IFC} pair2005 group pufflet description pufflet {UID}",
    f"{IFC} pair1005 patch pair2005",
    f"{IFC} veb1000 add pair2005",
    f"{IFC} pair2005 up",
    f"{ROUTE} -T 5 -qn add -net 127 127.0.0.1 -reject",
    f"{ROUTE} -T 5 -qn add default 10.251.0.1",
    f"{PFCTL} -a pufflet/{UID} -f -",
]


def test_pod_plan_without_host_ports():
    plan = B.pod_plan(NODE, POD)
    assert argvs(plan) == CREATE
    assert plan[-1].stdin == (
        f"# pod {UID}\n"
        "match out on egress inet from 10.251.0.5 to any nat-to (egress:0)\n")
    # What is undone when a later step fails: the two pairs and the anchor.
    assert [s.undo for s in plan if s.undo] == [
        (IFC, "pair1005", "destroy"), (IFC, "pair2005", "destroy"),
        (PFCTL, "-a", f"pufflet/{UID}", "-F", "all")]
    # The reject route stays on lo5 when the rdomain is reused.
    assert [str(s) for s in plan if s.exists_ok] == [CREATE[10]]


def test_pod_plan_with_host_ports():
    plan = B.pod_plan(NODE, POD_HP)
    assert argvs(plan) == CREATE
    assert plan[-1].stdin == (
        f"# pod {UID}\n"
        "match out on egress inet from 10.251.0.5 to any nat-to (egress:0)\n"
        "pass in on egress inet proto tcp to (egress) port 8080 "
        "rdr-to 10.251.0.5 port 80\n"
        "pass out on vport1000 inet proto tcp to 10.251.0.5 port 80\n"
        "pass in on egress inet proto udp to 192.0.2.10 port 5353 "
        "rdr-to 10.251.0.5 port 53\n"
        "pass out on vport1000 inet proto udp to 10.251.0.5 port 53\n")


def test_pf_rules_with_a_named_egress_interface():
    node = B.Node("10.251.0.1", 24, egress="em0")
    rules = B.pf_rules(node, PodNet(UID, "10.251.0.5", 24, "10.251.0.1", 5,
                                    (HostPort(80, 8080),)))
    assert rules.splitlines()[1:] == [
        "match out on em0 inet from 10.251.0.5 to any nat-to (em0:0)",
        "pass in on em0 inet proto tcp to (em0) port 80 rdr-to 10.251.0.5 port 8080",
        "pass out on vport1000 inet proto tcp to 10.251.0.5 port 8080",
    ]


def test_pod_teardown():
    assert argvs(B.pod_teardown(UID, "10.251.0.5", 5)) == [
        f"{PFCTL} -a pufflet/{UID} -F all",
        f"{PFCTL} -k 10.251.0.5",
        f"{PFCTL} -k 0.0.0.0/0 -k 10.251.0.5",
        f"{IFC} pair2005 destroy",
        f"{IFC} pair1005 destroy",
    ]
    assert all(s.missing_ok for s in B.pod_teardown(UID, "10.251.0.5", 5))


def test_units_follow_the_rdomain():
    assert (B.pod_end(1), B.host_end(1)) == ("pair1001", "pair2001")
    assert (B.pod_end(255), B.host_end(255)) == ("pair1255", "pair2255")


# ---- sweep -------------------------------------------------------------------

IFCONFIG_PAIR = f"""\
pair1: flags=8843<UP,BROADCAST,RUNNING,SIMPLEX,MULTICAST> mtu 1500
\tlladdr fe:e1:ba:d0:00:01
pair1005: flags=8843<UP,BROADCAST,RUNNING,SIMPLEX,MULTICAST> rdomain 5 mtu 1500
\tdescription: pufflet {UID}
\tgroups: pair pufflet
pair2005: flags=8843<UP,BROADCAST,RUNNING,SIMPLEX,MULTICAST> mtu 1500
\tdescription: pufflet {UID}
pair1007: flags=8802<BROADCAST,SIMPLEX,MULTICAST> mtu 1500
pair1009: flags=8843<UP,BROADCAST,RUNNING,SIMPLEX,MULTICAST> rdomain 9 mtu 1500
\tdescription: pufflet {UID2}
pair2009: flags=8843<UP,BROADCAST,RUNNING,SIMPLEX,MULTICAST> mtu 1500
\tdescription: pufflet {UID2}
"""
ANCHORS = f"  pufflet/{UID}\n  pufflet/{UID2}\n"


def test_sweep_commands():
    assert [" ".join(a) for a in B.sweep_commands()] == [
        f"{IFC} pair", f"{PFCTL} -a pufflet -s Anchors"]


def test_sweep_removes_what_no_live_pod_owns():
    # UID2 (rdomain 9) lives; UID is gone; pair1007 is a half-made pod that
    # crashed before its description; pair1 is the admin's.
    plan = B.sweep_plan(IFCONFIG_PAIR, ANCHORS, {UID2: 9})
    assert argvs(plan) == [
        f"{PFCTL} -a pufflet/{UID} -F all",
        f"{IFC} pair2005 destroy",
        f"{IFC} pair1005 destroy",
        f"{IFC} pair2007 destroy",
        f"{IFC} pair1007 destroy",
    ]
    assert all(s.missing_ok for s in plan)


def test_sweep_with_everything_alive_does_nothing():
    assert B.sweep_plan(IFCONFIG_PAIR, ANCHORS, {UID: 5, UID2: 9, "x": 7}) == ()
    assert B.sweep_plan("", "", {}) == ()


# ---- checks ------------------------------------------------------------------

GOOD = {
    "pf": "Status: Enabled for 0 days 01:02:03           Debug: err\n\nState Table ...\n",
    "anchor": 'block return all\npass all flags S/SA\nanchor "pufflet/*" all\n',
    "forwarding": "1\n",
}


def test_check_commands():
    assert {k: " ".join(v) for k, v in B.CHECKS.items()} == {
        "pf": f"{PFCTL} -s info",
        "anchor": f"{PFCTL} -s rules",
        "forwarding": "/sbin/sysctl -n net.inet.ip.forwarding",
    }


def test_checks_pass():
    assert B.check_problems(GOOD) == []


def test_check_messages():
    bad = {"pf": "Status: Disabled for 0 days 00:00:10\n",
           "anchor": 'pass all flags S/SA\nanchor "relayd/*" all\n',
           "forwarding": "0\n"}
    assert B.check_problems(bad) == [
        "pf is disabled (pfctl -s info): pods need it for NAT and hostPorts; enable "
        "it with 'pfctl -e' and keep pf=YES in rc.conf.local(8)",
        "the pf ruleset has no pufflet anchor (pfctl -s rules): add the line\n"
        '    anchor "pufflet/*"\n'
        "to /etc/pf.conf after your block rules, then load it with "
        "'pfctl -f /etc/pf.conf'",
        "net.inet.ip.forwarding is not 1: pods cannot reach past the node; run "
        "'sysctl net.inet.ip.forwarding=1' and add net.inet.ip.forwarding=1 to "
        "/etc/sysctl.conf",
    ]


def test_classify_messages():
    assert B.classify("ifconfig: SIOCIFCREATE: File exists") == netplan.EXISTS
    assert B.classify("ifconfig: pair1005: no such interface") == netplan.MISSING
    assert B.classify("route: writing to routing socket: No such process") == netplan.MISSING
    assert B.classify("pfctl: Permission denied") == netplan.OTHER


# ---- plans, rollback, teardown (any OS) ----------------------------------------------

class FakeRunner:
    """Records steps; fails the ones named in fail with the given kind."""

    def __init__(self, fail: dict[str, str] | None = None) -> None:
        self.ran: list[str] = []
        self.fail = fail or {}

    def __call__(self, step: Step) -> None:
        self.ran.append(str(step))
        if str(step) in self.fail:
            raise StepError(step, 1, "boom", self.fail[str(step)])


def test_apply_rolls_back_in_reverse_on_failure():
    run = FakeRunner({CREATE[8]: netplan.OTHER})       # veb1000 add pair2005
    with pytest.raises(StepError, match="boom") as e:
        netplan.apply(B.pod_plan(NODE, POD), run)
    assert run.ran == CREATE[:9] + [f"{IFC} pair2005 destroy", f"{IFC} pair1005 destroy"]
    assert e.value.undo_errors == []


def test_apply_rolls_back_on_a_late_failure_including_pf():
    plan = B.pod_plan(NODE, POD) + (Step(("false",)),)
    run = FakeRunner({"false": netplan.OTHER})
    with pytest.raises(StepError):
        netplan.apply(plan, run)
    assert run.ran[len(CREATE) + 1:] == [
        f"{PFCTL} -a pufflet/{UID} -F all",
        f"{IFC} pair2005 destroy",
        f"{IFC} pair1005 destroy"]


def test_apply_tolerates_what_exists_and_does_not_undo_it():
    run = FakeRunner({f"{IFC} veb1000 create": netplan.EXISTS, "boom": netplan.OTHER})
    plan = B.node_plan(NODE)
    plan = tuple(Step(s.argv, s.undo, exists_ok=True) if "create" in s.argv else s
                 for s in plan) + (Step(("boom",)),)
    with pytest.raises(StepError):
        netplan.apply(plan, run)
    # veb1000 was there before: only vport1000, made now, is destroyed.
    assert run.ran[-1] == f"{IFC} vport1000 destroy"
    assert f"{IFC} veb1000 destroy" not in run.ran


def test_apply_rolls_back_on_an_exception_too():
    def run(step):
        ran.append(str(step))
        if "rdomain" in step.argv:
            raise KeyboardInterrupt
    ran: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        netplan.apply(B.pod_plan(NODE, POD), run)
    assert ran[-1] == f"{IFC} pair1005 destroy"


def test_teardown_runs_every_step_and_reports_real_failures():
    plan = B.pod_teardown(UID, "10.251.0.5", 5)
    run = FakeRunner({str(plan[0]): netplan.MISSING,
                      str(plan[3]): netplan.OTHER})
    errors = netplan.teardown(plan, run)
    assert run.ran == argvs(plan)
    assert [str(e.step) for e in errors] == [str(plan[3])]


def test_host_port_validation():
    with pytest.raises(NetPlanError, match="SCTP"):
        HostPort(80, 80, "SCTP")
    with pytest.raises(NetPlanError, match="port number"):
        HostPort(0, 80)
    with pytest.raises(NetPlanError, match="given twice"):
        PodNet(UID, "10.251.0.5", 24, "10.251.0.1", 5, (HostPort(80, 1), HostPort(80, 2)))
    with pytest.raises(NetPlanError, match="gateway"):
        PodNet(UID, "10.251.0.5", 24, "10.9.0.1", 5)
    with pytest.raises(NetPlanError, match="rdomain"):
        PodNet(UID, "10.251.0.5", 24, "10.251.0.1", 0)


def test_tag_is_short_stable_and_hex():
    assert netplan.tag(UID) == netplan.tag(UID)
    assert len(netplan.tag(UID)) == 10 and int(netplan.tag(UID), 16) >= 0
    assert netplan.tag(UID) != netplan.tag(UID2)


# ---- the pool ------------------------------------------------------------------

def uids(n: int) -> list[str]:
    return [f"{i:08x}-0000-4000-8000-{i:012x}" for i in range(1, n + 1)]


def test_pool_gateway_first_then_pods(tmp_path):
    pool = netalloc.NetPool(str(tmp_path / "net.json"), "10.251.0.0/24")
    assert pool.gateway == "10.251.0.1"
    a = pool.allocate(UID)
    assert (a.ip, a.prefixlen, a.gateway, a.rdomain) == ("10.251.0.2", 24, "10.251.0.1", 1)
    assert pool.allocate(UID) == a                  # idempotent
    b = pool.allocate(UID2)
    assert (b.ip, b.rdomain) == ("10.251.0.3", 2)


def test_pool_persists_and_reloads(tmp_path):
    path = str(tmp_path / "net.json")
    pool = netalloc.NetPool(path, "10.251.0.0/24")
    a = pool.allocate(UID)
    st = json.load(open(path))
    assert st["pods"] == {UID: {"ip": "10.251.0.2", "rdomain": 1}}
    again = netalloc.NetPool(path, "10.251.0.0/24")
    assert again.get(UID) == a
    assert again.allocate(UID2).ip == "10.251.0.3"


def test_pool_reuses_rdomains_lowest_first_and_rests_addresses(tmp_path):
    pool = netalloc.NetPool(str(tmp_path / "net.json"), "10.251.0.0/29")
    a, b, c = (pool.allocate(u) for u in uids(3))
    assert [x.rdomain for x in (a, b, c)] == [1, 2, 3]
    pool.release(a.pod_uid)
    d = pool.allocate(uids(4)[3])
    assert d.rdomain == 1                 # an rtable cannot be destroyed: reuse
    assert d.ip == "10.251.0.5"           # but the released address rests
    e = pool.allocate(uids(5)[4])
    assert e.ip == "10.251.0.6"
    f = pool.allocate(uids(6)[5])
    assert f.ip == a.ip                   # wrapped round to the free one
    with pytest.raises(netalloc.NetAllocError, match="exhausted"):
        pool.allocate(uids(7)[6])


def test_pool_rdomains_run_out(tmp_path):
    pool = netalloc.NetPool(str(tmp_path / "net.json"), "10.251.0.0/24", range(1, 3))
    pool.allocate(uids(1)[0])
    pool.allocate(uids(2)[1])
    with pytest.raises(netalloc.NetAllocError, match="routing domain"):
        pool.allocate(uids(3)[2])


def test_pool_refuses_a_changed_cidr_while_pods_hold_addresses(tmp_path):
    path = str(tmp_path / "net.json")
    pool = netalloc.NetPool(path, "10.251.0.0/24")
    pool.allocate(UID)
    with pytest.raises(netalloc.NetAllocError, match="changed from 10.251.0.0/24"):
        netalloc.NetPool(path, "10.99.0.0/24")
    pool.release(UID)
    assert netalloc.NetPool(path, "10.99.0.0/24").allocate(UID).ip == "10.99.0.2"


def test_pool_refuses_bad_input(tmp_path):
    path = str(tmp_path / "net.json")
    with pytest.raises(netalloc.NetAllocError, match="too small"):
        netalloc.NetPool(path, "10.251.0.0/31")
    with pytest.raises(netalloc.NetAllocError, match="host bits"):
        netalloc.NetPool(path, "10.251.0.7/24")
    with pytest.raises(netalloc.NetAllocError, match="1..255"):
        netalloc.NetPool(path, "10.251.0.0/24", range(0, 3))
    pool = netalloc.NetPool(path, "10.251.0.0/24")
    with pytest.raises(netalloc.NetAllocError, match="UUID"):
        pool.allocate("../etc")
    open(path, "w").write(json.dumps({"version": 1, "cidr": "10.251.0.0/24", "next": 2,
                                      "pods": {UID: {"ip": "10.251.0.2", "rdomain": 1},
                                               UID2: {"ip": "10.251.0.2", "rdomain": 2}}}))
    with pytest.raises(netalloc.NetAllocError, match="given to both"):
        netalloc.NetPool(path, "10.251.0.0/24")


# ---- setrtable(2): how a pod process enters its rdomain ---------------------------

class FakeLibc:
    """Records the setrtable(2) calls; fails with errno when told to."""

    def __init__(self, fail_errno: int = 0) -> None:
        self.calls = []
        self.fail_errno = fail_errno

    def setrtable(self, *args):
        self.calls.append(("setrtable", tuple(type(a).__name__ for a in args),
                           tuple(a.value for a in args)))
        return -1 if self.fail_errno else 0

    def get_errno(self):
        return self.fail_errno


def test_setrtable_golden():
    # setrtable(2): int setrtable(int rtableid); one C int, the pod's rdomain.
    libc = FakeLibc()
    enter = B.rdomain_entry(5, libc)
    assert libc.calls == []             # prepared in the parent, called in the child
    enter()
    assert libc.calls == [("setrtable", ("c_int",), (5,))]


def test_setrtable_errors_and_refusals():
    import errno
    enter = B.rdomain_entry(7, FakeLibc(errno.EINVAL))
    with pytest.raises(OSError) as e:
        enter()
    assert e.value.errno == errno.EINVAL and "setrtable 7" in str(e.value)
    for bad in (0, 256, -1, True, "5"):
        with pytest.raises(ValueError):
            B.rdomain_entry(bad, FakeLibc())


def test_openbsd_backend_runs_the_checks_and_plans(monkeypatch, tmp_path):
    """PodNetworks on OpenBSD: the CHECKS first (a clear error naming each
    problem), then the node plan, the pod plan, its teardown: argv as pinned
    above, run through a recording runner."""
    import subprocess
    from pufflet.priv import podnet

    outputs = {B.CHECKS["pf"]: "Status: Disabled\n", B.CHECKS["anchor"]: "",
               B.CHECKS["forwarding"]: "0\n", (IFC, "pufflet"): "", **{
                   c: "" for c in B.sweep_commands()}}

    def fake_run(argv, **kw):
        return subprocess.CompletedProcess(argv, 0, outputs[tuple(argv)], "")
    monkeypatch.setattr(podnet.subprocess, "run", fake_run)
    ran = []
    be = podnet.OpenBSDBackend(libc=FakeLibc())
    be.run = lambda step: ran.append(" ".join(step.argv))

    net = podnet.PodNetworks(str(tmp_path), "10.251.0.0/24", backend=be)
    assert net.pool is None and "pf is disabled" in net.problem
    assert "no pufflet anchor" in net.problem and "forwarding" in net.problem
    with pytest.raises(podnet.NetError) as e:
        net.setup(UID, None)
    assert e.value.code == "FAILED_PRECONDITION" and ran == []

    outputs.update({B.CHECKS["pf"]: "Status: Enabled for 0 days\n",
                    B.CHECKS["anchor"]: 'anchor "pufflet/*" all\n',
                    B.CHECKS["forwarding"]: "1\n"})
    addr = net.setup(UID, None)
    assert (addr.ip, addr.rdomain) == ("10.251.0.2", 1)
    pod = PodNet(UID, "10.251.0.2", 24, "10.251.0.1", 1)
    assert ran == argvs(B.node_plan(NODE)) + argvs(B.pod_plan(NODE, pod))
    ran.clear()
    enter = net.entry(UID)
    enter()
    assert be.libc.calls == [("setrtable", ("c_int",), (1,))]
    net.teardown(UID)
    assert ran == argvs(B.pod_teardown(UID, "10.251.0.2", 1))
    assert net.get(UID) is None


def test_openbsd_checks_run_at_start_without_a_cidr(monkeypatch, tmp_path, caplog):
    """With the CIDR still to come from the Node, the checks run at start
    all the same: the admin reads what to fix before the first pod."""
    import subprocess
    from pufflet.priv import podnet

    outputs = {B.CHECKS["pf"]: "Status: Enabled for 0 days\n", B.CHECKS["anchor"]: "",
               B.CHECKS["forwarding"]: "0\n", (IFC, "pufflet"): "",
               **{c: "" for c in B.sweep_commands()}}
    seen = []

    def fake_run(argv, **kw):
        seen.append(tuple(argv))
        return subprocess.CompletedProcess(argv, 0, outputs[tuple(argv)], "")
    monkeypatch.setattr(podnet.subprocess, "run", fake_run)
    be = podnet.OpenBSDBackend(libc=FakeLibc())
    ran = []
    be.run = lambda step: ran.append(" ".join(step.argv))
    with caplog.at_level("WARNING", logger="pufflet.priv.podnet"):
        net = podnet.PodNetworks(str(tmp_path), None, backend=be)
    assert seen == list(B.CHECKS.values())
    assert net.pool is None and ran == []
    assert "pf is disabled" not in net.problem
    assert 'anchor "pufflet/*"' in caplog.text and "net.inet.ip.forwarding" in caplog.text
    with pytest.raises(podnet.NetError) as e:
        net.setup(UID, "10.251.0.0/24")
    assert e.value.code == "FAILED_PRECONDITION" and "no pufflet anchor" in str(e.value)
    outputs.update({B.CHECKS["anchor"]: 'anchor "pufflet/*" all\n',
                    B.CHECKS["forwarding"]: "1\n"})
    assert net.setup(UID, "10.251.0.0/24").ip == "10.251.0.2"
