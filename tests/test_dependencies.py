"""The declared dependency ranges are the tested ones, and the set-up commands still install the CPU torch first.

The library must not force one exact torch on users who have a CUDA build of another tested version (the GPU
machines run torch 2.11); the README's and CI's set-up install the CPU build first, so that ``pip install -e .``
finds torch already satisfied instead of fetching a CUDA build.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def requirement(name: str) -> Requirement:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(Requirement(line) for line in dependencies if Requirement(line).name == name)


def test_torch_is_a_range_from_2_11_to_the_newest_tested():
    torch = requirement("torch").specifier
    assert all(version in torch for version in ("2.11.0", "2.12.0", "2.13.0"))
    assert "2.10.0" not in torch and "2.14.0" not in torch  # untested


def test_transformers_is_the_range_the_tests_ran_on():
    transformers = requirement("transformers").specifier
    assert all(version in transformers for version in ("5.4.0", "5.17.0", "5.25.0"))
    assert "5.3.0" not in transformers  # its StaticLayer lacks what the cache builds on: decoding fails
    assert "5.26.0" not in transformers  # untested


def pinned_torch_before_the_package(command: str) -> str:
    """The torch version ``command`` installs before ``pip install -e``; fails when it installs none first."""
    pin = re.search(r"pip install torch==([\w.+]+)", command)
    package = command.find('pip install -e ".[test]"')
    assert pin is not None and package != -1 and pin.start() < package, command
    return pin.group(1)


def test_readme_and_ci_install_the_same_tested_torch_before_the_package():
    readme = (ROOT / "README.md").read_text()
    set_up = readme.split("## Set up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    version = pinned_torch_before_the_package(set_up)
    assert "&&" in set_up.split('pip install -e ".[test]"')[0]  # one command: a fresh machine runs it as it is
    assert version in requirement("torch").specifier
    assert pinned_torch_before_the_package((ROOT / ".ci" / "run").read_text()) == version
