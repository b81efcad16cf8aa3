"""The built-in digits model (prefdiff.models.digits), its prompts and its judges (prefdiff.scorers.digits).

The committed weights are loaded through the same loader every stage uses; the pretraining itself is tested
on a reduced budget (a few steps per phase): determinism from the seed and an interrupted run resuming to the
same weights, which is what makes the committed weights reproducible by ``python -m prefdiff.models.digits``.
"""

import dataclasses
import json
import re

import pytest
import torch

from prefdiff.models import digits
from prefdiff.prompts import PROMPT_SETS, digit_prompts, prompted_digit
from prefdiff.scorers import get_scorer
from prefdiff.scorers.base import to_pil_images
from prefdiff.scorers.digits import DigitAlignmentScorer, ink_coverage_percent, ink_grid, render_digits


# --- prompts ---------------------------------------------------------------------------------------------


def test_prompt_sets_name_every_digit_in_words_and_numerals():
    rounds, heldout = PROMPT_SETS["digits"], PROMPT_SETS["digits_heldout"]
    assert len(rounds) == 40 and len(heldout) == 20 and not set(rounds) & set(heldout)
    assert rounds[:4] == ("a handwritten zero", "the digit 0", "the number zero", "a handwritten 0")
    assert [prompted_digit(p) for p in heldout] == [d for d in range(10) for _ in range(2)]
    assert digit_prompts(["{w} or {n}"])[7] == "seven or 7"


@pytest.mark.parametrize("prompt, digit", [("A Seven written by hand", 7), ("the digit 0.", 0), ("nine, nine", 9)])
def test_prompted_digit_reads_words_and_numerals(prompt, digit):
    assert prompted_digit(prompt) == digit


@pytest.mark.parametrize("prompt, what", [("a cat", "no digit"), ("a 3 and a four", "several digits [3, 4]"),
                                          ("the year 1984", "no digit")])
def test_prompted_digit_refuses_prompts_without_exactly_one_digit(prompt, what):
    with pytest.raises(ValueError, match=re.escape(f"names {what}; a digit prompt")):
        prompted_digit(prompt)


# --- the committed model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    from prefdiff.models.loading import load_pipeline

    return load_pipeline("builtin:digits")


def test_builtin_digits_is_a_stable_diffusion_pipeline(pipe):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, DDIMScheduler)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == digits.IMAGE_SIZE == 32
    assert pipe.tokenizer.model_max_length == digits.CONTEXT_LENGTH
    # every caption fits the context without truncation
    assert max(len(pipe.tokenizer(p).input_ids) for p in digit_prompts(digits.DIGIT_PRETRAIN_TEMPLATES)) <= 32


def test_committed_weights_come_from_this_configuration():
    """pretrain.json is written by the same run as the weights; its configuration must be the code's."""
    report = json.loads((digits.DIGITS_DIR / digits.REPORT_NAME).read_text())
    assert report["fingerprint"] == digits.DigitsPretrainConfig().fingerprint()
    assert report["config"] == dataclasses.asdict(digits.DigitsPretrainConfig())
    assert report["classifier_test_accuracy"] >= 0.9


def test_loading_twice_gives_the_same_weights(pipe):
    from prefdiff.models.loading import load_pipeline, model_fingerprint

    assert model_fingerprint(load_pipeline("builtin:digits")) == model_fingerprint(pipe)


def test_base_model_draws_the_prompted_digit_often_but_not_always(pipe):
    """The base quality the issue asks for: clearly above chance (10 %), below perfect (room to improve).

    40 samples at the default sampling (T = 20, eta = 1, w = 2): the committed model measured 0.55-0.65 on
    such sets; the bounds leave ~4 binomial standard errors (sd ~0.08 at n = 40) on each side.
    """
    from prefdiff.sampling.sampler import SamplingConfig, generate

    prompts = [p for p in PROMPT_SETS["digits_heldout"] for _ in range(2)]
    images = generate(pipe, prompts, list(range(len(prompts))), SamplingConfig(20, 1.0, 2.0), batch_size=40)
    probs = DigitAlignmentScorer().digit_probabilities(images)
    accuracy = float((probs.argmax(1) == torch.tensor([prompted_digit(p) for p in prompts])).float().mean())
    assert 0.25 <= accuracy <= 0.9


# --- judges ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heldout_digits():
    """The classifier's test digits (never trained on by generator or classifier), rendered as generator images."""
    splits = digits.digit_splits(digits.DigitsPretrainConfig())
    test = splits.classifier_test
    images = to_pil_images((render_digits(splits.ink[test], digits.IMAGE_SIZE) + 1) / 2)
    return images, splits.labels[test].tolist()


