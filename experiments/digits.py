"""A known-answer experiment on images: do D3PO and Diffusion-DPO make the digits model draw the prompted digit?

The same library calls the pipeline's stages make (``sample_dataset``, ``label_trajectories``, ``fit``,
``generate``), on the committed ``builtin:digits`` model with the default params, scaled down to fit the test
suite by concentrating on the digits the base draws worst (``HARD_DIGITS``: 2, 3, 5 and 9, which the base
reads right about 40 % of the time against ~90 % for the others): the 4 round phrasings of each (16 prompts)
x 12 groups of 2 = 192 pairs, judged by ``digit_alignment`` (the classifier's probability of the prompted
digit); then the base, the D3PO model and the Diffusion-DPO model draw the 2 held-out phrasings of the same
digits (8 prompts x 6 seeds, the same seeds for all three) and the mean ``digit_alignment`` of each is
measured.

D3PO uses the default ``train`` section, Diffusion-DPO ``compare.overrides.diffusion_dpo`` over it (what
``make compare`` trains); both with ``train.seed`` = ``sample.seed`` = ``seed``.

``python -m experiments.digits [--seeds 0 1 2]`` prints the numbers; tests/test_known_answer.py asserts on them.
``python -m experiments.digits --base-grid docs/digits_base.png`` draws the README's grid of base samples.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"
HARD_DIGITS = (2, 3, 5, 9)
GROUPS_PER_PROMPT = 12
SEEDS_PER_PROMPT = 6


def run_known_answer(seed: int = 0) -> dict[str, float]:
    from prefdiff.config import merged, parse_params
    from prefdiff.prompts import PROMPT_SETS, prompted_digit

    began = time.time()
    hard = lambda prompts: [p for p in prompts if prompted_digit(p) in HARD_DIGITS]  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "prompts.txt").write_text("\n".join(hard(PROMPT_SETS["digits"])) + "\n")
        raw = merged(yaml.safe_load(PARAMS.read_text()), {
            "sample": {"prompt_set": f"file:{work / 'prompts.txt'}", "groups_per_prompt": GROUPS_PER_PROMPT,
                       "seed": seed},
            "train": {"seed": seed, "checkpoint_every": 10_000}})
        params = parse_params(raw, str(PARAMS))
        return _run(params, hard(PROMPT_SETS["digits_heldout"]), work, began)


def _run(params, eval_prompts: list[str], work: Path, began: float) -> dict[str, float]:
    from prefdiff.data.trajectories import TrajectoryStore
    from prefdiff.labeling.pairs import judge_scorer, label_trajectories
    from prefdiff.models.finetuned import trained_weights
    from prefdiff.models.loading import load_pipeline
    from prefdiff.sampling.dataset import sample_dataset
    from prefdiff.sampling.sampler import SamplingConfig, generate
    from prefdiff.training.fit import fit

    pipe = load_pipeline(params.model.source)
    judge = judge_scorer("digit_alignment", {}, params.label.jpeg_quality)
    prompts = [p for p in eval_prompts for _ in range(SEEDS_PER_PROMPT)]
    seeds = [params.evaluate.seed + i for i in range(len(prompts))]
    cfg = SamplingConfig(**params.sampling.model_dump())

    def alignment() -> float:
        return float(judge.score(generate(pipe, prompts, seeds, cfg, batch_size=60), prompts).mean())

    quiet = lambda line: None  # noqa: E731 - the stages' progress lines are not this experiment's output
    result = {"base": alignment()}
    sample_dataset(params, work / "trajectories", pipe=pipe, progress=quiet)
    label_trajectories(TrajectoryStore.open(work / "trajectories"), judge, work / "preferences", progress=quiet)
    for method in ("d3po", "diffusion_dpo"):
        method_params = params.model_copy(update={"train": params.train_for(method)})
        fit(method_params, trajectories_dir=work / "trajectories", preferences_dir=work / "preferences",
            out_dir=work / method, checkpoint_dir=work / f"{method}-checkpoints", progress=quiet)
        with trained_weights(pipe, work / method):
            result[method] = alignment()
    result["seconds"] = time.time() - began
    return result


def base_grid(path: Path, per_digit: int = 8) -> None:
    """The base model's samples of "the digit <word>" (seeds 0..per_digit-1), one row per digit, at the default
    sampling, each labelled with the classifier's reading (green: the prompted digit)."""
    from PIL import Image

    from evaluation.grid import image_grid, save_png_atomic
    from prefdiff.config import load_params
    from prefdiff.models.loading import load_pipeline
    from prefdiff.prompts import DIGIT_WORDS
    from prefdiff.sampling.sampler import SamplingConfig, generate
    from prefdiff.scorers.digits import DigitAlignmentScorer

    params = load_params(PARAMS)
    pipe = load_pipeline(params.model.source)
    prompts = [f"the digit {DIGIT_WORDS[d]}" for d in range(10) for _ in range(per_digit)]
    images = generate(pipe, prompts, list(range(per_digit)) * 10, SamplingConfig(**params.sampling.model_dump()),
                      batch_size=80)
    read = DigitAlignmentScorer().digit_probabilities(images).argmax(1).tolist()
    big = [im.resize((64, 64), Image.NEAREST) for im in images]
    rows = [big[d * per_digit:(d + 1) * per_digit] for d in range(10)]
    labels = [[f"reads {r}" for r in read[d * per_digit:(d + 1) * per_digit]] for d in range(10)]
    colors = [[(0, 128, 0) if r == d else (200, 0, 0) for r in read[d * per_digit:(d + 1) * per_digit]]
              for d in range(10)]
    save_png_atomic(image_grid(rows, row_labels=[f"the digit {DIGIT_WORDS[d]}" for d in range(10)],
                               tile_labels=labels, tile_label_colors=colors), path)
    print(f"{path}: {sum(r == d for d, r in zip([d for d in range(10) for _ in range(per_digit)], read))}/"
          f"{len(read)} read as the prompted digit")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--base-grid", type=Path, help="write the base samples grid here instead")
    args = parser.parse_args(argv)
    if args.base_grid is not None:
        base_grid(args.base_grid)
        return
    for seed in args.seeds:
        print(json.dumps({"seed": seed, **{k: round(v, 4) for k, v in run_known_answer(seed).items()}}), flush=True)


if __name__ == "__main__":
    main()
