"""pufflet's command line: flags, -n, refusing to start without root."""

import os
import subprocess
import sys

import pytest

from daemon import REPO, write_config


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pufflet", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=30)


def test_check_only_ok(tmp_path):
    r = run("-n", "-f", str(write_config(tmp_path)))
    assert r.returncode == 0
    assert "configuration OK" in r.stderr
    # -n touches nothing.
    assert not (tmp_path / "state").exists()


def test_check_only_reports_each_error_with_file_and_line(tmp_path):
    cfg = tmp_path / "bad.conf"
    cfg.write_text('user "nobody"\nfrobnicate yes\nmax pods 0\n')
    r = run("-n", "-f", str(cfg))
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert any(line.startswith(f"{cfg}:2: ") for line in lines), r.stderr
    assert any(line.startswith(f"{cfg}:3: ") for line in lines), r.stderr


def test_missing_config_file(tmp_path):
    r = run("-n", "-f", str(tmp_path / "absent.conf"))
    assert r.returncode == 1
    assert "absent.conf" in r.stderr


def test_usage():
    r = run("-x")
    assert r.returncode == 1
    assert "usage: pufflet [-dnv] [-f file]" in r.stderr
    r = run("-d", "extra")
    assert r.returncode == 1
    assert "usage:" in r.stderr


def _as_nobody(args: list[str]) -> int:
    """Run cli.main in a forked child that is no longer root."""
    from pufflet import cli
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            code = cli.main(args)
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_refuses_to_start_without_root(public_tmp, capfd):
    cfg = write_config(public_tmp)
    os.chmod(cfg, 0o644)
    assert _as_nobody(["-d", "-f", str(cfg)]) == 1
    assert "need root privileges" in capfd.readouterr().err


def test_check_only_works_without_root(public_tmp, capfd):
    cfg = write_config(public_tmp)
    os.chmod(cfg, 0o644)
    assert _as_nobody(["-n", "-f", str(cfg)]) == 0
    assert "configuration OK" in capfd.readouterr().err


def test_python_m_and_console_script_agree():
    import importlib.metadata as md
    eps = [e for e in md.entry_points(group="console_scripts") if e.name == "pufflet"]
    assert eps and eps[0].value == "pufflet.cli:main"


@pytest.mark.parametrize("module", ["pufflet.priv.supervisor", "pufflet.cli"])
def test_parent_never_imports_kubernetes(module):
    code = (f"import sys, {module}; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('kubernetes', 'urllib3')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
