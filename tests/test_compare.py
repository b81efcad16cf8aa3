"""``make compare`` (flows/compare.py): every method as a DVC experiment, the table read back through DVC.

The end-to-end test runs the real flow under ``prefect_test_harness`` on a tiny workspace (conftest's
``make_workspace`` with ``TINY_OVERRIDES``) with two methods: sample, label and heldout once in the workspace,
then one ``dvc exp run --temp`` per method (train + evaluate), ~1.5 min on 2 CPU cores, dominated by the stage
subprocesses importing torch/diffusers/mlflow. The override conversion is checked against DVC's own
``-S`` code (``dvc.utils.hydra.apply_overrides``), without running anything.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY_OVERRIDES, git, isolated_mlflow, make_workspace

from flows.compare import (
    REPORT_JSON,
    REPORT_MD,
    _remove_same_named,
    check_experiment_params,
    compare_methods,
    experiment_result,
    flatten_overrides,
    hydra_value,
    set_param_args,
)
from prefdiff.config import ParamsError, load_params

DVC = str(Path(sys.executable).parent / "dvc")


# --------------------------------------------------------------------------------------------------
# compare.overrides -> `dvc exp run -S`
# --------------------------------------------------------------------------------------------------


def test_flat_and_nested_overrides_flatten_to_dotted_train_keys():
    assert flatten_overrides({"lr": 0.001, "epochs": 4}, "train") == [("train.lr", 0.001), ("train.epochs", 4)]
    nested = {"lr": 0.001, "epochs": 4, "diffusion_dpo": {"beta": 500.0, "extra": {"k": "v"}}, "sft": {}}
    assert flatten_overrides(nested, "train") == [
        ("train.lr", 0.001), ("train.epochs", 4), ("train.diffusion_dpo.beta", 500.0),
        ("train.diffusion_dpo.extra.k", "v")]


def test_set_param_args_add_keys_the_params_file_lacks():
    current = {"train": {"method": "d3po", "lr": 0.02, "diffusion_dpo": {"beta": 5000.0}}}
    args = set_param_args("diffusion_dpo", {"lr": 0.001, "diffusion_dpo": {"beta": 500.0}, "sft": {"w": 2}}, current)
    assert args == ["train.method=diffusion_dpo", "train.lr=0.001", "train.diffusion_dpo.beta=500.0",
                    "++train.sft.w=2"]


# Values whose type a careless formatting would change: floats in exponent form, strings that read as
# numbers, bools or null, quotes, backslashes, commas (a sweep to DVC), interpolation syntax.
ROUND_TRIP = {
    "lr": 0.001, "eps": 1e-08, "big": 1.0e20, "beta": 500.0, "epochs": 4, "neg": -3, "flag": True, "off": False,
    "none": None, "word": "adamw", "no": "no", "num_text": "1e3", "true_text": "true", "null_text": "null",
    "inf_text": "Inf", "inf": float("inf"), "path": "/models/PickScore_v1", "quote": "it's a,b: c",
    "backslash": "c:\\dir\\", "interp": "${oops}", "empty": "", "list": [1, 2.5, "x y", None],
    "section": {"beta": 250.0, "convention": "official"},  # params.yaml has the section, not every key
    "new_section": {"beta": 250.0, "deeper": {"k": 1}},  # params.yaml lacks the section: ++ creates it
}


def test_every_value_reaches_params_yaml_with_its_type(tmp_path):
    """The -S values, applied by DVC's own function, leave params.yaml holding exactly the override values.

    Read back with DVC's YAML 1.2 reader: PyYAML (YAML 1.1, what load_params uses) reads DVC's ``1e-08``
    as a string and an unquoted ``no`` as False whatever we pass; prefdiff.config accepts both forms."""
    from dvc.utils.hydra import apply_overrides
    from dvc.utils.serialize import load_yaml

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"method": "d3po", "lr": 0.02, "section": {"beta": 1.0}}}))
    args = set_param_args("sft", ROUND_TRIP, yaml.safe_load(params.read_text()))
    apply_overrides(params, args)
    train = load_yaml(params)["train"]
    assert train.pop("method") == "sft"
    assert set(train) == set(ROUND_TRIP)
    for key, want in ROUND_TRIP.items():
        got = train[key]
        assert got == want and type(got) is type(want), (key, args, got)
    assert json.dumps(train["list"]) == json.dumps(ROUND_TRIP["list"])  # element types too


def test_values_that_cannot_be_passed_are_named():
    with pytest.raises(ValueError, match=r"train\.x: .*set"):
        hydra_value({1, 2}, "train.x")
    with pytest.raises(ValueError, match=r"train\.x: mapping keys \['a b'\]"):
        hydra_value([{"a b": 1}], "train.x")


def test_the_repos_compare_section_gives_valid_experiments():
    """What `make compare` will pass for each method of params.yaml's compare section applies and validates."""
    params = load_params(REPO / "params.yaml")
    current = yaml.safe_load((REPO / "params.yaml").read_text())
    for method in params.compare.methods:
        args = set_param_args(method, params.compare.overrides.get(method, {}), current)
        assert args[0] == f"train.method={method}"
        check_experiment_params(REPO / "params.yaml", args, f"compare.overrides.{method}")


