"""All plotting code of the project (the book's chapters only call these functions).

Conventions (STYLE §3.6.7):

* :func:`use_book_style` sets a small rcParams set: 9-10 pt fonts, no top/right spines, the
  Okabe-Ito colour-blind-safe palette, figure widths :data:`FULL` = 7.0 in and :data:`HALF` =
  3.4 in, and SVG inline display in notebooks.
* Image overlays use one fixed colour pair: ground truth orange :data:`GT_COLOR` (#E69F00),
  prediction blue :data:`PRED_COLOR` (#0072B2), alpha 0.5 plus a contour line. The expression is
  the panel title. A visible "no target" badge appears when the ground truth or the prediction is
  empty (or flagged no-target).
* :func:`savefig` writes ``.svg`` for plots and ``.png`` at 150 dpi for figures holding images.

Inputs may be torch tensors or NumPy arrays: images ``(3, H, W)`` or ``(H, W, 3)``, uint8 0..255 or
float; masks ``(H, W)`` bool (any resolution: a mask is stretched over the image's extent).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Patch, Rectangle

# Okabe & Ito (2008) colour-blind-safe palette.
OKABE_ITO: tuple[str, ...] = (
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#009E73",  # bluish green
    "#F0E442",  # yellow
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#000000",  # black
)
# Line/bar cycle: blue first (ours), then the other distinguishable colours.
CYCLE: tuple[str, ...] = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9",
                          "#000000", "#F0E442")
GT_COLOR = "#E69F00"  # ground truth: orange
PRED_COLOR = "#0072B2"  # prediction: blue
PAPER_COLOR = "#999999"  # the paper's numbers in comparison plots
OVERLAY_ALPHA = 0.5
FULL = 7.0  # inches: full text width
HALF = 3.4  # inches: half text width
IMAGE_DPI = 150  # raster figures (image overlays)
NO_TARGET_TEXT = "no target"

BOOK_RC: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": matplotlib.cycler(color=list(CYCLE)),
    "axes.grid": False,
    "figure.figsize": (HALF, HALF * 0.75),
    "figure.dpi": 100,
    "figure.constrained_layout.use": False,
    "savefig.dpi": IMAGE_DPI,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    "svg.fonttype": "path",
    "image.interpolation": "nearest",
    "lines.linewidth": 1.3,
}


def use_book_style(svg: bool = True) -> None:
    """Apply the book's rcParams and, inside IPython, SVG inline figures."""
    matplotlib.rcParams.update(BOOK_RC)
    if not svg:
        return
    try:
        from IPython import get_ipython

        if get_ipython() is not None:
            from matplotlib_inline.backend_inline import set_matplotlib_formats

            set_matplotlib_formats("svg")
    except ImportError:  # plain Python without IPython: nothing to configure
        pass


