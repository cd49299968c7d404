"""Tests for gres.experiments: cache keys, train-or-load, decision rules, seeds, tables."""

from __future__ import annotations

import json
import math

import pytest

from gres import experiments as ex
from gres.config import PRESETS


@pytest.fixture(scope="module")
def tiny_data(tiny_synthetic):
    return tiny_synthetic


@pytest.fixture(scope="module")
def smoke(tiny_data):
    return ex.replace(PRESETS["cpu-smoke"](), data={"root": str(tiny_data)})


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")


def test_presets_are_registered_and_consistent():
    for name in ("cpu-small", "cpu-small-ablation", "cpu-smoke"):
        cfg = PRESETS[name]()
        assert cfg.data.image_size == cfg.model.image_size
        assert cfg.train.max_samples is not None  # budgets are counted in samples
    small, abl = PRESETS["cpu-small"](), PRESETS["cpu-small-ablation"]()
    assert abl.model == small.model and abl.loss == small.loss  # same model and losses
    assert abl.train.max_samples < small.train.max_samples
    # the ablations train the pretrained Swin (frozen, half the budget was too short)
    assert abl.train.backbone_lr_factor == 1.0 and small.train.backbone_lr_factor == 0.0


def test_replace_nested_sections(smoke):
    cfg = ex.replace(smoke, model={"rla_mode": "product"}, decoder={"region_grid": 2},
                     loss={"region_weight": 0.0}, train={"seed": 3}, name="x")
    assert cfg.model.rla_mode == "product" and cfg.model.decoder.region_grid == 2
    assert cfg.loss.region_weight == 0.0 and cfg.train.seed == 3 and cfg.name == "x"
    assert cfg.model.swin == smoke.model.swin
    with pytest.raises(ValueError, match="unknown sections"):
        ex.replace(smoke, optimiser={})


