"""The benchmarks' shared pieces: the full-size architectures they time, and how a side's command line is made."""

from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks import common

# Published parameter counts of the real checkpoints' components (runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-xl-base-1.0): the configs written in benchmarks/common.py must build these shapes.
EXPECTED = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text": 123_060_480},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text": 123_060_480 + 694_659_840},
}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_full_size_architectures_match_the_published_parameter_counts(arch):
    # on the meta device: shapes without memory or initialisation cost
    args = argparse.Namespace(arch=arch, resolution=None, device="meta", dtype="fp32")
    pipe = common.build_pipeline(args, torch.device("meta"))
    text = _count(pipe.text_encoder) + (_count(pipe.text_encoder_2) if arch == "sdxl" else 0)
    assert {"unet": _count(pipe.unet), "vae": _count(pipe.vae), "text": text} == EXPECTED[arch]
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == common.RESOLUTION[arch]


def test_side_argv_drops_the_side_flag_in_both_spellings():
    argv = ["--arch", "sd15", "--side", "both", "--repeats", "2", "--side=prefdiff"]
    assert common.side_argv(argv) == ["--arch", "sd15", "--repeats", "2"]


@pytest.mark.parametrize("module, argv", [
    ("benchmarks.sampling", ["--batch", "2", "--steps", "2"]),
    ("benchmarks.d3po_step", ["--pairs", "1", "--steps", "2"]),
    ("benchmarks.diffusion_dpo_step", ["--batch", "2"]),
])
def test_each_two_sided_benchmark_runs_both_sides_on_the_tiny_model(module, argv):
    """A smoke run (one repeat, tiny sizes; the times mean nothing): both sides in their fresh processes finish
    and report a time, the ratio and peak memory, so a library change that breaks a side fails here."""
    import importlib

    summary = importlib.import_module(module).main([*argv, "--repeats", "1"])
    for side in ("prefdiff", "reference"):
        assert summary["sides"][side]["median_s"] > 0 and summary["sides"][side]["peak_mem_bytes"] > 0, summary
    assert summary["speedup"] > 0
