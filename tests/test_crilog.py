"""Container logs: the CRI record format, the writer and the kubectl-logs reader."""

import datetime
import os
import random
import re
import stat
import threading
import time

import pytest

from pufflet.logs import (
    LogFormatError, LogReader, LogWriter, container_log_dir, container_log_files,
    format_timestamp, parse_line, parse_timestamp, read_logs,
)
from pufflet.logs.format import fixed_timestamp, rotation_key

T0 = 1700000000.0          # 2023-11-14T22:13:20Z
NS = 1_000_000_000
KIB = 1024

# What Go's time.RFC3339Nano produces in UTC: no fraction on a whole
# second, otherwise 1-9 digits with no trailing zero.
GO_RFC3339NANO = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{0,8}[1-9])?Z")
RECORD = re.compile(rb"(" + GO_RFC3339NANO.pattern + rb") (stdout|stderr) ([FP]) (.*)")


def records(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data.endswith(b"\n") or not data
    out = []
    for line in data.split(b"\n")[:-1]:
        m = RECORD.fullmatch(line)
        assert m, line[:100]
        out.append((m.group(1), m.group(3).decode(), m.group(4).decode(), m.group(5)))
    return out


def logs(d, restart=0, **kw):
    return b"".join(read_logs(container_log_files(str(d), restart), **kw))


# --- format ------------------------------------------------------------------

@pytest.mark.parametrize("ns,text", [
    (0, b"1970-01-01T00:00:00Z"),
    (1700000000 * NS, b"2023-11-14T22:13:20Z"),
    (1700000000 * NS + 500_000_000, b"2023-11-14T22:13:20.5Z"),
    (1700000000 * NS + 120_000_000, b"2023-11-14T22:13:20.12Z"),
    (1700000000 * NS + 1000, b"2023-11-14T22:13:20.000001Z"),
    (1700000000 * NS + 1, b"2023-11-14T22:13:20.000000001Z"),
    (1700000000 * NS + 123456789, b"2023-11-14T22:13:20.123456789Z"),
    (951782400 * NS + 10, b"2000-02-29T00:00:00.00000001Z"),
])
def test_timestamp_is_go_rfc3339nano(ns, text):
    assert format_timestamp(ns) == text
    assert GO_RFC3339NANO.fullmatch(text)
    assert parse_timestamp(text) == ns


def test_parse_timestamp_offsets_and_errors():
    assert parse_timestamp("2023-11-14T23:13:20.5+01:00") == 1700000000 * NS + 500_000_000
    assert parse_timestamp("2023-11-14T21:13:20-01:00") == 1700000000 * NS
    # Go truncates fraction digits past nine.
    assert parse_timestamp("2023-11-14T22:13:20.1234567899Z") == 1700000000 * NS + 123456789
    for bad in ["2023-11-14 22:13:20Z", "2023-11-14T22:13:20", "2023-02-30T00:00:00Z",
                "2023-13-01T00:00:00Z", "2023-11-14T24:00:00Z", "2023-11-14T22:13:60Z",
                "2023-11-14T22:13:20.Z", "yesterday"]:
        with pytest.raises(LogFormatError):
            parse_timestamp(bad)


def test_fixed_timestamp_is_the_kubelets_output_form():
    assert fixed_timestamp(b"2023-11-14T22:13:20Z") == b"2023-11-14T22:13:20.000000000Z"
    assert fixed_timestamp(b"2023-11-14T22:13:20.12Z") == b"2023-11-14T22:13:20.120000000Z"
    assert fixed_timestamp(b"2023-11-14T22:13:20.5+01:00") == b"2023-11-14T22:13:20.500000000+01:00"
    assert fixed_timestamp(b"2023-11-14T22:13:20+00:00") == b"2023-11-14T22:13:20.000000000Z"


def test_parse_line():
    r = parse_line(b"2016-10-06T00:17:09.669794202Z stdout P log content 1\n")
    assert r == ("2016-10-06T00:17:09.669794202Z", "stdout", "P", b"log content 1")
    assert r.partial
    r = parse_line(b"2016-10-06T00:17:09.669794203Z stderr F  two  spaces ")
    assert r.content == b" two  spaces " and not r.partial
    assert parse_line(b"2016-10-06T00:17:09Z stdout F ").content == b""
    # Forward compatible tags, as the kubelet: the first one decides.
    assert parse_line(b"2016-10-06T00:17:09Z stdout P:x y").partial
    assert not parse_line(b"2016-10-06T00:17:09Z stdout F:P y").partial


@pytest.mark.parametrize("line,why", [
    (b"", "timestamp is not found"),
    (b"garbage", "timestamp is not found"),
    (b"notatime stdout F x", "unexpected timestamp"),
    (b"2016-10-06T00:17:09Z", "timestamp is not found"),
    (b"2016-10-06T00:17:09Z stdout", "stream type is not found"),
    (b"2016-10-06T00:17:09Z stdin F x", "unexpected stream type"),
    (b"2016-10-06T00:17:09Z stdout F", "log tag is not found"),
    (b"2016-10-06T00:17:09Z stdout F a\nb", "more than one line"),
])
def test_parse_line_says_what_is_wrong(line, why):
    with pytest.raises(LogFormatError, match=why):
        parse_line(line)


def test_rotation_names_sort():
    assert rotation_key("20231114-221320") == ("20231114-221320", 0)
    assert rotation_key("20231114-221320-10") > rotation_key("20231114-221320-9")
    assert rotation_key("20231114-221320.gz") is None


# --- writer ------------------------------------------------------------------

def test_layout_mode_and_record_format(tmp_path):
    d = container_log_dir(str(tmp_path), "default", "web", "1234-abcd", "nginx")
    assert d == f"{tmp_path}/default_web_1234-abcd/nginx"
    old = os.umask(0o077)
    try:
        w = LogWriter(d, 3)
    finally:
        os.umask(old)
    w.feed("stdout", b"hello\n", T0 + 0.5)
    w.feed("stderr", b"oops\n", T0 + 1)
    w.close()
    assert w.path == f"{d}/3.log"
    st = os.stat(w.path)
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == os.getuid()
    with open(w.path, "rb") as f:
        assert f.read() == (b"2023-11-14T22:13:20.5Z stdout F hello\n"
                            b"2023-11-14T22:13:21Z stderr F oops\n")


def test_refuses_symlink_and_appends_to_existing(tmp_path):
    (tmp_path / "0.log").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError):
        LogWriter(str(tmp_path), 0)
    assert not (tmp_path / "elsewhere").exists()
    os.mkfifo(tmp_path / "1.log")
    with pytest.raises(OSError):
        LogWriter(str(tmp_path), 1)   # and does not hang on the FIFO
    # pufflet restarted, the container did not: continue the file.
    with LogWriter(str(tmp_path), 2) as w:
        w.feed("stdout", b"one\n", T0)
    with LogWriter(str(tmp_path), 2) as w:
        w.feed("stdout", b"two\n", T0)
    assert logs(tmp_path, 2) == b"one\ntwo\n"


