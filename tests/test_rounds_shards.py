"""Processes share the rounds: 2 CPU processes (``accelerate launch``, gloo) run the one process's rounds.

``tests/rounds_worker.py`` runs ``run_rounds`` (2 rounds, both evaluated) once as one plain process and once as 2
launched processes, with the same thread count (OMP_NUM_THREADS=1), on builtin:tiny-sd: 4 groups of 2 per round in
batches of 2 groups (process 0 samples batch 0, process 1 batch 1), D3PO on micro-batches of 2 pairs (one row each
process), the evaluation's 2 prompts x 2 seeds in batches of 2. The launched processes also run the same rounds
as a run of 1 round followed by a run of 2 (the second resumes after round 1).

What must agree: round 1's data byte for byte (the same base, the same batches: the sample stage's sharing); the
LoRA after each round within test_ddp's tolerance (DDP sums the gradients in another order; its AdamW settings);
round 2's data and the metrics within what that rounding allows (see ``test_round_two``).
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_worker
from prefdiff.config import merged
from prefdiff.models.lora import LORA_WEIGHT_NAME
from prefdiff.rounds.loop import NO_UPDATE
from test_ddp import RTOL, SHARED
from test_rounds import LOGP_ATOL, TINY

WORKER = str(Path(__file__).parent / "rounds_worker.py")
# the stroke judge (mean ink) moves by a pixel's share when the last bits of a sample change, where the JPEG size
# of test_rounds' judge may jump by a byte and flip a pair; batches of 2 groups and 2 evaluation images: 2 each
OVERRIDES = {"sample": {"batch_size": 4}, "label": {"judge": "stroke_bold"}, "train": SHARED,
             "evaluate": {"batch_size": 2}}


def params(count: int, processes: int, **more) -> dict:
    return merged(TINY, merged(OVERRIDES, more) | {"rounds": {"count": count, "num_processes": processes}})


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """{name: (workspace, [per-process report])}: "one" (1 plain process), "two" (2 launched processes),
    "resumed-1" then "resumed" (2 launched processes, one workspace: a run of 1 round, then a run of 2), and "ties"
    (2 launched processes, every pair a tie: no process trains)."""
    tmp = tmp_path_factory.mktemp("roundshards")
    out = {}
    ties = {"label": {"tie_margin": 1e6}}
    for processes, runs in ((1, [("one", 2, {})]),
                            (2, [("two", 2, {}), ("resumed", 1, {}), ("resumed", 2, {}), ("ties", 2, ties)])):
        report = tmp / f"report-{processes}"
        report.mkdir()
        spec = tmp / f"spec-{processes}.json"
        spec.write_text(json.dumps({"report": str(report), "runs": [
            {"params": params(count, processes, **more), "workspace": str(tmp / name)} for name, count, more in runs]}))
        run_worker(WORKER, spec, processes=processes, stage="rounds")
        reports = [json.loads((report / f"rank-{r}.json").read_text()) for r in range(processes)]
        for i, (name, _, _) in enumerate(runs):
            out.setdefault(name, []).append((tmp / name, [ranks[i] for ranks in reports]))
    return {name: found[-1] for name, found in out.items()} | {"resumed-1": out["resumed"][0]}


def round_dir(ws: Path, r: int) -> Path:
    return ws / "data" / "rounds" / f"round-{r:03d}"


def tree(path: Path, ws: Path) -> dict[str, str]:
    """sha256 of every file under ``path``, the workspace ``ws`` named in it (a preference index names its
    trajectories' path) replaced by one placeholder."""
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes().replace(str(ws).encode(), b"<ws>")).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def records(ws: Path) -> list[dict]:
    return [json.loads((round_dir(ws, r) / "round.json").read_text()) for r in (1, 2)]


