#!/usr/bin/env python
"""Convert BLIP's pre-train checkpoint ``model_large.pth`` once into a ``BlipForImageTextRetrieval`` directory,
for the ``blip_itc`` ("BLIP score", ImageReward toolkit definition) scorer.

    python scripts/convert_blip_itc.py --checkpoint ~/.cache/ImageReward/model_large.pth --out models/scorers/blip_itc

(``model_large.pth``: https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_large.pth.)
Momentum encoders, queues, ``temp`` and the caption decoder are known-unused and listed in ``conversion.json``;
any other unmapped key is an error. Saves ``save_pretrained`` weights/config and the ``bert-base-uncased``
tokenizer with ``[DEC]``/``[ENC]`` when available. Use with ``get_scorer("blip_itc", source=<out>)``.
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
    ap.add_argument("--checkpoint", required=True, help="model_large.pth")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", default="bert-base-uncased")
    ap.add_argument("--no-tokenizer", action="store_true")
    ap.add_argument("--blip-config", help=argparse.SUPPRESS)  # JSON BlipConfig (tests: tiny models)
    args = ap.parse_args(argv)
    if not Path(args.checkpoint).expanduser().is_file():
        print(f"error: checkpoint {args.checkpoint} not found", file=sys.stderr)
        return 2

    from transformers import BlipConfig

    from prefdiff.scorers.base import hub_offline
    from prefdiff.scorers.convert import file_sha256, save_tokenizer, write_json
    from prefdiff.scorers.blip import load_blip_pretrain_checkpoint
    from prefdiff.scorers.image_reward import blip_tokenizer

    config = BlipConfig.from_dict(json.loads(Path(args.blip_config).read_text())) if args.blip_config else None
    model, report = load_blip_pretrain_checkpoint(args.checkpoint, config=config)
    out = Path(args.out)
    model.save_pretrained(str(out))
    tok = None if args.no_tokenizer else save_tokenizer(blip_tokenizer, args.tokenizer, out, hub_offline())
    write_json(out / "conversion.json", {**report.to_dict(), "source_sha256": file_sha256(args.checkpoint),
                                          "tokenizer": tok})
    print(json.dumps({"out": str(out), "mapped": report.mapped, "dropped": len(report.dropped),
                      "filled": report.filled, "tokenizer": tok}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
