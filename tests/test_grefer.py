"""gres.data.grefer: the gRefCOCO index, its bug fixes, safe pickles, bad input, and
data_prep/check_grefcoco.py."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from gres.data.grefer import GRefer, rasterize_segmentation, safe_pickle_load
from gres.data.synthetic import generate

FIXTURE = Path(__file__).parent / "fixtures" / "mini_grefcoco"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def mini(tmp_path: Path) -> Path:
    """A writable copy of the hand-made fixture (2 images, 6 annotations, 8 refs)."""
    root = tmp_path / "mini"
    shutil.copytree(FIXTURE, root)
    return root


def _edit(root: Path, name: str, fn) -> None:
    path = root / "grefcoco" / name
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "tiny"
    generate(root, "tiny", seed=0, progress=False)
    return root


# --------------------------------------------------------------------------------------------------
# Index semantics
# --------------------------------------------------------------------------------------------------
def test_index_counts_and_queries(mini: Path) -> None:
    g = GRefer(mini)
    assert len(g.refs) == 8 and len(g.sents) == 10 and len(g.imgs) == 2
    assert len(g.anns) == 7  # 6 annotations + the official Anns[-1] = None
    assert g.anns[-1] is None
    assert g.available_splits == ["testA", "testB", "train", "val"]
    assert g.get_ref_ids(split="train") == [1, 2, 3]
    assert g.get_ref_ids(split=["val", "testB"]) == [4, 5, 8]
    assert g.get_ref_ids(image_ids=2) == [5, 7, 8]
    assert g.get_ref_ids(cat_ids=2) == [2, 4, 7]  # any overlap with the ref's category list
    assert g.get_ref_ids(image_ids=[1], cat_ids=[1], split="train") == [1, 2]
    assert g.get_sent_ids("train") == [1, 2, 3, 4, 5]
    assert g.get_img_ids(ref_ids=[1, 5]) == [1, 2]
    assert sorted(g.get_cat_ids()) == [1, 2]
    assert g.load_cats(2) == ["triangle"]


def test_no_target_and_legacy_fields(mini: Path) -> None:
    g = GRefer(mini)
    assert g.refs[3]["no_target"] and g.is_no_target(3) and not g.is_no_target(1)
    assert g.ref_to_anns[3] == [None]
    assert [r["ref_id"] for r in g.ann_to_refs[-1]] == [3, 8]  # -1 collects the no-target refs
    # a bare int ann_id / category_id (older files) is normalised to a list
    assert g.refs[4]["ann_id"] == [4] and g.refs[4]["category_id"] == [2]
    assert g.refs[4]["no_target"] is False
    assert [r["ref_id"] for r in g.cat_to_refs[1]] == [1, 2, 5, 6, 6]  # lists are expanded


def test_get_ann_ids_never_returns_minus_one(mini: Path) -> None:
    g = GRefer(mini)
    assert g.get_ann_ids(image_ids=1) == [1, 2, 3, 4]
    assert g.get_ann_ids(image_ids=1, ref_ids=[2]) == [1, 2]
    assert g.get_ann_ids(image_ids=1, ref_ids=[3]) == []
    assert -1 not in g.get_ann_ids()


def test_masks_union_and_no_target(mini: Path) -> None:
    g = GRefer(mini)
    m1 = g.get_mask(ref_id=1)
    assert not m1["empty"] and m1["mask"].shape == (30, 40)
    expected = np.zeros((30, 40), np.uint8)
    expected[4:14, 4:14] = 1
    np.testing.assert_array_equal(m1["mask"], expected)
    m2 = g.get_mask(ref_id=2)["mask"]
    tri = g.get_ann_mask(g.anns[2])["mask"]
    np.testing.assert_array_equal(m2, np.maximum(expected, tri))
    # no-target: the official getMaskByRef(ref_id=...) crashes; ours answers the same both ways
    for m in (g.get_mask(ref_id=3), g.get_mask(ref=g.refs[3]), g.getMaskByRef(ref_id=3)):
        assert m["empty"] and m["mask"].shape == (30, 40) and m["mask"].sum() == 0
    assert g.get_ref_boxes(3) == []
    assert g.get_ref_boxes(2) == [[4, 4, 10, 10], [20, 20, 10, 8]]
    # degenerate polygon part of annotation 4 is dropped, the valid part kept
    m4 = g.get_mask(ref_id=4)["mask"]
    assert m4.sum() == 36 and m4[1, 1] == 0
    # crowd RLE decodes (columns 34..37)
    crowd = g.get_ann_mask(g.anns[3])["mask"]
    assert crowd.sum() == 120 and crowd[:, 34:38].all()
    # official per-annotation form
    per_ann = g.getMaskByRef(ref_id=2)
    assert isinstance(per_ann, list) and len(per_ann) == 2 and per_ann[0]["area"] == 100
    # resized frame: the square scales with the image
    big = g.get_mask(ref_id=1, out_hw=(60, 80))["mask"]
    assert big.sum() == 400 and big[8:28, 8:28].all()
    assert g.load_anns("1")[0]["id"] == 1  # str id cast to int (official)


def test_rasterize_segmentation_scaling() -> None:
    square = [[4.0, 4.0, 14.0, 4.0, 14.0, 14.0, 4.0, 14.0]]
    m = rasterize_segmentation(square, (30, 40), (15, 20))  # half size
    assert m.sum() == 25 and m[2:7, 2:7].all()
    m = rasterize_segmentation(square, (30, 40), (30, 80))  # x stretched only
    assert m.sum() == 200 and m[4:14, 8:28].all()


def test_synthetic_set_indexes(tiny: Path) -> None:
    g = GRefer(tiny)
    manifest = json.loads((tiny / "manifest.json").read_text())
    assert len(g.sents) == manifest["totals"]["expressions"]
    assert g.available_splits == sorted(["train", "val", "testA", "testB"])
    for ref_id in g.get_ref_ids(split="val"):
        m = g.get_mask(ref_id=ref_id)
        assert m["empty"] == g.refs[ref_id]["no_target"] == (m["mask"].sum() == 0)


# --------------------------------------------------------------------------------------------------
# Classic RefCOCO pickles: loaded without running code
# --------------------------------------------------------------------------------------------------
def _classic_layout(mini: Path, refs_obj, name: str = "refcoco") -> Path:
    d = mini / name
    d.mkdir()
    shutil.copy(mini / "grefcoco" / "instances.json", d / "instances.json")
    (d / "refs(unc).p").write_bytes(pickle.dumps(refs_obj, protocol=2))
    return d


def test_classic_refs_pickle_loads(mini: Path) -> None:
    refs = [{"ref_id": 11, "image_id": 1, "ann_id": 1, "category_id": 1, "split": "testA",
             "file_name": "COCO_train2014_000000000001_1.jpg", "sent_ids": [21],
             "sentences": [{"sent_id": 21, "sent": "left square", "raw": "left square",
                            "tokens": ["left", "square"]}]}]
    _classic_layout(mini, refs)
    g = GRefer(mini, "refcoco", "unc")
    assert g.refs[11]["ann_id"] == [1] and g.get_ref_ids(split="testA") == [11]
    assert g.get_mask(ref_id=11)["mask"].sum() == 100


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_malicious_pickle_is_refused(mini: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _Evil.marker = marker
    d = _classic_layout(mini, [{"ref_id": 1, "payload": _Evil()}])
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p.*refusing to load global"):
        GRefer(mini, "refcoco")
    assert not marker.exists()
    (d / "evil.p").write_bytes(pickle.dumps(eval, protocol=2))
    with pytest.raises(ValueError, match=r"refusing to load global __builtin__\.eval"):
        safe_pickle_load(d / "evil.p")
    (d / "trunc.p").write_bytes(pickle.dumps([{"a": 1}] * 10)[:20])
    with pytest.raises(ValueError, match="trunc.p"):
        safe_pickle_load(d / "trunc.p")


# --------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the file / ref / annotation
# --------------------------------------------------------------------------------------------------
def test_missing_files(mini: Path) -> None:
    (mini / "grefcoco" / "grefs(unc).json").unlink()
    with pytest.raises(FileNotFoundError, match=r"grefs\(unc\)\.json.*gRefCOCO"):
        GRefer(mini)
    with pytest.raises(FileNotFoundError, match="refcoco"):
        GRefer(mini, "refcoco")
    shutil.copytree(FIXTURE, mini, dirs_exist_ok=True)
    (mini / "grefcoco" / "instances.json").unlink()
    with pytest.raises(FileNotFoundError, match="instances.json"):
        GRefer(mini)
    with pytest.raises(ValueError, match="unknown dataset"):
        GRefer(mini, "refclef")


@pytest.mark.parametrize("name", ["grefs(unc).json", "instances.json"])
def test_malformed_and_truncated_json(mini: Path, name: str) -> None:
    path = mini / "grefcoco" / name
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    pattern = name.replace("(", ".").replace(")", ".") + ".*malformed or truncated"
    with pytest.raises(ValueError, match=pattern):
        GRefer(mini)
    path.write_text("{'single': 'quotes'}")
    with pytest.raises(ValueError, match="malformed"):
        GRefer(mini)


def test_ref_pointing_at_missing_annotation(mini: Path) -> None:
    _edit(mini, "grefs(unc).json", lambda refs: refs[1].update(ann_id=[1, 99]))
    with pytest.raises(ValueError, match="ref 2: points at annotation 99"):
        GRefer(mini)


def test_annotation_without_segmentation(mini: Path) -> None:
    _edit(mini, "instances.json", lambda d: d["annotations"][1].pop("segmentation"))
    with pytest.raises(ValueError, match="ref 2.*annotation 2 has no segmentation"):
        GRefer(mini)


def test_polygon_with_fewer_than_three_points(mini: Path) -> None:
    _edit(mini, "instances.json",
          lambda d: d["annotations"][1].update(segmentation=[[20, 20, 30, 20]]))
    with pytest.raises(ValueError, match="annotation 2: every polygon has fewer than 3 points"):
        GRefer(mini)


def test_ref_without_sentences(mini: Path) -> None:
    _edit(mini, "grefs(unc).json", lambda refs: refs[4].update(sentences=[]))
    with pytest.raises(ValueError, match="ref 5: has no sentences"):
        GRefer(mini)


def test_other_bad_refs(mini: Path) -> None:
    _edit(mini, "grefs(unc).json", lambda refs: refs[0].update(ann_id=[-1, 1]))
    with pytest.raises(ValueError, match="ref 1: ann_id mixes -1"):
        GRefer(mini)
    shutil.copytree(FIXTURE, mini, dirs_exist_ok=True)
    _edit(mini, "grefs(unc).json", lambda refs: refs[0].pop("split"))
    with pytest.raises(ValueError, match=r"ref #0 \(ref_id=1\) lacks keys \['split'\]"):
        GRefer(mini)
    shutil.copytree(FIXTURE, mini, dirs_exist_ok=True)
    _edit(mini, "grefs(unc).json", lambda refs: refs[0].update(image_id=77))
    with pytest.raises(ValueError, match="ref 1: image_id 77"):
        GRefer(mini)


def test_unknown_split(mini: Path) -> None:
    g = GRefer(mini)
    with pytest.raises(ValueError, match=r"unknown split.*'test'.*available"):
        g.get_ref_ids(split="test")


# --------------------------------------------------------------------------------------------------
# data_prep/check_grefcoco.py
# --------------------------------------------------------------------------------------------------
def _check_module():
    path = REPO / "data_prep" / "check_grefcoco.py"
    spec = importlib.util.spec_from_file_location("check_grefcoco", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_check_grefcoco_on_tiny(tiny: Path, tmp_path: Path) -> None:
    mod = _check_module()
    out = tmp_path / "manifest.json"
    rep = mod.check_layout(tiny, manifest=out)
    assert rep.ok, rep.text()
    m = json.loads(out.read_text())
    gen = json.loads((tiny / "manifest.json").read_text())
    for split, c in gen["splits"].items():
        for key in ("images", "refs", "expressions", "single", "multi", "no_target"):
            assert m["splits"][split][key] == c[key], (split, key)
    rel = "grefcoco/grefs(unc).json"
    assert m["files"][rel]["sha256"] == gen["sha256"][rel]
    assert mod.main(["--root", str(tiny), "--manifest", "none", "--images", "sample",
                     "--sample", "5"]) == 0


def test_check_grefcoco_broken_layouts(tmp_path: Path, tiny: Path, capsys) -> None:
    mod = _check_module()
    rep = mod.check_layout(tmp_path / "nowhere")
    assert not rep.ok and "does not exist" in rep.problems[0]
    empty = tmp_path / "empty"
    (empty / "grefcoco").mkdir(parents=True)
    rep = mod.check_layout(empty, manifest=None)
    text = "\n".join(rep.problems)
    assert not rep.ok
    assert "grefs(unc).json" in text and "github.com/henghuiding/gRefCOCO" in text
    assert "instances.json" in text
    assert "images/train2014" in text and "images.cocodataset.org/zips/train2014.zip" in text
    # complete annotations, two images missing
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    victims = sorted((broken / "images" / "train2014").iterdir())[:2]
    for v in victims:
        v.unlink()
    rep = mod.check_layout(broken, manifest=None)
    assert not rep.ok and "2 of" in rep.problems[0] and victims[0].name in rep.problems[0]
    assert mod.main(["--root", str(broken), "--manifest", "none"]) == 1
    assert "NOT USABLE" in capsys.readouterr().out
    # bad annotations: the index error is reported
    _edit(broken, "grefs(unc).json", lambda refs: refs[0].update(sentences=[]))
    rep = mod.check_layout(broken, manifest=None)
    assert not rep.ok and "has no sentences" in rep.problems[0]
