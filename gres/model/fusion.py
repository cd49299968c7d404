"""Pixel-word attention fusion (PWAM) that ReLA inherits from LAVT (spec §1.1).

One PWAM runs at the end of every Swin stage, after the stage's blocks and before its patch
merging. Each visual token attends over the words of the expression; the attended language
vector is multiplied element-wise with a projection of the token, and the product is projected
again. That product, ``x_residual``, is what the backbone outputs for the stage (after a
LayerNorm), and a zero-initialised tanh gate adds it back into the Swin path that feeds the next
stage.

Module and parameter names mirror the official ``MMBasicLayer.fusion`` so that an official
checkpoint loads by stripping its ``backbone.`` prefix (spec §8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# swin.py (SpatialImageLanguageAttention): padding words get this additive logit offset.
MASK_LOGIT_OFFSET = 1e4
# Width of the per-cell spatial feature of :func:`spatial_features` (ours, off by default).
SPATIAL_FEATURES = 8


def spatial_features(h: int, w: int, *, device=None, dtype=None) -> Tensor:
    """The 8-D spatial feature of every cell of an h x w grid, flattened row-major: (h*w, 8).

    For cell (i, j): its left, centre and right x, its top, centre and bottom y (all in [-1, 1]),
    then 1/w and 1/h. This is the classic coordinate feature of referring segmentation (Hu et
    al., ECCV 2016, and the models that followed); LAVT and ReLA do not use it. It is what
    ``SwinConfig.spatial_features`` adds to every PWAM (ours): Swin tokens carry no absolute
    position, so without it a word such as "left" cannot select pixels by where they are.
    """
    ys = torch.arange(h, device=device, dtype=torch.float32)
    xs = torch.arange(w, device=device, dtype=torch.float32)
    y0, y1 = 2 * ys / h - 1, 2 * (ys + 1) / h - 1  # (h,) top and bottom edges
    x0, x1 = 2 * xs / w - 1, 2 * (xs + 1) / w - 1  # (w,)
    yy = torch.stack([y0, (y0 + y1) / 2, y1], dim=-1)[:, None, :].expand(h, w, 3)
    xx = torch.stack([x0, (x0 + x1) / 2, x1], dim=-1)[None, :, :].expand(h, w, 3)
    inv = torch.tensor([1.0 / w, 1.0 / h], device=device).expand(h, w, 2)
    feats = torch.cat([xx, yy, inv], dim=-1).reshape(h * w, SPATIAL_FEATURES)
    return feats if dtype is None else feats.to(dtype)



def _pointwise(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """A 1x1 ``Conv1d`` applied to channels-last tokens: (B, N, Cin) -> (B, N, Cout).

    Same maths as ``conv(x.transpose(1, 2)).transpose(1, 2)`` without the layout round trip
    (and without PyTorch's slow 1-D convolution path on CPU).
    """
    return F.linear(x, conv.weight.squeeze(-1), conv.bias)


def _instance_norm(norm: nn.InstanceNorm1d, x: Tensor) -> Tensor:
    """``InstanceNorm1d`` (affine=False) over the tokens of channels-last (B, N, C) input.

    Each channel of each sample is normalised over its N tokens with the biased variance, as
    ``nn.InstanceNorm1d`` does on (B, C, N). Statistics are taken in float32 even under
    fp16/bf16 autocast (the official module runs its normalisation in fp32 there).
    """
    x32 = x.float()
    var, mean = torch.var_mean(x32, dim=1, keepdim=True, correction=0)  # (B, 1, C) each
    return ((x32 - mean) * torch.rsqrt(var + norm.eps)).to(x.dtype)


class SpatialImageLanguageAttention(nn.Module):
    """Every visual token attends over the words (LAVT / ReLA ``image_lang_att``).

    Queries are the visual tokens (1x1 conv + InstanceNorm over the tokens, no affine), keys and
    values are 1x1 convs of the word features multiplied by the word mask. The attention logits
    get ``1e4 * m - 1e4`` so padding words receive no weight, and the attended values are
    projected by ``W`` (1x1 conv + InstanceNorm).

    The logit scale is ``key_channels ** -0.5`` for any number of heads: the official code scales
    by the full key width, not the per-head width, and we keep that.

    The layers are the official ``nn.Conv1d`` / ``nn.InstanceNorm1d`` modules (same parameter
    names); they are applied to channels-last tokens, which is the same computation.
    """

    def __init__(
        self,
        *,
        v_in_channels: int,
        l_in_channels: int,
        key_channels: int,
        value_channels: int,
        out_channels: int,
        num_heads: int = 1,
    ) -> None:
        super().__init__()
        if key_channels % num_heads or value_channels % num_heads:
            raise ValueError(
                f"key_channels ({key_channels}) and value_channels ({value_channels}) must be "
                f"divisible by num_heads ({num_heads})"
            )
        self.key_channels = key_channels
        self.value_channels = value_channels
        self.num_heads = num_heads
        # Words -> keys/values; no normalisation over words (a sentence has many padding slots).
        self.f_key = nn.Sequential(nn.Conv1d(l_in_channels, key_channels, kernel_size=1))
        self.f_query = nn.Sequential(
            nn.Conv1d(v_in_channels, key_channels, kernel_size=1),
            nn.InstanceNorm1d(key_channels),  # affine=False, eps=1e-5: each channel over HW
        )
        self.f_value = nn.Sequential(nn.Conv1d(l_in_channels, value_channels, kernel_size=1))
        self.W = nn.Sequential(
            nn.Conv1d(value_channels, out_channels, kernel_size=1),
            nn.InstanceNorm1d(out_channels),
        )

    def forward(self, x: Tensor, lang: Tensor, word_mask: Tensor) -> Tensor:
        """Attend from visual tokens to words.

        Args:
            x: (B, HW, Cv) visual tokens.
            lang: (B, L, Dt) word features.
            word_mask: (B, L) float, 1 for real words, 0 for padding.

        Returns:
            (B, HW, Cout) attended language features, one vector per visual token.
        """
        B, HW, _ = x.shape
        L = lang.shape[1]
        nh = self.num_heads
        dk, dv = self.key_channels // nh, self.value_channels // nh
        m = word_mask.unsqueeze(-1)  # (B, L, 1)
        query = _instance_norm(self.f_query[1], _pointwise(self.f_query[0], x))  # (B, HW, Ck)
        key = _pointwise(self.f_key[0], lang) * m  # (B, L, Ck)
        value = _pointwise(self.f_value[0], lang) * m  # (B, L, Cv)
        query = query.view(B, HW, nh, dk).transpose(1, 2)  # (B, nh, HW, dk)
        key = key.view(B, L, nh, dk).permute(0, 2, 3, 1)  # (B, nh, dk, L)
        value = value.view(B, L, nh, dv).transpose(1, 2)  # (B, nh, L, dv)

        logits = torch.matmul(query, key) * self.key_channels**-0.5  # (B, nh, HW, L)
        pad_bias = MASK_LOGIT_OFFSET * word_mask - MASK_LOGIT_OFFSET  # (B, L): 0 real, -1e4 pad
        attn = F.softmax(logits + pad_bias[:, None, None, :], dim=-1)
        out = torch.matmul(attn, value)  # (B, nh, HW, dv)
        out = out.transpose(1, 2).reshape(B, HW, self.value_channels)  # heads concatenated
        return _instance_norm(self.W[1], _pointwise(self.W[0], out))  # (B, HW, Cout)


class PWAM(nn.Module):
    """Pixel-word attention module: ``GELU(proj_mm(GELU(vis_project(x)) * lang_att(x, l)))``.

    Args:
        dim: visual channels C of the stage (also key, value and output width, as in ReLA).
        lang_dim: width Dt of the word features (768 for BERT-base).
        num_heads: attention heads of the image-language attention (ReLA: 1 per stage).
        dropout: dropout after both GELUs (ReLA: 0.0).
        spatial: add a learned projection of the 8-D cell coordinates (:func:`spatial_features`)
            to the visual tokens before fusing (ours; ReLA: False). The projection starts at
            zero, so the module starts as the official one.
    """

    def __init__(
        self, *, dim: int, lang_dim: int, num_heads: int = 1, dropout: float = 0.0,
        spatial: bool = False,
    ):
        super().__init__()
        self.spatial_proj: nn.Linear | None = None
        if spatial:
            self.spatial_proj = nn.Linear(SPATIAL_FEATURES, dim, bias=False)
            nn.init.zeros_(self.spatial_proj.weight)
        self.vis_project = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.GELU(), nn.Dropout(dropout))
        self.image_lang_att = SpatialImageLanguageAttention(
            v_in_channels=dim,
            l_in_channels=lang_dim,
            key_channels=dim,
            value_channels=dim,
            out_channels=dim,
            num_heads=num_heads,
        )
        self.project_mm = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.GELU(), nn.Dropout(dropout))

    def forward(
        self, x: Tensor, lang: Tensor, word_mask: Tensor, hw: tuple[int, int] | None = None
    ) -> Tensor:
        """Fuse the expression into every visual token.

        Args:
            x: (B, HW, C) Swin tokens after the stage's blocks.
            lang: (B, L, Dt) word features.
            word_mask: (B, L) float, 1 for real words.
            hw: the token grid (H, W); required when the module adds spatial features.

        Returns:
            (B, HW, C) multimodal tokens (``x_residual`` in the official code).
        """
        if self.spatial_proj is not None:
            if hw is None or hw[0] * hw[1] != x.shape[1]:
                raise ValueError(f"PWAM with spatial features needs hw=(H, W) with H*W = "
                                 f"{x.shape[1]} tokens, got {hw}")
            coords = spatial_features(*hw, device=x.device, dtype=x.dtype)  # (HW, 8)
            x = x + self.spatial_proj(coords)  # (B, HW, C)
        conv, act, drop = self.vis_project
        vis = drop(act(_pointwise(conv, x)))  # (B, HW, C)
        lang_att = self.image_lang_att(x, lang, word_mask)  # (B, HW, C)
        conv, act, drop = self.project_mm
        return drop(act(_pointwise(conv, vis * lang_att)))  # (B, HW, C)
