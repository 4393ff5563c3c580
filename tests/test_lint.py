"""The package boundaries (pyproject.toml [tool.importlinter]) hold, and breaking one fails `make lint`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGES = {
    "bios": REPO / "clients/python/bios",
    "bios_server": REPO / "clients/python/bios_server",
    "bios_cookbook": REPO / "clients/python/bios_cookbook",
    "render_service": REPO / "render_service",
    "train_service": REPO / "train_service",
    "tinker_gateway": REPO / "tinker_gateway",
}
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(path: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(path)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def copy_packages(into: Path) -> None:
    for name, source in PACKAGES.items():
        shutil.copytree(source, into / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyi"))


def test_the_boundaries_hold(tmp_path):
    copy_packages(tmp_path)
    done = lint_imports(tmp_path, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "Contracts: 3 kept, 0 broken." in done.stdout


def test_a_client_module_importing_a_service_breaks_the_contract(tmp_path):
    copy_packages(tmp_path)
    (tmp_path / "bios" / "shortcut.py").write_text("from train_service import sessions  # the violation\n")
    done = lint_imports(tmp_path, tmp_path)
    assert done.returncode != 0
    assert "BROKEN" in done.stdout and "bios.shortcut -> train_service.sessions" in done.stdout, done.stdout[-3000:]


def test_the_client_importing_torch_breaks_the_contract(tmp_path):
    copy_packages(tmp_path)
    (tmp_path / "bios" / "shortcut.py").write_text("def f():\n    import torch  # even inside a function\n")
    done = lint_imports(tmp_path, tmp_path)
    assert done.returncode != 0 and "bios is not allowed to import torch" in done.stdout, done.stdout[-3000:]


def test_one_version_everywhere():
    """bios/VERSION is the version; the installed package, the Node client and the Kubernetes images follow it."""
    import json
    import re

    import bios

    version = (REPO / "clients/python/bios/VERSION").read_text().strip()
    assert bios.__version__ == version
    assert json.loads((REPO / "clients/node/package.json").read_text())["version"] == version
    tags = {
        tag
        for path in (REPO / "k8s").rglob("kustomization.yaml")
        for tag in re.findall(r'(?:newTag|app\.kubernetes\.io/version): "([^"]+)"', path.read_text())
    }
    assert tags == {version}, tags
    assert f"## {version}" in (REPO / "CHANGELOG.md").read_text()
