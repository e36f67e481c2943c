"""Tests for pufflet.config: the grammar of pufflet.conf(5)."""

import dataclasses
import socket
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from pufflet import config
from pufflet.config import ConfigError, HostPath, PodNetwork, Taint, Threshold
from pufflet.conflex import lex

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pufflet.conf"


def errors(text, name="<string>"):
    """The (file, line, message) errors of text; fail if it parses."""
    with pytest.raises(ConfigError) as e:
        config.parse(text, name)
    return e.value.errors


def error(text):
    """The (line, message) of the single error in text."""
    errs = errors(text)
    assert len(errs) == 1, errs
    assert errs[0][0] == "<string>"
    return errs[0][1], errs[0][2]


def check(text, line, fragment):
    n, msg = error(text)
    assert n == line, msg
    assert fragment in msg


# --- defaults and the API ---------------------------------------------------

def test_defaults():
    c = config.parse("")
    assert c.path == "<string>"
    assert c.node_name == socket.gethostname().lower()
    assert c.kubeconfig is None and c.bootstrap_kubeconfig is None
    assert c.user == "_pufflet"
    assert c.state_dir == "/var/db/pufflet"
    assert c.log_dir == "/var/log/pufflet"
    assert (c.pod_uid_min, c.pod_uid_max) == (100000, 165535)
    assert c.max_pods == 110
    assert c.pod_network == PodNetwork(None, None)
    assert (c.listen_address, c.listen_port) == ("0.0.0.0", 10250)
    assert c.tls_cert is None and c.tls_key is None
    assert c.static_pod_dir is None
    assert c.labels == ()
    assert c.taints == (Taint("pufflet.io/openbsd", "true", "NoSchedule"),)
    assert c.hostpaths == ()


def test_default_function():
    d = config.default()
    assert d.path == ""
    assert d == dataclasses.replace(config.parse(""), path="")


def test_bad_hostname_needs_node_name(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "bad_host")
    errs = errors("max pods 5\n")
    assert errs == [("<string>", 0, "host name 'bad_host' is not a valid "
                     "node name; set one with 'node name'")]
    # a node name makes the host name irrelevant
    assert config.parse("node name n1\n").node_name == "n1"


def test_hostname_lowercased(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "Node1.Example.COM")
    assert config.parse("").node_name == "node1.example.com"


def test_frozen():
    c = config.parse('node label "a=b"\nhostpath /srv\n')
    for obj, field in ((c, "max_pods"), (c.pod_network, "cidr"),
                       (c.taints[0], "key"), (c.hostpaths[0], "writable")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, field, None)
    assert isinstance(c.labels, tuple) and isinstance(c.labels[0], tuple)
    hash(c)     # usable as a dict key, so comparable across reloads


def test_config_error_str():
    e = ConfigError([("a.conf", 3, "one"), ("b.conf", 0, "two")])
    assert str(e) == "a.conf:3: one\nb.conf:0: two"
    assert e.errors == [("a.conf", 3, "one"), ("b.conf", 0, "two")]


def test_load(tmp_path):
    f = tmp_path / "pufflet.conf"
    f.write_text("max pods 7\n")
    c = config.load(str(f))
    assert c.path == str(f) and c.max_pods == 7


def test_load_errors_name_the_file(tmp_path):
    f = tmp_path / "pufflet.conf"
    f.write_text("\nbogus\n")
    with pytest.raises(ConfigError) as e:
        config.load(str(f))
    assert str(e.value) == f"{f}:2: unknown keyword 'bogus'"


def test_load_missing(tmp_path):
    f = tmp_path / "nope.conf"
    with pytest.raises(ConfigError) as e:
        config.load(str(f))
    assert e.value.errors == [(str(f), 0,
                               "cannot read: No such file or directory")]


def test_load_not_utf8(tmp_path):
    f = tmp_path / "bin.conf"
    f.write_bytes(b"user \xff\n")
    with pytest.raises(ConfigError) as e:
        config.load(str(f))
    assert e.value.errors[0][:2] == (str(f), 0)
    assert "cannot read" in e.value.errors[0][2]


# --- lexing -----------------------------------------------------------------

def test_comments():
    c = config.parse("# a comment\n\n  max pods 5 # trailing\n#user root\n")
    assert c.max_pods == 5 and c.user == "_pufflet"


def test_hash_inside_quotes_is_not_a_comment():
    c = config.parse('node label "a=b" # x\nstate directory "/var/#db"\n')
    assert c.state_dir == "/var/#db"


def test_continuation():
    c = config.parse("pod uid range \\\n  2000 \\\n  3000\nmax pods 9\n")
    assert (c.pod_uid_min, c.pod_uid_max, c.max_pods) == (2000, 3000, 9)


def test_continuation_keeps_line_numbers():
    # errors name the line a statement starts on
    check("max \\\npods \\\n 0\n", 1, "out of range")
    check("max pods 5\npod uid range \\\n 1000\n", 2, "needs two numbers")
    # the line after a continued statement has its own number
    check("max pods \\\n 5\nbogus\n", 3, "unknown keyword 'bogus'")


def test_continuation_with_trailing_blanks():
    assert config.parse("max pods \\  \n 5\n").max_pods == 5


def test_continuation_inside_comment_and_string():
    # as in pf.conf, a comment ending in a backslash goes on
    assert config.parse("# note \\\nmax pods 3\n").max_pods == 110
    c = config.parse('state directory "/var/\\\ndb"\nmax pods 4\n')
    assert c.state_dir == "/var/db" and c.max_pods == 4


def test_continuation_at_end_of_file():
    assert config.parse("max pods 6 \\").max_pods == 6


def test_escapes():
    toks = lex(r'a "q\"uote" "back\\slash" "tab	x"')[0].tokens
    assert [t.text for t in toks] == ["a", 'q"uote', "back\\slash", "tab\tx"]
    assert [t.quoted for t in toks] == [False, True, True, True]
    c = config.parse('state directory "/a\\"b\\\\c"\n')
    assert c.state_dir == '/a"b\\c'


def test_empty_string():
    check('user ""\n', 1, "invalid user name ''")


def test_invalid_escape():
    check('max pods 3\nstate directory "/a\\nb"\n', 2,
          "invalid escape '\\n' in quoted string")


