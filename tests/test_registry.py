"""Registry gate, idempotency and lineage against a temporary SQLite registry; pyfunc end to end.

One registry (SQLite + artifacts under a module temp dir) is shared by the module to keep it fast;
every test uses its own registered-model name, so tests stay independent.
"""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest

DVC_LOCK = """\
schema: '2.0'
stages:
  sample:
    cmd: python -m stages.sample
    outs:
    - path: data/trajectories
      hash: md5
      md5: 0123456789abcdef0123456789abcdef.dir
      size: 100
      nfiles: 3
  train:
    cmd: python -m stages.train
    outs:
    - path: models/trained
      hash: md5
      md5: fedcba9876543210fedcba9876543210.dir
      size: 10
      nfiles: 2
  evaluate@heldout:
    cmd: python -m stages.evaluate
    outs:
    - path: metrics/eval.json
      hash: md5
      md5: 11112222333344445555666677778888
"""


def _git(root: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A git repo (one commit) with params.yaml and dvc.lock, and MLflow pointed at a temp SQLite DB."""
    import mlflow

    root = tmp_path_factory.mktemp("ws")
    (root / "params.yaml").write_text("register:\n  experiment: prefdiff-test\n")
    (root / "dvc.lock").write_text(DVC_LOCK)
    _git(root, "init", "-q")
    _git(root, "add", "params.yaml", "dvc.lock")
    _git(root, "commit", "-q", "-m", "init")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID; register it so it is removed afterwards
        mp.setenv("MLFLOW_EXPERIMENT_ID", "")
        mp.delenv("MLFLOW_EXPERIMENT_ID")
        yield root
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri("")


@pytest.fixture()
def registry(workspace):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workspace}/mlflow.db")
    return workspace


def _lora(root: Path, name: str, payload: bytes = b"weights") -> Path:
    d = root / "loras" / name
    (d / "snapshots" / "epoch-0001").mkdir(parents=True, exist_ok=True)
    (d / "pytorch_lora_weights.safetensors").write_bytes(payload)
    (d / "snapshots" / "epoch-0001" / "pytorch_lora_weights.safetensors").write_bytes(payload[::-1])
    return d


PROTOCOL = "a" * 64  # the protocol fingerprint of the evaluations these tests register (one protocol)


def _register(root: Path, name: str, weights: Path, metrics: dict, protocol: str = PROTOCOL, **rule):
    """Register ``weights`` with ``metrics`` measured under ``protocol``; ``rule`` overrides the gate rule."""
    from prefdiff.gate import GateRule
    from prefdiff.registry import register_model

    rule = {"metric": "trained_mean", "base_metric": "base_mean", "min_improvement": 0.05, **rule}
    return register_model(root=root, weights_dir=weights, eval_metrics={**metrics, "protocol_fingerprint": protocol},
                          model_config={"base_source": "builtin:tiny-sd"}, model_name=name, rule=GateRule(**rule),
                          experiment="prefdiff-test")


def _versions(name: str) -> list[int]:
    import mlflow

    return sorted(int(v.version) for v in mlflow.MlflowClient().search_model_versions(f"name = '{name}'"))


def _alias(name: str, alias: str) -> int:
    import mlflow

    return int(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)


def test_gate_champion_challenger_and_promotion(registry):
    name = "gate"
    d1 = _register(registry, name, _lora(registry, "a", b"a"), {"trained_mean": 1.0, "base_mean": 0.5})
    assert (d1.version, d1.alias, d1.compared_with, d1.reused) == (1, "champion", "base", False)
    assert d1.value == 1.0 and d1.compared_to == 0.5

    # 1.04 does not beat champion 1.0 by the 0.05 margin -> challenger; champion stays on v1
    d2 = _register(registry, name, _lora(registry, "b", b"b"), {"trained_mean": 1.04, "base_mean": 0.5})
    assert (d2.version, d2.alias, d2.compared_with, d2.compared_to) == (2, "challenger", "champion v1", 1.0)
    assert _alias(name, "champion") == 1 and _alias(name, "challenger") == 2

    # 1.06 > 1.0 + 0.05 -> champion moves to v3
    d3 = _register(registry, name, _lora(registry, "c", b"c"), {"trained_mean": 1.06, "base_mean": 0.5})
    assert (d3.version, d3.alias, d3.compared_with) == (3, "champion", "champion v1")
    assert _alias(name, "champion") == 3 and _alias(name, "challenger") == 2
    assert d3.to_dict()["compared_to"] == 1.0


def test_first_version_that_does_not_beat_base_is_challenger(registry):
    name = "below-base"
    d = _register(registry, name, _lora(registry, "low", b"low"), {"trained_mean": 0.52, "base_mean": 0.5})
    assert (d.version, d.alias, d.compared_with, d.compared_to) == (1, "challenger", "base", 0.5)
    # no base metric: a first version is champion
    d2 = _register(registry, "no-base", _lora(registry, "low", b"low"), {"trained_mean": 0.52}, base_metric=None)
    assert (d2.alias, d2.compared_with, d2.compared_to) == ("champion", "none", None)


def test_reregistering_identical_inputs_is_idempotent(registry):
    name = "idem"
    lora = _lora(registry, "idem", b"idem")
    metrics = {"trained_mean": 2.0, "base_mean": 1.0}
    first = _register(registry, name, lora, metrics)
    again = _register(registry, name, lora, dict(metrics))
    assert again.reused and not first.reused
    assert (again.version, again.alias, again.fingerprint) == (first.version, "champion", first.fingerprint)
    assert again.compared_with == "base" and again.compared_to == 1.0
    assert _versions(name) == [1]

    # any change of input -> a new version; the old one's reuse then reports it as challenger
    _register(registry, name, lora, {"trained_mean": 3.0, "base_mean": 1.0})
    assert _versions(name) == [1, 2] and _alias(name, "champion") == 2
    old = _register(registry, name, lora, metrics)
    assert old.reused and (old.version, old.alias) == (1, "challenger") and _versions(name) == [1, 2]

    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"changed")
    assert not _register(registry, name, lora, metrics).reused and _versions(name) == [1, 2, 3]


def test_bad_gate_metric_raises_listing_keys(registry):
    keys = r"\['base_mean', 'protocol_fingerprint', 'trained_mean'\]"
    with pytest.raises(ValueError, match=rf"gate_metric 'nope'.*{keys}"):
        _register(registry, "bad", _lora(registry, "bad"), {"trained_mean": 1.0, "base_mean": 0.5}, metric="nope")
    with pytest.raises(ValueError, match="base_metric 'missing'"):
        _register(registry, "bad", _lora(registry, "bad"), {"trained_mean": 1.0}, base_metric="missing")
    assert _versions("bad") == []


def test_lineage_tags_on_version_and_run(registry):
    import mlflow

    from prefdiff import tracking

    head = _git(registry, "rev-parse", "HEAD")
    lin = tracking.lineage(registry)
    assert lin["git_sha"] == head  # only untracked files (mlflow.db, loras/) changed: not dirty
    assert lin["dvc.train.models/trained"] == "fedcba9876543210fedcba9876543210.dir"
    assert lin["dvc.evaluate_heldout.metrics/eval.json"] == "11112222333344445555666677778888"
    assert tracking.dvc_lock_hashes(registry)["sample.data/trajectories"].endswith(".dir")

    d = _register(registry, "lineage", _lora(registry, "lin", b"lin"), {"trained_mean": 1.0, "base_mean": 0.0})
    mv = mlflow.MlflowClient().get_model_version("lineage", str(d.version))
    for key, value in lin.items():
        assert mv.tags[key] == value
    assert mv.tags["prefdiff.fingerprint"] == d.fingerprint
    assert mv.tags["prefdiff.gate_metric"] == "trained_mean" and float(mv.tags["prefdiff.gate_value"]) == 1.0
    assert mv.tags["prefdiff.protocol"] == PROTOCOL and mv.tags["prefdiff.gate_action"] == "promote"
    # the run that logged the model carries no un-prefixed copies of the model config (base_source, ...)
    assert mlflow.get_run(mv.run_id).data.params == {}
    description = mlflow.MlflowClient().get_registered_model("lineage").description
    assert "pyfunc" in description and "'builtin:tiny-sd'" in description and "champion" in description
    assert mv.description == d.reason

    with tracking.stage_run("evaluate", registry, "prefdiff-test") as run:
        tracking.log_lineage(registry)
    got = mlflow.get_run(run.info.run_id)
    assert got.data.tags["git_sha"] == head and got.data.tags["prefdiff.stage.evaluate"] == "done"
    assert got.info.status == "FINISHED" and got.info.run_name == "evaluate"
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "lineage")}
    assert names == {"lineage/dvc.lock", "lineage/params.yaml"}
    art = Path(mlflow.get_experiment(got.info.experiment_id).artifact_location.removeprefix("file://"))
    assert art == (registry / "mlartifacts").resolve()

    # a tracked edit makes the sha dirty
    (registry / "params.yaml").write_text("register:\n  experiment: other\n")
    try:
        assert tracking.git_sha(registry) == head + "-dirty"
    finally:
        _git(registry, "checkout", "--", "params.yaml")


def test_stage_run_resumes_parent_run(registry, monkeypatch):
    import mlflow

    from prefdiff import tracking

    tracking.ensure_experiment("prefdiff-test", registry)
    parent = mlflow.start_run(run_name="flow")
    mlflow.end_run()
    monkeypatch.setenv("MLFLOW_RUN_ID", parent.info.run_id)
    with tracking.stage_run("sample", registry, "prefdiff-test") as run:
        assert run.info.run_id == parent.info.run_id
        mlflow.log_metric("x", 1.0)
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.stage_run("train", registry, "prefdiff-test"):
            raise RuntimeError("boom")
    assert os.environ["MLFLOW_RUN_ID"] == parent.info.run_id
    got = mlflow.get_run(parent.info.run_id)
    assert got.data.metrics["x"] == 1.0
    assert got.data.tags["prefdiff.stage.sample"] == "done" and got.data.tags["prefdiff.stage.train"] == "failed"
    assert mlflow.active_run() is None


def test_tracking_uri_defaults(tmp_path, monkeypatch):
    from prefdiff import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.artifact_root(tmp_path) == tmp_path.resolve() / "mlartifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5055")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5055"
    assert tracking.git_sha(tmp_path) == "unknown" and tracking.dvc_lock_hashes(tmp_path) == {}
    assert tracking.lineage(tmp_path) == {"git_sha": "unknown", "dvc_lock_sha256": "absent",
                                          "params_sha256": "absent"}


def test_pyfunc_end_to_end(registry):
    import mlflow
    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image

    from prefdiff.models.loading import load_pipeline
    from prefdiff.models.lora import adapters_disabled, add_lora, save_lora
    from prefdiff.sampling.sampler import SamplingConfig, generate

    pipe = load_pipeline("builtin:tiny-sd")
    lora_params = add_lora(pipe.unet, rank=2, alpha=2.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 at init would make the LoRA a no-op; give it weights that matter
        for p in lora_params:
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    lora = registry / "loras" / "real"
    save_lora(pipe.unet, lora)

    d = _register(registry, "tiny-lora", lora, {"trained_mean": 1.0, "base_mean": 0.0})
    assert d.alias == "champion"
    model = mlflow.pyfunc.load_model("models:/tiny-lora@champion")
    assert {p.name for p in model.metadata.get_params_schema().params} == {"seed", "num_inference_steps",
                                                                           "guidance_scale", "eta"}
    frame = pd.DataFrame({"prompt": ["a cat", "a dog"]})
    params = {"seed": 7, "num_inference_steps": 2}
    out = model.predict(frame, params=params)
    assert list(out.columns) == ["prompt", "seed", "png"]
    assert out["prompt"].tolist() == ["a cat", "a dog"] and out["seed"].tolist() == [7, 8]
    served = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in out["png"]]
    assert [im.shape for im in served] == [(64, 64, 3), (64, 64, 3)]

    # same prompts + seed -> identical bytes
    assert model.predict(frame, params=params)["png"].tolist() == out["png"].tolist()

    # the served model is the base + this LoRA: equal to the in-process LoRA pipeline, not to the base
    cfg = SamplingConfig(num_steps=2)
    local = [np.asarray(im.convert("RGB")) for im in generate(pipe, ["a cat", "a dog"], [7, 8], cfg)]
    with adapters_disabled(pipe.unet):
        base = [np.asarray(im.convert("RGB")) for im in generate(pipe, ["a cat", "a dog"], [7, 8], cfg)]
    for s_img, l_img, b_img in zip(served, local, base):
        assert np.abs(s_img.astype(int) - l_img.astype(int)).max() <= 1
        assert np.abs(s_img.astype(int) - b_img.astype(int)).mean() > 1.0


def test_cross_protocol_candidate_is_a_challenger_until_scored_with_the_champion(registry):
    """A better number under another protocol (another judge) never dethrones the champion; the same
    candidate evaluated with the champion as its baseline (one protocol, paired) is gated on that."""
    import mlflow

    name = "protocols"
    jpeg, other = "1" * 64, "2" * 64
    d1 = _register(registry, name, _lora(registry, "p1", b"p1"), {"trained_mean": -3.0, "base_mean": -4.0}, jpeg)
    assert (d1.alias, d1.action, d1.protocol) == ("champion", "promote", jpeg)

    # 21.5 (say, a PickScore mean) vs -3.0 (a JPEG champion's): not comparable, whatever the numbers
    d2 = _register(registry, name, _lora(registry, "p2", b"p2"), {"trained_mean": 21.5, "base_mean": 21.0}, other)
    assert (d2.alias, d2.action, d2.compared_to, d2.compared_with) == ("challenger", "re-evaluate", None, "none")
    assert "evaluate.baseline: champion" in d2.reason and "111111111111" in d2.reason
    assert _alias(name, "champion") == 1

    # evaluated again with champion v1 as the baseline: v1 scored 21.2 and this model 21.5 under one protocol
    d3 = _register(registry, name, _lora(registry, "p2", b"p2"),
                   {"trained_mean": 21.5, "base_mean": 21.2, "baseline": "champion v1", "baseline_version": 1}, other)
    assert (d3.alias, d3.action, d3.compared_to, d3.compared_with) == ("champion", "promote", 21.2,
                                                                       "champion v1 (re-evaluated)")
    assert _alias(name, "champion") == 3
    tags = [mlflow.MlflowClient().get_model_version(name, str(v)).tags for v in (1, 2, 3)]
    assert [t["prefdiff.protocol"] for t in tags] == [jpeg, other, other]
    assert [t["prefdiff.gate_action"] for t in tags] == ["promote", "re-evaluate", "promote"]


@pytest.mark.parametrize("metrics, rule, named", [
    ({"trained_mean": float("nan")}, {"base_metric": None}, "the gate metric 'trained_mean' is nan"),
    ({"trained_mean": float("inf"), "base_mean": 0.0}, {}, "the gate metric 'trained_mean' is inf"),
    ({"trained_mean": 1.0, "base_mean": float("-inf")}, {}, "the base metric 'base_mean' is -inf"),
    ({"trained_mean": 1.0, "base_mean": 0.0}, {"min_improvement": float("nan")}, "register.min_improvement is nan"),
])
def test_non_finite_numbers_are_refused_and_never_registered(registry, metrics, rule, named):
    with pytest.raises(ValueError, match=named):  # prefdiff.gate.GateInputError
        _register(registry, "nan-model", _lora(registry, "nan", b"nan"), metrics, **rule)
    assert _versions("nan-model") == []


def test_eval_metrics_without_protocol_are_refused(registry):
    from prefdiff.gate import GateRule
    from prefdiff.registry import register_model

    with pytest.raises(ValueError, match="protocol_fingerprint"):
        register_model(root=registry, weights_dir=_lora(registry, "np", b"np"), eval_metrics={"trained_mean": 1.0},
                       model_config={"base_source": "builtin:tiny-sd"}, model_name="no-protocol",
                       rule=GateRule("trained_mean", None), experiment="prefdiff-test")
    assert _versions("no-protocol") == []


def test_champion_is_the_evaluation_baseline(registry, tmp_path):
    """evaluate.baseline: champion reads the champion that resolve_baseline wrote into registry/baseline.json
    and models/baseline, and compares the trained model against it."""
    import torch

    from evaluation.evaluate import evaluate_trained
    from prefdiff.config import parse_params
    from prefdiff.data import DatasetError
    from prefdiff.data.baseline import read_baseline, tree_sha256
    from prefdiff.models import lora as lora_mod
    from prefdiff.models.loading import load_pipeline
    from prefdiff.paths import Paths
    from prefdiff.registry import resolve_baseline

    ws = Paths(tmp_path / "ws")
    ref, changed = resolve_baseline(ws.root, "champion", "champ-model")
    assert changed and (ref.kind, ref.model_name, ref.version) == ("base", "champ-model", None)
    assert "no champion of champ-model" in ref.note and read_baseline(ws.baseline) == ref

    pipe = load_pipeline("builtin:tiny-sd")
    params_ = lora_mod.add_lora(pipe.unet, rank=4, alpha=4.0)
    with torch.no_grad():
        for p in params_:
            p.add_(0.05)
    champ_dir = tmp_path / "champ"
    lora_mod.save_lora(pipe.unet, champ_dir)
    (champ_dir / "snapshots" / "epoch-0001").mkdir(parents=True)  # snapshots are not part of the baseline
    lora_mod.save_lora(pipe.unet, champ_dir / "snapshots" / "epoch-0001")
    decision = _register(registry, "champ-model", champ_dir, {"trained_mean": 2.0, "base_mean": 1.0})
    assert decision.alias == "champion"

    ref, changed = resolve_baseline(ws.root, "champion", "champ-model")
    assert changed and (ref.kind, ref.version, ref.weights, ref.protocol) == ("champion", decision.version,
                                                                             "models/baseline", PROTOCOL)
    assert sorted(p.name for p in ws.baseline_weights.iterdir()) == sorted(
        p.name for p in champ_dir.iterdir() if p.name != "snapshots")
    assert (ws.baseline_weights / lora_mod.LORA_WEIGHT_NAME).read_bytes() == \
        (champ_dir / lora_mod.LORA_WEIGHT_NAME).read_bytes()
    assert ref.weights_sha256 == tree_sha256(ws.baseline_weights)
    assert resolve_baseline(ws.root, "champion", "champ-model") == (ref, False)  # nothing moved: same bytes
    assert resolve_baseline(ws.root, "base", "champ-model")[0].kind == "base" and not ws.baseline_weights.exists()
    resolve_baseline(ws.root, "champion", "champ-model")

    params = parse_params({"sampling": {"num_steps": 2},
                           "evaluate": {"num_prompts": 1, "seeds_per_prompt": 2, "baseline": "champion",
                                        "implicit_accuracy": False, "reward_curve": False, "report": False},
                           "register": {"model_name": "champ-model"}})
    # the trained model IS the champion here: every paired sample is identical, all ties
    result = evaluate_trained(params, champ_dir, ws, progress=lambda _: None)
    assert result.metrics["baseline"] == f"champion v{decision.version}"
    assert result.metrics["baseline_version"] == decision.version
    assert result.metrics["ties"] == 2 and result.metrics["reward_gain"] == 0.0

    (ws.baseline_weights / lora_mod.LORA_WEIGHT_NAME).write_bytes(b"tampered")
    with pytest.raises(DatasetError, match="sha256"):
        evaluate_trained(params, champ_dir, ws, progress=lambda _: None)
    other = params.model_copy(update={"register": params.register.model_copy(update={"model_name": "other"})})
    with pytest.raises(DatasetError, match="names the champion of 'champ-model'"):
        evaluate_trained(other, champ_dir, ws, progress=lambda _: None)


# --------------------------------------------------------------------------------------------------
# Convergence: a crash at any point of register, then a re-run -> one champion, no duplicate version
# --------------------------------------------------------------------------------------------------


class Crash(BaseException):
    """Stands for the process dying at an injected point (a BaseException: no ``except Exception`` eats it)."""


def _crash_at(monkeypatch, point: str) -> None:
    """Make register die at ``point``: before its version exists (model logged, not registered), after the
    version before its alias, after the alias before the version is tagged settled."""
    import mlflow

    def die(*args, **kwargs):
        raise Crash(point)

    if point == "before-version":
        monkeypatch.setattr(mlflow, "register_model", die)
    elif point == "before-alias":
        monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", die)
    elif point == "before-settled":
        from prefdiff.registry import TAG_SETTLED

        real = mlflow.MlflowClient.set_model_version_tag

        def tag(self, name, version, key, value):
            if key == TAG_SETTLED:
                die()
            return real(self, name, version, key, value)

        monkeypatch.setattr(mlflow.MlflowClient, "set_model_version_tag", tag)


def _aliases(name: str) -> dict[str, int]:
    import mlflow

    return {alias: int(v) for alias, v in mlflow.MlflowClient().get_registered_model(name).aliases.items()}


@pytest.mark.parametrize("point", ["before-version", "before-alias", "before-settled"])
@pytest.mark.parametrize("better", [True, False], ids=["promotes", "stays-challenger"])
def test_register_converges_after_a_crash_at_any_point(registry, monkeypatch, point, better):
    """v1 is champion; registering v2 dies at ``point``; the re-run with the same inputs finishes v2: exactly
    one champion (v2 if it beats v1, else still v1 with v2 the challenger) and no duplicate version."""
    import mlflow

    name = f"crash-{point}-{better}"
    _register(registry, name, _lora(registry, f"{name}-1", b"one"), {"trained_mean": 1.0, "base_mean": 0.0})
    weights, metrics = _lora(registry, f"{name}-2", b"two"), {"trained_mean": 2.0 if better else 1.01,
                                                              "base_mean": 0.0}
    with monkeypatch.context() as m:
        _crash_at(m, point)
        with pytest.raises(Crash):
            _register(registry, name, weights, metrics)
    while mlflow.active_run() is not None:  # a killed process leaves no active run behind
        mlflow.end_run("KILLED")

    again = _register(registry, name, weights, metrics)
    assert again.version == 2 and again.reused == (point != "before-version")
    assert _versions(name) == [1, 2]
    expected = {"champion": 2} if better else {"champion": 1, "challenger": 2}
    assert _aliases(name) == expected
    assert again.alias == ("champion" if better else "challenger")
    assert again.action == ("promote" if better else "challenger") and again.compared_with == "champion v1"
    tags = mlflow.MlflowClient().get_model_version(name, "2").tags
    assert tags["prefdiff.settled"] == again.alias and tags["prefdiff.gate_action"] == again.action
    # and once settled, more re-runs change nothing
    assert _register(registry, name, weights, metrics).to_dict() == {**again.to_dict(), "reused": True}
    assert _versions(name) == [1, 2] and _aliases(name) == expected


def test_a_version_without_its_gate_tags_is_gated_and_finished(registry):
    """A version that carries its fingerprint but no gate decision (created before its tags; or by an older
    prefdiff) is gated on the re-run against the champion as it is then, and gets its alias."""
    import mlflow

    from prefdiff.registry import TAG_COMPARED_TO, TAG_COMPARED_WITH, TAG_GATE_ACTION, TAG_GATE_REASON, TAG_SETTLED

    name = "untagged"
    client = mlflow.MlflowClient()
    _register(registry, name, _lora(registry, "u1", b"u1"), {"trained_mean": 1.0, "base_mean": 0.0})
    weights, metrics = _lora(registry, "u2", b"u2"), {"trained_mean": 3.0, "base_mean": 0.0}
    _register(registry, name, weights, metrics)
    client.set_registered_model_alias(name, "champion", "1")  # as before v2 got its alias
    for key in (TAG_GATE_ACTION, TAG_GATE_REASON, TAG_COMPARED_TO, TAG_COMPARED_WITH, TAG_SETTLED):
        client.delete_model_version_tag(name, "2", key)
    again = _register(registry, name, weights, metrics)
    assert (again.version, again.alias, again.action, again.reused) == (2, "champion", "promote", True)
    assert _versions(name) == [1, 2] and _aliases(name) == {"champion": 2}
    assert client.get_model_version(name, "2").tags[TAG_GATE_ACTION] == "promote"


def test_a_lost_champion_alias_is_restored_by_the_next_register(registry):
    """The issue's reproduction: register, delete the alias (as a crash before it would leave it), register the
    same inputs again. Before: 'kept v1 as challenger' and no champion for good. Now the champion is back."""
    import mlflow

    client = mlflow.MlflowClient()
    name = "lost-alias"
    weights, metrics = _lora(registry, "lost", b"lost"), {"trained_mean": 1.0, "base_mean": 0.0}
    _register(registry, name, weights, metrics)
    client.delete_registered_model_alias(name, "champion")
    again = _register(registry, name, weights, metrics)
    assert (again.version, again.alias, again.reused) == (1, "champion", True) and _aliases(name) == {"champion": 1}

    # with two promoted versions the newest one the gate promoted comes back, whichever inputs are re-run
    newer = _register(registry, name, _lora(registry, "lost2", b"lost2"), {"trained_mean": 2.0, "base_mean": 0.0})
    assert newer.alias == "champion" and newer.version == 2
    client.delete_registered_model_alias(name, "champion")
    old = _register(registry, name, weights, metrics)
    assert (old.version, old.alias) == (1, "challenger") and _aliases(name) == {"champion": 2}
    assert _versions(name) == [1, 2]


def test_register_killed_before_its_alias_then_rerun(registry, tmp_path):
    """A real kill -9 of a register process just after its version was created, then a re-run."""
    import signal
    import sys
    import textwrap

    name = "killed"
    weights, metrics = _lora(registry, "killed", b"killed"), {"trained_mean": 1.0, "base_mean": 0.0}
    script = tmp_path / "kill_register.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, mlflow
        from prefdiff.gate import GateRule
        from prefdiff.registry import register_model
        mlflow.MlflowClient.set_registered_model_alias = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        register_model(root={str(registry)!r}, weights_dir={str(weights)!r},
                       eval_metrics={{**{metrics!r}, "protocol_fingerprint": {PROTOCOL!r}}},
                       model_config={{"base_source": "builtin:tiny-sd"}}, model_name={name!r},
                       rule=GateRule("trained_mean", "base_mean", 0.05), experiment="prefdiff-test")
    """))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert _versions(name) == [1] and _aliases(name) == {}  # the state the kill left

    again = _register(registry, name, weights, metrics)
    assert (again.version, again.alias, again.reused) == (1, "champion", True)
    assert _versions(name) == [1] and _aliases(name) == {"champion": 1}


