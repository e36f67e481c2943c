"""rc.d/pufflet drives a real pufflet through the rc.subr(8) actions.

The script under test is the repository's rc.d/pufflet itself, with the
substitutions the port makes (SUBST_CMD: ${TRUEPREFIX}, ${MODPY_BIN}) and
/etc/rc.d/rc.subr replaced by tests/rcsubr-shim.sh, a POSIX sh stand-in
for the rc.subr functions it uses.  It runs under /bin/sh: rc.d scripts
only use simple constructs, and this keeps ksh out of the test machine.

As on OpenBSD, where the console script runs as "/usr/local/bin/python3.x
/usr/local/bin/pufflet flags", the daemon is an executable script named
`pufflet` in a bin directory, with this interpreter on its #! line: the
kernel gives the process the argv "<python> <bin>/pufflet -f <cfg>",
which is what pexp must match exactly (pgrep -xf).

One difference from OpenBSD, explained where it matters: on Linux the
agent child (forked, never exec'd) keeps the parent's command line --
prctl(PR_SET_NAME) only changes the 15-byte comm, not what pgrep -f
reads -- so pexp matches both halves here, while on OpenBSD
setproctitle(3) takes the agent out of it.  The actions still behave:
check sees the parent (and the agent); stop signals both, and each
exits on SIGTERM; reload signals both, and the agent ignores SIGHUP.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon import REPO, alive, children, status, wait_until, write_config

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="pufflet needs root")

SHIM = REPO / "tests" / "rcsubr-shim.sh"
TIMEOUT = 20


def install(tmp: Path, flags: str) -> tuple[Path, str]:
    """The rc script as the port installs it, and the pexp it must use."""
    prefix = tmp / "prefix"
    bindir = prefix / "bin"
    bindir.mkdir(parents=True)
    wrapper = bindir / "pufflet"
    # What setuptools writes as a console script, plus the checkout on
    # sys.path in case the package is not installed.
    wrapper.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from pufflet.cli import main\n"
        "sys.exit(main())\n")
    wrapper.chmod(0o755)
    text = (REPO / "rc.d" / "pufflet").read_text()
    assert ". /etc/rc.d/rc.subr\n" in text
    text = (text.replace("${TRUEPREFIX}", str(prefix))
                .replace("${MODPY_BIN}", sys.executable)
                .replace(". /etc/rc.d/rc.subr\n", f". {SHIM}\n"))
    # rc.subr takes the flags from pufflet_flags in rc.conf.local; the
    # shim has no rc.conf, so they go where the rc script's defaults go.
    text = text.replace(f'daemon="{prefix}/bin/pufflet"\n',
                        f'daemon="{prefix}/bin/pufflet"\ndaemon_flags="{flags}"\n')
    rcdir = tmp / "rc.d"
    rcdir.mkdir()
    script = rcdir / "pufflet"
    script.write_text(text)
    script.chmod(0o755)
    return script, f"{sys.executable} {wrapper} {flags}"


def rc(script: Path, action: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(script), action], capture_output=True, text=True,
                          timeout=TIMEOUT * 3, stdin=subprocess.DEVNULL,
                          env={**os.environ, "RC_SHIM_TIMEOUT": str(TIMEOUT)})


def matching(pexp: str) -> list[int]:
    r = subprocess.run(["pgrep", "-xf", pexp], capture_output=True, text=True)
    return sorted(int(p) for p in r.stdout.split())


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").replace(b"\0", b" ").decode()


def parent_of(pexp: str) -> int:
    """The root parent: the one matching process whose parent does not match."""
    pids = matching(pexp)
    tops = [p for p in pids if int(status(p)["PPid"]) not in pids]
    assert len(tops) == 1, (pids, tops)
    return tops[0]


def agent_of(parent: int) -> int:
    """The agent: the parent's child running as nobody, once it is up."""
    found = []

    def up():
        found[:] = [c for c in children(parent)
                    if alive(c) and status(c)["Uid"].split()[0] == str(nobody_uid())]
        return len(found) == 1
    assert wait_until(up, timeout=15), children(parent)
    return found[0]


def nobody_uid() -> int:
    import pwd
    return pwd.getpwnam("nobody").pw_uid


