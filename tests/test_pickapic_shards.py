"""Pick-a-Pic import at scale: images kept byte for byte when no transform changes them, transformed ones
stored raw or as PNG (both lossless), JPEGs optionally decoded at reduced scale, shards whose bytes do not
depend on the number of worker processes, and imported pairs read from their shards by training and
evaluation."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prefdiff.data import DatasetError
from prefdiff.data.atomic import sha256_file
from prefdiff.data.pickapic import ImportConfig, encode_png, encode_raw, import_pickapic, transform_image
from prefdiff.data.preferences import PreferenceStore
from tests.pickapic_fixture import RED, default_rows, encode, gradient, half_split, write_synthetic_pickapic

RES = 32


def quiet(_msg: str) -> None:
    pass


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert("RGB") if im.mode != "RGB" else im.copy()


def mixed_rows(n: int) -> list[dict]:
    """Per row: jpg_0 a JPEG already RES x RES (kept unless flipped), jpg_1 a larger JPEG (always transformed;
    every other one at least twice RES, which ``jpeg_draft`` decodes at half scale); every fifth row a tie,
    labels alternate."""
    rows = []
    for i in range(n):
        size = (48 + i % 3, 40) if i % 2 else (2 * RES + 5 + i % 3, 2 * RES + 1)
        rows.append({"jpg_0": encode(gradient(RES, RES, i), "JPEG", quality=90),
                     "jpg_1": encode(gradient(*size, i + 7), "JPEG", quality=90),
                     "label_0": 0.5 if i % 5 == 4 else float(i % 2), "caption": f"row {i}"})
    return rows


@pytest.mark.parametrize("encoder,fmt", [(encode_png, "PNG"), (encode_raw, "PPM")])
@pytest.mark.parametrize("size", [(1, 1), (3, 1), (1, 4), (37, 23), (64, 64)])
def test_encoders_are_lossless(size: tuple[int, int], encoder, fmt: str) -> None:
    rng = np.random.default_rng(size[0] * 100 + size[1])
    noise = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)  # every residual, overflow included
    for pixels in (noise, np.asarray(gradient(*size, 3))):
        data = encoder(Image.fromarray(pixels))
        with Image.open(io.BytesIO(data)) as im:
            assert (im.format, im.mode, im.size) == (fmt, "RGB", size)
            assert np.array_equal(np.asarray(im), pixels)
    assert encoder(Image.fromarray(noise)) == encoder(Image.fromarray(noise.copy()))
    if encoder is encode_raw:  # 15 header bytes for this size class, then the pixels as they are
        assert data == b"P6\n%d %d\n255\n" % size + pixels.tobytes()


def test_images_at_the_target_size_are_kept_byte_for_byte(tmp_path: Path) -> None:
    rows = mixed_rows(10)
    src = write_synthetic_pickapic(tmp_path / "m.parquet", rows)
    for crop in ("center", "random"):  # a RES x RES image has one crop either way: itself
        out = tmp_path / crop
        s = import_pickapic([src], out, ImportConfig(resolution=RES, crop=crop, seed=5), progress=quiet)
        assert (s.pairs_written, s.images_kept) == (8, 8)  # 2 ties; every jpg_0 kept, every jpg_1 re-encoded
        store = PreferenceStore.open(out)
        assert (store.index["source"]["images_kept"], store.index["source"]["images_encoded"]) == (8, 8)
        decided = [r for r in rows if r["label_0"] != 0.5]
        for p, r in zip(store.image_pairs(), decided):
            first, second = (p.winner_image, p.loser_image) if r["label_0"] == 1.0 else (p.loser_image, p.winner_image)
            meta = p.winner_meta if r["label_0"] == 1.0 else p.loser_meta
            assert first.read_bytes() == r["jpg_0"]  # verbatim: the source's JPEG
            assert meta == {"original_size": (RES, RES), "crop_top_left": (0, 0)}
            stored = second.read_bytes()
            assert stored != r["jpg_1"] and stored.startswith(b"P6\n")  # transformed, stored raw
            # the kept bytes decode to exactly what the transform would have stored
            cfg = ImportConfig(resolution=RES, crop=crop)
            expect, _ = transform_image(decode(r["jpg_0"]), cfg, u_top=0.3, u_left=0.7, flip=False)
            assert np.array_equal(np.asarray(decode(first.read_bytes())), np.asarray(expect))


def test_flipped_or_non_rgb_images_are_transformed(tmp_path: Path) -> None:
    grey = encode(gradient(RES, RES, 1).convert("L"), "JPEG")  # right size, but mode L: converted to RGB
    rows = [{"jpg_0": encode(half_split(RES, RES, RED, (0, 0, 255)), "PNG"), "jpg_1": grey, "label_0": 1.0,
             "caption": f"r{i}"} for i in range(16)]
    src = write_synthetic_pickapic(tmp_path / "f.parquet", rows)
    s = import_pickapic([src], tmp_path / "out", ImportConfig(resolution=RES, hflip="per_image"), progress=quiet)
    pairs = PreferenceStore.open(tmp_path / "out").image_pairs()
    rows_json = [json.loads(x) for x in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    flipped = [r["winner_meta"]["hflip"] for r in rows_json]
    assert 0 < sum(flipped) < len(flipped)
    for p, was_flipped in zip(pairs, flipped):
        data = p.winner_image.read_bytes()
        assert (data == rows[0]["jpg_0"]) == (not was_flipped)  # unflipped PNGs kept, flipped ones not
        assert decode(data).getpixel((1, 1)) == ((0, 0, 255) if was_flipped else RED)
        assert p.loser_image.read_bytes() != grey
        assert decode(p.loser_image.read_bytes()).mode == "RGB"
    assert s.images_kept == len(flipped) - sum(flipped)


@pytest.mark.parametrize("encoding,draft", [("raw", False), ("png", True)])
def test_shards_are_the_same_bytes_for_any_number_of_workers(tmp_path: Path, encoding: str, draft: bool) -> None:
    rows = mixed_rows(24)
    rows[7]["jpg_1"] = b"not an image"  # rejected (skip) the same way in both runs
    src = write_synthetic_pickapic(tmp_path / "m.parquet", rows, row_group_size=5)
    cfg = ImportConfig(resolution=RES, crop="random", hflip="per_image", seed=11, on_bad_row="skip",
                       shard_bytes=4000, encoding=encoding, jpeg_draft=draft)
    runs = {}
    for workers in (1, 2):  # segments of 7 rows cut across the file's row groups of 5: 4 segments, the last 3 rows
        out = tmp_path / f"w{workers}"
        runs[workers] = import_pickapic([src], out, cfg, workers=workers, batch_rows=3, segment_rows=7, progress=quiet)
    assert tree(tmp_path / "w1") == tree(tmp_path / "w2")  # shards, pairs.jsonl, index.json
    idx = json.loads((tmp_path / "w1" / "index.json").read_text())
    shards = idx["image_shards"]
    assert len(shards) > 4  # small shards: the boundaries were exercised, within and between segments
    assert [s["file"] for s in shards] == [f"images/shard-{i:05d}.safetensors" for i in range(len(shards))]
    assert sorted(p.name for p in (tmp_path / "w2" / "images").iterdir()) == [s["file"][7:] for s in shards]
    assert [s["first_image_id"] for s in shards] == list(np.cumsum([0] + [s["num_images"] for s in shards[:-1]]))
    full = [s["num_bytes"] >= 4000 for s in shards]
    assert 1 < full.count(False) <= 4  # a segment's last shard may be partial: at most one per segment
    pairs = PreferenceStore.open(tmp_path / "w2").image_pairs()
    for p in pairs:  # every image found in its shard: read_bytes checks it against its sha256 in pairs.jsonl
        assert p.winner_image.read_bytes() and p.loser_image.read_bytes()
    assert len({p.loser_image.shard for p in pairs}) == len(shards)
    assert runs[1].rows_rejected == runs[2].rows_rejected == 1 and runs[1].rows_read == 24
    # one segment (the default 512 rows): other shard boundaries, but the same pairs and the same image bytes
    one = import_pickapic([src], tmp_path / "one", cfg, workers=1, progress=quiet)
    assert (tmp_path / "one" / "pairs.jsonl").read_bytes() == (tmp_path / "w1" / "pairs.jsonl").read_bytes()
    assert [(p.winner_image.read_bytes(), p.loser_image.read_bytes()) for p in
            PreferenceStore.open(tmp_path / "one").image_pairs()] == [
            (p.winner_image.read_bytes(), p.loser_image.read_bytes()) for p in pairs]
    assert one.rows_rejected == 1 and len(json.loads((tmp_path / "one" / "index.json").read_text())["image_shards"]) < len(shards)
    # the pool stops where one process stops: pair 5 is in the second segment (rows 7-13); the segments run
    # ahead of the stop leave nothing behind
    cut = {w: import_pickapic([src], tmp_path / f"cut{w}", ImportConfig(resolution=RES, max_pairs=5), workers=w,
                              batch_rows=2, segment_rows=4, progress=quiet) for w in (1, 2)}
    assert (cut[1].rows_read, cut[1].pairs_written, cut[1].files) == (cut[2].rows_read, 5, cut[2].files)
    assert cut[1].rows_read == 6  # rows 0-5: a tie at row 4
    assert tree(tmp_path / "cut1") == tree(tmp_path / "cut2")
    assert not [p for p in (tmp_path / "cut2" / "images").iterdir() if not p.name.startswith("shard-")]


def test_a_bad_row_fails_the_same_with_workers(tmp_path: Path) -> None:
    rows = mixed_rows(12)
    rows[9]["label_0"] = 0.7
    rows[10]["jpg_0"] = b"garbage"
    src = write_synthetic_pickapic(tmp_path / "bad.parquet", rows)
    for workers in (1, 2):  # segments of 3 rows: the bad rows are in the fourth, after three good ones
        with pytest.raises(DatasetError, match=r"bad\.parquet: row 9 column 'label_0': value 0\.7 .*nothing was written"):
            import_pickapic([src], tmp_path / "out", ImportConfig(resolution=RES), workers=workers, batch_rows=2,
                            segment_rows=3, progress=quiet)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.*"))
        # max_pairs reached before the bad row, in its segment (6 pairs by row 6) or an earlier one: no error
        for max_pairs, segment_rows in ((6, 5), (6, 12), (3, 3)):
            s = import_pickapic([src], tmp_path / "cut", ImportConfig(resolution=RES, max_pairs=max_pairs),
                                workers=workers, batch_rows=2, segment_rows=segment_rows, progress=quiet)
            assert (s.pairs_written, s.rows_read) == (max_pairs, {6: 7, 3: 3}[max_pairs])  # a tie at row 4


def test_import_refuses_a_bad_worker_count(tmp_path: Path) -> None:
    src = write_synthetic_pickapic(tmp_path / "a.parquet", default_rows())
    with pytest.raises(ValueError, match=r"workers=0: must be None or an int >= 1"):
        import_pickapic([src], tmp_path / "out", ImportConfig(resolution=RES), workers=0, progress=quiet)
    with pytest.raises(ValueError, match=r"shard_bytes=0: must be an int >= 1"):
        ImportConfig(shard_bytes=0)


def test_implicit_accuracy_reads_imported_pairs_from_their_shards(tmp_path: Path) -> None:
    """evaluate.implicit_pairs naming an imported dataset: the ELBO implicit accuracy reads its shards."""
    import torch

    from evaluation.evaluate import implicit_metrics
    from prefdiff.config import parse_params
    from prefdiff.models import lora
    from prefdiff.models.loading import load_pipeline
    from prefdiff.paths import Paths

    src = write_synthetic_pickapic(tmp_path / "test.parquet", default_rows(), image_format="JPEG")
    import_pickapic([src], tmp_path / "ws" / "data" / "pickapic_test", ImportConfig(resolution=64), progress=quiet)
    zero = load_pipeline("builtin:tiny-sd")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lora.add_lora(zero.unet, rank=4, alpha=4.0)  # B = 0: the trained model is the base
    lora.save_lora(zero.unet, tmp_path / "zero")
    params = parse_params({"evaluate": {"implicit_pairs": "data/pickapic_test", "implicit_draws": 1, "batch_size": 2}})
    out = implicit_metrics(params, Paths(tmp_path / "ws"), load_pipeline("builtin:tiny-sd"), tmp_path / "zero", quiet)
    assert out["pairs_source"] == "data/pickapic_test"
    assert out["implicit_acc_elbo_pairs"] == 4 and out["implicit_acc_elbo"] == 0.5  # identical models: all ties


def test_shard_file_is_what_safetensors_writes(tmp_path: Path) -> None:
    """The hand-laid shard (no copies of the images) is byte for byte ``safetensors.numpy.save``'s."""
    from safetensors.numpy import load_file, save

    from prefdiff.data.image_shards import ImageShardWriter

    images = [b"abc", b"", bytes(range(256)) * 3, b"x" * 13]
    writer = ImageShardWriter(tmp_path, rel_dir="images", shard_bytes=10**6)
    assert [writer.add(x) for x in images] == [0, 1, 2, 3]
    (entry,) = writer.close()
    data = (tmp_path / "shard-00000.safetensors").read_bytes()
    offsets = np.cumsum([0] + [len(x) for x in images]).astype(np.int64)
    tensors = {"bytes": np.frombuffer(b"".join(images), dtype=np.uint8), "offsets": offsets}
    assert data == save(tensors, metadata={"prefdiff_image_shard": "1"})
    assert entry["sha256"] == sha256_file(tmp_path / "shard-00000.safetensors") and entry["num_bytes"] == 784
    loaded = load_file(str(tmp_path / "shard-00000.safetensors"))
    assert np.array_equal(loaded["offsets"], offsets)


