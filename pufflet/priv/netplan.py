"""Pod network plans: what to run, in order, and how to take each step back.

A plan is a tuple of Steps made by a platform module (openbsd_net,
linux_net) from a pod's network allocation.  Making one has no side
effects, so the OpenBSD plans can be pinned by golden tests on any
machine and the Linux twin runs the very same machinery for real.

A Step is a command (argv, maybe with stdin) and the command that undoes
it.  apply() runs a plan through a runner the caller gives; when a step
fails it runs the undo of every step that succeeded, newest first, and
re-raises: a setup that fails halfway leaves nothing behind.  teardown()
runs every step of a teardown plan whatever happens, because leaving one
thing behind is better than leaving all of them.

This module never runs anything itself: the runner does (see
run_argv() in the platform modules).

Everything a plan creates is named from the pod's metadata.uid, so a
sweep at startup can list what exists and remove what belongs to no
live pod, with no state file needed to find it.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = ["HostPort", "PodNet", "Step", "StepError", "Plan", "Runner",
           "NetPlanError", "tag", "apply", "teardown"]

# Failure kinds a runner reports; see StepError.
EXISTS = "exists"
MISSING = "missing"
OTHER = "other"

TAG_LEN = 10


class NetPlanError(Exception):
    """A plan cannot be made from what was given; the message says why."""


def tag(pod_uid: str) -> str:
    """A short name for pod_uid, for names with little room (a Linux
    interface name holds 15 bytes).  A hash, not a prefix of the uid: uids
    of static pods are md5 sums that may share a prefix.  40 bits: two
    pods of one node colliding is a one in 10^9 event at 255 pods."""
    return hashlib.sha256(pod_uid.encode()).hexdigest()[:TAG_LEN]


@dataclass(frozen=True)
class HostPort:
    """One containerPort with a hostPort, from the pod spec."""
    host_port: int
    container_port: int
    protocol: str = "TCP"           # TCP or UDP (SCTP: refused, pf has no rdr for it)
    host_ip: str | None = None      # only this node address, if given

    def __post_init__(self) -> None:
        for what, port in (("hostPort", self.host_port),
                           ("containerPort", self.container_port)):
            if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
                raise NetPlanError(f"{what} {port!r} is not a port number")
        if self.protocol not in ("TCP", "UDP"):
            raise NetPlanError(f"hostPort {self.host_port}: protocol {self.protocol!r} "
                               "is not supported (TCP or UDP)")
        if self.host_ip is not None:
            try:
                ipaddress.IPv4Address(self.host_ip)
            except ValueError:
                raise NetPlanError(f"hostPort {self.host_port}: hostIP {self.host_ip!r} "
                                   "is not an IPv4 address") from None

    @property
    def proto(self) -> str:
        """The protocol as pf.conf(5) and nft(8) spell it."""
        return self.protocol.lower()


@dataclass(frozen=True)
class PodNet:
    """What a plan needs of one pod: its allocation plus its hostPorts."""
    pod_uid: str
    ip: str
    prefixlen: int
    gateway: str
    rdomain: int
    host_ports: tuple[HostPort, ...] = ()

    def __post_init__(self) -> None:
        try:
            net = ipaddress.IPv4Interface(f"{self.ip}/{self.prefixlen}").network
            gw = ipaddress.IPv4Address(self.gateway)
        except ValueError as e:
            raise NetPlanError(f"pod {self.pod_uid}: {e}") from None
        if gw not in net or str(gw) == self.ip:
            raise NetPlanError(f"pod {self.pod_uid}: gateway {self.gateway} is not "
                               f"another address of {net}")
        if not 1 <= self.rdomain <= 255:
            raise NetPlanError(f"pod {self.pod_uid}: rdomain {self.rdomain} not in 1..255")
        seen = set()
        for hp in self.host_ports:
            key = (hp.proto, hp.host_port, hp.host_ip)
            if key in seen:
                raise NetPlanError(f"pod {self.pod_uid}: hostPort {hp.host_port}/"
                                   f"{hp.protocol} given twice")
            seen.add(key)

    @property
    def tag(self) -> str:
        return tag(self.pod_uid)

    @property
    def network(self) -> str:
        return str(ipaddress.IPv4Interface(f"{self.ip}/{self.prefixlen}").network)


@dataclass(frozen=True)
class Step:
    """One command of a plan.

    exists_ok: the step creates something that may be there already (a
    node switch surviving a restart of pufflet); then it counts as done
    and, as we did not make it now, it has nothing to undo.
    missing_ok: the step removes something that may be gone already (a
    teardown after a half setup, or a second teardown)."""
    argv: tuple[str, ...]
    undo: tuple[str, ...] | None = None
    stdin: str | None = None
    undo_stdin: str | None = None
    exists_ok: bool = False
    missing_ok: bool = False

    def undo_step(self) -> Step | None:
        if self.undo is None:
            return None
        return Step(self.undo, stdin=self.undo_stdin, missing_ok=True)

    def __str__(self) -> str:
        return " ".join(self.argv)


Plan = tuple[Step, ...]


class StepError(Exception):
    """A step failed.  kind is EXISTS or MISSING when the runner could tell
    that the command failed because its object is there already or gone,
    OTHER otherwise."""

    def __init__(self, step: Step, status: int, stderr: str, kind: str = OTHER) -> None:
        self.step = step
        self.status = status
        self.stderr = stderr.strip()
        self.kind = kind
        super().__init__(f"{step}: exit {status}: {self.stderr or 'no message'}")


Runner = Callable[[Step], None]


def _tolerated(step: Step, e: StepError) -> bool:
    return (e.kind == EXISTS and step.exists_ok) or (e.kind == MISSING and step.missing_ok)


def apply(plan: Sequence[Step], run: Runner) -> None:
    """Run plan; on a failure undo what it did and raise the StepError.

    Undo failures are not raised (the first error is the one that
    matters) but are attached to it as .undo_errors, and the sweep at the
    next start removes what an undo left."""
    done: list[Step] = []
    for step in plan:
        try:
            run(step)
        except StepError as e:
            if _tolerated(step, e):
                continue        # there already: not ours to undo
            e.undo_errors = teardown(_undos(done), run)
            raise
        except BaseException:
            # A bug or a signal: still leave nothing behind.
            teardown(_undos(done), run)
            raise
        done.append(step)


def _undos(done: Iterable[Step]) -> list[Step]:
    return [u for u in (s.undo_step() for s in reversed(list(done))) if u is not None]


def teardown(plan: Sequence[Step], run: Runner) -> list[StepError]:
    """Run every step of plan, whatever fails; return what failed (things
    already gone do not count as failures for missing_ok steps)."""
    errors = []
    for step in plan:
        try:
            run(step)
        except StepError as e:
            if not _tolerated(step, e):
                errors.append(e)
    return errors
