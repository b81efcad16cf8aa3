"""params.yaml validation: every bad value fails up front with the key, the value and what is allowed."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prefdiff.config import METHOD_SECTIONS, ParamsError, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_shipped_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.model.source == "builtin:digits"
    assert (params.sampling.num_steps, params.sampling.eta, params.sampling.guidance_scale) == (20, 1.0, 2.0)
    assert (params.sample.prompt_set, params.evaluate.prompt_set, params.label.judge) == (
        "digits", "digits_heldout", "digit_alignment")
    assert (params.train.d3po.beta, params.train.d3po.clip_eps, params.train.max_grad_norm) == (0.1, 0.1, 1.0)


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
        ({"rounds": {"count": 0}}, ["rounds.count", "0", "greater than or equal to 1"]),
        ({"rounds": {"eval_every": 0}}, ["rounds.eval_every", "0", "greater than or equal to 1"]),
        ({"rounds": {"groups": 4}}, ["rounds.groups", "unknown key", "count, groups_per_round, eval_every, num_processes"]),
        ({"rounds": {"num_processes": 0}}, ["rounds.num_processes", "0", "greater than or equal to 1"]),
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
    for method, field in Params.model_fields["train"].annotation.model_fields.items():
        if hasattr(field.annotation, "model_fields"):  # a method's section
            assert set(data["train"][method]) == set(field.annotation.model_fields), method
    assert set(data["label"]["pickapic"]) == set(Params.model_fields["label"].annotation.model_fields["pickapic"]
                                                 .annotation.model_fields)


@pytest.mark.parametrize("name,optimizer", [("sd15_dpo", "adamw"), ("sdxl_dpo", "adafactor")])
def test_diffusion_dpo_profiles_are_paper_faithful(name, optimizer, capsys):
    from pathlib import Path

    import yaml

    from prefdiff.profile import load_profile, main, merged
    from prefdiff.training.trainable import effective_lr

    repo = Path(__file__).resolve().parents[1]
    params = parse_params(merged(yaml.safe_load((repo / "params.yaml").read_text()), load_profile(name)))
    tp = params.train
    assert tp.method == "diffusion_dpo" and tp.diffusion_dpo.official_beta == 5000.0 and tp.finetune == "full"
    assert effective_lr(tp) == pytest.approx(2.048e-5)  # 1e-8 x 2048 pairs per step
    assert tp.lr_warmup_fraction == 0.25 and tp.optimizer == optimizer and tp.method_params.empty_prompt_prob == 0.2
    assert params.label.source == "pickapic"
    assert main([name, "--params", str(repo / "params.yaml")]) == 0
    args = capsys.readouterr().out.split()  # word-splits as `$(python -m prefdiff.profile ...)` does
    values = dict(a.split("=", 1) for a in args if a != "-S")
    assert yaml.safe_load(values["evaluate.scorers"]) == params.evaluate.scorers


@pytest.mark.parametrize(
    ("train", "line"),
    [
        ({"beta": 0.2}, "train.beta moved to train.d3po.beta"),
        ({"dpo_beta": 500.0}, "train.dpo_beta moved to train.diffusion_dpo.beta"),
        ({"dpo_beta_convention": "diffusers"}, "train.dpo_beta_convention moved to train.diffusion_dpo.beta_convention"),
        ({"ddpo_clip_range": 0.01}, "train.ddpo_clip_range moved to train.ddpo.clip_range"),
        ({"ddpo_adv_clip_max": 2.0}, "train.ddpo_adv_clip_max moved to train.ddpo.adv_clip_max"),
        ({"reward_temperature": 0.5}, "train.reward_temperature moved to train.reward_weighted.temperature"),
        ({"clip_eps": 0.2}, "train.clip_eps moved to train.d3po.clip_eps"),
        # a key several methods have: the chosen method's place, or every place when it has none
        ({"method": "ddpo", "timestep_fraction": 0.5}, "train.timestep_fraction moved to train.ddpo.timestep_fraction"),
        ({"method": "sft", "empty_prompt_prob": 0.2}, "train.empty_prompt_prob moved to train.sft.empty_prompt_prob"),
        ({"empty_prompt_prob": 0.2}, "train.empty_prompt_prob moved to train.diffusion_dpo.empty_prompt_prob / "
                                     "train.sft.empty_prompt_prob / train.reward_weighted.empty_prompt_prob"),
    ],
)
def test_old_flat_train_key_names_its_new_place(train, line):
    with pytest.raises(ParamsError) as err:
        parse_params({"train": train})
    assert str(err.value).splitlines() == ["params: 1 invalid value(s)", f"  {line}"]


def test_every_method_section_is_validated_and_only_the_chosen_one_is_in_use():
    with pytest.raises(ParamsError, match=r"train.ddpo.clip_range = 2.0: Input should be less than 1"):
        parse_params({"train": {"method": "d3po", "ddpo": {"clip_range": 2.0}}})
    with pytest.raises(ParamsError, match="train.sft.beta: unknown key; allowed keys here: empty_prompt_prob"):
        parse_params({"train": {"sft": {"beta": 1.0}}})
    d3po = parse_params({"train": {"method": "d3po"}}).train
    other_ddpo = parse_params({"train": {"method": "d3po", "ddpo": {"clip_range": 0.5}}}).train
    assert d3po.method_params is d3po.d3po and d3po.in_use() == other_ddpo.in_use()  # same DVC params, same fingerprint
    assert set(d3po.in_use()) - set(d3po.model_fields) == set() and "ddpo" not in d3po.in_use()
    assert parse_params({"train": {"d3po": {"beta": 0.3}}}).train.in_use()["d3po"]["beta"] == 0.3
    dpo = parse_params({"train": {"method": "diffusion_dpo", "diffusion_dpo": {"beta": 2500.0,
                                                                              "beta_convention": "diffusers"}}}).train
    assert dpo.method_params.official_beta == 5000.0 and set(dpo.in_use()) & set(METHOD_SECTIONS) == {"diffusion_dpo"}


def test_compare_overrides_deep_merge_over_train():
    params = parse_params({"train": {"lr": 0.02, "diffusion_dpo": {"beta": 5000.0, "empty_prompt_prob": 0.1}},
                           "compare": {"overrides": {"diffusion_dpo": {"lr": 0.001, "diffusion_dpo": {"beta": 500.0}}}}})
    tp = params.train_for("diffusion_dpo")
    assert (tp.method, tp.lr, tp.diffusion_dpo.beta, tp.diffusion_dpo.empty_prompt_prob) == ("diffusion_dpo", 0.001,
                                                                                            500.0, 0.1)
    assert params.train_for("sft").lr == 0.02
    with pytest.raises(ParamsError, match="compare.overrides.diffusion_dpo.dpo_beta moved to "
                                          "compare.overrides.diffusion_dpo.diffusion_dpo.beta"):
        parse_params({"compare": {"overrides": {"diffusion_dpo": {"dpo_beta": 500.0}}}})
    with pytest.raises(ParamsError, match=r"diffusion_dpo.beta = -1.0: Input should be greater than 0"):
        parse_params({"compare": {"overrides": {"diffusion_dpo": {"diffusion_dpo": {"beta": -1.0}}}}})


def test_registered_model_name_defaults_to_the_method():
    params = load_params(REPO / "params.yaml")
    assert params.register.model_name is None
    assert params.register.registered_name(params.train.method) == "prefdiff-d3po"
    assert parse_params({"train": {"method": "diffusion_dpo"}}).register.registered_name("diffusion_dpo") == \
        "prefdiff-diffusion_dpo"
    assert parse_params({"register": {"model_name": "mine"}}).register.registered_name("sft") == "mine"
    with pytest.raises(ParamsError, match="register.min_win_rate_low"):
        parse_params({"register": {"min_win_rate_low": 1.5}})


def test_a_timestep_window_longer_than_the_chain_is_refused_up_front():
    with pytest.raises(ParamsError, match=r"train.d3po.timestep_window = 30: larger than sampling.num_steps = 20; "
                                          r"allowed: 1..20 or null"):
        parse_params({"train": {"d3po": {"timestep_window": 30}}})
    assert parse_params({"train": {"d3po": {"timestep_window": 20}}}).train.d3po.timestep_window == 20


def test_missing_sections_and_keys_are_named(tmp_path):
    """DVC reads the keys it tracks from params.yaml itself: a section or key left out must stop every stage
    (pydantic's defaults would let it pass, and DVC would fail at the train stage hours later)."""
    from prefdiff.config import missing_keys

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    assert missing_keys(data) == []
    del data["train"]["d3po"]["beta"], data["register"]
    assert missing_keys(data) == ["train.d3po.beta", "register (section)"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=r"missing train.d3po.beta, register \(section\); every section and key"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize(("data", "key"), [
    ({"register": {"min_improvement": float("nan")}}, "register.min_improvement"),
    ({"train": {"max_grad_norm": float("inf")}}, "train.max_grad_norm"),
    ({"evaluate": {"tie_margin": float("inf")}}, "evaluate.tie_margin"),
    ({"train": {"diffusion_dpo": {"beta": float("nan")}}}, "train.diffusion_dpo.beta"),
])
def test_nan_and_inf_are_refused(data, key):
    with pytest.raises(ParamsError) as err:
        parse_params(data)
    [problem] = err.value.problems  # the one line a stage prints after "error: "
    assert re.fullmatch(rf"params: {re.escape(key)} = (nan|inf): Input should be a finite number \(NaN and "
                        r"infinity are refused\)", problem), problem


def test_every_count_has_an_upper_bound():
    """No int field (a count, a size, a seed) and no positive scale is unbounded above (train.epochs 1e12 ran)."""
    from pydantic import BaseModel

    from prefdiff.config import Params

    unbounded = []

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            kinds = {ann} | set(getattr(ann, "__args__", ()))
            numeric = kinds & {int, float}
            bounded = any(hasattr(m, "le") or hasattr(m, "lt") for m in field.metadata)
            if numeric and not bounded and f"{prefix}{name}" not in UNBOUNDED_ON_PURPOSE:
                unbounded.append(f"{prefix}{name}")

    walk(Params, "")
    assert unbounded == []


# thresholds in a scorer's own units (no scale is known in advance); finite, and tie margins >= 0
UNBOUNDED_ON_PURPOSE = {"label.tie_margin", "evaluate.tie_margin", "register.min_improvement",
                        "label.simulated.annotators"}


def test_check_files_reads_the_prompt_sets_and_names_the_key(tmp_path):
    from prefdiff.config import check_files

    check_files(load_params(REPO / "params.yaml"), REPO)  # the shipped sets
    (tmp_path / "p.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    params = parse_params({"evaluate": {"prompt_set": "file:p.txt"}})
    with pytest.raises(ParamsError, match=r"^evaluate.prompt_set = 'file:p.txt': .*p.txt: not UTF-8 text \(byte 0xe9"):
        check_files(params, tmp_path)
    (tmp_path / "p.txt").write_text("a\nb\n")
    check_files(params, tmp_path)
    with pytest.raises(ParamsError, match=r"^sample.num_prompts = 3: prompt set 'file:p.txt' has only 2 prompts"):
        check_files(parse_params({"sample": {"prompt_set": "file:p.txt", "num_prompts": 3}}), tmp_path)


def test_a_mapping_over_a_value_in_compare_overrides_is_a_params_error():
    # found by tests/test_validation_properties.py: merged() crashed with TypeError on `lr: {}`
    with pytest.raises(ParamsError, match=r"(?s)compare.overrides.sft over train.*lr = \{\}: Input should be a valid"):
        parse_params({"compare": {"overrides": {"sft": {"lr": {}}}}})
