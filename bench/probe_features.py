"""Linear probes: which features of a trained run still say *what shape* is at each pixel?

For each run folder (``model_final.safetensors``), one expression per image is run through the
model and the intermediate maps are kept: the Swin path before each language fusion
(``swin_pre_s0..3``, strides 4..32), the fused backbone outputs (``res2..res4``) and the pixel
decoder's maps (``ms2`` at stride 8, ``mask_features`` at stride 4, what the masks are dot
products with). A 1x1 conv (a linear classifier) is trained on each map, upsampled to the input
size, to predict the per-pixel instance category (0 background, 1..K) of ``instances.json`` on
training images, and is scored on validation images. With ``--backbone FILE`` the same probe
runs on a pretrained Swin alone (no fusion; ``res2..res5``), e.g. the cached
``_pretrained/swin-*/backbone.safetensors`` of ``gres.pretrain``.

Reported per map: ``fg_acc`` (object pixels whose category is right) and ``shape_acc`` (the same
among object pixels the probe does not call background: how well the shape is encoded where an
object is seen; chance = 1/K).

    python bench/probe_features.py RUN [RUN ...] [--backbone FILE] [--out bench/results/x.csv]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gres.pretrain import IGNORE, CategorySegmentation, plain_swin  # noqa: E402

RUN_MAPS = ("swin_pre_s0", "swin_pre_s1", "swin_pre_s2", "swin_pre_s3", "backbone_res2",
            "backbone_res3", "backbone_res4", "pixdec_ms2", "pixdec_mask_features")


def _tokens_to_map(x: torch.Tensor) -> torch.Tensor:
    """(B, N, C) square token grid -> (B, C, h, h)."""
    B, N, C = x.shape
    h = int(round(N**0.5))
    return x.transpose(1, 2).reshape(B, C, h, h)


def _category_index(cats: CategorySegmentation) -> dict[str, int]:
    return {Path(p).name: i for i, p in enumerate(cats.image_paths)}


@torch.no_grad()
def run_features(run: Path, data_root: Path, split: str, n_images: int, seed: int
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Maps of a trained run on ``n_images`` images of ``split`` (one target expression each)."""
    from gres.checkpoint import load_model
    from gres.engine import build_dataset

    model, cfg = load_model(run / "model_final.safetensors")
    ds = build_dataset(cfg, split, root=data_root)
    cats = CategorySegmentation(data_root, split, image_size=cfg.model.image_size)
    where = _category_index(cats)
    picked, seen = [], set()
    for j in np.random.RandomState(seed).permutation(len(ds)):
        meta = ds.meta(int(j))
        if meta["image_id"] in seen or meta["expr_type"] == 2:
            continue
        seen.add(meta["image_id"])
        picked.append(int(j))
        if len(picked) == n_images:
            break
    feats: dict[str, list[torch.Tensor]] = {}
    labels = []
    for k in range(0, len(picked), 32):
        batch = [ds[j] for j in picked[k:k + 32]]
        ids = torch.stack([s["input_ids"] for s in batch])
        out = model(torch.stack([s["image"] for s in batch]), ids,
                    torch.stack([s["text_mask"] for s in batch]), return_extras=True)
        ex = out.extras
        for t in range(4):
            feats.setdefault(f"swin_pre_s{t}", []).append(
                _tokens_to_map(ex[f"backbone_swin_tokens_s{t}"]))
        for name in RUN_MAPS[4:]:
            feats.setdefault(name, []).append(ex[name])
        labels += [cats[where[s["meta"]["file_name"]]][1] for s in batch]
    return {k: torch.cat(v) for k, v in feats.items()}, torch.stack(labels)


