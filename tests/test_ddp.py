"""Two-process DDP on CPU (gloo): training runs, ranks stay in sync, merged metrics are exact.

The processes are started with ``torch.multiprocessing`` (what ``torchrun`` would do, minus the
launcher; forked so that they inherit the parent's imports): each joins a gloo group, then calls
:func:`gres.engine.train`, which wraps the model in DDP, shards the data, and evaluates the final
model on disjoint shards of ``val``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gres import engine
from gres.config import PRESETS
from gres.data.synthetic import generate

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(data_root: str):
    cfg = PRESETS["tiny-test"]()
    train = dataclasses.replace(
        cfg.train, batch_size=4, max_iters=2, log_every=1, checkpoint_every=1, eval_every=1,
        eval_max_samples=5, eval_batch_size=3, lr=1e-3, clip_grad_norm=1.0, keep_checkpoints=3,
    )
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=data_root), train=train)


def _worker(rank: int, world: int, port: int, data_root: str, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = engine.train(_cfg(data_root), run_dir, progress=False)
        weights = hashlib.sha256()
        for k, v in sorted(result.model.state_dict().items()):
            weights.update(k.encode() + v.detach().cpu().numpy().tobytes())
        out = {
            "weights_sha": weights.hexdigest(),
            "iterations": result.iterations,
            "final_eval": result.final_eval.metrics,
            "per_type": result.final_eval.per_type,
            "records": result.final_eval.records,
            "history": result.history,
            "eval_history": result.eval_history,
            "final_weights": str(result.final_weights) if result.final_weights else None,
        }
        with open(os.path.join(run_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


def _nan_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a)


def test_two_process_training_and_exact_merged_evaluation(tmp_path):
    data_root = tmp_path / "synthetic-tiny"
    generate(data_root, "tiny", seed=0, progress=False)
    run = tmp_path / "ddp-run"
    cfg = _cfg(str(data_root))
    # Build once here so that the forked workers inherit the imported modules (transformers'
    # lazy imports dominate a cold start) and the tokenizer.
    val = engine.build_dataset(cfg, "val")
    model = engine.prepare_model(cfg, load_pretrained=False)
    mp.start_processes(_worker, args=(2, _free_port(), str(data_root), str(run)), nprocs=2,
                       join=True, start_method="fork")

    r0 = json.loads((run / "rank0.json").read_text())
    r1 = json.loads((run / "rank1.json").read_text())
    assert r0["iterations"] == r1["iterations"] == 2
    assert r0["weights_sha"] == r1["weights_sha"]  # DDP kept the replicas identical
    # Every rank returns the same merged evaluation and the same (all-reduced) log.
    assert r0["records"] == r1["records"] and _nan_equal(r0["final_eval"], r1["final_eval"])
    assert [r["loss"] for r in r0["history"]] == [r["loss"] for r in r1["history"]]
    assert [r["iter"] for r in r0["eval_history"]] == [1, 2]
    assert r0["eval_history"][0]["num_samples"] == 5

    # Files are written once (rank 0), checkpoints carry both ranks' RNG states.
    assert r0["final_weights"] and not r1["final_weights"]
    state = torch.load(engine.latest_checkpoint(run) / "state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and state["sampler"]["world_size"] == 2
    assert state["sampler"]["batch_size"] == 2  # 4 in total = 2 per process
    log = engine.read_log(run)
    assert sum(r["kind"] == "train" for r in log) == 2

    # Merged metrics == a single-process evaluation of the same weights, exactly.
    engine.load_weights(model, run / "model_final.safetensors")
    single = engine.evaluate(model, val, batch_size=7, progress=False)
    assert _nan_equal(r0["final_eval"], single.metrics)
    for name, m in single.per_type.items():
        assert _nan_equal(r0["per_type"][name], m)
    assert [r["index"] for r in r0["records"]] == [r["index"] for r in single.records]
    for a, b in zip(r0["records"], single.records):
        assert {k: a[k] for k in ("I", "U", "pred_nt", "outcome")} == \
               {k: b[k] for k in ("I", "U", "pred_nt", "outcome")}