def test_raw_and_png_store_the_same_pixels_and_training_reads_them(tmp_path: Path) -> None:
    """Both encodings are lossless: the training loader gets exactly the transformed pixels (tolerance 0)."""
    from prefdiff.training.images import load_pixels

    rows = mixed_rows(8)
    src = write_synthetic_pickapic(tmp_path / "m.parquet", rows)
    got = {}
    for encoding in ("raw", "png"):
        out = tmp_path / encoding
        s = import_pickapic([src], out, ImportConfig(resolution=RES, encoding=encoding), progress=quiet)
        pairs = PreferenceStore.open(out).image_pairs()
        assert s.images_kept == len(pairs)  # every jpg_0 kept, every jpg_1 transformed
        stored = [p.winner_image.read_bytes() if r["label_0"] == 0.0 else p.loser_image.read_bytes()
                  for p, r in zip(pairs, [r for r in rows if r["label_0"] != 0.5])]
        assert all(x.startswith(b"P6\n" if encoding == "raw" else b"\x89PNG") for x in stored)
        got[encoding] = load_pixels([q for p in pairs for q in (p.winner_image, p.loser_image)])
        if encoding == "png":
            assert PreferenceStore.open(out).index["source"]["png_encoding"]
    assert torch_equal(got["raw"], got["png"])
    decided = [r for r in rows if r["label_0"] != 0.5]
    expect = []
    for r in decided:  # winner first; center crop, no flip; [-1, 1] as the official ToTensor + Normalize
        first, second = (r["jpg_0"], r["jpg_1"]) if r["label_0"] == 1.0 else (r["jpg_1"], r["jpg_0"])
        for data in (first, second):
            img, _ = transform_image(decode(data), ImportConfig(resolution=RES), u_top=0, u_left=0, flip=False)
            expect.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
    assert np.array_equal(got["raw"].numpy(), np.stack(expect))


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_jpeg_draft_decodes_large_jpegs_at_reduced_scale_within_a_stated_tolerance(tmp_path: Path) -> None:
    """``jpeg_draft``: JPEGs >= 2x the resized size decode at 1/2 scale; meta and every other image unchanged."""
    rows = mixed_rows(10)
    src = write_synthetic_pickapic(tmp_path / "m.parquet", rows)
    stores = {}
    for draft in (False, True):
        out = tmp_path / f"draft{draft}"
        import_pickapic([src], out, ImportConfig(resolution=RES, crop="random", seed=2, jpeg_draft=draft),
                        progress=quiet)
        stores[draft] = PreferenceStore.open(out)
    pairs = {d: stores[d].image_pairs() for d in stores}
    diffs_large = []
    for k, r in enumerate([r for r in rows if r["label_0"] != 0.5]):
        a, b = pairs[False][k], pairs[True][k]
        assert (a.winner_meta, a.loser_meta) == (b.winner_meta, b.loser_meta)  # the full-size source's geometry
        for ia, ib in ((a.winner_image, b.winner_image), (a.loser_image, b.loser_image)):
            pa = np.asarray(decode(ia.read_bytes()), dtype=np.int16)
            pb = np.asarray(decode(ib.read_bytes()), dtype=np.int16)
            if not np.array_equal(pa, pb):
                diffs_large.append(np.abs(pa - pb))
    n_large = sum(1 for r in rows if r["label_0"] != 0.5 and decode(r["jpg_1"]).width >= 2 * RES)
    assert len(diffs_large) == n_large > 0  # exactly the >= 2x JPEGs changed (the kept and < 2x ones did not)
    # Tolerance: libjpeg's 1/2-scale IDCT then a near-identity bilinear resize vs a full decode then a 2x
    # bilinear (antialiased) reduction: different low-pass filters, equal on flat areas. On these smooth
    # gradients the mean difference stays under 2 levels of 255 (README: mean 0.92, max 35 on photo-like
    # 1024 px JPEGs -> 512 px).
    assert all(d.mean() < 2.0 for d in diffs_large), [round(float(d.mean()), 2) for d in diffs_large]


