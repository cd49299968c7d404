"""Official-checkpoint conversion and our checkpoint format (gres.convert, gres.checkpoint)."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch

from gres.checkpoint import config_path, load_model, read_config, save_model
from gres.config import PRESETS, ExperimentConfig
from gres.convert import (
    config_from_official,
    convert_official_checkpoint,
    load_official_checkpoint,
    load_timm_swin,
    official_to_ours,
    ours_to_official,
    read_checkpoint,
)
from gres.model import build_model

VECTORS = Path(__file__).resolve().parents[1].parent / "shared/reference/rela_official_tiny/public"


def _cfg():
    return PRESETS["tiny-test"]().model


def _model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(_cfg()).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        model.decoder.lang_weight.fill_(0.75)
    return model


def _batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 64, 64), generator=g, dtype=torch.uint8)
    ids = torch.randint(1000, 2000, (2, 20), generator=g)
    mask = torch.arange(20).expand(2, 20) < torch.tensor([[7], [20]])
    return images, ids, mask


def _official_state(model) -> dict[str, torch.Tensor]:
    """Our weights under the official names, plus what a real checkpoint may carry."""
    sd = ours_to_official(model.state_dict())
    index = torch.zeros(16, 16, dtype=torch.long)
    sd["backbone.layers.0.blocks.0.attn.relative_position_index"] = index
    sd["text_encoder.embeddings.position_ids"] = torch.arange(64).view(1, -1)
    return sd


def _outputs(model):
    with torch.no_grad():
        return model(*_batch()).mask_logits


def test_key_mapping_round_trip():
    model = _model()
    official = ours_to_official(model.state_dict())
    assert "sem_seg_head.predictor.lang_weight" in official
    assert "sem_seg_head.pixel_decoder.adapter_1.weight" in official
    assert "text_encoder.embeddings.word_embeddings.weight" in official
    assert "backbone.norm0.weight" in official
    back, dropped, unknown = official_to_ours(official)
    assert not dropped and not unknown
    assert set(back) == set(model.state_dict())


def test_pth_conversion_reproduces_the_model_and_drops_lang_weight_by_default(tmp_path):
    source = _model(seed=0)
    path = tmp_path / "gres_tiny.pth"
    torch.save({"model": _official_state(source), "iteration": 7, "optimizer": {}}, path)

    target = _model(seed=1)
    report = load_official_checkpoint(target, path)
    assert report.ok
    assert "sem_seg_head.predictor.lang_weight" in report.dropped
    assert "text_encoder.embeddings.position_ids" in report.dropped
    assert target.decoder.lang_weight.item() == 0.0  # the official loader never loads it
    assert any("0.75" in n for n in report.notes)
    with torch.no_grad():
        source.decoder.lang_weight.zero_()
    torch.testing.assert_close(_outputs(target), _outputs(source))

    report = load_official_checkpoint(target, path, use_stored_lang_weight=True)
    assert target.decoder.lang_weight.item() == pytest.approx(0.75)
    with torch.no_grad():
        source.decoder.lang_weight.fill_(0.75)
    torch.testing.assert_close(_outputs(target), _outputs(source))


def test_missing_unexpected_and_shape_mismatch_are_named():
    model = _model()
    sd = _official_state(model)
    del sd["sem_seg_head.predictor.query_feat.weight"]
    sd["sem_seg_head.predictor.extra_head.weight"] = torch.zeros(3)
    sd["sem_seg_head.pixel_decoder.mask_features.bias"] = torch.zeros(7)
    with pytest.raises(ValueError) as err:
        load_official_checkpoint(model, sd)
    msg = str(err.value)
    assert "decoder.query_feat.weight" in msg and "missing" in msg
    assert "decoder.extra_head.weight" in msg and "unexpected" in msg
    assert "pixel_decoder.mask_features.bias (weights [7] vs model [32])" in msg


def test_non_strict_loads_what_fits_and_reports_the_rest():
    source, target = _model(seed=0), _model(seed=1)
    sd = _official_state(source)
    del sd["sem_seg_head.predictor.query_feat.weight"]
    before = target.decoder.query_feat.weight.clone()
    report = load_official_checkpoint(target, sd, strict=False, use_stored_lang_weight=True)
    assert report.missing == ["decoder.query_feat.weight"] and not report.ok
    assert torch.equal(target.decoder.query_feat.weight, before)
    torch.testing.assert_close(target.decoder.query_embed.weight, source.decoder.query_embed.weight)


def test_reading_rules(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "absent.pth")
    # detectron2 .pkl with numpy arrays: refused unless trusted
    pkl = tmp_path / "model_final.pkl"
    with pkl.open("wb") as f:
        pickle.dump({"model": {"a": torch.ones(2).numpy()}, "__author__": "x"}, f)
    with pytest.raises(ValueError, match="trust_pickle"):
        read_checkpoint(pkl)
    assert torch.equal(read_checkpoint(pkl, trust_pickle=True)["a"], torch.ones(2))
    # a .pth with arbitrary objects: weights_only refuses, trust_pickle allows
    pth = tmp_path / "odd.pth"
    torch.save({"model": {"a": torch.ones(1)}, "extra": _Opaque()}, pth)
    with pytest.raises(ValueError, match="weights_only"):
        read_checkpoint(pth)
    assert torch.equal(read_checkpoint(pth, trust_pickle=True)["a"], torch.ones(1))
    with pytest.raises(ValueError, match="not tensors"):
        read_checkpoint({"model": {"a": "text"}})


class _Opaque:
    pass


def test_convert_official_checkpoint_writes_a_loadable_checkpoint(tmp_path):
    source = _model()
    src = tmp_path / "official.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in _official_state(source).items()}, str(src))
    exp = PRESETS["tiny-test"]()
    dst = tmp_path / "ours.safetensors"
    report = convert_official_checkpoint(src, exp, dst, use_stored_lang_weight=True)
    assert report.ok and dst.is_file() and config_path(dst).is_file()
    assert "ours.safetensors" in str(report)
    model, cfg = load_model(dst)
    assert isinstance(cfg, ExperimentConfig) and cfg == exp
    torch.testing.assert_close(_outputs(model), _outputs(source))


def test_save_load_round_trip_and_atomicity(tmp_path):
    model = _model()
    path = tmp_path / "run" / "model.safetensors"
    save_model(model, model.cfg, path)
    names = sorted(p.name for p in path.parent.iterdir())
    assert names == ["model.safetensors", "model.safetensors.json"]  # no temporary files left
    blob = json.loads(config_path(path).read_text())
    assert blob["format"] == "gres-checkpoint" and blob["kind"] == "ModelConfig"
    loaded, cfg = load_model(path)
    assert cfg == model.cfg
    torch.testing.assert_close(_outputs(loaded), _outputs(model))
    # the config is also in the file's metadata: the safetensors file alone is enough
    config_path(path).unlink()
    assert read_config(path) == model.cfg
    # the (model, path, cfg) order of early engine drafts is accepted
    save_model(model, tmp_path / "b.safetensors", model.cfg)
    assert read_config(tmp_path / "b.safetensors") == model.cfg


def test_checkpoint_that_does_not_fit_its_config(tmp_path):
    model = _model()
    path = tmp_path / "m.safetensors"
    save_model(model, model.cfg, path)
    decoder = dataclasses.replace(model.cfg.decoder, num_layers=4, hidden_dim=48)
    other = dataclasses.replace(model.cfg, decoder=decoder)
    blob = {"format": "gres-checkpoint", "version": 1, "kind": "ModelConfig",
            "config": json.loads(json.dumps(dataclasses.asdict(other)))}
    config_path(path).write_text(json.dumps(blob))
    with pytest.raises(ValueError) as err:
        load_model(path)
    msg = str(err.value)
    assert "missing" in msg and "decoder.RIA_layers.3.norm.weight" in msg
    assert "shape mismatches" in msg
    assert "decoder.RLA_vision.0.self_attn.in_proj_bias (weights [96] vs model [144])" in msg
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope.safetensors")


def test_unexpected_keys_in_our_checkpoint(tmp_path):
    model = _model()
    path = tmp_path / "m.safetensors"
    save_model(model, model.cfg, path)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path))
    sd["decoder.stray"] = torch.zeros(1)
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"unexpected \(1\): decoder.stray"):
        load_model(path)


def test_load_timm_swin_into_a_full_model(tmp_path):
    timm = pytest.importorskip("timm")
    from timm.models.swin_transformer import SwinTransformer

    swin = SwinTransformer(img_size=128, patch_size=4, embed_dim=16, depths=(1, 1, 1, 1),
                           num_heads=(1, 1, 2, 2), window_size=4, num_classes=0)
    path = tmp_path / "swin.pth"
    torch.save(swin.state_dict(), path)
    model = build_model(_cfg())
    report = load_timm_swin(model, str(path))
    torch.testing.assert_close(model.backbone.patch_embed.proj.weight, swin.patch_embed.proj.weight)
    assert report.missing
    assert all(".fusion." in k or ".res_gate." in k or k.startswith("norm") for k in report.missing)
    assert timm is not None


@pytest.mark.skipif(
    not (VECTORS / "official_config.json").is_file(), reason="official vectors absent"
)
def test_config_from_official_matches_the_preset():
    data = json.loads((VECTORS / "official_config.json").read_text())
    cfg = config_from_official(data, VECTORS)
    preset = PRESETS["official-tiny-vectors"]().model
    assert cfg.text.tokenizer == str(VECTORS / "vocab.txt")
    assert dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, tokenizer=None)) == preset
    bad = json.loads(json.dumps(data))
    bad["decoder"]["num_queries"] = 99
    with pytest.raises(ValueError, match="square"):
        config_from_official(bad)
    bad["decoder"]["num_queries"] = 100
    del bad["backbone"]["depths"]
    with pytest.raises(ValueError, match="backbone.depths|depths"):
        config_from_official(bad)


def test_original_branch_checkpoint_converts():
    cfg = _cfg()
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, variant="original"))
    torch.manual_seed(0)
    source = build_model(cfg).eval()
    sd = ours_to_official(source.state_dict())
    assert "sem_seg_head.predictor.RLA_gate" in sd and "sem_seg_head.predictor.RLA_proj.weight" in sd
    assert not any("lang_weight" in k for k in sd)
    torch.manual_seed(1)
    target = build_model(cfg).eval()
    report = load_official_checkpoint(target, sd)
    assert report.ok and not report.notes
    torch.testing.assert_close(_outputs(target), _outputs(source))
