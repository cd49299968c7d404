"""Tests for gres.metrics: hand-computed cases, the official loop on random data, edge cases."""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
import torch

from gres.metrics import METRIC_KEYS, GRESMetrics, format_metrics, mask_counts

NAN = float("nan")


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def official_reference(samples: list[dict]) -> dict[str, float]:
    """ReferEvaluator.evaluate (spec §5) written per sample, literally, for one source.

    Each sample: pred_mask, gt_mask (2-D int8/bool numpy), pred_nt, gt_nt (bool). Returns the
    official dict (T_acc and N_acc are fractions there). Division by zero raises, as officially.
    """
    pr_thres = [0.7, 0.8, 0.9]
    accum_i = 0.0
    accum_u = 0.0
    accum_iou = 0.0
    pr_count = {t: 0 for t in pr_thres}
    total_count = not_empty_count = empty_count = 0
    nt = {"TP": 0, "TN": 0, "FP": 0, "FN": 0}
    for s in samples:
        pred = np.array(s["pred_mask"], dtype=np.int8)
        gt = np.array(s["gt_mask"], dtype=np.int8)
        i = np.sum(np.logical_and(pred, gt))
        u = np.sum(np.logical_or(pred, gt))
        if s["gt_nt"]:
            empty_count += 1
            if s["pred_nt"]:
                nt["TP"] += 1
                accum_iou += 1
                accum_i += 0
                accum_u += 0
            else:
                nt["FN"] += 1
                accum_iou += 0
                accum_i += 0
                accum_u += int(u)
        else:
            if s["pred_nt"]:
                nt["FP"] += 1
                i = 0
            else:
                nt["TN"] += 1
            this_iou = float(0) if u == 0 else float(i) / float(u)
            accum_iou += this_iou
            accum_i += i
            accum_u += u
            not_empty_count += 1
            for t in pr_thres:
                if this_iou >= t:
                    pr_count[t] += 1
        total_count += 1
    res = {
        "gIoU": 100.0 * (accum_iou / total_count),
        "cIoU": accum_i * 100.0 / accum_u,
    }
    if empty_count > 0:
        res["T_acc"] = nt["TN"] / (nt["TN"] + nt["FP"])
        res["N_acc"] = nt["TP"] / (nt["TP"] + nt["FN"])
    else:
        res["T_acc"] = res["N_acc"] = 0
    for t in pr_thres:
        res["Pr@{0:1.1f}".format(t)] = pr_count[t] * 100.0 / not_empty_count
    return res


def random_batch(rng: np.random.Generator, b: int, h: int, w: int, p_nt: float = 0.3):
    """Random blobs: targets get a union of 1-3 rectangles, NT samples an empty GT; the
    prediction is a jittered copy of the GT (or a random blob), sometimes empty."""
    gt = np.zeros((b, h, w), dtype=bool)
    pred = np.zeros((b, h, w), dtype=bool)
    gt_nt = rng.random(b) < p_nt
    pred_nt = np.where(gt_nt, rng.random(b) < 0.6, rng.random(b) < 0.15)
    for k in range(b):
        if not gt_nt[k] and rng.random() > 0.05:  # 5% targets with an empty GT (U may be 0)
            for _ in range(rng.integers(1, 4)):
                y0, x0 = rng.integers(0, h), rng.integers(0, w)
                gt[k, y0 : y0 + rng.integers(1, h), x0 : x0 + rng.integers(1, w)] = True
        r = rng.random()
        if r < 0.5:  # shifted GT: IoU spread over [0, 1]
            dy, dx = rng.integers(-2, 3, size=2)
            pred[k] = np.roll(gt[k], (dy, dx), axis=(0, 1))
        elif r < 0.8:
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            pred[k, y0 : y0 + rng.integers(1, h), x0 : x0 + rng.integers(1, w)] = True
        elif r < 0.9:
            pred[k] = gt[k]
        # else: empty prediction
    return pred, gt, pred_nt, gt_nt


def as_samples(pred, gt, pred_nt, gt_nt) -> list[dict]:
    return [
        dict(pred_mask=pred[k], gt_mask=gt[k], pred_nt=bool(pred_nt[k]), gt_nt=bool(gt_nt[k]))
        for k in range(len(pred))
    ]


