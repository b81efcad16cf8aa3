"""Implicit reward accuracy (Diffusion-DPO ELBO form and D3PO trajectory form) on a tiny labeled round."""

import pytest
import torch

from evaluation.implicit import elbo_implicit_accuracy, trajectory_implicit_accuracy
from prefdiff.config import parse_params
from prefdiff.data.preferences import PreferenceStore
from prefdiff.data.trajectories import TrajectoryStore
from prefdiff.scorers import get_scorer
from prefdiff.labeling.pairs import label_trajectories
from prefdiff.models import lora
from prefdiff.models.loading import load_pipeline
from prefdiff.sampling.dataset import sample_dataset
from prefdiff.sampling.guidance import noise_pred
from prefdiff.training.fit import rng
from prefdiff.training.losses import diffusion_dpo_loss, per_sample_mse
from prefdiff.training.images import PairBatchBuilder

OVERRIDES = {"sample": {"num_prompts": 3, "images_per_group": 2, "groups_per_prompt": 2, "batch_size": 12},
             "sampling": {"num_steps": 4}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("implicit")
    params = parse_params(OVERRIDES)
    sample_dataset(params, root / "traj", progress=lambda _: None)
    store = TrajectoryStore.open(root / "traj")
    label_trajectories(store, get_scorer("jpeg_compressibility"), root / "prefs", progress=lambda _: None)
    prefs = PreferenceStore.open(root / "prefs")
    # a "trained" LoRA: random non-zero B so trained != base
    pipe = load_pipeline("builtin:tiny-sd")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        params_ = lora.add_lora(pipe.unet, rank=4, alpha=4.0)
        with torch.no_grad():
            for p in params_:
                p.add_(0.05 * torch.randn_like(p))
    lora.save_lora(pipe.unet, root / "lora")
    zero = load_pipeline("builtin:tiny-sd")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lora.add_lora(zero.unet, rank=4, alpha=4.0)  # B = 0: identical to the base
    lora.save_lora(zero.unet, root / "zero")
    return root, store, prefs


def test_at_init_every_pair_is_a_tie(data):
    root, store, prefs = data
    pipe = load_pipeline("builtin:tiny-sd")
    elbo = elbo_implicit_accuracy(pipe, root / "zero", prefs.image_pairs(store), draws=2)
    traj = trajectory_implicit_accuracy(pipe, root / "zero", store, prefs.training_pairs(), guidance=5.0, eta=1.0)
    assert elbo.accuracy == 0.5 and elbo.mean_margin == 0.0
    assert traj.accuracy == 0.5 and traj.mean_margin == 0.0
    assert elbo.pairs == traj.pairs == len(prefs.training_pairs())


def test_elbo_accuracy_matches_a_hand_recomputation(data):
    """Mean over K draws of the Diffusion-DPO z, recomputed with the training loss function."""
    root, store, prefs = data
    pairs = prefs.image_pairs(store)
    pipe = load_pipeline("builtin:tiny-sd")
    got = elbo_implicit_accuracy(pipe, root / "lora", pairs, beta=5000.0, draws=3, seed=7, batch_size=len(pairs))
    builder = PairBatchBuilder(pipe, pairs, device=torch.device("cpu"), empty_prompt_prob=0.0)
    rows, b = torch.arange(len(pairs)), len(pairs)
    z = []
    for k in range(3):
        gen = lambda: rng(7, 0, k)  # noqa: E731
        with torch.no_grad():
            x_t, t, target, cond = builder.build(rows, gen(), both=True)
            ref = per_sample_mse(noise_pred(pipe.unet, x_t, t, cond), target)
            lora.load_lora_weights(pipe, root / "lora")
            pol = per_sample_mse(noise_pred(pipe.unet, x_t, t, cond), target)
            pipe.unload_lora_weights()
        out = diffusion_dpo_loss(pol[:b], pol[b:], ref[:b], ref[b:], beta=5000.0)
        z.append(-0.5 * 5000.0 * ((pol[:b] - pol[b:]) - (ref[:b] - ref[b:])))
        assert torch.isfinite(out.loss)
    margin = torch.stack(z).double().mean(0)
    expected = float(((margin > 0).double() + 0.5 * (margin == 0).double()).mean())
    assert got.accuracy == pytest.approx(expected)
    assert got.mean_margin == pytest.approx(float(margin.mean()), rel=1e-5)


def test_trajectory_accuracy_flips_when_labels_flip(data):
    root, store, prefs = data
    pipe = load_pipeline("builtin:tiny-sd")
    pairs = prefs.training_pairs()
    got = trajectory_implicit_accuracy(pipe, root / "lora", store, pairs, guidance=5.0, eta=1.0)
    from dataclasses import replace

    flipped = [replace(p, winner=p.loser, loser=p.winner) for p in pairs]
    back = trajectory_implicit_accuracy(pipe, root / "lora", store, flipped, guidance=5.0, eta=1.0)
    assert got.accuracy + back.accuracy == pytest.approx(1.0)
    assert got.mean_margin == pytest.approx(-back.mean_margin)
    assert 0.0 <= got.low <= got.accuracy <= got.high <= 1.0
