"""The sample stage's library function: a trajectory dataset from a named prompt set, drawn by a policy.

The policy is the base model, or the base with a LoRA loaded (``sample.lora``): in D3PO's Algorithm 1 each
round samples from the policy the previous round trained. ``write_trajectories`` is the part the rounds
loop shares: it samples with the pipeline as it is (adapters and all) and records which policy that was.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefdiff.config import Params
from prefdiff.models.processes import process_device, process_state, shared_batches, wait_for_everyone
from prefdiff.prompts import get_prompt_set
from prefdiff.progress import above_bars, progress_bar
from prefdiff.sampling.guards import memory_knobs


def group_seed(base_seed: int, group_index: int) -> int:
    """Seed of group i: distinct per group and per ``sample.seed``, stable across runs and machines."""
    return base_seed * 1_000_003 + group_index


def policy_lora_dir(params: Params, root: Path | None = None) -> Path | None:
    """``sample.lora`` as a path (relative ones under ``root``, default the current directory), or None."""
    if params.sample.lora is None:
        return None
    path = Path(params.sample.lora)
    return path if path.is_absolute() else (root or Path.cwd()) / path


def sample_dataset(params: Params, out_dir: Path, *, progress: Callable[[str], None] = print, pipe=None,
                   root: Path | None = None) -> Path:
    """Sample ``groups_per_prompt`` groups of G images for every prompt of the set; returns the index path.

    ``pipe``: an already loaded base pipeline of ``params.model`` (else it is loaded); ``root``: where
    file-backed prompt sets and a relative ``sample.lora`` are resolved (default: the current directory, the
    DVC workspace). With ``sample.lora`` the LoRA is loaded for sampling and unloaded again afterwards."""
    from prefdiff.data.baseline import tree_sha256
    from prefdiff.models.loading import load_pipeline, model_fingerprint
    from prefdiff.models.lora import load_lora_weights

    sp = params.sample
    lora_dir = policy_lora_dir(params, root)
    if lora_dir is not None and not lora_dir.is_dir():  # before the model loads
        raise FileNotFoundError(f"sample.lora = {sp.lora!r}: {lora_dir} is not a directory; give a diffusers-format "
                                "LoRA dir (a train stage's models/trained) or null for the base")
    prompts = [p for p in get_prompt_set(sp.prompt_set, sp.num_prompts, root=root) for _ in range(sp.groups_per_prompt)]
    seeds = [group_seed(sp.seed, i) for i in range(len(prompts))]
    if pipe is None:
        pipe = load_pipeline(params.model.source, dtype=params.model.dtype,
                             device=process_device(params, process_state(params)),
                             revision=params.model.revision)
    if lora_dir is None:
        return write_trajectories(pipe, prompts, seeds, params, out_dir, progress=progress)
    base_sha256 = model_fingerprint(pipe)  # the base's, before the LoRA wraps its layers
    load_lora_weights(pipe, lora_dir)
    try:
        policy = {"policy_lora": sp.lora, "policy_lora_sha256": tree_sha256(lora_dir)}
        return write_trajectories(pipe, prompts, seeds, params, out_dir, policy=policy, base_sha256=base_sha256,
                                  progress=progress)
    finally:
        pipe.unload_lora_weights()  # a caller's pipeline goes back as it came: the base


def sampling_memory_knobs(params: Params) -> list[str]:
    """The params that lower the sampler's peak memory, with their values now (the out-of-memory message)."""
    return [f"sample.batch_size {params.sample.batch_size} -> smaller (images per UNet call, x2 for guidance)",
            dtype_knob(params.model.dtype)]


def dtype_knob(dtype: str) -> str:
    if dtype == "float32":
        return "model.dtype float32 -> bfloat16 (or float16): half the memory of weights and activations"
    return f"model.dtype {dtype} (already half precision)"


