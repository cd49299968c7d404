"""GRESModel: shapes, backward, determinism, bad inputs, postprocess, variants, presets."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gres.config import PRESETS, DecoderConfig, ModelConfig
from gres.model import GRESModel, GRESOutput, build_model, count_parameters, postprocess


def _cfg(**kw) -> ModelConfig:
    cfg = PRESETS["tiny-test"]().model
    return dataclasses.replace(cfg, **kw)


def _model(seed: int = 0, **kw) -> GRESModel:
    torch.manual_seed(seed)
    return build_model(_cfg(**kw))


def _batch(B: int = 2, size: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (B, 3, size, size), generator=g, dtype=torch.uint8)
    ids = torch.randint(1000, 2000, (B, 20), generator=g)
    mask = torch.zeros(B, 20, dtype=torch.bool)
    mask[0, :6] = True
    mask[1, :20] = True  # a hard-truncated expression
    ids[~mask] = 0
    ids[:, 0] = 101  # [CLS]
    return images, ids, mask


def _perturb(model: torch.nn.Module, std: float = 0.02) -> None:
    """Wake the zero-initialised paths (lang_proj, res_gate, deformable offsets) up."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def test_output_shapes():
    model = _model().eval()
    with torch.no_grad():
        out = model(*_batch())
    assert isinstance(out, GRESOutput)
    assert out.mask_logits.shape == (2, 2, 16, 16)
    assert out.region_logits.shape == (2, 16, 2)
    assert out.nt_logits.shape == (2, 2)
    assert out.region_masks.shape == (2, 16, 16, 16)
    assert out.extras == {}
    for t in (out.mask_logits, out.region_logits, out.nt_logits, out.region_masks):
        assert torch.isfinite(t).all()


def test_backward_reaches_every_trainable_parameter():
    model = _model()
    _perturb(model)
    out = model(*_batch())
    loss = out.mask_logits.mean() + out.region_logits.square().mean()
    loss = loss + out.nt_logits.square().mean()
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert not missing, missing


def test_same_seed_same_outputs_and_uint8_equals_float():
    a, b = _model(seed=3).eval(), _model(seed=3).eval()
    images, ids, mask = _batch()
    with torch.no_grad():
        out_a = a(images, ids, mask)
        out_b = b(images, ids, mask)
        out_f = a(images.float(), ids, mask)
    assert torch.equal(out_a.mask_logits, out_b.mask_logits)
    assert torch.equal(out_a.mask_logits, out_f.mask_logits)
    c = _model(seed=4).eval()
    with torch.no_grad():
        assert not torch.equal(c(images, ids, mask).mask_logits, out_a.mask_logits)


def test_normalisation_uses_pixel_mean_std():
    model = _model().eval()
    images = torch.full((1, 3, 64, 64), 100.0)
    norm = model.normalize(images)
    mean, std = torch.tensor(model.cfg.pixel_mean), torch.tensor(model.cfg.pixel_std)
    torch.testing.assert_close(norm[0, :, 0, 0], (100.0 - mean) / std)


def test_extras_hold_every_stage():
    model = _model().eval()
    with torch.no_grad():
        out = model(*_batch(), return_extras=True)
    ex = out.extras
    for key in (
        "text_last_hidden_state", "backbone_res2", "backbone_res5", "backbone_swin_tokens_s3",
        "pixdec_mask_features", "pixdec_ms0", "pixdec_ms2", "dec_ria_out", "dec_queries",
        "dec_pred_masks", "dec_attn_mask0", "dec_attn_full_rows", "dec_after_lang",
    ):
        assert key in ex, key
    assert ex["text_last_hidden_state"].shape == (2, 20, 32)
    assert ex["backbone_res2"].shape == (2, 16, 16, 16)
    assert ex["pixdec_ms0"].shape == (2, 32, 2, 2)


@pytest.mark.parametrize("size", [60, 48 + 8])
def test_bad_input_size(size):
    model = _model().eval()
    images, ids, mask = _batch(size=size)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        model(images, ids, mask)


def test_token_ids_outside_vocabulary():
    model = _model().eval()
    images, ids, mask = _batch()
    ids[0, 1] = 30522  # vocabulary size
    with pytest.raises(ValueError, match="outside the text encoder's vocabulary"):
        model(images, ids, mask)
    ids[0, 1] = -1
    with pytest.raises(ValueError, match="vocabulary"):
        model(images, ids, mask)


