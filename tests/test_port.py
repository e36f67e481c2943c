"""The OpenBSD port (port/) agrees with the package it packages.

Version: Makefile MODPY_DISTV == pufflet.__version__ (setup.cfg's
version is attr: pufflet.__version__).  Dependencies: setup.cfg
install_requires <-> RUN_DEPENDS, extras test <-> TEST_DEPENDS.  Files:
every module and data file setuptools packs, every console script, man
page and example is in the PLIST, and nothing else is.  The PLIST's user
and group, and the modes of the directories it creates, match what
pufflet itself enforces.
"""

import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest
from setuptools import find_packages

from daemon import REPO

PORT = REPO / "port"
SITE = "lib/python${MODPY_VERSION}/site-packages/"

# PyPI name (lower case) -> the OpenBSD port that provides it.
PORT_OF = {
    "kubernetes": "sysutils/py-kubernetes",
    "msgpack": "devel/py-msgpack",
    "pyyaml": "textproc/py-yaml",
    "pytest-forked": "devel/py-test-forked",
    "hypothesis": "devel/py-hypothesis",
    "prometheus-client": "sysutils/py-prometheus_client",
}


def makefile_vars(path: Path) -> dict[str, str]:
    """VAR = value lines of a Makefile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = {}
    for line in text.splitlines():
        m = re.match(r"([A-Z_][A-Z0-9_]*)\s*[+?]?=\s*(.*)$", line)
        if m:
            out[m.group(1)] = " ".join(m.group(2).split())
    return out


def setup_cfg() -> configparser.ConfigParser:
    cp = configparser.ConfigParser()
    cp.read(REPO / "setup.cfg")
    return cp


def req_names(value: str) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", v.strip(), maxsplit=1)[0].lower()
            for v in value.splitlines() if v.strip()}


def plist() -> list[str]:
    return (PORT / "pkg" / "PLIST").read_text().splitlines()


def plist_files() -> set[str]:
    return {l for l in plist() if not l.startswith("@") or l.startswith("@man ")}


def test_version_agrees():
    import pufflet
    cp = setup_cfg()
    assert cp["metadata"]["version"] == "attr: pufflet.__version__"
    mk = makefile_vars(PORT / "Makefile")
    assert mk["MODPY_DISTV"] == pufflet.__version__
    assert mk["DISTNAME"] == "pufflet-${MODPY_DISTV}"
    # The PLIST names the version only through the variable.
    assert SITE + "pufflet-${MODPY_DISTV}.dist-info/" in plist()
    assert not any(pufflet.__version__ in l for l in plist())


def test_makefile_conventions():
    mk = makefile_vars(PORT / "Makefile")
    for var in ("COMMENT", "CATEGORIES", "HOMEPAGE", "MAINTAINER"):
        assert mk.get(var), var
    assert mk["CATEGORIES"] == "sysutils"
    assert mk["PERMIT_PACKAGE"] == "Yes"
    assert mk["MODULES"] == "lang/python"
    assert mk["MODPY_PYBUILD"] == "setuptools"
    assert len(mk["COMMENT"]) <= 60 and not mk["COMMENT"].endswith(".")
    for name in ("DESCR", "PLIST", "README"):
        assert (PORT / "pkg" / name).is_file()
    assert all(len(l) <= 80 for l in (PORT / "pkg" / "DESCR").read_text().splitlines())


def test_dependencies_agree():
    cp = setup_cfg()
    mk = makefile_vars(PORT / "Makefile")
    wanted = {PORT_OF[n] for n in req_names(cp["options"]["install_requires"])}
    assert set(mk["RUN_DEPENDS"].split()) == wanted
    tests = req_names(cp["options.extras_require"]["test"])
    assert "pytest" in tests and mk["MODPY_PYTEST"] == "Yes"
    assert set(mk["TEST_DEPENDS"].split()) == {PORT_OF[n] for n in tests - {"pytest"}}
    # The kubernetes client has no port: ours is shipped, and says so.
    kube = makefile_vars(PORT / "py-kubernetes" / "Makefile")
    assert kube["PKGNAME"] == "py-${DISTNAME}"
    for f in ("pkg/DESCR", "pkg/PLIST"):
        assert (PORT / "py-kubernetes" / f).is_file()
    assert "no port" in (PORT / "README").read_text()


def test_kubernetes_port_lists_the_clients_requirements():
    """py-kubernetes RUN_DEPENDS cover the installed client's metadata."""
    md = pytest.importorskip("importlib.metadata")
    try:
        dist = md.distribution("kubernetes")
    except md.PackageNotFoundError:
        pytest.skip("kubernetes not installed")
    kube = makefile_vars(PORT / "py-kubernetes" / "Makefile")
    assert kube["MODPY_DISTV"] == dist.version
    deps = " ".join(kube["RUN_DEPENDS"].split())
    port_name = {"python-dateutil": "py-dateutil", "pyyaml": "py-yaml",
                 "typing-extensions": "py-typing-extensions"}
    for req in dist.requires or []:
        if "extra ==" in req:
            continue
        name = req_names(req).pop()
        pname = port_name.get(name, "py-" + name)
        assert re.search(rf"/{re.escape(pname)}(\s|>|$)", deps), name


