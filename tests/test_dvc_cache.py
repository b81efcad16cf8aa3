"""DVC caching holds: importing the code (which writes ``__pycache__/*.pyc``, recording source mtimes) changes
no code dependency's hash, so a committed dvc.lock matches a fresh clone before and after any import.
``.dvcignore`` excludes bytecode; without it the same check reports the code directories modified."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO, git, make_workspace, venv_env

DVC = str(Path(sys.executable).parent / "dvc")
PACKAGES = ("prefdiff", "evaluation", "stages", "flows")

# Imports every module of the project from the current directory and checks it did (not the installed copy).
_IMPORT_ALL = f"""
import importlib, os, pkgutil
here = os.getcwd()
count = 0
for name in {PACKAGES!r}:
    package = importlib.import_module(name)
    for info in pkgutil.walk_packages(package.__path__, name + "."):
        module = importlib.import_module(info.name)
        assert module.__file__.startswith(here), (module.__name__, module.__file__)
        count += 1
print(count)
"""


def _env() -> dict[str, str]:
    env = venv_env()
    for name in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX", "PYTHONPATH"):  # bytecode beside the source
        env.pop(name, None)
    return env


def _import_everything(root: Path) -> int:
    proc = subprocess.run([sys.executable, "-c", _IMPORT_ALL], cwd=root, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split()[-1])


def _changed_code_deps(root: Path, code: set[str]) -> dict[str, set[str]]:
    """``{stage: code deps dvc status reports changed}`` (the outputs of a clone are missing: not counted)."""
    proc = subprocess.run([DVC, "status", "--json"], cwd=root, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    changed: dict[str, set[str]] = {}
    for stage, entries in json.loads(proc.stdout).items():
        for entry in entries:
            if isinstance(entry, dict):
                deps = set(entry.get("changed deps", {})) & code
                if deps:
                    changed.setdefault(stage, set()).update(deps)
    return changed


def _code_deps(root: Path) -> set[str]:
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {dep for stage in stages.values() for dep in stage["deps"]
            if dep.split("/")[0] in PACKAGES and (root / dep).exists()}


def _fabricate_outputs(root: Path) -> None:
    """Every declared output exists (its content does not matter here), so `dvc commit` can write dvc.lock."""
    for stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values():
        for out in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            path = root / (next(iter(out)) if isinstance(out, dict) else out)
            if path.exists():
                continue
            if path.suffix:  # metrics/eval.json, plots/*.csv, registry/decision.json
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}\n")
            else:
                path.mkdir(parents=True)
                (path / "placeholder").write_text("x")


def test_importing_every_module_leaves_dvc_status_clean_in_a_clone(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    for name in (".dvcignore", ".gitignore"):  # the repo's: bytecode is neither hashed nor committed
        shutil.copy2(REPO / name, ws / name)
    # As on a developer's machine: bytecode is present when dvc.lock is written (compileall writes what an
    # import writes, without loading torch).
    subprocess.run([sys.executable, "-m", "compileall", "-q", *PACKAGES], cwd=ws, env=_env(), check=True, timeout=300)
    assert any(ws.glob("prefdiff/**/__pycache__/*.pyc"))
    _fabricate_outputs(ws)
    subprocess.run([DVC, "commit", "-f", "-q"], cwd=ws, env=_env(), check=True, timeout=300)
    git(ws, "add", "-A")
    git(ws, "commit", "-q", "-m", "dvc.lock")
    assert git(ws, "ls-files", "*.pyc") == ""
    code = _code_deps(ws)
    assert {"prefdiff/sampling", "prefdiff/training", "evaluation", "stages/evaluate.py"} <= code

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(ws), str(clone))
    assert not any(clone.glob("**/__pycache__"))
    assert _changed_code_deps(clone, code) == {}  # a fresh clone matches the committed dvc.lock
    assert _import_everything(clone) > 50
    assert any(clone.glob("evaluation/__pycache__/*.pyc"))
    assert _changed_code_deps(clone, code) == {}  # and still does after everything was imported

    # The same check without the bytecode rules sees every code directory change: the rules are what holds.
    (clone / ".dvcignore").write_text("")
    changed = _changed_code_deps(clone, code)
    assert {"prefdiff/sampling", "evaluation"} <= changed.get("evaluate", set()), changed
