"""D3PO training: reference log-probs, resume equivalence, outputs in the diffusers format."""

import pytest
import torch
from safetensors.torch import load_file

from prefdiff.config import parse_params
from prefdiff.data.preferences import PreferenceStore
from prefdiff.data.trajectories import TrajectoryStore
from prefdiff.scorers import get_scorer
from prefdiff.labeling.pairs import label_trajectories
from prefdiff.models.loading import load_pipeline
from prefdiff.models.lora import LORA_WEIGHT_NAME, adapters_disabled
from prefdiff.sampling.dataset import sample_dataset
from prefdiff.sampling.guidance import encode_prompts
from prefdiff.sampling.sampler import SamplingConfig
from prefdiff.training.fit import fit
from prefdiff.training.trajectory import reference_log_probs

OVERRIDES = {
    "sample": {"num_prompts": 2, "images_per_group": 3, "batch_size": 6},
    "sampling": {"num_steps": 4},
    "train": {"epochs": 2, "batch_size": 3, "lr": 0.01, "checkpoint_every": 2},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("d3po")
    params = parse_params(OVERRIDES)
    sample_dataset(params, root / "traj", progress=lambda _: None)
    store = TrajectoryStore.open(root / "traj")
    label_trajectories(store, get_scorer("jpeg_compressibility"), root / "prefs", progress=lambda _: None)
    return params, store, PreferenceStore.open(root / "prefs")


def _fit(params, store, prefs, out, **kw):
    return fit(params, trajectories_dir=store.root, preferences_dir=prefs.root, out_dir=out / "trained",
               checkpoint_dir=out / "ckpt", progress=lambda _: None, **kw)


def _train(data, out, **kw):
    return _fit(*data, out, **kw)


def _reference_inputs(data) -> tuple[tuple, torch.Tensor]:
    """(reference_log_probs' positional arguments for every stored image, the stored sampling log-probs)."""
    params, store, _ = data
    pipe = load_pipeline("builtin:tiny-sd")
    pipe.scheduler.set_timesteps(store.num_steps)
    chain, sampled = store.load_all()
    embeds = encode_prompts(pipe, [store.prompt_of(i) for i in range(store.num_images)])
    return (pipe, chain, store.timesteps, embeds, encode_prompts(pipe, [""]),
            SamplingConfig(**params.sampling.model_dump())), sampled


def test_reference_log_probs_of_the_base_equal_the_sampling_log_probs(data):
    """Sampled by the base with the same guidance, so pi_ref(a|s) is the stored sampling log-prob."""
    args, sampled = _reference_inputs(data)
    ref = reference_log_probs(*args, eta=1.0, batch_size=5)
    torch.testing.assert_close(ref, sampled, rtol=0, atol=1e-4)


def test_interrupted_run_resumes_to_the_same_adapter(data, tmp_path):
    full = _train(data, tmp_path / "full")
    pairs = len(data[2].training_pairs())  # 2 groups x C(3,2) = 6 pairs, fewer if the judge tied some
    steps = 2 * -(-pairs // 3)  # 2 epochs x ceil(pairs / batch 3)
    assert full.steps == steps and len(full.curve) == steps
    partial = _train(data, tmp_path / "resumed", stop_after_steps=1)
    assert partial.steps == 1 and not (tmp_path / "resumed" / "trained").exists()
    resumed = _train(data, tmp_path / "resumed")
    assert resumed.resumed_from_step == 1 and resumed.steps == steps
    a = load_file(str(tmp_path / "full" / "trained" / LORA_WEIGHT_NAME))
    b = load_file(str(tmp_path / "resumed" / "trained" / LORA_WEIGHT_NAME))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["loss"] for r in resumed.curve] == [r["loss"] for r in full.curve]
    # training moved the adapter, and every epoch left a snapshot for the reward curve
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora.up" in k or "lora_B" in k)
    assert sorted(p.name for p in (tmp_path / "full" / "trained" / "snapshots").iterdir()) == ["epoch-0001", "epoch-0002"]


def test_checkpoint_of_other_inputs_is_not_resumed(data, tmp_path):
    _train(data, tmp_path / "run", stop_after_steps=1)
    params, store, prefs = data
    changed = parse_params({**OVERRIDES, "train": {**OVERRIDES["train"], "lr": 0.02}})
    summary = _fit(changed, store, prefs, tmp_path / "run")
    assert summary.resumed_from_step == 0


def test_adapters_disabled_restores_training(data):
    pipe = load_pipeline("builtin:tiny-sd")
    from prefdiff.models.lora import add_lora

    add_lora(pipe.unet, rank=2, alpha=2)
    with adapters_disabled(pipe.unet):
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    assert all(p.requires_grad for n, p in pipe.unet.named_parameters() if "lora_" in n)


def test_previous_round_reference_is_the_adapter_the_round_starts_from(data, tmp_path):
    _train(data, tmp_path / "round1")  # round 1's adapter, the start of round 2
    params, store, prefs = data

    def first_step(reference: str):
        train = {**OVERRIDES["train"], "init_lora": str(tmp_path / "round1" / "trained"), "reference": reference}
        p = parse_params({**OVERRIDES, "train": train})
        return _fit(p, store, prefs, tmp_path / reference, stop_after_steps=1).curve[0]

    # before the first update the policy IS the start adapter: log-ratio 0 against previous_round ...
    assert abs(first_step("previous_round")["mean_log_ratio"]) < 1e-5
    # ... but not against the base, which round 1 already moved away from
    assert abs(first_step("base")["mean_log_ratio"]) > 1e-3


def test_reference_log_probs_of_the_first_steps_are_the_full_tables_first_columns(data):
    """D3PO's timestep_window precomputes only the first W steps; the same values as the whole table's columns."""
    args, _ = _reference_inputs(data)
    full = reference_log_probs(*args, eta=1.0, batch_size=5)
    first = reference_log_probs(*args, eta=1.0, batch_size=5, first_steps=2)
    # the rows are batched differently (5 (image, step) rows per call), which may change fp32 reduction order
    assert first.shape == (full.shape[0], 2)
    torch.testing.assert_close(first, full[:, :2], rtol=1e-5, atol=1e-5)
