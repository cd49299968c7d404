"""Dataset statistics for the book's data chapter (paper Table 1 and §3.2).

Everything here works on any dataset that :class:`gres.data.grefer.GRefer` can index: the
synthetic set and the real gRefCOCO (when present) are described by the same functions, so their
tables can be put side by side. All functions return pandas DataFrames (or a dict of numbers).

* :func:`expressions_frame` -- one row per expression: split, ids, text, length, number of targets,
  expression type and (synthetic only) phenomenon.
* :func:`dataset_summary` -- images, instances, expressions, multi-target and no-target counts per
  split (the numbers of paper §3.2: 278,232 expressions, 80,022 multi-target, 32,202 no-target,
  60,287 instances, 19,994 images for gRefCOCO).
* :func:`length_histogram`, :func:`targets_histogram`, :func:`word_frequencies`,
  :func:`phenomenon_table`.
* :func:`text_only_no_target` and :func:`image_independent_rules` -- can the no-target label be
  guessed without looking at the image? A bag-of-words logistic regression (unigrams + bigrams,
  trained on one split, tested on another) and simple rules; a good GRES dataset keeps them near
  chance (balanced accuracy 50%).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import torch

from gres.data.grefer import NO_TARGET_ANN, GRefer

EXPR_TYPES = ("single", "multi", "no-target")
SPLIT_ORDER = ("train", "val", "test", "testA", "testB")


def _refer(source: GRefer | str | os.PathLike, dataset: str = "grefcoco") -> GRefer:
    return source if isinstance(source, GRefer) else GRefer(source, dataset)


def _split_key(s: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s)


def words(sentence: str) -> list[str]:
    """Lower-case word tokens (letters, digits, hyphens)."""
    return re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", sentence.lower())


def expressions_frame(
    source: GRefer | str | os.PathLike, dataset: str = "grefcoco"
) -> pd.DataFrame:
    """One row per expression (sample order of :class:`gres.data.dataset.GRESDataset`).

    Columns: split, ref_id, sent_id, image_id, sentence, n_words, n_targets (0 = no target),
    expr_type ("single" / "multi" / "no-target"), phenomenon and expr_kind (None when the files do
    not carry them, e.g. real gRefCOCO).
    """
    refer = _refer(source, dataset)
    rows = []
    for ref in refer.refs.values():
        nt = ref["ann_id"] == [NO_TARGET_ANN]
        n_t = 0 if nt else len(ref["ann_id"])
        etype = "no-target" if nt else ("multi" if n_t > 1 else "single")
        for s in ref["sentences"]:
            text = s.get("raw") or s["sent"]
            rows.append((ref["split"], int(ref["ref_id"]), int(s["sent_id"]),
                         int(ref["image_id"]), text, len(words(text)), n_t, etype,
                         s.get("phenomenon"), s.get("expr_kind")))
    cols = ["split", "ref_id", "sent_id", "image_id", "sentence", "n_words", "n_targets",
            "expr_type", "phenomenon", "expr_kind"]
    return pd.DataFrame(rows, columns=cols)


def dataset_summary(source: GRefer | str | os.PathLike, dataset: str = "grefcoco") -> pd.DataFrame:
    """Counts per split plus a total row (paper §3.2 / Table 1 style).

    Columns: images, instances (distinct referred annotations), annotations (all annotations of the
    split's images), refs, expressions, single, multi, no-target, multi %, no-target %.
    """
    refer = _refer(source, dataset)
    df = expressions_frame(refer)
    rows = {}
    split_names = sorted(df["split"].unique(), key=_split_key)
    for split in [*split_names, "total"]:
        sub = df if split == "total" else df[df["split"] == split]
        ref_ids = sub["ref_id"].unique()
        image_ids = set(sub["image_id"].unique())
        referred = {a for r in ref_ids for a in refer.refs[int(r)]["ann_id"] if a != NO_TARGET_ANN}
        counts = sub["expr_type"].value_counts()
        n = len(sub)
        rows[split] = {
            "images": len(image_ids),
            "instances": len(referred),
            "annotations": sum(len(refer.img_to_anns.get(int(i), [])) for i in image_ids),
            "refs": len(ref_ids),
            "expressions": n,
            **{t: int(counts.get(t, 0)) for t in EXPR_TYPES},
            "multi %": round(100 * counts.get("multi", 0) / max(n, 1), 1),
            "no-target %": round(100 * counts.get("no-target", 0) / max(n, 1), 1),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def length_histogram(
    source: GRefer | str | os.PathLike | pd.DataFrame,
    by: str = "expr_type",
    tokenizer: Any = None,
    max_len: int | None = None,
) -> pd.DataFrame:
    """Expression-length counts: rows = length, columns = groups of ``by`` (e.g. expr_type, split).

    Length is in words, or in WordPiece tokens including [CLS]/[SEP] when a tokenizer is given
    (the unit of ReLA's 20-token limit). ``max_len`` folds longer lengths into the last row.
    """
    df = source if isinstance(source, pd.DataFrame) else expressions_frame(source)
    if tokenizer is not None:
        n_tok = [len(tokenizer.encode(s, add_special_tokens=True)) for s in df["sentence"]]
        lengths = pd.Series(n_tok, index=df.index)
    else:
        lengths = df["n_words"]
    if max_len is not None:
        lengths = lengths.clip(upper=max_len)
    table = pd.crosstab(lengths.rename("length"), df[by])
    return table.reindex(columns=[c for c in EXPR_TYPES if c in table.columns] or table.columns) \
        if by == "expr_type" else table


def targets_histogram(source: GRefer | str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    """Number of expressions per number of targets (0 = no-target), one column per split."""
    df = source if isinstance(source, pd.DataFrame) else expressions_frame(source)
    table = pd.crosstab(df["n_targets"].rename("targets"), df["split"])
    return table[sorted(table.columns, key=_split_key)]


def word_frequencies(
    source: GRefer | str | os.PathLike | pd.DataFrame, top: int = 30, by: str | None = "expr_type"
) -> pd.DataFrame:
    """The ``top`` most frequent words overall with their count in each group of ``by``.

    Columns: count (all), then one relative-frequency column per group (share of that group's
    words, in percent), so over-represented words of a group stand out.
    """
    df = source if isinstance(source, pd.DataFrame) else expressions_frame(source)
    total: Counter = Counter()
    groups: dict[str, Counter] = {}
    for text, g in zip(df["sentence"], df[by] if by else [None] * len(df)):
        w = words(text)
        total.update(w)
        if by:
            groups.setdefault(g, Counter()).update(w)
    common = [w for w, _ in total.most_common(top)]
    out = pd.DataFrame({"count": [total[w] for w in common]}, index=pd.Index(common, name="word"))
    order = [g for g in EXPR_TYPES if g in groups] if by == "expr_type" else sorted(groups, key=str)
    for g in order:
        n = sum(groups[g].values())
        out[f"% {g}"] = [round(100 * groups[g][w] / max(n, 1), 2) for w in common]
    return out


def phenomenon_table(source: GRefer | str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    """Expressions per phenomenon (rows) and expression type (columns); empty for real data."""
    df = source if isinstance(source, pd.DataFrame) else expressions_frame(source)
    df = df[df["phenomenon"].notna()]
    if df.empty:
        return pd.DataFrame()
    table = pd.crosstab(df["phenomenon"], df["expr_type"], margins=True, margins_name="total")
    return table[[c for c in (*EXPR_TYPES, "total") if c in table.columns]]


# --------------------------------------------------------------------------------------------------
# Can the no-target label be read off the text?
# --------------------------------------------------------------------------------------------------
def _features(sentence: str) -> list[str]:
    w = ["<s>", *words(sentence), "</s>"]
    return w[1:-1] + [f"{a} {b}" for a, b in zip(w[:-1], w[1:])]


def _binary_scores(y: np.ndarray, pred: np.ndarray, score: np.ndarray | None = None) -> dict:
    y, pred = y.astype(bool), pred.astype(bool)
    tpr = (pred & y).sum() / max(y.sum(), 1)
    tnr = (~pred & ~y).sum() / max((~y).sum(), 1)
    out = {"accuracy": float((pred == y).mean()), "balanced_accuracy": float((tpr + tnr) / 2)}
    if score is not None and y.any() and (~y).any():
        ranks = pd.Series(score).rank().to_numpy()  # Mann-Whitney AUC, ties averaged
        out["auc"] = float((ranks[y].sum() - y.sum() * (y.sum() + 1) / 2) / (y.sum() * (~y).sum()))
    return out


def text_only_no_target(
    source: GRefer | str | os.PathLike | pd.DataFrame,
    train_split: str = "train",
    test_split: str = "val",
    min_count: int = 2,
    epochs: int = 20,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> dict[str, float]:
    """Balanced bag-of-words logistic regression: expression text -> no-target?

    Features are binary unigrams and bigrams (with sentence-boundary markers) seen at least
    ``min_count`` times in ``train_split``; classes are weighted to balance, so the 0.5 threshold
    targets balanced accuracy. Trained with Adam on CPU (deterministic for a seed).

    Returns:
        dict with balanced_accuracy, accuracy, auc (on ``test_split``), train_balanced_accuracy,
        n_train, n_test, no_target_rate_test, n_features.
    """
    df = source if isinstance(source, pd.DataFrame) else expressions_frame(source)
    tr, te = df[df["split"] == train_split], df[df["split"] == test_split]
    if tr.empty or te.empty:
        raise ValueError(f"splits {train_split!r}/{test_split!r} need expressions "
                         f"(have {sorted(df['split'].unique())})")
    counts = Counter(f for s in tr["sentence"] for f in set(_features(s)))
    vocab = {f: k for k, f in enumerate(sorted(f for f, c in counts.items() if c >= min_count))}
    pad = len(vocab)  # padding index: a zero row that is never trained

    def encode(sentences: pd.Series) -> torch.Tensor:
        rows = [sorted({vocab[f] for f in _features(s) if f in vocab}) for s in sentences]
        width = max((len(r) for r in rows), default=1) or 1
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return x  # (N, F) feature ids

    x_tr, x_te = encode(tr["sentence"]), encode(te["sentence"])
    y_tr = torch.tensor((tr["expr_type"] == "no-target").to_numpy(), dtype=torch.float32)
    y_te = (te["expr_type"] == "no-target").to_numpy()
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.EmbeddingBag(pad + 1, 1, mode="sum", padding_idx=pad)
    torch.nn.init.zeros_(emb.weight)
    bias = torch.zeros(1, requires_grad=True)
    pos = float(y_tr.sum())
    pos_weight = torch.tensor((len(y_tr) - pos) / max(pos, 1.0))
    opt = torch.optim.Adam([*emb.parameters(), bias], lr=0.05)
    batch = max(32, min(1024, len(y_tr) // 16))  # at least 16 steps per epoch
    for _ in range(epochs):
        perm = torch.randperm(len(y_tr), generator=g)
        for start in range(0, len(y_tr), batch):
            sel = perm[start : start + batch]
            logits = emb(x_tr[sel]).squeeze(1) + bias  # (b,)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, y_tr[sel], pos_weight=pos_weight)
            loss = loss + weight_decay * emb.weight.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()

    def predict(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return (emb(x).squeeze(1) + bias).numpy()

    s_te = predict(x_te)
    s_tr = predict(x_tr)
    out = _binary_scores(y_te, s_te > 0, s_te)
    out["train_balanced_accuracy"] = _binary_scores(y_tr.numpy(), s_tr > 0)["balanced_accuracy"]
    out.update(n_train=len(tr), n_test=len(te), no_target_rate_test=float(y_te.mean()),
               n_features=len(vocab))
    return out


def image_independent_rules(
    source: GRefer | str | os.PathLike | pd.DataFrame,
    train_split: str = "train",
    test_split: str = "val",
    include_text_model: bool = True,
    seed: int = 0,
) -> pd.DataFrame:
    """How well does a guess that never looks at the image predict the no-target label?

    Rules fitted on ``train_split``, scored on ``test_split``: always "target"; always "no-target";
    by expression length (predict no-target for lengths whose train no-target rate is above the
    overall rate); by phenomenon (same, synthetic only); the bag-of-words model of
    :func:`text_only_no_target`. Columns: accuracy, balanced_accuracy (percent).
    """
    df = source if isinstance(source, pd.DataFrame) else expressions_frame(source)
    tr, te = df[df["split"] == train_split], df[df["split"] == test_split]
    y_tr = (tr["expr_type"] == "no-target").to_numpy()
    y_te = (te["expr_type"] == "no-target").to_numpy()
    base = y_tr.mean()
    rows = {
        "always target": _binary_scores(y_te, np.zeros_like(y_te)),
        "always no-target": _binary_scores(y_te, np.ones_like(y_te)),
    }
    for col, name in (("n_words", "by length"), ("phenomenon", "by phenomenon")):
        if tr[col].isna().all():
            continue
        rate = pd.Series(y_tr).groupby(tr[col].to_numpy()).mean()
        flag = (rate > base).to_dict()
        rows[name] = _binary_scores(y_te, np.array([flag.get(v, False) for v in te[col]]))
    if include_text_model:
        r = text_only_no_target(df, train_split, test_split, seed=seed)
        keys = ("accuracy", "balanced_accuracy")
        rows["bag-of-words logistic regression"] = {k: r[k] for k in keys}
    out = pd.DataFrame.from_dict(rows, orient="index")
    return (100 * out).round(1)