def test_round_one_data_is_the_one_process_data_byte_for_byte(launched):
    (ws1, _), (ws2, _) = launched["one"], launched["two"]
    for data in ("trajectories", "preferences"):
        files = tree(round_dir(ws1, 1) / data, ws1)
        assert files and tree(round_dir(ws2, 1) / data, ws2) == files, data
    assert len([f for f in tree(round_dir(ws1, 1) / "trajectories", ws1) if f.endswith(".png")]) == 8  # 4 groups x 2


def test_the_lora_after_each_round_is_the_one_process_lora_within_the_ddp_tolerance(launched):
    for r in (1, 2):
        w1 = load_file(str(round_dir(launched["one"][0], r) / "lora" / LORA_WEIGHT_NAME))
        w2 = load_file(str(round_dir(launched["two"][0], r) / "lora" / LORA_WEIGHT_NAME))
        moved = max(float(v.abs().max()) for k, v in w1.items() if "lora.up" in k)  # up weights start at 0
        assert moved > 1e-3  # the comparison is not between two untrained LoRAs
        assert w1.keys() == w2.keys()
        worst = max(float((w2[k] - w1[k]).abs().max()) for k in w1)
        assert worst <= RTOL * moved, (r, worst, moved)


def test_round_two(launched):
    """Round 2 samples from round 1's LoRA, which differs from the one process's in the last bits, so its data
    is compared within that: the same prompts and seeds, the chains and per-step log-probs within LOGP_ATOL (the
    bound test_rounds uses for log-probs recomputed in another batch composition), the same pairs decided the
    same way (the stroke judge's scores within 0.01 %-ink, a few pixels)."""
    from prefdiff.data.preferences import PreferenceStore
    from prefdiff.data.trajectories import TrajectoryStore

    stores = [TrajectoryStore.open(round_dir(launched[name][0], 2) / "trajectories") for name in ("one", "two")]
    assert [stores[0].prompt_of(i) for i in range(8)] == [stores[1].prompt_of(i) for i in range(8)]
    (chain1, logp1), (chain2, logp2) = stores[0].load_all(), stores[1].load_all()
    assert chain1.shape == chain2.shape and logp1.shape == logp2.shape == (8, 4)
    torch.testing.assert_close(chain2, chain1, rtol=0, atol=LOGP_ATOL)
    torch.testing.assert_close(logp2, logp1, rtol=0, atol=LOGP_ATOL)
    prefs = [PreferenceStore.open(round_dir(launched[name][0], 2) / "preferences") for name in ("one", "two")]
    assert [(p.winner, p.loser) for p in prefs[0].pairs] == [(p.winner, p.loser) for p in prefs[1].pairs]
    for a, b in zip(prefs[0].pairs, prefs[1].pairs):
        assert abs(a.winner_score - b.winner_score) <= 0.01 and abs(a.loser_score - b.loser_score) <= 0.01


# metrics: exact where they count (pairs, ties, steps) and the win-rates (the pairs are far apart here); the
# training means and the KL proxy within 1e-5 (test_ddp's curve bound); the judge's means within 0.01 %-ink
EXACT = {"round", "samples", "pairs", "ties", "train_steps", "win_rate", "win_rate_low", "win_rate_high",
         "win_rate_wilson_low", "win_rate_wilson_high"}


