"""prefdiff.scorers: every scorer against a hand recomputation from its tiny model's own embeddings, batch-size
invariance, exact preprocessing against a PIL reference, input handling, the registry, missing-weight errors
and loading from local save_pretrained directories. Tiny random-weight models only; nothing is downloaded."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny_scorers as T
from prefdiff.scorers import (ScorerWeightsMissing, available, get_scorer, scorer_names, scores_as_decimals,
                              to_pil_images)
from prefdiff.scorers.aesthetic import LaionAestheticScorer, load_aesthetic_head
from prefdiff.scorers.base import clip_pixel_values
from prefdiff.scorers.blip import BlipITCScorer, BlipITMScorer
from prefdiff.scorers.clip_score import CLIPCosineScorer, CLIPScorer, torchmetrics_clip_score, torchmetrics_mean
from prefdiff.scorers.hpsv2 import MANIFEST, HPSv2Scorer, HPSv2VersionMismatch, hps_pixel_values
from prefdiff.scorers.image_reward import ImageRewardModel, ImageRewardScorer
from prefdiff.scorers.jpeg import JpegCompressibilityScorer, JpegIncompressibilityScorer
from prefdiff.scorers.pickscore import PickScorer

IMAGES = T.images()
PROMPTS = T.PROMPTS


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"clip": T.clip_tokenizer(root / "clip"), "bert": T.bert_tokenizer(root / "bert")}


@pytest.fixture(scope="module")
def models(tok):
    return {"clip": T.clip_model(0), "clip768": T.clip_model(1, projection_dim=768),
            "clip_gelu": T.clip_model(2, hidden_act="gelu"), "blip": T.blip_retrieval(tok["bert"], 3),
            "ir": T.imagereward_model(tok["bert"], 4)}


@pytest.fixture(scope="module")
def scorers(tok, models):
    clip_proc, ct, bt = T.clip_processor(), tok["clip"], tok["bert"]
    return {
        "clip_score": CLIPScorer.from_components(models["clip"], clip_proc, ct),
        "clip_raw100": CLIPScorer.from_components(models["clip"], clip_proc, ct, clamp="none"),
        "clip_cosine": CLIPCosineScorer.from_components(models["clip"], clip_proc, ct),
        "pickscore": PickScorer.from_components(models["clip"], clip_proc, ct),
        "laion_aesthetic": LaionAestheticScorer.from_components(models["clip768"], clip_proc),
        "blip_itc": BlipITCScorer.from_components(models["blip"], bt),
        "blip_itm": BlipITMScorer.from_components(models["blip"], bt, T.blip_processor()),
        "image_reward": ImageRewardScorer.from_components(models["ir"], bt),
        "hpsv2.1": HPSv2Scorer.from_components(models["clip_gelu"], tokenizer=ct, version="v2.1"),
        "jpeg_compressibility": JpegCompressibilityScorer(),
        "jpeg_incompressibility": JpegIncompressibilityScorer(),
    }


def _clip_pixels(n=32):
    return torch.stack([T.clip_reference_pixels(im, n) for im in IMAGES])


def _clip_text(tokenizer):
    return tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")


def _cos(a, b):
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


# ------------------------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize("n", [32, 224])
def test_clip_preprocessing_exact_against_pil_reference(n):
    proc = T.clip_processor(n)
    sizes = [(512, 512), (512, 768), (768, 512), (300, 401), (401, 300), (37, 53), (33, 32), (31, 45), (n, n)]
    ims = T.images(len(sizes), seed=5, sizes=sizes)
    ours = clip_pixel_values(proc, ims)
    ref = torch.stack([T.clip_reference_pixels(im, n) for im in ims])
    assert ours.dtype == torch.float32 and ours.shape == (len(ims), 3, n, n)
    assert (ours - ref).abs().max().item() == 0.0


def test_blip_itm_preprocessing_exact_against_pil_reference():
    ims = T.images(4, seed=6, sizes=[(40, 40), (37, 53), (64, 48), (100, 30)])
    ours = clip_pixel_values(T.blip_processor(32), ims)
    ref = torch.stack([T.blip_reference_pixels(im, 32) for im in ims])
    assert (ours - ref).abs().max().item() == 0.0


def test_hps_preprocessing_resizes_longest_side_and_letterboxes():
    square, wide = T.images(2, seed=7, sizes=[(64, 64), (32, 64)])
    px = hps_pixel_values([square, wide], 32)
    t = torch.from_numpy(np.array(square)).permute(2, 0, 1).float().div(255)[None]  # ToTensor, then tensor resize
    expect = F.interpolate(t, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)[0]
    mean, std = torch.tensor(T.MEAN)[:, None, None], torch.tensor(T.STD)[:, None, None]
    assert torch.allclose(px[0], (expect - mean) / std, atol=0, rtol=0)
    # 32x64 -> 16x32 content, centred, 8 rows of zero padding (black before Normalize) above and below
    black = (0 - mean) / std
    assert torch.equal(px[1][:, :8], black.expand(3, 8, 32)) and torch.equal(px[1][:, 24:], black.expand(3, 8, 32))
    assert not torch.equal(px[1][:, 8:24], black.expand(3, 16, 32))


# ------------------------------------------------------------------------------------------------ inputs


def test_image_inputs_pil_numpy_and_float_tensor_agree(scorers):
    s = scorers["clip_raw100"]
    same = T.images(3, seed=8, sizes=[(40, 40)])
    arrays = [np.asarray(im) for im in same]
    u8 = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    floats = u8.float() / 255.0
    ref = s.score(same, PROMPTS[:3])
    for variant in (arrays, np.stack(arrays), floats, list(floats), u8):
        assert torch.equal(s.score(variant, PROMPTS[:3]), ref)
    assert [np.asarray(p).tolist() for p in to_pil_images(floats)] == [a.tolist() for a in arrays]


def test_input_validation(scorers):
    s = scorers["clip_score"]
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        s.score(torch.full((1, 3, 8, 8), 1.5), ["x"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        s.score(IMAGES[:2], ["x"])
    with pytest.raises(ValueError, match="needs one prompt"):
        s.score(IMAGES[:2])
    with pytest.raises(TypeError, match="single string"):
        s.score(IMAGES[:1], "x")
    with pytest.raises(ValueError, match="uint8"):
        s.score([np.zeros((8, 8, 3), dtype=np.float32)], ["x"])
    assert s.score([], []).shape == (0,)
    aes = scorers["laion_aesthetic"]
    assert aes.needs_prompt is False and aes.score(IMAGES[:2]).shape == (2,)
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        aes.score(IMAGES[:2], PROMPTS[:3])


# ------------------------------------------------------------------------------------------------ hand recomputation


def test_every_scorer_returns_float32_per_sample(scorers):
    for name, s in scorers.items():
        out = s.score(IMAGES, PROMPTS)
        assert out.dtype == torch.float32 and out.shape == (len(IMAGES),) and torch.isfinite(out).all(), name
        assert s.higher_is_better is True


def test_clip_score_and_cosine_by_hand(scorers, models, tok):
    m = models["clip"]
    text = _clip_text(tok["clip"])
    img = m.get_image_features(pixel_values=_clip_pixels()).pooler_output
    txt = m.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output
    cos = _cos(img, txt)
    assert (cos < 0).any() and (cos > 0).any()  # the tiny model gives both signs: the clamp matters
    torch.testing.assert_close(scorers["clip_cosine"].score(IMAGES, PROMPTS).double(), cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(scorers["clip_raw100"].score(IMAGES, PROMPTS).double(), 100 * cos, atol=1e-4, rtol=0)
    torch.testing.assert_close(scorers["clip_score"].score(IMAGES, PROMPTS).double(), (100 * cos).clamp_min(0),
                               atol=1e-4, rtol=0)  # clamp is PER SAMPLE


@pytest.mark.parametrize("subset", [slice(0, 6), slice(0, 2), slice(3, 4)])
def test_clip_score_mean_then_clamp_equals_torchmetrics(scorers, subset):
    """Our unclamped per-sample 100*cos, averaged then clamped, is torchmetrics' CLIPScore on the same model."""
    s = scorers["clip_raw100"]
    ims, prompts = IMAGES[subset], PROMPTS[subset]
    metric = torchmetrics_clip_score(s)
    metric.update([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in ims], prompts)
    ours = torchmetrics_mean(s.score(ims, prompts))
    torch.testing.assert_close(ours, metric.compute().float(), atol=1e-4, rtol=0)


