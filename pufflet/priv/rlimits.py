"""Kubernetes resources → setrlimit(2) and a nice value.

There are no cgroups on OpenBSD, so per-process resource limits are all a
pod can get. What each mapping enforces, and what it cannot:

memory → RLIMIT_DATA (+ RLIMIT_RSS, informational)
    OpenBSD: getrlimit(2) counts "memory allocated via malloc(3) and all
    other anonymous memory mapped via mmap(2)"; going over makes brk/mmap
    fail with ENOMEM, so malloc returns NULL.  RLIMIT_RSS "is no longer
    enforced, but retained for compatibility".
    Linux (>= 4.7): RLIMIT_DATA counts private writable mappings that are
    not stack (brk, anonymous mmap, writable private file mappings); over
    it mmap/brk fail with ENOMEM.  RLIMIT_RSS has had no effect since 2.6.
    RLIMIT_AS would count more (every mapping) but breaks programs that
    reserve address space they never touch (Go, the JVM, sanitizers, big
    PROT_NONE guard regions), so it is not used.
    Unlike a cgroup limit this is per process, virtual rather than
    resident, and never OOM-kills: a pod with three processes may use
    three times its limit, and an allocation failure is the program's to
    handle. Page cache and shared memory are not counted.

pids (node configuration, like the kubelet's podPidsLimit) → RLIMIT_NPROC
    Counted per real uid.  Each pod has its own uid (priv/uids.py), so this
    is a per-pod process limit, shared by all its containers.  Linux counts
    threads too (as the pids cgroup does); OpenBSD counts processes only
    (threads are bounded by kern.maxthread, node-wide).

cpu → nice(3) value, derived from the request
    Neither system can cap CPU time per process group the way CFS quota
    does, and OpenBSD has no CPU shares.  The request is turned into the
    nice value whose CFS weight is nearest the kubelet's cpu.shares
    (1024 per CPU), clamped to 0..19: a pod never gets priority over
    pufflet itself.  On OpenBSD nice only shifts scheduling priority,
    a much weaker lever than CFS weights.  CPU limits are not enforced
    (RLIMIT_CPU is total seconds and kills with SIGXCPU: not a rate).

ephemeral-storage → RLIMIT_FSIZE
    The largest single file a process may write (SIGXFSZ, then EFBIG),
    not the total a pod writes; emptyDir sizeLimit is checked elsewhere.

nofile → a fixed default (soft 1024 so select(2) users stay safe, hard
    65536 for servers that raise it); core → 0, so a crash does not drop a
    core file (with the process's secrets) into the pod's working dir.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["QuantityError", "parse_quantity", "ceil_value", "Rlimit", "Plan",
           "plan", "nice_for_cpu", "DEFAULT_NOFILE"]


class QuantityError(ValueError):
    """A string that resource.Quantity would refuse."""


# ---- resource.Quantity ------------------------------------------------------
#
# The grammar and rounding of k8s.io/apimachinery/pkg/api/resource
# (ParseQuantity): <sign><digits>[.<digits>]<suffix>, where the suffix is a
# binary SI one (Ki..Ei), a decimal SI one (n u m "" k M G T P E) or an
# exponent (e|E followed by a signed integer).  Its quirks are kept on
# purpose, so a pod means here what it means to the API server:
# "1." and "." and "+" parse (as 1, 0, 0); "K" is not kilo; "1e" is an
# error but "1E" is 10^18.

_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9,
            "T": 12, "P": 15, "E": 18}
_SUFFIX_CHARS = set("eEinumkKMGTP")
_INT64_MAX = 2**63 - 1
_NANO = Fraction(1, 10**9)
_MAX_SCALE = 1000
# Go's strconv.ParseInt(s, 10, 64): optional sign, decimal digits only.
_GO_INT = re.compile(r"[+-]?[0-9]+\Z")


def _split(s: str) -> tuple[bool, str, str, str]:
    """(positive, integer digits, fraction digits, suffix), scanning as
    apimachinery's parseQuantityString does."""
    positive, pos, end = True, 0, len(s)
    if s[0] in "+-":
        positive = s[0] == "+"
        pos = 1
    while pos < end and s[pos] == "0":
        pos += 1
    if pos == end:
        return positive, "0", "", ""
    start = pos
    while pos < end and s[pos].isascii() and s[pos].isdigit():
        pos += 1
    num = s[start:pos] or "0"
    denom = ""
    if pos < end and s[pos] == ".":
        pos += 1
        start = pos
        while pos < end and s[pos].isascii() and s[pos].isdigit():
            pos += 1
        denom = s[start:pos]
    suffix_start = pos
    while pos < end and s[pos] in _SUFFIX_CHARS:
        pos += 1
    if pos < end and s[pos] in "+-":
        pos += 1
    while pos < end and s[pos].isascii() and s[pos].isdigit():
        pos += 1
    if pos != end:
        raise QuantityError(f"quantity {s!r}: must match the regular expression "
                            r"'^([+-]?[0-9.]+)([eEinumkMGTP]*[-+]?[0-9]*)$'")
    return positive, num, denom, s[suffix_start:]


