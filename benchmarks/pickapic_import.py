"""Time the Pick-a-Pic import: the one-file-per-image path it replaced vs the sharded, parallel importer.

Builds a synthetic Pick-a-Pic-style parquet file (``jpg_0``, ``jpg_1``, ``label_0``, ``caption``) of real
JPEG-encoded photo-like images (smooth random colour fields with blobs, edges and sensor-like noise; 64
distinct images per size, cycled over the rows; one row in ten a tie), then imports it, repeatedly, with

- baseline ("old"): what ``prefdiff.data.pickapic`` did before shards, in one process, written out here
  so the comparison survives the old code: per decided row decode both images (``convert("RGB")``), apply
  the same transform (``transform_image``: resize, crop, flip), encode each as a PNG at PIL's default
  level, write it as its own file ``images/{id:06d}.png``, hash it, and append the row to pairs.jsonl;
- new: ``import_pickapic`` with ``--workers`` processes (images kept as stored when already at the target
  size and not flipped, else transformed once and stored as ``--encoding``: raw (default) or PNG;
  ``--jpeg-draft`` decodes JPEGs at a reduced scale first; each worker reads segments of ``--segment-rows``
  rows from the parquet and writes their safetensors shards itself).

First it prints per-image figures: CPU time and size of the two lossless encoders, CPU time of the
training loader decoding each, and how far ``jpeg_draft``'s pixels are from a full decode's.

Cases (``--cases``): ``at_target`` (sources already resolution x resolution, no flip: the new path keeps
every JPEG), ``at_target_flip`` (same, ``hflip: per_image``: about half transformed), ``larger`` (sources
1.5x the resolution, non-square: every image resized), ``double`` (sources 2x the resolution, square: every
image resized; the case ``--jpeg-draft`` speeds up). For each it prints the config, the median and min wall
seconds over ``--repeats``, rows/s of each, the ratio of the rows/s (the old path may import fewer rows,
``--old-rows``: its cost per row does not depend on the count), and the same on CPU seconds: the process's
own plus its worker processes' (``RUSAGE_CHILDREN``: the pool's workers are joined before the import
returns), which a shared machine's load moves much less than wall seconds, and the main process's share
of it (starting the pool, renaming the segments' shards into one sequence, writing pairs.jsonl: serial, so
it bounds the rows/s any number of workers can reach; the workers read the parquet and write the shards). The machine's load average is printed before and after.

Usage: python -m benchmarks.pickapic_import [--rows 400] [--old-rows N] [--size 512] [--workers N] [--repeats 3]
       [--cases at_target,at_target_flip,larger,double] [--batch-rows 64] [--segment-rows 50]
       [--encoding raw|png] [--jpeg-draft]
       [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

CASES = {  # name: (source size as a multiple of the resolution (w, h), hflip)
    "at_target": ((1.0, 1.0), "none"),
    "at_target_flip": ((1.0, 1.0), "per_image"),
    "larger": ((1.5, 1.25), "none"),
    "double": ((2.0, 2.0), "none"),
}
DISTINCT_IMAGES = 64


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: low-frequency colour field, a few soft blobs and hard edges, fine noise."""
    r = np.random.default_rng(seed)
    small = r.uniform(0, 255, (6, 6, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    y, x = np.mgrid[0:height, 0:width]
    for _ in range(5):  # blobs with sharp borders: edges a JPEG and a PNG must spend bits on
        cx, cy, rad = r.uniform(0, width), r.uniform(0, height), r.uniform(0.05, 0.25) * min(width, height)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < rad**2
        base[mask] = 0.5 * base[mask] + 0.5 * r.uniform(0, 255, 3)
    texture = Image.fromarray(r.normal(128, 40, (height, width, 3)).clip(0, 255).astype(np.uint8))
    texture = np.asarray(texture.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32) - 128
    noisy = base + 0.6 * texture + r.normal(0, 3, (height, width, 3))
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_parquet(path: Path, rows: int, width: int, height: int) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [jpeg(photo(width, height, seed)) for seed in range(DISTINCT_IMAGES)]
    labels = [0.5 if i % 10 == 9 else float(i % 2) for i in range(rows)]
    table = pa.table({
        "jpg_0": pa.array([images[(2 * i) % DISTINCT_IMAGES] for i in range(rows)], type=pa.binary()),
        "jpg_1": pa.array([images[(2 * i + 1) % DISTINCT_IMAGES] for i in range(rows)], type=pa.binary()),
        "label_0": pa.array(labels, type=pa.float64()),
        "caption": [f"a photo {i}" for i in range(rows)],
    })
    pq.write_table(table, str(path), row_group_size=1000)
    return {"jpeg_bytes_mean": int(np.mean([len(b) for b in images])), "ties": labels.count(0.5)}


def old_import(parquet: Path, out: Path, config) -> int:
    """The pre-shard importer's work, one process: decode, transform, PNG (default level), a file per image."""
    import pyarrow.parquet as pq

    from prefdiff.data.pickapic import REQUIRED_COLUMNS, _row_uniforms, transform_image

    (out / "images").mkdir(parents=True)
    pairs = 0
    row = 0
    with open(out / "pairs.jsonl", "wb") as rows_file:
        for batch in pq.ParquetFile(str(parquet)).iter_batches(batch_size=64, columns=list(REQUIRED_COLUMNS)):
            cols = {name: batch.column(name).to_pylist() for name in REQUIRED_COLUMNS}
            for b0, b1, label, caption in zip(cols["jpg_0"], cols["jpg_1"], cols["label_0"], cols["caption"]):
                u = _row_uniforms(config.seed, row)
                row += 1
                if label == 0.5:
                    continue
                flips = {"none": (False, False), "per_image": (u[4] < 0.5, u[5] < 0.5)}[config.hflip]
                images = []
                for k, (data, flip) in enumerate(((b0, flips[0]), (b1, flips[1]))):
                    with Image.open(io.BytesIO(data)) as im:
                        im.load()
                        image = im.convert("RGB")
                    images.append(transform_image(image, config, u_top=u[2 * k], u_left=u[2 * k + 1], flip=bool(flip)))
                if label == 0.0:  # winner first
                    images.reverse()
                record = {"prompt": caption}
                for side, (img, meta) in zip(("winner", "loser"), images):
                    buf = io.BytesIO()
                    img.save(buf, format="PNG")
                    png = buf.getvalue()
                    name = f"images/{2 * pairs + (side == 'loser'):06d}.png"
                    with open(out / name, "wb") as f:
                        f.write(png)
                    record |= {f"{side}_png": name, f"{side}_sha256": hashlib.sha256(png).hexdigest(),
                               f"{side}_meta": meta}
                rows_file.write((json.dumps(record) + "\n").encode())
                pairs += 1
    return pairs


def new_import(parquet: Path, out: Path, config, workers: int, batch_rows: int, segment_rows: int) -> int:
    from prefdiff.data.pickapic import import_pickapic

    return import_pickapic([parquet], out, config, workers=workers, progress=None, batch_rows=batch_rows,
                           segment_rows=segment_rows).pairs_written


def encoders(size: int, samples: int = 4) -> str:
    """CPU ms per image (best of 3, process time) and bytes: PIL's default PNG vs ``encode_png``, on photos."""
    from prefdiff.data.pickapic import encode_png

    def pil_png(image: Image.Image) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    cols = []
    for name, fn in (("PIL PNG default", pil_png), ("encode_png", encode_png)):
        ms, size_b = [], []
        for seed in range(samples):
            image = photo(size, size, 1000 + seed)
            best = min(_cpu(lambda: fn(image)) for _ in range(3))
            ms.append(best * 1000)
            size_b.append(len(fn(image)))
        cols.append(f"{name}: {statistics.median(ms):.1f} ms CPU, {statistics.median(size_b) / 1024:.0f} KiB")
    return "; ".join(cols)


def decoders(size: int, samples: int = 4) -> str:
    """CPU ms to decode one stored ``size`` px image as the training loader does: raw (PPM) vs ``encode_png``."""
    from prefdiff.data.pickapic import encode_png, encode_raw

    def load(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))

    cols = []
    for name, fn in (("raw", encode_raw), ("encode_png", encode_png)):
        stored = [fn(photo(size, size, 1000 + k)) for k in range(samples)]
        ms = [min(_cpu(lambda: load(data)) for _ in range(3)) * 1000 for data in stored]
        cols.append(f"{name}: {statistics.median(ms):.1f} ms CPU")
    return "; ".join(cols)


def draft_difference(size: int, samples: int = 4) -> str:
    """|pixel difference| (levels of 255) between ``jpeg_draft`` and the full decode, on 2x-size photo JPEGs."""
    from prefdiff.data.pickapic import ImportConfig, stored_image

    diffs = []
    for k in range(samples):
        data = jpeg(photo(2 * size, 2 * size, 2000 + k))
        out = []
        for draft in (False, True):
            stored, _, _ = stored_image(data, ImportConfig(resolution=size, jpeg_draft=draft), u_top=0.0, u_left=0.0,
                                        flip=False, where="benchmark")
            with Image.open(io.BytesIO(stored)) as im:
                out.append(np.asarray(im.convert("RGB"), dtype=np.int16))
        diffs.append(np.abs(out[0] - out[1]).ravel())
    d = np.concatenate(diffs)
    return (f"mean {d.mean():.2f}, 99.9th percentile {np.percentile(d, 99.9):.0f}, max {d.max()} "
            f"({samples} images)")


def _cpu(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def _rusage_cpu() -> tuple[float, float]:
    """CPU seconds (user + system) of this process, and of its children that have been waited for."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def timed(fn, out: Path) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process and the worker processes it started and joined, CPU
    seconds of this process alone)."""
    if out.exists():
        shutil.rmtree(out)
    (own0, kids0), t0 = _rusage_cpu(), time.perf_counter()
    fn(out)
    wall = time.perf_counter() - t0
    own1, kids1 = _rusage_cpu()
    return wall, own1 - own0 + kids1 - kids0, own1 - own0


def dir_stats(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main(argv: list[str] | None = None) -> int:
    from prefdiff.data.pickapic import ImportConfig, default_workers

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--old-rows", type=int, default=None,
                    help="rows the old path imports (default: --rows); it costs the same per row at any count, "
                         "so fewer rows measure its rate in less time, while the new path needs many rows to "
                         "amortise starting its worker processes")
    ap.add_argument("--size", type=int, default=512, help="import resolution (px)")
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--batch-rows", type=int, default=64)
    ap.add_argument("--segment-rows", type=int, default=50,
                    help="rows per segment, the unit a worker imports into shards of its own (the importer's "
                         "default, 512, would make a 200-row import one segment, one busy worker; a segment's "
                         "cost per row does not depend on its length beyond its last, partial shard)")
    ap.add_argument("--encoding", choices=("raw", "png"), default=ImportConfig.encoding,
                    help="how the new path stores transformed images (label.pickapic.encoding)")
    ap.add_argument("--jpeg-draft", action="store_true", help="label.pickapic.jpeg_draft: true for the new path")
    ap.add_argument("--keep", type=Path, default=None, help="build the data here and keep it (default: a temp dir)")
    args = ap.parse_args(argv)
    old_rows = args.old_rows or args.rows

    work = args.keep or Path(tempfile.mkdtemp(prefix="pickapic_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"config: rows={args.rows} old_rows={old_rows} resolution={args.size} workers={args.workers} repeats={args.repeats} "
          f"batch_rows={args.batch_rows} segment_rows={args.segment_rows} encoding={args.encoding} jpeg_draft={args.jpeg_draft} "
          f"cpus_usable={default_workers()} os.cpu_count={os.cpu_count()} "
          f"load_avg_before={os.getloadavg()}")
    print(f"encoders, {args.size} px photo, median of 4 images: {encoders(args.size)}")
    print(f"training-time decode of a stored {args.size} px photo, median of 4: {decoders(args.size)}")
    print(f"jpeg_draft vs full decode, {2 * args.size} px photo JPEGs -> {args.size} px: "
          f"{draft_difference(args.size)}")
    try:
        for case in args.cases.split(","):
            (fw, fh), hflip = CASES[case]
            w, h = int(args.size * fw), int(args.size * fh)
            parquet, old_parquet = work / f"{case}.parquet", work / f"{case}_old.parquet"
            info = write_parquet(parquet, args.rows, w, h)
            write_parquet(old_parquet, old_rows, w, h)  # the same rows, the first old_rows of them
            config = ImportConfig(resolution=args.size, hflip=hflip)
            new_config = ImportConfig(resolution=args.size, hflip=hflip, encoding=args.encoding,
                                      jpeg_draft=args.jpeg_draft)
            old_t, new_t, old_c, new_c, main_c = [], [], [], [], []
            for _ in range(args.repeats):  # interleaved, so a load change hits both paths alike
                wall, cpu, _ = timed(lambda out: old_import(old_parquet, out, config), work / f"{case}_old")
                old_t.append(wall)
                old_c.append(cpu)
                wall, cpu, main_cpu = timed(lambda out: new_import(parquet, out, new_config, args.workers,
                                                                   args.batch_rows, args.segment_rows),
                                    work / f"{case}_new")
                new_t.append(wall)
                new_c.append(cpu)
                main_c.append(main_cpu)
            old_files, old_bytes = dir_stats(work / f"{case}_old")
            new_files, new_bytes = dir_stats(work / f"{case}_new")
            kept = json.loads((work / f"{case}_new" / "index.json").read_text())["source"]["images_kept"]
            o, n = statistics.median(old_t), statistics.median(new_t)
            oc, nc = statistics.median(old_c), statistics.median(new_c)
            print(f"\ncase {case}: {args.rows} rows (one in ten a tie) of {w}x{h} JPEG (mean "
                  f"{info['jpeg_bytes_mean']} bytes) -> {args.size}px, hflip {hflip}")
            print(f"  old (1 process, PNG per file), {old_rows} rows: median {o:7.2f} s  min {min(old_t):7.2f} s  "
                  f"{old_rows / o:7.1f} rows/s  ({old_files} files, {old_bytes / 2**20:.1f} MiB)  "
                  f"runs {[round(t, 2) for t in old_t]}")
            print(f"  new ({args.workers} workers, shards), {args.rows} rows: median {n:7.2f} s  min {min(new_t):7.2f} s  "
                  f"{args.rows / n:7.1f} rows/s  ({new_files} files, {new_bytes / 2**20:.1f} MiB, {kept} of "
                  f"{2 * (args.rows - info['ties'])} images kept as stored)  runs {[round(t, 2) for t in new_t]}")
            print(f"  speed-up (new rows/s at its median / old rows/s at its median): "
                  f"{(args.rows / n) / (old_rows / o):.1f}x")
            print(f"  CPU seconds (own + joined workers): old median {oc:.2f} s ({old_rows / oc:.1f} rows per CPU-s, "
                  "runs "
                  f"{[round(t, 2) for t in old_c]}); new median {nc:.2f} s ({args.rows / nc:.1f} rows per CPU-s, runs "
                  f"{[round(t, 2) for t in new_c]}); rows per CPU-s ratio {(args.rows / nc) / (old_rows / oc):.1f}x; "
                  f"the same x{args.workers} (the wall ratio if {args.workers} cores were fully used): "
                  f"{args.workers * (args.rows / nc) / (old_rows / oc):.1f}x")
            mc = statistics.median(main_c)
            print(f"  of the new path's CPU, the main process (starts the workers, renames the segments' shards, "
                  f"writes pairs.jsonl; serial): median {mc:.2f} s ({100 * mc / nc:.0f}%): whatever the workers, it "
                  f"caps the import at {args.rows / mc:.0f} rows/s on this CPU (fixed costs included)")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nload_avg_after={os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
