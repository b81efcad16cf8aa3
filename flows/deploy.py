"""Deployments: the automatic round nightly, the human round on demand.

- ``preference-round/nightly-round``: ``flows.round.preference_round`` on a cron schedule (03:00 UTC).
- ``human-round/on-demand``: ``flows.human.human_round``, no schedule; started by hand
  (``prefect deployment run human-round/on-demand``), it samples, waits for people's labels, and trains.

Two routes, both Prefect 3's own ways to run a deployment:

- ``make serve`` / ``python -m flows.deploy [--cron ...] [--name ...] [--no-human]``: this module. One
  long-lived process serves both deployments (no work pool, no worker); good for a single GPU box. It
  needs a Prefect server to hold the schedule and the on-demand runs: ``prefect server start`` and
  ``PREFECT_API_URL`` (with the ephemeral server they live only as long as this process).
- ``prefect.yaml`` at the repo root: the work-pool route (``prefect work-pool create prefdiff-local
  --type process``, ``prefect --no-prompt deploy --all``, ``prefect worker start --pool prefdiff-local
  --limit 1``).

One DVC workspace allows one run at a time (DVC's lock refuses a second ``dvc repro`` in the checkout), so
each deployment has ``concurrency_limit`` 1 and the serving process (``limit=1``) or the worker
(``--limit 1``) runs one flow run at a time across both: a human round paused for labels keeps its process
and its slot, so a nightly round due meanwhile waits until the human round ends.
Stop ``serve`` with Ctrl-C (SIGINT) and let it exit before stopping the server.
"""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_NAME = "nightly-round"
DEFAULT_CRON = "0 3 * * *"
DEFAULT_TIMEZONE = "UTC"
HUMAN_NAME = "on-demand"


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


def build_human_deployment(name: str = HUMAN_NAME, parameters: dict[str, Any] | None = None):
    """The human round as a ``RunnerDeployment`` with no schedule (run on demand), concurrency 1.

    ``parameters`` are ``human_round``'s; by default it starts the labeling server for its wait
    (``serve_labels``: a deployment runs unattended, nobody else starts the page)."""
    from flows.human import human_round

    return human_round.to_deployment(
        name=name,
        concurrency_limit=1,  # DVC's workspace lock: one round per checkout at a time
        parameters={"serve_labels": True} | (parameters or {}),
        description="Human-in-the-loop round on demand: sample, wait for people's labels (resumes on done or "
                    "when every group is labeled), label -> train -> heldout -> evaluate -> register.",
        tags=["prefdiff", "d3po", "human"],
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flows.deploy",
                                description="Serve the preference round on a cron schedule and the human round "
                                            "on demand.")
    p.add_argument("--name", default=DEFAULT_NAME, help=f"deployment name (default {DEFAULT_NAME!r})")
    p.add_argument("--cron", default=DEFAULT_CRON, help=f"cron schedule (default {DEFAULT_CRON!r})")
    p.add_argument("--timezone", default=DEFAULT_TIMEZONE, help=f"timezone of the schedule (default {DEFAULT_TIMEZONE!r})")
    p.add_argument("--human-name", default=HUMAN_NAME,
                   help=f"the human round's deployment name (default {HUMAN_NAME!r})")
    p.add_argument("--no-human", action="store_true", help="serve the nightly round only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from prefect import serve

    from flows.round import prefect_api_problem

    args = parse_args(argv)
    problem = prefect_api_problem()  # serve() would otherwise retry a down API for minutes
    if problem is not None:
        raise SystemExit(f"error: {problem}")
    deployments = [build_deployment(name=args.name, cron=args.cron, timezone=args.timezone)]
    if not args.no_human:
        deployments.append(build_human_deployment(name=args.human_name))
    serve(*deployments, limit=1)  # one flow run at a time across both: one DVC workspace


if __name__ == "__main__":
    main()
