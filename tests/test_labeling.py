"""JPEG-size scorers as label judges, building a judge by name, pair construction and the full label step."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prefdiff.data.preferences import PreferencePair, PreferenceStore
from prefdiff.data.trajectories import TrajectoryGroup, TrajectoryStore, TrajectoryWriter
from prefdiff.catalog import SCORERS
from prefdiff.labeling.pairs import judge_scorer, label_trajectories, pairs_from_groups
from prefdiff.scorers import get_scorer, scorer_names, scores_as_decimals
from prefdiff.scorers.jpeg import jpeg_size_kb


def noise(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def grey(size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), (128, 128, 128))


def label_judge(name: str, quality: int = 95, **args):
    """The label stage's judge: ``label.judge`` = name, ``label.judge_args`` = args, ``label.jpeg_quality``."""
    return judge_scorer(name, args, quality)


# -- judges ---------------------------------------------------------------------------------------------------
def test_jpeg_size_matches_pil_bytes() -> None:
    img = noise(0)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    expected = len(buf.getvalue()) / 1000
    assert expected > 1.0  # 32x32 noise does not compress: several kB
    assert jpeg_size_kb(img) == expected
    inc = label_judge("jpeg_incompressibility")
    comp = label_judge("jpeg_compressibility")
    s_inc = inc.score([img], ["cat"])
    assert s_inc.dtype == torch.float32 and s_inc.shape == (1,)  # the Scorer interface's dtype
    assert scores_as_decimals(s_inc) == [expected]  # the size in kB exactly, as the label stage stores it
    assert scores_as_decimals(comp.score([img], ["cat"])) == [-expected]
    assert inc.higher_is_better and comp.higher_is_better
    assert comp.params() == {"quality": 95}


def test_grey_is_more_compressible_than_noise() -> None:
    comp = label_judge("jpeg_compressibility")
    s = comp.score([grey(), noise(1)], ["a", "b"])
    assert s[0] > s[1]
    inc = label_judge("jpeg_incompressibility")
    torch.testing.assert_close(inc.score([grey(), noise(1)], ["a", "b"]), -s, rtol=0, atol=0)


def test_quality_param_and_mode_conversion() -> None:
    img = noise(2)
    q50 = label_judge("jpeg_incompressibility", quality=50)
    assert q50.params() == {"quality": 50}
    assert q50.score([img], [""])[0] < label_judge("jpeg_incompressibility").score([img], [""])[0]
    # RGBA is scored as its RGB conversion
    rgba = img.convert("RGBA")
    assert jpeg_size_kb(rgba) == jpeg_size_kb(img)
    for bad in (0, 96, 95.0, True, "95"):
        with pytest.raises(ValueError, match="quality"):
            label_judge("jpeg_compressibility", quality=bad)


def test_unknown_judge_and_param() -> None:
    with pytest.raises(ValueError, match=r"unknown scorer 'aesthetc'; valid names: .*jpeg_compressibility.*pickscore"):
        label_judge("aesthetc")
    with pytest.raises(ValueError, match=r"unknown arguments \['qualty'\]; allowed: .*quality"):
        label_judge("jpeg_compressibility", qualty=90)
    with pytest.raises(ValueError, match=r"quality=80 in the judge's arguments; set label.jpeg_quality"):
        judge_scorer("jpeg_compressibility", {"quality": 80}, 95)
    assert {"jpeg_compressibility", "jpeg_incompressibility"} <= set(SCORERS) <= set(scorer_names())
    assert {"pickscore", "image_reward", "laion_aesthetic", "clip_score", "hpsv2.1"} <= set(scorer_names())


def test_any_scorer_is_a_judge(tmp_path) -> None:
    """A scorer ranks groups in the label stage (AI feedback): a tiny CLIP saved to disk is PickScore here."""
    from tests.tiny_scorers import clip_model, clip_processor, clip_tokenizer

    model_dir = tmp_path / "clip"
    clip_model().save_pretrained(model_dir)
    clip_tokenizer(model_dir).save_pretrained(model_dir)
    clip_processor().save_pretrained(model_dir)
    judge = label_judge("pickscore", model=str(model_dir), processor=str(model_dir), device="cpu")
    images = [Image.new("RGB", (40, 40), c) for c in ("red", "blue", "white")]
    scores = judge.score(images, ["a red square"] * 3)
    assert scores.dtype == torch.float32 and scores.shape == (3,) and judge.higher_is_better
    # the judge is the registry's scorer: the same weights, the same call on the same inputs -> the same bits
    same = get_scorer("pickscore", model=str(model_dir), processor=str(model_dir), device="cpu")
    assert torch.equal(scores, same.score(images, ["a red square"] * 3))
    assert judge.name == "pickscore" and judge.params() == same.params()


def test_stored_scores_keep_float32_order_and_ties() -> None:
    """The label stage stores each float32 score as its shortest decimal: same order, same ties, same float32."""
    base = torch.tensor([1.0, 12.345, -0.1, 3e-8, 7.5e4], dtype=torch.float32)
    up = torch.nextafter(base, torch.full_like(base, float("inf")))
    scores = torch.cat([base, up, base])  # neighbours one ulp apart, and exact duplicates
    stored = scores_as_decimals(scores)
    assert stored[:5] == [1.0, 12.345, -0.1, 3e-8, 7.5e4]
    assert torch.equal(torch.tensor(stored, dtype=torch.float32), scores)  # each decimal is its float32
    for i in range(len(scores)):
        for j in range(len(scores)):
            assert (stored[i] < stored[j]) == bool(scores[i] < scores[j])
            assert (stored[i] == stored[j]) == bool(scores[i] == scores[j])


