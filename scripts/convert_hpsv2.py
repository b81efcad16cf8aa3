#!/usr/bin/env python
"""Convert an HPSv2 checkpoint (open_clip ViT-H-14 state dict) once into a transformers ``CLIPModel`` directory.

    python scripts/convert_hpsv2.py --checkpoint HPS_v2.1_compressed.pt --out models/scorers/hpsv2.1

The version (v2.0 / v2.1) is read from the checkpoint's file name when it says (``HPS_v2_compressed.pt`` ->
v2.0, ``HPS_v2.1_compressed.pt`` -> v2.1); ``--version`` must then agree, and is required when the name says
nothing. It is written to ``hpsv2.json`` in the output, which ``HPSv2Scorer`` checks against the version it is
asked for - v2.0 and v2.1 scores are never mixed. Also saved: ``config.json`` + ``model.safetensors``
(``CLIPModel.save_pretrained``) and the ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` tokenizer when available.
Every checkpoint key is accounted for (``convert_open_clip_state_dict``; only ``attn_mask`` buffers are
dropped). Use the result with ``get_scorer("hpsv2.1", source=<out>)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="HPS_v2_compressed.pt or HPS_v2.1_compressed.pt")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--version", help="v2.0 or v2.1 (required when the file name does not say)")
    ap.add_argument("--tokenizer", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K", help="tokenizer to bundle")
    ap.add_argument("--no-tokenizer", action="store_true")
    ap.add_argument("--clip-config", help=argparse.SUPPRESS)  # JSON CLIPConfig (tests: tiny models)
    args = ap.parse_args(argv)
    if not Path(args.checkpoint).expanduser().is_file():
        print(f"error: checkpoint {args.checkpoint} not found", file=sys.stderr)
        return 2

    from prefdiff.scorers.hpsv2 import MANIFEST, detect_hpsv2_version, load_hpsv2_checkpoint, normalize_version

    detected = detect_hpsv2_version(args.checkpoint)
    declared = normalize_version(args.version) if args.version else None
    if detected and declared and detected != declared:
        print(f"error: {args.checkpoint} is HPSv2 {detected} by its name but --version {declared} was given; "
              "refusing to mix versions", file=sys.stderr)
        return 2
    version = declared or detected
    if version is None:
        print(f"error: cannot tell the HPSv2 version from {args.checkpoint!r}; pass --version v2.0 or v2.1",
              file=sys.stderr)
        return 2

    from transformers import AutoTokenizer, CLIPConfig

    from prefdiff.scorers.base import hub_offline
    from prefdiff.scorers.convert import file_sha256, save_tokenizer, write_json

    config = CLIPConfig.from_dict(json.loads(Path(args.clip_config).read_text())) if args.clip_config else None
    model, report = load_hpsv2_checkpoint(args.checkpoint, config=config)
    out = Path(args.out)
    model.save_pretrained(str(out))
    tok = None if args.no_tokenizer else save_tokenizer(AutoTokenizer.from_pretrained, args.tokenizer, out,
                                                        hub_offline())
    write_json(out / MANIFEST, {"version": version, "version_source": "file name" if detected else "--version",
                                "source": str(args.checkpoint), "source_sha256": file_sha256(args.checkpoint),
                                "conversion": report.to_dict(), "tokenizer": tok})
    print(json.dumps({"out": str(out), "version": version, "mapped": report.mapped, "dropped": report.dropped,
                      "tokenizer": tok}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
