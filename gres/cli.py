"""The ``gres`` command line: ``gres train | eval | predict | convert`` (``gres <cmd> --help``).

Examples::

    gres train --preset tiny-test --data-root data/synthetic-tiny --out runs/tiny
    gres train --preset tiny-test --data-root data/synthetic-tiny --out runs/tiny --resume
    gres train --preset rela-swin-b --data-root datasets --out runs/swin-b --set train.lr=1e-4
    torchrun --nproc_per_node 8 -m gres.cli train --preset rela-swin-b --data-root datasets \\
        --out runs/rela-swin-b
    gres eval --checkpoint runs/tiny --split val
    gres predict --image photo.jpg --expression "the two dogs on the left" \\
        --checkpoint ckpt.safetensors --out overlay.png
    gres convert --official gres_swin_base.pth --preset rela-swin-b --out ours.safetensors

Configs: ``--preset`` names an entry of :data:`gres.config.PRESETS`; ``--set section.field=value``
(repeatable) overrides any field, e.g. ``--set train.max_iters=200 --set model.swin.window_size=7``.
``eval`` and ``predict`` read the config stored with the checkpoint (``config.json`` of its run, or
the safetensors metadata) when there is one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from gres.config import PRESETS, ExperimentConfig, ModelConfig, from_dict


# --------------------------------------------------------------------------------------------------
# Config overrides: --set a.b.c=value
# --------------------------------------------------------------------------------------------------
def _coerce(value: str, current: Any, annotation: str, key: str) -> Any:
    """Turn the text of ``--set`` into the type of the field (guided by its annotation)."""
    import yaml

    text = value.strip()
    ann = str(annotation)
    if "None" in ann and text.lower() in ("none", "null", "~"):
        return None
    if ann.startswith("tuple") or isinstance(current, tuple):
        raw = yaml.safe_load(text if text.startswith("[") else f"[{text}]")
        if not isinstance(raw, list):
            raise ValueError(f"--set {key}: expected a list such as [1, 2], got {value!r}")
        inner = ann[ann.find("[") + 1 :] if "[" in ann else ""
        if inner.startswith("float"):
            return tuple(float(v) for v in raw)
        if inner.startswith("int"):
            return tuple(int(v) for v in raw)
        if inner.startswith("str"):
            return tuple(str(v) for v in raw)
        return tuple(raw)
    base = ann.split("|")[0].strip()
    try:
        if base == "bool" or isinstance(current, bool):
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if base == "int" or (isinstance(current, int) and base not in ("float", "str")):
            return int(float(text)) if "e" in text.lower() else int(text)
        if base == "float" or isinstance(current, float):
            return float(text)
    except ValueError:
        kind = base or type(current).__name__
        raise ValueError(f"--set {key}: cannot parse {value!r} as {kind}") from None
    return text


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """Apply ``section.field=value`` overrides to a (nested, frozen) config dataclass.

    Args:
        cfg: e.g. an :class:`ExperimentConfig`.
        overrides: strings ``"train.lr=1e-4"``, ``"model.swin.depths=[2,2,2,2]"``, ...

    Returns:
        A new config (the input is unchanged).

    Raises:
        ValueError: malformed text, an unknown key (named, with the valid ones), or a value that
            cannot be parsed as the field's type.
    """
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
        key, value = item.split("=", 1)
        cfg = _set_path(cfg, key.strip().split("."), value, key.strip())
    return cfg


def _set_path(obj: Any, path: list[str], value: str, key: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    name = path[0]
    if name not in fields:
        raise ValueError(
            f"--set {key}: unknown config key {name!r} in {type(obj).__name__}; "
            f"valid keys: {sorted(fields)}"
        )
    current = getattr(obj, name)
    if len(path) > 1:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"--set {key}: {name!r} is a value, not a section")
        return dataclasses.replace(obj, **{name: _set_path(current, path[1:], value, key)})
    if dataclasses.is_dataclass(current):
        raise ValueError(f"--set {key}: {name!r} is a section; set one of its fields ({key}.x=...)")
    return dataclasses.replace(obj, **{name: _coerce(value, current, fields[name].type, key)})


def preset_config(name: str) -> ExperimentConfig:
    """``PRESETS[name]()`` with a clear error for unknown names."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name]()


