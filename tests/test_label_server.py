"""The labeling server (prefdiff.labeling.server) as a real process on 127.0.0.1, driven over HTTP: concurrent
annotators, kill -9 after acknowledgements, every refusal with its status and message, the token, undo and
resume, tag mode. The label log on disk is the ground truth every test checks."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest
from label_server_fixture import LabelServer, make_label_workspace, run_server_expecting_failure, wait_until

from prefdiff.data.trajectories import TrajectoryStore
from prefdiff.labeling.label_log import CHOICES, LabelLog, PairLabel, TagLabel

LOG = Path("data/labels/labels.jsonl")


def log_lines(ws: Path) -> list[dict]:
    return [json.loads(line) for line in (ws / LOG).read_text().splitlines()]


def sha_of(ws: Path) -> str:
    return log_lines(ws)[0]["dataset_sha256"]


def label_body(task: dict, annotator: str, sha: str, **extra) -> dict:
    return {"annotator": annotator, "dataset_sha256": sha, "group_id": task["group_id"], "image_ids": task["image_ids"],
            **extra}


# -- concurrency -----------------------------------------------------------------------------------------------
def test_concurrent_annotators_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    """8 threads: 4 annotators, each name used by two threads racing for the same groups with different choices.
    Exactly one of each race is acknowledged, the other refused as a duplicate; the log holds exactly the
    acknowledged labels, seq contiguous."""
    groups, names = 30, [f"annotator{k}" for k in range(4)]
    ws = make_label_workspace(tmp_path / "ws", num_groups=groups, human={"annotators_per_group": len(names)})
    acked: list[dict] = []
    refused: list[tuple[str, int, str]] = []
    failures: list[str] = []
    lock = threading.Lock()

    with LabelServer(ws) as server:
        sha = sha_of(ws)

        def work(name: str, twin: int) -> None:
            with httpx.Client(base_url=server.url, timeout=60) as http:
                for _ in range(4 * groups):  # bounded: each round labels or loses a race on one group
                    nxt = http.get("/api/next", params={"annotator": name}).json()
                    if nxt["state"] == "done":
                        return
                    task = nxt["task"]
                    choice = CHOICES[(task["group_id"] + twin) % 3]
                    r = http.post("/api/labels", json=label_body(task, name, sha, choice=choice))
                    with lock:
                        if r.status_code == 201:
                            acked.append(r.json()["label"])
                        elif r.status_code == 409:
                            refused.append((name, task["group_id"], r.json()["error"]))
                        else:
                            failures.append(f"{r.status_code} {r.text}")
                failures.append(f"{name}/{twin}: never reached the done state")

        threads = [threading.Thread(target=work, args=(n, t)) for n in names for t in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        progress = httpx.get(f"{server.url}/api/progress").json()

    assert failures == []
    # every (annotator, group) labeled exactly once; the losers of the races were told why
    assert Counter((a["annotator"], a["group_id"]) for a in acked) == {(n, g): 1 for n in names for g in range(groups)}
    assert all("duplicate" in message and f"group {g}" in message for _, g, message in refused)
    assert progress["groups_complete"] == groups and progress["annotators"] == {n: groups for n in names}
    lines = log_lines(ws)
    assert lines[0]["kind"] == "header" and len(lines) == 1 + len(names) * groups
    assert [rec["seq"] for rec in lines[1:]] == list(range(1, len(lines)))  # contiguous, none lost, none twice
    assert sorted(lines[1:], key=lambda r: r["seq"]) == sorted(acked, key=lambda r: r["seq"])  # byte-for-byte what was acked


# -- durability --------------------------------------------------------------------------------------------------
def test_kill_9_keeps_every_acknowledged_label_and_a_torn_line_is_dropped(tmp_path: Path) -> None:
    ws = make_label_workspace(tmp_path / "ws", num_groups=60)
    acked: list[dict] = []
    lock = threading.Lock()
    server = LabelServer(ws)
    sha = sha_of(ws)

    def work(name: str) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            try:
                while True:
                    nxt = http.get("/api/next", params={"annotator": name}).json()
                    if nxt["state"] == "done":
                        return
                    r = http.post("/api/labels", json=label_body(nxt["task"], name, sha, choice="second"))
                    if r.status_code == 201:
                        with lock:
                            acked.append(r.json()["label"])
            except httpx.TransportError:  # the server died under us: whatever was in flight was not acknowledged
                return

    threads = [threading.Thread(target=work, args=(f"a{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    assert wait_until(lambda: len(acked) >= 25, timeout=60)
    server.kill()  # SIGKILL while the threads are still submitting
    for t in threads:
        t.join(60)
    with lock:
        acknowledged = {rec["seq"]: rec for rec in acked}
    on_disk = {rec["seq"]: rec for rec in log_lines(ws)[1:]}
    assert len(acknowledged) >= 25 and all(on_disk[seq] == rec for seq, rec in acknowledged.items())

    # A crash in the middle of writing an unacknowledged record leaves a torn last line: readers skip it ...
    torn = b'{"kind": "label", "seq": 9999, "time": "2026-12-0'
    with open(ws / LOG, "ab") as f:
        f.write(torn)
    store = TrajectoryStore.open(ws / "data" / "trajectories")
    reader = LabelLog.open(ws / LOG, store)
    assert [lab.seq for lab in reader.effective_labels()] == sorted(on_disk)
    assert (ws / LOG).read_bytes().endswith(torn)  # a reader never writes

    # ... and the restarted server resumes from every acknowledged label, cutting the torn bytes before appending.
    with LabelServer(ws) as again:
        served = httpx.get(f"{again.url}/api/labels").json()["labels"]
        assert {rec["seq"]: rec for rec in served} == on_disk
        nxt = httpx.get(f"{again.url}/api/next", params={"annotator": "a0"}).json()
        assert nxt["task"]["group_id"] not in {rec["group_id"] for rec in on_disk.values()}
        r = httpx.post(f"{again.url}/api/labels", json=label_body(nxt["task"], "a0", sha, choice="tie"))
        assert r.status_code == 201 and r.json()["seq"] == max(on_disk) + 1
    lines = log_lines(ws)  # every line parses: the torn bytes are gone
    assert [rec["seq"] for rec in lines[1:]] == list(range(1, max(on_disk) + 2))


# -- validation ----------------------------------------------------------------------------------------------------
def test_every_bad_submission_is_refused_with_its_status_and_message(tmp_path: Path) -> None:
    ws = make_label_workspace(tmp_path / "ws", num_groups=5)
    with LabelServer(ws, "--annotators", "alice,bob") as server, httpx.Client(base_url=server.url) as http:
        sha = sha_of(ws)
        ok = {"annotator": "alice", "dataset_sha256": sha, "group_id": 1, "image_ids": [2, 3], "choice": "first"}
        first = http.post("/api/labels", json=ok)
        assert first.status_code == 201 and first.json()["seq"] == 1
        cases = [
            ({**ok, "group_id": 7}, 404, r"^unknown group 7: this dataset has groups 0\.\.4$"),
            ({**ok, "group_id": "one"}, 422, r"^group_id 'one': must be an integer$"),
            ({**ok, "group_id": 2, "image_ids": [4, 99]}, 422, r"^unknown image 99: this dataset has images 0\.\.9$"),
            ({**ok, "group_id": 2, "image_ids": [4, 0]}, 422, r"^image 0 is not in group 2 \(its images: 4, 5\)$"),
            ({**ok, "group_id": 2, "image_ids": [4, 4]}, 422, r"an image is listed twice"),
            ({**ok, "group_id": 2, "image_ids": [4]}, 422, r"pair mode labels images 4 and 5 of group 2"),
            ({**ok, "group_id": 2, "image_ids": [4, 5], "choice": "both"}, 422,
             r"^choice 'both': pair mode allows first, second or tie$"),
            ({**ok, "group_id": 2, "image_ids": [4, 5], "choice": None, "tags": {}}, 422, r"this log is in pair mode"),
            ({**ok, "group_id": 2, "image_ids": [4, 5], "mode": "tag"}, 422, r"^mode 'tag': this log is in pair mode$"),
            (ok, 409, r"^duplicate: alice already labeled group 1 \(label #1\); undo it first to change it$"),
            ({**ok, "image_ids": [3, 2]}, 409, r"^duplicate: alice already labeled group 1"),  # the other order too
            ({**ok, "group_id": 2, "image_ids": [4, 5], "dataset_sha256": "0" * 64}, 409,
             r"^stale dataset: the label is for trajectory dataset 000000000000…, this log labels .+; reload the page$"),
            ({**ok, "group_id": 2, "image_ids": [4, 5], "dataset_sha256": None}, 422, r"dataset_sha256 is required"),
            ({**ok, "annotator": ""}, 422, r"^annotator: a name is required"),
            ({**ok, "annotator": "a\nb"}, 422, r"use at most 64 letters"),
            ({**ok, "annotator": "mallory"}, 403, r"^annotator 'mallory' is not on this server's list: alice, bob$"),
        ]
        for body, status, message in cases:
            r = http.post("/api/labels", json=body)
            assert r.status_code == status, (body, r.text)
            assert r.headers["content-type"] == "application/json"
            assert len(r.json()["error"].splitlines()) == 1
            assert re.search(message, r.json()["error"]), (message, r.json())
        for raw, status, message in [(b"{not json", 400, "not valid JSON"), (b"[1, 2]", 400, "must be a JSON object"),
                                     (b'{"x": "' + b"y" * 70_000 + b'"}', 413, "")]:
            r = http.post("/api/labels", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == status and message in r.text
        undo_nothing = http.post("/api/undo", json={"annotator": "bob"})
        assert (undo_nothing.status_code, undo_nothing.json()["error"]) == (
            409, "nothing to undo: bob has no label left to undo")
        assert http.get("/api/next", params={"annotator": "mallory"}).status_code == 403
        assert http.get("/images/10.png").json() == {"error": "unknown image 10: this dataset has images 0..9"}
        assert http.get("/images/3.png").content == (ws / "data/trajectories/images/00003.png").read_bytes()
        assert http.get("/no/such/page").status_code == 404
    assert len(log_lines(ws)) == 2  # the header and the one good label: refusals write nothing


def test_refusals_before_serving(tmp_path: Path) -> None:
    """Bad configuration stops the server with one line and exit status 2, before it loads the dataset."""
    ws = make_label_workspace(tmp_path / "ws", num_groups=2)
    exposed = run_server_expecting_failure(ws, "--host", "0.0.0.0", "--port", "0")
    assert exposed.returncode == 2 and exposed.stdout == ""
    assert exposed.stderr.strip().splitlines() == [
        ("error: label.human.host '0.0.0.0' is not loopback: set PREFDIFF_LABEL_TOKEN to a secret so every "
         "request must carry it, or listen on 127.0.0.1")]
    bad_mode = run_server_expecting_failure(ws, "--mode", "vote")
    assert bad_mode.returncode == 2 and len(bad_mode.stderr.strip().splitlines()) == 1
    assert "label.human.mode = 'vote'" in bad_mode.stderr and "'pair' or 'tag'" in bad_mode.stderr
    no_data = run_server_expecting_failure(tmp_path / "empty", "--port", "0")
    assert no_data.returncode == 2 and no_data.stderr.startswith("error: ") and "params file not found" in no_data.stderr
    (ws / "data" / "trajectories" / "index.json").unlink()
    no_index = run_server_expecting_failure(ws, "--port", "0")
    assert no_index.returncode == 2 and len(no_index.stderr.strip().splitlines()) == 1
    assert "index.json: missing" in no_index.stderr and "re-run the sample stage" in no_index.stderr
    assert not (ws / LOG).exists()


def test_console_script_prefdiff_label_server(capsys) -> None:
    """pyproject's `prefdiff` script is prefdiff.cli:main, whose label-server command is the server's CLI."""
    import importlib
    import tomllib

    from label_server_fixture import REPO

    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["prefdiff"]
    module, _, attr = target.partition(":")
    cli = getattr(importlib.import_module(module), attr)
    with pytest.raises(SystemExit) as done:
        cli(["label-server", "--help"])
    assert done.value.code == 0 and "--annotators-per-group" in capsys.readouterr().out
    assert cli(["--help"]) == 0 and "prefdiff label-server" in capsys.readouterr().out
    assert cli(["serve"]) == 2 and "unknown command 'serve'" in capsys.readouterr().err


# -- token --------------------------------------------------------------------------------------------------------
def test_token_is_required_on_every_request_when_configured(tmp_path: Path) -> None:
    ws = make_label_workspace(tmp_path / "ws", num_groups=3)
    token = "s3cret-label-token"
    with LabelServer(ws, token=token) as server:
        sha = sha_of(ws)
        body = {"annotator": "alice", "dataset_sha256": sha, "group_id": 0, "image_ids": [0, 1], "choice": "tie"}
        requests = [("GET", "/", None), ("GET", "/api/next?annotator=alice", None), ("POST", "/api/labels", body),
                    ("POST", "/api/undo", {"annotator": "alice"}), ("GET", "/api/progress", None),
                    ("GET", "/api/labels", None), ("GET", "/summary", None), ("GET", "/images/0.png", None)]
        for credentials in ({}, {"headers": {"Authorization": "Bearer wrong"}}, {"cookies": {"prefdiff_label_token": "x"}}):
            with httpx.Client(base_url=server.url, **credentials) as http:
                for method, path, payload in requests:
                    r = http.request(method, path, json=payload)
                    assert r.status_code == 401, (method, path, credentials)
                    assert "PREFDIFF_LABEL_TOKEN" in r.json()["error"]
        assert len(log_lines(ws)) == 1  # nothing got through
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"}) as http:
            assert http.post("/api/labels", json=body).status_code == 201
            assert http.get("/api/progress").json()["annotators"] == {"alice": 1}
        # the page: ?token= once sets an HttpOnly cookie that carries the token from then on
        with httpx.Client(base_url=server.url) as browser:
            page = browser.get("/", params={"token": token})
            assert page.status_code == 200 and "HttpOnly" in page.headers["set-cookie"]
            assert browser.get("/api/next", params={"annotator": "bob"}).json()["state"] == "task"
            assert browser.get("/images/2.png").status_code == 200


# -- undo and resume --------------------------------------------------------------------------------------------------
def test_undo_walks_back_and_the_annotator_resumes_after_a_restart(tmp_path: Path) -> None:
    ws = make_label_workspace(tmp_path / "ws", num_groups=4)
    with LabelServer(ws) as server, httpx.Client(base_url=server.url) as http:
        sha = sha_of(ws)

        def label(choice: str) -> dict:
            task = http.get("/api/next", params={"annotator": "alice"}).json()["task"]
            r = http.post("/api/labels", json=label_body(task, "alice", sha, choice=choice))
            assert r.status_code == 201
            return r.json()

        assert [label("first")["label"]["group_id"], label("second")["label"]["group_id"]] == [0, 1]
        assert http.get("/api/next", params={"annotator": "alice"}).json()["task"]["group_id"] == 2
        undo = http.post("/api/undo", json={"annotator": "alice"}).json()
        assert (undo["seq"], undo["undoes"], undo["group_id"], undo["progress"]["labeled"]) == (3, 2, 1, 1)
        assert http.get("/api/next", params={"annotator": "alice"}).json()["task"]["group_id"] == 1  # back to it
        assert http.post("/api/undo", json={"annotator": "alice"}).json()["undoes"] == 1  # and further back
        assert http.post("/api/undo", json={"annotator": "alice"}).status_code == 409
        assert label("tie")["label"]["group_id"] == 0  # an undone group can be labeled again
        # bob is not sent to the group alice is looking at (one label per group is configured)
        assert http.get("/api/next", params={"annotator": "alice"}).json()["task"]["group_id"] == 1
        assert http.get("/api/next", params={"annotator": "bob"}).json()["task"]["group_id"] == 2
    assert [(r["kind"], r["seq"], r.get("undoes")) for r in log_lines(ws)[1:]] == [
        ("label", 1, None), ("label", 2, None), ("undo", 3, 2), ("undo", 4, 1), ("label", 5, None)]
    with LabelServer(ws) as server, httpx.Client(base_url=server.url) as http:
        nxt = http.get("/api/next", params={"annotator": "alice"}).json()
        assert (nxt["task"]["group_id"], nxt["progress"]["labeled"], nxt["progress"]["remaining"]) == (1, 1, 3)
        for _ in range(3):
            task = http.get("/api/next", params={"annotator": "alice"}).json()["task"]
            assert http.post("/api/labels", json=label_body(task, "alice", sha, choice="first")).status_code == 201
        done = http.get("/api/next", params={"annotator": "alice"}).json()
        assert done["state"] == "done" and done["message"].startswith("Everything is labeled")
        assert done["progress"]["groups_complete"] == 4
        assert http.get("/api/next", params={"annotator": "bob"}).json()["state"] == "done"
        summary = http.get("/summary").text
        assert "4 of 4 groups complete" in summary and "<td>alice</td><td>4</td><td>2</td>" in summary
    labels = LabelLog.open(ws / LOG, TrajectoryStore.open(ws / "data" / "trajectories")).effective_labels()
    assert [(lab.group_id, lab.choice) for lab in labels] == [(0, "tie"), (1, "first"), (2, "first"), (3, "first")]
    assert all(isinstance(lab, PairLabel) for lab in labels) and labels[0].h == (0, 0)


# -- tag mode ----------------------------------------------------------------------------------------------------------
def test_tag_mode_labels_every_image_of_a_group(tmp_path: Path) -> None:
    ws = make_label_workspace(tmp_path / "ws", num_groups=3, group_size=3,
                              human={"mode": "tag", "tags": ["deformed", "wrong digit", "unsafe"]})
    with LabelServer(ws) as server, httpx.Client(base_url=server.url) as http:
        sha = sha_of(ws)
        nxt = http.get("/api/next", params={"annotator": "carol"}).json()
        task = nxt["task"]
        assert (task["mode"], task["group_id"], task["image_ids"]) == ("tag", 0, [0, 1, 2])
        bad = [
            ({"tags": {"0": ["blurry"], "1": [], "2": []}},
             "tag 'blurry' of image 0: not a tag of this log; allowed: deformed, wrong digit, unsafe"),
            ({"tags": {"0": [], "1": []}}, "tags: every image of the group needs an entry ([] = fine); missing image 2"),
            ({"image_ids": [0, 1], "tags": {"0": [], "1": []}}, "tag mode labels all images of group 0; missing 2"),
            ({"tags": {"0": [], "1": [], "2": [], "3": []}}, "tags: image 3 is not one of image_ids [0, 1, 2]"),
            ({"tags": {"0": ["unsafe", "unsafe"], "1": [], "2": []}}, "tags of image 0: a tag is listed twice"),
            ({"choice": "first"}, "choice: this log is in tag mode"),
            ({"tags": ["deformed"]}, "tags: required in tag mode"),
        ]
        for extra, message in bad:
            r = http.post("/api/labels", json=label_body(task, "carol", sha, **extra))
            assert r.status_code == 422 and message in r.json()["error"], (extra, r.text)
        r = http.post("/api/labels", json=label_body(task, "carol", sha,
                                                     tags={"0": ["unsafe", "deformed"], "1": [], "2": ["wrong digit"]}))
        assert r.status_code == 201
        assert http.get("/api/next", params={"annotator": "carol"}).json()["task"]["group_id"] == 1
    rec = log_lines(ws)[1]
    assert log_lines(ws)[0]["mode"] == "tag"
    assert rec == {**rec, "kind": "label", "seq": 1, "mode": "tag", "group_id": 0, "image_ids": [0, 1, 2],
                   "tags": {"0": ["deformed", "unsafe"], "1": [], "2": ["wrong digit"]}}  # the configured tag order
    (label,) = LabelLog.open(ws / LOG, TrajectoryStore.open(ws / "data" / "trajectories")).effective_labels()
    assert isinstance(label, TagLabel) and (label.untagged, label.tagged) == ((1,), (0, 2))
    # the log remembers its mode: serving it in pair mode is refused with one line
    wrong = run_server_expecting_failure(ws, "--mode", "pair", "--port", "0")
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1
    assert "was written in tag mode" in wrong.stderr
