"""Ablation variants of ReLA (paper §5.2, Tables 2-4) and the one-stage baseline (§5.3, Tables 5/6).

Every variant keeps the language-fused Swin, the text encoder, the training recipe and the budget
of full ReLA and changes one thing, chosen by three :class:`gres.config.ModelConfig` fields
(``build_model`` sends any non-default value here):

``ria_mode`` -- how region features are collected (Table 2):

* ``"attention"`` (#4, ReLA): RIA, the masked cross-attention of Eq. 2.
* ``"hard_split_decoder"`` (#2): "RIA is replaced by average pooling the image feature into P x P".
  :class:`VariantReLADecoder` keeps RIA's value and output projections, residual and norm, and
  replaces its attention map by the fixed map that averages the pixels of the region's own cell
  (``adaptive_avg_pool2d`` of the pyramid level into R x R). The regions are rigid grid cells.
* ``"hard_split_input"`` (#1): "rigidly split the image into P x P patches before sending them into
  the encoder". :class:`HardSplitBackbone` cuts the image into G x G patches and encodes each on
  its own (no attention, shifted window, patch merging or PWAM statistic crosses a patch border),
  then stitches the per-patch feature maps back into a pyramid; the decoder pools the R x R
  regions as in #2. So #1 differs from #2 only by the loss of global context in the visual
  encoder, which is the point the paper makes about it. The pixel decoder still sees the
  stitched maps as a whole. ``G = min(R, S // (patch_size * window_size))``
  (:func:`hard_split_grid`): a patch is never smaller than one first-stage attention window. At
  the paper's scale (480 px, window 12) that is G = 10 = R, the paper's setting; at 96 px with
  window 6 it is G = 4 (24-px patches), because 100 patches of 9.6 px each, padded to a window,
  cost about 50 times the whole image on a CPU (9 s per batch of 16, measured).
* "w/o minimap" (#3) is not a model change: ``LossConfig.region_weight = 0`` (the queries become
  plain learnable queries, as the paper says).

``rla_mode`` -- region-region and region-language modelling (Table 3). The released ReLA layer is
RIA -> language cross-attention (layers ``lang_att_layers``) -> region self-attention -> FFN:

* ``"full"`` (#4, ReLA): both attentions.
* ``"product"`` (#1, baseline): "RLA is replaced by point-wise multiplying region features and
  globally averaged language features": both attentions removed; every layer does
  ``out = LN(out + out * W l_mean)`` with ``l_mean`` the mean word feature over real tokens.
* ``"product+lang"`` (#2): the baseline plus the language cross-attention.
* ``"product+region"`` (#3): the baseline plus the region self-attention. The paper measures both
  #2 (+2.00 gIoU) and #3 (+3.85) against #1, and #4 (+5.07) holds both, so #2 and #3 each add one
  attention to the baseline; we keep the product in #2/#3 because the text says the attentions
  are "added onto the baseline model".

``head`` -- ``"onestage"``: the LAVT-style baseline. The same language-fused backbone and text
encoder feed :class:`LAVTHead` (LAVT's top-down conv decoder, res5 -> res2, to 2-class logits at
stride 4) instead of pixel decoder + ReLA decoder. It has no region queries and no no-target head;
a mask with fewer than ``min_pixels_for(S)`` positive pixels means "no target" (paper §5.3: "less
than 50 positive pixels" at 480 x 480, scaled by image area). It is trained with the mask loss
only (``LossConfig.region_weight = no_target_weight = 0``).

"ReLA-50pix" (Table 6) is the trained ReLA tested with its no-target head disabled; it needs no
training (:func:`pixel_rule` / :class:`PixelRuleModel`, and ``nt_rule="pixels"`` in
:mod:`gres.experiments`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gres.config import ModelConfig
from gres.model.gres_model import GRESModel, GRESOutput
from gres.model.rela import ReLADecoder

RIA_MODES = ("attention", "hard_split_decoder", "hard_split_input")
RLA_MODES = ("full", "product", "product+lang", "product+region")
HEADS = ("rela", "onestage")

PAPER_MIN_PIXELS = 50  # §5.3: "output masks with less than 50 positive pixels are cleared"
PAPER_IMAGE_SIZE = 480  # INPUT.IMAGE_SIZE of the paper's experiments


def min_pixels_for(image_size: int, base: int = PAPER_MIN_PIXELS,
                   base_size: int = PAPER_IMAGE_SIZE) -> int:
    """The paper's 50-pixel rule scaled to an S x S image by area: ``max(1, round(50 S² / 480²))``.

    The rule keeps the same fraction of the image (about 0.022 %): 50 at 480, 2 at 96, 4 at 128.
    """
    return max(1, round(base * (image_size / base_size) ** 2))


def pixel_rule_logits(mask_logits: Tensor, size: tuple[int, int], min_pixels: int) -> Tensor:
    """No-target logits from the positive-pixel count of the mask at ``size``.

    Args:
        mask_logits: (B, 2, h, w) target-mask logits.
        size: (H, W) evaluation size (the mask is upsampled like :func:`postprocess`).
        min_pixels: fewer positive pixels than this means "no target".

    Returns:
        (B, 2) float logits, ``[0, 1]`` (no target) or ``[1, 0]`` (target); constant (no grad).
    """
    with torch.no_grad():
        up = F.interpolate(mask_logits.detach().float(), size=size, mode="bilinear",
                           align_corners=False)  # (B, 2, H, W)
        count = (up[:, 1].sigmoid() > up[:, 0].sigmoid()).flatten(1).sum(1)  # (B,)
        nt = count < min_pixels
        return torch.stack([(~nt).float(), nt.float()], dim=1)  # (B, 2)


def pixel_rule(output: GRESOutput, size: int | tuple[int, int], min_pixels: int) -> GRESOutput:
    """The output with the no-target head replaced by the pixel-count rule (ReLA-50pix)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    nt = pixel_rule_logits(output.mask_logits, size, min_pixels)
    return dataclasses.replace(output, nt_logits=nt.to(output.mask_logits.dtype))


