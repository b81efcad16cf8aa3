"""Checkpoint converters: tiny models written in the ORIGINAL layouts (inverse maps + the known-unused extras),
converted back with strict key accounting, identical scores; the original layouts' own forward (reference
implementations in tiny_scorers) agrees with the converted transformers modules; the real LAION aesthetic head
file; the conversion scripts end to end; the cross-check script's missing-package exit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_scorers as T
from prefdiff.scorers.aesthetic import (AESTHETIC_HEAD, AESTHETIC_HEAD_KEYS, AESTHETIC_HEAD_SHA256,
                                        load_aesthetic_head)
from prefdiff.scorers.base import MLPHead, clip_image_processor, clip_pixel_values
from prefdiff.scorers.blip import BlipITCScorer, load_blip_pretrain_checkpoint
from prefdiff.scorers.convert import (StateDictAccountingError, blip_retrieval_to_original,
                                      convert_imagereward_state_dict, convert_open_clip_state_dict, file_sha256,
                                      imagereward_to_original, open_clip_to_original, unwrap_state_dict)
from prefdiff.scorers.hpsv2 import HPSv2Scorer, hps_pixel_values, load_hpsv2_checkpoint
from prefdiff.scorers.image_reward import ImageRewardModel, ImageRewardScorer, load_imagereward_checkpoint

REPO = Path(__file__).resolve().parents[1]
IMAGES = T.images()
PROMPTS = T.PROMPTS


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"clip": T.clip_tokenizer(root / "clip"), "bert": T.bert_tokenizer(root / "bert")}


def _scripts():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import convert_blip_itc
        import convert_hpsv2
        import convert_imagereward
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return convert_imagereward, convert_hpsv2, convert_blip_itc


def _clone(sd):
    return {k: v.clone() for k, v in sd.items()}


# ------------------------------------------------------------------------------------------------ aesthetic head


def test_real_aesthetic_head_file_loads_and_is_the_affine_map():
    assert AESTHETIC_HEAD.is_file() and AESTHETIC_HEAD.stat().st_size < 4_000_000
    assert file_sha256(AESTHETIC_HEAD) == AESTHETIC_HEAD_SHA256
    raw = torch.load(AESTHETIC_HEAD, map_location="cpu", weights_only=True)
    assert set(raw) == AESTHETIC_HEAD_KEYS == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    assert [tuple(raw[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)] == [(1024, 768), (128, 1024), (64, 128),
                                                                                    (16, 64), (1, 16)]
    head = load_aesthetic_head()
    assert not head.training
    # compose the linear layers by hand: w = W7 W6 W4 W2 W0, b = W7(W6(W4(W2 b0 + b2) + b4) + b6) + b7
    W = {i: raw[f"layers.{i}.weight"].double() for i in (0, 2, 4, 6, 7)}
    B = {i: raw[f"layers.{i}.bias"].double() for i in (0, 2, 4, 6, 7)}
    w = (W[7] @ W[6] @ W[4] @ W[2] @ W[0])[0]
    b = (W[7] @ (W[6] @ (W[4] @ (W[2] @ B[0] + B[2]) + B[4]) + B[6]) + B[7])[0]
    hw, hb = head.affine()
    torch.testing.assert_close(hw, w, atol=1e-12, rtol=0)
    torch.testing.assert_close(hb, b, atol=1e-12, rtol=0)
    e = torch.randn(64, 768, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    e = e / e.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(head.double()(e).squeeze(-1), e @ w + b, atol=1e-10, rtol=0)
        torch.testing.assert_close(load_aesthetic_head()(e.float()).squeeze(-1).double(), e @ w + b, atol=1e-5, rtol=0)


def test_aesthetic_head_strict_key_accounting(tmp_path):
    raw = torch.load(AESTHETIC_HEAD, map_location="cpu", weights_only=True)
    extra = tmp_path / "extra.pth"
    torch.save({**raw, "layers.8.weight": torch.zeros(1)}, extra)
    with pytest.raises(StateDictAccountingError, match="layers.8.weight"):
        load_aesthetic_head(extra)
    short = tmp_path / "short.pth"
    torch.save({k: v for k, v in raw.items() if k != "layers.7.bias"}, short)
    with pytest.raises(StateDictAccountingError, match="layers.7.bias"):
        load_aesthetic_head(short)
    bad = tmp_path / "bad.pth"
    torch.save({**raw, "layers.6.weight": torch.zeros(16, 65)}, bad)
    with pytest.raises(StateDictAccountingError, match="layers.6.weight"):
        load_aesthetic_head(bad)


def test_mlp_head_layout_matches_the_shipped_head():
    assert set(MLPHead(768).state_dict()) == AESTHETIC_HEAD_KEYS


# ------------------------------------------------------------------------------------------------ ImageReward


def test_imagereward_round_trip_strict(tmp_path, tok):
    bt = tok["bert"]
    model = T.imagereward_model(bt, seed=10)
    original = imagereward_to_original(model.state_dict())
    assert all(k.startswith(("blip.visual_encoder.", "blip.text_encoder.", "mlp.layers.")) for k in original)
    assert "blip.visual_encoder.cls_token" in original and "blip.visual_encoder.blocks.1.attn.qkv.weight" in original
    unused = {"blip.itm_head.weight": torch.zeros(2, 32), "blip.itm_head.bias": torch.zeros(2),
              "blip.vision_proj.weight": torch.zeros(16, 32), "blip.text_proj.bias": torch.zeros(16),
              "blip.text_encoder.embeddings.position_ids": torch.arange(64)[None]}
    path = tmp_path / "ImageReward.pt"
    torch.save({**original, **unused}, path)
    cfg = T.blip_config(bt)
    converted, report = load_imagereward_checkpoint(path, vision_config=cfg.vision_config, text_config=cfg.text_config)
    assert report.dropped == sorted(unused) and report.filled == [] and report.mapped == len(original)
    for k, v in model.state_dict().items():
        assert torch.equal(converted.state_dict()[k], v), k
    a = ImageRewardScorer.from_components(model, bt).score(IMAGES, PROMPTS)
    b = ImageRewardScorer.from_components(converted, bt).score(IMAGES, PROMPTS)
    assert torch.equal(a, b)


def test_imagereward_vision_tower_matches_the_original_blip_vit(tok):
    model = T.imagereward_model(tok["bert"], seed=11)
    original = imagereward_to_original(model.state_dict())
    pixels = clip_pixel_values(clip_image_processor(32), IMAGES)
    with torch.no_grad():
        ref = T.blip_vit_features(original, pixels, layers=2, heads=4, prefix="blip.visual_encoder.")
        ours = model.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)


def test_imagereward_unknown_missing_and_mismatched_keys_are_errors(tok):
    model = T.imagereward_model(tok["bert"], seed=12)
    expected = model.state_dict()
    original = imagereward_to_original(expected)
    with pytest.raises(StateDictAccountingError, match="unknown source keys.*blip.visual_encoder_m.cls_token"):
        convert_imagereward_state_dict({**original, "blip.visual_encoder_m.cls_token": torch.zeros(1)}, expected)
    with pytest.raises(StateDictAccountingError, match="target keys missing.*mlp.layers.7.bias"):
        convert_imagereward_state_dict({k: v for k, v in original.items() if k != "mlp.layers.7.bias"}, expected)
    bad = _clone(original)
    bad["blip.visual_encoder.pos_embed"] = torch.zeros(1, 5, 32)
    with pytest.raises(StateDictAccountingError, match="shape mismatches.*position_embedding"):
        convert_imagereward_state_dict(bad, expected)
    # an explicit extra allow-list entry accepts a known-unused key
    _, report = convert_imagereward_state_dict({**original, "blip.temp": torch.ones(())}, expected,
                                               extra_unused=[r"blip\.temp"])
    assert report.dropped == ["blip.temp"]


# ------------------------------------------------------------------------------------------------ BLIP pretrain


def _blip_pretrain_extras(sd):
    extras = {f"visual_encoder_m.{k[len('visual_encoder.'):]}": v for k, v in sd.items()
              if k.startswith("visual_encoder.")}
    extras.update({"text_decoder.cls.predictions.bias": torch.zeros(3),
                   "text_encoder_m.embeddings.word_embeddings.weight": torch.zeros(3, 2),
                   "vision_proj_m.weight": torch.zeros(2, 2), "text_proj_m.bias": torch.zeros(2),
                   "temp": torch.tensor(0.07), "image_queue": torch.zeros(16, 8), "text_queue": torch.zeros(16, 8),
                   "queue_ptr": torch.zeros(1, dtype=torch.long),
                   "text_encoder.embeddings.position_ids": torch.arange(64)[None]})
    return extras


def test_blip_pretrain_round_trip_strict(tmp_path, tok):
    bt = tok["bert"]
    model = T.blip_retrieval(bt, seed=20)
    original = blip_retrieval_to_original(model.state_dict())
    extras = _blip_pretrain_extras(original)
    path = tmp_path / "model_large.pth"
    torch.save({"model": {**original, **extras}, "epoch": 19}, path)
    converted, report = load_blip_pretrain_checkpoint(path, config=T.blip_config(bt))
    assert report.dropped == sorted(extras) and report.filled == []
    for k, v in model.state_dict().items():
        assert torch.equal(converted.state_dict()[k], v), k
    a = BlipITCScorer.from_components(model, bt).score(IMAGES, PROMPTS)
    assert torch.equal(a, BlipITCScorer.from_components(converted, bt).score(IMAGES, PROMPTS))
    # the vision tower against the original timm-style ViT computed from the original layout
    pixels = clip_pixel_values(clip_image_processor(32), IMAGES)
    with torch.no_grad():
        ref = T.blip_vit_features(original, pixels, layers=2, heads=4)
        ours = converted.vision_model(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)


def test_blip_pretrain_missing_itm_head_is_filled_only_when_allowed(tmp_path, tok):
    bt = tok["bert"]
    model = T.blip_retrieval(bt, seed=21)
    original = {k: v for k, v in blip_retrieval_to_original(model.state_dict()).items() if not k.startswith("itm_head")}
    path = tmp_path / "no_itm.pth"
    torch.save({"model": original}, path)
    converted, report = load_blip_pretrain_checkpoint(path, config=T.blip_config(bt))
    assert report.filled == ["itm_head.bias", "itm_head.weight"]
    assert torch.equal(BlipITCScorer.from_components(model, bt).score(IMAGES, PROMPTS),
                       BlipITCScorer.from_components(converted, bt).score(IMAGES, PROMPTS))
    with pytest.raises(StateDictAccountingError, match="itm_head"):
        load_blip_pretrain_checkpoint(path, config=T.blip_config(bt), allow_missing_itm_head=False)


# ------------------------------------------------------------------------------------------------ open_clip / HPSv2


def test_open_clip_round_trip_strict_and_matches_the_original_forward(tmp_path, tok):
    model = T.clip_model(30, hidden_act="gelu")
    original = open_clip_to_original(model.state_dict())
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in original and "visual.proj" in original
    assert original["visual.proj"].shape == (32, 16) and original["text_projection"].shape == (32, 16)
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {**{f"module.{k}": v for k, v in original.items()},
                               "module.attn_mask": torch.full((77, 77), float("-inf")).triu(1)}}, path)
    converted, report = load_hpsv2_checkpoint(path, config=T.clip_config(hidden_act="gelu"))
    assert report.dropped == ["attn_mask"] and report.mapped == len(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(converted.state_dict()[k], v), k

    pixels = hps_pixel_values(IMAGES, 32)
    text = tok["clip"](PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref_img = T.open_clip_image_features(original, pixels, layers=2, heads=4)
        ref_txt = T.open_clip_text_features(original, text["input_ids"], layers=2, heads=4)
        img = converted.visual_projection(converted.vision_model(pixel_values=pixels).pooler_output)
        txt = converted.text_projection(converted.text_model(**text).pooler_output)
    torch.testing.assert_close(img, ref_img, atol=2e-5, rtol=0)
    torch.testing.assert_close(txt, ref_txt, atol=2e-5, rtol=0)

    ours = HPSv2Scorer.from_components(converted, tokenizer=tok["clip"], version="v2.1").score(IMAGES, PROMPTS)
    ref = torch.nn.functional.cosine_similarity(ref_img, ref_txt, dim=-1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_open_clip_unknown_and_missing_keys_are_errors():
    model = T.clip_model(31, hidden_act="gelu")
    expected = model.state_dict()
    original = open_clip_to_original(expected)
    with pytest.raises(StateDictAccountingError, match="unknown source keys.*visual.attnpool.k_proj.weight"):
        convert_open_clip_state_dict({**original, "visual.attnpool.k_proj.weight": torch.zeros(1)}, expected)
    with pytest.raises(StateDictAccountingError, match="missing.*text_projection.weight"):
        convert_open_clip_state_dict({k: v for k, v in original.items() if k != "text_projection"}, expected)


def test_unwrap_state_dict():
    t = torch.zeros(1)
    assert unwrap_state_dict({"a": t}) == {"a": t}
    assert unwrap_state_dict({"state_dict": {"module.a": t}, "epoch": 3}) == {"a": t}
    assert unwrap_state_dict({"model": {"a": t}, "config": {"x": 1}}) == {"a": t}
    with pytest.raises(ValueError, match="wrapper keys"):
        unwrap_state_dict({"weights": {"a": t}, "step": 1})


# ------------------------------------------------------------------------------------------------ scripts


def test_conversion_scripts_end_to_end(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    convert_imagereward, convert_hpsv2, convert_blip_itc = _scripts()
    bt, ct = tok["bert"], tok["clip"]
    tok_dirs = {"bert": tmp_path / "bert_tok", "clip": tmp_path / "clip_tok"}
    bt.save_pretrained(tok_dirs["bert"])
    ct.save_pretrained(tok_dirs["clip"])

    # ImageReward.pt -> dir -> scorer
    ir = T.imagereward_model(bt, seed=40)
    cfg = T.blip_config(bt)
    (tmp_path / "v.json").write_text(json.dumps(cfg.vision_config.to_dict()))
    (tmp_path / "t.json").write_text(json.dumps(cfg.text_config.to_dict()))
    torch.save(imagereward_to_original(ir.state_dict()), tmp_path / "ImageReward.pt")
    out_ir = tmp_path / "ir_out"
    assert convert_imagereward.main(["--checkpoint", str(tmp_path / "ImageReward.pt"), "--out", str(out_ir),
                                     "--tokenizer", str(tok_dirs["bert"]), "--vision-config", str(tmp_path / "v.json"),
                                     "--text-config", str(tmp_path / "t.json")]) == 0
    assert json.loads((out_ir / "config.json").read_text())["source_sha256"] == file_sha256(tmp_path / "ImageReward.pt")
    assert torch.equal(ImageRewardScorer(str(out_ir)).score(IMAGES, PROMPTS),
                       ImageRewardScorer.from_components(ir, bt).score(IMAGES, PROMPTS))
    assert isinstance(ImageRewardModel.from_pretrained(out_ir), ImageRewardModel)

    # HPS_v2.1 -> dir (+ manifest) -> scorer; the wrong version is refused
    hps = T.clip_model(41, hidden_act="gelu")
    (tmp_path / "c.json").write_text(json.dumps(T.clip_config(hidden_act="gelu").to_dict()))
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": open_clip_to_original(hps.state_dict())}, ckpt)
    out_hps = tmp_path / "hps_out"
    common = ["--tokenizer", str(tok_dirs["clip"]), "--clip-config", str(tmp_path / "c.json")]
    assert convert_hpsv2.main(["--checkpoint", str(ckpt), "--out", str(out_hps), "--version", "v2.0", *common]) == 2
    assert convert_hpsv2.main(["--checkpoint", str(ckpt), "--out", str(out_hps), *common]) == 0
    manifest = json.loads((out_hps / "hpsv2.json").read_text())
    assert manifest["version"] == "v2.1" and manifest["conversion"]["dropped"] == []
    scorer = HPSv2Scorer("v2.1", source=str(out_hps))
    torch.testing.assert_close(scorer.score(IMAGES, PROMPTS),
                               HPSv2Scorer.from_components(hps, tokenizer=ct, version="v2.1").score(IMAGES, PROMPTS),
                               atol=1e-6, rtol=0)
    assert not HPSv2Scorer("v2.0", source=str(out_hps)).available()[0]
    anonymous = tmp_path / "weights.pt"
    anonymous.write_bytes(ckpt.read_bytes())
    assert convert_hpsv2.main(["--checkpoint", str(anonymous), "--out", str(tmp_path / "x"), *common]) == 2

    # model_large.pth -> dir -> scorer
    blip = T.blip_retrieval(bt, seed=42)
    (tmp_path / "b.json").write_text(json.dumps(cfg.to_dict()))
    torch.save({"model": blip_retrieval_to_original(blip.state_dict())}, tmp_path / "model_large.pth")
    out_blip = tmp_path / "blip_out"
    assert convert_blip_itc.main(["--checkpoint", str(tmp_path / "model_large.pth"), "--out", str(out_blip),
                                  "--tokenizer", str(tok_dirs["bert"]), "--blip-config", str(tmp_path / "b.json")]) == 0
    assert torch.equal(BlipITCScorer(str(out_blip)).score(IMAGES, PROMPTS),
                       BlipITCScorer.from_components(blip, bt).score(IMAGES, PROMPTS))


def test_crosscheck_script_exits_clearly_without_its_packages():
    import importlib.util

    if all(importlib.util.find_spec(m) for m in ("open_clip", "ImageReward", "torchvision")):
        pytest.skip("crosscheck packages installed")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "crosscheck_scorers.py"), "hpsv2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "open_clip_torch" in proc.stderr and "crosscheck" in proc.stderr