def test_a_bad_override_fails_before_any_experiment_naming_the_key(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy2(REPO / "params.yaml", params)
    check_experiment_params(params, ["train.method=sft", "train.epochs=3"], "compare.overrides.sft")
    with pytest.raises(ParamsError, match=r"compare\.overrides\.sft .*train\.epochs"):
        check_experiment_params(params, ["train.method=sft", "train.epochs=0"], "compare.overrides.sft")
    with pytest.raises(ParamsError, match=r"compare\.overrides\.sft .*train\.method"):
        check_experiment_params(params, ["train.method=nonsense"], "compare.overrides.sft")
    with pytest.raises(ParamsError, match=r"compare\.overrides\.sft: `dvc exp run -S` cannot apply"):
        check_experiment_params(params, ["train.no_such_key=1"], "compare.overrides.sft")


def test_experiment_result_names_what_dvc_exp_show_lacks():
    show = [{"rev": "workspace", "experiments": None},
            {"rev": "abc1234def", "experiments": [{"name": "compare-sft", "revs": [{"rev": "e1", "data": {
                "params": {"params.yaml": {"data": {"train": {"method": "sft"}}}},
                "metrics": {"metrics/train.json": {"data": {"loss": 0.5}},
                            "metrics/eval.json": {"error": {"type": "FileNotFoundError", "msg": "no such file"}}}}}]}]}]
    got = experiment_result(show, "abc1234def", "compare-sft", {"train": "metrics/train.json"})
    assert got == {"rev": "e1", "params": {"train": {"method": "sft"}}, "train": {"loss": 0.5}}
    with pytest.raises(ValueError, match=r"experiment compare-sft: metrics/eval.json: no such file"):
        experiment_result(show, "abc1234def", "compare-sft", {"eval": "metrics/eval.json"})
    with pytest.raises(ValueError, match=r"no experiment compare-d3po of commit abc1234"):
        experiment_result(show, "abc1234def", "compare-d3po", {})


# --------------------------------------------------------------------------------------------------
# The flow, end to end
# --------------------------------------------------------------------------------------------------

METHODS = ["d3po", "diffusion_dpo"]
# Shared train keys only, so the override means the same under the flat and the per-method train schema.
OVERRIDES = {"diffusion_dpo": {"lr": 0.001, "epochs": 1}}


def _dvc(ws: Path, *args: str) -> str:
    return subprocess.run([DVC, *args], cwd=ws, check=True, capture_output=True, text=True).stdout


def _experiments(ws: Path) -> dict[str, dict]:
    """name -> ``{"rev", "data"}`` of each experiment of HEAD in `dvc exp show --json`."""
    head = git(ws, "rev-parse", "HEAD").strip()
    show = json.loads(_dvc(ws, "exp", "show", "--json"))
    commit = next(e for e in show if e["rev"] == head)
    return {x["name"]: x["revs"][0] for x in commit.get("experiments") or []}


@pytest.fixture(scope="module")
def compared(prefect_harness, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    overrides = {**TINY_OVERRIDES,
                 "evaluate": {**TINY_OVERRIDES["evaluate"], "implicit_accuracy": False, "reward_curve": False},
                 "compare": {"methods": METHODS, "overrides": OVERRIDES}}
    with isolated_mlflow(f"sqlite:///{tmp}/mlflow.db") as uri:
        ws = make_workspace(tmp / "ws", overrides)
        # the repo's ignores (checkpoints, MLflow store), as in a clone: experiments commit what git sees
        shutil.copy2(REPO / ".gitignore", ws / ".gitignore")
        git(ws, "add", ".gitignore")
        git(ws, "commit", "-q", "-m", "ignores")
        result = compare_methods(repo=str(ws))
        yield ws, uri, result


def test_each_method_is_a_dvc_experiment_and_the_table_holds_its_metrics(compared):
    ws, _, result = compared
    exps = _experiments(ws)
    assert sorted(exps) == ["compare-d3po", "compare-diffusion_dpo"]
    train = {n: e["data"]["params"]["params.yaml"]["data"]["train"] for n, e in exps.items()}
    base = yaml.safe_load((ws / "params.yaml").read_text())["train"]
    assert train["compare-d3po"]["method"] == "d3po" and train["compare-d3po"]["lr"] == base["lr"] != 0.001
    # the overrides reached only their method's experiment
    assert (train["compare-diffusion_dpo"]["method"], train["compare-diffusion_dpo"]["lr"],
            train["compare-diffusion_dpo"]["epochs"]) == ("diffusion_dpo", 0.001, 1)
    metrics = {n: {k: e["data"]["metrics"][f"metrics/{k}.json"]["data"] for k in ("train", "eval")}
               for n, e in exps.items()}
    assert metrics["compare-d3po"]["train"]["method"] == "d3po"
    assert metrics["compare-diffusion_dpo"]["train"]["epochs"] == 1

    data = json.loads((ws / REPORT_JSON).read_text())
    assert [r["method"] for r in data["results"]] == METHODS
    table = (ws / REPORT_MD).read_text()
    for row in data["results"]:
        want = metrics[row["experiment"]]
        assert row["train"] == want["train"] and row["eval"] == want["eval"]
        e = want["eval"]
        assert (f"| {row['method']} | {e['win_rate']:.3f} [{e['win_rate_low']:.3f}, {e['win_rate_high']:.3f}] | "
                f"{e['wins']} / {e['losses']} / {e['ties']} | {e['base_mean_reward']:.3f} | "
                f"{e['trained_mean_reward']:.3f} |") in table
        assert f"| {want['train']['steps']} | {want['train']['seconds']:.1f} |" in table
    # the same labeled data and the same paired samples for every method
    assert len({m["train"]["items"] for m in metrics.values()}) == 1
    assert len({m["eval"]["base_mean_reward"] for m in metrics.values()}) == 1
    # the workspace is as it was: experiments ran in temporary copies
    assert git(ws, "status", "--porcelain", "params.yaml") == ""
    assert not (ws / "metrics" / "train.json").exists()
    assert not (ws / "comparisons").exists()


def test_mlflow_parent_and_one_child_per_method_with_the_experiment_metrics(compared):
    from mlflow.tracking import MlflowClient

    ws, uri, result = compared
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(result["run_id"])
    assert (parent.info.run_name, parent.info.status) == ("compare", "FINISHED")
    assert all(parent.data.tags[f"prefdiff.stage.{s}"] == "done" for s in ("sample", "label", "heldout"))
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"comparison.md", "comparison.json"}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_method = {r.data.tags["prefdiff.method"]: r for r in children}
    assert sorted(by_method) == sorted(METHODS)
    exps = _experiments(ws)
    for method, run in by_method.items():
        tags = run.data.tags
        assert tags["prefdiff.dvc_experiment"] == f"compare-{method}"
        # train and evaluate ran inside the experiment and logged into this run; the shared stages were
        # cached (a stage that runs tags the run), register is not part of an experiment
        assert (tags["prefdiff.stage.train"], tags["prefdiff.stage.evaluate"]) == ("done", "done")
        assert not {f"prefdiff.stage.{s}" for s in ("sample", "label", "heldout", "register")} & set(tags)
        exp = exps[f"compare-{method}"]
        assert tags["prefdiff.dvc_experiment_rev"] == exp["rev"]
        ev, tr = (exp["data"]["metrics"][f"metrics/{k}.json"]["data"] for k in ("eval", "train"))
        assert run.data.metrics["eval_win_rate"] == ev["win_rate"]
        assert run.data.metrics["eval_trained_mean_reward"] == ev["trained_mean_reward"]
        assert run.data.metrics["train_final_loss"] == tr["loss"]
        assert run.data.params["train.method"] == method
    assert by_method["diffusion_dpo"].data.params["train.lr"] == "0.001"
    # the same summary metric names in every child run, so the MLflow UI lines them up
    names = [{k for k in r.data.metrics if k.startswith("eval_")} for r in children]
    assert names[0] == names[1] and "eval_win_rate" in names[0]


def test_dvc_exp_apply_puts_one_methods_results_in_the_workspace(compared):
    ws, _, _ = compared
    data = _experiments(ws)["compare-diffusion_dpo"]["data"]
    _dvc(ws, "exp", "apply", "compare-diffusion_dpo")
    # read both through DVC (its JSON drops empty mappings such as "skipped_scorers": {})
    shown = json.loads(_dvc(ws, "metrics", "show", "--json"))[""]["data"]
    for key in ("train", "eval"):
        assert shown[f"metrics/{key}.json"]["data"] == data["metrics"][f"metrics/{key}.json"]["data"]
    assert json.loads((ws / "metrics" / "eval.json").read_text())["win_rate"] == \
        data["metrics"]["metrics/eval.json"]["data"]["win_rate"]
    assert yaml.safe_load((ws / "params.yaml").read_text())["train"]["method"] == "diffusion_dpo"
    assert (ws / "models" / "trained" / "pytorch_lora_weights.safetensors").is_file()
    # That method's pipeline is up to date but for register (never part of an experiment) and train's
    # models/checkpoints: cache: false and git-ignored, so no experiment carries it. `dvc repro
    # --allow-missing` skips a stage whose only change is missing data: it would run register alone.
    status = json.loads(_dvc(ws, "status", "--json"))
    assert set(status) == {"train", "register"}
    assert status["train"] == [{"changed outs": {"models/checkpoints": "deleted"}}]
    dry = _dvc(ws, "repro", "--allow-missing", "--dry")
    assert [line for line in dry.splitlines() if line.startswith("Running stage")] == ["Running stage 'register':"]


def test_a_rerun_replaces_the_experiment_of_the_same_commit(compared):
    ws, _, _ = compared
    assert _remove_same_named(str(ws), "compare-d3po") is True
    assert sorted(_experiments(ws)) == ["compare-diffusion_dpo"]
    assert _remove_same_named(str(ws), "compare-d3po") is False


def test_an_unknown_method_fails_before_any_run_or_experiment(compared):
    from mlflow.tracking import MlflowClient

    ws, uri, result = compared
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_run(result["run_id"]).info.experiment_id
    runs_before, exps_before = len(client.search_runs([experiment_id])), sorted(_experiments(ws))
    with isolated_mlflow(uri), pytest.raises(ParamsError, match=r"compare\.overrides\.nonsense .*train\.method"):
        compare_methods(repo=str(ws), methods=["nonsense"])
    assert len(client.search_runs([experiment_id])) == runs_before
    assert sorted(_experiments(ws)) == exps_before



def test_flow_module_import_is_cheap():
    code = ("import sys, flows.compare; "
            "print(sorted(m for m in ('mlflow', 'torch', 'diffusers', 'dvc', 'evaluation') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
