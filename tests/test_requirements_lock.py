"""requirements.lock (what scripts/install puts on every board) covers pyproject.toml: every
runtime dependency pinned with ``==`` to a version its specifier allows, each pin with hashes;
requirements-tools.lock pins the installer's uv the same way (docs/service.md says how to
regenerate both)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)")


def pins(lock: Path) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) for each pin in a pip-compile lock file."""
    found: dict[str, tuple[str, int]] = {}
    current = ""
    for line in lock.read_text().splitlines():
        match = PIN.match(line)
        if match:
            current = canonicalize_name(match.group(1))
            found[current] = (match.group(2), 0)
        elif current and line.strip().startswith("--hash=sha256:"):
            version, hashes = found[current]
            found[current] = (version, hashes + 1)
    return found


def test_every_runtime_dependency_is_pinned_with_hashes() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    locked = pins(REPO / "requirements.lock")
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is not in requirements.lock: regenerate it"
        version, _hashes = locked[name]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"requirements.lock pins {name}=={version}, pyproject.toml wants {requirement}"
        )
    assert "setuptools" in locked  # builds vmc itself at install, nothing fetched
    assert all(hashes > 0 for _version, hashes in locked.values())


def test_the_installer_tool_is_pinned_with_hashes() -> None:
    locked = pins(REPO / "requirements-tools.lock")
    assert set(locked) == {"uv"}
    assert locked["uv"][1] > 1  # one per platform's wheel: x86-64 and ARM boards alike
