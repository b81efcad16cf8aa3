"""``registry/baseline.json``: what the evaluation compares the trained model against, as a file DVC hashes.

The registry's champion is state DVC cannot see, so the round flow resolves it into this small file before
the evaluate stage (``prefdiff.registry.resolve_baseline``): the base model, or a champion named by
registered model, version, the sha256 of its weights (copied under ``models/baseline``) and the protocol
fingerprint it was gated under. The evaluate stage depends on the file and reads only it and the weights it
names; when the champion moves, the file changes and ``dvc status`` shows evaluate changed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from prefdiff.data import DatasetError
from prefdiff.data.atomic import atomic_write_text, sha256_file

BASE = "base"
CHAMPION = "champion"


@dataclass(frozen=True)
class BaselineRef:
    kind: str  # "base" | "champion"
    model_name: str | None = None  # the registered model whose champion was looked up (None: not looked up)
    version: int | None = None  # champion version
    weights: str | None = None  # champion weights dir, relative to the workspace
    weights_sha256: str | None = None  # tree_sha256 of that dir
    protocol: str | None = None  # protocol fingerprint the champion was gated under ("" if it has none)
    note: str = ""  # why the base stands in, e.g. "no champion registered yet"

    @property
    def label(self) -> str:
        return f"champion v{self.version}" if self.kind == CHAMPION else BASE


def tree_sha256(root: Path) -> str:
    """sha256 over ``<relative path> <sha256 of file>`` lines of every file under ``root``, sorted by path."""
    import hashlib

    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise DatasetError(f"{root}: no files to hash")
    h = hashlib.sha256()
    for path in files:
        h.update(f"file {path.relative_to(root).as_posix()} {sha256_file(path)}\n".encode())
    return h.hexdigest()


def write_baseline(path: Path, ref: BaselineRef) -> bool:
    """Write ``ref`` (sorted keys, so equal refs give equal bytes); False when the file already held it."""
    text = json.dumps(asdict(ref), indent=2, sort_keys=True) + "\n"
    path = Path(path)
    if path.is_file() and path.read_text() == text:
        return False
    atomic_write_text(path, text)
    return True


def read_baseline(path: Path) -> BaselineRef:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: missing; the round flow writes it before the evaluate stage "
                           "(prefdiff.registry.resolve_baseline)")
    try:
        data = json.loads(path.read_text())
        ref = BaselineRef(**data)
    except (json.JSONDecodeError, TypeError) as err:
        raise DatasetError(f"{path}: not a baseline reference ({err}); expected the keys of BaselineRef") from err
    if ref.kind not in (BASE, CHAMPION):
        raise DatasetError(f"{path}: kind {ref.kind!r}; allowed: {BASE}, {CHAMPION}")
    if ref.kind == CHAMPION and None in (ref.model_name, ref.version, ref.weights, ref.weights_sha256):
        raise DatasetError(f"{path}: a champion needs model_name, version, weights and weights_sha256; got {data}")
    return ref
