#!/usr/bin/env python
"""Draw the book's static pictures (used by README.md and book/00_intro.md).

    python data_prep/make_readme_figure.py [--out book]

Writes, deterministically (no randomness, no data needed):

* ``gres_overview.png``: RES versus GRES on one procedurally drawn scene. (a) a single-target
  expression (classic RES and GRES), (b) a multi-target expression and (c) a no-target expression
  (GRES only), with the ground truth drawn by :func:`gres.viz.overlay` (orange, "no target"
  badge);
* ``rela_overview.png``: a block diagram of ReLA (paper Fig. 4): Swin + BERT encoders, pixel
  decoder, the ReLAtionship block (RIA, RLA) over P x P region queries, and its three outputs
  (region masks M_r, minimap x_r, no-target score E) fused by Eq. 1, M = sum_n x_r^n M_r^n.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from gres import viz  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZE = 256  # scene side in pixels


# --------------------------------------------------------------------------------------------------
# Scene
# --------------------------------------------------------------------------------------------------
def _disk(cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _box(y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _triangle(cy: float, cx: float, half: float) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    top, bottom = cy - half, cy + half
    inside_y = (yy >= top) & (yy <= bottom)
    width = (yy - top) / (2 * half) * half  # grows linearly from the apex
    return inside_y & (np.abs(xx - cx) <= width)


def make_scene() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A 256x256 RGB scene and its instance masks (deterministic)."""
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
    img = np.stack([0.86 - 0.10 * yy, 0.88 - 0.06 * yy, 0.84 + 0.06 * xx], axis=-1)
    img += 0.025 * np.sin(24 * xx)[..., None] * np.cos(17 * yy)[..., None]  # soft texture
    instances = {
        "red circle left": _disk(150, 55, 30),
        "red circle right": _disk(95, 190, 26),
        "blue square": _box(160, 120, 220, 180),
        "green triangle": _triangle(70, 85, 34),
    }
    colours = {
        "red circle left": (0.80, 0.20, 0.17),
        "red circle right": (0.80, 0.20, 0.17),
        "blue square": (0.20, 0.35, 0.72),
        "green triangle": (0.18, 0.55, 0.30),
    }
    for name, mask in instances.items():
        shade = 0.9 + 0.1 * (1 - yy)  # light from the top
        img[mask] = np.asarray(colours[name])[None] * shade[mask][:, None]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), instances


def gres_overview(path: Path) -> Path:
    """RES vs GRES: single-, multi- and no-target expressions on the same scene."""
    viz.use_book_style(svg=False)
    image, inst = make_scene()
    empty = np.zeros((SIZE, SIZE), dtype=bool)
    panels = [
        ("(a) single target — RES and GRES", "“the red circle on the left”",
         inst["red circle left"]),
        ("(b) multi-target — GRES only", "“all red circles”",
         inst["red circle left"] | inst["red circle right"]),
        ("(c) no target — GRES only", "“the yellow star”", empty),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(viz.FULL, viz.FULL / 3 * 1.22))
    for ax, (heading, expression, mask) in zip(axes, panels):
        viz.overlay(image, gt_mask=mask, title=f"{heading}\n{expression}", ax=ax, wrap=34)
    fig.tight_layout()
    return viz.savefig(fig, path, close=True)


# --------------------------------------------------------------------------------------------------
# ReLA diagram
# --------------------------------------------------------------------------------------------------
def _node(ax, x, y, w, h, text, color, fontsize=7.5, bold=False):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h,
                                boxstyle="round,pad=0.02,rounding_size=0.05",
                                facecolor=matplotlib.colors.to_rgba(color, 0.18), edgecolor=color,
                                linewidth=1.1))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize,
            fontweight="bold" if bold else "normal")


def _arrow(ax, p, q, text=None, color="#444444", offset=(0.0, 0.06)):
    ax.add_patch(FancyArrowPatch(p, q, arrowstyle="-|>", mutation_scale=8, color=color, lw=0.9,
                                 shrinkA=2, shrinkB=2))
    if text:
        ax.text((p[0] + q[0]) / 2 + offset[0], (p[1] + q[1]) / 2 + offset[1], text,
                ha="center", va="center", fontsize=7, style="italic", color="#333333")


