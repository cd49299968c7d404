"""ReLA decoder: heads, Eq. 1, attention-mask rule, teacher forcing, language path, variants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gres.model.rela import MultiheadAttention, ReLADecoder

B, D, L, DT, CM = 2, 16, 5, 12, 8


def _decoder(variant: str = "main", **kw) -> ReLADecoder:
    args = dict(
        in_channels=D, lang_dim=DT, hidden_dim=D, num_heads=2, ffn_dim=24, num_layers=4,
        num_queries=9, mask_dim=CM, variant=variant,
    )
    args.update(kw)
    return ReLADecoder(**args)


def _inputs(seed: int = 0, channels: int = D):
    g = torch.Generator().manual_seed(seed)
    ms = [torch.randn(B, channels, s, s, generator=g) for s in (2, 4, 8)]
    mf = torch.randn(B, CM, 16, 16, generator=g)
    lang = torch.randn(B, L, DT, generator=g)
    return ms, mf, lang


def _perturb(module: torch.nn.Module, seed: int = 1, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def test_shapes_and_extras():
    torch.manual_seed(0)
    dec = _decoder().eval()
    out = dec(*_inputs(), return_extras=True)
    assert out.mask_logits.shape == (B, 2, 16, 16)
    assert out.region_logits.shape == (B, 9, 2)
    assert out.nt_logits.shape == (B, 2)
    assert out.region_masks.shape == (B, 9, 16, 16)
    ex = out.extras
    for key in ("dec_ria_out", "dec_rla_out", "dec_queries"):
        assert ex[key].shape == (4, B, 9, D)
    assert ex["dec_pred_logits"].shape == (5, B, 9, 2)
    assert ex["dec_pred_masks"].shape == (5, B, 2, 16, 16)
    assert ex["dec_nt_label"].shape == (5, B, 2)
    assert ex["dec_rla_lang_att_out"].shape == ex["dec_after_lang"].shape == (B, 9, D)
    # levels cycle coarsest first: 2x2, 4x4, 8x8, 2x2
    assert [ex[f"dec_attn_mask{i}"].shape[-1] for i in range(4)] == [4, 16, 64, 4]
    assert ex["dec_attn_full_rows"].shape == (4,)
    torch.testing.assert_close(ex["dec_pred_masks"][-1], out.mask_logits)
    assert not dec(*_inputs()).extras  # nothing recorded unless asked


def test_target_mask_is_eq1_sum_over_regions_and_nt_is_mean():
    torch.manual_seed(0)
    dec = _decoder().eval()
    ms, mf, lang = _inputs()
    out = dec(ms, mf, lang, return_extras=True)
    expect = torch.einsum("bqa,bqhw->bahw", out.region_logits, out.region_masks)
    torch.testing.assert_close(out.mask_logits, expect, rtol=1e-4, atol=1e-4)
    # no-target logits are the mean over regions of a per-region MLP on the normed queries
    region = dec.decoder_norm(out.extras["dec_queries"][-1])
    torch.testing.assert_close(out.nt_logits, dec.nt_embed(region).mean(1))
    # region masks are dot products of the region embedding with the mask features
    torch.testing.assert_close(
        out.region_masks, torch.einsum("bqc,bchw->bqhw", dec.mask_embed(region), mf)
    )


def test_attention_mask_rule_and_full_row_fix():
    torch.manual_seed(0)
    dec = _decoder().eval()
    ms, mf, lang = _inputs()
    out = dec(ms, mf, lang, return_extras=True)
    ex = out.extras
    # layer-1 mask = sigmoid(bilinear(region masks after layer 0)) < 0.5, full rows unblocked
    region = dec.decoder_norm(ex["dec_queries"][0])
    masks = torch.einsum("bqc,bchw->bqhw", dec.mask_embed(region), mf)
    resized = F.interpolate(masks, size=(4, 4), mode="bilinear", align_corners=False)
    blocked = resized.flatten(2).sigmoid() < 0.5
    full = blocked.all(-1)
    blocked[full] = False
    assert torch.equal(ex["dec_attn_mask1"], blocked)
    assert ex["dec_attn_full_rows"][1] == full.sum()


def test_all_blocked_rows_are_unblocked():
    """A mask_features shift that makes every region logit negative blocks every pixel; the
    official fix then lets every row attend everywhere, i.e. the same as no mask at all."""
    torch.manual_seed(0)
    dec = _decoder().eval()
    ms, mf, lang = _inputs()
    with torch.no_grad():
        dec.mask_embed.layers[-1].weight.zero_()
        dec.mask_embed.layers[-1].bias.fill_(1.0)
    out = dec(ms, -mf.abs() - 1.0, lang, return_extras=True)
    assert int(out.extras["dec_attn_full_rows"].sum()) == 4 * B * 9
    assert not any(out.extras[f"dec_attn_mask{i}"].any() for i in range(4))
    forced = [torch.zeros(B, 9, s * s, dtype=torch.bool) for s in (2, 4, 8, 2)]
    ref = dec(ms, -mf.abs() - 1.0, lang, forced_attn_masks=forced)
    torch.testing.assert_close(out.mask_logits, ref.mask_logits)


def test_teacher_forcing_replaces_the_masks():
    torch.manual_seed(0)
    dec = _decoder().eval()
    _perturb(dec)
    ms, mf, lang = _inputs()
    out = dec(ms, mf, lang, return_extras=True)
    computed = [out.extras[f"dec_attn_mask{i}"] for i in range(4)]
    same = dec(ms, mf, lang, return_extras=True, forced_attn_masks=computed)
    torch.testing.assert_close(same.mask_logits, out.mask_logits)
    flipped = [m.clone() for m in computed]
    flipped[0][0, 0, 0] = ~flipped[0][0, 0, 0]
    if flipped[0][0, 0].all():
        flipped[0][0, 0, 1] = False
    other = dec(ms, mf, lang, return_extras=True, forced_attn_masks=flipped)
    changed = other.extras["dec_ria_out"][0, 0, 0]
    assert not torch.allclose(changed, out.extras["dec_ria_out"][0, 0, 0])
    # the computed (not the forced) masks are reported
    assert torch.equal(other.extras["dec_attn_mask0"], computed[0])
    with pytest.raises(ValueError, match="one mask per layer"):
        dec(ms, mf, lang, forced_attn_masks=computed[:2])


def test_language_path_code_exact():
    """out + rla_weight * sigmoid(lang_weight) * LN(out + MHA(out, L, L)), no padding mask."""
    torch.manual_seed(0)
    dec = _decoder().eval()
    _perturb(dec)
    with torch.no_grad():
        dec.lang_weight.fill_(0.75)
    ms, mf, lang = _inputs()
    ex = dec(ms, mf, lang, return_extras=True).extras
    proj = dec.lang_proj(lang)
    att = dec.RLA_lang_att.norm(
        ex["dec_ria_out"][0] + dec.RLA_lang_att.multihead_attn(ex["dec_ria_out"][0], proj, proj)
    )
    torch.testing.assert_close(ex["dec_rla_lang_att_out"], att)
    expect = ex["dec_ria_out"][0] + 0.1 * torch.sigmoid(torch.tensor(0.75)) * att
    torch.testing.assert_close(ex["dec_after_lang"], expect)
    # padding positions are attended: changing the last token's features changes the result
    lang2 = lang.clone()
    lang2[:, -1] += 1.0
    ex2 = dec(ms, mf, lang2, return_extras=True).extras
    assert not torch.allclose(ex2["dec_rla_lang_att_out"], ex["dec_rla_lang_att_out"])


def test_lang_proj_zero_init_silences_language_at_init():
    """At init lang_proj = 0: keys and values are only the in_proj biases -> text-independent."""
    torch.manual_seed(0)
    dec = _decoder().eval()
    ms, mf, _ = _inputs()
    a = dec(ms, mf, torch.randn(B, L, DT))
    b = dec(ms, mf, torch.randn(B, L, DT))
    torch.testing.assert_close(a.mask_logits, b.mask_logits)
    assert dec.lang_weight.item() == 0.0 and torch.count_nonzero(dec.lang_proj.weight) == 0


def test_multihead_attention_matches_torch():
    torch.manual_seed(0)
    ours = MultiheadAttention(16, 4)
    ref = torch.nn.MultiheadAttention(16, 4)
    ref.load_state_dict(ours.state_dict())
    q, k = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    blocked = torch.rand(2, 5, 7) < 0.4
    blocked[..., 0] = False
    got = ours(q, k, k, blocked)
    expect = ref(q.transpose(0, 1), k.transpose(0, 1), k.transpose(0, 1),
                 attn_mask=blocked.repeat_interleave(4, 0))[0].transpose(0, 1)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    same = ours(q, q, q)  # fused self-attention path
    expect = ref(q.transpose(0, 1), q.transpose(0, 1), q.transpose(0, 1))[0].transpose(0, 1)
    torch.testing.assert_close(same, expect, rtol=1e-5, atol=1e-5)


def test_key_names_mirror_official():
    keys = set(_decoder().state_dict())
    for k in (
        "RIA_layers.3.multihead_attn.in_proj_weight", "RIA_layers.0.multihead_attn.out_proj.bias",
        "RIA_layers.0.norm.weight", "RLA_vision.2.self_attn.in_proj_bias", "RLA_vision.0.norm.bias",
        "transformer_ffn_layers.1.linear1.weight", "transformer_ffn_layers.1.norm.bias",
        "decoder_norm.weight", "query_feat.weight", "query_embed.weight", "lang_proj.weight",
        "lang_weight", "RLA_lang_att.multihead_attn.in_proj_weight", "RLA_lang_att.norm.weight",
        "level_embed.weight", "minimap_embed.weight", "nt_embed.layers.1.bias",
        "mask_embed.layers.2.weight",
    ):
        assert k in keys, k
    assert "lang_proj.bias" not in keys
    orig = set(_decoder("original").state_dict())
    for k in ("RIA_cross_attention.0.multihead_attn.in_proj_weight",
              "self_attention_layers.0.self_attn.in_proj_weight", "decoder_norm_2.weight",
              "RLA_proj.weight", "RLA_gate", "RLA_lang.multihead_attn.in_proj_weight",
              "RLA_region.self_attn.in_proj_weight", "lang_proj.weight"):
        assert k in orig, k
    assert not any(k.startswith(("RLA_lang_att", "lang_weight", "RIA_layers")) for k in orig)


def test_original_variant_runs_and_uses_language_at_last_layer_only():
    torch.manual_seed(0)
    dec = _decoder("original").eval()
    _perturb(dec)
    ms, mf, lang = _inputs()
    out = dec(ms, mf, lang, return_extras=True)
    assert out.mask_logits.shape == (B, 2, 16, 16)
    lang2 = lang + 1.0
    out2 = dec(ms, mf, lang2, return_extras=True)
    # the queries never see language; minimap / NT do (through the last-layer RLA)
    torch.testing.assert_close(out.extras["dec_queries"], out2.extras["dec_queries"])
    torch.testing.assert_close(out.region_masks, out2.region_masks)
    assert not torch.allclose(out.region_logits, out2.region_logits)


def test_input_projection_when_widths_differ():
    torch.manual_seed(0)
    dec = _decoder(in_channels=10).eval()
    out = dec(*_inputs(channels=10))
    assert out.mask_logits.shape == (B, 2, 16, 16)
    assert "input_proj.0.weight" in dec.state_dict()


def test_backward_reaches_all_parameters():
    torch.manual_seed(0)
    dec = _decoder()
    _perturb(dec)
    ms, mf, lang = _inputs()
    out = dec(ms, mf, lang)
    loss = out.mask_logits.mean() + out.region_logits.square().mean()
    (loss + out.nt_logits.square().mean()).backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        _decoder("paper")
    with pytest.raises(ValueError, match="lang_att_layers"):
        _decoder(lang_att_layers=(7,))
    dec = _decoder()
    ms, mf, lang = _inputs()
    with pytest.raises(ValueError, match="feature levels"):
        dec(ms[:2], mf, lang)


def test_zero_layers_gives_the_learnable_query_predictions():
    """DEC_LAYERS = 1 in the official config means 0 ReLA layers: heads on the raw queries."""
    torch.manual_seed(0)
    dec = _decoder(num_layers=0, lang_att_layers=()).eval()
    out = dec(*_inputs())
    region = dec.decoder_norm(dec.query_feat.weight).expand(B, -1, -1)
    torch.testing.assert_close(out.region_logits, dec.minimap_embed(region))


def test_grid_attention_mask_cells_and_training_only():
    """Training aid: region q may attend only to pixels overlapping its minimap cell."""
    from gres.model.rela import grid_attention_mask

    m = grid_attention_mask(2, (2, 2))
    assert torch.equal(~m, torch.eye(4, dtype=torch.bool))  # one pixel per cell
    m = grid_attention_mask(10, (12, 12))  # cell 0 = [0, 0.1): pixels 0 ([0, 1/12)) and 1
    allowed = (~m).view(100, 12, 12)
    assert allowed[0].nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert allowed[99].nonzero().tolist() == [[10, 10], [10, 11], [11, 10], [11, 11]]
    coarse = grid_attention_mask(10, (3, 3))  # fewer pixels than cells: never an empty row
    assert not coarse.all(-1).any()
    assert (~coarse).view(100, 3, 3)[44].nonzero().tolist() == [[1, 1]]  # cell (4, 4) in [.4, .5)
    assert (~coarse).view(100, 3, 3)[33].nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_grid_attention_changes_training_forward_not_eval(tiny_model):
    dec = tiny_model.decoder
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64) * 255
    ids = torch.randint(1000, 2000, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    was = tiny_model.training
    try:
        tiny_model.eval()
        with torch.no_grad():
            ref = tiny_model(images, ids, mask, return_extras=True)
            dec.grid_attention = True
            out = tiny_model(images, ids, mask)  # eval: the flag is ignored
            torch.testing.assert_close(out.mask_logits, ref.mask_logits, rtol=0, atol=0)
            tiny_model.train()
            torch.manual_seed(1)  # same dropout draws in both training forwards
            train_out = tiny_model(images, ids, mask)
            dec.grid_attention = False
            torch.manual_seed(1)
            plain = tiny_model(images, ids, mask)
            torch.manual_seed(1)
            again = tiny_model(images, ids, mask)
        torch.testing.assert_close(again.mask_logits, plain.mask_logits, rtol=0, atol=0)
        assert not torch.allclose(train_out.mask_logits, plain.mask_logits)
    finally:
        dec.grid_attention = False
        tiny_model.train(was)


def test_grid_prior_bias_peaks_in_own_cell():
    """Soft grid prior: each region's logits are highest on its own cell and fall as -s * d^2."""
    from gres.model.rela import grid_prior_bias

    b = grid_prior_bias(10, (20, 20), 2.0)  # cells of 2x2 pixels
    assert b.shape == (100, 400)
    rows = b.view(100, 20, 20)
    for q in (0, 37, 99):
        r, c = divmod(q, 10)
        peak = (rows[q] > rows[q].max() - 1e-5).nonzero().tolist()
        assert peak == [[2 * r, 2 * c], [2 * r, 2 * c + 1], [2 * r + 1, 2 * c], [2 * r + 1, 2 * c + 1]]
    # pixel (0, 0) centre is at 0.025 -> 0.25 cell units from cell 0's centre 0.05 on each axis
    torch.testing.assert_close(rows[0, 0, 0], torch.tensor(-2.0 * (0.25**2 + 0.25**2)))
    # pixel (0, 4) centre 0.225; cell 0 centre 0.05: dx = 1.75 cells
    torch.testing.assert_close(rows[0, 0, 4], torch.tensor(-2.0 * (0.25**2 + 1.75**2)))
    torch.testing.assert_close(grid_prior_bias(10, (20, 20), 4.0), 2 * b)


