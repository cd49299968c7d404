"""Frozen text features computed once (gres.text_cache) and the TextEncoder memo."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gres import engine
from gres.config import PRESETS
from gres.model.text import token_key
from gres.text_cache import (attach_store, compute_features, dataset_sentences, feature_store,
                             token_rows, use_feature_store)


def frozen_cfg(root, **train):
    cfg = PRESETS["tiny-test"]()
    t = dict(batch_size=2, max_iters=4, log_every=2, checkpoint_every=2, eval_every=0,
             lr=1e-3, clip_grad_norm=1.0, warmup_iters=0, freeze_text_encoder=True)
    t.update(train)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(root)),
                               train=dataclasses.replace(cfg.train, **t))


@pytest.fixture(scope="module")
def frozen(tiny_synthetic):
    cfg = frozen_cfg(tiny_synthetic)
    engine.seed_everything(0)
    model = engine.prepare_model(cfg)
    return cfg, model, engine.build_dataset(cfg, "train"), engine.build_dataset(cfg, "val")


def test_token_rows_are_the_distinct_sentences_sorted(frozen):
    _, _, train, val = frozen
    ids, mask = token_rows([train, val])
    keys = [token_key(i, m) for i, m in zip(ids, mask)]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert len(keys) == len(set(dataset_sentences(train)) | set(dataset_sentences(val)))
    sub = torch.utils.data.Subset(train, [0, 2])
    assert dataset_sentences(sub) == [train.meta(0)["sentence"], train.meta(2)["sentence"]]


def test_memo_serves_the_eval_mode_features_and_computes_missing_rows(frozen):
    _, model, train, _ = frozen
    enc = model.text_encoder
    batch = engine.build_collate()([train[i] for i in range(4)])
    enc.eval()
    with torch.no_grad():
        live = enc(batch.input_ids, batch.text_mask)
    # memo of rows 0-1 only: rows 2-3 are computed on first use and added
    enc.use_memo(batch.input_ids[:2], batch.text_mask[:2], live[:2] + 1.0)
    try:
        enc.train()  # dropout would change live features; the memo does not
        got = enc(batch.input_ids, batch.text_mask)
        assert torch.equal(got[:2], live[:2] + 1.0)  # served, not recomputed
        assert torch.allclose(got[2:], live[2:], atol=1e-5)
        assert len(enc.memo) == len({token_key(i, m) for i, m in
                                     zip(batch.input_ids, batch.text_mask)})
        with pytest.raises(ValueError, match="do not match"):
            enc.use_memo(batch.input_ids, batch.text_mask[:, :3], live)
    finally:
        enc.clear_memo()
        enc.eval()


def test_memo_refuses_a_trainable_encoder(frozen):
    _, model, train, _ = frozen
    enc = model.text_encoder
    b = engine.build_collate()([train[0]])
    p = next(enc.parameters())
    p.requires_grad_(True)
    try:
        with pytest.raises(ValueError, match="not frozen"):
            enc.use_memo(b.input_ids, b.text_mask, torch.zeros(1, b.input_ids.shape[1],
                                                               enc.hidden_size))
        enc.memo = {}
        with pytest.raises(RuntimeError, match="trainable again"):
            enc(b.input_ids, b.text_mask)
    finally:
        p.requires_grad_(False)
        enc.clear_memo()


def test_store_is_written_once_keyed_by_weights_and_rows(frozen, tmp_path):
    cfg, model, train, val = frozen
    enc = model.text_encoder
    path = feature_store(enc, [train, val], tmp_path)
    assert path.is_file() and path.name.startswith("text-")
    mtime = path.stat().st_mtime_ns
    assert feature_store(enc, [val, train], tmp_path) == path  # same rows: same file, not rebuilt
    assert path.stat().st_mtime_ns == mtime
    assert feature_store(enc, [val], tmp_path) != path  # other rows: another store
    ids, mask = token_rows([train, val])
    expected = compute_features(enc, ids, mask)
    assert attach_store(enc, path) == len(ids)
    try:
        with torch.no_grad():
            assert torch.equal(enc(ids[:5], mask[:5]), expected[:5])
    finally:
        enc.clear_memo()
    other = engine.prepare_model(cfg)
    with torch.no_grad():
        next(other.text_encoder.parameters()).add_(1.0)  # other weights: another key
    assert feature_store(other.text_encoder, [train, val], tmp_path) != path


def test_use_feature_store_needs_a_frozen_gres_text_encoder(frozen, tmp_path):
    cfg, _, train, _ = frozen
    trainable = engine.prepare_model(dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, freeze_text_encoder=False)))
    with pytest.raises(ValueError, match="needs a frozen text encoder"):
        use_feature_store(trainable, [train], tmp_path)
    with pytest.raises(ValueError, match="has no gres TextEncoder"):
        use_feature_store(torch.nn.Linear(2, 2), [train], tmp_path)


def test_training_with_the_cache_is_deterministic_and_resumes_exactly(tiny_synthetic, tmp_path):
    cfg = frozen_cfg(tiny_synthetic, text_feature_cache=True)
    a = engine.train(cfg, tmp_path / "a", progress=False, pretrain_root=tmp_path / "shared")
    stores = list((tmp_path / "shared").glob("text-*.safetensors"))
    assert len(stores) == 1
    engine.train(cfg, tmp_path / "b", progress=False, pretrain_root=tmp_path / "shared",
                 stop_after=2)
    b = engine.train(cfg, tmp_path / "b", progress=False, pretrain_root=tmp_path / "shared",
                     resume=True)
    from safetensors.torch import load_file

    wa, wb = load_file(str(a.final_weights)), load_file(str(b.final_weights))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the cached features are dropout-free, so training differs from the live frozen encoder
    live = engine.train(frozen_cfg(tiny_synthetic), tmp_path / "live", progress=False,
                        pretrain_root=tmp_path / "shared")
    wl = load_file(str(live.final_weights))
    assert any(not torch.equal(wa[k], wl[k]) for k in wa)
    with pytest.raises(ValueError, match="needs train.freeze_text_encoder=True"):
        engine.train(frozen_cfg(tiny_synthetic, text_feature_cache=True,
                                freeze_text_encoder=False), tmp_path / "c", progress=False)
