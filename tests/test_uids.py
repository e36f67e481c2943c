"""uids: per-pod uid allocation, persisted, never 0, never a system id,
never a uid that still has processes."""

import grp
import json
import os
import pwd
import signal
import subprocess
import uuid

import pytest

from pufflet.priv import uids
from pufflet.priv.uids import StateError, UidError, UidPool

BASE = 3_170_000        # far above any account this host has


def pod() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def base():
    used = {p.pw_uid for p in pwd.getpwall()} | {g.gr_gid for g in grp.getgrall()}
    assert not used & set(range(BASE, BASE + 100)), "test uid range is in use here"
    return BASE


def never_busy(uid):
    return False


def test_allocation_in_range_distinct_and_idempotent(tmp_path, base):
    pool = UidPool(str(tmp_path / "uids.json"), base, base + 9, busy=never_busy)
    a, b = pod(), pod()
    ua, ub = pool.allocate(a), pool.allocate(b)
    assert base <= ua <= base + 9 and base <= ub <= base + 9 and ua != ub
    assert pool.allocate(a) == ua
    assert pool.owner(ua) == a and pool.owner(base + 9) is None
    got = pool.allocated()
    assert got == {a: ua, b: ub}
    got.clear()
    assert pool.allocated() == {a: ua, b: ub}       # a copy


def test_persisted_across_pools(tmp_path, base):
    path = str(tmp_path / "uids.json")
    pool = UidPool(path, base, base + 9, busy=never_busy)
    a, b = pod(), pod()
    ua, ub = pool.allocate(a), pool.allocate(b)
    pool.release(a)
    again = UidPool(path, base, base + 9, busy=never_busy)
    assert again.allocated() == {b: ub}
    # Round-robin goes on where it was: the released uid rests.
    c = pod()
    assert again.allocate(c) not in (ua, ub)
    assert UidPool(path, base, base + 9, busy=never_busy).allocated()[c] == again.allocated()[c]


def test_round_robin_wraps_and_reuses_released(tmp_path, base):
    pool = UidPool(str(tmp_path / "u.json"), base, base + 2, busy=never_busy)
    pods = [pod() for _ in range(3)]
    assert [pool.allocate(p) for p in pods] == [base, base + 1, base + 2]
    pool.release(pods[1])
    assert pool.allocate(pod()) == base + 1


def test_exhaustion(tmp_path, base):
    pool = UidPool(str(tmp_path / "u.json"), base, base + 1, busy=never_busy)
    pool.allocate(pod())
    pool.allocate(pod())
    with pytest.raises(UidError, match=rf"{base}-{base + 1} is exhausted: 2 uids in use"):
        pool.allocate(pod())


def test_corrupt_state_is_an_error_naming_the_file(tmp_path, base):
    path = tmp_path / "u.json"
    path.write_text('{"version": 1, "pods": {')
    with pytest.raises(StateError, match=str(path)):
        UidPool(str(path), base, base + 9, busy=never_busy)
    a = pod()
    for bad in ({"version": 1, "next": base, "pods": {"not-a-uuid": base}},
                {"version": 1, "next": base, "pods": {a: 0}},
                {"version": 1, "next": base, "pods": {a: base, pod(): base}},
                {"version": 7, "next": base, "pods": {}},
                [1, 2]):
        path.write_text(json.dumps(bad))
        with pytest.raises(UidError, match=str(path) + ": corrupt"):
            UidPool(str(path), base, base + 9, busy=never_busy)


@pytest.mark.parametrize("lo,hi", [(0, 10), (-5, 10), (10, 5), (1, 2**31), (True, 5)])
def test_bad_ranges(tmp_path, lo, hi):
    with pytest.raises(UidError):
        UidPool(str(tmp_path / "u.json"), lo, hi)


def test_range_with_0_names_root(tmp_path):
    with pytest.raises(UidError, match="includes 0"):
        UidPool(str(tmp_path / "u.json"), 0, 100)


