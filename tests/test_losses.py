"""Losses: hand-checked CE values, the centre-sampling minimap target, no-target batches."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from gres.config import LossConfig
from gres.losses import GRESCriterion, dice_loss, minimap_target


def _output(mask_logits, region_logits, nt_logits):
    return SimpleNamespace(
        mask_logits=mask_logits, region_logits=region_logits, nt_logits=nt_logits
    )


def _ce(logit0: float, logit1: float, y: int) -> float:
    z = [logit0, logit1]
    return -(z[y] - math.log(math.exp(z[0]) + math.exp(z[1])))


def test_hand_checked_case():
    """One 1x2 image, constant logits (upsampling keeps constants), 2x2 GT, 1x1 minimap."""
    mask_logits = torch.tensor([[[[0.0]], [[1.0]]]])  # (1, 2, 1, 1): class 1 favoured by 1
    gt = torch.tensor([[[True, False], [True, True]]])  # 3 fg pixels, 1 bg
    region_logits = torch.tensor([[[2.0, 0.0]]])  # (1, 1, 2)
    nt_logits = torch.tensor([[0.5, -0.5]])
    crit = GRESCriterion(LossConfig())
    losses = crit(_output(mask_logits, region_logits, nt_logits), gt, torch.tensor([False]))
    w0, w1 = 0.9, 1.1
    expect_mask = (3 * w1 * _ce(0, 1, 1) + w0 * _ce(0, 1, 0)) / (3 * w1 + w0)
    # minimap: bilinear 2x2 -> 1x1 reads the 4 pixels' mean = 0.75 -> .long() = 0
    expect_region = _ce(2, 0, 0)  # a single sample: the class weight cancels
    expect_nt = _ce(0.5, -0.5, 0)
    assert losses["loss_mask"].item() == pytest.approx(expect_mask, rel=1e-6)
    assert losses["loss_region"].item() == pytest.approx(expect_region, rel=1e-6)
    assert losses["loss_nt"].item() == pytest.approx(expect_nt, rel=1e-6)
    total = 5.0 * (expect_mask + 0.1 * expect_region + 0.1 * expect_nt)
    assert losses["loss"].item() == pytest.approx(total, rel=1e-6)


def test_weights_are_config_fields():
    out = _output(torch.randn(2, 2, 4, 4), torch.randn(2, 4, 2), torch.randn(2, 2))
    gt = torch.rand(2, 16, 16) > 0.5
    nt = torch.tensor([False, True])
    base = GRESCriterion(LossConfig())(out, gt, nt)
    cfg = LossConfig(mask_weight=2.0, region_weight=0.5, no_target_weight=0.0, total_scale=1.0)
    other = GRESCriterion(cfg)(out, gt, nt)
    expect = 2.0 * base["loss_mask"] + 0.5 * base["loss_region"]
    torch.testing.assert_close(other["loss"], expect)
    flat = GRESCriterion(dataclasses.replace(cfg, ce_class_weights=(1.0, 1.0)))(out, gt, nt)
    assert not torch.allclose(flat["loss_mask"], base["loss_mask"])


def test_dice_loss_hand_checked_and_added_only_when_weighted():
    """Constant logits: p = sigmoid(1) everywhere on a 2x2 image with 3 target pixels, and an
    empty no-target sample; the Dice term is absent at the official weight 0."""
    p = 1 / (1 + math.exp(-1.0))
    logits = torch.tensor([[0.0], [1.0]]).view(1, 2, 1, 1).expand(2, 2, 2, 2)
    gt = torch.tensor([[[True, False], [True, True]], [[False, False], [False, False]]])
    expect = 1 - ((2 * 3 * p + 1) / (4 * p + 3 + 1) + 1 / (4 * p + 1)) / 2
    assert dice_loss(logits, gt).item() == pytest.approx(expect, rel=1e-6)
    # a perfect, saturated mask scores ~0 and an inverted one ~1
    sharp = torch.stack([~gt, gt], 1).float() * 40 - 20  # (B, 2, 2, 2)
    assert dice_loss(sharp, gt).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(-sharp[:1], gt[:1]).item() == pytest.approx(1 - 1 / 5, abs=1e-6)  # p on 1 bg px

    out = _output(logits[:, :, :1, :1], torch.randn(2, 4, 2), torch.randn(2, 2))
    nt = torch.tensor([False, True])
    base = GRESCriterion(LossConfig())(out, gt, nt)
    assert "loss_dice" not in base
    with_dice = GRESCriterion(LossConfig(dice_weight=2.0))(out, gt, nt)
    assert with_dice["loss_dice"].item() == pytest.approx(expect, rel=1e-6)
    torch.testing.assert_close(with_dice["loss"], base["loss"] + 5.0 * 2.0 * with_dice["loss_dice"])


def test_minimap_target_is_centre_sampling():
    """Scale 48 (480 -> 10): cell (i, j) is 1 iff GT rows/cols {48i+23, 48i+24} are all fg."""
    gt = torch.zeros(1, 480, 480, dtype=torch.bool)
    # cell (2, 3): only its 2x2 centre block is foreground -> positive
    gt[0, 48 * 2 + 23 : 48 * 2 + 25, 48 * 3 + 23 : 48 * 3 + 25] = True
    # cell (5, 5): everything except one centre pixel -> negative despite ~100% coverage
    gt[0, 240:288, 240:288] = True
    gt[0, 48 * 5 + 24, 48 * 5 + 23] = False
    target = minimap_target(gt, 10).view(10, 10)
    assert target[2, 3] == 1 and target[5, 5] == 0
    assert int(target.sum()) == 1


def test_minimap_target_row_major():
    gt = torch.zeros(1, 40, 40, dtype=torch.bool)
    gt[0, 0:10, 30:40] = True  # top-right cell of a 4x4 grid
    assert minimap_target(gt, 4).flatten().nonzero().flatten().tolist() == [3]


def test_all_no_target_batch_is_finite_with_grads():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 8, 8, requires_grad=True)
    region = torch.randn(3, 16, 2, requires_grad=True)
    nt = torch.randn(3, 2, requires_grad=True)
    gt = torch.zeros(3, 32, 32, dtype=torch.bool)
    flags = torch.ones(3, dtype=torch.bool)
    losses = GRESCriterion(LossConfig())(_output(logits, region, nt), gt, flags)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    for t in (logits, region, nt):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_mixed_batch_is_weighted_mean_of_samples():
    """Batch CE = Σ_b Σ w·ℓ / Σ_b Σ w (class-weighted mean over every pixel of the batch)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 4, 4)
    region = torch.randn(2, 4, 2)
    nt = torch.randn(2, 2)
    gt = torch.zeros(2, 8, 8, dtype=torch.bool)
    gt[0, 2:7, 1:5] = True
    flags = torch.tensor([False, True])
    crit = GRESCriterion(LossConfig())
    batch = crit(_output(logits, region, nt), gt, flags)
    num = den = 0.0
    for b in range(2):
        sl = slice(b, b + 1)
        one = crit(_output(logits[sl], region[sl], nt[sl]), gt[sl], flags[sl])
        wsum = (gt[b].float() * 1.1 + (~gt[b]).float() * 0.9).sum()
        num += one["loss_mask"] * wsum
        den += wsum
    torch.testing.assert_close(batch["loss_mask"], num / den)


