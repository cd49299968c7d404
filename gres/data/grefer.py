"""An index over gRefCOCO (and classic RefCOCO / RefCOCO+ / RefCOCOg) annotation files.

GRES paper §3.2 (gRefCOCO); spec §6.1 (file layout), §6.4 (the official ``grefer.py`` API) and
§6.5 (``lichengunc/refer``). :class:`GRefer` keeps the semantics of the official ``G_REFER`` index:

* ``<root>/<dataset>/grefs(<split_by>).json`` (gRefCOCO) or ``refs(<split_by>).p`` (classic
  datasets) plus ``<root>/<dataset>/instances.json`` (COCO format); images live in
  ``<root>/images/train2014``.
* A ref refers to a list of COCO annotations; ``ann_id == [-1]`` marks a **no-target** ref. Classic
  refs carry a bare int, which is normalised to a one-element list (as ``grefer._toList`` does).
* The mask of a ref is the union of its instance masks; a no-target ref gives an all-zero mask with
  ``empty=True``.

Differences from the official API, all deliberate:

* The no-target bug is fixed: :meth:`GRefer.get_mask` gives the same answer whether it is called
  with a ref or with a ``ref_id`` (the official ``getMaskByRef(ref_id=...)`` crashes for
  no-target refs).
  :meth:`GRefer.get_ref_boxes` returns ``[]`` for a no-target ref instead of crashing.
* When both ``grefs(unc).json`` and ``grefs(unc).p`` exist the JSON file is read (pure data; the
  official code prefers the pickle). Pickles are read by :func:`safe_pickle_load`, which builds
  plain containers only: a crafted pickle cannot run code.
* Everything a ref points at is checked once, at indexing time, and bad input raises a
  ``ValueError`` / ``FileNotFoundError`` that names the file, ref or annotation.
* Polygon parts with fewer than 3 points are dropped (as the official loader does); an annotation
  left with no usable part is an error (the official loader hits an undefined variable there).

Method names are snake_case; the official camelCase names are kept as aliases at the bottom of the
class so code written against ``grefer.py`` keeps working.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import pickle
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as coco_mask


# Where users get the real data (printed in every "file missing" error and by check_grefcoco.py).
GREFCOCO_URL = (
    "https://github.com/henghuiding/gRefCOCO (Google Drive, or HF dataset FudanCVL/gRefCOCO)"
)
REFER_URL = "https://github.com/lichengunc/refer (refcoco, refcoco+, refcocog zips)"
COCO_URL = "https://cocodataset.org/#download (http://images.cocodataset.org/zips/train2014.zip)"

CLASSIC_DATASETS = ("refcoco", "refcoco+", "refcocog")
NO_TARGET_ANN = -1  # grefs(unc).json: ann_id == [-1] marks a no-target ref (spec §6.1)
_REF_KEYS = ("ref_id", "image_id", "ann_id", "split", "sentences")  # what every ref must have


# --------------------------------------------------------------------------------------------------
# File reading
# --------------------------------------------------------------------------------------------------
class _PlainUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global: only dicts, lists, tuples, str, bytes, numbers,
    booleans and None can be built, so ``__reduce__`` payloads (``os.system`` ...) never run."""

    _ALLOWED = {("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"),
                ("__builtin__", "frozenset")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return set if name == "set" else frozenset
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: ref pickles may only hold plain containers"
        )


