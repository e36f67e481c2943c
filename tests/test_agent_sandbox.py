"""The agent's confinement: exactly its unveil list, after dropping root."""

import dataclasses
import os
import sys

import pytest

from pufflet import config, platform
from pufflet.agent import main as agent
from pufflet.privsep import drop

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="Landlock is the Linux twin of unveil")


def test_agent_reads_its_kubeconfig_and_nothing_of_the_parents(public_tmp):
    public = public_tmp / "pub"
    state = public_tmp / "state"
    for d in (public, state):
        d.mkdir()
        d.chmod(0o755)
    kubeconfig = public / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\n")
    other = public / "other"
    other.write_text("not listed\n")
    in_state = state / "allocations"
    in_state.write_text("{}\n")
    for f in (kubeconfig, other, in_state):
        f.chmod(0o644)
    cfg = dataclasses.replace(config.default(), kubeconfig=str(kubeconfig),
                              state_dir=str(state))
    ident = drop.lookup("nobody")
    # As in the daemon, modules are loaded while root: the Python install
    # here lives under /root, out of reach once we are nobody.
    platform.current()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        out = []
        try:
            drop.drop(ident)
            # Before confinement everything world-readable is readable.
            out.append(open(other).read() == "not listed\n")
            agent.confine(cfg)
            for path in (kubeconfig, "/etc/hosts", other, in_state, "/etc/passwd"):
                try:
                    open(path).read()
                    out.append(True)
                except PermissionError:
                    out.append(False)
        finally:
            os.write(w, repr(out).encode())
            os._exit(0)
    os.close(w)
    got = os.read(r, 4096).decode()
    os.waitpid(pid, 0)
    #            pre,  kubeconfig, hosts, other, state, passwd
    assert got == repr([True, True, True, False, False, False])
