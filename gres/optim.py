"""Optimiser, parameter groups, freezing and learning-rate schedule of the official recipe.

The released ReLA models were trained with detectron2's ``build_optimizer`` of ``train_net.py``
(spec §3, checklist item 9):

* AdamW with **one** learning rate (1e-5) for every trained parameter. ``BACKBONE_MULTIPLIER`` is
  defined in the config but never applied, so the backbone gets the same rate.
* Weight decay 0.05, except 0.0 on every normalisation module (LayerNorm, GroupNorm, InstanceNorm,
  BatchNorm), every ``nn.Embedding`` and the Swin ``relative_position_bias_table`` /
  ``absolute_pos_embed`` parameters. Biases keep 0.05. Plain ``nn.Parameter`` embeddings such as
  the pixel decoder's ``level_embed`` keep 0.05 (they are not ``nn.Embedding`` modules).
* Only BERT's ``encoder.layer[0..9]`` is in the optimiser, as one group with weight decay 0.05 on
  every parameter (their LayerNorms included). The embeddings and layers 10-11 are frozen.
* The L2 norm of all optimised gradients together is clipped to 0.01 inside ``optimizer.step``.
* ``WarmupMultiStepLR``: linear warm-up from ``warmup_factor`` over ``warmup_iters`` (factor 1.0 in
  the recipe, i.e. no effective warm-up), then x0.1 at 110k and x0.01 at 140k of 150k iterations.

The cosine schedule is an addition for short CPU runs. The schedule is a pure function of the
iteration, so a resumed run gets exactly the same learning rates.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch
from torch import nn

from gres.config import TrainConfig

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LocalResponseNorm,
)
"""Module types whose parameters get ``weight_decay_norm`` (detectron2's norm_module_types)."""

NO_DECAY_NAMES: tuple[str, ...] = ("relative_position_bias_table", "absolute_pos_embed")
"""Parameter names (last component) that never get weight decay (train_net.py)."""


# --------------------------------------------------------------------------------------------------
# Finding the text encoder
# --------------------------------------------------------------------------------------------------
def find_text_encoder(model: nn.Module) -> tuple[str, nn.Module] | None:
    """Return ``(qualified_name, module)`` of the BERT-like text encoder inside ``model``.

    The text encoder is the first sub-module that has a ``encoder.layer`` ``ModuleList`` (the
    layout of ``transformers.BertModel``); the model itself is skipped so that a bare BERT is
    found too. ``None`` when the model has no such module.
    """
    for name, module in model.named_modules():
        encoder = getattr(module, "encoder", None)
        layers = getattr(encoder, "layer", None) if isinstance(encoder, nn.Module) else None
        if isinstance(layers, nn.ModuleList) and hasattr(module, "embeddings"):
            return name, module
    return None


def freeze_text_encoder(
    model: nn.Module,
    frozen_layers_from: int,
    freeze_embeddings: bool = True,
    freeze_all: bool = False,
) -> list[str]:
    """Set ``requires_grad=False`` on the text-encoder parameters the recipe does not train.

    Activations still flow through frozen layers, so layers before them keep their gradients.

    Args:
        model: the full model (or a bare BERT).
        frozen_layers_from: first frozen transformer layer (10 in the recipe: layers 10-11 frozen).
        freeze_embeddings: freeze ``embeddings.*`` (True in the recipe).
        freeze_all: freeze every text-encoder parameter (the frozen-MiniLM variant).

    Returns:
        Qualified names of the parameters that were frozen, sorted.
    """
    found = find_text_encoder(model)
    if found is None:
        return []
    prefix, text = found
    prefix = f"{prefix}." if prefix else ""
    frozen = []
    for name, param in text.named_parameters():
        parts = name.split(".")
        freeze = freeze_all
        if parts[0] == "embeddings" and freeze_embeddings:
            freeze = True
        if parts[:2] == ["encoder", "layer"] and int(parts[2]) >= frozen_layers_from:
            freeze = True
        if parts[0] == "pooler":  # never used by ReLA (no pooler keys in the checkpoint, spec §8)
            freeze = True
        if freeze:
            param.requires_grad_(False)
            frozen.append(prefix + name)
    return sorted(frozen)


# --------------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------------
@dataclass
class ParamGroups:
    """Parameter groups for the optimiser and, for inspection, the names in each group."""

    groups: list[dict]  # torch param-group dicts: params, weight_decay, name
    names: dict[str, list[str]]  # group name -> qualified parameter names


def param_groups(
    model: nn.Module,
    weight_decay: float,
    weight_decay_norm: float = 0.0,
    weight_decay_embed: float = 0.0,
) -> ParamGroups:
    """Split the trainable parameters of ``model`` into weight-decay groups (train_net.py rules).

    Groups: ``decay`` (``weight_decay``), ``no_decay`` (norms, ``nn.Embedding``, relative-position
    tables; the two zero rates are ``weight_decay_norm`` / ``weight_decay_embed``) and ``text``
    (BERT ``encoder.layer.*``: ``weight_decay`` on everything, as in the official code). Frozen
    parameters (``requires_grad=False``) are left out. Shared parameters appear once.

    Args:
        model: the model (a DDP wrapper is unwrapped by the caller).
        weight_decay: the decay of ordinary parameters (0.05).
        weight_decay_norm: decay of normalisation parameters (detectron2 default 0.0).
        weight_decay_embed: decay of ``nn.Embedding`` weights and rel-pos tables (0.0).
    """
    found = find_text_encoder(model)
    text_layers_prefix = None
    if found is not None:
        text_layers_prefix = (f"{found[0]}." if found[0] else "") + "encoder.layer."
    buckets: dict[str, tuple[float, list[nn.Parameter], list[str]]] = {
        "decay": (weight_decay, [], []),
        "no_decay_norm": (weight_decay_norm, [], []),
        "no_decay_embed": (weight_decay_embed, [], []),
        "text": (weight_decay, [], []),
    }
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{param_name}" if module_name else param_name
            if text_layers_prefix is not None and full.startswith(text_layers_prefix):
                key = "text"
            elif isinstance(module, NORM_TYPES):
                key = "no_decay_norm"
            elif isinstance(module, nn.Embedding) or param_name in NO_DECAY_NAMES:
                key = "no_decay_embed"
            else:
                key = "decay"
            buckets[key][1].append(param)
            buckets[key][2].append(full)
    groups, names = [], {}
    for key, (wd, params, pnames) in buckets.items():
        if params:
            groups.append({"params": params, "weight_decay": wd, "name": key})
            names[key] = pnames
    if not groups:
        raise ValueError("param_groups: the model has no trainable parameter")
    return ParamGroups(groups=groups, names=names)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with the single learning rate ``cfg.lr``.

    With ``cfg.backbone_lr_factor != 1`` (ours), each group is split in two and the Swin
    parameters that pretrained weights provide (:func:`gres.model.swin.pretrained_parameters`)
    in stages ``>= cfg.backbone_lr_from_stage`` get ``lr * backbone_lr_factor`` (group names get
    a ``_backbone`` suffix). A factor of 0 freezes them (AdamW's decoupled weight decay is
    scaled by the learning rate too).
    """
    pg = param_groups(model, cfg.weight_decay, cfg.weight_decay_norm, cfg.weight_decay_embed)
    groups = pg.groups
    if cfg.backbone_lr_factor != 1.0:
        if cfg.backbone_lr_factor < 0:
            raise ValueError(f"backbone_lr_factor must be >= 0, got {cfg.backbone_lr_factor}")
        from gres.model.swin import pretrained_parameters

        if not 0 <= cfg.backbone_lr_from_stage <= 3:
            raise ValueError("backbone_lr_from_stage must be a Swin stage 0..3, got "
                             f"{cfg.backbone_lr_from_stage}")
        slow = {id(p) for p in pretrained_parameters(model, cfg.backbone_lr_from_stage)}
        groups = []
        for g in pg.groups:
            for suffix, keep in (("", False), ("_backbone", True)):
                params = [p for p in g["params"] if (id(p) in slow) == keep]
                if params:
                    lr = cfg.lr * (cfg.backbone_lr_factor if keep else 1.0)
                    groups.append({**g, "params": params, "name": g["name"] + suffix, "lr": lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Clip the L2 norm of all optimiser gradients together (detectron2 ``full_model`` clip).

    Only parameters in the optimiser count, as in the official code where clipping runs inside
    ``optimizer.step``. ``max_norm <= 0`` disables clipping; the total norm is still returned.

    Returns:
        The total gradient norm before clipping (0-dim tensor).
    """
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


# --------------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------------
def lr_factor(it: int, cfg: TrainConfig, max_iters: int) -> float:
    """Multiplier of ``cfg.lr`` at iteration ``it`` (0-based; the rate used for step ``it``).

    ``multistep``: ``gamma ** (number of lr_steps <= it)`` (detectron2 MultiStepParamScheduler).
    ``cosine``: ``min + (1 - min) * (1 + cos(pi * it / max_iters)) / 2``.
    ``constant``: 1. All three are multiplied by the linear warm-up factor
    ``warmup_factor * (1 - a) + a`` with ``a = it / warmup_iters`` during the first
    ``warmup_iters`` iterations (detectron2 ``LRMultiplier`` with linear warm-up).
    """
    if cfg.lr_schedule == "multistep":
        factor = cfg.lr_gamma ** bisect.bisect_right(sorted(cfg.lr_steps), it)
    elif cfg.lr_schedule == "cosine":
        progress = min(it / max(max_iters, 1), 1.0)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        factor = cfg.min_lr_factor + (1 - cfg.min_lr_factor) * cosine
    elif cfg.lr_schedule == "constant":
        factor = 1.0
    else:
        raise ValueError(
            f"TrainConfig.lr_schedule={cfg.lr_schedule!r}: expected multistep, cosine or constant"
        )
    if it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, max_iters: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over :func:`lr_factor`; call ``step()`` once after every optimiser step."""
    lr_factor(0, cfg, max_iters)  # validate the schedule name now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg, max_iters))
