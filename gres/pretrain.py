"""Backbone pretraining on the dataset's own instance categories (ours; not in the paper).

ReLA starts from a Swin-B pretrained on ImageNet-22k: the backbone already knows what objects
look like, and GRES training only has to bind words to them. The CPU presets train a small Swin
on the synthetic world, where there is no ImageNet. From scratch, the GRES losses teach shape very
slowly: after 27k samples the ``cpu-small`` model segmented colour-only expressions ("the red
one": 0.74 IoU) but not shape-only ones ("the triangle": 0.26), see ``bench/RESULTS.md``.

This module is the synthetic world's stand-in for ImageNet pretraining: the Swin (without its
language fusion) and a light FPN head learn per-pixel semantic segmentation of the instance
*categories* of ``instances.json`` (synthetic: the 6 shapes; gRefCOCO: the 80 COCO classes) on
the images of the **training split only**, so the validation and test images stay unseen. No
expression is used. The backbone weights are cached and then loaded exactly like the timm weights
of the paper preset (:func:`gres.model.swin.load_pretrained_swin`): the fusion modules, the gates
and the output norms of the fused stages start fresh.

With ``PretrainConfig.attributes`` (e.g. ``("color", "size")`` on the synthetic set, whose
annotations carry them), extra heads also label every object pixel with those attributes, so that
the features are not trained to ignore them (a shape-only target makes the deep stages
colour-blind; ImageNet features are not).

Selected with ``SwinConfig.pretrained = "dataset-categories"`` (:data:`PRETRAIN_SOURCE`); the
recipe is :class:`gres.config.PretrainConfig` (``ExperimentConfig.pretrain``). The cache folder
is keyed by a hash of the Swin architecture, the input size and normalisation, the pretraining
recipe and the dataset's fingerprint, so every configuration sharing a backbone pretrains once::

    <root>/swin-<key>/backbone.safetensors    the Swin state dict (our key names)
    <root>/swin-<key>/pretrain.json           recipe, validation curve, wall time
    <root>/swin-<key>/log.jsonl               the curve, one record per evaluation

:func:`gres.engine.train` resolves the source before building the model (default root
``<run folder>/../_pretrained``); :func:`gres.experiments.train_all` pretrains the backbones
its configurations need before it starts the parallel trainings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gres.config import DATASET_PRETRAINED, ExperimentConfig, PretrainConfig, to_dict
from gres.utils import file_lock

PRETRAIN_SOURCE = DATASET_PRETRAINED
"""``SwinConfig.pretrained`` value that selects this module's pretraining."""
IGNORE = 255  # label of crowd annotations (excluded from the loss and the metrics)
BACKBONE_FILE = "backbone.safetensors"


def uses_dataset_pretraining(cfg: ExperimentConfig) -> bool:
    """True if the config's Swin starts from :data:`PRETRAIN_SOURCE`."""
    return cfg.model.swin.pretrained == PRETRAIN_SOURCE