def expected_python_files() -> set[str]:
    """What setuptools packs: .py files of find_packages + package_data."""
    cp = setup_cfg()
    include = [v.strip() for v in cp["options.packages.find"]["include"].split(",")]
    data = {k: v.split() for k, v in cp["options.package_data"].items()}
    out = set()
    for pkg in find_packages(str(REPO), include=include):
        d = REPO / pkg.replace(".", "/")
        rel = pkg.replace(".", "/")
        out.add(f"{SITE}{rel}/")
        for p in d.glob("*.py"):
            out.add(f"{SITE}{rel}/{p.name}")
            out.add(f"{SITE}{rel}/${{MODPY_PYCACHE}}{p.stem}.${{MODPY_PYC_MAGIC_TAG}}pyc")
            out.add(f"{SITE}{rel}/${{MODPY_PYCACHE}}/")
        for pattern in data.get(pkg, []):
            out |= {f"{SITE}{rel}/{p.name}" for p in d.glob(pattern)}
    return out


def test_plist_has_every_module_and_nothing_stale():
    listed = {l for l in plist_files() if l.startswith(SITE) and ".dist-info/" not in l}
    expected = expected_python_files()
    assert not expected - listed, f"missing from PLIST (run python3 port/genplist.py): " \
                                  f"{sorted(expected - listed)}"
    assert not listed - expected, f"stale in PLIST: {sorted(listed - expected)}"
    assert SITE + "pufflet/privsep/spec.yaml" in listed


def test_plist_has_scripts_man_pages_examples_rc_script():
    cp = setup_cfg()
    files = plist_files()
    scripts = {l.split("=")[0].strip()
               for l in cp["options.entry_points"]["console_scripts"].splitlines() if l.strip()}
    assert {l for l in files if l.startswith("bin/")} == {f"bin/{s}" for s in scripts}
    pages = {f"@man man/man{p.suffix[1:]}/{p.name}" for p in (REPO / "man").glob("*.[1-9]")}
    assert pages and {l for l in files if l.startswith("@man ")} == pages
    examples = {"share/examples/pufflet/" + str(p.relative_to(REPO / "examples"))
                + ("/" if p.is_dir() else "")
                for p in (REPO / "examples").rglob("*")} | {"share/examples/pufflet/"}
    assert {l for l in files if l.startswith("share/examples/")} == examples
    assert "share/doc/pkg-readmes/${PKGSTEM}" in files
    lines = plist()
    assert "@rcscript ${RCDIR}/pufflet" in lines
    assert (REPO / "rc.d" / "pufflet").is_file()
    # The sample configuration comes right after the example it copies.
    i = lines.index("@sample ${SYSCONFDIR}/pufflet.conf")
    assert lines[i - 1] == "share/examples/pufflet/pufflet.conf"
    # Everything else in the PLIST is accounted for.
    known = expected_python_files() | examples | pages | {f"bin/{s}" for s in scripts}
    rest = files - known - {"share/doc/pkg-readmes/${PKGSTEM}"}
    assert {l for l in rest if ".dist-info/" not in l} == set()