def same(a: dict[str, float], b: dict[str, float]) -> bool:
    """Dict equality where nan == nan."""
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a
    )


def assert_matches_official(ours: dict[str, float], ref: dict[str, float]) -> None:
    """Bit-identical for single-process accumulation in input order."""
    assert ours["gIoU"] == ref["gIoU"]
    assert ours["cIoU"] == ref["cIoU"]
    for t in ("0.7", "0.8", "0.9"):
        assert ours[f"Pr@{t}"] == ref[f"Pr@{t}"]
    assert ours["N-acc"] == 100.0 * ref["N_acc"]
    assert ours["T-acc"] == 100.0 * ref["T_acc"]


def four_cases():
    """One sample per case on a 4x4 grid (hand-computed numbers in the tests below).

    0 TN: GT = row 0 + pixel (1,0) = 5 px; pred = row 0 = 4 px -> I 4, U 5, IoU 0.8.
    1 FP: GT = row 0 (4 px); pred = (0,0) and (3,3) -> mask I 1, union 5; counted I 0, U 5.
    2 TP: no-target, predicted NT, pred mask 2 px (ignored) -> I 0, U 0, IoU 1.
    3 FN: no-target, predicted target, pred mask 2 px -> I 0, U 2, IoU 0.
    """
    pred = torch.zeros(4, 4, 4, dtype=torch.bool)
    gt = torch.zeros(4, 4, 4, dtype=torch.bool)
    gt[0, 0, :] = True
    gt[0, 1, 0] = True
    pred[0, 0, :] = True
    gt[1, 0, :] = True
    pred[1, 0, 0] = True
    pred[1, 3, 3] = True
    pred[2, 2:, 2] = True
    pred[3, 3, :2] = True
    pred_nt = torch.tensor([False, True, True, False])
    gt_nt = torch.tensor([False, False, True, True])
    return pred, gt, pred_nt, gt_nt


# --------------------------------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------------------------------
def test_four_cases_hand_computed():
    m = GRESMetrics(keep_records=True)
    m.update(*four_cases())
    out = m.compute()
    assert tuple(out) == METRIC_KEYS
    # ΣI = 4 (TN only); ΣU = 5 (TN) + 5 (FP, full union) + 0 (TP) + 2 (FN).
    assert out["cIoU"] == pytest.approx(100 * 4 / 12)
    # IoUs 0.8, 0, 1, 0 over 4 samples.
    assert out["gIoU"] == pytest.approx(100 * 1.8 / 4)
    # Two targeted samples: IoU 0.8 (>= 0.7 and >= 0.8, the boundary counts) and 0.
    assert (out["Pr@0.7"], out["Pr@0.8"], out["Pr@0.9"]) == (50.0, 50.0, 0.0)
    assert out["N-acc"] == 50.0 and out["T-acc"] == 50.0
    rec = m.records()
    assert [r["outcome"] for r in rec] == ["TN", "FP", "TP", "FN"]
    assert [(r["I"], r["U"]) for r in rec] == [(4, 5), (0, 5), (0, 0), (0, 2)]
    assert [r["IoU"] for r in rec] == [0.8, 0.0, 1.0, 0.0]
    assert [(r["mask_I"], r["mask_U"]) for r in rec] == [(4, 5), (1, 5), (0, 2), (0, 2)]
    assert [(r["pred_area"], r["gt_area"]) for r in rec] == [(4, 5), (2, 4), (2, 0), (2, 0)]
    c = m.counts()
    assert (c["TP"], c["FN"], c["FP"], c["TN"]) == (1, 1, 1, 1)
    assert (c["sum_I"], c["sum_U"], c["n_target"], c["n_nt"]) == (4, 12, 2, 2)


