"""The conda environment and pyproject describe the same dependencies; CI runs the README's command."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def normalise(requirement: str) -> str:
    return re.sub(r"\s+", "", requirement).lower()


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {normalise(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in environment["dependencies"]
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    listed = {normalise(r) for r in pip_section if not r.startswith("-e")}
    assert listed == declared
    assert "-e .[dev]" in pip_section


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"```(?:bash|sh)?\n(.*?)\n```", readme, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in command.splitlines()]
    assert len(commands) == 2, "the README starts with the run command and the test command"
    test_command = commands[1]
    assert test_command in ci.splitlines()