def test_makefile_installs_what_the_plist_lists():
    text = (PORT / "Makefile").read_text()
    for page in (REPO / "man").glob("*.[1-9]"):
        assert f"${{WRKSRC}}/man/{page.name}" in text, page.name
    globs = re.findall(r"\$\{WRKSRC\}/examples/(\S+)", text)
    for p in (REPO / "examples").rglob("*"):
        if p.is_file():
            rel = str(p.relative_to(REPO / "examples"))
            assert any(Path(rel).match(g) and rel.count("/") == g.count("/") for g in globs), rel
    assert "${WRKSRC}/rc.d/pufflet" in text and "${SUBST_CMD}" in text


def test_plist_is_generated():
    r = subprocess.run([sys.executable, str(PORT / "genplist.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_user_and_group():
    lines = plist()
    groups = [l for l in lines if l.startswith("@newgroup ")]
    users = [l for l in lines if l.startswith("@newuser ")]
    assert len(groups) == 1 and len(users) == 1
    gname, gid = groups[0].split()[1].split(":")
    name, uid, group, klass, comment, home, shell = users[0].split(" ", 1)[1].split(":")
    assert name == gname == "_pufflet"
    assert uid == gid and 800 <= int(uid) < 1000
    assert group in (gname, gid)
    assert (home, shell) == ("/var/empty", "/sbin/nologin")
    # The default configuration runs the agent as this user.
    assert re.search(r'^user "_pufflet"$', (REPO / "examples" / "pufflet.conf").read_text(), re.M)
    # Registration in user.list is pending: port/README must say so, with the id.
    readme = (PORT / "README").read_text()
    assert "user.list" in readme and f"{uid} _pufflet" in readme


def sample_dirs() -> dict[str, tuple[str, str, str]]:
    """@sample directories -> (mode, owner, group) in force for each."""
    mode = owner = group = ""
    out = {}
    for l in plist():
        kw, _, arg = l.partition(" ")
        if kw == "@mode":
            mode = arg
        elif kw == "@owner":
            owner = arg
        elif kw == "@group":
            group = arg
        elif kw == "@sample" and arg.endswith("/"):
            out[arg] = (mode, owner, group)
    return out


def test_directories_match_what_pufflet_enforces():
    pki = (REPO / "pufflet" / "priv" / "pki.py").read_text()
    sup = (REPO / "pufflet" / "priv" / "supervisor.py").read_text()
    # pki.prepare(): state directory 0710 and pki/ 0750, root:<agent group>.
    assert "(cfg.state_dir, 0o710), (pki_dir(cfg), 0o750)" in pki
    # Supervisor.prepare(): the log directory 0755, owned by root.
    assert "(self.cfg.log_dir, 0o755)" in sup
    dirs = sample_dirs()
    assert dirs["/var/db/pufflet/"] == ("0710", "root", "_pufflet")
    assert dirs["/var/db/pufflet/pki/"] == ("0750", "root", "_pufflet")
    mode, owner, group = dirs["/var/log/pufflet/"]
    assert mode == "0755" and owner in ("", "root") and group in ("", "wheel")
    # And they are pufflet.conf's defaults.
    conf = (REPO / "examples" / "pufflet.conf").read_text()
    assert 'db = "/var/db/pufflet"' in conf and 'log directory "/var/log/pufflet"' in conf


def test_rc_script_follows_rc_subr():
    text = (REPO / "rc.d" / "pufflet").read_text()
    assert text.startswith("#!/bin/ksh\n")
    assert 'daemon="${TRUEPREFIX}/bin/pufflet"' in text
    lines = text.splitlines()
    i = lines.index(". /etc/rc.d/rc.subr")
    assert lines.index('pexp="${MODPY_BIN} ${daemon}${daemon_flags:+ ${daemon_flags}}"') > i
    assert lines[-1] == "rc_cmd $1"
    assert "rc_configtest()" in text and "-n ${daemon_flags}" in text
    # SIGHUP reload and SIGTERM stop are rc.subr's defaults: not overridden.
    assert "rc_reload=NO" not in text and "rc_stop()" not in text
    assert "-d" not in re.sub(r"#.*", "", text)


def test_pkg_readme_covers_the_setup():
    text = (PORT / "pkg" / "README").read_text()
    for needle in ('anchor "pufflet/*"', "net.inet.ip.forwarding=1", "/etc/sysctl.conf",
                   "nodev", "/etc/fstab", "bootstrap kubeconfig", "kubectl certificate approve",
                   "puffletctl", "rcctl enable pufflet"):
        assert needle in text, needle
