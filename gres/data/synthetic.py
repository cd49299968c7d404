"""The synthetic GRES dataset: procedural scenes written in the exact gRefCOCO file format.

GRES paper §3.2 describes what makes gRefCOCO hard; this module builds a small world that has all
of it, so the book can train and evaluate on CPU without COCO:

* **Scenes**: 2-6 flat shapes (6 shapes x 7 colours x 2 sizes) on a textured, noisy background,
  with partial occlusion. Images are stored at a modest native size (mostly 256x192 landscape, some
  192x256 portrait and 224x224 square, like COCO's mix) so that objects stay recognisable after the
  loader's square resize to ~96 px. Masks are the *visible* parts, as COCO polygons.
* **Expressions** are generated from small logical forms (LFs) that are *evaluated* on a scene, then
  realised in varied English (synonyms, word order, terse RefCOCO-style phrasing):
  single-target attributes, absolute position, ordinals ("the second star from the left"),
  relations ("the circle left of the blue cross", "behind", "in front of"); multi-target plurals,
  counting ("the two circles on the left": cardinal vs ordinal), compound phrases ("A and B"),
  exclusion ("all the squares except the red one"), shared and different attributes ("the red and
  blue stars", "the big circle and triangle").
* **No-target** expressions follow the paper's two rules: (1) relevant to the image but false for it
  -- an LF generated on a *phantom* copy of the scene with one or two attributes changed, kept only
  if it denotes nothing in the real scene and mentions a shape or colour that the image contains;
  (2) borrowed from another image of the same split (the exact sentence), kept if it denotes nothing
  here. No-target expressions are drawn from the *same* kind distribution as target ones, so the
  text alone does not reveal them (see :func:`gres.data.stats.text_only_no_target`).

Files (``generate(out_dir, preset, seed)``, layout of spec §6.1)::

    <out>/grefcoco/grefs(unc).json      refs: ref_id, image_id, file_name, ann_id ([-1] = none),
                                        category_id, no_target, split, sent_ids, sentences
                                        [{sent_id, sent, raw, tokens, phenomenon, expr_kind}]
    <out>/grefcoco/instances.json       COCO images / annotations (polygons) / categories
    <out>/images/train2014/*.jpg
    <out>/manifest.json                 counts, config, seed, version, sha256 of the JSON files

Generation is deterministic in (config, seed): every image has its own random stream
``np.random.default_rng([seed, image_index])``. The writer works in a temporary folder and renames
it into place, so a crash never leaves a half-written dataset; a matching manifest makes
``generate`` a no-op.
"""

from __future__ import annotations

import colorsys
import dataclasses
import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import contourpy
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from gres.utils import sha256_file

GENERATOR_VERSION = "1.2"  # bump when the output for a given (config, seed) changes

# --------------------------------------------------------------------------------------------------
# The world: shapes, colours, sizes
# --------------------------------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLORS: dict[str, tuple[int, int, int]] = {  # saturated and well separated in hue / brightness
    "red": (215, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 225),
    "purple": (145, 55, 200),
    "white": (240, 240, 240),
}
SIZES = ("big", "small")
SINGLE_KINDS = ("attribute", "position", "ordinal", "relation")
MULTI_KINDS = ("attribute", "counting", "compound", "shared-attribute", "exclusion", "relation")


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generator (presets: :data:`PRESETS`)."""

    name: str = "default"
    # Images per split (RefCOCO's unc splits, spec §6.2). testA: crowded same-shape scenes (the
    # analogue of RefCOCO's people-only testA); testB: mixed-shape scenes (other objects).
    train_images: int = 5000
    val_images: int = 500
    testA_images: int = 300
    testB_images: int = 300
    # Native image sizes (W, H) and their probabilities; the loader resizes to a square anyway.
    image_sizes: tuple[tuple[int, int], ...] = ((256, 192), (192, 256), (224, 224))
    image_size_probs: tuple[float, ...] = (0.6, 0.2, 0.2)
    objects_per_image: tuple[int, ...] = (2, 3, 4, 5, 6)
    objects_probs: tuple[float, ...] = (0.12, 0.22, 0.26, 0.22, 0.18)
    big_radius: float = 0.14  # circumradius as a fraction of min(W, H)
    small_radius: float = 0.085
    radius_jitter: float = 0.08  # relative
    overlap_prob: float = 0.3  # chance that a new object partly covers an earlier one
    min_visible: float = 0.55  # every object keeps at least this fraction of its area visible
    refs_per_image: tuple[int, ...] = (3, 4, 5)
    refs_probs: tuple[float, ...] = (0.3, 0.4, 0.3)
    sentences_per_ref: tuple[int, ...] = (1, 2, 3)
    sentences_probs: tuple[float, ...] = (0.35, 0.4, 0.25)
    no_target_prob: float = 0.18  # of refs (gRefCOCO: 11.6% of expressions; paper rule set)
    multi_prob: float = 0.36  # of refs (target and no-target alike; gRefCOCO: 28.8%)
    borrow_prob: float = 0.2  # of no-target refs: rule 2 (borrowed) by choice; also the fallback
    single_kind_probs: tuple[float, ...] = (0.34, 0.28, 0.16, 0.22)  # SINGLE_KINDS order
    multi_kind_probs: tuple[float, ...] = (0.16, 0.24, 0.2, 0.14, 0.14, 0.12)  # MULTI_KINDS order
    noise_std: float = 5.0  # global pixel noise (0..255 scale)
    jpeg_quality: int = 95


PRESETS: dict[str, SyntheticConfig] = {
    "default": SyntheticConfig(),
    "tiny": SyntheticConfig(
        name="tiny", train_images=24, val_images=8, testA_images=4, testB_images=4
    ),
}
DEFAULT_DIRS = {"default": "data/synthetic", "tiny": "data/synthetic-tiny"}


def get_config(preset_or_cfg: str | SyntheticConfig) -> SyntheticConfig:
    if isinstance(preset_or_cfg, SyntheticConfig):
        return preset_or_cfg
    if preset_or_cfg not in PRESETS:
        raise ValueError(
            f"unknown synthetic preset {preset_or_cfg!r}; choose from {sorted(PRESETS)}")
    return PRESETS[preset_or_cfg]


# --------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------
@dataclass
class Obj:
    """One object of a scene. Geometry in pixels of the native image (x right, y down)."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    r: float
    angle: float = 0.0
    aspect: float = 1.0


@dataclass
class Scene:
    width: int
    height: int
    objects: list[Obj]
    # occ[i][j] = fraction of object i's area hidden by object j (j drawn later, i.e. in front)
    occ: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    match_cache: dict = field(default_factory=dict, repr=False, compare=False)  # Desc -> indices

    def with_objects(self, objects: list[Obj]) -> Scene:
        return Scene(self.width, self.height, objects, self.occ)


def _unit_polygon(shape: str) -> np.ndarray:
    """(N, 2) outline of a shape with circumradius about 1, centred at 0 (y down)."""
    if shape == "circle":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1)
    if shape == "square":
        s = 0.8
        return np.array([[-s, -s], [s, -s], [s, s], [-s, s]])
    if shape == "triangle":
        t = np.deg2rad(np.array([-90.0, 30.0, 150.0]))
        return 1.12 * np.stack([np.cos(t), np.sin(t)], 1) + np.array([0.0, 0.1])
    if shape == "diamond":
        return np.array([[0.0, -1.12], [0.78, 0.0], [0.0, 1.12], [-0.78, 0.0]])
    if shape == "star":
        t = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        rad = np.where(np.arange(10) % 2 == 0, 1.15, 0.5)
        return np.stack([rad * np.cos(t), rad * np.sin(t)], 1)
    if shape == "cross":
        a, b = 0.34, 1.0
        return np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b],
                         [-a, a], [-b, a], [-b, -a], [-a, -a]])
    raise ValueError(f"unknown shape {shape!r}")


_UNIT = {s: _unit_polygon(s) for s in SHAPES}


def object_polygon(o: Obj) -> np.ndarray:
    """(N, 2) outline of an object in image coordinates."""
    p = _UNIT[o.shape] * np.array([o.r * o.aspect, o.r / o.aspect])
    c, s = np.cos(o.angle), np.sin(o.angle)
    p = p @ np.array([[c, s], [-s, c]])
    return p + np.array([o.cx, o.cy])


_SS = 4  # supersampling factor for anti-aliased coverage


@dataclass
class Coverage:
    """Anti-aliased coverage of a polygon in the window [y0:y1, x0:x1] of the image."""

    cov: np.ndarray  # (y1 - y0, x1 - x0) float32, fraction of each pixel inside the polygon
    x0: int
    y0: int
    x1: int
    y1: int

    def overlap(self, other: Coverage) -> tuple[slice, slice, slice, slice] | None:
        """Slices (own rows, own cols, other rows, other cols) of the common window."""
        x0, y0 = max(self.x0, other.x0), max(self.y0, other.y0)
        x1, y1 = min(self.x1, other.x1), min(self.y1, other.y1)
        if x1 <= x0 or y1 <= y0:
            return None
        return (slice(y0 - self.y0, y1 - self.y0), slice(x0 - self.x0, x1 - self.x0),
                slice(y0 - other.y0, y1 - other.y0), slice(x0 - other.x0, x1 - other.x0))


