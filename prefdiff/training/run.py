"""One entry point for every training method: picks the trainer that ``train.method`` names.

- ``d3po`` and ``ddpo`` learn from the sampled trajectories (per-step log-probs), so they need the
  preference dataset to be labeled trajectories;
- ``diffusion_dpo``, ``sft`` and ``reward_weighted`` learn from final images, so they take either our own
  labeled trajectories (their final PNGs) or an imported image-pair dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prefdiff.config import Params
from prefdiff.data import DatasetError
from prefdiff.training.setup import TrainSummary


def train_method(
    params: Params,
    *,
    trajectories_dir: Path,
    preferences_dir: Path,
    lora_out: Path,
    checkpoint_dir: Path,
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    progress: Callable[[str], None] = print,
    stop_after_steps: int | None = None,
) -> TrainSummary:
    from prefdiff.data.preferences import PreferenceStore
    from prefdiff.data.trajectories import TrajectoryStore

    method = params.train.method
    preferences = PreferenceStore.open(preferences_dir)
    kwargs = dict(lora_out=lora_out, checkpoint_dir=checkpoint_dir, log_metrics=log_metrics, progress=progress,
                  stop_after_steps=stop_after_steps)
    if params.train.uses_trajectories:
        if preferences.source_kind != "trajectories":
            raise DatasetError(
                f"{preferences_dir}: train.method {method!r} learns from sampled trajectories, but this preference "
                f"dataset is imported image pairs ({preferences.source_kind}); use train.method diffusion_dpo, sft "
                "or reward_weighted, or label.source: judge"
            )
        trajectories = TrajectoryStore.open(trajectories_dir)
        preferences.check_trajectories(trajectories)
        if method == "d3po":
            from prefdiff.training.d3po import train_d3po

            return train_d3po(params, trajectories, preferences, **kwargs)
        from prefdiff.training.ddpo import train_ddpo

        return train_ddpo(params, trajectories, preferences, **kwargs)
    from prefdiff.training.pairs import train_pairs

    trajectories = None
    if preferences.source_kind == "trajectories":
        trajectories = TrajectoryStore.open(trajectories_dir)
        preferences.check_trajectories(trajectories)
    return train_pairs(params, preferences, trajectories=trajectories, **kwargs)


__all__ = ["train_method"]
