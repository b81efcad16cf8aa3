#!/usr/bin/env python
"""Cross-check our transformers scorers against the original implementations on the same tiny random weights.

Needs the optional ``crosscheck`` extra (``open_clip_torch``, ``image-reward``, ``torchvision``), best in a
separate virtual environment: ``image-reward`` 1.5 does not import on transformers 5 and pins ``timm==0.6.13``,
and installing ``open_clip_torch`` may replace the CPU torch build with another one.

    python scripts/crosscheck_scorers.py            # every check whose packages are importable
    python scripts/crosscheck_scorers.py hpsv2      # one check: hpsv2 | image_reward | blip_itc | preprocess

Checks (each builds the ORIGINAL tiny model, saves its state dict, converts it with our converter, and compares):

* ``hpsv2``: a tiny open_clip ``CLIP`` (ViT towers, GELU) -> ``convert_open_clip_state_dict`` -> ``CLIPModel``;
  image/text features and the HPSv2 cosine on the same pixels and open_clip token ids; HPSv2's
  ``ToTensor -> ResizeMaxSize -> Normalize`` rebuilt with torchvision against ``hps_pixel_values``.
* ``image_reward``: tiny BLIP ``VisionTransformer`` + ``med.BertModel`` + ``MLP`` from the ``ImageReward``
  package in the ``ImageReward.pt`` layout -> ``convert_imagereward_state_dict`` -> ``ImageRewardModel``; reward
  computed as ``ImageReward.score`` does.
* ``blip_itc``: the same original modules as BLIP's ITC path (text encoder alone, projections, cosine) against
  ``BlipITCScorer`` after ``convert_blip_pretrain_state_dict``.
* ``preprocess``: ImageReward's torchvision ``_transform(224)`` against our PIL-processor pipeline on odd sizes.

Exit status: 0 all run checks within tolerance, 1 a mismatch, 2 a required package is missing or fails to import.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NEEDS = {"hpsv2": ("open_clip", "torchvision"), "image_reward": ("ImageReward", "torchvision"),
         "blip_itc": ("ImageReward", "torchvision"), "preprocess": ("torchvision",)}
PIP_NAMES = {"open_clip": "open_clip_torch", "ImageReward": "image-reward", "torchvision": "torchvision"}
TOL = 1e-5


class MissingPackage(RuntimeError):
    pass


def _missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _import(name: str):
    try:
        return importlib.import_module(name)
    except Exception as err:  # image-reward 1.5 fails to import on transformers 5
        raise MissingPackage(f"{name} is installed but does not import ({type(err).__name__}: {err}); it needs "
                             "an older stack (image-reward 1.5: transformers<5, timm==0.6.13) - use a separate "
                             "venv") from err


def _images(n: int = 4):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(40, 40), (37, 53), (64, 48), (300, 401)]
    return [Image.fromarray(rng.integers(0, 256, size=(*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)]


def _perturb(model, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def _report(name: str, diffs: dict[str, float], tol: float = TOL) -> bool:
    ok = all(v <= tol for v in diffs.values())
    for k, v in diffs.items():
        print(f"  {name:13s} {k:34s} max|d| = {v:.3g} {'ok' if v <= tol else 'MISMATCH'}")
    return ok


def _bert_vocab(directory: Path) -> Path:
    import string

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase,
             *(f"##{c}" for c in string.ascii_lowercase), "cat", "dog", "red", "sky", "the", "on"]
    path = directory / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(words)) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ checks


def check_hpsv2(tmp: Path) -> bool:
    import torch
    import torch.nn.functional as F
    from transformers import CLIPConfig

    from prefdiff.scorers.hpsv2 import hps_pixel_values, load_hpsv2_checkpoint

    open_clip = _import("open_clip")
    tvf = _import("torchvision.transforms.functional")
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    oc = _perturb(CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=8, mlp_ratio=2.0,
                                                                patch_size=8, image_size=32),
                       text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=4, layers=2,
                                            mlp_ratio=2.0)))
    path = tmp / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": oc.state_dict()}, path)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=0, projection_dim=16),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, hidden_act="gelu", projection_dim=16),
        projection_dim=16)
    hf, report = load_hpsv2_checkpoint(path, config=config)
    print(f"  hpsv2: converted {report.mapped} tensors, dropped {report.dropped}")

    images = _images()
    ours_px = hps_pixel_values(images, 32)
    # HPSv2's preprocess_val: ToTensor -> ResizeMaxSize(32) (bicubic on the tensor) -> Normalize, via torchvision
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073))[:, None, None]
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711))[:, None, None]
    ref_px = []
    for im in images:
        t = tvf.to_tensor(im.convert("RGB"))
        h, w = t.shape[1:]
        scale = 32 / float(max(h, w))
        if scale != 1.0:
            nh, nw = round(h * scale), round(w * scale)
            t = tvf.resize(t, [nh, nw], tvf.InterpolationMode.BICUBIC)
            ph, pw = 32 - nh, 32 - nw
            t = tvf.pad(t, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
        ref_px.append((t - mean) / std)
    ref_px = torch.stack(ref_px)

    prompts = ["a cat on a mat", "red sky", "the quick brown fox", "x"]
    ids = open_clip.tokenize(prompts)
    with torch.no_grad():
        oc_img, oc_txt = oc.encode_image(ref_px), oc.encode_text(ids)
        hf_img = hf.visual_projection(hf.vision_model(pixel_values=ref_px).pooler_output)
        hf_txt = hf.text_projection(hf.text_model(input_ids=ids).pooler_output)
        oc_cos = F.cosine_similarity(oc_img, oc_txt, dim=-1)
        hf_cos = F.cosine_similarity(hf_img, hf_txt, dim=-1)
    return _report("hpsv2", {
        "pixels (ours vs torchvision)": (ours_px - ref_px).abs().max().item(),
        "image features": (oc_img - hf_img).abs().max().item(),
        "text features": (oc_txt - hf_txt).abs().max().item(),
        "cosine score": (oc_cos - hf_cos).abs().max().item(),
    })


def _tiny_original_blip(vocab_size: int):
    """Tiny BLIP ViT + med.py BERT (cross-attention) + ImageReward MLP from the ImageReward package."""
    import torch

    vit_mod = _import("ImageReward.models.BLIP.vit")
    med = _import("ImageReward.models.BLIP.med")
    ir_mod = _import("ImageReward.ImageReward")
    torch.manual_seed(0)
    vit = _perturb(vit_mod.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                                             mlp_ratio=2.0), 1)
    cfg = med.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, hidden_act="gelu",
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12,
                         add_cross_attention=True)
    cfg.encoder_width = 32
    bert = _perturb(med.BertModel(config=cfg, add_pooling_layer=False), 2)
    mlp = _perturb(ir_mod.MLP(32), 3)
    proj_v, proj_t = _perturb(torch.nn.Linear(32, 16), 4), _perturb(torch.nn.Linear(32, 16), 5)
    return vit, bert, mlp, proj_v, proj_t


def _tiny_configs(tokenizer):
    from transformers import BlipConfig

    return BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, layer_norm_eps=1e-6),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, encoder_hidden_size=32,
                         pad_token_id=tokenizer.pad_token_id),
        image_text_hidden_size=16)


def check_image_reward_and_blip(tmp: Path, which: str) -> bool:
    import torch
    import torch.nn.functional as F
    from transformers import BertTokenizer

    from prefdiff.scorers.base import clip_image_processor, clip_pixel_values
    from prefdiff.scorers.blip import load_blip_pretrain_checkpoint
    from prefdiff.scorers.image_reward import (IMAGEREWARD_MEAN, IMAGEREWARD_STD, add_blip_special_tokens,
                                               load_imagereward_checkpoint)

    tok = add_blip_special_tokens(BertTokenizer(str(_bert_vocab(tmp))))
    vit, bert, mlp, proj_v, proj_t = _tiny_original_blip(len(tok))
    cfg = _tiny_configs(tok)
    prompts = ["a cat on the mat", "red sky", "dog", "x"]
    text = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    pixels = clip_pixel_values(clip_image_processor(32), _images())
    diffs = {}
    with torch.no_grad():
        image_embeds = vit(pixels)
        if which == "image_reward":
            sd = {**{f"blip.visual_encoder.{k}": v for k, v in vit.state_dict().items()},
                  **{f"blip.text_encoder.{k}": v for k, v in bert.state_dict().items()},
                  **{f"mlp.{k}": v for k, v in mlp.state_dict().items()}}
            torch.save(sd, tmp / "ImageReward.pt")
            ours, report = load_imagereward_checkpoint(tmp / "ImageReward.pt", vision_config=cfg.vision_config,
                                                       text_config=cfg.text_config)
            atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
            out = bert(text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=image_embeds,
                       encoder_attention_mask=atts, return_dict=True)
            ref = ((mlp(out.last_hidden_state[:, 0, :].float()) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).squeeze(-1)
            tokens = ours.vision_model(pixel_values=pixels).last_hidden_state
            diffs["vision tokens"] = (tokens - image_embeds).abs().max().item()
            diffs["reward"] = (ours(text.input_ids, text.attention_mask, pixels) - ref).abs().max().item()
        else:
            sd = {**{f"visual_encoder.{k}": v for k, v in vit.state_dict().items()},
                  **{f"text_encoder.{k}": v for k, v in bert.state_dict().items()},
                  **{f"vision_proj.{k}": v for k, v in proj_v.state_dict().items()},
                  **{f"text_proj.{k}": v for k, v in proj_t.state_dict().items()}}
            torch.save({"model": sd}, tmp / "model_large.pth")
            ours, report = load_blip_pretrain_checkpoint(tmp / "model_large.pth", config=cfg)
            txt = bert(text.input_ids, attention_mask=text.attention_mask, mode="text", return_dict=True)
            ref = (F.normalize(proj_t(txt.last_hidden_state[:, 0, :])) *
                   F.normalize(proj_v(image_embeds[:, 0, :]), dim=-1)).sum(-1)
            cls_img = ours.vision_model(pixel_values=pixels).last_hidden_state[:, 0]
            cls_txt = ours.text_encoder(input_ids=text.input_ids,
                                        attention_mask=text.attention_mask).last_hidden_state[:, 0]
            hf_img = F.normalize(ours.vision_proj(cls_img), dim=-1)
            hf_txt = F.normalize(ours.text_proj(cls_txt), dim=-1)
            diffs["ITC cosine"] = ((hf_img * hf_txt).sum(-1) - ref).abs().max().item()
    print(f"  {which}: converted {report.mapped} tensors, dropped {len(report.dropped)}, filled {report.filled}")
    return _report(which, diffs)


def check_preprocess(tmp: Path) -> bool:
    import torch
    from PIL import Image

    from prefdiff.scorers.base import clip_image_processor, clip_pixel_values

    T = _import("torchvision.transforms")
    tf = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                    lambda im: im.convert("RGB"), T.ToTensor(),
                    T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    images = _images() + [Image.new("RGB", (512, 768), (10, 200, 30))]
    ref = torch.stack([tf(im) for im in images])
    ours = clip_pixel_values(clip_image_processor(224), images)
    return _report("preprocess", {"CLIP 224 pipeline": (ours - ref).abs().max().item()}, tol=0.0)


CHECKS = {"hpsv2": check_hpsv2, "image_reward": lambda t: check_image_reward_and_blip(t, "image_reward"),
          "blip_itc": lambda t: check_image_reward_and_blip(t, "blip_itc"), "preprocess": check_preprocess}


def main(argv: list[str] | None = None) -> int:
    names = list(argv if argv is not None else sys.argv[1:]) or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"unknown check(s) {unknown}; choose from {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    requested = bool(argv if argv is not None else sys.argv[1:])
    runnable, skipped = [], {}
    for n in names:
        missing = _missing(NEEDS[n])
        (skipped.__setitem__(n, missing) if missing else runnable.append(n))
    for n, missing in skipped.items():
        print(f"skip {n}: missing {', '.join(missing)} - install the crosscheck extra "
              f"(pip install {' '.join(PIP_NAMES[m] for m in missing)}) in a separate venv", file=sys.stderr)
    if not runnable or (requested and skipped):
        print("crosscheck: required packages are missing (optional extra `crosscheck`: open_clip_torch, "
              "image-reward, torchvision); nothing was compared", file=sys.stderr)
        return 2
    ok = True
    with tempfile.TemporaryDirectory() as d:
        for n in runnable:
            print(f"{n}:")
            try:
                ok &= CHECKS[n](Path(d))
            except MissingPackage as err:
                print(f"  {n}: {err}", file=sys.stderr)
                return 2
    print("crosscheck: all within tolerance" if ok else "crosscheck: MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
