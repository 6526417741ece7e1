"""Packaging consistency: pyproject.toml, environment.yml, constraints.txt and the CI entry point agree."""

import os
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement  # a dependency of pytest, so always present here
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
TORCH_PIN = "2.13.0"


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _pyproject_requirements() -> list[Requirement]:
    """Runtime dependencies plus every optional extra."""
    project = _pyproject()["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    return [Requirement(s) for s in specs]


def _conda_dependency_specs() -> list[str]:
    """Package specs under `dependencies:` in environment.yml, including its `pip:` sub-list.

    A small hand parser for the flat layout that file uses (so PyYAML is not required): list items are
    `- spec` lines; `- pip:` opens the nested pip list; pip option lines (`- --extra-index-url ...`) are skipped.
    """
    specs, in_deps = [], False
    for raw in (ROOT / "environment.yml").read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():  # a top-level key
            in_deps = line.startswith("dependencies:")
            continue
        item = line.strip()
        if in_deps and item.startswith("- "):
            spec = item[2:].strip()
            if spec != "pip:" and not spec.startswith("-"):
                specs.append(spec)
    return specs


def _spec_name(spec: str) -> str:
    """Normalized package name of a conda (`numpy>=1.24`, `numpy=1.26`) or pip spec."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec)
    assert match, f"cannot read a package name from {spec!r} in environment.yml"
    return canonicalize_name(match.group(0))


def test_environment_yml_lists_the_same_packages_as_pyproject():
    pyproject_names = {canonicalize_name(r.name) for r in _pyproject_requirements()}
    conda_names = {_spec_name(s) for s in _conda_dependency_specs()} - {"python", "pip"}
    assert conda_names == pyproject_names, (
        f"only in pyproject.toml: {sorted(pyproject_names - conda_names)}; "
        f"only in environment.yml: {sorted(conda_names - pyproject_names)}"
    )


def test_environment_yml_pins_python_and_torch():
    specs = _conda_dependency_specs()
    assert "python>=3.10" in specs
    assert f"torch=={TORCH_PIN}" in specs


def test_constraints_pin_torch():
    lines = [ln.split("#", 1)[0].strip() for ln in (ROOT / "constraints.txt").read_text().splitlines()]
    assert f"torch=={TORCH_PIN}" in lines


def test_pyproject_ranges_admit_the_pinned_torch():
    by_name = {canonicalize_name(r.name): r for r in _pyproject_requirements()}
    assert by_name["torch"].specifier.contains(Version(TORCH_PIN))
    assert _pyproject()["project"]["requires-python"] == ">=3.10"


def test_ci_entry_point_runs_make_test():
    ci = ROOT / ".ci" / "run"
    assert ci.is_file()
    assert os.access(ci, os.X_OK), ".ci/run must be executable"
    text = ci.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    assert re.search(r"^\s*(exec\s+)?make\s+test\s*$", text, flags=re.MULTILINE)
