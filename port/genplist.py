#!/usr/bin/env python3
"""Write port/pkg/PLIST from the source tree (python3 port/genplist.py).

On OpenBSD "make update-plist" is the reference; this keeps the PLIST
right between ports builds, from what setuptools packs (find_packages
with setup.cfg's include list, package_data, console scripts), the man
pages, the examples and the rc script.  tests/test_port.py checks the
PLIST against the tree and against this script's output.  Use --check
to only compare.
"""

import configparser
import os
import sys
from pathlib import Path

from setuptools import find_packages

REPO = Path(__file__).resolve().parent.parent
PLIST = REPO / "port" / "pkg" / "PLIST"

# The daemon's user and group.  Not yet in infrastructure/db/user.list:
# see port/README before importing the port.
USER = "_pufflet"
ID = 950

SITE = "lib/python${MODPY_VERSION}/site-packages"
PYCACHE = "${MODPY_PYCACHE}"
MAGIC = "${MODPY_PYC_MAGIC_TAG}"


def setup_cfg() -> configparser.ConfigParser:
    cp = configparser.ConfigParser()
    cp.read(REPO / "setup.cfg")
    return cp


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.replace(",", "\n").splitlines() if v.strip()]


def packages(cp) -> list[str]:
    include = _list(cp["options.packages.find"]["include"])
    return sorted(find_packages(str(REPO), include=include))


def package_data(cp) -> dict[str, list[str]]:
    if not cp.has_section("options.package_data"):
        return {}
    return {k: _list(v) for k, v in cp["options.package_data"].items()}


def console_scripts(cp) -> list[str]:
    lines = _list(cp["options.entry_points"]["console_scripts"].replace(",", "\n"))
    return sorted(line.split("=")[0].strip() for line in lines)


def python_entries(cp) -> list[str]:
    data = package_data(cp)
    out = []
    for pkg in packages(cp):
        d = REPO / pkg.replace(".", "/")
        rel = pkg.replace(".", "/")
        entries = [f"{SITE}/{rel}/"]
        names = sorted(p.name for p in d.iterdir() if p.is_file())
        pys = [n for n in names if n.endswith(".py")]
        if pys:
            entries.append(f"{SITE}/{rel}/{PYCACHE}/")
        for n in pys:
            entries.append(f"{SITE}/{rel}/{PYCACHE}{n[:-3]}.{MAGIC}pyc")
        for n in pys:
            entries.append(f"{SITE}/{rel}/{n}")
        for pattern in data.get(pkg, []):
            for p in sorted(d.glob(pattern)):
                entries.append(f"{SITE}/{rel}/{p.name}")
        out += entries
    return out


def dist_info() -> list[str]:
    d = f"{SITE}/pufflet-${{MODPY_DISTV}}.dist-info"
    return [f"{d}/"] + [f"{d}/{n}" for n in
                        ("METADATA", "RECORD", "WHEEL", "entry_points.txt", "top_level.txt")]


def man_pages() -> list[str]:
    pages = sorted((REPO / "man").glob("*.[1-9]"), key=lambda p: (p.suffix, p.name))
    return [f"@man man/man{p.suffix[1:]}/{p.name}" for p in pages]


def examples() -> list[str]:
    top = REPO / "examples"
    out = ["share/examples/pufflet/"]
    for dirpath, dirs, files in os.walk(top):
        dirs.sort()
        rel = os.path.relpath(dirpath, top)
        base = "share/examples/pufflet/" + ("" if rel == "." else rel + "/")
        if rel != ".":
            out.append(base)
        for f in sorted(files):
            out.append(base + f)
            if rel == "." and f == "pufflet.conf":
                out.append("@sample ${SYSCONFDIR}/pufflet.conf")
    return out


def generate() -> str:
    cp = setup_cfg()
    lines = [
        f"@newgroup {USER}:{ID}",
        f"@newuser {USER}:{ID}:{USER}::pufflet daemon:/var/empty:/sbin/nologin",
        "@rcscript ${RCDIR}/pufflet",
    ]
    lines += [f"bin/{s}" for s in console_scripts(cp)]
    lines += dist_info()
    lines += python_entries(cp)
    lines += man_pages()
    lines += ["share/doc/pkg-readmes/${PKGSTEM}"]
    lines += examples()
    # The modes pufflet itself enforces at start (priv/supervisor.py
    # prepare(), priv/pki.py prepare()): state root:_pufflet 0710 so the
    # agent may only walk to pki/ (0750); logs root 0755.
    lines += [
        "@mode 0710",
        "@owner root",
        f"@group {USER}",
        "@sample /var/db/pufflet/",
        "@mode 0750",
        "@sample /var/db/pufflet/pki/",
        "@mode 0755",
        "@group",
        "@sample /var/log/pufflet/",
        "@mode",
        "@owner",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    text = generate()
    if argv[1:] == ["--check"]:
        if PLIST.read_text() != text:
            print(f"{PLIST} is out of date: run python3 port/genplist.py", file=sys.stderr)
            return 1
        return 0
    PLIST.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
