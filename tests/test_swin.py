"""Tests of gres.model.swin / gres.model.fusion: official vectors, timm equivalence, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gres.config import SwinConfig
from gres.model.fusion import PWAM, spatial_features
from gres.model.swin import (
    MultiModalSwin,
    PatchMerging,
    build_swin,
    check_image_size,
    load_pretrained_swin,
    relative_position_index,
    shifted_window_mask,
    timm_swin_to_ours,
)

from official_vectors import VECTORS, needs_vectors  # noqa: E402
PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)


def tiny_swin(use_fusion: bool = True, **kw) -> MultiModalSwin:
    args = dict(
        embed_dim=16,
        depths=(2, 2, 2, 2),
        num_heads=(1, 2, 2, 4),
        window_size=4,
        patch_size=4,
        mlp_ratio=2.0,
        qkv_bias=True,
        drop_path_rate=0.0,
        lang_dim=32,
        fusion_heads=1,
        use_fusion=use_fusion,
    )
    args.update(kw)
    return MultiModalSwin(**args)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


# --------------------------------------------------------------------------------------------------
# Official vectors
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def official():
    from safetensors.torch import load_file

    cfg = json.loads((VECTORS / "official_config.json").read_text())["backbone"]
    model = MultiModalSwin(
        embed_dim=cfg["embed_dim"],
        depths=tuple(cfg["depths"]),
        num_heads=tuple(cfg["num_heads"]),
        window_size=cfg["window_size"],
        patch_size=cfg["patch_size"],
        mlp_ratio=cfg["mlp_ratio"],
        qkv_bias=cfg["qkv_bias"],
        drop_path_rate=cfg["drop_path_rate_train_only"],
        lang_dim=cfg["pwam"]["l_in_channels"],
        fusion_heads=cfg["pwam"]["num_heads_fusion"][0],
        use_fusion=True,
    ).eval()
    sd = load_file(str(VECTORS / "state_dict.safetensors"))
    backbone = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    return model, backbone, np.load(VECTORS / "inputs.npz"), np.load(VECTORS / "outputs.npz")


@needs_vectors
def test_official_keys_are_a_prefix_strip(official):
    model, backbone, _, _ = official
    index_keys = [k for k in backbone if k.endswith("relative_position_index")]
    assert len(index_keys) == 8
    for key in index_keys:
        ours = model.get_submodule(key.rsplit(".", 1)[0]).relative_position_index
        assert torch.equal(backbone[key], ours), key
    weights = {k: v for k, v in backbone.items() if k not in index_keys}
    assert set(weights) == set(model.state_dict())  # nothing renamed, nothing missing
    model.load_state_dict(weights, strict=True)


@needs_vectors
def test_matches_official_vectors(official):
    model, backbone, inputs, outputs = official
    model.load_state_dict(
        {k: v for k, v in backbone.items() if not k.endswith("relative_position_index")}
    )
    images = (torch.from_numpy(inputs["image"]) - PIXEL_MEAN) / PIXEL_STD
    lang = torch.from_numpy(outputs["text_last_hidden_state"])
    mask = torch.from_numpy(inputs["lang_mask"]).bool()
    with torch.no_grad():
        out = model(images, lang, mask, return_swin_tokens=True)
    for name in ("res2", "res3", "res4", "res5"):
        ref = torch.from_numpy(outputs[f"backbone_{name}"])
        assert out[name].shape == ref.shape, name
        assert rel_err(out[name], ref) <= 1e-4, name
    for s in (2, 3):
        ref = torch.from_numpy(outputs[f"backbone_swin_tokens_s{s}"])
        assert rel_err(out[f"swin_tokens_s{s}"], ref) <= 1e-4, s
    # The gated residual matters: with the gates zeroed, res3..res5 move well beyond tolerance.
    gated = {k: v.clone() for k, v in model.state_dict().items()}
    for key in [k for k in gated if ".res_gate." in k]:
        gated[key].zero_()
    model.load_state_dict(gated)
    with torch.no_grad():
        closed = model(images, lang, mask)
    assert rel_err(closed["res2"], out["res2"]) == 0.0
    assert rel_err(closed["res5"], torch.from_numpy(outputs["backbone_res5"])) > 1e-3


# --------------------------------------------------------------------------------------------------
# timm equivalence (fusion off)
# --------------------------------------------------------------------------------------------------
def _perturbed_timm(name: str, **kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # always_partition: keep window 12 and the shift at the last stage (12x12 at 384) as the
    # detection Swin does; timm would otherwise shrink the window and drop the shift there.
    model = timm.create_model(name, pretrained=False, always_partition=True, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():  # make norms/biases non-trivial
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _ours_like(timm_model, window: int) -> MultiModalSwin:
    return MultiModalSwin(
        embed_dim=timm_model.embed_dim,
        depths=tuple(len(layer.blocks) for layer in timm_model.layers),
        num_heads=tuple(layer.blocks[0].attn.num_heads for layer in timm_model.layers),
        window_size=window,
        patch_size=4,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=0.1,
        lang_dim=768,
        fusion_heads=1,
        use_fusion=False,
    ).eval()


@pytest.mark.parametrize(
    "name,kwargs,size,window",
    [
        # Swin-B window-12 layout (timm >= 0.9 key layout) with reduced width/depth, at 384.
        (
            "swin_base_patch4_window12_384",
            dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)),
            384,
            12,
        ),
        ("swin_tiny_patch4_window7_224", dict(depths=(2, 2, 2, 2)), 224, 7),
    ],
)
def test_reproduces_timm_stage_features(name, kwargs, size, window):
    timm_model = _perturbed_timm(name, **kwargs)
    ours = _ours_like(timm_model, window)
    mapped = timm_swin_to_ours(timm_model.state_dict(), final_norm_to="norm3")
    assert any(k.startswith("layers.0.downsample.") for k in mapped)
    assert not any(k.startswith("layers.3.downsample.") for k in mapped)
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    assert sorted(missing) == [f"norm{i}.{p}" for i in range(3) for p in ("bias", "weight")]
    assert unexpected == []

    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stages = timm_model.forward_intermediates(x, intermediates_only=True)  # pre-norm, NCHW
        final = timm_model.forward_features(x)  # last stage after timm's final norm, NHWC
        out = ours(x, return_swin_tokens=True)
    for i, ref in enumerate(stages):
        tokens = ref.permute(0, 2, 3, 1).flatten(1, 2)
        assert rel_err(out[f"swin_tokens_s{i}"], tokens) < 1e-5, i
        if i < 3:  # norm0..2 keep their default init (ones/zeros): plain LayerNorm
            expected = F.layer_norm(ref.permute(0, 2, 3, 1), (ref.shape[1],)).permute(0, 3, 1, 2)
            assert rel_err(out[f"res{i + 2}"], expected) < 1e-5, i
    assert rel_err(out["res5"].permute(0, 2, 3, 1), final) < 1e-5


@pytest.mark.slow
def test_swin_b_key_layout_matches_timm(tmp_path):
    """Full Swin-B (window 12): every timm weight lands on a same-shape tensor of ours, from the
    timm layout and from the Microsoft-original layout in a ``{"model": sd}`` file."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    timm_model = timm.create_model("swin_base_patch4_window12_384", pretrained=False)
    ours = build_swin(SwinConfig(use_fusion=True), lang_dim=768)
    timm_sd = timm_model.state_dict()

    report = load_pretrained_swin_from_dict(ours, timm_sd, tmp_path / "timm.pth")
    assert all(".fusion." in k or ".res_gate." in k or k.startswith("norm") for k in report.missing)
    assert len(report.loaded) == len(timm_sd) - 4  # minus head.fc.{weight,bias}, norm.{weight,bias}
    assert torch.equal(
        ours.layers[2].downsample.reduction.weight, timm_sd["layers.3.downsample.reduction.weight"]
    )
    assert torch.equal(
        ours.layers[2].blocks[17].mlp.fc2.bias, timm_sd["layers.2.blocks.17.mlp.fc2.bias"]
    )

    # Microsoft layout: downsample at the end of stage s, persistent index/mask buffers, head.
    ms = {}
    for key, value in timm_sd.items():
        if ".downsample." in key:
            stage = int(key.split(".")[1])
            key = key.replace(f"layers.{stage}.", f"layers.{stage - 1}.", 1)
        ms[key.replace("head.fc.", "head.")] = value
    ms["layers.0.blocks.0.attn.relative_position_index"] = relative_position_index(12)
    ms["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 144, 144)
    fresh = build_swin(SwinConfig(use_fusion=True), lang_dim=768)
    torch.save({"model": ms}, tmp_path / "ms.pth")
    load_pretrained_swin(fresh, str(tmp_path / "ms.pth"))
    for key, value in ours.state_dict().items():
        if ".fusion." not in key and ".res_gate." not in key and not key.startswith("norm"):
            assert torch.equal(value, fresh.state_dict()[key]), key


def load_pretrained_swin_from_dict(model, state_dict, path):
    torch.save(state_dict, path)
    return load_pretrained_swin(model, str(path))


def test_load_pretrained_swin_rejects_wrong_variant(tmp_path):
    small = tiny_swin(use_fusion=False, window_size=7)
    torch.save(small.state_dict(), tmp_path / "w7.pth")
    with pytest.raises(ValueError, match="shape mismatch"):
        load_pretrained_swin(tiny_swin(), str(tmp_path / "w7.pth"))
    with pytest.raises(FileNotFoundError):
        load_pretrained_swin(tiny_swin(), "not_a_timm_model_or_file")


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------
def test_patch_merging_concat_order():
    merge = PatchMerging(dim=1)
    with torch.no_grad():
        merge.norm.weight.fill_(1.0)
        merge.norm.bias.zero_()
    x = torch.arange(16.0).view(1, 4, 4, 1)
    captured = {}
    merge.norm.register_forward_hook(lambda m, i, o: captured.setdefault("in", i[0]))
    merge(x)
    # 2x2 block at the top-left: x[0,0]=0, x[1,0]=4, x[0,1]=1, x[1,1]=5
    assert captured["in"][0, 0, 0].tolist() == [0.0, 4.0, 1.0, 5.0]


def test_shift_mask_regions():
    mask = shifted_window_mask((8, 8), window_size=4, shift_size=2)
    assert mask.shape == (4, 16, 16)
    assert mask[0].abs().sum() == 0  # top-left window: one region
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    # bottom-right window: 4 regions of 4 tokens -> each token sees 4 of 16 keys unmasked
    assert (mask[3] == 0).sum(dim=1).tolist() == [4] * 16


def test_relative_position_index_range():
    idx = relative_position_index(3)
    assert idx.shape == (9, 9)
    assert idx.min() == 0 and idx.max() == 24
    assert idx[4, 4] == 12  # zero offset = centre of the 5x5 table
    assert torch.equal(idx.diagonal(), torch.full((9,), 12))


def test_padded_windows_match_a_naive_block():
    """Block on a non-window-multiple grid equals the pad-then-project computation."""
    torch.manual_seed(0)
    model = tiny_swin(use_fusion=False).eval()
    block = model.layers[0].blocks[1]  # shifted block
    x = torch.randn(2, 6, 7, 16)
    w, s = 4, 2
    mask = shifted_window_mask((8, 8), w, s)
    with torch.no_grad():
        ours = block(x, mask)
        y = F.pad(block.norm1(x), (0, 0, 0, 1, 0, 2))  # zero-pad after LN1
        y = torch.roll(y, (-s, -s), (1, 2))
        win = y.view(2, 2, w, 2, w, 16).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, 16)
        attn = block.attn(win, mask)  # qkv + attention + proj on every padded token
        y = attn.view(2, 2, 2, w, w, 16).permute(0, 1, 3, 2, 4, 5).reshape(2, 8, 8, 16)
        y = torch.roll(y, (s, s), (1, 2))[:, :6, :7]
        naive = x + y
        naive = naive + block.mlp(block.norm2(naive))
    assert rel_err(ours, naive) < 1e-6


