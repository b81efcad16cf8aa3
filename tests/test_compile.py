"""``train.compile``: the training UNet compiled with torch.compile trains what eager PyTorch trains, and a compiler
whose gradients are not eager's is refused before it trains anything (``fit.check_compiled``).

On CPU the backend exercised is ``aot_eager`` (dynamo's captured graphs through AOTAutograd, run by eager kernels:
about 12 s to compile the tiny UNet here); inductor's CPU backward is wrong on this machine (README "Fast path") and
takes minutes to compile, so the refusal is tested with a deliberately wrong compiler instead: a backend that runs the
captured graph and scales its outputs by 1.01, i.e. gradients 1% off, ten times the fp32 tolerance.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from prefdiff.config import parse_params
from prefdiff.data.preferences import PreferenceStore
from prefdiff.data.trajectories import TrajectoryStore
from prefdiff.labeling.pairs import label_trajectories
from prefdiff.models.lora import LORA_WEIGHT_NAME
from prefdiff.sampling.dataset import sample_dataset
from prefdiff.scorers import get_scorer
from prefdiff.training.fit import COMPILE_RTOL, CompileMismatch, fit
from prefdiff.training.methods.d3po import D3PO
from prefdiff.training.trainable import TrainableUNet

BASE = {
    "sample": {"num_prompts": 2, "images_per_group": 3, "batch_size": 6},
    "sampling": {"num_steps": 4},
    "train": {"epochs": 1, "batch_size": 3, "lr": 0.01, "checkpoint_every": 2},
}


def params(**train):
    return parse_params({**BASE, "train": {**BASE["train"], **train}})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    sample_dataset(params(), root / "traj", progress=lambda _: None)
    label_trajectories(TrajectoryStore.open(root / "traj"), get_scorer("jpeg_compressibility"), root / "prefs",
                       progress=lambda _: None)
    assert PreferenceStore.open(root / "prefs").training_pairs()
    return root


def train(data, out, p, **kw):
    lines: list[str] = []
    summary = fit(p, trajectories_dir=data / "traj", preferences_dir=data / "prefs", out_dir=out / "trained",
                  checkpoint_dir=out / "ckpt", progress=lines.append, **kw)
    return summary, load_file(str(out / "trained" / LORA_WEIGHT_NAME)), lines


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled graphs are cached per code object: each test compiles its own model."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("method", ["d3po", "diffusion_dpo"])
def test_compiled_training_is_eager_training(data, tmp_path, method):
    """D3PO (timestep units, 3 pairs x 4 steps) and Diffusion-DPO (image pairs): with ``aot_eager`` the check passes
    and the run ends at the eager LoRA, the same curve. Tolerance 1e-6 of the largest weight change: AOTAutograd
    may decompose an op into others that sum in another order (measured here: 0, bit for bit)."""
    eager, w_eager, _ = train(data, tmp_path / "eager", params(method=method))
    compiled, w_compiled, lines = train(data, tmp_path / "compiled", params(method=method, compile="aot_eager"))
    checked = [x for x in lines if x.startswith("train.compile = 'aot_eager': gradients of the compiled UNet match")]
    assert len(checked) == 1, lines
    assert compiled.extra["compile_gradient_distance"] <= 1e-6
    assert "compile_gradient_distance" not in eager.extra
    change = max(float(w.abs().max()) for w in w_eager.values())  # LoRA B starts at 0: its final values are the change
    assert change > 0 and set(w_compiled) == set(w_eager)
    for name, w in w_eager.items():
        assert float((w_compiled[name] - w).abs().max()) <= 1e-6 * change, name
    for a, b in zip(eager.curve, compiled.curve, strict=True):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(a[k])) for k in a), (a, b)


def test_a_compiler_with_wrong_gradients_is_refused_before_training(data, tmp_path):
    """A backend whose graphs return 1.01 x the outputs: every part's gradient is ~1% off eager's; fit stops before
    its first optimizer step, naming the key, the parts and the tolerance, and writes nothing."""
    def one_percent_off(graph, example_inputs):
        def run(*args):
            out = graph(*args)
            return type(out)(o * 1.01 if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in out)
        return run

    p = params(compile="aot_eager")  # a valid key: the model below swaps in the wrong compiler
    model = TrainableUNet(p, need_reference_copy=D3PO.needs_reference_copy, progress=lambda _: None)
    start = {k: v.clone() for k, v in model.weights().items()}
    model.unet = torch.compile(model.eager_unet, backend=one_percent_off)
    with pytest.raises(CompileMismatch, match=r"train\.compile = 'aot_eager': the compiled UNet's gradients are not "
                       r"eager PyTorch's on the first training unit \(relative distance (\w+ 0\.0[01]\d*, )*\w+ 0\.0[01]\d*; "
                       rf"allowed {COMPILE_RTOL['no']:g} under mixed_precision 'no'\).*allowed: train\.compile null"):
        train(data, tmp_path / "wrong", p, model=model)
    assert not (tmp_path / "wrong" / "trained").exists()
    assert all(torch.equal(v, start[k]) for k, v in model.weights().items())  # no step taken
    assert all(q.grad is None for q in model.trainable)  # the check left no gradient behind


def test_compile_is_a_checked_key_not_a_result_key():
    """Not in the fingerprint of what a run trains (``in_use``): a checkpoint resumes with or without it; and
    one line names the allowed backends."""
    assert params(compile="aot_eager").train.in_use() == params().train.in_use()
    with pytest.raises(Exception, match=r"train\.compile.*'inductor', 'aot_eager' or 'cudagraphs'"):
        params(compile="fast")
