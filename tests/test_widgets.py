"""The classroom demo driven headless: set widget values, check the state and figures follow."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from gres import engine  # noqa: E402
from gres.data.synthetic import generate  # noqa: E402
from gres.predict import Predictor  # noqa: E402
from gres.widgets import (  # noqa: E402
    GRESDemo,
    decode_upload,
    make_demo,
    pick_examples,
    upload_value,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def cfg(tiny_cfg):
    return tiny_cfg


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def dataset(cfg, tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic-tiny")
    generate(root, "tiny", seed=0, progress=False)
    return engine.build_dataset(cfg, "val", root=root)


@pytest.fixture
def demo(model, cfg, dataset):
    return make_demo(Predictor(model, cfg.model), dataset)


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _gids(fig) -> dict:
    out: dict = {}
    for ax in fig.axes:
        for artist in ax.get_children():
            if artist.get_gid():
                out.setdefault(artist.get_gid(), []).append(artist)
    return out


def test_autorun_shows_the_first_dataset_expression(demo, dataset, cfg):
    s = demo.state
    first = dataset.meta(0)
    assert s.image_id == first["image_id"] == demo.image_picker.value
    assert s.num_predictions == 1 and s.error is None
    assert s.expression == first["sentence"] == demo.text.value
    assert demo.examples.value == 0
    n_expr = sum(dataset.meta(i)["image_id"] == first["image_id"] for i in range(len(dataset)))
    assert len(demo.examples.options) == n_expr + 1  # + the placeholder
    h, w = first["orig_size"]
    assert s.image.shape == (h, w, 3)  # the original file, not the resized sample
    pred = s.prediction
    r = cfg.model.decoder.region_grid
    assert pred.mask.shape == (h, w) and pred.minimap.shape == (r, r)
    # the panels show this prediction: minimap values, GT of the dataset expression, NT text
    gids = _gids(demo.figures["prediction"])
    np.testing.assert_allclose(gids["minimap"][0].get_array(), pred.minimap, atol=1e-6)
    np.testing.assert_array_equal(s.gt_mask, dataset[0]["gt_mask"].numpy())
    assert s.gt_no_target == bool(dataset[0]["no_target"])
    assert f"P(no target) = {pred.nt_prob:.3f}" in demo.nt_label.value
    assert "official argmax rule" in demo.nt_label.value
    assert len(demo.out_prediction.outputs) == 1 and len(demo.out_regions.outputs) == 1
    # the same numbers as the predictor used directly
    p = Predictor(demo.predictor.model, cfg.model)
    p.set_image(s.image)
    direct = p.predict(first["sentence"])
    np.testing.assert_array_equal(direct.mask, pred.mask)
    assert direct.nt_prob == pytest.approx(pred.nt_prob)


def test_picking_another_image_and_typing(demo, dataset):
    ids = list(dict.fromkeys(dataset.meta(i)["image_id"] for i in range(len(dataset))))
    demo.image_picker.value = ids[1]
    s = demo.state
    assert s.image_id == ids[1] and s.source == f"dataset:{ids[1]}"
    assert s.num_predictions == 2  # the current expression is re-segmented on the new image
    assert demo.examples.value is None
    sentences = {dataset.meta(i)["sentence"] for i in range(len(dataset))
                 if dataset.meta(i)["image_id"] == ids[1]}
    listed = {label.split("  [")[0] for label, v in demo.examples.options if v is not None}
    assert listed == sentences
    demo.text.value = "the small thing in the corner"
    assert s.num_predictions == 3 and s.expression == "the small thing in the corner"
    assert s.gt_mask is None and "ground truth" not in demo.nt_label.value  # not a dataset expr
    title = demo.figures["prediction"].axes[0].get_title()
    assert "small thing" in title
    demo.run_button.click()
    assert s.num_predictions == 4
    # choosing an example fills the text box and segments it with its ground truth
    idx = next(v for _, v in demo.examples.options if v is not None)
    demo.examples.value = idx
    assert s.expression == dataset.meta(idx)["sentence"] and s.num_predictions == 5
    np.testing.assert_array_equal(s.gt_mask, dataset[idx]["gt_mask"].numpy())


def test_threshold_controls_change_the_decision(demo):
    s = demo.state
    assert demo.nt_threshold.disabled and demo.mask_threshold.disabled
    demo.nt_official.value = False
    assert not demo.nt_threshold.disabled
    demo.nt_threshold.value = 0.0  # every expression is "no target"
    assert demo.predictor.nt_threshold == 0.0
    assert s.prediction.no_target and not s.prediction.mask.any()
    assert "NO TARGET" in demo.nt_label.value and "threshold 0.00" in demo.nt_label.value
    assert _gids(demo.figures["prediction"])["badge-pred"]
    demo.nt_threshold.value = 1.0  # never "no target"
    assert not s.prediction.no_target and "target found" in demo.nt_label.value
    demo.mask_official.value = False
    demo.mask_threshold.value = 0.0
    assert demo.predictor.mask_threshold == 0.0 and s.prediction.mask.all()
    demo.mask_threshold.value = 1.0
    assert not s.prediction.raw_mask.any()
    n = s.num_predictions
    demo.nt_official.value = True
    demo.mask_official.value = True
    assert demo.predictor.nt_threshold is None and demo.predictor.mask_threshold is None
    assert s.num_predictions == n + 2 and demo.nt_threshold.disabled


def test_top_k_redraws_regions_without_a_forward_pass(demo):
    n = demo.state.num_predictions
    probs = demo.state.prediction.minimap.reshape(-1)
    demo.top_k.value = 2
    regions = [g for g in _gids(demo.figures["regions"]) if g.startswith("region-")]
    assert len(regions) == 2
    best = np.argsort(-probs, kind="stable")[:2]
    assert set(regions) == {f"region-{q}" for q in best}
    demo.top_k.value = 6
    assert len([g for g in _gids(demo.figures["regions"]) if g.startswith("region-")]) == 6
    assert demo.state.num_predictions == n


def test_upload_png_and_bad_upload(demo):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    demo.upload.value = upload_value(_png(rgb), name="photo.png")
    s = demo.state
    assert s.error is None and s.source == "upload:photo.png" and s.image_id is None
    np.testing.assert_array_equal(s.image, rgb)
    assert demo.image_picker.value is None
    assert [v for _, v in demo.examples.options] == [None]
    assert s.prediction.mask.shape == (40, 56)  # segmented at the upload's resolution
    before = s.prediction
    demo.upload.value = upload_value(b"this is not an image", name="notes.txt",
                                         mime="text/plain")  # must not raise
    assert "notes.txt" in s.error and "not a readable image" in s.error
    assert "error" in demo.status.value and "notes.txt" in demo.status.value
    assert s.prediction is before  # the previous answer stays on screen
    demo.text.value = "the left object"  # the app keeps working after the error
    assert s.error is None and s.prediction.expression == "the left object"
    with pytest.raises(ValueError, match="empty"):
        decode_upload(b"", "x.png")


def test_empty_expression_and_no_image_are_reported(model, cfg):
    demo = make_demo(Predictor(model, cfg.model))  # no dataset: nothing is run
    assert demo.state.num_predictions == 0
    assert demo.image_picker.options == (("(uploaded / none)", None),)
    demo.text.value = "the red circle"  # no image yet
    assert "no image" in demo.state.error and "error" in demo.status.value
    demo.upload.value = upload_value(_png(np.full((32, 32, 3), 200, np.uint8)))
    assert demo.state.prediction.expression == "the red circle"
    demo.text.value = "   "  # ignored by the text observer
    demo.run_button.click()
    assert demo.state.error == "type an expression first"
    assert "widget-view" in "".join(demo._repr_mimebundle_())
    with pytest.raises(ValueError, match="Predictor"):
        GRESDemo(model)


def test_use_sample_and_static_figures(demo, dataset):
    idx = len(dataset) - 1
    pred = demo.use_sample(idx)
    assert pred is demo.state.prediction and pred.expression == dataset.meta(idx)["sentence"]
    assert demo.examples.value == idx and demo.text.value == pred.expression
    np.testing.assert_array_equal(demo.state.gt_mask, dataset[idx]["gt_mask"].numpy())
    main, regions = demo.figures_for_state()
    assert _gids(main)["minimap"] and any(g.startswith("region-") for g in _gids(regions))
    with pytest.raises(ValueError, match="out of range"):
        demo.use_sample(len(dataset))


def test_pick_examples_covers_every_kind_on_distinct_images(dataset):
    picked = pick_examples(dataset, per_kind=2)
    kinds = [int(dataset.meta(i)["expr_type"]) for i in picked]
    images = [dataset.meta(i)["image_id"] for i in picked]
    assert kinds == [0, 1, 2, 0, 1, 2]
    assert len(set(images)) == len(images)
    assert picked == pick_examples(dataset, per_kind=2)  # deterministic
    assert min(picked) == 0  # greedy in dataset order: the first sample is always taken
    with pytest.raises(ValueError, match="per_kind"):
        pick_examples(dataset, per_kind=0)
