"""Multi-scale deformable-attention pixel decoder (Mask2Former's ``MSDeformAttnPixelDecoder``).

ReLA uses Mask2Former's pixel decoder unchanged (spec §1.3): the three coarsest backbone maps
(res5, res4, res3) are projected to ``conv_dim`` channels, refined jointly by a stack of
multi-scale deformable self-attention layers (Deformable DETR), and the stride-4 map (res2) is
added FPN-style. Outputs: ``mask_features`` at stride 4 (what region masks are dot-products with)
and the three refined maps, coarsest first, that the ReLA decoder cross-attends to.

Deformable attention is pure PyTorch. The official code falls back to ``F.grid_sample``
(bilinear, zero padding, ``align_corners=False``, grid ``2·loc − 1``) when its CUDA op is absent;
:func:`ms_deform_attn_grid_sample` is that formulation. The default,
:func:`ms_deform_attn_gather`, computes the same bilinear taps as one weighted row gather
(``F.embedding_bag``) over a zero-bordered, channels-last value table: the same function up to
float rounding, several times faster on CPU, and differentiable in the values, the attention
weights and the sampling locations.

Module and parameter names mirror the official keys under ``sem_seg_head.pixel_decoder.`` (spec
§8), so converting a checkpoint is a prefix rename.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------------
# Positional encoding (shared with the ReLA decoder)
# --------------------------------------------------------------------------------------------------


class PositionEmbeddingSine(nn.Module):
    """DETR's 2-D sine positional encoding, normalised to ``[0, scale]`` (spec §1.3).

    Row and column indices ``1..H`` / ``1..W`` are divided by ``H + eps`` / ``W + eps``, scaled by
    ``2π`` and encoded with ``num_pos_feats`` interleaved sin/cos features each; the output is
    ``cat(pos_y, pos_x)``. There is no padding in ReLA (square inputs), so no padding mask.

    Args:
        num_pos_feats: features per axis (half the channel count of the output).
        temperature: frequency base.
        scale: range of the normalised coordinates.
    """

    def __init__(
        self, num_pos_feats: int, *, temperature: float = 10000.0, scale: float = 2 * math.pi
    ) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale
        self.eps = 1e-6  # position_encoding.py: eps in the normalisation

    def forward(self, x: Tensor) -> Tensor:
        """Encoding for a feature map (only its shape and device are used).

        Args:
            x: (B, C, H, W) feature map.

        Returns:
            (B, 2 * num_pos_feats, H, W) float32 encoding.
        """
        B, _, H, W = x.shape
        ones = torch.ones(1, H, W, device=x.device, dtype=torch.float32)
        y_embed = ones.cumsum(1)  # (1, H, W) values 1..H
        x_embed = ones.cumsum(2)  # (1, H, W) values 1..W
        y_embed = y_embed / (y_embed[:, -1:, :] + self.eps) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = torch.div(dim_t, 2, rounding_mode="floor")
        dim_t = self.temperature ** (2 * dim_t / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t  # (1, H, W, F)
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (1, 2F, H, W)
        return pos.expand(B, -1, -1, -1)


# --------------------------------------------------------------------------------------------------
# Multi-scale deformable attention: the sampling core
# --------------------------------------------------------------------------------------------------


def ms_deform_attn_grid_sample(
    value: Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Reference core: one ``F.grid_sample`` per level (the official PyTorch fallback).

    Args:
        value: (N, S, nh, hd) projected values of all levels, flattened row-major and concatenated
            (S = Σ H_l·W_l).
        spatial_shapes: (H_l, W_l) of each level, in the order of ``value``.
        sampling_locations: (N, Lq, nh, nL, nP, 2) (x, y) in [0, 1] (may lie outside).
        attention_weights: (N, Lq, nh, nL, nP), softmax-normalised over (nL, nP).

    Returns:
        (N, Lq, nh * hd) attended values.
    """
    N, _, nh, hd = value.shape
    _, Lq, _, nL, nP, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample coordinates in [-1, 1]
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(N * nh, hd, h, w)  # (N*nh, hd, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (N*nh, Lq, nP, 2)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (N*nh, hd, Lq, nP)
    weights = attention_weights.transpose(1, 2).reshape(N * nh, 1, Lq, nL * nP)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (N*nh, hd, Lq)
    return out.view(N, nh * hd, Lq).transpose(1, 2).contiguous()  # (N, Lq, nh*hd)


