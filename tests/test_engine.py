"""Training / evaluation engine on the tiny preset and the tiny synthetic dataset.

One uninterrupted reference run (module fixture) is compared with an interrupted-and-resumed run
(bitwise on CPU) and inspected for its files; the bad-input cases each run a couple of iterations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gres import engine
from gres.config import PRESETS, ExperimentConfig, from_dict, to_dict
from gres.data.synthetic import generate
from gres.metrics import GRESMetrics
from gres.model import postprocess
from gres.optim import param_groups


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "synthetic-tiny"
    generate(root, "tiny", seed=0, progress=False)
    return root


def tiny_cfg(data_root, **train) -> ExperimentConfig:
    cfg = PRESETS["tiny-test"]()
    t = dict(batch_size=2, max_iters=6, log_every=2, checkpoint_every=3, eval_every=0,
             eval_batch_size=8, lr=1e-3, clip_grad_norm=1.0, warmup_iters=2, keep_checkpoints=2)
    t.update(train)
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, root=str(data_root)),
        train=dataclasses.replace(cfg.train, **t),
    )


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """An uninterrupted 6-iteration run with periodic (capped) and final evaluation."""
    cfg = tiny_cfg(data_root, eval_every=3, eval_max_samples=6)
    run = tmp_path_factory.mktemp("runs") / "reference"
    seen: list[dict] = []
    result = engine.train(cfg, run, hook=seen.append, progress=False)
    return cfg, run, result, seen


def _weights(path):
    return load_file(str(path))


def _same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------
# Run folder, log, hook, checkpoints
# --------------------------------------------------------------------------------------------------
def test_run_folder(reference):
    cfg, run, result, seen = reference
    assert result.iterations == 6 and result.samples_seen == 12
    assert from_dict(ExperimentConfig, json.loads((run / "config.json").read_text())) == cfg
    log = engine.read_log(run)
    assert log == seen  # the hook receives every record that goes to log.jsonl
    train = [r for r in log if r["kind"] == "train"]
    assert [r["iter"] for r in train] == [2, 4, 6]
    for r in train:
        for key in ("loss", "loss_mask", "loss_region", "loss_nt", "lr", "grad_norm", "samples"):
            assert math.isfinite(r[key]), key
    # cosine + linear warm-up: lr of the step that ended each window
    assert train[0]["lr"] < cfg.train.lr and train[-1]["lr"] < train[1]["lr"]
    evals = [r for r in log if r["kind"] == "eval"]
    assert [r["iter"] for r in evals] == [3, 6]
    assert evals[0]["num_samples"] == 6  # eval_max_samples caps the periodic evaluation
    assert evals[1]["final"] and evals[1]["num_samples"] == result.final_eval.num_samples
    assert set(evals[1]) >= {"gIoU", "cIoU", "Pr@0.7", "N-acc", "T-acc"}
    assert result.eval_history == evals

    ckpts = sorted(p.name for p in (run / "checkpoints").glob("iter_*"))
    assert ckpts == ["iter_0000003", "iter_0000006"]
    latest = engine.latest_checkpoint(run)
    assert latest.name == "iter_0000006" and result.last_checkpoint == latest
    state = torch.load(latest / "state.pt", weights_only=True)
    assert state["iteration"] == 6 and state["sampler"]["position"] == 12
    assert _same_weights(_weights(latest / "model.safetensors"), _weights(result.final_weights))
    cfg_in_weights = engine.read_weights_config(result.final_weights)
    assert cfg_in_weights == cfg.model

    records = (run / "eval" / "val_records.jsonl").read_text().splitlines()
    assert len(records) == result.final_eval.num_samples
    first = json.loads(records[0])
    assert {"index", "sentence", "expr_type", "pred_nt", "gt_nt", "nt_prob", "I", "U", "IoU",
            "outcome", "mask_I"} <= set(first)
    csv_lines = (run / "eval" / "val_records.csv").read_text().splitlines()
    assert len(csv_lines) == len(records) + 1 and csv_lines[0].startswith("index,")
    saved = json.loads((run / "eval" / "val_metrics.json").read_text())
    assert saved["metrics"]["gIoU"] == pytest.approx(result.final_eval.metrics["gIoU"])
    assert set(saved["per_type"]) <= {"single", "multi", "no-target"}


def test_resume_is_bitwise(reference, tmp_path):
    cfg, ref_run, ref, _ = reference
    run = tmp_path / "interrupted"
    first = engine.train(cfg, run, progress=False, stop_after=4)
    assert first.iterations == 4 and first.final_weights is None
    assert engine.latest_checkpoint(run).name == "iter_0000004"
    # Leftovers of the interrupted process past its last checkpoint are dropped from the log.
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps({"kind": "train", "iter": 5, "loss": 123.0}) + "\n")
    second = engine.train(cfg, run, progress=False, resume=True)
    assert second.resumed_from == 4 and second.iterations == 6
    assert _same_weights(_weights(ref.final_weights), _weights(second.final_weights))
    s_ref = torch.load(ref_run / "checkpoints/iter_0000006/state.pt", weights_only=True)
    s_new = torch.load(run / "checkpoints/iter_0000006/state.pt", weights_only=True)
    for k, st in s_ref["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg_sq"], s_new["optimizer"]["state"][k]["exp_avg_sq"])
    def strip(log):
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in log]

    assert strip(engine.read_log(run)) == strip(engine.read_log(ref_run))


def test_existing_run_needs_resume(reference):
    cfg, run, _, _ = reference
    with pytest.raises(ValueError, match="already holds checkpoints"):
        engine.train(cfg, run, progress=False)


def test_resume_with_other_model_config_is_refused(reference):
    cfg, run, _, _ = reference
    other = dataclasses.replace(
        cfg, model=dataclasses.replace(
            cfg.model, decoder=dataclasses.replace(cfg.model.decoder, num_layers=2)))
    with pytest.raises(ValueError, match="model config differs"):
        engine.train(other, run, progress=False, resume=True)


def test_kill_during_checkpoint_write_keeps_previous(data_root, tmp_path, monkeypatch):
    cfg = tiny_cfg(data_root, max_iters=4, checkpoint_every=2, log_every=2)
    run = tmp_path / "killed"
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # state.pt of the 2nd checkpoint: weights already in the tmp folder
            raise KeyboardInterrupt("simulated kill during the checkpoint write")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        engine.train(cfg, run, progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert engine.latest_checkpoint(run).name == "iter_0000002"
    assert list((run / "checkpoints").glob(".tmp-*"))  # the half-written folder
    (run / "checkpoints" / "latest.json").write_text("{garbage")  # even a corrupt pointer
    assert engine.latest_checkpoint(run).name == "iter_0000002"
    result = engine.train(cfg, run, progress=False, resume=True)
    assert result.resumed_from == 2 and result.iterations == 4
    assert not list((run / "checkpoints").glob(".tmp-*"))


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------
def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_root, tmp_path, monkeypatch):
    from gres.losses import GRESCriterion

    cfg = tiny_cfg(data_root, max_iters=6, checkpoint_every=2)
    real_forward = GRESCriterion.forward
    calls = {"n": 0}

    def nan_at_third(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(GRESCriterion, "forward", nan_at_third)
    run = tmp_path / "nan"
    with pytest.raises(engine.NonFiniteLossError, match=r"iteration 3.*iter_0000002"):
        engine.train(cfg, run, progress=False)
    latest = engine.latest_checkpoint(run)
    assert latest.name == "iter_0000002"
    assert all(torch.isfinite(t).all() for t in _weights(latest / "model.safetensors").values())
    assert not (run / "model_final.safetensors").exists()


def test_missing_data_root(tmp_path):
    cfg = tiny_cfg(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        engine.train(cfg, tmp_path / "run", progress=False)


def test_missing_image(data_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    victim = sorted((root / "images" / "train2014").iterdir())[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        engine.train(tiny_cfg(root), tmp_path / "run", progress=False)


def test_checkpoint_that_does_not_match_the_config(reference, tmp_path):
    cfg, _, result, _ = reference
    other = dataclasses.replace(
        cfg.model, decoder=dataclasses.replace(cfg.model.decoder, hidden_dim=16))
    model = engine.prepare_model(dataclasses.replace(cfg, model=other))
    with pytest.raises(ValueError, match="does not match the model config") as err:
        engine.load_weights(model, result.final_weights)
    assert "decoder" in str(err.value)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        engine.load_weights(model, junk)
    with pytest.raises(FileNotFoundError):
        engine.load_weights(model, tmp_path / "absent.safetensors")


def test_bad_amp_dtype(data_root, tmp_path):
    cfg = tiny_cfg(data_root, amp_dtype="float8")
    with pytest.raises(ValueError, match="amp_dtype"):
        engine.train(cfg, tmp_path / "run", progress=False)


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------
def _nan_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a)


def test_evaluate_equals_a_direct_metrics_loop(reference):
    cfg, _, result, _ = reference
    model = engine.prepare_model(cfg)
    engine.load_weights(model, result.final_weights)
    model.eval()
    ds = engine.build_dataset(cfg, "val")
    ev = engine.evaluate(model, ds, batch_size=5, progress=False)
    direct = GRESMetrics()
    loader = torch.utils.data.DataLoader(ds, batch_size=7, collate_fn=engine.build_collate())
    with torch.no_grad():
        for b in loader:
            out = model(b.image, b.input_ids, b.text_mask)
            pred, pred_nt, _ = postprocess(out, b.gt_mask.shape[-1])
            direct.update(pred, b.gt_mask, pred_nt, b.no_target, expr_type=b.expr_type)
    assert _nan_equal(ev.metrics, direct.compute())  # exactly, floating-point sum included
    by_type = direct.compute_by_type()
    for name, m in ev.per_type.items():
        assert _nan_equal(m, by_type[name])
    assert [r["index"] for r in ev.records] == list(range(len(ds)))
    types = ds.expr_types
    names = ("single", "multi", "no-target")
    assert [r["expr_type"] for r in ev.records] == [names[t] for t in types]
    for r in ev.records:
        assert 0.0 <= r["nt_prob"] <= 1.0
        assert r["mask_U"] == r["pred_area"] + r["gt_area"] - r["mask_I"]
        if r["outcome"] == "TN":
            assert r["I"] == r["mask_I"] and r["U"] == r["mask_U"]
    assert _nan_equal(ev.metrics, result.final_eval.metrics)  # same weights, same numbers


def test_metrics_from_counts_reproduces_masks():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(9, 12, 10, generator=g) > 0.6
    gt = torch.rand(9, 12, 10, generator=g) > 0.5
    gt[2] = False
    pred[4] = False
    p_nt = torch.tensor([0, 1, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    g_nt = ~gt.flatten(1).any(1)
    types = torch.where(g_nt, 2, torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0]))
    direct = GRESMetrics()
    direct.update(pred, gt, p_nt, g_nt, expr_type=types)
    raw = [dict(index=i, expr_type=int(types[i]), gt_nt=bool(g_nt[i]), pred_nt=bool(p_nt[i]),
                mask_I=int((pred[i] & gt[i]).sum()), pred_area=int(pred[i].sum()),
                gt_area=int(gt[i].sum())) for i in range(9)]
    replay = engine.metrics_from_counts(raw, chunk=4)
    assert _nan_equal(replay.compute(), direct.compute())
    assert replay.counts() == direct.counts()


# --------------------------------------------------------------------------------------------------
# Samplers, budget, precision, freezing
# --------------------------------------------------------------------------------------------------
def test_data_order_is_a_function_of_seed_and_epoch():
    p0 = engine.epoch_permutation(10, seed=5, epoch=0)
    assert sorted(p0.tolist()) == list(range(10))
    assert torch.equal(p0, engine.epoch_permutation(10, seed=5, epoch=0))
    assert not torch.equal(p0, engine.epoch_permutation(10, seed=5, epoch=1))
    assert not torch.equal(p0, engine.epoch_permutation(10, seed=6, epoch=0))
    s = engine.TrainBatchSampler(10, batch_size=3, seed=5)
    it = iter(s)
    batches = [next(it) for _ in range(8)]  # 24 samples: crosses two epoch boundaries
    flat = sum(batches, [])
    assert flat[:10] == p0.tolist() and sorted(flat[10:20]) == list(range(10))
    resumed = iter(engine.TrainBatchSampler(10, batch_size=3, seed=5, start=3 * 3))
    assert [next(resumed) for _ in range(5)] == batches[3:]  # mid-epoch resume


def test_shards_are_disjoint_and_cover():
    for n in (10, 11):
        shards = [engine.TrainBatchSampler(n, 1, seed=1, rank=r, world_size=2).shard(0)
                  for r in range(2)]
        assert len(shards[0]) == len(shards[1]) == math.ceil(n / 2)
        assert set(shards[0]) | set(shards[1]) == set(range(n))
        if n % 2 == 0:
            assert not set(shards[0]) & set(shards[1])
        ev = [engine.ShardedEvalSampler(n, r, 2).indices for r in range(2)]
        assert sorted(ev[0] + ev[1]) == list(range(n))  # evaluation never duplicates


def test_budget_in_samples(data_root):
    cfg = tiny_cfg(data_root, max_samples=7, batch_size=2, max_iters=999)
    assert engine.max_iterations(cfg) == 4
    assert engine.max_iterations(tiny_cfg(data_root, max_iters=5)) == 5


def test_keep_fp32_under_autocast():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16
        engine.keep_fp32(lin)
        engine.keep_fp32(lin)  # idempotent
        assert lin(x.bfloat16()).dtype == torch.float32
    model = engine.prepare_model(PRESETS["tiny-test"]())
    assert engine.apply_fp32_modules(model, ("pixel_decoder",)) == ["pixel_decoder"]


def test_recipe_freezing_and_groups_on_the_model():
    cfg = PRESETS["tiny-test"]()  # text.frozen_layers_from = 1, freeze_embeddings = True
    model = engine.prepare_model(cfg)
    pg = param_groups(model, 0.05)
    names = {n for v in pg.names.values() for n in v}
    bert = "text_encoder.bert."
    assert not any(n.startswith(bert + "embeddings.") for n in names)
    assert not any(n.startswith(bert + "encoder.layer.1.") for n in names)
    assert all(n.startswith(bert + "encoder.layer.0.") for n in pg.names["text"])
    table = "backbone.layers.0.blocks.0.attn.relative_position_bias_table"
    assert table in pg.names["no_decay_embed"]
    assert "decoder.query_feat.weight" in pg.names["no_decay_embed"]
    assert "pixel_decoder.transformer.level_embed" in pg.names["decay"]
    assert "backbone.layers.0.blocks.0.norm1.weight" in pg.names["no_decay_norm"]


def test_frozen_text_encoder_option_and_expr_type_filter(data_root, tmp_path):
    cfg = tiny_cfg(data_root, max_iters=2, checkpoint_every=100, freeze_text_encoder=True)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_expr_types=(0,)))
    result = engine.train(cfg, tmp_path / "frozen", progress=False)
    ds = engine.build_dataset(cfg, "train")
    assert result.train_samples == int((ds.expr_types == 0).sum()) < len(ds)
    engine.seed_everything(cfg.train.seed)
    init = engine.prepare_model(cfg).state_dict()
    final = _weights(result.final_weights)
    text = [k for k in final if k.startswith("text_encoder.")]
    assert text and all(torch.equal(final[k], init[k]) for k in text)
    assert not torch.equal(final["decoder.query_feat.weight"], init["decoder.query_feat.weight"])


def test_config_roundtrip_of_train_fields():
    cfg = PRESETS["tiny-test"]()
    t = dataclasses.replace(cfg.train, max_samples=100, fp32_modules=("a", "b"))
    cfg = dataclasses.replace(cfg, train=t)
    assert from_dict(ExperimentConfig, to_dict(cfg)) == cfg
    assert np.isfinite(cfg.train.lr)


@pytest.mark.gpu
def test_amp_training_on_cuda(data_root, tmp_path):
    cfg = tiny_cfg(data_root, max_iters=3, amp=True, device="cuda", checkpoint_every=2)
    result = engine.train(cfg, tmp_path / "amp", progress=False)
    assert result.iterations == 3
    assert all(math.isfinite(r["loss"]) for r in result.history)
    assert getattr(result.model.pixel_decoder, "_gres_keep_fp32", False)
    state = torch.load(engine.latest_checkpoint(tmp_path / "amp") / "state.pt", weights_only=True)
    assert state["scaler"]  # fp16 AMP keeps a GradScaler state for resumption
