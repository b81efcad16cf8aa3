"""Failures that used to pass silently: non-finite training steps, a policy that learned nothing, NaN
log-probs at sampling, out of memory; each is now skipped/stopped with one line naming the key to change.

Issue 12: ``train.lora_alpha: 1e30`` logged loss exactly ln 2 with zero gradients for every step, exit 0,
and a version was registered; a scheduler config with ``set_alpha_to_one: true`` stored NaN log-probs.
"""

import json
import math
import runpy
import shutil

import pytest
import torch
import yaml

from prefdiff import catalog
from prefdiff.config import ParamsError, parse_params
from prefdiff.data.trajectories import TrajectoryStore
from prefdiff.labeling.pairs import label_trajectories
from prefdiff.models.loading import load_pipeline
from prefdiff.profile import merged
from prefdiff.sampling import sampler
from prefdiff.sampling.dataset import sample_dataset, write_trajectories
from prefdiff.sampling.guards import NumericsError, OutOfMemory
from prefdiff.sampling.sampler import SamplingConfig, sample_groups
from prefdiff.scorers import get_scorer
from prefdiff.training.fit import Method, did_not_learn, fit

from conftest import REPO, isolated_mlflow

T = 4
OVERRIDES = {
    "sample": {"num_prompts": 2, "images_per_group": 3, "batch_size": 6},  # 6 pairs
    "sampling": {"num_steps": T},
    "train": {"epochs": 2, "batch_size": 3, "lr": 0.01, "checkpoint_every": 2},  # 4 optimizer steps
}


def _params(**train):
    return parse_params(merged(OVERRIDES, {"train": train}))


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    sample_dataset(parse_params(OVERRIDES), root / "traj", progress=lambda _: None)
    label_trajectories(TrajectoryStore.open(root / "traj"), get_scorer("jpeg_compressibility"), root / "prefs",
                       progress=lambda _: None)
    return root


def _fit(labeled, out, params, **kw):
    return fit(params, trajectories_dir=labeled / "traj", preferences_dir=labeled / "prefs", out_dir=out / "trained",
               checkpoint_dir=out / "ckpt", progress=lambda _: None, **kw)


# ------------------------------------------------------------------------------------------- training


# The reproduction, train.lora_alpha 1e30 (every gradient norm overflowed to inf, clipping made every
# gradient zero, the LoRA never moved and the run "succeeded"), is now refused by validation (the bound 4096,
# tests/test_bad_inputs.py). The largest scale validation allows, at lr 1, still overflows on the tiny model:
# step 1 moves the LoRA far, steps 2-4 give NaN gradients, which is what the guard must catch.
OVERFLOW = {"lora_alpha": 4096.0, "lora_rank": 1, "lr": 1.0}


def test_overflowing_gradients_stop_the_run_naming_the_step_values_and_key(labeled, tmp_path, capsys):
    with pytest.raises(ParamsError, match=r"train.lora_alpha = 1e\+30: Input should be less than or equal to 4096"):
        _params(lora_alpha=1e30)
    with pytest.raises(NumericsError) as err:
        _fit(labeled, tmp_path, _params(**OVERFLOW, max_nonfinite_steps=1))
    message = str(err.value)
    assert message.startswith("training stopped at optimizer step 3/4: 2 steps with a non-finite loss or gradient, "
                              "more than train.max_nonfinite_steps = 1 (this step: loss 0.693147, gradient norm nan)")
    assert "train.lora_alpha 4096 too large (LoRA scale alpha/rank = 4096" in message
    assert "\n" not in message and not (tmp_path / "trained").exists()  # nothing for register to pick up
    err_text = capsys.readouterr().err
    assert "reference log-probs: 100%" in err_text and "img-step/s" in err_text  # the reference pass's bar

    # within the allowance the non-finite steps are skipped and counted
    summary = _fit(labeled, tmp_path / "default", _params(**OVERFLOW))
    assert summary.extra["nonfinite_steps"] == 3 and [row["skipped"] for row in summary.curve] == [0, 1, 1, 1]


