"""gres.data.synthetic (scenes, logical forms, expressions, writer) and gres.data.stats."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gres.data import stats
from gres.data import synthetic as syn
from gres.data.grefer import GRefer
from gres.data.synthetic import (
    Attr,
    Compound,
    Count,
    Desc,
    Except,
    Extreme,
    Obj,
    Ordinal,
    Region,
    Relation,
    Scene,
    Shared,
    SyntheticConfig,
    evaluate,
    generate,
    kind_of,
    realise,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = dataclasses.replace(SyntheticConfig(), name="small", train_images=100, val_images=30,
                            testA_images=10, testB_images=10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "tiny"
    generate(root, "tiny", seed=0, progress=False)  # its time budget is benched, not tested
    return root


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "small"
    generate(root, SMALL, seed=0, progress=False)
    return root


def scene() -> Scene:
    """A 200x100 scene: red circles at x 20 (big) / 70 (small), a blue circle at 120, a blue star
    top right (170, 20) and a green square bottom right (170, 80); the small red circle is partly
    hidden by the blue circle."""
    objs = [Obj("circle", "red", "big", 20, 50, 15), Obj("circle", "red", "small", 70, 50, 8),
            Obj("circle", "blue", "big", 120, 50, 15), Obj("star", "blue", "small", 170, 20, 8),
            Obj("square", "green", "big", 170, 80, 15)]
    occ = np.zeros((5, 5))
    occ[1, 2] = 0.2  # object 1 is 20% covered by object 2 (drawn later)
    return Scene(200, 100, objs, occ)


CIRCLE, RED_CIRCLE = Desc(shape="circle"), Desc(shape="circle", color="red")
STAR, SQUARE = Desc(shape="star"), Desc(shape="square")


# --------------------------------------------------------------------------------------------------
# Meaning of logical forms
# --------------------------------------------------------------------------------------------------
def test_attributes_and_counting() -> None:
    s = scene()
    assert evaluate(Attr(STAR, False), s) == {3}
    assert evaluate(Attr(RED_CIRCLE, False), s) is None  # "the red circle": two of them
    assert evaluate(Attr(RED_CIRCLE, True), s) == {0, 1}
    assert evaluate(Attr(STAR, True), s) is None  # "the stars" with one star
    assert evaluate(Attr(Desc(color="yellow"), False), s) == frozenset()  # no target
    assert evaluate(Count(RED_CIRCLE, 2), s) == {0, 1}
    assert evaluate(Count(CIRCLE, 2), s) is None  # "the two circles" with three circles
    assert evaluate(Count(Desc(shape="triangle"), 2), s) == frozenset()


def test_cardinal_versus_ordinal() -> None:
    s = scene()
    assert evaluate(Extreme(CIRCLE, "left", 2), s) == {0, 1}  # "the two circles on the left"
    assert evaluate(Ordinal(CIRCLE, 2, "left"), s) == {1}  # "the second circle from the left"
    assert evaluate(Ordinal(CIRCLE, 3, "left"), s) == {2}
    assert evaluate(Ordinal(CIRCLE, 2, "right"), s) == {1}
    assert evaluate(Extreme(CIRCLE, "left", 1), s) == {0}
    assert evaluate(Extreme(CIRCLE, "right", 1), s) == {2}
    assert evaluate(Ordinal(STAR, 2, "left"), s) == frozenset()  # one star: no second star
    assert evaluate(Extreme(STAR, "left", 1), s) is None  # "the leftmost star" of one star
    close = Scene(200, 100, [Obj("circle", "red", "big", 50, 50, 10),
                             Obj("circle", "red", "big", 55, 20, 10)])
    assert evaluate(Extreme(CIRCLE, "left", 1), close) is None  # 5 px apart: ambiguous


def test_regions_and_relations() -> None:
    s = scene()
    assert evaluate(Region(STAR, "top right", False), s) == {3}
    assert evaluate(Region(STAR, "bottom left", False), s) == frozenset()  # false position
    assert evaluate(Relation(CIRCLE, "left_of", SQUARE, True), s) == {0, 1, 2}
    assert evaluate(Relation(CIRCLE, "left_of", SQUARE, False), s) is None  # three, said "the"
    assert evaluate(Relation(STAR, "above", SQUARE, False), s) == {3}
    assert evaluate(Relation(STAR, "below", SQUARE, False), s) == frozenset()
    assert evaluate(Relation(CIRCLE, "behind", Desc(shape="circle", color="blue"), False), s) == {1}
    small_circle = Desc(shape="circle", size="small")
    assert evaluate(Relation(CIRCLE, "in_front", small_circle, False), s) == {2}
    assert evaluate(Relation(CIRCLE, "left_of", Desc(color="yellow"), False), s) == frozenset()
    assert evaluate(Relation(STAR, "left_of", CIRCLE, False), s) is None  # anchor not unique


def test_compound_shared_exclusion() -> None:
    s = scene()
    assert evaluate(Compound((Attr(STAR, False), Attr(SQUARE, False))), s) == {3, 4}
    assert evaluate(Compound((Attr(STAR, False), Attr(Desc(color="yellow"), False))), s) is None
    assert evaluate(Compound((Attr(Desc(color="yellow"), False),
                              Attr(Desc(shape="triangle"), False))), s) == frozenset()
    blue_circle = Desc(shape="circle", color="blue")
    shared = Shared((RED_CIRCLE, blue_circle), (True, False), "shape", "color")
    assert evaluate(shared, s) == {0, 1, 2}  # "the red and blue circles"
    assert evaluate(Except(Desc(), Desc(shape="circle"), None, True), s) == {3, 4}
    assert evaluate(Except(CIRCLE, None, "left", False), s) == {1, 2}
    assert evaluate(Except(CIRCLE, Desc(color="red"), None, True), s) is None  # leaves one
    assert evaluate(Except(CIRCLE, Desc(color="blue"), None, True), s) is None  # "ones" vs one
    assert evaluate(Except(Desc(shape="diamond"), Desc(color="red"), None, False), s) == frozenset()
    kinds = [kind_of(x) for x in (Attr(STAR, False), Extreme(CIRCLE, "left", 1),
                                  Extreme(CIRCLE, "left", 2), Ordinal(CIRCLE, 2, "left"),
                                  Compound(()), shared, Except(CIRCLE, None, "left", False))]
    assert kinds == ["attribute", "position", "counting", "ordinal", "compound",
                     "shared-attribute", "exclusion"]


def test_realisations_say_what_the_lf_means() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        t = realise(Ordinal(CIRCLE, 2, "left"), rng)
        assert ("second" in t or "2nd" in t) and "left" in t and ("circle" in t or "disc" in t)
        t = realise(Count(RED_CIRCLE, 2), rng)
        assert any(w in t.split() for w in ("two", "2", "both", "pair")) and "red" in t
        t = realise(Extreme(CIRCLE, "right", 3), rng)
        assert ("three" in t or "3" in t) and "right" in t
        t = realise(Except(CIRCLE, Desc(color="blue"), None, False), rng)
        assert "blue" in t and any(w in t for w in ("except", "but", "other than", "apart from"))
        t = realise(Relation(STAR, "behind", SQUARE, False), rng)
        assert "star" in t and ("behind" in t or "covered" in t)
        t = realise(Attr(Desc(shape="star", color="purple", size="small"), False), rng)
        assert ("purple" in t or "violet" in t) and any(w in t for w in ("small", "little", "tiny"))


def test_false_twin_is_relevant_empty_and_same_form() -> None:
    s = scene()
    rng = np.random.default_rng(1)
    true_lfs = [Attr(Desc(shape="square", color="green"), False),
                Ordinal(Desc(shape="circle"), 2, "left"),
                Compound((Attr(STAR, False), Attr(Desc(shape="square", color="green"), False)))]
    before = [dataclasses.astuple(o) for o in s.objects]
    for lf in true_lfs:
        number = "multi" if len(evaluate(lf, s)) > 1 else "single"
        twin = syn._false_lf(lf, number, s, rng, tries=50)
        assert twin is not None, lf
        assert evaluate(twin, s) == frozenset() and syn.is_relevant(twin, s)
        assert syn.form_of(twin) == syn.form_of(lf) and kind_of(twin) == kind_of(lf)
    phantom, changed = syn.perturb(s, rng, edits=2)
    assert changed and [dataclasses.astuple(o) for o in s.objects] == before  # real scene untouched


# --------------------------------------------------------------------------------------------------
# The written dataset
# --------------------------------------------------------------------------------------------------
def test_files_follow_grefcoco_format(tiny: Path) -> None:
    refs = json.loads((tiny / "grefcoco" / "grefs(unc).json").read_text())
    inst = json.loads((tiny / "grefcoco" / "instances.json").read_text())
    manifest = json.loads((tiny / "manifest.json").read_text())
    assert {r["split"] for r in refs} == {"train", "val", "testA", "testB"}
    anns = {a["id"]: a for a in inst["annotations"]}
    images = {i["id"]: i for i in inst["images"]}
    for r in refs:
        assert set(r) == {"ref_id", "image_id", "file_name", "ann_id", "category_id", "no_target",
                          "split", "sent_ids", "sentences"}
        assert r["no_target"] == (r["ann_id"] == [-1]) == (r["category_id"] == [-1])
        assert r["sent_ids"] == [s["sent_id"] for s in r["sentences"]] and r["sentences"]
        for a in r["ann_id"]:
            assert a == -1 or anns[a]["image_id"] == r["image_id"]
        for s in r["sentences"]:
            assert s["sent"] == syn.normalise(s["raw"]) and s["tokens"] == s["sent"].split()
            assert s["expr_kind"].startswith("nt-") == r["no_target"]
            assert s["phenomenon"] in s["expr_kind"]
        if not r["no_target"]:
            assert r["category_id"] == [anns[a]["category_id"] for a in r["ann_id"]]
    for a in anns.values():
        assert a["iscrowd"] == 0 and all(len(p) >= 6 and len(p) % 2 == 0 for p in a["segmentation"])
        img = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= img["width"] + 1 and y + h <= img["height"] + 1
    files = sorted(p.name for p in (tiny / "images" / "train2014").iterdir())
    assert files == sorted(i["file_name"] for i in images.values())
    sizes = {(i["width"], i["height"]) for i in images.values()}
    assert sizes <= {(256, 192), (192, 256), (224, 224)}
    tot = manifest["totals"]
    assert tot["expressions"] == sum(len(r["sentences"]) for r in refs)
    assert tot["no_target"] == sum(len(r["sentences"]) for r in refs if r["no_target"])
    assert tot["images"] == len(images) and tot["instances"] == len(anns)
    assert manifest["seed"] == 0 and manifest["config"]["name"] == "tiny"


def test_masks_cover_the_drawn_objects(tiny: Path) -> None:
    """Inside every annotation mask the image has the annotation's colour (JPEG, noise, shading
    and anti-aliased edges allowed for): images and polygons agree."""
    g = GRefer(tiny)
    names = list(syn.COLORS)
    palette = np.array([syn.COLORS[c] for c in names], float)
    hits = total = 0
    for iid in g.get_img_ids():
        img = np.asarray(syn.Image.open(g.image_path(iid)).convert("RGB"), float)
        for a in g.img_to_anns[iid]:
            m = g.get_ann_mask(a)["mask"].astype(bool)
            inner = m & np.roll(m, 2, 0) & np.roll(m, -2, 0) & np.roll(m, 2, 1) & np.roll(m, -2, 1)
            mean = img[inner if inner.sum() > 5 else m].mean(0)
            nearest = names[int(np.argmin(((palette - mean) ** 2).sum(1)))]
            hits += nearest == a["attributes"]["color"]
            total += 1
    assert total > 100 and hits / total > 0.97


def test_every_phenomenon_and_both_no_target_rules(small: Path) -> None:
    df = stats.expressions_frame(small)
    target = df[df["expr_type"] != "no-target"]
    nt = df[df["expr_type"] == "no-target"]
    kinds = set(syn.SINGLE_KINDS) | set(syn.MULTI_KINDS)
    assert set(target["phenomenon"]) == kinds
    assert set(nt["phenomenon"]) == kinds
    assert set(df[df["expr_type"] == "single"]["phenomenon"]) == set(syn.SINGLE_KINDS)
    assert set(df[df["expr_type"] == "multi"]["phenomenon"]) == set(syn.MULTI_KINDS)
    rules = nt["expr_kind"].str.split("-").str[1]
    assert set(rules) == {"false", "borrowed"} and (rules == "false").mean() > 0.35
    multi = (df["expr_type"] == "multi").mean()
    no_target = (df["expr_type"] == "no-target").mean()
    assert 0.2 < multi < 0.4 and 0.1 < no_target < 0.28  # gRefCOCO: 28.8% / 11.6%
    # borrowed sentences are sentences of other images of the same split
    g = GRefer(small)
    text_by_split: dict[str, dict[str, set]] = {}
    for r in g.refs.values():
        if not r["no_target"]:
            for s in r["sentences"]:
                texts = text_by_split.setdefault(r["split"], {})
                texts.setdefault(s["raw"], set()).add(r["image_id"])
    for r in g.refs.values():
        for s in r["sentences"]:
            if s["expr_kind"].startswith("nt-borrowed"):
                sources = text_by_split[r["split"]][s["raw"]]
                assert sources - {r["image_id"]}


def test_deterministic_idempotent_and_atomic(tmp_path: Path, tiny: Path, monkeypatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    ma = generate(a, "tiny", seed=0, progress=False)
    mb = generate(b, "tiny", seed=0, progress=False)
    tiny_manifest = json.loads((tiny / "manifest.json").read_text())
    assert ma["sha256"] == mb["sha256"] == tiny_manifest["sha256"]
    assert (a / "images" / "train2014" / "synthetic_000000000003.jpg").read_bytes() == \
        (b / "images" / "train2014" / "synthetic_000000000003.jpg").read_bytes()
    mc = generate(tmp_path / "c", "tiny", seed=1, progress=False)
    assert mc["sha256"] != ma["sha256"]
    # idempotent: a matching manifest means no work and no rewrite
    stamp = (a / "grefcoco" / "instances.json").stat().st_mtime_ns
    assert generate(a, "tiny", seed=0, progress=False) == ma
    assert (a / "grefcoco" / "instances.json").stat().st_mtime_ns == stamp
    # a changed file is detected and the set regenerated
    (a / "grefcoco" / "instances.json").write_text("{}")
    assert not syn.is_up_to_date(a, syn.PRESETS["tiny"], 0)
    generate(a, "tiny", seed=0, progress=False)
    assert syn.is_up_to_date(a, syn.PRESETS["tiny"], 0)

    # a crash half-way leaves the previous dataset intact and no temporary folder behind
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(syn, "_to_coco", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        generate(a, "tiny", seed=5, progress=False)
    assert syn.is_up_to_date(a, syn.PRESETS["tiny"], 0)
    with pytest.raises(RuntimeError):
        generate(tmp_path / "fresh", "tiny", seed=0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="unknown synthetic preset"):
        generate(tmp_path / "x", "huge")


def test_make_synthetic_cli(tmp_path: Path, capsys) -> None:
    path = REPO / "data_prep" / "make_synthetic.py"
    spec = importlib.util.spec_from_file_location("make_synthetic", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    out = tmp_path / "t"
    assert mod.main(["--preset", "tiny", "--out", str(out), "--quiet"]) == 0
    assert "expressions" in capsys.readouterr().out
    assert mod.main(["--preset", "tiny", "--out", str(out), "--quiet"]) == 0
    assert "up to date" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------
def test_summary_and_histograms(tiny: Path) -> None:
    manifest = json.loads((tiny / "manifest.json").read_text())
    df = stats.expressions_frame(tiny)
    summary = stats.dataset_summary(tiny)
    assert list(summary.index) == ["train", "val", "testA", "testB", "total"]
    for split, c in manifest["splits"].items():
        row = summary.loc[split]
        assert (row["images"], row["expressions"], row["single"], row["multi"], row["no-target"],
                row["instances"], row["refs"]) == (c["images"], c["expressions"], c["single"],
                                                   c["multi"], c["no_target"],
                                                   c["referred_instances"], c["refs"])
    assert summary.loc["total", "expressions"] == len(df)
    lengths = stats.length_histogram(df)
    assert lengths.values.sum() == len(df)
    assert list(lengths.columns) == ["single", "multi", "no-target"]
    tok_lengths = stats.length_histogram(df, tokenizer=syn_tokenizer(), max_len=20)
    assert tok_lengths.index.max() <= 20 and tok_lengths.index.min() >= 3
    targets = stats.targets_histogram(df)
    assert targets.loc[0].sum() == (df["n_targets"] == 0).sum() and targets.values.sum() == len(df)
    words = stats.word_frequencies(df, top=10)
    assert len(words) == 10 and words["count"].is_monotonic_decreasing and "the" in words.index
    table = stats.phenomenon_table(df)
    assert table.loc["total", "total"] == len(df)
    r = stats.text_only_no_target(df, epochs=5)  # runs on the tiny set (too small to mean much)
    assert 0.0 <= r["balanced_accuracy"] <= 1.0 and r["n_train"] == (df["split"] == "train").sum()


def syn_tokenizer():
    from gres.data.dataset import build_tokenizer

    return build_tokenizer(None)


def test_text_only_classifier(small: Path) -> None:
    df = stats.expressions_frame(small)
    r = stats.text_only_no_target(df, epochs=10)
    assert 0.0 <= r["balanced_accuracy"] <= 1.0 and r["n_test"] == (df["split"] == "val").sum()
    assert r["balanced_accuracy"] < 0.7  # loose on a small set; bench/RESULTS.md has the real one
    rules = stats.image_independent_rules(df, include_text_model=False)
    assert rules.loc["always target", "balanced_accuracy"] == 50.0
    assert "by phenomenon" in rules.index
    # the classifier does find a planted leak
    leak = df.copy()
    nt = leak["expr_type"] == "no-target"
    leak.loc[nt, "sentence"] = leak.loc[nt, "sentence"] + " nothing"
    assert stats.text_only_no_target(leak, epochs=10)["balanced_accuracy"] > 0.9
    with pytest.raises(ValueError, match="splits"):
        stats.text_only_no_target(df, test_split="test")
    assert isinstance(stats.image_independent_rules(df), pd.DataFrame)
