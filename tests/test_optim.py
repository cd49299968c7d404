"""Optimiser recipe of spec §3: weight-decay groups, text freezing, clipping, LR schedules."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from gres.config import TrainConfig
from gres.optim import (
    build_optimizer,
    build_scheduler,
    clip_gradients,
    find_text_encoder,
    freeze_text_encoder,
    lr_factor,
    param_groups,
)


class ToyAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))


class ToyGRES(nn.Module):
    """Every parameter kind the official rules distinguish, plus a 3-layer BERT."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = ToyAttention()
        self.norm = nn.LayerNorm(4)
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm1d(4, affine=True)
        self.query_feat = nn.Embedding(5, 4)
        self.level_embed = nn.Parameter(torch.zeros(3, 4))  # plain Parameter: decayed (spec §3)
        self.head = nn.Linear(4, 2)
        self.shared = self.head  # the same module twice: counted once
        cfg = BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=3, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=32)
        self.text_encoder = BertModel(cfg, add_pooling_layer=False)


def _group_of(pg, name: str) -> str:
    hits = [g for g, names in pg.names.items() if name in names]
    assert len(hits) == 1, (name, hits)
    return hits[0]


def test_find_text_encoder():
    model = ToyGRES()
    name, module = find_text_encoder(model)
    assert name == "text_encoder" and module is model.text_encoder
    assert find_text_encoder(nn.Linear(2, 2)) is None


def test_freeze_recipe_embeddings_and_last_layers():
    model = ToyGRES()
    frozen = freeze_text_encoder(model, frozen_layers_from=2, freeze_embeddings=True)
    assert frozen, "something must be frozen"
    for name, p in model.text_encoder.named_parameters():
        should_freeze = name.startswith("embeddings.") or name.startswith("encoder.layer.2.")
        assert p.requires_grad == (not should_freeze), name
        assert (f"text_encoder.{name}" in frozen) == should_freeze
    assert all(p.requires_grad for p in model.attn.parameters())


def test_freeze_all_text():
    model = ToyGRES()
    freeze_text_encoder(model, frozen_layers_from=2, freeze_all=True)
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    pg = param_groups(model, 0.05)
    assert "text" not in pg.names
    assert not any(n.startswith("text_encoder") for names in pg.names.values() for n in names)


def test_param_groups_follow_official_rules():
    model = ToyGRES()
    freeze_text_encoder(model, frozen_layers_from=2, freeze_embeddings=True)
    pg = param_groups(model, weight_decay=0.05)
    wd = {g["name"]: g["weight_decay"] for g in pg.groups}
    assert wd == {"decay": 0.05, "no_decay_norm": 0.0, "no_decay_embed": 0.0, "text": 0.05}
    assert _group_of(pg, "attn.qkv.weight") == "decay"
    assert _group_of(pg, "attn.qkv.bias") == "decay"  # biases keep weight decay
    assert _group_of(pg, "level_embed") == "decay"  # nn.Parameter, not nn.Embedding
    assert _group_of(pg, "attn.relative_position_bias_table") == "no_decay_embed"
    assert _group_of(pg, "query_feat.weight") == "no_decay_embed"
    for n in ("norm.weight", "norm.bias", "gn.weight", "inorm.bias"):
        assert _group_of(pg, n) == "no_decay_norm"
    # BERT layers 0..1 are trained with decay on everything, their LayerNorms included.
    assert _group_of(pg, "text_encoder.encoder.layer.0.output.LayerNorm.weight") == "text"
    assert _group_of(pg, "text_encoder.encoder.layer.1.attention.self.query.bias") == "text"
    # Every trainable parameter exactly once; frozen ones never.
    listed = [id(p) for g in pg.groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(listed) == len(set(listed)) == len(trainable)
    assert set(listed) == trainable


def test_build_optimizer_single_lr():
    model = ToyGRES()
    cfg = TrainConfig(lr=3e-4, weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert {g["lr"] for g in opt.param_groups} == {3e-4}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1, 0.0}
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8


def test_no_trainable_parameter_is_an_error():
    lin = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        param_groups(lin, 0.05)


def test_official_schedule_values():
    cfg = TrainConfig()  # the recipe: 1e-5, x0.1 at 110k, x0.01 at 140k, warm-up factor 1
    assert lr_factor(0, cfg, cfg.max_iters) == 1.0
    assert lr_factor(5, cfg, cfg.max_iters) == 1.0  # warm-up factor 1.0: no effective warm-up
    assert lr_factor(109_999, cfg, cfg.max_iters) == 1.0
    assert lr_factor(110_000, cfg, cfg.max_iters) == pytest.approx(0.1)
    assert lr_factor(139_999, cfg, cfg.max_iters) == pytest.approx(0.1)
    assert lr_factor(140_000, cfg, cfg.max_iters) == pytest.approx(0.01)


def test_warmup_multistep_through_lambdalr():
    cfg = TrainConfig(lr=1.0, lr_steps=(3, 6), lr_gamma=0.1, warmup_iters=2, warmup_factor=0.5)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, max_iters=8)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.5, 0.75, 1.0, 0.1, 0.1, 0.1, 0.01, 0.01]
    assert seen == pytest.approx(expected)


