"""The built-in tiny pipeline, the one loader for every source, and LoRA identity at initialisation."""

import pytest
import torch

from prefdiff.models import lora
from prefdiff.models.loading import ModelNotFoundError, load_pipeline, model_fingerprint
from prefdiff.sampling.guidance import encode_prompts, guided_noise_pred


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("builtin:tiny-sd")


def _eps(pipe, unet=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    cond = encode_prompts(pipe, ["a cat", "a dog"])
    uncond = encode_prompts(pipe, [""]).expand_as(cond)
    return guided_noise_pred(unet or pipe.unet, x, torch.tensor([951, 451]), cond, uncond, 5.0)


def test_builtin_is_deterministic_and_sd_shaped(pipe):
    again = load_pipeline("builtin:tiny-sd")
    assert model_fingerprint(pipe) == model_fingerprint(again)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size == 8
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    ids = pipe.tokenizer(["a cat"]).input_ids[0]
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id and len(ids) == 6  # bos a</w> c a t</w> eos


def test_local_dir_goes_through_the_same_loader(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "tiny")
    loaded = load_pipeline(str(tmp_path / "tiny"))
    assert model_fingerprint(loaded) == model_fingerprint(pipe)
    torch.testing.assert_close(_eps(loaded), _eps(pipe), rtol=0, atol=0)


def test_missing_weights_say_what_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelNotFoundError) as err:
        load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")
    message = str(err.value)
    assert "not in the local Hugging Face cache" in message and "hf download" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="neither"):
        load_pipeline("not a model")


def test_policy_and_reference_bit_identical_at_init_and_lora_still_trains(pipe):
    base_eps = _eps(pipe)
    params = lora.add_lora(pipe.unet, rank=4, alpha=4)
    try:
        policy_eps = _eps(pipe)
        with lora.adapters_disabled(pipe.unet):
            ref_eps = _eps(pipe)
        assert torch.equal(policy_eps, ref_eps) and torch.equal(ref_eps, base_eps)
        assert all(p.requires_grad and p.dtype == torch.float32 for p in params)
        # after a reference pass the adapter is back on and trainable: a backward reaches every LoRA A/B
        _eps(pipe).square().mean().backward()
        assert sum(p.grad is not None for p in params) == len(params)
        assert any(p.grad.abs().sum() > 0 for p in params)
    finally:
        pipe.unet.delete_adapters(lora.ADAPTER)


def test_saved_lora_loads_with_diffusers_load_lora_weights(pipe, tmp_path):
    trained = load_pipeline("builtin:tiny-sd")
    params = lora.add_lora(trained.unet, rank=4, alpha=8)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    expected = _eps(trained)
    lora.save_lora(trained.unet, tmp_path / "lora")
    fresh = load_pipeline("builtin:tiny-sd")
    fresh.load_lora_weights(str(tmp_path / "lora"))  # plain diffusers API, as users load our output
    torch.testing.assert_close(_eps(fresh), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_eps(pipe), expected)
    # the training loader continues from the same weights
    cont = load_pipeline("builtin:tiny-sd")
    lora.load_lora_for_training(cont.unet, tmp_path / "lora")
    torch.testing.assert_close(_eps(cont), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights"):
        lora.load_lora_weights(fresh, tmp_path)


_SAVE_SCRIPT = """
import sys, torch
from pathlib import Path
from prefdiff.models.loading import load_pipeline
from prefdiff.models import lora
pipe = load_pipeline("builtin:tiny-sd")
torch.manual_seed(0)
lora.add_lora(pipe.unet, rank=4, alpha=4)
lora.save_lora(pipe.unet, Path(sys.argv[1]))
"""


def test_saved_lora_bytes_do_not_depend_on_the_process(tmp_path):
    """Same adapter, two processes with different hash seeds: identical files (DVC and registry hashes)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parents[1]
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(repo)}
        subprocess.run([sys.executable, "-c", _SAVE_SCRIPT, str(tmp_path / seed)], check=True, env=env,
                       capture_output=True, timeout=300)
    a, b = (tmp_path / s / lora.LORA_WEIGHT_NAME for s in ("1", "2"))
    assert a.read_bytes() == b.read_bytes()
    assert load_file(str(a)).keys() == load_file(str(b)).keys()