# --------------------------------------------------------------------------------------------------
# Array helpers
# --------------------------------------------------------------------------------------------------
def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def to_image(image: Any) -> np.ndarray:
    """``(H, W, 3)`` array for ``imshow``: uint8 as is, floats scaled to ``[0, 1]``.

    Accepts ``(3, H, W)`` or ``(H, W, 3)`` (or ``(H, W)`` grey) tensors/arrays and PIL images.
    """
    arr = _np(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.transpose(arr, (1, 2, 0))
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"image must be (3, H, W) or (H, W, 3), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float32)
    if arr.max(initial=0.0) > 1.0:
        arr = arr / 255.0
    return np.clip(arr, 0.0, 1.0)


def to_mask(mask: Any) -> np.ndarray:
    """``(H, W)`` bool array (squeezes a leading singleton dimension)."""
    arr = _np(mask)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {arr.shape}")
    return arr.astype(bool)


def _wrap(title: str | None, width: int) -> str | None:
    if title is None:
        return None
    lines = [textwrap.wrap(line, width=width) or [""] for line in str(title).split("\n")]
    return "\n".join(part for parts in lines for part in parts)


def _new_axes(ax: plt.Axes | None, size: tuple[float, float]) -> tuple[Figure, plt.Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=size)
    return fig, ax


# --------------------------------------------------------------------------------------------------
# Overlays
# --------------------------------------------------------------------------------------------------
def _draw_mask(ax: plt.Axes, mask: np.ndarray, color: str, extent: tuple, name: str) -> None:
    rgba = np.zeros(mask.shape + (4,), dtype=np.float32)
    rgba[mask] = to_rgba(color, OVERLAY_ALPHA)
    im = ax.imshow(rgba, extent=extent, interpolation="nearest")
    im.set_gid(f"{name}-fill")
    if mask.any() and not mask.all():
        h, w = mask.shape
        x0, x1, y0, y1 = extent  # y0 is the bottom (imshow origin upper)
        xs = x0 + (np.arange(w) + 0.5) * (x1 - x0) / w
        ys = y1 + (np.arange(h) + 0.5) * (y0 - y1) / h
        cs = ax.contour(xs, ys, mask.astype(np.float32), levels=[0.5], colors=[color],
                        linewidths=1.2)
        cs.set_gid(f"{name}-contour")


def _legend_handles() -> list[Patch]:
    return [Patch(facecolor=to_rgba(GT_COLOR, OVERLAY_ALPHA), edgecolor=GT_COLOR,
                  label="ground truth"),
            Patch(facecolor=to_rgba(PRED_COLOR, OVERLAY_ALPHA), edgecolor=PRED_COLOR,
                  label="prediction")]


def _badge(ax: plt.Axes, text: str, color: str, slot: int, name: str) -> None:
    t = ax.text(
        0.03, 0.97 - 0.12 * slot, text, transform=ax.transAxes, ha="left", va="top", fontsize=7,
        fontweight="bold", color="white", zorder=10,
        bbox=dict(boxstyle="round,pad=0.25", facecolor=color, edgecolor="white", linewidth=0.8),
    )
    t.set_gid(name)


def overlay(
    image: Any,
    gt_mask: Any = None,
    pred_mask: Any = None,
    title: str | None = None,
    *,
    gt_no_target: bool | None = None,
    pred_no_target: bool | None = None,
    ax: plt.Axes | None = None,
    legend: bool | None = None,
    wrap: int = 36,
    size: float = HALF / 1.5,
) -> Figure:
    """Draw an image with the ground-truth and/or predicted mask.

    Args:
        image: ``(3, H, W)`` / ``(H, W, 3)``, uint8 0..255 or float.
        gt_mask: ``(h, w)`` bool, drawn in orange; ``None`` = not shown.
        pred_mask: ``(h, w)`` bool, drawn in blue; ``None`` = not shown.
        title: panel title, normally the expression (wrapped at ``wrap`` characters).
        gt_no_target: no-target label; default = ``gt_mask`` given and empty.
        pred_no_target: predicted no-target flag; default = ``pred_mask`` given and empty. The
            mask is drawn as given (the caller decides whether a no-target prediction is emptied).
        ax: draw into this axes instead of a new figure.
        legend: show a GT/prediction legend; default = both masks given.
        wrap: title wrap width in characters.
        size: side of a new figure in inches.

    Returns:
        The figure holding the axes. Artists carry gids (``gt-fill``, ``gt-contour``,
        ``pred-fill``, ``pred-contour``, ``badge-gt``, ``badge-pred``) for tests.
    """
    img = to_image(image)
    h, w = img.shape[:2]
    fig, ax = _new_axes(ax, (size, size))
    ax.imshow(img, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)
    gt = to_mask(gt_mask) if gt_mask is not None else None
    pred = to_mask(pred_mask) if pred_mask is not None else None
    if gt is not None:
        _draw_mask(ax, gt, GT_COLOR, extent, "gt")
    if pred is not None:
        _draw_mask(ax, pred, PRED_COLOR, extent, "pred")
    if gt_no_target is None:
        gt_no_target = gt is not None and not gt.any()
    if pred_no_target is None:
        pred_no_target = pred is not None and not pred.any()
    slot = 0
    if gt_no_target:
        label = NO_TARGET_TEXT if pred is None else f"GT: {NO_TARGET_TEXT}"
        _badge(ax, label, GT_COLOR, slot, "badge-gt")
        slot += 1
    if pred_no_target:
        _badge(ax, f"pred: {NO_TARGET_TEXT}", PRED_COLOR, slot, "badge-pred")
    if legend is None:
        legend = gt is not None and pred is not None
    if legend:
        ax.legend(handles=_legend_handles(), loc="lower right", fontsize=7, frameon=True,
                  framealpha=0.8, handlelength=1.0, borderpad=0.3)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    if title is not None:
        ax.set_title(_wrap(title, wrap), fontsize=8.5)
    return fig


def _sample_fields(sample: Any) -> dict[str, Any]:
    """Normalise a dataset sample dict (or a tuple) into overlay keyword arguments."""
    if isinstance(sample, Mapping):
        meta = sample.get("meta") or {}
        title = sample.get("title")
        if title is None and isinstance(meta, Mapping) and meta.get("sentence") is not None:
            title = f"“{meta['sentence']}”"
        nt = sample.get("gt_no_target", sample.get("no_target"))
        return dict(
            image=sample["image"],
            gt_mask=sample.get("gt_mask"),
            pred_mask=sample.get("pred_mask"),
            title=title,
            gt_no_target=None if nt is None else bool(_np(nt)),
            pred_no_target=(None if sample.get("pred_no_target") is None
                            else bool(_np(sample["pred_no_target"]))),
        )
    if isinstance(sample, (tuple, list)):
        keys = ("image", "gt_mask", "pred_mask", "title")
        return dict(zip(keys, sample))
    raise ValueError(f"a grid item must be a dict or a tuple, got {type(sample).__name__}")


def show_grid(
    samples: Sequence[Any],
    preds: Sequence[Any] | None = None,
    ncols: int = 4,
    titles: Sequence[str] | None = None,
    panel: float | None = None,
    wrap: int = 30,
    suptitle: str | None = None,
) -> Figure:
    """A grid of overlays, one panel per sample.

    Args:
        samples: dataset samples (dicts with ``image``, ``gt_mask``, ``no_target`` and
            ``meta["sentence"]``, as :class:`gres.data.dataset.GRESDataset` returns them; or
            dicts with ``title``/``pred_mask``/``pred_no_target``) or tuples
            ``(image, gt_mask, pred_mask, title)``.
        preds: optional predictions, one per sample: a bool mask or a dict with ``pred_mask``
            and ``pred_no_target``.
        ncols: panels per row.
        titles: override the panel titles.
        panel: panel side in inches (default: :data:`FULL` / ``ncols``).
        wrap: title wrap width.
        suptitle: figure title.
    """
    n = len(samples)
    if n == 0:
        raise ValueError("show_grid needs at least one sample")
    if preds is not None and len(preds) != n:
        raise ValueError(f"got {len(preds)} predictions for {n} samples")
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    panel = panel or FULL / ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel * ncols, panel * nrows * 1.12),
                             squeeze=False)
    has_pred = False
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        kw = _sample_fields(samples[i])
        if preds is not None:
            p = preds[i]
            if isinstance(p, Mapping):
                kw["pred_mask"] = p.get("pred_mask")
                if p.get("pred_no_target") is not None:
                    kw["pred_no_target"] = bool(_np(p["pred_no_target"]))
            else:
                kw["pred_mask"] = p
        if titles is not None:
            kw["title"] = titles[i]
        overlay(ax=ax, wrap=wrap, legend=False, **kw)
        has_pred = has_pred or kw.get("pred_mask") is not None
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    if has_pred:  # one legend for the whole grid, below the panels
        fig.legend(handles=_legend_handles(), loc="lower center", ncol=2, frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
        fig.subplots_adjust(bottom=max(fig.subplotpars.bottom, 0.35 / (panel * nrows * 1.12)))
    return fig


# --------------------------------------------------------------------------------------------------
# Minimap and region masks (paper Fig. 7)
# --------------------------------------------------------------------------------------------------
def _grid_side(p: int) -> int:
    r = math.isqrt(p)
    if r * r != p:
        raise ValueError(f"{p} regions do not form a square grid (P = R * R)")
    return r


def plot_minimap(
    region_probs: Any,
    grid: int | None = None,
    image: Any = None,
    gt_mask: Any = None,
    title: str | None = None,
    annotate: bool | None = None,
    ax: plt.Axes | None = None,
) -> Figure:
    """The predicted minimap: probability that each region contains a target.

    Args:
        region_probs: ``(P,)`` or ``(R, R)`` probabilities in ``[0, 1]`` (e.g.
            ``softmax(region_logits, -1)[..., 1]``); region ``q`` is cell ``(q // R, q % R)``.
        grid: ``R``; default ``sqrt(P)``.
        image: optional image shown on the left with the R x R grid (and ``gt_mask``).
        gt_mask: optional ground truth drawn on that image.
        title: title of the minimap panel (``title`` of the image panel is the expression if
            given through ``image`` callers).
        annotate: print the values in the cells (default: R <= 10).
        ax: draw the minimap into this axes (``image`` must then be None).

    Raises:
        ValueError: not a square grid, or values outside ``[0, 1]`` (logits passed by mistake).
    """
    probs = _np(region_probs).astype(np.float32)
    if probs.ndim == 1:
        r = grid or _grid_side(probs.size)
        if r * r != probs.size:
            raise ValueError(f"grid {r} does not match {probs.size} regions")
        probs = probs.reshape(r, r)
    elif probs.ndim != 2 or probs.shape[0] != probs.shape[1]:
        raise ValueError(f"region_probs must be (P,) or (R, R), got shape {probs.shape}")
    r = probs.shape[0]
    if probs.min() < -1e-6 or probs.max() > 1 + 1e-6:
        raise ValueError("region_probs must be probabilities in [0, 1]; apply softmax/sigmoid "
                         "to the logits first")
    if image is not None and ax is not None:
        raise ValueError("pass either image (two panels) or ax (one panel), not both")
    if image is not None:
        fig, (ax_img, ax) = plt.subplots(1, 2, figsize=(HALF * 1.6, HALF * 0.85))
        overlay(image, gt_mask=gt_mask, ax=ax_img, legend=False)
        img = to_image(image)
        h, w = img.shape[:2]
        for k in range(1, r):
            ax_img.axhline(k * h / r - 0.5, color="white", lw=0.4, alpha=0.7)
            ax_img.axvline(k * w / r - 0.5, color="white", lw=0.4, alpha=0.7)
    else:
        fig, ax = _new_axes(ax, (HALF * 0.85, HALF * 0.85))
    im = ax.imshow(probs, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    im.set_gid("minimap")
    if annotate is None:
        annotate = r <= 10
    if annotate:
        for (i, j), v in np.ndenumerate(probs):
            ax.text(j, i, f"{v:.1f}", ha="center",
                    va="center", fontsize=5.5, color="white" if v < 0.6 else "black")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"predicted minimap ({r}×{r})")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return fig


def plot_region_masks(
    region_masks: Any,
    region_ids: Sequence[int] | None = None,
    region_probs: Any = None,
    k: int | None = None,
    ncols: int = 4,
    logits: bool = True,
    image: Any = None,
) -> Figure:
    """Region masks ``M_r`` of chosen regions (paper Fig. 7), each with its minimap cell boxed.

    Args:
        region_masks: ``(P, h, w)`` logits (``logits=True``, a sigmoid is applied) or
            probabilities.
        region_ids: regions to show; default = the ``k`` most probable by ``region_probs`` if
            given, else the first ``k``.
        region_probs: ``(P,)`` minimap probabilities, printed in the panel titles.
        k: number of regions when ``region_ids`` is None (default: two rows of panels).
        ncols: panels per row.
        logits: whether ``region_masks`` are logits.
        image: optional image shown as the first panel.
    """
    masks = _np(region_masks).astype(np.float32)
    if masks.ndim != 3:
        raise ValueError(f"region_masks must be (P, h, w), got shape {masks.shape}")
    p, h, w = masks.shape
    r = _grid_side(p)
    probs = None if region_probs is None else _np(region_probs).astype(np.float32).reshape(-1)
    if probs is not None and probs.size != p:
        raise ValueError(f"region_probs has {probs.size} values for {p} region masks")
    if region_ids is None:
        k = k if k is not None else 2 * ncols - (image is not None)
        order = np.argsort(-probs, kind="stable") if probs is not None else np.arange(p)
        region_ids = [int(q) for q in order[: min(k, p)]]
    bad = [q for q in region_ids if not 0 <= int(q) < p]
    if bad:
        raise ValueError(f"region ids {bad} out of range 0..{p - 1}")
    if logits:
        masks = 1.0 / (1.0 + np.exp(-np.clip(masks, -60, 60)))
    panels = len(region_ids) + (image is not None)
    ncols = max(1, min(ncols, panels))
    nrows = math.ceil(panels / ncols)
    side = FULL / ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(side * ncols, side * nrows * 1.1),
                             squeeze=False)
    flat = list(axes.flat)
    if image is not None:
        overlay(image, ax=flat.pop(0), title="image")
    for ax, q in zip(flat, region_ids):
        q = int(q)
        im = ax.imshow(masks[q], cmap="magma", vmin=0.0, vmax=1.0)
        im.set_gid(f"region-{q}")
        row, col = divmod(q, r)
        ax.add_patch(Rectangle((col * w / r - 0.5, row * h / r - 0.5), w / r, h / r, fill=False,
                               edgecolor="#56B4E9", lw=1.0))
        label = f"region {q}" + (f", x={probs[q]:.2f}" if probs is not None else "")
        ax.set_title(label, fontsize=8)
        ax.set_axis_off()
    for ax in flat[len(region_ids):]:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def plot_prediction(
    image: Any,
    pred_mask: Any,
    minimap: Any,
    *,
    title: str | None = None,
    gt_mask: Any = None,
    gt_no_target: bool | None = None,
    pred_no_target: bool | None = None,
    nt_prob: float | None = None,
) -> Figure:
    """One answer of the model: the mask overlay and the minimap side by side (demo panels).

    Args:
        image: the image (any resolution; masks are stretched over it).
        pred_mask: ``(h, w)`` bool predicted mask (blue).
        minimap: ``(R, R)`` or ``(P,)`` probabilities that each region holds a target.
        title: overlay title, normally the expression.
        gt_mask: optional ground truth (orange).
        gt_no_target: ground-truth no-target label (default: ``gt_mask`` given and empty).
        pred_no_target: the model's no-target decision (a "pred: no target" badge).
        nt_prob: P(no target), printed under the overlay when given.

    Returns:
        A two-panel figure (overlay gids as in :func:`overlay`, minimap image gid ``minimap``).
    """
    fig, (ax_img, ax_map) = plt.subplots(1, 2, figsize=(FULL * 0.62, HALF * 0.95),
                                         gridspec_kw={"width_ratios": (1.0, 1.1)})
    overlay(image, gt_mask=gt_mask, pred_mask=pred_mask, title=title, gt_no_target=gt_no_target,
            pred_no_target=pred_no_target, ax=ax_img)
    if nt_prob is not None:
        ax_img.text(0.5, -0.04, f"P(no target) = {nt_prob:.2f}", transform=ax_img.transAxes,
                    ha="center", va="top", fontsize=8).set_gid("nt-prob")
    plot_minimap(minimap, ax=ax_map)
    fig.tight_layout()
    return fig


