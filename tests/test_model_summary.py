"""Parameter accounting of gres.model.summary."""

from __future__ import annotations

import pytest
import torch

from gres.config import PRESETS
from gres.model import build_model
from gres.model.summary import build_on_meta, parameter_parts


def test_meta_build_counts_equal_real_build():
    cfg = PRESETS["tiny-test"]().model
    real = build_model(cfg, load_pretrained=False)
    meta = build_on_meta(cfg)
    assert all(p.device.type == "meta" for p in meta.parameters())
    real_parts = parameter_parts(real.named_parameters())
    meta_parts = parameter_parts(meta.named_parameters())
    assert real_parts.equals(meta_parts)
    assert int(real_parts.sum()) == sum(p.numel() for p in real.parameters())
    # every component of ReLA is present
    components = {c for c, _ in real_parts.index}
    assert components == {"image encoder", "text encoder", "pixel decoder", "ReLA"}


def test_unknown_parameter_name_is_named():
    with pytest.raises(ValueError, match="mystery.weight"):
        parameter_parts([("mystery.weight", torch.zeros(3))])