def test_clash_with_passwd_user_refused(tmp_path):
    user = next(p for p in pwd.getpwall() if p.pw_uid > 0)
    with pytest.raises(UidError, match=f"user {user.pw_name} \\(uid {user.pw_uid}\\)"):
        UidPool(str(tmp_path / "u.json"), user.pw_uid, user.pw_uid + 1)
    assert not os.path.exists(tmp_path / "u.json")


def test_clash_with_group_refused(tmp_path):
    users = {p.pw_uid for p in pwd.getpwall()}
    group = next((g for g in grp.getgrall() if g.gr_gid > 0 and g.gr_gid not in users), None)
    if group is None:
        pytest.skip("every group here shares its number with a user")
    with pytest.raises(UidError, match=f"group {group.gr_name} \\(gid {group.gr_gid}\\)"):
        UidPool(str(tmp_path / "u.json"), group.gr_gid, group.gr_gid)


def test_pod_uid_validated(tmp_path, base):
    pool = UidPool(str(tmp_path / "u.json"), base, base + 9, busy=never_busy)
    for bad in ("", "../../etc", "x" * 36, 5, None, str(uuid.uuid4()) + "\n"):
        with pytest.raises(UidError, match="invalid pod uid"):
            pool.allocate(bad)
    # static pods: the kubelet's hex md5, no dashes
    assert pool.allocate(uuid.uuid4().hex) == base


def test_busy_uid_not_reused_until_its_processes_are_gone(tmp_path, base):
    pool = UidPool(str(tmp_path / "u.json"), base, base + 1)     # real /proc check
    a, b = pod(), pod()
    ua = pool.allocate(a)
    assert ua == base
    # A process the pod left behind, really running as its uid.
    proc = subprocess.Popen(["sleep", "60"], user=ua, group=ua, extra_groups=[])
    try:
        assert uids.proc_busy(ua)
        pool.release(a)
        ub = pool.allocate(b)
        assert ub == base + 1
        pool.release(b)
        # Round-robin points at ua again, but it is busy: b's old uid wins.
        assert pool.allocate(pod()) == base + 1
        with pytest.raises(UidError, match="1 free ones still have processes"):
            pool.allocate(pod())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not uids.proc_busy(ua)
    assert pool.allocate(pod()) == ua


@pytest.mark.parametrize("ids", ["saved uid", "gid"])
def test_busy_counts_every_id(base, ids):
    """A process holding the uid only as its saved uid (it can switch back
    to it), or the gid only, makes it busy as much as a real uid does."""
    other = base + 5
    assert not uids.proc_busy(base)
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()       # the child waits on it until killed
    pid = os.fork()
    if pid == 0:
        # No exec: execve would copy the effective uid into the saved one.
        try:
            if ids == "saved uid":
                os.setresgid(other, other, other)
                os.setresuid(other, other, base)
            else:
                os.setgroups([])
                os.setresgid(base, base, base)
                os.setresuid(other, other, other)
            os.write(ready_w, b"x")
            os.read(hold_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        assert uids.proc_busy(base)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, hold_r, hold_w):
            os.close(fd)
    assert not uids.proc_busy(base)

def test_uids_outside_a_changed_range_stay_taken(tmp_path, base):
    path = str(tmp_path / "u.json")
    pool = UidPool(path, base, base + 9, busy=never_busy)
    a = pod()
    ua = pool.allocate(a)
    moved = UidPool(path, base + 20, base + 29, busy=never_busy)
    assert moved.out_of_range() == {a: ua}
    assert moved.allocate(a) == ua          # its running pod keeps it
    assert base + 20 <= moved.allocate(pod()) <= base + 29
    moved.release(a)
    assert moved.out_of_range() == {}


def test_failed_save_changes_nothing(tmp_path, base):
    d = tmp_path / "gone"
    d.mkdir()
    pool = UidPool(str(d / "u.json"), base, base + 9, busy=never_busy)
    d.rmdir()
    with pytest.raises(StateError):
        pool.allocate(pod())
    assert pool.allocated() == {}