# --------------------------------------------------------------------------------------------------
# Data: images of one split with a per-pixel category map
# --------------------------------------------------------------------------------------------------
class CategorySegmentation(torch.utils.data.Dataset):
    """Every image of one split with its instance categories rasterised at ``image_size``.

    Labels: 0 = background, ``1..K`` = the categories of ``instances.json`` in id order, and
    :data:`IGNORE` for crowd regions. Annotations are drawn in id order (a later one covers an
    earlier one where they overlap; synthetic masks are the visible parts and never overlap).

    With ``attributes`` (e.g. ``("color",)``), each image also gets one map per attribute:
    0 = background, ``1..V`` = the attribute's values (sorted, over every annotation of the file;
    :attr:`attribute_values`), :data:`IGNORE` for crowd regions and annotations without it.

    Args:
        root: dataset root (``<root>/<dataset>/...``, ``<root>/images/train2014``).
        split: images of the refs of this split (``train`` for pretraining).
        dataset / split_by: as in :class:`gres.data.dataset.GRESDataset`.
        image_size: square side of the resized images and label maps.
        max_images: keep the first N images (sorted by id).
        cache: keep decoded images and label maps in memory.
        attributes: names of per-annotation ``attributes`` entries to label as well.

    Raises:
        ValueError: no annotation of the file has one of ``attributes``.
    """

    def __init__(self, root: str | os.PathLike, split: str, *, dataset: str = "grefcoco",
                 split_by: str = "unc", image_size: int = 480, max_images: int | None = None,
                 cache: bool = False, attributes: tuple[str, ...] = ()) -> None:
        from gres.data.grefer import GRefer

        refer = GRefer(root, dataset, split_by)
        image_ids = sorted({int(refer.refs[r]["image_id"]) for r in refer.get_ref_ids(split=split)})
        if max_images is not None:
            image_ids = image_ids[: int(max_images)]
        if not image_ids:
            raise ValueError(f"split {split!r} of {root} has no image")
        self.image_size = int(image_size)
        self.cat_ids = sorted(int(c) for c in refer.cats)
        self.cat_names = [refer.cats[c] for c in self.cat_ids]
        label_of = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.attributes = tuple(attributes)
        self.attribute_values: dict[str, list[str]] = {}
        for name in self.attributes:
            values = sorted({str(a["attributes"][name]) for a in refer.anns.values()
                             if a is not None and name in (a.get("attributes") or {})})
            if not values:
                raise ValueError(f"no annotation of {root} has the attribute {name!r} "
                                 "(instances.json 'attributes'; COCO annotations have none)")
            self.attribute_values[name] = values
        value_label = {n: {v: i + 1 for i, v in enumerate(vs)}
                       for n, vs in self.attribute_values.items()}
        self._items = []
        for iid in image_ids:
            img = refer.imgs[iid]
            anns = sorted((a for a in refer.img_to_anns.get(iid, []) if a is not None),
                          key=lambda a: a["id"])
            self._items.append((
                str(refer.image_path(iid)), int(img["height"]), int(img["width"]),
                [(a["segmentation"], label_of[int(a["category_id"])], bool(a.get("iscrowd", 0)),
                  tuple(value_label[n].get(str((a.get("attributes") or {}).get(n)), IGNORE)
                        for n in self.attributes))
                 for a in anns],
            ))
        missing = [p for p, *_ in self._items if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) of split {split!r} are missing, "
                                    f"e.g. {missing[:3]}")
        self.cache = cache
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}

    @property
    def num_classes(self) -> int:
        """Categories + background."""
        return len(self.cat_ids) + 1

    def __len__(self) -> int:
        return len(self._items)

    @property
    def image_paths(self) -> list[str]:
        """Image file of each index."""
        return [path for path, *_ in self._items]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """``(image, labels)``: (3, S, S) uint8 RGB and (S, S) int64 categories, or with
        ``attributes`` (1 + A, S, S): the categories, then one map per attribute."""
        if index in self._cache:
            return self._cache[index]
        from gres.data.dataset import load_rgb, resize_square
        from gres.data.grefer import rasterize_segmentation

        path, h, w, anns = self._items[index]
        S = self.image_size
        image = torch.from_numpy(np.array(resize_square(load_rgb(path), S)))  # (S, S, 3) copy
        image = image.permute(2, 0, 1).contiguous()  # (3, S, S)
        labels = np.zeros((1 + len(self.attributes), S, S), dtype=np.int64)
        for seg, label, crowd, values in anns:
            m = rasterize_segmentation(seg, (h, w), (S, S)).astype(bool)
            for k, v in enumerate((label, *values)):
                labels[k][m] = IGNORE if crowd else v
        item = (image, torch.from_numpy(labels if self.attributes else labels[0]))
        if self.cache:
            self._cache[index] = item
        return item


def _stack(dataset: CategorySegmentation, indices: list[int]) -> tuple[Tensor, Tensor]:
    items = [dataset[i] for i in indices]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


# --------------------------------------------------------------------------------------------------
# Model: the Swin without fusion + a light FPN segmentation head
# --------------------------------------------------------------------------------------------------
def plain_swin(cfg: ExperimentConfig) -> nn.Module:
    """The config's Swin without language fusion and without weights: what pretraining trains
    and what :data:`BACKBONE_FILE` holds."""
    from gres.model.swin import build_swin

    swin_cfg = dataclasses.replace(cfg.model.swin, use_fusion=False, pretrained=None)
    return build_swin(swin_cfg, lang_dim=cfg.model.text.hidden_size)


class CategorySegmenter(nn.Module):
    """Swin (``use_fusion=False``) -> top-down FPN over res2..res5 -> per-pixel category logits.

    Args:
        cfg: the experiment config (its Swin, image normalisation).
        num_classes: K categories + background.
        head_dim: FPN width.
    """

    def __init__(self, cfg: ExperimentConfig, num_classes: int, head_dim: int,
                 attribute_classes: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.backbone = plain_swin(cfg)
        self.lateral = nn.ModuleList(nn.Conv2d(c, head_dim, 1) for c in self.backbone.num_features)
        self.head = self._head(head_dim, num_classes)
        self.attribute_heads = nn.ModuleList(self._head(head_dim, n) for n in attribute_classes)
        self.register_buffer("pixel_mean", torch.tensor(cfg.model.pixel_mean).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.model.pixel_std).view(1, 3, 1, 1),
                             persistent=False)

    @staticmethod
    def _head(dim: int, classes: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GELU(), nn.Conv2d(dim, classes, 1))

    def forward(self, images: Tensor, *, attributes: bool = False) -> Tensor | list[Tensor]:
        """(B, 3, S, S) uint8/float 0..255 -> (B, K+1, S, S) category logits; with
        ``attributes`` the list [categories, attribute 1, ...] of (B, V+1, S, S) logits."""
        x = (images.float() - self.pixel_mean) / self.pixel_std
        feats = list(self.backbone(x).values())  # res2..res5, (B, C_i, S/4/2^i, S/4/2^i)
        y = None
        for f, lateral in zip(reversed(feats), reversed(self.lateral)):
            z = lateral(f)
            if y is not None:
                z = z + F.interpolate(y, size=z.shape[-2:], mode="bilinear", align_corners=False)
            y = z  # (B, head_dim, h, w), ends at stride 4
        heads = [self.head, *self.attribute_heads] if attributes else [self.head]
        logits = [F.interpolate(h(y), size=images.shape[-2:], mode="bilinear",
                                align_corners=False) for h in heads]
        return logits if attributes else logits[0]


