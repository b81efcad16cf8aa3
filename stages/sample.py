"""Stage ``sample``: draw G-image groups per prompt with the base model, storing full DDIM trajectories.

Reads params ``model``, ``sampling``, ``sample``; writes ``data/trajectories`` (safetensors shards,
index.json, PNGs).
"""

from __future__ import annotations

from stages._common import load_or_exit, say, tracked, workspace


def main() -> None:
    paths = workspace()
    params = load_or_exit(paths)
    from prefdiff.data.trajectories import TrajectoryStore
    from prefdiff.sampling.dataset import sample_dataset

    with tracked("sample", params, paths, ("model", "sampling", "sample")) as log_metrics:
        sample_dataset(params, paths.trajectories, progress=say)
        store = TrajectoryStore.open(paths.trajectories)
        log_metrics({"sample/groups": store.num_groups, "sample/images": store.num_images})


if __name__ == "__main__":
    main()