def test_empty_expression():
    model = _model().eval()
    images, ids, mask = _batch()
    mask[1] = False
    with pytest.raises(ValueError, match=r"empty expression.*\[1\]"):
        model(images, ids, mask)


def test_other_malformed_inputs():
    model = _model().eval()
    images, ids, mask = _batch()
    with pytest.raises(ValueError, match="RGB"):
        model(images[:, :1], ids, mask)
    with pytest.raises(ValueError, match="bool"):
        model(images, ids, mask.long())
    with pytest.raises(ValueError, match="input_ids"):
        model(images, ids[:1], mask[:1])


def test_postprocess_official_rules():
    mask_logits = torch.zeros(1, 2, 2, 2)
    mask_logits[0, 1, 0, 0] = 3.0  # target
    mask_logits[0, 0, 1, 1] = 3.0  # background
    mask_logits[0, :, 0, 1] = 40.0  # both saturate: sigmoid ties at 1.0 -> class 0
    out = GRESOutput(mask_logits=mask_logits, region_logits=torch.zeros(1, 4, 2),
                     nt_logits=torch.tensor([[0.1, 0.2]]), region_masks=torch.zeros(1, 4, 2, 2))
    pred_mask, pred_nt, nt_prob = postprocess(out, 2)
    assert pred_mask.tolist() == [[[True, False], [False, False]]]  # equal logits (1,0) -> class 0
    assert pred_nt.tolist() == [True]
    assert nt_prob.item() == pytest.approx(torch.sigmoid(torch.tensor(0.2)).item())
    big, _, _ = postprocess(out, (6, 4))
    assert big.shape == (1, 6, 4)
    # the mask is not emptied when no-target is predicted (official evaluation)
    assert pred_mask.any()


def test_original_variant_builds_and_runs():
    model = _model(decoder=dataclasses.replace(_cfg().decoder, variant="original")).eval()
    assert "decoder.RLA_gate" in model.state_dict()
    with torch.no_grad():
        out = model(*_batch())
    assert out.mask_logits.shape == (2, 2, 16, 16)


def test_bf16_autocast_runs():
    model = _model().eval()
    with torch.no_grad():
        ref = model(*_batch())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(*_batch())
    assert torch.isfinite(out.mask_logits.float()).all()
    assert torch.allclose(out.nt_logits.float(), ref.nt_logits, atol=0.1)


def test_parameter_counts():
    counts = count_parameters(_model())
    assert set(counts) == {"backbone", "pixel_decoder", "decoder", "text_encoder", "total"}
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_build_without_pretrained_reads_folder_architecture():
    """load_pretrained=False for the packaged MiniLM builds its architecture (hidden 384)."""
    cfg = _cfg(text=dataclasses.replace(_cfg().text, name_or_path="minilm"))
    model = build_model(cfg, load_pretrained=False).eval()
    assert model.text_encoder.hidden_size == 384
    assert model.decoder.lang_proj.in_features == 384
    with torch.no_grad():
        assert model(*_batch()).mask_logits.shape == (2, 2, 16, 16)


def test_bad_config_values():
    with pytest.raises(ValueError, match="multiple"):
        build_model(_cfg(image_size=60))
    with pytest.raises(ValueError, match="variant"):
        build_model(_cfg(decoder=DecoderConfig(variant="nope")))


def test_bf16_inference_path_stays_close_to_fp32():
    import copy

    from gres.model import cast_for_bf16_inference

    model = _model().eval()
    _perturb(model)
    batch = _batch()
    with torch.no_grad():
        ref = model(*batch)
        fast = cast_for_bf16_inference(copy.deepcopy(model))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fast(*batch)
    assert fast.decoder.mask_embed.layers[0].weight.dtype == torch.bfloat16
    assert fast.decoder.decoder_norm.weight.dtype == torch.float32
    assert model.decoder.mask_embed.layers[0].weight.dtype == torch.float32  # copy untouched
    scale = ref.mask_logits.abs().max()
    assert (out.mask_logits.float() - ref.mask_logits).abs().max() < 0.1 * scale
    agree = (postprocess(out, 64)[0] == postprocess(ref, 64)[0]).float().mean()
    assert agree > 0.9
