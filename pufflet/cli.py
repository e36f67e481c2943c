"""pufflet [-dnv] [-f file]"""

import getopt
import os
import sys

from pufflet import config, log as plog

USAGE = "usage: pufflet [-dnv] [-f file]"
DEFAULT_CONFIG = "/etc/pufflet.conf"


def _daemonize() -> None:
    """daemon(3): detach from the terminal so rc.d(8) gets its prompt back."""
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        opts, rest = getopt.getopt(args, "df:nv")
    except getopt.GetoptError as e:
        print(f"pufflet: {e}\n{USAGE}", file=sys.stderr)
        return 1
    if rest:
        print(USAGE, file=sys.stderr)
        return 1
    foreground = check_only = False
    verbose = 0
    path = DEFAULT_CONFIG
    for opt, val in opts:
        if opt == "-d":
            foreground = True
        elif opt == "-n":
            check_only = True
        elif opt == "-v":
            verbose += 1
        elif opt == "-f":
            path = val

    if not check_only and os.geteuid() != 0:
        print("pufflet: need root privileges", file=sys.stderr)
        return 1
    try:
        cfg = config.load(path)
    except config.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    if check_only:
        print("configuration OK", file=sys.stderr)
        return 0

    # Imported here so that `pufflet -n` stays quick and needs no spec.
    from pufflet.agent.main import main as agent_main
    from pufflet.privsep import drop, spec as specmod
    from pufflet.priv.supervisor import Supervisor

    try:
        sup = Supervisor(cfg, specmod.load(), agent_main)
    except drop.DropError as e:
        print(f"pufflet: {e}", file=sys.stderr)
        return 1
    plog.setup(foreground, verbose)
    if not foreground:
        _daemonize()
    plog.set_role("priv")
    return sup.run()
