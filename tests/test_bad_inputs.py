"""Every bad input a user can give, and the one ``error:`` line they get (README "Bad inputs and what you get").

``CASES`` is the README's table: ``test_readme_table_is_these_cases`` reads the table back, so the two cannot
drift. Each case breaks one thing in a fresh workspace (params.yaml from the repository) and runs the real
stage code: "every stage" is the first step every stage runs (``stages._common.load_or_exit``); "label" and
"train" are those stages' ``main`` under ``run_stage``, as ``python -m stages.<name>`` runs it. Each must end in
exit status 2 with only ``error:`` lines on stderr, naming the key or file, and no traceback.
``test_cli_*`` run a few of them as the real command.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from prefdiff.profile import merged

REPO = Path(__file__).resolve().parents[1]
README_SECTION = "## Bad inputs and what you get"
HAS_CUDA = torch.cuda.is_available()


# -- what a case does to the workspace ---------------------------------------------------------------------
def _params(ws: Path) -> dict:
    return yaml.safe_load((ws / "params.yaml").read_text())


def _write_params(ws: Path, data: object) -> None:
    (ws / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def set_param(overrides: dict) -> Callable[[Path], None]:
    return lambda ws: _write_params(ws, merged(_params(ws), overrides))


def drop_param(dotted: str) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        data = _params(ws)
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node[part]
        del node[last]
        _write_params(ws, data)
    return setup


def params_bytes(content: bytes | None) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        if content is None:
            (ws / "params.yaml").unlink()
        else:
            (ws / "params.yaml").write_bytes(content)
    return setup


def prompt_file(name: str, content: bytes | None, section: str = "evaluate", extra: dict | None = None):
    """Write ``prompts/<name>`` (None: a directory) and point ``<section>.prompt_set`` at it."""
    def setup(ws: Path) -> None:
        path = ws / "prompts" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir()
        else:
            path.write_bytes(content)
        set_param({section: {"prompt_set": f"file:prompts/{name}", **(extra or {})}})(ws)
    return setup


def parquet_bytes() -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"caption": ["a cat", "a dog"]}), buf)
    return buf.getvalue()


def write_trajectories(ws: Path) -> None:
    from label_server_fixture import write_store

    write_store(ws / "data" / "trajectories", num_groups=2, group_size=2)


def write_preferences_store(ws: Path) -> None:
    from prefdiff.data.preferences import PreferencePair, write_preferences
    from prefdiff.data.trajectories import TrajectoryStore

    write_trajectories(ws)
    store = TrajectoryStore.open(ws / "data" / "trajectories")
    pairs = [PreferencePair(group_id=g, prompt=store.prompt_of(2 * g), winner=2 * g, loser=2 * g + 1,
                            winner_score=1.0, loser_score=0.0, tie=False) for g in range(2)]
    write_preferences(ws / "data" / "preferences", pairs, trajectories=store,
                      judge={"name": "test", "higher_is_better": True, "params": {}})


def write_imported_preferences(ws: Path) -> None:
    """An imported (Pick-a-Pic) image-pair dataset in data/preferences, its images in one shard."""
    from pickapic_fixture import default_rows, write_synthetic_pickapic

    from prefdiff.data.pickapic import ImportConfig, import_pickapic

    src = write_synthetic_pickapic(ws / "data" / "imports" / "part-0.parquet", default_rows())
    with contextlib.redirect_stderr(io.StringIO()):  # the import's progress bar is not the case's output
        import_pickapic([src], ws / "data" / "preferences", ImportConfig(resolution=32), workers=1, progress=None)


def edit_file(relative: str, edit: Callable[[bytes], bytes], before: Callable[[Path], None]):
    def setup(ws: Path) -> None:
        before(ws)
        path = ws / relative
        path.write_bytes(edit(path.read_bytes()))
    return setup


def remove(relative: str, before: Callable[[Path], None]):
    def setup(ws: Path) -> None:
        before(ws)
        path = ws / relative
        if path.is_dir():
            import shutil

            shutil.rmtree(path)
        else:
            path.unlink()
    return setup


def json_edit(change: Callable[[dict], object]) -> Callable[[bytes], bytes]:
    def edit(raw: bytes) -> bytes:
        data = json.loads(raw)
        result = change(data)
        return json.dumps(data if result is None else result).encode()
    return edit


def lora_dir_without_weights(relative: str, overrides: dict) -> Callable[[Path], None]:
    """A directory with only a README where params name a LoRA (the repository's models/policy before a round)."""
    def setup(ws: Path) -> None:
        (ws / relative).mkdir(parents=True)
        (ws / relative / "README.md").write_text("no LoRA yet")
        set_param(overrides)(ws)
    return setup


def broken_pipeline(breakage: Callable[[Path], None]) -> Callable[[Path], None]:
    """A copy of the saved tiny pipeline (``tiny_pipeline_dir``) broken by ``breakage``, as model.source."""
    def setup(ws: Path) -> None:
        import shutil

        target = ws / "pipeline"
        shutil.copytree(TINY_PIPELINE[0], target)
        breakage(target)
        set_param({"model": {"source": str(target)}})(ws)
    return setup


def drop_component(name: str) -> Callable[[Path], None]:
    def breakage(pipe: Path) -> None:
        index = json.loads((pipe / "model_index.json").read_text())
        del index[name]
        (pipe / "model_index.json").write_text(json.dumps(index))
    return breakage


def delete(relative: str) -> Callable[[Path], None]:
    def breakage(pipe: Path) -> None:
        import shutil

        path = pipe / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return breakage


def truncate_file(relative: str, keep: int) -> Callable[[Path], None]:
    def breakage(pipe: Path) -> None:
        (pipe / relative).write_bytes((pipe / relative).read_bytes()[:keep])
    return breakage


# -- the cases: the README table ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    bad_input: str  # README column 1 (markdown)
    stage: str  # "every stage" (the first step), "label" or "train"
    gets: str  # a fragment of the error line the user gets (README column 3)
    setup: Callable[[Path], None]
    needs: str = ""  # "no-cuda": only on a machine without CUDA (the input is fine where there is one)


TRAJ = "data/trajectories/index.json"
PREFS = "data/preferences/index.json"
SHARD = "data/preferences/images/shard-00000.safetensors"
LATIN1 = "café au lait\nthé vert\n".encode("latin-1")

CASES: list[Case] = [
    # params.yaml as a file
    Case("no `params.yaml`", "every stage", "params.yaml: params file not found", params_bytes(None)),
    Case("`params.yaml` is not YAML (`train: [unclosed`)", "every stage", "params.yaml: not valid YAML",
         params_bytes(b"train: [unclosed\n")),
    Case("`params.yaml` is not UTF-8", "every stage", "params.yaml: not UTF-8 text (byte 0xe9",
         params_bytes("model: {source: caf\u00e9}\n".encode("latin-1"))),
    Case("`params.yaml` is a list, not sections", "every stage", "expected a mapping of sections, got list",
         params_bytes(b"- train\n- evaluate\n")),
    Case("`params.yaml` is empty", "every stage", "params.yaml: missing model (section), sampling (section)",
         params_bytes(b"")),
    Case("no `train:` section", "every stage", "params.yaml: missing train (section); every section and key must "
         "be in params.yaml", drop_param("train")),
    Case("no `evaluate:` section", "every stage", "params.yaml: missing evaluate (section)", drop_param("evaluate")),
    Case("no `train.lr` key", "every stage", "params.yaml: missing train.lr;", drop_param("train.lr")),
    Case("no `train.d3po.beta` key", "every stage", "params.yaml: missing train.d3po.beta;",
         drop_param("train.d3po.beta")),
    # values
    Case("unknown key `train.lrate`", "every stage", "train.lrate: unknown key; allowed keys here: method, "
         "finetune, lr", set_param({"train": {"lrate": 0.1}})),
    Case("`train.method: dpo`", "every stage", "train.method = 'dpo': unknown method 'dpo'; allowed: d3po",
         set_param({"train": {"method": "dpo"}})),
    Case("`train.lr: fast`", "every stage", "train.lr = 'fast': Input should be a valid number",
         set_param({"train": {"lr": "fast"}})),
    Case("`register.min_improvement: .nan`", "every stage", "register.min_improvement = nan: Input should be a "
         "finite number (NaN and infinity are refused)", set_param({"register": {"min_improvement": float("nan")}})),
    Case("`train.max_grad_norm: .inf`", "every stage", "train.max_grad_norm = inf: Input should be a finite number",
         set_param({"train": {"max_grad_norm": float("inf")}})),
    Case("`train.lr: -.inf`", "every stage", "train.lr = -inf: Input should be a finite number",
         set_param({"train": {"lr": float("-inf")}})),
    Case("`label.tie_margin: .inf`", "every stage", "label.tie_margin = inf: Input should be a finite number",
         set_param({"label": {"tie_margin": float("inf")}})),
    Case("`label.simulated.annotators: [{bias: .nan}]`", "every stage", "label.simulated.annotators.0.bias = nan: "
         "Input should be a finite number",
         set_param({"label": {"simulated": {"annotators": [{"bias": float("nan")}]}}})),
    Case("`train.epochs: 1000000000000`", "every stage", "train.epochs = 1000000000000: Input should be less than "
         "or equal to 100000", set_param({"train": {"epochs": 10**12}})),
    Case("`train.epochs: 1e12` (YAML 1.1 reads a string)", "every stage", "train.epochs = '1e12': Input should be "
         "a valid integer", set_param({"train": {"epochs": "1e12"}})),
    Case("`evaluate.seeds_per_prompt: 1000000000`", "every stage", "evaluate.seeds_per_prompt = 1000000000: Input "
         "should be less than or equal to 10000", set_param({"evaluate": {"seeds_per_prompt": 10**9}})),
    Case("`train.lora_alpha: 1e30`", "every stage", "train.lora_alpha = 1e+30: Input should be less than or equal "
         "to 4096", set_param({"train": {"lora_alpha": 1e30}})),
    Case("`train.lora_rank: 0`", "every stage", "train.lora_rank = 0: Input should be greater than or equal to 1",
         set_param({"train": {"lora_rank": 0}})),
    Case("`train.batch_size: 1000000`", "every stage", "train.batch_size = 1000000: Input should be less than or "
         "equal to 65536", set_param({"train": {"batch_size": 10**6}})),
    Case("`train.gradient_accumulation_steps: 0`", "every stage", "train.gradient_accumulation_steps = 0: Input "
         "should be greater than or equal to 1", set_param({"train": {"gradient_accumulation_steps": 0}})),
    Case("`train.weight_decay: 100`", "every stage", "train.weight_decay = 100.0: Input should be less than or "
         "equal to 10", set_param({"train": {"weight_decay": 100.0}})),
    Case("`train.d3po.beta: 1e9`", "every stage", "train.d3po.beta = 1000000000.0: Input should be less than or "
         "equal to 1000", set_param({"train": {"d3po": {"beta": 1e9}}})),
    Case("`sample.seed: -1`", "every stage", "sample.seed = -1: Input should be greater than or equal to 0",
         set_param({"sample": {"seed": -1}})),
    Case("`evaluate.seed: 1099511627776` (2^40)", "every stage", "evaluate.seed = 1099511627776: Input should be "
         "less than or equal to 2147483647", set_param({"evaluate": {"seed": 2**40}})),
    Case("`sampling.num_steps: 0`", "every stage", "sampling.num_steps = 0: Input should be greater than or equal "
         "to 1", set_param({"sampling": {"num_steps": 0}})),
    Case("`evaluate.bootstrap_samples: 1000000000`", "every stage", "evaluate.bootstrap_samples = 1000000000: "
         "Input should be less than or equal to 1000000", set_param({"evaluate": {"bootstrap_samples": 10**9}})),
    Case("`rounds.count: 1000000`", "every stage", "rounds.count = 1000000: Input should be less than or equal to "
         "100000", set_param({"rounds": {"count": 10**6}})),
    Case("`train.checkpoint_every: 0`", "every stage", "train.checkpoint_every = 0: Input should be greater than "
         "or equal to 1", set_param({"train": {"checkpoint_every": 0}})),
    Case("`model.device: gpu0`", "every stage", "model.device = 'gpu0': must be one of auto, cpu, cuda, cuda:N, mps",
         set_param({"model": {"device": "gpu0"}})),
    # devices against this machine
    Case("`model.device: cuda` on a machine without CUDA", "every stage", "model.device = 'cuda': this machine has "
         "no CUDA device", set_param({"model": {"device": "cuda"}}), needs="no-cuda"),
    Case("`model.device: cuda:3` on a machine without CUDA", "every stage", "model.device = 'cuda:3': this machine "
         "has no CUDA device", set_param({"model": {"device": "cuda:3"}}), needs="no-cuda"),
    Case("`model.device: mps` off a Mac", "every stage", "model.device = 'mps': mps is not available here; "
         "available: auto, cpu", set_param({"model": {"device": "mps"}})),
    Case("`label.judge_args: {device: cuda}` on a machine without CUDA", "every stage", "label.judge_args.device = "
         "'cuda': this machine has no CUDA device", set_param({"label": {"judge_args": {"device": "cuda"}}}),
         needs="no-cuda"),
    # prompt sets
    Case("`evaluate.prompt_set: file:prompts/missing.txt`", "every stage", "evaluate.prompt_set = "
         "'file:prompts/missing.txt': prompt set 'file:prompts/missing.txt':",
         set_param({"evaluate": {"prompt_set": "file:prompts/missing.txt"}})),
    Case("`evaluate.prompt_set: file:` an empty .txt", "every stage", "evaluate.prompt_set = 'file:prompts/empty.txt':"
         " prompt set 'file:prompts/empty.txt' is empty", prompt_file("empty.txt", b"")),
    Case("`evaluate.prompt_set: file:` a .txt of only `#` comments", "every stage", "prompt set "
         "'file:prompts/comments.txt' is empty", prompt_file("comments.txt", b"# a cat\n\n# a dog\n")),
    Case("`evaluate.prompt_set: file:` a Latin-1 .txt", "every stage", "prompts/latin1.txt: not UTF-8 text (byte "
         "0xe9 at offset 3); save the prompt file as UTF-8", prompt_file("latin1.txt", LATIN1)),
    Case("`evaluate.prompt_set: file:` a Latin-1 .csv", "every stage", "prompts/latin1.csv: not UTF-8 text",
         prompt_file("latin1.csv", b"prompt\n" + LATIN1)),
    Case("`sample.prompt_set: file:` a Latin-1 .json", "every stage", "prompts/l.json: not UTF-8 text (byte 0xe9 at "
         "offset 5); save the prompt file as UTF-8", prompt_file("l.json", b'["caf\xe9"]', section="sample")),
    Case("`evaluate.prompt_set: file:` a .csv without a prompt column", "every stage", "prompts/t.csv: no prompt "
         "column; expected one of Prompt, prompt, caption", prompt_file("t.csv", b"text\na cat\n")),
    Case("`evaluate.prompt_set: file:` a truncated .json", "every stage", "prompts/t.json: invalid JSON",
         prompt_file("t.json", b'["a cat", "a d')),
    Case("`evaluate.prompt_set: file:` a .json of numbers", "every stage", "prompts/n.json: expected prompt strings, "
         "found int 1", prompt_file("n.json", b"[1, 2]")),
    Case("`evaluate.prompt_set: file:` a truncated .parquet", "every stage", "prompts/t.parquet: not a readable "
         "parquet file", prompt_file("t.parquet", parquet_bytes()[:-20])),
    Case("`evaluate.prompt_set: file:` a .pdf", "every stage", "unsupported prompt file type '.pdf'",
         prompt_file("p.pdf", b"%PDF-1.4")),
    Case("`evaluate.prompt_set: file:` a directory without prompt files", "every stage", "prompts/d: directory "
         "holds no .json or .parquet prompt files", prompt_file("d", None)),
    Case("`evaluate.prompt_set: partiprompts` without the file", "every stage", "prompt set 'partiprompts': ",
         set_param({"evaluate": {"prompt_set": "partiprompts"}})),
    Case("`evaluate.num_prompts: 50` for a 3-prompt file", "every stage", "evaluate.num_prompts = 50: prompt set "
         "'file:prompts/three.txt' has only 3 prompts; allowed: 1..3 or null",
         prompt_file("three.txt", b"a\nb\nc\n", extra={"num_prompts": 50})),
    # the LoRA dirs and image-pair datasets params name
    Case("`sample.lora: models/missing`", "every stage", "models/missing is not a directory; allowed: a diffusers-format LoRA dir", set_param(
        {"sample": {"lora": "models/missing"}})),
    Case("`train.init_lora:` a directory without `pytorch_lora_weights.safetensors`", "every stage",
         "models/policy has no pytorch_lora_weights.safetensors",
         lora_dir_without_weights("models/policy", {"train": {"init_lora": "models/policy"}})),
    Case("`evaluate.implicit_pairs: data/imports/test` (not there)", "every stage", "data/imports/test is not a "
         "directory; allowed: an image-pair preference dataset dir",
         set_param({"evaluate": {"implicit_pairs": "data/imports/test"}})),
    # the base model's files
    Case("`model.source:` a directory without `model_index.json`", "every stage", "is a local path but has no "
         "model_index.json", broken_pipeline(delete("model_index.json"))),
    Case("`model.source:` a pipeline whose `model_index.json` lacks `unet`", "every stage", "lists no component "
         "'unet' (found None); a StableDiffusionPipeline needs vae, text_encoder, tokenizer, unet, scheduler",
         broken_pipeline(drop_component("unet"))),
    Case("`model.source:` a pipeline without its `vae/` directory", "every stage", "component 'vae' is listed in "
         "model_index.json but", broken_pipeline(delete("vae"))),
    Case("`model.source:` a pipeline without its UNet weight file", "every stage", "no weight file in",
         broken_pipeline(delete("unet/diffusion_pytorch_model.safetensors"))),
    Case("`model.source:` a pipeline with a truncated `model_index.json`", "every stage", "model_index.json is not "
         "valid JSON", broken_pipeline(truncate_file("model_index.json", 30))),
    Case("`model.source: someorg/not-cached`", "every stage", "model.source = 'someorg/not-cached': not in the local "
         "Hugging Face cache", set_param({"model": {"source": "someorg/not-cached"}})),
    # datasets
    Case("a truncated `data/trajectories/index.json`", "label", f"{TRAJ}: not valid JSON",
         edit_file(TRAJ, lambda b: b[:200], write_trajectories)),
    Case("`data/trajectories/index.json` holding a list", "label", f"{TRAJ}: expected a JSON object, found list",
         edit_file(TRAJ, lambda b: b"[]", write_trajectories)),
    Case("`data/trajectories/index.json` with `num_images: \"four\"`", "label", f"{TRAJ}: num_images=four but 4 image "
         "entries; the index is corrupt",
         edit_file(TRAJ, json_edit(lambda d: d.update(num_images="four")), write_trajectories)),
    Case("`data/trajectories/index.json` whose shards are not objects", "label", f"{TRAJ}: malformed index",
         edit_file(TRAJ, json_edit(lambda d: d.update(shards=[7])), write_trajectories)),
    Case("no `data/trajectories/index.json`", "label", f"{TRAJ}: missing;", remove(TRAJ, write_trajectories)),
    Case("a truncated `data/preferences/index.json`", "train", f"{PREFS}: not valid JSON",
         edit_file(PREFS, lambda b: b[:40], write_preferences_store)),
    Case("`data/preferences/index.json` with `num_pairs: \"two\"`", "train",
         "preferences/pairs.jsonl: 2 pairs / 0 ties; index says two / 0",
         edit_file(PREFS, json_edit(lambda d: d.update(num_pairs="two")), write_preferences_store)),
    Case("an edited `data/preferences/pairs.jsonl`", "train", "preferences/pairs.jsonl: sha256 mismatch",
         edit_file("data/preferences/pairs.jsonl", lambda b: b.replace(b'"tie": false', b'"tie": true'),
                   write_preferences_store)),
    Case("a truncated trajectory index under valid preferences", "train", f"{TRAJ}: not valid JSON",
         edit_file(TRAJ, lambda b: b[:100], write_preferences_store)),
    Case("an imported `data/preferences` of schema 2 (a PNG file per image)", "train", f"{PREFS}: an image-only "
         "dataset of schema_version 2 (one PNG file per image) is no longer read",
         edit_file(PREFS, json_edit(lambda d: d.update(schema_version=2)), write_imported_preferences)),
    Case("a truncated image shard of an imported `data/preferences`", "train", f"{SHARD}: not a readable image shard",
         edit_file(SHARD, lambda b: b[:50], write_imported_preferences)),
    Case("`label.pickapic.workers: 0`", "every stage", "label.pickapic.workers = 0: Input should be greater than "
         "or equal to 1", set_param({"label": {"pickapic": {"workers": 0}}})),
    Case("`label.pickapic.shard_mb: 100000`", "every stage", "label.pickapic.shard_mb = 100000: Input should be "
         "less than or equal to 4096", set_param({"label": {"pickapic": {"shard_mb": 100000}}})),
]

TINY_PIPELINE: list[Path] = []  # the saved tiny pipeline the model cases copy (set by the fixture)


@pytest.fixture(scope="module", autouse=True)
def tiny_pipeline_dir(tmp_path_factory):
    from prefdiff.models.loading import load_pipeline

    out = tmp_path_factory.mktemp("tiny-pipeline") / "tiny"
    load_pipeline("builtin:tiny-sd").save_pretrained(out)
    TINY_PIPELINE[:] = [out]
    yield out


def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return ws


def run_case(case: Case, ws: Path, monkeypatch) -> None:
    """What ``python -m stages.<stage>`` does for ``case`` (the first step only for "every stage")."""
    from prefdiff.paths import Paths
    from stages._common import load_or_exit, run_stage

    monkeypatch.chdir(ws)
    if case.stage == "every stage":
        run_stage(lambda: load_or_exit(Paths(ws)))
    else:
        import importlib

        run_stage(importlib.import_module(f"stages.{case.stage}").main)


@pytest.mark.parametrize("case", CASES, ids=[c.bad_input for c in CASES])
def test_bad_input_is_one_error_line(case: Case, tmp_path, monkeypatch, capsys):
    if case.needs == "no-cuda" and HAS_CUDA:
        pytest.skip("this machine has CUDA: the input is valid here")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")  # never reached: refused first
    ws = workspace(tmp_path)
    case.setup(ws)
    with pytest.raises(SystemExit) as stop:
        run_case(case, ws, monkeypatch)
    out, err = capsys.readouterr()
    assert stop.value.code == 2, (out, err)
    lines = err.splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), err
    assert len(lines) == 1, err  # one bad input, one line
    assert case.gets in lines[0], (case.gets, lines[0])
    assert "Traceback" not in err + out
    assert not (tmp_path / "mlflow.db").exists()  # refused before the stage's MLflow run


