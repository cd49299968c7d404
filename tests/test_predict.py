"""Single-image Predictor: inputs, resolution, official decision rules, caching, bad images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gres import engine
from gres.model import postprocess
from gres.predict import Prediction, Predictor, load_image, save_overlay

EXPRS = ["the red circle on the left", "two squares", "the green star"]


@pytest.fixture(scope="module")
def cfg(tiny_cfg):
    return tiny_cfg


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def rgb():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)  # H = 50, W = 70
    img[10:30, 5:25] = (230, 20, 20)
    return img


@pytest.fixture(scope="module")
def image_file(rgb, tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture(scope="module")
def predictor(model, cfg, image_file):
    p = Predictor(model, cfg.model)
    p.set_image(image_file)
    return p


def test_outputs_at_original_resolution(predictor, cfg):
    pred = predictor.predict(EXPRS[0])
    assert isinstance(pred, Prediction) and pred.expression == EXPRS[0]
    assert pred.mask.shape == (50, 70) and pred.mask.dtype == bool
    assert pred.raw_mask.shape == (50, 70)
    r = cfg.model.decoder.region_grid
    assert pred.minimap.shape == (r, r)
    assert ((pred.minimap >= 0) & (pred.minimap <= 1)).all()
    s4 = cfg.model.image_size // 4
    assert pred.region_masks.shape == (r * r, s4, s4)
    assert 0.0 <= pred.nt_prob <= 1.0 and isinstance(pred.no_target, bool)
    if pred.no_target:
        assert not pred.mask.any()
    else:
        assert np.array_equal(pred.mask, pred.raw_mask)


def test_path_pil_numpy_tensor_give_the_same_answer(model, cfg, rgb, image_file):
    answers = []
    for image in (image_file, str(image_file), Image.fromarray(rgb), rgb,
                  torch.from_numpy(rgb).permute(2, 0, 1)):
        p = Predictor(model, cfg.model)
        p.set_image(image)
        answers.append(p.predict(EXPRS[1]))
    for a in answers[1:]:
        assert np.array_equal(a.raw_mask, answers[0].raw_mask)
        assert a.nt_prob == answers[0].nt_prob
    assert np.array_equal(load_image(rgb / 255.0), rgb)  # floats in [0, 1] are scaled


def test_default_rules_match_official_postprocess(model, cfg):
    """On an S x S image (no resize) the Predictor equals the evaluation path exactly."""
    from gres.data.dataset import build_tokenizer, tokenize

    s = cfg.model.image_size
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(s, s, 3), dtype=np.uint8)
    p = Predictor(model, cfg.model, cache_stem=False)
    p.set_image(img)
    preds = p.predict(EXPRS)
    tok = build_tokenizer(cfg.model.text.tokenizer)
    ids, masks = zip(*(tokenize(tok, e, cfg.model.text.max_tokens) for e in EXPRS))
    images = torch.from_numpy(img).permute(2, 0, 1)[None].expand(len(EXPRS), -1, -1, -1)
    with torch.no_grad():
        out = model(images, torch.stack(ids), torch.stack(masks))
    mask, nt, _ = postprocess(out, s)
    for k, pr in enumerate(preds):
        assert np.array_equal(pr.raw_mask, mask[k].numpy())
        assert pr.no_target == bool(nt[k])
        assert pr.nt_prob == pytest.approx(float(out.nt_logits[k].softmax(-1)[1]), abs=1e-6)


def test_no_target_answer_has_an_empty_mask(model, cfg, image_file, predictor):
    base = predictor.predict(EXPRS)
    always = Predictor(model, cfg.model, nt_threshold=0.0)
    always.set_image(image_file)
    never = Predictor(model, cfg.model, nt_threshold=1.0)
    never.set_image(image_file)
    for b, a, n in zip(base, always.predict(EXPRS), never.predict(EXPRS)):
        assert a.no_target and not a.mask.any()
        assert np.array_equal(a.raw_mask, b.raw_mask)  # the model's mask is still available
        assert not n.no_target and np.array_equal(n.mask, b.raw_mask)
        assert b.no_target == (b.nt_prob > 0.5)  # argmax rule = softmax probability > 0.5


def test_mask_threshold(model, cfg, image_file):
    lo = Predictor(model, cfg.model, mask_threshold=0.0, nt_threshold=1.0)
    lo.set_image(image_file)
    assert lo.predict(EXPRS[0]).mask.all()
    with pytest.raises(ValueError, match="nt_threshold"):
        Predictor(model, cfg.model, nt_threshold=1.5)


def test_batching_and_stem_cache_do_not_change_answers(model, cfg, image_file):
    cached = Predictor(model, cfg.model, batch_size=2)
    cached.set_image(image_file)
    calls = {"n": 0}
    hook = model.backbone.patch_embed.register_forward_hook(
        lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        first = cached.predict(EXPRS[0])  # computes and stores the stem
        assert cached._stem is not None and calls["n"] == 1
        batch = cached.predict(EXPRS)  # reuses it: patch embedding never runs again
        assert calls["n"] == 1
    finally:
        hook.remove()
    plain = Predictor(model, cfg.model, cache_stem=False)
    plain.set_image(image_file)
    singles = [plain.predict(e) for e in EXPRS]
    assert np.array_equal(first.raw_mask, singles[0].raw_mask)
    for b, s in zip(batch, singles):
        assert b.expression == s.expression
        assert b.nt_prob == pytest.approx(s.nt_prob, abs=1e-5)
        assert (b.raw_mask != s.raw_mask).mean() < 1e-3
        np.testing.assert_allclose(b.minimap, s.minimap, atol=1e-5)
    assert set(cached._tokens) == set(EXPRS)  # tokenised once each
    cached.set_image(np.zeros((20, 20, 3), np.uint8))
    assert cached._stem is None  # a new image drops the cached stem


def test_bad_inputs(predictor, model, cfg, tmp_path):
    junk = tmp_path / "broken.jpg"
    junk.write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        predictor.set_image(junk)
    with pytest.raises(FileNotFoundError, match="absent.png"):
        predictor.set_image(tmp_path / "absent.png")
    with pytest.raises(ValueError, match="image array"):
        predictor.set_image(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        predictor.set_image(np.full((4, 4, 3), np.nan))
    fresh = Predictor(model, cfg.model)
    with pytest.raises(ValueError, match="set_image"):
        fresh.predict("anything")
    fresh.set_image(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="non-empty"):
        fresh.predict("  ")


def test_overlay_file(predictor, tmp_path):
    preds = predictor.predict(EXPRS[:2])
    out = save_overlay(predictor.image, preds, tmp_path / "sub" / "overlay.png")
    with Image.open(out) as im:
        assert im.size[0] > 100 and im.size[1] > 50


def test_from_checkpoint(model, cfg, image_file, predictor, tmp_path):
    path = engine.save_weights(model, tmp_path / "w.safetensors", cfg)
    loaded = Predictor.from_checkpoint(path, device="cpu")
    loaded.set_image(image_file)
    a, b = loaded.predict(EXPRS[2]), predictor.predict(EXPRS[2])
    assert np.array_equal(a.raw_mask, b.raw_mask) and a.nt_prob == pytest.approx(b.nt_prob)