def test_train_stage_exits_2_with_one_error_line_and_registers_nothing(labeled, tmp_path, monkeypatch, capsys,
                                                                      mlflow_uri):
    """``python -m stages.train`` whose gradients overflow: exit status 2 and one ``error:`` line."""
    params = merged(yaml.safe_load((REPO / "params.yaml").read_text()), merged(OVERRIDES, {
        "model": {"source": "builtin:tiny-sd"},
        "train": {**OVERFLOW, "max_nonfinite_steps": 1, "d3po": {"timestep_window": None}}}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(labeled / "traj", tmp_path / "data" / "trajectories")
    shutil.copytree(labeled / "prefs", tmp_path / "data" / "preferences")
    monkeypatch.chdir(tmp_path)
    with isolated_mlflow(mlflow_uri), pytest.raises(SystemExit) as exit_:
        runpy.run_module("stages.train", run_name="__main__")
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: training stopped at optimizer step 3/4: 2 steps with a "
                                                     "non-finite")
    assert not (tmp_path / "models" / "trained").exists() and not (tmp_path / "metrics" / "train.json").exists()


class ScriptedLoss(Method):
    """One unit per optimizer step (no timesteps): loss = (mean LoRA up weight - 0.05)^2, scripted per step.

    ``script[i % len(script)]`` for the i-th call: "ok", "nan" (the loss times NaN: NaN loss and gradients) or
    "flat" (a constant loss: every weight's gradient is zero but present). It records the up mean it sees at
    every call."""

    data = "trajectories"
    metrics = ("loss", "up_mean")
    script: list[str] = []
    seen: list[float] = []

    def __init__(self, ctx):
        super().__init__(ctx)
        self.items = len(ctx.preferences.training_pairs())
        self.up = [p for n, p in ctx.model.raw_unet.named_parameters() if "lora_B" in n]
        self.trainable = ctx.model.trainable

    def loss(self, unit):
        up_mean = torch.cat([p.flatten() for p in self.up]).mean()
        kind = self.script[len(self.seen) % len(self.script)]
        ScriptedLoss.seen.append(float(up_mean.detach()))
        loss = (up_mean - 0.05) ** 2
        if kind == "nan":
            loss = loss * float("nan")
        elif kind == "flat":
            loss = 0.5 + 0.0 * sum(p.sum() for p in self.trainable)  # every trainable weight gets a zero gradient
        return loss, {"loss": float(loss.detach()), "up_mean": float(up_mean.detach())}


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setitem(catalog.TRAIN_METHODS, "scripted", f"{__name__}:ScriptedLoss")
    monkeypatch.setattr(ScriptedLoss, "seen", [])

    def run(script, labeled, out, **train):
        monkeypatch.setattr(ScriptedLoss, "script", script)
        return _fit(labeled, out, _params(method="scripted", batch_size=2, **train))  # 6 pairs: 3 steps per epoch
    return run


def test_a_non_finite_step_is_skipped_and_counted(scripted, labeled, tmp_path, capsys):
    summary = scripted(["ok", "nan", "ok"], labeled, tmp_path)
    seen = ScriptedLoss.seen  # the up mean each step started from
    assert seen[0] == 0.0 and seen[1] > 0.0  # step 1 was taken
    assert seen[2] == seen[1]  # step 2 (NaN) was skipped: the weights are as step 1 left them (were NaN)
    assert all(math.isfinite(v) for v in seen) and seen[3] > seen[2]
    rows = summary.curve
    assert [r["skipped"] for r in rows] == [0, 1, 0, 0, 1, 0] and math.isnan(rows[1]["loss"])
    metrics = summary.metrics()
    assert metrics["nonfinite_steps"] == 2 and metrics["update_norm"] > 0 and math.isfinite(metrics["loss"])
    assert json.loads(json.dumps(metrics)) == metrics  # metrics/train.json stays strict JSON: no NaN
    err = capsys.readouterr().err
    assert "train scripted: 100%" in err and "backward/s" in err  # the training bar, with its rate

    ScriptedLoss.seen.clear()
    with pytest.raises(NumericsError, match=r"^training stopped at optimizer step 2/6: 1 steps with a non-finite "
                                            r"loss or gradient, more than train.max_nonfinite_steps = 0 \(this step: "
                                            r"loss nan, gradient norm nan\); likely cause: train.lr 0.01 too high"):
        scripted(["ok", "nan", "ok"], labeled, tmp_path / "strict", max_nonfinite_steps=0)


def test_a_loss_that_never_moves_fails_the_run(scripted, labeled, tmp_path):
    """Zero (but present) gradients: AdamW's weight decay still moves the down weights, the loss stays put."""
    with pytest.raises(NumericsError, match=r"^the loss never moved from its first value 0.5 in 6 optimizer steps "
                                            r"\(update norm [0-9.e-]+\): the policy did not learn"):
        scripted(["flat"], labeled, tmp_path)
    assert not (tmp_path / "trained").exists()


def test_weights_that_never_change_fail_the_run(scripted, labeled, tmp_path):
    with pytest.raises(NumericsError, match=r"^the trained weights did not change in 6 optimizer steps \(update "
                                            r"norm 0\)"):
        scripted(["flat"], labeled, tmp_path, weight_decay=0.0)
    assert not (tmp_path / "trained").exists()


def test_the_loss_tolerance_passes_the_digits_run_and_catches_a_stuck_one():
    """``did_not_learn`` on the numbers the runs log. The default digits D3PO run (plots/train.csv of the
    committed round: beta 0.1, tiny log-ratios) starts at float32(ln 2) and moves at most 1.1e-4 from it, at
    its closest 5.0e-7; a stuck tiny-sd run (lora_alpha 1e30 without the guard) wobbles by 1.5e-8."""
    params = parse_params({})

    def curve(losses):
        return [{"loss": v, "grad_norm": 1.0, "skipped": 0} for v in losses]

    ln2 = 0.6931471824645996
    digits = [ln2, ln2 - 1.3113e-6, ln2 - 5.0068e-7, ln2 + 2.1e-5, ln2 - 1.1165e-4]
    assert did_not_learn(params, curve(digits), 0.01, steps_this_call=5) is None
    digits_slow = [ln2, ln2 + 5.0068e-7, ln2 - 5.0068e-7]  # its closest steps alone still count as moving
    assert did_not_learn(params, curve(digits_slow), 0.01, steps_this_call=3) is None
    stuck = [ln2, ln2, 0.6931471675634384, ln2]
    assert did_not_learn(params, curve(stuck), 0.01, steps_this_call=4).startswith(
        "the loss never moved from its first value 0.6931472 in 4 optimizer steps")
    assert did_not_learn(params, curve(stuck), 0.01, steps_this_call=0) is None  # resumed at the end: no check
    assert did_not_learn(params, curve([ln2]), 0.01, steps_this_call=1) is None  # one step: nothing to compare


def test_out_of_memory_in_training_names_the_knobs(scripted, labeled, tmp_path, monkeypatch):
    def oom(self, unit):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ScriptedLoss, "loss", oom)
    with pytest.raises(OutOfMemory) as err:
        scripted(["ok"], labeled, tmp_path)
    assert str(err.value) == (
        "out of memory while training (CUDA out of memory. Tried to allocate 2.00 GiB); to use less memory: "
        "train.batch_size 2 -> smaller (items per micro-batch; raise train.gradient_accumulation_steps to keep the "
        "effective batch); train.gradient_checkpointing false -> true (recompute activations in "
        "backward); train.mixed_precision no -> bf16 (or fp16); model.dtype float32 -> bfloat16 (or float16): half "
        "the memory of weights and activations")