@dataclass
class SamplingGeometry:
    """Constants of the gather core for one set of level shapes, in the (N, Lq, nh, nL, nP) layout.

    Built once per forward (:meth:`build`) and shared by every encoder layer: elementwise ops on
    full-size contiguous tensors are an order of magnitude faster on CPU than the same ops
    broadcasting small per-level constants over the tiny inner dimensions.

    Attributes:
        ref_x, ref_y: reference point of each query in pixel units of each level
            (``x·W − 0.5``, the ``align_corners=False`` convention), or None.
        max_x, max_y: W and H of each level (clamp bounds; -1 is the lower bound).
        row_len: W + 2 of each level (row length of the zero-bordered level in the table).
        row_step: ``row_len · nh`` as int64: table rows between vertically adjacent taps.
        base: table row of the (x = −1, y = −1) border pixel for (n, level, head), plus one row
            and one column, so that ``base + (y0·row_len + x0)·nh`` is the top-left tap.
        table_rows: rows of the table, including a zero tail that absorbs the taps of points
            clamped to the last border (they have weight 0).
        level_starts: first padded pixel of each level in one image's table.
        pixels_per_image: padded pixels per image (Sp).
    """

    ref_x: Tensor | None
    ref_y: Tensor | None
    max_x: Tensor
    max_y: Tensor
    row_len: Tensor
    row_step: Tensor
    base: Tensor
    table_rows: int
    level_starts: list[int]
    pixels_per_image: int

    @staticmethod
    def build(
        spatial_shapes: Sequence[tuple[int, int]],
        N: int,
        Lq: int,
        nh: int,
        nP: int,
        device: torch.device,
        reference_points: Tensor | None = None,
    ) -> SamplingGeometry:
        """Geometry for ``N`` images, ``Lq`` queries, ``nh`` heads and ``nP`` points per level.

        Args:
            reference_points: (N, Lq, nL, 2) normalised reference points, or None.
        """
        nL = len(spatial_shapes)
        starts, offset = [], 0
        for h, w in spatial_shapes:
            starts.append(offset)
            offset += (h + 2) * (w + 2)
        Sp = offset
        last_w = spatial_shapes[-1][1]
        table_rows = (N * Sp + last_w + 4) * nh
        # float32 holds the integer row numbers exactly below 2**24; use float64 beyond
        index_dtype = torch.float32 if table_rows < 2**24 else torch.float64
        shape = (N, Lq, nh, nL, nP)

        def per_level(values: Sequence[float], dtype: torch.dtype = torch.float32) -> Tensor:
            t = torch.tensor(values, dtype=dtype, device=device).view(1, 1, 1, nL, 1)
            return t.expand(shape).contiguous()

        widths = [float(w) for _, w in spatial_shapes]
        heights = [float(h) for h, _ in spatial_shapes]
        row_len = per_level([w + 2 for w in widths], index_dtype)
        base = (
            torch.arange(N, device=device, dtype=index_dtype).view(N, 1, 1, 1, 1) * Sp
            + torch.tensor(starts, device=device, dtype=index_dtype).view(1, 1, 1, nL, 1)
            + row_len[:1, :1, :1, :, :1] + 1
        ) * nh + torch.arange(nh, device=device, dtype=index_dtype).view(1, 1, nh, 1, 1)
        ref_x = ref_y = None
        if reference_points is not None:
            wh = torch.tensor([[w, h] for h, w in zip(heights, widths)], device=device,
                              dtype=reference_points.dtype)
            ref = reference_points * wh - 0.5  # (N, Lq, nL, 2) pixel units
            ref = ref[:, :, None, :, None, :].expand(N, Lq, nh, nL, nP, 2)
            ref_x, ref_y = ref[..., 0].contiguous(), ref[..., 1].contiguous()
        return SamplingGeometry(
            ref_x=ref_x,
            ref_y=ref_y,
            max_x=per_level(widths),
            max_y=per_level(heights),
            row_len=row_len,
            row_step=(row_len * nh).long(),
            base=base.expand(shape).contiguous(),
            table_rows=table_rows,
            level_starts=starts,
            pixels_per_image=Sp,
        )


