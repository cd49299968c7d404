"""The paper's reported numbers (``paper_results/*.csv``) and how ours compare with them.

Every paper number the book prints comes through this module, never typed by hand:

* :func:`load` reads one table as a tidy DataFrame (one row per printed number);
* :func:`value` fetches one number, for ``glue``;
* :func:`wide` pivots a table back to the paper's layout for display;
* :func:`compare` aligns our results with the paper's on key columns and adds ``paper``, ``ours``,
  ``delta`` (= ours - paper) and ``within_tol``;
* :func:`ordering` / :func:`ordering_agrees` say whether our ranking of methods (or variants)
  agrees with the paper's, so that the book can state a disagreement instead of hiding it;
* :func:`side_by_side` shows every paper row beside ours (unreproduced rows marked "paper only"),
  and :func:`paired_gaps` / :func:`sample_ious` / :func:`reversal_noise` say which of our
  differences exceed their noise.

See ``paper_results/README.md`` for the schema, units and transcription notes.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

RESULTS_DIR = Path(__file__).resolve().parent.parent / "paper_results"

COLUMNS: tuple[str, ...] = (
    "table", "method", "backbone", "train_set", "eval_set", "split", "metric", "value", "unit",
    "note",
)
KEY_COLUMNS: tuple[str, ...] = (
    "table", "method", "backbone", "train_set", "eval_set", "split", "metric",
)
METRICS: tuple[str, ...] = ("gIoU", "cIoU", "Pr@0.7", "Pr@0.8", "Pr@0.9", "N-acc", "T-acc")
UNITS: tuple[str, ...] = ("percent", "fraction", "count", "text")

_ALIASES = {"table1_dataset": "dataset", "sec3.2": "dataset", "stats": "dataset"}


def tables(results_dir: str | Path | None = None) -> list[str]:
    """Names accepted by :func:`load` (file stems of ``paper_results/*.csv``), sorted."""
    root = Path(results_dir) if results_dir is not None else RESULTS_DIR
    return sorted(p.stem for p in root.glob("*.csv"))


def _table_name(table: str | int) -> str:
    if isinstance(table, (int, np.integer)):
        return f"table{int(table)}"
    name = str(table).strip().lower().replace(" ", "")
    m = re.fullmatch(r"(?:table|tab\.?)?(\d+)", name)  # "5", "table5", "Tab. 5"
    if m:
        return f"table{m.group(1)}"
    return _ALIASES.get(name, name)


def _to_number(text: str) -> float:
    try:
        return float(str(text).replace(",", ""))
    except ValueError:
        return float("nan")


def load(table: str | int, results_dir: str | Path | None = None) -> pd.DataFrame:
    """Load one paper table.

    Args:
        table: ``"table5"``, ``5``, ``"5"`` or ``"dataset"`` (the §3.2 statistics).
        results_dir: folder of the CSV files (default: the repository's ``paper_results/``).

    Returns:
        DataFrame with the columns of :data:`COLUMNS` (all strings, ``value`` exactly as printed,
        missing cells as ``""``) plus ``value_num`` (float; NaN for text values).

    Raises:
        FileNotFoundError: no CSV for this table (the message lists the available ones).
        ValueError: the file does not follow the schema.
    """
    root = Path(results_dir) if results_dir is not None else RESULTS_DIR
    name = _table_name(table)
    path = root / f"{name}.csv"
    if not path.exists():
        raise FileNotFoundError(
            f"no paper table {table!r} ({path}); available: {', '.join(tables(root)) or 'none'}"
        )
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if tuple(df.columns) != COLUMNS:
        raise ValueError(f"{path}: columns {list(df.columns)} != schema {list(COLUMNS)}")
    bad_units = sorted(set(df["unit"]) - set(UNITS))
    if bad_units:
        raise ValueError(f"{path}: unknown unit(s) {bad_units}; expected one of {UNITS}")
    df["value_num"] = df["value"].map(_to_number)
    return df


def load_all(results_dir: str | Path | None = None) -> pd.DataFrame:
    """Every table concatenated (same columns as :func:`load`)."""
    return pd.concat([load(t, results_dir) for t in tables(results_dir)], ignore_index=True)


def _select(df: pd.DataFrame, filters: dict[str, object]) -> pd.DataFrame:
    for col, want in filters.items():
        if col not in df.columns:
            raise ValueError(f"unknown column {col!r}; columns are {list(df.columns)}")
        if isinstance(want, (list, tuple, set)):
            df = df[df[col].isin([str(w) for w in want])]
        else:
            df = df[df[col] == str(want)]
    return df


def value(table: str | int, **filters: object) -> float:
    """One paper number as a float, e.g. ``value(5, method="ReLA", split="val", metric="gIoU")``.

    Raises:
        ValueError: the filters match no row or more than one row (the message shows the matches).
    """
    df = _select(load(table), filters)
    if len(df) != 1:
        shown = df[list(KEY_COLUMNS) + ["value"]].to_string(index=False) if len(df) else "nothing"
        raise ValueError(
            f"paper table {table!r} with {filters} matches {len(df)} rows, expected 1:\n{shown}"
        )
    return float(df["value_num"].iloc[0])


def wide(
    table: str | int,
    index: str | Sequence[str] = "method",
    columns: str | Sequence[str] = ("split", "metric"),
    **filters: object,
) -> pd.DataFrame:
    """A table pivoted back to the paper's layout (numbers as floats, rows in printed order)."""
    df = _select(load(table), filters)
    index = [index] if isinstance(index, str) else list(index)
    columns = [columns] if isinstance(columns, str) else list(columns)
    row_order = list(dict.fromkeys(map(tuple, df[index].to_numpy())))
    col_order = list(dict.fromkeys(map(tuple, df[columns].to_numpy())))
    values = "value" if df["unit"].eq("text").all() else "value_num"
    out = df.pivot_table(index=index, columns=columns, values=values, aggfunc="first")
    out = out.reindex(
        index=pd.MultiIndex.from_tuples(row_order, names=index) if len(index) > 1
        else [r[0] for r in row_order],
        columns=pd.MultiIndex.from_tuples(col_order, names=columns) if len(columns) > 1
        else [c[0] for c in col_order],
    )
    out.index.name = index[0] if len(index) == 1 else out.index.name
    return out


def _long_form(ours: pd.DataFrame, keys: Sequence[str], value_col: str) -> pd.DataFrame:
    """Accept ours in long form (``metric`` + value column) or wide form (one column per metric)."""
    if value_col in ours.columns:
        return ours
    if "metric" in keys and "metric" not in ours.columns:
        metric_cols = [c for c in ours.columns if c in METRICS]
        if not metric_cols:
            raise ValueError(
                f"ours has neither a {value_col!r} column nor metric columns {list(METRICS)}; "
                f"columns: {list(ours.columns)}"
            )
        id_vars = [c for c in ours.columns if c not in metric_cols]
        return ours.melt(id_vars=id_vars, value_vars=metric_cols, var_name="metric",
                         value_name=value_col)
    raise ValueError(f"ours needs a {value_col!r} column; columns: {list(ours.columns)}")


def compare(
    ours: pd.DataFrame,
    table: str | int,
    keys: Sequence[str] = ("method", "split", "metric"),
    tol: float = 1.0,
    value_col: str = "ours",
    allow_missing: bool = False,
    **filters: object,
) -> pd.DataFrame:
    """Align our numbers with a paper table.

    Args:
        ours: our results, long form (the key columns + ``value_col``) or wide form (the key
            columns except ``metric`` + one column per metric name, e.g. ``gIoU``, ``cIoU``).
            Values are in the paper's unit (percent for every metric).
        table: paper table, as for :func:`load`.
        keys: columns to align on; together with ``filters`` they must identify one paper row.
        tol: ``within_tol`` is ``|delta| <= tol`` (same unit as the values).
        value_col: name of our value column in long form.
        allow_missing: keep our rows that have no paper counterpart (``paper`` = NaN) instead of
            raising.
        **filters: restrict the paper table first, e.g. ``eval_set="RefCOCO"``.

    Returns:
        One row per row of ``ours``, in the order of ``ours``: the key columns, ``paper``,
        ``ours``, ``delta`` (ours - paper) and ``within_tol``.

    Raises:
        ValueError: unknown key columns, duplicate keys (in ours or in the paper selection) or, if
            not ``allow_missing``, keys of ours that the paper does not report.
    """
    keys = list(keys)
    paper = _select(load(table), filters)
    missing_cols = [k for k in keys if k not in paper.columns]
    if missing_cols:
        raise ValueError(f"unknown key column(s) {missing_cols}; paper columns: {list(COLUMNS)}")
    ours_long = _long_form(ours.copy(), keys, value_col)
    absent = [k for k in keys if k not in ours_long.columns]
    if absent:
        raise ValueError(f"ours lacks key column(s) {absent}; columns: {list(ours_long.columns)}")
    ours_long = ours_long[keys + [value_col]].copy()
    for k in keys:
        ours_long[k] = ours_long[k].astype(str)
    for name, frame in (("ours", ours_long), (f"paper {table!r}", paper)):
        dup = frame[frame.duplicated(keys, keep=False)]
        if len(dup):
            raise ValueError(
                f"{name} has duplicate keys {keys} (add keys or filters):\n"
                f"{dup[keys].drop_duplicates().to_string(index=False)}"
            )
    merged = ours_long.merge(
        paper[keys + ["value_num"]].rename(columns={"value_num": "paper"}), on=keys, how="left",
        validate="one_to_one",
    )
    unmatched = merged[merged["paper"].isna()]
    if len(unmatched) and not allow_missing:
        raise ValueError(
            f"paper table {table!r} reports no value for these keys of ours:\n"
            f"{unmatched[keys].to_string(index=False)}"
        )
    merged = merged.rename(columns={value_col: "ours"})
    merged["ours"] = merged["ours"].astype(float)
    merged["delta"] = merged["ours"] - merged["paper"]
    merged["within_tol"] = merged["delta"].abs() <= tol
    return merged[keys + ["paper", "ours", "delta", "within_tol"]]


@dataclass
class OrderingCheck:
    """Whether two rankings of the same items agree.

    Attributes:
        metric: the metric compared (or ``None``).
        items: the compared items.
        paper_order / ours_order: items sorted by decreasing value.
        discordant: pairs ``(a, b)`` that the paper ranks a > b and we rank b > a.
        ties: pairs tied (within ``tie_tol``) in ours but not in the paper, or vice versa.
        kendall_tau: Kendall's tau-b between the two rankings (1 = identical order).
    """

    metric: str | None
    items: list[str]
    paper_order: list[str]
    ours_order: list[str]
    discordant: list[tuple[str, str]] = field(default_factory=list)
    ties: list[tuple[str, str]] = field(default_factory=list)
    kendall_tau: float = float("nan")

    @property
    def agrees(self) -> bool:
        """True when no pair is ranked the opposite way (ties do not count as disagreement)."""
        return not self.discordant

    @property
    def same_best(self) -> bool:
        """True when the top item is the same in both rankings."""
        return bool(self.items) and self.paper_order[0] == self.ours_order[0]

    def sentence(self) -> str:
        """A one-sentence verdict for the book's prose."""
        what = f" on {self.metric}" if self.metric else ""
        if self.agrees:
            tie = f" (with {len(self.ties)} tie(s))" if self.ties else ""
            text = (f"Our ordering{what} agrees with the paper's{tie}: "
                    f"{' > '.join(self.ours_order)}.")
        else:
            pairs = "; ".join(f"the paper ranks {a} above {b}, we rank {b} above {a}"
                              for a, b in self.discordant)
            text = f"Our ordering{what} disagrees with the paper's: {pairs}."
        return text[:-1] if text.endswith("..") else text  # items such as "+ language att."


def ordering(
    df: pd.DataFrame,
    metric: str | None = None,
    item: str = "method",
    paper_col: str = "paper",
    ours_col: str = "ours",
    tie_tol: float = 0.0,
    **filters: object,
) -> OrderingCheck:
    """Compare the paper's ranking of ``item`` with ours (higher value = better).

    Args:
        df: typically the output of :func:`compare`; needs ``item``, ``paper_col``, ``ours_col``
            and, if ``metric`` is given, a ``metric`` column.
        metric: restrict to this metric.
        item: the column naming what is ranked (method, variant, number of regions, ...).
        tie_tol: two values closer than or equal to this are a tie (not a disagreement).
        **filters: further restrictions, e.g. ``split="val"``.

    Raises:
        ValueError: an item appears more than once after filtering (filter by split/metric first).
    """
    sel = df
    if metric is not None:
        sel = sel[sel["metric"] == metric]
    for col, want in filters.items():
        sel = sel[sel[col] == want]
    if sel[item].duplicated().any():
        dups = sorted(set(sel.loc[sel[item].duplicated(), item]))
        raise ValueError(
            f"items {dups} appear more than once; pass metric=... or filters such as split='val'"
        )
    items = [str(x) for x in sel[item]]
    p = dict(zip(items, sel[paper_col].astype(float)))
    o = dict(zip(items, sel[ours_col].astype(float)))
    # stable sorts: equal values keep the input order
    paper_order = sorted(items, key=lambda k: -p[k])
    ours_order = sorted(items, key=lambda k: -o[k])
    discordant, ties = [], []
    conc = disc = tie_p = tie_o = 0

    def sign(x: float) -> int:
        return 0 if abs(x) <= tie_tol else (1 if x > 0 else -1)

    for a, b in itertools.combinations(paper_order, 2):
        sp, so = sign(p[a] - p[b]), sign(o[a] - o[b])
        if sp * so > 0:
            conc += 1
        elif sp * so < 0:
            disc += 1
            discordant.append((a, b) if sp > 0 else (b, a))
        else:
            if sp != so:
                ties.append((a, b))
            tie_p += sp == 0
            tie_o += so == 0
    n0 = len(items) * (len(items) - 1) // 2  # tau-b: ties in either ranking leave the denominator
    denom = np.sqrt((n0 - tie_p) * (n0 - tie_o))
    tau = (conc - disc) / denom if denom else float("nan")
    return OrderingCheck(metric, items, paper_order, ours_order, discordant, ties, float(tau))


def ordering_agrees(df: pd.DataFrame, metric: str | None = None, **kwargs: object) -> bool:
    """Shorthand for ``ordering(df, metric, **kwargs).agrees``."""
    return ordering(df, metric, **kwargs).agrees


def headline(table: str | int = 5, method: str = "ReLA", split: str = "val") -> dict[str, float]:
    """The paper's numbers for one method and split as ``{metric: value}`` (e.g. Table 5 val)."""
    df = _select(load(table), {"method": method, "split": split})
    if df.empty:
        raise ValueError(
            f"paper table {table!r} has no rows for method={method!r}, split={split!r}"
        )
    return {m: float(v) for m, v in zip(df["metric"], df["value_num"])}


def check_schema(df: pd.DataFrame, name: str = "table") -> None:
    """Raise ``ValueError`` if a loaded table breaks the schema (columns, units, unique keys)."""
    cols = [c for c in df.columns if c != "value_num"]
    if tuple(cols) != COLUMNS:
        raise ValueError(f"{name}: columns {cols} != {list(COLUMNS)}")
    dup = df[df.duplicated(list(KEY_COLUMNS), keep=False)]
    if len(dup):
        raise ValueError(f"{name}: duplicate keys\n{dup[list(KEY_COLUMNS)].to_string()}")
    numeric = df[df["unit"] != "text"]
    bad = numeric[numeric["value_num"].isna()]
    if len(bad):
        raise ValueError(f"{name}: non-numeric values {list(bad['value'])} with a numeric unit")


# --------------------------------------------------------------------------------------------------
# Reproduced tables: the paper's rows beside ours, and how noisy our differences are
# --------------------------------------------------------------------------------------------------
def side_by_side(
    ours: pd.DataFrame,
    table: str | int,
    metrics: Sequence[str],
    *,
    splits: Sequence[str] | None = None,
    item: str = "method",
    digits: int = 1,
    missing: str = "paper only",
    **filters: object,
) -> pd.DataFrame:
    """A display table: every paper row (printed order) with the paper's value and ours side by side.

    Args:
        ours: long form with ``item``, ``split``, ``metric``, ``ours`` and optionally ``std`` and
            ``n_seeds`` (e.g. :func:`gres.experiments.paper_frame`); rows the paper does not
            print are appended after the paper's rows.
        table: paper table, as for :func:`load`.
        metrics: metric columns, in this order.
        splits: splits shown (default: those of ``ours``); with one split the column index is
            ``(metric, source)``, else ``(split, metric, source)``, source = ``paper`` / ``ours``.
        digits: decimals of our values (paper values are shown as printed).
        missing: text of a cell we did not reproduce.
        **filters: restrict the paper table first.

    Returns:
        DataFrame of strings; ours is ``"mean ± std"`` when ``n_seeds > 1``, else ``"mean"``.
    """
    paper_df = _select(load(table), filters)
    splits = list(splits) if splits is not None else list(dict.fromkeys(ours["split"]))
    paper_df = paper_df[paper_df["split"].isin(splits) & paper_df["metric"].isin(list(metrics))]
    rows = list(dict.fromkeys(list(paper_df[item]) + [str(m) for m in ours[item]]))
    printed = {(r[item], r["split"], r["metric"]): r["value"] for _, r in paper_df.iterrows()}
    mine = {(str(r[item]), r["split"], r["metric"]): r for _, r in ours.iterrows()}

    def fmt(r: pd.Series | None) -> str:
        if r is None or pd.isna(r["ours"]):
            return missing
        text = f"{float(r['ours']):.{digits}f}"
        if int(r.get("n_seeds", 1) or 1) > 1 and "std" in r and not pd.isna(r["std"]):
            text += f" ± {float(r['std']):.{digits}f}"
        return text

    cols = [(s, m, src) for s in splits for m in metrics for src in ("paper", "ours")]
    data = [[printed.get((row, s, m), "—") if src == "paper" else fmt(mine.get((row, s, m)))
             for s, m, src in cols] for row in rows]
    if len(splits) == 1:
        index = pd.MultiIndex.from_tuples([c[1:] for c in cols], names=["metric", "source"])
    else:
        index = pd.MultiIndex.from_tuples(cols, names=["split", "metric", "source"])
    return pd.DataFrame(data, index=pd.Index(rows, name=item), columns=index)


def paired_gaps(
    per_sample: dict[str, Sequence[float]],
    reference: str,
    z: float = 2.0,
) -> pd.DataFrame:
    """Differences to ``reference`` measured on the same samples, with their standard errors.

    For items evaluated on the same samples (e.g. ablation variants on one validation split),
    the gap of item ``a`` is ``mean(a_i - ref_i)`` in percent and its standard error
    ``std(a_i - ref_i, ddof=1) / sqrt(n)``; pairing removes the sample-to-sample variance both
    share, so the standard error is that of the *difference*, not of each score.

    Args:
        per_sample: ``{item: per-sample scores in [0, 1]}`` (e.g. gIoU terms), same samples in
            the same order for every item.
        reference: the item the others are compared with (its own row has gap 0).
        z: a gap is ``resolved`` when ``|gap| > z * se``.

    Returns:
        DataFrame indexed by item: ``gap`` and ``se`` (percentage points), ``resolved`` (bool).

    Raises:
        ValueError: unknown reference, or items scored on different numbers of samples.
    """
    if reference not in per_sample:
        raise ValueError(f"reference {reference!r} not among {list(per_sample)}")
    ref = np.asarray(per_sample[reference], dtype=float)
    rows = []
    for name, values in per_sample.items():
        v = np.asarray(values, dtype=float)
        if v.shape != ref.shape:
            raise ValueError(f"{name!r} has {v.size} samples, {reference!r} has {ref.size}")
        d = 100.0 * (v - ref)
        se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
        gap = float(d.mean())
        rows.append({"item": name, "gap": gap, "se": se,
                     "resolved": bool(abs(gap) > z * se) if se > 0 else gap != 0.0})
    return pd.DataFrame(rows).set_index("item")


def reversal_noise(check: OrderingCheck, per_sample: dict[str, Sequence[float]],
                   z: float = 2.0) -> str:
    """A sentence weighing each pair that ``check`` finds reversed against its paired noise.

    Args:
        check: an :class:`OrderingCheck` (typically on gIoU).
        per_sample: per-sample scores (0..1) of the checked items, as for :func:`paired_gaps`.
        z: a reversal is "larger than" the noise when our gap exceeds ``z`` standard errors.

    Returns:
        e.g. ``"The reversed pairs: B over A by 1.20 ± 0.40 points (larger than 2 standard
        errors)."``, or a sentence saying that no pair is reversed.
    """
    if check.agrees:
        return "No pair is ranked against the paper, so there is no reversal to weigh against noise."
    parts = []
    for a, b in check.discordant:  # the paper ranks a above b, we rank b above a
        d = paired_gaps({a: per_sample[a], b: per_sample[b]}, a, z=z).loc[b]
        verdict = "larger than" if d["resolved"] else "within"
        parts.append(f"{b} over {a} by {d['gap']:.2f} ± {d['se']:.2f} points ({verdict} {z:g} "
                     "standard errors)")
    what = f" on {check.metric}" if check.metric else ""
    return f"The reversed pairs{what}: " + "; ".join(parts) + "."


def sample_ious(result: object) -> np.ndarray:
    """Per-sample gIoU terms (0..1) of a :class:`gres.experiments.ExperimentResult`, averaged over
    its seeds, in dataset order: the official per-sample IoU under the result's no-target rule
    (1 for a recognised no-target sample, 0 for a missed or wrongly rejected one), recomputed
    from the cached evaluation records. Their mean is the result's gIoU / 100."""
    from gres import engine
    from gres import experiments as ex
    from gres.model.variants import min_pixels_for

    k = min_pixels_for(result.cfg.model.image_size)
    per_seed = []
    for run in result.runs:
        raw = ex.apply_nt_rule(ex.eval_records(run, result.split, progress=False),
                               result.nt_rule, k)
        if result.eval_expr_types is not None:
            raw = [r for r in raw if r["expr_type"] in set(result.eval_expr_types)]
        raw.sort(key=lambda r: r["index"])
        per_seed.append(engine.metrics_from_counts(raw).to_dataframe()["IoU"].to_numpy(float))
    return np.mean(per_seed, axis=0)


__all__: Iterable[str] = (
    "COLUMNS", "KEY_COLUMNS", "METRICS", "OrderingCheck", "check_schema", "compare", "headline",
    "load", "load_all", "ordering", "ordering_agrees", "paired_gaps", "reversal_noise",
    "sample_ious", "side_by_side", "tables", "value", "wide",
)
