"""Our checkpoint format: safetensors weights plus the config as JSON beside them.

``save_model(model, cfg, "run/model.safetensors")`` writes

* ``run/model.safetensors``: every ``state_dict`` tensor under our key names (the config is also
  stored in the file's metadata under ``"config"``, so a lone file stays self-describing);
* ``run/model.safetensors.json``: ``{"format": "gres-checkpoint", "version": 1, "kind":
  "ModelConfig" | "ExperimentConfig", "config": {...}}``.

Both files are written atomically (temporary file + ``os.replace``). ``load_model(path)`` rebuilds
the architecture from the config (no pretrained download: all weights come from the file) and
loads strictly; a file that does not fit the config raises ``ValueError`` naming the missing and
unexpected keys and the mismatched shapes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from gres.config import ExperimentConfig, ModelConfig, from_dict, to_dict

FORMAT = "gres-checkpoint"
VERSION = 1


# --------------------------------------------------------------------------------------------------
# Comparing a state dict with a model
# --------------------------------------------------------------------------------------------------
@dataclass
class StateDictReport:
    """How a state dict fits a model.

    Attributes:
        source: where the weights came from (file name or description).
        loaded: keys copied into the model.
        missing: model keys the state dict lacks.
        unexpected: state-dict keys the model does not have.
        shape_mismatches: ``(key, state-dict shape, model shape)``.
        dropped: keys deliberately ignored (e.g. recomputed buffers), with no effect.
        notes: anything else worth knowing (e.g. how ``lang_weight`` was treated).
    """

    source: str = ""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=list
    )
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every model key was provided with the right shape and nothing is left over."""
        return not (self.missing or self.unexpected or self.shape_mismatches)

    def describe(self, limit: int = 20) -> str:
        """Human-readable summary naming the offending keys (at most ``limit`` per kind)."""

        def cut(items: list[str]) -> str:
            more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
            return ", ".join(items[:limit]) + more

        lines = [f"weights from {self.source or '<state dict>'}: {len(self.loaded)} tensors loaded"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}): {cut(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}): {cut(self.unexpected)}")
        if self.shape_mismatches:
            shapes = [
                f"{k} (weights {list(a)} vs model {list(b)})" for k, a, b in self.shape_mismatches
            ]
            lines.append(f"  shape mismatches ({len(shapes)}): {cut(shapes)}")
        if self.dropped:
            lines.append(f"  dropped on purpose ({len(self.dropped)}): {cut(self.dropped)}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe()


def compare_state_dict(
    model: nn.Module, state: Mapping[str, Tensor], source: str = ""
) -> StateDictReport:
    """Which keys of ``state`` fit ``model`` (nothing is loaded)."""
    target = model.state_dict()
    report = StateDictReport(source=source)
    report.missing = sorted(k for k in target if k not in state)
    report.unexpected = sorted(k for k in state if k not in target)
    for k in target:
        if k in state:
            a, b = tuple(state[k].shape), tuple(target[k].shape)
            if a != b:
                report.shape_mismatches.append((k, a, b))
            else:
                report.loaded.append(k)
    return report


def load_state_dict_checked(
    model: nn.Module,
    state: Mapping[str, Tensor],
    *,
    strict: bool = True,
    source: str = "",
    report: StateDictReport | None = None,
) -> StateDictReport:
    """Load ``state`` into ``model``, never partially in silence.

    Args:
        model: the target.
        state: tensors under the model's key names.
        strict: raise ``ValueError`` unless the state dict fits exactly. With ``strict=False`` the
            fitting tensors are loaded and the returned report lists everything else.
        source: name used in messages.
        report: an existing report to extend (its ``dropped`` / ``notes`` are kept).

    Returns:
        The :class:`StateDictReport`.

    Raises:
        ValueError: ``strict`` and the weights do not fit (missing / unexpected keys, shapes).
    """
    fit = compare_state_dict(model, state, source)
    if report is not None:
        fit.dropped, fit.notes = report.dropped, report.notes
    if strict and not fit.ok:
        raise ValueError("weights do not fit the model:\n" + fit.describe())
    with torch.no_grad():
        own = model.state_dict(keep_vars=True)
        for k in fit.loaded:
            own[k].copy_(state[k].to(own[k].dtype))
    return fit


# --------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------
def config_path(path: str | os.PathLike) -> Path:
    """The JSON written beside a checkpoint: ``<path>.json``."""
    return Path(str(path) + ".json")


def _config_blob(cfg: ModelConfig | ExperimentConfig) -> dict[str, Any]:
    if not isinstance(cfg, (ModelConfig, ExperimentConfig)):
        raise TypeError(f"cfg must be a ModelConfig or ExperimentConfig, got {type(cfg).__name__}")
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": type(cfg).__name__,
        "config": to_dict(cfg),
    }


