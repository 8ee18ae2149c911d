"""Packaging that must not drift from the code: the wheel, debian/'s version
and dependencies, the example intents the package installs in /etc/kdsr.
(The package itself is built, installed and purged by netns-lab/tests/test_package.py.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DEBIAN_NAMES = {"click": "python3-click", "jsonschema": "python3-jsonschema"}
DEBIAN_NAMES["PyYAML"] = "python3-yaml"
DEBIAN_NAMES["prometheus-client"] = "python3-prometheus-client"
# Dependencies Debian has no package of: debian/py3dist-overrides tells
# dh_python3 to leave them out, and kdsr runs without them.
NOT_IN_DEBIAN = {"jsonschema-rs"}


def test_the_commented_yaml_example_is_the_json_example():
    """/etc/kdsr/example.yaml (commented) and example.json describe one deployment."""
    as_json = json.loads((ROOT / "examples" / "l2-web.json").read_text())
    as_json.pop("$schema")
    assert yaml.safe_load((ROOT / "examples" / "l2-web.yaml").read_text()) == as_json
    assert (ROOT / "examples" / "l2-web.yaml").read_text().count("\n#") >= 10  # commented, not just converted


def test_debian_changelog_carries_the_project_version():
    first = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    assert re.match(rf"kdsr \({re.escape(PROJECT['version'])}\) ", first), first


def test_debian_depends_on_every_runtime_dependency_at_its_floor():
    control = (ROOT / "debian" / "control").read_text()
    binary = control.split("\nPackage: kdsr\n", 1)[1]
    depends = re.search(r"^Depends:(.*?)^\S", binary, re.M | re.S).group(1)
    ignored = {
        line.strip().replace("_", "-")
        for line in (ROOT / "debian" / "py3dist-overrides").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert ignored == NOT_IN_DEBIAN
    for requirement in PROJECT["dependencies"]:
        name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([\d.]+)", requirement).groups()
        if name not in NOT_IN_DEBIAN:
            assert f"{DEBIAN_NAMES[name]} (>= {floor})" in depends, (requirement, depends)
    # libnftables' binding is not on PyPI: only Debian's package provides it.
    assert "python3-nftables" in depends and "nftables" in depends and "iproute2" in depends


def test_the_packaged_unit_is_contribs():
    link = ROOT / "debian" / "kdsr.service"
    assert link.is_symlink() and link.resolve() == (ROOT / "contrib" / "kdsr.service").resolve()


def test_a_wheel_builds_from_the_checkout(tmp_path):
    # From a copy: setuptools leaves build/ and *.egg-info next to the sources.
    source = tmp_path / "src"
    shutil.copytree(ROOT / "kdsr", source / "kdsr", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        capture_output=True,
        text=True,
        cwd=source,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("kdsr-*.whl")
    assert wheel.name.startswith(f"kdsr-{PROJECT['version']}-py3-none-any")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("kdsr/cli.py", "kdsr/health/notify.py", "kdsr/health/logs.py", "kdsr/data/intent.schema.json"):
        assert needed in names
    assert not [n for n in names if n.split("/")[0] in ("tests", "netns-lab", "scripts", "debian", "bench")]
    entry_points = zipfile.ZipFile(wheel).read(f"kdsr-{PROJECT['version']}.dist-info/entry_points.txt").decode()
    assert "kdsr = kdsr.cli:run" in entry_points