def coverage(poly: np.ndarray, width: int, height: int) -> Coverage:
    """Fraction of each pixel covered by a polygon (pixel i spans [i, i+1]), in a tight window."""
    x0 = max(int(np.floor(poly[:, 0].min())) - 1, 0)
    y0 = max(int(np.floor(poly[:, 1].min())) - 1, 0)
    x1 = max(min(int(np.ceil(poly[:, 0].max())) + 1, width), x0 + 1)
    y1 = max(min(int(np.ceil(poly[:, 1].max())) + 1, height), y0 + 1)
    im = Image.new("L", ((x1 - x0) * _SS, (y1 - y0) * _SS))
    # PIL fills pixel k when its centre (continuous k + 0.5) is inside: shift by half a pixel.
    pts = (poly - np.array([x0, y0])) * _SS - 0.5
    ImageDraw.Draw(im).polygon([tuple(p) for p in pts], fill=255)
    small = im.resize((x1 - x0, y1 - y0), Image.BOX)
    return Coverage(np.asarray(small, np.float32) / 255.0, x0, y0, x1, y1)


def _simplify(points: np.ndarray, eps: float) -> np.ndarray:
    """Douglas-Peucker simplification of a closed ring (N, 2) -> (M, 2)."""
    if len(points) <= 4:
        return points

    def rdp(p: np.ndarray) -> list[int]:
        keep = [0, len(p) - 1]
        stack = [(0, len(p) - 1)]
        while stack:
            i, j = stack.pop()
            if j <= i + 1:
                continue
            a, b = p[i], p[j]
            ab = b - a
            n = np.hypot(*ab)
            seg = p[i + 1 : j] - a
            if n > 0:
                d = np.abs(ab[0] * seg[:, 1] - ab[1] * seg[:, 0]) / n
            else:
                d = np.hypot(seg[:, 0], seg[:, 1])
            k = int(np.argmax(d))
            if d[k] > eps:
                keep.append(i + 1 + k)
                stack += [(i, i + 1 + k), (i + 1 + k, j)]
        return sorted(keep)

    # split the ring at the point farthest from the first one, simplify both halves
    far = int(np.argmax(np.hypot(*(points - points[0]).T)))
    a = points[: far + 1]
    b = np.concatenate([points[far:], points[:1]])
    ka = rdp(a)
    kb = rdp(b)
    return np.concatenate([a[ka][:-1], b[kb][:-1]])


def visible_polygons(vis: np.ndarray, x0: int = 0, y0: int = 0) -> list[np.ndarray] | None:
    """Outer rings of the 0.5 level set of a visibility map whose window starts at (x0, y0).

    Returns None when a region has a hole (not representable as COCO polygons).
    """
    vis = np.pad(vis, 1)  # closed contours even at the window border
    h, w = vis.shape
    gen = contourpy.contour_generator(np.arange(w) + x0 - 0.5, np.arange(h) + y0 - 0.5, vis,
                                      fill_type="OuterOffset")
    points, offsets = gen.filled(0.5, 2.0)
    rings = []
    for pts, off in zip(points, offsets):
        if len(off) > 2:
            return None
        ring = pts[off[0] : off[1]]
        if len(ring) > 1 and np.allclose(ring[0], ring[-1]):
            ring = ring[:-1]
        x, y = ring[:, 0], ring[:, 1]
        area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
        if area >= 4.0 and len(ring) >= 3:
            rings.append(_simplify(ring, 0.3))
    return rings


def _style_for(split: str, rng: np.random.Generator) -> str:
    if split == "testA":
        return "crowd"
    if split == "testB":
        return "mixed"
    return str(rng.choice(["crowd", "mixed", "free"], p=[0.35, 0.4, 0.25]))