def ms_deform_attn_gather_pixels(
    value: Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    px: Tensor,
    py: Tensor,
    attention_weights: Tensor,
    geometry: SamplingGeometry,
) -> Tensor:
    """The gather core on sampling points given in pixel units (see :func:`ms_deform_attn_gather`).

    Args:
        value: (N, S, nh, hd).
        spatial_shapes: (H_l, W_l) per level.
        px, py: (N, Lq, nh, nL, nP) sampling coordinates in pixels of each level, centre
            convention (``x·W − 0.5``).
        attention_weights: (N, Lq, nh, nL, nP).
        geometry: :class:`SamplingGeometry` of these shapes.

    Returns:
        (N, Lq, nh * hd).
    """
    N, S, nh, hd = value.shape
    _, Lq, _, nL, nP = px.shape
    g = geometry
    # Zero-bordered, channels-last table; rows ordered (n, padded pixel, head), then a zero tail.
    table = value.new_zeros(g.table_rows, hd)
    images = table[: N * g.pixels_per_image * nh].view(N, g.pixels_per_image, nh, hd)
    levels = value.split([h * w for h, w in spatial_shapes], dim=1)
    for (h, w), v, start in zip(spatial_shapes, levels, g.level_starts):
        padded = images[:, start : start + (h + 2) * (w + 2)].view(N, h + 2, w + 2, nh, hd)
        padded[:, 1:-1, 1:-1] = v.view(N, h, w, nh, hd)

    px = torch.minimum(px.clamp(min=-1.0), g.max_x)  # points further out read only border zeros
    py = torch.minimum(py.clamp(min=-1.0), g.max_y)
    x0, y0 = px.floor(), py.floor()
    fx, fy = px - x0, py - y0  # fractional parts; gradients to the locations flow through these
    top_left = g.base + (y0.to(g.base.dtype) * g.row_len + x0.to(g.base.dtype)) * nh
    top_left = top_left.long()  # exact: the float index math stays below 2**24 (or is float64)
    step = g.row_step  # one row down
    # The order of the samples inside a bag is free: taps go before (nL, nP), where stacking
    # copies contiguous runs (stacking on a last dimension of 4 is several times slower).
    rows = torch.stack([top_left, top_left + nh, top_left + step, top_left + step + nh], dim=3)
    w_top = attention_weights * (1 - fy)
    w_bottom = attention_weights * fy
    taps = torch.stack(
        [w_top * (1 - fx), w_top * fx, w_bottom * (1 - fx), w_bottom * fx], dim=3
    )  # (N, Lq, nh, 4, nL, nP)
    out = F.embedding_bag(
        rows.view(N * Lq * nh, nL * nP * 4),
        table,
        per_sample_weights=taps.reshape(N * Lq * nh, nL * nP * 4).to(table.dtype),
        mode="sum",
    )  # (N*Lq*nh, hd)
    return out.view(N, Lq, nh * hd)


