"""Time one training step of a preset, part by part (text encoder, backbone, pixel decoder,
decoder forward; loss; backward; clip + optimiser), on one CPU thread.

    .venv/bin/python bench/profile_step.py --preset cpu-small \
        --pretrained-root outputs/experiments/_pretrained \
        --set model.text.name_or_path=minilm --set train.freeze_text_encoder=true

Batches are the first training samples of ``data.root``; with ``train.text_feature_cache`` the
store of :mod:`gres.text_cache` is built (or read) under ``--pretrained-root``, as the engine does.
The backbone pretrained on the dataset (``swin.pretrained="dataset-categories"``) is read from
(or trained into) the same folder. Milliseconds per step, mean over ``--steps`` steps after two
warm-up steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PARTS = ("text_encoder", "backbone", "pixel_decoder", "decoder")


def main(argv: list[str] | None = None) -> int:
    from gres import engine
    from gres.cli import apply_overrides
    from gres.config import PRESETS
    from gres.losses import GRESCriterion
    from gres.optim import build_optimizer, clip_gradients
    from gres.pretrain import resolve_pretrained

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    parser.add_argument("--pretrained-root", type=Path,
                        default=ROOT / "outputs" / "experiments" / "_pretrained")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    cfg = apply_overrides(PRESETS[args.preset](), args.overrides)
    cfg = resolve_pretrained(cfg, args.pretrained_root, progress=False)
    torch.manual_seed(0)
    model = engine.prepare_model(cfg).train()
    bs = cfg.train.batch_size
    train = engine.build_dataset(cfg, "train")
    if cfg.train.text_feature_cache:
        from gres.text_cache import use_feature_store

        use_feature_store(model, [train, engine.build_dataset(cfg, "val")], args.pretrained_root)
    collate = engine.build_collate()
    batches = [collate([train[i] for i in range(j * bs, (j + 1) * bs)]) for j in range(4)]
    criterion = GRESCriterion(cfg.loss)
    optimizer = build_optimizer(model, cfg.train)

    started: dict[str, float] = {}
    spent: dict[str, float] = defaultdict(float)
    for name in PARTS:
        module = getattr(model, name, None)
        if module is None:
            continue
        module.register_forward_pre_hook(
            lambda m, i, name=name: started.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(
            lambda m, i, o, name=name: spent.__setitem__(
                name, spent[name] + time.perf_counter() - started[name]))

    total: dict[str, float] = defaultdict(float)
    for step in range(args.steps + 2):
        batch = batches[step % len(batches)]
        spent.clear()
        t0 = time.perf_counter()
        out = model(batch.image, batch.input_ids, batch.text_mask)
        t1 = time.perf_counter()
        loss = criterion(out, batch.gt_mask, batch.no_target)["loss"]
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        clip_gradients(optimizer, cfg.train.clip_grad_norm)
        optimizer.step()
        t4 = time.perf_counter()
        if step < 2:  # warm-up
            continue
        for name, seconds in spent.items():
            total[f"forward: {name}"] += seconds
        for name, seconds in (("forward", t1 - t0), ("loss", t2 - t1), ("backward", t3 - t2),
                              ("clip + optimiser", t4 - t3), ("step", t4 - t0)):
            total[name] += seconds
    for name, seconds in total.items():
        print(f"{name:28s} {1000 * seconds / args.steps:8.1f} ms")
    print(f"{'samples/s':28s} {bs * args.steps / total['step']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
