"""The ``prefdiff`` console script: ``prefdiff label-server [options]`` serves the labeling page."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = "usage: prefdiff label-server [options]   (serve the labeling page; --help lists the options)"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["label-server"]:
        from prefdiff.labeling.server import main as label_server

        return label_server(args[1:])
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    print(USAGE + (f"\nerror: unknown command {args[0]!r}; the command is label-server" if args else ""),
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