def test_key_depends_on_config_and_dataset_not_on_name(smoke, tiny_data, tmp_path):
    key = ex.experiment_key(smoke)
    assert ex.experiment_key(ex.replace(smoke, name="other")) == key
    assert ex.experiment_key(ex.with_seed(smoke, 1)) != key
    assert ex.experiment_key(ex.replace(smoke, loss={"region_weight": 0.0})) != key
    # a different dataset (same layout, other manifest) gives another key
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_data, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["seed"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert ex.experiment_key(ex.replace(smoke, data={"root": str(copy)})) != key
    with pytest.raises(FileNotFoundError):
        ex.dataset_fingerprint(ex.replace(smoke, data={"root": str(tmp_path / "nothing")}))


def _rec(i, etype, gt_nt, pred_nt, mask_i, pred_area, gt_area):
    return {"index": i, "expr_type": etype, "gt_nt": gt_nt, "pred_nt": pred_nt, "mask_I": mask_i,
            "pred_area": pred_area, "gt_area": gt_area}


def test_score_head_and_pixel_rules_by_hand():
    records = [
        _rec(0, "single", False, False, 8, 10, 10),  # IoU 8/12
        _rec(1, "multi", False, True, 5, 5, 10),  # head says NT (FP); 5 px >= 2: pixels say target
        _rec(2, "no-target", True, False, 0, 1, 0),  # head misses (FN); 1 px < 2: pixels say NT
        _rec(3, "no-target", True, True, 0, 0, 0),  # TP for both rules
    ]
    head = ex.score(records, nt_rule="head", min_pixels=2)
    assert head["gIoU"] == pytest.approx(100 * (8 / 12 + 0 + 0 + 1) / 4)
    assert head["cIoU"] == pytest.approx(100 * 8 / (12 + 10 + 1))  # FP adds |pred ∪ gt| = 10
    assert head["N-acc"] == pytest.approx(50.0) and head["T-acc"] == pytest.approx(50.0)
    pix = ex.score(records, nt_rule="pixels", min_pixels=2)
    assert pix["gIoU"] == pytest.approx(100 * (8 / 12 + 5 / 10 + 1 + 1) / 4)
    assert pix["cIoU"] == pytest.approx(100 * (8 + 5) / (12 + 10))  # the 1-px mask is cleared
    assert pix["N-acc"] == pytest.approx(100.0) and pix["T-acc"] == pytest.approx(100.0)
    single = ex.score(records, expr_types=(0,))
    assert single["num_samples"] == 1 and single["cIoU"] == pytest.approx(100 * 8 / 12)
    assert math.isnan(single["N-acc"])
    with pytest.raises(ValueError):
        ex.score(records, nt_rule="threshold")
    with pytest.raises(ValueError):
        ex.score(records, expr_types=(5,))


def test_run_trains_once_then_loads(smoke, runs_root):
    first = ex.run(smoke, label="smoke", seeds=(0,), root=runs_root, progress=False)
    tr = first.runs[0]
    assert not tr.loaded and tr.weights.is_file()
    assert tr.info["samples"] == smoke.train.max_samples
    assert (tr.dir / "eval" / "val_records.jsonl").is_file()
    again = ex.run(smoke, label="smoke", seeds=(0,), root=runs_root, progress=False)
    assert again.runs[0].loaded and again.runs[0].dir == tr.dir
    assert again.per_seed[0]["gIoU"] == first.per_seed[0]["gIoU"]
    # the pixel rule needs no training and no second forward pass
    pix = ex.run(smoke, label="smoke-pix", seeds=(0,), nt_rule="pixels", root=runs_root,
                 progress=False)
    assert pix.runs[0].loaded
    curve = tr.curve()
    assert {"train", "eval"} <= set(curve["kind"])
    assert "gIoU" in curve.columns


def test_seeds_mean_std_and_tables(smoke, runs_root, tmp_path):
    res = ex.run(smoke, label="two seeds", seeds=(0, 1), root=runs_root, progress=False)
    assert [r["seed"] for r in res.per_seed] == [0, 1]
    assert res.runs[0].dir != res.runs[1].dir
    row = res.row()
    values = [r["gIoU"] for r in res.per_seed]
    assert row["gIoU"] == pytest.approx(sum(values) / 2)
    assert row["gIoU_std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    table = ex.summarize([res])
    assert " ± " in table.loc["two seeds", "gIoU"]
    long = ex.tidy([res])
    assert set(long["metric"]) == set(ex.METRICS)
    paths = ex.export_curves([res], tmp_path / "curves")
    assert len(paths) == 2 and all(p.stat().st_size > 0 for p in paths)


def test_same_seed_same_numbers_in_another_cache(smoke, runs_root, tmp_path):
    a = ex.run(smoke, seeds=(0,), root=runs_root, progress=False)
    b = ex.run(smoke, seeds=(0,), root=tmp_path / "fresh", progress=False)
    assert not b.runs[0].loaded
    assert a.per_seed[0]["gIoU"] == b.per_seed[0]["gIoU"]
    assert a.per_seed[0]["N-acc"] == pytest.approx(b.per_seed[0]["N-acc"], nan_ok=True)


def test_single_target_training_filter(smoke, runs_root):
    cfg = ex.replace(smoke, data={"train_expr_types": (0,)}, name="cpu-smoke-single")
    res = ex.run(cfg, seeds=(0,), root=runs_root, progress=False, eval_expr_types=(0,))
    assert res.per_seed[0]["num_samples"] > 0
    assert ex.run_dir(cfg, runs_root) != ex.run_dir(smoke, runs_root)


def test_book_config_applies_chapter_parameters_and_keeps_the_cache_key(tmp_path):
    from gres.config import config_hash

    base = ex.preset("cpu-small")
    same_folder = str(ex.resolve_data_root(base.data.root))  # the preset's folder, spelled otherwise
    assert config_hash(ex.book_config("cpu-small", data_root=same_folder, device="auto")) == \
        config_hash(base)
    other = ex.book_config("cpu-small", dataset="grefcoco", data_root=str(tmp_path), device="cpu")
    assert (other.data.dataset, other.data.root, other.train.device) == \
        ("grefcoco", str(tmp_path), "cpu")


def test_init_description_follows_the_config():
    small = PRESETS["cpu-small"]()
    assert "pretrained on the object categories" in ex.init_description(small)
    assert "text encoder trained from scratch" in ex.init_description(small)
    assert "stay frozen" in ex.init_description(small)  # cpu-small freezes its pretrained Swin
    assert "frozen" not in ex.init_description(PRESETS["cpu-small-ablation"]())
    scratch = ex.replace(small, swin={"pretrained": None})
    assert ex.init_description(scratch) == "from scratch (no ImageNet or BERT weights)"
    paper = PRESETS["rela-swin-b"]()
    assert ex.init_description(paper) == (
        f"from the Swin weights {paper.model.swin.pretrained} and the text encoder "
        f"{paper.model.text.name_or_path}")


def test_tables5_6_can_add_the_one_stage_row_with_the_swin_trained(smoke):
    """cpu-small freezes its pretrained Swin; on request (onestage_swin_trained=True) Tables 5/6
    also train the one-stage baseline with the Swin at the full learning rate (no paper row).
    Off by default, and never added when the base trains its Swin anyway (it would repeat the
    first row)."""
    assert PRESETS["cpu-small"]().train.backbone_lr_factor == 0.0
    assert smoke.train.backbone_lr_factor == 0.0
    for table in ("table5", "table6"):
        default = ex.table_specs(table, smoke)
        rows = ex.table_specs(table, smoke, onestage_swin_trained=True)
        assert [s.paper_method for s in rows] == ["LAVT", None] + [s.paper_method
                                                                   for s in default[1:]]
        assert rows[-1].paper_method == "ReLA" and rows[-1].cfg == smoke
        frozen, trained = rows[0].cfg, rows[1].cfg
        assert frozen == default[0].cfg and frozen.model.head == trained.model.head == "onestage"
        assert frozen.train.backbone_lr_factor == 0.0 and trained.train.backbone_lr_factor == 1.0
        assert ex.replace(trained, train={"backbone_lr_factor": 0.0}, name=frozen.name) == frozen
        assert rows[1].nt_rule == "pixels"
        unfrozen = ex.replace(smoke, train={"backbone_lr_factor": 1.0})
        assert (len(ex.table_specs(table, unfrozen, onestage_swin_trained=True))
                == len(default))