def _suffix(s: str, suffix: str) -> tuple[int, int, str]:
    """(base, exponent, kind) for a suffix."""
    if suffix in _DECIMAL:
        return 10, _DECIMAL[suffix], "decimal"
    if suffix in _BINARY:
        return 2, _BINARY[suffix], "binary"
    if len(suffix) > 1 and suffix[0] in "eE" and _GO_INT.match(suffix[1:]):
        e = int(suffix[1:])
        if -2**63 <= e < 2**63:
            # Go keeps it as int32(parsed): a wrapped exponent, as there.
            return 10, (e + 2**31) % 2**32 - 2**31, "exponent"
    raise QuantityError(f"quantity {s!r}: unable to parse quantity's suffix")


def parse_quantity(s: str) -> Fraction:
    """The exact value of a Kubernetes quantity string.

    Values that apimachinery keeps exactly (up to 18 significant digits at
    nano precision, or a whole number times a binary suffix) are exact
    here; the others are rounded up (away from zero) to a multiple of
    1e-9 and capped at ±(2^63-1), as ParseQuantity does."""
    if not isinstance(s, str) or not s:
        raise QuantityError("quantity: empty string")
    if s == "0":
        return Fraction(0)
    positive, num, denom, suffix = _split(s)
    base, exp, kind = _suffix(s, suffix)
    sign = 1 if positive else -1
    digits = int(num + denom)

    # apimachinery's int64 fast path: kept exactly, neither rounded nor capped.
    if kind == "binary":
        precision = 15 - len(num) - (exp * 3) // 10 - 1
        if not denom and precision >= 0 and (digits << exp) <= _INT64_MAX:
            return Fraction(sign * (digits << exp))
    else:
        scale = exp - len(denom)
        if scale > _MAX_SCALE:
            # apimachinery keeps "1e999999" symbolically; we would have
            # to build the number, and no resource needs it.
            raise QuantityError(f"quantity {s!r}: exponent too large")
        if 18 - len(num) - len(denom) >= 0 and scale >= -9:
            return sign * digits * Fraction(10) ** scale

    if digits == 0:
        return Fraction(0)
    if base == 2:
        value = Fraction(int(num + denom), 10**len(denom)) * 2**exp
    else:
        scale = exp - len(denom)
        magnitude = len(str(digits)) + scale   # value < 10**magnitude
        if magnitude > 20:                     # far above 2^63: capped anyway
            return Fraction(sign * _INT64_MAX)
        if magnitude < -9:                     # below 1n: rounds up to 1n
            return sign * _NANO
        value = digits * Fraction(10) ** scale
    # Round the magnitude up to nano units, then cap it.
    value = Fraction(math.ceil(value / _NANO)) * _NANO
    return sign * min(value, Fraction(_INT64_MAX))


def ceil_value(q: Fraction) -> int:
    """Quantity.Value(): rounded up (away from zero) to a whole number."""
    return math.ceil(q) if q >= 0 else -math.ceil(-q)


# ---- limits ---------------------------------------------------------------

DEFAULT_NOFILE = (1024, 65536)
INFINITY = -1   # resource.RLIM_INFINITY on every system we run on


