"""Does a trained ReLA model's minimap know which object the expression means?

For validation expressions with targets, per kind of synthetic expression: the IoU of the model's
mask; the IoU after gating that mask with the minimap (pixels whose minimap cell, nearest or
bilinear upsampling, has a target probability above a threshold); and the mean minimap probability
of the cells the target covers against the cells the prediction covers *outside* the target (the
look-alikes it segments as well). If the minimap singled out the target, gating would remove the
look-alikes and raise the IoU, and the two probabilities would be far apart.

    .venv/bin/python bench/diagnose_minimap.py RUN [RUN ...] --samples 1200 \
        > bench/results/s9_minimap.csv

RUN is a ``gres train`` folder (``config.json`` + ``model_final.safetensors``) of a ReLA model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

COLUMNS = ("IoU", "gated_nearest_0.5", "gated_nearest_0.3", "gated_bilinear_0.3",
           "p_target_cells", "p_lookalike_cells")


def diagnose(run: Path, data_root: Path, samples: int) -> pd.DataFrame:
    from diagnose_runs import expression_kinds

    from gres.config import ExperimentConfig, from_dict
    from gres.engine import build_collate, build_dataset, load_weights, prepare_model
    from gres.model.gres_model import postprocess

    cfg = from_dict(ExperimentConfig, json.loads((run / "config.json").read_text()))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(data_root)))
    if cfg.model.head != "rela":
        raise SystemExit(f"{run}: head {cfg.model.head!r} has no minimap")
    model = prepare_model(cfg, load_pretrained=False)
    load_weights(model, run / "model_final.safetensors")
    model.eval()
    ds = build_dataset(cfg, "val")
    kinds = expression_kinds(data_root)
    grid = cfg.model.decoder.region_grid
    step = max(1, len(ds) // samples)
    indices = list(range(0, len(ds), step))[:samples]  # evenly spread over the split
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    collate = build_collate()
    with torch.no_grad():
        for start in range(0, len(indices), 32):
            items = [ds[i] for i in indices[start:start + 32]]
            batch = collate(items)
            out = model(batch.image, batch.input_ids, batch.text_mask)
            size = batch.gt_mask.shape[-1]
            pred = postprocess(out, size)[0]  # (B, S, S)
            prob = out.region_logits.float().softmax(-1)[..., 1].reshape(-1, 1, grid, grid)
            near = F.interpolate(prob, size=(size, size), mode="nearest")[:, 0]
            bil = F.interpolate(prob, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
            gt = batch.gt_mask.bool()
            gt_cells = F.adaptive_avg_pool2d(gt[:, None].float(), grid).flatten(1)  # (B, P)
            pred_cells = F.adaptive_avg_pool2d(pred[:, None].float(), grid).flatten(1)
            prob = prob.flatten(1)
            for j, item in enumerate(items):
                kind = kinds[item["meta"]["sent_id"]]
                if kind.startswith("nt-"):
                    continue

                def iou(mask: torch.Tensor) -> float:
                    union = (mask | gt[j]).sum().item()
                    return (mask & gt[j]).sum().item() / union if union else 1.0

                a = acc[kind]
                a["IoU"].append(iou(pred[j]))
                a["gated_nearest_0.5"].append(iou(pred[j] & (near[j] > 0.5)))
                a["gated_nearest_0.3"].append(iou(pred[j] & (near[j] > 0.3)))
                a["gated_bilinear_0.3"].append(iou(pred[j] & (bil[j] > 0.3)))
                target = gt_cells[j] > 0.05
                lookalike = (pred_cells[j] > 0.05) & (gt_cells[j] == 0)
                if target.any():
                    a["p_target_cells"].append(prob[j][target].mean().item())
                if lookalike.any():
                    a["p_lookalike_cells"].append(prob[j][lookalike].mean().item())
    rows = [{"run": run.name, "kind": kind, "n": len(a["IoU"]),
             **{c: round(float(np.mean(a[c])), 3) if a[c] else float("nan") for c in COLUMNS}}
            for kind, a in sorted(acc.items())]
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data-root", type=Path, default=ROOT / "data" / "synthetic")
    parser.add_argument("--samples", type=int, default=1200,
                        help="validation expressions, evenly spread (no-target ones are skipped)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    frames = [diagnose(run, args.data_root, args.samples) for run in args.runs]
    pd.concat(frames).to_csv(sys.stdout, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