def test_gid_given_to_the_reader(tmp_path):
    with LogWriter(str(tmp_path), 0, gid=4242) as w:
        w.feed("stdout", b"x\n")
    assert os.stat(w.path).st_gid == 4242


def test_long_line_split_p_f_and_reassembled(tmp_path):
    line = bytes(random.Random(1).choice(b"abcdefghij") for _ in range(40 * KIB))
    with LogWriter(str(tmp_path), 0) as w:
        w.feed("stdout", line + b"\n", T0)
    recs = records(w.path)
    assert [(r[1], r[2], len(r[3])) for r in recs] == [
        ("stdout", "P", 16384), ("stdout", "P", 16384), ("stdout", "F", 8192)]
    assert b"".join(r[3] for r in recs) == line
    assert logs(tmp_path) == line + b"\n"
    out = logs(tmp_path, timestamps=True)
    assert out == b"2023-11-14T22:13:20.000000000Z " + line + b"\n"   # one prefix per line


def test_split_boundaries_match_containerd(tmp_path):
    m = 16 * KIB
    with LogWriter(str(tmp_path), 0) as w:
        w.feed("stdout", b"a" * m + b"\n", T0)           # exactly max: one F
        w.feed("stdout", b"b" * (m + 1) + b"\n", T0)     # one more: P + F of 1
        w.feed("stdout", b"c" * (2 * m) + b"\n", T0)     # two full: P + F
        w.feed("stdout", b"\n", T0)                      # empty line: F ""
    got = [(r[2], r[3][:1], len(r[3])) for r in records(w.path)]
    assert got == [("F", b"a", m), ("P", b"b", m), ("F", b"b", 1), ("P", b"c", m),
                   ("F", b"c", m), ("F", b"", 0)]


