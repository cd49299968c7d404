"""Time budget of the book's experiments (Tables 2-7, Figure 6) on this machine.

    .venv/bin/python bench/bench_experiments.py throughput [--threads 1 2] [--iters 12]
    .venv/bin/python bench/bench_experiments.py run --mode full  [--workers 2] [--root DIR]
    .venv/bin/python bench/bench_experiments.py run --mode smoke [--workers 2]

``throughput``: for every distinct configuration the book trains (``gres.experiments.book_specs``
of the ``cpu-small`` and ``cpu-small-ablation`` presets), the training samples/s of full optimiser
steps (forward, loss, backward, clip, AdamW) on real batches of the synthetic set, with 1 and 2
torch threads, and the predicted minutes of its budget; then the predicted wall time of the whole
plan with one process and with two 1-thread processes side by side (longest first).

``run``: trains and evaluates everything the book needs through the runner exactly as the
chapters do (``gres.experiments.run_specs``), in a fresh cache folder unless ``--root`` is given,
and records the wall time of every training, the total wall time, the tables (mean over seeds)
and the learning curves (``bench/learning_curves/*.csv``). ``--mode smoke`` does the same with the
``cpu-smoke`` preset on the tiny synthetic set (the tests' setting; it must fit in 3 minutes).

Results go to ``bench/results/experiments_<mode>.json``; the summary is in bench/RESULTS.md,
section "Experiments". Measure on a quiet machine; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _load() -> float:
    return os.getloadavg()[0]


def plan(main_preset: str, ablation_preset: str, data_root: str | None = None):
    from gres import experiments as ex

    main, abl = ex.preset(main_preset), ex.preset(ablation_preset)
    if data_root is not None:
        main = ex.replace(main, data={"root": data_root})
        abl = ex.replace(abl, data={"root": data_root})
    specs = ex.book_specs(main, abl)
    return specs, ex.unique_configs([s for rows in specs.values() for s in rows])


def measure(cfg, threads: int, iters: int, warmup: int = 2) -> float:
    """Training samples/s of ``cfg`` (real batches, full optimiser steps, no data loading)."""
    import torch

    from gres import engine
    from gres import experiments as ex
    from gres.losses import GRESCriterion
    from gres.optim import build_optimizer, build_scheduler, clip_gradients

    torch.set_num_threads(threads)
    run_cfg = ex._runnable(cfg)
    dataset = engine.build_dataset(run_cfg, run_cfg.data.train_split)
    bs = cfg.train.batch_size
    collate = engine.build_collate()
    batches = [collate([dataset[i * bs + k] for k in range(bs)]) for i in range(4)]
    torch.manual_seed(0)
    model = engine.prepare_model(run_cfg).train()
    crit = GRESCriterion(cfg.loss)
    opt = build_optimizer(model, cfg.train)
    sched = build_scheduler(opt, cfg.train, 10_000)
    t0 = 0.0
    for it in range(warmup + iters):
        if it == warmup:
            t0 = time.perf_counter()
        b = batches[it % len(batches)]
        out = model(b.image, b.input_ids, b.text_mask)
        loss = crit(out, b.gt_mask, b.no_target)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(opt, cfg.train.clip_grad_norm)
        opt.step()
        sched.step()
    return iters * bs / (time.perf_counter() - t0)


def schedule(minutes: list[float], workers: int) -> float:
    """Wall minutes of running jobs of ``minutes`` on ``workers`` slots, longest first."""
    slots = [0.0] * workers
    for m in sorted(minutes, reverse=True):
        slots[slots.index(min(slots))] += m
    return max(slots)


def cmd_throughput(args) -> dict:
    specs, cfgs = plan(args.main, args.ablation, args.data_root)
    rows = []
    for cfg in cfgs:
        row = {"config": cfg.name, "max_samples": cfg.train.max_samples, "load_before": _load()}
        for t in args.threads:
            sps = measure(cfg, t, args.iters)
            row[f"samples_per_s_{t}t"] = round(sps, 1)
            row[f"minutes_{t}t"] = round(cfg.train.max_samples / sps / 60, 2)
        row["load_after"] = _load()
        rows.append(row)
        print(json.dumps(row), flush=True)
    t = args.threads[0]
    mins = [r[f"minutes_{t}t"] for r in rows]
    out = {
        "rows": rows,
        "train_minutes_total_1proc": round(sum(mins), 1),
        "train_minutes_wall_2proc": round(schedule(mins, 2), 1),
        "threads": t,
    }
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}), flush=True)
    return out


def cmd_run(args) -> dict:
    import tempfile

    import torch

    from gres import experiments as ex

    torch.set_num_threads(1)
    if args.mode == "smoke":
        from gres.data.synthetic import generate

        data_root = args.data_root or str(Path(tempfile.mkdtemp()) / "synthetic-tiny")
        generate(data_root, "tiny", seed=0, progress=False)
        specs, cfgs = plan("cpu-smoke", "cpu-smoke", data_root)
    else:
        specs, cfgs = plan(args.main, args.ablation, args.data_root)
    root = Path(args.root or tempfile.mkdtemp(prefix=f"experiments-{args.mode}-"))
    seeds = tuple(args.seeds)
    t0 = time.time()
    load0 = _load()
    ex.train_all([ex.with_seed(c, s) for c in cfgs for s in seeds], workers=args.workers,
                 root=root)
    t_train = time.time() - t0
    tables, curves = {}, []
    for table, rows in specs.items():
        results = ex.run_specs(rows, seeds=seeds, root=root, progress=False, verbose=False)
        tables[table] = [r.row() for r in results]
        for r in results:
            if r.cfg.name not in [c.cfg.name for c in curves]:
                curves.append(r)
    total = time.time() - t0
    trainings = []
    for c in cfgs:
        for s in seeds:
            info = json.loads((ex.run_dir(ex.with_seed(c, s), root) / ex.RESULT_FILE).read_text())
            trainings.append({"config": c.name, "seed": s, "samples": info["samples"],
                              "minutes": round(info["seconds"] / 60, 2),
                              "samples_per_s": round(info["samples_per_s"], 1)})
    if args.mode == "full":
        paths = ex.export_curves(curves, ROOT / "bench" / "learning_curves")
        print("curves:", [p.name for p in paths])
        plot_curves(paths, ROOT / "bench" / "learning_curves" / "learning_curves.svg")
    out = {"mode": args.mode, "workers": args.workers, "seeds": list(seeds), "root": str(root),
           "wall_minutes_total": round(total / 60, 2), "wall_minutes_training": round(t_train / 60, 2),
           "load_start": load0, "load_end": _load(), "trainings": trainings, "tables": tables}
    print(json.dumps({k: v for k, v in out.items() if k not in ("tables", "trainings")}))
    for table, rows in tables.items():
        print(table)
        for r in rows:
            print(f"  {r['label']:<40} gIoU {r['gIoU']:6.2f}  cIoU {r['cIoU']:6.2f}  "
                  f"N-acc {r['N-acc']:6.2f}  T-acc {r['T-acc']:6.2f}")
    return out


def plot_curves(paths: list[Path], out: Path) -> None:
    """gIoU / N-acc / T-acc on the capped validation split against training samples, one line per
    training run (the eval points of the engine log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharex=False)
    for p in sorted(paths):
        df = pd.read_csv(p)
        ev = df[df["kind"] == "eval"]
        if "final" in ev.columns:
            ev = ev[ev["final"].isna() | (ev["final"] == False)]  # noqa: E712 (capped points only)
        for ax, metric in zip(axes, ("gIoU", "N-acc", "T-acc")):
            if metric in ev.columns:
                ax.plot(ev["samples"], ev[metric], marker=".", label=p.stem)
    for ax, metric in zip(axes, ("gIoU", "N-acc", "T-acc")):
        ax.set_title(metric)
        ax.set_xlabel("training samples")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    print("wrote", out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("throughput", "run"):
        p = sub.add_parser(name)
        p.add_argument("--main", default="cpu-small")
        p.add_argument("--ablation", default="cpu-small-ablation")
        p.add_argument("--data-root", default=None)
        p.add_argument("--json", default=None)
    tp = sub.choices["throughput"]
    tp.add_argument("--threads", type=int, nargs="+", default=[1])
    tp.add_argument("--iters", type=int, default=12)
    rp = sub.choices["run"]
    rp.add_argument("--mode", choices=("full", "smoke"), default="full")
    rp.add_argument("--workers", type=int, default=2)
    rp.add_argument("--seeds", type=int, nargs="+", default=[0])
    rp.add_argument("--root", default=None)
    args = parser.parse_args(argv)
    out = cmd_throughput(args) if args.cmd == "throughput" else cmd_run(args)
    mode = args.mode if args.cmd == "run" else "throughput"
    path = Path(args.json or ROOT / "bench" / "results" / f"experiments_{mode}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    out["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path.write_text(json.dumps(out, indent=1))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