@pytest.mark.parametrize("case", range(4))
def test_each_case_alone(case):
    pred, gt, pred_nt, gt_nt = four_cases()
    m = GRESMetrics()
    m.update(pred[case : case + 1], gt[case : case + 1], pred_nt[case : case + 1],
             gt_nt[case : case + 1])
    out = m.compute()
    c = m.counts()
    if case == 0:  # TN
        assert (out["gIoU"], out["Pr@0.8"], out["T-acc"]) == (pytest.approx(80.0), 100.0, 100.0)
        assert out["cIoU"] == pytest.approx(80.0)
        assert math.isnan(out["N-acc"])
    elif case == 1:  # FP: I forced to 0, U is the full union of the NON-emptied prediction
        assert (c["sum_I"], c["sum_U"]) == (0, 5)
        assert (out["gIoU"], out["cIoU"], out["Pr@0.7"], out["T-acc"]) == (0.0, 0.0, 0.0, 0.0)
    elif case == 2:  # TP: IoU 1 whatever the predicted mask; ΣU = 0 -> cIoU undefined
        assert (out["gIoU"], out["N-acc"]) == (100.0, 100.0)
        assert (c["sum_I"], c["sum_U"]) == (0, 0)
        assert math.isnan(out["cIoU"]) and math.isnan(out["Pr@0.7"])
    else:  # FN: predicted area added to ΣU
        assert (c["sum_I"], c["sum_U"]) == (0, 2)
        assert (out["gIoU"], out["cIoU"], out["N-acc"]) == (0.0, 0.0, 0.0)
        assert math.isnan(out["T-acc"])


def test_nt_credit_depends_only_on_flag():
    """An empty predicted mask without the NT flag still scores 0 on a no-target sample."""
    z = torch.zeros(2, 6, 6, dtype=torch.bool)
    m = GRESMetrics(keep_records=True)
    m.update(z, z, torch.tensor([False, True]), torch.tensor([True, True]))
    assert [r["IoU"] for r in m.records()] == [0.0, 1.0]
    assert m.compute()["gIoU"] == 50.0
    assert m.compute()["N-acc"] == 50.0


def test_multi_instance_ground_truth():
    """GT = union of two instances; the prediction covers one fully and half of the other."""
    h = w = 10
    inst_a = torch.zeros(h, w, dtype=torch.bool)
    inst_a[0:2, 0:5] = True  # 10 px
    inst_b = torch.zeros(h, w, dtype=torch.bool)
    inst_b[6:10, 6:10] = True  # 16 px
    gt = (inst_a | inst_b)[None]  # 26 px
    pred = torch.zeros(1, h, w, dtype=torch.bool)
    pred[0, 0:2, 0:5] = True  # all of A
    pred[0, 6:8, 6:10] = True  # half of B (8 px)
    pred[0, 4, 0:4] = True  # 4 false-positive pixels
    m = GRESMetrics(keep_records=True)
    m.update(pred, gt, torch.tensor([False]), torch.tensor([False]), expr_type=[1])
    r = m.records()[0]
    assert (r["I"], r["U"]) == (18, 30)  # I = 10 + 8; U = 26 + 4
    assert r["IoU"] == 18 / 30 and r["expr_type"] == "multi"
    out = m.compute()
    assert out["cIoU"] == pytest.approx(60.0) and out["gIoU"] == pytest.approx(60.0)
    assert (out["Pr@0.7"], out["Pr@0.8"], out["Pr@0.9"]) == (0.0, 0.0, 0.0)
    assert m.compute_by_type()["multi"]["cIoU"] == pytest.approx(60.0)


# --------------------------------------------------------------------------------------------------
# Against the official loop
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,hw", [(0, (32, 32)), (1, (23, 17)), (2, (48, 40))])
def test_matches_official_loop_random(seed, hw):
    rng = np.random.default_rng(seed)
    m = GRESMetrics()
    all_samples = []
    for b in (1, 7, 33, 16, 0, 25):
        pred, gt, pred_nt, gt_nt = random_batch(rng, b, *hw)
        all_samples += as_samples(pred, gt, pred_nt, gt_nt)
        m.update(torch.from_numpy(pred), torch.from_numpy(gt), torch.from_numpy(pred_nt),
                 torch.from_numpy(gt_nt))
    ref = official_reference(all_samples)
    assert len(m) == len(all_samples) == 82
    c = m.counts()
    assert min(c["TP"], c["FN"], c["FP"], c["TN"]) > 0  # every case exercised
    assert_matches_official(m.compute(), ref)