def test_small_max_line_and_split_feeds(tmp_path):
    with LogWriter(str(tmp_path), 0, max_line=4) as w:
        for b in b"abcdefghij\nxy":
            w.feed("stdout", bytes([b]), T0)
        # Held back: at most max_line bytes of an unfinished line.
        assert [r[2:] for r in records(w.path)] == [
            ("P", b"abcd"), ("P", b"efgh"), ("F", b"ij")]
    assert [r[2:] for r in records(w.path)][-1] == ("P", b"xy")
    assert logs(tmp_path) == b"abcdefghij\nxy"


def test_crlf_and_lone_cr(tmp_path):
    with LogWriter(str(tmp_path), 0, max_line=4) as w:
        w.feed("stdout", b"dos\r\nbar\rbaz\n", T0)
        w.feed("stdout", b"abcd\r", T0)   # "\r" may be half of "\r\n"
        w.feed("stdout", b"\n", T0)
        w.feed("stdout", b"x\r\r\n", T0)
    assert [r[2:] for r in records(w.path)] == [
        ("F", b"dos"), ("P", b"bar\r"), ("F", b"baz"), ("F", b"abcd"), ("F", b"x\r")]


def test_partial_line_across_feeds_and_interleaving(tmp_path):
    with LogWriter(str(tmp_path), 0) as w:
        w.feed("stdout", b"out-1 be", T0)
        w.feed("stderr", b"err-1\nerr-", T0 + 1)
        w.feed("stdout", b"gun\nout-2\n", T0 + 2)
        w.feed("stderr", b"2\n", T0 + 3)
    recs = records(w.path)
    assert [(r[0], r[1], r[3]) for r in recs] == [
        (b"2023-11-14T22:13:21Z", "stderr", b"err-1"),
        (b"2023-11-14T22:13:22Z", "stdout", b"out-1 begun"),
        (b"2023-11-14T22:13:22Z", "stdout", b"out-2"),
        (b"2023-11-14T22:13:23Z", "stderr", b"err-2")]
    assert logs(tmp_path) == b"err-1\nout-1 begun\nout-2\nerr-2\n"
    assert logs(tmp_path, stream="stdout") == b"out-1 begun\nout-2\n"
    assert logs(tmp_path, stream="stderr") == b"err-1\nerr-2\n"


def test_closed_mid_line_is_p(tmp_path):
    w = LogWriter(str(tmp_path), 0)
    w.feed("stdout", b"done\nhalf a li", T0)
    w.feed("stderr", b"no newline", T0)
    w.close(T0 + 1)
    w.close()  # idempotent
    assert [r[1:] for r in records(w.path)] == [
        ("stdout", "F", b"done"), ("stdout", "P", b"half a li"), ("stderr", "P", b"no newline")]
    assert logs(tmp_path) == b"done\nhalf a lino newline"
    assert logs(tmp_path, timestamps=True) == (
        b"2023-11-14T22:13:20.000000000Z done\n2023-11-14T22:13:21.000000000Z half a li"
        b"2023-11-14T22:13:21.000000000Z no newline")


def test_flush_one_stream(tmp_path):
    with LogWriter(str(tmp_path), 0) as w:
        w.feed("stdout", b"prompt> ", T0)
        w.feed("stderr", b"e", T0)
        w.flush("stdout", T0)
        assert [r[1:] for r in records(w.path)] == [("stdout", "P", b"prompt> ")]
        with pytest.raises(ValueError):
            w.feed("stdin", b"x")