def test_register_stage_killed_before_decision_json_then_rerun(registry, monkeypatch):
    """The stage dies after the registry is done but before registry/decision.json is written: the re-run
    writes it from the registry (reused, champion), with no second version."""
    import json

    import prefdiff.data.atomic
    from stages import register as register_stage

    ws = registry / "stage-ws"
    (ws / "metrics").mkdir(parents=True, exist_ok=True)
    _stage_params(ws, "stage-model")
    (ws / "metrics" / "eval.json").write_text(json.dumps(
        {"trained_mean_reward": 1.0, "base_mean_reward": 0.5, "protocol_fingerprint": PROTOCOL}))
    (ws / "models").mkdir()
    _lora(ws, "x", b"stage").rename(ws / "models" / "trained")
    monkeypatch.chdir(ws)
    with monkeypatch.context() as m:
        m.setattr(prefdiff.data.atomic, "atomic_write_json", lambda *a, **k: (_ for _ in ()).throw(Crash("json")))
        with pytest.raises(Crash):
            register_stage.main()
    assert not (ws / "registry" / "decision.json").exists() and _aliases("stage-model") == {"champion": 1}
    register_stage.main()
    decision = json.loads((ws / "registry" / "decision.json").read_text())
    assert (decision["version"], decision["alias"], decision["reused"]) == (1, "champion", True)
    assert _versions("stage-model") == [1]