def _atomic_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def save_tensors(tensors: dict[str, Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically: a temporary file beside ``path``, fsync, rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    _atomic_replace(tmp, path)
    return path


def save_model(
    model: nn.Module, cfg: ModelConfig | ExperimentConfig | None, path: str | os.PathLike
) -> Path:
    """Write ``model``'s weights (safetensors) and ``cfg`` (JSON beside it), atomically.

    Args:
        model: the model (a DDP wrapper is unwrapped).
        cfg: its :class:`ModelConfig` (or the whole :class:`ExperimentConfig`). ``None`` writes
            weights only (then :func:`load_model` cannot rebuild the architecture).
        path: the ``.safetensors`` file to write; the config goes to ``<path>.json``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    # Tolerate the (model, path, cfg) argument order used by early engine drafts.
    if isinstance(cfg, (str, os.PathLike)) and not isinstance(path, (str, os.PathLike)):
        cfg, path = path, cfg
    model = getattr(model, "module", model)
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        ptr = v.data_ptr()
        tensors[k] = v.clone().contiguous() if ptr in seen else v.contiguous()  # no shared storage
        seen.add(ptr)
    meta = {"format": "gres"}
    if cfg is not None:
        blob = _config_blob(cfg)
        meta["config"] = json.dumps(blob["config"])
        meta["config_kind"] = blob["kind"]
    save_tensors(tensors, path, meta)
    if cfg is not None:
        cpath = config_path(path)
        ctmp = cpath.with_name(f".{cpath.name}.tmp-{os.getpid()}")
        ctmp.write_text(json.dumps(_config_blob(cfg), indent=1) + "\n")
        _atomic_replace(ctmp, cpath)
    return path


def read_config(path: str | os.PathLike) -> ModelConfig | ExperimentConfig:
    """The config stored with a checkpoint (``<path>.json``, else the safetensors metadata).

    Raises:
        FileNotFoundError: neither the checkpoint nor its JSON exists.
        ValueError: no config is stored, or it is not a gres config.
    """
    path = Path(path)
    cpath = config_path(path)
    if cpath.is_file():
        blob = json.loads(cpath.read_text())
        if blob.get("format") != FORMAT:
            raise ValueError(
                f"{cpath} is not a gres checkpoint config (format {blob.get('format')!r})"
            )
        kind, data = blob.get("kind"), blob.get("config")
    else:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{path} carries no config and {cpath} does not exist")
        data = json.loads(meta["config"])
        kind = meta.get("config_kind") or ("ExperimentConfig" if "model" in data else "ModelConfig")
    classes = {"ModelConfig": ModelConfig, "ExperimentConfig": ExperimentConfig}
    if kind not in classes:
        raise ValueError(f"{path}: unknown config kind {kind!r}")
    return from_dict(classes[kind], data)


def model_config(cfg: ModelConfig | ExperimentConfig) -> ModelConfig:
    """The :class:`ModelConfig` inside ``cfg``."""
    return cfg.model if isinstance(cfg, ExperimentConfig) else cfg


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelConfig | ExperimentConfig]:
    """Rebuild a model from its checkpoint.

    Args:
        path: a ``.safetensors`` file written by :func:`save_model`.
        device: where to put the model.

    Returns:
        ``(model, cfg)``: the model in eval mode and the stored config.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the weights do not fit the config (missing / unexpected keys and mismatched
            shapes are named).
    """
    from safetensors.torch import load_file

    from gres.model import build_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    cfg = read_config(path)
    model = build_model(model_config(cfg), load_pretrained=False)
    state = load_file(str(path))
    try:
        load_state_dict_checked(model, state, strict=True, source=str(path))
    except ValueError as err:
        raise ValueError(f"checkpoint {path} does not fit its config: {err}") from None
    return model.to(device).eval(), cfg