def sample_scene(rng: np.random.Generator, cfg: SyntheticConfig, style: str) -> Scene | None:
    """Objects with attributes and non-degenerate placement (None if placement failed)."""
    w, h = cfg.image_sizes[rng.choice(len(cfg.image_sizes), p=cfg.image_size_probs)]
    n = int(rng.choice(cfg.objects_per_image, p=cfg.objects_probs))
    color_names = list(COLORS)
    if style == "crowd":  # one dominant shape, few colours: people-like scenes of RefCOCO testA
        main = SHAPES[rng.integers(len(SHAPES))]
        palette = list(rng.choice(color_names, size=3, replace=False))
        shapes = [main if rng.random() < 0.7 else SHAPES[rng.integers(len(SHAPES))]
                  for _ in range(n)]
        colors = [palette[rng.integers(3)] if rng.random() < 0.7 else color_names[rng.integers(7)]
                  for _ in range(n)]
    elif style == "mixed":  # mostly distinct shapes (testB-like)
        shapes = list(rng.permutation(SHAPES)[:n]) if rng.random() < 0.8 else [
            SHAPES[rng.integers(len(SHAPES))] for _ in range(n)]
        colors = [color_names[rng.integers(7)] for _ in range(n)]
    else:
        sub = list(rng.choice(SHAPES, size=3, replace=False))
        pal = list(rng.choice(color_names, size=4, replace=False))
        shapes = [sub[rng.integers(3)] for _ in range(n)]
        colors = [pal[rng.integers(4)] for _ in range(n)]
    base = min(w, h)
    objs: list[Obj] = []
    for i in range(n):
        size = SIZES[rng.integers(2)]
        r = base * (cfg.big_radius if size == "big" else cfg.small_radius)
        r *= 1.0 + cfg.radius_jitter * (2 * rng.random() - 1)
        jitter = {"circle": 0.0, "square": 12, "triangle": 8, "diamond": 5, "star": 10, "cross": 8}
        angle = np.deg2rad(jitter[shapes[i]] * (2 * rng.random() - 1))
        aspect = 1.0 + 0.06 * (2 * rng.random() - 1)
        ext = 1.3 * r + 1  # outlines reach 1.15 r (stars) plus rotation/aspect jitter
        want_overlap = i > 0 and rng.random() < cfg.overlap_prob
        placed = None
        for _ in range(60):
            if want_overlap:
                j = int(rng.integers(len(objs)))
                if objs[j].color == colors[i]:
                    want_overlap = False
                    continue
                d = (objs[j].r + r) * (0.6 + 0.3 * rng.random())
                t = 2 * np.pi * rng.random()
                cx, cy = objs[j].cx + d * np.cos(t), objs[j].cy + d * np.sin(t)
            else:
                j = -1
                cx = ext + (w - 2 * ext) * rng.random()
                cy = ext + (h - 2 * ext) * rng.random()
            if not (ext <= cx <= w - ext and ext <= cy <= h - ext):
                continue
            ok = all(np.hypot(cx - o.cx, cy - o.cy) >= o.r + r + 3
                     for k, o in enumerate(objs) if k != j)
            if ok:
                placed = (cx, cy)
                break
        if placed is None:
            return None
        objs.append(Obj(str(shapes[i]), str(colors[i]), size, placed[0], placed[1], r, angle,
                        aspect))
    return Scene(w, h, objs)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """(H, W, 3) float32 textured, low-saturation background."""

    def muted() -> np.ndarray:
        hue = rng.random()
        sat = 0.05 + 0.25 * rng.random()
        rgb = colorsys.hsv_to_rgb(hue, sat, 0.25 + 0.37 * rng.random())
        return np.array(rgb, np.float32) * 255

    kind = rng.integers(5)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:  # smooth blotches
        grid = np.stack([muted() for _ in range(12)]).reshape(3, 4, 3).clip(0, 255).astype(np.uint8)
        bg = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), np.float32)
    elif kind == 1:  # stripes
        t = rng.random() * np.pi
        period = 10 + 30 * rng.random()
        wave = np.sin(2 * np.pi * (xx * np.cos(t) + yy * np.sin(t)) / period)
        bg = muted()[None, None] + (8 + 10 * rng.random()) * wave[..., None]
    elif kind == 2:  # checkerboard
        cell = int(rng.integers(12, 32))
        chk = ((xx // cell + yy // cell) % 2)[..., None]
        c1 = muted()
        bg = c1[None, None] + chk * rng.uniform(-22, 22, size=3).astype(np.float32)
    elif kind == 3:  # gradient
        c1, c2 = muted(), muted()
        t = rng.random() * np.pi
        g = xx * np.cos(t) + yy * np.sin(t)
        g = ((g - g.min()) / max(float(np.ptp(g)), 1.0))[..., None]
        bg = c1 * (1 - g) + c2 * g
    else:  # speckle ("sand / grass")
        noise = 20 * rng.standard_normal((h, w, 1), dtype=np.float32)
        im = Image.fromarray((noise[..., 0] + 128).clip(0, 255).astype(np.uint8))
        im = im.filter(ImageFilter.BoxBlur(1))
        bg = muted()[None, None] + (np.asarray(im, np.float32)[..., None] - 128) * 1.5
    return np.asarray(bg, np.float32)


@dataclass
class Rendered:
    image: np.ndarray  # (H, W, 3) uint8
    polygons: list[list[np.ndarray]]  # per object: rings of its visible part
    areas: list[float]  # visible area in pixels
    occ: np.ndarray  # (N, N) occlusion fractions


def render(scene: Scene, rng: np.random.Generator, cfg: SyntheticConfig) -> Rendered | None:
    """Draw the scene; None if an object ends up too hidden or with a hole."""
    w, h = scene.width, scene.height
    n = len(scene.objects)
    polys = [object_polygon(o) for o in scene.objects]
    covs = [coverage(p, w, h) for p in polys]
    full = [float(c.cov.sum()) for c in covs]
    occ = np.zeros((n, n))
    vis_maps = []
    for i in range(n):
        vis = covs[i].cov.copy()
        for j in range(i + 1, n):
            sl = covs[i].overlap(covs[j])
            if sl is None:
                continue
            a, b = covs[i].cov[sl[0], sl[1]], covs[j].cov[sl[2], sl[3]]
            inter = float((a * b).sum())
            if inter > 0:
                occ[i, j] = inter / full[i]
                vis[sl[0], sl[1]] *= 1.0 - b
        if vis.sum() < cfg.min_visible * full[i]:
            return None
        vis_maps.append(vis)
    img = _background(rng, w, h)
    for i, o in enumerate(scene.objects):
        c = covs[i]
        base = np.array(COLORS[o.color], np.float32)
        base = base + rng.uniform(-10, 10, size=3).astype(np.float32)
        t = rng.random() * 2 * np.pi
        yy, xx = np.mgrid[c.y0 : c.y1, c.x0 : c.x1].astype(np.float32)
        shade = 1.0 + 0.12 * ((xx - o.cx) * np.cos(t) + (yy - o.cy) * np.sin(t)) / o.r
        col = base * shade[..., None] + 4 * rng.standard_normal((*shade.shape, 1), dtype=np.float32)
        a = c.cov[..., None]
        edge = np.clip(4 * c.cov * (1 - c.cov), 0, 1)[..., None]  # darken the anti-aliased rim
        win = img[c.y0 : c.y1, c.x0 : c.x1]
        img[c.y0 : c.y1, c.x0 : c.x1] = (win * (1 - a) + col * a) * (1 - 0.35 * edge)
    img += cfg.noise_std * rng.standard_normal(img.shape, dtype=np.float32)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    polygons, areas = [], []
    for i in range(n):
        hidden = occ[i].sum() > 0
        rings = visible_polygons(vis_maps[i], covs[i].x0, covs[i].y0) if hidden else [polys[i]]
        if not rings:
            return None
        polygons.append(rings)
        areas.append(float(vis_maps[i].sum()))
    return Rendered(image, polygons, areas, occ)


# --------------------------------------------------------------------------------------------------
# Logical forms (LFs) and their meaning in a scene
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Desc:
    """A noun phrase's content: any subset of shape / colour / size (None = unspecified)."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None

    def matches(self, o: Obj) -> bool:
        return ((self.shape is None or o.shape == self.shape)
                and (self.color is None or o.color == self.color)
                and (self.size is None or o.size == self.size))

    def refine(self, other: Desc) -> Desc:
        return Desc(self.shape or other.shape, self.color or other.color, self.size or other.size)


@dataclass(frozen=True)
class Attr:  # "the red circle" (exactly one) / "all the red circles" (two or more)
    d: Desc
    plural: bool


@dataclass(frozen=True)
class Extreme:  # "the leftmost star" (n = 1) / "the two stars on the left" (n >= 2)
    d: Desc
    dir: str
    n: int = 1


@dataclass(frozen=True)
class Region:  # "the circle in the top left corner"
    d: Desc
    region: str
    plural: bool


@dataclass(frozen=True)
class Ordinal:  # "the second circle from the left"
    d: Desc
    k: int
    dir: str


@dataclass(frozen=True)
class Relation:  # "the star left of the blue square"
    d: Desc
    rel: str
    anchor: Desc
    plural: bool


@dataclass(frozen=True)
class Count:  # "the two red circles" (exactly n)
    d: Desc
    n: int


@dataclass(frozen=True)
class Compound:  # "the red circle and the leftmost star"
    parts: tuple


@dataclass(frozen=True)
class Shared:  # "the red and blue stars": descs share one attribute and differ in another
    parts: tuple  # of Desc
    plurals: tuple  # of bool, one per part
    shared: str  # "shape" | "color" | "size"
    differ: str


@dataclass(frozen=True)
class Except:  # "all the circles except the red one" / "... except the leftmost one"
    d: Desc
    ex: Desc | None
    ex_dir: str | None
    ex_plural: bool


LF = Union[Attr, Extreme, Region, Ordinal, Relation, Count, Compound, Shared, Except]

DIRS = ("left", "right", "top", "bottom")
REGIONS = ("top left", "top right", "bottom left", "bottom right", "center")
RELATIONS = ("left_of", "right_of", "above", "below", "behind", "in_front")
EXTREME_GAP = 0.08  # fraction of W (left/right) or H (top/bottom) between ranked objects
REL_TRUE, REL_FALSE = 0.12, 0.03  # "left of": offset >= 12% of W is true, <= 3% is false
OCC_TRUE = 0.06  # "behind": at least 6% of the object's area hidden by the anchor


def kind_of(lf: LF) -> str:
    """The paper-§3.2 phenomenon an LF exercises."""
    if isinstance(lf, Attr):
        return "attribute"
    if isinstance(lf, Extreme):
        return "position" if lf.n == 1 else "counting"
    if isinstance(lf, Region):
        return "position"
    if isinstance(lf, Count):
        return "counting"
    return {Ordinal: "ordinal", Relation: "relation", Compound: "compound",
            Shared: "shared-attribute", Except: "exclusion"}[type(lf)]


def _match(scene: Scene, d: Desc) -> list[int]:
    cache = scene.match_cache
    m = cache.get(d)
    if m is None:
        m = cache[d] = [i for i, o in enumerate(scene.objects) if d.matches(o)]
    return m


def _rank(scene: Scene, idx: list[int], direction: str) -> tuple[list[int], list[float], float]:
    """Indices sorted along a direction, their keys and the ambiguity gap in pixels."""
    objs = scene.objects
    if direction in ("left", "right"):
        sign = 1.0 if direction == "left" else -1.0
        keys = [sign * objs[i].cx for i in idx]
        gap = EXTREME_GAP * scene.width
    else:
        sign = 1.0 if direction == "top" else -1.0
        keys = [sign * objs[i].cy for i in idx]
        gap = EXTREME_GAP * scene.height
    order = sorted(range(len(idx)), key=lambda k: keys[k])
    return [idx[k] for k in order], [keys[k] for k in order], gap


def _in_region(scene: Scene, i: int, region: str) -> bool | None:
    o, w, h = scene.objects[i], scene.width, scene.height
    fx, fy = o.cx / w, o.cy / h
    if region == "center":
        dx, dy = abs(fx - 0.5), abs(fy - 0.5)
        if dx < 0.15 and dy < 0.15:
            return True
        return False if (dx > 0.25 or dy > 0.25) else None
    vert, horiz = region.split()
    ux = fx if horiz == "left" else 1 - fx
    uy = fy if vert == "top" else 1 - fy
    if ux < 0.4 and uy < 0.4:
        return True
    return False if (ux > 0.55 or uy > 0.55) else None


def _relation(scene: Scene, i: int, rel: str, a: int) -> bool | None:
    o, an, w, h = scene.objects[i], scene.objects[a], scene.width, scene.height
    if rel in ("behind", "in_front"):
        if scene.occ.size == 0:
            return None
        c = scene.occ[i, a] if rel == "behind" else scene.occ[a, i]
        if c >= OCC_TRUE:
            return True
        return False if c == 0 else None
    off = {"left_of": (an.cx - o.cx) / w, "right_of": (o.cx - an.cx) / w,
           "above": (an.cy - o.cy) / h, "below": (o.cy - an.cy) / h}[rel]
    if off >= REL_TRUE:
        return True
    return False if off <= REL_FALSE else None


def _number_ok(result: frozenset, plural: bool) -> bool:
    return not result or (len(result) >= 2) == plural


def evaluate(lf: LF, scene: Scene) -> frozenset | None:
    """The set of object indices an LF denotes in a scene; ``frozenset()`` = no target.

    None means the LF is not a clean description of this scene (ambiguous: objects near a
    decision boundary, a singular phrase that matches two objects, an anchor that is not unique,
    a compound whose parts are partly empty, ...). Such LFs are never used.
    """
    empty: frozenset = frozenset()
    if isinstance(lf, Attr):
        m = _match(scene, lf.d)
        if not m:
            return empty
        return frozenset(m) if (len(m) >= 2) == lf.plural else None
    if isinstance(lf, Count):
        m = _match(scene, lf.d)
        if not m:
            return empty
        return frozenset(m) if len(m) == lf.n else None
    if isinstance(lf, Extreme):
        m = _match(scene, lf.d)
        if not m:
            return empty
        if len(m) <= lf.n:
            return None
        order, keys, gap = _rank(scene, m, lf.dir)
        if keys[lf.n] - keys[lf.n - 1] < gap:
            return None
        return frozenset(order[: lf.n])
    if isinstance(lf, Ordinal):
        m = _match(scene, lf.d)
        if len(m) < lf.k:
            return empty  # "the third circle from the left" with two circles: nothing
        order, keys, gap = _rank(scene, m, lf.dir)
        k = lf.k - 1
        if keys[k] - keys[k - 1] < gap or (k + 1 < len(keys) and keys[k + 1] - keys[k] < gap):
            return None
        return frozenset([order[k]])
    if isinstance(lf, Region):
        out = set()
        for i in _match(scene, lf.d):
            v = _in_region(scene, i, lf.region)
            if v is None:
                return None
            if v:
                out.add(i)
        res = frozenset(out)
        return res if _number_ok(res, lf.plural) else None
    if isinstance(lf, Relation):
        anchors = _match(scene, lf.anchor)
        if not anchors:
            return empty
        if len(anchors) > 1:
            return None
        out = set()
        for i in _match(scene, lf.d):
            if i == anchors[0]:
                continue
            v = _relation(scene, i, lf.rel, anchors[0])
            if v is None:
                return None
            if v:
                out.add(i)
        res = frozenset(out)
        return res if _number_ok(res, lf.plural) else None
    if isinstance(lf, (Compound, Shared)):
        parts = lf.parts if isinstance(lf, Compound) else [
            Attr(d, p) for d, p in zip(lf.parts, lf.plurals)]
        sets = [evaluate(p, scene) for p in parts]
        if any(s is None for s in sets):
            return None
        if all(not s for s in sets):
            return empty
        if any(not s for s in sets) or sum(len(s) for s in sets) != len(frozenset().union(*sets)):
            return None
        return frozenset().union(*sets)
    if isinstance(lf, Except):
        m = _match(scene, lf.d)
        if not m:
            return empty
        if lf.ex is not None:
            excluded = set(_match(scene, lf.d.refine(lf.ex)))
        else:
            if len(m) < 2:
                return None
            order, keys, gap = _rank(scene, m, lf.ex_dir)
            if keys[1] - keys[0] < gap:
                return None
            excluded = {order[0]}
        if not excluded or (len(excluded) >= 2) != lf.ex_plural:
            return None
        rest = frozenset(set(m) - excluded)
        if len(rest) == 1:
            return None  # "all ... except ..." leaving one object: not how people talk
        return rest
    raise TypeError(f"unknown LF {lf!r}")


def content_words(lf: LF) -> set[str]:
    """Shapes and colours an LF mentions (relevance test of no-target rule 1)."""
    descs: list[Desc] = []
    if isinstance(lf, (Attr, Extreme, Region, Ordinal, Count)):
        descs = [lf.d]
    elif isinstance(lf, Relation):
        descs = [lf.d, lf.anchor]
    elif isinstance(lf, Shared):
        descs = list(lf.parts)
    elif isinstance(lf, Except):
        descs = [lf.d] + ([lf.ex] if lf.ex is not None else [])
    elif isinstance(lf, Compound):
        return set().union(*(content_words(p) for p in lf.parts))
    return {w for d in descs for w in (d.shape, d.color) if w is not None}


def is_relevant(lf: LF, scene: Scene) -> bool:
    present = {o.shape for o in scene.objects} | {o.color for o in scene.objects}
    return bool(content_words(lf) & present)


# --------------------------------------------------------------------------------------------------
# Proposals: random LFs of one kind that describe objects of a scene
# --------------------------------------------------------------------------------------------------
_SPECS = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"),
          ("color",), ("size", "color"))
_SPEC_P = (0.14, 0.42, 0.12, 0.12, 0.13, 0.07)
# Bases of "all ... except ...". No content-free base ("everything except the circle"): it is
# always true somewhere, so it could never have a no-target twin and would give targets away.
_BASE_SPECS = (("shape",), ("color",), ("size", "shape"))
_BASE_P = (0.55, 0.33, 0.12)


def _desc(o: Obj, spec: tuple[str, ...]) -> Desc:
    return Desc(o.shape if "shape" in spec else None, o.color if "color" in spec else None,
                o.size if "size" in spec else None)


def _spec(rng: np.random.Generator) -> tuple[str, ...]:
    return _SPECS[rng.choice(len(_SPECS), p=_SPEC_P)]


def _pick(rng: np.random.Generator, seq: list | tuple) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _spec_where(o: Obj, scene: Scene, rng: np.random.Generator, ok: Any,
                specs: tuple = _SPECS, probs: tuple = _SPEC_P) -> Desc | None:
    """A description of ``o`` (specs tried in a weighted random order) whose number of matches in
    the scene satisfies ``ok``; None if no spec does."""
    u = rng.random(len(specs)).tolist()
    keys = [math.log(x) / p for x, p in zip(u, probs)]  # weighted order (Efraimidis-Spirakis)
    for k in sorted(range(len(specs)), key=keys.__getitem__, reverse=True):
        d = _desc(o, specs[k])
        if ok(len(_match(scene, d))):
            return d
    return None


def propose(kind: str, number: str, scene: Scene, rng: np.random.Generator,
            focus: int | None = None) -> LF | None:
    """One random LF of a kind ("single"/"multi" number), built around object ``focus``.

    Descriptions are chosen so that the phrase can work (e.g. two or three matches for "the two
    ..."); the caller still checks the LF with :func:`evaluate`.
    """
    objs = scene.objects
    n = len(objs)
    i = focus if focus is not None else int(rng.integers(n))
    o = objs[i]
    multi = number == "multi"
    if kind == "attribute":
        d = _spec_where(o, scene, rng, (lambda c: c >= 2) if multi else (lambda c: c == 1))
        return Attr(d, multi) if d is not None else None
    if kind == "position":
        if rng.random() < 0.7:
            d = _spec_where(o, scene, rng, lambda c: c >= 2)
            return Extreme(d, _pick(rng, DIRS), 1) if d is not None else None
        regions = [r for r in REGIONS if _in_region(scene, i, r)]
        return Region(_desc(o, _spec(rng)), _pick(rng, regions), multi) if regions else None
    if kind == "ordinal":
        direction = _pick(rng, DIRS)
        d = _spec_where(o, scene, rng, lambda c: c >= 2)
        if d is None:
            return None
        order, _, _ = _rank(scene, _match(scene, d), direction)
        k = order.index(i) + 1
        return Ordinal(d, k, direction) if k in (2, 3) else None
    if kind == "relation":
        others = [j for j in range(n) if j != i]
        if not others:
            return None
        a = _pick(rng, others)
        rels = [r for r in RELATIONS if _relation(scene, i, r, a)]
        if not rels:
            return None
        occl = [r for r in rels if r in ("behind", "in_front")]
        rel = _pick(rng, occl) if occl and rng.random() < 0.6 else _pick(rng, rels)
        spec1 = _SPECS[rng.choice(len(_SPECS), p=(0.4, 0.25, 0.1, 0.05, 0.15, 0.05))]
        anchor = _spec_where(objs[a], scene, rng, lambda c: c == 1)
        return Relation(_desc(o, spec1), rel, anchor, multi) if anchor is not None else None
    if kind == "counting":
        if rng.random() < 0.5:
            d = _spec_where(o, scene, rng, lambda c: c in (2, 3))
            return Count(d, len(_match(scene, d))) if d is not None else None
        k = 2 if rng.random() < 0.75 else 3
        d = _spec_where(o, scene, rng, lambda c: c > k)
        return Extreme(d, _pick(rng, DIRS), k) if d is not None else None
    if kind == "compound":
        nparts = 2 if rng.random() < 0.75 else 3
        if n < nparts:
            return None
        idx = [i] + [int(j) for j in rng.permutation([j for j in range(n) if j != i])[: nparts - 1]]
        parts = []
        for j in idx:
            u = rng.random()
            if u < 0.6:
                d = _spec_where(objs[j], scene, rng, lambda c: c == 1)
                part = Attr(d, False) if d is not None else None
            elif u < 0.85:
                d = _spec_where(objs[j], scene, rng, lambda c: c >= 2)
                part = Extreme(d, _pick(rng, DIRS), 1) if d is not None else None
            else:
                d = _spec_where(objs[j], scene, rng, lambda c: c >= 2)
                part = Attr(d, True) if d is not None else None
            if part is None:
                return None
            parts.append(part)
        return Compound(tuple(parts))
    if kind == "shared-attribute":
        shared = _pick(rng, ("shape", "shape", "color", "size"))
        differ = _pick(rng, ("color", "size")) if shared == "shape" else "shape"
        partners = [j for j in range(n) if getattr(objs[j], shared) == getattr(o, shared)
                    and getattr(objs[j], differ) != getattr(o, differ)]
        if not partners:
            return None
        p = objs[_pick(rng, partners)]
        d1 = Desc(**{shared: getattr(o, shared), differ: getattr(o, differ)})
        d2 = Desc(**{shared: getattr(p, shared), differ: getattr(p, differ)})
        plurals = tuple(len(_match(scene, d)) >= 2 for d in (d1, d2))
        return Shared((d1, d2), plurals, shared, differ)
    if kind == "exclusion":
        d = _spec_where(o, scene, rng, lambda c: c >= 3, _BASE_SPECS, _BASE_P)
        if d is None:
            return None
        m = _match(scene, d)
        if rng.random() < 0.15:
            return Except(d, None, _pick(rng, DIRS), False)
        free = [a for a in ("color", "size", "shape") if getattr(d, a) is None]
        attr = _pick(rng, free)
        e = objs[_pick(rng, [j for j in m if j != i])]
        ex = Desc(**{attr: getattr(e, attr)})
        return Except(d, ex, None, len(_match(scene, d.refine(ex))) >= 2)
    raise ValueError(f"unknown kind {kind!r}")


def find_lf(kind: str, number: str, scene: Scene, rng: np.random.Generator, tries: int = 25,
            focus: list[int] | None = None,
            want: frozenset | None = None) -> tuple[LF, frozenset] | None:
    """A valid LF of a kind whose denotation has the requested number (and equals ``want``)."""
    for _ in range(tries):
        f = None if not focus else int(_pick(rng, focus))
        lf = propose(kind, number, scene, rng, f)
        if lf is None:
            continue
        res = evaluate(lf, scene)
        if not res or (len(res) >= 2) != (number == "multi"):
            continue
        if want is not None and res != want:
            continue
        return lf, res
    return None


def perturb(scene: Scene, rng: np.random.Generator, edits: int = 1) -> tuple[Scene, list[int]]:
    """A phantom copy of a scene with some attributes changed (no-target rule 1).

    ``edits`` (plus one, a quarter of the time) edits among: change one object's colour / shape /
    size; swap an attribute between
    two objects; substitute a value everywhere ("every red object becomes green", which lets
    "the two green circles" be false while circles are present). Geometry is never touched, so
    positions, ranks and occlusions stay those of the real image.
    Returns the phantom and the indices of the changed objects.
    """
    objs = [copy.copy(o) for o in scene.objects]
    changed: list[int] = []
    n = len(objs)
    for _ in range(edits + (rng.random() < 0.25)):
        u = rng.random()
        i = int(rng.integers(n))
        attr = _w(rng, [("color", 0.5), ("shape", 0.35), ("size", 0.15)])
        old = getattr(objs[i], attr)
        choices = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES)}[attr]
        new = _pick(rng, [v for v in choices if v != old])
        if u < 0.45:
            setattr(objs[i], attr, new)
            changed.append(i)
        elif u < 0.6 and n >= 2:
            j = _pick(rng, [k for k in range(n) if k != i])
            setattr(objs[i], attr, getattr(objs[j], attr))
            setattr(objs[j], attr, old)
            changed += [i, j]
        else:
            for k in range(n):
                if getattr(objs[k], attr) == old:
                    setattr(objs[k], attr, new)
                    changed.append(k)
    return scene.with_objects(objs), changed


# --------------------------------------------------------------------------------------------------
# Realisation: LF -> varied English
# --------------------------------------------------------------------------------------------------
_SHAPE_WORDS: dict[str, list[tuple[str, str, float]]] = {
    "circle": [("circle", "circles", 0.8), ("disc", "discs", 0.2)],
    "square": [("square", "squares", 0.7), ("box", "boxes", 0.15), ("block", "blocks", 0.15)],
    "triangle": [("triangle", "triangles", 1.0)],
    "diamond": [("diamond", "diamonds", 0.8), ("rhombus", "rhombuses", 0.2)],
    "star": [("star", "stars", 1.0)],
    "cross": [("cross", "crosses", 0.75), ("plus sign", "plus signs", 0.25)],
}
_GENERIC = [("shape", "shapes", 0.45), ("object", "objects", 0.35), ("thing", "things", 0.2)]
_COLOR_WORDS = {c: [(c, 1.0)] for c in COLORS} | {"purple": [("purple", 0.75), ("violet", 0.25)]}
_SIZE_WORDS = {"big": [("big", 0.55), ("large", 0.45)],
               "small": [("small", 0.6), ("little", 0.25), ("tiny", 0.15)]}
_MOST = {"left": ["leftmost", "left-most"], "right": ["rightmost", "right-most"],
         "top": ["topmost", "uppermost", "highest"],
         "bottom": ["bottom-most", "lowest", "lowermost"]}
_SIDE = {"left": ["on the left", "at the left"], "right": ["on the right", "at the right"],
         "top": ["at the top"], "bottom": ["at the bottom"]}
_FAR = {"left": ["furthest to the left", "farthest left"], "right": ["furthest to the right",
        "farthest right"], "top": ["closest to the top", "nearest the top"],
        "bottom": ["closest to the bottom", "nearest the bottom"]}
_ORD = {2: [("second", 0.85), ("2nd", 0.15)], 3: [("third", 0.85), ("3rd", 0.15)]}
_NUM = {2: [("two", 0.85), ("2", 0.15)], 3: [("three", 0.85), ("3", 0.15)]}
_REL = {"left_of": ["left of", "to the left of", "on the left of"],
        "right_of": ["right of", "to the right of", "on the right of"],
        "above": ["above", "over"], "below": ["below", "under", "beneath", "underneath"],
        "behind": ["behind", "partly hidden behind", "partially covered by"],
        "in_front": ["in front of", "covering", "partly covering"]}
_EXCEPT = [("except", 0.4), ("but", 0.2), ("other than", 0.15), ("apart from", 0.13),
           ("except for", 0.12)]


def _w(rng: np.random.Generator, options: list[tuple]) -> Any:
    """Weighted choice among (value..., weight) tuples; returns the value (or value tuple)."""
    r = rng.random() * sum(o[-1] for o in options)
    for o in options:
        r -= o[-1]
        if r < 0:
            break
    return o[0] if len(o) == 2 else o[:-1]


def _noun(d: Desc, plural: bool, rng: np.random.Generator, allow_one: bool) -> str:
    if d.shape is not None:
        sg, pl = _w(rng, _SHAPE_WORDS[d.shape])
    elif allow_one and rng.random() < 0.2:
        sg, pl = "one", "ones"
    else:
        sg, pl = _w(rng, _GENERIC)
    return pl if plural else sg


def _np(d: Desc, plural: bool, rng: np.random.Generator, post: bool = False) -> str:
    """Noun phrase without determiner: "big red circle", "red ones"; with ``post`` sometimes
    "circle that is red" (only where nothing follows the phrase)."""
    adjs = []
    if d.size is not None:
        adjs.append(_w(rng, _SIZE_WORDS[d.size]))
    if d.color is not None:
        adjs.append(_w(rng, _COLOR_WORDS[d.color]))
    noun = _noun(d, plural, rng, allow_one=bool(adjs))
    if post and adjs and noun not in ("one", "ones") and rng.random() < 0.15:
        verb = "are" if plural else "is"
        return " ".join(adjs[:-1] + [noun, "that", verb, adjs[-1]])
    return " ".join(adjs + [noun])


def _the(x: str) -> str:
    return "the " + x


def realise(lf: LF, rng: np.random.Generator) -> str:
    """One English rendering of an LF (lower case, no final punctuation)."""
    if isinstance(lf, Attr):
        if not lf.plural:
            x = _np(lf.d, False, rng, post=True)
            return _w(rng, [(_the(x), 0.72), (x, 0.12), (f"the {x} in the picture", 0.05),
                            (f"the {x} in the image", 0.05), (f"the {x} here", 0.06)])
        pl, sg = _np(lf.d, True, rng, post=True), _np(lf.d, False, rng, post=True)
        return _w(rng, [(f"all the {pl}", 0.25), (f"all {pl}", 0.15), (_the(pl), 0.2),
                        (f"every {sg}", 0.12), (f"each {sg}", 0.06), (f"all of the {pl}", 0.1),
                        (pl, 0.12)])
    if isinstance(lf, Extreme) and lf.n == 1:
        x, dr = _np(lf.d, False, rng), lf.dir
        return _w(rng, [(f"the {_pick(rng, _MOST[dr])} {x}", 0.25),
                        (f"the {x} {_pick(rng, _SIDE[dr])}", 0.25),
                        (f"the {x} {_pick(rng, _FAR[dr])}", 0.1), (f"the {dr} {x}", 0.2),
                        (f"{dr} {x}", 0.1),
                        (f"{x} on {dr}" if dr in ("left", "right") else f"{x} at {dr}", 0.1)])
    if isinstance(lf, Extreme):
        pl, dr = _np(lf.d, True, rng), lf.dir
        num = _w(rng, _NUM[lf.n])
        far = f"on the far {dr}" if dr in ("left", "right") else f"at the very {dr}"
        return _w(rng, [(f"the {num} {pl} {_pick(rng, _SIDE[dr])}", 0.3),
                        (f"the {num} {_pick(rng, _MOST[dr])} {pl}", 0.25),
                        (f"the {dr} {num} {pl}", 0.15), (f"{num} {pl} {far}", 0.15),
                        (f"the {num} {pl} {_pick(rng, _FAR[dr])}", 0.15)])
    if isinstance(lf, Region):
        x = _np(lf.d, lf.plural, rng)
        if lf.region == "center":
            where = _w(rng, [("in the middle", 0.35), ("in the center", 0.3),
                             ("in the middle of the picture", 0.15), ("near the center", 0.2)])
        else:
            where = _w(rng, [(f"in the {lf.region} corner", 0.45), (f"at the {lf.region}", 0.3),
                             (f"near the {lf.region} corner", 0.25)])
        return _w(rng, [(f"the {x} {where}", 0.85), (f"{x} {where}", 0.15)])
    if isinstance(lf, Ordinal):
        x, o, dr = _np(lf.d, False, rng), _w(rng, _ORD[lf.k]), lf.dir
        return _w(rng, [(f"the {o} {x} from the {dr}", 0.4), (f"the {o} {x} from {dr}", 0.15),
                        (f"{o} {x} from {dr}", 0.1), (f"the {x} that is {o} from the {dr}", 0.1),
                        (f"counting from the {dr}, the {o} {x}", 0.1),
                        (f"the {o} {x} counting from the {dr}", 0.14)])
    if isinstance(lf, Relation):
        rel = _pick(rng, _REL[lf.rel])
        a = _np(lf.anchor, False, rng, post=True)
        if not lf.plural:
            x = _np(lf.d, False, rng)
            return _w(rng, [(f"the {x} {rel} the {a}", 0.55),
                            (f"the {x} that is {rel} the {a}", 0.2),
                            (f"the {x} which is {rel} the {a}", 0.1), (f"{x} {rel} {a}", 0.15)])
        x = _np(lf.d, True, rng)
        return _w(rng, [(f"the {x} {rel} the {a}", 0.45), (f"the {x} that are {rel} the {a}", 0.2),
                        (f"all {x} {rel} the {a}", 0.15), (f"all the {x} {rel} the {a}", 0.2)])
    if isinstance(lf, Count):
        pl, num = _np(lf.d, True, rng), _w(rng, _NUM[lf.n])
        opts = [(f"the {num} {pl}", 0.45), (f"{num} {pl}", 0.15), (f"all {num} {pl}", 0.1)]
        if lf.n == 2:
            opts += [(f"both {pl}", 0.15), (f"both of the {pl}", 0.07), (f"the pair of {pl}", 0.08)]
        else:
            opts += [(f"all three {pl}", 0.15)]
        return _w(rng, opts)
    if isinstance(lf, Compound):
        # every part keeps a determiner: "the tiny circle and the diamond", not "... and diamond"
        parts = [t if t.split()[0] in ("the", "all", "every", "each") else _the(t)
                 for t in (realise(p, rng) for p in lf.parts)]
        if len(parts) == 2:
            a, b = parts
            return _w(rng, [(f"{a} and {b}", 0.6), (f"both {a} and {b}", 0.12),
                            (f"{a} as well as {b}", 0.1), (f"{a} along with {b}", 0.1),
                            (f"{a} plus {b}", 0.08)])
        a, b, c = parts
        return _w(rng, [(f"{a}, {b} and {c}", 0.7), (f"{a}, {b}, and {c}", 0.3)])
    if isinstance(lf, Shared):
        return _realise_shared(lf, rng)
    if isinstance(lf, Except):
        return _realise_except(lf, rng)
    raise TypeError(f"unknown LF {lf!r}")


def _adj(attr: str, value: str, rng: np.random.Generator) -> str:
    return _w(rng, _COLOR_WORDS[value] if attr == "color" else _SIZE_WORDS[value])


def _realise_shared(lf: Shared, rng: np.random.Generator) -> str:
    d1, d2 = lf.parts
    p1, p2 = lf.plurals
    if lf.shared == "shape":  # "the red and blue stars"
        a1 = _adj(lf.differ, getattr(d1, lf.differ), rng)
        a2 = _adj(lf.differ, getattr(d2, lf.differ), rng)
        sg, pl = _w(rng, _SHAPE_WORDS[d1.shape])
        one1 = pl if p1 else sg
        one2 = "ones" if p2 else "one"
        opts = [(f"the {a1} and {a2} {pl}", 0.35), (f"{a1} and {a2} {pl}", 0.1),
                (f"the {a1} {one1} and the {a2} {one2}", 0.25)]
        if not p1 and not p2:
            opts += [(f"the {a1} and the {a2} {sg}", 0.15),
                     (f"both the {a1} and the {a2} {sg}", 0.1)]
        if lf.differ == "color":
            opts += [(f"the {pl} that are {a1} or {a2}", 0.1)]
        return _w(rng, opts)
    # shared colour or size: "the red circle and star"
    a = _adj(lf.shared, getattr(d1, lf.shared), rng)
    s1, s1p = _w(rng, _SHAPE_WORDS[d1.shape])
    s2, s2p = _w(rng, _SHAPE_WORDS[d2.shape])
    n1, n2 = (s1p if p1 else s1), (s2p if p2 else s2)
    opts = [(f"the {a} {n1} and {n2}", 0.4), (f"the {a} {n1} and the {a} {n2}", 0.25),
            (f"{a} {n1} and {n2}", 0.1)]
    if lf.shared == "color":
        opts += [(f"the {n1} and the {n2} that are {a}", 0.12)]
    if not p1 and not p2:
        opts += [(f"both the {a} {n1} and the {n2}", 0.08)]
    return _w(rng, opts)


def _realise_except(lf: Except, rng: np.random.Generator) -> str:
    pl, sg = _np(lf.d, True, rng), _np(lf.d, False, rng)
    opts = [(f"all the {pl}", 0.3), (f"all {pl}", 0.2), (f"every {sg}", 0.15), (_the(pl), 0.15),
            (f"all of the {pl}", 0.1)]
    if lf.d == Desc():
        opts += [("everything", 0.15)]
    head = _w(rng, opts)
    one = "ones" if lf.ex_plural else "one"
    if lf.ex is None:
        dr = lf.ex_dir
        ex = _w(rng, [(f"the {_pick(rng, _MOST[dr])} {one}", 0.4),
                      (f"the {one} {_pick(rng, _SIDE[dr])}", 0.35), (f"the {dr} {one}", 0.25)])
    elif lf.ex.shape is not None:
        ex = _the(_np(lf.ex, lf.ex_plural, rng))
    else:
        attr = "color" if lf.ex.color is not None else "size"
        adj = _adj(attr, getattr(lf.ex, attr), rng)
        noun = _noun(lf.d, lf.ex_plural, rng, allow_one=False)
        ex = _w(rng, [(f"the {adj} {one}", 0.7), (f"the {adj} {noun}", 0.3)])
    return f"{head} {_w(rng, _EXCEPT)} {ex}"


def to_raw(text: str, rng: np.random.Generator) -> str:
    """Surface variation of an annotator's typing: capitalisation, final full stop."""
    if rng.random() < 0.15:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.1:
        text += "."
    return text


def normalise(raw: str) -> str:
    """refer-style ``sent``: lower case, punctuation removed, single spaces."""
    keep = "".join(ch if ch.isalnum() or ch in " -" else " " for ch in raw.lower())
    return " ".join(keep.split())


# --------------------------------------------------------------------------------------------------
# Refs of one image
# --------------------------------------------------------------------------------------------------
@dataclass
class _Sent:
    raw: str
    phenomenon: str
    expr_kind: str
    lf: LF


@dataclass
class _Ref:
    targets: tuple[int, ...]  # () = no target
    sents: list[_Sent]
    borrow: list[tuple[str, str, tuple]] = field(default_factory=list)  # (kind, number, form)


def form_of(lf: LF) -> tuple:
    """The surface *form* of an LF, ignoring its content: LF class, count, and how many shape /
    colour / size words each description uses. No-target expressions copy the forms of target
    ones, so that form (e.g. "a bare shape name is never false") does not give them away."""

    def dform(d: Desc | None) -> tuple:
        return (0,) if d is None else (int(d.shape is not None) + int(d.color is not None),
                                       int(d.size is not None))

    if isinstance(lf, Compound):
        return ("Compound", tuple(sorted(form_of(p) for p in lf.parts)))
    if isinstance(lf, Shared):
        return ("Shared", lf.shared, lf.differ)
    if isinstance(lf, Relation):
        return ("Relation", lf.plural, dform(lf.d), dform(lf.anchor))
    if isinstance(lf, Except):
        return ("Except", dform(lf.d), dform(lf.ex), lf.ex_dir is None)
    return (type(lf).__name__, getattr(lf, "n", 0), getattr(lf, "plural", False), dform(lf.d))


def _kind(number: str, cfg: SyntheticConfig, rng: np.random.Generator) -> str:
    if number == "single":
        return SINGLE_KINDS[rng.choice(len(SINGLE_KINDS), p=cfg.single_kind_probs)]
    return MULTI_KINDS[rng.choice(len(MULTI_KINDS), p=cfg.multi_kind_probs)]


def _plan_target(scene: Scene, number: str, n_sent: int, cfg: SyntheticConfig,
                 rng: np.random.Generator, used: set) -> tuple[frozenset, list] | None:
    """Choose a target set and its sentences' LFs.

    Returns (target set, plan) with plan = [(LF, is_paraphrase)], one per sentence: the first LF
    found, then other LFs with the same denotation, or paraphrases of the first when the scene
    has none. None when the scene has nothing new of this number to describe.
    """
    found = None
    for _ in range(4):
        kind = _kind(number, cfg, rng)
        for _ in range(3):
            r = find_lf(kind, number, scene, rng)
            if r is not None and r[1] not in used:
                found = r
                break
        if found is not None:
            break
    if found is None:
        return None
    lf, target = found
    plan = [(lf, False)]
    for _ in range(n_sent - 1):
        alt = find_lf(_kind(number, cfg, rng), number, scene, rng, focus=sorted(target),
                      want=target)
        plan.append((alt[0], False) if alt else (lf, True))
    return target, plan


def _add_sentence(sents: list[_Sent], lf: LF, expr_kind: str, rng: np.random.Generator) -> bool:
    """Realise an LF into a sentence that differs from the ref's other sentences."""
    seen = {normalise(s.raw) for s in sents}
    for _ in range(4):
        raw = to_raw(realise(lf, rng), rng)
        if normalise(raw) not in seen:
            sents.append(_Sent(raw, kind_of(lf), expr_kind, lf))
            return True
    return False


def _descs(lf: LF) -> list[Desc]:
    """The descriptions inside an LF, in a fixed order (see :func:`_with_descs`)."""
    if isinstance(lf, Relation):
        return [lf.d, lf.anchor]
    if isinstance(lf, Compound):
        return [d for p in lf.parts for d in _descs(p)]
    if isinstance(lf, Shared):
        return list(lf.parts)
    if isinstance(lf, Except):
        return [lf.d] + ([lf.ex] if lf.ex is not None else [])
    return [lf.d]


def _with_descs(lf: LF, descs: list[Desc]) -> LF:
    if isinstance(lf, Relation):
        return dataclasses.replace(lf, d=descs[0], anchor=descs[1])
    if isinstance(lf, Compound):
        return Compound(tuple(dataclasses.replace(p, d=d) for p, d in zip(lf.parts, descs)))
    if isinstance(lf, Shared):
        return dataclasses.replace(lf, parts=tuple(descs))
    if isinstance(lf, Except):
        return dataclasses.replace(lf, d=descs[0], ex=descs[1] if lf.ex is not None else None)
    return dataclasses.replace(lf, d=descs[0])


_VALUES = {"color": tuple(COLORS), "shape": SHAPES, "size": SIZES}


def _mutate(lf: LF, scene: Scene, rng: np.random.Generator) -> tuple[LF, Scene]:
    """Change attribute values inside a (true) LF and build the phantom scene in which the changed
    LF is true: the objects the old descriptions matched get the new values."""
    descs = _descs(lf)
    if isinstance(lf, (Compound, Shared)):
        slots = list(range(len(descs)))  # every part must become empty
    elif isinstance(lf, Relation):
        slots = [int(rng.integers(2))]
    else:
        slots = [0]
    new = list(descs)
    objs = [copy.copy(o) for o in scene.objects]
    shared_value = None
    for k in slots:
        d = descs[k]
        attrs = [a for a in ("color", "shape", "size") if getattr(d, a) is not None]
        if isinstance(lf, Shared) and rng.random() < 0.6:
            attrs = [lf.shared]
        if not attrs:  # "everything": nothing to change
            continue
        attr = _w(rng, [(a, {"color": 0.5, "shape": 0.35, "size": 0.15}[a]) for a in attrs])
        old = getattr(d, attr)
        if isinstance(lf, Shared) and attr == lf.shared:
            shared_value = shared_value or _pick(rng, [v for v in _VALUES[attr] if v != old])
            value = shared_value
        else:
            value = _pick(rng, [v for v in _VALUES[attr] if v != old])
        new[k] = dataclasses.replace(d, **{attr: value})
        for i in _match(scene, d):
            setattr(objs[i], attr, value)
    return _with_descs(lf, new), scene.with_objects(objs)


def _false_lf(like: LF, number: str, scene: Scene, rng: np.random.Generator,
              tries: int = 12) -> LF | None:
    """No-target rule 1: a false twin of a true LF ("the red circle" -> "the green circle").

    The twin has the same kind and form, is a valid description of a phantom scene (the real one
    with the changed attributes), denotes nothing in the real scene, and still mentions a shape or
    colour that the image shows.
    """
    for _ in range(tries):
        lf, phantom = _mutate(like, scene, rng)
        res = evaluate(lf, phantom)
        if not res or (len(res) >= 2) != (number == "multi"):
            continue
        if evaluate(lf, scene) == frozenset() and is_relevant(lf, scene):
            return lf
    return None


def make_refs(scene: Scene, cfg: SyntheticConfig, rng: np.random.Generator) -> list[_Ref]:
    """Target and no-target refs of one image (borrowed sentences are left for pass 2).

    A no-target ref is the false twin of a target ref the scene could have had: same number,
    same kinds and forms of sentences, same paraphrase pattern; only the content is made false
    (rule 1), or, when no false twin exists or by chance, sentences of the same form are borrowed
    from other images (rule 2).
    """
    refs: list[_Ref] = []
    used: set = set()
    n_refs = int(rng.choice(cfg.refs_per_image, p=cfg.refs_probs))
    for _ in range(n_refs):
        nt = rng.random() < cfg.no_target_prob
        number = "multi" if rng.random() < cfg.multi_prob else "single"
        n_sent = int(rng.choice(cfg.sentences_per_ref, p=cfg.sentences_probs))
        planned = _plan_target(scene, number, n_sent, cfg, rng, used)
        if planned is None:
            continue
        target, plan = planned
        if not nt:
            used.add(target)
            ref = _Ref(tuple(sorted(target)), [])
            for lf, _ in plan:
                _add_sentence(ref.sents, lf, f"{number}-{kind_of(lf)}", rng)
            refs.append(ref)
            continue
        ref = _Ref((), [])
        if rng.random() < cfg.borrow_prob:
            ref.borrow = [(kind_of(lf), number, form_of(lf)) for lf, _ in plan]
            refs.append(ref)
            continue
        first = None
        for lf, paraphrase in plan:
            k = kind_of(lf)
            if paraphrase and first is not None:
                if not _add_sentence(ref.sents, first, f"nt-false-{k}", rng):
                    ref.borrow.append((k, number, form_of(lf)))
                continue
            f = _false_lf(lf, number, scene, rng)
            if f is None or not _add_sentence(ref.sents, f, f"nt-false-{k}", rng):
                ref.borrow.append((k, number, form_of(lf)))
                continue
            first = first or f
        refs.append(ref)
    return refs


def fill_borrowed(refs_by_image: list[list[_Ref]], scenes: list[Scene], split_of: list[str],
                  seed: int) -> None:
    """No-target rule 2: borrow target sentences from other images of the same split.

    A borrowed sentence must denote nothing in its new image; for half of them one that mentions a
    shape or colour of the image is required when possible (deceptive, not off-topic). Same kind,
    number and form when possible, then same kind and number, then anything of the split.
    """
    pools: dict[tuple, list[tuple[int, _Sent]]] = {}
    for i, refs in enumerate(refs_by_image):
        for ref in refs:
            if ref.targets:
                number = "multi" if len(ref.targets) > 1 else "single"
                for s in ref.sents:
                    key = (split_of[i], s.phenomenon, number, form_of(s.lf))
                    pools.setdefault(key, []).append((i, s))
                    pools.setdefault((split_of[i], s.phenomenon, number), []).append((i, s))
                    pools.setdefault((split_of[i],), []).append((i, s))
    for i, refs in enumerate(refs_by_image):
        rng = np.random.default_rng([seed, i, 2])
        sp = split_of[i]
        for ref in refs:
            for kind, number, form in ref.borrow:
                chosen = None
                deceptive = rng.random() < 0.5  # half the time insist on a relevant sentence
                for key in ((sp, kind, number, form), (sp, kind, number), (sp,)):
                    pool = pools.get(key, [])
                    if not pool:
                        continue
                    fallback = None
                    for j in rng.integers(len(pool), size=min(40, 4 * len(pool))):
                        src, s = pool[int(j)]
                        if src == i or any(normalise(x.raw) == normalise(s.raw) for x in ref.sents):
                            continue
                        if evaluate(s.lf, scenes[i]) != frozenset():
                            continue
                        if not deceptive or is_relevant(s.lf, scenes[i]):
                            chosen = s
                            break
                        fallback = fallback or s
                    chosen = chosen or fallback
                    if chosen is not None:
                        break
                if chosen is not None:
                    ref.sents.append(_Sent(chosen.raw, chosen.phenomenon,
                                           f"nt-borrowed-{chosen.phenomenon}", chosen.lf))
            ref.borrow = []
        refs[:] = [r for r in refs if r.sents]


# --------------------------------------------------------------------------------------------------
# Writing the dataset
# --------------------------------------------------------------------------------------------------
def _config_dict(cfg: SyntheticConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


JSON_FILES = ("grefcoco/grefs(unc).json", "grefcoco/instances.json")


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_up_to_date(out_dir: str | os.PathLike, cfg: SyntheticConfig, seed: int) -> bool:
    """True when ``out_dir`` holds this exact dataset (version, config, seed, file checksums)."""
    out = Path(out_dir)
    m = read_manifest(out)
    if m is None or m.get("generator_version") != GENERATOR_VERSION or m.get("seed") != seed:
        return False
    if m.get("config") != _config_dict(cfg):
        return False
    for rel, digest in m.get("sha256", {}).items():
        if not (out / rel).is_file() or sha256_file(out / rel) != digest:
            return False
    img_dir = out / "images" / "train2014"
    return img_dir.is_dir() and sum(1 for _ in img_dir.iterdir()) == m["totals"]["images"]


def _split_plan(cfg: SyntheticConfig) -> list[str]:
    return (["train"] * cfg.train_images + ["val"] * cfg.val_images
            + ["testA"] * cfg.testA_images + ["testB"] * cfg.testB_images)


def _make_image(index: int, split: str, cfg: SyntheticConfig, seed: int,
                path: Path) -> tuple[Scene, Rendered, list[_Ref]]:
    rng = np.random.default_rng([seed, index])
    style = _style_for(split, rng)
    for _ in range(100):
        scene = sample_scene(rng, cfg, style)
        rend = render(scene, rng, cfg) if scene is not None else None
        if rend is not None:
            break
    else:
        raise RuntimeError(f"could not place objects for image {index}; loosen the config")
    scene.occ = rend.occ
    Image.fromarray(rend.image).save(path, quality=cfg.jpeg_quality)
    return scene, rend, make_refs(scene, cfg, rng)


def _make_image_job(args: tuple) -> tuple[Scene, Rendered, list[_Ref]]:
    return _make_image(*args)


def generate(
    out_dir: str | os.PathLike,
    preset_or_cfg: str | SyntheticConfig = "default",
    seed: int = 0,
    progress: bool = True,
    force: bool = False,
    workers: int = 1,
) -> dict:
    """Write the synthetic dataset (gRefCOCO layout) and return its manifest.

    Skips all work when ``out_dir/manifest.json`` matches (config, seed, generator version and
    checksums) unless ``force``. Writes into a temporary sibling folder and renames it into place.
    ``workers > 1`` renders images in that many processes; the output is identical.
    """
    from tqdm.auto import tqdm

    cfg = get_config(preset_or_cfg)
    out = Path(out_dir)
    if not force and is_up_to_date(out, cfg, seed):
        return read_manifest(out)  # type: ignore[return-value]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    img_dir = tmp / "images" / "train2014"
    img_dir.mkdir(parents=True)
    (tmp / "grefcoco").mkdir()
    t0 = time.time()
    try:
        split_of = _split_plan(cfg)
        scenes, rendered, refs_by_image = [], [], []
        jobs = [(idx, split_of[idx], cfg, seed, img_dir / f"synthetic_{idx + 1:012d}.jpg")
                for idx in range(len(split_of))]
        bar = dict(total=len(jobs), desc=f"synthetic[{cfg.name}]", disable=not progress,
                   mininterval=2.0)
        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(workers) as pool:
                results = list(tqdm(pool.map(_make_image_job, jobs, chunksize=64), **bar))
        else:
            results = [_make_image_job(j) for j in tqdm(jobs, **bar)]
        for sc, rd, refs in results:
            scenes.append(sc)
            rendered.append(rd)
            refs_by_image.append(refs)
        fill_borrowed(refs_by_image, scenes, split_of, seed)
        instances, grefs = _to_coco(cfg, scenes, rendered, refs_by_image, split_of)
        for rel, obj in zip(JSON_FILES, (grefs, instances)):
            (tmp / rel).write_text(json.dumps(obj, separators=(",", ":")))
        manifest = {
            "name": cfg.name,
            "generator_version": GENERATOR_VERSION,
            "seed": seed,
            "config": _config_dict(cfg),
            "sha256": {rel: sha256_file(tmp / rel) for rel in JSON_FILES},
            **_counts(grefs, instances),
            "seconds": round(time.time() - t0, 1),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _to_coco(cfg: SyntheticConfig, scenes: list[Scene], rendered: list[Rendered],
             refs_by_image: list[list[_Ref]], split_of: list[str]) -> tuple[dict, list]:
    cat_id = {s: k + 1 for k, s in enumerate(SHAPES)}
    images, anns, grefs = [], [], []
    ann_id = ref_id = sent_id = 0
    for idx, (sc, rd, refs) in enumerate(zip(scenes, rendered, refs_by_image)):
        image_id = idx + 1
        file_name = f"synthetic_{image_id:012d}.jpg"
        images.append({"id": image_id, "file_name": file_name, "height": sc.height,
                       "width": sc.width})
        obj_ann = []
        for k, o in enumerate(sc.objects):
            ann_id += 1
            obj_ann.append(ann_id)
            rings = [np.round(r, 2) for r in rd.polygons[k]]
            pts = np.concatenate(rings)
            x0, y0 = pts.min(0)
            x1, y1 = pts.max(0)
            anns.append({
                "id": ann_id, "image_id": image_id, "category_id": cat_id[o.shape], "iscrowd": 0,
                "segmentation": [[float(v) for v in r.ravel()] for r in rings],
                "area": round(rd.areas[k], 1),
                "bbox": [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2),
                         round(float(y1 - y0), 2)],
                "attributes": {"color": o.color, "size": o.size, "depth": k},
            })
        for ref in refs:
            ref_id += 1
            sentences = []
            for s in ref.sents:
                sent_id += 1
                sent = normalise(s.raw)
                sentences.append({"sent_id": sent_id, "sent": sent, "raw": s.raw,
                                  "tokens": sent.split(), "phenomenon": s.phenomenon,
                                  "expr_kind": s.expr_kind})
            targets = [obj_ann[t] for t in ref.targets]
            grefs.append({
                "ref_id": ref_id, "image_id": image_id,
                "file_name": f"synthetic_{image_id:012d}_{ref_id}.jpg",
                "ann_id": targets or [-1],
                "category_id": [cat_id[sc.objects[t].shape] for t in ref.targets] or [-1],
                "no_target": not targets, "split": split_of[idx],
                "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences,
            })
    categories = [{"id": cat_id[s], "name": s, "supercategory": "shape"} for s in SHAPES]
    instances = {"info": {"description": f"GRES synthetic shapes ({cfg.name})",
                          "version": GENERATOR_VERSION},
                 "images": images, "annotations": anns, "categories": categories}
    return instances, grefs


def _counts(grefs: list, instances: dict) -> dict:
    """Per-split counts for the manifest (images, instances, refs, expressions by type)."""
    img_split = {r["image_id"]: r["split"] for r in grefs}
    per: dict[str, dict[str, int]] = {}
    for img in instances["images"]:
        split = img_split.get(img["id"])
        if split is not None:
            per.setdefault(split, dict.fromkeys(
                ["images", "instances", "referred_instances", "refs", "expressions", "single",
                 "multi", "no_target", "nt_false", "nt_borrowed"], 0))["images"] += 1
    for a in instances["annotations"]:
        if a["image_id"] in img_split:
            per[img_split[a["image_id"]]]["instances"] += 1
    referred: dict[str, set] = {}
    kinds: dict[str, int] = {}
    for r in grefs:
        c = per[r["split"]]
        c["refs"] += 1
        n = len(r["sentences"])
        c["expressions"] += n
        if r["ann_id"] == [-1]:
            c["no_target"] += n
        else:
            c["multi" if len(r["ann_id"]) > 1 else "single"] += n
            referred.setdefault(r["split"], set()).update(r["ann_id"])
        for s in r["sentences"]:
            ek = s["expr_kind"]
            kinds[ek] = kinds.get(ek, 0) + 1
            if ek.startswith("nt-false"):
                c["nt_false"] += 1
            elif ek.startswith("nt-borrowed"):
                c["nt_borrowed"] += 1
    for split, ids in referred.items():
        per[split]["referred_instances"] = len(ids)
    order = ["train", "val", "testA", "testB"]
    splits = {k: per[k] for k in order if k in per}
    totals = {k: sum(v[k] for v in splits.values()) for k in next(iter(splits.values()))}
    return {"splits": splits, "totals": totals, "expr_kinds": dict(sorted(kinds.items()))}