def _stage_params(ws: Path, model_name: str) -> None:
    """The repository's params.yaml (a stage refuses one that lacks keys) with this test's registry names."""
    import yaml

    from conftest import REPO
    from prefdiff.profile import merged

    every_key = yaml.safe_load((REPO / "params.yaml").read_text())
    (ws / "params.yaml").write_text(yaml.safe_dump(merged(every_key, {"register": {
        "experiment": "prefdiff-test", "model_name": model_name}})))


def test_register_stage_refuses_non_finite_metrics_in_one_line(registry, monkeypatch, capsys):
    import json

    from stages import register as register_stage

    ws = registry / "nan-ws"
    (ws / "metrics").mkdir(parents=True, exist_ok=True)
    _stage_params(ws, "nan-stage")
    (ws / "metrics" / "eval.json").write_text(json.dumps(
        {"trained_mean_reward": float("nan"), "base_mean_reward": 0.5, "protocol_fingerprint": PROTOCOL}))
    monkeypatch.chdir(ws)
    with pytest.raises(SystemExit) as exit_:
        register_stage.main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err
    assert err.startswith("error: ") and "eval.json" in err and "'trained_mean_reward' is nan" in err
    assert _versions("nan-stage") == []


def test_a_killed_stage_run_is_marked_killed_by_the_next_start(registry, tmp_path):
    """kill -9 of a stage leaves its MLflow run RUNNING for good; the next stage start on this host marks it
    KILLED (naming the dead process), and leaves the run of a process that is still alive alone."""
    import signal
    import sys
    import textwrap

    import mlflow

    from prefdiff import tracking

    script = tmp_path / "hold_run.py"
    script.write_text(textwrap.dedent(f"""
        import time, mlflow
        from prefdiff.tracking import stage_run
        with stage_run("train", {str(registry)!r}, "prefdiff-test") as run:
            print(run.info.run_id, flush=True)
            time.sleep(600)
    """))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        killed, alive = (p.stdout.readline().strip() for p in procs)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=30)
        assert mlflow.get_run(killed).info.status == "RUNNING"  # what a kill leaves behind

        with tracking.stage_run("evaluate", registry, "prefdiff-test"):
            pass
        got = mlflow.get_run(killed)
        assert got.info.status == "KILLED" and f"process {procs[0].pid}" in got.data.tags["prefdiff.closed"]
        assert mlflow.get_run(alive).info.status == "RUNNING" and "prefdiff.closed" not in mlflow.get_run(alive).data.tags
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
