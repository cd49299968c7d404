"""ReLA: region-based GRES decoder (paper Sec. 3; official ``MultiScaleMaskedReferringDecoder``).

``P = R·R`` learned region queries (R = ``region_grid``; query q is minimap cell (q // R, q % R))
are refined by ``num_layers`` layers. Each layer (spec §1.4, branch ``main``):

* **RIA** (region-image interaction): masked cross-attention from the regions to one level of the
  pixel-decoder pyramid, cycling coarsest first (H/32, H/16, H/8, H/32, ...). A region attends
  only where its current region mask says "inside": ``sigmoid(bilinear(M_r)) >= 0.5``; rows that
  would block every pixel are unblocked. The masks are detached.
* **RLA** (region-language activation): at the layers in ``lang_att_layers`` (layer 0 in the
  released code) a language cross-attention,
  ``out = out + rla_weight · sigmoid(lang_weight) · LN(out + MHA(out, L, L))`` with
  ``L = lang_proj(text)``: no positional encoding, no key-padding mask (padding tokens are
  attended, as in the official code); then region self-attention.
* an FFN. All sub-layers are post-norm.

Heads on ``R = decoder_norm(out)``: region masks ``M_r = mask_embed(R) · F_mask`` (logits), the
minimap ``x_r = minimap_embed(R)`` (two logits per region) and the no-target logits
``E = mean_q nt_embed(R)``. The output mask is the code's version of paper Eq. 1,
``Σ_q x_r[q, a] · M_r[q]`` for both channels a, with raw logits on both factors.

``variant="original"`` is the paper branch (spec §1.8): RLA only at the last layer, as a gated
projection of language cross-attention plus region self-attention, and the minimap / no-target
heads read a second norm. The spec writes ``RLA_lang(out, lang_proj(L))`` and ``RLA_region(out)``
without positional encodings; we follow it literally (no query positions, no key-padding mask).

Module names mirror the official keys under ``sem_seg_head.predictor.`` (spec §8).
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gres.model.pixel_decoder import PositionEmbeddingSine, c2_xavier_fill

# --------------------------------------------------------------------------------------------------
# Attention building blocks (nn.MultiheadAttention-compatible parameters, batch-first, SDPA)
# --------------------------------------------------------------------------------------------------


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter names.

    ``in_proj_weight`` (3D, D) stacks the q, k, v projections; ``out_proj`` is a Linear. Tensors
    are batch-first and the product runs through ``F.scaled_dot_product_attention``.

    Args:
        embed_dim: width D.
        num_heads: heads nh.
        dropout: attention-probability dropout (training only).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)  # nn.MultiheadAttention._reset_parameters

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, blocked: Tensor | None = None
    ) -> Tensor:
        """Attend.

        Args:
            query: (B, Q, D).
            key: (B, K, D).
            value: (B, K, D).
            blocked: (B, Q, K) bool, True = the query may NOT attend to that key (the
                ``nn.MultiheadAttention`` ``attn_mask`` convention), shared by all heads; or a
                float (B, Q, K) added to the attention logits (-inf = blocked; the soft grid
                prior, :func:`grid_prior_bias`).

        Returns:
            (B, Q, D).
        """
        B, Q, D = query.shape
        nh, hd = self.num_heads, D // self.num_heads
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key:  # self-attention: one matmul for q and k
            q, k = F.linear(query, w[: 2 * D], b[: 2 * D]).chunk(2, dim=-1)
        else:
            q = F.linear(query, w[:D], b[:D])
            k = F.linear(key, w[D : 2 * D], b[D : 2 * D])
        v = F.linear(value, w[2 * D :], b[2 * D :])
        q = q.view(B, Q, nh, hd).transpose(1, 2)  # (B, nh, Q, hd)
        k = k.view(B, -1, nh, hd).transpose(1, 2)  # (B, nh, K, hd)
        v = v.view(B, -1, nh, hd).transpose(1, 2)  # (B, nh, K, hd)
        if blocked is None or blocked.dtype != torch.bool:  # None, or an additive float bias
            attn_mask = None if blocked is None else blocked[:, None].to(q.dtype)  # (B, 1, Q, K)
        else:
            attn_mask = ~blocked[:, None]  # (B, 1, Q, K) True = attend
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, Q, hd)
        out = out.transpose(1, 2).reshape(B, Q, D)  # (B, Q, D)
        return self.out_proj(out)


def _xavier_matrices(module: nn.Module) -> None:
    # referring_transformer_decoder.py: every sub-layer applies xavier_uniform_ to all dim>1 params
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class CrossAttentionLayer(nn.Module):
    """Post-norm cross-attention: ``LN(tgt + MHA(tgt + query_pos, memory + pos, memory))``."""

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.multihead_attn = MultiheadAttention(d_model, num_heads, dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        _xavier_matrices(self)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        *,
        blocked: Tensor | None = None,
        pos: Tensor | None = None,
        query_pos: Tensor | None = None,
    ) -> Tensor:
        """tgt: (B, Q, D); memory, pos: (B, K, D); blocked: (B, Q, K). Returns (B, Q, D)."""
        q = tgt if query_pos is None else tgt + query_pos
        k = memory if pos is None else memory + pos
        attn = self.multihead_attn(q, k, memory, blocked)
        return self.norm(tgt + self.dropout(attn))


class SelfAttentionLayer(nn.Module):
    """Post-norm self-attention: ``LN(tgt + MHA(tgt + query_pos, tgt + query_pos, tgt))``."""

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, num_heads, dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        _xavier_matrices(self)

    def forward(self, tgt: Tensor, *, query_pos: Tensor | None = None) -> Tensor:
        """tgt, query_pos: (B, Q, D). Returns (B, Q, D)."""
        qk = tgt if query_pos is None else tgt + query_pos
        attn = self.self_attn(qk, qk, tgt)
        return self.norm(tgt + self.dropout(attn))


class FFNLayer(nn.Module):
    """Post-norm FFN: ``LN(x + W2·ReLU(W1·x))``."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        _xavier_matrices(self)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, Q, D). Returns (B, Q, D)."""
        return self.norm(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class MLP(nn.Module):
    """``num_layers`` Linears with ReLU between them (PyTorch default init)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


# --------------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------------


@dataclass
class DecoderOutput:
    """Outputs of :class:`ReLADecoder` (last layer).

    Attributes:
        mask_logits: (B, 2, H/4, W/4) target-mask logits ``Σ_q x_r[q, a] · M_r[q]``.
        region_logits: (B, P, 2) minimap logits (index 1 = region contains the target).
        nt_logits: (B, 2) no-target logits (index 1 = no target).
        region_masks: (B, P, H/4, W/4) region-mask logits M_r.
        extras: intermediates (names of the official test vectors) when requested.
        aux: with deep supervision in training, the ``mask_logits`` / ``region_logits`` /
            ``nt_logits`` of every layer before the last (with autograd); empty otherwise.
    """

    mask_logits: Tensor
    region_logits: Tensor
    nt_logits: Tensor
    region_masks: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)
    aux: list[dict[str, Tensor]] = field(default_factory=list)


VARIANTS = ("main", "original")


def grid_attention_mask(region_grid: int, size: tuple[int, int],
                        device: torch.device | str = "cpu") -> Tensor:
    """Region q = cell (q // R, q % R) of an R x R grid may attend to a feature pixel iff the
    pixel's footprint overlaps the cell (training aid, ``ReLADecoder.grid_attention``).

    Args:
        region_grid: R.
        size: (h, w) of the feature level.

    Returns:
        (R*R, h*w) bool, True = blocked. Every row has at least one allowed pixel.
    """
    h, w = size

    def overlap(n: int) -> Tensor:  # (R, n): cell i overlaps pixel y on this axis
        cell = torch.arange(region_grid, device=device).view(-1, 1).double()
        pix = torch.arange(n, device=device).view(1, -1).double()
        return (pix / n < (cell + 1) / region_grid) & ((pix + 1) / n > cell / region_grid)

    oy, ox = overlap(h), overlap(w)  # (R, h), (R, w)
    allowed = oy[:, None, :, None] & ox[None, :, None, :]  # (R, R, h, w)
    return ~allowed.reshape(region_grid * region_grid, h * w)


def grid_prior_bias(region_grid: int, size: tuple[int, int], strength: float,
                    device: torch.device | str = "cpu") -> Tensor:
    """Additive attention logits of the soft grid prior (``DecoderConfig.region_prior``, ours).

    Region q = cell (q // R, q % R) of an R x R grid over the image; a feature pixel at distance
    d from the cell centre (both in cell units, pixel and cell centres on the same [0, 1] square)
    gets ``-strength * d**2``: 0 at the cell's centre, about ``-strength`` one cell away.

    Args:
        region_grid: R.
        size: (h, w) of the feature level.
        strength: the prior's weight (> 0).

    Returns:
        (R*R, h*w) float32.
    """
    h, w = size
    cell = (torch.arange(region_grid, device=device, dtype=torch.float32) + 0.5) / region_grid
    py = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    px = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    dy = ((cell[:, None] - py[None, :]) * region_grid) ** 2  # (R, h)
    dx = ((cell[:, None] - px[None, :]) * region_grid) ** 2  # (R, w)
    d2 = dy[:, None, :, None] + dx[None, :, None, :]  # (R, R, h, w): row cell, col cell, y, x
    return (-strength * d2).reshape(region_grid * region_grid, h * w)


class ReLADecoder(nn.Module):
    """The ReLA decoder (spec §1.4; ``variant="original"``: §1.8).

    Args:
        in_channels: channels of the pixel-decoder maps (a 1×1 projection is added when this
            differs from ``hidden_dim``, as the official ``input_proj``).
        lang_dim: text feature width Dt.
        hidden_dim: decoder width D.
        num_heads: attention heads.
        ffn_dim: FFN width.
        num_layers: ReLA layers (official: ``DEC_LAYERS - 1``).
        num_queries: region queries P (= region_grid²).
        mask_dim: channels of the pixel decoder's ``mask_features``.
        rla_weight: scale of the language update (official constructor default 0.1).
        lang_att_layers: layers with the language cross-attention (``main`` only).
        mask_embed_layers: depth of the ``mask_embed`` MLP.
        nt_embed_layers: depth of the ``nt_embed`` MLP.
        eq1_reduction: ``"sum"`` (official) or ``"mean"`` (Eq. 1 divided by P; same argmax).
        region_prior: strength of the soft grid prior on RIA (0 = off, official;
            :func:`grid_prior_bias`).
        deep_supervision: in training, also return the heads of every layer but the last
            (``DecoderOutput.aux``; ours, off = official).
        dropout: dropout of every sub-layer.
        variant: ``"main"`` (released code) or ``"original"`` (paper branch).
        num_levels: pyramid levels cycled over.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        lang_dim: int,
        hidden_dim: int,
        num_heads: int,
        ffn_dim: int,
        num_layers: int,
        num_queries: int,
        mask_dim: int,
        rla_weight: float = 0.1,
        lang_att_layers: Sequence[int] = (0,),
        mask_embed_layers: int = 3,
        nt_embed_layers: int = 2,
        eq1_reduction: str = "sum",
        region_prior: float = 0.0,
        deep_supervision: bool = False,
        dropout: float = 0.0,
        variant: str = "main",
        num_levels: int = 3,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown decoder variant {variant!r}; expected one of {VARIANTS}")
        bad = [i for i in lang_att_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"lang_att_layers {bad} outside 0..{num_layers - 1}")
        self.variant = variant
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.num_levels = num_levels
        self.rla_weight = rla_weight
        self.lang_att_layers = tuple(lang_att_layers)
        if eq1_reduction not in ("sum", "mean"):
            raise ValueError(f"eq1_reduction must be 'sum' or 'mean', got {eq1_reduction!r}")
        self.eq1_scale = 1.0 / num_queries if eq1_reduction == "mean" else 1.0
        if region_prior < 0:
            raise ValueError(f"region_prior must be >= 0, got {region_prior}")
        self.region_prior = float(region_prior)
        self.deep_supervision = bool(deep_supervision)
        # Training aid (ours), switched by the engine for the first TrainConfig.grid_attention_iters
        # iterations: region q attends only to the pixels of its minimap cell (grid_attention_mask)
        # instead of its predicted region mask. Never used at inference.
        self.grid_attention = False
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2)

        def layers(make) -> nn.ModuleList:
            return nn.ModuleList(make() for _ in range(num_layers))

        if variant == "main":
            self.RIA_layers = layers(lambda: CrossAttentionLayer(hidden_dim, num_heads, dropout))
            self.RLA_vision = layers(lambda: SelfAttentionLayer(hidden_dim, num_heads, dropout))
        else:  # original branch names (spec §1.8)
            self.RIA_cross_attention = layers(
                lambda: CrossAttentionLayer(hidden_dim, num_heads, dropout)
            )
            self.self_attention_layers = layers(
                lambda: SelfAttentionLayer(hidden_dim, num_heads, dropout)
            )
        self.transformer_ffn_layers = layers(lambda: FFNLayer(hidden_dim, ffn_dim, dropout))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.lang_proj = nn.Linear(lang_dim, hidden_dim, bias=False)
        nn.init.zeros_(self.lang_proj.weight)  # referring_transformer_decoder.py:331
        if variant == "main":
            self.lang_weight = nn.Parameter(torch.tensor(0.0))  # sigmoid(0) = 0.5 at init
            self.RLA_lang_att = CrossAttentionLayer(hidden_dim, num_heads, dropout)
        else:
            self.decoder_norm_2 = nn.LayerNorm(hidden_dim)
            self.RLA_proj = nn.Linear(hidden_dim, hidden_dim, bias=False)
            nn.init.zeros_(self.RLA_proj.weight)
            self.RLA_gate = nn.Parameter(torch.tensor(0.0))
            self.RLA_lang = CrossAttentionLayer(hidden_dim, num_heads, dropout)
            self.RLA_region = SelfAttentionLayer(hidden_dim, num_heads, dropout)
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(num_levels):
            if in_channels != hidden_dim:
                proj = nn.Conv2d(in_channels, hidden_dim, 1)
                c2_xavier_fill(proj)
                self.input_proj.append(proj)
            else:
                self.input_proj.append(nn.Identity())
        self.minimap_embed = nn.Linear(hidden_dim, 2)  # num_classes forced to 1 -> 2 logits
        self.nt_embed = MLP(hidden_dim, hidden_dim, 2, nt_embed_layers)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, mask_embed_layers)

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        multi_scale: Sequence[Tensor],
        mask_features: Tensor,
        lang_feats: Tensor,
        *,
        return_extras: bool = False,
        forced_attn_masks: Sequence[Tensor] | None = None,
    ) -> DecoderOutput:
        """Run the ReLA layers and heads.

        Args:
            multi_scale: ``num_levels`` maps (B, C, H_l, W_l), coarsest first.
            mask_features: (B, mask_dim, H/4, W/4).
            lang_feats: (B, L, Dt) text features (padding positions included, unmasked).
            return_extras: record intermediates in ``extras`` (keys of the official vectors).
            forced_attn_masks: teacher forcing; per layer a (B, P, H_l·W_l) bool mask
                (True = blocked) used instead of the computed one, or None to keep the computed
                one (the computed masks are still reported in ``extras``, and the logits they
                threshold as ``dec_attn_logits{i}``).

        Returns:
            :class:`DecoderOutput`.
        """
        if len(multi_scale) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {len(multi_scale)}")
        if forced_attn_masks is not None and len(forced_attn_masks) != self.num_layers:
            raise ValueError(
                f"forced_attn_masks needs one mask per layer ({self.num_layers}), "
                f"got {len(forced_attn_masks)}"
            )
        B = mask_features.shape[0]
        sizes = [tuple(x.shape[-2:]) for x in multi_scale]
        src, pos = [], []
        for lvl, x in enumerate(multi_scale):
            pos.append(self.pe_layer(x).to(x.dtype).flatten(2).transpose(1, 2))  # (B, HW, D)
            s = self.input_proj[lvl](x).flatten(2).transpose(1, 2)  # (B, HW, D)
            src.append(s + self.level_embed.weight[lvl])  # level embed in keys AND values
        # Attention masks need region logits only at the level sizes; bilinear resizing is linear,
        # so resizing mask_features once equals resizing every region mask as the official code
        # does (up to float rounding).
        with torch.no_grad():
            small_features = [
                F.interpolate(mask_features, size=s, mode="bilinear", align_corners=False)
                for s in sizes
            ]

        query_pos = self.query_embed.weight.unsqueeze(0).expand(B, -1, -1)  # (B, P, D)
        output = self.query_feat.weight.unsqueeze(0).expand(B, -1, -1)  # (B, P, D)
        ex: dict[str, list[Tensor]] = {}

        def record(name: str, value: Tensor) -> None:
            if return_extras:
                ex.setdefault(name, []).append(value.detach())

        # Intermediate heads only feed the (detached) attention masks: unless extras are wanted,
        # only the region embedding is computed for them, without autograd. The last layer's
        # heads are the outputs.
        aux: list[dict[str, Tensor]] = []
        deep = self.deep_supervision and self.training
        heads = None
        if return_extras or self.num_layers == 0:
            heads = self._heads(output, output, mask_features)
            record("dec_pred_logits", heads["region_logits"])
            record("dec_nt_label", heads["nt_logits"])
            record("dec_pred_masks", heads["mask_logits"])
        logits = self._attn_logits(output, small_features[0], heads)
        blocked = logits.sigmoid() < 0.5  # (B, P, h*w) True = blocked

        for i in range(self.num_layers):
            lvl = i % self.num_levels
            full_rows = blocked.all(-1)  # (B, P) rows that would block every pixel
            blocked = blocked & ~full_rows[..., None]  # official fix: unblock them entirely
            record(f"dec_attn_mask{i}", blocked)
            record(f"dec_attn_logits{i}", logits)
            record("dec_attn_full_rows", full_rows.sum().view(1))
            if self.grid_attention and self.training:
                grid = grid_attention_mask(math.isqrt(self.query_feat.num_embeddings), sizes[lvl],
                                           device=blocked.device)  # (P, h*w)
                blocked = grid.unsqueeze(0).expand(B, -1, -1)
            if forced_attn_masks is not None and forced_attn_masks[i] is not None:
                blocked = forced_attn_masks[i].to(device=blocked.device, dtype=torch.bool)
            if self.region_prior > 0:  # soft grid prior: additive logits, -inf where blocked
                prior = grid_prior_bias(math.isqrt(self.query_feat.num_embeddings), sizes[lvl],
                                        self.region_prior, device=blocked.device)  # (P, h*w)
                blocked = prior.to(output.dtype).expand(B, -1, -1).masked_fill(
                    blocked, float("-inf"))  # (B, P, h*w)
            if self.variant == "main":
                output, rla_out = self._layer_main(i, output, src[lvl], pos[lvl], query_pos,
                                                   lang_feats, blocked, record)
            else:
                output, rla_out = self._layer_original(i, output, src[lvl], pos[lvl], query_pos,
                                                       lang_feats, blocked, record)
            last = i == self.num_layers - 1
            heads = None
            if last or return_extras or deep:
                heads = self._heads(output, rla_out, mask_features)
                if deep and not last:
                    aux.append({k: heads[k] for k in ("mask_logits", "region_logits",
                                                      "nt_logits")})
                record("dec_pred_logits", heads["region_logits"])
                record("dec_nt_label", heads["nt_logits"])
                record("dec_pred_masks", heads["mask_logits"])
            if not last:
                nxt = small_features[(i + 1) % self.num_levels]
                logits = self._attn_logits(output, nxt, heads)
                blocked = logits.sigmoid() < 0.5

        extras: dict[str, Tensor] = {}
        for name, values in ex.items():
            if name.startswith("dec_attn_") and name != "dec_attn_full_rows" or name in (
                "dec_rla_lang_att_out", "dec_after_lang"
            ):
                extras[name] = values[0]
            else:
                extras[name] = torch.cat(values) if values[0].dim() == 1 else torch.stack(values)
        return DecoderOutput(
            mask_logits=heads["mask_logits"],
            region_logits=heads["region_logits"],
            nt_logits=heads["nt_logits"],
            region_masks=torch.einsum("bqc,bchw->bqhw", heads["embed"], mask_features),
            extras=extras,
            aux=aux,
        )

    def _layer_main(self, i, output, src, pos, query_pos, lang_feats, blocked, record):
        """One released-code layer: RIA -> (language RLA at ``lang_att_layers``) -> RLA -> FFN."""
        output = self.RIA_layers[i](output, src, blocked=blocked, pos=pos, query_pos=query_pos)
        record("dec_ria_out", output)
        if i in self.lang_att_layers:
            lang = self.lang_proj(lang_feats)  # (B, L, D)
            lang_out = self.RLA_lang_att(output, lang)  # no query pos, no key-padding mask
            record("dec_rla_lang_att_out", lang_out)
            output = output + lang_out * torch.sigmoid(self.lang_weight) * self.rla_weight
            record("dec_after_lang", output)
        output = self.RLA_vision[i](output, query_pos=query_pos)
        record("dec_rla_out", output)
        output = self.transformer_ffn_layers[i](output)
        record("dec_queries", output)
        return output, output

    def _layer_original(self, i, output, src, pos, query_pos, lang_feats, blocked, record):
        """One paper-branch layer: RIA -> self-attention -> FFN; gated RLA at the last layer."""
        output = self.RIA_cross_attention[i](output, src, blocked=blocked, pos=pos,
                                             query_pos=query_pos)
        record("dec_ria_out", output)
        output = self.self_attention_layers[i](output, query_pos=query_pos)
        record("dec_rla_out", output)
        output = self.transformer_ffn_layers[i](output)
        record("dec_queries", output)
        rla_out = output
        if i == self.num_layers - 1:
            lang = self.lang_proj(lang_feats)  # (B, L, D)
            rla = self.RLA_lang(output, lang) + self.RLA_region(output)
            rla_out = output + self.rla_weight * self.RLA_proj(rla) * torch.sigmoid(self.RLA_gate)
            record("dec_rla_final", rla_out)
        return output, rla_out

    def _heads(self, output: Tensor, rla_out: Tensor, mask_features: Tensor) -> dict[str, Tensor]:
        """Prediction heads (official ``forward_prediction_heads``).

        Args:
            output: (B, P, D) region queries (source of the region masks).
            rla_out: (B, P, D) source of minimap / no-target (== output for ``main``).
            mask_features: (B, Cm, H/4, W/4).

        Returns:
            ``embed`` (B, P, Cm) region embeddings, ``region_logits`` (B, P, 2), ``nt_logits``
            (B, 2) and ``mask_logits`` (B, 2, H/4, W/4).
        """
        region = self.decoder_norm(output)  # (B, P, D)
        embed = self.mask_embed(region)  # (B, P, Cm)
        cls_in = region if self.variant == "main" else self.decoder_norm_2(rla_out)
        region_logits = self.minimap_embed(cls_in)  # (B, P, 2)
        nt_logits = self.nt_embed(cls_in).mean(dim=1)  # (B, 2) average over regions
        # Eq. 1 as the code computes it: Σ_q x[q, a] M_r[q] = (Σ_q x[q, a] e[q]) · F_mask
        tgt_embed = torch.einsum("bqa,bqc->bac", region_logits, embed)  # (B, 2, Cm)
        mask_logits = torch.einsum("bac,bchw->bahw", tgt_embed, mask_features)  # (B, 2, H/4, W/4)
        if self.eq1_scale != 1.0:
            mask_logits = mask_logits * self.eq1_scale  # eq1_reduction="mean"
        return {
            "embed": embed,
            "region_logits": region_logits,
            "nt_logits": nt_logits,
            "mask_logits": mask_logits,
        }

    @torch.no_grad()
    def _attn_logits(
        self, output: Tensor, small_features: Tensor, heads: dict[str, Tensor] | None
    ) -> Tensor:
        """Region-mask logits at the next level's size (``bilinear(M_r)``, detached).

        The next RIA blocks ``sigmoid(logits) < 0.5``.

        Args:
            output: (B, P, D) region queries.
            small_features: (B, Cm, h, w) mask features resized to the next level.
            heads: this layer's :meth:`_heads` output if already computed (reuses its embedding).

        Returns:
            (B, P, h·w).
        """
        embed = heads["embed"] if heads is not None else self.mask_embed(self.decoder_norm(output))
        return torch.einsum("bqc,bchw->bqhw", embed, small_features).flatten(2)  # (B, P, h*w)
