"""The built-in ``digits`` base model: a Stable-Diffusion-shaped pipeline prefdiff trains on scikit-learn's digits.

No weights can be downloaded where prefdiff must run, but scikit-learn ships a real image data set in its wheel
(``load_digits``: 1,797 handwritten digits, 8x8, ten classes). This module trains, from fixed seeds, a pipeline
with every component of SD 1.5 (the project's CLIP tokenizer + ``CLIPTextModel``, ``UNet2DConditionModel``
with cross-attention, ``AutoencoderKL``, DDIM with SD 1.5's schedule), so every stage, trainer, LoRA target and
loader runs on it unchanged:

* images: the digits upsampled to 32x32 (``prefdiff.scorers.digits.render_digits``), dark ink on white;
* ``AutoencoderKL`` with a x4 factor (4x8x8 latents): reconstruction MSE + a small KL term, as SD's VAE;
* ``UNet2DConditionModel`` + ``CLIPTextModel`` trained together with the epsilon-prediction loss on the VAE's
  latents (``scaling_factor`` = 1 / std of those latents, SD's recipe), captions drawn from
  ``prefdiff.prompts.DIGIT_PRETRAIN_TEMPLATES`` ("a handwritten seven", "the digit 7", ...), 10 % of them
  replaced by "" so classifier-free guidance works. An auxiliary cross-entropy that reads the digit off the
  text encoder's pooled output makes the randomly initialised character-level encoder digit-aware within a
  few hundred steps (without it, 1,500 steps were not enough for the UNet to follow the prompt);
* the digit classifier of the ``digit_alignment`` judge, on digits the generator never saw.

The data set is split once by a seeded permutation: 60 % for the generator, 30 % to train the classifier, 10 %
to test it. ``python -m prefdiff.models.digits`` runs the whole pretraining (about 3 minutes on 2 CPU cores,
deterministic from ``DigitsPretrainConfig.seed``: every minibatch and noise draw is a pure function of
(seed, phase, step); resumable from ``--work-dir`` checkpoints) and writes the pipeline to
``prefdiff/models/assets/digits`` (safetensors, committed to git so that no clone retrains it), the
classifier to ``prefdiff/scorers/assets/digit_classifier.safetensors``, and ``pretrain.json`` with the
configuration, the split, the losses and the base model's measured quality.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from prefdiff.prompts import DIGIT_PRETRAIN_TEMPLATES, digit_prompts

DIGITS_DIR = Path(__file__).resolve().parent / "assets" / "digits"
REPORT_NAME = "pretrain.json"
IMAGE_SIZE = 32
CONTEXT_LENGTH = 32  # tokens: the longest pretraining caption is 25 characters + start/end
TEXT_DIM = 32
PHASES = ("classifier", "vae", "unet")


@dataclass(frozen=True)
class DigitsPretrainConfig:
    """Everything that defines the pretrained weights (recorded in ``pretrain.json``)."""

    seed: int = 20261202
    generator_share: float = 0.6  # of the 1,797 digits; the rest: classifier train (3/4) and test (1/4)
    classifier_steps: int = 400  # full-batch AdamW steps
    classifier_lr: float = 3e-3
    vae_steps: int = 300
    vae_batch: int = 64
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 250
    unet_batch: int = 64
    unet_lr: float = 2e-3
    caption_dropout: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    text_aux_weight: float = 0.02  # weight of the digit cross-entropy on the text encoder's pooled output
    checkpoint_every: int = 50  # steps between resumable checkpoints in the work dir

    def steps(self, phase: str) -> int:
        return {"classifier": self.classifier_steps, "vae": self.vae_steps, "unet": self.unet_steps}[phase]

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


class DigitsModelMissing(FileNotFoundError):
    """The committed digits weights are not where the loader looked."""


def load_digits_pipeline():
    """The committed ``builtin:digits`` StableDiffusionPipeline (fp32, CPU, DDIM), identical on every call."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if not (DIGITS_DIR / "model_index.json").is_file():
        raise DigitsModelMissing(f"builtin:digits: no pipeline in {DIGITS_DIR}; build it with "
                                 "`python -m prefdiff.models.digits` (about 3 minutes on 2 CPU cores)")
    pipe = StableDiffusionPipeline.from_pretrained(str(DIGITS_DIR), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class DigitSplits:
    """The data set's ink [N, 8, 8] in [0, 1] and labels [N], split by one seeded permutation."""

    ink: torch.Tensor
    labels: torch.Tensor
    generator: torch.Tensor  # indices the generator trains on
    classifier_train: torch.Tensor
    classifier_test: torch.Tensor


def digit_splits(config: DigitsPretrainConfig) -> DigitSplits:
    from sklearn.datasets import load_digits

    data = load_digits()
    ink = torch.tensor(data.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(config.seed))
    n_gen = int(round(config.generator_share * len(labels)))
    n_train = int(round(0.75 * (len(labels) - n_gen)))
    return DigitSplits(ink, labels, order[:n_gen], order[n_gen:n_gen + n_train], order[n_gen + n_train:])


def _step_generator(config: DigitsPretrainConfig, phase: str, step: int) -> torch.Generator:
    """The draws of one step: a pure function of (seed, phase, step), so a resumed run replays them exactly."""
    digest = hashlib.sha256(f"{config.seed}:{phase}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


# ------------------------------------------------------------------------------------------------ models


def build_untrained_pipeline():
    """The pipeline's modules at their seeded initialisation (fp32, CPU)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from prefdiff.models.tiny import SD15_SCHEDULER_CONFIG, build_tiny_tokenizer, tiny_text_config

    tokenizer = build_tiny_tokenizer(max_length=CONTEXT_LENGTH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DigitsPretrainConfig.seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), latent_channels=4,
            layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE)
        unet = UNet2DConditionModel(
            sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM, attention_head_dim=8,
            norm_num_groups=16)
        text_encoder = CLIPTextModel(tiny_text_config(tokenizer, TEXT_DIM))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Modules:
    """What the phases train, with their optimizers: one object the checkpoint saves and restores."""

    def __init__(self, config: DigitsPretrainConfig) -> None:
        from prefdiff.scorers.digits import DigitClassifier

        self.pipe = build_untrained_pipeline()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            self.classifier = DigitClassifier()
            self.text_head = torch.nn.Linear(TEXT_DIM, 10)
        self.optimizers = {
            "classifier": torch.optim.AdamW(self.classifier.parameters(), lr=config.classifier_lr),
            "vae": torch.optim.AdamW(self.pipe.vae.parameters(), lr=config.vae_lr),
            "unet": torch.optim.AdamW([*self.pipe.unet.parameters(), *self.pipe.text_encoder.parameters(),
                                       *self.text_head.parameters()], lr=config.unet_lr),
        }

    def state(self) -> dict[str, Any]:
        return {"classifier": self.classifier.state_dict(), "vae": self.pipe.vae.state_dict(),
                "unet": self.pipe.unet.state_dict(), "text_encoder": self.pipe.text_encoder.state_dict(),
                "text_head": self.text_head.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        self.classifier.load_state_dict(state["classifier"])
        self.pipe.vae.load_state_dict(state["vae"])
        self.pipe.unet.load_state_dict(state["unet"])
        self.pipe.text_encoder.load_state_dict(state["text_encoder"])
        self.text_head.load_state_dict(state["text_head"])
        for k, o in self.optimizers.items():
            o.load_state_dict(state["optimizers"][k])


# ------------------------------------------------------------------------------------------------ phases


def _rendered_grids(ink: torch.Tensor) -> torch.Tensor:
    """The classifier's input for data set digits: rendered as generator images, then read as any image is."""
    from prefdiff.scorers.base import to_pil_images
    from prefdiff.scorers.digits import ink_grid, render_digits

    return ink_grid(to_pil_images((render_digits(ink, IMAGE_SIZE) + 1.0) / 2.0))


class Pretraining:
    """The data, the modules and the step functions of one pretraining run."""

    def __init__(self, config: DigitsPretrainConfig, modules: _Modules) -> None:
        from prefdiff.scorers.digits import render_digits

        self.config, self.m = config, modules
        self.splits = digit_splits(config)
        gen = self.splits.generator
        self.images = render_digits(self.splits.ink[gen], IMAGE_SIZE)
        self.labels = self.splits.labels[gen]
        train = self.splits.classifier_train
        self.classifier_inputs = _rendered_grids(self.splits.ink[train])
        self.classifier_labels = self.splits.labels[train]
        self.latents: torch.Tensor | None = None
        self.losses: dict[str, float] = {}

    def step(self, phase: str, step: int) -> float:
        return {"classifier": self._classifier_step, "vae": self._vae_step, "unet": self._unet_step}[phase](
            _step_generator(self.config, phase, step))

    def _classifier_step(self, gen: torch.Generator) -> float:
        import torch.nn.functional as F

        # ink noise of one level: generated strokes are not the data set's exact 17 levels
        x = self.classifier_inputs + torch.randn(self.classifier_inputs.shape, generator=gen)
        loss = F.cross_entropy(self.m.classifier(x), self.classifier_labels)
        return self._apply("classifier", loss, self.m.classifier.parameters())

    def _vae_step(self, gen: torch.Generator) -> float:
        import torch.nn.functional as F

        vae = self.m.pipe.vae.train()
        x = self.images[torch.randint(0, len(self.images), (self.config.vae_batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(reconstruction, x) + self.config.vae_kl_weight * posterior.kl().mean()
        return self._apply("vae", loss, vae.parameters())

    def prepare_unet(self) -> None:
        """Latents of the generator's images (posterior means) and SD's scaling factor 1 / std(latents)."""
        vae = self.m.pipe.vae.eval()
        with torch.no_grad():
            means = torch.cat([vae.encode(self.images[i:i + 256]).latent_dist.mode()
                               for i in range(0, len(self.images), 256)])
        # float() of a float32 tensor: the same value on resume, and a JSON-friendly config entry
        scaling = float(1.0 / means.std())
        vae.register_to_config(scaling_factor=scaling)
        self.latents = means * scaling
        tokenizer = self.m.pipe.tokenizer
        self.captions = [*digit_prompts(DIGIT_PRETRAIN_TEMPLATES), ""]
        self.caption_ids = tokenizer(self.captions, padding="max_length", max_length=tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt").input_ids
        self.caption_digits = torch.arange(10).repeat_interleave(len(DIGIT_PRETRAIN_TEMPLATES))
        self.alphas_cumprod = self.m.pipe.scheduler.alphas_cumprod

    def _unet_step(self, gen: torch.Generator) -> float:
        import torch.nn.functional as F

        c, unet, text_encoder = self.config, self.m.pipe.unet.train(), self.m.pipe.text_encoder.train()
        rows = torch.randint(0, len(self.latents), (c.unet_batch,), generator=gen)
        template = torch.randint(0, len(DIGIT_PRETRAIN_TEMPLATES), (c.unet_batch,), generator=gen)
        caption = self.labels[rows] * len(DIGIT_PRETRAIN_TEMPLATES) + template
        caption[torch.rand(c.unet_batch, generator=gen) < c.caption_dropout] = len(self.captions) - 1
        noise = torch.randn(self.latents[rows].shape, generator=gen)
        t = torch.randint(0, len(self.alphas_cumprod), (c.unet_batch,), generator=gen)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * self.latents[rows] + (1 - a).sqrt() * noise
        # every distinct caption is encoded once per step (81 rows), then gathered for the batch
        encoded = text_encoder(self.caption_ids)
        prediction = unet(noisy, t, encoded.last_hidden_state[caption]).sample
        digit_logits = self.m.text_head(encoded.pooler_output[:-1])
        loss = F.mse_loss(prediction, noise) + c.text_aux_weight * F.cross_entropy(digit_logits, self.caption_digits)
        return self._apply("unet", loss, [*unet.parameters(), *text_encoder.parameters()])

    def _apply(self, phase: str, loss: torch.Tensor, params) -> float:
        optimizer = self.m.optimizers[phase]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params), 1.0)
        optimizer.step()
        value = float(loss.detach())
        self.losses[phase] = value
        return value


# ------------------------------------------------------------------------------------------------ driver


def pretrain(config: DigitsPretrainConfig, work_dir: Path, *,
             on_step: Callable[[str, int, float], None] | None = None, show_progress: bool = True) -> Pretraining:
    """Train the classifier, the VAE, then UNet + text encoder; resume from ``work_dir``'s checkpoint if any.

    ``on_step(phase, step, loss)`` runs after every step (the tests interrupt a run with it). A checkpoint of
    another configuration is refused rather than mixed in.
    """
    from tqdm import tqdm

    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = work_dir / "checkpoint.pt"
    modules = _Modules(config)
    done = {p: 0 for p in PHASES}
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        if state["config"] != config.fingerprint():
            raise ValueError(f"{checkpoint} belongs to another pretraining configuration ({state['config']}, this "
                             f"one is {config.fingerprint()}); delete it or use another --work-dir")
        modules.restore(state["modules"])
        done = state["done"]
    run = Pretraining(config, modules)
    total = sum(config.steps(p) for p in PHASES)
    with tqdm(total=total, initial=sum(done.values()), desc="pretrain digits", unit="step",
              disable=not show_progress, dynamic_ncols=True) as bar:
        for phase in PHASES:
            if phase == "unet":
                run.prepare_unet()  # depends only on the finished VAE: recomputed identically on resume
            for step in range(done[phase], config.steps(phase)):
                loss = run.step(phase, step)
                done[phase] = step + 1
                bar.set_postfix(phase=phase, loss=f"{loss:.4f}")
                bar.update(1)
                if done[phase] % config.checkpoint_every == 0 or done[phase] == config.steps(phase):
                    _save_checkpoint(checkpoint, config, modules, done)
                if on_step is not None:
                    on_step(phase, step, loss)
    return run


def _save_checkpoint(path: Path, config: DigitsPretrainConfig, modules: _Modules, done: dict[str, int]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"config": config.fingerprint(), "modules": modules.state(), "done": dict(done)}, tmp)
    tmp.replace(path)  # a crash mid-write leaves the previous checkpoint intact


def classifier_accuracy(run: Pretraining) -> tuple[int, int]:
    """(correct, total) of the classifier on its held-out test digits."""
    test = run.splits.classifier_test
    with torch.no_grad():
        predicted = run.m.classifier.eval()(_rendered_grids(run.splits.ink[test])).argmax(-1)
    return int((predicted == run.splits.labels[test]).sum()), len(test)


def save_pretrained(modules: _Modules, out_dir: Path, classifier_path: Path) -> None:
    from safetensors.torch import save_file

    pipe = modules.pipe
    for name in ("unet", "vae", "text_encoder"):
        getattr(pipe, name).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    classifier_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in modules.classifier.state_dict().items()}, str(classifier_path))


def main(argv: list[str] | None = None) -> None:
    from prefdiff.scorers.digits import DIGIT_CLASSIFIER

    parser = argparse.ArgumentParser(prog="python -m prefdiff.models.digits", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DIGITS_DIR, help="pipeline directory (default: the package's)")
    parser.add_argument("--classifier", type=Path, default=DIGIT_CLASSIFIER, help="digit classifier file")
    parser.add_argument("--work-dir", type=Path, default=Path(".prefdiff-pretrain"),
                        help="checkpoints for resuming (default: ./.prefdiff-pretrain)")
    args = parser.parse_args(argv)
    config = DigitsPretrainConfig()
    started = time.perf_counter()
    run = pretrain(config, args.work_dir)
    save_pretrained(run.m, args.out, args.classifier)
    correct, total = classifier_accuracy(run)
    report = {"config": asdict(config), "fingerprint": config.fingerprint(), "torch": torch.__version__,
              "split": {"generator": len(run.splits.generator),
                        "classifier_train": len(run.splits.classifier_train),
                        "classifier_test": len(run.splits.classifier_test)},
              "final_losses": run.losses, "classifier_test_accuracy": correct / total,
              "vae_scaling_factor": run.m.pipe.vae.config.scaling_factor,
              "seconds": round(time.perf_counter() - started, 1)}
    (args.out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    print(f"digits model: {args.out} ({report['seconds']} s); classifier {correct}/{total} "
          f"= {correct / total:.3f} on held-out digits; losses {run.losses}")


if __name__ == "__main__":
    main()
