"""Tests for gres.model.variants: ablation switches of Tables 2/3 and the one-stage baseline."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from gres.config import (
    DecoderConfig,
    LossConfig,
    ModelConfig,
    PixelDecoderConfig,
    SwinConfig,
    TextConfig,
)
from gres.losses import GRESCriterion
from gres.model import GRESOutput, build_model, postprocess
from gres.model.rela import ReLADecoder
from gres.model.variants import (
    HardSplitBackbone,
    OneStageModel,
    PixelRuleModel,
    VariantGRESModel,
    VariantReLADecoder,
    _decoder_kwargs,
    min_pixels_for,
    pixel_rule_logits,
)

S = 64  # input side of the tiny models


def tiny_cfg(**switches) -> ModelConfig:
    cfg = ModelConfig(
        image_size=S,
        swin=SwinConfig(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4), window_size=4,
                        drop_path_rate=0.0),
        text=TextConfig(name_or_path=None, tokenizer="minilm", hidden_size=32, num_layers=1,
                        num_heads=2, intermediate_size=64, max_position_embeddings=32),
        pixel_decoder=PixelDecoderConfig(conv_dim=32, mask_dim=32, num_layers=1, num_heads=2,
                                         ffn_dim=64, norm_groups=8),
        decoder=DecoderConfig(hidden_dim=32, num_heads=2, ffn_dim=64, num_layers=3, region_grid=4),
    )
    return dataclasses.replace(cfg, **switches)


def inputs(B: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (B, 3, S, S), generator=g, dtype=torch.uint8)
    ids = torch.randint(1000, 2000, (B, 20), generator=g)
    text_mask = torch.zeros(B, 20, dtype=torch.bool)
    text_mask[:, :7] = True
    ids[~text_mask] = 0
    return images, ids, text_mask


def build(seed: int = 0, **switches):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**switches)).eval()


SWITCHES = [
    dict(ria_mode="hard_split_decoder"),
    dict(ria_mode="hard_split_input"),
    dict(rla_mode="product"),
    dict(rla_mode="product+lang"),
    dict(rla_mode="product+region"),
    dict(head="onestage"),
]


def test_min_pixels_scales_the_paper_rule_by_area():
    assert min_pixels_for(480) == 50
    assert min_pixels_for(96) == 2  # 50 * (96/480)^2 = 2.0
    assert min_pixels_for(128) == 4  # 3.56 -> 4
    assert min_pixels_for(32) == 1  # never below one pixel


@pytest.mark.parametrize("switches", SWITCHES, ids=lambda s: "-".join(map(str, s.values())))
def test_variant_shapes_backward_and_determinism(switches):
    model = build(**switches).train()
    images, ids, text_mask = inputs()
    out = model(images, ids, text_mask)
    P = 1 if switches.get("head") == "onestage" else 16
    assert out.mask_logits.shape == (2, 2, S // 4, S // 4)
    assert out.region_logits.shape == (2, P, 2)
    assert out.nt_logits.shape == (2, 2)
    assert out.region_masks.shape == (2, P, S // 4, S // 4)
    assert torch.isfinite(out.mask_logits).all()
    onestage = switches.get("head") == "onestage"
    loss_cfg = LossConfig(region_weight=0.0, no_target_weight=0.0) if onestage else LossConfig()
    gt = torch.zeros(2, S, S, dtype=torch.bool)
    gt[0, 8:30, 10:40] = True
    loss = GRESCriterion(loss_cfg)(out, gt, torch.tensor([False, True]))["loss"]
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [], f"parameters outside the graph: {missing}"
    # same seed -> same weights -> same outputs
    again = build(**switches).train()
    torch.testing.assert_close(again(images, ids, text_mask).mask_logits, out.mask_logits,
                               rtol=0, atol=0)


def test_default_switches_build_the_standard_model():
    assert type(build()).__name__ == "GRESModel"
    assert isinstance(build(rla_mode="product"), VariantGRESModel)
    assert isinstance(build(head="onestage"), OneStageModel)
    assert isinstance(build(ria_mode="hard_split_input").backbone, HardSplitBackbone)


def test_variant_decoder_in_full_mode_equals_the_released_decoder():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    ref = ReLADecoder(**_decoder_kwargs(cfg, 32)).eval()
    var = VariantReLADecoder(ria_mode="attention", rla_mode="full", region_grid=4,
                             **_decoder_kwargs(cfg, 32)).eval()
    var.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    ms = [torch.randn(2, 32, s, s, generator=g) for s in (2, 4, 8)]
    mf = torch.randn(2, 32, 16, 16, generator=g)
    lang = torch.randn(2, 20, 32, generator=g)
    a, b = ref(ms, mf, lang), var(ms, mf, lang)
    for name in ("mask_logits", "region_logits", "nt_logits", "region_masks"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=0)


def test_switches_remove_exactly_the_ablated_modules():
    def modules(**switches) -> set[str]:
        return {n.split(".")[1] for n, _ in build(**switches).named_parameters()
                if n.startswith("decoder.")}

    full, prod = modules(), modules(rla_mode="product")
    plang, pregion = modules(rla_mode="product+lang"), modules(rla_mode="product+region")
    assert {"RLA_vision", "RLA_lang_att", "lang_proj", "lang_weight"} <= full
    assert not {"RLA_vision", "RLA_lang_att", "lang_proj", "lang_weight"} & prod
    assert {"RLA_product_proj", "RLA_product_norm"} <= prod
    assert "RLA_lang_att" in plang and "RLA_vision" not in plang
    assert "RLA_vision" in pregion and "RLA_lang_att" not in pregion
    assert not {"RLA_product_proj", "RLA_product_norm"} & full


def test_hard_split_decoder_pools_each_region_cell():
    cfg = tiny_cfg(ria_mode="hard_split_decoder")
    torch.manual_seed(0)
    dec = VariantReLADecoder(ria_mode="hard_split_decoder", rla_mode="full", region_grid=2,
                             **{**_decoder_kwargs(cfg, 32), "num_queries": 4}).eval()
    D, h, w = 32, 4, 4
    src = torch.randn(1, h * w, D)
    dec._level_sizes = [(h, w)] * 3
    output = torch.zeros(1, 4, D)
    got = dec._hard_pool(0, output, src)
    grid = src.view(1, h, w, D)
    cells = torch.stack([grid[0, r * 2:(r + 1) * 2, c * 2:(c + 1) * 2].reshape(-1, D).mean(0)
                         for r in range(2) for c in range(2)])[None]  # (1, 4, D) row-major cells
    layer = dec.RIA_layers[0]
    mha = layer.multihead_attn
    v = F.linear(cells, mha.in_proj_weight[2 * D:], mha.in_proj_bias[2 * D:])
    torch.testing.assert_close(got, layer.norm(output + mha.out_proj(v)))
    # an attention whose weights are uniform over the cell gives the same thing
    blocked = torch.ones(1, 4, h * w, dtype=torch.bool)
    for q, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        for y in range(r * 2, r * 2 + 2):
            for x in range(c * 2, c * 2 + 2):
                blocked[0, q, y * w + x] = False
    with torch.no_grad():
        mha.in_proj_weight[:D].zero_()  # zero queries -> uniform softmax over the allowed pixels
        mha.in_proj_bias[:D].zero_()
    uniform = layer(output, src, blocked=blocked)
    torch.testing.assert_close(dec._hard_pool(0, output, src), uniform, atol=1e-5, rtol=1e-5)


def test_hard_split_input_encodes_patches_independently():
    images, ids, text_mask = inputs(B=1)
    changed = images.clone()
    changed[..., : S // 4, : S // 4] = 255 - changed[..., : S // 4, : S // 4]  # top-left patch only

    def res2(model, imgs):
        with torch.no_grad():
            lang = model.text_encoder(ids, text_mask)
            return model.backbone(model.normalize(imgs), lang, text_mask)["res2"]

    split = build(ria_mode="hard_split_input")  # R = 4: 16 px patches, res2 4x4 cells per patch
    a, b = res2(split, images), res2(split, changed)
    assert not torch.allclose(a[..., :4, :4], b[..., :4, :4])  # the changed patch moved
    torch.testing.assert_close(a[..., 8:, 8:], b[..., 8:, 8:], rtol=0, atol=0)  # far patches not
    whole = build()  # the standard Swin mixes context across the image (PWAM instance norm, ...)
    a, b = res2(whole, images), res2(whole, changed)
    assert not torch.allclose(a[..., 8:, 8:], b[..., 8:, 8:])


def test_product_baseline_ignores_padding_tokens_but_full_rela_does_not():
    images, ids, text_mask = inputs()
    other = ids.clone()
    other[~text_mask] = 1234  # garbage ids at padded positions
    for switches, invariant in ((dict(rla_mode="product"), True), ({}, False)):
        model = build(**switches)
        with torch.no_grad():
            if hasattr(model.decoder, "lang_proj"):  # zero-initialised (official): make it act
                model.decoder.lang_proj.weight.normal_()
            a = model(images, ids, text_mask).mask_logits
            b = model(images, other, text_mask).mask_logits
        assert torch.allclose(a, b, atol=1e-5) == invariant, switches


def test_pixel_rule_counts_positive_pixels_at_the_eval_size():
    logits = torch.zeros(3, 2, 8, 8)
    logits[:, 0] = 1.0  # background everywhere
    logits[1, 1, 0, :1] = 2.0  # one positive pixel
    logits[2, 1, 0, :2] = 2.0  # two positive pixels
    nt = pixel_rule_logits(logits, (8, 8), min_pixels=2)
    assert nt.argmax(1).tolist() == [1, 1, 0]  # fewer than 2 -> no target
    out = GRESOutput(mask_logits=logits, region_logits=torch.zeros(3, 1, 2),
                     nt_logits=torch.tensor([[5.0, -5.0]] * 3), region_masks=torch.zeros(3, 1, 8, 8))
    _, pred_nt, _ = postprocess(out, 8)
    assert pred_nt.tolist() == [False, False, False]  # the head says "target" for all


def test_pixel_rule_model_overrides_the_nt_head_only():
    model = build()
    images, ids, text_mask = inputs()
    wrapped = PixelRuleModel(model, min_pixels=10**9)  # nothing reaches the threshold
    with torch.no_grad():
        a, b = model(images, ids, text_mask), wrapped(images, ids, text_mask)
    torch.testing.assert_close(b.mask_logits, a.mask_logits)
    assert b.nt_logits.argmax(1).tolist() == [1, 1]


def test_onestage_uses_the_scaled_pixel_rule():
    model = build(head="onestage")
    images, ids, text_mask = inputs()
    with torch.no_grad():
        out = model(images, ids, text_mask)
    pred, pred_nt, _ = postprocess(out, S)
    assert pred_nt.tolist() == (pred.flatten(1).sum(1) < min_pixels_for(S)).tolist()
    assert not out.region_logits.any() and not out.region_masks.any()


@pytest.mark.parametrize("bad", [dict(head="x"), dict(ria_mode="x"), dict(rla_mode="x"),
                                 dict(head="onestage", rla_mode="product"),
                                 dict(rla_mode="product", decoder=DecoderConfig(
                                     hidden_dim=32, num_heads=2, ffn_dim=64, num_layers=3,
                                     region_grid=4, variant="original"))])
def test_bad_switches_raise(bad):
    cfg = tiny_cfg()
    with pytest.raises(ValueError):
        build_model(dataclasses.replace(cfg, **bad))


def test_variant_weights_round_trip(tmp_path):
    from gres.engine import load_weights, save_weights

    cfg = tiny_cfg(rla_mode="product+region")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    save_weights(model, tmp_path / "m.safetensors", cfg)
    torch.manual_seed(1)
    other = load_weights(build_model(cfg).eval(), tmp_path / "m.safetensors")
    images, ids, text_mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(other(images, ids, text_mask).mask_logits,
                                   model(images, ids, text_mask).mask_logits)


def test_eq1_mean_divides_the_logits_and_keeps_every_prediction():
    images, ids, text_mask = inputs()
    torch.manual_seed(0)
    summed = build_model(tiny_cfg()).eval()
    cfg = tiny_cfg()
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, eq1_reduction="mean"))
    mean = build_model(cfg).eval()
    mean.load_state_dict(summed.state_dict())
    with torch.no_grad():
        a, b = summed(images, ids, text_mask), mean(images, ids, text_mask)
    torch.testing.assert_close(b.mask_logits, a.mask_logits / 16)  # P = 4 x 4
    torch.testing.assert_close(b.region_masks, a.region_masks)
    assert torch.equal(postprocess(a, S)[0], postprocess(b, S)[0])
    with pytest.raises(ValueError, match="eq1_reduction"):
        build_model(dataclasses.replace(cfg, decoder=dataclasses.replace(
            cfg.decoder, eq1_reduction="max")))


def test_hard_split_grid_is_the_paper_grid_at_paper_scale():
    from gres.config import PRESETS
    from gres.model.variants import hard_split_grid

    assert hard_split_grid(PRESETS["rela-swin-b"]().model) == 10  # 480 // (4 * 12) = P = 10
    assert hard_split_grid(PRESETS["cpu-small"]().model) == 4  # 96 // (4 * 6): 24-px patches
    assert hard_split_grid(tiny_cfg()) == 4


def test_region_prior_reaches_the_decoder_of_every_attention_variant():
    """``DecoderConfig.region_prior`` is built into ReLA and into the RIA-attention variants, and
    changes their outputs; the hard-split decoder pools, so the prior cannot change it."""
    images, ids, text_mask = inputs()
    cfg = tiny_cfg()
    with_prior = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder,
                                                                      region_prior=2.0))
    for switches in ({}, {"rla_mode": "product"}, {"ria_mode": "hard_split_decoder"}):
        torch.manual_seed(0)
        plain = build_model(dataclasses.replace(cfg, **switches)).eval()
        prior = build_model(dataclasses.replace(with_prior, **switches)).eval()
        prior.load_state_dict(plain.state_dict())
        assert prior.decoder.region_prior == 2.0 and plain.decoder.region_prior == 0.0
        with torch.no_grad():
            a, b = plain(images, ids, text_mask), prior(images, ids, text_mask)
        if switches.get("ria_mode") == "hard_split_decoder":
            torch.testing.assert_close(b.mask_logits, a.mask_logits, rtol=0, atol=0)
        else:
            assert not torch.allclose(b.mask_logits, a.mask_logits, atol=1e-5)