def test_attention_accepts_additive_bias():
    from gres.model.rela import MultiheadAttention

    torch.manual_seed(0)
    mha = MultiheadAttention(8, 2)
    q, k = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    bias = torch.randn(2, 3, 5)
    bias[0, 1, :2] = float("-inf")
    out = mha(q, k, k, bias)
    w, b = mha.in_proj_weight, mha.in_proj_bias
    qq = F.linear(q, w[:8], b[:8]).view(2, 3, 2, 4).transpose(1, 2)
    kk = F.linear(k, w[8:16], b[8:16]).view(2, 5, 2, 4).transpose(1, 2)
    vv = F.linear(k, w[16:], b[16:]).view(2, 5, 2, 4).transpose(1, 2)
    att = torch.softmax(qq @ kk.transpose(-1, -2) / 2.0 + bias[:, None], dim=-1)
    ref = mha.out_proj((att @ vv).transpose(1, 2).reshape(2, 3, 8))
    torch.testing.assert_close(out, ref)
    # a bool mask is the same as -inf where blocked
    blocked = torch.zeros(2, 3, 5, dtype=torch.bool)
    blocked[1, 2, 3:] = True
    additive = torch.zeros(2, 3, 5).masked_fill(blocked, float("-inf"))
    torch.testing.assert_close(mha(q, k, k, blocked), mha(q, k, k, additive))