def ms_deform_attn_gather(
    value: Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Fast core: all levels, heads and points in one weighted gather (``F.embedding_bag``).

    Bilinear sampling with zero padding and ``align_corners=False`` reads the four pixels around
    ``(x·W − 0.5, y·H − 0.5)``. Each level is given a one-pixel zero border, so clamping the
    continuous coordinate to ``[-1, W]`` reproduces zero padding exactly (points further out read
    only border zeros); the four taps of every (query, head, level, point) then become rows of one
    channels-last table, weighted by bilinear weight × attention weight and summed.

    Args and returns: as :func:`ms_deform_attn_grid_sample`.
    """
    N, _, nh, _ = value.shape
    _, Lq, _, nL, nP, _ = sampling_locations.shape
    wh = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=sampling_locations.dtype,
                      device=sampling_locations.device)  # (nL, 2)
    pixels = sampling_locations * wh.view(nL, 1, 2) - 0.5
    geometry = SamplingGeometry.build(spatial_shapes, N, Lq, nh, nP, value.device)
    return ms_deform_attn_gather_pixels(
        value, spatial_shapes, pixels[..., 0], pixels[..., 1], attention_weights, geometry
    )


MS_DEFORM_ATTN_CORES: dict[str, Callable[..., Tensor]] = {
    "gather": ms_deform_attn_gather,
    "grid_sample": ms_deform_attn_grid_sample,
}


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR), as used by Mask2Former.

    Every query predicts ``nP`` sampling offsets per head and level around its reference point
    and softmax weights over the ``nL·nP`` samples of each head.

    Args:
        d_model: width D.
        n_levels: number of feature levels nL.
        n_heads: heads nh (D must be divisible by nh).
        n_points: sampling points per head and level nP.
        core: ``"gather"`` (fast) or ``"grid_sample"`` (official fallback formulation).
    """

    def __init__(
        self, *, d_model: int, n_levels: int, n_heads: int, n_points: int, core: str = "gather"
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        if core not in MS_DEFORM_ATTN_CORES:
            raise ValueError(f"unknown deformable-attention core {core!r}")
        self.d_model, self.n_levels = d_model, n_levels
        self.n_heads, self.n_points = n_heads, n_points
        self.core = core
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init (ms_deform_attn.py:66-80): offsets start on a ring of directions."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)  # (nh, 2)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        geometry: SamplingGeometry | None = None,
    ) -> Tensor:
        """Deformable attention of every query over all levels.

        Args:
            query: (N, Lq, D) queries (features + positional encoding).
            reference_points: (N, Lq, nL, 2) normalised (x, y) reference point per level.
            input_flatten: (N, S, D) values of all levels, concatenated.
            spatial_shapes: (H_l, W_l) per level.
            geometry: precomputed :class:`SamplingGeometry` (with reference points) for the
                gather core; built here when None.

        Returns:
            (N, Lq, D).
        """
        N, Lq, _ = query.shape
        nh, nL, nP = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten).view(N, -1, nh, self.d_model // nh)  # (N, S, nh, hd)
        logits = self.attention_weights(query).view(N, Lq, nh, nL * nP)
        if self.core == "grid_sample":  # the official formulation, op for op
            weights = logits.softmax(-1).view(N, Lq, nh, nL, nP)
            offsets = self.sampling_offsets(query).view(N, Lq, nh, nL, nP, 2)
            normalizer = torch.tensor(
                [[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device
            )  # (nL, 2) as (W, H)
            offsets = offsets / normalizer[None, None, None, :, None, :]
            locations = reference_points[:, :, None, :, None, :] + offsets
            out = ms_deform_attn_grid_sample(value, spatial_shapes, locations, weights)
        else:
            # softmax over the nL*nP samples, written out: ~5x faster than softmax() on a last
            # dimension this small on CPU (same values up to rounding)
            weights = (logits - logits.amax(-1, keepdim=True)).exp()
            weights = (weights / weights.sum(-1, keepdim=True)).view(N, Lq, nh, nL, nP)
            if geometry is None or geometry.ref_x is None:
                geometry = SamplingGeometry.build(
                    spatial_shapes, N, Lq, nh, nP, query.device, reference_points
                )
            # Offsets are in pixels of each level (the official divides them by (W, H) and the
            # sampler multiplies back): produce the x and y planes directly by reordering the
            # output rows of sampling_offsets (x, y interleaved -> all x, then all y).
            w = self.sampling_offsets.weight.view(nh * nL * nP, 2, -1).transpose(0, 1)
            b = self.sampling_offsets.bias.view(nh * nL * nP, 2).t()
            offsets = F.linear(query, w.reshape(2 * nh * nL * nP, -1), b.reshape(-1))
            offsets = offsets.view(N, Lq, 2, nh, nL, nP)
            px = geometry.ref_x + offsets[:, :, 0]  # (N, Lq, nh, nL, nP)
            py = geometry.ref_y + offsets[:, :, 1]
            out = ms_deform_attn_gather_pixels(value, spatial_shapes, px, py, weights, geometry)
        return self.output_proj(out)


# --------------------------------------------------------------------------------------------------
# Deformable encoder
# --------------------------------------------------------------------------------------------------


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention + FFN (ReLU), each + residual → LN."""

    def __init__(
        self,
        *,
        d_model: int,
        ffn_dim: int,
        n_levels: int,
        n_heads: int,
        n_points: int,
        dropout: float = 0.0,
        core: str = "gather",
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(
            d_model=d_model, n_levels=n_levels, n_heads=n_heads, n_points=n_points, core=core
        )
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: Tensor,
        pos: Tensor,
        reference_points: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
        geometry: SamplingGeometry | None = None,
    ) -> Tensor:
        """src, pos: (N, S, D); reference_points: (N, S, nL, 2). Returns (N, S, D)."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, geometry)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableEncoder(nn.Module):
    """A stack of :class:`DeformableEncoderLayer` (``transformer.encoder`` in the official keys)."""

    def __init__(self, layers: Sequence[DeformableEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @staticmethod
    def reference_points(
        spatial_shapes: Sequence[tuple[int, int]], batch: int, device: torch.device
    ) -> Tensor:
        """Pixel centres of every level, normalised to [0, 1] (valid ratio 1: no padding).

        Returns:
            (batch, S, nL, 2) the same (x, y) point repeated for every level.
        """
        points = []
        for h, w in spatial_shapes:
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                indexing="ij",
            )
            points.append(torch.stack((ref_x.reshape(-1) / w, ref_y.reshape(-1) / h), -1))
        ref = torch.cat(points, 0)  # (S, 2)
        return ref[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)

    def forward(
        self, src: Tensor, pos: Tensor, spatial_shapes: Sequence[tuple[int, int]]
    ) -> Tensor:
        """src, pos: (N, S, D). Returns (N, S, D)."""
        N, S, _ = src.shape
        ref = self.reference_points(spatial_shapes, N, src.device)  # (N, S, nL, 2) fp32
        geometry = None
        attn = self.layers[0].self_attn if len(self.layers) else None
        if attn is not None and attn.core == "gather":  # shared by every layer
            geometry = SamplingGeometry.build(
                spatial_shapes, N, S, attn.n_heads, attn.n_points, src.device, ref
            )
        for layer in self.layers:
            src = layer(src, pos, ref.to(src.dtype), spatial_shapes, geometry)
        return src


class DeformableTransformer(nn.Module):
    """Encoder-only deformable transformer with a learned per-level embedding (``transformer``)."""

    def __init__(
        self,
        *,
        d_model: int,
        num_layers: int,
        ffn_dim: int,
        n_levels: int,
        n_heads: int,
        n_points: int,
        dropout: float = 0.0,
        core: str = "gather",
    ) -> None:
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        self.encoder = DeformableEncoder(
            [
                DeformableEncoderLayer(
                    d_model=d_model,
                    ffn_dim=ffn_dim,
                    n_levels=n_levels,
                    n_heads=n_heads,
                    n_points=n_points,
                    dropout=dropout,
                    core=core,
                )
                for _ in range(num_layers)
            ]
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: xavier on every matrix, MSDeformAttn's own init, level_embed ~ N(0, 1)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: Sequence[Tensor], pos_embeds: Sequence[Tensor]) -> list[Tensor]:
        """Refine the levels jointly.

        Args:
            srcs: per level (N, D, H_l, W_l) projected features.
            pos_embeds: per level (N, D, H_l, W_l) sine encodings.

        Returns:
            Per level (N, D, H_l, W_l) refined features, same order.
        """
        shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # (N, S, D)
        pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
             for lvl, p in enumerate(pos_embeds)],
            1,
        )  # (N, S, D)
        memory = self.encoder(src, pos, shapes)
        N, _, D = memory.shape
        outs = memory.split([h * w for h, w in shapes], dim=1)
        return [o.transpose(1, 2).reshape(N, D, h, w) for o, (h, w) in zip(outs, shapes)]


# --------------------------------------------------------------------------------------------------
# Pixel decoder
# --------------------------------------------------------------------------------------------------


class ConvNorm(nn.Conv2d):
    """detectron2-style ``Conv2d`` with an attached ``norm`` (and optional activation).

    Keeps the official key layout ``<name>.weight`` / ``<name>.norm.{weight,bias}``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        norm: nn.Module,
        activation: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.norm = norm
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(super().forward(x))
        return self.activation(x) if self.activation is not None else x


def c2_xavier_fill(module: nn.Conv2d) -> None:
    """Caffe2 "XavierFill" as detectron2 defines it: kaiming-uniform(a=1), bias 0."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


@dataclass
class PixelDecoderOutput:
    """Outputs of :class:`MSDeformAttnPixelDecoder`.

    Attributes:
        mask_features: (B, mask_dim, H/4, W/4) per-pixel embeddings (region masks are dot
            products with these).
        multi_scale: three (B, conv_dim, H_l, W_l) maps, coarsest first: H/32, H/16, H/8.
    """

    mask_features: Tensor
    multi_scale: list[Tensor]


class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's pixel decoder (spec §1.3).

    Args:
        in_channels: channels of res2, res3, res4, res5 (C1..C4).
        conv_dim: width of the decoder maps.
        mask_dim: channels of ``mask_features``.
        num_layers: deformable encoder layers.
        num_heads: deformable attention heads.
        num_points: sampling points per head and level.
        ffn_dim: encoder FFN width.
        norm_groups: GroupNorm groups.
        dropout: encoder dropout.
        force_fp32: run in float32 with autocast off, as the official ``forward_features``.
        core: deformable sampling implementation, ``"gather"`` or ``"grid_sample"``.
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        conv_dim: int,
        mask_dim: int,
        num_layers: int,
        num_heads: int,
        num_points: int,
        ffn_dim: int,
        norm_groups: int,
        dropout: float = 0.0,
        force_fp32: bool = True,
        core: str = "gather",
    ) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"expected channels of res2..res5, got {list(in_channels)}")
        self.force_fp32 = force_fp32
        self.num_levels = 3  # msdeformattn.py: transformer_in_features res3, res4, res5
        # input_proj order is res5, res4, res3 (coarsest first), as the official
        self.input_proj = nn.ModuleList()
        for cin in reversed(in_channels[1:]):
            proj = nn.Sequential(nn.Conv2d(cin, conv_dim, 1), nn.GroupNorm(norm_groups, conv_dim))
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
            self.input_proj.append(proj)
        self.transformer = DeformableTransformer(
            d_model=conv_dim,
            num_layers=num_layers,
            ffn_dim=ffn_dim,
            n_levels=self.num_levels,
            n_heads=num_heads,
            n_points=num_points,
            dropout=dropout,
            core=core,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2)
        # Extra FPN level at stride 4 (num_fpn_levels = log2(8) - log2(4) = 1)
        self.adapter_1 = ConvNorm(
            in_channels[0], conv_dim, 1, norm=nn.GroupNorm(norm_groups, conv_dim)
        )
        self.layer_1 = ConvNorm(
            conv_dim, conv_dim, 3, norm=nn.GroupNorm(norm_groups, conv_dim), activation=F.relu
        )
        c2_xavier_fill(self.adapter_1)
        c2_xavier_fill(self.layer_1)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)
        c2_xavier_fill(self.mask_features)

    def forward(self, features: dict[str, Tensor]) -> PixelDecoderOutput:
        """Decode the backbone pyramid.

        Args:
            features: ``res2`` (B, C1, H/4, W/4) ... ``res5`` (B, C4, H/32, W/32).

        Returns:
            :class:`PixelDecoderOutput`.
        """
        if not self.force_fp32:
            return self._forward(features)
        # msdeformattn.py: @autocast(enabled=False) and .float() on every input
        with torch.autocast(device_type=features["res5"].device.type, enabled=False):
            return self._forward({k: v.float() for k, v in features.items()})

    def _forward(self, features: dict[str, Tensor]) -> PixelDecoderOutput:
        names = ("res5", "res4", "res3")
        srcs = [proj(features[n]) for proj, n in zip(self.input_proj, names)]  # (B, D, H_l, W_l)
        pos = [self.pe_layer(features[n]).to(srcs[0].dtype) for n in names]
        out = self.transformer(srcs, pos)  # coarsest first
        lateral = self.adapter_1(features["res2"])  # (B, D, H/4, W/4)
        up = F.interpolate(out[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        fine = self.layer_1(lateral + up)  # (B, D, H/4, W/4)
        return PixelDecoderOutput(mask_features=self.mask_features(fine), multi_scale=out)