def test_numpy_and_noncontiguous_inputs_match():
    rng = np.random.default_rng(3)
    pred, gt, pred_nt, gt_nt = random_batch(rng, 20, 30, 26)
    ref = official_reference(as_samples(pred, gt, pred_nt, gt_nt))
    m_np = GRESMetrics()
    m_np.update(pred, gt, pred_nt, gt_nt)  # numpy arrays
    assert_matches_official(m_np.compute(), ref)
    # Transposed (non-contiguous) torch tensors scored on the transposed data.
    pt = torch.from_numpy(pred).transpose(1, 2)
    gtt = torch.from_numpy(gt).transpose(1, 2)
    assert not pt.is_contiguous()
    m_t = GRESMetrics()
    m_t.update(pt, gtt, list(pred_nt), torch.from_numpy(gt_nt))
    assert_matches_official(m_t.compute(), ref)
    # Odd batch slice (storage offset not a multiple of 8 when HW % 8 != 0).
    m_s = GRESMetrics()
    m_s.update(torch.from_numpy(pred)[3:], torch.from_numpy(gt)[3:], pred_nt[3:], gt_nt[3:])
    assert_matches_official(
        m_s.compute(), official_reference(as_samples(pred[3:], gt[3:], pred_nt[3:], gt_nt[3:]))
    )


@pytest.mark.parametrize("shape", [(3, 480, 480), (2, 7, 5), (4, 1, 127 * 8 + 9), (1, 1, 1)])
def test_mask_counts_brute_force(shape):
    g = torch.Generator().manual_seed(0)
    p = torch.rand(shape, generator=g) > 0.3
    t = torch.rand(shape, generator=g) > 0.6
    inter, pa, ga = mask_counts(p, t)
    assert inter.dtype == torch.int64
    assert torch.equal(inter, (p & t).flatten(1).sum(1))
    assert torch.equal(pa, p.flatten(1).sum(1))
    assert torch.equal(ga, t.flatten(1).sum(1))
    full = torch.ones(shape, dtype=torch.bool)  # every byte lane at its maximum
    inter, pa, _ = mask_counts(full, full)
    assert torch.all(inter == shape[1] * shape[2]) and torch.all(pa == shape[1] * shape[2])


# --------------------------------------------------------------------------------------------------
# Conventions
# --------------------------------------------------------------------------------------------------
def test_empty_on_nt_convention_changes_only_fp_union():
    pred, gt, pred_nt, gt_nt = four_cases()
    off = GRESMetrics(convention="official")
    emp = GRESMetrics(convention="empty-on-nt")
    off.update(pred, gt, pred_nt, gt_nt)
    emp.update(pred, gt, pred_nt, gt_nt)
    a, b = off.compute(), emp.compute()
    # FP sample: official ΣU += |pred ∪ gt| = 5; empty-on-nt ΣU += |gt| = 4.
    assert off.counts()["sum_U"] == 12 and emp.counts()["sum_U"] == 11
    assert a["cIoU"] == pytest.approx(100 * 4 / 12) and b["cIoU"] == pytest.approx(100 * 4 / 11)
    assert b["cIoU"] > a["cIoU"]
    for k in METRIC_KEYS:
        if k != "cIoU":
            assert a[k] == b[k]


def test_empty_on_nt_random_relation():
    rng = np.random.default_rng(11)
    pred, gt, pred_nt, gt_nt = random_batch(rng, 60, 24, 24)
    off, emp = GRESMetrics(), GRESMetrics(convention="empty-on-nt")
    off.update(pred, gt, pred_nt, gt_nt)
    emp.update(pred, gt, pred_nt, gt_nt)
    fp = ~gt_nt & pred_nt
    extra = int((pred[fp] & ~gt[fp]).sum())  # predicted pixels outside the GT of FP samples
    assert extra > 0
    assert off.counts()["sum_U"] - emp.counts()["sum_U"] == extra
    assert emp.compute()["cIoU"] > off.compute()["cIoU"]
    # Without FP samples the two conventions agree exactly.
    keep = ~fp
    off2, emp2 = GRESMetrics(), GRESMetrics(convention="empty-on-nt")
    off2.update(pred[keep], gt[keep], pred_nt[keep], gt_nt[keep])
    emp2.update(pred[keep], gt[keep], pred_nt[keep], gt_nt[keep])
    assert same(off2.compute(), emp2.compute())