def test_the_metrics_rows_agree(launched):
    one, two = records(launched["one"][0]), records(launched["two"][0])
    for a, b in zip(one, two):
        assert a["fingerprint"] == b["fingerprint"]  # not rounds.num_processes: either count resumes these rounds
        assert a["metrics"].keys() == b["metrics"].keys()
        for key, value in a["metrics"].items():
            if key == "seconds":
                continue
            if key in EXACT:
                assert b["metrics"][key] == value, (a["round"], key)
            elif key.startswith(("sample_reward", "eval_reward")):
                assert b["metrics"][key] == pytest.approx(value, abs=0.01), (a["round"], key)
            else:
                assert b["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-5), (a["round"], key)
    # round 1: the same chains and the base's pass shared batch by batch, so the KL proxy is the one process's
    # bit for bit; near 0, not 0: sampling ran 4 images per UNet call, the base's pass 32 rows (test_rounds: 0)
    assert one[0]["metrics"]["kl_proxy"] == two[0]["metrics"]["kl_proxy"] and abs(one[0]["metrics"]["kl_proxy"]) < 1e-5
    assert one[0]["metrics"]["implicit_acc"] == two[0]["metrics"]["implicit_acc"] == 0.5
    assert one[0]["policy"] == two[0]["policy"] == {"policy": "base"}


def test_each_process_samples_its_share_and_only_the_main_process_writes(launched):
    _, (main, other) = launched["two"]
    one = launched["one"][1][0]
    groups = {r: [s for size, seeds in one["sampled"] if size == 2 for s in seeds][4 * (r - 1):4 * r] for r in (1, 2)}
    # per round: batch 0 (groups 0, 1) on process 0, batch 1 (groups 2, 3) on process 1
    assert [s for size, s in main["sampled"] if size == 2] == [groups[1][:2], groups[2][:2]]
    assert [s for size, s in other["sampled"] if size == 2] == [groups[1][2:], groups[2][2:]]
    # the evaluation: the base's images, then the policy's after each round; 2 of the 4 images each
    evals = [s for size, s in one["sampled"] if size == 1]
    assert len(evals) == 3 * 2 and [s for size, s in main["sampled"] if size == 1] == evals[0::2]
    assert [s for size, s in other["sampled"] if size == 1] == evals[1::2]
    assert (main["processes"], other["processes"], one["processes"]) == (2, 2, 1)
    assert main["returned"] and not other["returned"] and one["returned"]
    assert other["wrote"] == [] and other["progress"] == [] and other["printed"] == ""
    assert main["wrote"] and any(p.endswith("round.json") for p in main["wrote"])
    # one line per round, from process 0 alone (the numbers in them: test_the_metrics_rows_agree)
    assert [line.split(",")[0] for line in main["progress"]] == [line.split(",")[0] for line in one["progress"]] == [
        "round 1/2: 8 images so far", "round 2/2: 16 images so far"]


def test_a_two_process_run_resumes_after_round_one_to_the_same_rounds(launched):
    (ws, (first, _)), (_, (second, other)) = launched["resumed-1"], launched["resumed"]
    assert [size for size, _ in first["sampled"]] == [1, 2, 1]  # base evaluation, round 1, its evaluation
    assert [size for size, _ in second["sampled"]] == [1, 2, 1]  # base evaluation, round 2 only, its evaluation
    assert any("resuming after round 1" in line for line in second["progress"]) and other["progress"] == []
    whole = launched["two"][0]
    for r in (1, 2):
        files = {k: v for k, v in tree(round_dir(whole, r), whole).items() if k != "round.json"}
        assert {k: v for k, v in tree(round_dir(ws, r), ws).items() if k != "round.json"} == files, r
    drop = lambda record: {**record, "metrics": {k: v for k, v in record["metrics"].items() if k != "seconds"}}  # noqa: E731
    assert [drop(r) for r in records(ws)] == [drop(r) for r in records(whole)]


def test_rounds_whose_pairs_are_all_ties_train_in_no_process(launched):
    """No process enters fit, so none waits in a collective the others skip: both rounds end, the policy unchanged."""
    ws, (main, other) = launched["ties"]
    assert main["returned"] and not other["returned"] and other["wrote"] == []
    assert [line for line in main["progress"] if "ties; no update" in line] == [
        f"round {r}: all 4 pairs are ties; no update this round" for r in (1, 2)]
    for record in records(ws):
        assert (record["metrics"]["pairs"], record["metrics"]["ties"], record["state_fingerprint"]) == (0, 4, NO_UPDATE)
    up = load_file(str(round_dir(ws, 2) / "lora" / LORA_WEIGHT_NAME))
    assert all(float(v.abs().max()) == 0.0 for k, v in up.items() if "lora.up" in k)  # the fresh LoRA's B = 0