def test_pwam_masks_padding_words():
    torch.manual_seed(0)
    pwam = PWAM(dim=8, lang_dim=12, num_heads=2).eval()
    x = torch.randn(2, 10, 8)
    lang = torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    out = pwam(x, lang, mask)
    lang2 = lang.clone()
    lang2[0, 3:] = 100.0  # padding words of sample 0 must not matter
    out2 = pwam(x, lang2, mask)
    assert torch.allclose(out[0], out2[0], atol=1e-6)
    assert not torch.allclose(out[1], pwam(x, lang2 * 2, mask)[1])


def test_pwam_matches_conv1d_reference():
    """Channels-last PWAM equals the official channels-first Conv1d/InstanceNorm1d computation."""
    torch.manual_seed(0)
    pwam = PWAM(dim=8, lang_dim=12, num_heads=2).eval()
    x, lang = torch.randn(2, 10, 8), torch.randn(2, 5, 12)
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    att = pwam.image_lang_att
    with torch.no_grad():
        q = att.f_query(x.transpose(1, 2)).view(2, 2, 4, 10).transpose(2, 3)  # (B, nh, HW, dk)
        lm = m.unsqueeze(1)  # (B, 1, L)
        k = (att.f_key(lang.transpose(1, 2)) * lm).view(2, 2, 4, 5)
        v = (att.f_value(lang.transpose(1, 2)) * lm).view(2, 2, 4, 5)
        sim = (q @ k) * 8**-0.5 + (1e4 * lm.unsqueeze(1) - 1e4)  # scale: full key width
        o = (sim.softmax(-1) @ v.transpose(2, 3)).transpose(1, 2).reshape(2, 10, 8)
        lang_att = att.W(o.transpose(1, 2))  # (B, C, HW)
        vis = pwam.vis_project(x.transpose(1, 2))
        ref = pwam.project_mm(vis * lang_att).transpose(1, 2)
        assert rel_err(pwam(x, lang, m), ref) < 1e-6


