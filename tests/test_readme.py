"""README's test command is what CI runs, to the letter."""

from daemon import REPO


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    command = ci[-1]
    assert command.startswith("apt-get update") and "pytest" in command
    assert f"```sh\n{command}\n```" in readme


def test_mkimage_builds_a_runnable_base_image(public_tmp):
    """The README's run command builds the static pod's image offline with
    examples/mkimage.sh: on this Linux twin, the host's /bin/sh and tools
    with their libraries."""
    import os
    import subprocess
    import sys

    from pufflet import config
    from pufflet.priv.imagestore import Store

    cfg = public_tmp / "pufflet.conf"
    cfg.write_text(f'node name n\nstate directory "{public_tmp}/state"\n')
    env = dict(os.environ, PUFFLETCTL=f"{sys.executable} -m pufflet.ctl")
    r = subprocess.run(["sh", str(REPO / "examples/mkimage.sh"), "-f", str(cfg)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    store = Store(os.path.join(config.load(str(cfg)).state_dir, "images"))
    image = store.get("local/base:latest")
    assert image is not None and image.config.cmd == ("/bin/sh",)
    # The shell really runs inside its own root: the libraries came along.
    out = subprocess.run(["chroot", image.rootfs, "/bin/sh", "-c", "echo $((6 * 7))"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "42", out.stderr
    manifest = (REPO / "examples/static/hello.yaml").read_text()
    assert "image: local/base:latest" in manifest
    assert 'static pods "/etc/pufflet/manifests"' in (REPO / "examples/pufflet.conf").read_text()
