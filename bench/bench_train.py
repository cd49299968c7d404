"""Training throughput, peak memory and data-loading share per preset (CPU or CUDA).

    .venv/bin/python bench/bench_train.py                          # tiny-test + small CPU presets
    .venv/bin/python bench/bench_train.py --presets tiny-test rela-swin-b --batch 2 --iters 3
    .venv/bin/python bench/bench_train.py --json bench/train_results.json

For every preset, in a fresh subprocess (so that the peak resident memory belongs to that preset
alone), on the synthetic "tiny" dataset generated into a temporary folder:

1. **loader**: time to draw ``--iters`` batches from the training DataLoader alone (decode, resize,
   rasterise, tokenise, collate), with the preset's ``num_workers``;
2. **step**: time of ``--iters`` full optimiser steps (forward, loss, backward, clip, AdamW,
   scheduler) on batches already in memory, after ``--warmup`` untimed steps;
3. **train()**: samples/s of the real :func:`gres.engine.train` loop (loader + step + logging),
   from its log;
4. peak resident memory of the process (``ru_maxrss``), and ``max_memory_allocated`` on CUDA.

Data loading is not the bottleneck when ``loader s/batch`` is a small fraction of ``step s/batch``
(the DataLoader prefetches with workers > 0; with 0 workers the two simply add up).

Presets that would download weights (``rela-swin-b``: Swin-B 22k via timm, BERT-base from the hub)
are run with the same architecture and random initialisation (``swin.pretrained=None``,
``text.name_or_path=None``, the packaged bert-base-uncased tokenizer): the cost is the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def offline_architecture(cfg):
    """Same architecture, no download: random Swin/BERT init, packaged tokenizer."""
    from gres.config import TextConfig

    text = cfg.model.text
    if text.name_or_path not in (None, "minilm") and not Path(str(text.name_or_path)).is_dir():
        text = dataclasses.replace(text, name_or_path=None, tokenizer="minilm")
    swin = dataclasses.replace(cfg.model.swin, pretrained=None)
    model = dataclasses.replace(cfg.model, swin=swin, text=text)
    assert isinstance(model.text, TextConfig)
    return dataclasses.replace(cfg, model=model)


def run_one(
    preset: str, batch: int | None, iters: int, warmup: int, threads: int, loop: bool = True
) -> dict:
    """Measure one preset in this process."""
    import torch

    torch.set_num_threads(threads)
    from gres import engine
    from gres.cli import preset_config
    from gres.data.synthetic import generate
    from gres.losses import GRESCriterion
    from gres.optim import build_optimizer, build_scheduler, clip_gradients

    cfg = offline_architecture(preset_config(preset))
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    data_root = tmp / "data"
    generate(data_root, "tiny", seed=0, progress=False)
    t = cfg.train
    bs = batch or t.batch_size
    n_total = warmup + iters
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, root=str(data_root), dataset="synthetic"),
        train=dataclasses.replace(
            t, batch_size=bs, max_iters=n_total, max_samples=None, eval_every=0,
            checkpoint_every=10**9, log_every=n_total, amp=t.amp,
        ),
    )
    device = engine.resolve_device(cfg.train.device)
    dataset = engine.build_dataset(cfg, cfg.data.train_split)
    sampler = engine.TrainBatchSampler(len(dataset), bs, cfg.train.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=engine.build_collate(),
        num_workers=cfg.data.num_workers, generator=torch.Generator(),
    )
    # 1. loader alone
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    batches = [next(it) for _ in range(iters)]
    loader_s = (time.perf_counter() - t0) / iters
    del it

    # 1b. what one real COCO-sized image costs (the synthetic images are smaller): decode a
    # 640x480 JPEG of noise (a worst case for the decoder), resize to S x S, tokenise.
    from PIL import Image

    from gres.data.dataset import load_rgb, resize_square, tokenize

    probe = tmp / "probe.jpg"
    noise = (torch.rand(480, 640, 3, generator=torch.Generator().manual_seed(0)) * 255).byte()
    Image.fromarray(noise.numpy()).save(probe, quality=95)
    t0 = time.perf_counter()
    for _ in range(20):
        resize_square(load_rgb(probe), cfg.model.image_size)
        tokenize(dataset.tokenizer, "the two dogs on the left of the man in a red shirt", 20)
    coco_ms = (time.perf_counter() - t0) / 20 * 1000

    # 2. optimiser steps on in-memory batches
    engine.seed_everything(cfg.train.seed)
    model = engine.prepare_model(cfg).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    crit = GRESCriterion(cfg.loss).to(device)
    opt = build_optimizer(model, cfg.train)
    sched = build_scheduler(opt, cfg.train, n_total)
    use_amp, amp_dtype = engine._amp_setup(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    def step(b):
        b = b.to(device)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            out = model(b.image, b.input_ids, b.text_mask)
            loss = crit(out, b.gt_mask, b.no_target)["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        clip_gradients(opt, cfg.train.clip_grad_norm)
        scaler.step(opt)
        scaler.update()
        sched.step()
        return float(loss)

    for k in range(warmup):
        step(batches[k % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in batches:
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / iters
    del model, opt, sched

    # 3. the real loop
    loop_sps = train_s = None
    if loop:
        t0 = time.perf_counter()
        res = engine.train(cfg, tmp / "run", progress=False, train_dataset=dataset)
        train_s = round(time.perf_counter() - t0, 1)
        loop_sps = round([r for r in res.history if r["kind"] == "train"][-1]["samples_per_s"], 2)
    out = {
        "preset": preset,
        "device": str(device),
        "threads": threads,
        "image_size": cfg.model.image_size,
        "batch": bs,
        "iters_timed": iters,
        "params_M": round(n_params / 1e6, 2),
        "trainable_M": round(n_train / 1e6, 2),
        "num_workers": cfg.data.num_workers,
        "loader_s_per_batch": round(loader_s, 4),
        "step_s_per_batch": round(step_s, 4),
        "loader_share": round(loader_s / step_s, 3),
        "coco_jpeg_ms_per_sample": round(coco_ms, 1),
        "step_samples_per_s": round(bs / step_s, 2),
        "train_loop_samples_per_s": loop_sps,
        "train_call_s": train_s,
        "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if device.type == "cuda":
        out["cuda_peak_MB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=None, help="default: every CPU-sized preset")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the preset's)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", default=None, help="append results to this JSON file")
    p.add_argument("--skip-loop", action="store_true",
                   help="skip the engine.train() measurement (expensive presets)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process mode
    args = p.parse_args(argv)

    if args.one:
        res = run_one(args.one, args.batch, args.iters, args.warmup, args.threads,
                      loop=not args.skip_loop)
        print(json.dumps(res))
        return 0

    from gres.config import PRESETS

    # Default: the CPU-sized presets that can train on text (official-tiny-vectors has a 512-word
    # vocabulary for the test vectors, so real tokenizers do not fit it).
    presets = args.presets or [
        n for n, make in PRESETS.items()
        if n not in ("rela-swin-b", "rela-swin-t") and make().model.text.vocab_size >= 30522
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    results = []
    for name in presets:
        cmd = [sys.executable, __file__, "--one", name, "--iters", str(args.iters),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
        if args.batch:
            cmd += ["--batch", str(args.batch)]
        if args.skip_loop:
            cmd += ["--skip-loop"]
        print(f"# {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    cols = ["preset", "image_size", "batch", "params_M", "trainable_M", "num_workers",
            "loader_s_per_batch", "step_s_per_batch", "loader_share", "coco_jpeg_ms_per_sample",
            "step_samples_per_s",
            "train_loop_samples_per_s", "peak_rss_MB"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(old + results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
