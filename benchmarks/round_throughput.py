"""End-to-end throughput of one round (sample + label + train) on params.yaml's model, and its per-unit costs.

The stages' library calls without DVC/MLflow (as ``experiments/tune_digits.py``): ``sample_dataset``,
``label_trajectories`` with ``label.judge``, ``fit`` with ``train.method``, on ``params.yaml`` (default: the
digits model, D3PO) with the sizes given by the flags. Prints the wall and CPU seconds of each phase,
trajectories (one image's recorded chain) per hour, and the per-unit costs of the README's cost model:

    c_sample  seconds per image-step sampled (UNet call of 2 guidance branches, log-prob, chain copy; the VAE
              decode and the shard writes are spread over the steps)
    c_label   seconds per image judged (PNG read, scorer)
    c_ref     seconds per (paired image, window step) of D3PO's one-off reference log-prob pass
    c_train   seconds per backward unit (a pair at one timestep: one UNet call of 4 inputs and its backward;
              optimizer steps, checkpoints and snapshots spread over them)
    fixed     model, judge and dataset set-up (seconds, per round)

The reference pass is told apart from training by the times at which ``fit`` reports its progress lines (its
"reference log-probs ..." line starts the pass, the "<method>: N pairs ..." line ends it).

    python -m benchmarks.round_throughput [--num-prompts 10] [--groups-per-prompt 2] [--images-per-group 2]
        [--epochs 1] [--timestep-fraction 1.0] [--timestep-window 5] [--predict-from costs.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"


class Clock:
    """Wall and CPU seconds since creation, and the times at which progress lines arrived."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        self.marks: list[tuple[float, float, str]] = []

    def now(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, time.process_time() - self.cpu0

    def line(self, text: str) -> None:
        self.marks.append((*self.now(), text))

    def first(self, prefix: str) -> tuple[float, float]:
        for wall, cpu, text in self.marks:
            if text.startswith(prefix):
                return wall, cpu
        raise RuntimeError(f"fit printed no line starting with {prefix!r}; its progress lines changed")


def _overrides(args) -> dict:
    sample = {"num_prompts": args.num_prompts, "groups_per_prompt": args.groups_per_prompt,
              "images_per_group": args.images_per_group}
    train = {"epochs": args.epochs}
    if args.timestep_fraction is not None or args.timestep_window is not None:
        method = yaml.safe_load(PARAMS.read_text())["train"]["method"]
        train[method] = {k: v for k, v in (("timestep_fraction", args.timestep_fraction),
                                           ("timestep_window", args.timestep_window)) if v is not None}
    return {"sample": sample, "train": train}


def run_round(args, work: Path) -> dict:
    from prefdiff.config import merged, parse_params
    from prefdiff.data.preferences import PreferenceStore
    from prefdiff.data.trajectories import TrajectoryStore
    from prefdiff.labeling.pairs import judge_scorer, label_trajectories
    from prefdiff.models.loading import load_pipeline
    from prefdiff.sampling.dataset import sample_dataset
    from prefdiff.training.fit import fit

    params = parse_params(merged(yaml.safe_load(PARAMS.read_text()), _overrides(args)), str(PARAMS))
    quiet = lambda line: None  # noqa: E731 - the stages' progress lines are not this script's output
    phases: dict[str, tuple[float, float]] = {}

    def timed(name, fn):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        phases[name] = (time.perf_counter() - w0, time.process_time() - c0)
        return out

    pipe = timed("load", lambda: load_pipeline(params.model.source, dtype=params.model.dtype,
                                               device=params.model.device))
    trajectories, preferences = work / "trajectories", work / "preferences"
    timed("sample", lambda: sample_dataset(params, trajectories, pipe=pipe, progress=quiet))
    lp = params.label
    judge = timed("judge_load", lambda: judge_scorer(lp.judge, lp.judge_args, lp.jpeg_quality))
    timed("label", lambda: label_trajectories(TrajectoryStore.open(trajectories), judge, preferences,
                                              tie_margin=lp.tie_margin, progress=quiet))
    clock = Clock()
    summary = fit(params, trajectories_dir=trajectories, preferences_dir=preferences, out_dir=work / "out",
                  checkpoint_dir=work / "checkpoints", progress=clock.line)
    fit_wall, fit_cpu = clock.now()
    name = params.train.method
    timestep_method = "timesteps_per_item" in summary.extra
    start = clock.first(f"{name}: ")  # after the model set-up and (D3PO) the reference pass
    ref_start = clock.first("reference log-probs") if timestep_method and name == "d3po" else start
    phases["train_setup"] = ref_start
    phases["reference_pass"] = (start[0] - ref_start[0], start[1] - ref_start[1])
    phases["train"] = (fit_wall - start[0], fit_cpu - start[1])

    store = TrajectoryStore.open(trajectories)
    images = store.num_images
    decided = PreferenceStore.open(preferences).training_pairs()
    pairs = len(decided)
    paired_images = len({i for p in decided for i in (p.winner, p.loser)})  # what D3PO's reference pass scores
    steps = params.sampling.num_steps
    window = summary.extra.get("timestep_window", steps)
    per_item = summary.extra.get("timesteps_per_item", 1)
    units = params.train.epochs * pairs * per_item
    counts = {"prompts": len(set(store.prompt_of(i) for i in range(images))), "images": images,
              "groups": images // params.sample.images_per_group, "images_per_group": params.sample.images_per_group,
              "steps": steps, "decided_pairs": pairs, "epochs": params.train.epochs, "window": window,
              "timesteps_per_item": per_item, "backward_units": units,
              "reference_image_steps": paired_images * window if name == "d3po" else 0}
    return {"method": name, "model": params.model.source, "phases_wall_cpu_s": phases, "counts": counts}


def unit_costs(result: dict, which: int) -> dict:
    """Per-unit costs (``which`` 0: wall, 1: CPU seconds) from one measured round."""
    p, c = result["phases_wall_cpu_s"], result["counts"]
    return {
        "c_sample": p["sample"][which] / (c["images"] * c["steps"]),
        "c_label": p["label"][which] / c["images"],
        "c_ref": p["reference_pass"][which] / c["reference_image_steps"] if c["reference_image_steps"] else 0.0,
        "c_train": p["train"][which] / c["backward_units"],
        "fixed": p["load"][which] + p["judge_load"][which] + p["train_setup"][which],
    }


def predict(costs: dict, counts: dict) -> float:
    """The cost model: seconds of a round of these ``counts`` at these per-unit ``costs``."""
    return (costs["fixed"] + counts["images"] * (counts["steps"] * costs["c_sample"] + costs["c_label"])
            + counts["reference_image_steps"] * costs["c_ref"] + counts["backward_units"] * costs["c_train"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="one round's throughput (sample + label + train) and unit costs")
    parser.add_argument("--num-prompts", type=int, default=10, help="sample.num_prompts (params.yaml: all 40)")
    parser.add_argument("--groups-per-prompt", type=int, default=2, help="sample.groups_per_prompt (params.yaml: 24)")
    parser.add_argument("--images-per-group", type=int, default=2, help="sample.images_per_group G")
    parser.add_argument("--epochs", type=int, default=1, help="train.epochs")
    parser.add_argument("--timestep-fraction", type=float, default=None, help="train.<method>.timestep_fraction")
    parser.add_argument("--timestep-window", type=int, default=None, help="train.<method>.timestep_window")
    parser.add_argument("--predict-from", type=Path, default=None,
                        help="a JSON this script wrote (--save): predict this round from its unit costs")
    parser.add_argument("--save", type=Path, default=None, help="write the result and unit costs to this JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="prefdiff-round-") as tmp:
        result = run_round(args, Path(tmp))
    p, c = result["phases_wall_cpu_s"], result["counts"]
    total_wall, total_cpu = sum(v[0] for v in p.values()), sum(v[1] for v in p.values())
    result |= {"total_wall_s": round(total_wall, 2), "total_cpu_s": round(total_cpu, 2),
               "trajectories_per_hour_wall": round(c["images"] / total_wall * 3600),
               "trajectories_per_hour_cpu": round(c["images"] / total_cpu * 3600),
               "unit_costs_wall": unit_costs(result, 0), "unit_costs_cpu": unit_costs(result, 1)}
    print(f"round: {result['method']} on {result['model']}, {c['images']} images ({c['groups']} groups x "
          f"{c['images_per_group']}), {c['steps']} steps, {c['decided_pairs']} pairs, {c['epochs']} epochs x "
          f"{c['timesteps_per_item']}/{c['window']} timesteps -> {c['backward_units']} backward units")
    for name, (wall, cpu) in p.items():
        print(f"   {name:15s} wall {wall:8.2f} s   cpu {cpu:8.2f} s")
    print(f"   total           wall {total_wall:8.2f} s   cpu {total_cpu:8.2f} s -> "
          f"{result['trajectories_per_hour_wall']} trajectories/hour (wall), "
          f"{result['trajectories_per_hour_cpu']} per CPU-hour")
    for kind in ("wall", "cpu"):
        costs = result[f"unit_costs_{kind}"]
        print(f"   unit costs ({kind}): " + ", ".join(f"{k} {v:.4g} s" for k, v in costs.items()))
    if args.predict_from is not None:
        base = json.loads(args.predict_from.read_text())
        result["prediction"] = {}
        for kind, measured in (("wall", total_wall), ("cpu", total_cpu)):
            predicted = predict(base[f"unit_costs_{kind}"], c)
            result["prediction"][kind] = {"predicted_s": round(predicted, 2), "measured_s": round(measured, 2),
                                          "ratio": round(measured / predicted, 3)}
            print(f"   predicted from {args.predict_from} ({kind}): {predicted:.1f} s, measured {measured:.1f} s "
                  f"(measured / predicted {measured / predicted:.2f})")
    if args.save is not None:
        args.save.write_text(json.dumps(result, indent=2))
    print("SUMMARY " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