def test_init_follows_official():
    model = tiny_swin()
    for layer in model.layers[:3]:
        assert layer.res_gate[0].weight.abs().sum() == 0
        assert layer.res_gate[2].weight.abs().sum() == 0
    assert model.layers[3].res_gate is None and model.layers[3].downsample is None
    table = model.layers[0].blocks[0].attn.relative_position_bias_table
    assert 0.005 < table.std() < 0.05
    assert "relative_position_index" not in "".join(model.state_dict())
    dp = [blk.drop_path.drop_prob for layer in tiny_swin(drop_path_rate=0.3).layers
          for blk in layer.blocks]
    assert dp[0] == 0.0 and abs(dp[-1] - 0.3) < 1e-6 and dp == sorted(dp)


@pytest.mark.parametrize("window", [4, 8])
def test_training_and_inference_attention_paths_agree(window):
    """Grad-enabled forward (explicit softmax) == no-grad forward (fused SDPA for big windows)."""
    torch.manual_seed(0)
    model = tiny_swin(window_size=window).eval()
    images = torch.randn(2, 3, 96, 64)
    lang, mask = torch.randn(2, 5, 32), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        fused = model(images, lang, mask)
    explicit = model(images, lang, mask)
    for key in fused:
        assert rel_err(explicit[key].detach(), fused[key]) < 1e-5, key


