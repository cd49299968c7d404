"""Benchmark: indexing gRefCOCO-sized annotations and loading samples (targets: < 10 s to index
about 260,000 expressions; >= 150 samples/s per worker at 480x480).

Usage::

    .venv/bin/python bench/bench_data.py                          # everything
    .venv/bin/python bench/bench_data.py --skip-index --samples 300

1. **Index.** Builds a gRefCOCO-sized annotation pair from the synthetic set's files (JSON only, no
   images): refs, images and annotations are replicated with fresh ids until there are 259,859
   expressions (the public gRefCOCO count) over about 20,000 images, and every image gets extra
   non-referred annotations so that instances.json holds about 200,000 polygons (RefCOCO's
   instances.json covers all COCO annotations of its images). Times ``GRefer(...)`` (JSON parsing,
   validation, index) and a ``GRESDataset`` over the train split without image checks.
2. **Throughput.** ``GRESDataset.__getitem__`` at 480x480 in one process (= one DataLoader
   worker), on the synthetic images (256x192 JPEG) and on COCO-sized copies (640x480 JPEG,
   quality 90, polygons scaled), plus a DataLoader with 2 workers, batch 16.

The machine is shared: medians of ``--repeats`` runs are printed; rerun when another process is
busy. Prints Markdown rows for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gres.data.dataset import GRESDataset, build_tokenizer, make_dataloader  # noqa: E402
from gres.data.grefer import GRefer  # noqa: E402
from gres.data.synthetic import generate  # noqa: E402

PUBLIC_EXPRESSIONS = 259_859  # gRefCOCO public JSON (spec §6.2)
IMAGES = 19_994
ANNOTATIONS = 196_000  # about all COCO annotations of the RefCOCO images


def source_root(root: str | None) -> Path:
    if root:
        return Path(root)
    default = Path(__file__).resolve().parents[1] / "data" / "synthetic"
    if (default / "manifest.json").is_file():
        return default
    tmp = Path(tempfile.gettempdir()) / "gres-bench-synthetic-tiny"
    generate(tmp, "tiny", seed=0, progress=False)
    return tmp


def make_big_annotations(src: Path, out: Path) -> dict:
    """Replicate the source JSONs to gRefCOCO's public size (see module docstring)."""
    refs = json.loads((src / "grefcoco" / "grefs(unc).json").read_text())
    inst = json.loads((src / "grefcoco" / "instances.json").read_text())
    n_src = sum(len(r["sentences"]) for r in refs)
    copies = -(-PUBLIC_EXPRESSIONS // n_src)
    imgs_src, anns_src = inst["images"], inst["annotations"]
    img_offset = max(i["id"] for i in imgs_src)
    ann_offset = max(a["id"] for a in anns_src)
    missing_anns = ANNOTATIONS - len(anns_src) * copies
    extra_per_image = max(0, round(missing_anns / (len(imgs_src) * copies)))
    images, anns, out_refs = [], [], []
    ann_id = ann_offset * copies
    ref_id = sent_id = 0
    for c in range(copies):
        for img in imgs_src:
            images.append({**img, "id": img["id"] + c * img_offset})
        for a in anns_src:
            anns.append({**a, "id": a["id"] + c * ann_offset,
                         "image_id": a["image_id"] + c * img_offset})
        for img in imgs_src:  # non-referred extra annotations (polygon of about 40 points)
            for _ in range(extra_per_image):
                ann_id += 1
                x, y = np.random.default_rng(ann_id).uniform(10, 100, size=2)
                t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
                poly = np.stack([x + 8 * np.cos(t), y + 8 * np.sin(t)], 1).round(2).ravel().tolist()
                anns.append({"id": ann_id, "image_id": img["id"] + c * img_offset, "category_id": 1,
                             "iscrowd": 0, "segmentation": [poly], "area": 201.0,
                             "bbox": [x - 8, y - 8, 16, 16]})
        for r in refs:
            ref_id += 1
            sents = []
            for s in r["sentences"]:
                sent_id += 1
                sents.append({**s, "sent_id": sent_id})
            ann_ids = r["ann_id"]
            if ann_ids != [-1]:
                ann_ids = [a + c * ann_offset for a in ann_ids]
            out_refs.append({**r, "ref_id": ref_id, "image_id": r["image_id"] + c * img_offset,
                             "ann_id": ann_ids, "sent_ids": [s["sent_id"] for s in sents],
                             "sentences": sents})
            if sent_id >= PUBLIC_EXPRESSIONS:
                break
        if sent_id >= PUBLIC_EXPRESSIONS:
            break
    (out / "grefcoco").mkdir(parents=True, exist_ok=True)
    (out / "grefcoco" / "grefs(unc).json").write_text(json.dumps(out_refs))
    inst_out = {"images": images, "annotations": anns, "categories": inst["categories"]}
    (out / "grefcoco" / "instances.json").write_text(json.dumps(inst_out))
    return {"expressions": sent_id, "refs": len(out_refs), "images": len(images),
            "annotations": len(anns),
            "mb": round(sum((out / "grefcoco" / f).stat().st_size for f in
                            ("grefs(unc).json", "instances.json")) / 1e6, 1)}


def bench_index(src: Path, repeats: int) -> list[str]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        info = make_big_annotations(src, out)
        times, ds_times = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            refer = GRefer(out)
            times.append(time.perf_counter() - t)
            t = time.perf_counter()
            ds = GRESDataset(out, "train", refer=refer, tokenizer=TOKENIZER, check_images=False)
            ds_times.append(time.perf_counter() - t)
            del refer
        print(f"index: {info}; GRefer median {statistics.median(times):.2f} s "
              f"(best {min(times):.2f}); GRESDataset(train, {len(ds)} samples) "
              f"{statistics.median(ds_times):.2f} s")
        return [f"| index {info['expressions']:,} expressions, {info['images']:,} images, "
                f"{info['annotations']:,} annotations ({info['mb']} MB JSON) | "
                f"{statistics.median(times):.2f} s | {min(times):.2f} s | GRESDataset(train): "
                f"{statistics.median(ds_times):.2f} s |"]


def coco_sized_copy(src: Path, out: Path, n_images: int = 60) -> Path:
    """A small layout with 640x480 JPEGs (quality 90) and polygons scaled accordingly."""
    refs = json.loads((src / "grefcoco" / "grefs(unc).json").read_text())
    inst = json.loads((src / "grefcoco" / "instances.json").read_text())
    keep = {r["image_id"] for r in refs if r["split"] == "val"}
    keep = set(sorted(keep)[:n_images])
    imgs = [dict(i) for i in inst["images"] if i["id"] in keep]
    (out / "images" / "train2014").mkdir(parents=True)
    (out / "grefcoco").mkdir()
    scale = {}
    for img in imgs:
        im = Image.open(src / "images" / "train2014" / img["file_name"]).convert("RGB")
        scale[img["id"]] = (640 / img["width"], 480 / img["height"])
        big = im.resize((640, 480), Image.BICUBIC)
        big.save(out / "images" / "train2014" / img["file_name"], quality=90)
        img["width"], img["height"] = 640, 480
    anns = []
    for a in inst["annotations"]:
        if a["image_id"] in keep:
            sx, sy = scale[a["image_id"]]
            seg = [[v * (sx if k % 2 == 0 else sy) for k, v in enumerate(p)]
                   for p in a["segmentation"]]
            x, y, w, h = a["bbox"]
            anns.append({**a, "segmentation": seg, "bbox": [x * sx, y * sy, w * sx, h * sy]})
    kept_refs = [r for r in refs if r["image_id"] in keep]
    (out / "grefcoco" / "grefs(unc).json").write_text(json.dumps(kept_refs))
    (out / "grefcoco" / "instances.json").write_text(json.dumps(
        {"images": imgs, "annotations": anns, "categories": inst["categories"]}))
    return out


def samples_per_second(ds: GRESDataset, n: int, repeats: int) -> tuple[float, float]:
    n = min(n, len(ds))
    idx = np.random.default_rng(0).permutation(len(ds))[:n].tolist()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in idx:
            ds[i]
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates), max(rates)