def test_bad_shapes():
    out = _output(torch.randn(2, 2, 4, 4), torch.randn(2, 5, 2), torch.randn(2, 2))
    crit = GRESCriterion(LossConfig())
    with pytest.raises(ValueError, match="square"):
        crit(out, torch.zeros(2, 8, 8, dtype=torch.bool), torch.zeros(2, dtype=torch.bool))
    out = _output(torch.randn(2, 2, 4, 4), torch.randn(2, 4, 2), torch.randn(2, 2))
    with pytest.raises(ValueError, match="gt_mask"):
        crit(out, torch.zeros(8, 8, dtype=torch.bool), torch.zeros(2, dtype=torch.bool))


def test_aux_layers_add_the_same_weighted_losses():
    """Deep supervision: each aux layer adds its own weighted sum (before ``total_scale``), and an
    aux layer identical to the final one doubles the loss."""
    g = torch.Generator().manual_seed(0)
    mask, region, nt = (torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 4, 2, generator=g),
                        torch.randn(2, 2, generator=g))
    gt = torch.rand(2, 8, 8, generator=g) > 0.6
    no_target = torch.tensor([False, True])
    gt[1] = False
    cfg = dataclasses.replace(LossConfig(), dice_weight=0.5)
    crit = GRESCriterion(cfg)
    alone = crit(_output(mask, region, nt), gt, no_target)
    assert "loss_aux" not in alone
    same = _output(mask, region, nt)
    same.aux = [{"mask_logits": mask, "region_logits": region, "nt_logits": nt}]
    doubled = crit(same, gt, no_target)
    torch.testing.assert_close(doubled["loss"], 2 * alone["loss"])
    torch.testing.assert_close(doubled["loss_aux"] * cfg.total_scale, alone["loss"])
    other = _output(mask, region, nt)
    other.aux = [{"mask_logits": -mask, "region_logits": region, "nt_logits": nt}]
    flipped = crit(_output(-mask, region, nt), gt, no_target)
    torch.testing.assert_close(crit(other, gt, no_target)["loss"], alone["loss"] + flipped["loss"])
