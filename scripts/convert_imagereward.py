#!/usr/bin/env python
"""Convert the official ``ImageReward.pt`` (THUDM/ImageReward) once into a self-contained directory.

    python scripts/convert_imagereward.py --checkpoint ~/.cache/ImageReward/ImageReward.pt \
        --med-config ~/.cache/ImageReward/med_config.json --out models/scorers/image_reward

Writes ``config.json`` (vision/text configs, mean/std, conversion report, source sha256), ``model.safetensors``
and the ``bert-base-uncased`` tokenizer with BLIP's ``[DEC]``/``[ENC]`` specials (when available here). Every
checkpoint key is accounted for (``prefdiff.scorers.convert.convert_imagereward_state_dict``); keys known to
be unused (ITM head, ITC projections, position_ids buffer) are listed in the report, anything else is an error
unless allowed with ``--allow-unused REGEX``. Use the result with ``get_scorer("image_reward", source=<out>)``.
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
    ap.add_argument("--checkpoint", required=True, help="ImageReward.pt")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--med-config", help="med_config.json (BERT config; default: the published values)")
    ap.add_argument("--tokenizer", default="bert-base-uncased", help="tokenizer dir or hub id to bundle")
    ap.add_argument("--no-tokenizer", action="store_true", help="do not bundle a tokenizer")
    ap.add_argument("--allow-unused", action="append", default=[], metavar="REGEX",
                    help="extra checkpoint keys (full-match regex) known to be unused")
    ap.add_argument("--vision-config", help=argparse.SUPPRESS)  # JSON BlipVisionConfig (tests: tiny models)
    ap.add_argument("--text-config", help=argparse.SUPPRESS)  # JSON BlipTextConfig
    args = ap.parse_args(argv)
    if not Path(args.checkpoint).expanduser().is_file():
        print(f"error: checkpoint {args.checkpoint} not found", file=sys.stderr)
        return 2

    from transformers import BlipTextConfig, BlipVisionConfig

    from prefdiff.scorers.base import hub_offline
    from prefdiff.scorers.convert import file_sha256, save_tokenizer, write_json
    from prefdiff.scorers.image_reward import blip_tokenizer, load_imagereward_checkpoint

    def read(path: str | None, cls):
        return cls.from_dict(json.loads(Path(path).read_text())) if path else None

    vision, text = read(args.vision_config, BlipVisionConfig), read(args.text_config, BlipTextConfig)
    model, report = load_imagereward_checkpoint(args.checkpoint, med_config=args.med_config, vision_config=vision,
                                                text_config=text, extra_unused=tuple(args.allow_unused))
    out = Path(args.out)
    model.save_pretrained(out, extra={"conversion": report.to_dict(), "source_sha256": file_sha256(args.checkpoint)})
    tok = None if args.no_tokenizer else save_tokenizer(blip_tokenizer, args.tokenizer, out, hub_offline())
    summary = {"out": str(out), "mapped": report.mapped, "dropped": report.dropped, "tokenizer": tok}
    write_json(out / "conversion.json", {**report.to_dict(), "tokenizer": tok})
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
