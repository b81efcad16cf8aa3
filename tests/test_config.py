"""params.yaml validation: every bad value fails up front with the key, the value and what is allowed."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prefdiff.config import ParamsError, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_shipped_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.model.source == "builtin:tiny-sd"
    assert (params.sampling.num_steps, params.sampling.eta, params.sampling.guidance_scale) == (20, 1.0, 5.0)
    assert (params.train.beta, params.train.clip_eps, params.train.max_grad_norm) == (0.1, 0.1, 1.0)


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"train": {"lrate": 0.1}}, ["train.lrate", "unknown key", "lr, adam_beta1"]),
        ({"bogus": {}}, ["bogus", "unknown key", "model, sampling"]),
        ({"train": {"epochs": "four"}}, ["train.epochs", "'four'", "integer"]),
        ({"train": {"epochs": 2.5}}, ["train.epochs", "2.5"]),
        ({"train": {"lr": -1.0}}, ["train.lr", "-1.0", "greater than 0"]),
        ({"sample": {"images_per_group": 9}}, ["sample.images_per_group", "9", "less than or equal to 7"]),
        ({"sampling": {"eta": 0.0}}, ["sampling.eta", "0.0", "greater than 0"]),
        ({"label": {"judge": "beauty"}}, ["label.judge", "beauty", "jpeg_compressibility, jpeg_incompressibility"]),
        ({"evaluate": {"judge": "beauty"}}, ["evaluate.judge", "jpeg_compressibility"]),
        ({"sample": {"prompt_set": "birds"}}, ["sample.prompt_set", "birds", "animals45, animals_heldout"]),
        ({"model": {"source": "builtin:huge"}}, ["model.source", "builtin:huge", "builtin:tiny-sd"]),
        ({"model": {"device": "gpu0"}}, ["model.device", "gpu0", "cuda:N"]),
        ({"train": {"reference": "previous_round"}}, ["previous_round", "init_lora"]),
        ({"train": {"reference": "teacher"}}, ["train.reference", "teacher", "'base' or 'previous_round'"]),
    ],
)
def test_bad_params_name_key_value_and_allowed(data, fragments):
    with pytest.raises(ParamsError) as err:
        parse_params(data)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_yaml11_exponent_strings_are_floats_for_float_keys_only():
    # PyYAML reads 3e-5 as a string; `dvc exp run -S train.lr=3e-5` writes exactly that
    params = parse_params(yaml.safe_load("train: {lr: 3e-5}"))
    assert params.train.lr == pytest.approx(3e-5)
    with pytest.raises(ParamsError, match="train.epochs"):
        parse_params({"train": {"epochs": "3e1"}})
    # `mixed_precision: no` unquoted (as DVC writes it back) is YAML 1.1's False: it means "no"
    assert parse_params(yaml.safe_load("train: {mixed_precision: no}")).train.mixed_precision == "no"
    with pytest.raises(ParamsError, match="train.mixed_precision"):
        parse_params({"train": {"mixed_precision": True}})


def test_stage_fails_before_heavy_work_on_bad_params(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["lr"] = "fast"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "stages.sample"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": ""}, timeout=120)
    assert proc.returncode == 2
    assert "train.lr = 'fast'" in proc.stderr
    assert not (tmp_path / "data").exists()


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_params_yaml_lists_every_key():
    """Every key of every section is written (and commented) in params.yaml, so DVC can track it."""
    from pathlib import Path

    import yaml

    from prefdiff.config import Params

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    for section, field in Params.model_fields.items():
        assert set(data[section]) == set(field.annotation.model_fields), section
    assert set(data["label"]["pickapic"]) == set(Params.model_fields["label"].annotation.model_fields["pickapic"]
                                                 .annotation.model_fields)


@pytest.mark.parametrize("name,optimizer", [("sd15_dpo", "adamw"), ("sdxl_dpo", "adafactor")])
def test_diffusion_dpo_profiles_are_paper_faithful(name, optimizer, capsys):
    from pathlib import Path

    import yaml

    from prefdiff.profile import load_profile, main, merged
    from prefdiff.training.setup import effective_lr

    repo = Path(__file__).resolve().parents[1]
    params = parse_params(merged(yaml.safe_load((repo / "params.yaml").read_text()), load_profile(name)))
    tp = params.train
    assert tp.method == "diffusion_dpo" and tp.official_dpo_beta == 5000.0 and tp.finetune == "full"
    assert effective_lr(tp, num_processes=1) == pytest.approx(2.048e-5)  # 1e-8 x 2048 pairs per step
    assert tp.lr_warmup_fraction == 0.25 and tp.optimizer == optimizer and tp.empty_prompt_prob == 0.2
    assert params.label.source == "pickapic"
    assert main([name, "--params", str(repo / "params.yaml")]) == 0
    args = capsys.readouterr().out.split()  # word-splits as `$(python -m prefdiff.profile ...)` does
    values = dict(a.split("=", 1) for a in args if a != "-S")
    assert yaml.safe_load(values["evaluate.scorers"]) == params.evaluate.scorers


def test_registered_model_name_defaults_to_the_method():
    params = load_params(REPO / "params.yaml")
    assert params.register.model_name is None
    assert params.register.registered_name(params.train.method) == "prefdiff-d3po"
    assert parse_params({"train": {"method": "diffusion_dpo"}}).register.registered_name("diffusion_dpo") == \
        "prefdiff-diffusion_dpo"
    assert parse_params({"register": {"model_name": "mine"}}).register.registered_name("sft") == "mine"
    with pytest.raises(ParamsError, match="register.min_win_rate_low"):
        parse_params({"register": {"min_win_rate_low": 1.5}})
