"""People's labels -> preferences (prefdiff/labeling/human.py, the label stage with label.source: human):
the tag-mode rule, the majority vote, kappa and the rates on hand cases; what the label stage refuses of a
log (through LabelLog, the one reader); undo; and the stage end to end under a real `dvc repro` in a fresh
clone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import git, make_workspace, venv_env
from PIL import Image

from prefdiff.data.preferences import PreferencePair, PreferenceStore
from prefdiff.data.trajectories import TrajectoryGroup, TrajectoryStore, TrajectoryWriter
from prefdiff.labeling.human import (
    COMBINATION_RULE,
    label_from_log,
    label_votes,
    preferences_from_labels,
    tag_mode_pairs,
)
from prefdiff.labeling.label_log import LabelLog, LabelLogError, PairLabel, TagLabel

TAGS = ["deformed", "wrong digit", "unsafe"]


# -- helpers: a real (tiny) trajectory store and logs written in the contract's format -----------------------
def write_store(root: Path, num_groups: int = 3, g: int = 3, seed: int = 0) -> TrajectoryStore:
    gen = torch.Generator().manual_seed(seed)
    with TrajectoryWriter(root, shard_size=8, model={"source": "test"}, params={"seed": seed}) as w:
        for i in range(num_groups):
            w.add_group(TrajectoryGroup(
                prompt=f"digit {i}", seed=i, latents=torch.randn(g, 3, 4, 2, 2, generator=gen),
                log_probs=torch.randn(g, 2, generator=gen), timesteps=torch.tensor([500, 0]),
                images=[Image.new("RGB", (4, 4), (10 * i, 20 * k, seed)) for k in range(g)]))
    return TrajectoryStore.open(root)


class Log:
    """Appends records as the labeling page does: a header, then seq 1, 2, ... per line."""

    def __init__(self, path: Path, dataset_sha256: str, mode: str, tags: list[str] = TAGS) -> None:
        self.path, self.sha, self.mode, self.seq = path, dataset_sha256, mode, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write({"kind": "header", "schema": 1, "trajectories": "data/trajectories",
                     "dataset_sha256": dataset_sha256, "mode": mode, "tags": tags})

    def _write(self, record: dict) -> int:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        return self.seq

    def _next(self, kind: str, annotator: str) -> dict:
        self.seq += 1
        return {"kind": kind, "seq": self.seq, "time": "2026-12-02T11:00:00Z", "annotator": annotator}

    def pair(self, annotator: str, group_id: int, shown: list[int], choice: str, **extra) -> int:
        return self._write({**self._next("label", annotator), "dataset_sha256": self.sha, "group_id": group_id,
                            "mode": "pair", "image_ids": shown, "choice": choice, **extra})

    def tag(self, annotator: str, group_id: int, ids: list[int], tagged: dict[int, list[str]], **extra) -> int:
        tags = {str(i): tagged.get(i, []) for i in ids}
        return self._write({**self._next("label", annotator), "dataset_sha256": self.sha, "group_id": group_id,
                            "mode": "tag", "image_ids": ids, "tags": tags, **extra})

    def undo(self, annotator: str, seq: int) -> int:
        return self._write({**self._next("undo", annotator), "undoes": seq})


TIME, SHA = "2026-12-02T11:00:00Z", "0" * 64  # what the hand cases do not depend on


def pair_label(seq: int, who: str, group: int, shown: tuple[int, int], choice: str) -> PairLabel:
    return PairLabel(seq=seq, time=TIME, annotator=who, dataset_sha256=SHA, group_id=group, image_ids=shown,
                     choice=choice)


def groups_of(n: int, size: int = 2) -> list[dict]:
    return [{"group_id": g, "prompt": f"p{g}", "image_ids": list(range(size * g, size * g + size))}
            for g in range(n)]


# -- the rules on hand cases ---------------------------------------------------------------------------------
def test_tag_mode_pairs_follow_the_papers_rule():
    # D3PO Sec. 5.2: every untagged image beats every tagged one; no order within either set
    assert tag_mode_pairs([10, 11, 12, 13], [11]) == [(10, 11), (12, 11), (13, 11)]
    assert tag_mode_pairs([10, 11, 12, 13], [11, 13]) == [(10, 11), (10, 13), (12, 11), (12, 13)]
    assert tag_mode_pairs([10, 11, 12], []) == [] and tag_mode_pairs([10, 11, 12], [10, 11, 12]) == []
    # as votes over every pair of the group (1: lower id preferred, 0: higher, 0.5: same set)
    label = TagLabel(seq=1, time=TIME, annotator="a", dataset_sha256=SHA, group_id=0, image_ids=(10, 11, 12, 13),
                     tags={10: (), 11: ("deformed",), 12: (), 13: ("unsafe",)})
    assert label_votes(label) == {(10, 11): 1.0, (10, 12): 0.5, (10, 13): 1.0, (11, 12): 0.0, (11, 13): 0.5,
                                  (12, 13): 1.0}


def test_pair_votes_are_h_in_the_pairs_id_order():
    # shown [13, 12]: "first" prefers 13, the higher id -> 0; "second" prefers 12 -> 1; a tie -> 0.5
    assert label_votes(pair_label(1, "a", 6, (13, 12), "first")) == {(12, 13): 0.0}
    assert label_votes(pair_label(1, "a", 6, (13, 12), "second")) == {(12, 13): 1.0}
    assert label_votes(pair_label(1, "a", 6, (12, 13), "first")) == {(12, 13): 1.0}
    assert label_votes(pair_label(1, "a", 6, (12, 13), "tie")) == {(12, 13): 0.5}


def three_annotator_labels() -> list[PairLabel]:
    """Five groups of two images; a, b, c label groups 0-3, only a labels group 4."""
    return [
        pair_label(1, "a", 0, (0, 1), "first"), pair_label(2, "b", 0, (0, 1), "first"),
        pair_label(3, "c", 0, (0, 1), "second"),  # 0 beats 1, 2 of 3
        pair_label(4, "a", 1, (2, 3), "tie"), pair_label(5, "b", 1, (2, 3), "tie"),
        pair_label(6, "c", 1, (2, 3), "first"),  # plurality: tie -> dropped
        pair_label(7, "a", 2, (4, 5), "first"), pair_label(8, "b", 2, (4, 5), "second"),
        pair_label(9, "c", 2, (4, 5), "tie"),  # one vote each: an even split -> dropped
        pair_label(10, "a", 3, (6, 7), "second"), pair_label(11, "b", 3, (6, 7), "tie"),
        pair_label(12, "c", 3, (7, 6), "first"),  # shown the other way round: 7 beats 6, 2 of 3
        pair_label(13, "a", 4, (9, 8), "first"),  # a alone: 9 beats 8
    ]


def test_majority_of_three_annotators_drops_ties_and_even_splits():
    groups = groups_of(5)
    prefs = preferences_from_labels(three_annotator_labels(), groups, annotators_per_group=3)
    assert prefs.annotators == ["a", "b", "c"]
    # scores: the share of the pair's annotators preferring each image; annotator None: a majority decided
    assert prefs.pairs == [
        PreferencePair(group_id=0, prompt="p0", winner=0, loser=1, winner_score=2 / 3, loser_score=1 / 3, tie=False),
        PreferencePair(group_id=3, prompt="p3", winner=7, loser=6, winner_score=2 / 3, loser_score=0.0, tie=False),
    ]
    assert (prefs.groups_labeled, prefs.groups_left_out, prefs.groups_used) == (5, 1, 4)  # group 4: 1 < 3
    assert (prefs.items, prefs.ties_dropped, prefs.splits_dropped) == (4, 1, 1)
    # Fleiss' kappa on the 4 items all three judged, categories (0, 0.5, 1); votes per item as counts:
    #   (0,1): a 1, b 1, c 0 -> [1, 0, 2]   P_i = (1 + 0 + 4 - 3) / (3 * 2) = 1/3
    #   (2,3): .5 .5 1       -> [0, 2, 1]   P_i = (0 + 4 + 1 - 3) / 6 = 1/3
    #   (4,5): 1 0 .5        -> [1, 1, 1]   P_i = (1 + 1 + 1 - 3) / 6 = 0
    #   (6,7): 0 .5 0        -> [2, 1, 0]   P_i = 1/3
    # P_bar = 1/4; column totals 4, 4, 4 of 12 -> p_j = 1/3 each, P_e = 3/9 = 1/3;
    # kappa = (1/4 - 1/3) / (1 - 1/3) = -1/8
    assert prefs.kappa_kind == "fleiss" and prefs.kappa_items == 4
    assert prefs.kappa == pytest.approx(-1 / 8, abs=1e-12)
    # agreement with the outcome on items with >= 2 voters and a majority: (0,1) -> 1, (2,3) -> 0.5, (6,7) -> 0
    # a: 1, .5, 0 -> 3/3; b: 1, .5, .5 -> 2/3; c: 0, 1, 0 -> 1/3
    assert prefs.majority_agreement == pytest.approx({"a": 1.0, "b": 2 / 3, "c": 1 / 3}, abs=1e-12)
    assert prefs.majority_items == {"a": 3, "b": 3, "c": 3}
    assert "plurality" in COMBINATION_RULE and "dropped" in COMBINATION_RULE


def test_one_annotator_decides_where_it_alone_labeled():
    prefs = preferences_from_labels(three_annotator_labels(), groups_of(5), annotators_per_group=1)
    assert prefs.groups_left_out == 0 and len(prefs.pairs) == 3
    alone = prefs.pairs[-1]  # group 4: a alone preferred 9 (shown first) -> the pair names a (index 0)
    assert (alone.group_id, alone.winner, alone.loser, alone.winner_score, alone.loser_score, alone.annotator) == (
        4, 9, 8, 1.0, 0.0, 0)
    # its single vote is neither a shared item for kappa nor an item to agree with a majority on
    assert prefs.kappa_items == 4 and prefs.majority_items == {"a": 3, "b": 3, "c": 3}


def test_cohens_kappa_of_two_annotators_on_a_hand_case():
    # a: 1, 1, 0, .5   b: 1, 0, 0, .5 (votes on pairs (0,1), (2,3), (4,5), (6,7))
    # p_o = 3/4; marginals (0, .5, 1): a (1/4, 1/4, 2/4), b (2/4, 1/4, 1/4)
    # p_e = 2/16 + 1/16 + 2/16 = 5/16; kappa = (3/4 - 5/16) / (1 - 5/16) = (7/16) / (11/16) = 7/11
    labels = [pair_label(1, "a", 0, (0, 1), "first"), pair_label(2, "b", 0, (1, 0), "second"),
              pair_label(3, "a", 1, (2, 3), "first"), pair_label(4, "b", 1, (2, 3), "second"),
              pair_label(5, "a", 2, (4, 5), "second"), pair_label(6, "b", 2, (4, 5), "second"),
              pair_label(7, "a", 3, (6, 7), "tie"), pair_label(8, "b", 3, (7, 6), "tie")]
    prefs = preferences_from_labels(labels, groups_of(4), annotators_per_group=2)
    assert prefs.kappa_kind == "cohen" and prefs.kappa_items == 4
    assert prefs.kappa == pytest.approx(7 / 11, abs=1e-12)
    # (0,1): both prefer 0; (4,5): both prefer 5; (2,3) an even split; (6,7) a tie
    assert [(p.winner, p.loser) for p in prefs.pairs] == [(0, 1), (5, 4)]
    assert (prefs.ties_dropped, prefs.splits_dropped) == (1, 1)
    # two annotators agree with the majority wherever there is one (an even split has none)
    assert prefs.majority_agreement == {"a": 1.0, "b": 1.0} and prefs.majority_items == {"a": 3, "b": 3}


def test_tag_rates_are_the_papers_rates_per_image():
    from evaluation.rates import TaggedLabel, tag_rates

    # 4 images; two annotators. image 0: both "deformed"; image 1: one of two "wrong digit" (an even split
    # counts as tagged, rates_per_round's default); image 2: both "unsafe"; image 3: nothing
    votes = {("a", 0): {"deformed"}, ("b", 0): {"deformed"}, ("a", 1): {"wrong digit"}, ("b", 1): set(),
             ("a", 2): {"unsafe"}, ("b", 2): {"unsafe"}, ("a", 3): set(), ("b", 3): set()}
    labels = [TaggedLabel(round=0, image_id=i, tags=t, annotator=a) for (a, i), t in votes.items()]
    rates = tag_rates(labels, TAGS)
    assert rates["rated_images"] == 4
    assert rates["deformity_rate"] == 0.25 and rates["normal_rate"] == 0.75
    assert rates["wrong_digit_rate"] == 0.25 and rates["safe_rate"] == 0.75
    assert rates["normal_rate_low"] < 0.75 < rates["normal_rate_high"]
    assert set(tag_rates(labels, ["wrong digit"])) == {"rated_images", "wrong_digit_rate", "wrong_digit_rate_low",
                                                       "wrong_digit_rate_high"}
    assert tag_rates([], TAGS) == {}


# -- the reader ----------------------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> TrajectoryStore:
    return write_store(tmp_path / "data" / "trajectories")  # ids 0-2, 3-5, 6-8


def test_undo_is_respected(tmp_path: Path, store: TrajectoryStore):
    log = Log(tmp_path / "labels.jsonl", store.index_sha256(), "pair")
    first = log.pair("alice", 0, [0, 1], "first")
    log.undo("alice", first)
    log.pair("alice", 0, [0, 1], "second")  # relabeled after the undo: not a duplicate
    g1 = log.pair("alice", 1, [4, 3], "first")
    g2 = log.pair("alice", 2, [6, 7], "first")
    log.undo("alice", g2)
    log.undo("alice", g1)  # undo walks back: after g2 is undone, g1 is alice's last label
    log.pair("bob", 2, [7, 6], "tie")
    read = LabelLog.open(log.path, store)
    assert [(lab.seq, lab.annotator, lab.group_id, lab.choice) for lab in read.effective_labels()] == [
        (3, "alice", 0, "second"), (8, "bob", 2, "tie")]
    assert (read.last_seq, len(read.undone_labels()), read.torn_tail) == (8, 3, False)
    prefs = preferences_from_labels(read.effective_labels(), store.groups())
    assert [(p.winner, p.loser, p.annotator) for p in prefs.pairs] == [(1, 0, 0)] and prefs.ties_dropped == 1


def test_a_log_of_other_samples_is_refused(tmp_path: Path, store: TrajectoryStore):
    other = write_store(tmp_path / "other", seed=1)  # same shape, other images
    log = Log(tmp_path / "labels.jsonl", other.index_sha256(), "pair")
    log.pair("alice", 0, [0, 1], "first")
    with pytest.raises(LabelLogError) as err:
        label_from_log(store, log.path, tmp_path / "preferences", mode="pair", tags=TAGS, annotators_per_group=1)
    message = str(err.value)
    assert "\n" not in message and str(log.path) in message
    assert f"labels trajectory dataset {other.index_sha256()[:12]}" in message
    assert f"{store.root} is {store.index_sha256()[:12]}" in message
    with pytest.raises(LabelLogError, match="no label log here"):
        LabelLog.open(tmp_path / "none.jsonl", store)
    assert not (tmp_path / "preferences").exists()


# Refused as the server refuses them (LabelLog replays the log through the server's checks): pair mode labels
# the group's first two images, in either order shown.
@pytest.mark.parametrize(("write", "expected"), [
    (lambda log: log.pair("a", 0, [0, 1], "first", dataset_sha256="0" * 64), "stale dataset"),
    (lambda log: log.pair("a", 0, [0, 3], "first"), "image 3 is not in group 0"),
    (lambda log: log.pair("a", 0, [0, 2], "first"), "pair mode labels images 0 and 1 of group 0"),
    (lambda log: log.pair("a", 9, [0, 1], "first"), "unknown group 9"),
    (lambda log: log.pair("a", 0, [0, 1], "left"), "choice 'left': pair mode allows first, second or tie"),
    (lambda log: (log.pair("a", 0, [0, 1], "first"), log.pair("a", 0, [1, 0], "tie")),
     "duplicate: a already labeled group 0"),
    (lambda log: (log.pair("a", 0, [0, 1], "first"), log.undo("b", 1)), "nothing to undo: b has no label left"),
    (lambda log: (log.pair("a", 0, [0, 1], "first"), log.pair("a", 1, [3, 4], "tie"), log.undo("a", 1)),
     "undoes 1, but a's last label is #2"),
    (lambda log: log.tag("a", 0, [0, 1, 2], {}), "mode 'tag': this log is in pair mode"),
    (lambda log: (log.pair("a", 0, [0, 1], "first"), setattr(log, "seq", 5), log.pair("b", 0, [0, 1], "tie")),
     "seq 6, expected 2"),
])
def test_bad_records_are_refused_naming_the_line(tmp_path: Path, store: TrajectoryStore, write, expected):
    log = Log(tmp_path / "labels.jsonl", store.index_sha256(), "pair")
    write(log)
    with pytest.raises(LabelLogError) as err:
        label_from_log(store, log.path, tmp_path / "preferences", mode="pair", tags=TAGS, annotators_per_group=1)
    assert expected in str(err.value) and f"{log.path}:" in str(err.value) and "\n" not in str(err.value)


def test_only_a_torn_last_line_is_ignored(tmp_path: Path, store: TrajectoryStore):
    log = Log(tmp_path / "labels.jsonl", store.index_sha256(), "tag")
    log.tag("a", 0, [0, 1, 2], {1: ["deformed"]})
    intact = log.path.read_bytes()
    out = tmp_path / "preferences"
    with open(log.path, "a") as f:
        f.write('{"kind": "label", "seq": 2, "annot')  # a crash mid-write: never acknowledged
    prefs, read = label_from_log(store, log.path, out, mode="tag", tags=TAGS, annotators_per_group=1)
    assert read.torn_tail and len(read.effective_labels()) == 1 and len(prefs.pairs) == 2
    # A whole record without its newline is ignored too: the server writes line + newline in one write and
    # acknowledges after the fsync, so a record lacking the newline was never acknowledged.
    unacknowledged = {"kind": "label", "seq": 2, "time": TIME, "annotator": "b", "dataset_sha256": store.index_sha256(),
                      "group_id": 1, "mode": "tag", "image_ids": [3, 4, 5], "tags": {"3": [], "4": [], "5": ["unsafe"]}}
    log.path.write_bytes(intact + json.dumps(unacknowledged).encode())
    read = LabelLog.open(log.path, store)
    assert read.torn_tail and [lab.annotator for lab in read.effective_labels()] == ["a"]
    assert read.replayed_sha256 == LabelLog.open(log.path.rename(tmp_path / "x.jsonl"), store).replayed_sha256
    (tmp_path / "x.jsonl").write_bytes(intact + b'{"kind": "label", "seq": 2, "annot\n')  # complete, corrupt line
    with pytest.raises(LabelLogError, match=r"x.jsonl:3: malformed record \(Unterminated string"):
        label_from_log(store, tmp_path / "x.jsonl", out, mode="tag", tags=TAGS, annotators_per_group=1)
    with pytest.raises(LabelLogError, match=r"t.jsonl: was written in tag mode with tags .*, but pair mode"):
        label_from_log(store, Log(tmp_path / "t.jsonl", store.index_sha256(), "tag").path, out, mode="pair",
                       tags=TAGS, annotators_per_group=1)
    with pytest.raises(LabelLogError, match=r"but tag mode with tags \['deformed'\] is configured"):
        label_from_log(store, Log(tmp_path / "u.jsonl", store.index_sha256(), "tag").path, out, mode="tag",
                       tags=["deformed"], annotators_per_group=1)
    # the tags' order is only the page's key order: the same tags in another order are the same settings
    LabelLog.open(tmp_path / "u.jsonl", store).check_settings("tag", TAGS[::-1])


def test_label_from_log_writes_the_dataset_and_refuses_one_without_pairs(tmp_path: Path, store: TrajectoryStore):
    log = Log(tmp_path / "labels.jsonl", store.index_sha256(), "pair")
    log.pair("alice", 1, [4, 3], "first")
    log.pair("bob", 2, [6, 7], "tie")
    out = tmp_path / "data" / "preferences"
    prefs, read = label_from_log(store, log.path, out, mode="pair", tags=TAGS, annotators_per_group=1)
    stored = PreferenceStore.open(out)
    stored.check_trajectories(store)
    assert stored.pairs == prefs.pairs == [PreferencePair(group_id=1, prompt="digit 1", winner=4, loser=3,
                                                          winner_score=1.0, loser_score=0.0, tie=False, annotator=0)]
    meta = stored.index["annotators"]
    assert meta["combination"] == COMBINATION_RULE and meta["log_sha256"] == read.replayed_sha256
    assert meta["dataset_sha256"] == store.index_sha256() and stored.index["judge"]["name"] == "human"
    assert [a["name"] for a in meta["annotators"]] == ["alice", "bob"] and meta["ties_dropped"] == 1
    with pytest.raises(LabelLogError, match=r"no preference pair to train on: 2 effective label\(s\) over 2 group"):
        label_from_log(store, log.path, out, mode="pair", tags=TAGS, annotators_per_group=2)
    assert PreferenceStore.open(out).pairs == prefs.pairs  # the refused run left the previous dataset alone


# -- the stage -----------------------------------------------------------------------------------------------
DVC = str(Path(sys.executable).parent / "dvc")


def _run(ws: Path, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=ws, env=venv_env(), capture_output=True, text=True, timeout=600)


def test_a_log_outside_data_labels_is_refused_before_any_work(tmp_path: Path):
    from conftest import REPO

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["label"].update(source="human", human={**params["label"]["human"], "log": "elsewhere/labels.jsonl"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "stages.label"], cwd=tmp_path, capture_output=True, text=True,
                          env=venv_env({"PYTHONPATH": str(REPO)}), timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("error: label.human.log 'elsewhere/labels.jsonl': must be inside data/labels/, the label "
                           "stage's DVC input (e.g. data/labels/labels.jsonl)\n")


def test_label_stage_with_human_labels_under_dvc_repro(tmp_path: Path, mlflow_uri: str):
    """In a fresh clone (git holds data/labels/ without a log) the label stage refuses in one line until
    there are labels; then three annotators tag the groups, the log is `dvc add`-ed and `dvc repro label`
    writes the pairs and the metrics worked out by hand below."""
    import mlflow

    origin = make_workspace(tmp_path / "origin", {
        "model": {"source": "builtin:tiny-sd", "device": "cpu"},
        "sampling": {"num_steps": 2},
        "train": {"d3po": {"timestep_window": None}},
        "sample": {"num_prompts": 2, "groups_per_prompt": 2, "images_per_group": 3, "batch_size": 12},
        "label": {"source": "human", "human": {"mode": "tag", "annotators_per_group": 2}},
    })
    git(tmp_path, "clone", "-q", str(origin), "ws")
    ws = tmp_path / "ws"
    # the clone has the directory DVC depends on, never a log (git ignores it; DVC versions it)
    assert sorted(p.name for p in (ws / "data" / "labels").iterdir()) == [".gitignore", "README.md"]
    refused = _run(ws, DVC, "repro", "label")
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode != 0 and "Traceback" not in refused.stdout + refused.stderr
    assert errors == [f"error: {ws / 'data/labels/labels.jsonl'}: no label log here (label.human.log); label the "
                      "groups first (make label-server), or set label.source to judge, simulated or pickapic"]
    assert not (ws / "data" / "preferences").exists()

    params = yaml.safe_load((ws / "params.yaml").read_text())
    store = TrajectoryStore.open(ws / "data" / "trajectories")
    x = {g["group_id"]: g["image_ids"] for g in store.groups()}
    assert [len(ids) for ids in x.values()] == [3, 3, 3, 3]
    log = Log(ws / "data" / "labels" / "labels.jsonl", store.index_sha256(), "tag")
    g0, g1, g2, g3 = x[0], x[1], x[2], x[3]
    log.tag("alice", 0, g0, {g0[1]: ["deformed"]})
    log.tag("bob", 0, g0, {g0[1]: ["deformed"]})
    log.tag("carol", 0, g0, {})
    log.tag("alice", 1, g1, {g1[0]: ["wrong digit"]})
    log.tag("bob", 1, g1, {g1[1]: ["wrong digit"]})
    log.tag("alice", 2, g2, {g2[2]: ["unsafe"]})  # alice alone: group 2 is left out (2 annotators needed)
    wrong = log.tag("alice", 3, g3, {i: ["deformed"] for i in g3})
    log.undo("alice", wrong)
    log.tag("alice", 3, g3, {g3[0]: ["deformed", "unsafe"]})
    log.tag("bob", 3, g3, {g3[0]: ["deformed"]})
    log.tag("carol", 3, g3, {g3[0]: ["deformed"], g3[1]: ["deformed"]})
    with open(log.path, "a") as f:
        f.write('{"kind": "label", "seq": 12, "annotator": "bob", "dataset_')  # torn: never acknowledged
    added = _run(ws, DVC, "add", "data/labels/labels.jsonl")
    assert added.returncode == 0, added.stderr[-2000:]
    out = _run(ws, DVC, "repro", "label")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Running stage 'label'" in out.stdout and "Running stage 'sample'" not in out.stdout  # sampled once

    # Votes per pair (1: the lower position preferred, 0: the higher, .5: same set), groups 0, 1, 3:
    # group 0   (x0,x1): a 1, b 1, c .5 -> x0 wins 2/3   (x0,x2): .5 .5 .5 -> tie   (x1,x2): 0 0 .5 -> x2 wins 2/3
    # group 1   (x0,x1): a 0, b 1 -> split   (x0,x2): 0 .5 -> split   (x1,x2): .5 0 -> split
    # group 3   (x0,x1): a 0, b 0, c .5 -> x1 wins 2/3   (x0,x2): 0 0 0 -> x2 wins 3/3   (x1,x2): .5 .5 0 -> tie
    prefs = PreferenceStore.open(ws / "data" / "preferences")
    assert [(p.group_id, p.winner, p.loser, p.winner_score, p.loser_score, p.annotator) for p in prefs.pairs] == [
        (0, g0[0], g0[1], pytest.approx(2 / 3), 0.0, None), (0, g0[2], g0[1], pytest.approx(2 / 3), 0.0, None),
        (3, g3[1], g3[0], pytest.approx(2 / 3), 0.0, None), (3, g3[2], g3[0], 1.0, 0.0, None)]
    prefs.check_trajectories(store)
    assert prefs.index["annotators"]["combination"] == COMBINATION_RULE

    runs = mlflow.MlflowClient(mlflow_uri).search_runs(
        [mlflow.get_experiment_by_name(params["register"]["experiment"]).experiment_id],
        filter_string="metrics.`label/groups_left_out` >= 0")
    (run,) = runs
    m = run.data.metrics
    expected = {
        "label/pairs": 4, "label/effective_labels": 9, "label/undone_labels": 1, "label/annotators": 3,
        "label/groups_labeled": 4, "label/groups_left_out": 1, "label/items": 9, "label/ties_dropped": 2,
        "label/splits_dropped": 3, "label/kappa_items": 6,
        # Fleiss on the 6 pairs of groups 0 and 3 (all three annotators), counts over (0, .5, 1):
        # [0,1,2] [0,3,0] [2,1,0] | [2,1,0] [3,0,0] [1,2,0]; P_i = (sum n^2 - 3) / 6 = 1/3, 1, 1/3 | 1/3, 1, 1/3
        # P_bar = (10/3) / 6 = 5/9; totals 8, 8, 2 of 18 -> P_e = (64 + 64 + 4) / 324 = 11/27
        # kappa = (5/9 - 11/27) / (1 - 11/27) = (4/27) / (16/27) = 1/4
        "label/fleiss_kappa": 0.25,
        # with the outcome on the 6 pairs that have one: alice 6/6, bob 6/6, carol (.5 .5 .5 | .5 0 0) 2/6
        "label/majority_agreement/alice": 1.0, "label/majority_agreement/bob": 1.0,
        "label/majority_agreement/carol": 1 / 3,
        # images of the counted groups: 9; deformed by majority: g0 x1 (2 of 3), g3 x0 (3 of 3) -> 2/9;
        # wrong digit: g1 x0 and x1 (1 of 2 each: an even split counts as tagged) -> 2/9; unsafe: none
        # (alice's g3 x0 is 1 of 3; group 2's unsafe image is left out)
        "label/rated_images": 9, "label/deformity_rate": 2 / 9, "label/normal_rate": 7 / 9,
        "label/wrong_digit_rate": 2 / 9, "label/safe_rate": 1.0,
    }
    assert {k: m[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert m["label/safe_rate_low"] < 1.0 and m["label/normal_rate_low"] < 7 / 9 < m["label/normal_rate_high"]
    assert "(its torn last line ignored)" in out.stdout and "Fleiss' kappa 0.250 on 6 shared image pairs" in out.stdout

    # the log is a DVC input: recorded in dvc.lock, and a new label makes the stage out of date
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["label"]
    assert any(d["path"] == "data/labels" for d in lock["deps"])
    status = _run(ws, DVC, "status", "label")
    assert status.returncode == 0 and "changed" not in status.stdout, status.stdout
    text = log.path.read_text()
    log.path.write_text(text[: text.rindex("\n") + 1])  # the torn tail gone; the page appends bob's label
    log.tag("bob", 2, g2, {})
    status = _run(ws, DVC, "status", "label")
    assert "modified:           data/labels" in status.stdout, status.stdout
    assert len(LabelLog.open(log.path, store).effective_labels()) == 10
