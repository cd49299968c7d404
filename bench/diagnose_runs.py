"""Diagnose trained runs from their validation records (``<run>/eval/val_records.csv``, written by
``gres train``): where the gIoU is lost, per kind of synthetic expression.

Subcommands (each takes run folders and prints CSV):

* ``kinds``: gIoU per kind of expression (single-attribute split into "with colour" and
  "shape only", no-target expressions by their phenomenon), one column per run.
* ``selection``: for target expressions, per kind: IoU, the share of predictions that find the
  target (cover > 80 % of it) or miss it (< 20 %), the precision of the found ones and the median
  ratio of predicted to true area (above 1: the prediction also covers other objects).
* ``nt``: how well the no-target probability separates no-target from target expressions (AUC)
  and what gIoU / N-acc / T-acc other decision thresholds would give.

Example::

    .venv/bin/python bench/diagnose_runs.py selection runs/a runs/b > bench/results/sel.csv
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

# colour words of the synthetic generator and their synonyms (gres.data.synthetic)
SHAPE_ONLY_EXCLUDES = {"violet", "grey", "gray", "pink", "lime", "navy", "crimson", "scarlet",
                       "golden", "amber", "azure", "emerald", "lilac", "ivory", "snow"}


def expression_kinds(data_root: Path, split: str = "val") -> dict[int, str]:
    """sent_id -> kind, from the synthetic ``grefs(unc).json`` (fields ``expr_kind`` and
    ``phenomenon`` written by the generator)."""
    from gres.data.synthetic import COLORS

    colour_words = set(COLORS) | SHAPE_ONLY_EXCLUDES
    refs = json.loads((data_root / "grefcoco" / "grefs(unc).json").read_text())
    kinds = {}
    for ref in refs:
        if ref["split"] != split:
            continue
        for s in ref["sentences"]:
            k = s["expr_kind"]
            if ref["no_target"]:
                k = "nt-" + s.get("phenomenon", "?")
            elif k == "single-attribute":
                k += "-with-colour" if set(s["sent"].lower().split()) & colour_words \
                    else "-shape-only"
            kinds[s["sent_id"]] = k
    return kinds


def load_records(run: Path, kinds: dict[int, str]) -> pd.DataFrame:
    path = run / "eval" / "val_records.csv"
    if not path.exists():
        sys.exit(f"{path} not found: train the run to the end first (gres train writes it)")
    rec = pd.read_csv(path)
    rec["kind"] = rec.sent_id.map(kinds)
    if rec.kind.isna().any():
        sys.exit(f"{path}: {int(rec.kind.isna().sum())} sentence ids are not in the dataset's "
                 "val split (another dataset?)")
    rec["gt_nt"] = rec.gt_nt.astype(bool)
    return rec


def kinds_table(runs: list[Path], kinds: dict[int, str]) -> pd.DataFrame:
    cols, n = {}, None
    for run in runs:
        rec = load_records(run, kinds)
        cols[run.name] = (100 * rec.groupby("kind").IoU.mean()).round(1)
        if n is None:  # sample counts per kind (the same split for every run)
            n = rec.groupby("kind").size().rename("n")
    return pd.concat([n, pd.DataFrame(cols)], axis=1).rename_axis("kind").reset_index()


def selection_table(runs: list[Path], kinds: dict[int, str]) -> pd.DataFrame:
    rows = []
    for run in runs:
        rec = load_records(run, kinds)
        t = rec[~rec.gt_nt]
        # one attribute row: the colour / shape-only split does not matter here
        kind = t.kind.str.replace(r"-(with-colour|shape-only)$", "", regex=True)
        for k, g in t.groupby(kind):
            recall = g.mask_I / g.gt_area.clip(lower=1)
            found = recall > 0.8
            rows.append(dict(
                run=run.name, kind=k, n=len(g), IoU=round(g.IoU.mean(), 3),
                found=round(found.mean(), 3), missed=round((recall < 0.2).mean(), 3),
                precision_found=round((g.mask_I / g.pred_area.clip(lower=1))[found].mean(), 3),
                area_ratio_median=round(float(np.median(g.pred_area / g.gt_area.clip(lower=1))),
                                        2)))
    return pd.DataFrame(rows)


def nt_table(runs: list[Path], kinds: dict[int, str],
             thresholds=(0.3, 0.4, 0.5, 0.6)) -> pd.DataFrame:
    rows = []
    for run in runs:
        rec = load_records(run, kinds)
        y, p = rec.gt_nt.to_numpy(), rec.nt_prob.to_numpy()
        ranks = pd.Series(p).rank().to_numpy()  # Mann-Whitney AUC, ties averaged
        auc = (ranks[y].sum() - y.sum() * (y.sum() + 1) / 2) / (y.sum() * (~y).sum())
        # mask IoU as if the sample were kept (the official evaluator zeroes I on a rejection)
        mask_iou = np.where(rec.mask_U > 0, rec.mask_I / rec.mask_U.clip(lower=1), 0.0)
        for t in thresholds:
            pred = p > t
            giou = np.where(y, pred, np.where(pred, 0.0, mask_iou)).mean()
            rows.append(dict(run=run.name, auc=round(auc, 3), threshold=t,
                             gIoU=round(100 * giou, 1), N_acc=round(100 * pred[y].mean(), 1),
                             T_acc=round(100 * (~pred[~y]).mean(), 1)))
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("kinds", "selection", "nt"))
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (gres train --out)")
    ap.add_argument("--data-root", type=Path, default=Path("data/synthetic"),
                    help="the synthetic dataset the runs were evaluated on")
    args = ap.parse_args(argv)
    kinds = expression_kinds(args.data_root)
    table = {"kinds": kinds_table, "selection": selection_table, "nt": nt_table}[args.command]
    print(table(args.runs, kinds).to_csv(index=False), end="")


if __name__ == "__main__":
    main()