def write_trajectories(pipe, prompts: list[str], seeds: list[int], params: Params, out_dir: Path, *,
                       policy: dict[str, Any] | None = None, base_sha256: str | None = None,
                       progress: Callable[[str], None] = print) -> Path:
    """Sample one group of ``sample.images_per_group`` images per (prompt, seed) with ``pipe`` as it is (the
    base, or with adapters loaded/attached) and write the trajectory dataset; returns the index path.

    The index's ``model`` records the base (``params.model`` and the sha256 of its UNet, ``base_sha256`` when
    the caller knows it: with adapters attached the UNet's own weights are no longer the base's alone) and
    ``policy``: which adapter drew the samples (absent: the base itself).

    Under ``accelerate launch`` every process calls this; they share the groups (``shared_groups``), the main
    process alone writes the dataset and reports, and every process returns once it is written."""
    from prefdiff.data.trajectories import TrajectoryWriter
    from prefdiff.models.loading import model_fingerprint
    from prefdiff.sampling.sampler import SamplingConfig

    sp = params.sample
    cfg = SamplingConfig(**params.sampling.model_dump())
    state = process_state(params)
    if not state.is_main_process:
        for _ in shared_groups(pipe, prompts, seeds, params, cfg, state):  # yields nothing: its share goes to 0
            pass
        wait_for_everyone(state)
        return out_dir / "index.json"
    model = {**params.model.model_dump(), "unet_sha256": base_sha256 or model_fingerprint(pipe), **(policy or {})}
    began = time.time()
    who = f" from {policy.get('policy_lora') or policy.get('policy')}" if policy else ""
    over = f" in {state.num_processes} processes" if state.num_processes > 1 else ""
    progress(f"sampling {len(prompts)} groups x {sp.images_per_group} images{who}, {cfg.num_steps} DDIM steps, "
             f"eta {cfg.eta}, guidance {cfg.guidance_scale}, on {pipe.unet.device}{over}")

    bar = progress_bar(desc="sample", total=len(prompts) * sp.images_per_group, unit="img")

    def report(done: int, total: int) -> None:
        bar.update(done * sp.images_per_group - bar.n)
        with above_bars():
            progress(f"sampled {done}/{total} groups ({time.time() - began:.1f} s)")

    with (bar, memory_knobs("while sampling", sampling_memory_knobs(params)),
          TrajectoryWriter(out_dir, shard_size=sp.shard_size, model=model,
                           params={"sample": sp.in_use(), "sampling": params.sampling.model_dump()}) as writer):
        for group in shared_groups(pipe, prompts, seeds, params, cfg, state, progress=report):
            writer.add_group(group)
    # not after a failure: the launcher ends the other processes when one fails
    wait_for_everyone(state)
    return out_dir / "index.json"


def shared_groups(pipe, prompts: list[str], seeds: list[int], params: Params, cfg, state, *,
                  progress: Callable[[int, int], None] | None = None) -> Iterator:
    """The sampled groups of every (prompt, seed) in order, on the main process; the other processes yield none.

    One process: ``sample_groups`` over all of them. N processes: the groups are cut into the batches one process
    would run (``sample.batch_size`` images, whole groups), and process r runs batches r, r + N, r + 2N, ...; after
    each round of N batches the main process gathers them (in memory, in process order: ``shared_batches``) and
    yields their groups.
    Each batch holds the same groups, seeds and noise as in one process, so the dataset is the one process's byte
    for byte (with the same kernels: same device type, same dtype); the main process holds at most N batches."""
    from prefdiff.sampling.sampler import sample_groups

    size, total = params.sample.images_per_group, len(prompts)
    if state.num_processes == 1:
        yield from sample_groups(pipe, prompts, seeds, size, cfg, batch_size=params.sample.batch_size,
                                 progress=progress)
        return
    per_batch = max(1, params.sample.batch_size // size)  # groups per batch, as sample_groups cuts them
    batches = [slice(start, start + per_batch) for start in range(0, total, per_batch)]

    def run(rows: slice) -> list:
        return list(sample_groups(pipe, prompts[rows], seeds[rows], size, cfg, batch_size=params.sample.batch_size))

    done = 0
    for gathered in shared_batches(batches, run, state):
        for groups in gathered:
            yield from groups
            done += len(groups)
        if progress is not None:
            progress(done, total)
