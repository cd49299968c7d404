"""The ReLA model (GRES, CVPR 2023) in pure PyTorch.

Files, in the order of the forward pass:

* ``text.py``: BERT word features and the official 20-token rule;
* ``swin.py`` + ``fusion.py``: detection-style Swin with a PWAM (language fusion) per stage;
* ``pixel_decoder.py``: Mask2Former's multi-scale deformable-attention pixel decoder;
* ``rela.py``: the ReLA decoder: region queries, RIA, RLA, region-mask / minimap / no-target heads;
* ``gres_model.py``: :class:`GRESModel` composing them, :func:`build_model`, :func:`postprocess`.

Public API::

    from gres.model import build_model, postprocess
    model = build_model(cfg.model)                    # a GRESModel
    out = model(images, input_ids, text_mask)         # a GRESOutput
    pred_mask, pred_no_target, nt_prob = postprocess(out, size=480)

    # opt-in fast CPU inference (bf16 weights + autocast; not for training)
    fast = cast_for_bf16_inference(copy.deepcopy(model))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(images, input_ids, text_mask)

Dimension letters used in shape comments and docstrings:

======  ==========================================================================
letter  meaning
======  ==========================================================================
B       batch (image-expression pairs)
C       channels of a backbone stage (C1..C4 for res2..res5)
D       model width (decoder hidden dim); Dt the text-encoder width
H, W    input height / width after transforms; strides written H/4, W/4, ...
L       text tokens (padded; ReLA: 20)
Q       decoder queries (in ReLA the queries are the regions, Q = P)
P       regions, P = R * R (R = region_grid, 10 in ReLA)
N       instances referred to by one expression (may be 0); in the deformable
        attention code N is the batch of the official implementation
S       flattened pixels of all pyramid levels (deformable attention)
nh, hd  attention heads, head dim
nL, nP  pyramid levels and sampling points per head and level (deformable attention)
Cm      channels of the mask features (mask_dim)
======  ==========================================================================
"""

from __future__ import annotations

from gres.model.gres_model import (
    GRESModel,
    GRESOutput,
    build_model,
    cast_for_bf16_inference,
    compile_for_inference,
    count_parameters,
    postprocess,
)
from gres.model.pixel_decoder import MSDeformAttnPixelDecoder, PixelDecoderOutput
from gres.model.rela import DecoderOutput, ReLADecoder

__all__ = [
    "DecoderOutput",
    "GRESModel",
    "GRESOutput",
    "MSDeformAttnPixelDecoder",
    "PixelDecoderOutput",
    "ReLADecoder",
    "build_model",
    "cast_for_bf16_inference",
    "compile_for_inference",
    "count_parameters",
    "postprocess",
]
