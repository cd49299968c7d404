"""Pixel decoder: positional encoding, deformable sampling cores, init, shapes, fp32, key names."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gres.model.pixel_decoder import (
    DeformableEncoder,
    MSDeformAttn,
    MSDeformAttnPixelDecoder,
    PositionEmbeddingSine,
    ms_deform_attn_gather,
    ms_deform_attn_grid_sample,
)

SHAPES = [(3, 4), (6, 8), (12, 16)]


def _random_inputs(seed: int = 0, N: int = 2, Lq: int = 7, nh: int = 2, hd: int = 4, nP: int = 3):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in SHAPES)
    value = torch.randn(N, S, nh, hd, generator=g, dtype=torch.float64)
    # locations deliberately spill outside [0, 1] to exercise zero padding
    loc = torch.rand(N, Lq, nh, len(SHAPES), nP, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3
    weights = torch.rand(N, Lq, nh, len(SHAPES), nP, generator=g, dtype=torch.float64)
    return value, loc, weights


def test_sine_encoding_matches_formula():
    pe = PositionEmbeddingSine(4)
    pos = pe(torch.zeros(2, 5, 3, 6))
    assert pos.shape == (2, 8, 3, 6)
    # channel 0 of pos_y at row i = sin((i + 1) / (H + eps) * 2π / 10000^0); channel 4 = x part
    i, j = 1, 4
    y = (i + 1) / (3 + 1e-6) * 2 * math.pi
    x = (j + 1) / (6 + 1e-6) * 2 * math.pi
    assert pos[0, 0, i, j].item() == pytest.approx(math.sin(y), abs=1e-6)
    assert pos[0, 1, i, j].item() == pytest.approx(math.cos(y), abs=1e-6)
    assert pos[0, 2, i, j].item() == pytest.approx(math.sin(y / 10000 ** (2 / 4)), abs=1e-6)
    assert pos[0, 4, i, j].item() == pytest.approx(math.sin(x), abs=1e-6)
    assert torch.equal(pos[0], pos[1])


def test_gather_core_equals_grid_sample_core_values_and_grads():
    value, loc, weights = _random_inputs()
    ref = ms_deform_attn_grid_sample(value, SHAPES, loc, weights)
    out = ms_deform_attn_gather(value, SHAPES, loc, weights)
    assert out.shape == ref.shape == (2, 7, 8)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)

    grads = []
    for core in (ms_deform_attn_grid_sample, ms_deform_attn_gather):
        v, l, w = (t.clone().requires_grad_() for t in (value, loc, weights))
        (core(v, SHAPES, l, w) * torch.linspace(-1, 1, 8, dtype=torch.float64)).sum().backward()
        grads.append((v.grad, l.grad, w.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_gather_core_far_outside_reads_zero():
    value, loc, weights = _random_inputs(1)
    loc = loc + 5.0  # every sample far to the bottom-right
    out = ms_deform_attn_gather(value, SHAPES, loc, weights)
    assert torch.count_nonzero(out) == 0


def test_msdeformattn_official_init():
    attn = MSDeformAttn(d_model=16, n_levels=3, n_heads=4, n_points=2)
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    bias = attn.sampling_offsets.bias.view(4, 3, 2, 2)  # (nh, nL, nP, xy)
    # head 0 points along +x, head 1 along +y; point p is (p + 1) times the unit step
    torch.testing.assert_close(bias[0, 0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(bias[1, 2, 1], torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[:, 0], bias[:, 2])  # same for every level


def test_reference_points_are_pixel_centres():
    ref = DeformableEncoder.reference_points([(2, 4)], batch=1, device=torch.device("cpu"))
    assert ref.shape == (1, 8, 1, 2)
    torch.testing.assert_close(ref[0, 0, 0], torch.tensor([0.125, 0.25]))
    torch.testing.assert_close(ref[0, 7, 0], torch.tensor([0.875, 0.75]))


def _decoder(**kw) -> MSDeformAttnPixelDecoder:
    args = dict(
        in_channels=[8, 16, 32, 64], conv_dim=16, mask_dim=12, num_layers=2, num_heads=2,
        num_points=2, ffn_dim=32, norm_groups=4,
    )
    args.update(kw)
    return MSDeformAttnPixelDecoder(**args)


def _features(B: int = 2, H: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"res{i + 2}": torch.randn(B, 8 * 2**i, H // 4 // 2**i, H // 4 // 2**i, generator=g)
        for i in range(4)
    }


def test_pixel_decoder_shapes_and_cores_agree():
    torch.manual_seed(0)
    dec = _decoder().eval()
    feats = _features()
    out = dec(feats)
    assert out.mask_features.shape == (2, 12, 16, 16)
    shapes = [tuple(m.shape) for m in out.multi_scale]
    assert shapes == [(2, 16, 2, 2), (2, 16, 4, 4), (2, 16, 8, 8)]
    for m in dec.modules():
        if isinstance(m, MSDeformAttn):
            m.core = "grid_sample"
    ref = dec(feats)
    torch.testing.assert_close(out.mask_features, ref.mask_features, rtol=1e-5, atol=1e-5)


def test_pixel_decoder_stays_fp32_under_autocast():
    torch.manual_seed(0)
    dec = _decoder().eval()
    feats = {k: v.bfloat16() for k, v in _features().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dec(feats)
    assert out.mask_features.dtype == torch.float32
    assert all(m.dtype == torch.float32 for m in out.multi_scale)
    dec.force_fp32 = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dec(feats)
    assert out.mask_features.dtype == torch.bfloat16


def test_pixel_decoder_backward_reaches_every_parameter():
    torch.manual_seed(0)
    dec = _decoder()
    # perturb the zero-initialised offset / attention-weight matrices so their grads are non-zero
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    out = dec(_features())
    (out.mask_features.square().mean() + sum(m.square().mean() for m in out.multi_scale)).backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_pixel_decoder_key_names_mirror_official():
    keys = set(_decoder(num_layers=1).state_dict())
    expected = {
        "input_proj.0.0.weight", "input_proj.0.0.bias", "input_proj.0.1.weight",
        "input_proj.2.1.bias", "transformer.level_embed",
        "transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
        "transformer.encoder.layers.0.self_attn.attention_weights.bias",
        "transformer.encoder.layers.0.self_attn.value_proj.weight",
        "transformer.encoder.layers.0.self_attn.output_proj.bias",
        "transformer.encoder.layers.0.norm1.weight", "transformer.encoder.layers.0.linear1.weight",
        "transformer.encoder.layers.0.linear2.bias", "transformer.encoder.layers.0.norm2.bias",
        "mask_features.weight", "mask_features.bias", "adapter_1.weight", "adapter_1.norm.weight",
        "adapter_1.norm.bias", "layer_1.weight", "layer_1.norm.weight", "layer_1.norm.bias",
    }
    assert expected <= keys
    assert "adapter_1.bias" not in keys and "layer_1.bias" not in keys  # no-bias convs
    # input_proj order is res5, res4, res3
    sd = _decoder().state_dict()
    assert sd["input_proj.0.0.weight"].shape[1] == 64 and sd["input_proj.2.0.weight"].shape[1] == 16


def test_bad_head_count_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=10, n_levels=3, n_heads=4, n_points=2)


def test_upsampling_matches_fpn_definition():
    """The stride-4 level is layer_1(adapter_1(res2) + bilinear(res3-level output))."""
    torch.manual_seed(0)
    dec = _decoder().eval()
    feats = _features()
    with torch.no_grad():
        out = dec(feats)
        lateral = dec.adapter_1(feats["res2"])
        up = F.interpolate(out.multi_scale[-1], size=lateral.shape[-2:], mode="bilinear",
                           align_corners=False)
        expect = dec.mask_features(dec.layer_1(lateral + up))
    torch.testing.assert_close(out.mask_features, expect)


def test_msdeformattn_cores_agree_including_parameter_grads():
    """The gather path reorders the offset rows and works in pixels: same function and grads."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=3).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    S = sum(h * w for h, w in SHAPES)
    query = torch.randn(2, S, 16, dtype=torch.float64)
    ref = DeformableEncoder.reference_points(SHAPES, 2, torch.device("cpu")).double()
    results = []
    for core in ("grid_sample", "gather"):
        attn.core = core
        attn.zero_grad()
        out = attn(query, ref, query, SHAPES)
        (out * torch.linspace(-1, 1, 16, dtype=torch.float64)).sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in attn.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-5, msg=name)
