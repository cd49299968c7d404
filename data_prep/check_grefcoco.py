#!/usr/bin/env python
"""Check a gRefCOCO + COCO layout (spec §6.1) and write a manifest of what is there.

    python data_prep/check_grefcoco.py --root datasets
    python data_prep/check_grefcoco.py --root datasets --images sample --sample 500
    python data_prep/check_grefcoco.py --root datasets --dataset refcoco --split-by unc

Expected layout (the official code's ``$DETECTRON2_DATASETS``, default ``datasets``)::

    <root>/grefcoco/grefs(unc).json   gRefCOCO refs      https://github.com/henghuiding/gRefCOCO
    <root>/grefcoco/instances.json    COCO-format masks  (Google Drive, or HF FudanCVL/gRefCOCO)
    <root>/images/train2014/COCO_train2014_*.jpg         COCO 2014 train images:
                                      https://cocodataset.org/#download
                                      http://images.cocodataset.org/zips/train2014.zip

The script says exactly what is missing and where it is published, indexes the annotations with
``gres.data.grefer.GRefer`` (which validates every ref), checks that the referenced images exist
(all of them by default), decodes a few, and writes ``<root>/<dataset>_manifest.json`` (counts per
split, checksums of the annotation files). Nothing is downloaded. Exit status 0 = usable, 1 = not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from gres.data.grefer import COCO_URL, GREFCOCO_URL, NO_TARGET_ANN, REFER_URL, GRefer  # noqa: E402
from gres.utils import sha256_file  # noqa: E402


@dataclass
class CheckReport:
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    manifest: dict | None = None
    manifest_path: Path | None = None

    def problem(self, msg: str) -> None:
        self.ok = False
        self.problems.append(msg)

    def text(self) -> str:
        lines = [("OK: the layout is usable" if self.ok else "NOT USABLE:")]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  warning: {w}" for w in self.warnings]
        if self.manifest:
            for split, c in self.manifest["splits"].items():
                lines.append(f"  {split:>6}: {c['images']} images, {c['refs']} refs, "
                             f"{c['expressions']} expressions ({c['multi']} multi, "
                             f"{c['no_target']} no-target)")
        if self.manifest_path:
            lines.append(f"  manifest written to {self.manifest_path}")
        return "\n".join(lines)


def check_layout(
    root: str | os.PathLike,
    dataset: str = "grefcoco",
    split_by: str = "unc",
    images: str = "all",
    sample: int = 500,
    decode: int = 10,
    manifest: str | os.PathLike | None = "auto",
) -> CheckReport:
    """Check ``root`` and (when usable) write the manifest.

    Args:
        images: "all" (check every referenced image exists), "sample" (``sample`` of them, spread
            over the list) or "none".
        decode: how many existing images to decode and compare with instances.json's sizes.
        manifest: output path, "auto" (``<root>/<dataset>_manifest.json``) or None (no file).
    """
    rep = CheckReport()
    root = Path(root)
    url = GREFCOCO_URL if dataset == "grefcoco" else REFER_URL
    if not root.is_dir():
        rep.problem(f"root folder {root} does not exist; create it with the layout of --help")
        return rep
    ann_dir = root / dataset
    stem = "grefs" if dataset == "grefcoco" else "refs"
    refs_json, refs_p = ann_dir / f"{stem}({split_by}).json", ann_dir / f"{stem}({split_by}).p"
    inst = ann_dir / "instances.json"
    img_dir = root / "images" / "train2014"
    if not ann_dir.is_dir():
        rep.problem(f"annotation folder {ann_dir} is missing: download {dataset} from {url}")
    else:
        if not refs_json.is_file() and not refs_p.is_file():
            rep.problem(f"{refs_json.name} (or {refs_p.name}) is missing in {ann_dir}: from {url}")
        if not inst.is_file():
            rep.problem(f"{inst} is missing: it ships with the {dataset} annotations ({url})")
    if not img_dir.is_dir():
        rep.problem(f"image folder {img_dir} is missing: unzip COCO train2014 there ({COCO_URL})")
    if not rep.ok and not (ann_dir.is_dir() and inst.is_file()):
        return rep

    try:
        refer = GRefer(root, dataset, split_by)
    except (FileNotFoundError, ValueError) as exc:
        rep.problem(f"annotations do not load: {exc}")
        return rep

    used = sorted({int(r["image_id"]) for r in refer.refs.values()})
    if images != "none" and img_dir.is_dir():
        if images == "sample" and len(used) > sample:
            step = len(used) / sample
            to_check = [used[int(k * step)] for k in range(sample)]
        else:
            to_check = used
        missing = [refer.imgs[i]["file_name"] for i in to_check
                   if not refer.image_path(i).is_file()]
        if missing:
            rep.problem(f"{len(missing)} of {len(to_check)} checked images are missing in "
                        f"{img_dir}, "
                        f"e.g. {missing[:3]}; COCO train2014 images: {COCO_URL}")
        present = [i for i in to_check if refer.image_path(i).is_file()]
        from gres.data.dataset import load_rgb

        for i in present[:decode]:
            meta = refer.imgs[i]
            try:
                w, h = load_rgb(refer.image_path(i)).size
            except (OSError, ValueError) as exc:
                rep.problem(f"cannot decode {refer.image_path(i)}: {exc}")
                continue
            if (h, w) != (int(meta["height"]), int(meta["width"])):
                rep.warnings.append(f"{meta['file_name']}: decoded {h}x{w}, instances.json says "
                                    f"{meta['height']}x{meta['width']}")
    counts: dict[str, dict[str, int]] = {}
    for ref in refer.refs.values():
        c = counts.setdefault(ref["split"], {"images": 0, "refs": 0, "expressions": 0, "single": 0,
                                             "multi": 0, "no_target": 0, "instances": 0})
        n = len(ref["sentences"])
        c["refs"] += 1
        c["expressions"] += n
        if ref["ann_id"] == [NO_TARGET_ANN]:
            c["no_target"] += n
        else:
            c["multi" if len(ref["ann_id"]) > 1 else "single"] += n
    for split in counts:
        ids = refer.get_ref_ids(split=split)
        counts[split]["images"] = len({refer.refs[r]["image_id"] for r in ids})
        referred = {a for r in ids for a in refer.refs[r]["ann_id"]} - {NO_TARGET_ANN}
        counts[split]["instances"] = len(referred)
    order = ["train", "val", "test", "testA", "testB"]
    ranked = sorted(counts, key=lambda s: (order.index(s) if s in order else 9, s))
    splits = {k: counts[k] for k in ranked}
    files = [refer.refs_file, refer.instances_file]
    rep.manifest = {
        "dataset": dataset,
        "split_by": split_by,
        "files": {str(p.relative_to(root)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                  for p in files},
        "splits": splits,
        "totals": {k: sum(c[k] for c in splits.values()) for k in next(iter(splits.values()))},
        "images_referenced": len(used),
        "ok": rep.ok,
    }
    if manifest is not None:
        path = root / f"{dataset}_manifest.json" if manifest == "auto" else Path(manifest)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(rep.manifest, indent=1))
        os.replace(tmp, path)
        rep.manifest_path = path
    return rep


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="datasets", help="folder holding grefcoco/ and images/")
    ap.add_argument("--dataset", default="grefcoco",
                    choices=["grefcoco", "refcoco", "refcoco+", "refcocog"])
    ap.add_argument("--split-by", default="unc", help="unc (default), umd or google (refcocog)")
    ap.add_argument("--images", default="all", choices=["all", "sample", "none"])
    ap.add_argument("--sample", type=int, default=500, help="images checked with --images sample")
    ap.add_argument("--decode", type=int, default=10, help="images decoded and size-checked")
    ap.add_argument("--manifest", default="auto", help="manifest path ('none' = do not write)")
    args = ap.parse_args(argv)
    rep = check_layout(args.root, args.dataset, args.split_by, args.images, args.sample,
                       args.decode, None if args.manifest == "none" else args.manifest)
    print(rep.text())
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