def test_pickscore_by_hand(scorers, models, tok):
    m = models["clip"]
    text = _clip_text(tok["clip"])
    img = m.get_image_features(pixel_values=_clip_pixels()).pooler_output
    txt = m.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output
    expected = m.logit_scale.exp().double() * _cos(img, txt)
    torch.testing.assert_close(scorers["pickscore"].score(IMAGES, PROMPTS).double(), expected, atol=1e-5, rtol=0)


def test_aesthetic_by_hand_with_the_real_head(scorers, models):
    m = models["clip768"]
    emb = m.get_image_features(pixel_values=_clip_pixels()).pooler_output.double()
    emb = emb / emb.norm(dim=-1, keepdim=True)
    w, b = load_aesthetic_head().affine()
    torch.testing.assert_close(scorers["laion_aesthetic"].score(IMAGES).double(), emb @ w + b, atol=1e-5, rtol=0)


def test_blip_itc_by_hand(scorers, models, tok):
    m, bt = models["blip"], tok["bert"]
    text = bt(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    out = m(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=_clip_pixels(),
            use_itm_head=False)  # transformers' own ITC path: [N, N] similarity matrix
    torch.testing.assert_close(scorers["blip_itc"].score(IMAGES, PROMPTS), out.itm_score.diagonal(), atol=1e-6, rtol=0)
    assert (text["input_ids"][:, 0] == bt.cls_token_id).all()  # [CLS] first, as ImageReward's BLIPScore


def test_blip_itm_by_hand(scorers, models, tok):
    m, bt = models["blip"], tok["bert"]
    text = bt(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    pixels = torch.stack([T.blip_reference_pixels(im, 32) for im in IMAGES])
    out = m(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels, use_itm_head=True)
    torch.testing.assert_close(scorers["blip_itm"].score(IMAGES, PROMPTS), out.itm_score.softmax(-1)[:, 1],
                               atol=1e-6, rtol=0)


def test_blip_itm_enc_first_token(models, tok):
    s = BlipITMScorer.from_components(models["blip"], tok["bert"], T.blip_processor(), first_token="enc")
    ids = s.text_inputs(PROMPTS[:2])["input_ids"]
    assert (ids[:, 0] == tok["bert"].convert_tokens_to_ids("[ENC]")).all()
    assert s.score(IMAGES[:2], PROMPTS[:2]).shape == (2,)


def test_image_reward_by_hand(scorers, models, tok):
    m, bt = models["ir"], tok["bert"]
    text = bt(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    image_tokens = m.vision_model(pixel_values=_clip_pixels()).last_hidden_state
    hidden = m.text_encoder(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                            encoder_hidden_states=image_tokens,
                            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long))
    w, b = m.mlp.affine()  # the head is one affine map (dropout only, eval)
    expected = (hidden.last_hidden_state[:, 0].double() @ w + b - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(scorers["image_reward"].score(IMAGES, PROMPTS).double(), expected, atol=1e-5, rtol=0)
    assert m.mean == 0.16717362830052426 and m.std == 1.0333394966054072


def test_hpsv2_by_hand(scorers, models, tok):
    m = models["clip_gelu"]
    text = _clip_text(tok["clip"])
    img = m.get_image_features(pixel_values=hps_pixel_values(IMAGES, 32)).pooler_output
    txt = m.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output
    s = scorers["hpsv2.1"]
    torch.testing.assert_close(s.score(IMAGES, PROMPTS).double(), _cos(img, txt), atol=1e-6, rtol=0)  # no logit scale
    assert s.name == "hpsv2.1" and s.params()["version"] == "v2.1"


def _jpeg_kb(image, quality=95):
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue()) / 1000


def test_jpeg_scorers_are_the_jpeg_byte_count(scorers):
    """The JPEG scorers (also the label stage's judges) are +-(bytes of the q95 JPEG) / 1000, prompt or not."""
    for name, sign in (("jpeg_compressibility", -1.0), ("jpeg_incompressibility", 1.0)):
        s = scorers[name]
        assert s.needs_prompt is False and s.available()[0]
        expected = torch.tensor([sign * _jpeg_kb(im) for im in IMAGES], dtype=torch.float32)
        assert torch.equal(s.score(IMAGES), expected) and torch.equal(s.score(IMAGES, PROMPTS), expected)
        assert scores_as_decimals(s.score(IMAGES)) == [sign * _jpeg_kb(im) for im in IMAGES]  # exact kB
    assert (scorers["jpeg_compressibility"].score(IMAGES) < 0).all()


def test_jpeg_sizes_stay_exact_in_float32_below_the_bound(monkeypatch):
    """Every size of n bytes below MAX_EXACT_KB comes back from float32 as exactly n/1000 (checked for the 4000
    sizes just under the bound, where float32 is coarsest); just above it two sizes share a float32."""
    from prefdiff.scorers import jpeg

    below = [n / 1000 for n in range(int(jpeg.MAX_EXACT_KB * 1000) - 4000, int(jpeg.MAX_EXACT_KB * 1000))]
    assert scores_as_decimals(torch.tensor(below, dtype=torch.float32)) == below
    above = torch.tensor([n / 1000 for n in range(int(jpeg.MAX_EXACT_KB * 1000), int(jpeg.MAX_EXACT_KB * 1000) + 10)],
                         dtype=torch.float32)
    assert len(set(above.tolist())) < len(above)
    monkeypatch.setattr(jpeg, "MAX_EXACT_KB", 1.0)  # a 64x64 noisy JPEG is several kB: over this bound
    with pytest.raises(ValueError, match="jpeg_incompressibility: JPEG size .* kB >= 1 kB"):
        get_scorer("jpeg_incompressibility").score([T.images(1, seed=3, sizes=[(64, 64)])[0]])


# Scores of the same images computed in another batch composition (another batch size, a scorer reloaded from
# disk) are equal only up to float32 rounding: a GEMM's reduction blocking depends on the batch size and on
# the thread count, and each score is a chain of dot products of length <= 512 in these tiny models. A chain
# of such sums keeps ~1e-6 relative error in the worst case measured (2.3e-6 on a 2-core CI machine); 2e-5
# relative (~170 float32 ulp) bounds it with margin and is still 100x below any real difference a scorer bug
# makes (a wrong key, processor or scale changes scores by >1e-3 relative).
SAME_SCORE_RTOL = 2e-5


def assert_same_scores(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=SAME_SCORE_RTOL, atol=SAME_SCORE_RTOL)


# ------------------------------------------------------------------------------------------------ batching


def test_batch_size_invariance(scorers):
    """bs=1 vs bs=N agree to SAME_SCORE_RTOL in each score's natural unit (cosines; clip_score's x100 and PickScore's
    logit scale divided out). Not bit-exact: float32 GEMMs block differently for different batch sizes
    (~1e-7 on the image features alone)."""
    for name, s in scorers.items():
        full = s.score(IMAGES, PROMPTS)
        s.batch_size, saved = 1, s.batch_size
        try:
            single = s.score(IMAGES, PROMPTS)
        finally:
            s.batch_size = saved
        unit = getattr(s, "scale", 1.0)
        if name == "pickscore":
            unit = s.model.logit_scale.exp().item()
        if name.startswith("jpeg"):
            assert torch.equal(full, single), name
        assert ((full - single).abs().max() / unit).item() <= SAME_SCORE_RTOL * max(1.0, (full.abs().max() / unit).item()), name


def test_half_dtype_is_ignored_on_cpu(models, tok):
    with pytest.warns(UserWarning, match="only used on CUDA"):
        s = CLIPCosineScorer.from_components(models["clip"], T.clip_processor(), tok["clip"], dtype="fp16",
                                             device="cpu")
    assert s.model.vision_model.embeddings.patch_embedding.weight.dtype == torch.float32
    assert s.describe()["backbone_dtype"] == "float16"  # what was asked for is recorded


# ------------------------------------------------------------------------------------------------ registry


def test_registry_names_and_errors():
    names = scorer_names()
    for n in ("clip_score", "clip_cosine", "pickscore", "laion_aesthetic", "aesthetic", "blip", "blip_itc", "blip_itm",
              "image_reward", "hpsv2.0", "hpsv2.1", "jpeg_compressibility", "jpeg_incompressibility"):
        assert n in names
    with pytest.raises(ValueError) as err:
        get_scorer("pick_score")
    assert all(n in str(err.value) for n in names)
    with pytest.raises(ValueError, match="hpsv2.0 or hpsv2.1"):
        get_scorer("hpsv2")
    with pytest.raises(ValueError, match="unknown arguments \\['bogus'\\].*allowed:.*model"):
        get_scorer("clip_score", bogus=1)
    assert isinstance(get_scorer("blip"), BlipITCScorer) and get_scorer("blip").name == "blip_itc"
    assert get_scorer("hpsv2.0").version == "v2.0" and get_scorer("hpsv2.1").name == "hpsv2.1"
    assert get_scorer("jpeg_compressibility", quality=80).quality == 80
    assert get_scorer("clip_cosine").needs_prompt and not get_scorer("aesthetic").needs_prompt


def test_every_catalog_name_builds_the_scorer_of_that_name():
    """prefdiff.catalog.SCORERS is the registry: each entry builds (nothing loaded) a Scorer recording that name,
    and each alias builds its target."""
    from prefdiff.catalog import SCORER_ALIASES, SCORERS
    from prefdiff.scorers import Scorer, canonical_name, scorer_arguments

    assert scorer_names() == sorted([*SCORERS, *SCORER_ALIASES])
    for name in SCORERS:
        s = get_scorer(name)
        assert isinstance(s, Scorer) and s.name == name and canonical_name(name) == name and not s._loaded
        assert {"device", "dtype", "batch_size", "local_files_only"} <= set(scorer_arguments(name))
    assert SCORER_ALIASES == {"blip": "blip_itc", "aesthetic": "laion_aesthetic"}
    for alias, target in SCORER_ALIASES.items():
        assert canonical_name(alias) == target and get_scorer(alias).name == target
    # the HPSv2 factories take HPSv2Scorer's own arguments, not its version
    assert {"source", "tokenizer", "antialias", "max_length"} <= set(scorer_arguments("hpsv2.0"))
    assert "version" not in scorer_arguments("hpsv2.1")


# ------------------------------------------------------------------------------------------------ missing weights


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return str(tmp_path / "hub")


def test_missing_local_dir_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no-such-dir"
    s = get_scorer("clip_score", model=str(missing))
    with pytest.raises(ScorerWeightsMissing) as err:
        s.score(IMAGES[:1], PROMPTS[:1])
    e = err.value
    assert e.scorer == "clip_score" and str(missing) in e.looked_for and "model" in e.how_to_provide
    assert "Looked for" in str(e) and "How to provide" in str(e) and "nothing is downloaded" in str(e)
    ok, why = available("clip_score", model=str(missing))
    assert not ok and str(missing) in why


def test_missing_hub_id_names_id_cache_and_download_command(empty_hub_cache):
    s = get_scorer("pickscore", model="nobody/not-a-model")
    with pytest.raises(ScorerWeightsMissing) as err:
        s.load()
    msg = str(err.value)
    assert "nobody/not-a-model" in msg and empty_hub_cache in msg
    assert "huggingface-cli download nobody/not-a-model" in msg


@pytest.mark.parametrize("name", ["clip_score", "clip_cosine", "pickscore", "laion_aesthetic", "blip_itc", "blip_itm",
                                  "image_reward", "hpsv2.0", "hpsv2.1"])
def test_every_weighted_scorer_reports_unavailable_without_loading(name, empty_hub_cache, monkeypatch):
    monkeypatch.setenv("HOME", str(empty_hub_cache))  # blip_itc's default ~/.cache/ImageReward/model_large.pth
    ok, why = available(name)
    assert not ok and "Looked for" in why and "How to provide" in why
    with pytest.raises(ScorerWeightsMissing):
        get_scorer(name).load()


def test_no_weight_scorers_are_available_offline(empty_hub_cache):
    assert available("jpeg_compressibility")[0] and available("jpeg_incompressibility")[0]


def test_hpsv2_refuses_a_checkpoint_of_the_other_version(tmp_path):
    path = tmp_path / "HPS_v2_compressed.pt"
    with pytest.raises(HPSv2VersionMismatch, match="v2.0.*asked for v2.1"):
        get_scorer("hpsv2.1", source=str(path))
    ok, why = available("hpsv2.1", source=str(path))
    assert not ok and "never mixed" in why
    assert HPSv2Scorer("v2.0", source=str(path)).version_source == "checkpoint file name"
    anonymous = HPSv2Scorer("v2.1", source=str(tmp_path / "weights.pt"))
    assert anonymous.version_source.startswith("declared by caller")


# ------------------------------------------------------------------------------------------------ local dirs


def _save_clip_dir(path, model, tokenizer):
    model.save_pretrained(path)
    T.clip_processor().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_clip_pickscore_aesthetic_load_from_local_dirs(tmp_path, monkeypatch, scorers, models, tok):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clip_dir = _save_clip_dir(tmp_path / "clip", models["clip"], tok["clip"])
    vit768_dir = _save_clip_dir(tmp_path / "clip768", models["clip768"], tok["clip"])
    for name, kw, ref in (("clip_score", {"model": clip_dir}, "clip_score"),
                          ("clip_cosine", {"model": clip_dir}, "clip_cosine"),
                          ("pickscore", {"model": clip_dir, "processor": clip_dir}, "pickscore"),
                          ("aesthetic", {"clip": vit768_dir}, "laion_aesthetic")):
        ok, why = available(name, **kw)
        assert ok, why
        s = get_scorer(name, batch_size=4, **kw)
        assert_same_scores(s.score(IMAGES, PROMPTS), scorers[ref].score(IMAGES, PROMPTS))


def test_blip_and_image_reward_load_from_local_dirs(tmp_path, monkeypatch, scorers, models, tok):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bt = tok["bert"]
    itm_dir = tmp_path / "itm"
    models["blip"].save_pretrained(itm_dir)
    T.blip_processor().save_pretrained(itm_dir)
    bt.save_pretrained(itm_dir)
    ir_dir = tmp_path / "ir"
    models["ir"].save_pretrained(ir_dir)
    bt.save_pretrained(ir_dir)
    for name, src, ref in (("blip_itm", itm_dir, "blip_itm"), ("blip_itc", itm_dir, "blip_itc"),
                           ("image_reward", ir_dir, "image_reward")):
        ok, why = available(name, source=str(src))
        assert ok, why
        s = get_scorer(name, source=str(src))
        assert_same_scores(s.score(IMAGES, PROMPTS), scorers[ref].score(IMAGES, PROMPTS))
    reloaded = ImageRewardModel.from_pretrained(ir_dir)
    assert reloaded.mean == models["ir"].mean and reloaded.text_config.encoder_hidden_size == 32


def test_hpsv2_loads_from_a_converted_dir_and_checks_its_manifest(tmp_path, monkeypatch, scorers, models, tok):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = _save_clip_dir(tmp_path / "hps", models["clip_gelu"], tok["clip"])
    (tmp_path / "hps" / MANIFEST).write_text('{"version": "v2.1"}')
    s = get_scorer("hpsv2.1", source=d)
    assert_same_scores(s.score(IMAGES, PROMPTS), scorers["hpsv2.1"].score(IMAGES, PROMPTS))
    assert s.version_source == f"{MANIFEST} manifest"
    wrong = get_scorer("hpsv2.0", source=d)
    assert not wrong.available()[0]
    with pytest.raises(HPSv2VersionMismatch):
        wrong.load()