def loader_rate(ds: GRESDataset, n: int, workers: int) -> float:
    dl = make_dataloader(ds, 16, shuffle=True, num_workers=workers, seed=0)
    t, seen = None, 0
    for k, b in enumerate(dl):
        if k == 1:  # exclude worker start-up
            t, seen = time.perf_counter(), 0
        seen += len(b)
        if t is not None and seen >= n:
            break
    return seen / (time.perf_counter() - t)


def bench_throughput(src: Path, n: int, repeats: int, size: int) -> list[str]:
    rows = []
    ds = GRESDataset(src, "val", image_size=size, tokenizer=TOKENIZER)
    med, best = samples_per_second(ds, n, repeats)
    print(f"synthetic ({src.name}) @ {size}: {med:.0f} samples/s (best {best:.0f})")
    rows.append(f"| getitem, synthetic 256x192 JPEG -> {size}, 1 process | {med:.0f} /s "
                f"| {best:.0f} /s | |")
    with tempfile.TemporaryDirectory() as d:
        coco = coco_sized_copy(src, Path(d))
        ds2 = GRESDataset(coco, "val", image_size=size, tokenizer=TOKENIZER)
        med, best = samples_per_second(ds2, n, repeats)
        print(f"COCO-sized 640x480 @ {size}: {med:.0f} samples/s (best {best:.0f})")
        rows.append(f"| getitem, 640x480 JPEG -> {size}, 1 process | {med:.0f} /s "
                    f"| {best:.0f} /s | |")
    rate = loader_rate(ds, max(n, 400), workers=2)
    print(f"DataLoader 2 workers, batch 16 @ {size}: {rate:.0f} samples/s")
    rows.append(f"| DataLoader, 2 workers, batch 16, synthetic -> {size} | {rate:.0f} /s | | |")
    return rows


def main() -> None:
    global TOKENIZER
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help="synthetic dataset root (default: data/synthetic)")
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=480)
    ap.add_argument("--skip-index", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    src = source_root(args.root)
    TOKENIZER = build_tokenizer(None)
    print(f"source: {src}; load average {os.getloadavg()[0]:.1f}")
    rows = ["| what | median | best | note |", "|---|---|---|---|"]
    if not args.skip_index:
        rows += bench_index(src, args.repeats)
    rows += bench_throughput(src, args.samples, args.repeats, args.size)
    print("\n".join(rows))


TOKENIZER = None

if __name__ == "__main__":
    main()
