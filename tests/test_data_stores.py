"""Trajectory and preference stores: round trips bit-for-bit, and every corruption is a named DatasetError."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from prefdiff.data import DatasetError
from prefdiff.data.atomic import atomic_dir, atomic_write_json, sha256_file
from prefdiff.data.preferences import PreferencePair, PreferenceStore, write_preferences
from prefdiff.data.trajectories import TrajectoryGroup, TrajectoryStore, TrajectoryWriter

T, LATENT = 4, (4, 3, 3)  # steps, (C, H, W)
PROMPTS = ["cat", "dog", "horse"]


def make_group(i: int, g: int, gen: torch.Generator) -> TrajectoryGroup:
    rng = np.random.default_rng(i)
    return TrajectoryGroup(
        prompt=PROMPTS[i],
        seed=100 + i,
        latents=torch.randn(g, T + 1, *LATENT, generator=gen),
        log_probs=torch.randn(g, T, generator=gen),
        timesteps=torch.tensor([750, 500, 250, 0], dtype=torch.int64),
        images=[Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(g)],
    )


def write_store(out: Path, g: int = 3, shard_size: int = 4) -> list[TrajectoryGroup]:
    gen = torch.Generator().manual_seed(0)
    groups = [make_group(i, g, gen) for i in range(3)]
    with TrajectoryWriter(out, shard_size=shard_size, model={"source": "test"}, params={"eta": 1.0}) as w:
        for grp in groups:
            w.add_group(grp)
    return groups


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    out = tmp_path / "data" / "trajectories"
    write_store(out)
    return out


def no_temp_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# -- trajectory round trip -------------------------------------------------------------------------------
@pytest.mark.parametrize("g", [2, 3])
def test_trajectory_round_trip_bit_exact(tmp_path: Path, g: int) -> None:
    out = tmp_path / "traj"
    groups = write_store(out, g=g, shard_size=4)
    s = TrajectoryStore.open(out)
    n = 3 * g
    assert (s.num_images, s.num_groups, s.num_steps, s.images_per_group) == (n, 3, T, g)
    assert s.latent_shape == LATENT
    assert s.timesteps.tolist() == [750, 500, 250, 0] and s.timesteps.dtype == torch.int64
    # shard_size=4 over 6 or 9 images: shards of 4,2 / 4,4,1 (groups straddle shards)
    assert [sh["num_images"] for sh in s.index["shards"]] == ([4, 2] if g == 2 else [4, 4, 1])
    assert sorted(p.name for p in out.glob("shard-*.safetensors")) == [
        f"shard-{i:05d}.safetensors" for i in range(len(s.index["shards"]))
    ]
    lat, lp = s.load_all()
    assert lat.shape == (n, T + 1, *LATENT) and lat.dtype == torch.float32
    assert lp.shape == (n, T) and lp.dtype == torch.float32
    assert torch.equal(lat, torch.cat([x.latents for x in groups]))
    assert torch.equal(lp, torch.cat([x.log_probs for x in groups]))
    # requested order is honoured, across shards
    ids = [n - 1, 0, 4, 1]
    lat2, lp2 = s.load(ids)
    assert torch.equal(lat2, lat[ids]) and torch.equal(lp2, lp[ids])
    assert s.load([])[0].shape == (0, T + 1, *LATENT)
    assert [gr["prompt"] for gr in s.groups()] == PROMPTS
    assert [gr["image_ids"] for gr in s.groups()] == [list(range(k * g, (k + 1) * g)) for k in range(3)]
    assert [gr["seed"] for gr in s.groups()] == [100, 101, 102]
    assert s.prompt_of(g) == "dog" and s.prompt_of(n - 1) == "horse"
    # PNG round trip: pixels identical
    with Image.open(s.png_path(g + 1)) as im:
        assert np.array_equal(np.asarray(im), np.asarray(groups[1].images[1]))
    assert s.png_path(0) == out / "images" / "00000.png"
    assert s.index_sha256() == sha256_file(out / "index.json")
    assert s.index["model"] == {"source": "test"} and s.index["params"] == {"eta": 1.0}
    assert s.index["created_by"] == "prefdiff 0.1.0"
    with safe_open(str(out / "shard-00000.safetensors"), framework="pt") as f:
        assert f.metadata() == {"schema_version": "1"}
        assert f.get_tensor("image_ids").tolist() == [0, 1, 2, 3]
    with pytest.raises(IndexError, match="image_id 99"):
        s.load([99])
    assert no_temp_left(tmp_path)


def test_writer_rejects_inconsistent_group(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="images_per_group=3"):
        with TrajectoryWriter(tmp_path / "t", shard_size=2, model={}, params={}) as w:
            w.add_group(make_group(0, 3, gen))
            w.add_group(make_group(1, 2, gen))
    assert not (tmp_path / "t").exists() and no_temp_left(tmp_path)


def flip_byte(path: Path, offset_from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_in_shard_is_named(store_dir: Path) -> None:
    flip_byte(store_dir / "shard-00001.safetensors")
    with pytest.raises(DatasetError, match=r"shard-00001\.safetensors: sha256 mismatch.*re-run the sample stage"):
        TrajectoryStore.open(store_dir)


def test_truncated_shard(store_dir: Path) -> None:
    p = store_dir / "shard-00000.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(DatasetError, match=r"shard-00000\.safetensors: sha256 mismatch"):
        TrajectoryStore.open(store_dir)
    # without hashing, the safetensors parse / shape checks still catch it
    with pytest.raises(DatasetError, match=r"shard-00000\.safetensors: not a readable safetensors"):
        TrajectoryStore.open(store_dir, verify=False)


def test_deleted_shard(store_dir: Path) -> None:
    (store_dir / "shard-00002.safetensors").unlink()
    with pytest.raises(DatasetError, match=r"shard-00002\.safetensors: missing"):
        TrajectoryStore.open(store_dir, verify=False)


def test_modified_png(store_dir: Path) -> None:
    Image.new("RGB", (8, 8)).save(store_dir / "images" / "00004.png")
    with pytest.raises(DatasetError, match=r"images/00004\.png: sha256 mismatch"):
        TrajectoryStore.open(store_dir)


def edit_index(root: Path, **changes: object) -> None:
    idx = json.loads((root / "index.json").read_text())
    idx.update(changes)
    (root / "index.json").write_text(json.dumps(idx))


def test_wrong_schema_version(store_dir: Path) -> None:
    edit_index(store_dir, schema_version=2)
    with pytest.raises(DatasetError, match=r"index\.json: schema_version 2 found, supported: 1"):
        TrajectoryStore.open(store_dir)


def test_wrong_kind_missing_index_and_bad_json(store_dir: Path, tmp_path: Path) -> None:
    edit_index(store_dir, kind="prefdiff.preferences")
    with pytest.raises(DatasetError, match="kind 'prefdiff.preferences'"):
        TrajectoryStore.open(store_dir)
    (store_dir / "index.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"index\.json: not valid JSON"):
        TrajectoryStore.open(store_dir)
    with pytest.raises(DatasetError, match=r"index\.json: missing"):
        TrajectoryStore.open(tmp_path / "nowhere")


def test_shape_disagreeing_with_index(store_dir: Path) -> None:
    edit_index(store_dir, latent_shape=[4, 3, 2])
    with pytest.raises(DatasetError, match=r"shard-00000\.safetensors: tensor 'latents' is F32 \[4, 5, 4, 3, 3\]"):
        TrajectoryStore.open(store_dir, verify=False)


def test_crash_inside_writer_keeps_previous_dataset(store_dir: Path) -> None:
    before = {p.name: sha256_file(p) for p in store_dir.rglob("*") if p.is_file()}
    gen = torch.Generator().manual_seed(1)
    with pytest.raises(RuntimeError, match="sampler died"):
        with TrajectoryWriter(store_dir, shard_size=1, model={}, params={}) as w:
            w.add_group(make_group(0, 2, gen))  # already flushes 2 shards into the temp dir
            raise RuntimeError("sampler died")
    after = {p.name: sha256_file(p) for p in store_dir.rglob("*") if p.is_file()}
    assert after == before
    assert no_temp_left(store_dir.parent)
    assert TrajectoryStore.open(store_dir).num_images == 9


def test_rewrite_replaces_dataset(store_dir: Path) -> None:
    write_store(store_dir, g=2, shard_size=100)
    s = TrajectoryStore.open(store_dir)
    assert s.num_images == 6 and len(s.index["shards"]) == 1
    assert not (store_dir / "shard-00001.safetensors").exists()  # old files do not leak into the new one
    assert no_temp_left(store_dir.parent)


# -- atomic helpers -----------------------------------------------------------------------------------------
def test_atomic_dir_and_json(tmp_path: Path) -> None:
    final = tmp_path / "d"
    with atomic_dir(final) as tmp:
        assert tmp.name == f"d.tmp-{os.getpid()}"
        atomic_write_json(tmp / "a.json", {"x": 1})
    assert json.loads((final / "a.json").read_text()) == {"x": 1}
    with pytest.raises(KeyError):
        with atomic_dir(final) as tmp:
            (tmp / "b").write_text("half")
            raise KeyError("boom")
    assert sorted(p.name for p in final.iterdir()) == ["a.json"]
    assert no_temp_left(tmp_path)


# -- preference store -------------------------------------------------------------------------------------
def sample_pairs() -> list[PreferencePair]:
    return [
        PreferencePair(0, "cat", 1, 0, -1.25, -1.5, False),
        PreferencePair(0, "cat", 0, 2, -1.5, -1.5, True),
        PreferencePair(1, "dog", 3, 4, -0.5, -2.0, False),
    ]


JUDGE = {"name": "jpeg_compressibility", "higher_is_better": True, "params": {"quality": 95}}


def test_preference_round_trip(store_dir: Path, tmp_path: Path) -> None:
    traj = TrajectoryStore.open(store_dir)
    out = tmp_path / "data" / "preferences"
    idx_path = write_preferences(out, sample_pairs(), judge=JUDGE, trajectories=traj)
    assert idx_path == out / "index.json"
    p = PreferenceStore.open(out)
    assert p.pairs == sample_pairs()
    assert p.training_pairs() == [sample_pairs()[0], sample_pairs()[2]]
    assert (p.index["num_pairs"], p.index["num_ties"], p.index["num_groups"]) == (3, 1, 2)
    assert p.index["judge"] == JUDGE
    assert p.index["trajectories"]["index_sha256"] == traj.index_sha256()
    assert p.index["pairs_sha256"] == sha256_file(out / "pairs.jsonl")
    first = json.loads((out / "pairs.jsonl").read_text().splitlines()[0])
    assert first["winner_png"] == "images/00001.png" and first["loser_png"] == "images/00000.png"
    s = p.summary()
    assert (s.num_pairs, s.num_ties, s.num_training_pairs) == (3, 1, 2)
    assert s.mean_margin == pytest.approx((0.25 + 0.0 + 1.5) / 3)
    p.check_trajectories(traj)
    assert no_temp_left(out.parent)


def test_preference_sha_mismatch_and_bad_line(store_dir: Path, tmp_path: Path) -> None:
    traj = TrajectoryStore.open(store_dir)
    out = tmp_path / "prefs"
    write_preferences(out, sample_pairs(), judge=JUDGE, trajectories=traj)
    pairs_path = out / "pairs.jsonl"
    lines = pairs_path.read_text().splitlines()
    lines[1] = lines[1][:-3]  # break line 2
    pairs_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"pairs\.jsonl: sha256 mismatch"):
        PreferenceStore.open(out)
    # make the hash agree so the parser gets to the bad line
    edit_index(out, pairs_sha256=sha256_file(pairs_path))
    with pytest.raises(DatasetError, match=r"pairs\.jsonl:2: invalid JSON"):
        PreferenceStore.open(out)
    edit_index(out, schema_version=7)
    with pytest.raises(DatasetError, match="schema_version 7 found, supported: 1"):
        PreferenceStore.open(out)


def test_preference_missing_key_and_wrong_trajectories(store_dir: Path, tmp_path: Path) -> None:
    traj = TrajectoryStore.open(store_dir)
    out = tmp_path / "prefs"
    write_preferences(out, sample_pairs(), judge=JUDGE, trajectories=traj)
    pairs_path = out / "pairs.jsonl"
    rows = [json.loads(x) for x in pairs_path.read_text().splitlines()]
    del rows[2]["tie"]
    pairs_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    edit_index(out, pairs_sha256=sha256_file(pairs_path))
    with pytest.raises(DatasetError, match=r"pairs\.jsonl:3: missing key 'tie'"):
        PreferenceStore.open(out)
    # pairs labeled against another sample run are refused
    write_preferences(out, sample_pairs(), judge=JUDGE, trajectories=traj)
    prefs = PreferenceStore.open(out)
    write_store(store_dir, g=2)
    with pytest.raises(DatasetError, match="labeled against trajectories index"):
        prefs.check_trajectories(TrajectoryStore.open(store_dir))


# -- preference store: source kinds, schema 1 compatibility, image pairs over trajectories ------------------------
def test_preference_index_records_trajectory_source(store_dir: Path, tmp_path: Path) -> None:
    traj = TrajectoryStore.open(store_dir)
    out = tmp_path / "prefs"
    write_preferences(out, sample_pairs(), judge=JUDGE, trajectories=traj)
    idx = json.loads((out / "index.json").read_text())
    assert idx["schema_version"] == 3 and idx["source"] == {"kind": "trajectories"}
    assert PreferenceStore.open(out).source_kind == "trajectories"


def test_preference_schema_1_still_reads(store_dir: Path, tmp_path: Path) -> None:
    traj = TrajectoryStore.open(store_dir)
    out = tmp_path / "prefs"
    write_preferences(out, sample_pairs(), judge=JUDGE, trajectories=traj)
    idx = json.loads((out / "index.json").read_text())
    del idx["source"]
    idx["schema_version"] = 1  # exactly what prefdiff wrote before imported datasets existed
    (out / "index.json").write_text(json.dumps(idx))
    p = PreferenceStore.open(out)
    assert p.source_kind == "trajectories" and p.pairs == sample_pairs()
    assert p.training_pairs() == [sample_pairs()[0], sample_pairs()[2]]
    p.check_trajectories(traj)
    assert len(p.image_pairs(traj)) == 2
    # version 2 requires the source key; unknown kinds are refused
    idx["schema_version"] = 2
    (out / "index.json").write_text(json.dumps(idx))
    with pytest.raises(DatasetError, match=r"index\.json: missing key 'source'"):
        PreferenceStore.open(out)
    idx["source"] = {"kind": "trajectories"}  # a trajectory-backed dataset of version 2 reads as version 3
    (out / "index.json").write_text(json.dumps(idx))
    assert PreferenceStore.open(out).pairs == sample_pairs()
    idx["source"] = {"kind": "videos"}
    (out / "index.json").write_text(json.dumps(idx))
    with pytest.raises(DatasetError, match=r"source\.kind must be one of \['trajectories', 'images'\]"):
        PreferenceStore.open(out)
    idx["schema_version"] = 4
    (out / "index.json").write_text(json.dumps(idx))
    with pytest.raises(DatasetError, match="schema_version 4 found, supported: 1, 2, 3"):
        PreferenceStore.open(out)


def test_trajectory_backed_image_pairs(store_dir: Path, tmp_path: Path) -> None:
    traj = TrajectoryStore.open(store_dir)
    out = tmp_path / "prefs"
    write_preferences(out, sample_pairs(), judge=JUDGE, trajectories=traj)
    prefs = PreferenceStore.open(out)
    with pytest.raises(DatasetError, match=r"refer to the images of a trajectory store .*pass it"):
        prefs.image_pairs()
    pairs = prefs.image_pairs(traj)  # the tie (0, 2) is excluded; winner first
    assert [(p.prompt, p.winner_score, p.loser_score) for p in pairs] == [("cat", -1.25, -1.5), ("dog", -0.5, -2.0)]
    assert [(p.winner_image, p.loser_image) for p in pairs] == [
        (traj.png_path(1).resolve(), traj.png_path(0).resolve()),
        (traj.png_path(3).resolve(), traj.png_path(4).resolve()),
    ]
    assert all(p.winner_image.is_absolute() and p.winner_meta is None and p.loser_meta is None for p in pairs)
    # a PNG modified after the trajectory store was opened is caught by name
    Image.new("RGB", (8, 8)).save(store_dir / "images" / "00004.png")
    with pytest.raises(DatasetError, match=r"images/00004\.png: sha256 mismatch .*re-run the sample stage"):
        prefs.image_pairs(traj)
    assert len(prefs.image_pairs(traj, verify=False)) == 2
    # pairs labeled against another sample run are refused here too
    write_store(store_dir, g=2)
    with pytest.raises(DatasetError, match="labeled against trajectories index"):
        prefs.image_pairs(TrajectoryStore.open(store_dir))