def test_unterminated_string():
    errs = errors('max pods 3\nuser "_pufflet\nbogus\n')
    assert errs == [("<string>", 2, "unterminated quoted string"),
                    ("<string>", 3, "unknown keyword 'bogus'")]


def test_unterminated_string_at_eof():
    check('max pods 3\nuser "abc', 2, "unterminated quoted string")
    check('user "abc\\', 1, "unterminated quoted string")


def test_unterminated_string_reports_its_first_line():
    check('max pods 3\nuser "a\\\nb\\\nc\n', 2, "unterminated quoted string")


def test_stray_backslash():
    check("max pods 3\nuser a\\b\n", 2, "stray backslash")


def test_quote_glued_to_word():
    check('user "a"b\n', 1, "expected white space after quoted string")


def test_crlf():
    assert config.parse("max pods 8\r\nuser x\r\n").user == "x"


def test_lex_statement_lines():
    sts = lex('\n a b\n\n"c" \\\nd\n')
    assert [(s.line, [t.text for t in s.tokens]) for s in sts] == [
        (2, ["a", "b"]), (4, ["c", "d"])]
    assert [t.line for t in sts[1].tokens] == [4, 5]


def test_quoted_keywords_are_strings():
    check('"max" pods 4\n', 1, "unknown keyword 'max'")
    check('max "pods" 4\n', 1, "expected 'pods' after 'max', got 'pods'")


# --- macros -----------------------------------------------------------------

def test_macro_definition_and_use():
    c = config.parse('dir = "/srv/pufflet"\nn = 42\n'
                     "state directory $dir\nmax pods $n\n")
    assert c.state_dir == "/srv/pufflet" and c.max_pods == 42


def test_macro_forms_without_blanks():
    c = config.parse('a="/x"\nb= "/y"\nc =/z\nd=5\n'
                     "state directory $a\nlog directory $b\n"
                     "static pods $c\nmax pods $d\n")
    assert (c.state_dir, c.log_dir, c.static_pod_dir, c.max_pods) == (
        "/x", "/y", "/z", 5)


def test_macro_from_macro():
    c = config.parse('a = "/x"\nb = $a\nstate directory $b\n')
    assert c.state_dir == "/x"


def test_macro_value_with_blanks_is_one_word():
    # a macro is one word, never split again as in pf
    check('a = "5 6"\nmax pods $a\n', 2, "'5 6' is not a number")


def test_macro_can_name_a_keyword_argument():
    c = config.parse('mode = read-write\nhostpath /srv $mode\n')
    assert c.hostpaths == (HostPath("/srv", True),)


def test_macro_not_expanded_in_quotes():
    check('d = "/x"\nstate directory "$d"\n', 2,
          "path '$d' is not absolute")
    c = config.parse('d = "/x"\nstate directory "/$d"\n')
    assert c.state_dir == "/$d"


def test_macro_dollar_inside_word_is_literal():
    c = config.parse("state directory /var/$x\n")
    assert c.state_dir == "/var/$x"


def test_macro_undefined():
    check("max pods $n\n", 1, "macro 'n' not defined")


def test_macro_used_before_definition():
    errs = errors("max pods $n\nn = 4\n")
    assert errs == [("<string>", 1, "macro 'n' not defined")]


def test_macro_undefined_in_definition():
    check("a = $b\n", 1, "macro 'b' not defined")


def test_macro_invalid_reference():
    check("max pods $1x\n", 1, "invalid macro reference '$1x'")
    check("max pods $\n", 1, "invalid macro reference '$'")
    check("max pods $-1\n", 1, "invalid macro reference '$-1'")


def test_macro_prefix_of_word():
    # as in pf, $name may start a longer word
    c = config.parse('etc = "/etc/pufflet"\nkubeconfig $etc/kubeconfig\n'
                     'v = x\nuser $v-y\n')
    assert c.kubeconfig == "/etc/pufflet/kubeconfig"
    assert c.user == "x-y"
    check("max pods $n0\n", 1, "macro 'n0' not defined")


def test_macro_redefined():
    errs = errors('a = "1"\nmax pods 3\na = "2"\n')
    assert errs == [("<string>", 3, "macro a redefined")]


def test_macro_redefined_keeps_first_value():
    errs = errors("a = 3\na = 4\nmax pods $a\nmax pods 0\n")
    assert errs[0] == ("<string>", 2, "macro a redefined")
    assert errs[1][1] == 4 and "duplicate 'max pods'" in errs[1][2]


def test_macro_name_is_keyword():
    check('node = "x"\n', 1, "macro name 'node' is a keyword")
    check('pods = 3\n', 1, "macro name 'pods' is a keyword")
    check('egress = em0\n', 1, "macro name 'egress' is a keyword")
    check('none = x\n', 1, "macro name 'none' is a keyword")


def test_macro_invalid_name():
    check('1a = "x"\n', 1, "invalid macro name '1a'")
    check('a-b = "x"\n', 1, "invalid macro name 'a-b'")


def test_macro_needs_one_value():
    check("a =\n", 1, "macro 'a' needs one value")
    check("a = b c\n", 1, "macro 'a' needs one value, quote it")


def test_macros_cross_includes(tmp_path):
    (tmp_path / "m.conf").write_text("n = 12\n")
    f = tmp_path / "main.conf"
    f.write_text('include "m.conf"\nmax pods $n\n')
    assert config.load(str(f)).max_pods == 12


# --- includes ---------------------------------------------------------------

