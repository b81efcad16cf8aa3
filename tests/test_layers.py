"""The import layers of pyproject.toml's import-linter contract hold, and the check catches a violation."""

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

LINT = str(Path(sys.executable).parent / "lint-imports")
PACKAGES = ("prefdiff", "evaluation", "stages", "flows")


def _lint(root: Path) -> subprocess.CompletedProcess:
    # cwd first on sys.path: grimp must read the packages under ``root``, not an installed copy
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(root)}
    return subprocess.run([LINT, "--no-cache", "pyproject.toml"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def _copy(dest: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_the_repository_keeps_its_layers(tmp_path):
    proc = _lint(_copy(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_an_upward_import_breaks_the_contract(tmp_path):
    root = _copy(tmp_path)
    config = root / "prefdiff" / "config.py"  # config sits below training: importing it upward is a cycle risk
    config.write_text(config.read_text() + "\nimport prefdiff.training  # noqa: E402,F401\n")
    proc = _lint(root)
    assert proc.returncode == 1
    assert "0 kept, 1 broken" in proc.stdout and "prefdiff.config -> prefdiff.training" in proc.stdout


def test_every_library_module_has_a_layer():
    import tomllib

    contract = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    named = {m.strip() for layer in contract["layers"] for m in layer.replace(":", "|").split("|")}
    modules = {f"prefdiff.{p.stem}" for p in (REPO / "prefdiff").glob("*.py") if p.stem != "__init__"}
    modules |= {f"prefdiff.{p.parent.name}" for p in (REPO / "prefdiff").glob("*/__init__.py")}
    assert modules <= named, f"modules outside every layer: {sorted(modules - named)}"