# --------------------------------------------------------------------------------------------------
# Checkpoint resolution for eval / predict
# --------------------------------------------------------------------------------------------------
def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """``(weights_file, run_dir_or_None)`` for a weights file, a checkpoint folder or a run folder.

    Raises:
        FileNotFoundError: nothing usable at ``path``.
    """
    from gres.engine import latest_checkpoint

    p = Path(path)
    if p.is_file():
        run = p.parent if (p.parent / "config.json").is_file() else None
        if run is None and (p.parent.parent.parent / "config.json").is_file():
            run = p.parent.parent.parent  # <run>/checkpoints/iter_X/model.safetensors
        return p, run
    if p.is_dir():
        if (p / "model.safetensors").is_file():  # a checkpoint folder
            run = p.parent.parent if (p.parent.parent / "config.json").is_file() else None
            return p / "model.safetensors", run
        if (p / "model_final.safetensors").is_file():
            return p / "model_final.safetensors", p
        latest = latest_checkpoint(p)
        if latest is not None:
            return latest / "model.safetensors", p
        raise FileNotFoundError(
            f"no model weights in {p} (no model_final.safetensors, no checkpoint)")
    raise FileNotFoundError(f"checkpoint not found: {p}")


def config_for_checkpoint(
    weights: Path, run_dir: Path | None, preset: str | None
) -> ExperimentConfig:
    """The experiment config that goes with ``weights``.

    Order: an explicit ``preset``; the run's ``config.json``; the config stored with the weights
    (an :class:`ExperimentConfig`, or a :class:`ModelConfig` on top of the ``rela-swin-b`` preset).

    Raises:
        ValueError: no preset given and no config stored with the weights.
    """
    from gres.checkpoint import read_config

    if preset is not None:
        return preset_config(preset)
    if run_dir is not None:
        return from_dict(ExperimentConfig, json.loads((run_dir / "config.json").read_text()))
    try:
        stored = read_config(weights)
    except ValueError as exc:
        raise ValueError(f"{exc}; pass --preset NAME to give the architecture") from None
    if isinstance(stored, ModelConfig):
        return dataclasses.replace(preset_config("rela-swin-b"), model=stored)
    return stored


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from gres.engine import train

    cfg = preset_config(args.preset)
    if args.data_root is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=args.data_root))
    cfg = apply_overrides(cfg, args.set)
    result = train(
        cfg,
        args.out,
        resume=args.resume,
        device=args.device,
        progress=not args.no_progress,
        stop_after=args.stop_after,
    )
    from gres.engine import current_dist

    if current_dist().is_main:
        n, s = result.iterations, result.samples_seen
        print(f"trained {n} iterations ({s} samples) -> {args.out}")
        if result.final_weights is not None:
            print(f"final weights: {result.final_weights}")
        if result.final_eval is not None:
            from gres.metrics import format_metrics

            print(f"{cfg.data.val_split}: {format_metrics(result.final_eval.metrics)}")
    return 0


