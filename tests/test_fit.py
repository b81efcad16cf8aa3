"""A new method is one Method subclass plus one catalog line, and trains through the one ``fit`` loop."""

import hashlib
import math
import struct

import pytest
import torch
from safetensors.torch import load_file

from prefdiff import catalog
from prefdiff.config import ParamsError, parse_params
from prefdiff.data.trajectories import TrajectoryStore
from prefdiff.labeling.pairs import label_trajectories
from prefdiff.models.lora import LORA_WEIGHT_NAME
from prefdiff.sampling.dataset import sample_dataset
from prefdiff.scorers import get_scorer
from prefdiff.training.fit import Method, fit, rng

TARGET, LR, T = 0.05, 0.01, 4
OVERRIDES = {
    "sample": {"num_prompts": 2, "images_per_group": 3, "batch_size": 6},
    "sampling": {"num_steps": T},
    # weight decay 0 and a tiny Adam eps: Adam's first step then moves every weight with a gradient by
    # lr * g / (|g| + eps) = lr to a relative 1e-7 (|g| here is ~4e-5)
    "train": {"method": "pull", "epochs": 2, "batch_size": 2, "gradient_accumulation_steps": 2, "lr": LR,
              "weight_decay": 0.0, "adam_eps": 1e-12, "checkpoint_every": 1},
}


class PullLoRAUp(Method):
    """Trivial: (mean of every LoRA up (B) weight - TARGET)^2, on trajectory pairs, at half of the timesteps.

    It records the items and denoising steps ``fit`` hands it, so the test can check the loop's bookkeeping.
    """

    data = "trajectories"
    metrics = ("loss", "up_mean")
    seen: list[tuple[int, int | None]] = []  # (item, step index) per unit row, in order
    timestep_window: int | None = None

    def __init__(self, ctx):
        super().__init__(ctx)
        self.items = len(ctx.preferences.training_pairs())
        self.timestep_fraction = 0.5
        self.timestep_window = type(self).timestep_window
        self.up = [p for n, p in ctx.model.raw_unet.named_parameters() if "lora_B" in n]

    def loss(self, unit):
        for row, step in zip(unit.rows.tolist(), unit.step_index.tolist()):
            PullLoRAUp.seen.append((row, step))
        up_mean = torch.cat([p.flatten() for p in self.up]).mean()
        loss = (up_mean - TARGET) ** 2
        return loss, {"loss": float(loss.detach()), "up_mean": float(up_mean.detach())}


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    base = parse_params({k: v for k, v in OVERRIDES.items() if k != "train"})
    sample_dataset(base, root / "traj", progress=lambda _: None)
    label_trajectories(TrajectoryStore.open(root / "traj"), get_scorer("jpeg_compressibility"), root / "prefs",
                       progress=lambda _: None)
    return root


def test_a_new_method_is_one_class_and_one_catalog_line(labeled, tmp_path, monkeypatch):
    with pytest.raises(ParamsError, match="unknown method 'pull'; allowed: d3po, diffusion_dpo"):
        parse_params(OVERRIDES)
    monkeypatch.setitem(catalog.TRAIN_METHODS, "pull", f"{__name__}:PullLoRAUp")  # the one registry line
    monkeypatch.setattr(PullLoRAUp, "seen", [])
    params = parse_params(OVERRIDES)
    summary = fit(params, trajectories_dir=labeled / "traj", preferences_dir=labeled / "prefs",
                  out_dir=tmp_path / "trained", checkpoint_dir=tmp_path / "ckpt", progress=lambda _: None)

    pairs = summary.items
    steps_per_epoch = math.ceil(math.ceil(pairs / 2) / 2)  # micro-batches of 2 pairs, 2 per optimizer step
    assert summary.method == "pull" and summary.steps == 2 * steps_per_epoch == len(summary.curve)
    assert summary.metrics()["timesteps_per_item"] == T // 2
    curve = summary.curve
    # before any update the up weights are 0 (LoRA init): loss = TARGET^2
    assert curve[0]["up_mean"] == 0.0 and curve[0]["loss"] == pytest.approx(TARGET**2, rel=1e-6)
    # Adam's first step moves every up weight by +lr (the gradient is negative and equal for all)
    assert curve[1]["up_mean"] == pytest.approx(LR, rel=1e-6)
    assert curve[1]["loss"] == pytest.approx((TARGET - LR) ** 2, rel=1e-5)
    assert all(b["loss"] < a["loss"] for a, b in zip(curve, curve[1:]))  # moving toward TARGET every step
    # every pair once per epoch, each at T/2 distinct denoising steps
    per_epoch = pairs * (T // 2)
    assert len(PullLoRAUp.seen) == 2 * per_epoch
    for epoch in (PullLoRAUp.seen[:per_epoch], PullLoRAUp.seen[per_epoch:]):
        assert sorted({row for row, _ in epoch}) == list(range(pairs))
        for row in range(pairs):
            steps = [s for r, s in epoch if r == row]
            assert len(steps) == len(set(steps)) == T // 2 and all(0 <= s < T for s in steps)
    # the saved LoRA: every up weight moved by the same amount, the down weights (zero gradient) did not
    final = load_file(str(tmp_path / "trained" / LORA_WEIGHT_NAME))
    first = load_file(str(tmp_path / "trained" / "snapshots" / "epoch-0001" / LORA_WEIGHT_NAME))
    ups = torch.cat([v.flatten() for k, v in final.items() if "lora.up" in k])
    assert ups.min() > LR and ups.max() - ups.min() < 1e-7
    assert all(torch.equal(final[k], first[k]) for k in final if "lora.down" in k)


def test_batch_seeds_are_a_stable_hash_of_the_integers():
    """The same draws in any process or Python version: sha256 of the 8-byte integers, not hash()."""
    assert rng(0, 1, 2).initial_seed() == 4250229608886913386
    digest = hashlib.sha256(struct.pack("<3q", 0, 0, -1)).digest()
    assert rng(0, 0, -1).initial_seed() == int.from_bytes(digest[:8], "little") >> 2
    assert rng(0, 1, 2).initial_seed() != rng(0, 2, 1).initial_seed()


def test_timestep_window_trains_only_the_chains_first_steps(labeled, tmp_path, monkeypatch):
    """train.<method>.timestep_window W: each item's steps come from the first W (highest-noise) steps only."""
    monkeypatch.setitem(catalog.TRAIN_METHODS, "pull", f"{__name__}:PullLoRAUp")
    monkeypatch.setattr(PullLoRAUp, "seen", [])
    monkeypatch.setattr(PullLoRAUp, "timestep_window", 2)
    summary = fit(parse_params(OVERRIDES), trajectories_dir=labeled / "traj", preferences_dir=labeled / "prefs",
                  out_dir=tmp_path / "trained", checkpoint_dir=tmp_path / "ckpt", progress=lambda _: None)
    assert summary.metrics()["timestep_window"] == 2 and summary.metrics()["timesteps_per_item"] == 1  # ceil(0.5 x 2)
    steps = [s for _, s in PullLoRAUp.seen]
    assert len(steps) == 2 * summary.items and set(steps) == {0, 1}  # both window steps drawn, nothing later

    monkeypatch.setattr(PullLoRAUp, "timestep_window", T + 1)
    with pytest.raises(ValueError, match=f"train.pull.timestep_window = {T + 1}: the trajectories have only {T} "
                                         f"steps; allowed: 1..{T} or null"):
        fit(parse_params(OVERRIDES), trajectories_dir=labeled / "traj", preferences_dir=labeled / "prefs",
            out_dir=tmp_path / "t2", checkpoint_dir=tmp_path / "c2", progress=lambda _: None)
