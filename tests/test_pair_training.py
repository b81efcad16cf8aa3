"""Diffusion-DPO, SFT, reward-weighted and DDPO trainers on a tiny labeled round; full fine-tuning."""

import math

import pytest
import torch
from safetensors.torch import load_file

from prefdiff.config import parse_params
from prefdiff.data.preferences import PreferenceStore
from prefdiff.data.trajectories import TrajectoryStore
from prefdiff.scorers import get_scorer
from prefdiff.labeling.pairs import label_trajectories
from prefdiff.models.finetuned import is_full_unet, trained_weights
from prefdiff.models.loading import load_pipeline
from prefdiff.models.lora import LORA_WEIGHT_NAME
from prefdiff.sampling.dataset import sample_dataset
from prefdiff.training.pairs import PairBatchBuilder, train_pairs
from prefdiff.training.run import train_method
from prefdiff.training.setup import lr_at

BASE = {
    "sample": {"num_prompts": 2, "images_per_group": 3, "batch_size": 6},
    "sampling": {"num_steps": 4},
    "train": {"epochs": 2, "batch_size": 3, "lr": 0.01, "checkpoint_every": 2},
}


def _params(**train):
    return parse_params({**BASE, "train": {**BASE["train"], **train}})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    params = _params()
    sample_dataset(params, root / "traj", progress=lambda _: None)
    store = TrajectoryStore.open(root / "traj")
    label_trajectories(store, get_scorer("jpeg_compressibility"), root / "prefs", progress=lambda _: None)
    return root, store, PreferenceStore.open(root / "prefs")


def _train(data, out, params, **kw):
    root, _, _ = data
    return train_method(params, trajectories_dir=root / "traj", preferences_dir=root / "prefs",
                        lora_out=out / "lora", checkpoint_dir=out / "ckpt", progress=lambda _: None, **kw)


def test_pairs_share_noise_and_timestep(data):
    _, store, prefs = data
    pipe = load_pipeline("builtin:tiny-sd")
    pairs = prefs.image_pairs(store)
    builder = PairBatchBuilder(pipe, pairs, device=torch.device("cpu"), empty_prompt_prob=0.0)
    b = len(pairs)
    x_t, t, target, cond = builder.build(torch.arange(b), torch.Generator().manual_seed(0), both=True)
    assert x_t.shape[0] == 2 * b and len(cond) == 2 * b
    assert torch.equal(t[:b], t[b:])  # the same timestep for winner and loser
    assert torch.equal(target[:b], target[b:])  # epsilon prediction: the target IS the shared noise
    assert not torch.equal(x_t[:b], x_t[b:])  # different images under the same noise
    assert torch.equal(cond.embeds[:b], cond.embeds[b:])  # one prompt per pair


def test_empty_prompt_dropout_is_per_pair(data):
    _, store, prefs = data
    pipe = load_pipeline("builtin:tiny-sd")
    pairs = prefs.image_pairs(store)
    builder = PairBatchBuilder(pipe, pairs, device=torch.device("cpu"), empty_prompt_prob=0.999)
    b = len(pairs)
    *_, cond = builder.build(torch.arange(b), torch.Generator().manual_seed(0), both=True)
    empty = builder.table[builder.empty_row].embeds
    assert all(torch.equal(cond.embeds[i], empty[0]) for i in range(2 * b))


def test_diffusion_dpo_starts_at_ln2_and_learns(data, tmp_path):
    summary = _train(data, tmp_path, _params(method="diffusion_dpo", dpo_beta=5000.0))
    first = summary.curve[0]
    # LoRA B = 0: policy and reference (adapters disabled) are bit-identical at step 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["implicit_acc"] == 0.5  # every z == 0 is a tie, counted as half
    assert first["model_mse"] == first["ref_mse"]
    assert any(row["loss"] != first["loss"] for row in summary.curve[1:])
    lora = load_file(str(tmp_path / "lora" / LORA_WEIGHT_NAME))
    assert any(k.endswith("lora.up.weight") and v.abs().sum() > 0 for k, v in lora.items())
    assert (tmp_path / "lora" / "snapshots" / "epoch-0002").is_dir()


def test_beta_conventions_train_identically(data, tmp_path):
    a = _train(data, tmp_path / "official", _params(method="diffusion_dpo", dpo_beta=4000.0, epochs=1))
    b = _train(data, tmp_path / "diffusers", _params(method="diffusion_dpo", dpo_beta=2000.0,
                                                      dpo_beta_convention="diffusers", epochs=1))
    assert [r["loss"] for r in a.curve] == [r["loss"] for r in b.curve]