@dataclass(frozen=True)
class Rlimit:
    """One setrlimit(2) call. name is the resource module's constant name,
    resolved to the running system's number only when applied."""
    name: str
    soft: int
    hard: int

    def __post_init__(self) -> None:
        if not re.fullmatch(r"RLIMIT_[A-Z]+", self.name):
            raise ValueError(f"bad rlimit name {self.name!r}")
        for v in (self.soft, self.hard):
            if not isinstance(v, int) or isinstance(v, bool) or v < INFINITY:
                raise ValueError(f"{self.name}: bad value {v!r}")
        if self.hard != INFINITY and (self.soft == INFINITY or self.soft > self.hard):
            raise ValueError(f"{self.name}: soft {self.soft} above hard {self.hard}")

    def resource(self) -> int:
        import resource
        return getattr(resource, self.name)

    def values(self) -> tuple[int, int]:
        """(soft, hard) with INFINITY as the resource module spells it."""
        import resource
        inf = resource.RLIM_INFINITY
        return (inf if self.soft == INFINITY else self.soft,
                inf if self.hard == INFINITY else self.hard)


@dataclass(frozen=True)
class Plan:
    rlimits: tuple[Rlimit, ...]
    nice: int


# The CFS weight of nice 0 and the ratio between neighbouring nice levels
# (kernel/sched/core.c sched_prio_to_weight: "each nice level is ~10%",
# a factor of about 1.25).
_WEIGHT_NICE0 = 1024
_NICE_STEP = 1.25
_MIN_SHARES = 2           # the kubelet's floor for cpu.shares


def nice_for_cpu(request: Fraction | None) -> int:
    """The nice value for a CPU request (in CPUs), from the cpu.shares the
    kubelet would give it: shares = request * 1024 (at least 2; 2 with no
    request: BestEffort), then the nice level with the nearest weight."""
    shares = _MIN_SHARES if request is None else max(
        _MIN_SHARES, math.ceil(request * 1000) * _WEIGHT_NICE0 // 1000)
    nice = round(math.log(_WEIGHT_NICE0 / shares, _NICE_STEP))
    return min(max(nice, 0), 19)


def _quantity(res: Mapping[str, str] | None, key: str, where: str) -> Fraction | None:
    if not res or key not in res:
        return None
    try:
        q = parse_quantity(str(res[key]))
    except QuantityError as e:
        raise QuantityError(f"{where}.{key}: {e}") from None
    if q < 0:
        raise QuantityError(f"{where}.{key}: must not be negative")
    return q


def plan(limits: Mapping[str, str] | None = None,
         requests: Mapping[str, str] | None = None, *,
         pids: int | None = None,
         nofile: tuple[int, int] = DEFAULT_NOFILE) -> Plan:
    """The rlimits and nice value for one container.

    limits/requests are the container's resources.limits/.requests as the
    API gives them (quantity strings); pids is the node's per-pod process
    limit (None: none).  A zero memory or storage limit means none, as
    with the kubelet, which only writes a cgroup limit when it is non-zero."""
    out: list[Rlimit] = [Rlimit("RLIMIT_CORE", 0, 0),
                         Rlimit("RLIMIT_NOFILE", nofile[0], nofile[1])]
    if pids is not None:
        if not isinstance(pids, int) or pids < 1:
            raise ValueError(f"pids limit {pids!r}: want a positive number")
        out.append(Rlimit("RLIMIT_NPROC", pids, pids))
    storage = _quantity(limits, "ephemeral-storage", "limits")
    if storage:
        v = ceil_value(storage)
        out.append(Rlimit("RLIMIT_FSIZE", v, v))
    memory = _quantity(limits, "memory", "limits")
    if memory:
        v = ceil_value(memory)
        # Kept last: spawn applies the list in order and the memory limits
        # should bite as late as possible before execve.
        out.append(Rlimit("RLIMIT_RSS", v, v))
        out.append(Rlimit("RLIMIT_DATA", v, v))
    # As the API server defaults it: a limit with no request is the request.
    cpu = _quantity(requests, "cpu", "requests")
    if cpu is None:
        cpu = _quantity(limits, "cpu", "limits")
    return Plan(tuple(out), nice_for_cpu(cpu))
