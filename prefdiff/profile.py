"""Named params profiles (``profiles/<name>.yaml``) as ``dvc exp run -S`` arguments.

``python -m prefdiff.profile sd15`` prints ``-S model.source=... -S train.lr=...`` so that
``dvc exp run $(python -m prefdiff.profile sd15)`` runs the pipeline with the paper-faithful values while
params.yaml keeps the offline defaults. The merged params are validated before anything is printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from prefdiff.config import ParamsError, merged, parse_params
from prefdiff.paths import REPO_ROOT

PROFILES_DIR = REPO_ROOT / "profiles"


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name: str) -> dict:
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ParamsError(f"unknown profile {name!r}; allowed: {', '.join(profile_names())}")
    return yaml.safe_load(path.read_text()) or {}


def set_args(overrides: dict, prefix: str = "") -> list[str]:
    args: list[str] = []
    for key, value in overrides.items():
        if isinstance(value, dict):
            args += set_args(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            # YAML flow list without spaces, so `$(python -m prefdiff.profile x)` word-splits correctly
            args += ["-S", f"{prefix}{key}=[{','.join(str(v) for v in value)}]"]
        else:
            text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            args += ["-S", f"{prefix}{key}={text}"]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help=f"profile name ({', '.join(profile_names())})")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file the profile applies to")
    args = parser.parse_args(argv)
    try:
        overrides = load_profile(args.name)
        parse_params(merged(yaml.safe_load(args.params.read_text()) or {}, overrides), f"{args.params} + {args.name}")
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(" ".join(set_args(overrides)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