def rela_overview(path: Path) -> Path:
    """Block diagram of ReLA (paper Fig. 4 and Eq. 1)."""
    viz.use_book_style(svg=False)
    fig, ax = plt.subplots(figsize=(viz.FULL, 2.7))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 3.8)
    ax.set_axis_off()
    blue, orange, green, purple, grey = "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#666666"
    _node(ax, 0.75, 2.9, 1.2, 0.55, "image $I$\n480×480", grey)
    _node(ax, 0.75, 0.9, 1.2, 0.55, "expression $T$\n≤ 20 tokens", grey)
    _node(ax, 2.55, 2.9, 1.6, 0.65, "Swin-B encoder\n+ language fusion", blue)
    _node(ax, 2.55, 0.9, 1.6, 0.55, "BERT", blue)
    _node(ax, 4.6, 3.3, 1.5, 0.55, "pixel decoder", blue)
    _node(ax, 5.4, 1.65, 2.3, 1.35, "", purple)
    ax.text(5.4, 2.17, "ReLAtionship block", ha="center", va="center", fontsize=7.5,
            fontweight="bold")
    _node(ax, 4.85, 1.5, 0.95, 0.55, "RIA\nregion–image", purple, fontsize=6.8)
    _node(ax, 5.95, 1.5, 0.95, 0.55, "RLA\nregion–region\nregion–word", purple, fontsize=6.3)
    _node(ax, 4.0, 0.35, 1.9, 0.4, "P×P = 100 region queries", purple, fontsize=6.8)
    _node(ax, 7.6, 3.3, 1.3, 0.55, "region masks\n$M_r$ (100)", green, fontsize=7)
    _node(ax, 7.6, 2.05, 1.3, 0.55, "minimap $x_r$\n10×10", green, fontsize=7)
    _node(ax, 7.6, 0.8, 1.3, 0.55, "no-target\nscore $E$", green, fontsize=7)
    _node(ax, 9.25, 2.65, 1.3, 0.75, "mask\n$M = \\sum_n x_r^n M_r^n$\n(Eq. 1)", orange, fontsize=7,
          bold=False)
    _node(ax, 9.25, 0.8, 1.3, 0.55, "NT predicted:\nempty mask", orange, fontsize=7)
    _arrow(ax, (1.35, 2.9), (1.75, 2.9))
    _arrow(ax, (1.35, 0.9), (1.75, 0.9))
    _arrow(ax, (2.55, 1.18), (2.55, 2.57), "$F_t$", offset=(0.2, 0.0))
    _arrow(ax, (3.35, 3.05), (3.85, 3.25), "$F_i$", offset=(0.0, 0.14))
    _arrow(ax, (3.35, 2.75), (4.35, 2.0), "$F_i$", offset=(0.0, 0.12))
    _arrow(ax, (3.35, 0.9), (4.35, 1.3), "$F_t$", offset=(0.0, -0.12))
    _arrow(ax, (4.0, 0.55), (4.6, 1.22))
    _arrow(ax, (5.35, 3.3), (6.95, 3.3), "$F_m$", offset=(0.0, 0.12))
    _arrow(ax, (6.55, 2.2), (6.95, 3.05), "$F_f$", offset=(-0.15, 0.05))
    _arrow(ax, (6.55, 1.9), (6.95, 2.05), "$F_r$", offset=(0.0, 0.12))
    _arrow(ax, (6.55, 1.2), (6.95, 0.9))
    _arrow(ax, (8.25, 3.2), (8.6, 2.85))
    _arrow(ax, (8.25, 2.1), (8.6, 2.45))
    _arrow(ax, (8.25, 0.8), (8.6, 0.8))
    fig.tight_layout()
    return viz.savefig(fig, path, close=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "book"), help="output folder (default: book/)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    for fn, name in ((gres_overview, "gres_overview.png"), (rela_overview, "rela_overview.png")):
        print(f"wrote {fn(out / name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