def test_cosine_schedule_and_resume():
    cfg = TrainConfig(lr=2.0, lr_schedule="cosine", warmup_iters=0, min_lr_factor=0.1)
    assert lr_factor(0, cfg, 100) == pytest.approx(1.0)
    assert lr_factor(50, cfg, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, cfg, 100) == pytest.approx(0.1)
    assert lr_factor(25, cfg, 100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, 100)
    for _ in range(37):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched2 = build_scheduler(opt2, cfg, 100)
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]
    for _ in range(5):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


def test_unknown_schedule():
    cfg = dataclasses.replace(TrainConfig(), lr_schedule="poly")
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        build_scheduler(opt, cfg, 10)


def test_clip_full_model_norm():
    torch.manual_seed(0)
    a, b, frozen = (nn.Parameter(torch.randn(5)) for _ in range(3))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], lr=1.0)
    (a.sum() * 3 + (b**2).sum() + frozen.sum()).backward()
    total = torch.sqrt(a.grad.pow(2).sum() + b.grad.pow(2).sum())
    frozen_grad = frozen.grad.clone()
    norm = clip_gradients(opt, 0.01)
    assert float(norm) == pytest.approx(float(total), rel=1e-6)
    after = torch.sqrt(a.grad.pow(2).sum() + b.grad.pow(2).sum())
    assert float(after) == pytest.approx(0.01, rel=1e-4)  # one norm over both groups
    assert torch.equal(frozen.grad, frozen_grad)  # not in the optimiser: untouched
    # max_norm <= 0: report only.
    grads = a.grad.clone()
    assert float(clip_gradients(opt, 0.0)) == pytest.approx(0.01, rel=1e-4)
    assert torch.equal(a.grad, grads)


def test_backbone_lr_factor_slows_only_the_pretrained_swin(tiny_model):
    """backbone_lr_factor: the Swin parameters that pretrained weights provide get lr x factor;
    the fusion modules, gates, output norms and every other module keep lr."""
    import dataclasses

    from gres.config import TrainConfig
    from gres.model.swin import pretrained_parameters
    from gres.optim import build_optimizer

    slow = {id(p) for p in pretrained_parameters(tiny_model)}
    names = {id(p): n for n, p in tiny_model.named_parameters()}
    assert any("patch_embed" in names[i] for i in slow)
    assert not any(".fusion." in names[i] or ".res_gate." in names[i] for i in slow)
    cfg = TrainConfig(lr=1e-3, backbone_lr_factor=0.1)
    opt = build_optimizer(tiny_model, cfg)
    seen = 0
    for g in opt.param_groups:
        for p in g["params"]:
            seen += 1
            expected = 1e-4 if id(p) in slow else 1e-3
            assert g["lr"] == pytest.approx(expected), names[id(p)]
        assert g["name"].endswith("_backbone") == (g["lr"] < 1e-3)
    trainable = [p for p in tiny_model.parameters() if p.requires_grad]
    assert seen == len(trainable)
    official = build_optimizer(tiny_model, dataclasses.replace(cfg, backbone_lr_factor=1.0))
    assert all(g["lr"] == 1e-3 for g in official.param_groups)
    with pytest.raises(ValueError, match="backbone_lr_factor"):
        build_optimizer(tiny_model, dataclasses.replace(cfg, backbone_lr_factor=-1.0))


def test_backbone_lr_from_stage_limits_the_factor_to_the_deep_stages(tiny_model):
    """backbone_lr_from_stage=2: only the pretrained parameters of Swin stages 2 and 3 get the
    factor (0 freezes them); the patch embedding and stages 0-1 train at lr."""
    from gres.config import TrainConfig
    from gres.model.swin import pretrained_parameters, swin_stage_of
    from gres.optim import build_optimizer

    names = {id(p): n for n, p in tiny_model.named_parameters()}
    every = {id(p) for p in pretrained_parameters(tiny_model)}
    deep = {id(p) for p in pretrained_parameters(tiny_model, from_stage=2)}
    assert deep and deep < every
    assert all(names[i].startswith("backbone.layers.2.") or names[i].startswith("backbone.layers.3.")
               for i in deep)
    assert swin_stage_of("patch_embed.proj.weight") == 0 and swin_stage_of("layers.3.blocks.0.x") == 3
    opt = build_optimizer(tiny_model, TrainConfig(lr=1e-3, backbone_lr_factor=0.0,
                                                  backbone_lr_from_stage=2))
    for g in opt.param_groups:
        for p in g["params"]:
            assert g["lr"] == (0.0 if id(p) in deep else 1e-3), names[id(p)]
    with pytest.raises(ValueError, match="backbone_lr_from_stage"):
        build_optimizer(tiny_model, TrainConfig(backbone_lr_factor=0.5, backbone_lr_from_stage=4))