# --------------------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------------------
def test_nothing_accumulated_is_all_nan():
    out = GRESMetrics().compute()
    assert tuple(out) == METRIC_KEYS and all(math.isnan(v) for v in out.values())
    assert format_metrics(out).startswith("gIoU n/a")


def test_no_nt_samples_reports_nan_nacc_by_default_and_official_zero_on_request():
    rng = np.random.default_rng(5)
    pred, gt, pred_nt, gt_nt = random_batch(rng, 30, 16, 16, p_nt=0.0)
    assert not gt_nt.any() and pred_nt.any()
    ref = official_reference(as_samples(pred, gt, pred_nt, gt_nt))
    assert ref["N_acc"] == 0 and ref["T_acc"] == 0  # what the official code prints
    m = GRESMetrics()
    m.update(pred, gt, pred_nt, gt_nt)
    out = m.compute()
    assert math.isnan(out["N-acc"])
    assert out["T-acc"] == 100.0 * (~pred_nt).sum() / 30  # the real T-acc
    assert out["cIoU"] == ref["cIoU"] and out["gIoU"] == ref["gIoU"]
    z = GRESMetrics(acc_without_nt="zero")
    z.update(pred, gt, pred_nt, gt_nt)
    assert z.compute()["N-acc"] == 0.0 and z.compute()["T-acc"] == 0.0


def test_no_target_samples_only():
    z = torch.zeros(3, 5, 5, dtype=torch.bool)
    pred = z.clone()
    pred[2, 0, 0] = True
    m = GRESMetrics()
    m.update(pred, z, torch.tensor([True, True, False]), torch.tensor([True, True, True]))
    out = m.compute()
    for k in ("Pr@0.7", "Pr@0.8", "Pr@0.9", "T-acc"):
        assert math.isnan(out[k])
    assert out["N-acc"] == pytest.approx(200 / 3)
    assert out["gIoU"] == pytest.approx(200 / 3)
    assert out["cIoU"] == 0.0  # ΣI 0, ΣU 1 (FN's predicted pixel)


def test_zero_union_gives_nan_ciou_and_zero_iou_for_empty_target():
    z = torch.zeros(2, 4, 4, dtype=torch.bool)
    m = GRESMetrics(keep_records=True)
    # sample 0: NT detected (U 0); sample 1: target with empty GT and empty prediction (U 0).
    m.update(z, z, torch.tensor([True, False]), torch.tensor([True, False]))
    out = m.compute()
    assert math.isnan(out["cIoU"])
    assert [r["IoU"] for r in m.records()] == [1.0, 0.0]  # official: IoU 0 when U = 0
    assert out["gIoU"] == 50.0 and out["Pr@0.7"] == 0.0


def test_bad_inputs_raise_clear_errors():
    m = GRESMetrics()
    b = torch.zeros(2, 4, 4, dtype=torch.bool)
    f = torch.tensor([False, True])
    with pytest.raises(ValueError, match="does not match"):
        m.update(b, torch.zeros(2, 4, 5, dtype=torch.bool), f, f)
    with pytest.raises(ValueError, match="pred_mask.*boolean"):
        m.update(b.to(torch.uint8), b, f, f)
    with pytest.raises(ValueError, match="gt_mask.*boolean"):
        m.update(b, b.float(), f, f)
    with pytest.raises(ValueError, match="gt_mask.*boolean"):
        m.update(b.numpy(), b.numpy().astype(np.int64), f, f)
    with pytest.raises(ValueError, match="pred_no_target.*boolean"):
        m.update(b, b, torch.tensor([0, 1]), f)
    with pytest.raises(ValueError, match="gt_no_target: expected shape"):
        m.update(b, b, f, torch.tensor([True]))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        m.update(b[0], b[0], f, f)
    with pytest.raises(ValueError, match="contradicts"):
        m.update(b, b, f, f, expr_type=[2, 2])
    with pytest.raises(ValueError, match="unknown expression type"):
        m.update(b, b, f, f, expr_type=["single", "zero"])
    with pytest.raises(ValueError, match="unsupported numpy dtype"):
        m.update(b, b, np.array([None, None]), f)
    with pytest.raises(ValueError, match="expected 0"):
        m.update(b, b, f, f, expr_type=[5, 2])
    with pytest.raises(ValueError, match="convention"):
        GRESMetrics(convention="paper")
    with pytest.raises(ValueError, match="keep_records=True"):
        m.records()
    assert len(m) == 0  # nothing half-added by a failing call


