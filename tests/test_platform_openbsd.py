"""The OpenBSD platform, golden: the exact unveil/pledge/sysctl/setproctitle
calls, recorded by a stand-in for libc. Runs anywhere."""

import ctypes
import errno
import os
import re
import struct
import sys

import pytest

from pufflet.platform import SandboxError, openbsd


class FakeLibc:
    """Records calls; errors[(name, first_arg)] = errno makes that call fail."""

    def __init__(self, sysctls=None, errors=None):
        self.calls = []
        self.sysctls = sysctls or {}
        self.errors = errors or {}

    def _result(self, name, key):
        e = self.errors.get((name, key))
        if e:
            ctypes.set_errno(e)
            return -1
        return 0

    def unveil(self, path, perms):
        self.calls.append(("unveil", path, perms))
        return self._result("unveil", path)

    def pledge(self, promises, execpromises):
        self.calls.append(("pledge", promises, execpromises))
        return self._result("pledge", promises)

    def setproctitle(self, fmt, *args):
        self.calls.append(("setproctitle", fmt, *args))

    def sysctl(self, name, namelen, oldp, oldlenp, newp, newlen):
        mib = tuple(name[i] for i in range(namelen))
        size = oldlenp.contents.value
        self.calls.append(("sysctl", mib, size, newp, newlen))
        if mib not in self.sysctls:
            ctypes.set_errno(errno.EOPNOTSUPP)
            return -1
        data = self.sysctls[mib]
        if len(data) > size:
            ctypes.set_errno(errno.ENOMEM)
            return -1
        ctypes.memmove(oldp, data, len(data))
        oldlenp.contents.value = len(data)
        return 0


# ---- unveil(2), pledge(2) ----------------------------------------------------

def test_unveil_calls_end_with_the_lock():
    assert openbsd.unveil_calls([("/etc/resolv.conf", "r"),
                                 ("/var/db/pufflet", "rwc"),
                                 ("/usr/local/bin/x", "x"),
                                 ("/hidden", "")]) == [
        (b"/etc/resolv.conf", b"r"),
        (b"/var/db/pufflet", b"rwc"),
        (b"/usr/local/bin/x", b"x"),
        (b"/hidden", b""),
        (None, None),
    ]
    assert openbsd.unveil_calls([]) == [(None, None)]


def test_pledge_args():
    assert openbsd.pledge_args("stdio rpath inet") == (b"stdio rpath inet", None)
    assert openbsd.pledge_args("stdio proc exec", "stdio") == \
        (b"stdio proc exec", b"stdio")
    assert openbsd.pledge_args("stdio", "") == (b"stdio", b"")


def test_sandbox_call_sequence():
    libc = FakeLibc()
    openbsd.sandbox([("/etc/ssl/cert.pem", "r"), ("/var/db/pufflet", "rwc")],
                    "stdio rpath inet dns recvfd", libc=libc)
    assert libc.calls == [
        ("unveil", b"/etc/ssl/cert.pem", b"r"),
        ("unveil", b"/var/db/pufflet", b"rwc"),
        ("unveil", None, None),
        ("pledge", b"stdio rpath inet dns recvfd", None),
    ]


def test_sandbox_with_execpromises():
    libc = FakeLibc()
    openbsd.sandbox([], "stdio exec", "stdio rpath", libc=libc)
    assert libc.calls == [("unveil", None, None),
                          ("pledge", b"stdio exec", b"stdio rpath")]


def test_unveil_error_names_the_path_and_stops():
    libc = FakeLibc(errors={("unveil", b"/etc/pufflet.conf"): errno.EACCES})
    with pytest.raises(SandboxError, match=r"unveil /etc/pufflet.conf: Permission denied"):
        openbsd.sandbox([("/etc/pufflet.conf", "r"), ("/tmp", "rwc")],
                        "stdio", libc=libc)
    assert libc.calls == [("unveil", b"/etc/pufflet.conf", b"r")]


def test_unveil_of_a_missing_directory_is_skipped():
    libc = FakeLibc(errors={("unveil", b"/nonexistent/x"): errno.ENOENT})
    openbsd.sandbox([("/nonexistent/x", "r"), ("/tmp", "rwc")], "stdio", libc=libc)
    assert [c[1] for c in libc.calls] == [b"/nonexistent/x", b"/tmp", None, b"stdio"]


def test_lock_error():
    libc = FakeLibc(errors={("unveil", None): errno.EPERM})
    with pytest.raises(SandboxError, match="unveil NULL: Operation not permitted"):
        openbsd.sandbox([], "stdio", libc=libc)
    assert [c[0] for c in libc.calls] == ["unveil"]


def test_pledge_error():
    libc = FakeLibc(errors={("pledge", b"stdio bogus"): errno.EINVAL})
    with pytest.raises(SandboxError, match=r"pledge 'stdio bogus' None: Invalid argument"):
        openbsd.sandbox([], "stdio bogus", libc=libc)


def test_bad_perms_make_no_call():
    libc = FakeLibc()
    with pytest.raises(SandboxError, match="bad permissions"):
        openbsd.sandbox([("/tmp", "rw"), ("/etc", "read")], "stdio", libc=libc)
    assert libc.calls == []


