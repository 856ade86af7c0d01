"""The declared dependency range is the tested one: .ci/min-versions.txt pins exactly the lower
bounds pyproject.toml declares (CI installs it in a second venv and runs this suite there)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_min_versions_pin_every_declared_lower_bound():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {}
    for spec in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", spec)
        assert match, f"{spec!r}: every dependency declares a lower bound, and only that"
        declared[match[1].lower()] = match[2]
    pinned = {}
    for line in (ROOT / ".ci" / "min-versions.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pinned[name.lower()] = version
    # the rest of the file pins dependencies of these, each with its reason
    assert declared == {k: v for k, v in pinned.items() if k in declared}
