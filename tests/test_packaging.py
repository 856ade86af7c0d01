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


def test_the_code_is_declared_and_shipped_under_apache_2():
    """pyproject.toml declares Apache-2.0 as an SPDX expression (which needs setuptools >= 77 to
    build) and ships LICENSE, whose text is the Apache License 2.0 in full."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    toml = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert toml["project"].get("license") == "Apache-2.0"
    assert toml["project"].get("license-files") == ["LICENSE"]
    assert "setuptools>=77" in toml["build-system"]["requires"]
    words = (ROOT / "LICENSE").read_text().split()
    assert words[:4] == ["Apache", "License", "Version", "2.0,"]
    assert " ".join(words).count("END OF TERMS AND CONDITIONS") == 1 and len(words) > 1500
