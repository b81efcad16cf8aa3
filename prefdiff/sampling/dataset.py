"""The sample stage's library function: a trajectory dataset from a named prompt set."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from prefdiff.config import Params
from prefdiff.prompts import get_prompt_set


def group_seed(base_seed: int, group_index: int) -> int:
    """Seed of group i: distinct per group and per ``sample.seed``, stable across runs and machines."""
    return base_seed * 1_000_003 + group_index


def sample_dataset(params: Params, out_dir: Path, *, progress: Callable[[str], None] = print, pipe=None,
                   root: Path | None = None) -> Path:
    """Sample ``groups_per_prompt`` groups of G images for every prompt of the set; returns the index path.

    ``pipe``: an already loaded base pipeline of ``params.model`` (else it is loaded); ``root``: where
    file-backed prompt sets are resolved (default: the current directory, the DVC workspace)."""
    from prefdiff.data.trajectories import TrajectoryWriter
    from prefdiff.models.loading import load_pipeline, model_fingerprint
    from prefdiff.sampling.sampler import SamplingConfig, sample_groups

    sp = params.sample
    prompts = [p for p in get_prompt_set(sp.prompt_set, sp.num_prompts, root=root) for _ in range(sp.groups_per_prompt)]
    seeds = [group_seed(sp.seed, i) for i in range(len(prompts))]
    if pipe is None:
        pipe = load_pipeline(params.model.source, dtype=params.model.dtype, device=params.model.device,
                             revision=params.model.revision)
    cfg = SamplingConfig(**params.sampling.model_dump())
    model = {**params.model.model_dump(), "unet_sha256": model_fingerprint(pipe)}
    began = time.time()
    progress(f"sampling {len(prompts)} groups x {sp.images_per_group} images, {cfg.num_steps} DDIM steps, "
             f"eta {cfg.eta}, guidance {cfg.guidance_scale}, on {pipe.unet.device}")

    def report(done: int, total: int) -> None:
        progress(f"sampled {done}/{total} groups ({time.time() - began:.1f} s)")

    with TrajectoryWriter(out_dir, shard_size=sp.shard_size, model=model,
                          params={"sample": sp.model_dump(), "sampling": params.sampling.model_dump()}) as writer:
        for group in sample_groups(pipe, prompts, seeds, sp.images_per_group, cfg, batch_size=sp.batch_size,
                                   progress=report):
            writer.add_group(group)
    return out_dir / "index.json"
