"""paper_results/*.csv follow the schema, have unique keys and match hand-checked values;
gres.paper's compare/ordering helpers behave as documented."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gres import paper


def test_every_table_present_and_schema_ok():
    names = paper.tables()
    assert names == ["dataset"] + [f"table{i}" for i in range(1, 8)]
    for name in names:
        df = paper.load(name)
        paper.check_schema(df, name)  # columns, unique keys, numeric values where numeric
        assert (df["table"] == ("sec3.2" if name == "dataset" else name)).all()
        assert df["value"].str.len().gt(0).all()
        numeric = df[df["unit"] == "percent"]
        assert numeric["value_num"].between(0, 100).all()
        assert set(numeric["metric"]) <= set(paper.METRICS)


def test_row_counts():
    counts = {name: len(paper.load(name)) for name in paper.tables()}
    # 4 variants x 5 metrics; 8 methods x 3 splits x 2; 5 x 3 x 2; 7 x 9 minus four '-' cells
    assert counts == {"dataset": 5, "table1": 16, "table2": 20, "table3": 20, "table4": 20,
                      "table5": 48, "table6": 30, "table7": 59}


@pytest.mark.parametrize(
    "table, filters, expected",
    [
        (5, dict(method="ReLA", split="val", metric="cIoU"), 62.42),
        (5, dict(method="ReLA", split="val", metric="gIoU"), 63.60),
        (5, dict(method="ReLA", split="testB", metric="gIoU"), 61.02),
        (5, dict(method="LAVT+ReLA", split="testA", metric="cIoU"), 67.54),
        (5, dict(method="MattNet", split="testB", metric="cIoU"), 45.33),
        (6, dict(method="ReLA", split="testA", metric="N-acc"), 59.02),
        (6, dict(method="ReLA-50pix", split="val", metric="T-acc"), 96.28),
        (2, dict(method="Hard split, input", metric="Pr@0.9"), 19.26),
        (3, dict(method="+ region att.", metric="gIoU"), 62.38),
        (4, dict(method="12x12", metric="Pr@0.8"), 67.56),
        (4, dict(method="4x4", metric="cIoU"), 56.57),
        (7, dict(method="ReLA", eval_set="RefCOCO+", split="testB"), 57.65),
        (7, dict(method="VLT", backbone="Swin-B", eval_set="G-Ref (UMD)", split="test"), 66.22),
        (7, dict(method="VLT", backbone="Darknet53", eval_set="RefCOCO", split="val"), 67.52),
        ("dataset", dict(metric="expressions"), 278232),
        ("dataset", dict(metric="no_target_expressions"), 32202),
        ("dataset", dict(metric="multi_target_expressions"), 80022),
        ("dataset", dict(metric="instances"), 60287),
        ("dataset", dict(metric="images"), 19994),
    ],
)
def test_spot_values_transcribed_by_hand(table, filters, expected):
    assert paper.value(table, **filters) == pytest.approx(expected, abs=1e-9)


def test_value_kept_exactly_as_printed():
    t5 = paper.load("table5")
    row = t5[(t5.method == "ReLA") & (t5.split == "val") & (t5.metric == "gIoU")]
    assert row["value"].item() == "63.60"  # trailing zero kept
    ds = paper.load("dataset")
    assert ds.loc[ds.metric == "expressions", "value"].item() == "278,232"
    t1 = paper.load("table1")
    gref = t1[t1.method == "gRefCOCO"].set_index("metric")["value"]
    assert gref["no_target"] == "✓" and gref["multi_target"] == "✓"
    assert t1[(t1.method == "PhraseCut") & (t1.metric == "multi_target")]["value"].item() \
        == "(fallback)"


def test_tables_agree_where_the_paper_repeats_a_number():
    # ReLA (val) appears in Tables 2, 3, 4 (10x10) and 5: the same numbers everywhere
    for metric in ("cIoU", "gIoU"):
        v5 = paper.value(5, method="ReLA", split="val", metric=metric)
        assert paper.value(2, method="ReLA", metric=metric) == v5
        assert paper.value(3, method="ReLA", metric=metric) == v5
        assert paper.value(4, method="10x10", metric=metric) == v5
    # the gains quoted in Sec. 5.2 follow from the tables
    g = {m: paper.value(2, method=m, metric="gIoU") for m in ("Hard split, input",
                                                               "Hard split, decoder", "ReLA")}
    assert g["Hard split, decoder"] - g["Hard split, input"] == pytest.approx(5.59)
    assert g["ReLA"] - g["Hard split, decoder"] == pytest.approx(2.67)


def test_load_aliases_and_errors():
    assert paper.load("Tab. 5").equals(paper.load(5))
    assert paper.load("table1_dataset").equals(paper.load("dataset"))
    with pytest.raises(FileNotFoundError, match="table9"):
        paper.load(9)
    with pytest.raises(ValueError, match="matches 6 rows"):
        paper.value(5, method="ReLA")
    with pytest.raises(ValueError, match="unknown column"):
        paper.value(5, model="ReLA")


def test_wide_restores_printed_layout():
    w = paper.wide(5)
    assert list(w.index)[:2] == ["MattNet", "LTS"] and w.index[-1] == "ReLA"
    assert w.loc["ReLA", ("testA", "gIoU")] == pytest.approx(70.03)
    assert w.shape == (8, 6)


def test_compare_long_and_wide_forms():
    wide = pd.DataFrame({"method": ["ReLA", "LAVT"], "split": ["val", "val"],
                         "gIoU": [60.0, 59.4], "cIoU": [62.42, 50.0]})
    cmp = paper.compare(wide, "table5", tol=0.5)
    assert list(cmp.columns) == ["method", "split", "metric", "paper", "ours", "delta",
                                 "within_tol"]
    row = cmp[(cmp.method == "ReLA") & (cmp.metric == "gIoU")].iloc[0]
    assert row.paper == pytest.approx(63.60) and row.delta == pytest.approx(-3.60)
    assert not row.within_tol
    assert cmp[(cmp.method == "ReLA") & (cmp.metric == "cIoU")].within_tol.item()
    long = wide.melt(id_vars=["method", "split"], var_name="metric", value_name="ours")
    pd.testing.assert_frame_equal(
        paper.compare(long, 5).sort_values(["method", "metric"]).reset_index(drop=True),
        paper.compare(wide, 5).sort_values(["method", "metric"]).reset_index(drop=True),
    )


def test_compare_rejects_unknown_and_ambiguous_keys():
    ours = pd.DataFrame({"method": ["ReLA"], "split": ["train"], "gIoU": [1.0]})
    with pytest.raises(ValueError, match="no value for these keys"):
        paper.compare(ours, 5)
    out = paper.compare(ours, 5, allow_missing=True)
    assert out["paper"].isna().all()
    # Table 7 has two VLT rows per cell (two backbones): keys must disambiguate
    t7 = pd.DataFrame({"method": ["VLT"], "eval_set": ["RefCOCO"], "split": ["val"],
                       "metric": ["cIoU"], "ours": [70.0]})
    with pytest.raises(ValueError, match="duplicate keys"):
        paper.compare(t7, 7, keys=("method", "eval_set", "split", "metric"))
    ok = paper.compare(t7, 7, keys=("method", "eval_set", "split", "metric"), backbone="Swin-B")
    assert ok["paper"].item() == pytest.approx(72.96)


def test_ordering_agreement_and_disagreement():
    df = pd.DataFrame({"method": ["A", "B", "C"], "paper": [3.0, 2.0, 1.0],
                       "ours": [30.0, 20.0, 10.0]})
    check = paper.ordering(df)
    assert check.agrees and check.same_best and check.kendall_tau == pytest.approx(1.0)
    assert "agrees" in check.sentence()
    df["ours"] = [20.0, 30.0, 10.0]  # A and B swapped
    check = paper.ordering(df)
    assert not check.agrees and not paper.ordering_agrees(df)
    assert check.discordant == [("A", "B")]
    assert check.kendall_tau == pytest.approx(1 / 3)
    assert "the paper ranks A above B, we rank B above A" in check.sentence()
    # within tie_tol the swap is a tie, not a disagreement
    df["ours"] = [20.0, 20.3, 10.0]
    assert paper.ordering(df, tie_tol=0.5).agrees
    reversed_ = df.assign(ours=[1.0, 2.0, 3.0])
    assert paper.ordering(reversed_).kendall_tau == pytest.approx(-1.0)


def test_ordering_on_compare_output_filters_metric():
    ours = pd.DataFrame({"method": ["4x4", "8x8", "10x10", "12x12"],
                         "gIoU": [50.0, 52.0, 55.0, 54.0], "cIoU": [40.0, 39.0, 45.0, 46.0]})
    cmp = paper.compare(ours, 4, keys=("method", "metric"))
    assert paper.ordering_agrees(cmp, "gIoU")  # paper: 10x10 > 12x12 > 8x8 > 4x4
    c = paper.ordering(cmp, "cIoU")
    assert not c.agrees
    assert set(c.discordant) == {("8x8", "4x4"), ("10x10", "12x12")}
    with pytest.raises(ValueError, match="more than once"):
        paper.ordering(cmp)


def test_side_by_side_marks_unreproduced_rows_and_formats_seeds():
    ours = pd.DataFrame({"method": ["LAVT", "LAVT", "ReLA", "ReLA"], "split": ["val"] * 4,
                         "metric": ["gIoU", "cIoU"] * 2, "ours": [40.0, 41.0, 50.25, 52.0],
                         "std": [1.0, 2.0, 0.5, 0.25], "n_seeds": [2, 2, 2, 2]})
    t = paper.side_by_side(ours, 5, ["gIoU", "cIoU"])
    assert list(t.index) == ["MattNet", "LTS", "VLT", "CRIS", "LAVT", "VLT+ReLA", "LAVT+ReLA",
                             "ReLA"]
    assert t.columns.names == ["metric", "source"]
    assert t.loc["ReLA", ("gIoU", "paper")] == "63.60"  # as printed
    assert t.loc["ReLA", ("gIoU", "ours")] == "50.2 ± 0.5"
    assert t.loc["MattNet", ("cIoU", "ours")] == "paper only"
    one_seed = ours.assign(n_seeds=1)
    t = paper.side_by_side(one_seed, 5, ["gIoU"], splits=["val", "testA"], digits=2)
    assert t.columns.names == ["split", "metric", "source"]
    assert t.loc["LAVT", ("val", "gIoU", "ours")] == "40.00"
    assert t.loc["LAVT", ("testA", "gIoU", "ours")] == "paper only"
    assert t.loc["LAVT", ("testA", "gIoU", "paper")] == "65.90"
    extra = pd.concat([ours, ours.iloc[:1].assign(method="mine")])
    assert paper.side_by_side(extra, 5, ["gIoU"]).index[-1] == "mine"  # no paper row: appended
    assert paper.side_by_side(extra, 5, ["gIoU"]).loc["mine", ("gIoU", "paper")] == "—"


def test_paired_gaps_standard_error_of_the_difference():
    ref = [0.5, 0.6, 0.7, 0.8]
    per = {"ref": ref, "same+noise": [0.51, 0.59, 0.71, 0.79], "better": [0.9, 1.0, 1.0, 1.0]}
    g = paper.paired_gaps(per, "ref")
    assert g.loc["ref", "gap"] == 0.0 and not g.loc["ref", "resolved"]
    assert g.loc["same+noise", "gap"] == pytest.approx(0.0, abs=1e-9)
    assert g.loc["same+noise", "se"] == pytest.approx(100 * 0.011547 / 2, rel=1e-3)
    assert not g.loc["same+noise", "resolved"]
    assert g.loc["better", "gap"] == pytest.approx(32.5) and g.loc["better", "resolved"]
    with pytest.raises(ValueError, match="reference"):
        paper.paired_gaps(per, "nope")
    with pytest.raises(ValueError, match="samples"):
        paper.paired_gaps({"ref": ref, "short": [0.1]}, "ref")


def test_sample_ious_recompute_the_gIoU_of_cached_records(tmp_path):
    import json

    from gres import experiments as ex

    cfg = ex.preset("cpu-smoke")  # 64 px: the pixel rule keeps masks of >= 1 pixel
    recs = [  # (gt_nt, pred_nt, mask_I, pred_area, gt_area)
        (False, False, 5, 10, 5), (False, True, 5, 5, 5), (True, True, 0, 3, 0),
        (True, False, 0, 0, 0), (False, False, 0, 0, 4),
    ]
    (tmp_path / "eval").mkdir()
    lines = [json.dumps({"index": i, "expr_type": 2 if g else 0, "gt_nt": g, "pred_nt": p,
                         "nt_prob": 0.5, "mask_I": mi, "pred_area": pa, "gt_area": ga})
             for i, (g, p, mi, pa, ga) in reversed(list(enumerate(recs)))]  # any file order
    (tmp_path / "eval" / "val_records.jsonl").write_text("\n".join(lines))
    run = ex.TrainedRun(cfg=cfg, dir=tmp_path, info={}, loaded=True)
    head = ex.ExperimentResult("r", cfg, [], [run, run], nt_rule="head", split="val")
    np.testing.assert_allclose(paper.sample_ious(head), [0.5, 0.0, 1.0, 0.0, 0.0])
    pixels = ex.ExperimentResult("p", cfg, [], [run], nt_rule="pixels", split="val")
    # pixel rule: sample 2 keeps its 3 pixels (a target answer) -> 0; sample 3 is empty -> 1
    np.testing.assert_allclose(paper.sample_ious(pixels), [0.5, 1.0, 0.0, 1.0, 0.0])
    score = ex.score(ex.eval_records(run, "val"), nt_rule="pixels", min_pixels=1)
    assert 100 * paper.sample_ious(pixels).mean() == pytest.approx(score["gIoU"])


def test_reversal_noise_sentence():
    per = {"A": [0.5, 0.6, 0.7, 0.8], "B": [0.52, 0.61, 0.69, 0.82], "C": [0.0, 0.1, 0.0, 0.1]}
    df = pd.DataFrame({"method": ["A", "B", "C"], "paper": [3.0, 2.0, 1.0],
                       "ours": [100 * np.mean(v) for v in per.values()]})
    check = paper.ordering(df, metric=None)
    assert check.discordant == [("A", "B")]
    text = paper.reversal_noise(check, per)
    assert text.startswith("The reversed pairs: B over A by 1.00 ± ")
    assert "(within 2 standard errors)" in text
    per["B"] = [0.9, 1.0, 1.0, 1.0]
    df["ours"] = [100 * np.mean(v) for v in per.values()]
    assert "(larger than 2 standard errors)" in paper.reversal_noise(paper.ordering(df), per)
    agree = paper.ordering(df.assign(ours=[3.0, 2.0, 1.0]))
    assert "no reversal" in paper.reversal_noise(agree, per)


def test_ordering_sentence_has_one_final_period_after_abbreviated_items():
    df = pd.DataFrame({"method": ["Baseline", "+ language att."], "paper": [1.0, 2.0],
                       "ours": [2.0, 1.0]})
    text = paper.ordering(df).sentence()
    assert text.endswith("we rank Baseline above + language att.") and ".." not in text
    assert ".." not in paper.ordering(df.assign(ours=[1.0, 2.0])).sentence()