def _backward_once(model, cfg) -> dict:
    """One seeded forward + GRES loss + backward on random data; returns the weights before."""
    from gres.losses import GRESCriterion

    S = cfg.model.image_size
    torch.manual_seed(0)
    image, ids = torch.randn(2, 3, S, S), torch.randint(1000, 2000, (2, 6))
    gt = (torch.rand(2, S, S) > 0.7).float()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(image, ids, torch.ones_like(ids, dtype=torch.bool))
    GRESCriterion(cfg.loss)(out, gt, torch.tensor([False, True]))["loss"].backward()
    return before


def test_backbone_lr_factor_zero_freezes_by_learning_rate_and_keeps_the_clip_norm(tiny_cfg):
    """backbone_lr_factor=0: the pretrained Swin parameters of the chosen stages stay trainable
    tensors in a learning-rate-0 group, so their gradients exist and count in the full-model clip
    norm (the measured cpu-small recipe; requires_grad=False scored lower), and a step leaves
    them unchanged while the fusion modules and stage 0 move."""
    from gres import engine
    from gres.model.swin import pretrained_parameters
    from gres.optim import build_optimizer, clip_gradients

    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(
        tiny_cfg.train, lr=1e-2, backbone_lr_factor=0.0, backbone_lr_from_stage=1))
    engine.seed_everything(0)
    model = engine.prepare_model(cfg).train()
    frozen = {id(p) for p in pretrained_parameters(model, from_stage=1)}
    stage0 = {id(p) for p in pretrained_parameters(model)} - frozen
    assert frozen and stage0
    assert all(p.requires_grad for p in model.parameters() if id(p) in frozen)
    opt = build_optimizer(model, cfg.train)
    zero = {id(p) for g in opt.param_groups if g["lr"] == 0.0 for p in g["params"]}
    assert zero == frozen

    before = _backward_once(model, cfg)
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    frozen_grads = [p.grad for p in model.parameters() if id(p) in frozen and p.grad is not None]
    assert frozen_grads and any(float(g.abs().sum()) > 0 for g in frozen_grads)
    norm = clip_gradients(opt, 0.0)
    assert float(norm) == pytest.approx(
        float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))), rel=1e-5)
    opt.step()
    for name, p in model.named_parameters():
        if id(p) in frozen:
            assert torch.equal(p, before[name]), name
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters()
               if id(p) in stage0)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters()
               if ".fusion." in n)


def test_frozen_backbone_grads_false_drops_the_frozen_gradients(tiny_cfg):
    """frozen_backbone_grads=False: the frozen Swin weights get requires_grad=False, so they have
    no gradient, sit in no optimiser group and do not count in the clip norm; the fusion modules
    and the unfrozen stage 0 still train. It needs backbone_lr_factor=0."""
    from gres import engine
    from gres.model.swin import pretrained_parameters
    from gres.optim import build_optimizer, clip_gradients

    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(
        tiny_cfg.train, lr=1e-2, backbone_lr_factor=0.0, backbone_lr_from_stage=1,
        frozen_backbone_grads=False))
    engine.seed_everything(0)
    model = engine.prepare_model(cfg).train()
    frozen = {id(p) for p in pretrained_parameters(model, from_stage=1)}
    stage0 = {id(p) for p in pretrained_parameters(model)} - frozen
    assert frozen and stage0
    assert not any(p.requires_grad for p in model.parameters() if id(p) in frozen)
    assert all(p.requires_grad for p in model.parameters() if id(p) in stage0)
    opt = build_optimizer(model, cfg.train)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & frozen and stage0 <= in_opt

    before = _backward_once(model, cfg)
    assert all(p.grad is None for p in model.parameters() if id(p) in frozen)
    trained = [p.grad for p in model.parameters() if p.grad is not None]
    norm = clip_gradients(opt, 0.0)
    assert float(norm) == pytest.approx(
        float(torch.linalg.vector_norm(torch.stack([g.norm() for g in trained]))), rel=1e-5)
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if id(p) in frozen)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters()
               if ".fusion." in n)

    bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, backbone_lr_factor=0.1))
    with pytest.raises(ValueError, match="frozen_backbone_grads=False needs"):
        engine.prepare_model(bad)