def test_several_bad_keys_are_one_line_each(tmp_path, monkeypatch, capsys):
    ws = workspace(tmp_path)
    set_param({"train": {"epochs": 0, "max_grad_norm": float("inf")}, "register": {"min_improvement": "x"}})(ws)
    with pytest.raises(SystemExit):
        run_case(CASES[0], ws, monkeypatch)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") and "params.yaml: " in line for line in lines)
    assert sorted(line.split(": ")[2].split(" =")[0] for line in lines) == [
        "register.min_improvement", "train.epochs", "train.max_grad_norm"]


def readme_rows() -> list[tuple[str, str, str]]:
    text = (REPO / "README.md").read_text()
    assert README_SECTION in text
    section = text.split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| bad input") and not line.startswith("| ---"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows.append((cells[0].replace("\\|", "|"), cells[1], cells[2].strip("`").replace("\\|", "|")))
    return rows


def test_readme_table_is_these_cases():
    """README's table lists exactly CASES, in order: each row is backed by test_bad_input_is_one_error_line."""
    assert readme_rows() == [(c.bad_input, c.stage, f"error: …{c.gets}…") for c in CASES]
    assert len(CASES) >= 40


def print_readme_table() -> str:
    """The README table's rows (``python tests/test_bad_inputs.py`` prints them after CASES change)."""
    rows = ["| bad input | refused by | what you get (`error:` line, shortened) |", "| --- | --- | --- |"]
    for c in CASES:
        rows.append(f"| {c.bad_input.replace('|', chr(92) + '|')} | {c.stage} | "
                    f"`error: …{c.gets.replace('|', chr(92) + '|')}…` |")
    return "\n".join(rows)


# -- the real commands ---------------------------------------------------------------------------------------
def run_cli(ws: Path, stage: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent),
           "MLFLOW_TRACKING_URI": f"sqlite:///{ws}/mlflow.db", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=ws, capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize(("stage", "case_input"), [
    ("sample", "`evaluate.prompt_set: file:` a Latin-1 .txt"),
    ("register", "no `train:` section"),
    ("label", "a truncated `data/trajectories/index.json`"),
])
def test_cli_prints_one_error_line_and_exits_2(stage, case_input, tmp_path):
    """The real ``python -m stages.<stage>``: the missing evaluate prompt file stops even the sample stage."""
    case = next(c for c in CASES if c.bad_input == case_input)
    ws = workspace(tmp_path)
    case.setup(ws)
    proc = run_cli(ws, stage)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr[-2000:]
    assert case.gets in proc.stderr and "Traceback" not in proc.stderr
    assert not (ws / "mlflow.db").exists()  # refused before the stage's MLflow run


def test_load_pipeline_names_the_missing_component_and_weight(tmp_path, tiny_pipeline_dir):
    """The library call itself, for callers other than the stages (a pyfunc model, a script)."""
    import shutil

    from prefdiff.models.loading import ModelNotFoundError, load_pipeline

    for breakage, fragment in ((drop_component("unet"), "lists no component 'unet'"),
                               (delete("unet/diffusion_pytorch_model.safetensors"), "no weight file in"),
                               (truncate_file("unet/diffusion_pytorch_model.safetensors", 100), "cannot be loaded")):
        target = tmp_path / f"pipe-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_pipeline_dir, target)
        breakage(target)
        with pytest.raises(ModelNotFoundError) as err:
            load_pipeline(str(target))
        assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_resolve_device_names_the_key_and_what_is_available():
    from prefdiff.models.loading import DeviceError, resolve_device

    with pytest.raises(DeviceError, match=r"model.device = 'cuda:1': this machine has no CUDA device.*available: "
                                          r"auto, cpu"):
        resolve_device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("auto") == torch.device("cpu")


if __name__ == "__main__":
    print(print_readme_table())
