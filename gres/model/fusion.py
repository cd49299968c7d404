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


class SpatialImageLanguageAttention(nn.Module):
    """Every visual token attends over the words (LAVT / ReLA ``image_lang_att``).

    Queries are the visual tokens (1x1 conv + InstanceNorm over the tokens, no affine), keys and
    values are 1x1 convs of the word features multiplied by the word mask. The attention logits
    get ``1e4 * m - 1e4`` so padding words receive no weight, and the attended values are
    projected by ``W`` (1x1 conv + InstanceNorm).

    The logit scale is ``key_channels ** -0.5`` for any number of heads: the official code scales
    by the full key width, not the per-head width, and we keep that.
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
            lang: (B, Dt, L) word features (channels first, as Conv1d wants them).
            word_mask: (B, 1, L) float, 1 for real words, 0 for padding.

        Returns:
            (B, HW, Cout) attended language features, one vector per visual token.
        """
        B, HW, _ = x.shape
        L = lang.shape[-1]
        nh = self.num_heads
        query = self.f_query(x.transpose(1, 2))  # (B, Ck, HW)
        key = self.f_key(lang) * word_mask  # (B, Ck, L)
        value = self.f_value(lang) * word_mask  # (B, Cv, L)
        query = query.reshape(B, nh, self.key_channels // nh, HW).transpose(2, 3)  # (B, nh, HW, dk)
        key = key.reshape(B, nh, self.key_channels // nh, L)  # (B, nh, dk, L)
        value = value.reshape(B, nh, self.value_channels // nh, L)  # (B, nh, dv, L)

        logits = torch.matmul(query, key) * self.key_channels**-0.5  # (B, nh, HW, L)
        logits = logits + (MASK_LOGIT_OFFSET * word_mask.unsqueeze(1) - MASK_LOGIT_OFFSET)
        attn = F.softmax(logits, dim=-1)
        out = torch.matmul(attn, value.transpose(2, 3))  # (B, nh, HW, dv)
        out = out.transpose(1, 2).reshape(B, HW, self.value_channels)  # (B, HW, Cv)
        out = self.W(out.transpose(1, 2))  # (B, Cout, HW)
        return out.transpose(1, 2)  # (B, HW, Cout)


class PWAM(nn.Module):
    """Pixel-word attention module: ``GELU(proj_mm(GELU(vis_project(x)) * lang_att(x, l)))``.

    Args:
        dim: visual channels C of the stage (also key, value and output width, as in ReLA).
        lang_dim: width Dt of the word features (768 for BERT-base).
        num_heads: attention heads of the image-language attention (ReLA: 1 per stage).
        dropout: dropout after both GELUs (ReLA: 0.0).
    """

    def __init__(self, *, dim: int, lang_dim: int, num_heads: int = 1, dropout: float = 0.0):
        super().__init__()
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

    def forward(self, x: Tensor, lang: Tensor, word_mask: Tensor) -> Tensor:
        """Fuse the expression into every visual token.

        Args:
            x: (B, HW, C) Swin tokens after the stage's blocks.
            lang: (B, Dt, L) word features.
            word_mask: (B, 1, L) float, 1 for real words.

        Returns:
            (B, HW, C) multimodal tokens (``x_residual`` in the official code).
        """
        vis = self.vis_project(x.transpose(1, 2))  # (B, C, HW)
        lang_att = self.image_lang_att(x, lang, word_mask).transpose(1, 2)  # (B, C, HW)
        mm = self.project_mm(vis * lang_att)  # (B, C, HW)
        return mm.transpose(1, 2)  # (B, HW, C)