@torch.no_grad()
def backbone_features(path: Path, data_root: Path, split: str, n_images: int, seed: int,
                      preset: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """res2..res5 of a pretrained Swin (no fusion) with the preset's architecture."""
    from safetensors.torch import load_file

    from gres.config import PRESETS

    cfg = PRESETS[preset]()
    swin = plain_swin(cfg)
    swin.load_state_dict(load_file(str(path)))
    swin.eval()
    mean = torch.tensor(cfg.model.pixel_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.model.pixel_std).view(1, 3, 1, 1)
    cats = CategorySegmentation(data_root, split, image_size=cfg.model.image_size)
    idx = np.random.RandomState(seed).permutation(len(cats))[:n_images]
    images, labels = zip(*[cats[int(i)] for i in idx])
    x = torch.stack(images)
    feats: dict[str, list[torch.Tensor]] = {}
    for k in range(0, len(x), 64):
        for name, v in swin((x[k:k + 64].float() - mean) / std).items():
            feats.setdefault(name, []).append(v)
    return {k: torch.cat(v) for k, v in feats.items()}, torch.stack(labels)


def probe(train: torch.Tensor, ytrain: torch.Tensor, val: torch.Tensor, yval: torch.Tensor,
          num_classes: int, steps: int = 300, seed: int = 0) -> dict[str, float]:
    """Train a 1x1-conv classifier on standardised ``train`` maps; score it on ``val``."""
    torch.manual_seed(seed)
    S = ytrain.shape[-1]
    mu = train.mean((0, 2, 3), keepdim=True)
    sd = train.std((0, 2, 3), keepdim=True) + 1e-5
    x, xv = (train - mu) / sd, (val - mu) / sd
    head = torch.nn.Conv2d(x.shape[1], num_classes, 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        sel = torch.randint(0, len(x), (64,))
        logits = F.interpolate(head(x[sel]), size=(S, S), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, ytrain[sel], ignore_index=IGNORE)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = F.interpolate(head(xv), size=(S, S), mode="bilinear",
                             align_corners=False).argmax(1)
    fg = (yval > 0) & (yval != IGNORE)
    seen = fg & (pred > 0)
    return {"fg_acc": float((pred[fg] == yval[fg]).float().mean()),
            "shape_acc": float((pred[seen] == yval[seen]).float().mean()),
            "channels": int(x.shape[1]), "side": int(x.shape[-1])}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path, help="run folders with model_final.safetensors")
    ap.add_argument("--backbone", type=Path, action="append", default=[],
                    help="a pretrained Swin state dict (gres.pretrain cache), repeatable")
    ap.add_argument("--preset", default="cpu-small", help="architecture of --backbone")
    ap.add_argument("--data-root", type=Path, default=ROOT / "data" / "synthetic")
    ap.add_argument("--train-images", type=int, default=800)
    ap.add_argument("--val-images", type=int, default=300)
    ap.add_argument("--out", type=Path, help="write the table as CSV")
    args = ap.parse_args(argv)
    if not args.runs and not args.backbone:
        ap.error("give run folders and/or --backbone files")
    torch.set_num_threads(1)
    rows = []
    sources = [("run", r) for r in args.runs] + [("backbone", b) for b in args.backbone]
    for kind, src in sources:
        if kind == "run":
            get = lambda split, n: run_features(src, args.data_root, split, n, 0)  # noqa: E731
            name = src.name
        else:
            get = lambda split, n: backbone_features(  # noqa: E731
                src, args.data_root, split, n, 0, args.preset)
            name = src.parent.name
        tr, ytr = get("train", args.train_images)
        va, yva = get("val", args.val_images)
        k = int(max(ytr[ytr != IGNORE].max(), yva[yva != IGNORE].max())) + 1
        for m in tr:
            r = probe(tr[m], ytr, va[m], yva, k)
            rows.append({"source": name, "map": m, **r})
            print(f"{name:28s} {m:22s} C={r['channels']:4d} {r['side']:3d}px  "
                  f"fg_acc {r['fg_acc']:.3f}  shape_acc {r['shape_acc']:.3f}", flush=True)
    df = pd.DataFrame(rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out, index=False, float_format="%.4f")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
