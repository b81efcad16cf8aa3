"""Pick-a-Pic parquet importer: round trip into an image-only preference dataset, and rejection of bad rows."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prefdiff.data import DatasetError
from prefdiff.data.atomic import sha256_file
from prefdiff.data.pickapic import ImportConfig, import_pickapic, resized_size
from prefdiff.data.image_shards import ShardImage
from prefdiff.data.preferences import ImagePair, PreferenceStore
from tests.pickapic_fixture import (
    BLUE, GREEN, RED, YELLOW, default_rows, encode, gradient, half_split, solid, write_synthetic_pickapic,
)

RES = 32


def pixels(image: ShardImage) -> np.ndarray:
    """The stored image's pixels, read from its shard as training reads it."""
    with Image.open(io.BytesIO(image.read_bytes())) as im:
        assert im.mode == "RGB"
        return np.asarray(im).copy()


def colour_at(image: ShardImage, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(c) for c in pixels(image)[y, x])


def decoded(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def reference(src: Image.Image, meta: dict, res: int = RES) -> np.ndarray:
    """Independent PIL recipe: resize short side (bilinear), flip if recorded, crop at the recorded corner."""
    w, h = src.size
    assert meta["original_size"] == (h, w)
    nw, nh = (res, int(res * h / w)) if w <= h else (int(res * w / h), res)
    im = src.resize((nw, nh), Image.Resampling.BILINEAR)
    if meta.get("hflip"):
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    top, left = meta["crop_top_left"]
    return np.asarray(im.crop((left, top, left + res, top + res)))


def quiet(_msg: str) -> None:
    pass


def run(src, out: Path, **cfg) -> object:
    return import_pickapic(src if isinstance(src, list) else [src], out, ImportConfig(resolution=RES, **cfg),
                           progress=quiet)


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def no_temp_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture
def parquet(tmp_path: Path) -> Path:
    return write_synthetic_pickapic(tmp_path / "src" / "train-00000.parquet", default_rows(), row_group_size=2)


# -- round trip -------------------------------------------------------------------------------------------------
def test_round_trip_center_crop(parquet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # file paths are recorded relative to the workspace root
    out = tmp_path / "data" / "preferences"
    lines: list[str] = []
    s = import_pickapic([parquet], out, ImportConfig(resolution=RES), progress=lines.append, progress_every=2,
                        batch_rows=2)
    assert (s.rows_read, s.pairs_written, s.ties_dropped, s.rows_rejected) == (5, 4, 1, 0)
    assert s.files == [{"path": "src/train-00000.parquet", "sha256": sha256_file(parquet), "rows_read": 5}]
    assert s.index_path == out / "index.json"
    # progress is reported as segments finish (one segment here: 5 rows < DEFAULT_SEGMENT_ROWS)
    assert [x for x in lines if x.startswith("read ")] == [x for x in lines if x.startswith("read 5/5 rows: 4 pairs")]
    assert len([x for x in lines if x.startswith("read ")]) == 1 and lines[-1].startswith("imported 4 pairs")

    store = PreferenceStore.open(out)
    assert store.source_kind == "images"
    idx = store.index
    assert idx["schema_version"] == 3 and idx["trajectories"] is None
    assert idx["judge"] == {"name": "pickapic_import", "higher_is_better": True, "params": {
        "resolution": RES, "crop": "center", "hflip": "none", "seed": 0, "max_pairs": None, "on_bad_row": "error",
        "shard_bytes": 128 * 2**20, "encoding": "raw", "jpeg_draft": False}}
    src = idx["source"]
    assert src["kind"] == "images" and src["importer"] == "pickapic"
    assert (src["resolution"], src["crop"], src["hflip"], src["seed"]) == (RES, "center", "none", 0)
    assert (src["rows_read"], src["pairs_written"], src["ties_dropped"], src["rows_rejected"]) == (5, 4, 1, 0)
    assert src["files"] == s.files and src["num_images"] == 8 and src["rejections"] == []
    assert (src["images_kept"], src["images_encoded"]) == (0, 8)  # no source image is 32x32 already
    assert "png_encoding" not in src  # transformed images stored raw (the default)
    (shard,) = idx["image_shards"]  # 8 small raw images: one shard
    assert shard["file"] == "images/shard-00000.safetensors" and (shard["first_image_id"], shard["num_images"]) == (0, 8)
    assert shard["sha256"] == sha256_file(out / shard["file"])
    assert sorted(p.name for p in (out / "images").iterdir()) == ["shard-00000.safetensors"]
    assert (idx["num_pairs"], idx["num_ties"], idx["num_groups"]) == (4, 0, 4)
    assert idx["pairs_sha256"] == sha256_file(out / "pairs.jsonl")

    assert [p.prompt for p in store.pairs] == ["a red square", "a yellow one", "gradients", "halves"]
    assert [(p.group_id, p.winner, p.loser) for p in store.pairs] == [(i, 2 * i, 2 * i + 1) for i in range(4)]
    assert all((p.winner_score, p.loser_score, p.tie) == (1.0, 0.0, False) for p in store.pairs)
    assert store.summary().num_training_pairs == 4
    rows = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert "winner_png" not in rows[1]

    pairs = store.image_pairs()
    assert len(pairs) == 4 and all(isinstance(p, ImagePair) for p in pairs)
    assert [(p.winner_image.position, p.loser_image.position) for p in pairs] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    for p, row in zip(pairs, rows):
        for image, sha in ((p.winner_image, row["winner_sha256"]), (p.loser_image, row["loser_sha256"])):
            assert image.shard == (out / shard["file"]).resolve() and image.sha256 == sha
            with Image.open(io.BytesIO(image.read_bytes())) as im:
                assert (im.format, im.size, im.mode) == ("PPM", (RES, RES), "RGB")
    # label 1: jpg_0 (red) wins; label 0: jpg_1 (yellow) wins over jpg_0 (green)
    assert colour_at(pairs[0].winner_image, 16, 16) == RED and colour_at(pairs[0].loser_image, 16, 16) == BLUE
    assert colour_at(pairs[1].winner_image, 16, 16) == YELLOW and colour_at(pairs[1].loser_image, 16, 16) == GREEN
    # SDXL micro-conditioning: original (h, w) and the center-crop corner in the resized image
    assert pairs[0].winner_meta == {"original_size": (60, 80), "crop_top_left": (0, 5)}  # 80x60 -> 42x32
    assert pairs[0].loser_meta == {"original_size": (70, 50), "crop_top_left": (6, 0)}  # 50x70 -> 32x44
    assert pairs[1].winner_meta == pairs[0].loser_meta and pairs[1].loser_meta == pairs[0].winner_meta
    assert rows[0]["winner_meta"] == {"original_size": [60, 80], "crop_top_left": [0, 5], "hflip": False}
    # center crop equals an independent PIL recipe, pixel for pixel (jpg_0 wins row 3, jpg_1 wins row 4)
    src_rows = default_rows()
    g0 = decoded(encode(src_rows[3]["jpg_0"]))
    expect = np.asarray(g0.resize(resized_size(80, 60, RES), Image.Resampling.BILINEAR).crop((5, 0, 5 + RES, RES)))
    assert np.array_equal(pixels(pairs[2].winner_image), expect)
    assert np.array_equal(pixels(pairs[2].loser_image), reference(decoded(encode(src_rows[3]["jpg_1"])),
                                                                    pairs[2].loser_meta))
    assert np.array_equal(pixels(pairs[3].winner_image), reference(decoded(encode(src_rows[4]["jpg_1"])),
                                                                     pairs[3].winner_meta))
    assert no_temp_left(out.parent)


def test_resize_size_matches_torchvision_rule() -> None:
    # torchvision Resize(int): short side -> size, long side int(size * long / short)
    assert resized_size(80, 60, 32) == (42, 32)
    assert resized_size(50, 70, 32) == (32, 44)
    assert resized_size(64, 64, 32) == (32, 32)
    assert resized_size(10, 30, 512) == (512, 1536)


def flip_rows(n: int) -> list[dict]:
    # distinct captions; each image: left half one colour, right half another (a flip swaps them)
    return [{"jpg_0": half_split(80, 60, RED, BLUE), "jpg_1": half_split(60, 80, GREEN, YELLOW),
             "label_0": 1.0, "caption": f"row {i}"} for i in range(n)]


def flipped(path: Path, left_colour: tuple[int, int, int]) -> bool:
    c = colour_at(path, 2, RES // 2)
    return c != left_colour


@pytest.mark.parametrize("mode", ["none", "joint", "per_image"])
def test_flip_modes(tmp_path: Path, mode: str) -> None:
    src = write_synthetic_pickapic(tmp_path / "f.parquet", flip_rows(24))
    out = tmp_path / "out"
    run(src, out, hflip=mode)
    pairs = PreferenceStore.open(out).image_pairs()
    w = [flipped(p.winner_image, RED) for p in pairs]
    lo = [flipped(p.loser_image, GREEN) for p in pairs]
    assert [p.winner_meta["hflip"] for p in _rows(out)] == w  # the recorded flag matches the pixels
    assert [p.loser_meta["hflip"] for p in _rows(out)] == lo
    if mode == "none":
        assert not any(w) and not any(lo)
    elif mode == "joint":
        assert w == lo and 0 < sum(w) < len(w)  # both or neither, and both happen
    else:
        assert 0 < sum(w) < len(w) and 0 < sum(lo) < len(lo)
        assert w != lo  # independent: some pairs flip only one image


class _Meta:
    def __init__(self, row: dict) -> None:
        self.winner_meta, self.loser_meta = row["winner_meta"], row["loser_meta"]


def _rows(out: Path) -> list[_Meta]:
    return [_Meta(json.loads(x)) for x in (out / "pairs.jsonl").read_text().splitlines()]


def test_random_crop_determinism_and_meta_reproduce_pixels(tmp_path: Path) -> None:
    rows = [{"jpg_0": gradient(80, 60, i), "jpg_1": gradient(50, 70, i + 1), "label_0": float(i % 2),
             "caption": f"g{i}"} for i in range(10)]
    src = write_synthetic_pickapic(tmp_path / "g.parquet", rows, image_format="JPEG")
    a, b, c, d = (tmp_path / x for x in "abcd")
    run(src, a, crop="random", hflip="per_image", seed=3)
    run(src, b, crop="random", hflip="per_image", seed=3)
    run(src, c, crop="random", hflip="per_image", seed=4)
    run(src, d, crop="center", hflip="per_image", seed=3)
    assert tree(a) == tree(b)  # same seed: byte-identical dataset (pairs, shards, index)
    corners = {k: [(r.winner_meta["crop_top_left"], r.loser_meta["crop_top_left"]) for r in _rows(k)]
               for k in (a, c, d)}
    assert corners[a] != corners[c]  # another seed crops elsewhere
    assert corners[a] != corners[d]  # random differs from center
    assert len({tuple(x) for pair in corners[a] for x in pair}) > 2
    # flips depend on (seed, row) only, not on the crop mode
    assert [r.winner_meta["hflip"] for r in _rows(a)] == [r.winner_meta["hflip"] for r in _rows(d)]
    # every stored image is the source resized, flipped as recorded, cropped at the recorded corner
    jpeg = [{k: decoded(encode(r[k], "JPEG")) for k in ("jpg_0", "jpg_1")} for r in rows]
    for k, p in enumerate(PreferenceStore.open(a).image_pairs()):
        win, lose = ("jpg_0", "jpg_1") if rows[k]["label_0"] == 1.0 else ("jpg_1", "jpg_0")
        r = _rows(a)[k]
        for path, key, meta in ((p.winner_image, win, r.winner_meta), (p.loser_image, lose, r.loser_meta)):
            m = {"original_size": tuple(meta["original_size"]), "crop_top_left": tuple(meta["crop_top_left"]),
                 "hflip": meta["hflip"]}
            assert np.array_equal(pixels(path), reference(jpeg[k][key], m))


def test_multiple_files_directory_and_max_pairs(tmp_path: Path) -> None:
    d = tmp_path / "shards"
    write_synthetic_pickapic(d / "b.parquet", default_rows()[:2], image_format="JPEG")
    write_synthetic_pickapic(d / "a.parquet", default_rows()[3:])
    (d / "README.md").write_text("not parquet")
    extra = write_synthetic_pickapic(tmp_path / "extra.parquet", default_rows()[2:3])  # a tie only
    s = run([d, extra, d / "a.parquet"], tmp_path / "out")  # a.parquet named twice: read once
    assert [Path(f["path"]).name for f in s.files] == ["a.parquet", "b.parquet", "extra.parquet"]  # dir sorted
    assert [f["rows_read"] for f in s.files] == [2, 2, 1]
    assert (s.rows_read, s.pairs_written, s.ties_dropped) == (5, 4, 1)
    assert [p.prompt for p in PreferenceStore.open(tmp_path / "out").pairs] == [
        "gradients", "halves", "a red square", "a yellow one"]
    s = run([d], tmp_path / "cut", max_pairs=3)
    assert (s.rows_read, s.pairs_written) == (3, 3)
    assert [f["rows_read"] for f in s.files] == [2, 1]
    assert PreferenceStore.open(tmp_path / "cut").index["source"]["max_pairs"] == 3


def test_no_sources_found(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no parquet files to import; looked for: .*empty/\*\.parquet \(0 found\)"
                                           r".*nowhere\.parquet \(does not exist\)"):
        run([tmp_path / "empty", tmp_path / "nowhere.parquet"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="crop='middle'"):
        ImportConfig(crop="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hflip='both'"):
        ImportConfig(hflip="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resolution=0"):
        ImportConfig(resolution=0)
    with pytest.raises(ValueError, match="on_bad_row='ignore'"):
        ImportConfig(on_bad_row="ignore")  # type: ignore[arg-type]


# -- rejection of bad input -----------------------------------------------------------------------------------
def bad_rows(kind: str) -> list[dict]:
    rows = default_rows()
    if kind == "label_0.7":
        rows[1]["label_0"] = 0.7
    elif kind == "label_none":
        rows[1]["label_0"] = None
    elif kind == "label_nan":
        rows[1]["label_0"] = float("nan")
    elif kind == "undecodable":
        rows[1]["jpg_1"] = b"\x89PNG\r\n\x1a\n this is not really an image"
    elif kind == "caption_none":
        rows[1]["caption"] = None
    return rows


@pytest.mark.parametrize("kind, pattern", [
    ("label_0.7", r"row 1 column 'label_0': value 0\.7 is not one of the allowed values 0, 0\.5, 1"),
    ("label_none", r"row 1 column 'label_0': value None is not one of the allowed values 0, 0\.5, 1"),
    ("label_nan", r"row 1 column 'label_0': value nan is not one of the allowed values"),
    ("undecodable", r"row 1 column 'jpg_1': cannot decode image \(36 bytes"),
    ("caption_none", r"row 1 column 'caption': caption is null"),
])
def test_bad_row_fails_whole_import_and_writes_nothing(tmp_path: Path, kind: str, pattern: str) -> None:
    src = write_synthetic_pickapic(tmp_path / "bad.parquet", bad_rows(kind))
    out = tmp_path / "data" / "preferences"
    with pytest.raises(DatasetError, match=r"bad\.parquet: " + pattern + r".*on_bad_row='skip'; nothing was written"):
        run(src, out)
    assert not out.exists() and no_temp_left(out.parent)
    # an existing dataset is left exactly as it was
    good = write_synthetic_pickapic(tmp_path / "good.parquet", default_rows())
    run(good, out)
    before = tree(out)
    with pytest.raises(DatasetError, match=pattern):
        run(src, out)
    assert tree(out) == before and no_temp_left(out.parent)


def test_missing_columns(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k not in ("caption", "jpg_1")} for r in default_rows()]
    src = write_synthetic_pickapic(tmp_path / "nocap.parquet", rows)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("previous")
    with pytest.raises(DatasetError, match=r"nocap\.parquet: missing column\(s\) \['jpg_1', 'caption'\]; a Pick-a-Pic"
                                           r"-style file needs \['jpg_0', 'jpg_1', 'label_0', 'caption'\]"):
        run(src, tmp_path / "out", on_bad_row="skip")  # a schema error is never skipped
    assert tree(tmp_path / "out") == {"keep.txt": sha256_file(tmp_path / "out" / "keep.txt")}


def test_wrong_column_type_and_unreadable_file(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "str.parquet"
    pq.write_table(pa.table({"jpg_0": ["not bytes"], "jpg_1": [b"x"], "label_0": [1.0], "caption": ["c"]}), str(src))
    with pytest.raises(DatasetError, match=r"str\.parquet: column 'jpg_0' has type string; expected binary"):
        run(src, tmp_path / "out")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"PAR1 definitely not parquet")
    with pytest.raises(DatasetError, match=r"junk\.parquet: not a readable parquet file"):
        run(junk, tmp_path / "out")


def test_skip_bad_rows_counts_them(tmp_path: Path) -> None:
    rows = default_rows() + bad_rows("label_0.7")[1:2] + bad_rows("undecodable")[1:2]
    rows.append({"jpg_0": b"garbage", "jpg_1": b"garbage", "label_0": 0.5, "caption": "tie, never decoded"})
    src = write_synthetic_pickapic(tmp_path / "mixed.parquet", rows)
    s = run(src, tmp_path / "out", on_bad_row="skip")
    assert (s.rows_read, s.pairs_written, s.ties_dropped, s.rows_rejected) == (8, 4, 2, 2)
    src_meta = PreferenceStore.open(tmp_path / "out").index["source"]
    assert (src_meta["rows_rejected"], src_meta["ties_dropped"], src_meta["on_bad_row"]) == (2, 2, "skip")
    assert len(src_meta["rejections"]) == 2
    assert "row 5 column 'label_0': value 0.7" in src_meta["rejections"][0]
    assert "row 6 column 'jpg_1': cannot decode image" in src_meta["rejections"][1]
    assert "0x" not in src_meta["rejections"][1]  # no memory address: re-imports give the same index
    first = (tmp_path / "out" / "index.json").read_bytes()
    run(src, tmp_path / "out", on_bad_row="skip")
    assert (tmp_path / "out" / "index.json").read_bytes() == first


def test_only_ties_is_an_error(tmp_path: Path) -> None:
    src = write_synthetic_pickapic(tmp_path / "ties.parquet", default_rows()[2:3] * 3)
    with pytest.raises(DatasetError, match=r"no decided pairs .*3 rows read, 3 ties dropped, 0 rejected"):
        run(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hf_image_struct_column(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "jpg_0": pa.array([{"bytes": encode(solid(40, 40, RED)), "path": None}], type=img_t),
        "jpg_1": pa.array([{"bytes": encode(solid(40, 40, BLUE)), "path": None}], type=img_t),
        "label_0": pa.array([0], type=pa.int64()),
        "caption": ["struct"],
    })
    pq.write_table(table, str(tmp_path / "s.parquet"))
    run(tmp_path / "s.parquet", tmp_path / "out")
    (p,) = PreferenceStore.open(tmp_path / "out").image_pairs()
    assert colour_at(p.winner_image, 5, 5) == BLUE and colour_at(p.loser_image, 5, 5) == RED


# -- the image-only store -------------------------------------------------------------------------------------
def test_image_store_refuses_trajectory_training_and_detects_corruption(parquet: Path, tmp_path: Path) -> None:
    out = tmp_path / "prefs"
    run(parquet, out)
    store = PreferenceStore.open(out)
    msg = (r"imported image pairs have no trajectories; D3PO/DDPO need sampled trajectories, use train\.method "
           r"diffusion_dpo, sft or reward_weighted")
    with pytest.raises(DatasetError, match=msg):
        store.training_pairs()
    with pytest.raises(DatasetError, match=msg):
        store.check_trajectories(object())  # type: ignore[arg-type]
    assert len(store.image_pairs(trajectories=None)) == 4
    # a corrupted shard is named: by its sha256 (verify), and by the image's own sha256 when it is read
    shard = out / "images" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # a byte inside the last image
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"images/shard-00000\.safetensors: sha256 mismatch \(.*index\.json says "
                                           r".*the shard is corrupt or was modified — re-import the dataset"):
        PreferenceStore.open(out).image_pairs()
    pairs = PreferenceStore.open(out).image_pairs(verify=False)  # structure only: the header is intact
    assert colour_at(pairs[0].winner_image, 5, 5) == RED  # an intact image still reads
    with pytest.raises(DatasetError, match=r"images/shard-00000\.safetensors: image 7 has sha256 .*pairs\.jsonl says "
                                           r".*the shard is corrupt or was modified — re-import the dataset"):
        pairs[3].loser_image.read_bytes()
    shard.write_bytes(bytes(data[:100]))  # truncated: the header no longer parses
    with pytest.raises(DatasetError, match=r"images/shard-00000\.safetensors: not a readable image shard"):
        PreferenceStore.open(out).image_pairs(verify=False)
    shard.unlink()
    with pytest.raises(DatasetError, match=r"images/shard-00000\.safetensors: image shard missing \(listed in "):
        PreferenceStore.open(out).image_pairs(verify=False)


def test_image_store_rejects_bad_rows_in_pairs_file(parquet: Path, tmp_path: Path) -> None:
    out = tmp_path / "prefs"
    run(parquet, out)
    pairs_path = out / "pairs.jsonl"

    def rewrite(edit) -> None:
        rows = [json.loads(x) for x in pairs_path.read_text().splitlines()]
        edit(rows[0])
        pairs_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        idx = json.loads((out / "index.json").read_text())
        idx["pairs_sha256"] = sha256_file(pairs_path)
        (out / "index.json").write_text(json.dumps(idx))

    rewrite(lambda r: r.update(loser_meta={"original_size": [0, 5]}))
    with pytest.raises(DatasetError, match=r"pairs\.jsonl:1: loser_meta="):
        PreferenceStore.open(out)
    rewrite(lambda r: r.update(loser_meta=None, winner_sha256="abc"))
    with pytest.raises(DatasetError, match=r"pairs\.jsonl:1: winner_sha256='abc'"):
        PreferenceStore.open(out)
    rewrite(lambda r: r.update(winner_sha256="0" * 64, winner=9))
    with pytest.raises(DatasetError, match=r"pairs\.jsonl: image ids \[9\] not in 0\.\.7"):
        PreferenceStore.open(out)


def test_image_store_rejects_bad_shard_lists(parquet: Path, tmp_path: Path) -> None:
    out = tmp_path / "prefs"
    run(parquet, out)
    good = json.loads((out / "index.json").read_text())

    def edit(change) -> None:
        idx = json.loads(json.dumps(good))
        change(idx)
        (out / "index.json").write_text(json.dumps(idx))

    edit(lambda i: i["image_shards"][0].update(file="../../etc/passwd"))
    with pytest.raises(DatasetError, match=r"image_shards\[0\]: file='\.\./\.\./etc/passwd' points outside"):
        PreferenceStore.open(out)
    edit(lambda i: i["image_shards"][0].update(num_images=7))
    with pytest.raises(DatasetError, match=r"image_shards hold 7 images; 4 pairs need 8"):
        PreferenceStore.open(out)
    edit(lambda i: i["image_shards"][0].update(first_image_id=1))
    with pytest.raises(DatasetError, match=r"image_shards\[0\]: first_image_id 1, expected 0"):
        PreferenceStore.open(out)
    edit(lambda i: i.pop("image_shards"))
    with pytest.raises(DatasetError, match=r"image_shards=None; an image-only dataset lists its shards"):
        PreferenceStore.open(out)


def test_schema_2_image_dataset_is_refused_with_a_clear_line(parquet: Path, tmp_path: Path) -> None:
    """What prefdiff wrote before shards (one PNG per image, schema_version 2) is named and refused."""
    out = tmp_path / "prefs"
    run(parquet, out)
    idx = json.loads((out / "index.json").read_text())
    idx["schema_version"] = 2
    del idx["image_shards"]
    (out / "index.json").write_text(json.dumps(idx))
    with pytest.raises(DatasetError, match=r"index\.json: an image-only dataset of schema_version 2 \(one PNG file per "
                                           r"image\) is no longer read; .* re-import it \(label\.source: pickapic"):
        PreferenceStore.open(out)