def test_pair_trainer_resumes_to_the_same_adapter(data, tmp_path):
    params = _params(method="diffusion_dpo", checkpoint_every=1)
    _train(data, tmp_path / "full", params)
    partial = _train(data, tmp_path / "resumed", params, stop_after_steps=1)
    assert partial.steps == 1 and not (tmp_path / "resumed" / "lora").exists()
    resumed = _train(data, tmp_path / "resumed", params)
    assert resumed.resumed_from_step == 1
    a = load_file(str(tmp_path / "full" / "lora" / LORA_WEIGHT_NAME))
    b = load_file(str(tmp_path / "resumed" / "lora" / LORA_WEIGHT_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["sft", "reward_weighted", "ddpo"])
def test_baselines_train(data, tmp_path, method):
    summary = _train(data, tmp_path, _params(method=method, epochs=1))
    assert summary.method == method and summary.steps >= 1
    assert all(math.isfinite(row["loss"]) for row in summary.curve)
    lora = load_file(str(tmp_path / "lora" / LORA_WEIGHT_NAME))
    assert any(k.endswith("lora.up.weight") and v.abs().sum() > 0 for k, v in lora.items())


def test_ddpo_first_ratio_is_one(data, tmp_path):
    """At LoRA init the policy is the sampler, so every PPO ratio is 1 (to float noise): nothing clipped."""
    summary = _train(data, tmp_path, _params(method="ddpo", epochs=1, ddpo_clip_range=1e-3))
    assert summary.curve[0]["clip_frac"] == 0.0
    assert summary.curve[0]["approx_kl"] < 1e-8


@pytest.mark.parametrize("method", ["diffusion_dpo", "d3po"])
def test_full_finetuning(data, tmp_path, method):
    summary = _train(data, tmp_path, _params(method=method, finetune="full", epochs=1, lr=1e-4))
    assert summary.curve[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # reference = the starting UNet
    out = tmp_path / "lora"
    assert is_full_unet(out) and not (out / LORA_WEIGHT_NAME).exists()
    pipe = load_pipeline("builtin:tiny-sd")
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with trained_weights(pipe, out):
        changed = sum(not torch.equal(base[k], v) for k, v in pipe.unet.state_dict().items())
    assert changed > 0
    assert all(torch.equal(base[k], v) for k, v in pipe.unet.state_dict().items())  # restored


def test_imported_pairs_refuse_trajectory_methods(data, tmp_path):
    from tests.pickapic_fixture import default_rows, write_synthetic_pickapic
    from prefdiff.data.pickapic import ImportConfig, import_pickapic

    parquet = tmp_path / "pairs.parquet"
    write_synthetic_pickapic(parquet, default_rows())
    import_pickapic([parquet], tmp_path / "prefs", ImportConfig(resolution=64), progress=lambda _: None)
    prefs = PreferenceStore.open(tmp_path / "prefs")
    summary = train_pairs(_params(method="diffusion_dpo", epochs=1), prefs, lora_out=tmp_path / "lora",
                          checkpoint_dir=tmp_path / "ckpt", progress=lambda _: None)
    assert summary.pairs == len(prefs.image_pairs()) and summary.curve[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    with pytest.raises(Exception, match="diffusion_dpo, sft or reward_weighted"):
        train_method(_params(method="d3po"), trajectories_dir=data[0] / "traj", preferences_dir=tmp_path / "prefs",
                     lora_out=tmp_path / "x", checkpoint_dir=tmp_path / "y", progress=lambda _: None)


def test_warmup_schedule():
    assert [lr_at(s, 1.0, 4) for s in range(1, 7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_at(1, 2e-5, 0) == 2e-5


def test_sdxl_diffusion_dpo_step_and_micro_conditioning(tmp_path):
    """Tiny SDXL: one Diffusion-DPO run on imported pairs; time ids carry each image's original size and crop."""
    from prefdiff.data.pickapic import ImportConfig, import_pickapic
    from tests.pickapic_fixture import default_rows, write_synthetic_pickapic

    parquet = write_synthetic_pickapic(tmp_path / "pairs.parquet", default_rows())
    import_pickapic([parquet], tmp_path / "prefs", ImportConfig(resolution=64, crop="random", seed=3),
                    progress=lambda _: None)
    prefs = PreferenceStore.open(tmp_path / "prefs")
    pairs = prefs.image_pairs()
    pipe = load_pipeline("builtin:tiny-sdxl")
    builder = PairBatchBuilder(pipe, pairs, device=torch.device("cpu"), empty_prompt_prob=0.0)
    b = len(pairs)
    *_, cond = builder.build(torch.arange(b), torch.Generator().manual_seed(0), both=True)
    assert cond.pooled is not None and cond.time_ids.shape == (2 * b, 6)
    for i, pair in enumerate(pairs):
        for row, meta in ((i, pair.winner_meta), (b + i, pair.loser_meta)):
            expected = [*meta["original_size"], *meta["crop_top_left"], 64, 64]
            assert cond.time_ids[row].tolist() == expected
    params = parse_params({"model": {"source": "builtin:tiny-sdxl"},
                           "train": {"method": "diffusion_dpo", "epochs": 1, "batch_size": 2, "lr": 0.01}})
    summary = train_pairs(params, prefs, lora_out=tmp_path / "lora", checkpoint_dir=tmp_path / "ckpt",
                          progress=lambda _: None)
    assert summary.curve[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    lora = load_file(str(tmp_path / "lora" / LORA_WEIGHT_NAME))
    assert any(k.endswith("lora.up.weight") and v.abs().sum() > 0 for k, v in lora.items())