# --------------------------------------------------------------------------------------------------
# Expression types, records, merging, persistence
# --------------------------------------------------------------------------------------------------
def test_by_type_equals_separate_accumulators():
    rng = np.random.default_rng(7)
    pred, gt, pred_nt, gt_nt = random_batch(rng, 90, 20, 20)
    types = np.where(gt_nt, 2, rng.integers(0, 2, size=90))
    names = np.array(["single", "multi", "no-target"])[types]
    m = GRESMetrics()
    m.update(pred[:50], gt[:50], pred_nt[:50], gt_nt[:50], expr_type=torch.from_numpy(types[:50]))
    m.update(pred[50:], gt[50:], pred_nt[50:], gt_nt[50:], expr_type=list(names[50:]))
    by_type = m.compute_by_type()
    assert set(by_type) == {"single", "multi", "no-target"}
    for t, name in enumerate(["single", "multi", "no-target"]):
        sel = types == t
        sep = GRESMetrics()
        sep.update(pred[sel], gt[sel], pred_nt[sel], gt_nt[sel])
        assert same(by_type[name], sep.compute()), name
    assert math.isnan(by_type["single"]["N-acc"]) and math.isnan(by_type["no-target"]["Pr@0.7"])
    # The overall numbers are unaffected by passing types.
    plain = GRESMetrics()
    plain.update(pred, gt, pred_nt, gt_nt)
    assert same(m.compute(), plain.compute())
    assert m.counts()["n_untyped"] == 0 and plain.counts()["n_untyped"] == 90


def test_records_and_dataframe():
    rng = np.random.default_rng(2)
    pred, gt, pred_nt, gt_nt = random_batch(rng, 12, 10, 10)
    m = GRESMetrics(keep_records=True)
    m.update(pred[:5], gt[:5], pred_nt[:5], gt_nt[:5], ids=[f"s{i}" for i in range(5)])
    m.update(pred[5:], gt[5:], pred_nt[5:], gt_nt[5:], ids=np.arange(105, 112))
    df = m.to_dataframe()
    assert len(df) == 12 and df["id"].tolist()[:6] == ["s0", "s1", "s2", "s3", "s4", 105]
    assert df["I"].sum() == m.counts()["sum_I"] and df["U"].sum() == m.counts()["sum_U"]
    assert 100 * df["IoU"].mean() == pytest.approx(m.compute()["gIoU"])
    assert (df.loc[df.gt_nt, "I"] == 0).all()
    assert set(df["outcome"]) <= {"TP", "FN", "FP", "TN"}
    assert df.loc[~df.gt_nt & df.pred_nt, "outcome"].eq("FP").all()
    with pytest.raises(ValueError, match="ids"):
        m.update(pred[:2], gt[:2], pred_nt[:2], gt_nt[:2], ids=[1])
    auto = GRESMetrics(keep_records=True)
    auto.update(pred[:3], gt[:3], pred_nt[:3], gt_nt[:3])
    auto.update(pred[3:5], gt[3:5], pred_nt[3:5], gt_nt[3:5])
    assert [r["id"] for r in auto.records()] == [0, 1, 2, 3, 4]


