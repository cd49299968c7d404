"""ReLA training loss: three weighted two-class cross-entropies (spec §2, official criterion.py).

* **mask**: the 2-channel target-mask logits, bilinearly upsampled (``align_corners=False``) to
  the ground-truth size, against the union mask. No-target samples are supervised too, against an
  all-zero mask (the official behaviour).
* **region** (minimap): the (B, P, 2) region logits against the ground truth resized bilinearly
  to R×R and truncated with ``.long()``. Truncation makes a cell positive only when the resized
  value is exactly 1: with scale ``s = S / R`` each cell reads the 2×2 ground-truth pixels
  around its centre (rows/cols ``s·i + s/2 − 1`` and ``s·i + s/2`` for even ``s``), so it is
  centre-point sampling, not area coverage.
* **no-target**: the (B, 2) logits against the no-target flag (class 1 = no target).

Each CE uses the class weights ``[w0, w1]`` with mean reduction, i.e. ``Σ w_y ℓ / Σ w_y`` over
all pixels / cells / samples of the batch. Only the last decoder layer is supervised (no deep
supervision, no Hungarian matching) unless the model returns ``aux`` layers
(``DecoderConfig.deep_supervision``, ours). Every term is defined when the whole batch is
no-target.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gres.config import LossConfig


def minimap_target(gt_mask: Tensor, region_grid: int) -> Tensor:
    """The official minimap target: bilinear resize to R×R, then ``.long()`` (truncation).

    Args:
        gt_mask: (B, S, S) bool or {0, 1} ground truth.
        region_grid: R.

    Returns:
        (B, R*R) int64 in {0, 1}, row-major (cell (i, j) is region i*R + j).
    """
    resized = F.interpolate(
        gt_mask[:, None].float(), size=(region_grid, region_grid), mode="bilinear",
        align_corners=False,
    )  # (B, 1, R, R)
    return resized.flatten(1).long()  # (B, R*R)


class GRESCriterion(nn.Module):
    """Weighted two-class CE losses of ReLA.

    Args:
        cfg: weights and class weights (:class:`gres.config.LossConfig`).
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer(
            "class_weights",
            torch.tensor(cfg.ce_class_weights, dtype=torch.float32),
            persistent=False,
        )

    def forward(self, output, gt_mask: Tensor, no_target: Tensor) -> dict[str, Tensor]:
        """Compute the losses.

        Args:
            output: a :class:`gres.model.GRESOutput` (uses ``mask_logits`` (B, 2, h, w),
                ``region_logits`` (B, P, 2), ``nt_logits`` (B, 2)).
            gt_mask: (B, S, S) bool union of the referred instances (all False for no-target).
            no_target: (B,) bool.

        Returns:
            ``loss_mask``, ``loss_region``, ``loss_nt`` (unweighted CEs), ``loss_dice`` when
            ``dice_weight`` is set, and ``loss`` = ``total_scale · (mask_weight·loss_mask +
            region_weight·loss_region + no_target_weight·loss_nt [+ dice_weight·loss_dice]
            [+ loss_aux])``. ``loss_aux`` (only when ``output.aux`` holds deep-supervision
            layers) is the sum over those layers of the same weighted sum.
        """
        B, P, _ = output.region_logits.shape
        if gt_mask.ndim != 3 or gt_mask.shape[0] != B:
            raise ValueError(f"gt_mask must be (B={B}, S, S), got {tuple(gt_mask.shape)}")
        if no_target.shape != (B,):
            raise ValueError(f"no_target must be (B={B},), got {tuple(no_target.shape)}")
        region_grid = math.isqrt(P)
        if region_grid * region_grid != P:
            raise ValueError(f"region_logits has P={P} regions, not a square grid")
        terms, weighted = self._terms(
            output.mask_logits, output.region_logits, output.nt_logits, gt_mask, no_target,
            region_grid)
        if getattr(output, "aux", None):  # deep supervision: the same weighted losses on every earlier layer
            aux = [self._terms(a["mask_logits"], a["region_logits"], a["nt_logits"], gt_mask,
                               no_target, region_grid)[1] for a in output.aux]
            terms["loss_aux"] = torch.stack(aux).sum()
            weighted = weighted + terms["loss_aux"]
        return {**terms, "loss": self.cfg.total_scale * weighted}

    def _terms(self, mask_logits: Tensor, region_logits: Tensor, nt_logits: Tensor,
               gt_mask: Tensor, no_target: Tensor, region_grid: int
               ) -> tuple[dict[str, Tensor], Tensor]:
        """One layer's unweighted terms and their weighted sum (before ``total_scale``)."""
        w = self.class_weights.to(mask_logits.device)
        # CE in fp32 (autocast runs log_softmax in fp32 too)
        logits = F.interpolate(
            mask_logits.float(),
            size=gt_mask.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )  # (B, 2, S, S)
        loss_mask = F.cross_entropy(logits, gt_mask.long(), weight=w)
        cells = minimap_target(gt_mask, region_grid)  # (B, P)
        loss_region = F.cross_entropy(region_logits.float().transpose(1, 2), cells, weight=w)
        loss_nt = F.cross_entropy(nt_logits.float(), no_target.long(), weight=w)
        c = self.cfg
        weighted = (
            c.mask_weight * loss_mask + c.region_weight * loss_region + c.no_target_weight * loss_nt
        )
        terms = {"loss_mask": loss_mask, "loss_region": loss_region, "loss_nt": loss_nt}
        if c.dice_weight:
            terms["loss_dice"] = dice_loss(logits, gt_mask)
            weighted = weighted + c.dice_weight * terms["loss_dice"]
        return terms, weighted


def dice_loss(logits: Tensor, gt_mask: Tensor) -> Tensor:
    """Soft Dice loss of the target class, one term per sample, averaged (ours; not in ReLA).

    ``1 - (2 Σ p g + 1) / (Σ p + Σ g + 1)`` with ``p`` the two-class softmax probability of
    "target" (the probability the official argmax thresholds at 0.5) and ``g`` the ground truth;
    the +1 keeps it defined for the empty masks of no-target samples, which it pushes to zero.
    Unlike a pixel-wise CE, it scores each mask as a whole, so small objects count as much as
    large ones and a blob twice the object's size costs a third of the Dice.

    Args:
        logits: (B, 2, S, S) mask logits at the ground-truth size.
        gt_mask: (B, S, S) bool ground truth.
    """
    p = logits.float().softmax(1)[:, 1].flatten(1)  # (B, S*S)
    g = gt_mask.flatten(1).float()  # (B, S*S)
    dice = (2 * (p * g).sum(-1) + 1) / (p.sum(-1) + g.sum(-1) + 1)  # (B,)
    return 1 - dice.mean()
