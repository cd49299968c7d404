"""The experiment runner of the book: one call per configuration trains or loads, evaluates, and
returns a tidy table row (paper §5.2-5.4: Tables 2-7 and Figure 6).

Usage (a notebook cell)::

    from gres import experiments as ex
    base = ex.preset("cpu-small-ablation")
    results = ex.run_table("table2", base, seeds=(0, 1))
    ex.summarize(results)                     # "mean ± std" per metric, one row per variant

What a call does, per seed:

1. **Key.** The run folder is ``outputs/experiments/<cfg.name>-<key>/`` where ``key`` hashes the
   full config (every model, loss, data and training field, the seed included) together with the
   dataset's fingerprint (the sha256 of its ``manifest.json``, or of its annotation files when
   there is no manifest). A changed config or a regenerated dataset never reuses a stale model.
2. **Train or load.** A folder holding ``model_final.safetensors`` and ``result.json`` is loaded; a
   folder holding only checkpoints is resumed (bitwise on CPU, :func:`gres.engine.train`); an empty
   one is trained. ``DataConfig.train_expr_types`` (e.g. single-target only, paper Fig. 6 /
   Table 7) is applied by the engine to the training split.
3. **Evaluate.** The split is evaluated once with the official evaluator
   (:func:`gres.engine.evaluate`) and the per-sample records (pixel counts and no-target
   decisions) are cached beside the model. Every reported number is recomputed from these records
   (:func:`gres.engine.metrics_from_counts`), which makes the other decision rules free:

   * ``nt_rule="head"``: the no-target head decides (ReLA);
   * ``nt_rule="pixels"``: a mask with fewer than ``k`` positive pixels is cleared and counts as a
     no-target prediction (paper §5.3: the one-stage methods of Tables 5/6 and "ReLA-50pix" of
     Table 6, which the paper describes as the trained ReLA *tested* with its no-target classifier
     disabled). The paper's ``k = 50`` at 480x480 is scaled by area: ``k = max(1,
     round(50 (S/480)^2))``, e.g. 2 pixels at S = 96 (:func:`gres.model.variants.min_pixels_for`);
   * ``eval_expr_types``: score a subset of expression types (Table 7: single-target only).
4. **Row.** :class:`ExperimentResult` keeps one row per seed; :meth:`ExperimentResult.row` gives
   mean and standard deviation over seeds (sample std, ``ddof=1``; 0 for one seed) and the train
   wall time. Nothing is reordered or dropped: if a variant beats full ReLA, the table says so.

Budgets are counted in samples (``TrainConfig.max_samples``), never in wall time, so tables are
reproducible on a loaded machine; the wall time of each training is recorded for information.
:func:`train_all` trains the missing configurations of a list in parallel processes (one torch
thread each, the fastest use of a 2-core CPU) so that a chapter can prefetch its whole table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from gres.config import DATASET_PRETRAINED, PRESETS, ExperimentConfig, from_dict, to_dict

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = ROOT / "outputs" / "experiments"
"""Where runs are cached (``outputs/`` is git-ignored)."""

NT_RULES = ("head", "pixels")
METRICS = ("gIoU", "cIoU", "Pr@0.7", "Pr@0.8", "Pr@0.9", "N-acc", "T-acc")
EXPR_NAMES = ("single", "multi", "no-target")  # expr_type 0, 1, 2 (data contract)
RESULT_FILE = "result.json"
FINAL_WEIGHTS = "model_final.safetensors"


# --------------------------------------------------------------------------------------------------
# Configs, paths and keys
# --------------------------------------------------------------------------------------------------
def preset(name: str) -> ExperimentConfig:
    """``PRESETS[name]()`` with a helpful error."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()


def replace(cfg: ExperimentConfig, **sections: dict[str, Any]) -> ExperimentConfig:
    """Nested :func:`dataclasses.replace`: ``replace(cfg, model={"rla_mode": "product"},
    decoder={"region_grid": 4}, train={"seed": 1}, name="x")``.

    Section keys: ``model``, ``swin``, ``text``, ``pixel_decoder``, ``decoder`` (all under
    ``cfg.model``), ``loss``, ``data``, ``train``, ``pretrain``; ``name`` replaces the name.
    """
    model_parts = ("swin", "text", "pixel_decoder", "decoder")
    unknown = set(sections) - {"model", "loss", "data", "train", "pretrain", "name", *model_parts}
    if unknown:
        raise ValueError(f"replace: unknown sections {sorted(unknown)}")
    model = cfg.model
    for part in model_parts:
        if part in sections:
            model = dataclasses.replace(model, **{part: dataclasses.replace(
                getattr(model, part), **sections[part])})
    if "model" in sections:
        model = dataclasses.replace(model, **sections["model"])
    out = dataclasses.replace(cfg, model=model)
    for part in ("loss", "data", "train", "pretrain"):
        if part in sections:
            out = dataclasses.replace(out, **{part: dataclasses.replace(
                getattr(out, part), **sections[part])})
    if "name" in sections:
        out = dataclasses.replace(out, name=sections["name"])
    return out