@pytest.mark.skipif(sys.platform.startswith("openbsd"), reason="not on OpenBSD")
def test_real_libc_without_unveil_is_a_clear_error():
    assert not hasattr(ctypes.CDLL(None), "unveil")
    with pytest.raises(SandboxError, match="unveil"):
        openbsd.sandbox([("/tmp", "r")], "stdio")


# ---- sysctl(2) -------------------------------------------------------------

def test_sysctl_mibs():
    # <sys/sysctl.h>
    assert openbsd.sysctl_mib("hw.ncpuonline") == (6, 25)
    assert openbsd.sysctl_mib("hw.physmem64") == (6, 19)
    assert openbsd.sysctl_mib("hw.uuid") == (6, 18)
    assert openbsd.sysctl_mib("kern.boottime") == (1, 21)
    assert openbsd.sysctl_mib("kern.maxproc") == (1, 6)
    assert openbsd.sysctl_mib("kern.nprocs") == (1, 47)
    assert openbsd.sysctl_mib("vm.uvmexp") == (2, 4)
    with pytest.raises(KeyError):
        openbsd.sysctl_mib("kern.securelevel")


UUID = "4c4c4544-0042-3510-8052-b4c04f4e3232"
TIMEVAL = struct.pack("=ql", 1730000000, 123456)   # time_t, suseconds_t


def obsd_libc(missing=()):
    values = {(6, 25): struct.pack("=i", 4),
              (6, 19): struct.pack("=q", 8 << 30),
              (1, 21): TIMEVAL,
              (6, 18): UUID.encode() + b"\0",
              # pagesize, pagemask, pageshift, npages, free, active,
              # inactive, then the rest of the struct (not read)
              (2, 4): struct.pack("=7i", 4096, 4095, 12, 2 << 20, 1000,
                                  500, 250) + bytes(320),
              (1, 47): struct.pack("=i", 61),
              (1, 6): struct.pack("=i", 1310)}
    return FakeLibc(sysctls={k: v for k, v in values.items() if k not in missing})


UNAME = os.uname_result(("OpenBSD", "node1.example", "7.6",
                         "GENERIC.MP#338", "amd64"))


def test_node_facts(tmp_path):
    libc = obsd_libc()
    facts = openbsd.node_facts(str(tmp_path), libc=libc, uname=UNAME)
    fs = {k: v for k, v in facts.items() if k.startswith("state_fs_")}
    other = {k: v for k, v in facts.items() if not k.startswith("state_fs_")}
    assert other == {
        "hostname": "node1.example", "os_name": "OpenBSD", "os_release": "7.6",
        "os_image": "OpenBSD 7.6", "kernel_version": "GENERIC.MP#338",
        "machine": "amd64", "cpus": 4, "memory_bytes": 8 << 30,
        "boot_id": openbsd.boot_id(1730000000, 123456, "node1.example"),
        "machine_id": UUID,
        "memory_available_bytes": (1000 + 250) * 4096,
        "processes": 61, "max_processes": 1310,
    }
    assert set(fs) == {"state_fs_bytes", "state_fs_free_bytes",
                       "state_fs_inodes", "state_fs_free_inodes"}
    assert all(isinstance(v, int) for v in fs.values())
    # Sizes asked for: int, int64, struct timeval, a string buffer, room
    # for any struct uvmexp, int, int.
    assert [c[1:3] for c in libc.calls] == [
        ((6, 25), 4), ((6, 19), 8),
        ((1, 21), ctypes.sizeof(openbsd._Timeval)), ((6, 18), 64),
        ((2, 4), 4096), ((1, 47), 4), ((1, 6), 4)]
    # Read-only: newp NULL, newlen 0.
    assert all(c[3] is None and c[4] == 0 for c in libc.calls)


def test_node_facts_without_uuid_or_ncpuonline(tmp_path):
    libc = obsd_libc(missing=[(6, 18), (6, 25)])
    facts = openbsd.node_facts(str(tmp_path), libc=libc, uname=UNAME)
    assert facts["machine_id"] == ""
    assert facts["cpus"] == (os.cpu_count() or 1)


def test_uvmexp_too_short_is_an_error():
    libc = FakeLibc(sysctls={(2, 4): struct.pack("=4i", 4096, 4095, 12, 9)})
    with pytest.raises(OSError, match="vm.uvmexp: 16 bytes, want 28"):
        openbsd.memory_available(libc=libc)


def test_boot_id_is_stable_and_uuid_shaped():
    a = openbsd.boot_id(1730000000, 123456, "node1")
    assert a == openbsd.boot_id(1730000000, 123456, "node1")
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-5[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", a)
    assert a != openbsd.boot_id(1730000000, 123457, "node1")
    assert a != openbsd.boot_id(1730000001, 123456, "node1")
    assert a != openbsd.boot_id(1730000000, 123456, "node2")


def test_sysctl_error_is_oserror():
    libc = FakeLibc()
    with pytest.raises(OSError) as e:
        openbsd.sysctl_raw("hw.uuid", 64, libc=libc)
    assert e.value.errno == errno.EOPNOTSUPP


# ---- setproctitle(3) -------------------------------------------------------

def test_set_title():
    libc = FakeLibc()
    openbsd.set_title("agent", libc=libc)
    openbsd.set_title("100% done", libc=libc)
    assert libc.calls == [("setproctitle", b"%s", b"agent"),
                          ("setproctitle", b"%s", b"100% done")]
