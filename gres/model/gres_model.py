"""GRES model: language-fused Swin + BERT + pixel decoder + ReLA decoder (official ``GRES``).

``GRESModel`` receives its four built submodules; :func:`build_model` is the only place that reads
a :class:`gres.config.ModelConfig`. The forward pass follows ``GRES.forward`` (spec §1.0):

1. normalise the RGB 0..255 image with ``pixel_mean`` / ``pixel_std`` (inside the model);
2. BERT last hidden state of the 20 tokens (B, L, Dt);
3. backbone pyramid res2..res5 (PWAM fusion in every stage, padding tokens masked);
4. pixel decoder: ``mask_features`` (stride 4) and three refined maps (strides 32, 16, 8);
5. ReLA decoder: target-mask logits, minimap logits, no-target logits, region masks.

:func:`postprocess` turns the output into a binary mask and a no-target flag exactly as the
official inference (spec §4).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gres.config import ModelConfig
from gres.model.pixel_decoder import MSDeformAttnPixelDecoder
from gres.model.rela import ReLADecoder
from gres.model.text import validate_tokens


@dataclass
class GRESOutput:
    """Model outputs (last decoder layer). Spatial maps are at stride 4 of the input (H/4, W/4).

    Attributes:
        mask_logits: (B, 2, H/4, W/4) target-mask logits; channel 1 = target, channel 0 =
            background (official ``pred_masks``).
        region_logits: (B, P, 2) minimap logits, P = region_grid²; region q is minimap cell
            (q // R, q % R); index 1 = region contains the target (official ``pred_logits``).
        nt_logits: (B, 2) no-target logits; index 1 = no target (official ``nt_label``).
        region_masks: (B, P, H/4, W/4) region-mask logits M_r (official ``all_masks``).
        extras: intermediates when ``return_extras=True`` (keys of the official test vectors:
            ``text_last_hidden_state``, ``backbone_res2..5``, ``backbone_swin_tokens_s0..3``
            (Swin path before each PWAM, (B, H_i·W_i, C_i)), ``pixdec_mask_features``,
            ``pixdec_ms0..2``, ``dec_*``); empty otherwise.
        aux: deep supervision (``DecoderConfig.deep_supervision``, training only): one dict per
            decoder layer before the last, with that layer's ``mask_logits``, ``region_logits``
            and ``nt_logits``; empty otherwise.
    """

    mask_logits: Tensor
    region_logits: Tensor
    nt_logits: Tensor
    region_masks: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)
    aux: list[dict[str, Tensor]] = field(default_factory=list)


class GRESModel(nn.Module):
    """ReLA for generalized referring expression segmentation.

    Args:
        backbone: :class:`gres.model.swin.MultiModalSwin` (images, words, text_mask) -> res2..5.
        text_encoder: :class:`gres.model.text.TextEncoder` (input_ids, text_mask) -> (B, L, Dt).
        pixel_decoder: :class:`MSDeformAttnPixelDecoder`.
        decoder: :class:`ReLADecoder`.
        pixel_mean: RGB mean on the 0..255 scale.
        pixel_std: RGB std on the 0..255 scale.
        size_divisibility: input sides must be multiples of this (32: four exact strides).
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        text_encoder: nn.Module,
        pixel_decoder: MSDeformAttnPixelDecoder,
        decoder: ReLADecoder,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int = 32,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.decoder = decoder
        self.text_encoder = text_encoder
        self.size_divisibility = size_divisibility
        # GRES.py:58-59: non-persistent buffers, not in checkpoints
        mean = torch.tensor(pixel_mean).view(1, -1, 1, 1)
        std = torch.tensor(pixel_std).view(1, -1, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def check_inputs(self, images: Tensor, input_ids: Tensor, text_mask: Tensor) -> None:
        """Raise ``ValueError`` naming the problem for malformed inputs."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) RGB, got shape {tuple(images.shape)}")
        B, _, H, W = images.shape
        d = self.size_divisibility
        if H % d or W % d:
            raise ValueError(
                f"input size {H}x{W} is not a multiple of {d}: resize the image (ReLA: 480x480) "
                f"so that both sides are multiples of {d}"
            )
        if input_ids.ndim != 2 or input_ids.shape[0] != B:
            raise ValueError(f"input_ids must be (B={B}, L), got shape {tuple(input_ids.shape)}")
        vocab = getattr(self.text_encoder, "vocab_size", None)
        if vocab is None:  # an encoder that does not expose its vocabulary: ids are unchecked
            vocab = torch.iinfo(torch.int64).max
        validate_tokens(input_ids, text_mask, vocab)

    def normalize(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 or float RGB 0..255 -> normalised float."""
        return (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std

    def forward(
        self,
        images: Tensor,
        input_ids: Tensor,
        text_mask: Tensor,
        *,
        return_extras: bool = False,
        forced_attn_masks: Sequence[Tensor] | None = None,
    ) -> GRESOutput:
        """Segment the expressions.

        Args:
            images: (B, 3, H, W) RGB, uint8 or float on the 0..255 scale (not normalised);
                H and W multiples of ``size_divisibility``.
            input_ids: (B, L) int64 token ids (0-padded).
            text_mask: (B, L) bool, True = real token (every row needs one).
            return_extras: record intermediates in ``GRESOutput.extras``.
            forced_attn_masks: teacher forcing of the decoder attention masks (see
                :meth:`ReLADecoder.forward`).

        Returns:
            :class:`GRESOutput`.
        """
        self.check_inputs(images, input_ids, text_mask)
        lang = self.text_encoder(input_ids, text_mask)  # (B, L, Dt)
        images = self.normalize(images)
        if return_extras:
            feats = self.backbone(images, lang, text_mask, return_swin_tokens=True)
        else:
            feats = self.backbone(images, lang, text_mask)  # res2..res5
        pix = self.pixel_decoder(feats)
        dec = self.decoder(
            pix.multi_scale,
            pix.mask_features,
            lang,
            return_extras=return_extras,
            forced_attn_masks=forced_attn_masks,
        )
        extras: dict[str, Tensor] = {}
        if return_extras:
            extras["text_last_hidden_state"] = lang.detach()
            for name, value in feats.items():  # res2..res5 and swin_tokens_s0..s3
                extras[f"backbone_{name}"] = value.detach()
            extras["pixdec_mask_features"] = pix.mask_features.detach()
            for i, m in enumerate(pix.multi_scale):
                extras[f"pixdec_ms{i}"] = m.detach()
            extras.update(dec.extras)
        return GRESOutput(
            mask_logits=dec.mask_logits,
            region_logits=dec.region_logits,
            nt_logits=dec.nt_logits,
            region_masks=dec.region_masks,
            extras=extras,
            aux=dec.aux,
        )


@torch.no_grad()
def postprocess(
    output: GRESOutput, size: int | tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Official inference (spec §4): masks and no-target decisions.

    The 2-channel logits are upsampled bilinearly (``align_corners=False``) to ``size``, passed
    through a sigmoid, and each pixel takes the argmax of the two probabilities (ties, e.g. two
    saturated channels, go to class 0). No-target is the argmax of ``sigmoid(nt_logits)``. As in
    the official evaluation, the mask is NOT emptied when no-target is predicted.

    Args:
        output: a :class:`GRESOutput`.
        size: output side S or (h, w) (ReLA evaluates at the 480×480 input size).

    Returns:
        ``pred_mask`` (B, h, w) bool, ``pred_no_target`` (B,) bool, ``nt_prob`` (B,) float =
        ``sigmoid(nt_logits)[:, 1]``.
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    logits = F.interpolate(
        output.mask_logits.float(), size=size, mode="bilinear", align_corners=False
    )  # (B, 2, h, w)
    probs = logits.sigmoid()  # (B, 2, h, w)
    pred_mask = probs[:, 1] > probs[:, 0]  # argmax; a tie goes to class 0
    nt_probs = output.nt_logits.float().sigmoid()  # (B, 2)
    pred_no_target = nt_probs[:, 1] > nt_probs[:, 0]
    return pred_mask, pred_no_target, nt_probs[:, 1]


# --------------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------------
def _text_architecture(text_cfg) -> nn.Module:
    """The text encoder's architecture without its pretrained weights.

    ``"minilm"`` and local folders give their ``config.json``; a hub name uses the Hugging Face
    cache if it holds the config, else the TextConfig fields (which then must describe the model).
    """
    from gres.model.text import MINILM, TextEncoder, build_text_encoder, minilm_path

    name = text_cfg.name_or_path
    if name is not None:
        from transformers import AutoConfig

        source = str(minilm_path()) if name == MINILM else name
        try:
            config = AutoConfig.from_pretrained(source)
        except OSError:
            config = None
        if config is not None:
            return TextEncoder.from_config(config, text_cfg.attn_implementation)
    return build_text_encoder(dataclasses.replace(text_cfg, name_or_path=None))


def is_standard_rela(cfg: ModelConfig) -> bool:
    """True for the full ReLA model (no ablation switch of ``gres.model.variants`` set)."""
    return (
        getattr(cfg, "head", "rela") == "rela"
        and getattr(cfg, "ria_mode", "attention") == "attention"
        and getattr(cfg, "rla_mode", "full") == "full"
    )


def build_model(cfg: ModelConfig, *, load_pretrained: bool = True) -> nn.Module:
    """Build the model of a :class:`gres.config.ModelConfig`.

    Args:
        cfg: the model configuration.
        load_pretrained: load the pretrained weights the config names (Swin ``swin.pretrained``
            and BERT ``text.name_or_path``). False builds the same architecture with random
            weights (used when all weights come from a checkpoint; needs no network).

    Returns:
        A :class:`GRESModel` (or, for the ablation switches ``head`` / ``ria_mode`` /
        ``rla_mode``, the variant built by ``gres.model.variants``), with ``.cfg`` set.
    """
    if not is_standard_rela(cfg):
        try:
            from gres.model import variants
        except ImportError as err:
            raise ValueError(
                f"model variant head={cfg.head!r} ria_mode={cfg.ria_mode!r} "
                f"rla_mode={cfg.rla_mode!r} needs gres.model.variants, which is not available"
            ) from err
        return variants.build_variant(cfg, load_pretrained=load_pretrained)

    from gres.model.swin import build_swin, load_pretrained_swin
    from gres.model.text import build_text_encoder

    if cfg.image_size % cfg.size_divisibility:
        raise ValueError(
            f"image_size {cfg.image_size} is not a multiple of size_divisibility "
            f"{cfg.size_divisibility}"
        )
    d = cfg.decoder
    if d.region_grid < 1:
        raise ValueError(f"region_grid must be >= 1, got {d.region_grid}")
    text_encoder = build_text_encoder(cfg.text) if load_pretrained else _text_architecture(cfg.text)
    lang_dim = text_encoder.hidden_size
    backbone = build_swin(cfg.swin, lang_dim)
    if load_pretrained and cfg.swin.pretrained:
        load_pretrained_swin(backbone, cfg.swin.pretrained)
    p = cfg.pixel_decoder
    pixel_decoder = MSDeformAttnPixelDecoder(
        in_channels=list(backbone.num_features),
        conv_dim=p.conv_dim,
        mask_dim=p.mask_dim,
        num_layers=p.num_layers,
        num_heads=p.num_heads,
        num_points=p.num_points,
        ffn_dim=p.ffn_dim,
        norm_groups=p.norm_groups,
        dropout=p.dropout,
        force_fp32=p.force_fp32,
        core=p.deform_core,
    )
    decoder = ReLADecoder(
        in_channels=p.conv_dim,
        lang_dim=lang_dim,
        hidden_dim=d.hidden_dim,
        num_heads=d.num_heads,
        ffn_dim=d.ffn_dim,
        num_layers=d.num_layers,
        num_queries=d.region_grid**2,
        mask_dim=p.mask_dim,
        rla_weight=d.rla_weight,
        lang_att_layers=d.lang_att_layers,
        mask_embed_layers=d.mask_embed_layers,
        nt_embed_layers=d.nt_embed_layers,
        dropout=d.dropout,
        variant=d.variant,
        eq1_reduction=d.eq1_reduction,
        region_prior=d.region_prior,
        deep_supervision=d.deep_supervision,
    )
    model = GRESModel(
        backbone=backbone,
        text_encoder=text_encoder,
        pixel_decoder=pixel_decoder,
        decoder=decoder,
        pixel_mean=cfg.pixel_mean,
        pixel_std=cfg.pixel_std,
        size_divisibility=cfg.size_divisibility,
    )
    model.cfg = cfg
    return model


def cast_for_bf16_inference(model: nn.Module) -> nn.Module:
    """Opt-in fast CPU inference: store the matmul / conv weights in bfloat16.

    Run the result under ``torch.autocast("cpu", dtype=torch.bfloat16)`` without gradients.
    Linear, Conv and attention projection weights become bf16 (autocast would otherwise cast
    them again at every call); norms, embeddings, relative-position tables and scalar gates stay
    fp32 (autocast runs norms and softmax in fp32). The pixel decoder's official fp32 island is
    switched off. This rounds the weights in place: use it on an inference copy, never to train.

    Returns:
        ``model`` (modified in place).
    """
    from gres.model.rela import MultiheadAttention

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            module.to(torch.bfloat16)
        elif isinstance(module, MultiheadAttention):
            module.in_proj_weight.data = module.in_proj_weight.data.bfloat16()
            module.in_proj_bias.data = module.in_proj_bias.data.bfloat16()
        elif isinstance(module, MSDeformAttnPixelDecoder):
            module.force_fp32 = False
    return model


def compile_for_inference(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Opt-in: ``torch.compile`` the backbone, pixel decoder and decoder in place.

    Inductor fuses the elementwise work (norms, GELU, residual adds, window copies) around the
    matmuls; on CPU it generates C++ and needs a compiler (gcc/clang) at run time, and the first
    call per input shape compiles (a minute or more for Swin-B). Parameter names and the
    state dict are unchanged (``nn.Module.compile``). Outputs match eager within float rounding
    (operations are reordered), not bitwise: the official-equivalence tests run eager.

    Args:
        model: a :class:`GRESModel` (eval mode).
        compile_kwargs: passed to ``torch.compile`` (default ``dynamic=False``).

    Returns:
        ``model`` (modified in place).
    """
    compile_kwargs.setdefault("dynamic", False)
    for name in ("backbone", "pixel_decoder", "decoder"):
        getattr(model, name).compile(**compile_kwargs)
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts per top-level submodule and in total."""
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


