"""The whole daemon, for real: root parent, unprivileged sandboxed agent."""

import os
import pwd
import signal

import pytest

from daemon import Daemon, alive, children, status, wait_until, write_config

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(write_config(tmp_path))
    d.wait_for(r"agent ready")
    yield d
    d.stop()


def agent_of(d: Daemon) -> int:
    assert wait_until(lambda: len(d.children()) == 1)
    return d.children()[0]


def test_two_processes_agent_unprivileged_and_confined(daemon):
    parent = status(daemon.pid)
    assert parent["Uid"].split() == ["0"] * 4
    kids = daemon.children()
    assert len(kids) == 1
    agent = status(kids[0])
    assert agent["Uid"].split() == [str(NOBODY.pw_uid)] * 4
    assert agent["Gid"].split() == [str(NOBODY.pw_gid)] * 4
    assert agent["Groups"].split() == [str(NOBODY.pw_gid)]
    # Landlock needs no_new_privs; it is our sign that the sandbox went on.
    assert agent["NoNewPrivs"] == "1"
    assert agent["CapEff"] == "0000000000000000"
    m = daemon.wait_for(r"agent ready: node (\S+), (\S+) .* uid (\d+)")
    assert m.group(1) == "test-node"
    assert m.group(2) == os.uname().sysname
    assert int(m.group(3)) == NOBODY.pw_uid


def test_state_dirs_created_root_owned(daemon, tmp_path):
    st = os.stat(tmp_path / "state")
    # 0710 root:<agent group>, not 0700: the agent must walk through to
    # its client certificate in state/pki (TLS bootstrap), and only it may.
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, NOBODY.pw_gid, 0o710)
    st = os.stat(tmp_path / "state" / "pki")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, NOBODY.pw_gid, 0o750)
    assert os.stat(tmp_path / "log").st_uid == 0


def test_killed_agent_is_replaced(daemon):
    first = agent_of(daemon)
    mark = daemon.mark()
    os.kill(first, signal.SIGKILL)
    daemon.wait_for(r"agent killed by signal 9 .* restarting in 1s", after=mark)
    daemon.wait_for(r"agent ready", after=mark, timeout=10)
    second = agent_of(daemon)
    assert second != first and alive(daemon.pid)


def test_restart_backoff_doubles(daemon):
    mark = daemon.mark()
    for expect in ("1s", "2s"):
        victim = agent_of(daemon)
        os.kill(victim, signal.SIGKILL)
        daemon.wait_for(rf"agent killed by signal 9 .* restarting in {expect}", after=mark)
        mark = daemon.mark()
        daemon.wait_for(r"agent ready", after=mark, timeout=10)


def test_sigterm_stops_both(daemon):
    agent = agent_of(daemon)
    assert daemon.stop() == 0
    assert wait_until(lambda: not alive(agent), 2)


def test_agent_leaves_when_parent_dies(daemon):
    agent = agent_of(daemon)
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.proc.wait()
    # Orphaned, the agent is reparented to init, which reaps it.
    assert wait_until(lambda: not alive(agent), 1.5)


def test_sighup_with_errors_keeps_running(daemon, tmp_path):
    agent = agent_of(daemon)
    cfg = tmp_path / "pufflet.conf"
    cfg.write_text(cfg.read_text() + "max pods lots\n")
    mark = daemon.mark()
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for(r"pufflet.conf:5: ", after=mark)
    daemon.wait_for(r"not reloading", after=mark)
    assert daemon.children() == [agent]


def test_sighup_applies_and_restarts_agent(daemon, tmp_path):
    agent = agent_of(daemon)
    cfg = tmp_path / "pufflet.conf"
    text = cfg.read_text().replace('"test-node"', '"renamed"')
    text = text.replace(f'{tmp_path}/log', f'{tmp_path}/log2')
    cfg.write_text(text)
    mark = daemon.mark()
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for(r"log directory changed: restart pufflet to apply it", after=mark)
    daemon.wait_for(r"agent ready: node renamed", after=mark)
    assert agent not in daemon.children()
    assert not (tmp_path / "log2").exists()


def test_sighup_unchanged_keeps_agent(daemon):
    agent = agent_of(daemon)
    mark = daemon.mark()
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for(r"nothing changed", after=mark)
    assert daemon.children() == [agent]


def test_unknown_user_refused(tmp_path):
    d = Daemon(write_config(tmp_path, user="no_such_user_x"))
    assert d.proc.wait(10) == 1
    d.wait_for(r"unknown user 'no_such_user_x'")