def safe_pickle_load(path: str | os.PathLike) -> Any:
    """Load a refer-style pickle (``refs(unc).p``) without executing any code.

    The classic files were written by Python 2; byte strings are decoded as latin-1 (the usual
    convention for those files).

    Raises:
        ValueError: the file is not a valid pickle of plain containers (names the file).
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        return _PlainUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as exc:
        raise ValueError(f"{path}: not a loadable refs pickle ({exc})") from exc


def load_json(path: str | os.PathLike) -> Any:
    """``json.load`` with errors that name the file (malformed or truncated JSON)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path}: malformed or truncated JSON "
            f"(line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 JSON ({exc})") from exc


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while building millions of small containers (a JSON of
    gRefCOCO's size): otherwise every few thousand allocations trigger a rescan of the heap."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _to_list(x: Any) -> list:
    """``grefer._toList``: a bare id becomes a one-element list."""
    return list(x) if isinstance(x, (list, tuple)) else [x]


# --------------------------------------------------------------------------------------------------
# Segmentation helpers (shared with gres.data.dataset)
# --------------------------------------------------------------------------------------------------
def valid_polygons(segmentation: list, where: str = "") -> list[list[float]]:
    """Polygon parts with at least 3 points (6 coordinates); the others are dropped.

    Matches ReLA's ``grefcoco.py`` filter. Raises ``ValueError`` (naming ``where``) when nothing is
    left, since such an annotation has no pixels.
    """
    parts = [list(map(float, p)) for p in segmentation if len(p) >= 6 and len(p) % 2 == 0]
    if not parts:
        raise ValueError(f"{where}: every polygon has fewer than 3 points")
    return parts


def check_segmentation(ann: dict, where: str = "") -> None:
    """Raise ``ValueError`` unless ``ann['segmentation']`` is usable (polygons or RLE)."""
    seg = ann.get("segmentation")
    if seg is None or (isinstance(seg, list) and len(seg) == 0):
        raise ValueError(f"{where}: annotation {ann.get('id')} has no segmentation")
    if isinstance(seg, list):
        if not any(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg):
            raise ValueError(f"{where}: annotation {ann.get('id')}: every polygon has fewer than "
                             f"3 points")
    elif isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise ValueError(f"{where}: annotation {ann.get('id')}: RLE without counts/size")
    else:
        raise ValueError(f"{where}: annotation {ann.get('id')}: unknown segmentation type")


def rasterize_segmentation(
    segmentation: list | dict,
    orig_hw: tuple[int, int],
    out_hw: tuple[int, int] | None = None,
) -> np.ndarray:
    """Binary mask of one annotation, optionally in a resized frame.

    Follows ReLA's mapper (spec §6.3): polygons are scaled by ``out/orig`` per axis (detectron2
    ``ResizeTransform.apply_coords``) and rasterised at the output size with pycocotools, OR-ing the
    parts. RLE is decoded at the original size and resized with nearest neighbour (detectron2
    ``apply_segmentation``).

    Args:
        segmentation: COCO polygons (list of flat ``[x0, y0, x1, y1, ...]``) or RLE dict.
        orig_hw: (h, w) of the image the segmentation is expressed in.
        out_hw: (H, W) of the output mask; None = original size.

    Returns:
        (H, W) bool array.
    """
    h, w = orig_hw
    oh, ow = out_hw if out_hw is not None else orig_hw
    if isinstance(segmentation, dict):
        rle = segmentation
        if isinstance(rle.get("counts"), list):  # uncompressed RLE
            rle = coco_mask.frPyObjects(rle, *rle["size"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # pycocotools + numpy 2, harmless
            m = coco_mask.decode(rle).astype(bool)
        if (oh, ow) != m.shape:
            from PIL import Image  # local import: only RLE needs it

            small = Image.fromarray(m.astype(np.uint8) * 255)
            m = np.asarray(small.resize((ow, oh), Image.NEAREST)) > 0
        return m
    sx, sy = ow / w, oh / h
    polys = []
    for p in valid_polygons(segmentation):
        a = np.asarray(p, dtype=np.float64).reshape(-1, 2)
        a[:, 0] *= sx
        a[:, 1] *= sy
        polys.append(a.ravel().tolist())
    rles = coco_mask.frPyObjects(polys, oh, ow)
    with warnings.catch_warnings():
        # pycocotools 2.0.x passes copy=False to np.array on its RLE objects: numpy 2 warns
        warnings.simplefilter("ignore", DeprecationWarning)
        m = coco_mask.decode(rles)  # (H, W, parts) uint8
    return m.any(axis=2)


# --------------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------------
class _Where:
    """``"<refs file>: ref <id>"``, built only when an error message needs it."""

    __slots__ = ("file", "ref_id")

    def __init__(self, file: str, ref_id: int) -> None:
        self.file, self.ref_id = file, ref_id

    def __str__(self) -> str:
        return f"{self.file}: ref {self.ref_id}"



class GRefer:
    """Index over one referring dataset (gRefCOCO or a classic RefCOCO variant).

    Args:
        data_root: folder holding ``<dataset>/`` and ``images/train2014`` (spec §6.1).
        dataset: "grefcoco" | "refcoco" | "refcoco+" | "refcocog".
        split_by: "unc" (gRefCOCO, RefCOCO, RefCOCO+), "umd" or "google" (RefCOCOg).
        verbose: print a one-line summary after indexing.

    Attributes (all dicts keyed by id, as in the official index):
        refs, anns, imgs, cats, sents; img_to_refs, img_to_anns, ref_to_anns (``[None]`` for
        no-target), ann_to_refs (key -1 collects every no-target ref), cat_to_refs, sent_to_ref;
        available_splits (sorted list).
    """

    def __init__(
        self,
        data_root: str | os.PathLike,
        dataset: str = "grefcoco",
        split_by: str = "unc",
        verbose: bool = False,
    ) -> None:
        if dataset != "grefcoco" and dataset not in CLASSIC_DATASETS:
            raise ValueError(
                f"unknown dataset {dataset!r}; expected 'grefcoco' or one of {CLASSIC_DATASETS}"
            )
        self.data_root = Path(data_root)
        self.dataset = dataset
        self.split_by = split_by
        self.data_dir = self.data_root / dataset
        self.image_dir = self.data_root / "images" / "train2014"
        self.refs_file = self._find_refs_file()
        self.instances_file = self.data_dir / "instances.json"
        if not self.instances_file.is_file():
            raise FileNotFoundError(
                f"{self.instances_file} not found. It ships with the {dataset} annotations: "
                f"{GREFCOCO_URL if dataset == 'grefcoco' else REFER_URL}"
            )
        with no_gc():
            if self.refs_file.suffix == ".json":
                refs = load_json(self.refs_file)
            else:
                refs = safe_pickle_load(self.refs_file)
            instances = load_json(self.instances_file)
            self._create_index(refs, instances)
        if verbose:
            print(
                f"GRefer({dataset}, {split_by}): {len(self.refs)} refs, "
                f"{len(self.sents)} sentences, "
                f"{len(self.imgs)} images, {len(self.anns) - 1} annotations, "
                f"splits {self.available_splits}"
            )

    # ---------------------------------------------------------------------------------------------
    def _find_refs_file(self) -> Path:
        stem = "grefs" if self.dataset == "grefcoco" else "refs"
        candidates = [self.data_dir / f"{stem}({self.split_by}).{ext}" for ext in ("json", "p")]
        for c in candidates:
            if c.is_file():
                return c
        url = GREFCOCO_URL if self.dataset == "grefcoco" else REFER_URL
        raise FileNotFoundError(
            f"no refs file for {self.dataset} split_by={self.split_by}: looked for "
            f"{candidates[0]} and {candidates[1]}. Download from {url}; "
            f"run data_prep/check_grefcoco.py --root {self.data_root} for a full layout check."
        )

    def _create_index(self, refs: Any, instances: Any) -> None:
        rf, inf = str(self.refs_file), str(self.instances_file)
        if not isinstance(refs, list):
            raise ValueError(f"{rf}: expected a list of refs, got {type(refs).__name__}")
        if not isinstance(instances, dict):
            raise ValueError(f"{inf}: expected a COCO dict, got {type(instances).__name__}")
        for key in ("images", "annotations", "categories"):
            if not isinstance(instances.get(key), list):
                raise ValueError(f"{inf}: missing or invalid '{key}' list")

        anns: dict[int, dict | None] = {NO_TARGET_ANN: None}  # official: Anns[-1] = None
        imgs: dict[int, dict] = {}
        cats: dict[int, str] = {}
        img_to_anns: dict[int, list] = defaultdict(list)
        for i, img in enumerate(instances["images"]):
            try:
                imgs[int(img["id"])] = img
                img["height"], img["width"], img["file_name"]  # noqa: B018 - presence check
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{inf}: image entry #{i} lacks {exc} "
                                 f"(needs id/file_name/height/width)") from exc
        for i, ann in enumerate(instances["annotations"]):
            try:
                aid, iid = int(ann["id"]), int(ann["image_id"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{inf}: annotation entry #{i} lacks {exc}") from exc
            anns[aid] = ann
            img_to_anns[iid].append(ann)
        for cat in instances["categories"]:
            cats[int(cat["id"])] = cat["name"]

        ref_index: dict[int, dict] = {}
        img_to_refs: dict[int, list] = defaultdict(list)
        ref_to_anns: dict[int, list] = {}
        ann_to_refs: dict[int, list] = defaultdict(list)
        cat_to_refs: dict[int, list] = defaultdict(list)
        sents: dict[int, dict] = {}
        sent_to_ref: dict[int, dict] = {}
        splits: set[str] = set()
        checked_anns: set[int] = set()
        for i, ref in enumerate(refs):
            if not isinstance(ref, dict):
                raise ValueError(f"{rf}: ref #{i} is not a dict")
            missing = [k for k in _REF_KEYS if k not in ref]
            if missing:
                raise ValueError(
                    f"{rf}: ref #{i} (ref_id={ref.get('ref_id')}) lacks keys {missing}")
            ref_id, image_id = int(ref["ref_id"]), int(ref["image_id"])
            where = _Where(rf, ref_id)  # formatted only when an error is raised
            if image_id not in imgs:
                raise ValueError(f"{where}: image_id {image_id} is not in {inf}")
            ann_ids = [int(a) for a in _to_list(ref["ann_id"])]
            if not ann_ids:
                raise ValueError(f"{where}: empty ann_id list (no-target refs use [-1])")
            if NO_TARGET_ANN in ann_ids and len(ann_ids) > 1:
                raise ValueError(f"{where}: ann_id mixes -1 (no target) with real ids {ann_ids}")
            for aid in ann_ids:
                if aid == NO_TARGET_ANN:
                    continue
                ann = anns.get(aid)
                if ann is None:
                    raise ValueError(f"{where}: points at annotation {aid}, which is not in {inf}")
                if int(ann["image_id"]) != image_id:
                    raise ValueError(f"{where}: annotation {aid} belongs to image "
                                     f"{ann['image_id']}, not to the ref's image {image_id}")
                if aid not in checked_anns:
                    check_segmentation(ann, f"{inf} (used by ref {ref_id})")
                    checked_anns.add(aid)
            sentences = ref["sentences"]
            if not isinstance(sentences, list) or not sentences:
                raise ValueError(f"{where}: has no sentences")
            for s in sentences:
                if not isinstance(s, dict) or "sent_id" not in s or not (
                        s.get("raw") or s.get("sent")):
                    raise ValueError(f"{where}: sentence {s!r} needs sent_id and raw/sent text")
                sid = int(s["sent_id"])
                sents[sid] = s
                sent_to_ref[sid] = ref
            ref["ann_id"] = ann_ids
            ref["category_id"] = [int(c) for c in _to_list(ref.get("category_id", [-1]))]
            ref["no_target"] = ann_ids == [NO_TARGET_ANN]
            splits.add(ref["split"])
            ref_index[ref_id] = ref
            img_to_refs[image_id].append(ref)
            ref_to_anns[ref_id] = [anns[a] for a in ann_ids]
            for aid in ann_ids:
                ann_to_refs[aid].append(ref)
            for cid in ref["category_id"]:
                cat_to_refs[cid].append(ref)

        self.refs, self.anns, self.imgs, self.cats = ref_index, anns, imgs, cats
        self.img_to_refs, self.img_to_anns = dict(img_to_refs), dict(img_to_anns)
        self.ref_to_anns, self.ann_to_refs = ref_to_anns, dict(ann_to_refs)
        self.cat_to_refs = dict(cat_to_refs)
        self.sents, self.sent_to_ref = sents, sent_to_ref
        self.available_splits = sorted(splits)

    # ---------------------------------------------------------------------------------------------
    # Queries
    # ---------------------------------------------------------------------------------------------
    def _check_splits(self, split: str | Sequence[str] | None) -> list[str]:
        wanted = [] if split in (None, "", []) else _to_list(split)
        unknown = [s for s in wanted if s not in self.available_splits]
        if unknown:
            raise ValueError(
                f"unknown split(s) {unknown} for {self.refs_file}; "
                f"available: {self.available_splits}"
            )
        return wanted

    def get_ref_ids(
        self,
        image_ids: int | Iterable[int] | None = None,
        cat_ids: int | Iterable[int] | None = None,
        split: str | Sequence[str] | None = None,
    ) -> list[int]:
        """Ref ids (file order) filtered by image, category (any overlap) and exact split."""
        image_ids = [] if image_ids is None else _to_list(image_ids)
        cat_ids = [] if cat_ids is None else _to_list(cat_ids)
        splits = set(self._check_splits(split))
        if image_ids:
            refs = [r for i in image_ids for r in self.img_to_refs.get(int(i), [])]
        else:
            refs = list(self.refs.values())
        if cat_ids:
            wanted = {int(c) for c in cat_ids}
            refs = [r for r in refs if wanted.intersection(r["category_id"])]
        if splits:
            refs = [r for r in refs if r["split"] in splits]
        return [int(r["ref_id"]) for r in refs]

    def get_ann_ids(
        self,
        image_ids: int | Iterable[int] | None = None,
        ref_ids: int | Iterable[int] | None = None,
    ) -> list[int]:
        """Annotation ids of the given images, intersected with the refs' ann ids (never -1)."""
        image_ids = [] if image_ids is None else _to_list(image_ids)
        ref_ids = [] if ref_ids is None else _to_list(ref_ids)
        if image_ids:
            ann_ids = [int(a["id"]) for i in image_ids for a in self.img_to_anns.get(int(i), [])]
        else:
            ann_ids = [a for a in self.anns if a != NO_TARGET_ANN]
        if ref_ids:
            keep = {a for r in ref_ids for a in self.refs[int(r)]["ann_id"]}
            ann_ids = [a for a in ann_ids if a in keep]
        return ann_ids

    def get_img_ids(self, ref_ids: int | Iterable[int] | None = None) -> list[int]:
        if ref_ids is None or ref_ids == []:
            return list(self.imgs)
        return sorted({int(self.refs[int(r)]["image_id"]) for r in _to_list(ref_ids)})

    def get_cat_ids(self) -> list[int]:
        return list(self.cats)

    def get_sent_ids(self, split: str | Sequence[str] | None = None) -> list[int]:
        """Sentence ids in sample order (refs in file order, then their sentences)."""
        return [int(s["sent_id"]) for r in self.get_ref_ids(split=split)
                for s in self.refs[r]["sentences"]]

    def load_refs(self, ref_ids: int | Iterable[int]) -> list[dict]:
        return [self.refs[int(r)] for r in _to_list(ref_ids)]

    def load_anns(self, ann_ids: int | str | Iterable[int]) -> list[dict | None]:
        return [self.anns[int(a)] for a in _to_list(ann_ids)]

    def load_imgs(self, image_ids: int | Iterable[int]) -> list[dict]:
        return [self.imgs[int(i)] for i in _to_list(image_ids)]

    def load_cats(self, cat_ids: int | Iterable[int]) -> list[str]:
        return [self.cats[int(c)] for c in _to_list(cat_ids)]

    def image_path(self, image_id: int) -> Path:
        """Path of an image (file name from instances.json, like ReLA; not the ref's file_name)."""
        return self.image_dir / self.imgs[int(image_id)]["file_name"]

    def is_no_target(self, ref_id: int) -> bool:
        return self.refs[int(ref_id)]["ann_id"] == [NO_TARGET_ANN]

    def get_ref_boxes(self, ref_id: int) -> list[list[float]]:
        """xywh boxes of a ref's annotations; ``[]`` for no-target (official: crashes)."""
        return [list(a["bbox"]) for a in self.ref_to_anns[int(ref_id)] if a is not None]

    def get_ann_mask(self, ann: dict | None) -> dict | None:
        """``{'mask': (h, w) uint8, 'area': int}`` of one annotation; None for a None ann."""
        if ann is None:
            return None
        img = self.imgs[int(ann["image_id"])]
        check_segmentation(ann, str(self.instances_file))
        m = rasterize_segmentation(ann["segmentation"], (int(img["height"]), int(img["width"])))
        return {"mask": m.astype(np.uint8), "area": int(m.sum())}

    def get_mask(
        self,
        ref: dict | None = None,
        ref_id: int | None = None,
        out_hw: tuple[int, int] | None = None,
        drop_crowd: bool = False,
    ) -> dict:
        """Union mask of a ref: ``{'mask': (H, W) uint8, 'empty': bool}``.

        Works the same for ``ref=`` and ``ref_id=`` (the official ``getMaskByRef`` breaks on
        no-target refs given by id). ``out_hw`` rasterises in a resized frame (the mapper's way).
        """
        if ref is None:
            if ref_id is None:
                raise ValueError("get_mask needs ref or ref_id")
            ref = self.refs[int(ref_id)]
        img = self.imgs[int(ref["image_id"])]
        orig = (int(img["height"]), int(img["width"]))
        size = out_hw or orig
        anns = [a for a in self.ref_to_anns[int(ref["ref_id"])] if a is not None]
        if drop_crowd:
            anns = [a for a in anns if not a.get("iscrowd", 0)]
        mask = np.zeros(size, dtype=bool)
        for a in anns:
            mask |= rasterize_segmentation(a["segmentation"], orig, size)
        return {"mask": mask.astype(np.uint8), "empty": not anns}

    # Official camelCase names (grefer.py), kept for code written against it.
    getRefIds = get_ref_ids  # noqa: N815
    getAnnIds = get_ann_ids  # noqa: N815
    getImgIds = get_img_ids  # noqa: N815
    getCatIds = get_cat_ids  # noqa: N815
    loadRefs = load_refs  # noqa: N815
    loadAnns = load_anns  # noqa: N815
    loadImgs = load_imgs  # noqa: N815
    loadCats = load_cats  # noqa: N815
    getRefBox = get_ref_boxes  # noqa: N815
    getMask = get_ann_mask  # noqa: N815

    def getMaskByRef(  # noqa: N802 - official name
        self, ref: dict | None = None, ref_id: int | None = None, merge: bool = False
    ) -> dict | list:
        """Official signature: per-ann mask dicts, or the merged union with ``merge=True``."""
        if ref is None:
            ref = self.refs[int(ref_id)]
        if ref["ann_id"] == [NO_TARGET_ANN] or merge:
            return self.get_mask(ref=ref)
        return [self.get_ann_mask(a) for a in self.ref_to_anns[int(ref["ref_id"])]]