def category_metrics(pred: Tensor, labels: Tensor, num_classes: int) -> dict[str, float]:
    """Foreground pixel accuracy and mean IoU over the categories (background excluded).

    Args:
        pred / labels: (N, S, S) int64 (labels may hold :data:`IGNORE`).
    """
    valid = labels != IGNORE
    fg = valid & (labels > 0)
    ious = []
    for c in range(1, num_classes):
        inter = ((pred == c) & (labels == c)).sum().item()
        union = (((pred == c) | (labels == c)) & valid).sum().item()
        if union:
            ious.append(inter / union)
    return {"fg_acc": float((pred[fg] == labels[fg]).float().mean()) if fg.any() else float("nan"),
            "mIoU": float(np.mean(ious)) if ious else float("nan")}


# --------------------------------------------------------------------------------------------------
# Cache key and lock
# --------------------------------------------------------------------------------------------------
def pretrain_key(cfg: ExperimentConfig, length: int = 10) -> str:
    """Hash of everything the pretrained backbone depends on."""
    from gres.experiments import dataset_fingerprint

    swin = to_dict(dataclasses.replace(cfg.model.swin, pretrained=None))
    swin.pop("spatial_features")  # PWAM only: pretraining runs the Swin path without fusion
    recipe = to_dict(cfg.pretrain)
    if not recipe["attributes"]:  # field added later: without attributes, the key is unchanged
        recipe.pop("attributes")
    blob = json.dumps({
        "swin": swin, "lang_dim": cfg.model.text.hidden_size,
        "image_size": cfg.model.image_size, "pixel_mean": list(cfg.model.pixel_mean),
        "pixel_std": list(cfg.model.pixel_std), "pretrain": recipe,
        "dataset": [cfg.data.dataset, cfg.data.split_by, cfg.data.train_split,
                    cfg.data.val_split],
        "data": dataset_fingerprint(cfg),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def pretrain_dir(cfg: ExperimentConfig, root: str | os.PathLike) -> Path:
    """``<root>/swin-<key>`` (:func:`pretrain_key`)."""
    return Path(root) / f"swin-{pretrain_key(cfg)}"


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
def _lr(pcfg: PretrainConfig, it: int) -> float:
    """Linear warmup, then cosine to 0."""
    warm = min(1.0, (it + 1) / max(1, pcfg.warmup_iters))
    return pcfg.lr * warm * 0.5 * (1.0 + math.cos(math.pi * it / pcfg.iterations))


def pretrain_backbone(cfg: ExperimentConfig, root: str | os.PathLike, *,
                      progress: bool = True, verbose: bool = True) -> Path:
    """Pretrained Swin weights for ``cfg`` (trained now unless cached); returns the file.

    Args:
        cfg: the experiment config (``cfg.pretrain`` is the recipe, ``cfg.data`` the dataset).
        root: cache root (one ``swin-<key>`` folder per backbone).
        progress: a tqdm bar.
        verbose: print where the weights come from.

    Raises:
        FileNotFoundError: the data root or an image is missing.
        ValueError: bad recipe values.
    """
    from gres.engine import atomic_write_text, save_weights
    from gres.utils import seed_everything

    pcfg = cfg.pretrain
    if pcfg.iterations < 1 or pcfg.batch_size < 1 or pcfg.lr <= 0:
        raise ValueError(f"PretrainConfig needs iterations, batch_size >= 1 and lr > 0: {pcfg}")
    folder = pretrain_dir(cfg, root)
    key = folder.name.removeprefix("swin-")
    out = folder / BACKBONE_FILE
    with file_lock(folder / ".lock"):  # parallel trainings pretrain a shared backbone once
        if out.is_file():
            if verbose:
                print(f"[pretrain] backbone loaded from {out}")
            return out
        t0 = time.time()
        data_root = Path(cfg.data.root)
        if not data_root.is_dir():
            raise FileNotFoundError(f"data root {data_root} does not exist (pretraining needs the "
                                    f"training images and instances.json of {cfg.data.dataset})")
        from gres.data.dataset import annotation_folder

        kw = dict(dataset=annotation_folder(cfg.data.dataset), split_by=cfg.data.split_by,
                  image_size=cfg.model.image_size, cache=cfg.data.cache_images,
                  attributes=tuple(pcfg.attributes))
        train_set = CategorySegmentation(data_root, cfg.data.train_split, **kw)
        val_set = CategorySegmentation(data_root, cfg.data.val_split,
                                       max_images=pcfg.eval_images, **kw)
        seed_everything(pcfg.seed)
        attr_classes = tuple(len(train_set.attribute_values[n]) + 1 for n in pcfg.attributes)
        model = CategorySegmenter(cfg, train_set.num_classes, pcfg.head_dim, attr_classes)
        optimizer = torch.optim.AdamW(model.parameters(), lr=pcfg.lr,
                                      weight_decay=pcfg.weight_decay)
        weights = []
        for n in (train_set.num_classes, *attr_classes):  # background down-weighted in each
            weights.append(torch.ones(n))
            weights[-1][0] = pcfg.background_weight
        gen = torch.Generator().manual_seed(pcfg.seed)
        val_x, val_y = _stack(val_set, list(range(len(val_set))))
        if pcfg.attributes:  # (N, 1 + A, S, S): the curve scores the categories
            val_y = val_y[:, 0]
        curve: list[dict[str, Any]] = []
        log = folder / "log.jsonl"
        log.write_text("")

        def evaluate(it: int) -> None:
            model.eval()
            with torch.no_grad():
                pred = torch.cat([model(val_x[i:i + 64]).argmax(1) for i in range(0, len(val_x), 64)])
            model.train()
            rec = {"iter": it, "images": it * pcfg.batch_size,
                   **category_metrics(pred, val_y, train_set.num_classes),
                   "seconds": time.time() - t0}
            curve.append(rec)
            with open(log, "a") as f:
                f.write(json.dumps(rec) + "\n")

        from tqdm.auto import tqdm

        bar = tqdm(range(pcfg.iterations), desc="pretrain backbone", disable=not progress,
                   dynamic_ncols=True)
        for it in bar:
            for group in optimizer.param_groups:
                group["lr"] = _lr(pcfg, it)
            idx = torch.randint(len(train_set), (pcfg.batch_size,), generator=gen).tolist()
            x, y = _stack(train_set, idx)
            if pcfg.hflip and it % 2:  # every other batch mirrored (categories are symmetric)
                x, y = x.flip(-1), y.flip(-1)
            targets = y if pcfg.attributes else y[:, None]  # (B, 1 + A, S, S)
            # the category CE, plus one CE per attribute
            loss = sum(F.cross_entropy(lg, targets[:, k], weight=weights[k], ignore_index=IGNORE)
                       for k, lg in enumerate(model(x, attributes=True)))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretraining loss is {loss.item()} at iteration {it}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if pcfg.eval_every and (it + 1) % pcfg.eval_every == 0 and it + 1 < pcfg.iterations:
                evaluate(it + 1)
                bar.set_postfix(mIoU=f"{curve[-1]['mIoU']:.3f}")
        evaluate(pcfg.iterations)
        save_weights(model.backbone, out)  # weights only, atomic
        atomic_write_text(folder / "pretrain.json", json.dumps({
            "key": key, "pretrain": to_dict(pcfg), "swin": to_dict(cfg.model.swin),
            "image_size": cfg.model.image_size, "categories": train_set.cat_names,
            "attribute_values": train_set.attribute_values,
            "train_images": len(train_set), "val_images": len(val_set), "curve": curve,
            "seconds": time.time() - t0, "torch_threads": torch.get_num_threads(),
        }, indent=1))
        if verbose:
            last = curve[-1]
            print(f"[pretrain] backbone trained in {(time.time() - t0) / 60:.1f} min "
                  f"(val fg acc {last['fg_acc']:.3f}, mIoU {last['mIoU']:.3f}) -> {out}")
        return out


def resolve_pretrained(cfg: ExperimentConfig, root: str | os.PathLike, *,
                       progress: bool = True) -> ExperimentConfig:
    """``cfg`` with ``swin.pretrained`` = the cached backbone file when it names
    :data:`PRETRAIN_SOURCE` (pretraining it first if needed); other configs are returned as is."""
    if not uses_dataset_pretraining(cfg):
        return cfg
    path = pretrain_backbone(cfg, root, progress=progress)
    swin = dataclasses.replace(cfg.model.swin, pretrained=str(path))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, swin=swin))