def test_random_feeds_round_trip(tmp_path):
    rnd = random.Random(7)
    lines = {"stdout": [], "stderr": []}
    w = LogWriter(str(tmp_path), 0, max_line=50, max_size=4 * KIB, max_files=1000)
    for s in ("stdout", "stderr"):
        data = b"".join(bytes(rnd.choice(b"ab \t\rx") for _ in range(rnd.randrange(120))) + b"\n"
                        for _ in range(300))
        lines[s] = data.replace(b"\r\n", b"\n")
        i = 0
        while i < len(data):
            n = rnd.randrange(1, 200)
            w.feed(s, data[i:i + n], T0)
            i += n
    w.close()
    assert logs(tmp_path, stream="stdout") == lines["stdout"]
    assert logs(tmp_path, stream="stderr") == lines["stderr"]
    for p in container_log_files(str(tmp_path), 0):
        assert os.path.getsize(p) <= 4 * KIB
        records(p)


# --- rotation ----------------------------------------------------------------

def write_lines(w, start, n, now=T0, stream="stdout"):
    w.feed(stream, b"".join(b"line %05d\n" % i for i in range(start, start + n)), now)


def test_rotation_by_size_names_and_max_files(tmp_path):
    rec = len(b"2023-11-14T22:13:20Z stdout F line 00000\n")
    w = LogWriter(str(tmp_path), 0, max_size=10 * rec, max_files=3)
    for i in range(45):
        write_lines(w, i, 1, T0 + i // 20)
    w.close()
    names = sorted(os.listdir(tmp_path))
    # Rotated at lines 10, 20, 30, 40, that is at T0, T0+1, T0+1 (a second
    # rotation within a second) and T0+2; the oldest two are gone.
    assert names == ["0.log", "0.log.20231114-221321-1", "0.log.20231114-221322"]
    files = container_log_files(str(tmp_path), 0)
    assert [os.path.basename(p) for p in files] == [
        "0.log.20231114-221321-1", "0.log.20231114-221322", "0.log"]
    assert [os.path.getsize(p) // rec for p in files] == [10, 10, 5]
    assert w.rotations == 4
    # The three files left hold the last 25 lines, in order.
    assert logs(tmp_path) == b"".join(b"line %05d\n" % i for i in range(20, 45))


def test_one_batch_spanning_several_files(tmp_path):
    rec = len(b"2023-11-14T22:13:20Z stdout F line 00000\n")
    with LogWriter(str(tmp_path), 0, max_size=4 * rec, max_files=10) as w:
        write_lines(w, 0, 10)   # one feed, one batch: never a split record
    files = container_log_files(str(tmp_path), 0)
    assert [os.path.getsize(p) // rec for p in files] == [4, 4, 2]
    assert logs(tmp_path) == b"".join(b"line %05d\n" % i for i in range(10))


def test_tail_across_files(tmp_path):
    rec = len(b"2023-11-14T22:13:20Z stdout F line 00000\n")
    with LogWriter(str(tmp_path), 0, max_size=4 * rec, max_files=10) as w:
        for i in range(10):
            write_lines(w, i, 1)
    files = container_log_files(str(tmp_path), 0)
    assert len(files) == 3 and os.path.getsize(files[-1]) == 2 * rec
    want = lambda a, b: b"".join(b"line %05d\n" % i for i in range(a, b))   # noqa: E731
    assert logs(tmp_path, tail_lines=5) == want(5, 10)
    assert logs(tmp_path, tail_lines=1) == want(9, 10)
    assert logs(tmp_path, tail_lines=6) == want(4, 10)
    assert logs(tmp_path, tail_lines=100) == want(0, 10)
    assert logs(tmp_path, tail_lines=0) == b""
    assert logs(tmp_path, tail_lines=-1) == want(0, 10)


def test_tail_counts_whole_lines_and_streams(tmp_path):
    big = b"B" * 40 * KIB
    with LogWriter(str(tmp_path), 0, max_size=20 * KIB, max_files=10) as w:
        w.feed("stdout", b"o1\n", T0)
        w.feed("stdout", big[:30 * KIB], T0)        # a P record ...
        w.feed("stderr", b"e1\ne2\n", T0)           # ... stderr lines inside the long line ...
        w.feed("stdout", big[30 * KIB:] + b"\n", T0)  # ... its end
        w.feed("stderr", b"e3\n", T0)
        w.feed("stdout", b"o2\ntrailing", T0)
    assert len(container_log_files(str(tmp_path), 0)) > 1
    assert logs(tmp_path, tail_lines=1) == b"trailing"
    assert logs(tmp_path, tail_lines=2) == b"o2\ntrailing"
    assert logs(tmp_path, tail_lines=3) == b"e3\no2\ntrailing"
    # The long line started before e1 and e2, which are not wanted.
    assert logs(tmp_path, tail_lines=4) == big + b"\ne3\no2\ntrailing"
    assert logs(tmp_path, tail_lines=5) == b"e2\n" + big + b"\ne3\no2\ntrailing"
    assert logs(tmp_path, tail_lines=2, stream="stdout") == b"o2\ntrailing"
    assert logs(tmp_path, tail_lines=3, stream="stdout") == big + b"\no2\ntrailing"
    assert logs(tmp_path, tail_lines=4, stream="stdout") == b"o1\n" + big + b"\no2\ntrailing"
    assert logs(tmp_path, tail_lines=1, stream="stderr") == b"e3\n"
    assert logs(tmp_path, tail_lines=2, stream="stderr") == b"e2\ne3\n"
    assert logs(tmp_path, tail_lines=9) == logs(tmp_path)
    assert logs(tmp_path) == b"o1\ne1\ne2\n" + big + b"\ne3\no2\ntrailing"


# --- reader options ------------------------------------------------------------

@pytest.fixture
def three_seconds(tmp_path):
    with LogWriter(str(tmp_path), 0) as w:
        w.feed("stdout", b"a\nb\n", T0)
        w.feed("stderr", b"c\n", T0 + 1.25)
        w.feed("stdout", b"d\n", T0 + 2)
    return tmp_path


def test_since(three_seconds):
    utc = datetime.timezone.utc
    at = lambda s: datetime.datetime.fromtimestamp(T0 + s, utc)   # noqa: E731
    assert logs(three_seconds, since=at(0)) == b"a\nb\nc\nd\n"
    assert logs(three_seconds, since=at(0.001)) == b"c\nd\n"
    assert logs(three_seconds, since=at(1.25)) == b"c\nd\n"
    assert logs(three_seconds, since=at(1.250001)) == b"d\n"
    assert logs(three_seconds, since=at(3)) == b""
    naive = datetime.datetime(2023, 11, 14, 22, 13, 22)   # taken as UTC
    assert logs(three_seconds, since=naive) == b"d\n"
    cet = datetime.timezone(datetime.timedelta(hours=1))
    assert logs(three_seconds, since=datetime.datetime(2023, 11, 14, 23, 13, 21, 500000, cet)) == b"d\n"
    assert logs(three_seconds, since=at(1), tail_lines=3) == b"c\nd\n"


def test_timestamps(three_seconds):
    assert logs(three_seconds, timestamps=True) == (
        b"2023-11-14T22:13:20.000000000Z a\n2023-11-14T22:13:20.000000000Z b\n"
        b"2023-11-14T22:13:21.250000000Z c\n2023-11-14T22:13:22.000000000Z d\n")


def test_limit_bytes_exact(three_seconds):
    full = logs(three_seconds, timestamps=True)
    for n in range(0, len(full) + 3):
        assert logs(three_seconds, timestamps=True, limit_bytes=n) == full[:n]
    assert logs(three_seconds, limit_bytes=3) == b"a\nb"
    assert logs(three_seconds, limit_bytes=5, follow=True) == b"a\nb\nc"


def test_limit_bytes_on_big_output(tmp_path):
    with LogWriter(str(tmp_path), 0) as w:
        for i in range(2000):
            write_lines(w, i * 100, 100)
    full = logs(tmp_path)
    assert full == b"".join(b"line %05d\n" % i for i in range(200000))
    assert logs(tmp_path, limit_bytes=1234567) == full[:1234567]


def test_malformed_lines_are_skipped(tmp_path, caplog):
    p = tmp_path / "0.log"
    p.write_bytes(b"2023-11-14T22:13:20Z stdout F good 1\n"
                  b"this is not a record\n"
                  b"2023-11-14T22:13:20Z stdin F bad stream\n"
                  b"\n"
                  b"2023-11-14T22:13:20Z stdout F good 2\n"
                  b"2023-11-14T22:13:20Z stdout F torn at the e")
    r = LogReader([str(p)])
    out = r.poll()
    assert out == b"good 1\ngood 2\ntorn at the e" and r.done
    assert r.malformed == 3
    assert "unexpected timestamp format" in caplog.text
    # A follower waits for the rest of a torn record instead.
    r = LogReader([str(p)], follow=True)
    assert r.poll() == b"good 1\ngood 2\n" and r.idle
    with open(p, "ab") as f:
        f.write(b"nd\n")
    assert r.poll() == b"torn at the end\n"
    assert r.poll(final=True) == b"" and r.done


def test_fds_and_missing_files(tmp_path, three_seconds):
    p = str(three_seconds / "0.log")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert b"".join(read_logs([fd])) == b"a\nb\nc\nd\n"
        os.fstat(fd)  # still the caller's
    finally:
        os.close(fd)
    assert b"".join(read_logs([str(tmp_path / "gone.log.1"), p], tail_lines=1)) == b"d\n"
    assert b"".join(read_logs([])) == b""
    with pytest.raises(ValueError):
        LogReader([p], stream="stdin")


# --- follow --------------------------------------------------------------------

def test_follow_waits_for_file_and_tail_zero(tmp_path):
    path = str(tmp_path / "0.log")
    r = LogReader([path], follow=True)
    assert r.poll() == b"" and r.idle
    w = LogWriter(str(tmp_path), 0)
    write_lines(w, 0, 2)
    assert r.poll() == b"line 00000\nline 00001\n"
    r2 = LogReader(container_log_files(str(tmp_path), 0), follow=True, tail_lines=0)
    assert r2.poll() == b""
    write_lines(w, 2, 1)
    assert r2.poll() == b"line 00002\n"
    w.feed("stdout", b"unfinished", T0)
    w.close()
    assert r.poll(final=True) == b"line 00002\nunfinished" and r.done
    assert r2.poll(final=True) == b"unfinished"


def test_follow_across_rotations_deterministic(tmp_path):
    """Polls between writes: single rotations, several at once, a partial
    line cut by a rotation; nothing lost, nothing twice."""
    rec = len(b"2023-11-14T22:13:20Z stdout F line 00000\n")
    w = LogWriter(str(tmp_path), 0, max_size=5 * rec, max_files=50)
    r = LogReader(container_log_files(str(tmp_path), 0), follow=True, timestamps=False)
    got = []
    n = 0
    for step in range(40):
        k = step % 13   # 0..12 lines: sometimes none, sometimes two rotations
        write_lines(w, n, k, T0 + step)
        n += k
        if step % 5 == 0:
            w.feed("stdout", b"split ", T0 + step)
            write_lines(w, n, 7, T0 + step)   # ends the split line, rotates
            n += 7
        got.append(r.poll())
    w.close()
    got.append(r.poll(final=True))
    assert r.done
    out = b"".join(got).replace(b"split line", b"line")
    assert out == b"".join(b"line %05d\n" % i for i in range(n))
    assert w.rotations > 20


def test_follow_many_rotations_within_a_second_with_removal(tmp_path):
    """Several rotations in one second while old files are removed (a
    fast writer, the default max_files): a removed name's sequence number
    must not be given to a newer file, else it sorts as the oldest, the
    writer removes it and a follower reads files twice.  (Seen as extra
    bytes from `logs -f` in bench/nodeapi.py.)"""
    rec = len(b"2023-11-14T22:13:20Z stdout F line 00000\n")
    w = LogWriter(str(tmp_path), 0, max_size=3 * rec, max_files=3)
    r = LogReader(container_log_files(str(tmp_path), 0), follow=True)
    got = []
    for i in range(60):
        write_lines(w, i, 1, T0)            # all within one second
        got.append(r.poll())
    # Rotated names still sort in the order they were made.
    files = container_log_files(str(tmp_path), 0)
    assert [os.path.getsize(p) // rec for p in files] == [3, 3, 3]
    assert logs(tmp_path) == b"".join(b"line %05d\n" % i for i in range(51, 60))
    w.close()
    got.append(r.poll(final=True))
    assert b"".join(got) == b"".join(b"line %05d\n" % i for i in range(60))


def test_follow_across_rotation_threaded(tmp_path):
    """A writer thread rotating every few hundred lines, a follower in
    read_logs: every line once, in order."""
    n_lines = 30000
    w = LogWriter(str(tmp_path), 0, max_size=16 * KIB, max_files=1000)
    stop = threading.Event()
    files = container_log_files(str(tmp_path), 0)

    def writer():
        i = 0
        while i < n_lines:
            k = min(random.randrange(1, 300), n_lines - i)
            w.feed("stdout", b"".join(b"%d\n" % j for j in range(i, i + k)))
            i += k
            if random.random() < 0.3:
                time.sleep(0.001)
        w.close()
        stop.set()

    t = threading.Thread(target=writer)
    t.start()
    out = b"".join(read_logs(files, follow=True, stop=stop, poll_interval=0.002))
    t.join()
    assert w.rotations > 20
    assert out == b"".join(b"%d\n" % j for j in range(n_lines))


def test_follow_stop_callable_and_generator_close(tmp_path):
    w = LogWriter(str(tmp_path), 0)
    write_lines(w, 0, 1)
    done = []
    gen = read_logs(container_log_files(str(tmp_path), 0), follow=True,
                    stop=lambda: bool(done), poll_interval=0.01)
    assert next(gen) == b"line 00000\n"
    write_lines(w, 1, 1)
    assert next(gen) == b"line 00001\n"
    done.append(1)
    assert list(gen) == []
    gen = read_logs(container_log_files(str(tmp_path), 0), follow=True, poll_interval=0.01)
    assert next(gen) == b"line 00000\nline 00001\n"
    gen.close()   # a client gone
    w.close()


# --- throughput ----------------------------------------------------------------

def test_throughput(tmp_path, capsys):
    """Prints MiB/s of the writer and reader next to a plain copy; the
    floor asserted is far below what this machine does, to catch only an
    accidental per-line syscall or quadratic loop."""
    line = b"2023-11-14 level=info msg=\"request served\" path=/api/v1/items status=200\n"
    chunk = line * (65536 // len(line))
    total = 64 << 20
    src = tmp_path / "src"
    src.write_bytes(chunk * (total // len(chunk)))
    size = src.stat().st_size

    t = time.perf_counter()
    with open(src, "rb") as f, open(tmp_path / "copy", "wb") as g:
        while b := f.read(65536):
            g.write(b)
    base = size / (time.perf_counter() - t) / 2**20

    t = time.perf_counter()
    w = LogWriter(str(tmp_path / "logs"), 0, max_size=1 << 40)
    with open(src, "rb") as f:
        while b := f.read(65536):
            w.feed("stdout", b)
    w.close()
    wr = size / (time.perf_counter() - t) / 2**20

    t = time.perf_counter()
    n = 0
    for b in read_logs([w.path]):
        n += len(b)
    rd = size / (time.perf_counter() - t) / 2**20
    assert n == size

    t = time.perf_counter()
    for b in read_logs([w.path], timestamps=True):
        pass
    rdt = size / (time.perf_counter() - t) / 2**20
    with capsys.disabled():
        print(f"\ncrilog: copy {base:.0f} MiB/s; writer {wr:.0f} MiB/s ({wr / base:.2f}x); "
              f"reader {rd:.0f} MiB/s ({rd / base:.2f}x); reader+timestamps {rdt:.0f} MiB/s")
    assert wr > 20 and rd > 20