def _load_model(args: argparse.Namespace):
    """Model + config + device for ``eval`` / ``predict``."""
    import torch

    from gres.engine import load_weights, prepare_model, resolve_device

    weights, run_dir = resolve_checkpoint(args.checkpoint)
    cfg = config_for_checkpoint(weights, run_dir, args.preset)
    if getattr(args, "data_root", None) is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=args.data_root))
    cfg = apply_overrides(cfg, args.set)
    device = resolve_device(args.device or cfg.train.device, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # one GPU per process under torchrun
    model = prepare_model(cfg, load_pretrained=False)  # every weight comes from the file
    load_weights(model, weights)
    return model.to(device).eval(), cfg, device, weights, run_dir


def cmd_eval(args: argparse.Namespace) -> int:
    from gres.engine import build_dataset, evaluate, init_distributed
    from gres.metrics import format_metrics

    model, cfg, device, weights, run_dir = _load_model(args)
    info = init_distributed(device)
    dataset = build_dataset(cfg, args.split)
    result = evaluate(
        model,
        dataset,
        device=device,
        batch_size=args.batch_size or cfg.train.eval_batch_size,
        max_samples=args.max_samples,
        num_workers=cfg.data.num_workers,
        progress=not args.no_progress,
        desc=f"eval {args.split}",
    )
    if info.is_main:
        out = Path(args.out) if args.out else (run_dir / "eval" if run_dir else Path("eval"))
        paths = result.save(out, prefix=f"{args.split}_")
        print(f"{args.split} ({result.num_samples} samples, {weights}):")
        print(f"  all        {format_metrics(result.metrics)}")
        for name, m in result.per_type.items():
            print(f"  {name:<10} {format_metrics(m)}")
        print(f"records: {paths['csv']} / {paths['jsonl']}; metrics: {paths['metrics']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from gres.predict import Predictor, save_overlay

    model, cfg, device, _, _ = _load_model(args)
    predictor = Predictor(model, cfg.model, device=device, nt_threshold=args.nt_threshold)
    predictor.set_image(args.image)
    preds = predictor.predict(list(args.expression))
    for p in preds:
        print(
            f"{p.expression!r}: no-target probability {p.nt_prob:.4f} -> "
            f"{'NO TARGET' if p.no_target else f'target ({int(p.mask.sum())} pixels)'}"
        )
    if args.out:
        path = save_overlay(predictor.image, preds, args.out)
        print(f"overlay: {path}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from gres.convert import convert_official_checkpoint

    cfg = apply_overrides(preset_config(args.preset), args.set)
    report = convert_official_checkpoint(
        args.official, cfg, args.out,
        use_stored_lang_weight=args.use_stored_lang_weight, trust_pickle=args.trust_pickle,
    )
    print(report.describe() if hasattr(report, "describe") else report)
    print(f"converted {args.official} -> {args.out} (config: preset {args.preset})")
    return 0


# --------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    presets = ", ".join(sorted(PRESETS))
    parser = argparse.ArgumentParser(
        prog="gres",
        description="GRES / ReLA: train, evaluate, predict on one image, convert official weights.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `gres <command> --help` for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, device: bool = True) -> None:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. train.lr=1e-4 (repeatable)")
        if device:
            p.add_argument("--device", default=None,
                           help="cpu, cuda, cuda:1 ... (default: the config's, auto)")

    p = sub.add_parser("train", help="train a model (torchrun-aware)",
                       description="Train with a preset's recipe (iteration budget from the "
                       "config; under torchrun: DDP).")
    p.add_argument("--preset", required=True, help=f"config preset: {presets}")
    p.add_argument("--data-root", default=None, help="dataset root (default: the preset's)")
    p.add_argument("--out", required=True, help="run folder (config, log, checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop with a checkpoint after N iterations (resume later)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a split",
                       description="Official metrics (gIoU, cIoU, Pr@X, N-acc, T-acc) overall and "
                       "per expression type; per-sample records as CSV and JSONL.")
    p.add_argument("--checkpoint", required=True,
                   help="weights .safetensors, a checkpoint folder or a run folder")
    p.add_argument("--split", default="val", help="split name (default val)")
    p.add_argument("--preset", default=None,
                   help="config preset (default: the checkpoint's run config or metadata)")
    p.add_argument("--data-root", default=None, help="dataset root (default: the config's)")
    p.add_argument("--out", default=None, help="output folder (default <run>/eval or ./eval)")
    p.add_argument("--batch-size", type=int, default=None, help="per-process batch size")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate the first N samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="segment expressions on one image",
                       description="Predict masks for one or more expressions on one image; prints "
                       "the no-target probability and writes an overlay.")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--expression", required=True, action="append",
                   help="referring expression (repeatable)")
    p.add_argument("--checkpoint", required=True,
                   help="weights .safetensors, a checkpoint folder or a run folder")
    p.add_argument("--preset", default=None,
                   help="config preset (default: the checkpoint's run config or metadata)")
    p.add_argument("--out", default=None, help="overlay image to write (.png)")
    p.add_argument("--nt-threshold", type=float, default=None,
                   help="no-target when P(no target) >= this (default: official argmax rule)")
    common(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("convert", help="convert an official ReLA checkpoint",
                       description="Official detectron2 .pth -> our safetensors (gres.convert).")
    p.add_argument("--official", required=True, help="official checkpoint (.pth / .pkl)")
    p.add_argument("--preset", default="rela-swin-b", help=f"target config preset: {presets}")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--use-stored-lang-weight", action="store_true",
                   help="load lang_weight from the file (the official loader leaves it at 0.0)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling of .pkl / non-weights-only files (runs code!)")
    common(p, device=False)
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gres`` console script. Errors print one line and return 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, FloatingPointError) as exc:
        print(f"gres {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
