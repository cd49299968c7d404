"""Parameter accounting: counts per component and per paper part (book chapter 04).

``build_on_meta`` builds any preset's model on PyTorch's ``meta`` device (shapes only: nothing is
allocated or initialised), so the paper's 225 M-parameter model is counted in a second.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

import pandas as pd
import torch
from torch import nn

from gres.config import ModelConfig

# (regex on the parameter name, component, part of the paper); the first match wins.
PARTS: tuple[tuple[str, str, str], ...] = (
    (r"backbone\.(?!.*\.(fusion|res_gate)\.)", "image encoder", "Swin"),
    (r"backbone\.", "image encoder", "PWAM language fusion + gates"),
    (r"text_encoder\.", "text encoder", "BERT"),
    (r"pixel_decoder\.", "pixel decoder", "deformable encoder + FPN"),
    (r"decoder\.query_", "ReLA", "region queries Q_r"),
    (r"decoder\.(RIA|input_proj|level_embed)", "ReLA", "RIA (region-image)"),
    (r"decoder\.(RLA|lang_|self_attention)", "ReLA", "RLA (region-region, region-word)"),
    (r"decoder\.transformer_ffn", "ReLA", "FFN"),
    (r"decoder\.", "ReLA", "heads: region filter, minimap, no-target"),
)


def build_on_meta(cfg: ModelConfig) -> nn.Module:
    """The model of ``cfg`` with shape-only parameters (no pretrained weights are loaded)."""
    from gres.model import build_model

    with torch.device("meta"):
        return build_model(cfg, load_pretrained=False)


def parameter_parts(named_parameters: Iterable[tuple[str, torch.Tensor]]) -> pd.Series:
    """Parameter counts indexed by (component, part), in :data:`PARTS` order.

    Raises:
        ValueError: a parameter name that matches no entry of :data:`PARTS`.
    """
    counts: Counter = Counter()
    for name, p in named_parameters:
        key = next(((c, part) for rx, c, part in PARTS if re.match(rx, name)), None)
        if key is None:
            raise ValueError(f"parameter {name!r} belongs to no known component")
        counts[key] += p.numel()
    order = list(dict.fromkeys((c, part) for _, c, part in PARTS))
    return pd.Series({k: counts[k] for k in order if k in counts}, dtype="int64")
