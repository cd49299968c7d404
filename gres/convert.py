"""Official ReLA checkpoints -> our model; timm Swin weights -> our backbone.

Official checkpoints (detectron2 ``.pth`` holding ``{"model": state_dict, ...}``, a safetensors
file, or a state dict) use the key names of spec §8. Ours mirror them, so conversion is a prefix
rename:

=================================  =========================
official                           ours (:class:`GRESModel`)
=================================  =========================
``backbone.``                      ``backbone.``
``sem_seg_head.pixel_decoder.``    ``pixel_decoder.``
``sem_seg_head.predictor.``        ``decoder.``
``text_encoder.``                  ``text_encoder.bert.``
=================================  =========================

Dropped on purpose (recomputed or unused): ``*.relative_position_index`` (Swin buffers),
``text_encoder.embeddings.position_ids`` / ``token_type_ids`` (old transformers buffers),
``pixel_mean`` / ``pixel_std``.

``lang_weight``. The official decoder overrides ``_load_from_state_dict`` without calling the
parent loader, so ``sem_seg_head.predictor.lang_weight`` is never loaded: the official evaluation
runs with its initial value 0.0 (sigmoid 0.5) whatever the checkpoint stores (vectors README §3).
By default we reproduce that (``lang_weight`` := 0.0); ``use_stored_lang_weight=True`` loads the
stored value instead.

Nothing is loaded partially in silence: missing or unexpected keys and shape mismatches raise a
``ValueError`` naming them, unless ``strict=False`` is passed explicitly, in which case the fitting
tensors are loaded and the :class:`~gres.checkpoint.StateDictReport` lists the rest.

Reading ``.pth`` files uses ``torch.load(weights_only=True)``, which accepts tensors and plain
containers (a detectron2 checkpoint's ``iteration`` / optimizer state included). Files that need
arbitrary unpickling (e.g. detectron2 ``.pkl`` with numpy arrays) are refused unless
``trust_pickle=True`` — unpickling can run code, so only do it for files you trust.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from gres.checkpoint import StateDictReport, load_state_dict_checked, save_model
from gres.config import (
    DecoderConfig,
    ExperimentConfig,
    ModelConfig,
    PixelDecoderConfig,
    SwinConfig,
    TextConfig,
)
from gres.model.swin import load_pretrained_swin, timm_swin_to_ours

PREFIXES: tuple[tuple[str, str], ...] = (
    ("backbone.", "backbone."),
    ("sem_seg_head.pixel_decoder.", "pixel_decoder."),
    ("sem_seg_head.predictor.", "decoder."),
    ("text_encoder.", "text_encoder.bert."),
)
LANG_WEIGHT = "sem_seg_head.predictor.lang_weight"
_DROP_SUFFIXES = ("relative_position_index",)
_DROP_KEYS = (
    "text_encoder.embeddings.position_ids",
    "text_encoder.embeddings.token_type_ids",
    "pixel_mean",
    "pixel_std",
)


def load_timm_swin(model: nn.Module, name_or_path: str, **kwargs: Any):
    """Load ImageNet Swin weights (timm name or local file) into a backbone or a GRESModel.

    Thin wrapper of :func:`gres.model.swin.load_pretrained_swin`; given a full model, its
    ``backbone`` is used. Returns the backbone helper's load report.
    """
    backbone = getattr(model, "backbone", model)
    return load_pretrained_swin(backbone, name_or_path, **kwargs)


__all__ = [
    "config_from_official",
    "convert_official_checkpoint",
    "load_official_checkpoint",
    "load_timm_swin",
    "official_to_ours",
    "ours_to_official",
    "read_checkpoint",
    "timm_swin_to_ours",
]


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def _unwrap(obj: Any, source: str) -> dict[str, Tensor]:
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{source}: expected a state dict (or {{'model': state_dict}}), "
            f"got {type(obj).__name__}"
        )
    out: dict[str, Tensor] = {}
    bad = []
    for k, v in obj.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        if not isinstance(v, Tensor):
            bad.append(f"{k} ({type(v).__name__})")
            continue
        out[str(k)] = v
    if bad:
        raise ValueError(f"{source}: state dict entries that are not tensors: {bad[:10]}")
    return out


def read_checkpoint(
    src: str | os.PathLike | Mapping[str, Any], *, trust_pickle: bool = False
) -> dict[str, Tensor]:
    """Read an official checkpoint into a flat ``{key: tensor}`` dict.

    Args:
        src: a ``.safetensors`` file, a torch file (``.pth``/``.pt``/``.bin``, e.g. detectron2's
            ``{"model": sd, "iteration": ...}``), a detectron2 ``.pkl`` (needs ``trust_pickle``),
            or an in-memory state dict (optionally wrapped in ``{"model": ...}``).
        trust_pickle: allow full unpickling when ``weights_only`` loading refuses the file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unreadable file, or not a state dict.
    """
    if isinstance(src, Mapping):
        return _unwrap(src, "<state dict>")
    path = Path(src).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix == ".pkl":
        if not trust_pickle:
            raise ValueError(
                f"{path} is a pickle file: reading it runs arbitrary code. Pass trust_pickle=True "
                "if you trust it (or convert it to .pth / .safetensors first)."
            )
        with path.open("rb") as f:
            return _unwrap(pickle.load(f, encoding="latin1"), str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        if not trust_pickle:
            raise ValueError(
                f"{path} holds objects that torch.load(weights_only=True) refuses ({err}). Pass "
                "trust_pickle=True if you trust the file (full unpickling can run code)."
            ) from err
        obj = torch.load(path, map_location="cpu", weights_only=False)
    return _unwrap(obj, str(path))


# --------------------------------------------------------------------------------------------------
# Key mapping
# --------------------------------------------------------------------------------------------------
def official_to_ours(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Rename official keys to ours.

    Returns:
        ``(mapped, dropped, unknown)``: the renamed tensors, the official keys dropped on purpose,
        and official keys with no known prefix (reported as unexpected by the loader).
    """
    mapped: dict[str, Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, value in state.items():
        if key in _DROP_KEYS or key.endswith(_DROP_SUFFIXES):
            dropped.append(key)
            continue
        for theirs, ours in PREFIXES:
            if key.startswith(theirs):
                mapped[ours + key[len(theirs):]] = value
                break
        else:
            unknown.append(key)
            mapped[key] = value  # kept under its own name so the loader reports it
    return mapped, dropped, unknown


def ours_to_official(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`official_to_ours` (export our weights under the official names)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for theirs, ours in sorted(PREFIXES, key=lambda p: -len(p[1])):
            if key.startswith(ours):
                out[theirs + key[len(ours):]] = value
                break
        else:
            raise ValueError(f"no official name for key {key!r}")
    return out


def load_official_checkpoint(
    model: nn.Module,
    src: str | os.PathLike | Mapping[str, Any],
    *,
    use_stored_lang_weight: bool = False,
    strict: bool = True,
    trust_pickle: bool = False,
) -> StateDictReport:
    """Load an official ReLA checkpoint into our :class:`~gres.model.GRESModel`.

    Args:
        model: the model, built with the checkpoint's architecture.
        src: file or state dict (see :func:`read_checkpoint`).
        use_stored_lang_weight: load ``lang_weight`` from the checkpoint. Default False
            reproduces the official evaluation, whose loader never loads it (it stays 0.0).
        strict: raise on any missing / unexpected key or shape mismatch (default). False loads
            what fits and returns the report listing the rest.
        trust_pickle: see :func:`read_checkpoint`.

    Returns:
        The :class:`~gres.checkpoint.StateDictReport`.

    Raises:
        ValueError: with ``strict``, the checkpoint does not fit the model (keys and shapes named).
    """
    source = "<state dict>" if isinstance(src, Mapping) else str(src)
    state = read_checkpoint(src, trust_pickle=trust_pickle)
    mapped, dropped, _ = official_to_ours(state)
    report = StateDictReport(source=source, dropped=dropped)
    has_lang_weight = "decoder.lang_weight" in model.state_dict()  # main-branch decoder
    if has_lang_weight and not use_stored_lang_weight:
        stored = mapped.pop("decoder.lang_weight", None)
        mapped["decoder.lang_weight"] = torch.zeros(())
        was = "absent" if stored is None else f"{float(stored):.6g}"
        report.notes.append(
            f"lang_weight set to 0.0 as the official loader leaves it (stored value: {was}); "
            "pass use_stored_lang_weight=True to load it"
        )
        if stored is not None:
            report.dropped.append(LANG_WEIGHT)
    elif has_lang_weight and "decoder.lang_weight" in mapped:
        value = float(mapped["decoder.lang_weight"])
        report.notes.append(f"lang_weight loaded from the checkpoint ({value:.6g})")
    return load_state_dict_checked(model, mapped, strict=strict, source=source, report=report)


# --------------------------------------------------------------------------------------------------
# Official config -> ours
# --------------------------------------------------------------------------------------------------
def _get(d: Mapping[str, Any], path: str) -> Any:
    cur: Any = d
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            raise ValueError(f"official config lacks '{path}'")
        cur = cur[part]
    return cur


def config_from_official(
    cfg: Mapping[str, Any], vectors_dir: str | os.PathLike | None = None
) -> ModelConfig:
    """Our :class:`ModelConfig` from an ``official_config.json`` of a test-vector set.

    Args:
        cfg: the parsed JSON (sections ``input``, ``text``, ``backbone``, ``pixel_decoder``,
            ``decoder``).
        vectors_dir: the set's folder; when given, ``text.vocab_file`` becomes the tokenizer.

    Raises:
        ValueError: a field is missing, or the set uses a structure we do not implement (named).
    """
    bb, pd, dec, text = (_get(cfg, s) for s in ("backbone", "pixel_decoder", "decoder", "text"))
    bert = _get(text, "bert_config")
    fusion_heads = set(_get(bb, "pwam.num_heads_fusion"))
    if len(fusion_heads) != 1:
        raise ValueError(
            f"per-stage PWAM heads {sorted(fusion_heads)} are not supported (one value only)"
        )
    if _get(pd, "n_levels") != 3 or pd.get("num_fpn_levels", 1) != 1:
        raise ValueError("only 3 deformable levels (res3..res5) + 1 FPN level (res2) are supported")
    if pd.get("activation", "relu") != "relu" or dec.get("pre_norm", False):
        raise ValueError("only ReLU FFNs and post-norm decoders are supported")
    num_queries = int(_get(dec, "num_queries"))
    grid = math.isqrt(num_queries)
    if grid * grid != num_queries:
        raise ValueError(f"num_queries {num_queries} is not a square minimap")
    tokenizer = None
    if vectors_dir is not None and text.get("vocab_file"):
        tokenizer = str(Path(vectors_dir) / text["vocab_file"])
    attn = bert.get("_attn_implementation_used") or bert.get("_attn_implementation") or "eager"
    inp = _get(cfg, "input")
    return ModelConfig(
        image_size=int(_get(inp, "image_size")),
        size_divisibility=int(inp.get("size_divisibility", 32)),
        pixel_mean=tuple(float(x) for x in _get(inp, "pixel_mean")),
        pixel_std=tuple(float(x) for x in _get(inp, "pixel_std")),
        swin=SwinConfig(
            embed_dim=int(_get(bb, "embed_dim")),
            depths=tuple(int(x) for x in _get(bb, "depths")),
            num_heads=tuple(int(x) for x in _get(bb, "num_heads")),
            window_size=int(_get(bb, "window_size")),
            patch_size=int(bb.get("patch_size", 4)),
            mlp_ratio=float(bb.get("mlp_ratio", 4.0)),
            qkv_bias=bool(bb.get("qkv_bias", True)),
            drop_path_rate=float(bb.get("drop_path_rate_train_only", 0.3)),
            fusion_heads=fusion_heads.pop(),
            pretrained=None,
        ),
        text=TextConfig(
            name_or_path=None,
            tokenizer=tokenizer,
            hidden_size=int(_get(bert, "hidden_size")),
            num_layers=int(_get(bert, "num_hidden_layers")),
            num_heads=int(_get(bert, "num_attention_heads")),
            intermediate_size=int(_get(bert, "intermediate_size")),
            vocab_size=int(_get(bert, "vocab_size")),
            max_position_embeddings=int(_get(bert, "max_position_embeddings")),
            attn_implementation=str(attn),
            max_tokens=int(_get(text, "max_tokens")),
        ),
        pixel_decoder=PixelDecoderConfig(
            conv_dim=int(_get(pd, "conv_dim")),
            mask_dim=int(_get(pd, "mask_dim")),
            num_layers=int(_get(pd, "enc_layers")),
            num_heads=int(_get(pd, "nheads")),
            num_points=int(_get(pd, "n_points")),
            ffn_dim=int(_get(pd, "dim_feedforward")),
            norm_groups=int(pd.get("group_norm_groups", 32)),
            dropout=float(pd.get("dropout", 0.0)),
        ),
        decoder=DecoderConfig(
            hidden_dim=int(_get(dec, "hidden_dim")),
            num_heads=int(_get(dec, "nheads")),
            ffn_dim=int(_get(dec, "dim_feedforward")),
            num_layers=int(_get(dec, "num_rela_layers")),
            region_grid=grid,
            rla_weight=float(dec.get("rla_weight", 0.1)),
            lang_att_layers=tuple(int(x) for x in dec.get("lang_att_layers", (0,))),
            mask_embed_layers=int(dec.get("mask_embed_layers", 3)),
            nt_embed_layers=int(dec.get("nt_embed_layers", 2)),
        ),
    )


# --------------------------------------------------------------------------------------------------
# One-call conversion
# --------------------------------------------------------------------------------------------------
def convert_official_checkpoint(
    src: str | os.PathLike | Mapping[str, Any],
    cfg: ModelConfig | ExperimentConfig,
    dst: str | os.PathLike,
    *,
    use_stored_lang_weight: bool = False,
    strict: bool = True,
    trust_pickle: bool = False,
) -> StateDictReport:
    """Convert an official checkpoint into our format (``dst`` safetensors + ``dst.json``).

    The architecture comes from ``cfg`` (e.g. ``PRESETS["rela-swin-b"]().model``); no pretrained
    weights are downloaded, every tensor comes from ``src``.

    Returns:
        The :class:`~gres.checkpoint.StateDictReport` (also printable).
    """
    from gres.model import build_model

    model_cfg = cfg.model if isinstance(cfg, ExperimentConfig) else cfg
    model = build_model(model_cfg, load_pretrained=False)
    report = load_official_checkpoint(
        model, src, use_stored_lang_weight=use_stored_lang_weight, strict=strict,
        trust_pickle=trust_pickle,
    )
    save_model(model, cfg, dst)
    report.notes.append(f"written {dst} and {dst}.json")
    return report