def test_zero_gates_get_no_gradient():
    """Official init quirk: both gate matrices at zero form a saddle with zero gradient."""
    torch.manual_seed(0)
    model = tiny_swin()
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = model(torch.randn(1, 3, 64, 64), torch.randn(1, 3, 32), mask)
    sum(v.square().mean() for v in out.values()).backward()
    for layer in model.layers[:3]:
        assert layer.res_gate[0].weight.grad.abs().sum() == 0
        assert layer.res_gate[2].weight.grad.abs().sum() == 0
    assert model.layers[0].fusion.project_mm[0].weight.grad.abs().sum() > 0


def test_learnable_gate_starts_closed_and_opens():
    """res_gate_init="learnable": same outputs at init as the official gate, but W2 trains."""
    torch.manual_seed(0)
    official = tiny_swin()
    torch.manual_seed(0)
    learnable = tiny_swin(res_gate_init="learnable")
    mask = torch.ones(1, 3, dtype=torch.bool)
    images, lang = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 32)
    ref = official(images, lang, mask)
    out = learnable(images, lang, mask)
    for key in ref:  # W2 = 0 in both: the gate is closed, the stage features are identical
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=0)
    sum(v.square().mean() for v in out.values()).backward()
    for layer in learnable.layers[:3]:
        assert layer.res_gate[0].weight.abs().sum() > 0
        assert layer.res_gate[2].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="res_gate_init"):
        tiny_swin(res_gate_init="open")


def test_spatial_features_grid():
    """8-D cell coordinates: x edges/centre, y edges/centre in [-1, 1], then 1/w and 1/h."""
    f = spatial_features(2, 4)  # (8, 8), row-major cells
    assert f.shape == (8, 8)
    torch.testing.assert_close(f[0], torch.tensor([-1, -0.75, -0.5, -1, -0.5, 0, 0.25, 0.5]))
    torch.testing.assert_close(f[7], torch.tensor([0.5, 0.75, 1, 0, 0.5, 1, 0.25, 0.5]))
    # row-major: the cell right of cell 0 moves in x only, the cell below moves in y only
    torch.testing.assert_close(f[1, 3:], f[0, 3:])
    torch.testing.assert_close(f[4, :3], f[0, :3])


