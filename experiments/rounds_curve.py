"""The D3PO paper's Fig. 3 in miniature: judge reward against the number of samples, D3PO vs DDPO vs
reward-weighted, over many online rounds on the digits model, several seeds with intervals.

The paper (Sec. 5.1, Fig. 3) fine-tunes SD 1.5 for 400 epochs of 80 images against a reward (JPEG size,
aesthetics): D3PO sees only which image of a pair scores higher, DDPO and reward-weighted see the reward
itself, and each method's test reward is plotted against the number of image pairs sampled, 5 seeds. Here:
the committed ``builtin:digits`` model, the ``digit_alignment`` judge (params.yaml's ``label.judge``), every
method with the settings ``make compare`` trains it with (``compare.overrides``, ``Params.train_for``), and
for each (method, seed) one ``prefdiff.rounds.run_rounds`` run of ``--rounds`` rounds of
``--groups-per-round`` groups of 2 (``sample.seed`` = ``train.seed`` = the seed; D3PO's reference is the base,
as Algorithm 1 copies it once before the first epoch). The reward plotted is the policy's mean
``digit_alignment`` on the evaluation prompts and seeds (``evaluate``: 20 held-out phrasings x 6 seeds, the
same for every method and seed), every ``--eval-every`` rounds, against the image pairs sampled so far; the
line is the mean over seeds and the band its 95% t-interval over seeds (the between-seed spread, what the
paper's shaded areas show).

    python -m experiments.rounds_curve                       # the full run (hours; see the README)
    python -m experiments.rounds_curve --rounds 2 --seeds 0 1 --groups-per-round 4 --eval-every 1 \\
        --eval-seeds-per-prompt 1 --out /tmp/rounds_curve     # a smoke run (a few minutes)

Each run keeps its rounds under ``--work-dir``/<method>-seed<k> (the rounds loop's own files, about 2.3 MB a
round on the digits model: 3.5 GB for the default 3 methods x 5 seeds x 100 rounds), so an interrupted
experiment, rerun with the same arguments, resumes every run after its last complete round, and more
``--rounds`` append. ``--jobs N`` runs N (method, seed) runs at once (one process each; set
OMP_NUM_THREADS so that N x threads fits the cores). Writes ``<out>.png`` (the figure), ``<out>.csv`` (one
row per evaluation point: the mean and interval per method; the DVC plot ``rounds_curve`` of
pipelines/rounds/dvc.yaml reads docs/rounds_curve.csv) and ``<out>.json`` (the settings, every run's curve,
times).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
PARAMS = REPO / "params.yaml"
METHODS = ("d3po", "ddpo", "reward_weighted")
COLORS = {"d3po": "tab:blue", "ddpo": "tab:orange", "reward_weighted": "tab:green", "diffusion_dpo": "tab:red",
          "sft": "tab:purple"}


def run_params(method: str, seed: int, args: argparse.Namespace):
    """params.yaml with ``method``'s compare settings, the seed, and the experiment's round sizes."""
    from prefdiff.config import merged, parse_params

    base = parse_params(yaml.safe_load(PARAMS.read_text()), str(PARAMS))
    train = base.train_for(method).model_dump() | {"seed": seed}
    overrides: dict[str, Any] = {
        "train": train, "sample": {"seed": seed},
        "rounds": {"count": args.rounds, "groups_per_round": args.groups_per_round, "eval_every": args.eval_every}}
    if args.eval_seeds_per_prompt is not None:
        overrides["evaluate"] = {"seeds_per_prompt": args.eval_seeds_per_prompt}
    return parse_params(merged(base.model_dump(), overrides), f"{PARAMS} + {method}, seed {seed}")


def one_run(method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One (method, seed) run of the rounds loop in its own work dir; its per-round rows and time."""
    from prefdiff.rounds.loop import run_rounds

    root = Path(args.work_dir) / f"{method}-seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    began = time.time()
    prefix = f"{method} seed {seed}: "
    result = run_rounds(run_params(method, seed, args), root, progress=lambda line: print(prefix + line, flush=True))
    return {"method": method, "seed": seed, "rows": result.rows, "resumed": result.resumed,
            "computed": len(result.computed), "seconds": round(time.time() - began, 1)}