def test_training_reads_imported_shards_without_hashing_them_whole(tmp_path: Path, monkeypatch) -> None:
    """Diffusion-DPO on an imported dataset: no shard is hashed whole before training (each image is checked
    against its own sha256 as it is read), so a corrupted image stops training naming its shard and position."""
    from prefdiff.config import parse_params
    from prefdiff.data import atomic
    from prefdiff.training.fit import fit

    src = write_synthetic_pickapic(tmp_path / "m.parquet", mixed_rows(8))
    out = tmp_path / "prefs"
    import_pickapic([src], out, ImportConfig(resolution=64), progress=quiet)
    params = parse_params({"train": {"method": "diffusion_dpo", "epochs": 1, "batch_size": 2, "lr": 0.01}})
    hashed: list[str] = []
    whole = atomic.sha256_file
    monkeypatch.setattr(atomic, "sha256_file", lambda path: hashed.append(Path(path).name) or whole(path))

    def train(name: str) -> None:
        fit(params, trajectories_dir=tmp_path / "none", preferences_dir=out, out_dir=tmp_path / name / "trained",
            checkpoint_dir=tmp_path / name / "ckpt", progress=quiet)

    train("clean")
    assert not [n for n in hashed if n.startswith("shard-")]
    shard = out / "images" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # a byte of the last image (7 pairs: pair 6's loser, image 13)
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"shard-00000\.safetensors: image 13 has sha256 .*pairs\.jsonl says"):
        train("corrupt")