# ------------------------------------------------------------------------------------------- sampling


def test_set_alpha_to_one_is_refused_before_sampling(tmp_path):
    """A diffusers dir whose scheduler config lacks set_alpha_to_one (DDIMScheduler.from_config then takes
    it as true): the last step has sigma 0 and its log-prob was stored as NaN."""
    pipe = load_pipeline("builtin:tiny-sd")
    pipe.save_pretrained(tmp_path / "model")
    config_path = tmp_path / "model" / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    assert config.pop("set_alpha_to_one") is False  # the builtin ships false, as SD 1.5
    config_path.write_text(json.dumps(config))
    loaded = load_pipeline(str(tmp_path / "model"))
    assert loaded.scheduler.config.set_alpha_to_one is True
    with pytest.raises(NumericsError, match=r"^the scheduler config has set_alpha_to_one: true \(a config without "
                                            r"the key is read as true\): DDIM step 4/4 \(t=1\) goes to alpha 1 with "
                                            r"sigma 0, so its log-prob is NaN; set \"set_alpha_to_one\": false"):
        next(sample_groups(loaded, ["a"], [0], 2, SamplingConfig(num_steps=T)))
    config_path.write_text(json.dumps(config | {"set_alpha_to_one": False}))  # the fix the message names
    group = next(sample_groups(load_pipeline(str(tmp_path / "model")), ["a"], [0], 2, SamplingConfig(num_steps=T)))
    assert torch.isfinite(group.log_probs).all()


def test_non_finite_unet_output_stops_sampling_at_that_step():
    pipe = load_pipeline("builtin:tiny-sd")
    with torch.no_grad():
        pipe.unet.conv_out.bias[0] = float("nan")
    with pytest.raises(NumericsError, match=r"^non-finite UNet output at DDIM step 1/4 \(t=751\), so its log-prob "
                                            r"is not finite; the model's weights or inputs hold NaN/inf"):
        next(sample_groups(pipe, ["a"], [0], 2, SamplingConfig(num_steps=T)))


def test_sampling_shows_a_progress_bar(tmp_path, capsys):
    params = parse_params(merged(yaml.safe_load((REPO / "params.yaml").read_text()),
                                 {"model": {"source": "builtin:tiny-sd"}, "sampling": {"num_steps": 2},
                                  "sample": {"images_per_group": 2, "batch_size": 2},
                                  "train": {"d3po": {"timestep_window": None}}}), "test")
    write_trajectories(load_pipeline("builtin:tiny-sd"), ["a", "b"], [0, 1], params, tmp_path / "t")
    err = capsys.readouterr().err
    assert "sample: 100%" in err and "4/4" in err and "img/s" in err


def test_out_of_memory_in_the_sample_stage_is_one_line_naming_the_knobs(tmp_path, monkeypatch, capsys, mlflow_uri):
    """The seam: the sampler's batch function raises as CUDA does (a real OOM cannot be produced here)."""
    def oom(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(sampler, "_run_chain", oom)
    tiny = {"model": {"source": "builtin:tiny-sd"}, "train": {"d3po": {"timestep_window": None}}}
    params = merged(yaml.safe_load((REPO / "params.yaml").read_text()), merged(OVERRIDES, tiny))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    with isolated_mlflow(mlflow_uri), pytest.raises(SystemExit) as exit_:
        runpy.run_module("stages.sample", run_name="__main__")
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: out of memory while sampling (CUDA error: out of memory); to use less memory: "
                      "sample.batch_size 6 -> smaller (images per UNet call, x2 for guidance); model.dtype float32 -> "
                      "bfloat16 (or float16): half the memory of weights and activations"]
    assert not (tmp_path / "data" / "trajectories").exists()
