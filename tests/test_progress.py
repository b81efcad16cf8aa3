"""Progress bars with count, rate and ETA on each evaluation phase and on imports, readable in a log: on stderr,
redrawn at most every LOG_INTERVAL_S seconds without a terminal, ASCII, one fixed-width frame per redraw. Cutting
a phase into batches for its bar leaves its numbers bit-identical."""

import io
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from prefdiff.progress import LOG_INTERVAL_S, LOG_WIDTH, TERMINAL_INTERVAL_S, progress_bar

from conftest import REPO

# tqdm's line: "<desc>: 100%|####| n/total [elapsed<ETA, rate<unit>/s, <postfix>]"
_DONE = r"{desc}: 100%\|#+\| {n}/{n} \[\d\d:\d\d<00:00, +[\d.]+(?:{unit}/s|s/{unit})(?:, [^\]]*)?\]"


def _frames(text: str) -> list[str]:
    """What a log shows: one line per redraw (a log reader splits on \\r as on \\n)."""
    return [f.rstrip() for f in re.split(r"[\r\n]", text) if f.strip()]


def _finished(text: str, desc: str, n: int, unit: str) -> str:
    """The last frame of the bar ``desc``: it must say n/n done, with its elapsed time, ETA and rate."""
    frames = [f for f in _frames(text) if f.startswith(f"{desc}: ")]
    assert frames, f"no bar {desc!r} in:\n{text[-2000:]}"
    assert re.fullmatch(_DONE.format(desc=re.escape(desc), n=n, unit=unit), frames[-1]), frames[-1]
    return frames[-1]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_log_a_bar_redraws_rarely_in_ascii_with_rate_and_eta(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with progress_bar(desc="phase", total=20000, unit="img") as bar:
        assert bar.mininterval == LOG_INTERVAL_S
        for _ in range(20000):
            bar.update(1)
    frames = _frames(log.getvalue())
    assert len(frames) <= 3, frames  # the first frame, the last, at most one in between (a slow machine)
    assert frames[0].startswith("phase:   0%|") and "0/20000" in frames[0]
    _finished(log.getvalue(), "phase", 20000, "img")
    assert all(len(f) <= LOG_WIDTH and f.isascii() for f in frames)

    monkeypatch.setattr(sys, "stderr", _Terminal())
    with progress_bar(desc="phase", total=3) as bar:
        assert bar.mininterval == TERMINAL_INTERVAL_S and not bar.ascii


def test_a_pickapic_import_shows_rows_with_pairs_ties_and_rejections(tmp_path, monkeypatch, capsys):
    from prefdiff.data.pickapic import ImportConfig, import_pickapic
    from tests.pickapic_fixture import default_rows, write_synthetic_pickapic

    monkeypatch.chdir(tmp_path)
    parquet = write_synthetic_pickapic(tmp_path / "src/train-00000.parquet", default_rows(), row_group_size=2)
    import_pickapic([parquet], tmp_path / "prefs", ImportConfig(resolution=32), progress=None)
    last = _finished(capsys.readouterr().err, "import pickapic", 5, "row")
    assert last.endswith("pairs=4, ties=1, rejected=0]")


def save_random_lora(out: Path, *, seed: int):
    """A LoRA on the tiny model that differs from the base (seeded), saved to ``out``; returns the pipeline."""
    from prefdiff.models import lora
    from prefdiff.models.loading import load_pipeline

    pipe = load_pipeline("builtin:tiny-sd")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in lora.add_lora(pipe.unet, rank=4, alpha=4.0):
                p.add_(0.05 * torch.randn_like(p))
    lora.save_lora(pipe.unet, out)
    return pipe


@pytest.fixture(scope="module")
def tiny_round(tmp_path_factory):
    """A tiny sampled and labeled round and a LoRA that differs from the base."""
    from prefdiff.config import parse_params
    from prefdiff.data.preferences import PreferenceStore
    from prefdiff.data.trajectories import TrajectoryStore
    from prefdiff.labeling.pairs import label_trajectories
    from prefdiff.sampling.dataset import sample_dataset
    from prefdiff.scorers import get_scorer

    root = tmp_path_factory.mktemp("progress")
    params = parse_params({"sample": {"num_prompts": 3, "images_per_group": 2, "groups_per_prompt": 2,
                                      "batch_size": 12}, "sampling": {"num_steps": 4}})
    sample_dataset(params, root / "traj", progress=lambda _: None)
    store = TrajectoryStore.open(root / "traj")
    label_trajectories(store, get_scorer("jpeg_compressibility"), root / "prefs", progress=lambda _: None)
    save_random_lora(root / "lora", seed=3)
    return root, store, PreferenceStore.open(root / "prefs")


def test_implicit_accuracy_phases_show_progress_and_keep_their_numbers(tiny_round, capsys):
    """Trajectory form: the bar moves per chunk of images; the chunks form the same (image, step) batches as one
    pass over all images, so the accuracy and margin are exactly those of the unchunked computation."""
    from evaluation.implicit import accuracy_of_log_ratios, elbo_implicit_accuracy, trajectory_implicit_accuracy
    from prefdiff.models.finetuned import trained_weights
    from prefdiff.models.loading import load_pipeline
    from prefdiff.sampling.guidance import encode_prompts
    from prefdiff.sampling.sampler import SamplingConfig
    from prefdiff.training.trajectory import reference_log_probs

    root, store, prefs = tiny_round
    pairs = prefs.training_pairs()
    ids = sorted({i for p in pairs for i in (p.winner, p.loser)})
    pipe = load_pipeline("builtin:tiny-sd")
    got = trajectory_implicit_accuracy(pipe, root / "lora", store, pairs, guidance=5.0, eta=1.0, batch_size=6)
    _finished(capsys.readouterr().err, "implicit accuracy (trajectory): base, then trained", 2 * len(ids), "img")

    chain, _ = store.load(ids)  # the same computation in one pass over all images
    prompts = [store.prompt_of(i) for i in ids]
    unique = sorted(set(prompts))
    embeds = encode_prompts(pipe, unique)[torch.tensor([unique.index(p) for p in prompts])].cpu()
    uncond = encode_prompts(pipe, [""])
    pipe.scheduler.set_timesteps(store.num_steps)
    cfg = SamplingConfig(num_steps=store.num_steps, eta=1.0, guidance_scale=5.0)

    def summed():
        return reference_log_probs(pipe, chain, store.timesteps, embeds, uncond, cfg, eta=1.0,
                                   batch_size=6).double().sum(1)

    base = summed()
    with trained_weights(pipe, root / "lora"):
        tuned = summed()
    expected = accuracy_of_log_ratios(tuned - base, {i: r for r, i in enumerate(ids)}, pairs)
    assert got == expected and got.mean_margin != 0.0

    image_pairs = prefs.image_pairs(store)
    elbo = elbo_implicit_accuracy(pipe, root / "lora", image_pairs, draws=2, batch_size=2)
    _finished(capsys.readouterr().err, "implicit accuracy (ELBO): base, then trained", 2 * len(image_pairs), "pair")
    assert elbo.pairs == len(image_pairs)


def test_evaluate_shows_sampling_and_scoring_of_each_model(tmp_path, capsys):
    """evaluate_trained on the tiny model: a sampling and a scoring bar for the baseline and for the trained
    model; generating batch by batch gives the images one generate call gives."""
    from evaluation.evaluate import evaluate_trained
    from prefdiff.config import parse_params
    from prefdiff.paths import Paths
    from prefdiff.profile import merged
    from prefdiff.sampling.sampler import SamplingConfig, generate

    pipe = save_random_lora(tmp_path / "trained", seed=5)
    (tmp_path / "prompts.txt").write_text("a cat\na dog\na red owl\n")
    overrides = {
        "model": {"source": "builtin:tiny-sd", "device": "cpu"}, "sampling": {"num_steps": 2},
        "train": {"d3po": {"timestep_window": None}},
        "label": {"source": "judge", "judge": "jpeg_compressibility", "judge_args": {}},
        "evaluate": {"prompt_set": f"file:{tmp_path / 'prompts.txt'}", "num_prompts": None, "seeds_per_prompt": 2,
                     "judge": None, "scorers": [], "scorer_args": {}, "baseline": "base", "batch_size": 4,
                     "grid_columns": 2, "reward_curve": False, "implicit_accuracy": False, "bootstrap_samples": 100,
                     "report": False},
    }
    params = parse_params(merged(yaml.safe_load((REPO / "params.yaml").read_text()), overrides))
    evaluate_trained(params, tmp_path / "trained", Paths(tmp_path / "ws"), progress=lambda _: None)
    err = capsys.readouterr().err
    for model in ("base", "trained"):
        _finished(err, f"evaluate {model}: sampling", 6, "img")  # 3 prompts x 2 seeds, in batches of 4
        _finished(err, f"evaluate {model}: scoring", 1, "scorer")

    prompts, seeds = ["a cat", "a dog", "a red owl", "a cat", "a dog"], [1, 2, 3, 4, 5]
    cfg = SamplingConfig(**params.sampling.model_dump())
    whole = generate(pipe, prompts, seeds, cfg, batch_size=2)
    batched = [img for s in range(0, 5, 2) for img in generate(pipe, prompts[s:s + 2], seeds[s:s + 2], cfg,
                                                                batch_size=2)]
    assert [im.tobytes() for im in whole] == [im.tobytes() for im in batched]


def test_every_evaluation_module_with_a_long_loop_uses_the_shared_bar():
    """The phases above are the evaluation's long ones; the bar's settings live in one place."""
    for module in ("evaluation/evaluate.py", "evaluation/implicit.py", "prefdiff/data/pickapic.py"):
        text = (Path(REPO) / module).read_text()
        assert "from prefdiff.progress import progress_bar" in text and "from tqdm" not in text, module
