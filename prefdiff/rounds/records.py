"""What the rounds loop writes, and which rounds already written it can resume from.

``data/rounds/round-NNN/`` (NNN = the round, from 001):

- ``trajectories/``: the round's samples (a trajectory dataset, drawn by round NNN-1's policy);
- ``preferences/``: their labels (a preference dataset over those trajectories);
- ``lora/``: the policy after the round (diffusers format: ``pipe.load_lora_weights(dir)``);
- ``checkpoint/state/``: weights and optimizer state after the round (the next round resumes from it);
- ``round.json``: the round's metrics, the policy that sampled, the training curve and the fingerprint of
  everything that decided the round. Written last: a round directory without it is incomplete.

Resume and append: a run keeps the rounds already on disk whose fingerprint is its own (the same params but
``rounds.count``, the same base weights and the same code) and continues after the last of them, so an
interrupted run, or a larger ``rounds.count``, computes only the rounds it lacks. Anything else under
``data/rounds`` (another configuration's rounds, an incomplete round, rounds beyond ``rounds.count``) is
removed first, so the directory always holds exactly rounds 1..k of this configuration.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prefdiff.config import EXECUTION_KEYS, Params
from prefdiff.data.atomic import atomic_write_json, atomic_write_text

ROUND_JSON = "round.json"
_ROUND_DIR = re.compile(r"round-(\d{3,})")
# rounds.csv: every round; rounds_eval.csv: the evaluated rounds (every rounds.eval_every and the last)
ROUND_FIELDS = ("round", "samples", "pairs", "ties", "sample_reward", "sample_reward_low", "sample_reward_high",
                "train_loss", "seconds")
EVAL_FIELDS = ("round", "samples", "eval_reward", "eval_reward_low", "eval_reward_high", "win_rate", "win_rate_low",
               "win_rate_high", "win_rate_wilson_low", "win_rate_wilson_high", "kl_proxy", "implicit_acc",
               "implicit_acc_low", "implicit_acc_high")
# the label keys a round reads: the judge and how it labels (pickapic and human are refused by rounds)
LABEL_KEYS = {"source", "judge", "judge_args", "jpeg_quality", "tie_margin", "simulated"}
# the evaluate keys a round reads: the evaluation prompts, seeds and the primary judge's win-rate
EVALUATE_KEYS = {"prompt_set", "num_prompts", "seeds_per_prompt", "seed", "judge", "scorer_args", "tie_margin",
                 "bootstrap_samples", "batch_size"}


def round_dir(rounds_dir: Path, round_index: int) -> Path:
    return Path(rounds_dir) / f"round-{round_index:03d}"


def derived_seed(*key: int) -> int:
    """A 62-bit seed that is a pure function of the integers ``key`` (SHA-256 of their 8-byte encodings), so a
    round's draws do not depend on the rounds before it, the process or the Python version."""
    digest = hashlib.sha256(struct.pack(f"<{len(key)}q", *key)).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def round_prompts(prompts: Sequence[str], groups: int, seed: int, round_index: int) -> tuple[list[str], list[int]]:
    """The K prompt groups of round ``round_index``: prompts drawn uniformly at random with replacement (D3PO
    Algorithm 1, line 5: "Random choose a prompt c_k and sample x_T") and one noise seed per group, both pure
    functions of (``sample.seed``, round, k)."""
    import torch

    gen = torch.Generator().manual_seed(derived_seed(seed, round_index, -1))
    chosen = torch.randint(len(prompts), (groups,), generator=gen).tolist()
    return [prompts[i] for i in chosen], [derived_seed(seed, round_index, k) for k in range(groups)]


