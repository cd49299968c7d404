"""gres.data.dataset: samples as ReLA's mapper builds them, image modes, tokens, collate,
loaders."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gres.config import DataConfig
from gres.data.dataset import (
    EXPR_MULTI,
    EXPR_NO_TARGET,
    EXPR_SINGLE,
    Batch,
    GRESDataset,
    build_dataset,
    build_tokenizer,
    collate,
    load_rgb,
    make_dataloader,
    tokenize,
)
from gres.data.grefer import GRefer
from gres.data.synthetic import generate

FIXTURE = Path(__file__).parent / "fixtures" / "mini_grefcoco"
CLS, SEP = 101, 102  # bert-base-uncased ids


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(None)


def _write_images(root: Path) -> None:
    d = root / "images" / "train2014"
    d.mkdir(parents=True, exist_ok=True)
    img1 = np.zeros((30, 40, 3), np.uint8)
    img1[..., 0] = np.arange(40, dtype=np.uint8)[None] * 6  # a horizontal red ramp
    img1[..., 1] = 100
    Image.fromarray(img1).save(d / "img1.png")
    Image.fromarray(np.full((20, 20, 3), (10, 200, 30), np.uint8)).save(d / "img2.png")


@pytest.fixture()
def mini(tmp_path: Path) -> Path:
    root = tmp_path / "mini"
    shutil.copytree(FIXTURE, root)
    _write_images(root)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "tiny"
    generate(root, "tiny", seed=0, progress=False)
    return root


def _by_sent(ds: GRESDataset) -> dict[int, dict]:
    return {ds[i]["meta"]["sent_id"]: ds[i] for i in range(len(ds))}


# --------------------------------------------------------------------------------------------------
# Sample contract
# --------------------------------------------------------------------------------------------------
def test_sample_contract(mini: Path, tok) -> None:
    ds = GRESDataset(mini, "train", image_size=80, tokenizer=tok)
    assert len(ds) == 5  # one sample per sentence: ref 1 (2), ref 2 (1), ref 3 (2)
    s = ds[0]
    assert set(s) == {"image", "input_ids", "text_mask", "gt_mask", "no_target", "expr_type",
                      "meta"}
    assert s["image"].shape == (3, 80, 80) and s["image"].dtype == torch.uint8
    assert s["input_ids"].shape == (20,) and s["input_ids"].dtype == torch.int64
    assert s["text_mask"].shape == (20,) and s["text_mask"].dtype == torch.bool
    assert s["gt_mask"].shape == (80, 80) and s["gt_mask"].dtype == torch.bool
    assert s["no_target"].shape == () and s["no_target"].dtype == torch.bool
    assert s["expr_type"].shape == () and s["expr_type"].dtype == torch.int64
    assert s["meta"] == {"image_id": 1, "ref_id": 1, "sent_id": 1, "sentence": "the left square",
                         "split": "train", "file_name": "img1.png", "orig_size": (30, 40)}
    assert [ds.meta(i)["sent_id"] for i in range(len(ds))] == [1, 2, 3, 4, 5]
    assert ds.expr_types.tolist() == [EXPR_SINGLE, EXPR_SINGLE, EXPR_MULTI, EXPR_NO_TARGET,
                                      EXPR_NO_TARGET]


def test_masks_are_scaled_polygon_unions(mini: Path, tok) -> None:
    ds = GRESDataset(mini, "train", image_size=80, tokenizer=tok)
    g = GRefer(mini)
    by = _by_sent(ds)
    # 40x30 -> 80x80: x doubles, y scales by 8/3; the square (4..14)^2 -> x 8..28, y 10.67..37.33
    m1 = by[1]["gt_mask"].numpy()
    assert m1[11:37, 8:28].all() and m1.sum() == 20 * 26  # rows 11..36, columns 8..27
    assert not by[1]["no_target"] and by[1]["expr_type"] == EXPR_SINGLE
    m3 = by[3]["gt_mask"].numpy()
    tri = g.get_mask(ref_id=2, out_hw=(80, 80))["mask"].astype(bool)
    np.testing.assert_array_equal(m3, tri)  # union of square and triangle at 80x80
    assert m3.sum() > m1.sum() and (m3 | m1).sum() == m3.sum()
    assert by[3]["expr_type"] == EXPR_MULTI
    for sid in (4, 5):  # no-target: all-zero mask and a flag that agrees
        assert by[sid]["no_target"] and not by[sid]["gt_mask"].any()
        assert by[sid]["expr_type"] == EXPR_NO_TARGET


def test_crowd_dropped_and_crowd_only_kept(mini: Path, tok) -> None:
    ds = GRESDataset(mini, "testA", image_size=40, tokenizer=tok)
    by = _by_sent(ds)
    m8 = by[8]["gt_mask"].numpy()  # square + crowd column: the crowd part is dropped
    assert not m8[:, 34:38].any() and m8.sum() == 10 * 14  # 40x30 -> 40x40: square 10 x 13.3
    assert by[8]["expr_type"] == EXPR_MULTI  # the ref still names two annotations
    m9 = by[9]["gt_mask"].numpy()  # only a crowd annotation: kept so the target is not empty
    assert m9.any() and not by[9]["no_target"]


def test_image_resize_matches_pil_bilinear(mini: Path, tok) -> None:
    ds = GRESDataset(mini, "train", image_size=64, tokenizer=tok)
    ref = np.asarray(Image.open(mini / "images" / "train2014" / "img1.png").convert("RGB")
                     .resize((64, 64), Image.BILINEAR))
    np.testing.assert_array_equal(ds[0]["image"].permute(1, 2, 0).numpy(), ref)


def test_tokens(mini: Path, tok) -> None:
    ds = GRESDataset(mini, "train", image_size=32, tokenizer=tok)
    by = _by_sent(ds)
    ids, mask = by[1]["input_ids"], by[1]["text_mask"]
    expected = tok.encode("the left square", add_special_tokens=True)
    assert ids[: len(expected)].tolist() == expected and expected[0] == CLS and expected[-1] == SEP
    assert mask.sum() == len(expected) and mask[: len(expected)].all()
    assert (ids[len(expected):] == 0).all()
    # "The small square on the left." is lower-cased by the uncased tokenizer
    assert by[2]["input_ids"][1].item() == tok.convert_tokens_to_ids("the")
    long = by[5]  # 26 tokens: hard truncation to 20, [SEP] lost
    full = tok.encode(long["meta"]["sentence"], add_special_tokens=True)
    assert len(full) > 20
    assert long["input_ids"].tolist() == full[:20] and long["text_mask"].all()
    assert SEP not in long["input_ids"].tolist()
    ids, m = tokenize(tok, "square", max_tokens=5)
    assert ids.tolist() == [CLS, tok.convert_tokens_to_ids("square"), SEP, 0, 0]
    assert m.tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I"])
def test_image_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    base = np.zeros((8, 10, 3), np.uint8)
    base[:, :5] = (200, 100, 50)
    rgb = Image.fromarray(base)
    path = tmp_path / {"CMYK": "img.jpg", "I": "img.tif"}.get(mode, "img.png")  # 32-bit: TIFF
    if mode in ("I;16", "I"):
        gray = np.zeros((8, 10), np.uint16)
        gray[:, :5] = 65535
        gray[:, 5:] = 257 * 128
        im = Image.fromarray(gray) if mode == "I;16" else Image.fromarray(gray.astype(np.int32))
        im.save(path)
    elif mode == "CMYK":
        rgb.convert("CMYK").save(path, quality=100)
    else:
        rgb.convert(mode).save(path)
    with Image.open(path) as raw:
        assert raw.mode == mode
    out = load_rgb(path)
    arr = np.asarray(out)
    assert out.mode == "RGB" and arr.dtype == np.uint8 and arr.shape == (8, 10, 3)
    if mode in ("I;16", "I"):
        assert (arr[:, :5] == 255).all() and (arr[:, 5:] == 128).all()  # scaled, not clipped
    elif mode == "L" or mode == "LA":
        gray = round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
        assert abs(int(arr[0, 0, 0]) - gray) <= 1 and (arr[0, 0] == arr[0, 0, 0]).all()
    else:
        assert np.abs(arr[0, 0].astype(int) - (200, 100, 50)).max() <= 12
        assert arr[0, 9].max() <= 12


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def test_missing_image(mini: Path, tok) -> None:
    (mini / "images" / "train2014" / "img2.png").unlink()
    with pytest.raises(FileNotFoundError, match="img2.png"):
        GRESDataset(mini, "val", tokenizer=tok)
    ds = GRESDataset(mini, "val", tokenizer=tok, image_size=16, check_images=False)
    with pytest.raises(FileNotFoundError, match=r"img2\.png.*ref 5"):
        ds[1]
    assert ds[0]["meta"]["ref_id"] == 4  # the other image still loads


def test_unknown_split_and_bad_args(mini: Path, tok) -> None:
    with pytest.raises(ValueError, match="unknown split"):
        GRESDataset(mini, "test", tokenizer=tok)
    with pytest.raises(ValueError, match="image_size"):
        GRESDataset(mini, "train", tokenizer=tok, image_size=0)
    ds = GRESDataset(mini, "train", tokenizer=tok, image_size=16)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_corrupt_image(mini: Path, tok) -> None:
    (mini / "images" / "train2014" / "img2.png").write_bytes(b"not an image")
    ds = GRESDataset(mini, "val", tokenizer=tok, image_size=16)
    with pytest.raises(ValueError, match=r"img2\.png: cannot decode"):
        ds[1]


# --------------------------------------------------------------------------------------------------
# Collate, loaders, cache, synthetic set
# --------------------------------------------------------------------------------------------------
def test_collate_and_batch(mini: Path, tok) -> None:
    ds = GRESDataset(mini, "train", image_size=24, tokenizer=tok)
    b = collate([ds[i] for i in range(len(ds))])
    assert isinstance(b, Batch) and len(b) == 5
    assert b.image.shape == (5, 3, 24, 24) and b.input_ids.shape == (5, 20)
    assert b.gt_mask.shape == (5, 24, 24)
    assert b.no_target.tolist() == [False, False, False, True, True]
    assert b.expr_type.tolist() == [0, 0, 1, 2, 2]
    assert [m["sent_id"] for m in b.meta] == [1, 2, 3, 4, 5]
    moved = b.to("cpu")
    assert torch.equal(moved.gt_mask, b.gt_mask) and moved.meta is b.meta
    with pytest.raises(ValueError):
        collate([])


def test_no_target_flag_always_agrees_with_mask(tiny: Path, tok) -> None:
    # 24 px: small objects rasterise to few or no pixels; the guard keeps flag and mask consistent
    for split in ("train", "val", "testA", "testB"):
        ds = GRESDataset(tiny, split, image_size=24, tokenizer=tok)
        for i in range(len(ds)):
            s = ds[i]
            assert bool(s["no_target"]) == (not s["gt_mask"].any()) == (s["expr_type"] == 2)


def test_dataloader_workers_and_seed(tiny: Path, tok) -> None:
    ds = GRESDataset(tiny, "val", image_size=32, tokenizer=tok)

    def order(seed: int, workers: int) -> list[int]:
        dl = make_dataloader(ds, 8, shuffle=True, num_workers=workers, seed=seed)
        return [m["sent_id"] for b in dl for m in b.meta]

    a = order(3, 2)
    assert sorted(a) == sorted(ds.meta(i)["sent_id"] for i in range(len(ds)))
    assert a == order(3, 0) == order(3, 2)
    assert a != order(4, 0)
    dl = make_dataloader(ds, 8, num_workers=2, seed=0)
    first = next(iter(dl))
    assert first.image.shape == (8, 3, 32, 32) and first.meta[0]["sent_id"] == ds.meta(0)["sent_id"]


def test_cache_gives_identical_samples(tiny: Path, tok) -> None:
    plain = GRESDataset(tiny, "testB", image_size=40, tokenizer=tok)
    cached = GRESDataset(tiny, "testB", image_size=40, tokenizer=tok, cache_images=True)
    cached.preload(progress=False)
    assert len(cached._image_cache) == len({plain.meta(i)["image_id"] for i in range(len(plain))})
    for i in range(len(plain)):
        a, b = plain[i], cached[i]
        for k in ("image", "gt_mask", "input_ids"):
            assert torch.equal(a[k], b[k])
    with pytest.raises(ValueError, match="cache_images"):
        plain.preload()


def test_build_dataset_from_config(tiny: Path, tmp_path: Path, tok) -> None:
    cfg = DataConfig(dataset="synthetic", root=str(tiny), image_size=32)
    before = (tiny / "manifest.json").read_text()
    ds = build_dataset(cfg, "val", tokenizer=tok, max_samples=7)  # preset "default" != tiny:
    assert len(ds) == 7 and ds[0]["image"].shape == (3, 32, 32)  # an existing set is kept
    assert (tiny / "manifest.json").read_text() == before
    new_root = tmp_path / "made"
    cfg2 = dataclasses.replace(cfg, root=str(new_root), synthetic_preset="tiny")
    ds2 = build_dataset(cfg2, "testA", tokenizer=tok)  # missing -> generated
    assert (new_root / "manifest.json").is_file() and len(ds2) > 0


def test_vanishing_target_keeps_one_pixel(mini: Path, tok) -> None:
    """A target smaller than a pixel at the chosen size still gives a non-empty mask."""
    import json

    path = mini / "grefcoco" / "instances.json"
    data = json.loads(path.read_text())
    data["annotations"][4]["segmentation"] = [[10.0, 10.0, 10.3, 10.0, 10.1, 10.3]]
    data["annotations"][4]["bbox"] = [10.0, 10.0, 0.3, 0.3]
    path.write_text(json.dumps(data))
    ds = GRESDataset(mini, "val", image_size=8, tokenizer=tok)
    s = _by_sent(ds)[7]
    assert not s["no_target"] and s["gt_mask"].sum() == 1 and s["gt_mask"][4, 4]
