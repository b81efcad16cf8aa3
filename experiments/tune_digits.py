"""One tuning try on the digits model: params.yaml + overrides -> sample, label, train, then the evaluation's numbers.

The library calls of the stages (``sample_dataset``, ``label_trajectories``, ``fit``, ``generate``), without
DVC/MLflow, so a try costs only its training when the sampled and labeled data are reused (cached under
``--work`` by sample settings and label margin). The evaluation is the evaluate stage's protocol: the
``evaluate.prompt_set`` prompts x ``evaluate.seeds_per_prompt`` seeds from ``evaluate.seed``, base and
trained on the same seeds, the primary judge's mean and the win-rate (ties half) with its prompt-clustered
bootstrap interval (the evaluate stage's headline).

    python -m experiments.tune_digits '{"train": {"method": "sft", "lr": 0.001, "epochs": 4}}' sft-lr1e-3

prints one line: ``<tag>: base <mean> trained <mean> win <rate> [<low>, <high>] train <s>s final {<train metrics>}``. The
README's tuning record ("What `make run` shows", "One data set, every method") was measured this way.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml

PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"


def tune(overrides: dict, tag: str, work: Path) -> str:
    from evaluation.stats import cluster_bootstrap_ci
    from prefdiff.config import merged, parse_params
    from prefdiff.data.trajectories import TrajectoryStore
    from prefdiff.labeling.pairs import judge_scorer, label_trajectories
    from prefdiff.models.finetuned import trained_weights
    from prefdiff.models.loading import load_pipeline
    from prefdiff.prompts import get_prompt_set
    from prefdiff.sampling.dataset import sample_dataset
    from prefdiff.sampling.sampler import SamplingConfig, generate
    from prefdiff.training.fit import fit

    params = parse_params(merged(yaml.safe_load(PARAMS.read_text()), overrides), str(PARAMS))
    quiet = lambda line: None  # noqa: E731 - the stages' progress lines are not this script's output
    sp, lp = params.sample, params.label
    key = f"{sp.prompt_set}_g{sp.groups_per_prompt}_G{sp.images_per_group}_s{sp.seed}_{lp.judge}"
    trajectories, preferences = work / f"traj_{key}", work / f"prefs_{key}_m{lp.tie_margin}"
    pipe = load_pipeline(params.model.source)
    judge = judge_scorer(lp.judge, lp.judge_args, lp.jpeg_quality)
    if not (trajectories / "index.json").exists():
        sample_dataset(params, trajectories, pipe=pipe, progress=quiet)
    if not (preferences / "index.json").exists():
        label_trajectories(TrajectoryStore.open(trajectories), judge, preferences, tie_margin=lp.tie_margin,
                           progress=quiet)
    out, checkpoints = work / f"out_{tag}", work / f"checkpoints_{tag}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(checkpoints, ignore_errors=True)
    began = time.time()
    summary = fit(params, trajectories_dir=trajectories, preferences_dir=preferences, out_dir=out,
                  checkpoint_dir=checkpoints, progress=quiet)
    seconds = time.time() - began

    ep = params.evaluate
    prompts = [p for p in get_prompt_set(ep.prompt_set, ep.num_prompts) for _ in range(ep.seeds_per_prompt)]
    seeds = [ep.seed + i for i in range(len(prompts))]
    cfg = SamplingConfig(**params.sampling.model_dump())
    scorer = judge_scorer(params.eval_judge, {}, lp.jpeg_quality)
    base = scorer.score(generate(pipe, prompts, seeds, cfg, batch_size=ep.batch_size), prompts)
    with trained_weights(pipe, out):
        trained = scorer.score(generate(pipe, prompts, seeds, cfg, batch_size=ep.batch_size), prompts)
    outcomes = ((trained > base).float() + 0.5 * (trained == base).float()).numpy()
    low, high = cluster_bootstrap_ci(outcomes, prompts, n_boot=ep.bootstrap_samples, seed=ep.seed)
    final = json.dumps({k: round(v, 4) for k, v in summary.final.items()})
    return (f"{tag}: base {float(base.mean()):.4f} trained {float(trained.mean()):.4f} win {outcomes.mean():.3f} "
            f"[{low:.3f}, {high:.3f}] train {seconds:.0f}s final {final}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", help="JSON mapping deep-merged over params.yaml")
    parser.add_argument("tag", help="a name for this try (its output directory and printed line)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/prefdiff-tune"), help="cached data and outputs")
    args = parser.parse_args(argv)
    print(tune(json.loads(args.overrides), args.tag, args.work), flush=True)


if __name__ == "__main__":
    main()
