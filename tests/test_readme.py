"""README's test command is what CI runs, to the letter."""

from daemon import REPO


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    command = ci[-1]
    assert command.startswith("apt-get update") and "pytest" in command
    assert f"```sh\n{command}\n```" in readme
