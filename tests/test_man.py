"""Manual pages pass mandoc -Tlint -Wstyle.

This runs on Linux, where OpenBSD's own manuals (pledge(2), rcctl(8), ...)
are not installed, so "referenced manual not found" is accepted for exactly
those, and for our own pages; any other message fails.
"""

import re
import shutil
import subprocess

import pytest

from daemon import REPO

PAGES = sorted((REPO / "man").glob("*.[1-9]"))
OURS = {(p.stem, p.suffix[1:]) for p in PAGES}
OPENBSD_BASE = {
    ("pledge", "2"), ("unveil", "2"), ("rcctl", "8"), ("rc.subr", "8"), ("rc.d", "8"),
    ("httpd.conf", "5"), ("ntpd.conf", "5"), ("pf.conf", "5"), ("pfctl", "8"),
    ("rdomain", "4"), ("pair", "4"), ("veb", "4"), ("route", "8"), ("ifconfig", "8"),
    ("setrtable", "2"), ("sysctl", "2"), ("syslog", "3"), ("syslogd", "8"), ("chroot", "2"),
    ("setresuid", "2"), ("setresgid", "2"), ("setgroups", "2"), ("socketpair", "2"),
    ("openssl", "1"), ("kqueue", "2"), ("pkg_add", "1"), ("setrlimit", "2"),
    ("pf", "4"), ("vport", "4"),
}
NOT_FOUND = re.compile(r"STYLE: referenced manual not found: Xr (\S+) (\d)")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_mandoc_lint_clean(page):
    assert shutil.which("mandoc"), "mandoc is installed by the README test command"
    r = subprocess.run(["mandoc", "-Tlint", "-Wstyle", str(page)], capture_output=True, text=True)
    problems = []
    for line in (r.stdout + r.stderr).splitlines():
        if "outdated mandoc.db" in line:
            continue  # about this machine's database, not our page
        m = NOT_FOUND.search(line)
        if m and (m.group(1), m.group(2)) in OURS | OPENBSD_BASE:
            continue
        problems.append(line)
    assert not problems, "\n".join(problems)


def test_both_pages_exist():
    assert {"pufflet.8", "pufflet.conf.5"} <= {p.name for p in PAGES}
