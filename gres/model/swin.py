"""Language-fused Swin backbone of ReLA (spec §1.1): detection-style Swin with a PWAM per stage.

The vision backbone of ReLA is the Swin Transformer of Liu et al. in its *detection* form (as in
Swin-Det / Mask2Former): pre-norm blocks, bottom/right zero padding of each block's normalised
input up to a multiple of the window, a cyclic shift of ``window // 2`` on every odd block and a
shifted-window mask built on the padded grid. LAVT-style language fusion is added at the end of
every stage (:class:`gres.model.fusion.PWAM`):

* ``x_residual = PWAM(x, words)`` after the stage's blocks;
* the stage output is ``norm_i(x_residual)`` (the plain Swin path ``x`` is never output);
* for stages 0..2 the Swin path continues as ``x + tanh(W2 relu(W1 x_residual)) * x_residual``
  (W1, W2 zero-initialised, so the gate starts closed), then patch merging feeds the next stage.

Module and parameter names mirror the official ``backbone.*`` keys (spec §8): an official
checkpoint loads into :class:`MultiModalSwin` by stripping ``backbone.``; only the persistent
``relative_position_index`` buffers of the official model must be dropped (ours is recomputed and
not saved).

Initialisation follows the official code. Its ``init_weights`` defines a truncated-normal init
but never applies it, so every Linear/Conv/LayerNorm keeps PyTorch's default init; the relative
position bias tables get ``trunc_normal(std=0.02)`` (WindowAttention.__init__); the res_gate
weights are zeros. In the paper setting the Swin weights then come from ImageNet-22k
(:func:`load_pretrained_swin`), and only the fusion modules, the gates and ``norm0..3`` start
from this init.

Note on the gate (official behaviour, kept): with both gate matrices at zero, the gradient of
each one is a product with the other (``dW2 ~ relu(W1 r) = 0``, ``dW1 ~ W2^T ... = 0``), so
training from this init never opens the gate: the multimodal tokens reach the next stage only if
the gate weights start non-zero (e.g. loaded from a checkpoint, as in the test vectors).
``res_gate_init="learnable"`` (CPU presets trained from scratch) zeroes only W2: the gate still
starts closed, but W2 receives a gradient and the gate can open.

Pretrained weights: :func:`timm_swin_to_ours` maps a timm (or Microsoft-original) Swin state dict
onto this module; :func:`load_pretrained_swin` loads one from timm's hub or from a local file.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gres.model.fusion import PWAM

# swin.py (MMBasicLayer): logit added between tokens of different regions of a shifted window.
SHIFT_MASK_VALUE = -100.0
# Windows with at least this many tokens (7x7) use F.scaled_dot_product_attention at inference.
_FUSED_MIN_TOKENS = 49


# --------------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample (training only)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Mlp(nn.Module):
    """Swin MLP: fc1 (C -> ratio*C) -> GELU -> fc2 (ratio*C -> C)."""

    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def relative_position_index(window_size: int) -> Tensor:
    """Index into the (2w-1)^2 bias table for every (query, key) pair of a w x w window.

    Returns:
        (w*w, w*w) int64; entry [i, j] = (dy + w - 1) * (2w - 1) + (dx + w - 1) with
        (dy, dx) = position(i) - position(j), positions row-major inside the window.
    """
    w = window_size
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij"))
    coords = coords.flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (rel[0] + w - 1) * (2 * w - 1) + (rel[1] + w - 1)  # (N, N)


def shifted_window_mask(
    padded_hw: tuple[int, int],
    window_size: int,
    shift_size: int,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Additive attention mask of the shifted windows, built on the padded grid (spec §1.1).

    After the cyclic shift, a window at the bottom/right border holds tokens that were not
    neighbours. The padded grid is split into 3 x 3 regions by the slices
    ``[0, -w), [-w, -s), [-s, end)`` along each axis; tokens of different regions get
    ``-100`` between them. Padding tokens are regular members of their region (not masked).

    Args:
        padded_hw: (Hp, Wp), multiples of ``window_size``.

    Returns:
        (nW, N, N) with nW = Hp*Wp / w^2 windows in row-major order and N = w*w.
    """
    Hp, Wp = padded_hw
    w, s = window_size, shift_size
    region = torch.zeros(Hp, Wp, device=device, dtype=dtype)
    cuts = (slice(0, -w), slice(-w, -s), slice(-s, None))
    label = 0
    for hs in cuts:
        for ws in cuts:
            region[hs, ws] = label
            label += 1
    windows = region.view(Hp // w, w, Wp // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)  # (nW, N, N)
    return torch.zeros_like(diff).masked_fill(diff != 0, SHIFT_MASK_VALUE)


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """(B, Hp, Wp, C) -> (B * nW, w*w, C), windows in row-major order per image."""
    B, Hp, Wp, C = x.shape
    w = window_size
    x = x.view(B, Hp // w, w, Wp // w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, C)


def window_reverse(windows: Tensor, window_size: int, Hp: int, Wp: int) -> Tensor:
    """(B * nW, w*w, C) -> (B, Hp, Wp, C); inverse of :func:`window_partition`."""
    w = window_size
    C = windows.shape[-1]
    x = windows.view(-1, Hp // w, Wp // w, w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, Hp, Wp, C)


def check_image_size(height: int, width: int, divisor: int = 32) -> None:
    """Raise ``ValueError`` unless both sides are positive multiples of ``divisor``.

    ReLA feeds the backbone images whose sides are multiples of 32 (``size_divisibility``,
    GRES.py:127): the four stages then have exact strides 4, 8, 16, 32.
    """
    if height <= 0 or width <= 0 or height % divisor or width % divisor:
        raise ValueError(
            f"image size {height}x{width} is not a multiple of {divisor}: resize or pad the "
            f"image (ReLA uses 480x480) so that both sides are multiples of {divisor}"
        )


# --------------------------------------------------------------------------------------------------
# Swin blocks
# --------------------------------------------------------------------------------------------------
class WindowAttention(nn.Module):
    """Multi-head self-attention inside w x w windows with a learned relative position bias."""

    def __init__(self, *, dim: int, num_heads: int, window_size: int, qkv_bias: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        # Recomputed, not saved: an official checkpoint's copy is dropped by the converter.
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size), persistent=False
        )
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> Tensor:
        """(nH, N, N) bias added to the attention logits of every window."""
        N = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(N, N, self.num_heads).permute(2, 0, 1).contiguous()

    def attend(self, qkv: Tensor, shift_mask: Tensor | None = None) -> Tensor:
        """Attention inside each window, from already projected q, k, v (no output projection).

        Args:
            qkv: (B * nW, N, 3C) window tokens after ``self.qkv``, windows of one image
                contiguous.
            shift_mask: (nW, N, N) additive mask of the shifted windows, or None.

        Returns:
            (B * nW, N, C) heads concatenated per token.
        """
        BW, N, C3 = qkv.shape
        nh = self.num_heads
        C = C3 // 3
        q, k, v = qkv.view(BW, N, 3, nh, C // nh).permute(2, 0, 3, 1, 4).unbind(0)  # (BW,nH,N,hd)
        bias = self.relative_position_bias().unsqueeze(0)  # (1, nH, N, N)
        needs_grad = torch.is_grad_enabled() and (qkv.requires_grad or bias.requires_grad)
        if needs_grad or N < _FUSED_MIN_TOKENS:
            # Training: PyTorch's fused CPU kernel does not cover a mask that needs a gradient
            # (the bias table) and falls back to a slower path; the explicit softmax is faster,
            # and also for small windows (measured on CPU, torch 2.13).
            logits = (q * (C // nh) ** -0.5) @ k.transpose(-2, -1) + bias  # (B*nW, nH, N, N)
            if shift_mask is not None:
                nW = shift_mask.shape[0]
                logits = logits.view(BW // nW, nW, nh, N, N) + shift_mask.unsqueeze(1)
                logits = logits.view(BW, nh, N, N)
            out = logits.softmax(dim=-1) @ v  # (B*nW, nH, N, hd)
            return out.transpose(1, 2).reshape(BW, N, C)
        if shift_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B*nW, nH, N, hd)
            return out.transpose(1, 2).reshape(BW, N, C)
        nW = shift_mask.shape[0]
        mask = bias + shift_mask.unsqueeze(1)  # (nW, nH, N, N)
        # Inference: one fused call per image keeps the mask a plain contiguous 4-D tensor (what
        # the fused CPU kernel wants) without materialising it B times; cat of the transposed
        # outputs is the only copy.
        outs = [
            F.scaled_dot_product_attention(
                q[i : i + nW], k[i : i + nW], v[i : i + nW], attn_mask=mask
            ).transpose(1, 2)  # (nW, N, nH, hd)
            for i in range(0, BW, nW)
        ]
        return outs[0].reshape(BW, N, C) if len(outs) == 1 else torch.cat(outs).view(BW, N, C)

    def forward(self, x: Tensor, shift_mask: Tensor | None = None) -> Tensor:
        """Windowed self-attention: (B * nW, N, C) -> (B * nW, N, C) (qkv, attend, proj)."""
        return self.proj(self.attend(self.qkv(x), shift_mask))


class SwinBlock(nn.Module):
    """Pre-norm Swin block: ``x + DP(WMSA(LN1(x)))`` then ``x + DP(MLP(LN2(x)))``.

    The normalised input is zero-padded at the bottom/right to window multiples before the
    (optional) cyclic shift, and cropped after attention, as in the detection Swin.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: float,
    ) -> None:
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must be in [0, window_size={window_size})")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(
            dim=dim, num_heads=num_heads, window_size=window_size, qkv_bias=qkv_bias
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim=dim, hidden_dim=int(dim * mlp_ratio))

    def forward(self, x: Tensor, shift_mask: Tensor | None) -> Tensor:
        """One block.

        Args:
            x: (B, H, W, C) tokens.
            shift_mask: (nW, N, N) mask of this stage's padded grid (used if the block shifts).

        Returns:
            (B, H, W, C).
        """
        x = x + self.drop_path(self._attention(self.norm1(x), shift_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _attention(self, y: Tensor, shift_mask: Tensor | None) -> Tensor:
        """W-MSA / SW-MSA of the normalised tokens y: (B, H, W, C) -> (B, H, W, C).

        The official block pads ``y`` with zeros, then applies qkv to every padded window and
        the output projection before cropping. Because qkv is a per-token affine map, the padded
        tokens' q, k, v are just the qkv bias: we project the real tokens only and pad the
        result with the bias, and we apply ``proj`` after cropping. Same values, fewer FLOPs
        (stage 3 of Swin-B at 480 pads 30 -> 36, stage 4 15 -> 24).
        """
        B, H, W, C = y.shape
        w, s = self.window_size, self.shift_size
        pad_b, pad_r = (w - H % w) % w, (w - W % w) % w
        qkv_layer = self.attn.qkv
        Hp, Wp = H + pad_b, W + pad_r
        qkv = qkv_layer(y)  # (B, H, W, 3C)
        if pad_b or pad_r:
            padded = qkv.new_empty(B, Hp, Wp, qkv.shape[-1])
            padded[:, :H, :W] = qkv
            pad_value = 0.0 if qkv_layer.bias is None else qkv_layer.bias  # qkv(0) = bias
            padded[:, H:] = pad_value
            padded[:, :H, W:] = pad_value
            qkv = padded  # (B, Hp, Wp, 3C)
        if s:
            qkv = torch.roll(qkv, shifts=(-s, -s), dims=(1, 2))
        windows = self.attn.attend(window_partition(qkv, w), shift_mask if s else None)
        out = window_reverse(windows, w, Hp, Wp)  # (B, Hp, Wp, C)
        if s:
            out = torch.roll(out, shifts=(s, s), dims=(1, 2))
        if pad_b or pad_r:
            # contiguous: a Linear on the cropped strided view is slow under bf16 autocast on CPU
            out = out[:, :H, :W, :].contiguous()
        return self.attn.proj(out)


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token: concat [x(0,0), x(1,0), x(0,1), x(1,1)], LN(4C), 4C -> 2C."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C); odd sides are zero-padded first."""
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
            H, W = H + H % 2, W + W % 2
        # (B, H/2, dy, W/2, dx, C) -> channel order (dx, dy, C): x0::2,0::2 | x1::2,0::2 | ...
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(
            B, H // 2, W // 2, 4 * C
        )
        return self.reduction(self.norm(x))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (Conv p x p / p, then LayerNorm)."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, ceil(H/p), ceil(W/p), D); sides are zero-padded to multiples of p."""
        p = self.patch_size
        H, W = x.shape[-2:]
        if H % p or W % p:
            x = F.pad(x, (0, (p - W % p) % p, 0, (p - H % p) % p))
        x = self.proj(x).permute(0, 2, 3, 1)  # (B, H/p, W/p, D)
        return self.norm(x)


class ConvStem(nn.Module):
    """Overlapping convolutional stem (ours; not in ReLA): two 3x3 stride-2 convolutions.

    A switch for backbones trained *from scratch* (the CPU presets). ReLA's Swin is pretrained on
    ImageNet-22k, so its 4x4 linear patch embedding already sees shapes; from scratch, a plain
    patch embedding learns shape cues slowly (colour is a per-pixel cue, shape is not). Two
    overlapping 3x3 convolutions give the tokens the locality prior of a CNN, as in "Early
    convolutions help transformers see better" (Xiao et al., 2021). Output layout and stride (4)
    are those of :class:`PatchEmbed`, so the rest of the backbone is unchanged.
    """

    def __init__(self, *, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        mid = max(embed_dim // 2, 8)
        self.conv1 = nn.Conv2d(in_chans, mid, kernel_size=3, stride=2, padding=1)
        self.norm1 = nn.LayerNorm(mid)  # per position over channels: local, batch-independent
        self.conv2 = nn.Conv2d(mid, embed_dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, ceil(H/4), ceil(W/4), D)."""
        x = self.norm1(self.conv1(x).permute(0, 2, 3, 1))  # (B, H/2, W/2, D/2)
        x = F.gelu(x).permute(0, 3, 1, 2)  # (B, D/2, H/2, W/2)
        x = self.conv2(x).permute(0, 2, 3, 1)  # (B, H/4, W/4, D)
        return self.norm(x)


# --------------------------------------------------------------------------------------------------
# Stages and the backbone
# --------------------------------------------------------------------------------------------------
@dataclass
class StageOutput:
    """What one stage produces (all channels-last).

    Attributes:
        out: (B, H, W, C) multimodal tokens ``x_residual`` (or the Swin path when fusion is off),
            before the stage's output LayerNorm.
        swin_tokens: (B, H, W, C) Swin path after the stage's blocks (PWAM input).
        next_x: (B, H/2, W/2, 2C) input of the next stage, None for the last stage.
    """

    out: Tensor
    swin_tokens: Tensor
    next_x: Tensor | None


class MultiModalStage(nn.Module):
    """Swin blocks, then PWAM, then (stages 0..2) the gated residual and patch merging."""

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: list[float],
        lang_dim: int,
        fusion_heads: int,
        use_fusion: bool,
        downsample: bool,
        res_gate_init: str = "zeros",
        spatial_features: bool = False,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim=dim,
                num_heads=num_heads,
                window_size=window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_path=drop_path[i],
            )
            for i in range(depth)
        )
        self.fusion = (
            PWAM(dim=dim, lang_dim=lang_dim, num_heads=fusion_heads, spatial=spatial_features)
            if use_fusion else None
        )
        if downsample:
            self.downsample: PatchMerging | None = PatchMerging(dim=dim)
            if use_fusion:
                self.res_gate: nn.Sequential | None = nn.Sequential(
                    nn.Linear(dim, dim, bias=False),
                    nn.ReLU(),
                    nn.Linear(dim, dim, bias=False),
                    nn.Tanh(),
                )
                if res_gate_init == "zeros":
                    nn.init.zeros_(self.res_gate[0].weight)  # swin.py: gate starts closed
                elif res_gate_init != "learnable":
                    raise ValueError(
                        f"res_gate_init must be 'zeros' or 'learnable', got {res_gate_init!r}"
                    )
                # Both modes start closed (W2 = 0); "learnable" keeps W1 at PyTorch's default so
                # that dW2 = dL/dz2 * relu(W1 r) is non-zero and the gate can open from scratch.
                nn.init.zeros_(self.res_gate[2].weight)
            else:
                self.res_gate = None
        else:
            self.downsample = None
            self.res_gate = None

    def forward(self, x: Tensor, lang: Tensor | None, word_mask: Tensor | None) -> StageOutput:
        """Run the stage.

        Args:
            x: (B, H, W, C) input tokens.
            lang: (B, L, Dt) word features (None when fusion is off).
            word_mask: (B, L) float word mask, 1 = real token (None when fusion is off).
        """
        B, H, W, C = x.shape
        w = self.window_size
        Hp, Wp = -(-H // w) * w, -(-W // w) * w
        shift_mask = None
        if any(blk.shift_size for blk in self.blocks):
            shift_mask = shifted_window_mask((Hp, Wp), w, self.shift_size, x.device, x.dtype)
        for blk in self.blocks:
            x = blk(x, shift_mask)
        swin_tokens = x
        if self.fusion is not None:
            out = self.fusion(x.reshape(B, H * W, C), lang, word_mask, (H, W)).view(B, H, W, C)
            if self.res_gate is not None:
                x = x + self.res_gate(out) * out
        else:
            out = x
        next_x = self.downsample(x) if self.downsample is not None else None
        return StageOutput(out=out, swin_tokens=swin_tokens, next_x=next_x)


class MultiModalSwin(nn.Module):
    """ReLA's language-fused Swin backbone (official ``MultiModalSwinTransformer``).

    Args:
        embed_dim: channels of stage 0 (stage s has ``embed_dim * 2**s``). Swin-B: 128.
        depths: blocks per stage. Swin-B: (2, 2, 18, 2).
        num_heads: attention heads per stage. Swin-B: (4, 8, 16, 32).
        window_size: attention window side. Swin-B 384: 12.
        patch_size: side of the patch embedding (stride of stage 0). 4.
        mlp_ratio: hidden width of the block MLP relative to C. 4.0.
        qkv_bias: bias in the qkv projection. True.
        drop_path_rate: stochastic depth, linear from 0 to this over all blocks (training only).
        lang_dim: width Dt of the word features fed to the PWAMs (768 for BERT-base).
        fusion_heads: heads of each PWAM attention (ReLA: 1).
        use_fusion: False gives a plain Swin (no PWAM, no gates); its stage outputs are
            ``norm_i(x)`` of the Swin path. Used to check the Swin against timm.
        in_chans: image channels.
        res_gate_init: "zeros" (official: W1 = W2 = 0, the gate never trains from scratch) or
            "learnable" (W2 = 0 only: the gate starts closed and can open).
        stem: "patch" (official: p x p linear patch embedding) or "conv" (:class:`ConvStem`,
            stride 4 only; for training from scratch).
        spatial_features: every PWAM adds projected cell coordinates to its visual input
            (:func:`gres.model.fusion.spatial_features`; ours, official False).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depths: tuple[int, ...] | list[int],
        num_heads: tuple[int, ...] | list[int],
        window_size: int,
        patch_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path_rate: float,
        lang_dim: int,
        fusion_heads: int,
        use_fusion: bool,
        in_chans: int = 3,
        res_gate_init: str = "zeros",
        stem: str = "patch",
        spatial_features: bool = False,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {depths} and num_heads {num_heads} differ in length")
        self.num_stages = len(depths)
        self.use_fusion = use_fusion
        self.lang_dim = lang_dim
        self.patch_size = patch_size
        self.num_features = [embed_dim * 2**i for i in range(self.num_stages)]
        self.strides = [patch_size * 2**i for i in range(self.num_stages)]
        self.out_features = [f"res{i + 2}" for i in range(self.num_stages)]

        if stem == "patch":
            self.patch_embed = PatchEmbed(
                patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        elif stem == "conv":
            if patch_size != 4:
                raise ValueError(f"stem='conv' has stride 4; patch_size is {patch_size}")
            self.patch_embed = ConvStem(in_chans=in_chans, embed_dim=embed_dim)
        else:
            raise ValueError(f"unknown stem {stem!r}: choose 'patch' (official) or 'conv'")
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # swin.py:385
        self.layers = nn.ModuleList()
        for i in range(self.num_stages):
            start = sum(depths[:i])
            self.layers.append(
                MultiModalStage(
                    dim=self.num_features[i],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window_size=window_size,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=dpr[start : start + depths[i]],
                    lang_dim=lang_dim,
                    fusion_heads=fusion_heads,
                    use_fusion=use_fusion,
                    downsample=i < self.num_stages - 1,
                    res_gate_init=res_gate_init,
                    spatial_features=spatial_features,
                )
            )
        for i, dim in enumerate(self.num_features):
            self.add_module(f"norm{i}", nn.LayerNorm(dim))  # one output norm per stage

    @property
    def output_channels(self) -> dict[str, int]:
        """{"res2": C, "res3": 2C, ...}."""
        return dict(zip(self.out_features, self.num_features))

    @property
    def output_strides(self) -> dict[str, int]:
        """{"res2": 4, "res3": 8, ...}."""
        return dict(zip(self.out_features, self.strides))

    def forward(
        self,
        images: Tensor,
        lang_feats: Tensor | None = None,
        text_mask: Tensor | None = None,
        *,
        return_swin_tokens: bool = False,
    ) -> dict[str, Tensor]:
        """Multi-scale language-aware features.

        Args:
            images: (B, 3, H, W) normalised images, H and W multiples of 32.
            lang_feats: (B, L, Dt) word features (BERT last hidden state). Required with fusion.
            text_mask: (B, L) bool, True for real tokens; every row needs at least one.
            return_swin_tokens: also return the Swin path after each stage's blocks (the PWAM
                input) as ``swin_tokens_s{i}``: (B, H_i * W_i, C_i), row-major tokens.

        Returns:
            ``res2..res5``: (B, C_i, H/4/2^i, W/4/2^i) NCHW, ``norm_i`` of each stage's output;
            plus ``swin_tokens_s0..s3`` if requested.
        """
        if images.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        check_image_size(images.shape[-2], images.shape[-1])
        lang = word_mask = None
        if self.use_fusion:
            lang, word_mask = self._prepare_language(images, lang_feats, text_mask)

        x = self.patch_embed(images)  # (B, H/4, W/4, C)
        outs: dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers):
            stage = layer(x, lang, word_mask)
            norm = getattr(self, f"norm{i}")
            outs[f"res{i + 2}"] = norm(stage.out).permute(0, 3, 1, 2).contiguous()
            if return_swin_tokens:
                outs[f"swin_tokens_s{i}"] = stage.swin_tokens.flatten(1, 2)
            if stage.next_x is not None:
                x = stage.next_x
        return outs

    def _prepare_language(
        self, images: Tensor, lang_feats: Tensor | None, text_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Validate the language inputs; return the features and a (B, L) float word mask."""
        if lang_feats is None or text_mask is None:
            raise ValueError("MultiModalSwin with fusion needs lang_feats and text_mask")
        B = images.shape[0]
        if lang_feats.ndim != 3 or lang_feats.shape[0] != B or lang_feats.shape[2] != self.lang_dim:
            raise ValueError(
                f"lang_feats must be (B={B}, L, Dt={self.lang_dim}), got {tuple(lang_feats.shape)}"
            )
        if text_mask.shape != lang_feats.shape[:2]:
            raise ValueError(
                f"text_mask shape {tuple(text_mask.shape)} does not match lang_feats "
                f"{tuple(lang_feats.shape[:2])}"
            )
        if text_mask.dtype != torch.bool:
            raise ValueError(f"text_mask must be bool (True = real token), got {text_mask.dtype}")
        empty = (~text_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"empty expression: text_mask has no real token for samples {empty}")
        return lang_feats, text_mask.to(lang_feats.dtype)  # (B, L, Dt), (B, L)


def build_swin(cfg: Any, lang_dim: int) -> MultiModalSwin:
    """Build :class:`MultiModalSwin` from a :class:`gres.config.SwinConfig` (no weights loaded)."""
    return MultiModalSwin(
        embed_dim=cfg.embed_dim,
        depths=tuple(cfg.depths),
        num_heads=tuple(cfg.num_heads),
        window_size=cfg.window_size,
        patch_size=cfg.patch_size,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias,
        drop_path_rate=cfg.drop_path_rate,
        lang_dim=lang_dim,
        fusion_heads=cfg.fusion_heads,
        use_fusion=cfg.use_fusion,
        res_gate_init=cfg.res_gate_init,
        stem=cfg.stem,
        spatial_features=cfg.spatial_features,
    )


# --------------------------------------------------------------------------------------------------
# Pretrained Swin weights (timm or Microsoft layout)
# --------------------------------------------------------------------------------------------------
_DROPPED_SUFFIXES = ("relative_position_index", "attn_mask")


def timm_swin_to_ours(
    state_dict: Mapping[str, Any], *, final_norm_to: str | None = None
) -> dict[str, Tensor]:
    """Map a Swin classification state dict onto :class:`MultiModalSwin` key names.

    Accepted layouts (detected from the keys):

    * timm >= 0.9 (e.g. ``swin_base_patch4_window12_384.ms_in22k`` in timm 1.0.31): patch
      merging sits at the *start* of stage s+1 (``layers.{s+1}.downsample.*``); ours, like the
      official code, at the end of stage s (``layers.{s}.downsample.*``).
    * Microsoft original / older timm / the detectron2-converted pkl: already ``layers.{s}``.

    Both merge the 2x2 neighbourhood in the same channel order as ours (timm reshapes to
    (..., dx, dy, C), i.e. x(0,0), x(1,0), x(0,1), x(1,1)), so the merging weights are copied
    unchanged. Dropped: classifier ``head.*``, ``relative_position_index`` and ``attn_mask``
    buffers (recomputed), and the final ``norm.*`` unless ``final_norm_to`` names an output norm
    (e.g. ``"norm3"``). The official ReLA initialisation does not load the final norm (its key
    does not match ``norm3``), so the default drops it.

    Args:
        state_dict: the model's state dict, optionally wrapped as ``{"model": sd}`` or
            ``{"state_dict": sd}``; values may be numpy arrays (detectron2 pkl).
        final_norm_to: where to put ``norm.*``, or None to drop it.

    Returns:
        New dict with our key names (torch tensors).
    """
    for wrapper in ("model", "state_dict"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
    if "patch_embed.proj.weight" not in state_dict and "patch_embed.conv1.weight" not in state_dict:
        raise ValueError(
            "not a Swin state dict: key 'patch_embed.proj.weight' (or 'patch_embed.conv1.weight' "
            "of the conv stem) is missing (first keys: "
            f"{list(state_dict)[:5]})"
        )
    timm_layout = not any(k.startswith("layers.0.downsample.") for k in state_dict)
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(_DROPPED_SUFFIXES) or key.startswith("head"):
            continue
        if key.startswith("norm."):
            if final_norm_to is None:
                continue
            key = f"{final_norm_to}.{key[len('norm.'):]}"
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", key)
        if m and timm_layout:
            key = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        out[key] = torch.as_tensor(value)
    return out


def _read_state_dict_file(path: Path) -> Mapping[str, Any]:
    """Read a checkpoint from .safetensors, .pkl (detectron2) or torch (.pth/.pt/.bin) files."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix == ".pkl":
        with path.open("rb") as f:
            return pickle.load(f, encoding="latin1")
    return torch.load(path, map_location="cpu", weights_only=False)


@dataclass
class SwinLoadReport:
    """Which of the model's keys a pretrained Swin did not provide (expected: the fusion parts)."""

    source: str
    loaded: list[str]
    missing: list[str]


_FRESH_KEYS = re.compile(r"(^norm\d+\.|\.fusion\.|\.res_gate\.)")


def swin_stage_of(name: str) -> int:
    """Stage of a :class:`MultiModalSwin` parameter name: ``layers.i.*`` (stage i's blocks and
    the patch merging after them) -> i; anything else (the patch embedding) -> 0."""
    m = re.match(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else 0


def pretrained_parameters(model: nn.Module, from_stage: int = 0) -> list[nn.Parameter]:
    """The parameters of every :class:`MultiModalSwin` inside ``model`` that pretrained Swin
    weights provide (all but the fusion modules, gates and output norms), limited to stages
    ``>= from_stage`` (the patch embedding is stage 0; see :func:`swin_stage_of`)."""
    out = []
    for module in model.modules():
        if isinstance(module, MultiModalSwin):
            out += [p for name, p in module.named_parameters()
                    if not _FRESH_KEYS.search(name) and swin_stage_of(name) >= from_stage]
    return out


def load_pretrained_swin(
    model: MultiModalSwin, name_or_path: str, *, final_norm_to: str | None = None
) -> SwinLoadReport:
    """Load ImageNet Swin weights into ``model`` (fusion modules, gates, norm0..3 stay fresh).

    Args:
        model: the backbone.
        name_or_path: a local checkpoint file (timm or Microsoft layout, optionally wrapped in
            ``{"model": ...}``; .pth/.pt/.bin/.pkl/.safetensors) or a timm model name such as
            ``"swin_base_patch4_window12_384.ms_in22k"`` (downloaded through timm's hub).
        final_norm_to: see :func:`timm_swin_to_ours`.

    Returns:
        A :class:`SwinLoadReport`.

    Raises:
        ValueError: a key the Swin must provide is missing, or a shape does not match (e.g. a
            window-7 checkpoint for a window-12 model).
        FileNotFoundError: the name is neither a file nor a timm model that can be fetched.
    """
    from gres.config import DATASET_PRETRAINED

    if name_or_path == DATASET_PRETRAINED:
        raise ValueError(
            f"swin.pretrained={DATASET_PRETRAINED!r} must be resolved to the pretrained file "
            "first: gres.pretrain.resolve_pretrained(cfg, root) (gres.engine.train does it), or "
            "build with load_pretrained=False when every weight comes from a checkpoint"
        )
    path = Path(name_or_path).expanduser()
    if path.is_file():
        raw = _read_state_dict_file(path)
        source = str(path)
    else:
        import timm

        try:
            timm_model = timm.create_model(name_or_path, pretrained=True, num_classes=0)
        except RuntimeError as err:  # unknown model name
            raise FileNotFoundError(
                f"'{name_or_path}' is neither a checkpoint file nor a timm Swin model: {err}"
            ) from err
        except OSError as err:  # hub unreachable (offline)
            raise FileNotFoundError(
                f"could not fetch timm weights '{name_or_path}' ({err}); without network, pass "
                "the path of a local Swin checkpoint (timm or Microsoft .pth/.safetensors)"
            ) from err
        raw = timm_model.state_dict()
        source = f"timm:{name_or_path}"
    mapped = timm_swin_to_ours(raw, final_norm_to=final_norm_to)
    own = model.state_dict()
    unexpected = sorted(set(mapped) - set(own))
    if unexpected:
        raise ValueError(f"{source}: keys not in the backbone: {unexpected[:10]}")
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if v.shape != own[k].shape
    ]
    if bad:
        raise ValueError(f"{source}: shape mismatch (wrong Swin variant?): {bad[:5]}")
    missing = sorted(set(own) - set(mapped))
    not_fresh = [k for k in missing if not _FRESH_KEYS.search(k)]
    if not_fresh:
        raise ValueError(f"{source}: Swin weights missing from the checkpoint: {not_fresh[:10]}")
    model.load_state_dict(mapped, strict=False)
    return SwinLoadReport(source=source, loaded=sorted(mapped), missing=missing)
