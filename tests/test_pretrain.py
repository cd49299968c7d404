"""Tests for gres.pretrain: category maps, the pretraining cache, and how training resolves it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from gres import engine
from gres import experiments as ex
from gres import pretrain as pt
from gres.config import PRESETS


@pytest.fixture(scope="module")
def tiny_data(tiny_synthetic):
    return tiny_synthetic


@pytest.fixture(scope="module")
def cfg(tiny_data):
    """cpu-smoke on the tiny set (Swin pretrained on the categories), 3 pretraining iterations."""
    base = PRESETS["cpu-smoke"]()
    assert base.model.swin.pretrained == pt.PRETRAIN_SOURCE
    return ex.replace(base, data={"root": str(tiny_data)},
                      pretrain={"iterations": 3, "batch_size": 4, "eval_every": 2,
                                "eval_images": 4})


def test_category_maps_match_the_instances(tiny_data):
    from gres.data.grefer import GRefer, rasterize_segmentation

    ds = pt.CategorySegmentation(tiny_data, "train", dataset="grefcoco", image_size=64)
    refer = GRefer(tiny_data, "grefcoco", "unc")
    train_images = {int(refer.refs[r]["image_id"]) for r in refer.get_ref_ids(split="train")}
    val_images = {int(refer.refs[r]["image_id"]) for r in refer.get_ref_ids(split="val")}
    assert len(ds) == len(train_images) and not train_images & val_images
    assert ds.num_classes == 7 and ds.cat_names[0] == "circle"  # 6 shapes + background
    image, labels = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert labels.shape == (64, 64) and labels.dtype == torch.int64
    iid = sorted(train_images)[0]
    img = refer.imgs[iid]
    for ann in refer.img_to_anns[iid]:  # every visible instance carries its shape's label
        m = rasterize_segmentation(ann["segmentation"], (img["height"], img["width"]), (64, 64))
        inside = labels.numpy()[m.astype(bool)]
        assert (inside == ann["category_id"]).mean() > 0.95
    assert set(np.unique(labels.numpy())) <= set(range(7))
    assert (labels == 0).float().mean() > 0.5  # background dominates


def test_category_metrics_by_hand():
    labels = torch.tensor([[0, 1, 1, 2, pt.IGNORE]])
    pred = torch.tensor([[1, 1, 2, 2, 1]])
    m = pt.category_metrics(pred, labels, num_classes=3)
    assert m["fg_acc"] == pytest.approx(2 / 3)  # pixels 1, 2, 3 are foreground; 1 and 3 right
    # class 1: I = 1, U = {0, 1, 2} -> 1/3 (the ignored pixel is not counted); class 2: 1/2
    assert m["mIoU"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_pretrain_caches_and_loads_into_the_gres_backbone(cfg, tmp_path):
    root = tmp_path / "pre"
    path = pt.pretrain_backbone(cfg, root, progress=False, verbose=False)
    assert path.parent == pt.pretrain_dir(cfg, root)
    info = json.loads((path.parent / "pretrain.json").read_text())
    assert [r["iter"] for r in info["curve"]] == [2, 3] and info["categories"][0] == "circle"
    stamp = path.stat().st_mtime_ns
    assert pt.pretrain_backbone(cfg, root, progress=False, verbose=False) == path  # cached
    assert path.stat().st_mtime_ns == stamp
    # the key follows the recipe and the Swin, not the GRES-only parts
    assert pt.pretrain_key(ex.replace(cfg, pretrain={"lr": 5e-4})) != pt.pretrain_key(cfg)
    assert pt.pretrain_key(ex.replace(cfg, swin={"stem": "conv"})) != pt.pretrain_key(cfg)
    assert pt.pretrain_key(ex.replace(cfg, loss={"region_weight": 0.5})) == pt.pretrain_key(cfg)
    # resolved config: the GRES model's Swin starts from exactly these weights
    resolved = pt.resolve_pretrained(cfg, root, progress=False)
    assert resolved.model.swin.pretrained == str(path)
    model = engine.prepare_model(resolved)
    from safetensors.torch import load_file

    saved = load_file(str(path))
    own = model.backbone.state_dict()
    assert "patch_embed.proj.weight" in saved and not any(".fusion." in k for k in saved)
    for key, value in saved.items():
        torch.testing.assert_close(own[key], value, rtol=0, atol=0)
    assert pt.resolve_pretrained(PRESETS["tiny-test"](), root) == PRESETS["tiny-test"]()


def test_unresolved_source_is_refused_with_a_clear_error(cfg):
    with pytest.raises(ValueError, match="resolve_pretrained"):
        engine.prepare_model(cfg)
    engine.prepare_model(cfg, load_pretrained=False)  # weights from a checkpoint: fine
    with pytest.raises(ValueError, match="iterations"):
        pt.pretrain_backbone(ex.replace(cfg, pretrain={"iterations": 0}), "unused")


def test_train_pretrains_once_next_to_the_runs(cfg, tmp_path):
    run = tmp_path / "runs" / "a"
    engine.train(cfg, run, progress=False)
    folders = list((tmp_path / "runs" / "_pretrained").glob("swin-*"))
    assert [f.name for f in folders] == [f"swin-{pt.pretrain_key(cfg)}"]
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["swin"]["pretrained"] == pt.PRETRAIN_SOURCE  # the source, not a path
    stamp = (folders[0] / pt.BACKBONE_FILE).stat().st_mtime_ns
    engine.train(dataclasses.replace(cfg, name="b"), tmp_path / "runs" / "b", progress=False)
    assert (folders[0] / pt.BACKBONE_FILE).stat().st_mtime_ns == stamp


def test_experiments_pretrain_once_for_the_book(cfg, tmp_path):
    root = tmp_path / "experiments"
    assert ex.pretrained_backbone(PRESETS["tiny-test"](), root=root) is None  # no pretraining
    assert ex.pretrained_backbone(cfg, root=root, train=False) is None  # not cached yet
    record = ex.pretrained_backbone(cfg, root=root)
    assert record["key"] == pt.pretrain_key(ex._runnable(cfg))
    assert record["curve"][-1]["iter"] == cfg.pretrain.iterations
    assert (ex.pretrain_root(root) / f"swin-{record['key']}" / pt.BACKBONE_FILE).is_file()
    assert ex.pretrained_backbone(cfg, root=root, train=False) == record


def test_attribute_maps_label_each_instance_with_its_attribute_values(tiny_data):
    from gres.data.grefer import GRefer, rasterize_segmentation

    plain = pt.CategorySegmentation(tiny_data, "train", image_size=64)
    ds = pt.CategorySegmentation(tiny_data, "train", image_size=64, attributes=("color", "size"))
    assert ds.attribute_values["size"] == ["big", "small"]
    assert "red" in ds.attribute_values["color"] and len(ds.attribute_values["color"]) <= 7
    refer = GRefer(tiny_data, "grefcoco", "unc")
    image, labels = ds[0]
    assert labels.shape == (3, 64, 64) and torch.equal(labels[0], plain[0][1])
    iid = sorted({int(refer.refs[r]["image_id"]) for r in refer.get_ref_ids(split="train")})[0]
    img = refer.imgs[iid]
    for ann in refer.img_to_anns[iid]:
        m = rasterize_segmentation(ann["segmentation"], (img["height"], img["width"]), (64, 64))
        for k, name in enumerate(("color", "size"), start=1):
            want = ds.attribute_values[name].index(ann["attributes"][name]) + 1
            assert (labels[k].numpy()[m.astype(bool)] == want).mean() > 0.95
    assert bool(((labels[1] > 0) == (labels[0] > 0)).all())  # same objects, other labels
    with pytest.raises(ValueError, match="'weight'"):
        pt.CategorySegmentation(tiny_data, "train", image_size=64, attributes=("weight",))


def test_attribute_pretraining_changes_the_key_and_trains_the_heads(cfg, tmp_path):
    attr = ex.replace(cfg, pretrain={"attributes": ("color",)})
    assert pt.pretrain_key(attr) != pt.pretrain_key(cfg)
    path = pt.pretrain_backbone(attr, tmp_path / "pre", progress=False, verbose=False)
    info = json.loads((path.parent / "pretrain.json").read_text())
    assert "red" in info["attribute_values"]["color"] and info["curve"][-1]["iter"] == 3
    plain = pt.pretrain_backbone(cfg, tmp_path / "pre", progress=False, verbose=False)
    from safetensors.torch import load_file

    a, b = load_file(str(path)), load_file(str(plain))
    assert a.keys() == b.keys()  # only the Swin is kept; the attribute heads are thrown away
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the extra loss changed the weights