def plot_attention_masks(
    attn_probs: Sequence[Any],
    region_ids: Sequence[int],
    *,
    allowed: Sequence[Any] | None = None,
    image: Any = None,
    threshold: float = 0.5,
    panel: float | None = None,
) -> Figure:
    """Region-image attention masks of chosen regions, one column per decoder layer.

    In ReLA's RIA (paper Sec. 3.2, Eq. 2; official masked attention) a region may attend only to
    the pixels where its current region mask, resized to that layer's feature level, has
    ``sigmoid >= threshold``. Each panel shows that probability (magma) over the image, with the
    allowed area outlined (cyan); a panel whose allowed area is the whole map says so in its title
    (rows that would block every pixel are unblocked entirely, as in the official code).

    Args:
        attn_probs: one ``(P, h_l, w_l)`` array of probabilities per layer (levels may differ).
        region_ids: regions to show, one row each.
        allowed: per layer, the ``(P, h_l, w_l)`` bool mask actually used (True = may attend);
            default ``attn_probs >= threshold``.
        image: optional image drawn in grey under every panel.
        threshold: the attention-mask threshold (0.5 in ReLA).
        panel: panel side in inches (default: :data:`FULL` / number of layers, at most 1.6).

    Returns:
        The figure; each map carries the gid ``attn-<layer>-<region>``.
    """
    maps = [_np(a).astype(np.float32) for a in attn_probs]
    if not maps:
        raise ValueError("attn_probs is empty: pass one (P, h, w) array per layer")
    if any(m.ndim != 3 for m in maps):
        raise ValueError(f"every layer needs a (P, h, w) array, got {[m.shape for m in maps]}")
    p = maps[0].shape[0]
    if any(m.shape[0] != p for m in maps):
        raise ValueError(f"layers disagree on the number of regions: {[m.shape[0] for m in maps]}")
    if any(m.min() < -1e-6 or m.max() > 1 + 1e-6 for m in maps):
        raise ValueError("attn_probs must be probabilities in [0, 1] (apply a sigmoid first)")
    masks = ([m >= threshold for m in maps] if allowed is None
             else [_np(a).astype(bool) for a in allowed])
    if len(masks) != len(maps) or any(a.shape != m.shape for a, m in zip(masks, maps)):
        raise ValueError("allowed must have one mask per layer, each shaped like attn_probs")
    bad = [q for q in region_ids if not 0 <= int(q) < p]
    if bad or not region_ids:
        raise ValueError(f"region ids {bad or list(region_ids)} not in 0..{p - 1}")
    n_layers, n_rows = len(maps), len(region_ids)
    panel = panel or min(1.6, FULL / n_layers)
    fig, axes = plt.subplots(n_rows, n_layers, figsize=(panel * n_layers, panel * n_rows * 1.15),
                             squeeze=False)
    grey = None
    if image is not None:
        grey = to_image(image).astype(np.float32).mean(axis=-1)
        grey = grey / max(float(grey.max()), 1e-6)
    for row, q in enumerate(region_ids):
        q = int(q)
        for layer, (m, a) in enumerate(zip(maps, masks)):
            ax = axes[row, layer]
            h, w = m.shape[1:]
            extent = (-0.5, w - 0.5, h - 0.5, -0.5)
            if grey is not None:
                ax.imshow(grey, cmap="gray", extent=extent, vmin=0, vmax=1)
            im = ax.imshow(m[q], cmap="magma", vmin=0.0, vmax=1.0, extent=extent,
                           alpha=0.75 if grey is not None else 1.0)
            im.set_gid(f"attn-{layer}-{q}")
            allow = a[q]
            if allow.any() and not allow.all():
                ys, xs = np.arange(h), np.arange(w)
                ax.contour(xs, ys, allow.astype(np.float32), levels=[0.5], colors=["#56B4E9"],
                           linewidths=1.0)
            note = " (all)" if allow.all() else ""
            if row == 0:
                ax.set_title(f"layer {layer}: {h}×{w}{note}", fontsize=7.5)
            elif note:
                ax.set_title(note.strip(" ()"), fontsize=7)
            ax.set_xlim(-0.5, w - 0.5)
            ax.set_ylim(h - 0.5, -0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_ylabel(f"region {q}", fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# Choosing examples by rule (qualitative figures) and rendering the model's answers
# --------------------------------------------------------------------------------------------------
EXAMPLE_KINDS = ("single", "multi", "no-target")  # expr_type 0, 1, 2 (data contract)

# rule -> (description, filter, sort key); records as written by gres.engine.evaluate
EXAMPLE_RULES: dict[str, tuple[str, Any, Any]] = {
    "best-multi": ("multi-target expressions, highest IoU first",
                   lambda r: r["kind"] == "multi", lambda r: (-r["IoU"], r["index"])),
    "best-single": ("single-target expressions, highest IoU first",
                    lambda r: r["kind"] == "single", lambda r: (-r["IoU"], r["index"])),
    "worst-target": ("expressions with targets, lowest IoU first (larger targets first on ties)",
                     lambda r: not r["gt_nt"], lambda r: (r["IoU"], -r["gt_area"], r["index"])),
    "worst-multi": ("multi-target expressions, lowest IoU first (larger targets first on ties)",
                    lambda r: r["kind"] == "multi",
                    lambda r: (r["IoU"], -r["gt_area"], r["index"])),
    "missed-no-target": ("no-target expressions the model answers with a target (official FN), "
                         "most confident first",
                         lambda r: r["gt_nt"] and not r["pred_nt"],
                         lambda r: (r["nt_prob"], -r["pred_area"], r["index"])),
    "false-rejection": ("expressions with targets the model calls no-target (official FP), "
                        "most confident first",
                        lambda r: not r["gt_nt"] and r["pred_nt"],
                        lambda r: (-r["nt_prob"], r["index"])),
    "detected-no-target": ("no-target expressions the model rejects (official TP), most "
                           "confident first", lambda r: r["gt_nt"] and r["pred_nt"],
                           lambda r: (-r["nt_prob"], r["index"])),
}


def _kind(expr_type: Any) -> str:
    return expr_type if isinstance(expr_type, str) else EXAMPLE_KINDS[int(expr_type)]


def select_records(
    records: Sequence[Mapping[str, Any]],
    rule: str,
    k: int = 3,
    distinct_images: bool = True,
) -> list[dict[str, Any]]:
    """The ``k`` evaluation records that a rule of :data:`EXAMPLE_RULES` ranks first.

    Figures of successes and failures are chosen by rule, never by hand: each rule filters the
    per-sample records of :func:`gres.engine.evaluate` (keys ``index``, ``image_id``,
    ``expr_type``, ``gt_nt``, ``pred_nt``, ``nt_prob``, ``IoU``, ``pred_area``, ``gt_area``) and
    sorts them; ties are broken by the dataset index, so the choice is deterministic.

    Args:
        records: per-sample evaluation records.
        rule: a key of :data:`EXAMPLE_RULES`.
        k: how many to return (fewer when fewer match).
        distinct_images: at most one record per image.

    Returns:
        Copies of the chosen records with ``kind`` (single / multi / no-target) and ``rule`` added.

    Raises:
        ValueError: unknown rule, or records lacking a needed key.
    """
    if rule not in EXAMPLE_RULES:
        raise ValueError(f"unknown rule {rule!r}; known: {sorted(EXAMPLE_RULES)}")
    _, keep, key = EXAMPLE_RULES[rule]
    need = ("index", "expr_type", "gt_nt", "pred_nt", "nt_prob", "IoU", "pred_area", "gt_area")
    rows = []
    for r in records:
        missing = [n for n in need if n not in r]
        if missing:
            raise ValueError(f"record {r.get('index')} lacks {missing} (use gres.engine records)")
        rows.append({**r, "kind": _kind(r["expr_type"]), "rule": rule})
    chosen, images = [], set()
    for r in sorted((r for r in rows if keep(r)), key=key):
        if distinct_images and r.get("image_id") is not None:
            if r["image_id"] in images:
                continue
            images.add(r["image_id"])
        chosen.append(r)
        if len(chosen) == k:
            break
    return chosen


def predict_examples(
    model: Any, dataset: Any, indices: Sequence[int], device: Any = "cpu"
) -> list[dict[str, Any]]:
    """Run a GRES model on dataset samples; one :func:`show_grid`-ready dict per sample.

    Args:
        model: a :class:`gres.model.GRESModel` (or variant), any mode (run under ``no_grad`` in
            eval mode, restored afterwards).
        dataset: a :class:`gres.data.dataset.GRESDataset`.
        indices: sample indices.
        device: where to run.

    Returns:
        Dicts with the sample's ``image``, ``gt_mask``, ``no_target``, ``meta`` and the answer:
        ``pred_mask`` (S, S) bool as predicted (not emptied on a no-target decision, as in the
        official evaluator), ``pred_no_target`` (official argmax rule), ``nt_prob`` (softmax
        probability of "no target"), ``minimap`` (R, R) region probabilities (None for heads
        without regions), ``IoU`` = the official per-sample gIoU term (no-target ground truth: 1
        if rejected else 0; targets: 0 if rejected, else I/U of the mask) and ``mask_IoU`` = I/U
        of the mask alone (1 when both masks are empty).
    """
    import torch

    from gres.data.dataset import collate
    from gres.model import postprocess

    indices = [int(i) for i in indices]
    if not indices:
        return []
    samples = [dataset[i] for i in indices]
    batch = collate(samples).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(batch.image, batch.input_ids, batch.text_mask)
    finally:
        model.train(was_training)
    pred, pred_nt, _ = postprocess(out, tuple(batch.gt_mask.shape[-2:]))  # (B, S, S), (B,)
    nt_prob = out.nt_logits.float().softmax(-1)[:, 1]  # (B,)
    regions = out.region_logits.float().softmax(-1)[..., 1]  # (B, P)
    side = math.isqrt(regions.shape[1])
    result = []
    for k, (i, s) in enumerate(zip(indices, samples)):
        p, g = pred[k].cpu(), s["gt_mask"]
        union = int((p | g).sum())
        mask_iou = int((p & g).sum()) / union if union else float(not g.any())
        rejected, gt_nt = bool(pred_nt[k]), bool(s["no_target"])
        result.append({
            "index": i, "image": s["image"], "gt_mask": g, "no_target": s["no_target"],
            "meta": s["meta"], "pred_mask": p, "pred_no_target": bool(pred_nt[k]),
            "nt_prob": float(nt_prob[k]),
            "minimap": regions[k].reshape(side, side).cpu() if side > 1 else None,
            "IoU": float(rejected) if gt_nt else (0.0 if rejected or not union else mask_iou),
            "mask_IoU": mask_iou,
        })
    return result


# --------------------------------------------------------------------------------------------------
# Curves and comparisons
# --------------------------------------------------------------------------------------------------
def plot_curves(
    log_df: Any,
    x: str = "iter",
    y: str | Sequence[str] | None = None,
    hue: str | None = None,
    smooth: int | None = None,
    logy: bool = False,
    ax: plt.Axes | None = None,
    title: str | None = None,
    ylabel: str | None = None,
) -> Figure:
    """Training/evaluation curves from a log DataFrame.

    Args:
        log_df: ``pandas.DataFrame`` (or records) with column ``x`` and the ``y`` columns; NaNs
            (e.g. evaluation metrics logged every N steps) are skipped per series.
        x: x column (``iter``, ``epoch``, ``samples`` ...).
        y: column(s) to plot; default = every column starting with ``loss``.
        hue: optional column splitting the rows into runs (one line per value and y column).
        smooth: rolling-mean window (in rows) applied per series.
        logy: log-scale y axis.
    """
    import pandas as pd

    df = log_df if isinstance(log_df, pd.DataFrame) else pd.DataFrame(log_df)
    if x not in df.columns:
        raise ValueError(f"x column {x!r} not in the log; columns: {list(df.columns)}")
    if y is None:
        ys = [c for c in df.columns if str(c).startswith("loss")]
    else:
        ys = [y] if isinstance(y, str) else list(y)
    missing = [c for c in ys if c not in df.columns]
    if missing or not ys:
        raise ValueError(f"y column(s) {missing or ys} not in the log; columns: {list(df.columns)}")
    fig, ax = _new_axes(ax, (HALF, HALF * 0.7))
    groups = [(None, df)] if hue is None else list(df.groupby(hue, sort=False))
    for gname, g in groups:
        for col in ys:
            s = g[[x, col]].dropna()
            if s.empty:
                continue
            vals = s[col].rolling(smooth, min_periods=1).mean() if smooth else s[col]
            label = col if gname is None else (f"{gname}" if len(ys) == 1 else f"{gname}: {col}")
            ax.plot(s[x].to_numpy(), vals.to_numpy(), label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel or (ys[0] if len(ys) == 1 else "value"))
    if len(ys) > 1 or hue is not None:
        ax.legend()
    if title:
        ax.set_title(title)
    return fig


def plot_compare(
    cmp_df: Any,
    x: str = "method",
    metric: str | None = None,
    ax: plt.Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Grouped bars of the paper's and our numbers (the output of :func:`gres.paper.compare`)."""
    import pandas as pd

    df = cmp_df if isinstance(cmp_df, pd.DataFrame) else pd.DataFrame(cmp_df)
    if metric is not None:
        df = df[df["metric"] == metric]
    if df.empty:
        raise ValueError(f"nothing to plot for metric={metric!r}")
    labels = [str(v) for v in df[x]]
    pos = np.arange(len(labels))
    fig, ax = _new_axes(ax, (HALF, HALF * 0.7))
    ax.bar(pos - 0.2, df["paper"].to_numpy(float), 0.4, color=PAPER_COLOR, label="paper")
    ax.bar(pos + 0.2, df["ours"].to_numpy(float), 0.4, color=PRED_COLOR, label="ours")
    ax.set_xticks(pos, labels, rotation=30 if max(map(len, labels)) > 6 else 0, ha="right"
                  if max(map(len, labels)) > 6 else "center")
    ax.set_ylabel(f"{metric} (%)" if metric else "value (%)")
    ax.legend()
    if title:
        ax.set_title(title)
    return fig


def savefig(fig: Figure, path: str | Path, dpi: int = IMAGE_DPI, close: bool = False) -> Path:
    """Save a figure: ``.svg`` for plots, ``.png`` at ``dpi`` for figures holding images.

    Without a suffix the format is chosen automatically (PNG if any axes holds an image);
    an explicit ``.svg``/``.png``/``.pdf`` suffix is respected. Parent folders are created.
    """
    path = Path(path)
    if path.suffix.lower() not in (".svg", ".png", ".pdf"):
        has_image = any(isinstance(a, AxesImage) for ax in fig.axes for a in ax.get_images())
        path = path.with_name(path.name + (".png" if has_image else ".svg"))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi if path.suffix.lower() == ".png" else None)
    if close:
        plt.close(fig)
    return path
