"""The label log in-process (prefdiff.labeling.label_log): the contract's replay rules (torn last line ignored,
anything else refused with the line number), one writer, the dataset check, typed effective labels, task order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from label_server_fixture import write_store

from prefdiff.data.trajectories import TrajectoryStore
from prefdiff.labeling.label_log import LabelError, LabelLog, LabelLogError, PairLabel, TagLabel, shown_pair


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> TrajectoryStore:
    root = tmp_path_factory.mktemp("traj") / "trajectories"
    write_store(root, num_groups=4, group_size=2)
    return TrajectoryStore.open(root)


@pytest.fixture(scope="module")
def store3(tmp_path_factory) -> TrajectoryStore:
    root = tmp_path_factory.mktemp("traj3") / "trajectories"
    write_store(root, num_groups=2, group_size=3)
    return TrajectoryStore.open(root)


def pair(log: LabelLog, annotator: str, group_id: int, choice: str = "first") -> PairLabel:
    ids = log.task(annotator, group_id)["image_ids"]
    return log.append_pair(annotator=annotator, dataset_sha256=log.header.dataset_sha256, group_id=group_id,
                           image_ids=ids, choice=choice)


def filled_log(path: Path, store: TrajectoryStore) -> None:
    with LabelLog.create(path, store, mode="pair", tags=["deformed"]) as log:
        pair(log, "alice", 0, "first")
        pair(log, "bob", 0, "second")
        pair(log, "alice", 1, "tie")
        log.undo("alice")


def test_effective_labels_are_typed_and_undone_ones_left_out(tmp_path: Path, store: TrajectoryStore) -> None:
    filled_log(tmp_path / "labels.jsonl", store)
    log = LabelLog.open(tmp_path / "labels.jsonl", store)
    labels = log.effective_labels()
    assert [(lab.seq, lab.annotator, lab.group_id, lab.choice) for lab in labels] == [
        (1, "alice", 0, "first"), (2, "bob", 0, "second")]
    alice = labels[0]
    assert isinstance(alice, PairLabel) and alice.image_ids == shown_pair([0, 1], "alice", 0) and alice.h == (1, -1)
    assert labels[1].h == (-1, 1)
    assert [lab.seq for lab in log.undone_labels()] == [3]
    assert log.last_seq == 4 and log.annotator_counts() == {"alice": 1, "bob": 1}
    p = log.progress("alice")
    assert (p.labeled, p.remaining, p.groups_complete, p.groups_total) == (1, 3, 1, 4)
    with pytest.raises(RuntimeError, match="opened read-only"):
        pair(log, "carol", 2)


def test_torn_last_line_is_ignored_by_readers_and_cut_by_the_writer(tmp_path: Path, store: TrajectoryStore) -> None:
    path = tmp_path / "labels.jsonl"
    filled_log(path, store)
    intact = path.read_bytes()
    path.write_bytes(intact + b'{"kind": "label", "seq": 5, "annotator": "ca')
    assert LabelLog.open(path, store).last_seq == 4
    assert path.read_bytes() != intact  # reading changes nothing
    with LabelLog.open(path, store, writer=True) as log:
        assert path.read_bytes() == intact  # the unacknowledged bytes are gone before the first append
        assert pair(log, "carol", 2).seq == 5
    assert [json.loads(line)["seq"] for line in path.read_text().splitlines()[1:]] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("bad_line, message", [
    (b"not json", r"labels.jsonl:3: malformed record \(Expecting value"),
    (b'{"kind": "label", "seq": 7}', r"labels.jsonl:3: malformed record \(seq 7, expected 2\)"),
    (b'{"kind": "vote", "seq": 2}', r"labels.jsonl:3: malformed record \(kind 'vote', expected label or undo\)"),
    (b'{"kind": "undo", "seq": 2, "time": "t", "annotator": "bob", "undoes": 1}',
     r"labels.jsonl:3: a record the server would have refused \(nothing to undo: bob has no label left to undo\)"),
    (b'{"kind": "undo", "seq": 2, "time": "t", "annotator": "alice", "undoes": 9}',
     r"labels.jsonl:3: malformed record \(undoes 9, but alice's last label is #1\)"),
])
def test_a_bad_line_before_the_end_is_refused_with_its_line_number(tmp_path: Path, store: TrajectoryStore,
                                                                    bad_line: bytes, message: str) -> None:
    path = tmp_path / "labels.jsonl"
    with LabelLog.create(path, store, mode="pair", tags=["deformed"]) as log:
        pair(log, "alice", 0)
    with open(path, "ab") as f:
        f.write(bad_line + b"\n")
    with pytest.raises(LabelLogError, match=message):
        LabelLog.open(path, store)


def test_a_duplicate_or_stale_record_in_the_file_is_refused(tmp_path: Path, store: TrajectoryStore) -> None:
    path = tmp_path / "labels.jsonl"
    with LabelLog.create(path, store, mode="pair", tags=["deformed"]) as log:
        first = pair(log, "alice", 0).as_json()
    for record, message in [({**first, "seq": 2}, "duplicate: alice already labeled group 0"),
                            ({**first, "seq": 2, "group_id": 1, "image_ids": [2, 3], "dataset_sha256": "f" * 64},
                             "stale dataset")]:
        copy = tmp_path / "copy.jsonl"
        copy.write_bytes(path.read_bytes() + json.dumps(record).encode() + b"\n")
        with pytest.raises(LabelLogError, match=f"copy.jsonl:3: a record the server would have refused \\({message}"):
            LabelLog.open(copy, store)


def test_one_writer_the_right_dataset_and_the_configured_mode(tmp_path: Path, store: TrajectoryStore,
                                                              store3: TrajectoryStore) -> None:
    path = tmp_path / "labels.jsonl"
    with pytest.raises(LabelLogError, match="no label log here"):
        LabelLog.open(path, store)
    writer = LabelLog.create(path, store, mode="pair", tags=["deformed"])
    with pytest.raises(LabelLogError, match="already exists"):
        LabelLog.create(path, store, mode="pair", tags=["deformed"])
    with pytest.raises(LabelLogError, match="another labeling server is writing this log; stop it first"):
        LabelLog.open(path, store, writer=True)
    LabelLog.open(path, store)  # reading while it is written is fine
    writer.close()
    LabelLog.open(path, store, writer=True).close()  # the lock went with the writer
    with pytest.raises(LabelLogError, match=rf"labels trajectory dataset {store.index_sha256()[:12]}… "
                                            rf"\(data/trajectories\), but {store3.root} is "
                                            rf"{store3.index_sha256()[:12]}… \(re-sampled\?\); move the old log"):
        LabelLog.open(path, store3)
    with pytest.raises(LabelLogError, match="was written in pair mode with tags \\['deformed'\\], but tag mode"):
        LabelLog.open_or_create(path, store, mode="tag", tags=["deformed"])
    (tmp_path / "empty.jsonl").write_bytes(b'{"kind": "header", "schema": 2}\n')
    with pytest.raises(LabelLogError, match="empty.jsonl:1: not a label log header \\(schema 2, supported: 1\\)"):
        LabelLog.open(tmp_path / "empty.jsonl", store)


def test_tag_labels_and_pair_mode_on_groups_of_three(tmp_path: Path, store3: TrajectoryStore) -> None:
    with LabelLog.create(tmp_path / "tags.jsonl", store3, mode="tag", tags=["deformed", "unsafe"]) as log:
        label = log.append_tags(annotator="dana", dataset_sha256=store3.index_sha256(), group_id=1,
                                image_ids=[5, 3, 4], tags={5: ["unsafe"], 3: [], "4": ["unsafe", "deformed"]})
    assert isinstance(label, TagLabel) and label.image_ids == (5, 3, 4)
    assert label.tags == {5: ("unsafe",), 3: (), 4: ("deformed", "unsafe")}
    assert (label.untagged, label.tagged) == ((3,), (5, 4))
    # pair mode on G = 3: the group's first two images, nothing else
    with LabelLog.create(tmp_path / "pairs.jsonl", store3, mode="pair", tags=["deformed"]) as log:
        assert sorted(log.task("erin", 1)["image_ids"]) == [3, 4]
        with pytest.raises(LabelError, match="pair mode labels images 3 and 4 of group 1") as err:
            log.append_pair(annotator="erin", dataset_sha256=store3.index_sha256(), group_id=1, image_ids=[3, 5],
                            choice="tie")
        assert err.value.status == 422


def test_tasks_spread_annotators_and_resume(tmp_path: Path, store: TrajectoryStore) -> None:
    with LabelLog.create(tmp_path / "l.jsonl", store, mode="pair", tags=["x"], annotators_per_group=1) as log:
        assert [log.next_group(a) for a in ("alice", "bob", "carol", "dave", "erin")] == [0, 1, 2, 3, 0]
        assert log.next_group("alice") == 0  # the same group until it is labeled (a page reload)
        pair(log, "alice", 0)
        assert log.next_group("alice") == 1  # erin still looks at 0; every open group is looked at
        pair(log, "bob", 1)
        pair(log, "carol", 2)
        pair(log, "dave", 3)
        assert log.next_group("bob") is None and log.progress("bob").remaining == 0
        log.undo("dave")
        assert log.next_group("dave") == 3  # the undone group again
        assert log.next_group("erin") == 3  # only one open group: not held back for dave, who may have left
    # the order shown is a pure function of (annotator, group), and both orders occur
    orders = {shown_pair([10, 11], f"annotator{k}", 0) for k in range(16)}
    assert orders == {(10, 11), (11, 10)} and shown_pair([10, 11], "x", 3) == shown_pair([10, 11], "x", 3)