def test_merge_state_dict_and_save_load():
    rng = np.random.default_rng(9)
    pred, gt, pred_nt, gt_nt = random_batch(rng, 40, 16, 16)
    types = np.where(gt_nt, 2, 0)
    whole = GRESMetrics(keep_records=True)
    whole.update(pred, gt, pred_nt, gt_nt, expr_type=types)
    a, b = GRESMetrics(keep_records=True), GRESMetrics(keep_records=True)
    a.update(pred[:17], gt[:17], pred_nt[:17], gt_nt[:17], expr_type=types[:17], ids=range(17))
    b.update(pred[17:], gt[17:], pred_nt[17:], gt_nt[17:], expr_type=types[17:],
             ids=range(17, 40))
    merged = a.copy().merge(b)
    assert merged.counts() == whole.counts()
    for k in METRIC_KEYS:
        assert merged.compute()[k] == pytest.approx(whole.compute()[k], rel=1e-12)
    assert [r["id"] for r in merged.records()] == list(range(40))
    assert len(a) == 17  # copy() left `a` untouched
    with pytest.raises(ValueError, match="convention"):
        a.merge(GRESMetrics(convention="empty-on-nt", keep_records=True))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "metrics.pt")
        merged.save(path)
        loaded = GRESMetrics.load(path)
    assert same(loaded.compute(), merged.compute())
    lt, mt = loaded.compute_by_type(), merged.compute_by_type()
    assert all(same(lt[k], mt[k]) for k in mt)
    assert math.isnan(mt["multi"]["gIoU"])  # no multi sample given
    assert loaded.records() == merged.records()
    fresh = GRESMetrics()
    fresh.load_state_dict(a.state_dict())
    assert fresh.keep_records and fresh.counts() == a.counts()
    with pytest.raises(ValueError, match="missing key"):
        fresh.load_state_dict({"version": 1})
    merged.reset()
    assert len(merged) == 0 and merged.records() == []


def test_sync_without_process_group_is_a_copy():
    m = GRESMetrics()
    m.update(*four_cases())
    s = m.sync()
    assert s is not m and same(s.compute(), m.compute())


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        rng = np.random.default_rng(123)
        pred, gt, pred_nt, gt_nt = random_batch(rng, 30, 12, 12)
        sl = slice(rank * 15, (rank + 1) * 15)
        m = GRESMetrics(keep_records=True)
        m.update(pred[sl], gt[sl], pred_nt[sl], gt_nt[sl], ids=list(range(30))[sl])
        g = m.sync()
        torch.save(g.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sync_across_two_gloo_processes():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_ddp_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        states = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=True) for r in (0, 1)]
    rng = np.random.default_rng(123)
    pred, gt, pred_nt, gt_nt = random_batch(rng, 30, 12, 12)
    ref = official_reference(as_samples(pred, gt, pred_nt, gt_nt))
    for state in states:
        g = GRESMetrics()
        g.load_state_dict(state)
        assert len(g) == 30
        assert [r["id"] for r in g.records()] == list(range(30))
        out = g.compute()
        assert out["cIoU"] == ref["cIoU"]
        assert out["gIoU"] == pytest.approx(ref["gIoU"], rel=1e-12)
        assert out["N-acc"] == pytest.approx(100 * ref["N_acc"])
        assert out["T-acc"] == pytest.approx(100 * ref["T_acc"])


def test_order_independence_of_integer_metrics():
    rng = np.random.default_rng(4)
    pred, gt, pred_nt, gt_nt = random_batch(rng, 50, 14, 14)
    perm = rng.permutation(50)
    m1, m2 = GRESMetrics(), GRESMetrics()
    m1.update(pred, gt, pred_nt, gt_nt)
    m2.update(pred[perm], gt[perm], pred_nt[perm], gt_nt[perm])
    assert m1.counts() == m2.counts()
    assert m1.compute()["gIoU"] == pytest.approx(m2.compute()["gIoU"], rel=1e-12)


def test_string_types_on_the_four_cases():
    m = GRESMetrics()
    m.update(*four_cases(), expr_type=["single", "multi", "no-target", "no_target"])
    by_type = m.compute_by_type()
    assert list(by_type) == ["single", "multi", "no-target"]
    assert all(tuple(row) == METRIC_KEYS for row in by_type.values())
    assert by_type["single"]["gIoU"] == pytest.approx(80.0)  # the TN sample
    assert by_type["multi"]["gIoU"] == 0.0 and by_type["multi"]["T-acc"] == 0.0  # the FP
    assert by_type["no-target"]["N-acc"] == 50.0 and by_type["no-target"]["gIoU"] == 50.0