def book_config(name: str, *, dataset: str | None = None, data_root: str | os.PathLike | None = None,
                device: str | None = None) -> ExperimentConfig:
    """The preset ``name`` with a chapter's ``dataset`` / ``data_root`` / ``device`` parameters
    applied (None = keep the preset's). A ``data_root`` naming the preset's own folder (e.g.
    ``../data/synthetic`` from ``book/``) leaves the config unchanged, so every chapter and the
    book's training step share one cache key."""
    cfg = preset(name)
    if dataset is not None and dataset != cfg.data.dataset:
        cfg = replace(cfg, data={"dataset": dataset})
    if data_root is not None and resolve_data_root(data_root) != resolve_data_root(cfg.data.root):
        cfg = replace(cfg, data={"root": data_root})
    if device is not None:
        cfg = replace(cfg, train={"device": device})
    return cfg


def with_seed(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    """The same experiment with ``train.seed = seed`` (model init, data order, everything)."""
    return replace(cfg, train={"seed": int(seed)})


def resolve_data_root(root: str | os.PathLike) -> Path:
    """Absolute data root: as given if it exists from the working directory, else relative to the
    repository (notebooks run from ``book/``)."""
    path = Path(root)
    if path.is_absolute() or path.exists():
        return path.resolve()
    return (ROOT / path).resolve()


_FINGERPRINTS: dict[tuple[str, int, int], str] = {}


def _file_sha(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FINGERPRINTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _FINGERPRINTS[key] = h.hexdigest()
    return _FINGERPRINTS[key]


def dataset_fingerprint(cfg: ExperimentConfig) -> str:
    """sha256 identifying the dataset a config trains on.

    The synthetic generator writes ``<root>/manifest.json`` (generator config, seed, counts and
    file hashes), so its sha256 identifies the data; without a manifest (real gRefCOCO) the
    annotation files (``<root>/<folder>/*.json|*.p``) are hashed, once per process and file.

    Raises:
        FileNotFoundError: the data root or its annotations do not exist.
    """
    root = resolve_data_root(cfg.data.root)
    manifest = root / "manifest.json"
    if manifest.is_file():
        return _file_sha(manifest)
    folder = root / ("grefcoco" if cfg.data.dataset == "synthetic" else cfg.data.dataset)
    files = sorted(p for p in folder.glob("*") if p.suffix in (".json", ".p")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"no dataset at {root}: neither {manifest} nor annotation files under {folder} "
            "(generate the synthetic set with: python data_prep/make_synthetic.py)"
        )
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + _file_sha(p).encode())
    return h.hexdigest()


def experiment_key(cfg: ExperimentConfig, length: int = 10) -> str:
    """Hash of the full config (name excluded, seed included) and the dataset fingerprint."""
    body = to_dict(cfg)
    body.pop("name", None)
    blob = json.dumps({"config": body, "data": dataset_fingerprint(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def run_dir(cfg: ExperimentConfig, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<cfg.name>-<key>`` (default root ``outputs/experiments`` of the repository)."""
    return Path(root or DEFAULT_ROOT) / f"{cfg.name}-{experiment_key(cfg)}"


def init_description(cfg: ExperimentConfig) -> str:
    """How the config's encoders start, as a phrase for the book's prose ("trained {phrase}")."""
    swin, text = cfg.model.swin.pretrained, cfg.model.text.name_or_path
    if swin is None and text is None:
        return "from scratch (no ImageNet or BERT weights)"
    if swin == DATASET_PRETRAINED:
        image = ("from a Swin pretrained on the object categories of the training images (no "
                 "ImageNet; chapter 5)")
        if cfg.train.backbone_lr_factor == 0:
            image += " whose pretrained weights stay frozen"
    elif swin is None:
        image = "from a randomly initialised Swin"
    else:
        image = f"from the Swin weights {swin}"
    if text is None:
        return f"{image} and a text encoder trained from scratch (no BERT weights)"
    return f"{image} and the text encoder {text}"


def pretrain_root(root: str | os.PathLike | None = None) -> Path:
    """Cache of pretrained backbones (:mod:`gres.pretrain`): ``<root>/_pretrained``."""
    return Path(root if root is not None else DEFAULT_ROOT) / "_pretrained"


def pretrained_backbone(cfg: ExperimentConfig, root: str | os.PathLike | None = None, *,
                        train: bool = True, progress: bool = False) -> dict[str, Any] | None:
    """The record (``pretrain.json``: recipe, validation curve, wall time) of the backbone that
    ``cfg`` starts from when it is pretrained on the dataset (:mod:`gres.pretrain`), pretraining
    it first if it is not cached and ``train`` is set; ``None`` for configs without dataset
    pretraining (or when it is missing and ``train`` is False)."""
    from gres.pretrain import pretrain_backbone, pretrain_dir, uses_dataset_pretraining

    if not uses_dataset_pretraining(cfg):
        return None
    runnable = _runnable(cfg)
    if train:
        pretrain_backbone(runnable, pretrain_root(root), progress=progress, verbose=False)
    path = pretrain_dir(runnable, pretrain_root(root)) / "pretrain.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _runnable(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config handed to the engine: data root made absolute (the key uses the original)."""
    return replace(cfg, data={"root": str(resolve_data_root(cfg.data.root))})


# --------------------------------------------------------------------------------------------------
# Train or load
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainedRun:
    """A finished training run on disk.

    Attributes:
        cfg: the experiment config (data root as given, not resolved).
        dir: the run folder.
        info: ``result.json``: iterations, samples, wall seconds, samples/s, threads, when.
        loaded: True when nothing was trained by this call.
    """

    cfg: ExperimentConfig
    dir: Path
    info: dict[str, Any]
    loaded: bool

    @property
    def weights(self) -> Path:
        return self.dir / FINAL_WEIGHTS

    def model(self, device: str = "cpu") -> torch.nn.Module:
        """The trained model (eval mode) built from the config and its final weights."""
        from gres.engine import load_weights, prepare_model

        model = prepare_model(self.cfg, load_pretrained=False)  # every weight is in the file
        load_weights(model, self.weights)
        return model.to(device).eval()

    def curve(self) -> Any:
        """The training log as a DataFrame (see :func:`learning_curve`)."""
        return learning_curve(self)


def is_trained(cfg: ExperimentConfig, root: str | os.PathLike | None = None) -> bool:
    """True when the run folder of ``cfg`` holds final weights and ``result.json``."""
    d = run_dir(cfg, root)
    return (d / FINAL_WEIGHTS).is_file() and (d / RESULT_FILE).is_file()


def train_or_load(
    cfg: ExperimentConfig,
    *,
    root: str | os.PathLike | None = None,
    retrain: bool = False,
    progress: bool = True,
    verbose: bool = True,
) -> TrainedRun:
    """Load the finished run of ``cfg`` or train it (resuming an interrupted one).

    Args:
        cfg: the experiment config (one seed).
        root: cache folder (default ``outputs/experiments``).
        retrain: delete the cached run and train again.
        progress: tqdm bars while training.
        verbose: print a "loaded from" / "trained in" line.

    Returns:
        :class:`TrainedRun`.
    """
    from gres import engine

    d = run_dir(cfg, root)
    if retrain and d.exists():
        import shutil

        shutil.rmtree(d)
    if is_trained(cfg, root):
        info = json.loads((d / RESULT_FILE).read_text())
        if verbose:
            print(f"[experiments] loaded {cfg.name} (seed {cfg.train.seed}) from {d}")
        return TrainedRun(cfg=cfg, dir=d, info=info, loaded=True)

    run_cfg = _runnable(cfg)
    resume = engine.latest_checkpoint(d) is not None
    previous = json.loads((d / "partial.json").read_text()) if (d / "partial.json").is_file() else {}
    d.mkdir(parents=True, exist_ok=True)
    (d / "experiment.json").write_text(json.dumps(
        {"config": to_dict(cfg), "key": experiment_key(cfg),
         "dataset_fingerprint": dataset_fingerprint(cfg)}, indent=1))
    t0 = time.time()
    result = engine.train(run_cfg, d, resume=resume, progress=progress,
                          pretrain_root=pretrain_root(root))
    seconds = previous.get("seconds", 0.0) + (time.time() - t0)
    if result.final_weights is None:  # interrupted (stop_after) -- keep the partial wall time
        (d / "partial.json").write_text(json.dumps({"seconds": seconds}))
        raise RuntimeError(f"training of {cfg.name} stopped before its budget ({d})")
    samples = result.samples_seen
    info = {
        "name": cfg.name,
        "seed": cfg.train.seed,
        "iterations": result.iterations,
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": (samples - result.resumed_from * cfg.train.batch_size)
        / max(time.time() - t0, 1e-9),
        "resumed_from": result.resumed_from,
        "torch_threads": torch.get_num_threads(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "num_parameters": None,
    }
    try:
        from gres.engine import prepare_model

        model = prepare_model(run_cfg, load_pretrained=False)
        info["num_parameters"] = int(sum(p.numel() for p in model.parameters()))
    except Exception:  # noqa: BLE001 -- reporting only
        pass
    (d / RESULT_FILE).write_text(json.dumps(info, indent=1))
    if (d / "partial.json").exists():
        (d / "partial.json").unlink()
    if verbose:
        print(f"[experiments] trained {cfg.name} (seed {cfg.train.seed}): {samples} samples in "
              f"{seconds / 60:.1f} min -> {d}")
    return TrainedRun(cfg=cfg, dir=d, info=info, loaded=False)


# --------------------------------------------------------------------------------------------------
# Evaluation from cached per-sample records
# --------------------------------------------------------------------------------------------------
def _records_path(run: TrainedRun, split: str) -> Path:
    return run.dir / "eval" / f"{split}_records.jsonl"


def eval_records(
    run: TrainedRun,
    split: str | None = None,
    *,
    max_samples: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Per-sample records of ``run`` on ``split`` (cached in ``<run>/eval/<split>_records.jsonl``).

    The engine's end-of-training evaluation already wrote them for the validation split when
    ``eval_every > 0``; otherwise the model is loaded and evaluated once.
    """
    from gres import engine

    split = split or run.cfg.data.val_split
    suffix = "" if max_samples is None else f"_first{max_samples}"
    path = run.dir / "eval" / f"{split}{suffix}_records.jsonl"
    if not path.is_file():
        run_cfg = _runnable(run.cfg)
        dataset = engine.build_dataset(run_cfg, split)
        ev = engine.evaluate(run.model(), dataset,
                             batch_size=batch_size or run_cfg.train.eval_batch_size,
                             max_samples=max_samples, progress=progress, desc=f"eval {split}")
        ev.save(run.dir / "eval", prefix=f"{split}{suffix}_")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def apply_nt_rule(records: Sequence[dict[str, Any]], rule: str, min_pixels: int) -> list[dict]:
    """Records as the metrics need them, with the no-target decision of ``rule``.

    ``"head"`` keeps the model's decision. ``"pixels"`` ignores the no-target head: a predicted
    mask with fewer than ``min_pixels`` positive pixels is cleared (area 0) and counts as a
    no-target prediction, any other mask as a target prediction (paper §5.3).
    """
    if rule not in NT_RULES:
        raise ValueError(f"nt_rule must be one of {NT_RULES}, got {rule!r}")
    out = []
    for r in records:
        etype = r["expr_type"]
        raw = {"index": r["index"], "gt_nt": bool(r["gt_nt"]), "pred_nt": bool(r["pred_nt"]),
               "mask_I": int(r["mask_I"]), "pred_area": int(r["pred_area"]),
               "gt_area": int(r["gt_area"]),
               "expr_type": EXPR_NAMES.index(etype) if isinstance(etype, str) else int(etype)}
        if rule == "pixels":
            cleared = raw["pred_area"] < min_pixels
            raw["pred_nt"] = cleared
            if cleared:
                raw["pred_area"], raw["mask_I"] = 0, 0
        out.append(raw)
    return out


def score(
    records: Sequence[dict[str, Any]],
    *,
    nt_rule: str = "head",
    min_pixels: int = 1,
    expr_types: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Official metrics (percent) of cached records under a no-target rule and a type filter.

    Returns:
        ``{"gIoU", "cIoU", "Pr@0.7", "Pr@0.8", "Pr@0.9", "N-acc", "T-acc", "num_samples",
        "per_type": {"single": {...}, ...}}``.
    """
    from gres.engine import metrics_from_counts

    raw = apply_nt_rule(records, nt_rule, min_pixels)
    if expr_types is not None:
        raw = [r for r in raw if r["expr_type"] in set(expr_types)]
    if not raw:
        raise ValueError(f"no evaluated sample of expression types {expr_types}")
    m = metrics_from_counts(raw)
    out: dict[str, Any] = dict(m.compute())
    out["num_samples"] = len(raw)
    present = {r["expr_type"] for r in raw}
    out["per_type"] = {k: v for i, (k, v) in enumerate(m.compute_by_type().items()) if i in present}
    return out


# --------------------------------------------------------------------------------------------------
# One configuration, several seeds
# --------------------------------------------------------------------------------------------------
@dataclass
class ExperimentResult:
    """Results of one configuration over seeds.

    Attributes:
        label: row label (e.g. "Hard split, input").
        cfg: the config of the first seed.
        per_seed: one dict per seed: the metrics, the per-type gIoU, train info.
        runs: the trained runs (load models with ``runs[i].model()``).
        nt_rule, eval_expr_types, split: how it was scored.
    """

    label: str
    cfg: ExperimentConfig
    per_seed: list[dict[str, Any]]
    runs: list[TrainedRun]
    nt_rule: str = "head"
    eval_expr_types: tuple[int, ...] | None = None
    split: str = "val"
    note: str = ""

    def frame(self) -> Any:
        """Per-seed DataFrame (one row per seed)."""
        import pandas as pd

        return pd.DataFrame(self.per_seed)

    def row(self, metrics: Sequence[str] = METRICS) -> dict[str, Any]:
        """Tidy row: ``<metric>`` = mean over seeds, ``<metric>_std`` = sample std (0 if 1 seed)."""
        out: dict[str, Any] = {"label": self.label, "config": self.cfg.name,
                               "n_seeds": len(self.per_seed), "split": self.split,
                               "nt_rule": self.nt_rule}
        for m in metrics:
            values = np.array([s[m] for s in self.per_seed], dtype=float)
            out[m] = float(np.mean(values))
            out[f"{m}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        out["train_samples"] = int(self.per_seed[0]["train_samples"])
        out["train_minutes"] = float(np.mean([s["train_minutes"] for s in self.per_seed]))
        out["num_samples"] = int(self.per_seed[0]["num_samples"])
        if self.note:
            out["note"] = self.note
        return out


def run(
    cfg: ExperimentConfig,
    *,
    label: str | None = None,
    seeds: Sequence[int] = (0,),
    split: str | None = None,
    nt_rule: str = "head",
    min_pixels: int | None = None,
    eval_expr_types: Sequence[int] | None = None,
    eval_max_samples: int | None = None,
    root: str | os.PathLike | None = None,
    retrain: bool = False,
    progress: bool = True,
    verbose: bool = True,
    note: str = "",
) -> ExperimentResult:
    """Train (or load) ``cfg`` for every seed, evaluate, and collect the rows.

    Args:
        cfg: the experiment config; ``cfg.train.seed`` is replaced by each of ``seeds``.
        label: row label (default ``cfg.name``).
        seeds: training seeds.
        split: evaluation split (default ``cfg.data.val_split``).
        nt_rule: ``"head"`` or ``"pixels"`` (see the module docstring).
        min_pixels: pixel-rule threshold (default: the paper's 50 scaled to the image size).
        eval_expr_types: score only these expression types (0 single, 1 multi, 2 no-target).
        eval_max_samples: evaluate the first N samples only (smoke runs).
        root: cache folder.
        retrain: retrain even if cached.
        progress, verbose: printing.
        note: free text carried into the row.

    Returns:
        :class:`ExperimentResult`.
    """
    from gres.model.variants import min_pixels_for

    if min_pixels is None:
        min_pixels = min_pixels_for(cfg.model.image_size)
    split = split or cfg.data.val_split
    per_seed, runs = [], []
    for seed in seeds:
        seeded = with_seed(cfg, seed)
        tr = train_or_load(seeded, root=root, retrain=retrain, progress=progress, verbose=verbose)
        recs = eval_records(tr, split, max_samples=eval_max_samples, progress=progress)
        s = score(recs, nt_rule=nt_rule, min_pixels=min_pixels, expr_types=eval_expr_types)
        row = {"seed": int(seed), **{m: s[m] for m in METRICS}, "num_samples": s["num_samples"],
               "train_samples": tr.info["samples"], "train_minutes": tr.info["seconds"] / 60,
               "samples_per_s": tr.info.get("samples_per_s"), "run_dir": str(tr.dir)}
        for kind, vals in s["per_type"].items():
            row[f"gIoU[{kind}]"] = vals["gIoU"]
            row[f"cIoU[{kind}]"] = vals["cIoU"]
        per_seed.append(row)
        runs.append(tr)
    return ExperimentResult(label=label or cfg.name, cfg=cfg, per_seed=per_seed, runs=runs,
                            nt_rule=nt_rule, split=split, note=note,
                            eval_expr_types=None if eval_expr_types is None
                            else tuple(eval_expr_types))


def summarize(
    results: Iterable[ExperimentResult],
    metrics: Sequence[str] = ("gIoU", "cIoU", "Pr@0.7", "Pr@0.8", "Pr@0.9", "N-acc", "T-acc"),
    digits: int = 1,
) -> Any:
    """A display table: one row per result, each metric as ``"mean ± std"`` (``"mean"`` for one
    seed), plus the train budget and wall time. Row order is the input order (never sorted)."""
    import pandas as pd

    rows = []
    for r in results:
        row = r.row(metrics)
        shown: dict[str, Any] = {"method": row["label"]}
        for m in metrics:
            if row["n_seeds"] > 1:
                shown[m] = f"{row[m]:.{digits}f} ± {row[f'{m}_std']:.{digits}f}"
            else:
                shown[m] = f"{row[m]:.{digits}f}"
        shown["seeds"] = row["n_seeds"]
        shown["train samples"] = row["train_samples"]
        shown["train min"] = round(row["train_minutes"], 1)
        rows.append(shown)
    return pd.DataFrame(rows).set_index("method")


def tidy(results: Iterable[ExperimentResult], metrics: Sequence[str] = METRICS) -> Any:
    """Long table (method, metric, mean, std, n_seeds) for :func:`gres.paper.compare`."""
    import pandas as pd

    rows = []
    for r in results:
        row = r.row(metrics)
        for m in metrics:
            rows.append({"method": row["label"], "metric": m, "value": row[m],
                         "std": row[f"{m}_std"], "n_seeds": row["n_seeds"], "split": row["split"]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# The paper's tables as lists of configurations
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """One row of a reproduced table.

    Attributes:
        label: our row label.
        cfg: what to train (configs that are equal train once, whatever their label).
        paper_method: the row's ``method`` in ``paper_results/tableN.csv`` (None: no paper row).
        nt_rule: ``"head"`` or ``"pixels"``.
        eval_expr_types: score only these expression types (None = all).
        note: how our row realises the paper's.
    """

    label: str
    cfg: ExperimentConfig
    paper_method: str | None = None
    nt_rule: str = "head"
    eval_expr_types: tuple[int, ...] | None = None
    note: str = ""


TABLES = ("table2", "table3", "table4", "table5", "table6", "table7", "figure6")


def table_specs(table: str, base: ExperimentConfig, *,
                onestage_swin_trained: bool = False) -> list[Spec]:
    """The rows of one paper table built on ``base`` (full ReLA), in the paper's row order.

    * ``table2`` (RIA design) and ``table3`` (RLA design), ``table4`` (P in 4, 8, 10, 12): use the
      ablation preset; full ReLA is the same config in the three tables, so it trains once.
    * ``table5`` / ``table6``: the LAVT-style one-stage baseline (pixel rule), ReLA-50pix (the
      trained ReLA scored with the pixel rule, Table 6 only) and ReLA. With
      ``onestage_swin_trained`` and a ``base`` that slows or freezes its pretrained Swin
      (``train.backbone_lr_factor != 1``), the one-stage baseline is also trained with the Swin
      at the full learning rate (a row without paper counterpart; off by default: one more
      training would take the book's trainings past their 60 minutes, bench/RESULTS.md
      "Session 8").
    * ``table7`` (classic RES): ReLA and the one-stage baseline trained on single-target
      expressions only, cIoU on the single-target expressions of the split.
    * ``figure6``: ReLA trained on single-target expressions vs on everything, scored on all
      expression types (the book shows their predictions side by side).
    """
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; expected one of {TABLES}")
    name = base.name
    P = base.model.decoder.region_grid
    onestage = replace(base, model={"head": "onestage"},
                       loss={"region_weight": 0.0, "no_target_weight": 0.0},
                       name=f"{name}-onestage")
    single = {"train_expr_types": (0,)}
    if table == "table2":
        return [
            Spec("Hard split, input", replace(base, model={"ria_mode": "hard_split_input"},
                                              name=f"{name}-hard-input"), "Hard split, input",
                 note="image cut into G x G patches, each encoded alone (G = "
                      f"{_hard_grid(base)}: no patch smaller than one attention window); "
                      "regions pooled as in #2"),
            Spec("Hard split, decoder", replace(base, model={"ria_mode": "hard_split_decoder"},
                                                name=f"{name}-hard-decoder"),
                 "Hard split, decoder", note="RIA attention replaced by P x P average pooling"),
            Spec("w/o minimap", replace(base, loss={"region_weight": 0.0},
                                        name=f"{name}-no-minimap"), "w/o minimap",
                 note="minimap loss weight 0: the queries are plain learnable queries"),
            Spec("ReLA", base, "ReLA"),
        ]
    if table == "table3":
        return [
            Spec("Baseline", replace(base, model={"rla_mode": "product"},
                                     name=f"{name}-rla-product"), "Baseline",
                 note="RLA replaced by region features x mean language feature"),
            Spec("+ language att.", replace(base, model={"rla_mode": "product+lang"},
                                            name=f"{name}-rla-lang"), "+ language att."),
            Spec("+ region att.", replace(base, model={"rla_mode": "product+region"},
                                          name=f"{name}-rla-region"), "+ region att."),
            Spec("ReLA", base, "ReLA"),
        ]
    if table == "table4":
        rows = []
        for grid in (4, 8, 10, 12):
            cfg = base if grid == P else replace(base, decoder={"region_grid": grid},
                                                  name=f"{name}-P{grid}")
            rows.append(Spec(f"{grid}x{grid}", cfg, f"{grid}x{grid}"))
        return rows
    if table in ("table5", "table6"):
        rows = [Spec("LAVT-style one-stage", onestage, "LAVT", nt_rule="pixels",
                     note="same backbone, LAVT head, no-target = fewer than "
                          f"{_min_pixels(base)} positive pixels (50 at 480 px, scaled by area)")]
        if onestage_swin_trained and base.train.backbone_lr_factor != 1.0:
            # The one-stage model did better with its pretrained Swin trained (bench/RESULTS.md
            # "Session 7"): the baseline with that recipe (no paper row).
            rows.append(Spec("LAVT-style one-stage, Swin trained",
                             replace(onestage, train={"backbone_lr_factor": 1.0},
                                     name=f"{name}-onestage-swin-trained"),
                             nt_rule="pixels",
                             note="as the row above, with the pretrained Swin weights trained at "
                                  "the learning rate"))
        if table == "table6":
            rows.append(Spec("ReLA-50pix", base, "ReLA-50pix", nt_rule="pixels",
                             note="the trained ReLA, no-target head disabled at test time"))
        rows.append(Spec("ReLA", base, "ReLA"))
        return rows
    if table == "table7":
        return [
            Spec("LAVT-style one-stage", replace(onestage, data=single,
                                                 name=f"{name}-onestage-single"),
                 "LAVT", nt_rule="pixels", eval_expr_types=(0,),
                 note="trained and scored on single-target expressions only"),
            Spec("ReLA", replace(base, data=single, name=f"{name}-single"), "ReLA",
                 eval_expr_types=(0,), note="trained and scored on single-target expressions only"),
        ]
    return [  # figure6
        Spec("ReLA trained on single-target only", replace(base, data=single,
                                                           name=f"{name}-single"),
             note="classic RES training, scored on every expression type"),
        Spec("ReLA trained on GRES", base),
    ]


def _hard_grid(cfg: ExperimentConfig) -> int:
    from gres.model.variants import hard_split_grid

    return hard_split_grid(cfg.model)


def _min_pixels(cfg: ExperimentConfig) -> int:
    from gres.model.variants import min_pixels_for

    return min_pixels_for(cfg.model.image_size)


def book_specs(main: ExperimentConfig, ablation: ExperimentConfig) -> dict[str, list[Spec]]:
    """Every table of the book: Tables 2-4 on ``ablation``, the rest on ``main``."""
    return {t: table_specs(t, ablation if t in ("table2", "table3", "table4") else main)
            for t in TABLES}


def unique_configs(specs: Iterable[Spec]) -> list[ExperimentConfig]:
    """The distinct configurations behind ``specs`` (what must be trained), in first-use order."""
    seen: dict[str, ExperimentConfig] = {}
    for s in specs:
        key = json.dumps(to_dict(s.cfg), sort_keys=True)
        seen.setdefault(key, s.cfg)
    return list(seen.values())


def run_specs(
    specs: Sequence[Spec],
    *,
    seeds: Sequence[int] = (0,),
    workers: int = 1,
    root: str | os.PathLike | None = None,
    progress: bool = True,
    verbose: bool = True,
    eval_max_samples: int | None = None,
) -> list[ExperimentResult]:
    """Train (``workers`` > 1: in parallel processes) and evaluate every row of ``specs``."""
    if workers > 1:
        train_all([with_seed(c, s) for c in unique_configs(specs) for s in seeds],
                  workers=workers, root=root, verbose=verbose)
    return [run(s.cfg, label=s.label, seeds=seeds, nt_rule=s.nt_rule,
                eval_expr_types=s.eval_expr_types, root=root, progress=progress,
                verbose=verbose, note=s.note, eval_max_samples=eval_max_samples)
            for s in specs]


def run_table(table: str, base: ExperimentConfig, **kwargs: Any) -> list[ExperimentResult]:
    """:func:`run_specs` of :func:`table_specs` (keyword arguments as :func:`run_specs`)."""
    return run_specs(table_specs(table, base), **kwargs)


def paper_frame(results: Sequence[ExperimentResult], specs: Sequence[Spec],
                metrics: Sequence[str] = METRICS) -> Any:
    """Long table (method = the paper's row name, split, metric, ours, std) for
    :func:`gres.paper.compare`; rows without a paper counterpart are left out."""
    import pandas as pd

    rows = []
    for r, s in zip(results, specs):
        if s.paper_method is None:
            continue
        row = r.row(metrics)
        for m in metrics:
            rows.append({"method": s.paper_method, "split": r.split, "metric": m,
                         "ours": row[m], "std": row[f"{m}_std"], "n_seeds": row["n_seeds"]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Learning curves
# --------------------------------------------------------------------------------------------------
def learning_curve(run: TrainedRun | str | os.PathLike) -> Any:
    """The engine log of a run as a DataFrame: one row per record, ``kind`` = train / eval.

    Train rows carry ``loss``, ``loss_mask``, ``loss_region``, ``loss_nt`` (``loss_dice`` when
    the Dice term is on, ``loss_aux`` with deep supervision), ``lr``, ``grad_norm`` and
    ``samples_per_s``; eval rows the seven metrics on the (possibly capped) validation split.
    """
    import pandas as pd

    from gres.engine import read_log

    d = run.dir if isinstance(run, TrainedRun) else Path(run)
    return pd.DataFrame(read_log(d))


def export_curves(results: Iterable[ExperimentResult], out_dir: str | os.PathLike) -> list[Path]:
    """Write ``<out_dir>/<config>-seed<k>.csv`` learning curves (small: eval points and train
    logs only) for every run of ``results``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in results:
        for tr in r.runs:
            df = learning_curve(tr)
            keep = [c for c in ("kind", "iter", "samples", "lr", "loss", "loss_mask", "loss_region",
                                "loss_nt", "loss_dice", "loss_aux", "grad_norm", "samples_per_s",
                                *METRICS, "num_samples", "final") if c in df.columns]
            path = out / f"{tr.cfg.name}-seed{tr.cfg.train.seed}.csv"
            df[keep].to_csv(path, index=False, float_format="%.5g")
            paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# Parallel training of many configurations (one process per run, one torch thread each)
# --------------------------------------------------------------------------------------------------
def train_all(
    cfgs: Sequence[ExperimentConfig],
    *,
    workers: int = 2,
    threads: int = 1,
    root: str | os.PathLike | None = None,
    verbose: bool = True,
) -> list[Path]:
    """Train every config of ``cfgs`` that is not cached yet, ``workers`` processes at a time.

    Each process runs ``python -m gres.experiments train <config.json>`` with ``threads`` torch
    threads (``OMP_NUM_THREADS``). On a 2-core machine two 1-thread processes give about 1.8x the
    samples/s of one (the measured numbers are in ``bench/RESULTS.md``), and a busy machine does
    not collapse them the way it collapses a 2-thread process. Duplicated configs train once.

    Returns:
        The run folders, in input order.

    Raises:
        RuntimeError: a training process failed (its log is ``<run>/train_stdout.log``).
    """
    dirs = [run_dir(c, root) for c in cfgs]
    todo: dict[Path, ExperimentConfig] = {}
    for c, d in zip(cfgs, dirs):
        if not is_trained(c, root) and d not in todo:
            todo[d] = c
    if not todo:
        return dirs
    # Backbones pretrained on the dataset (gres.pretrain) first, once each, with all the threads:
    # the parallel trainings then load them from the cache instead of waiting on each other.
    from gres.pretrain import pretrain_backbone, pretrain_dir, uses_dataset_pretraining

    shared = {pretrain_dir(_runnable(c), pretrain_root(root)): c
              for c in todo.values() if uses_dataset_pretraining(c)}
    if shared:
        before = torch.get_num_threads()
        torch.set_num_threads(max(1, workers * threads))
        try:
            for c in shared.values():
                pretrain_backbone(_runnable(c), pretrain_root(root), verbose=verbose)
        finally:
            torch.set_num_threads(before)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # longest budgets first (better packing of the parallel slots)
    queue = sorted(todo.items(), key=lambda kv: -(kv[1].train.max_samples
                                                  or kv[1].train.max_iters * kv[1].train.batch_size))
    running: list[tuple[subprocess.Popen, Path, float, Any]] = []
    failed: list[Path] = []
    while queue or running:
        while queue and len(running) < max(1, workers):
            d, c = queue.pop(0)
            d.mkdir(parents=True, exist_ok=True)
            cfg_path = d / "request.json"
            cfg_path.write_text(json.dumps(to_dict(c), indent=1))
            log = open(d / "train_stdout.log", "a")
            cmd = [sys.executable, "-m", "gres.experiments", "train", str(cfg_path),
                   "--threads", str(threads)]
            if root is not None:
                cmd += ["--root", str(root)]
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((proc, d, time.time(), log))
            if verbose:
                print(f"[experiments] training {c.name} (seed {c.train.seed}) in pid {proc.pid}")
        time.sleep(2.0)
        for item in list(running):
            proc, d, t0, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode != 0:
                failed.append(d)
            if verbose:
                status = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
                print(f"[experiments] {d.name}: {status} after {(time.time() - t0) / 60:.1f} min")
    if failed:
        raise RuntimeError(f"training failed for {[str(f) for f in failed]}; see train_stdout.log")
    return dirs


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m gres.experiments")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_train = sub.add_parser("train", help="train-or-load one config (JSON from to_dict)")
    p_train.add_argument("config")
    p_train.add_argument("--root", default=None)
    p_train.add_argument("--threads", type=int, default=1)
    p_train.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = from_dict(ExperimentConfig, json.loads(Path(args.config).read_text()))
    train_or_load(cfg, root=args.root, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
