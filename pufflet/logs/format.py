"""The kubelet's CRI container log format, byte for byte as containerd writes it.

One record per line:

    <timestamp> <stream> <tag> <content>\\n

timestamp  Go's time.RFC3339Nano of the moment the bytes were read from the
           container's pipe: "2006-01-02T15:04:05.999999999Z07:00", so the
           fraction has its trailing zeros trimmed and vanishes, dot and all,
           on a whole second.  We always write UTC, which ends in "Z".
stream     "stdout" or "stderr".
tag        "F" for the last (or only) piece of a line, "P" for a piece that
           is continued by the next record of the same stream.  The tag field
           may carry more ":"-separated tags; only the first one counts, as in
           the kubelet, so the format can grow.
content    the line's bytes without its "\\n" (and without a "\\r" before it).

Rotated files are "<restart>.log.<YYYYmmdd-HHMMSS>", as the kubelet's
container log manager names them.
"""

from __future__ import annotations

import calendar
import datetime
import re
import time
from typing import NamedTuple

__all__ = [
    "STDOUT", "STDERR", "STREAMS", "DEFAULT_MAX_LINE",
    "LogFormatError", "Record",
    "format_timestamp", "fixed_timestamp", "parse_timestamp", "parse_line",
    "rotated_suffix", "rotation_key",
]

STDOUT = "stdout"
STDERR = "stderr"
STREAMS = (STDOUT, STDERR)

# containerd's default max_container_log_line_size: longer lines are split.
DEFAULT_MAX_LINE = 16 * 1024

# Structure and field ranges of an RFC 3339 timestamp as Go's time.Parse
# accepts it for RFC3339Nano; calendar validity (Feb 30) is left to
# parse_timestamp.  Go takes any number of fraction digits and truncates
# past nine, so do we.
_TS = (rb"\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])"
       rb"T(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d+)?"
       rb"(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)")
_TS_RE = re.compile(rb"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?"
                    rb"(?:(Z)|([+-])(\d\d):(\d\d))")

# A whole record, for the reader's bulk path: findall over a block of
# records in C instead of a Python loop per line.  Content cannot hold a
# newline, so "$" in MULTILINE mode is the record's end.
RECORD_RE = re.compile(rb"^(" + _TS + rb") (stdout|stderr) ([^ \n]*) ([^\n]*)$",
                       re.MULTILINE)
# The content of F records only: the fastest path when nothing but the
# text is wanted.  A block where it matches fewer lines than there are
# holds P records or malformed lines and takes the slow path.
CONTENT_F_RE = re.compile(rb"^" + _TS + rb" (?:stdout|stderr) F ([^\n]*)$", re.MULTILINE)
TS_CONTENT_F_RE = re.compile(rb"^(" + _TS + rb") (?:stdout|stderr) F ([^\n]*)$", re.MULTILINE)
_TS_ONLY_RE = re.compile(_TS)


class LogFormatError(ValueError):
    """A line is not a CRI log record; the message says which field is wrong."""


class Record(NamedTuple):
    ts: str          # the timestamp text as written (parse_timestamp for ns)
    stream: str      # "stdout" or "stderr"
    tag: str         # the whole tag field, usually "F" or "P"
    content: bytes   # without the record's newline

    @property
    def partial(self) -> bool:
        return is_partial(self.tag.encode())


def is_partial(tag: bytes) -> bool:
    """True when the tag field says "continued": its first tag is P."""
    return tag == b"P" or tag.startswith(b"P:")


_sec_cache: tuple[int, bytes] = (-1, b"")


def format_timestamp(ns: int) -> bytes:
    """Go's time.RFC3339Nano of ns since the epoch, in UTC."""
    global _sec_cache
    sec, frac = divmod(ns, 1_000_000_000)
    # A container feeds many times a second: format the seconds once.
    if _sec_cache[0] != sec:
        _sec_cache = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)).encode())
    head = _sec_cache[1]
    if frac == 0:
        return head + b"Z"
    return head + (".%09d" % frac).rstrip("0").encode() + b"Z"


def fixed_timestamp(ts: bytes) -> bytes:
    """The kubelet's output form of a record's timestamp: RFC3339NanoFixed,
    nine fraction digits always, in the record's own zone (a zero offset
    prints as Z, as Go's Format does)."""
    base, rest = ts[:19], ts[19:]
    if rest[:1] == b".":
        i = 1
        while i < len(rest) and 48 <= rest[i] <= 57:
            i += 1
        frac, zone = rest[1:i][:9], rest[i:]
    else:
        frac, zone = b"", rest
    if zone in (b"+00:00", b"-00:00"):
        zone = b"Z"
    return base + b"." + frac.ljust(9, b"0") + zone


def parse_timestamp(ts: str | bytes) -> int:
    """Nanoseconds since the epoch of an RFC 3339 timestamp as Go parses
    RFC3339Nano; LogFormatError if it is not one."""
    if isinstance(ts, str):
        ts = ts.encode()
    m = _TS_RE.fullmatch(ts)
    if m is None or _TS_ONLY_RE.fullmatch(ts) is None:
        raise LogFormatError(f"unexpected timestamp format {ts!r}")
    y, mo, d, h, mi, s, frac, z, sign, oh, om = m.groups()
    try:
        # datetime checks the calendar (Feb 30) as Go does.
        datetime.datetime(int(y), int(mo), int(d), int(h), int(mi), int(s))
    except ValueError as e:
        raise LogFormatError(f"unexpected timestamp {ts!r}: {e}") from None
    sec = calendar.timegm((int(y), int(mo), int(d), int(h), int(mi), int(s)))
    if z is None:
        off = int(oh) * 3600 + int(om) * 60
        sec -= off if sign == b"+" else -off
    ns = int((frac or b"0")[:9].ljust(9, b"0"))
    return sec * 1_000_000_000 + ns


def parse_line(line: bytes) -> Record:
    """Split one record (with or without its newline) into its fields.

    Raises LogFormatError naming the first field that is wrong, in the
    kubelet's words, so a reader can skip the line and say why.
    """
    if line.endswith(b"\n"):
        line = line[:-1]
    if b"\n" in line:
        raise LogFormatError("more than one line")
    parts = line.split(b" ", 3)
    if len(parts) < 2:
        raise LogFormatError("timestamp is not found")
    parse_timestamp(parts[0])
    if len(parts) < 3:
        raise LogFormatError("stream type is not found")
    if parts[1] not in (b"stdout", b"stderr"):
        raise LogFormatError(f"unexpected stream type {parts[1]!r}")
    if len(parts) < 4:
        raise LogFormatError("log tag is not found")
    return Record(parts[0].decode(), parts[1].decode(), parts[2].decode("ascii", "replace"),
                  parts[3])


# Rotated file names.  The kubelet uses the time of rotation to the second;
# we may rotate more often than that (by size, inline), so a second
# rotation within one second gets "-1", "-2", ... and rotation_key sorts
# them numerically.
_ROTATED_RE = re.compile(r"(\d{8}-\d{6})(?:-(\d+))?")


def rotated_suffix(ns: int, seq: int = 0) -> str:
    """The suffix after "<restart>.log." for a rotation at ns (UTC)."""
    s = time.strftime("%Y%m%d-%H%M%S", time.gmtime(ns // 1_000_000_000))
    return f"{s}-{seq}" if seq else s


def rotation_key(suffix: str) -> tuple[str, int] | None:
    """Sort key of a rotated file's suffix, None if it is not one of ours
    (a compressed ".gz" or a stray file)."""
    m = _ROTATED_RE.fullmatch(suffix)
    if m is None:
        return None
    return (m.group(1), int(m.group(2) or 0))