def test_digit_alignment_scores_the_prompted_digit(heldout_digits):
    images, labels = heldout_digits
    scorer = get_scorer("digit_alignment")
    right = scorer.score(images, [f"a handwritten {d}" for d in labels])
    wrong = scorer.score(images, [f"the digit {(d + 1) % 10}" for d in labels])
    assert right.dtype == torch.float32 and right.shape == (len(images),)
    assert float(right.mean()) > 0.9 and float(wrong.mean()) < 0.05  # measured 0.95 / 0.006
    probs = scorer.digit_probabilities(images)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(images)))  # softmax rows
    torch.testing.assert_close(right, probs[torch.arange(len(images)), torch.tensor(labels)])


def test_stroke_judges_measure_ink_coverage():
    blank = torch.ones(1, 3, 8, 8)
    quarter = torch.ones(1, 3, 8, 8)
    quarter[..., :4, :4] = 0.0  # a black quarter: 25 % ink
    images = torch.cat([blank, quarter])
    assert ink_coverage_percent(to_pil_images(images)).tolist() == [0.0, 25.0]
    assert get_scorer("stroke_bold").score(images).tolist() == [0.0, 25.0]
    assert get_scorer("stroke_thin").score(images).tolist() == [0.0, -25.0]


def test_render_digits_draws_dark_ink_on_white_paper():
    ink = torch.zeros(1, 8, 8)
    ink[0, 3:5, 3:5] = 1.0
    image = render_digits(ink, 32)
    assert image.shape == (1, 3, 32, 32) and float(image[0, :, 0, 0].min()) == 1.0  # corners: paper
    assert float(image[0, 0, 16, 16]) == -1.0  # the stroke's centre: full ink


# --- pretraining ----------------------------------------------------------------------------------------------

TINY = digits.DigitsPretrainConfig(classifier_steps=3, vae_steps=3, vae_batch=4, unet_steps=4, unet_batch=4,
                                   checkpoint_every=2)


def _weights(run) -> dict[str, torch.Tensor]:
    state = run.m.state()
    return {f"{k}.{n}": v for k in ("classifier", "vae", "unet", "text_encoder") for n, v in state[k].items()}


class _Interrupt(Exception):
    pass


def test_pretraining_is_deterministic_and_resumes_to_the_same_weights(tmp_path):
    first = _weights(digits.pretrain(TINY, tmp_path / "a", show_progress=False))
    again = _weights(digits.pretrain(TINY, tmp_path / "b", show_progress=False))
    assert all(torch.equal(first[k], again[k]) for k in first)  # the same calls on the same inputs

    def interrupt(phase, step, loss):
        if phase == "unet" and step == 2:  # after the checkpoint at unet step 2, before the end
            raise _Interrupt

    with pytest.raises(_Interrupt):
        digits.pretrain(TINY, tmp_path / "c", on_step=interrupt, show_progress=False)
    resumed = _weights(digits.pretrain(TINY, tmp_path / "c", show_progress=False))
    assert all(torch.equal(first[k], resumed[k]) for k in first)


def test_pretraining_refuses_another_configurations_checkpoint(tmp_path):
    digits.pretrain(TINY, tmp_path, show_progress=False)
    other = dataclasses.replace(TINY, unet_lr=1e-3)
    with pytest.raises(ValueError, match="belongs to another pretraining configuration"):
        digits.pretrain(other, tmp_path, show_progress=False)


def test_save_pretrained_round_trips_through_the_loader(tmp_path):
    from prefdiff.models.loading import load_pipeline, model_fingerprint

    run = digits.pretrain(TINY, tmp_path / "work", show_progress=False)
    digits.save_pretrained(run.m, tmp_path / "pipe", tmp_path / "classifier.safetensors")
    loaded = load_pipeline(str(tmp_path / "pipe"))
    assert model_fingerprint(loaded) == model_fingerprint(run.m.pipe)
    assert loaded.vae.config.scaling_factor == run.m.pipe.vae.config.scaling_factor
    scorer = DigitAlignmentScorer(classifier=tmp_path / "classifier.safetensors")
    images = to_pil_images(torch.rand(2, 3, 32, 32))
    with torch.no_grad():
        expected = torch.softmax(run.m.classifier.eval()(ink_grid(images)), -1)
    assert torch.equal(scorer.digit_probabilities(images), expected)  # the same call on the same inputs