def test_include_relative_to_including_file(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.conf").write_text("max pods 5\n")
    (sub / "a.conf").write_text('include "b.conf"\n')
    f = tmp_path / "main.conf"
    f.write_text('include "sub/a.conf"\nuser _x\n')
    c = config.load(str(f))
    assert c.max_pods == 5 and c.user == "_x"


def test_include_absolute(tmp_path):
    inc = tmp_path / "inc.conf"
    inc.write_text("max pods 5\n")
    assert config.parse(f'include "{inc}"\n').max_pods == 5


def test_include_from_string_is_relative_to_cwd(tmp_path, monkeypatch):
    (tmp_path / "inc.conf").write_text("max pods 6\n")
    monkeypatch.chdir(tmp_path)
    assert config.parse('include "inc.conf"\n').max_pods == 6


def test_include_errors_name_the_included_file(tmp_path):
    (tmp_path / "inc.conf").write_text("\n\nbogus\n")
    f = tmp_path / "main.conf"
    f.write_text('\ninclude "inc.conf"\nfoo\n')
    with pytest.raises(ConfigError) as e:
        config.load(str(f))
    assert e.value.errors == [
        (str(tmp_path / "inc.conf"), 3, "unknown keyword 'bogus'"),
        (str(f), 3, "unknown keyword 'foo'")]


def test_include_missing(tmp_path):
    f = tmp_path / "main.conf"
    f.write_text('max pods 3\ninclude "nope.conf"\nmax pods 4\n')
    with pytest.raises(ConfigError) as e:
        config.load(str(f))
    errs = e.value.errors
    assert errs[0] == (str(f), 2, f"cannot read '{tmp_path / 'nope.conf'}'"
                       ": No such file or directory")
    assert errs[1][:2] == (str(f), 3)      # parsing went on


def test_include_directory(tmp_path):
    f = tmp_path / "main.conf"
    f.write_text('include "."\n')
    with pytest.raises(ConfigError) as e:
        config.load(str(f))
    assert e.value.errors[0][:2] == (str(f), 1)
    assert "cannot read" in e.value.errors[0][2]


def test_include_self(tmp_path):
    f = tmp_path / "main.conf"
    f.write_text('max pods 3\ninclude "main.conf"\n')
    with pytest.raises(ConfigError) as e:
        config.load(str(f))
    assert e.value.errors == [(str(f), 2, f"include loop: '{f}' is "
                               "already being read")]


def test_include_loop(tmp_path):
    a, b = tmp_path / "a.conf", tmp_path / "b.conf"
    a.write_text('include "b.conf"\n')
    b.write_text('\ninclude "a.conf"\n')
    with pytest.raises(ConfigError) as e:
        config.load(str(a))
    assert e.value.errors == [(str(b), 2, f"include loop: '{a}' is "
                               "already being read")]


def test_include_loop_through_symlink(tmp_path):
    a = tmp_path / "a.conf"
    a.write_text('include "link.conf"\n')
    (tmp_path / "link.conf").symlink_to(a)
    with pytest.raises(ConfigError) as e:
        config.load(str(a))
    assert "include loop" in e.value.errors[0][2]


def test_include_same_file_twice_is_not_a_loop(tmp_path):
    (tmp_path / "l.conf").write_text('node label "a=b"\n')
    (tmp_path / "t.conf").write_text('node taint "x:NoExecute"\n')
    f = tmp_path / "main.conf"
    f.write_text('include "t.conf"\ninclude "l.conf"\n')
    assert config.load(str(f)).labels == (("a", "b"),)


def _chain(tmp_path, n):
    """main.conf includes 1.conf includes ... n.conf."""
    for i in range(n):
        (tmp_path / f"{i}.conf").write_text(f'include "{i + 1}.conf"\n')
    (tmp_path / f"{n}.conf").write_text("max pods 9\n")
    return tmp_path / "0.conf"


def test_include_depth_limit_ok(tmp_path):
    f = _chain(tmp_path, config.MAX_INCLUDE_DEPTH)
    assert config.load(str(f)).max_pods == 9


def test_include_depth_limit_exceeded(tmp_path):
    n = config.MAX_INCLUDE_DEPTH + 1
    f = _chain(tmp_path, n)
    with pytest.raises(ConfigError) as e:
        config.load(str(f))
    # the include that would open the 17th level is refused
    assert e.value.errors == [(str(tmp_path / f"{n - 1}.conf"), 1,
                               "includes nested too deep (at most 16)")]


def test_include_arguments():
    check("include\n", 1, "'include' needs a file name")
    check('include "a" "b"\n', 1, "unexpected 'b' at end of 'include'")


# --- statement dispatch -----------------------------------------------------

def test_unknown_keyword():
    check("max pods 3\nfoo bar\n", 2, "unknown keyword 'foo'")


def test_incomplete_keyword():
    check("node\n", 1, "expected 'address', 'api', 'label', 'lease', 'name', "
                       "'status' or 'taint' after 'node'")
    check("node foo x\n", 1, "after 'node', got 'foo'")
    check("pod uid x\n", 1, "expected 'range' after 'pod uid', got 'x'")
    check("pod\n", 1, "expected 'network', 'routes' or 'uid' after 'pod'")


def test_trailing_tokens():
    check("max pods 3 4\n", 1, "unexpected '4' at end of 'max pods'")
    check("user a b\n", 1, "unexpected 'b' at end of 'user'")


@pytest.mark.parametrize("name,args", [
    ("node name", "a"), ("kubeconfig", "/a"), ("bootstrap kubeconfig", "/a"),
    ("user", "a"), ("state directory", "/a"), ("log directory", "/a"),
    ("pod uid range", "2000 3000"), ("max pods", "3"),
    ("pod network", "from node"), ("listen on", "*"), ("static pods", "/a")])
def test_duplicate_singletons(name, args):
    errs = errors(f"{name} {args}\n# x\n\n{name} {args}\n")
    assert errs == [("<string>", 4, f"duplicate '{name}' statement "
                     "(first at <string>:1)")]


@pytest.mark.parametrize("name,other", [
    ("tls certificate", "tls key"), ("tls key", "tls certificate")])
def test_duplicate_tls(name, other):
    errs = errors(f"{name} /a\n# x\n\n{name} /b\n{other} /c\n")
    assert errs == [("<string>", 4, f"duplicate '{name}' statement "
                     "(first at <string>:1)")]


def test_duplicate_across_files(tmp_path):
    (tmp_path / "inc.conf").write_text("max pods 4\n")
    f = tmp_path / "main.conf"
    f.write_text('max pods 3\ninclude "inc.conf"\n')
    with pytest.raises(ConfigError) as e:
        config.load(str(f))
    assert e.value.errors == [(str(tmp_path / "inc.conf"), 1,
                               f"duplicate 'max pods' statement "
                               f"(first at {f}:1)")]


def test_all_errors_collected():
    text = """\
bogus
max pods 0
user root
a = $undefined
node label "noequals"
"unterminated
hostpath /
max pods 5
pod uid range 1000 1001
tls key /k
"""
    assert errors(text) == [
        ("<string>", 1, "unknown keyword 'bogus'"),
        ("<string>", 2, "'max pods': 0 is out of range 1-10000"),
        ("<string>", 3, "user must not be root"),
        ("<string>", 4, "macro 'undefined' not defined"),
        ("<string>", 5, "label 'noequals' is not key=value"),
        ("<string>", 6, "unterminated quoted string"),
        ("<string>", 7, "hostpath / would expose the whole host"),
        ("<string>", 8, "duplicate 'max pods' statement "
                        "(first at <string>:2)"),
        ("<string>", 9, "pod uid range 1000-1001 holds 2 uids, fewer "
                        "than max pods 110"),
        ("<string>", 10, "'tls key' given without 'tls certificate'"),
    ]


# --- node address, reservations, pressure, heartbeat intervals --------------

def test_node_status_defaults():
    c = config.parse("")
    assert c.node_address is None
    assert (c.reserved_cpu_millis, c.reserved_memory, c.reserved_storage) == (0, 0, 0)
    # the kubelet's evictionHard defaults, and 5% of pids
    assert c.pressure_memory == Threshold(100 << 20, None)
    assert c.pressure_disk == Threshold(None, 10.0)
    assert c.pressure_inodes == Threshold(None, 5.0)
    assert c.pressure_pids == Threshold(None, 5.0)
    assert (c.status_interval, c.status_report, c.lease_duration) == (10.0, 300.0, 40)


def test_node_status_statements():
    c = config.parse("""\
node address 192.0.2.7
reserve cpu 250m
reserve memory 256M
reserve storage 1G
pressure memory 5%
pressure disk 2T
pressure inodes 1000
pressure pids 2.5%
node status interval 0.2
node status report 1.5
node lease duration 2
""")
    assert c.node_address == "192.0.2.7"
    assert c.reserved_cpu_millis == 250
    assert c.reserved_memory == 256 << 20 and c.reserved_storage == 1 << 30
    assert c.pressure_memory == Threshold(None, 5.0)
    assert c.pressure_disk == Threshold(2 << 40, None)
    assert c.pressure_inodes == Threshold(1000, None)
    assert c.pressure_pids == Threshold(None, 2.5)
    assert (c.status_interval, c.status_report, c.lease_duration) == (0.2, 1.5, 2)


@pytest.mark.parametrize("text,want", [
    ("reserve cpu 2", 2000), ("reserve cpu 0", 0), ("reserve cpu 1500m", 1500)])
def test_reserve_cpu(text, want):
    assert config.parse(text + "\n").reserved_cpu_millis == want


@pytest.mark.parametrize("text,want", [
    ("reserve memory 1024", 1024), ("reserve memory 3K", 3072),
    ("reserve storage 1T", 1 << 40), ("reserve storage 0", 0)])
def test_reserve_sizes(text, want):
    c = config.parse(text + "\n")
    assert want in (c.reserved_memory, c.reserved_storage)


def test_node_address_ipv6_normalised():
    assert config.parse("node address 2001:DB8::0:1\n").node_address == "2001:db8::1"


def test_threshold_of():
    assert Threshold(None, 10.0).of(1000) == 100
    assert Threshold(42, None).of(1000) == 42


@pytest.mark.parametrize("text,fragment", [
    ("node address", "'node address' needs an IP address"),
    ("node address host.example", "invalid node address 'host.example'"),
    ("node address 0.0.0.0", "node address 0.0.0.0 cannot reach this node"),
    ("node address 224.0.0.1", "cannot reach this node"),
    ("reserve cpu 0.5", "'reserve cpu': '0.5' is not cores (2) or millicores (500m)"),
    ("reserve cpu m", "is not cores"),
    ("reserve cpu", "'reserve cpu' needs cores or millicores"),
    ("reserve memory 1Gi", "'reserve memory': '1Gi' is not a size"),
    ("reserve memory 10%", "'reserve memory': '10%' is not a size"),
    ("reserve storage -1", "'reserve storage': '-1' is not a size"),
    ("reserve storage", "'reserve storage' needs a size"),
    ("pressure memory 100%", "'pressure memory': 100% is out of range 0%-99%"),
    ("pressure memory x%", "'pressure memory': 'x%' is not a percentage"),
    ("pressure memory 1P", "'pressure memory': '1P' is not a size or a percentage"),
    ("pressure disk", "'pressure disk' needs a size or a percentage"),
    ("pressure inodes 1K", "'pressure inodes': '1K' is not a count or a percentage"),
    ("pressure pids 5% 6%", "unexpected '6%' at end of 'pressure pids'"),
    ("node status interval 0", "'node status interval': 0 is out of range 0.1-3600"),
    ("node status interval 1e3", "'1e3' is not a number of seconds"),
    ("node status interval .5", "'.5' is not a number of seconds"),
    ("node status report 100000", "out of range 0.1-86400"),
    ("node lease duration 0.5", "'node lease duration': '0.5' is not a number"),
    ("node lease duration 0", "'node lease duration': 0 is out of range 1-3600"),
    ("node lease", "expected 'duration' after 'node lease'"),
    ("node status", "expected 'interval' or 'report' after 'node status'"),
])
def test_node_status_errors(text, fragment):
    check("# line 1\n" + text + "\n", 2, fragment)


def test_status_report_shorter_than_interval():
    assert errors("node status interval 20\n\nnode status report 5\n") == [
        ("<string>", 3, "node status report 5 is shorter than node status "
                        "interval 20")]
    # the default interval (10 s) counts too
    assert errors("node status report 2\n") == [
        ("<string>", 1, "node status report 2 is shorter than node status "
                        "interval 10")]
    assert errors("node status interval 400\n") == [
        ("<string>", 1, "node status report 300 is shorter than node status "
                        "interval 400")]


@pytest.mark.parametrize("name,args", [
    ("node address", "10.0.0.1"), ("reserve cpu", "1"), ("reserve memory", "1M"),
    ("reserve storage", "1G"), ("pressure memory", "1M"), ("pressure disk", "1%"),
    ("pressure inodes", "1%"), ("pressure pids", "1%"),
    ("node status interval", "1"), ("node status report", "400"),
    ("node lease duration", "4")])
def test_duplicate_node_status_statements(name, args):
    errs = errors(f"{name} {args}\n{name} {args}\n")
    assert errs == [("<string>", 2, f"duplicate '{name}' statement "
                     "(first at <string>:1)")]


# --- node name, labels, taints ----------------------------------------------

def test_node_name():
    assert config.parse("node name node-1.example.com\n").node_name == \
        "node-1.example.com"
    assert config.parse('node name "a"\n').node_name == "a"
    assert config.parse("node name " + "a" * 253 + "\n").node_name


@pytest.mark.parametrize("bad", ["Node1", "-a", "a-", "a..b", "a_b",
                                 ".a", "a.", "a" * 254, '""'])
def test_node_name_invalid(bad):
    check(f"node name {bad}\n", 1, "invalid node name")


def test_node_name_missing():
    check("node name\n", 1, "'node name' needs a name")


def test_node_labels():
    c = config.parse('node label "example.com/rack=r12"\n'
                     "node label node-role.kubernetes.io/worker=\n"
                     'node label "a=B_c.d-E"\n')
    assert c.labels == (("example.com/rack", "r12"),
                        ("node-role.kubernetes.io/worker", ""),
                        ("a", "B_c.d-E"))


def test_node_label_value_with_equals_is_invalid():
    check('node label "a=b=c"\n', 1, "invalid label value 'b=c'")


@pytest.mark.parametrize("key", [
    "", "/a", "Example.com/a", "a/b/c", "-a", "a-", "a" * 64,
    "x/" + "a" * 64, "a" * 254 + "/b", "a b"])
def test_node_label_invalid_key(key):
    check(f'node label "{key}=v"\n', 1, f"invalid label key '{key}'")


@pytest.mark.parametrize("value", ["-a", "a-", "a" * 64, "a/b", "a b"])
def test_node_label_invalid_value(value):
    check(f'node label "k={value}"\n', 1, f"invalid label value '{value}'")


def test_node_label_long_ok():
    k = "a" * 253 + "/" + "b" * 63
    c = config.parse(f'node label "{k}={"c" * 63}"\n')
    assert c.labels == ((k, "c" * 63),)


def test_node_label_not_key_value():
    check("node label foo\n", 1, "label 'foo' is not key=value")


def test_node_label_missing():
    check("node label\n", 1, "'node label' needs key=value")


@pytest.mark.parametrize("key", ["kubernetes.io/os", "kubernetes.io/arch",
                                 "kubernetes.io/hostname"])
def test_node_label_reserved(key):
    check(f"node label {key}=x\n", 1, f"label '{key}' is set by pufflet")


def test_node_label_other_kubernetes_io_allowed():
    c = config.parse("node label node-role.kubernetes.io/edge=\n"
                     "node label topology.kubernetes.io/zone=z1\n")
    assert len(c.labels) == 2


def test_node_label_duplicate():
    check("node label a=1\n\nnode label a=2\n", 3,
          "duplicate label 'a' (first at <string>:1)")


def test_node_taints():
    c = config.parse('node taint "a=b:NoSchedule"\n'
                     "node taint example.com/c:PreferNoSchedule\n"
                     "node taint a:NoExecute\n"
                     "node taint d=:NoSchedule\n")
    assert c.taints == (Taint("a", "b", "NoSchedule"),
                        Taint("example.com/c", "", "PreferNoSchedule"),
                        Taint("a", "", "NoExecute"),
                        Taint("d", "", "NoSchedule"))


def test_node_taint_replaces_default():
    c = config.parse("node taint x:NoExecute\n")
    assert c.taints == (Taint("x", "", "NoExecute"),)


def test_node_taint_none():
    assert config.parse("node taint none\n").taints == ()


def test_node_taint_quoted_none_is_a_taint():
    check('node taint "none"\n', 1, "taint 'none' is not key[=value]:effect")


def test_node_taint_none_then_taint():
    check("node taint none\nnode taint a:NoSchedule\n", 2,
          "taint cannot be combined with 'node taint none' "
          "(at <string>:1)")


def test_node_taint_taint_then_none():
    check("node taint a:NoSchedule\nnode taint none\n", 2,
          "'node taint none' cannot be combined with other taints")


def test_node_taint_none_twice():
    check("node taint none\nnode taint none\n", 2,
          "duplicate 'node taint none' (first at <string>:1)")


def test_node_taint_none_extra():
    check("node taint none a:NoSchedule\n", 1,
          "unexpected 'a:NoSchedule' at end of 'node taint'")


def test_node_taint_duplicate():
    check("node taint a=1:NoSchedule\nnode taint a=2:NoSchedule\n", 2,
          "duplicate taint 'a' with effect NoSchedule (first at <string>:1)")


@pytest.mark.parametrize("taint,fragment", [
    ("a", "taint 'a' is not key[=value]:effect"),
    ("a=b", "taint 'a=b' is not key[=value]:effect"),
    ("a:noschedule", "invalid taint effect 'noschedule': expected "
                     "'NoSchedule', 'PreferNoSchedule' or 'NoExecute'"),
    ("a:", "invalid taint effect ''"),
    (":NoSchedule", "invalid taint key ''"),
    ("A_/b:NoSchedule", "invalid taint key 'A_/b'"),
    ("a=-b:NoSchedule", "invalid taint value '-b'"),
    ("a=b:c:NoSchedule", "invalid taint value 'b:c'"),
])
def test_node_taint_invalid(taint, fragment):
    check(f'node taint "{taint}"\n', 1, fragment)


def test_node_taint_missing():
    check("node taint\n", 1, "'node taint' needs key[=value]:effect")


# --- credentials, user, directories -----------------------------------------

def test_kubeconfig():
    c = config.parse('kubeconfig "/etc/pufflet/kubeconfig"\n'
                     "bootstrap kubeconfig /etc/pufflet/bootstrap\n")
    assert c.kubeconfig == "/etc/pufflet/kubeconfig"
    assert c.bootstrap_kubeconfig == "/etc/pufflet/bootstrap"


@pytest.mark.parametrize("stmt", [
    "kubeconfig", "bootstrap kubeconfig", "state directory",
    "log directory", "tls certificate", "tls key", "static pods",
    "hostpath"])
def test_paths_must_be_absolute(stmt):
    check(f"{stmt} relative/path\n" + _TLS_PARTNER.get(stmt, ""), 1,
          f"'{stmt}': path 'relative/path' is not absolute")


@pytest.mark.parametrize("stmt", [
    "kubeconfig", "bootstrap kubeconfig", "state directory",
    "log directory", "tls certificate", "tls key", "static pods",
    "hostpath"])
def test_paths_missing(stmt):
    check(f"{stmt}\n" + _TLS_PARTNER.get(stmt, ""), 1,
          f"'{stmt}' needs an absolute path")


# tls certificate and tls key go together, else a second error
_TLS_PARTNER = {"tls certificate": "tls key /k\n",
                "tls key": "tls certificate /c\n"}


def test_user():
    assert config.parse("user _pufflet2\n").user == "_pufflet2"
    assert config.parse("user " + "a" * 32 + "\n").user == "a" * 32
    assert config.parse("user a.b-c\n").user == "a.b-c"


def test_user_root():
    check("user root\n", 1, "user must not be root")


@pytest.mark.parametrize("bad", ["a" * 33, "-a", ".a", "a b", "a/b", "é"])
def test_user_invalid(bad):
    check(f'user "{bad}"\n', 1, f"invalid user name '{bad}'")


def test_user_missing():
    check("user\n", 1, "'user' needs a user name")


def test_directories():
    c = config.parse("state directory /srv/db\nlog directory /srv/log\n"
                     'static pods "/etc/pufflet/manifests"\n')
    assert (c.state_dir, c.log_dir, c.static_pod_dir) == (
        "/srv/db", "/srv/log", "/etc/pufflet/manifests")


# --- pods -------------------------------------------------------------------

def test_pod_uid_range():
    c = config.parse("pod uid range 1000 2147483647\n")
    assert (c.pod_uid_min, c.pod_uid_max) == (1000, 2147483647)


@pytest.mark.parametrize("args,fragment", [
    ("999 5000", "999 is out of range 1000-2147483647"),
    ("1000 2147483648", "2147483648 is out of range 1000-2147483647"),
    ("1000 99999999999999999999999", "out of range 1000-2147483647"),
    ("3000 2000", "'pod uid range': 3000 is above 2000"),
    ("1000", "'pod uid range' needs two numbers"),
    ("", "'pod uid range' needs two numbers"),
    ("a 2000", "'pod uid range': 'a' is not a number"),
    ("-1 2000", "'-1' is not a number"),
    ("1000 2000 3000", "unexpected '3000' at end of 'pod uid range'"),
])
def test_pod_uid_range_invalid(args, fragment):
    check(f"pod uid range {args}\n", 1, fragment)


def test_pod_uid_range_too_small_for_max_pods():
    check("max pods 10\npod uid range 1000 1008\n", 2,
          "pod uid range 1000-1008 holds 9 uids, fewer than max pods 10")
    c = config.parse("max pods 10\npod uid range 1000 1009\n")
    assert (c.pod_uid_min, c.pod_uid_max) == (1000, 1009)


def test_default_pod_uid_range_too_small_for_max_pods():
    # the default range holds 65536 uids; max pods stops at 10000, so
    # only a range given here can be too small, reported on its line
    check("pod uid range 1000 1049\n\nmax pods 51\n", 1, "holds 50 uids")


def test_max_pods():
    assert config.parse("max pods 1\n").max_pods == 1
    assert config.parse("max pods 10000\n").max_pods == 10000


@pytest.mark.parametrize("arg,fragment", [
    ("0", "'max pods': 0 is out of range 1-10000"),
    ("10001", "'max pods': 10001 is out of range 1-10000"),
    ("0x10", "'0x10' is not a number"),
    ("1.5", "'1.5' is not a number"),
    ("٣", "'٣' is not a number"),
    ("", "'max pods' needs a number"),
])
def test_max_pods_invalid(arg, fragment):
    check(f"max pods {arg}\n", 1, fragment)


def test_pod_network():
    c = config.parse("pod network 10.88.0.0/16 egress em0\n")
    assert c.pod_network == PodNetwork("10.88.0.0/16", "em0")
    c = config.parse("pod network 10.88.0.0/30\n")
    assert c.pod_network == PodNetwork("10.88.0.0/30", None)
    c = config.parse("pod network fd00:0::/64 egress vlan.100\n")
    assert c.pod_network == PodNetwork("fd00::/64", "vlan.100")
    c = config.parse("pod network from node egress em0\n")
    assert c.pod_network == PodNetwork(None, "em0", from_node=True)
    assert config.parse("pod network from node\n").pod_network == \
        PodNetwork(None, None, from_node=True)


@pytest.mark.parametrize("args,fragment", [
    ("10.0.0.1/24", "invalid pod network: 10.0.0.1/24 has host bits set"),
    ("10.0.0.0/31", "pod network 10.0.0.0/31 is too small: the prefix "
                    "must be /30 or shorter"),
    ("10.0.0.1", "must be /30 or shorter"),
    ("fd00::/127", "must be /126 or shorter"),
    ("10.0.0.0/33", "invalid pod network"),
    ("bogus", "invalid pod network"),
    ("", "'pod network' needs a network or 'from node'"),
    ("from", "expected 'node' after 'pod network from'"),
    ("from nowhere", "expected 'node' after 'pod network from'"),
    ("10.0.0.0/8 egress", "'pod network' needs an interface name"),
    ("10.0.0.0/8 egress " + "a" * 16, "invalid interface name"),
    ("10.0.0.0/8 egress em/0", "invalid interface name 'em/0'"),
    ("10.0.0.0/8 em0", "unexpected 'em0' at end of 'pod network'"),
])
def test_pod_network_invalid(args, fragment):
    check(f"pod network {args}\n", 1, fragment)


# --- node API ---------------------------------------------------------------

def test_listen_on():
    c = config.parse("listen on 192.0.2.1 port 443\n")
    assert (c.listen_address, c.listen_port) == ("192.0.2.1", 443)
    c = config.parse('listen on "*"\n')
    assert (c.listen_address, c.listen_port) == ("0.0.0.0", 10250)
    c = config.parse("listen on 2001:DB8::1 port 1\n")
    assert (c.listen_address, c.listen_port) == ("2001:db8::1", 1)
    assert config.parse("listen on :: port 65535\n").listen_address == "::"


@pytest.mark.parametrize("args,fragment", [
    ("", "'listen on' needs an address or '*'"),
    ("localhost", "invalid listen address 'localhost'"),
    ("10.0.0.0/8", "invalid listen address"),
    ("* port", "'listen on' needs a port number"),
    ("* port 0", "'listen on': 0 is out of range 1-65535"),
    ("* port 65536", "65536 is out of range 1-65535"),
    ("* port http", "'http' is not a number"),
    ("* 10250", "unexpected '10250' at end of 'listen on'"),
])
def test_listen_on_invalid(args, fragment):
    check(f"listen on {args}\n", 1, fragment)


def test_tls():
    c = config.parse("tls certificate /etc/ssl/n.crt\n"
                     "tls key /etc/ssl/private/n.key\n")
    assert (c.tls_cert, c.tls_key) == ("/etc/ssl/n.crt",
                                       "/etc/ssl/private/n.key")


def test_tls_certificate_without_key():
    check("max pods 3\ntls certificate /c\n", 2,
          "'tls certificate' given without 'tls key'")


def test_tls_key_without_certificate():
    check("\n\ntls key /k\n", 3, "'tls key' given without 'tls certificate'")


# --- hostpath ---------------------------------------------------------------

def test_hostpath():
    c = config.parse("hostpath /srv\nhostpath /var/www read-only\n"
                     'hostpath "/var/spool/x y" read-write\n'
                     "hostpath /srv/a\n")
    assert c.hostpaths == (HostPath("/srv", False),
                           HostPath("/var/www", False),
                           HostPath("/var/spool/x y", True),
                           HostPath("/srv/a", False))


def test_hostpath_root():
    check('hostpath "/" read-only\n', 1,
          "hostpath / would expose the whole host")


@pytest.mark.parametrize("bad", ["/a/", "//a", "/a//b", "/a/../b", "/a/.",
                                 "/./a", "/..", "/a/.."])
def test_hostpath_not_normalised(bad):
    check(f"hostpath {bad}\n", 1, f"hostpath '{bad}' is not normalised")


def test_hostpath_duplicate():
    check("hostpath /srv\nhostpath /srv read-write\n", 2,
          "duplicate hostpath '/srv' (first at <string>:1)")


def test_hostpath_bad_mode():
    check("hostpath /srv rw\n", 1, "expected 'read-only' or 'read-write' "
          "after 'hostpath /srv', got 'rw'")
    check('hostpath /srv "read-write"\n', 1, "got 'read-write'")
    check("hostpath /srv read-only x\n", 1,
          "unexpected 'x' at end of 'hostpath'")


# --- everything at once, and the example ------------------------------------

def test_every_statement():
    c = config.parse("""\
# a full configuration
etc = "/etc/pufflet"
node name n1.example.com
node label "example.com/rack=r1"
node taint none
kubeconfig $etc/kubeconfig
bootstrap kubeconfig "/etc/pufflet/bootstrap"
user _kube
state directory /var/db/k
log directory /var/log/k
pod uid range 200000 200999
max pods 1000
pod network 10.88.0.0/16 egress em0
listen on 192.0.2.7 port 10251
tls certificate /etc/pufflet/n.crt
tls key /etc/pufflet/n.key
static pods /etc/pufflet/manifests
hostpath /var/www read-write
""", "full.conf")
    assert c == config.Config(
        path="full.conf", node_name="n1.example.com",
        kubeconfig="/etc/pufflet/kubeconfig",
        bootstrap_kubeconfig="/etc/pufflet/bootstrap", user="_kube",
        state_dir="/var/db/k", log_dir="/var/log/k", pod_uid_min=200000,
        pod_uid_max=200999, max_pods=1000,
        pod_network=PodNetwork("10.88.0.0/16", "em0"),
        listen_address="192.0.2.7", listen_port=10251,
        tls_cert="/etc/pufflet/n.crt", tls_key="/etc/pufflet/n.key",
        static_pod_dir="/etc/pufflet/manifests",
        labels=(("example.com/rack", "r1"),), taints=(),
        hostpaths=(HostPath("/var/www", True),))


def test_example_parses():
    c = config.load(str(EXAMPLE))
    assert c.kubeconfig is None         # standalone on a development box
    assert c.user == "_pufflet"
    assert c.state_dir == "/var/db/pufflet"
    assert c.log_dir == "/var/log/pufflet"
    # The README's run command puts the example static pod there.
    assert c.static_pod_dir == "/etc/pufflet/manifests"
    assert dataclasses.replace(c, path="", static_pod_dir=None) == config.default()


def test_example_commented_statements_parse(tmp_path):
    # the commented-out statements must be valid once uncommented
    (tmp_path / "local.conf").write_text("max pods 3\n")
    lines = [s[1:] for s in EXAMPLE.read_text().splitlines()
             if s.startswith("#") and s[1:2].isalpha()]
    assert "node taint none" in lines
    lines.remove("node taint none")     # conflicts with the active taint
    text = "\n".join(lines).replace("/etc/pufflet.d/local.conf",
                                    str(tmp_path / "local.conf"))
    c = config.parse(text)
    assert c.kubeconfig and c.bootstrap_kubeconfig and c.tls_cert
    assert c.pod_network.cidr and c.max_pods == 3
    assert len(c.labels) == 2 and len(c.hostpaths) == 2


def test_example_mentions_every_statement():
    text = EXAMPLE.read_text()
    for words in config._TABLE:
        assert " ".join(words) in text, words


# --- the manual -------------------------------------------------------------

MANUAL = EXAMPLE.parent.parent / "man" / "pufflet.conf.5"


def test_manual_example_parses():
    text = MANUAL.read_text()
    start = text.index(".Sh EXAMPLES")
    block = text[text.index(".Bd -literal", start):text.index(".Ed", start)]
    c = config.parse(block.split("\n", 1)[1])
    assert c.kubeconfig == "/etc/pufflet/kubeconfig"
    assert c.tls_key == "/etc/pufflet/private/pufflet.key"


def test_manual_mentions_every_statement():
    text = MANUAL.read_text()
    for words in config._TABLE:
        assert f".It Ic {' '.join(words)}" in text, words


# --- properties -------------------------------------------------------------

def _quote(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


@given(st.text(st.characters(blacklist_categories=("Cs",),
                             blacklist_characters="\n")))
def test_quoting_round_trips(s):
    sts = lex("x " + _quote(s) + "\n")
    assert len(sts) == 1 and sts[0].error is None
    assert [t.text for t in sts[0].tokens] == ["x", s]


@settings(max_examples=300)
@given(st.text(st.sampled_from(list('abnode pmx=$"\\#\n\t:/0123456789*'))))
def test_any_text_parses_or_raises_config_error(text):
    # no crash other than a ConfigError, whatever the input
    try:
        config.parse(text)
    except ConfigError as e:
        assert e.errors and all(isinstance(n, int) for _, n, _ in e.errors)


@given(st.integers(1, 10000), st.integers(1000, 2**31 - 1),
       st.integers(0, 200000))
def test_uid_range_rule(maxpods, lo, width):
    hi = min(lo + width, 2**31 - 1)
    text = f"max pods {maxpods}\npod uid range {lo} {hi}\n"
    if hi - lo + 1 >= maxpods:
        c = config.parse(text)
        assert (c.max_pods, c.pod_uid_min, c.pod_uid_max) == (maxpods, lo, hi)
    else:
        assert error(text)[0] == 2


# --- registries ---------------------------------------------------------------

def test_registry_defaults():
    c = config.parse("node name n")
    assert c.registry_credentials is None
    assert c.insecure_registries == ()


def test_registry_statements():
    c = config.parse('node name n\nregistry credentials "/etc/pufflet/registries.json"\n'
                     'insecure registry "127.0.0.1:5000"\ninsecure registry Reg.LAN\n'
                     'insecure registry "[::1]:5000"\n')
    assert c.registry_credentials == "/etc/pufflet/registries.json"
    assert c.insecure_registries == ("127.0.0.1:5000", "reg.lan", "[::1]:5000")


@pytest.mark.parametrize("text,line,fragment", [
    ("node name n\nregistry credentials rel.json", 2, "is not absolute"),
    ("node name n\nregistry credentials", 2, "needs an absolute path"),
    ("registry credentials /a\nregistry credentials /b", 2,
     "duplicate 'registry credentials' statement (first at <string>:1)"),
    ("node name n\ninsecure registry", 2, "needs a registry host[:port]"),
    ("node name n\n\ninsecure registry \"http://r:5000\"", 3, "no scheme, no path"),
    ("node name n\ninsecure registry r:5000/path", 2, "no scheme, no path"),
    ("node name n\ninsecure registry r:0", 2, "port out of range"),
    ("node name n\ninsecure registry r:70000", 2, "port out of range"),
    ("node name n\ninsecure registry r\ninsecure registry R", 3,
     "duplicate insecure registry 'R'"),
    ("node name n\ninsecure registry r extra", 2, "unexpected 'extra'"),
    ("node name n\ninsecure", 2, "expected 'registry' after 'insecure'"),
])
def test_registry_errors(text, line, fragment):
    check(text, line, fragment)


def test_image_gc():
    c = config.parse("node name n\nimage gc high 90 low 60\n")
    assert (c.image_gc_high, c.image_gc_low) == (90, 60)
    d = config.parse("node name n\n")
    assert (d.image_gc_high, d.image_gc_low) == (85, 80)


@pytest.mark.parametrize("text,line,fragment", [
    ("node name n\nimage gc high 90", 2, "expected 'low' after 'image gc high 90'"),
    ("node name n\nimage gc low 3", 2, "expected 'high' after 'image gc'"),
    ("node name n\nimage gc high 70 low 90", 2, "low 90 is above high 70"),
    ("node name n\nimage gc high 101 low 3", 2, "101 is out of range 0-100"),
    ("image gc high 9 low 3\nimage gc high 8 low 3", 2, "duplicate 'image gc' statement"),
    ("node name n\nimage", 2, "expected 'gc' after 'image'"),
])
def test_image_gc_errors(text, line, fragment):
    check(text, line, fragment)


def test_registry_errors_name_the_file(tmp_path):
    p = tmp_path / "pufflet.conf"
    p.write_text("node name n\n# registries\ninsecure registry 'x y'\n")
    with pytest.raises(ConfigError) as e:
        config.load(str(p))
    assert str(e.value).startswith(f"{p}:3: ")


def test_cluster_dns_and_domain():
    c = config.parse("node name n\n")
    assert c.cluster_dns == () and c.cluster_domain == "cluster.local"
    c = config.parse("node name n\ncluster dns 10.96.0.10\ncluster dns fd00::a\n"
                     'cluster domain "Example.ORG."\n')
    assert c.cluster_dns == ("10.96.0.10", "fd00::a")
    assert c.cluster_domain == "example.org"


@pytest.mark.parametrize("text,line,fragment", [
    ("node name n\ncluster dns", 2, "'cluster dns' needs an IP address"),
    ("node name n\ncluster dns 10.96.0", 2, "invalid cluster dns address '10.96.0'"),
    ("node name n\ncluster dns 10.0.0.1\ncluster dns 10.0.0.1", 3,
     "duplicate cluster dns address"),
    ("node name n\ncluster dns 10.0.0.1\ncluster dns 10.0.0.2\ncluster dns 10.0.0.3\n"
     "cluster dns 10.0.0.4", 5, "at most 3 cluster dns addresses"),
    ("node name n\ncluster domain a..b", 2, "invalid cluster domain 'a..b'"),
    ("node name n\ncluster domain -a.b", 2, "invalid cluster domain"),
    ("node name n\ncluster domain a\ncluster domain b", 3,
     "duplicate 'cluster domain' statement"),
])
def test_cluster_dns_errors(text, line, fragment):
    check(text, line, fragment)
