"""Run the preference round (any train.method) on a schedule.

Two routes, both Prefect 3's own ways to schedule a flow:

- ``make serve`` / ``python -m flows.deploy [--cron ...] [--name ...]``: this module. One long-lived
  process serves the deployment (no work pool, no worker); good for a single GPU box. It needs a
  Prefect server to hold the schedule: ``prefect server start`` and ``PREFECT_API_URL`` (with the
  ephemeral server the schedule lives only as long as this process).
- ``prefect.yaml`` at the repo root: the work-pool route (``prefect work-pool create prefdiff-local
  --type process``, ``prefect --no-prompt deploy --all``, ``prefect worker start --pool prefdiff-local``).

Both allow one run at a time: DVC's workspace lock refuses a second ``dvc repro`` in the same checkout.
Stop ``serve`` with Ctrl-C (SIGINT) and let it exit before stopping the server.
"""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_NAME = "nightly-round"
DEFAULT_CRON = "0 3 * * *"
DEFAULT_TIMEZONE = "UTC"


def build_deployment(
    name: str = DEFAULT_NAME,
    cron: str = DEFAULT_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    parameters: dict[str, Any] | None = None,
):
    """The round as a ``RunnerDeployment`` on cron schedule ``cron`` in ``timezone``, concurrency 1.

    ``parameters`` are ``preference_round``'s (``repo``, ``stages``, ``run_name``). ``.apply()`` registers it
    with the API (returns its id); ``prefect.serve(...)`` registers and runs it."""
    from prefect.schedules import Cron

    from flows.round import preference_round

    return preference_round.to_deployment(
        name=name,
        schedules=[Cron(cron, timezone=timezone)],
        concurrency_limit=1,  # DVC's workspace lock: one round per checkout at a time
        parameters=parameters or {},
        description=f"Preference round (sample -> label -> train -> heldout -> evaluate -> register) on cron {cron!r} ({timezone}).",
        tags=["prefdiff", "d3po"],
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flows.deploy", description="Serve the preference round on a cron schedule.")
    p.add_argument("--name", default=DEFAULT_NAME, help=f"deployment name (default {DEFAULT_NAME!r})")
    p.add_argument("--cron", default=DEFAULT_CRON, help=f"cron schedule (default {DEFAULT_CRON!r})")
    p.add_argument("--timezone", default=DEFAULT_TIMEZONE, help=f"timezone of the schedule (default {DEFAULT_TIMEZONE!r})")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from prefect import serve

    args = parse_args(argv)
    serve(build_deployment(name=args.name, cron=args.cron, timezone=args.timezone), limit=1)


if __name__ == "__main__":
    main()