@pytest.fixture
def rcd(tmp_path):
    if not shutil.which("pgrep") or not shutil.which("pkill"):
        pytest.fail("pgrep/pkill (Debian: procps) are needed by rc.subr's actions")
    cfg = write_config(tmp_path)
    script, pexp = install(tmp_path, f"-f {cfg}")
    yield script, pexp, cfg
    # Whatever happened, leave nothing running.
    for pid in matching(pexp):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def test_start_check_reload_stop_restart(rcd):
    script, pexp, cfg = rcd

    r = rc(script, "check")
    assert r.returncode == 1 and "pufflet(failed)" in r.stdout

    # start: returns once the daemon has detached and is running.
    r = rc(script, "start")
    assert r.returncode == 0, r
    assert "pufflet(ok)" in r.stdout
    parent = parent_of(pexp)
    assert cmdline(parent) == pexp          # exactly what rc.subr matches
    assert status(parent)["Uid"].split()[0] == "0"
    # Detached: not our child, not the rc script's; its own session.
    assert int(status(parent)["PPid"]) != os.getpid()
    assert os.getsid(parent) != os.getsid(0)
    agent = agent_of(parent)
    # Linux only: the forked agent shares the parent's command line (see
    # the module docstring); on OpenBSD setproctitle(3) renames it.
    assert matching(pexp) == sorted([parent, agent])

    assert rc(script, "check").returncode == 0

    # start again: a no-op, as in rc.subr ("rc_check && exit 0").
    r = rc(script, "start")
    assert r.returncode == 0 and r.stdout == ""
    assert parent_of(pexp) == parent

    # reload with the same configuration: SIGHUP, nothing changes, the
    # agent is kept (it ignores SIGHUP).
    r = rc(script, "reload")
    assert r.returncode == 0 and "pufflet(ok)" in r.stdout
    time.sleep(1.0)
    assert alive(parent) and alive(agent)
    assert agent_of(parent) == agent

    # reload after a change the agent needs: it is restarted (new pid)
    # by the same parent.  Syslog is where it would say so; a detached
    # daemon on a test machine may have none, so look at the processes.
    cfg.write_text(cfg.read_text().replace('node name "test-node"', 'node name "test-node-2"'))
    r = rc(script, "reload")
    assert r.returncode == 0, r
    assert wait_until(lambda: not alive(agent), timeout=10)
    agent2 = agent_of(parent)
    assert agent2 != agent and alive(parent)
    assert parent_of(pexp) == parent

    # reload with a broken configuration: refused by rc_configtest before
    # any signal, and the daemon runs on untouched.
    good = cfg.read_text()
    cfg.write_text(good + "this is not a statement\n")
    r = rc(script, "reload")
    assert r.returncode == 1 and "pufflet(failed)" in r.stdout
    r = rc(script, "configtest")
    assert r.returncode == 1
    time.sleep(0.5)
    assert alive(parent) and agent_of(parent) == agent2
    cfg.write_text(good)
    assert rc(script, "configtest").returncode == 0

    # stop: SIGTERM; the parent stops the agent and exits; both gone.
    r = rc(script, "stop")
    assert r.returncode == 0 and "pufflet(ok)" in r.stdout, r
    assert not alive(parent) and not alive(agent2)
    assert matching(pexp) == []
    r = rc(script, "check")
    assert r.returncode == 1

    # stop when stopped: a no-op.
    r = rc(script, "stop")
    assert r.returncode == 0 and r.stdout == ""

    # restart from stopped, then restart while running: a new parent each time.
    r = rc(script, "restart")
    assert r.returncode == 0, r
    p1 = parent_of(pexp)
    agent_of(p1)
    r = rc(script, "restart")
    assert r.returncode == 0, r
    p2 = parent_of(pexp)
    assert p2 != p1 and not alive(p1)
    agent_of(p2)

    assert rc(script, "stop").returncode == 0
    assert matching(pexp) == []


def test_start_refuses_a_broken_configuration(rcd):
    script, pexp, cfg = rcd
    cfg.write_text(cfg.read_text() + "bogus\n")
    r = rc(script, "start")
    assert r.returncode == 1 and "pufflet(failed)" in r.stdout
    assert matching(pexp) == []