def test_region_prior_strong_equals_nearest_pixel_masks():
    """A very strong prior makes RIA attend only to the pixels nearest each cell centre: the same
    as forcing those attention masks with the prior off."""
    from gres.model.rela import ReLADecoder, grid_prior_bias

    torch.manual_seed(0)
    kw = dict(in_channels=16, lang_dim=12, hidden_dim=16, num_heads=2, ffn_dim=32, num_layers=3,
              num_queries=9, mask_dim=16)
    strong = ReLADecoder(region_prior=1e3, **kw).eval()
    plain = ReLADecoder(**kw).eval()
    plain.load_state_dict(strong.state_dict())
    sizes = [(2, 2), (4, 4), (8, 8)]
    feats = [torch.randn(2, 16, *s) for s in sizes]
    mask_features, lang = torch.randn(2, 16, 16, 16), torch.randn(2, 5, 12)
    free = [torch.zeros(2, 9, s[0] * s[1], dtype=torch.bool) for s in (sizes * 2)[:3]]
    nearest = []
    for i in range(3):
        bias = grid_prior_bias(3, sizes[i % 3], 1.0)  # (9, h*w)
        nearest.append((bias < bias.max(-1, keepdim=True).values - 1e-4).expand(2, -1, -1))
    with torch.no_grad():
        a = strong(feats, mask_features, lang, forced_attn_masks=free)
        b = plain(feats, mask_features, lang, forced_attn_masks=nearest)
        c = plain(feats, mask_features, lang, forced_attn_masks=free)
    torch.testing.assert_close(a.mask_logits, b.mask_logits, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a.mask_logits, c.mask_logits, atol=1e-3)
    with pytest.raises(ValueError, match="region_prior"):
        ReLADecoder(region_prior=-1.0, **kw)