# -- pairs ------------------------------------------------------------------------------------------------------
GROUPS = [
    {"group_id": 0, "prompt": "cat", "seed": 1, "image_ids": [0, 1, 2]},
    {"group_id": 1, "prompt": "dog", "seed": 2, "image_ids": [3, 4, 5]},
]


def test_pairs_from_groups_g3() -> None:
    scores = {0: 1.0, 1: 3.0, 2: 2.0, 3: -1.0, 4: -1.0, 5: 0.5}
    pairs = pairs_from_groups(GROUPS, scores)
    assert len(pairs) == 6  # C(3,2)=3 per group
    assert pairs[:3] == [
        PreferencePair(0, "cat", 1, 0, 3.0, 1.0, False),
        PreferencePair(0, "cat", 2, 0, 2.0, 1.0, False),
        PreferencePair(0, "cat", 1, 2, 3.0, 2.0, False),
    ]
    assert pairs[3] == PreferencePair(1, "dog", 3, 4, -1.0, -1.0, True)  # exact tie: ids ascending
    assert [p.tie for p in pairs] == [False, False, False, True, False, False]
    assert all(p.winner_score >= p.loser_score for p in pairs)
    # lower-is-better judges flip the winner but keep raw scores
    flipped = pairs_from_groups(GROUPS[:1], scores, higher_is_better=False)
    assert (flipped[0].winner, flipped[0].winner_score) == (0, 1.0)


def test_pairs_errors() -> None:
    with pytest.raises(KeyError, match="image_id 2"):
        pairs_from_groups(GROUPS[:1], {0: 1.0, 1: 2.0})
    with pytest.raises(ValueError, match="not finite"):
        pairs_from_groups(GROUPS[:1], {0: 1.0, 1: float("nan"), 2: 0.0})


# -- full label step -------------------------------------------------------------------------------------------
def test_label_trajectories_end_to_end(tmp_path: Path) -> None:
    # group 0: grey (most compressible), noise, a duplicate grey -> tie between 0 and 2
    # group 1: noise, grey, noise
    imgs = [[grey(), noise(10), grey()], [noise(11), grey(), noise(12)]]
    traj_dir = tmp_path / "data" / "trajectories"
    with TrajectoryWriter(traj_dir, shard_size=4, model={}, params={}) as w:
        for i, ims in enumerate(imgs):
            w.add_group(TrajectoryGroup(
                prompt=["cat", "dog"][i], seed=i,
                latents=torch.zeros(3, 3, 4, 2, 2), log_probs=torch.zeros(3, 2),
                timesteps=torch.tensor([500, 0]), images=ims,
            ))
    store = TrajectoryStore.open(traj_dir)
    lines: list[str] = []
    out = tmp_path / "data" / "preferences"
    idx = label_trajectories(store, label_judge("jpeg_compressibility"), out, batch_size=4, progress=lines.append)
    assert idx == out / "index.json"
    assert lines == ["scored 4/6 images", "scored 6/6 images"]
    prefs = PreferenceStore.open(out)
    assert prefs.index["judge"] == {"name": "jpeg_compressibility", "higher_is_better": True, "params": {"quality": 95}}
    s = prefs.summary()
    assert (s.num_pairs, s.num_ties, s.num_groups) == (6, 1, 2)
    tie = [p for p in prefs.pairs if p.tie]
    assert [(p.winner, p.loser) for p in tie] == [(0, 2)]
    assert len(prefs.training_pairs()) == 5 and all(not p.tie for p in prefs.training_pairs())
    # the grey image wins every non-tied comparison it is in
    for p in prefs.training_pairs():
        assert p.winner in (0, 2, 4) or p.loser not in (0, 2, 4)
        assert p.winner_score > p.loser_score
    grey_score = -jpeg_size_kb(grey())
    assert prefs.pairs[0].winner_score == grey_score
    margins = [p.winner_score - p.loser_score for p in prefs.pairs]
    assert s.mean_margin == pytest.approx(sum(margins) / 6)
    assert json.loads((out / "index.json").read_text())["trajectories"]["index_sha256"] == store.index_sha256()
    prefs.check_trajectories(store)


def test_tie_margin_turns_near_equal_judge_scores_into_ties() -> None:
    groups = [{"group_id": 0, "prompt": "a 7", "image_ids": [0, 1, 2]}]
    scores = {0: 0.90, 1: 0.95, 2: 0.20}
    exact = pairs_from_groups(groups, scores)
    assert [(p.winner, p.loser, p.tie) for p in exact] == [(1, 0, False), (0, 2, False), (1, 2, False)]
    margin = pairs_from_groups(groups, scores, tie_margin=0.1)  # |0.95 - 0.90| <= 0.1: no preference
    assert [(p.winner, p.loser, p.tie) for p in margin] == [(0, 1, True), (0, 2, False), (1, 2, False)]
    with pytest.raises(ValueError, match=r"tie_margin=-0.1: must be a finite number >= 0"):
        pairs_from_groups(groups, scores, tie_margin=-0.1)