def curve_rows(runs: list[dict[str, Any]], images_per_group: int) -> list[dict[str, Any]]:
    """One row per evaluation point: ``pairs`` sampled so far, and per method the mean of the seeds' evaluation
    reward with its 95% t-interval over seeds and the number of seeds."""
    from math import comb

    from evaluation.stats import mean_ci

    by_point: dict[int, dict[str, list[float]]] = {}
    for run in runs:
        for row in run["rows"]:
            if "eval_reward" in row:
                by_point.setdefault(row["samples"], {}).setdefault(run["method"], []).append(row["eval_reward"])
    methods = sorted({run["method"] for run in runs}, key=lambda m: (METHODS + tuple(COLORS)).index(m))
    rows = []
    for samples in sorted(by_point):
        row: dict[str, Any] = {"samples": samples, "pairs": samples // images_per_group * comb(images_per_group, 2)}
        for method in methods:
            values = by_point[samples].get(method)
            if values:
                ci = mean_ci(values)
                row |= {f"{method}_mean": ci.mean, f"{method}_low": ci.low, f"{method}_high": ci.high,
                        f"{method}_seeds": len(values)}
        rows.append(row)
    return rows


def draw(rows: list[dict[str, Any]], methods: list[str], out: Path, *, title: str, judge: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), constrained_layout=True)
    for method in methods:
        points = [r for r in rows if f"{method}_mean" in r]
        xs = [r["pairs"] for r in points]
        ax.plot(xs, [r[f"{method}_mean"] for r in points], marker="o", ms=3, color=COLORS[method], label=method)
        ax.fill_between(xs, [r[f"{method}_low"] for r in points], [r[f"{method}_high"] for r in points],
                        color=COLORS[method], alpha=0.2)
    ax.set(xlabel="image pairs sampled", ylabel=f"mean {judge} on the evaluation prompts", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def write_outputs(runs: list[dict[str, Any]], args: argparse.Namespace, began: float) -> Path:
    import csv

    from prefdiff.data.atomic import atomic_write_json

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    params = run_params(args.methods[0], args.seeds[0], args)
    rows = curve_rows(runs, params.sample.images_per_group)
    methods = [m for m in args.methods if any(f"{m}_mean" in r for r in rows)]
    fields = ["samples", "pairs"] + [f"{m}_{k}" for m in methods for k in ("mean", "low", "high", "seeds")]
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    images = args.groups_per_round * params.sample.images_per_group
    title = (f"{args.rounds} rounds x {images} images, {len(args.seeds)} seeds (mean, 95% t-interval over seeds)")
    draw(rows, methods, out.with_suffix(".png"), title=title, judge=params.eval_judge)
    atomic_write_json(out.with_suffix(".json"), {
        "command": "python -m experiments.rounds_curve " + " ".join(args.argv), "rounds": args.rounds,
        "groups_per_round": args.groups_per_round, "eval_every": args.eval_every, "seeds": args.seeds,
        "methods": args.methods, "judge": params.label.judge, "eval_judge": params.eval_judge,
        "eval_prompts": params.evaluate.prompt_set, "eval_seeds_per_prompt": params.evaluate.seeds_per_prompt,
        "seconds": round(time.time() - began, 1),
        "runs": [{k: v for k, v in run.items()} for run in runs], "curve": rows})
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.rounds_curve", description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"default: {' '.join(METHODS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="default: 0-4 (the paper's 5)")
    p.add_argument("--rounds", type=int, default=100, help="rounds per run (default 100: 8000 images)")
    p.add_argument("--groups-per-round", type=int, default=40, help="groups of 2 per round (default 40: 80 images, "
                   "the paper's per epoch)")
    p.add_argument("--eval-every", type=int, default=10, help="evaluate every N rounds and after the last")
    p.add_argument("--eval-seeds-per-prompt", type=int, default=None, help="override evaluate.seeds_per_prompt")
    p.add_argument("--jobs", type=int, default=1, help="(method, seed) runs at once, one process each")
    p.add_argument("--work-dir", default=str(REPO / ".rounds-curve"), help="the runs' rounds (resumable)")
    p.add_argument("--out", default=str(REPO / "docs" / "rounds_curve"), help="<out>.png, .csv, .json")
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    from prefdiff.catalog import TRAIN_METHODS

    unknown = [m for m in args.methods if m not in TRAIN_METHODS]
    if unknown:
        p.error(f"--methods {unknown}: unknown; allowed: {', '.join(TRAIN_METHODS)}")
    for name in ("rounds", "groups_per_round", "eval_every", "jobs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} = {getattr(args, name)}: allowed: 1 or more")
    run_params(args.methods[0], args.seeds[0], args)  # a bad combination fails here, naming the key
    return args


def main(argv: list[str] | None = None) -> None:
    from prefdiff.config import ParamsError

    try:
        args = parse_args(argv)
    except ParamsError as err:
        raise SystemExit(f"error: {err}") from None
    began = time.time()
    jobs = [(m, s) for m in args.methods for s in args.seeds]
    if args.jobs == 1:
        runs = [one_run(m, s, args) for m, s in jobs]
    else:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            runs = list(pool.map(one_run, *zip(*jobs), [args] * len(jobs)))
    out = write_outputs(runs, args, began)
    for run in runs:
        print(f"{run['method']} seed {run['seed']}: {run['computed']} rounds computed, {run['resumed']} resumed, "
              f"{run['seconds']} s")
    print(f"wrote {out.with_suffix('.png')}, .csv, .json in {time.time() - began:.0f} s")


if __name__ == "__main__":
    main()