def test_deep_supervision_returns_every_earlier_layer_in_training_only():
    """``deep_supervision`` adds the heads of layers 0..L-2 (with autograd) in training; the last
    layer's outputs and the attention-mask path are unchanged, and evaluation returns no aux."""
    torch.manual_seed(0)
    plain = _decoder()
    deep = _decoder(deep_supervision=True)
    deep.load_state_dict(plain.state_dict())
    _perturb(plain)
    deep.load_state_dict(plain.state_dict())
    inputs = _inputs()
    a, b = plain.train()(*inputs), deep.train()(*inputs)
    assert a.aux == [] and len(b.aux) == 3
    torch.testing.assert_close(a.mask_logits, b.mask_logits)
    ref = deep.eval()(*inputs, return_extras=True)  # heads of every layer, recorded
    for i, layer in enumerate(b.aux):
        torch.testing.assert_close(layer["mask_logits"], ref.extras["dec_pred_masks"][i + 1])
        torch.testing.assert_close(layer["nt_logits"], ref.extras["dec_nt_label"][i + 1])
        assert layer["region_logits"].requires_grad
    b.aux[0]["mask_logits"].sum().backward()  # the first layer's heads reach its parameters
    assert deep.transformer_ffn_layers[0].linear1.weight.grad.abs().sum() > 0
    assert deep.transformer_ffn_layers[3].linear1.weight.grad is None
    assert deep.eval()(*inputs).aux == []