def test_spatial_features_start_as_official_and_learn_position():
    """spatial_features=True: identical outputs at init (zero projection), the projection gets
    a gradient, and once it is non-zero two tokens with the same content but different cells
    get different fused features (the official PWAM cannot tell them apart)."""
    torch.manual_seed(0)
    official = tiny_swin()
    spatial = tiny_swin(spatial_features=True)
    missing, unexpected = spatial.load_state_dict(official.state_dict(), strict=False)
    assert not unexpected and missing and all("spatial_proj" in k for k in missing)
    mask = torch.ones(1, 3, dtype=torch.bool)
    images, lang = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 32)
    ref = official(images, lang, mask)
    out = spatial(images, lang, mask)
    for key in ref:
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=0)
    sum(v.square().mean() for v in out.values()).backward()
    for layer in spatial.layers:
        assert layer.fusion.spatial_proj.weight.grad.abs().sum() > 0

    pwam = PWAM(dim=8, lang_dim=4, spatial=True)
    words, word_mask = torch.randn(1, 2, 4), torch.ones(1, 2)
    same = torch.randn(1, 1, 8).expand(1, 6, 8)  # six identical tokens on a 2x3 grid
    assert torch.allclose(*pwam(same, words, word_mask, (2, 3))[0, [0, 5]], atol=1e-6)
    torch.nn.init.normal_(pwam.spatial_proj.weight)
    fused = pwam(same, words, word_mask, (2, 3))[0]
    assert not torch.allclose(fused[0], fused[5], atol=1e-3)
    with pytest.raises(ValueError, match="hw"):
        pwam(same, words, word_mask)
    with pytest.raises(ValueError, match="hw"):
        pwam(same, words, word_mask, (3, 3))


def test_conv_stem_is_a_stride_4_overlapping_embedding():
    """stem="conv": same token grid as the patch embedding, but each token sees a 7x7 window
    of pixels that overlaps its neighbours' (a 4x4 patch embedding sees only its own patch)."""
    torch.manual_seed(0)
    model = tiny_swin(stem="conv").eval()
    images = torch.randn(2, 3, 64, 96)
    tokens = model.patch_embed(images)
    assert tokens.shape == (2, 16, 24, 16)
    # receptive field: token j sees pixels 4j-3..4j+3, so pixel 10 moves tokens 2 and 3 per axis
    changed = images.clone()
    changed[:, :, 10, 10] += 5.0
    moved = (model.patch_embed(changed) - tokens).abs().amax(dim=(0, 3)) > 0  # (16, 24)
    assert moved[2:4, 2:4].all() and moved.sum() == 4
    patch = tiny_swin().eval()
    moved = (patch.patch_embed(changed) - patch.patch_embed(images)).abs().amax(dim=(0, 3)) > 0
    assert moved.sum() == 1 and moved[2, 2]
    # the whole backbone runs and the stem is trained
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = model(images, torch.randn(2, 3, 32), mask)
    assert out["res2"].shape == (2, 16, 16, 24)
    sum(v.square().mean() for v in out.values()).backward()
    assert model.patch_embed.conv1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="stem='conv' has stride 4"):
        tiny_swin(stem="conv", patch_size=2)
    with pytest.raises(ValueError, match="unknown stem 'pixels'"):
        tiny_swin(stem="pixels")


def test_shapes_gradients_and_determinism():
    torch.manual_seed(0)
    model = tiny_swin(drop_path_rate=0.2)
    with torch.no_grad():  # open the gates so that every parameter gets a gradient
        for layer in model.layers[:3]:
            layer.res_gate[0].weight.normal_(0, 0.1)
            layer.res_gate[2].weight.normal_(0, 0.1)
    images = torch.randn(2, 3, 64, 96)
    lang = torch.randn(2, 6, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = model(images, lang, mask)
    assert model.output_channels == {"res2": 16, "res3": 32, "res4": 64, "res5": 128}
    assert out["res2"].shape == (2, 16, 16, 24)
    assert out["res5"].shape == (2, 128, 2, 3)
    sum(v.square().mean() for v in out.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []
    model.eval()
    with torch.no_grad():
        a, b = model(images, lang, mask), model(images, lang, mask)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input():
    model = tiny_swin().eval()
    lang = torch.randn(1, 4, 32)
    mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="multiple of 32"):
        model(torch.randn(1, 3, 64, 70), lang, mask)
    with pytest.raises(ValueError, match="multiple of 32"):
        check_image_size(100, 96)
    with pytest.raises(ValueError, match="empty expression"):
        model(torch.randn(1, 3, 64, 64), lang, torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="Dt=32"):
        model(torch.randn(1, 3, 64, 64), torch.randn(1, 4, 8), mask)
    with pytest.raises(ValueError, match="bool"):
        model(torch.randn(1, 3, 64, 64), lang, mask.long())
    with pytest.raises(ValueError, match="needs lang_feats"):
        model(torch.randn(1, 3, 64, 64))
