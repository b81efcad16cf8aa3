"""Pick-a-Pic import at scale: images kept byte for byte when no transform changes them, shards whose bytes do
not depend on the number of worker processes, and imported pairs read from their shards by evaluation."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prefdiff.data import DatasetError
from prefdiff.data.atomic import sha256_file
from prefdiff.data.pickapic import ImportConfig, encode_png, import_pickapic, transform_image
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
    """Per row: jpg_0 a JPEG already RES x RES (kept unless flipped), jpg_1 a larger JPEG (always transformed);
    every fifth row a tie, labels alternate."""
    rows = []
    for i in range(n):
        rows.append({"jpg_0": encode(gradient(RES, RES, i), "JPEG", quality=90),
                     "jpg_1": encode(gradient(48 + i % 3, 40, i + 7), "JPEG", quality=90),
                     "label_0": 0.5 if i % 5 == 4 else float(i % 2), "caption": f"row {i}"})
    return rows


@pytest.mark.parametrize("size", [(1, 1), (3, 1), (1, 4), (37, 23), (64, 64)])
def test_encode_png_is_lossless(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(size[0] * 100 + size[1])
    noise = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)  # every residual, overflow included
    for pixels in (noise, np.asarray(gradient(*size, 3))):
        data = encode_png(Image.fromarray(pixels))
        with Image.open(io.BytesIO(data)) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", size)
            assert np.array_equal(np.asarray(im), pixels)
    assert encode_png(Image.fromarray(noise)) == encode_png(Image.fromarray(noise.copy()))


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
            assert stored != r["jpg_1"] and stored.startswith(b"\x89PNG")  # transformed, encoded once
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


def test_shards_are_the_same_bytes_for_any_number_of_workers(tmp_path: Path) -> None:
    rows = mixed_rows(24)
    rows[7]["jpg_1"] = b"not an image"  # rejected (skip) the same way in both runs
    src = write_synthetic_pickapic(tmp_path / "m.parquet", rows, row_group_size=5)
    cfg = ImportConfig(resolution=RES, crop="random", hflip="per_image", seed=11, on_bad_row="skip",
                       shard_bytes=4000)
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        runs[workers] = import_pickapic([src], out, cfg, workers=workers, batch_rows=3, progress=quiet)
    assert tree(tmp_path / "w1") == tree(tmp_path / "w2")  # shards, pairs.jsonl, index.json
    idx = json.loads((tmp_path / "w1" / "index.json").read_text())
    assert len(idx["image_shards"]) > 2  # small shards: the boundaries were exercised
    assert all(s["num_bytes"] >= 4000 for s in idx["image_shards"][:-1])
    pairs = PreferenceStore.open(tmp_path / "w2").image_pairs()
    for p in pairs:  # every image found in its shard: read_bytes checks it against its sha256 in pairs.jsonl
        assert p.winner_image.read_bytes() and p.loser_image.read_bytes()
    assert len({p.loser_image.shard for p in pairs}) == len(idx["image_shards"])
    assert runs[1].rows_rejected == runs[2].rows_rejected == 1
    # the pool stops where one process stops
    cut = {w: import_pickapic([src], tmp_path / f"cut{w}", ImportConfig(resolution=RES, max_pairs=5), workers=w,
                              batch_rows=2, progress=quiet) for w in (1, 2)}
    assert (cut[1].rows_read, cut[1].files) == (cut[2].rows_read, cut[2].files)
    assert tree(tmp_path / "cut1") == tree(tmp_path / "cut2")


def test_a_bad_row_fails_the_same_with_workers(tmp_path: Path) -> None:
    rows = mixed_rows(12)
    rows[9]["label_0"] = 0.7
    rows[10]["jpg_0"] = b"garbage"
    src = write_synthetic_pickapic(tmp_path / "bad.parquet", rows)
    for workers in (1, 2):
        with pytest.raises(DatasetError, match=r"bad\.parquet: row 9 column 'label_0': value 0\.7 .*nothing was written"):
            import_pickapic([src], tmp_path / "out", ImportConfig(resolution=RES), workers=workers, batch_rows=2,
                            progress=quiet)
        assert not (tmp_path / "out").exists()


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