class PixelRuleModel(nn.Module):
    """Wrap a trained model so that "no target" comes from the mask's pixel count (Table 6,
    "ReLA-50pix": the no-target classifier disabled). Shares the wrapped model's weights.

    Args:
        model: a GRES model.
        min_pixels: threshold; default the paper's 50 scaled to the input size.
    """

    def __init__(self, model: nn.Module, min_pixels: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.min_pixels = min_pixels

    def forward(self, images: Tensor, input_ids: Tensor, text_mask: Tensor, **kw: Any) -> GRESOutput:
        out = self.model(images, input_ids, text_mask, **kw)
        H, W = images.shape[-2:]
        k = self.min_pixels if self.min_pixels is not None else min_pixels_for(H)
        return pixel_rule(out, (H, W), k)


# --------------------------------------------------------------------------------------------------
# Table 2 #1: hard split at the input
# --------------------------------------------------------------------------------------------------
def hard_split_grid(cfg: ModelConfig) -> int:
    """Patches per side G of the hard input split: ``min(R, S // (patch_size * window_size))``,
    at least 1 (see the module docstring)."""
    side = cfg.swin.patch_size * cfg.swin.window_size
    return max(1, min(cfg.decoder.region_grid, cfg.image_size // side))


class HardSplitBackbone(nn.Module):
    """Encode G x G image patches independently with the language-fused Swin (Table 2, #1).

    The image (B, 3, H, W) is resized to ``G·c`` (``c`` = the patch side, the smallest multiple
    of the Swin patch size >= H / G) and cut into B·G² patches; each patch goes through the
    backbone with its expression (PWAM fusion intact). The per-patch stage maps are stitched into
    (B, C_i, G·h_i, G·w_i) and area-resampled to the usual strides (H/4, ..., H/32), so the rest
    of the model is unchanged. Blending happens only where a resampling cell straddles two
    patches.

    Args:
        swin: a :class:`gres.model.swin.MultiModalSwin` (its ``num_features`` etc. are exposed).
        grid: G, patches per side (:func:`hard_split_grid`; the paper: G = R, patch q = region q).
    """

    def __init__(self, swin: nn.Module, grid: int) -> None:
        super().__init__()
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        self.swin = swin
        self.grid = grid
        self.num_features = swin.num_features
        self.strides = swin.strides

    def patch_side(self, size: int) -> int:
        """Side c of one patch for an input side ``size``."""
        p = self.swin.patch_size
        return p * math.ceil(size / (self.grid * p))

    def forward(self, images: Tensor, lang_feats: Tensor, text_mask: Tensor) -> dict[str, Tensor]:
        """images: (B, 3, H, W) normalised; lang_feats (B, L, Dt); text_mask (B, L) bool.

        Returns:
            ``res2..res5`` (B, C_i, H/s_i, W/s_i), like the Swin.
        """
        B, _, H, W = images.shape
        R = self.grid
        ch, cw = self.patch_side(H), self.patch_side(W)
        x = F.interpolate(images, size=(R * ch, R * cw), mode="bilinear", align_corners=False)
        x = x.view(B, 3, R, ch, R, cw).permute(0, 2, 4, 1, 3, 5).reshape(B * R * R, 3, ch, cw)
        lang = lang_feats.repeat_interleave(R * R, dim=0)  # (B·R², L, Dt)
        mask = text_mask.repeat_interleave(R * R, dim=0)  # (B·R², L)
        swin = self.swin
        lang, word_mask = swin._prepare_language(x, lang, mask) if swin.use_fusion else (None, None)
        tokens = swin.patch_embed(x)  # (B·R², ch/4, cw/4, C)
        outs: dict[str, Tensor] = {}
        for i, layer in enumerate(swin.layers):
            stage = layer(tokens, lang, word_mask)
            f = getattr(swin, f"norm{i}")(stage.out)  # (B·R², h, w, C)
            _, h, w, C = f.shape
            f = f.view(B, R, R, h, w, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, R * h, R * w)
            s = self.strides[i]
            target = (H // s, W // s)
            if f.shape[-2:] != target:
                f = F.adaptive_avg_pool2d(f, target) if R * h >= target[0] and R * w >= target[1] \
                    else F.interpolate(f, size=target, mode="bilinear", align_corners=False)
            outs[f"res{i + 2}"] = f.contiguous()
            if stage.next_x is not None:
                tokens = stage.next_x
        return outs


# --------------------------------------------------------------------------------------------------
# Tables 2 and 3: the decoder variants
# --------------------------------------------------------------------------------------------------
class VariantReLADecoder(ReLADecoder):
    """:class:`ReLADecoder` (``variant="main"``) with the region-feature and RLA switches.

    Args:
        ria_mode: one of :data:`RIA_MODES` (``hard_split_input`` pools like
            ``hard_split_decoder``; the difference is in the backbone).
        rla_mode: one of :data:`RLA_MODES`.
        region_grid: R (needed to pool levels into R x R cells).
        **kwargs: :class:`ReLADecoder` arguments.
    """

    def __init__(self, *, ria_mode: str, rla_mode: str, region_grid: int, **kwargs: Any) -> None:
        if kwargs.get("variant", "main") != "main":
            raise ValueError("the ablation switches are defined on the released ('main') decoder")
        if ria_mode not in RIA_MODES:
            raise ValueError(f"ria_mode must be one of {RIA_MODES}, got {ria_mode!r}")
        if rla_mode not in RLA_MODES:
            raise ValueError(f"rla_mode must be one of {RLA_MODES}, got {rla_mode!r}")
        super().__init__(**kwargs)
        self.ria_mode, self.rla_mode, self.region_grid = ria_mode, rla_mode, region_grid
        hidden = kwargs["hidden_dim"]
        self.use_lang_att = rla_mode in ("full", "product+lang")
        self.use_region_att = rla_mode in ("full", "product+region")
        self.use_product = rla_mode.startswith("product")
        if not self.use_region_att:
            del self.RLA_vision  # no parameter may sit outside the graph (DDP, optimiser)
        if not self.use_lang_att:
            del self.RLA_lang_att, self.lang_weight, self.lang_proj
        if self.use_product:
            # Table 3 #1: region features x globally averaged language feature, every layer.
            self.RLA_product_proj = nn.Linear(kwargs["lang_dim"], hidden)
            self.RLA_product_norm = nn.ModuleList(
                nn.LayerNorm(hidden) for _ in range(self.num_layers))
        self._level_sizes: list[tuple[int, int]] = []
        self._text_mask: Tensor | None = None  # set by VariantGRESModel for the masked mean

    def forward(self, multi_scale: Sequence[Tensor], mask_features: Tensor, lang_feats: Tensor,
                **kwargs: Any):
        """As :meth:`ReLADecoder.forward` (the level sizes are kept for the hard split)."""
        self._level_sizes = [tuple(x.shape[-2:]) for x in multi_scale]
        return super().forward(multi_scale, mask_features, lang_feats, **kwargs)

    def _hard_pool(self, i: int, output: Tensor, src: Tensor) -> Tensor:
        """RIA with its attention map fixed to "average the region's own cell" (Table 2, #2).

        Args:
            output: (B, P, D) region queries.
            src: (B, h·w, D) pyramid level (level embedding added).
        """
        B, _, D = src.shape
        h, w = self._level_sizes[i % self.num_levels]
        R = self.region_grid
        grid = src.transpose(1, 2).reshape(B, D, h, w)  # (B, D, h, w)
        pooled = F.adaptive_avg_pool2d(grid, R).flatten(2).transpose(1, 2)  # (B, P, D)
        layer = self.RIA_layers[i]
        mha = layer.multihead_attn
        value = F.linear(pooled, mha.in_proj_weight[2 * D:], mha.in_proj_bias[2 * D:])  # (B, P, D)
        return layer.norm(output + layer.dropout(mha.out_proj(value)))

    def _global_language(self, lang_feats: Tensor) -> Tensor:
        """(B, L, Dt) -> (B, Dt): mean over real tokens (all tokens if no mask was given)."""
        m = self._text_mask
        if m is None or m.shape != lang_feats.shape[:2]:
            return lang_feats.mean(dim=1)
        w = m.to(lang_feats.dtype).unsqueeze(-1)  # (B, L, 1)
        return (lang_feats * w).sum(1) / w.sum(1).clamp(min=1.0)

    def _layer_main(self, i, output, src, pos, query_pos, lang_feats, blocked, record):
        """One layer: RIA (or hard pooling) -> [product] -> [language att.] -> [region att.] -> FFN."""
        if self.ria_mode == "attention":
            output = self.RIA_layers[i](output, src, blocked=blocked, pos=pos, query_pos=query_pos)
        else:
            output = self._hard_pool(i, output, src)
        record("dec_ria_out", output)
        if self.use_product:
            g = self.RLA_product_proj(self._global_language(lang_feats))  # (B, D)
            output = self.RLA_product_norm[i](output + output * g[:, None, :])
        if self.use_lang_att and i in self.lang_att_layers:
            lang = self.lang_proj(lang_feats)  # (B, L, D)
            lang_out = self.RLA_lang_att(output, lang)
            record("dec_rla_lang_att_out", lang_out)
            output = output + lang_out * torch.sigmoid(self.lang_weight) * self.rla_weight
            record("dec_after_lang", output)
        if self.use_region_att:
            output = self.RLA_vision[i](output, query_pos=query_pos)
        record("dec_rla_out", output)
        output = self.transformer_ffn_layers[i](output)
        record("dec_queries", output)
        return output, output


class VariantGRESModel(GRESModel):
    """:class:`GRESModel` whose decoder also sees the text mask (for the product baseline)."""

    def forward(self, images: Tensor, input_ids: Tensor, text_mask: Tensor, **kw: Any) -> GRESOutput:
        dec = self.decoder
        if isinstance(dec, VariantReLADecoder):
            dec._text_mask = text_mask
        try:
            return super().forward(images, input_ids, text_mask, **kw)
        finally:
            if isinstance(dec, VariantReLADecoder):
                dec._text_mask = None


# --------------------------------------------------------------------------------------------------
# Tables 5/6: one-stage LAVT-style baseline
# --------------------------------------------------------------------------------------------------
class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class LAVTHead(nn.Module):
    """LAVT's segmentation head (``SimpleDecoding``): top-down from res5 to res2.

    At each step the coarser map is upsampled bilinearly to the next finer stage, concatenated
    with it and passed through two 3x3 conv-BN-ReLU; a 1x1 conv gives 2-class logits at stride 4.

    Args:
        in_channels: C1..C4 of res2..res5.
        hidden_dim: width of the decoding convs.
    """

    def __init__(self, *, in_channels: Sequence[int], hidden_dim: int) -> None:
        super().__init__()
        c1, c2, c3, c4 = in_channels
        self.block3 = nn.Sequential(ConvBNReLU(c4 + c3, hidden_dim), ConvBNReLU(hidden_dim, hidden_dim))
        self.block2 = nn.Sequential(ConvBNReLU(hidden_dim + c2, hidden_dim),
                                    ConvBNReLU(hidden_dim, hidden_dim))
        self.block1 = nn.Sequential(ConvBNReLU(hidden_dim + c1, hidden_dim),
                                    ConvBNReLU(hidden_dim, hidden_dim))
        self.classifier = nn.Conv2d(hidden_dim, 2, 1)

    def forward(self, feats: dict[str, Tensor]) -> Tensor:
        """res2..res5 -> (B, 2, H/4, W/4) logits (channel 1 = target)."""
        x = feats["res5"]
        for name, block in (("res4", self.block3), ("res3", self.block2), ("res2", self.block1)):
            skip = feats[name]
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.classifier(x)


class OneStageModel(GRESModel):
    """Language-fused Swin + text encoder + :class:`LAVTHead` (Tables 5/6 one-stage baseline).

    ``GRESOutput`` fields: ``mask_logits`` from the head; ``nt_logits`` from the pixel rule at the
    input size (constant, not trained); ``region_logits`` (B, 1, 2) and ``region_masks``
    (B, 1, H/4, W/4) are zeros (no regions; the minimap loss weight must be 0).

    Args:
        backbone, text_encoder: as :class:`GRESModel`.
        head: :class:`LAVTHead`.
        min_pixels: pixel-rule threshold (default: scaled from the paper's 50 per input size).
        pixel_mean, pixel_std, size_divisibility: as :class:`GRESModel`.
    """

    def __init__(self, *, backbone: nn.Module, text_encoder: nn.Module, head: LAVTHead,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float],
                 size_divisibility: int = 32, min_pixels: int | None = None) -> None:
        super().__init__(backbone=backbone, text_encoder=text_encoder, pixel_decoder=None,
                         decoder=None, pixel_mean=pixel_mean, pixel_std=pixel_std,
                         size_divisibility=size_divisibility)
        self.head = head
        self.min_pixels = min_pixels

    def forward(self, images: Tensor, input_ids: Tensor, text_mask: Tensor, *,
                return_extras: bool = False, **_: Any) -> GRESOutput:
        self.check_inputs(images, input_ids, text_mask)
        B, _, H, W = images.shape
        lang = self.text_encoder(input_ids, text_mask)  # (B, L, Dt)
        feats = self.backbone(self.normalize(images), lang, text_mask)
        mask_logits = self.head(feats)  # (B, 2, H/4, W/4)
        k = self.min_pixels if self.min_pixels is not None else min_pixels_for(H)
        nt_logits = pixel_rule_logits(mask_logits, (H, W), k).to(mask_logits.dtype)
        h, w = mask_logits.shape[-2:]
        extras: dict[str, Tensor] = {}
        if return_extras:
            extras["text_last_hidden_state"] = lang.detach()
            extras.update({f"backbone_{n}": f.detach() for n, f in feats.items()})
        return GRESOutput(
            mask_logits=mask_logits,
            region_logits=mask_logits.new_zeros(B, 1, 2),
            nt_logits=nt_logits,
            region_masks=mask_logits.new_zeros(B, 1, h, w),
            extras=extras,
        )


# --------------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------------
def _decoder_kwargs(cfg: ModelConfig, lang_dim: int) -> dict[str, Any]:
    """The :class:`ReLADecoder` arguments ``build_model`` derives from ``cfg`` (kept in step with
    it; ``tests/test_variants.py`` checks that ``ria_mode="attention"``, ``rla_mode="full"``
    reproduces the standard decoder exactly)."""
    d, p = cfg.decoder, cfg.pixel_decoder
    return dict(
        in_channels=p.conv_dim, lang_dim=lang_dim, hidden_dim=d.hidden_dim, num_heads=d.num_heads,
        ffn_dim=d.ffn_dim, num_layers=d.num_layers, num_queries=d.region_grid**2,
        mask_dim=p.mask_dim, rla_weight=d.rla_weight, lang_att_layers=d.lang_att_layers,
        mask_embed_layers=d.mask_embed_layers, nt_embed_layers=d.nt_embed_layers,
        dropout=d.dropout, variant=d.variant, eq1_reduction=d.eq1_reduction,
        region_prior=d.region_prior,
    )


def build_variant(cfg: ModelConfig, *, load_pretrained: bool = True) -> nn.Module:
    """Build the variant selected by ``cfg.head`` / ``cfg.ria_mode`` / ``cfg.rla_mode``.

    The standard model of the same config (every switch at its default) is built first by
    :func:`gres.model.build_model`, so the backbone, text encoder, pixel decoder and their
    pretrained weights are exactly those of full ReLA; then the variant's parts replace the
    standard ones.

    Raises:
        ValueError: an unknown switch value, or a combination that is not defined.
    """
    from gres.model.gres_model import build_model

    if cfg.head not in HEADS:
        raise ValueError(f"ModelConfig.head must be one of {HEADS}, got {cfg.head!r}")
    if cfg.ria_mode not in RIA_MODES:
        raise ValueError(f"ModelConfig.ria_mode must be one of {RIA_MODES}, got {cfg.ria_mode!r}")
    if cfg.rla_mode not in RLA_MODES:
        raise ValueError(f"ModelConfig.rla_mode must be one of {RLA_MODES}, got {cfg.rla_mode!r}")
    if cfg.head == "onestage" and (cfg.ria_mode != "attention" or cfg.rla_mode != "full"):
        raise ValueError("head='onestage' has no regions: ria_mode / rla_mode must stay default")
    standard = dataclasses.replace(cfg, head="rela", ria_mode="attention", rla_mode="full")
    base = build_model(standard, load_pretrained=load_pretrained)
    if cfg.head == "onestage":
        model: nn.Module = OneStageModel(
            backbone=base.backbone,
            text_encoder=base.text_encoder,
            head=LAVTHead(in_channels=list(base.backbone.num_features),
                          hidden_dim=cfg.decoder.hidden_dim),
            pixel_mean=cfg.pixel_mean,
            pixel_std=cfg.pixel_std,
            size_divisibility=cfg.size_divisibility,
        )
    else:
        backbone = base.backbone
        if cfg.ria_mode == "hard_split_input":
            backbone = HardSplitBackbone(base.backbone, hard_split_grid(cfg))
        decoder = VariantReLADecoder(
            ria_mode=cfg.ria_mode, rla_mode=cfg.rla_mode, region_grid=cfg.decoder.region_grid,
            **_decoder_kwargs(cfg, base.text_encoder.hidden_size),
        )
        model = VariantGRESModel(
            backbone=backbone, text_encoder=base.text_encoder, pixel_decoder=base.pixel_decoder,
            decoder=decoder, pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std,
            size_divisibility=cfg.size_divisibility,
        )
    model.cfg = cfg
    return model


__all__ = [
    "HEADS",
    "RIA_MODES",
    "RLA_MODES",
    "HardSplitBackbone",
    "LAVTHead",
    "OneStageModel",
    "PixelRuleModel",
    "VariantGRESModel",
    "VariantReLADecoder",
    "build_variant",
    "hard_split_grid",
    "min_pixels_for",
    "pixel_rule",
    "pixel_rule_logits",
]
