"""The heldout stage's library function: preference pairs no training or evaluation sample shares.

Groups of 2 are sampled by the base model on the evaluation prompts with seeds offset by
``HELDOUT_SEED_OFFSET`` from ``evaluate.seed`` (so they never coincide with the paired evaluation samples),
and ranked by the evaluation's primary judge. The evaluate stage measures implicit reward accuracy on them.
As a DVC stage of its own, a change of prompts, seeds, judge or model re-samples them; a change of the
trained model does not.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from prefdiff.config import Params

HELDOUT_SEED_OFFSET = 7_777_777


def not_needed_reason(params: Params) -> str | None:
    """Why the evaluation reads no sampled held-out pairs (None: it does)."""
    ep = params.evaluate
    if not ep.implicit_accuracy:
        return "evaluate.implicit_accuracy is false"
    if ep.implicit_pairs:
        return f"evaluate.implicit_pairs names the pairs ({ep.implicit_pairs})"
    return None


def heldout_params(params: Params) -> Params:
    """``params`` with the sample section describing the held-out groups (what ``sample_dataset`` reads)."""
    ep = params.evaluate
    sample = params.sample.model_copy(update={
        "prompt_set": ep.prompt_set, "num_prompts": ep.num_prompts, "groups_per_prompt": ep.implicit_groups_per_prompt,
        "images_per_group": 2, "seed": ep.seed + HELDOUT_SEED_OFFSET, "batch_size": ep.batch_size})
    return params.model_copy(update={"sample": sample})


def sample_heldout_pairs(params: Params, out_dir: Path, root: Path, *,
                         progress: Callable[[str], None] = print) -> str | None:
    """Write ``out_dir/trajectories`` and ``out_dir/preferences``; returns None. When the evaluation needs
    no sampled pairs, write ``out_dir`` holding only the reason (``not_sampled.json``) and return it."""
    from evaluation.evaluate import build_scorers
    from prefdiff.data.trajectories import TrajectoryStore, write_not_sampled
    from prefdiff.labeling.pairs import label_trajectories
    from prefdiff.sampling.dataset import sample_dataset

    reason = not_needed_reason(params)
    if reason is not None:
        write_not_sampled(out_dir, reason)
        return reason
    if out_dir.exists():  # this stage's own output: replaced as a whole (DVC removes it before a run too)
        shutil.rmtree(out_dir)
    only_primary = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"scorers": []})})
    scorers, _ = build_scorers(only_primary, progress)
    judge = scorers[params.eval_judge]
    progress(f"held-out pairs: {params.evaluate.implicit_groups_per_prompt} groups of 2 per evaluation prompt, "
             f"judged by {judge.name}")
    sample_dataset(heldout_params(params), out_dir / "trajectories", progress=progress, root=root)
    store = TrajectoryStore.open(out_dir / "trajectories")
    label_trajectories(store, judge, out_dir / "preferences", progress=progress)
    return None