def code_sha256() -> str:
    """sha256 over the library's files (prefdiff and evaluation: sources, the built-in model's and the judges'
    weights; not bytecode), the stage's code dependencies: rounds written by other code are not resumed (DVC
    re-runs the stage when they change, and the rounds on disk then start over)."""
    import evaluation
    import prefdiff

    digest = hashlib.sha256()
    for package in (Path(prefdiff.__file__).parent, Path(evaluation.__file__).parent):
        for path in sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                           and p.suffix != ".pyc"):
            digest.update(f"{package.name}/{path.relative_to(package).as_posix()}\n".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def rounds_config(params: Params) -> dict[str, Any]:
    """The params a round reads (the rounds stage's DVC params list, pipelines/rounds/dvc.yaml): every
    section's keys that decide it, but ``rounds.count`` (more rounds append), ``sample.lora`` /
    ``sample.groups_per_prompt`` (the single round's, not read here) and the ``EXECUTION_KEYS``
    (``rounds.num_processes``: the rounds are the one process's, so a run may resume with another count)."""
    return {
        "model": params.model.model_dump(), "sampling": params.sampling.model_dump(),
        "sample": {k: v for k, v in params.sample.in_use().items() if k not in {"groups_per_prompt", "lora"}},
        "label": params.label.model_dump(include=LABEL_KEYS), "train": params.train.in_use(),
        "evaluate": params.evaluate.model_dump(include=EVALUATE_KEYS),
        "rounds": params.rounds.model_dump(exclude={"count"} | EXECUTION_KEYS),
    }


def rounds_fingerprint(params: Params, base_sha256: str, code: str) -> str:
    payload = {"params": rounds_config(params), "base_unet_sha256": base_sha256, "code_sha256": code}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def read_record(path: Path) -> dict[str, Any] | None:
    """A round's ``round.json``, or None when it is missing or unreadable (an incomplete round)."""
    try:
        record = json.loads((path / ROUND_JSON).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def write_record(path: Path, record: dict[str, Any]) -> None:
    atomic_write_json(path / ROUND_JSON, record)


def completed_rounds(rounds_dir: Path, fingerprint: str, count: int,
                     progress: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The records of rounds 1..k already under ``rounds_dir`` with this ``fingerprint`` (k <= ``count``),
    in order; everything else there is removed, saying what and why."""
    rounds_dir = Path(rounds_dir)
    records: list[dict[str, Any]] = []
    while len(records) < count:
        record = read_record(round_dir(rounds_dir, len(records) + 1))
        if record is None or record.get("fingerprint") != fingerprint:
            break
        records.append(record)
    keep = {round_dir(rounds_dir, r["round"]).name for r in records}
    stale = sorted(p for p in rounds_dir.iterdir() if p.name not in keep) if rounds_dir.is_dir() else []
    if stale:
        reasons = []
        for path in stale:
            match, other = _ROUND_DIR.fullmatch(path.name), read_record(path)
            if match and int(match.group(1)) > count and other and other.get("fingerprint") == fingerprint:
                reasons.append(f"{path.name} (beyond rounds.count = {count})")
            elif match and other is None:
                reasons.append(f"{path.name} (incomplete)")
            elif match:
                reasons.append(f"{path.name} (other params, base model or code, or after one of those)")
            else:
                reasons.append(f"{path.name} (not a round)")
        progress(f"rounds: removing {len(stale)} entries of {rounds_dir}: " + ", ".join(reasons))
        for path in stale:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return records


def _csv(rows: list[dict[str, Any]], fields: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_curves(rows: list[dict[str, Any]], summary: dict[str, Any], *, plot: Path, eval_plot: Path,
                 metrics: Path) -> None:
    """``plot``: one row per round (``ROUND_FIELDS``); ``eval_plot``: the evaluated rounds (``EVAL_FIELDS``:
    separate, so neither file has gaps for DVC to plot); ``metrics``: ``summary`` (JSON). ``rows[0]`` is
    round 0, the base's evaluation, which has only its reward: it goes to the summary and the figure."""
    atomic_write_text(plot, _csv(rows[1:], ROUND_FIELDS))
    atomic_write_text(eval_plot, _csv([r for r in rows[1:] if "eval_reward" in r], EVAL_FIELDS))
    atomic_write_json(metrics, summary)


def draw_curves(rows: list[dict[str, Any]], out: Path, *, judge: str, title: str) -> None:
    """The per-round curves as a PNG (x: images sampled so far): the judge's reward of each round's samples
    and of the policy on the evaluation prompts (95% t-interval), the win-rate against the base
    (prompt-clustered bootstrap interval), the sampling policy's implicit accuracy on the round's fresh
    pairs (Wilson) and its KL proxy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r for r in rows if r["round"] > 0]
    evals = [r for r in rows if "eval_reward" in r]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)

    def band(ax, data, key, label, color):
        xs = [r["samples"] for r in data]
        ax.plot(xs, [r[key] for r in data], marker="o", ms=3, color=color, label=label)
        if data and f"{key}_low" in data[0]:
            ax.fill_between(xs, [r[f"{key}_low"] for r in data], [r[f"{key}_high"] for r in data], color=color,
                            alpha=0.2)

    band(axes[0, 0], rounds, "sample_reward", "round's samples", "tab:blue")
    band(axes[0, 0], evals, "eval_reward", "policy on the evaluation prompts", "tab:orange")
    axes[0, 0].set(title=f"judge reward ({judge})", ylabel="mean score")
    band(axes[0, 1], [r for r in evals if r["round"] > 0], "win_rate", "vs base", "tab:green")
    axes[0, 1].axhline(0.5, color="gray", lw=0.8, ls="--")
    axes[0, 1].set(title="win-rate vs base (evaluation prompts)", ylim=(0, 1))
    fresh = [r for r in evals if "implicit_acc" in r]
    band(axes[1, 0], fresh, "implicit_acc", "sampling policy", "tab:purple")
    axes[1, 0].axhline(0.5, color="gray", lw=0.8, ls="--")
    axes[1, 0].set(title="implicit accuracy on the round's fresh pairs", ylim=(0, 1))
    kl = [r for r in evals if "kl_proxy" in r]
    axes[1, 1].plot([r["samples"] for r in kl], [r["kl_proxy"] for r in kl], marker="o", ms=3, color="tab:red")
    axes[1, 1].set(title="KL proxy of the sampling policy vs base", ylabel="summed log-ratio (nats per dim)")
    for ax in axes.flat:
        ax.set_xlabel("images sampled")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    from prefdiff.data.atomic import atomic_write_bytes

    atomic_write_bytes(out, buf.getvalue())
