"""The ``prefdiff`` console script: one entry point for what a user runs.

    prefdiff run          one preference round (flows/round.py; `make run`)
    prefdiff compare      every method on the same labeled data (flows/compare.py; `make compare`)
    prefdiff label-server the labeling page for people (prefdiff/labeling/server.py; `make label-server`)
    prefdiff profile      a params profile as `dvc exp run -S` overrides (prefdiff/profile.py)
    prefdiff doctor       can this machine run params.yaml: weights, device, memory, disk (prefdiff/doctor.py)

Each command is its module's own CLI (``prefdiff <command> --help`` lists its options); this module only
dispatches, importing the command's module when it is chosen, so ``prefdiff --help`` imports nothing heavy.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


def _run(args: list[str]) -> int:
    from flows.round import main

    return main(args, prog="prefdiff run")


def _compare(args: list[str]) -> int:
    from flows.compare import main

    return main(args, prog="prefdiff compare")


def _label_server(args: list[str]) -> int:
    from prefdiff.labeling.server import main

    return main(args)


def _profile(args: list[str]) -> int:
    from prefdiff.profile import main

    return main(args)


def _doctor(args: list[str]) -> int:
    from prefdiff.doctor import main

    return main(args)


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "run": (_run, "one preference round: sample -> label -> train -> heldout -> evaluate -> register (Prefect flow)"),
    "compare": (_compare, "every method of compare.methods on the same labeled data, one table"),
    "label-server": (_label_server, "the labeling page for people (label.human)"),
    "profile": (_profile, "print a params profile as `dvc exp run -S` overrides (profiles/<name>.yaml)"),
    "doctor": (_doctor, "check weights, device, free memory and disk against params.yaml before a long run"),
}


def usage() -> str:
    width = max(map(len, COMMANDS)) + len("prefdiff ")
    lines = ["usage: prefdiff <command> [options]   (prefdiff <command> --help lists its options)", "", "commands:"]
    lines += [f"  {'prefdiff ' + name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    if not args or args[0] not in COMMANDS:
        what = f"unknown command {args[0]!r}" if args else "no command given"
        print(f"{usage()}\nerror: {what}; the commands are {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command, _ = COMMANDS[args[0]]
    return command(args[1:])  # argparse's --help and usage errors raise SystemExit (0, 2) as they should


if __name__ == "__main__":
    raise SystemExit(main())
