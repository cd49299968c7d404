"""gres.viz returns figures with the right colours, badges and panels (not pixel-perfect)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from gres import viz  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def scene():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)
    gt = torch.zeros(32, 32, dtype=torch.bool)
    gt[4:12, 4:12] = True
    pred = torch.zeros(32, 32, dtype=torch.bool)
    pred[6:14, 6:16] = True
    return image, gt, pred


def _by_gid(fig: Figure) -> dict:
    out = {}
    for ax in fig.axes:
        for artist in ax.get_children():
            if artist.get_gid():
                out.setdefault(artist.get_gid(), []).append(artist)
    return out


def test_use_book_style_sets_rcparams():
    viz.use_book_style()
    rc = matplotlib.rcParams
    assert 9 <= rc["font.size"] <= 10
    assert not rc["axes.spines.top"] and not rc["axes.spines.right"]
    cycle = [c.upper() for c in rc["axes.prop_cycle"].by_key()["color"]]
    assert set(cycle) == {c.upper() for c in viz.OKABE_ITO}
    assert viz.FULL == 7.0 and viz.HALF == 3.4


def test_overlay_colours_alpha_and_contours(scene):
    image, gt, pred = scene
    fig = viz.overlay(image, gt, pred, title="the two red squares")
    assert isinstance(fig, Figure)
    arts = _by_gid(fig)
    assert {"gt-fill", "gt-contour", "pred-fill", "pred-contour"} <= set(arts)
    assert "badge-gt" not in arts and "badge-pred" not in arts
    gt_rgba = arts["gt-fill"][0].get_array()
    pred_rgba = arts["pred-fill"][0].get_array()
    np.testing.assert_allclose(gt_rgba[5, 5], to_rgba("#E69F00", 0.5), atol=1e-6)
    np.testing.assert_allclose(pred_rgba[7, 10], to_rgba("#0072B2", 0.5), atol=1e-6)
    assert gt_rgba[20, 20, 3] == 0 and pred_rgba[0, 0, 3] == 0  # transparent off the mask
    contour = arts["gt-contour"][0]
    np.testing.assert_allclose(contour.get_edgecolor()[0], to_rgba("#E69F00"), atol=1e-6)
    assert fig.axes[0].get_title() == "the two red squares"
    assert fig.axes[0].get_legend() is not None  # both masks -> legend


def test_overlay_no_target_badges(scene):
    image, _, pred = scene
    empty = torch.zeros(32, 32, dtype=torch.bool)
    # GT only, empty: a single "no target" badge
    arts = _by_gid(viz.overlay(image, empty))
    assert arts["badge-gt"][0].get_text() == "no target"
    assert "gt-contour" not in arts
    # empty GT and a non-empty prediction: GT badge only
    arts = _by_gid(viz.overlay(image, empty, pred))
    assert arts["badge-gt"][0].get_text() == "GT: no target" and "badge-pred" not in arts
    # a predicted no-target flag shows the prediction badge even with a non-empty mask
    arts = _by_gid(viz.overlay(image, pred, pred, pred_no_target=True))
    assert arts["badge-pred"][0].get_text() == "pred: no target" and "badge-gt" not in arts
    box = arts["badge-pred"][0].get_bbox_patch()
    np.testing.assert_allclose(box.get_facecolor(), to_rgba("#0072B2"), atol=1e-6)
    # an explicit no-target label wins over the mask content
    arts = _by_gid(viz.overlay(image, torch.zeros(32, 32, dtype=torch.bool), gt_no_target=False))
    assert "badge-gt" not in arts


def test_overlay_accepts_hwc_float_and_low_res_masks(scene):
    image, gt, _ = scene
    hwc = image.permute(1, 2, 0).float().numpy() / 255.0
    small = gt[::4, ::4]  # (8, 8) mask over a (32, 32) image
    fig = viz.overlay(hwc, pred_mask=small)
    im = _by_gid(fig)["pred-fill"][0]
    assert im.get_array().shape[:2] == (8, 8)
    assert tuple(im.get_extent()) == (-0.5, 31.5, 31.5, -0.5)
    with pytest.raises(ValueError, match="image must be"):
        viz.overlay(np.zeros((5, 32, 32)))
    with pytest.raises(ValueError, match="mask must be"):
        viz.overlay(image, gt_mask=np.zeros((2, 3, 32, 32)))


def test_show_grid_from_dataset_samples(scene):
    image, gt, pred = scene
    samples = [
        {"image": image, "gt_mask": gt, "no_target": torch.tensor(False),
         "meta": {"sentence": "left square"}},
        {"image": image, "gt_mask": torch.zeros_like(gt), "no_target": torch.tensor(True),
         "meta": {"sentence": "the blue dog"}},
        {"image": image, "gt_mask": gt, "no_target": torch.tensor(False),
         "meta": {"sentence": "all squares"}},
    ]
    fig = viz.show_grid(samples, preds=[pred, {"pred_mask": pred, "pred_no_target": True}, gt],
                        ncols=2)
    assert len(fig.axes) == 4  # 2 x 2, last panel blank
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[:3] == ["“left square”", "“the blue dog”", "“all squares”"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["ground truth", "prediction"]
    assert all(ax.get_legend() is None for ax in fig.axes)  # one legend for the whole grid
    badges = {a.get_gid(): a.get_text() for a in fig.axes[1].texts if a.get_gid()}
    assert badges == {"badge-gt": "GT: no target", "badge-pred": "pred: no target"}
    with pytest.raises(ValueError, match="predictions"):
        viz.show_grid(samples, preds=[pred])


def test_plot_minimap_layout_and_validation(scene):
    image, gt, _ = scene
    probs = torch.linspace(0, 1, 100)
    fig = viz.plot_minimap(probs, image=image, gt_mask=gt)
    assert isinstance(fig, Figure)
    mm = _by_gid(fig)["minimap"][0]
    arr = mm.get_array()
    assert arr.shape == (10, 10)
    assert arr[0, 3] == pytest.approx(probs[3].item())  # region q -> cell (q // 10, q % 10)
    assert arr[4, 0] == pytest.approx(probs[40].item())
    with pytest.raises(ValueError, match="square grid"):
        viz.plot_minimap(torch.rand(10))
    with pytest.raises(ValueError, match="probabilities"):
        viz.plot_minimap(torch.randn(16) * 5)


def test_plot_region_masks_picks_most_probable(scene):
    image, _, _ = scene
    masks = torch.randn(16, 8, 8)
    probs = torch.zeros(16)
    probs[[5, 11, 2]] = torch.tensor([0.9, 0.8, 0.7])
    fig = viz.plot_region_masks(masks, region_probs=probs, k=3, image=image)
    gids = set(_by_gid(fig))
    assert {"region-5", "region-11", "region-2"} <= gids
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[:4] == ["image", "region 5, x=0.90", "region 11, x=0.80", "region 2, x=0.70"]
    shown = _by_gid(fig)["region-5"][0].get_array()
    np.testing.assert_allclose(shown, torch.sigmoid(masks[5]).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        viz.plot_region_masks(masks, region_ids=[16])


def test_plot_curves_and_compare():
    log = pd.DataFrame({"iter": np.arange(10), "loss": np.linspace(2, 1, 10),
                        "loss_mask": np.linspace(1, 0.5, 10),
                        "gIoU": [np.nan] * 9 + [40.0]})
    fig = viz.plot_curves(log)
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["loss", "loss_mask"]
    fig = viz.plot_curves(log, y="gIoU")
    assert len(fig.axes[0].get_lines()[0].get_xdata()) == 1  # NaNs skipped
    runs = pd.concat([log.assign(run="a"), log.assign(run="b")])
    fig = viz.plot_curves(runs, y="loss", hue="run", smooth=3)
    assert [ln.get_label() for ln in fig.axes[0].get_lines()] == ["a", "b"]
    with pytest.raises(ValueError, match="not in the log"):
        viz.plot_curves(log, y="nope")
    cmp = pd.DataFrame({"method": ["A", "B"], "metric": ["gIoU"] * 2, "paper": [60.0, 50.0],
                        "ours": [40.0, 45.0]})
    fig = viz.plot_compare(cmp, metric="gIoU")
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == [60.0, 50.0, 40.0, 45.0]


def test_savefig_picks_format(tmp_path, scene):
    image, gt, _ = scene
    img_fig = viz.overlay(image, gt)
    plot_fig = viz.plot_curves(pd.DataFrame({"iter": [0, 1], "loss": [1.0, 0.5]}))
    p1 = viz.savefig(img_fig, tmp_path / "fig" / "overlay")
    p2 = viz.savefig(plot_fig, tmp_path / "curve")
    p3 = viz.savefig(plot_fig, tmp_path / "forced.png")
    assert p1.suffix == ".png" and p1.read_bytes()[:4] == b"\x89PNG"
    assert p2.suffix == ".svg" and b"<svg" in p2.read_bytes()[:400]
    assert p3.suffix == ".png" and p3.exists()


def test_plot_prediction_overlay_minimap_and_nt_prob(scene):
    image, gt, pred = scene
    minimap = torch.linspace(0, 1, 16).reshape(4, 4)
    fig = viz.plot_prediction(image, pred, minimap, title="the box", gt_mask=gt,
                              pred_no_target=False, nt_prob=0.27)
    gids = _by_gid(fig)
    assert {"gt-fill", "pred-fill", "pred-contour", "minimap"} <= set(gids)
    np.testing.assert_allclose(gids["minimap"][0].get_array(), minimap.numpy())
    texts = {t.get_gid(): t.get_text() for ax in fig.axes for t in ax.texts if t.get_gid()}
    assert texts["nt-prob"] == "P(no target) = 0.27"
    assert fig.axes[0].get_title() == "the box"
    fig = viz.plot_prediction(image, torch.zeros(32, 32, dtype=torch.bool), minimap,
                              pred_no_target=True)
    texts = {t.get_gid(): t.get_text() for ax in fig.axes for t in ax.texts if t.get_gid()}
    assert texts["badge-pred"] == "pred: no target" and "nt-prob" not in texts


def test_plot_attention_masks_rows_columns_and_allowed_area(scene):
    image, _, _ = scene
    g = torch.Generator().manual_seed(1)
    probs = [torch.rand(16, 2, 2, generator=g), torch.rand(16, 4, 4, generator=g),
             torch.rand(16, 8, 8, generator=g)]
    probs[1][3] = 0.1  # region 3 blocks every pixel at layer 1 -> the official fix unblocks it
    allowed = [p >= 0.5 for p in probs]
    allowed[1][3] = True
    fig = viz.plot_attention_masks(probs, [3, 7], allowed=allowed, image=image)
    assert len(fig.axes) == 6  # 2 regions x 3 layers
    gids = _by_gid(fig)
    for layer in range(3):
        for q in (3, 7):
            np.testing.assert_allclose(gids[f"attn-{layer}-{q}"][0].get_array(),
                                       probs[layer][q].numpy(), atol=1e-6)
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert titles == ["layer 0: 2×2", "layer 1: 4×4 (all)", "layer 2: 8×8"]
    assert fig.axes[0].get_ylabel() == "region 3" and fig.axes[3].get_ylabel() == "region 7"
    with pytest.raises(ValueError, match="probabilities"):
        viz.plot_attention_masks([torch.randn(16, 2, 2) * 5], [0])
    with pytest.raises(ValueError, match="not in 0..15"):
        viz.plot_attention_masks(probs, [16])
    with pytest.raises(ValueError, match="number of regions"):
        viz.plot_attention_masks([probs[0], torch.rand(9, 4, 4)], [0])


# --------------------------------------------------------------------------------------------------
# Examples chosen by rule, and the model's answers on them
# --------------------------------------------------------------------------------------------------
def _record(index, kind, iou, gt_nt=False, pred_nt=False, nt_prob=0.1, image_id=None,
            gt_area=10, pred_area=10):
    return {"index": index, "image_id": index if image_id is None else image_id,
            "expr_type": kind, "gt_nt": gt_nt, "pred_nt": pred_nt, "nt_prob": nt_prob,
            "IoU": iou, "gt_area": gt_area, "pred_area": pred_area}


def test_select_records_rules_are_deterministic_and_exclusive():
    recs = [
        _record(0, "multi", 0.9, image_id=7),
        _record(1, "multi", 0.95, image_id=7),  # same image as 0: only the better one is kept
        _record(2, "single", 0.99),
        _record(3, 1, 0.2, gt_area=50),  # integer expr_type accepted
        _record(4, "multi", 0.2, gt_area=20),
        _record(5, "no-target", 0.0, gt_nt=True, pred_nt=False, nt_prob=0.3, gt_area=0),
        _record(6, "no-target", 0.0, gt_nt=True, pred_nt=False, nt_prob=0.05, gt_area=0),
        _record(8, "no-target", 1.0, gt_nt=True, pred_nt=True, nt_prob=0.9, gt_area=0),
        _record(9, "single", 0.0, pred_nt=True, nt_prob=0.8),
    ]
    best = viz.select_records(recs, "best-multi", k=5)
    assert [r["index"] for r in best] == [1, 3, 4]
    assert [r["index"] for r in viz.select_records(recs, "best-multi", 5, distinct_images=False)] \
        == [1, 0, 3, 4]
    assert best[0]["kind"] == "multi" and best[0]["rule"] == "best-multi"
    # worst: lowest IoU, the larger target first on ties; no-target expressions never included
    assert [r["index"] for r in viz.select_records(recs, "worst-target", 3)] == [9, 3, 4]
    assert [r["index"] for r in viz.select_records(recs, "worst-multi", 1)] == [3]
    # most confident mistakes first
    assert [r["index"] for r in viz.select_records(recs, "missed-no-target", 5)] == [6, 5]
    assert [r["index"] for r in viz.select_records(recs, "false-rejection", 5)] == [9]
    assert [r["index"] for r in viz.select_records(recs, "detected-no-target", 5)] == [8]
    assert viz.select_records(recs, "best-single", 1)[0]["index"] == 2
    assert "index" in recs[0] and "kind" not in recs[0]  # inputs untouched
    with pytest.raises(ValueError, match="unknown rule"):
        viz.select_records(recs, "prettiest")
    with pytest.raises(ValueError, match="lacks"):
        viz.select_records([{"index": 0}], "best-multi")


def test_predict_examples_matches_postprocess():
    from gres.config import tiny_test
    from gres.data.dataset import collate
    from gres.model import build_model, postprocess

    cfg = tiny_test().model
    torch.manual_seed(0)
    model = build_model(cfg, load_pretrained=False).train()
    g = torch.Generator().manual_seed(1)
    samples = []
    for k in range(3):
        gt = torch.zeros(64, 64, dtype=torch.bool)
        if k != 2:
            gt[8 * k:8 * k + 20, 10:30] = True
        ids = torch.zeros(20, dtype=torch.int64)
        ids[:5] = torch.tensor([101, 1996, 2417 + k, 3899, 102])
        samples.append({
            "image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g),
            "input_ids": ids, "text_mask": ids > 0, "gt_mask": gt,
            "no_target": torch.tensor(k == 2), "expr_type": torch.tensor(2 if k == 2 else 0),
            "meta": {"sentence": f"thing {k}", "image_id": k},
        })
    out = viz.predict_examples(model, samples, [2, 0])
    assert model.training  # mode restored
    assert [o["index"] for o in out] == [2, 0]
    model.eval()
    with torch.no_grad():
        raw = model(*(getattr(collate([samples[2], samples[0]]), f)
                      for f in ("image", "input_ids", "text_mask")))
    pred, pred_nt, _ = postprocess(raw, 64)
    for k, o in enumerate(out):
        assert torch.equal(o["pred_mask"], pred[k])
        assert o["pred_no_target"] == bool(pred_nt[k])
        assert o["nt_prob"] == pytest.approx(float(raw.nt_logits[k].softmax(-1)[1]))
        assert tuple(o["minimap"].shape) == (4, 4)
        assert 0.0 <= float(o["minimap"].min()) and float(o["minimap"].max()) <= 1.0
    gt0, p0 = samples[0]["gt_mask"], out[1]["pred_mask"]
    union = int((gt0 | p0).sum())
    assert out[1]["mask_IoU"] == pytest.approx(int((gt0 & p0).sum()) / union)
    assert out[1]["IoU"] == (0.0 if out[1]["pred_no_target"] else out[1]["mask_IoU"])
    assert out[0]["mask_IoU"] == float(not out[0]["pred_mask"].any())  # empty GT
    assert out[0]["IoU"] == float(out[0]["pred_no_target"])  # official: only the NT flag counts
    fig = viz.show_grid(out, ncols=2)  # the dicts plot as they are
    assert len(fig.axes) == 2
    assert viz.predict_examples(model, samples, []) == []
