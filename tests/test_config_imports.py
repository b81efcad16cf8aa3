"""Validating params is light: prefdiff.config checks scorer and model names against prefdiff.catalog's tables,
so loading params.yaml (as every stage does first) imports neither torch, transformers, diffusers nor the
evaluation package. Checked in a fresh interpreter, where sys.modules shows exactly what the import pulled in."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "diffusers", "evaluation")

_PROBE = """
import json, sys
from pathlib import Path
from prefdiff.config import load_params, parse_params
params = load_params(Path("params.yaml"))
custom = parse_params({"label": {"judge": "pickscore"},
                       "evaluate": {"judge": "hpsv2.1", "scorers": ["aesthetic", "blip", "image_reward"]}})
try:
    parse_params({"evaluate": {"scorers": ["pick_score"]}})
    error = None
except ValueError as err:
    error = str(err)
print(json.dumps({"judge": params.label.judge, "custom": [custom.label.judge, custom.evaluate.judge],
                  "error": error, "loaded": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def test_validating_params_imports_no_heavy_module():
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["judge"] == "digit_alignment" and out["custom"] == ["pickscore", "hpsv2.1"]
    assert "evaluate.scorers" in out["error"] and "'pick_score'" in out["error"] and "pickscore" in out["error"]
    assert "prefdiff" in out["loaded"] and "pydantic" in out["loaded"]  # the probe saw what it imported
    assert [m for m in HEAVY if m in out["loaded"]] == []
